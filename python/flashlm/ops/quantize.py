"""GGUF quantization kernels: float rows to GGML blocks (CPU)."""

import numpy as np

from flashlm import _C


def quantize_supported(ggml_type: str) -> bool:
    """Whether `gguf_quantize` writes this GGML type (a name such as "Q4_K")."""
    return _C.quantize_supported(ggml_type)


def gguf_quantize(data, ggml_type: str, out: np.ndarray) -> np.ndarray:
    """Quantize the rows (innermost dimension) of a contiguous CPU float array into `out`.

    data: contiguous numpy array or CPU torch tensor of float32, float16 or bfloat16.
    out: contiguous uint8 numpy array holding exactly the blocks' bytes. Returns `out`.
    """
    _C.gguf_quantize(data, ggml_type, out)
    return out
