"""flashlm: an LLM systems toolkit built on hand-written CPU and CUDA kernels.

`flashlm.ops` holds the kernels as torch functions; `flashlm.gguf` reads GGUF files.
"""

from flashlm import ops
from flashlm.ops import build_info

__version__ = ops.__version__


def cmake_prefix_path() -> str:
    """The folder to put on CMAKE_PREFIX_PATH so that CMake's find_package(flashlm) finds this install."""
    return ops.cmake_prefix_path()


_LAZY = {"LLM": "flashlm.runtime.engine", "SamplingParams": "flashlm.runtime.sampling_params"}


def __getattr__(name):
    # The runtime is imported on first use, so `import flashlm` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "__version__", "build_info", "cmake_prefix_path", "ops"]
