"""An HF safetensors model directory as a source of GGUF tensors (llama-style checkpoints).

Reads config.json and the *.safetensors files (memory-mapped, no extra dependency) of LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM models, renames the tensors as llama.cpp's convert_hf_to_gguf.py
does (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), permutes the q/k projections of
llama models into the row order of ggml's rope, and gives the architecture's hyperparameters as GGUF
metadata. The tokenizer is not converted.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
from gguf import GGUFValueType

# HF architecture -> GGUF architecture, and whether q/k rows are permuted (llama's rope layout)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False)}

_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ST_DTYPES = {"F32": ("F32", np.float32), "F16": ("F16", np.float16), "BF16": ("BF16", np.uint16)}


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, or None for tensors llama.cpp does not load (rotary inv_freq)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _PER_LAYER:
        return f"blk.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"{hf_name}: no GGUF name for this tensor (supported: {', '.join(ARCHITECTURES)})")


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8 or n > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes does not fit the file")
        return json.loads(f.read(n)), 8 + n


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half row order -> ggml's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class HFSource:
    def __init__(self, path: str):
        with open(os.path.join(path, "config.json")) as f:
            self.config = cfg = json.load(f)
        archs = cfg.get("architectures") or []
        if not archs or archs[0] not in ARCHITECTURES:
            raise ValueError(f"{path}: architecture {archs} is not supported (supported: {', '.join(ARCHITECTURES)})")
        self.arch, self._permute = ARCHITECTURES[archs[0]]
        self.n_head = int(cfg["num_attention_heads"])
        self.n_head_kv = int(cfg.get("num_key_value_heads", self.n_head))
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors files")
        self._entries = {}  # gguf name -> (file, data offset, dtype name, numpy dtype, shape, hf name)
        for fname in files:
            full = os.path.join(path, fname)
            header, base = _read_safetensors_header(full)
            for hf_name, meta in header.items():
                if hf_name == "__metadata__":
                    continue
                name = gguf_name(hf_name)
                if name is None:
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{full}: {hf_name} has dtype {meta['dtype']} (F32, F16 and BF16 are supported)")
                begin, end = meta["data_offsets"]
                type_name, np_dtype = _ST_DTYPES[meta["dtype"]]
                shape = tuple(int(s) for s in meta["shape"])
                if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
                    raise ValueError(f"{full}: {hf_name}: data size does not match its shape {shape}")
                self._entries[name] = (full, base + begin, type_name, np_dtype, shape, hf_name)
        # output.weight absent: tied to the embedding, as llama.cpp reads it
        self.tensors = [(name, e[4], e[2]) for name, e in self._entries.items()]
        self.metadata = self._hparams(os.path.basename(os.path.normpath(path)))

    def _hparams(self, name: str) -> list:
        cfg, a = self.config, self.arch
        u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
        meta = [("general.name", name, GGUFValueType.STRING, None),
                (f"{a}.block_count", cfg["num_hidden_layers"], u32, None),
                (f"{a}.context_length", cfg.get("max_position_embeddings", 2048), u32, None),
                (f"{a}.embedding_length", cfg["hidden_size"], u32, None),
                (f"{a}.feed_forward_length", cfg["intermediate_size"], u32, None),
                (f"{a}.attention.head_count", self.n_head, u32, None),
                (f"{a}.attention.head_count_kv", self.n_head_kv, u32, None),
                (f"{a}.rope.freq_base", float(cfg.get("rope_theta", 10000.0)), f32, None),
                (f"{a}.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), f32, None)]
        if "vocab_size" in cfg:
            meta.append((f"{a}.vocab_size", cfg["vocab_size"], u32, None))
        if a == "llama":
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_head
            meta.append((f"{a}.rope.dimension_count", head_dim, u32, None))
        return meta

    def info(self):
        return self.arch, int(self.config["num_hidden_layers"]), self.n_head, self.n_head_kv

    def load(self, index: int):
        """Tensor `index` as a numpy array in torch order (BF16 as its raw uint16 bits)."""
        name = self.tensors[index][0]
        path, offset, _, np_dtype, shape, _ = self._entries[name]
        data = np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=shape)
        if self._permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _permute_rope_rows(np.asarray(data), self.n_head if "attn_q" in name else self.n_head_kv)
        return data
