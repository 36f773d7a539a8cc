"""An adapter put on a loaded base, unmerged: the runtime's `LLM(base, lora=PATH)` and `--lora PATH`.

    load_lora(model, "runs/sft")          # a `flashlm finetune` run folder (its adapter/, PEFT's format)
    load_lora(model, "adapter/")          # an HF PEFT directory (adapter_config.json + adapter_model.safetensors)
    load_lora(model, "adapter.gguf")      # a llama.cpp GGUF LoRA adapter (convert_lora_to_gguf.py's format)

The model's block linears are wrapped in LoRALinear in place (float, int8/int4 or GGUF bases alike). Every name,
shape and count is checked before the model is touched; a mismatch names the tensor and both shapes. A GGUF
adapter is read as llama.cpp applies it: scale alpha / r per tensor (1 when alpha is 0), B's rows of llama's
q and k in ggml's rope order (put back into flashlm's here). gpt2's q, k and v are one GGUF tensor, attn_qkv
(rows q|k|v): its adapter (A [R, in], B [3 out, R], any B) becomes three LoRA layers sharing A, each with its
rows of B and llama.cpp's alpha / R, so q|k|v come out as llama.cpp computes them.

    virtual = load_adapter(model, path)   # the above (None), or prompt or prefix tuning's ("PROMPT_TUNING" or
                                          # "PREFIX_TUNING", its table [P, width]); the runtime puts those
                                          # before every prompt, the model is left as it is
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
from torch import nn

from flashlm.io.gguf import GGUFError, GGUFFile
from flashlm.io.gguf_model import rope_row_order
from flashlm.io.hf_config import read_json
from flashlm.io.peft_lora import CONFIG_FILE, WEIGHTS_FILE, load_peft_lora, read_tensors, read_virtual_tokens
from flashlm.models.lora import LoRALinear, freeze, lora_layers

# flashlm's block module -> llama.cpp's tensor name (without "blk.N." and ".weight")
GGUF_NAMES = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
GPT2_GGUF_NAMES = {"attn.o": "attn_output", "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}  # and q|k|v: attn_qkv
_INT_TYPES = ("I8", "I16", "I32", "I64")
_GGUF_TENSOR_RE = re.compile(r"blk\.(\d{1,9})\.([a-z_]+)\.weight\.lora_(a|b)$")


def load_lora(model: nn.Module, path) -> nn.Module:
    """Wraps model's layers (a flashlm Transformer) with the LoRA adapter at path, in place; returns model."""
    load_adapter(model, path, virtual_tokens=False)
    return model


