"""Weight quantization: RTN int8/int4 quantizers, GGUF block quantizers, quantized replacements of
nn.Linear (int8, int4, GGUF blocks) and of nn.Embedding (GGUF blocks), and which tensors of a model get which
GGUF type (mix). The `flashlm quantize` file converter that uses them is flashlm.io.quantize_file.

Calibration: flashlm.quant.calibrate (one pass over calibration text, per-layer activation statistics), read by
flashlm.quant.ranges (static int8 activation thresholds: min-max, percentile, KL), flashlm.quant.smoothquant and
flashlm.quant.w8a8 (a model's block linears to Int8Linear, dynamic or static activation scales); GPTQ and AWQ
int4 (gptq, awq; their own block-by-block input capture, calib_inputs); llama.cpp's importance matrices
(imatrix) for the GGUF quantizers."""

from flashlm.quant.awq import awq_quantize
from flashlm.quant.gguf_embedding import GGUFEmbedding
from flashlm.quant.gguf_linear import GGUFLinear
from flashlm.quant.gguf_quantize import GGUF_QUANT_TYPES, quantize_gguf
from flashlm.quant.gptq import gptq_quantize
from flashlm.quant.linear import Int4Linear, Int8Linear
from flashlm.quant.rtn import dequantize_int4, quantize_int4, quantize_int8_per_channel

__all__ = [
    "GGUFEmbedding",
    "GGUFLinear",
    "GGUF_QUANT_TYPES",
    "Int4Linear",
    "Int8Linear",
    "awq_quantize",
    "dequantize_int4",
    "gptq_quantize",
    "quantize_gguf",
    "quantize_int4",
    "quantize_int8_per_channel",
]
