"""LoRA adapters as llama.cpp's GGUF adapter files, which llama.cpp applies to the unchanged base GGUF
(`llama_cpp.Llama(base, lora_path=...)`, `llama-cli --lora`).

    export_lora_gguf(model, "adapter.gguf")   # model: a flashlm Transformer with LoRA layers (apply_lora/load_peft)

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type = adapter, adapter.type = lora,
adapter.lora.alpha, and for each adapted weight "blk.N.<name>.weight.lora_a" (A, [r, in] in torch order, so
ggml's ne = [in, r]) and ".lora_b" (B, [out, r]), float32. llama.cpp scales B A x by alpha / r with r read from
B's shape, so alpha is written as scaling * r (rsLoRA's alpha / sqrt(r) included). llama's q and k rows are
permuted into ggml's rope order by flashlm's GGUF export; B's rows (the output side) follow the same permutation.

GPT-2's q, k and v are one tensor in GGUF (attn_qkv, rows q|k|v), so their three pairs become one adapter on it:
A stacked [3r, in] and B block-diagonal [3 out, 3r] (a block of zeros where a projection has no LoRA), which
gives the same q|k|v outputs. llama.cpp scales each tensor by alpha / (its own rank), here 3r, while the other
tensors get alpha / r: B of attn_qkv is multiplied by 3 so that its effective scale is alpha / r as well.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

from flashlm.io.hf_source import permute_rope_rows
from flashlm.io.lora_adapter import GGUF_NAMES, GPT2_GGUF_NAMES
from flashlm.train.peft.lora import lora_layers

_GPT2_QKV = ("attn.q", "attn.k", "attn.v")

def lora_gguf_tensors(model: nn.Module) -> tuple[float, list]:
    """(alpha, [(GGUF tensor name, float32 array in torch order)]) of the LoRA layers in model."""
    cfg = model.cfg
    if cfg.arch not in ("llama", "qwen2", "gpt2"):
        raise NotImplementedError(f"model: GGUF LoRA adapters are written for llama, qwen2 and gpt2, not {cfg.arch}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers")
    first = next(iter(layers.values()))
    pairs = {}  # (block, module) -> (A, B) in torch order
    for name, m in layers.items():
        if (m.r, m.scaling) != (first.r, first.scaling):
            raise NotImplementedError(f"model: {name} has another rank or scaling than the other LoRA layers "
                                      f"(a GGUF adapter has one alpha)")
        if m.merged:
            raise ValueError(f"model: {name} is merged; unmerge it before saving the adapter")
        block, _, module = name.partition(".")[2].partition(".")
        a = m.lora_A.detach().float().cpu().numpy()
        b = m.lora_B.detach().float().cpu().numpy()
        if cfg.arch == "llama" and module in ("attn.q", "attn.k"):
            b = permute_rope_rows(b, cfg.n_head if module == "attn.q" else cfg.n_kv_head)
        pairs[int(block), module] = (a, b)
    out = []
    if cfg.arch == "gpt2":
        for block in sorted({block for block, module in pairs if module in _GPT2_QKV}):
            a, b = _fused_qkv([pairs.pop((block, module), None) for module in _GPT2_QKV], first.r, cfg.d_model)
            out += _pair(f"blk.{block}.attn_qkv.weight", a, b)
    names = GPT2_GGUF_NAMES if cfg.arch == "gpt2" else GGUF_NAMES
    for (block, module), (a, b) in pairs.items():
        out += _pair(f"blk.{block}.{names[module]}.weight", a, b)
    return float(first.scaling * first.r), out


def _fused_qkv(qkv: list, r: int, d: int) -> tuple:
    """gpt2's q, k, v pairs (None where a projection has no LoRA) as one pair on attn_qkv: A [3r, d] stacked,
    B [3d, 3r] block-diagonal and times 3, as llama.cpp scales this tensor by alpha / 3r, not alpha / r."""
    a = np.zeros((3 * r, d), np.float32)
    b = np.zeros((3 * d, 3 * r), np.float32)
    for i, pair in enumerate(qkv):
        if pair is not None:
            a[i * r:(i + 1) * r] = pair[0]
            b[i * d:(i + 1) * d, i * r:(i + 1) * r] = 3.0 * pair[1]
    return a, b


def _pair(stem: str, a, b) -> list:
    return [(stem + ".lora_a", np.ascontiguousarray(a)), (stem + ".lora_b", np.ascontiguousarray(b))]


def export_lora_gguf(model: nn.Module, path, name: str = "flashlm-lora") -> str:
    """Writes the LoRA layers of model (a llama, qwen2 or gpt2 Transformer) as a GGUF adapter file; returns its path."""
    import gguf

    alpha, tensors = lora_gguf_tensors(model)
    path = os.fspath(path)
    writer = gguf.GGUFWriter(path, model.cfg.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
