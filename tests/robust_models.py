"""Tiny model files whose every field a robustness case can change: a GGUF llama file built byte by byte
(tests/gguf_bytes.py), an HF llama directory (config.json, safetensors, tokenizer.json) and a flashlm training
checkpoint.

    data = gguf_model(meta={"llama.block_count": (gb.UINT64, 2**31)})    # bytes of a whole GGUF file
    hf_dir(path, config={"num_attention_heads": 3}, drop=["model.norm.weight"])
    checkpoint(path, edit=lambda state: state["model_config"].update(n_layer=2**31))

Every builder starts from one valid model (seeded weights): the robustness tests load it unchanged first, so a
failure of a mutated file is the mutation's.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import numpy as np
import torch

import gguf_bytes as gb

D, HEADS, KV_HEADS, FF, LAYERS, CONTEXT = 32, 4, 2, 64, 2, 64
HEAD_DIM = D // HEADS


# -- GGUF ------------------------------------------------------------------------------------------------------

def byte_symbols() -> list:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


GGUF_VOCAB = 300  # the 256 byte symbols, one merge, padding


def gguf_metadata() -> dict:
    """key -> (GGUF type, value) of the valid file, in file order."""
    symbols = byte_symbols() + ["\u0120t"]
    tokens = symbols + [f"[PAD{i}]" for i in range(len(symbols), GGUF_VOCAB)]
    types = [1] * len(symbols) + [5] * (GGUF_VOCAB - len(symbols))
    meta = {"general.architecture": (gb.STRING, "llama")}
    for key, value in (("context_length", CONTEXT), ("embedding_length", D), ("block_count", LAYERS),
                       ("feed_forward_length", FF), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)):
        meta[f"llama.{key}"] = (gb.UINT32, value)
    meta["llama.attention.layer_norm_rms_epsilon"] = (gb.FLOAT32, 1e-5)
    meta["llama.rope.freq_base"] = (gb.FLOAT32, 10000.0)
    meta["tokenizer.ggml.model"] = (gb.STRING, "gpt2")
    meta["tokenizer.ggml.pre"] = (gb.STRING, "gpt-2")
    meta["tokenizer.ggml.tokens"] = (gb.ARRAY, (gb.STRING, tokens))
    meta["tokenizer.ggml.token_type"] = (gb.ARRAY, (gb.INT32, types))
    meta["tokenizer.ggml.merges"] = (gb.ARRAY, (gb.STRING, ["\u0120 t"]))
    meta["tokenizer.ggml.eos_token_id"] = (gb.UINT32, 0)
    return meta


def gguf_tensors() -> dict:
    """name -> (dims in GGUF order, ggml type, float32 values) of the valid file."""
    rng = np.random.default_rng(0)

    def matrix(rows, cols):
        return (cols, rows), gb.F32, (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def ones(n):
        return (n,), gb.F32, np.ones(n, np.float32)

    tensors = {"token_embd.weight": matrix(GGUF_VOCAB, D), "output.weight": matrix(GGUF_VOCAB, D),
               "output_norm.weight": ones(D)}
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        for name, (rows, cols) in {"attn_q": (D, D), "attn_k": (kv, D), "attn_v": (kv, D), "attn_output": (D, D),
                                   "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}.items():
            tensors[f"blk.{i}.{name}.weight"] = matrix(rows, cols)
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{name}.weight"] = ones(D)
    return tensors


def gguf_model(meta=None, drop=(), tensors=None, offsets=None, n_tensors=None, n_kv=None) -> bytes:
    """The valid file's bytes with metadata entries replaced or added (`meta`: key -> (type, value), or None to
    remove the key), tensors dropped, replaced or added (`tensors`: name -> (dims, type, data bytes or array)),
    offsets overridden (`offsets`: name -> the offset written, the data laid out as usual) and the header's
    counts overridden."""
    entries = gguf_metadata()
    for key, value in (meta or {}).items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value
    kvs = [gb.kv(key, vtype, value) for key, (vtype, value) in entries.items()]
    layout = {name: t for name, t in gguf_tensors().items() if name not in drop}
    layout.update(tensors or {})
    infos, data = [], b""
    for name, (dims, ggml_type, values) in layout.items():
        data += bytes(gb.pad_to(len(data), 32) - len(data))
        offset = (offsets or {}).get(name, len(data))
        infos.append(gb.tensor_info(name, dims, ggml_type, offset))
        data += values if isinstance(values, bytes) else np.ascontiguousarray(values).tobytes()
    return gb.gguf(kvs, infos, data, n_tensors=n_tensors, n_kv=n_kv)


# -- an HF directory -------------------------------------------------------------------------------------------

VOCAB = 300  # of the HF directory and the checkpoint: a byte-level BPE's 256 bytes, <|endoftext|> and merges
TEXT = "the quick brown fox jumps over the lazy dog, then the dog sleeps and the fox runs away. " * 20


def hf_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": FF,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB, "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 0}


def hf_weights() -> dict:
    g = torch.Generator().manual_seed(1)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    kv = KV_HEADS * HEAD_DIM
    state = {"model.embed_tokens.weight": w(VOCAB, D), "model.norm.weight": torch.ones(D),
             "lm_head.weight": w(VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.k_proj.weight": w(kv, D),
                  p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, D),
                  p + "mlp.gate_proj.weight": w(FF, D), p + "mlp.up_proj.weight": w(FF, D),
                  p + "mlp.down_proj.weight": w(D, FF), p + "input_layernorm.weight": torch.ones(D),
                  p + "post_attention_layernorm.weight": torch.ones(D)}
    return state


@functools.lru_cache(maxsize=1)
def bpe_tokenizer_json() -> str:
    """A byte-level BPE of at most VOCAB tokens (<|endoftext|> is id 0) trained on TEXT, as tokenizer.json
    text: what flashlm's trainer writes, and what its exporters take."""
    from flashlm.train.tokenizer import train_tokenizer

    return train_tokenizer([TEXT], vocab_size=VOCAB).to_str()


def word_tokenizer_json(n: int) -> str:
    """A word-level tokenizer of n tokens (w0, w1, ...), as tokenizer.json text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def hf_dir(path, config=None, drop=(), weights=None, files=None) -> str:
    """Writes the valid directory to `path` with config.json keys replaced (`config`: key -> value, or None
    to remove it), weights dropped or replaced (`weights`: name -> tensor), and extra or replaced files
    (`files`: name -> text or bytes, None to remove it)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = hf_config()
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    state = {k: v for k, v in hf_weights().items() if k not in drop}
    state.update(weights or {})
    contents = {"config.json": json.dumps(cfg), "tokenizer.json": bpe_tokenizer_json()}
    contents.update(files or {})
    for name, content in contents.items():
        if content is None:
            continue
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(os.path.join(path, name), mode) as f:
            f.write(content)
    if "model.safetensors" not in contents:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


# -- a training checkpoint -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _checkpoint_state() -> dict:
    from flashlm.io.checkpoint import FORMAT
    from flashlm.models import ModelConfig, Transformer

    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_kv_head=KV_HEADS,
                      d_model=D, d_ff=FF, seq_len=CONTEXT)
    torch.manual_seed(2)
    return {"format": FORMAT, "model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(),
            "tokenizer": bpe_tokenizer_json(), "eos_token_id": 0, "step": 3}


def checkpoint_state() -> dict:
    """A fresh copy of the valid checkpoint's dict."""
    return copy.deepcopy(_checkpoint_state())


def checkpoint(path, edit=None) -> str:
    """Writes the valid checkpoint (edited in place by `edit(state)`) with torch.save."""
    state = checkpoint_state()
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return str(path)
