"""Quantized layers and quantizers."""

from flashlm.quant.gguf_linear import GGUFLinear

__all__ = ["GGUFLinear"]
