"""GGUF block dequantization."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from flashlm import _C
from flashlm.ops._check import as_int, check_optional_tensors, check_tensors
from flashlm.ops._util import cuda_stream

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ggml_type(ggml_type: Union[str, int]) -> Union[str, int]:
    """A type name (upper-cased) or a ggml type id (a u32), else TypeError/ValueError naming ggml_type."""
    if isinstance(ggml_type, str):
        return ggml_type.upper()
    if isinstance(ggml_type, bool) or not isinstance(ggml_type, int):
        raise TypeError(f"ggml_type: expected a type name such as 'Q4_K' or a ggml type id, got "
                        f"{type(ggml_type).__name__}")
    return as_int(ggml_type, "ggml_type", 0, 2**32 - 1)


def dequantize_supported(ggml_type: Union[str, int]) -> bool:
    """Whether `dequantize` reads this GGML type (a name such as "Q4_K" or a ggml type id)."""
    return _C.dequantize_supported(_ggml_type(ggml_type))


def dequantize(
    raw: torch.Tensor,
    ggml_type: Union[str, int],
    shape: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode GGML blocks into a float tensor, bit-exact with ggml.

    raw: uint8 tensor of blocks (CPU or CUDA), as stored in a GGUF file.
    ggml_type: a type name ("Q4_0", "Q4_K", "IQ4_XS", "F16", ...) or a ggml type id.
    shape: the output's shape in torch order; its last dimension must hold whole blocks.
    out_dtype: torch.float32, torch.float16 or torch.bfloat16.
    out: optional contiguous tensor of that shape, dtype and device to write into (and return).
    """
    check_tensors("raw", raw, readable=True)
    check_optional_tensors("out", out)
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw: expected a uint8 tensor of blocks, got {raw.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape: expected a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: sizes must be >= 0, got {shape}")
    ggml_type = _ggml_type(ggml_type)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=raw.device)
    elif out.shape != shape or out.dtype != out_dtype or out.device != raw.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {out_dtype} tensor of shape {shape} on {raw.device}, got "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} {tuple(out.shape)} on {out.device}")
    _C.dequantize(raw.reshape(-1).contiguous(), ggml_type, out, cuda_stream(raw))
    return out
