"""flashlm.ops.dequantize against independent references, bit for bit.

References: gguf-py (llama.cpp's own Python package) `gguf.quants.dequantize` for every block type it has,
numpy for Q8_K (gguf-py has none) and for F32/F16/BF16 sources, and torch's own float32 -> f16/bf16
conversion for the narrow outputs. Blocks are fresh random bytes with their fp16 scale fields replaced by
random finite halves (subnormals included), so every quant bit pattern occurs. No tolerances: results must
equal the reference bit for bit (compare.assert_equal; any NaN equals any NaN where noted). The AVX2 and
scalar CPU paths, thread counts, and odd source addresses must give identical bits too.
"""

import zlib
from functools import lru_cache

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from compare import assert_equal
from conftest import devices
from flashlm import ops

QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL",
               "IQ4_XS"]
PLAIN_TYPES = ["F32", "F16", "BF16"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_IDS = ["f32", "f16", "bf16"]

# Byte offsets of each block's IEEE-half scale fields (d, dmin, m), from ggml-common.h.
HALF_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ4_NL": [0], "IQ4_XS": [0],
}

# n_blocks -> output shape in units of blocks along the last dimension: (rows, blocks per row).
SHAPES = {1: (None, 1), 3: (1, 3), 257: (257, 1), 10_000: (40, 250)}

def block_size(name):
    return gguf.GGML_QUANT_SIZES[GQT[name]][0]


def type_size(name):
    return gguf.GGML_QUANT_SIZES[GQT[name]][1]


def shape_for(name, n_blocks):
    rows, per_row = SHAPES[n_blocks]
    inner = per_row * block_size(name)
    return (inner,) if rows is None else (rows, inner)


def seed_of(*parts):
    return zlib.crc32("-".join(map(str, parts)).encode())


def random_finite_halves(rng, n):
    """n finite fp16 values as uint16 bits, uniform over bit patterns (zeros and subnormals included)."""
    return rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)


def random_blocks(name, n_blocks, seed, finite_scales=True):
    """[n_blocks * type_size] random bytes; with finite_scales, each scale field holds a finite value."""
    rng = np.random.default_rng(seed)
    size = type_size(name)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if finite_scales and name == "Q8_K":  # d is a float32
        bits = rng.integers(0, 0x7F800000, n_blocks, dtype=np.uint32) | (rng.integers(0, 2, n_blocks, dtype=np.uint32) << 31)
        raw[:, 0:4] = bits.view(np.uint8).reshape(n_blocks, 4)
    elif finite_scales:
        for offset in HALF_FIELDS.get(name, []):
            raw[:, offset:offset + 2] = random_finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def reference_f32(name, raw):
    """Independent float32 decoding of raw bytes (flat)."""
    if name == "Q8_K":  # block_q8_K: float32 d, int8 qs[256], int16 bsums[16]; y = d * q in float32
        blocks = raw.reshape(-1, type_size(name))
        d = blocks[:, 0:4].copy().view(np.float32)
        qs = blocks[:, 4:4 + 256].view(np.int8).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return (d * qs).reshape(-1)
    if name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, GQT[name]), dtype=np.float32).reshape(-1)


@lru_cache(maxsize=None)
def case(name, n_blocks):
    """(raw uint8 numpy, float32 reference numpy shaped like the output, shape) for one type and size."""
    raw = random_blocks(name, n_blocks, seed_of(name, n_blocks))
    shape = shape_for(name, n_blocks)
    return raw, reference_f32(name, raw).reshape(shape), shape


def expected(ref_f32, out_dtype):
    return torch.from_numpy(ref_f32).to(out_dtype)


@pytest.fixture
def cpu_isa_restored():
    before = ops.cpu_isa()
    yield
    ops.set_cpu_isa(before)


@pytest.fixture
def num_threads_restored():
    before = ops.num_threads()
    yield
    ops.set_num_threads(before)


needs_avx2 = pytest.mark.skipif(not ops.cpu_isa_supported("avx2"), reason="this CPU has no AVX2")


def dequantize_on(device, raw, name, shape, out_dtype):
    return ops.dequantize(torch.from_numpy(raw).to(device), name, shape, out_dtype=out_dtype)


