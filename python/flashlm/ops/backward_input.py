"""The input gradient of linear layers with frozen quantized weights: dx = dy @ W for y = x @ W.T, W [N, K]
read in its stored form (GGML blocks, int8 per channel, int4 per group) by native kernels, never expanded
into a float matrix. There is no weight gradient, and nothing of the forward pass is needed: the autograd
formulas of gguf_linear, int8_linear and int4_linear save no activations, only references to the weights.
See csrc/include/flashlm/gemm/backward_input.h.

dy and dx: float32 or bfloat16 on the CPU (float16 too on CUDA); dx has dy's dtype and sums in float32. The
GGUF one, gguf_linear_backward_input, lives beside gguf_linear (flashlm.ops.gguf_linear) and shares its checks.
"""

import math
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import (
    check_optional_tensors,
    check_same_device,
    check_tensor,
    check_tensors,
    contiguous,
    new_output,
)
from flashlm.ops._util import cuda_stream, custom_op

_DY_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def dy_rows(dy: torch.Tensor, n: int) -> torch.Tensor:
    """dy [..., N] checked and as contiguous rows [M, N]."""
    check_tensor(dy, "dy")
    if dy.dim() < 1 or dy.shape[-1] != n:
        raise ValueError(f"dy: expected [..., {n}] (N = the weight's rows), got {tuple(dy.shape)}")
    if dy.dtype not in _DY_DTYPES.get(dy.device.type, ()):
        raise ValueError(f"dy: {dy.dtype} on {dy.device.type} is not supported "
                         f"(CPU: float32, bfloat16; CUDA: float32, float16, bfloat16)")
    return contiguous(dy, "dy").reshape(math.prod(dy.shape[:-1]), n)


@custom_op("flashlm::int8_linear_backward_input", mutates_args=())
def _int8_backward(dy: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    dx = new_output((dy.shape[0], w.shape[1]), dy.dtype, dy.device, "dx")
    _C.int8_linear_backward_input(dy, w, w_scales, dx, cuda_stream(dy))
    return dx


@_int8_backward.register_fake
def _(dy, w, w_scales):
    check_same_device(dy=dy, w=w, w_scales=w_scales)
    return dy.new_empty((dy.shape[0], w.shape[1]))


def int8_linear_backward_input(dy: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """dx [..., K] = dy [..., N] @ (w_int8 * w_scales[:, None]), w_int8 int8 [N, K], w_scales [N]."""
    check_tensors("w_int8 w_scales", w_int8, w_scales)
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(f"w_int8: expected an int8 [N, K] tensor, got {w_int8.dtype} {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    if w_scales.shape != (n,):
        raise ValueError(f"w_scales: expected shape ({n},), got {tuple(w_scales.shape)}")
    check_same_device(dy=dy, w_int8=w_int8, w_scales=w_scales)
    rows = dy_rows(dy, n)
    return _int8_backward(rows, w_int8.contiguous(), w_scales.to(torch.float32).contiguous()).reshape(*dy.shape[:-1], k)


@custom_op("flashlm::int4_linear_backward_input", mutates_args=())
def _int4_backward(dy: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   group_size: int) -> torch.Tensor:
    dx = new_output((dy.shape[0], 2 * w.shape[1]), dy.dtype, dy.device, "dx")
    _C.int4_linear_backward_input(dy, w, scales, zeros, group_size, dx, cuda_stream(dy))
    return dx


@_int4_backward.register_fake
def _(dy, w, scales, zeros, group_size):
    check_same_device(dy=dy, w=w, scales=scales, zeros=zeros)
    return dy.new_empty((dy.shape[0], 2 * w.shape[1]))


def int4_linear_backward_input(dy: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                               zeros: Optional[torch.Tensor] = None, group_size: int = 128) -> torch.Tensor:
    """dx [..., K] = dy [..., N] @ W for int4 weights in int4_linear's layout (packed uint8 [N, K / 2], float32
    scales [N, K / group_size], zeros the same shape or None for symmetric weights)."""
    check_tensors("w_packed scales", w_packed, scales)
    check_optional_tensors("zeros", zeros)
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size: must be 32, 64 or 128, got {group_size}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"w_packed: expected a uint8 [N, K/2] tensor, got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide K = {k}")
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales: expected shape ({n}, {k // group_size}), got {tuple(scales.shape)}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"zeros: expected shape {tuple(scales.shape)}, got {tuple(zeros.shape)}")
    check_same_device(dy=dy, w_packed=w_packed, scales=scales, zeros=zeros)
    rows = dy_rows(dy, n)
    zeros = None if zeros is None else zeros.to(torch.float32).contiguous()
    dx = _int4_backward(rows, w_packed.contiguous(), scales.to(torch.float32).contiguous(), zeros, group_size)
    return dx.reshape(*dy.shape[:-1], k)


def bias_grad(grad: torch.Tensor, bias: Optional[torch.Tensor], wanted: bool) -> Optional[torch.Tensor]:
    """The bias's gradient (the sum of the output gradient's rows) where autograd asks for it."""
    if not wanted or bias is None:
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
