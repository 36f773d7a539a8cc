"""Torch-facing wrappers of the native kernels. The only Python code that imports flashlm._C."""

import os

import torch

from flashlm import _C
from flashlm.ops._check import INT32_MAX, INT32_MIN, as_int, as_str
from flashlm.ops.activation import silu_mul
from flashlm.ops.attention import flash_attn_backward, flash_attn_forward
from flashlm.ops.backward_input import int4_linear_backward_input, int8_linear_backward_input
from flashlm.ops.decoder import NativeDecoder
from flashlm.ops.device import check_device
from flashlm.ops.dequant import dequantize, dequantize_supported
from flashlm.ops.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flashlm.ops.gguf_linear import GGUF_BACKWARD_TYPES, GGUF_LINEAR_TYPES, gguf_linear, gguf_linear_backward_input
from flashlm.ops.int_linear import int4_linear, int8_linear, int8_linear_static, quantize_per_token, quantize_static
from flashlm.ops.quantize import gguf_quantize, quantize_supported
from flashlm.ops.kvcache import paged_attention, paged_attention_num_splits, write_kv_cache
from flashlm.ops.norm import rms_norm
from flashlm.ops.optim import adamw_step_

__version__ = _C.__version__
GGUFError = _C.GGUFError
GGUFReader = _C.GGUFReader

# Share the machine with torch instead of oversubscribing it: unless FLASHLM_NUM_THREADS says otherwise,
# flashlm's pool uses as many threads as torch's intra-op pool.
if not os.environ.get("FLASHLM_NUM_THREADS"):
    _C.set_num_threads(min(torch.get_num_threads(), _C.MAX_THREADS))

num_threads = _C.num_threads
cpu_isa = _C.cpu_isa


def set_num_threads(n: int) -> None:
    """Resizes flashlm's CPU thread pool to n threads (1 to 1024)."""
    _C.set_num_threads(as_int(n, "n", INT32_MIN, INT32_MAX))  # the library checks the pool's own range


def set_cpu_isa(isa: str) -> None:
    """Switches the CPU kernels to "scalar" or "avx2" (where the CPU has it)."""
    _C.set_cpu_isa(as_str(isa, "isa"))


def cpu_isa_supported(isa: str) -> bool:
    """Whether this CPU runs the kernels of `isa` ("scalar" or "avx2")."""
    return _C.cpu_isa_supported(as_str(isa, "isa"))


def build_info() -> dict:
    """How flashlm was built and what it found on this machine."""
    info = dict(_C.build_info())
    info["cpu_features"] = [name for name, present in _C.cpu_features().items() if present]
    info["cpu_isa"] = _C.cpu_isa()
    info["threads"] = _C.num_threads()
    info["cuda_devices"] = _C.cuda_device_count()
    info["cuda_status"] = _C.cuda_status()
    return info


def cmake_prefix_path() -> str:
    # libflashlm, its headers and its CMake config are installed next to the native module (flashlm/lib).
    return os.path.join(os.path.dirname(os.path.abspath(_C.__file__)), "lib", "cmake")


__all__ = [
    "adamw_step_", "GGUFError", "GGUFReader", "build_info", "check_device", "cmake_prefix_path", "cpu_isa",
    "cpu_isa_supported", "dequantize", "dequantize_supported", "flash_attn_backward", "flash_attn_forward",
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
    "GGUF_BACKWARD_TYPES", "GGUF_LINEAR_TYPES", "gguf_linear", "gguf_linear_backward_input", "gguf_quantize", "int4_linear",
    "int4_linear_backward_input", "int8_linear", "int8_linear_backward_input", "int8_linear_static", "num_threads",
    "paged_attention", "paged_attention_num_splits", "quantize_per_token", "quantize_static", "quantize_supported", "rms_norm",
    "set_cpu_isa", "set_num_threads", "write_kv_cache",
]
