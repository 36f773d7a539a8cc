"""GGUFLinear: an nn.Linear whose weight stays in GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K) and is multiplied in that form by flashlm.ops.gguf_linear.

    layer = GGUFLinear.from_float(nn.Linear(4096, 4096), ggml_type="Q4_0")
    with GGUFFile("model.gguf") as f:
        q = GGUFLinear.from_gguf(f, "blk.0.attn_q.weight")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from flashlm import ops
from flashlm.ops.gguf_linear import check_gguf_weight, gguf_linear_checked_weight, gguf_linear_row_bytes
from flashlm.quant.gguf_quantize import quantize_gguf


def _quantize(weight: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """uint8 [N, row bytes]: the blocks of a float [N, K] weight."""
    return torch.as_tensor(quantize_gguf(weight.detach().cpu(), ggml_type))


class GGUFLinear(torch.nn.Module):
    """y = x @ W.T (+ bias) with W [N, K] held as the uint8 bytes of its GGML blocks (buffer `raw`,
    [N, K / block_size * block_bytes]). Differentiable with respect to x: W stays frozen in its blocks and
    the backward reads them (flashlm.ops.backward_input), saving no activation."""

    def __init__(self, raw: torch.Tensor, ggml_type: str, shape: Sequence[int], bias: Optional[torch.Tensor] = None):
        super().__init__()
        ggml_type, n, k, row_bytes = check_gguf_weight(raw, ggml_type, shape)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected [{n}], got {tuple(bias.shape)}")
        self.ggml_type = ggml_type
        self.out_features, self.in_features = n, k
        self.register_buffer("raw", raw.reshape(n, row_bytes))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_linear_checked_weight(x, self.raw, self.ggml_type, self.out_features, self.in_features, self.bias)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, ggml_type: str = "Q8_0") -> "GGUFLinear":
        """Quantizes an nn.Linear's weight to `ggml_type` blocks (on the weight's device); the bias is kept."""
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        ggml_type = ggml_type.upper() if isinstance(ggml_type, str) else ggml_type
        if ggml_type not in ops.GGUF_LINEAR_TYPES:
            raise ValueError(f"ggml_type: must be one of {', '.join(ops.GGUF_LINEAR_TYPES)}, got {ggml_type!r}")
        weight = linear.weight.detach()
        gguf_linear_row_bytes(ggml_type, weight.shape[1])  # raises for a K that is not a whole number of blocks
        raw = _quantize(weight, ggml_type).to(weight.device)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(raw, ggml_type, tuple(weight.shape), bias)

    @classmethod
    def from_gguf(cls, file, name: str, bias: Union[str, torch.Tensor, None] = None, device="cpu") -> "GGUFLinear":
        """The 2-D tensor `name` of a flashlm.io.gguf.GGUFFile, kept in its blocks (copied to `device`); `bias`
        is a tensor name in the same file (dequantized to float32) or a tensor."""
        info = file.tensor(name)
        if len(info.shape) != 2:
            raise ValueError(f"name: '{name}' has shape {info.shape}, a linear weight must be 2-D")
        if isinstance(bias, str):
            bias = file.load(bias, dtype=torch.float32, device=device)
        raw = file.raw(name).to(device, copy=True)  # the copy outlives the file's mapping
        return cls(raw, info.ggml_type, info.shape, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.ggml_type}, "
                f"bias={self.bias is not None}")

