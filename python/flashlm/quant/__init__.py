"""Quantization: GGUF block quantizers and the `flashlm quantize` file converter."""

from flashlm.quant.gguf_quantize import GGUF_QUANT_TYPES, quantize_gguf

__all__ = ["GGUF_QUANT_TYPES", "quantize_gguf"]
