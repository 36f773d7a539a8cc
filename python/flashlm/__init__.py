"""flashlm: an LLM systems toolkit built on hand-written CPU and CUDA kernels.

`flashlm.ops` holds the kernels as torch functions; `flashlm.gguf` reads GGUF files.

Import order, lowest first: a module imports only its own package and lower tiers, never a package beside it
in its tier, and only ops imports the compiled flashlm._C (tests/test_layers.py holds this table and checks it).
    1 ops (with this root and flash_attn_interface)   2 dist   3 models   4 quant, parallel
    5 io (with gguf)   6 runtime   7 train, eval   8 serve   9 cli, __main__, demo
"""

from flashlm import ops
from flashlm.ops import build_info

__version__ = ops.__version__


def cmake_prefix_path() -> str:
    """The folder to put on CMAKE_PREFIX_PATH so that CMake's find_package(flashlm) finds this install."""
    return ops.cmake_prefix_path()


_LAZY = {"LLM": "flashlm.runtime.engine", "SamplingParams": "flashlm.runtime.sampling_params"}


def __getattr__(name):
    # The runtime is imported on first use, so `import flashlm` stays light (and no lower layer loads the
    # runtime through the root: the one import against the order above that tests/test_layers.py allows).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "__version__", "build_info", "cmake_prefix_path", "ops"]
