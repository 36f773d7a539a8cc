"""nn.Linear replacements that hold quantized weights: Int8Linear (W8A8, dynamic or static activation scales) and
Int4Linear (W4A16).

Both are differentiable with respect to x, their weights frozen (buffers): the backward reads the stored
weights (flashlm.ops.backward_input) and saves no activation; Int8Linear's rounding of x passes the gradient
straight through."""

import math
from typing import Optional

import torch
from torch import nn

from flashlm.ops import int4_linear, int8_linear, int8_linear_static
from flashlm.quant.rtn import GROUP_SIZES, quantize_int4, quantize_int8_per_channel


def _bias(linear: nn.Linear) -> Optional[torch.Tensor]:
    return None if linear.bias is None else linear.bias.detach().float().clone()


class Int8Linear(nn.Module):
    """y = x @ W.T + b with int8 weights (per-channel scales) and int8 activations: quantized per token at run
    time, or, with a static `act_scale` (a float32 scalar buffer, from calibration: flashlm.quant.ranges), all
    with that one scale (clamp(round(x / act_scale), -127, 127))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 static_act: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones((), device=device) if static_act else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_scale: Optional[float] = None) -> "Int8Linear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  static_act=act_scale is not None)
        out.weight, out.weight_scales = quantize_int8_per_channel(linear.weight)
        out.bias = _bias(linear)
        if act_scale is not None:
            out.set_act_scale(act_scale)
        return out

    def set_act_scale(self, act_scale: Optional[float]) -> None:
        """A static activation scale (finite, > 0), or None for per-token scales at run time."""
        if act_scale is None:
            self.act_scale = None
            return
        act_scale = float(act_scale)
        if not math.isfinite(act_scale) or act_scale <= 0:
            raise ValueError(f"act_scale: must be finite and positive, got {act_scale}")
        self.act_scale = torch.tensor(act_scale, dtype=torch.float32, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            return int8_linear_static(x, self.act_scale, self.weight, self.weight_scales, self.bias)
        return int8_linear(x, self.weight, self.weight_scales, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act={'static' if self.act_scale is not None else 'per-token'}")


class Int4Linear(nn.Module):
    """y = x @ W.T + b with int4 group-wise weights (symmetric, or asymmetric with zero points), dequantized on
    the fly; activations stay float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: must be one of {GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"group_size: {group_size} does not divide in_features = {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                   search_clip: bool = False) -> "Int4Linear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, symmetric,
                  device=linear.weight.device)
        out.weight, out.scales, out.zeros = quantize_int4(linear.weight, group_size, symmetric, search_clip)
        out.bias = _bias(linear)
        return out

    @classmethod
    def from_quantized(cls, linear: nn.Linear, packed: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group_size: int) -> "Int4Linear":
        """linear's bias with weights already quantized (quantize_int4's outputs, or GPTQ's and AWQ's)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, zeros is None,
                  device=linear.weight.device)
        for name, t in (("weight", packed), ("scales", scales), ("zeros", zeros)):
            want = getattr(out, name)
            if want is not None and (t.shape != want.shape or t.dtype != want.dtype):
                raise ValueError(f"{name}: expected {want.dtype} {tuple(want.shape)}, got {t.dtype} {tuple(t.shape)}")
        out.weight, out.scales, out.zeros = packed, scales, zeros
        out.bias = _bias(linear)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
