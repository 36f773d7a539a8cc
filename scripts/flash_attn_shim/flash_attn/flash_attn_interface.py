"""flash_attn.flash_attn_interface: flashlm's public functions plus the two names flash-attn's tests read.

flash-attn's private raw entry points (_flash_attn_varlen_forward, flash_attn_gpu) have no counterpart: the tests
that import them fail with ImportError, and the runner's table shows it.
"""

import flashlm.flash_attn_interface as _flashlm
from flashlm.flash_attn_interface import *  # noqa: F401,F403

# The suite's ROCm/Triton switch: this is not that backend.
USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width the suite assumes when it renormalizes the probabilities that return_attn_probs gives
    (normalize_flash_attn_S): flashlm's own where it declares one; otherwise one block per row, i.e. the
    probabilities are taken as scaled by the row's final maximum."""
    own = getattr(_flashlm, "_get_block_size_n", None)
    if own is not None:
        return own(device, head_dim, is_dropout, is_causal)
    return 1 << 30
