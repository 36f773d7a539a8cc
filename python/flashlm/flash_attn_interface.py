"""Drop-in for `flash_attn.flash_attn_interface`: see flashlm.ops.flash_attn_interface."""

from flashlm.ops.flash_attn_interface import *  # noqa: F401,F403
from flashlm.ops.flash_attn_interface import __all__  # noqa: F401
from flashlm.ops.flash_attn_interface import _get_block_size_n  # noqa: F401 (flash-attn's tests import it)