def load_adapter(model: nn.Module, path, virtual_tokens: bool = True) -> Optional[tuple]:
    """A LoRA adapter put on model as load_lora does (None), or with virtual_tokens a prompt- or prefix-tuning
    adapter's (peft_type, table [P, width]): prompt tuning's embeddings [P, d_model], prefix tuning's keys and
    values [P, n_layer * 2 * n_kv_head * head_dim] (the model untouched)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"lora: expected a path, got {type(path).__name__}") from None
    if lora_layers(model):
        raise ValueError("model: already has LoRA layers")
    if os.path.isfile(path):
        _load_gguf(model, path)
        return None
    if not os.path.isdir(path):
        raise ValueError(f"lora: {path!r} does not exist")
    folder = path if os.path.isfile(os.path.join(path, CONFIG_FILE)) else os.path.join(path, "adapter")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise ValueError(f"lora: {path!r} is neither a PEFT adapter directory ({CONFIG_FILE}) nor a fine-tuning run "
                         f"folder with one in adapter/")
    where = os.path.join(folder, CONFIG_FILE)
    config = read_json(where, required=True)
    kinds = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING") if virtual_tokens else ("LORA",)
    if not isinstance(config, dict) or config.get("peft_type") not in kinds:
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise NotImplementedError(f"{where}: peft_type {got!r}; the runtime runs {', '.join(kinds)} adapters")
    tensors = read_tensors(os.path.join(folder, WEIGHTS_FILE))
    if config["peft_type"] != "LORA":
        return config["peft_type"], read_virtual_tokens(model.cfg, config, tensors, where)
    freeze(load_peft_lora(model, config, tensors, where))
    return None


def _load_gguf(model: nn.Module, path: str) -> None:
    cfg = model.cfg
    targets = _gguf_targets(cfg.arch)
    try:
        with GGUFFile(path) as f:
            meta = f.metadata
            _check_gguf_metadata(meta, cfg.arch, path)
            alpha = float(meta["adapter.lora.alpha"])
            pairs = _gguf_pairs(model, targets, [t.name for t in f.tensors], path)
            weights = []  # (module names, A, B, fused)
            for (block, gguf_name), (a_name, b_name) in pairs.items():
                modules = [f"blocks.{block}.{m}" for m in targets[gguf_name]]
                linears = [model.get_submodule(m) for m in modules]
                a, b = f.tensor(a_name), f.tensor(b_name)
                r = a.shape[0] if len(a.shape) == 2 else -1
                what = " + ".join(modules)
                _check_shape(a_name, a.shape, (r, linears[0].in_features), what)
                _check_shape(b_name, b.shape, (sum(m.out_features for m in linears), r), what)
                weights.append((modules, _load_weight(f, a_name), _load_weight(f, b_name), len(modules) > 1))
    except GGUFError as e:
        raise ValueError(f"lora: {path}: {e}") from e
    for modules, a, b, fused in weights:
        scaling = alpha / a.shape[0] if alpha else 1.0  # llama.cpp's: alpha / the file's rank, or 1 for alpha 0
        row = 0
        for module_name in modules:
            out = model.get_submodule(module_name).out_features
            part_a, part_b = a, b[row:row + out]
            row += out
            if fused:
                # Each projection keeps only the ranks its rows of B use (flashlm's own export writes B
                # block-diagonal); columns of zeros add nothing, and a projection with none is left as it is.
                used = (part_b != 0).any(0)
                if not used.any():
                    continue
                part_a, part_b = part_a[used], part_b[:, used]
            _wrap(model, module_name, part_a, part_b, scaling)
    freeze(model)


def _wrap(model: nn.Module, module_name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """Puts LoRALinear with A [r, in], B [out, r] (llama.cpp's rows) and this scaling on model's module_name."""
    cfg = model.cfg
    if cfg.arch == "llama" and module_name.endswith((".attn.q", ".attn.k")):
        heads = cfg.n_head if module_name.endswith(".attn.q") else cfg.n_kv_head
        b = b[rope_row_order(heads, cfg.head_dim)]
    r = a.shape[0]
    parent, child = module_name.rsplit(".", 1)
    layer = LoRALinear(model.get_submodule(module_name), r, scaling * r)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    setattr(model.get_submodule(parent), child, layer)


def _gguf_targets(arch: str) -> dict:
    """llama.cpp's tensor name (without "blk.N." and ".weight") -> the flashlm block modules it covers, in the
    order of its rows: one, or gpt2's q, k and v for its fused attn_qkv."""
    if arch == "gpt2":
        return {**{v: (k,) for k, v in GPT2_GGUF_NAMES.items()}, "attn_qkv": ("attn.q", "attn.k", "attn.v")}
    return {v: (k,) for k, v in GGUF_NAMES.items()}


def _check_gguf_metadata(meta: dict, arch: str, path: str) -> None:
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)):
        if meta.get(key) != want:
            raise ValueError(f"lora: {path}: {key} is {meta.get(key)!r}, expected {want!r} (a LoRA adapter for this "
                             f"{arch} model)")
    alpha = meta.get("adapter.lora.alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"lora: {path}: adapter.lora.alpha must be a finite number >= 0, got {alpha!r}")


def _gguf_pairs(model: nn.Module, targets: dict, names: list, path: str) -> dict:
    """{(block, llama.cpp tensor name): (lora_a tensor name, lora_b tensor name)}, every name checked."""
    found = {}
    for name in names:
        m = _GGUF_TENSOR_RE.match(name)
        if m is None or m.group(2) not in targets or int(m.group(1)) >= model.cfg.n_layer:
            raise ValueError(f"lora: {path}: tensor {name!r} names no block linear of this model "
                             f"({model.cfg.n_layer} layers; {', '.join(targets)})")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = name
    if not found:
        raise ValueError(f"lora: {path}: has no lora_a / lora_b tensors")
    for (block, gguf_name), pair in found.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"lora: {path}: blk.{block}.{gguf_name} has lora_{next(iter(pair))} without its pair")
    return {key: (pair["a"], pair["b"]) for key, pair in found.items()}


def _load_weight(f: GGUFFile, name: str) -> torch.Tensor:
    """Tensor `name` as float32, refused when its type is an integer one (llama.cpp multiplies by float or
    quantized weights only) or a value is not finite (it would turn every output of the layer into NaN)."""
    type_name = f.tensor(name).ggml_type
    if type_name in _INT_TYPES:
        raise ValueError(f"adapter: {name} is stored as {type_name}; a LoRA weight is float or quantized")
    w = f.load(name)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"adapter: {name} holds values that are not finite")
    return w


def _check_shape(name: str, shape: tuple, want: tuple, module: str) -> None:
    if tuple(shape) != tuple(want) or want[0] <= 0 or want[-1] <= 0:
        raise ValueError(f"adapter: {name} has shape {tuple(shape)}, the model's {module} needs {tuple(want)}")
