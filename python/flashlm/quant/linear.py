"""nn.Linear replacements that hold quantized weights: Int8Linear (W8A8) and Int4Linear (W4A16).

Both are differentiable with respect to x, their weights frozen (buffers): the backward reads the stored
weights (flashlm.ops.backward_input) and saves no activation; Int8Linear's rounding of x passes the gradient
straight through."""

from typing import Optional

import torch
from torch import nn

from flashlm.ops import int4_linear, int8_linear
from flashlm.quant.rtn import GROUP_SIZES, quantize_int4, quantize_int8_per_channel


def _bias(linear: nn.Linear) -> Optional[torch.Tensor]:
    return None if linear.bias is None else linear.bias.detach().float().clone()


class Int8Linear(nn.Module):
    """y = x @ W.T + b with int8 weights (per-channel scales) and activations quantized per token at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        out.weight, out.weight_scales = quantize_int8_per_channel(linear.weight)
        out.bias = _bias(linear)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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
