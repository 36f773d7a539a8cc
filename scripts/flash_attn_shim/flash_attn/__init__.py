"""flash_attn, as scripts/peer_flash_attn.py presents flashlm to flash-attn's test suite: its public functions are
flashlm's drop-ins (flashlm.flash_attn_interface), unchanged."""

from flashlm.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                          flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                          flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
]
