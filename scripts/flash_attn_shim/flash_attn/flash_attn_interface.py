"""flash_attn.flash_attn_interface: flashlm's public functions plus the two names flash-attn's tests read.

flash-attn's private raw entry points (_flash_attn_varlen_forward, flash_attn_gpu) have no counterpart: the tests
that import them fail with ImportError, and the runner's table shows it.
"""

import flashlm.flash_attn_interface as _flashlm
from flashlm.flash_attn_interface import *  # noqa: F401,F403

# The suite's ROCm/Triton switch: this is not that backend.
USE_TRITON_ROCM = False


# The key-block width of S_dmask's numerators, which the suite's normalize_flash_attn_S reads.
_get_block_size_n = _flashlm._get_block_size_n
