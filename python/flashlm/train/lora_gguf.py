"""LoRA adapters as llama.cpp's GGUF adapter files, which llama.cpp applies to the unchanged base GGUF
(`llama_cpp.Llama(base, lora_path=...)`, `llama-cli --lora`).

    export_lora_gguf(model, "adapter.gguf")   # model: a flashlm Transformer with LoRA layers (apply_lora/load_peft)

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type = adapter, adapter.type = lora,
adapter.lora.alpha, and for each adapted weight "blk.N.<name>.weight.lora_a" (A, [r, in] in torch order, so
ggml's ne = [in, r]) and ".lora_b" (B, [out, r]), float32. llama.cpp scales B A x by alpha / r with r read from
B's shape, so alpha is written as scaling * r (rsLoRA's alpha / sqrt(r) included). llama's q and k rows are
permuted into ggml's rope order by flashlm's GGUF export; B's rows (the output side) follow the same permutation.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

from flashlm.io.hf_source import permute_rope_rows
from flashlm.io.lora_adapter import GGUF_NAMES
from flashlm.train.peft.lora import lora_layers

def lora_gguf_tensors(model: nn.Module) -> tuple[float, list]:
    """(alpha, [(GGUF tensor name, float32 array in torch order)]) of the LoRA layers in model."""
    cfg = model.cfg
    if cfg.arch not in ("llama", "qwen2"):  # gpt2's q, k, v are one fused tensor in GGUF
        raise NotImplementedError(f"model: GGUF LoRA adapters are written for llama and qwen2, not {cfg.arch}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers")
    first = next(iter(layers.values()))
    out = []
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
        stem = f"blk.{block}.{GGUF_NAMES[module]}.weight"
        out += [(stem + ".lora_a", np.ascontiguousarray(a)), (stem + ".lora_b", np.ascontiguousarray(b))]
    return float(first.scaling * first.r), out


def export_lora_gguf(model: nn.Module, path, name: str = "flashlm-lora") -> str:
    """Writes the LoRA layers of model (a llama or qwen2 Transformer) as a GGUF adapter file; returns its path."""
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
