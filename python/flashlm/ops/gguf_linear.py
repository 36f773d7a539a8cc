"""GGUF-native linear layer: y = x @ W.T (+ bias) with W kept in its GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K). On the CPU x is quantized per row to 8-bit blocks and multiplied with integer block
dot products (as ggml does); on CUDA the blocks are dequantized in registers (small M) or into a scratch
matrix for a tensor-core GEMM (large M). See csrc/include/flashlm/gemm/gguf_matmul.h.
"""

import math
from collections.abc import Sequence
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import check_optional_tensors, check_same_device, check_tensor, contiguous, new_output
from flashlm.ops._util import cuda_stream, custom_op
from flashlm.ops.backward_input import bias_grad, dy_rows
from flashlm.ops.dequant import BLOCKS

GGUF_LINEAR_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# The block types gguf_linear_backward_input reads: every one dequantize decodes.
GGUF_BACKWARD_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                       "IQ4_NL", "IQ4_XS")
_X_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def gguf_linear_row_bytes(ggml_type: str, k: int, types: Sequence[str] = GGUF_LINEAR_TYPES) -> int:
    """Bytes of one weight row of `k` elements of `ggml_type` (one of `types`); ValueError unless k is a whole
    number of blocks."""
    if ggml_type not in types:
        raise ValueError(f"ggml_type: must be one of {', '.join(types)}, got {ggml_type!r}")
    _, size, nbytes = BLOCKS[ggml_type]
    if k < 0 or k % size:
        raise ValueError(f"shape: K ({k}) must be a multiple of {ggml_type}'s block size {size}")
    return k // size * nbytes


def check_gguf_weight(raw: torch.Tensor, ggml_type: str, shape: Sequence[int],
                      types: Sequence[str] = GGUF_LINEAR_TYPES) -> tuple[str, int, int, int]:
    """Validates a weight given as blocks of one of `types`; returns (type name, N, K, bytes per row). Raises
    ValueError."""
    if not isinstance(ggml_type, str) or ggml_type.upper() not in types:
        raise ValueError(f"ggml_type: must be one of {', '.join(types)}, got {ggml_type!r}")
    ggml_type = ggml_type.upper()
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected (N, K), got {shape!r}") from None
    if n < 0:
        raise ValueError(f"shape: N must be >= 0, got {n}")
    row_bytes = gguf_linear_row_bytes(ggml_type, k, types)
    check_tensor(raw, "raw")
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw: expected a uint8 tensor of blocks, got {raw.dtype}")
    if raw.numel() != n * row_bytes:
        raise ValueError(f"raw: {n} x {k} of {ggml_type} takes {n * row_bytes} bytes, raw has {raw.numel()}")
    return ggml_type, n, k, row_bytes


