"""Weight quantization: quantizers and quantized replacements of nn.Linear."""

from flashlm.quant.linear import Int4Linear, Int8Linear
from flashlm.quant.rtn import dequantize_int4, quantize_int4, quantize_int8_per_channel

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "quantize_int4",
    "quantize_int8_per_channel",
]
