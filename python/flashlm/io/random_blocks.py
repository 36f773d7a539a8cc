"""Random GGML blocks for tests, benchmarks and the demo: random bytes with every floating-point scale
field replaced by a finite value, so that every decoded element is finite."""

from __future__ import annotations

from typing import Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Byte offsets of the floating-point fields inside one block (ggml-common.h; csrc/include/flashlm/gguf/blocks.h).
SCALE_FIELDS = {
    "Q4_0": [(0, "f16")], "Q4_1": [(0, "f16"), (2, "f16")],
    "Q5_0": [(0, "f16")], "Q5_1": [(0, "f16"), (2, "f16")],
    "Q8_0": [(0, "f16")],
    "Q2_K": [(80, "f16"), (82, "f16")],  # scales[16], qs[64], d, dmin
    "Q3_K": [(108, "f16")],              # hmask[32], qs[64], scales[12], d
    "Q4_K": [(0, "f16"), (2, "f16")], "Q5_K": [(0, "f16"), (2, "f16")],
    "Q6_K": [(208, "f16")],              # ql[128], qh[64], scales[16], d
    "Q8_K": [(0, "f32")],
    "IQ4_NL": [(0, "f16")], "IQ4_XS": [(0, "f16")],
}
TYPES = [*SCALE_FIELDS, "F16", "BF16"]


def random_scales(rng: np.random.Generator, count: int, kind: str) -> np.ndarray:
    """Bit patterns of finite normal numbers in +-[2^-8, 2^2): every dequantized value stays finite."""
    r = rng.integers(0, 1 << 32, size=count, dtype=np.uint64)
    sign, exp = (r & 1), 7 + ((r >> 1) & 7)
    if kind == "f16":
        return ((sign << 15) | (exp << 10) | ((r >> 4) & 0x3FF)).astype(np.uint16).view(np.uint8).reshape(count, 2)
    exp = exp + (127 - 15)
    return ((sign << 31) | (exp << 23) | ((r >> 4) & 0x7FFFFF)).astype(np.uint32).view(np.uint8).reshape(count, 4)


def random_blocks(name: str, n: int, rng: Union[int, np.random.Generator] = 0) -> np.ndarray:
    """`n` elements of GGML type `name` (one of TYPES) as a flat uint8 array of blocks; `rng` a seed or a
    numpy Generator. `n` must be a whole number of blocks."""
    if name not in TYPES:
        raise ValueError(f"name: random blocks of {name} are not supported (only {', '.join(TYPES)})")
    rng = np.random.default_rng(rng)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    if n % block_size:
        raise ValueError(f"n: {n} elements is not a whole number of {name} blocks of {block_size}")
    if name in ("F16", "BF16"):  # any finite value: the exponent is not all ones
        r = rng.integers(0, 1 << 32, size=n, dtype=np.uint64)
        if name == "F16":
            bits = (r & 0x8000) | (((r >> 16) % 31) << 10) | ((r >> 40) & 0x3FF)
        else:
            bits = (r & 0x8000) | (((r >> 16) % 255) << 7) | ((r >> 40) & 0x7F)
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=n // block_size * type_size, dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset, kind in SCALE_FIELDS[name]:
        scales = random_scales(rng, blocks.shape[0], kind)
        blocks[:, offset:offset + scales.shape[1]] = scales
    return raw
