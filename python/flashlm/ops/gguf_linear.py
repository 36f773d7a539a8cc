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
from flashlm.ops.dequant import BLOCKS

GGUF_LINEAR_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
_X_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def gguf_linear_row_bytes(ggml_type: str, k: int) -> int:
    """Bytes of one weight row of `k` elements of `ggml_type`; ValueError unless k is a whole number of blocks."""
    if ggml_type not in GGUF_LINEAR_TYPES:
        raise ValueError(f"ggml_type: must be one of {', '.join(GGUF_LINEAR_TYPES)}, got {ggml_type!r}")
    _, size, nbytes = BLOCKS[ggml_type]
    if k < 0 or k % size:
        raise ValueError(f"shape: K ({k}) must be a multiple of {ggml_type}'s block size {size}")
    return k // size * nbytes


def check_gguf_weight(raw: torch.Tensor, ggml_type: str, shape: Sequence[int]) -> tuple[str, int, int, int]:
    """Validates a weight given as blocks; returns (type name, N, K, bytes per row). Raises ValueError."""
    if not isinstance(ggml_type, str) or ggml_type.upper() not in GGUF_LINEAR_TYPES:
        raise ValueError(f"ggml_type: must be one of {', '.join(GGUF_LINEAR_TYPES)}, got {ggml_type!r}")
    ggml_type = ggml_type.upper()
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected (N, K), got {shape!r}") from None
    if n < 0:
        raise ValueError(f"shape: N must be >= 0, got {n}")
    row_bytes = gguf_linear_row_bytes(ggml_type, k)
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
    Returns [..., N] in x's dtype.
    """
    ggml_type, n, _ = _check(x, raw, ggml_type, shape, bias)
    return _gguf_linear(x, raw, ggml_type, n, bias)