# ---- against the references ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("n_blocks", sorted(SHAPES))
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_quant_types_match_reference(name, n_blocks, out_dtype, device):
    raw, ref, shape = case(name, n_blocks)
    got = dequantize_on(device, raw, name, shape, out_dtype)
    assert got.device.type == device
    assert_equal(got, expected(ref, out_dtype), name=f"{name} x{n_blocks} -> {out_dtype} on {device}", nan_equal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("name", PLAIN_TYPES)
def test_plain_types_match_numpy(name, out_dtype, device):
    # Every bit pattern: NaNs, infinities and subnormals included. 1037 rows x 3: not a multiple of any
    # vector width, so the tails are covered too.
    shape = (1037, 3)
    raw = np.random.default_rng(seed_of(name)).integers(0, 256, 1037 * 3 * type_size(name), dtype=np.uint8)
    ref = reference_f32(name, raw).reshape(shape)
    got = dequantize_on(device, raw, name, shape, out_dtype)
    assert_equal(got, expected(ref, out_dtype), name=f"{name} -> {out_dtype} on {device}", nan_equal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_narrow_outputs_round_like_torch(out_dtype, device, cpu_isa_restored):
    # Rounding edges as float32 sources: the f16 overflow threshold (65520 rounds to inf, just below it
    # to 65504), ties to even, f16 subnormals and underflow, and bf16 ties and overflow. Repeated to 66
    # values so the CPU kernels meet them both in their vector loop and in their tail.
    edges = np.array([
        65504.0, 65519.99, 65520.0, -65520.0, 1e6, -3.4e38, np.inf, -np.inf, np.nan,
        2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -25 * 1.0001, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
        1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.3895314e38, 3.4028235e38, 1e-40, -0.0, 0.0,
    ], dtype=np.float32)
    values = np.tile(edges, 3)
    raw = values.view(np.uint8)
    isas = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)] if device == "cpu" else [None]
    for isa in isas:
        if isa:
            ops.set_cpu_isa(isa)
        got = dequantize_on(device, raw, "F32", values.shape, out_dtype)
        assert_equal(got, expected(values, out_dtype), name=f"F32 edge values -> {out_dtype} on {device} ({isa})",
                     nan_equal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q4_1"])
def test_f16_output_overflows_to_inf(name, device):
    # The largest finite scale makes most values exceed fp16's range: they must become +-inf, as torch does.
    raw = random_blocks(name, 64, seed_of("overflow", name)).reshape(64, -1)
    for offset in HALF_FIELDS[name]:
        raw[:, offset:offset + 2] = np.array([0x7BFF], dtype=np.uint16).view(np.uint8)  # 65504
    raw = raw.reshape(-1)
    shape = (64, block_size(name))
    ref = reference_f32(name, raw).reshape(shape)
    want = expected(ref, torch.float16)
    assert torch.isinf(want).any() and torch.isfinite(want).any()
    got = dequantize_on(device, raw, name, shape, torch.float16)
    assert_equal(got, want, name=f"{name} with scale 65504 -> f16 on {device}", nan_equal=True)


# ---- the CPU paths agree -----------------------------------------------------------------------------------


@needs_avx2
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("name", QUANT_TYPES + PLAIN_TYPES)
def test_avx2_matches_scalar(name, out_dtype, cpu_isa_restored):
    # Finite scales: identical bits. Raw random bytes (NaN and infinite scales): identical up to NaN payloads
    # (which of two NaN operands an add returns is the compiler's choice in the scalar code).
    n = 1003 * block_size(name)
    for finite_scales in (True, False):
        raw = torch.from_numpy(random_blocks(name, n // block_size(name), seed_of("isa", name, finite_scales),
                                             finite_scales))
        results = {}
        for isa in ("scalar", "avx2"):
            ops.set_cpu_isa(isa)
            results[isa] = ops.dequantize(raw, name, (n,), out_dtype=out_dtype)
        assert_equal(results["avx2"], results["scalar"], name=f"{name} -> {out_dtype}, avx2 vs scalar, finite "
                     f"scales {finite_scales}", nan_equal=not finite_scales and name not in PLAIN_TYPES)


@needs_avx2
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_large_output_avx2_matches_scalar(name, out_dtype, cpu_isa_restored):
    # 48 MiB of output: past the size where the AVX2 kernels switch to streaming stores.
    n = (48 << 20) // (4 if out_dtype == torch.float32 else 2)
    raw = torch.from_numpy(random_blocks(name, n // block_size(name), seed_of("large", name)))
    results = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        results[isa] = ops.dequantize(raw, name, (n // 4096, 4096), out_dtype=out_dtype)
    assert_equal(results["avx2"], results["scalar"], name=f"{name} x{n} -> {out_dtype}, avx2 vs scalar", nan_equal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", QUANT_TYPES + PLAIN_TYPES)
def test_unaligned_source(name, device):
    # Blocks starting at an odd address: a view one byte into a larger buffer.
    n_blocks = 257 if name in QUANT_TYPES else 1001
    raw = random_blocks(name, n_blocks, seed_of("unaligned", name))
    shape = (n_blocks * block_size(name),)
    ref = reference_f32(name, raw)
    big = torch.zeros(raw.size + 1, dtype=torch.uint8, device=device)
    big[1:] = torch.from_numpy(raw).to(device)
    assert big[1:].data_ptr() % 2 == 1
    for out_dtype in OUT_DTYPES:
        got = ops.dequantize(big[1:], name, shape, out_dtype=out_dtype)
        assert_equal(got, expected(ref, out_dtype), name=f"{name} at an odd address -> {out_dtype} on {device}",
                     nan_equal=True)


@pytest.mark.parametrize("name", QUANT_TYPES + PLAIN_TYPES)
def test_threads_agree(name, num_threads_restored):
    # 2 MiB of f32 output: split into several ranges when there is more than one thread.
    n = (2 << 20) // 4
    raw = torch.from_numpy(random_blocks(name, n // block_size(name), seed_of("threads", name)))
    results = {}
    for threads in (1, 3):
        ops.set_num_threads(threads)
        results[threads] = ops.dequantize(raw, name, (n,))
    assert_equal(results[3], results[1], name=f"{name}, 3 threads vs 1", nan_equal=True)


def test_empty_tensor():
    got = ops.dequantize(torch.empty(0, dtype=torch.uint8), "Q4_K", (0, 256))
    assert got.shape == (0, 256) and got.dtype == torch.float32


# ---- errors ------------------------------------------------------------------------------------------------


def q4_0_raw(n_blocks=1):
    return torch.zeros(n_blocks * 18, dtype=torch.uint8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(raw=q4_0_raw().float()), "raw"),
    (dict(raw=q4_0_raw(2)), "raw"),
    (dict(shape=(64,)), "raw"),
    (dict(shape=(2, 16)), "shape"),
    (dict(shape=(-32,)), "shape"),
    (dict(ggml_type="Q4_X"), "ggml_type"),
    (dict(ggml_type=9999), "ggml_type"),
    (dict(ggml_type="IQ2_XXS", shape=(256,)), "ggml_type"),
    (dict(out_dtype=torch.float64), "out_dtype"),
    (dict(out_dtype=torch.int8), "out_dtype"),
], ids=["raw-float", "raw-too-long", "raw-too-short", "inner-not-blocks", "negative-shape", "unknown-name",
        "unknown-id", "unsupported-type", "out-f64", "out-int8"])
def test_errors_name_the_argument(kwargs, match):
    args = dict(raw=q4_0_raw(), ggml_type="Q4_0", shape=(32,), out_dtype=torch.float32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.dequantize(**args)


def test_non_tensor_raw_is_a_type_error():
    with pytest.raises(TypeError, match="raw"):
        ops.dequantize(bytes(18), "Q4_0", (32,))


def test_type_ids_and_names_agree():
    raw, ref, shape = case("Q4_K", 3)
    by_name = ops.dequantize(torch.from_numpy(raw), "q4_k", shape)
    by_id = ops.dequantize(torch.from_numpy(raw), int(GQT.Q4_K), shape)
    assert_equal(by_id, by_name, name="Q4_K by id vs by name", nan_equal=True)
    assert ops.dequantize_supported("Q4_K") and not ops.dequantize_supported("IQ2_XXS")
