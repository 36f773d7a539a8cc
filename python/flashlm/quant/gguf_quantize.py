"""GGUF quantization of float weights, byte-identical to ggml's quantizers.

`quantize_gguf(data, "Q4_K")` returns the rows of `data` as GGML blocks, the bytes llama.cpp's quantize
tool writes for the same weights without an importance matrix (and gguf-py's `gguf.quants.quantize` for
the types it implements); `quantize_gguf(data, "Q4_K", imatrix=values)` the bytes it writes given that
imatrix entry (one value per column: the mean squared activation of that input channel).
"""

from __future__ import annotations

import numpy as np
import torch

from flashlm import ops

# name -> (elements per block, bytes per block), for the types `quantize_gguf` writes.
GGUF_QUANT_TYPES = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}


def _as_array(data):
    """A contiguous 2-D CPU array or tensor of float32/float16/bfloat16 (torch bf16 stays torch: numpy has none)."""
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.float32, np.float16):
            raise ValueError(f"data: expected float32, float16 or bfloat16 values, got numpy {data.dtype}")
        return np.ascontiguousarray(data)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(data, torch.Tensor):
        if data.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"data: expected float32, float16 or bfloat16 values, got torch {data.dtype}")
        return data.detach().to("cpu").contiguous()
    raise TypeError(f"data: expected a numpy array or a torch tensor, got {type(data).__name__}")


# A block of importance values above this is scaled down under it (see _as_importance). Measured on random
# weights and imatrices times 2^k (tests/test_robust_quant_files.py): every type gives the same bytes for block
# maxima up to ~2^26; past that Q4_K and Q5_K drift (from ~2^31), then every type's fits overflow float32 into NaN
# scales (from ~2^60). A working model's blocks (massive activations of ~1e3 square to ~2^20) stay where the
# scaling changes no byte.
_IMPORTANCE_CEILING = 2.0 ** 16


def _as_importance(imatrix, n: int, block: int) -> np.ndarray:
    """The imatrix values as a contiguous float32 array of n finite, non-negative values. A block whose largest
    value passes _IMPORTANCE_CEILING is multiplied by a power of two that brings it under: ggml's weighted fits
    give the same bytes for a block's values times a common factor, and a power of two rounds nothing, so the
    result is that of the values as given, where the fits' sums would otherwise overflow into NaN scales."""
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().to("cpu").numpy()
    if not isinstance(imatrix, np.ndarray):
        raise TypeError(f"imatrix: expected a numpy array or a torch tensor, got {type(imatrix).__name__}")
    if imatrix.ndim != 1 or imatrix.shape[0] != n:
        raise ValueError(f"imatrix: expected {n} values (one per column), got shape {tuple(imatrix.shape)}")
    values = np.ascontiguousarray(imatrix, dtype=np.float32)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("imatrix: values must be finite and non-negative (mean squared activations)")
    top = values.reshape(-1, block).max(axis=1)
    big = top > _IMPORTANCE_CEILING
    if big.any():
        values = values.copy()
        blocks = values.reshape(-1, block)
        _, exponent = np.frexp(top[big])  # top = m * 2^exponent, m in [0.5, 1)
        blocks[big] *= np.ldexp(np.float32(1), 16 - exponent).astype(np.float32)[:, None]
    return values


def quantize_gguf(data, ggml_type: str, imatrix=None) -> np.ndarray:
    """Quantize a 2-D float array [rows, n] to GGML blocks: a uint8 array [rows, bytes_per_row].

    data: numpy float32/float16 or torch float32/float16/bfloat16 (CPU or CUDA; copied to the CPU), 2-D,
        its last dimension a multiple of the type's block size (32, or 256 for the K-quants and IQ4_XS).
    ggml_type: "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
        "IQ4_XS", "F16", "BF16" or "F32".
    imatrix: optional importance values, n of them (an entry of flashlm.quant.imatrix), as llama.cpp's
        quantize tool uses them; the float types and Q8_0 ignore them, as ggml does.
    """
    if not isinstance(ggml_type, str) or ggml_type.upper() not in GGUF_QUANT_TYPES:
        raise ValueError(f"ggml_type: expected one of {', '.join(GGUF_QUANT_TYPES)}, got {ggml_type!r}")
    ggml_type = ggml_type.upper()
    arr = _as_array(data)
    if arr.ndim != 2:
        raise ValueError(f"data: expected a 2-D array [rows, n], got shape {tuple(arr.shape)}")
    rows, n = (int(s) for s in arr.shape)
    block, block_bytes = GGUF_QUANT_TYPES[ggml_type]
    if n % block:
        raise ValueError(f"data: the row length {n} is not a multiple of {ggml_type}'s block size {block}")
    importance = None if imatrix is None else _as_importance(imatrix, n, block)
    out = np.empty((rows, n // block * block_bytes), dtype=np.uint8)
    return ops.gguf_quantize(arr, ggml_type, out, importance)
