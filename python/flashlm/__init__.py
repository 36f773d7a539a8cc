"""flashlm: an LLM systems toolkit built on hand-written CPU and CUDA kernels.

`flashlm.ops` holds the kernels as torch functions; `flashlm.gguf` reads GGUF files.

Import order, lowest first: a module imports only its own package and lower tiers, never a package beside it
in its tier, and only ops imports the compiled flashlm._C (tests/test_layers.py holds this table and checks it).
    1 ops (with this root and flash_attn_interface)   2 dist   3 models   4 quant, parallel
    5 io (with gguf)   6 runtime   7 train, eval   8 serve   9 cli, __main__, demo
"""

import os
import sys


def _is_the_command() -> bool:
    """Whether this process is the `flashlm` command (its console script or `python -m flashlm`)."""
    argv = getattr(sys, "orig_argv", [])
    return os.path.basename(sys.argv[0] if sys.argv else "") == "flashlm" or any(
        a == "-m" and b == "flashlm" for a, b in zip(argv, argv[1:]))


# The command's threads: libgomp, torch's OpenMP, keeps its idle workers polling for milliseconds after every
# parallel op, which on a machine with other work takes the cores that flashlm's own pool and other programs
# need (bench/compare_contention.py: 40 steps of the tiny training preset on 2 cores under a load average of
# ~18 ran at 368 tokens/s with the default and at 4,160 with OMP_WAIT_POLICY=PASSIVE). libgomp reads the
# variable once, when torch loads it, so it is set here, before torch's import, and for the command alone: a
# program that imports flashlm keeps its own choice, as does a user who sets the variable.
if _is_the_command():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flashlm import ops  # noqa: E402  (after the OpenMP setting above)
from flashlm.ops import build_info  # noqa: E402

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