def _check(x: torch.Tensor, raw: torch.Tensor, ggml_type: str, shape: Sequence[int], bias: Optional[torch.Tensor]):
    """Validates the arguments; returns (type name, n, k)."""
    ggml_type, n, k, _ = check_gguf_weight(raw, ggml_type, shape)
    check_tensor(x, "x")
    check_optional_tensors("bias", bias)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected [..., {k}], got {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES.get(x.device.type, ()):
        raise ValueError(f"x: {x.dtype} on {x.device.type} is not supported "
                         f"(CPU: float32, bfloat16; CUDA: float32, float16, bfloat16)")
    if raw.device != x.device:
        raise ValueError(f"raw: must be on x's device {x.device}, got {raw.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias: expected [{n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    return ggml_type, n, k


@custom_op("flashlm::gguf_linear", mutates_args=())
def _gguf_linear(x: torch.Tensor, raw: torch.Tensor, ggml_type: str, n: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # The decode path calls this per layer and token: each avoidable tensor op here costs ~1 us.
    x2 = x if x.dim() == 2 and x.is_contiguous() else contiguous(x, "x").reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y = new_output((x2.shape[0], n), x.dtype, x.device, "x")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    raw = raw if raw.dim() == 1 else raw.reshape(-1)
    _C.gguf_matmul(x2, raw if raw.is_contiguous() else raw.contiguous(), ggml_type, n, bias, y,
                   cuda_stream(x) if x.is_cuda else 0)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


@_gguf_linear.register_fake
def _(x, raw, ggml_type, n, bias):
    check_same_device(x=x, raw=raw, bias=bias)
    return x.new_empty((*x.shape[:-1], n))


@custom_op("flashlm::gguf_linear_backward_input", mutates_args=())
def _gguf_backward(dy: torch.Tensor, raw: torch.Tensor, ggml_type: str, k: int) -> torch.Tensor:
    dx = new_output((dy.shape[0], k), dy.dtype, dy.device, "dx")
    _C.gguf_linear_backward_input(dy, raw.reshape(-1), ggml_type, dx, cuda_stream(dy))
    return dx


@_gguf_backward.register_fake
def _(dy, raw, ggml_type, k):
    check_same_device(dy=dy, raw=raw)
    return dy.new_empty((dy.shape[0], k))


def gguf_linear_backward_input(dy: torch.Tensor, raw: torch.Tensor, ggml_type: str, shape: Sequence[int]) -> torch.Tensor:
    """dx [..., K] = dy [..., N] @ W, the input gradient of gguf_linear (flashlm.ops.backward_input): W [N, K]
    (`shape`, torch order) the GGML blocks of `ggml_type` in `raw`, any of GGUF_BACKWARD_TYPES."""
    ggml_type, n, k, _ = check_gguf_weight(raw, ggml_type, shape, GGUF_BACKWARD_TYPES)
    rows = dy_rows(dy, n)
    if raw.device != dy.device:
        raise ValueError(f"raw: must be on dy's device {dy.device}, got {raw.device}")
    return _gguf_backward(rows, raw.contiguous(), ggml_type, k).reshape(*dy.shape[:-1], k)


def _setup_context(ctx, inputs, output):
    x, raw, ggml_type, _, bias = inputs
    ctx.save_for_backward(raw, bias)  # the weight's blocks and the bias, never x: dx = dy @ W needs no activation
    ctx.ggml_type, ctx.k = ggml_type, x.shape[-1]


def _backward(ctx, grad):
    # Through the dispatcher (.op), so traced backward graphs see the op.
    raw, bias = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        rows = grad.contiguous().reshape(-1, grad.shape[-1])
        dx = _gguf_backward.op(rows, raw.contiguous(), ctx.ggml_type, ctx.k).reshape(*grad.shape[:-1], ctx.k)
    return dx, None, None, None, bias_grad(grad, bias, ctx.needs_input_grad[4])


# Differentiable with respect to x (and bias); the weight is frozen.
_gguf_linear.register_autograd(_backward, setup_context=_setup_context)


def gguf_linear_checked_weight(x: torch.Tensor, raw: torch.Tensor, ggml_type: str, n: int, k: int,
                               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """gguf_linear for a weight validated once by the caller (GGUFLinear does at construction): only x is
    checked here, cheaply; anything unexpected goes through gguf_linear's full checks and their messages."""
    if x.shape[-1] != k or x.dtype not in _X_DTYPES.get(x.device.type, ()) or x.device != raw.device:
        return gguf_linear(x, raw, ggml_type, (n, k), bias)
    return _gguf_linear(x, raw, ggml_type, n, bias)


def gguf_linear(
    x: torch.Tensor,
    raw: torch.Tensor,
    ggml_type: str,
    shape: Sequence[int],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) where W [N, K] is stored as GGML blocks.

    x: [..., K] float32/bfloat16 (CPU) or float16/bfloat16/float32 (CUDA).
    raw: uint8 tensor of the blocks (N rows of K / block_size blocks), on x's device.
    ggml_type: "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K" or "Q6_K".
    shape: (N, K), torch order.
    bias: optional [N]; cast to x's dtype.
    Returns [..., N] in x's dtype. Differentiable with respect to x and bias (dx = dy @ W from the blocks,
    flashlm.ops.backward_input); W is frozen.
    """
    ggml_type, n, _ = _check(x, raw, ggml_type, shape, bias)
    return _gguf_linear(x, raw, ggml_type, n, bias)
