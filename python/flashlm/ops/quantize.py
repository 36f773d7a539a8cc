"""GGUF quantization kernels: float rows to GGML blocks (CPU)."""

import numpy as np
import torch

from flashlm import _C
from flashlm.ops._check import as_str


def quantize_supported(ggml_type: str) -> bool:
    """Whether `gguf_quantize` writes this GGML type (a name such as "Q4_K")."""
    return _C.quantize_supported(as_str(ggml_type, "ggml_type"))


def gguf_quantize(data, ggml_type: str, out: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize the rows (innermost dimension) of a contiguous CPU float array into `out`.

    data: contiguous numpy array or CPU torch tensor of float32, float16 or bfloat16.
    out: contiguous uint8 numpy array holding exactly the blocks' bytes. Returns `out`.
    importance: optional contiguous float32 numpy array, one importance-matrix value per column of a row
        (ggml's quant_weights); None quantizes as ggml's reference quantizers do.
    """
    if isinstance(data, torch.Tensor):
        if not data.is_cpu:
            raise ValueError(f"data: must be on the CPU, got {data.device}")
    elif not isinstance(data, np.ndarray):
        raise TypeError(f"data: expected a numpy array or a CPU torch.Tensor, got {type(data).__name__}")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
    if importance is not None and not isinstance(importance, np.ndarray):
        raise TypeError(f"importance: expected a numpy array, got {type(importance).__name__}")
    _C.gguf_quantize(data, as_str(ggml_type, "ggml_type"), out, importance)
    return out
