"""Test helper: writes a transformers model (Llama, Qwen2, Qwen3, Phi-3, GPT-2) as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py lays it out, with gguf-py's GGUFWriter and gguf-py's quantizers, so the loader is
checked against llama.cpp's own conventions rather than against flashlm's exporter:
- names: token_embd, output_norm, output (absent when tied), blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}; GPT-2: position_embd, attn_qkv (fused), biases;
  qwen3's blk.N.{attn_q_norm, attn_k_norm} and attention.key_length / value_length (its head_dim);
  phi3's fused blk.N.attn_qkv and blk.N.ffn_up (gate|up), attention.sliding_window (0: none) and
  rope.scaling.original_context_length (Phi3MiniModel);
- llama's q/k rows permuted into ggml's rope order (LlamaModel.permute); qwen2's and qwen3's not;
- Llama 3 rope scaling as the rope_freqs tensor (LlamaModel.generate_extra_tensors);
- 2-D weights in `qtype` (F32, F16, BF16, Q8_0, Q4_0), 1-D tensors F32.
`dequantized_state` gives the HF state dict with every weight replaced by what the file holds, for
references that isolate the loader from the quantization error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

QTYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16,
          "Q8_0": GGMLQuantizationType.Q8_0, "Q4_0": GGMLQuantizationType.Q4_0}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model, arch: str) -> list[tuple[str, np.ndarray, str, str]]:
    """(GGUF name, float32 array in torch order, HF state-dict key, how it was transformed: "", "T" or
    "perm<n_head>") in llama.cpp's layout."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = []
    if arch == "gpt2":
        p = "transformer." if "transformer.wte.weight" in sd else ""
        for hf, gg in (("wte.weight", "token_embd.weight"), ("wpe.weight", "position_embd.weight"),
                       ("ln_f.weight", "output_norm.weight"), ("ln_f.bias", "output_norm.bias")):
            out.append((gg, sd[p + hf], p + hf, ""))
        for i in range(cfg.n_layer):
            h = f"{p}h.{i}."
            for hf, gg, conv in (("ln_1", "attn_norm", False), ("attn.c_attn", "attn_qkv", True),
                                 ("attn.c_proj", "attn_output", True), ("ln_2", "ffn_norm", False),
                                 ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True)):
                w = sd[h + hf + ".weight"]
                out.append((f"blk.{i}.{gg}.weight", w.T.copy() if conv else w, h + hf + ".weight", "T" if conv else ""))
                out.append((f"blk.{i}.{gg}.bias", sd[h + hf + ".bias"], h + hf + ".bias", ""))
        return out
    out += [("token_embd.weight", sd["model.embed_tokens.weight"], "model.embed_tokens.weight", ""),
            ("output_norm.weight", sd["model.norm.weight"], "model.norm.weight", "")]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"], "lm_head.weight", ""))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in sd:
                    continue
                w, how = sd[key], ""
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    n = cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads
                    w, how = permute(w, n), f"perm{n}"
                out.append((f"blk.{i}.{gg}.{kind}", w, key, how))
    return out


def _rope_factors(cfg) -> np.ndarray | None:
    """convert_hf_to_gguf.py's Llama 3 rope factors (piecewise, as written there)."""
    rs = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rs.get("rope_type") != "llama3":
        return None
    theta = rs.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = (rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"],
                              rs["factor"])
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    if w.ndim == 1 or qtype == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType.F32
    if qtype == "F16":
        return w.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), QTYPES[qtype]), QTYPES[qtype]


def write_gguf(model, arch: str, path: str, qtype: str = "F32", tokenizer_meta=None, context_length=None,
               skip=(), replace=None, extra=None) -> dict:
    """Writes `model` (a transformers model) to `path`; returns {GGUF name: the float32 array the file holds,
    in torch order and llama.cpp's row order}. `skip` drops tensors, `replace` {name: array} writes another
    array (as F32, or (array, GGML type) as is) under a name, `extra` {name: array} adds F32 tensors: for malformed-file tests."""
    cfg = model.config
    w = GGUFWriter(path, arch)
    if arch == "gpt2":
        d = cfg.n_embd
        w.add_context_length(context_length or cfg.n_positions)
        w.add_embedding_length(d)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_inner or 4 * d)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        rp = getattr(cfg, "rope_parameters", None) or {}
        w.add_context_length(context_length or cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        if arch == "phi3":
            w.add_sliding_window(cfg.sliding_window or 0)
            w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        if arch == "qwen3":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    for key, value, vtype, sub in tokenizer_meta or []:
        w.add_key_value(key, value, vtype, sub_type=sub)
    held = {}
    tensors = _gguf_tensors(model, arch)
    factors = _rope_factors(cfg) if arch == "llama" else None
    if factors is not None:
        tensors.append(("rope_freqs.weight", factors, None, ""))
    tensors += [(name, arr, None, "") for name, arr in (extra or {}).items()]
    for name, arr, *_ in tensors:
        if name in skip:
            continue
        if (replace and name in replace) or (extra and name in extra):
            arr = replace[name] if replace and name in replace else arr
            arr, t = arr if isinstance(arr, tuple) else (arr.astype(np.float32), GGMLQuantizationType.F32)
            data = np.ascontiguousarray(arr)
        else:
            data, t = _encode(arr, qtype)
        w.add_tensor(name, data, raw_dtype=t)
        held[name] = quants.dequantize(data, t).reshape(data.shape[:-1] + (-1,)).astype(np.float32) \
            if t not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.I32) \
            else data.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def dequantized_state(model, arch: str, held: dict) -> dict:
    """The HF state dict of `model` with each tensor replaced by the file's values (dequantized, back in HF's
    layout): the weights a llama.cpp-exact loader computes with."""
    sd = dict(model.state_dict())
    for name, _, key, how in _gguf_tensors(model, arch):
        w = held[name]
        if how == "T":
            w = w.T
        elif how.startswith("perm"):
            w = unpermute(w, int(how[4:]))
        sd[key] = torch.from_numpy(np.ascontiguousarray(w))
    if model.config.tie_word_embeddings and "lm_head.weight" in sd:  # tied: the same held values
        emb = "model.embed_tokens.weight" if arch != "gpt2" else \
            ("transformer.wte.weight" if "transformer.wte.weight" in sd else "wte.weight")
        sd["lm_head.weight"] = sd[emb]
    return sd
