"""The int4 entry of a quantized checkpoint (flashlm.io.quantized_checkpoint): block linears that are Int4Linear,
as `flashlm quantize --method gptq|awq` writes them.

The file has
    "int4": {"group_size": 32 | 64 | 128, "symmetric": bool, "method": str, "layers": ["blocks.0.attn.q", ...]}
and, for each listed layer, the model state holds Int4Linear's buffers: <layer>.weight uint8 [N, K/2] (the
packed layout of flashlm.quant.rtn), <layer>.scales float32 [N, K/group], <layer>.zeros float32 [N, K/group]
(asymmetric only) and <layer>.bias where the float layer has one. A file is untrusted: every field and tensor
is checked against the model config before a model is built.
"""

from __future__ import annotations

from typing import Optional

import torch

from flashlm.io.quantized_checkpoint import checked_entry, save_quantized_model
from flashlm.quant.linear import Int4Linear
from flashlm.quant.rtn import GROUP_SIZES

INT4_KEY = "int4"


def int4_layers_of(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Int4Linear)]


def save_int4_model(loaded, path, method: str) -> None:
    """Writes a LoadedModel whose block linears are Int4Linear (one group size and symmetry)."""
    if int4_meta(loaded.model, method) is None:
        raise ValueError("model: no Int4Linear layers to save")
    save_quantized_model(loaded, path, method)


def _fail(where: str, what: str):
    raise ValueError(f"{where}: int4 {what}")


def split_int4_state(ckpt: dict, where: str) -> tuple[dict, dict]:
    """(the model state with each int4 layer's weight replaced by a meta float tensor of its float shape, so
    that the config's shape check applies; {layer: (packed, scales, zeros, group_size)}). ({...}, {}) for a
    checkpoint without int4 layers."""
    meta = checked_entry(ckpt, INT4_KEY, where)
    if meta is None:
        return ckpt["model"], {}
    group, symmetric = meta.get("group_size"), meta.get("symmetric")
    if isinstance(group, bool) or group not in GROUP_SIZES:
        _fail(where, f"group_size must be one of {GROUP_SIZES}, got {group!r}")
    if not isinstance(symmetric, bool):
        _fail(where, f"symmetric must be a bool, got {symmetric!r}")
    state, out = dict(ckpt["model"]), {}
    for name in meta["layers"]:
        packed = state.get(f"{name}.weight")
        scales = state.pop(f"{name}.scales", None)
        zeros = state.pop(f"{name}.zeros", None)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
            _fail(where, f"layer {name}: weight must be a uint8 [N, K/2] tensor")
        n, k = packed.shape[0], 2 * packed.shape[1]
        if k % group:
            _fail(where, f"layer {name}: group_size {group} does not divide in_features {k}")
        want = (n, k // group)
        for what, t in (("scales", scales),) + (() if symmetric else (("zeros", zeros),)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want:
                _fail(where, f"layer {name}: {what} must be a float32 {want} tensor")
            if not bool(torch.isfinite(t).all()):
                _fail(where, f"layer {name}: {what} must be finite")
        if symmetric and zeros is not None:
            _fail(where, f"layer {name}: a symmetric layer has no zeros")
        state[f"{name}.weight"] = torch.empty(n, k, device="meta")
        out[name] = (packed, scales, zeros, group)
    return state, out


def put_int4_layers(model, state: dict, int4: dict) -> None:
    """Replaces model's linears named in int4 (split_int4_state's) by Int4Linear modules on the meta device and
    puts their tensors into state, for model.load_state_dict(state, assign=True)."""
    for name, (packed, scales, zeros, group) in int4.items():
        float_linear = model.get_submodule(name)
        with torch.device("meta"):
            q = Int4Linear(float_linear.in_features, float_linear.out_features, float_linear.bias is not None,
                           group, zeros is None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
        state[f"{name}.weight"], state[f"{name}.scales"] = packed, scales
        if zeros is not None:
            state[f"{name}.zeros"] = zeros


def int4_meta(model, method: str) -> Optional[dict]:
    """The file's int4 entry for a model's Int4Linear layers (None without any); ValueError when they do not
    share one group size and symmetry."""
    layers = int4_layers_of(model)
    if not layers:
        return None
    kinds = {(model.get_submodule(n).group_size, model.get_submodule(n).symmetric) for n in layers}
    if len(kinds) != 1:
        raise ValueError(f"model: int4 layers of several group sizes or symmetries {sorted(kinds)}")
    (group, symmetric), = kinds
    return {"group_size": group, "symmetric": symmetric, "method": method, "layers": layers}
