"""GGUF block dequantization."""

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from flashlm import _C
from flashlm.ops._check import INT64_MAX, as_int, check_optional_tensors, check_tensors, contiguous, new_output
from flashlm.ops._util import cuda_stream

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every dtype's block layout by name and by ggml id: name -> (name, elements per block, bytes per block).
BLOCKS = {key: (name, size, nbytes) for name, type_id, size, nbytes in _C.dtypes()
          for key in ((name, type_id) if type_id >= 0 else (name,))}
_READ_NAMES = {name for name, type_id, _, _ in _C.dtypes() if type_id >= 0 and _C.dequantize_supported(type_id)}
_READ = {key: layout for key, layout in BLOCKS.items() if layout[0] in _READ_NAMES}  # what dequantize reads


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


def _shape(shape) -> tuple[int, ...]:
    """shape as sizes >= 0 whose product an int64 holds; TypeError/ValueError naming shape."""
    if type(shape) is tuple and all(type(s) is int and s >= 0 for s in shape) and math.prod(shape) <= INT64_MAX:
        return shape  # the common case, first: an embedding's lookup dequantizes its rows every decode step
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        items = tuple(shape)
    except TypeError:
        raise TypeError(f"shape: expected a sequence of ints, got {type(shape).__name__}") from None
    dims = tuple(as_int(s, f"shape[{i}]", 0) for i, s in enumerate(items))
    if math.prod(dims) > INT64_MAX:
        raise ValueError(f"shape: {dims} has {math.prod(dims)} elements, more than an int64 counts")
    return dims


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
    shape = _shape(shape)
    ggml_type = _ggml_type(ggml_type)
    if ggml_type not in _READ:
        raise ValueError(f"ggml_type: dequantizing {ggml_type!r} is not supported")
    # The sizes against the blocks before the output is allocated (the native code checks them again).
    name, block, block_bytes = _READ[ggml_type]
    inner = shape[-1] if shape else 1
    if inner % block:
        raise ValueError(f"shape: the innermost dimension ({inner}) must be a multiple of {name}'s block size {block}")
    numel = math.prod(shape)
    if raw.numel() != numel // block * block_bytes:
        raise ValueError(f"raw: shape {shape} of {name} takes {numel // block * block_bytes} bytes, raw has "
                         f"{raw.numel()}")
    if out is None:
        out = new_output(shape, out_dtype, raw.device, "shape")
    elif out.shape != shape or out.dtype != out_dtype or out.device != raw.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {out_dtype} tensor of shape {shape} on {raw.device}, got "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} {tuple(out.shape)} on {out.device}")
    raw = raw if raw.is_contiguous() else contiguous(raw, "raw")
    _C.dequantize(raw.reshape(-1), ggml_type, out, cuda_stream(raw))
    return out
