"""flashlm: an LLM systems toolkit built on hand-written CPU and CUDA kernels.

`flashlm.ops` holds the kernels as torch functions; `flashlm.gguf` reads GGUF files.
"""

from flashlm import ops
from flashlm.ops import build_info

__version__ = ops.__version__


def cmake_prefix_path() -> str:
    """The folder to put on CMAKE_PREFIX_PATH so that CMake's find_package(flashlm) finds this install."""
    return ops.cmake_prefix_path()


__all__ = ["__version__", "build_info", "cmake_prefix_path", "ops"]
