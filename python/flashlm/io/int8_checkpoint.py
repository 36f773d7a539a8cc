"""The int8 entry of a quantized checkpoint (flashlm.io.quantized_checkpoint): block linears that are Int8Linear
(W8A8), as `flashlm quantize --method w8a8|smoothquant` writes them.

The file has
    "int8": {"static": bool, "method": str, "layers": ["blocks.0.attn.q", ...]}
and, for each listed layer, the model state holds Int8Linear's buffers: <layer>.weight int8 [N, K],
<layer>.weight_scales float32 [N] (per output channel, finite, >= 0), <layer>.act_scale float32 [] (static activation
scales only: finite and positive) and <layer>.bias where the float layer has one. A SmoothQuant model's
smoothing lives in its norms' weights, which are ordinary float tensors of the state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flashlm.io.quantized_checkpoint import checked_entry
from flashlm.quant.linear import Int8Linear

INT8_KEY = "int8"


def int8_layers_of(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]


def int8_meta(model, method: str) -> Optional[dict]:
    """The file's int8 entry for a model's Int8Linear layers (None without any); ValueError when some have
    static activation scales and others not."""
    layers = int8_layers_of(model)
    if not layers:
        return None
    kinds = {model.get_submodule(n).act_scale is not None for n in layers}
    if len(kinds) != 1:
        raise ValueError("model: int8 layers with static and with per-token activation scales")
    (static,) = kinds
    return {"static": static, "method": method, "layers": layers}


def _fail(where: str, what: str):
    raise ValueError(f"{where}: int8 {what}")


def _check_tensor(t, dtype: torch.dtype, shape: tuple, where: str, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        _fail(where, f"{what} must be a {str(dtype).removeprefix('torch.')} {shape} tensor")


def split_int8_state(ckpt: dict, where: str) -> tuple[dict, dict]:
    """(the model state with each int8 layer's weight replaced by a meta float tensor of its shape, so that the
    config's shape check applies; {layer: (weight, weight_scales, act_scale or None)}). ({...}, {}) for a
    checkpoint without int8 layers."""
    meta = checked_entry(ckpt, INT8_KEY, where)
    if meta is None:
        return ckpt["model"], {}
    static, method = meta.get("static"), meta.get("method")
    if not isinstance(static, bool):
        _fail(where, f"static must be a bool, got {static!r}")
    if not isinstance(method, str):
        _fail(where, f"method must be a string, got {method!r}")
    state, out = dict(ckpt["model"]), {}
    for name in meta["layers"]:
        weight = state.get(f"{name}.weight")
        scales = state.pop(f"{name}.weight_scales", None)
        act = state.pop(f"{name}.act_scale", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
            _fail(where, f"layer {name}: weight must be an int8 [N, K] tensor")
        _check_tensor(scales, torch.float32, (weight.shape[0],), where, f"layer {name}: weight_scales")
        if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
            _fail(where, f"layer {name}: weight_scales must be finite and non-negative")
        if static:
            _check_tensor(act, torch.float32, (), where, f"layer {name}: act_scale")
            value = float(act)
            if not math.isfinite(value) or value <= 0:
                _fail(where, f"layer {name}: act_scale must be finite and positive, got {value}")
        elif act is not None:
            _fail(where, f"layer {name}: a layer with per-token activation scales has no act_scale")
        state[f"{name}.weight"] = torch.empty(tuple(weight.shape), device="meta")
        out[name] = (weight, scales, act)
    return state, out


def put_int8_layers(model, state: dict, int8: dict) -> None:
    """Replaces model's linears named in int8 (split_int8_state's) by Int8Linear modules on the meta device and
    puts their tensors into state, for model.load_state_dict(state, assign=True)."""
    for name, (weight, scales, act) in int8.items():
        float_linear = model.get_submodule(name)
        with torch.device("meta"):
            q = Int8Linear(float_linear.in_features, float_linear.out_features, float_linear.bias is not None,
                           static_act=act is not None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
        state[f"{name}.weight"], state[f"{name}.weight_scales"] = weight, scales
        if act is not None:
            state[f"{name}.act_scale"] = act
