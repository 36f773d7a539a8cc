"""flashlm.quant.quantize_gguf against independent references.

- gguf-py's numpy quantizers (`gguf.quants.quantize`), bit for bit, for every block type it implements
  (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and for F16/BF16;
- llama.cpp's own reference quantizers (quantize_row_*_ref, compiled from the llama-cpp-python sdist by
  tests/llama_cpp_ref.py), bit for bit, for every type including the K-quants; skipped only where the
  sources are absent (`.ci/run` provides them);
- the AVX2 scale searches of Q2_K/Q4_K/Q5_K/Q6_K against the scalar ones, bit for bit;
- round trips through gguf-py's `gguf.quants.dequantize`, with a relative RMS error bound per type.
Inputs are fresh random rows of several distributions with awkward blocks: all-zero and constant
blocks, values near the all-zero threshold, outliers, several blocks per row.
"""

import zlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

import llama_cpp_ref
from flashlm import ops
from flashlm.quant import GGUF_QUANT_TYPES, quantize_gguf

GGUF_PY_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BLOCK_TYPES = GGUF_PY_TYPES + K_TYPES
DISTRIBUTIONS = ["normal", "uniform", "outliers", "zero_blocks", "constant_blocks", "tiny", "mixed_scales"]

# Relative RMS error ||dequant(quant(x)) - x|| / ||x|| on standard normal rows of 4096. Measured (seeded
# 256 x 4096): F16 2.1e-4, BF16 1.7e-3, Q4_0 .086, Q4_1 .078, Q5_0 .043, Q5_1 .038, Q8_0 .0054, Q2_K .297,
# Q3_K .151, Q4_K .071, Q5_K .036, Q6_K .0178, IQ4_NL .076, IQ4_XS .0765. The bounds are those plus ~15-20%: enough for another
# seed (the error of 32 x 4096 values varies by well under 5%), tight enough that a scale off by one
# level, a lost high bit or a wrong sub-block layout (all >= 2x the error) fails. They follow the theory
# too: a uniform step s has RMS error s / sqrt(12), and each extra bit halves it (Q4_0 -> Q5_0 -> Q8_0).
RMS_BOUNDS = {
    "F16": 2.5e-4, "BF16": 2.0e-3, "Q4_0": 0.10, "Q4_1": 0.092, "Q5_0": 0.05, "Q5_1": 0.045, "Q8_0": 0.0064,
    "Q2_K": 0.34, "Q3_K": 0.175, "Q4_K": 0.083, "Q5_K": 0.042, "Q6_K": 0.021, "IQ4_NL": 0.088, "IQ4_XS": 0.088,
}


def rng_for(*parts):
    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


def block_of(name):
    return GGUF_QUANT_TYPES[name][0]


def make_rows(dist, rows, n, block, rng):
    """[rows, n] float32 values of a named distribution; `block` sets where special blocks fall."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    if dist == "uniform":
        x = rng.uniform(-1, 1, (rows, n)).astype(np.float32)
    elif dist == "outliers":  # 1% of the values 30-100x larger, of either sign
        mask = rng.random(x.shape) < 0.01
        x[mask] *= rng.uniform(30, 100, mask.sum()).astype(np.float32)
    elif dist in ("zero_blocks", "constant_blocks"):
        blocks = x.reshape(rows, n // block, block)
        pick = rng.random(blocks.shape[:2]) < 0.3
        if dist == "zero_blocks":
            blocks[pick] = 0
        else:  # a constant, positive or negative, per picked block
            blocks[pick] = rng.standard_normal((int(pick.sum()), 1)).astype(np.float32)
        # and a block of 31 zeros plus one value, and one with a single sub-block set
        blocks[0, 0] = 0
        blocks[0, 0, 5] = 1.5
    elif dist == "tiny":  # scales near and below the all-zero threshold (1e-15) and fp16's subnormals
        scale = np.float32(10.0) ** rng.integers(-22, -3, (rows, 1)).astype(np.float32)
        x = (x * scale).astype(np.float32)
    elif dist == "mixed_scales":  # each block at its own scale, 1e-4 to 1e4
        blocks = x.reshape(rows, n // block, block)
        blocks *= (np.float32(10.0) ** rng.uniform(-4, 4, blocks.shape[:2] + (1,))).astype(np.float32)
    return np.ascontiguousarray(x)


def mismatch(a, b):
    """'' when equal, else where the first differing byte is."""
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    diff = np.argwhere(a != b)
    if len(diff) == 0:
        return ""
    r, c = diff[0]
    return f"{len(diff)} bytes differ, first at row {r} byte {c}: {a[r, c]} vs {b[r, c]}"


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_matches_gguf_py(name, dist):
    x = make_rows(dist, 24, 32 * 7, 32, rng_for("gguf-py", name, dist))
    ours = quantize_gguf(x, name)
    ref = gguf.quants.quantize(x, GQT[name])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert not mismatch(ours, ref), mismatch(ours, ref)


def test_q8_0_rounds_ties_away_from_zero():
    # a block max of 127 makes the scale exactly 1, so the quantizer rounds the values themselves:
    # quarters (ties at .5) and their float neighbours, against gguf-py's np_roundf
    v = np.arange(-127 * 4, 127 * 4 + 1, dtype=np.float32) / 4
    x = np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])
    x = x[: len(x) // 32 * 32].reshape(-1, 32).astype(np.float32)
    x[:, 0] = 127
    ours, ref = quantize_gguf(x, "Q8_0"), gguf.quants.quantize(x, GQT.Q8_0)
    assert not mismatch(ours, ref), mismatch(ours, ref)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # gguf-py's own f16 cast of 65520
@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_float_outputs_match_gguf_py(name):
    x = make_rows("mixed_scales", 8, 96, 32, rng_for("float", name))
    x[0, :6] = [65504, 65520, -1e9, 1e-8, -0.0, 3e-39]  # f16 max, f16 overflow, tiny, -0, f32 subnormal
    ours = quantize_gguf(x, name)
    ref = gguf.quants.quantize(x, GQT[name]).view(np.uint8).reshape(ours.shape)
    assert not mismatch(ours, ref), mismatch(ours, ref)


@pytest.fixture(scope="module")
def llama_ref():
    src = llama_cpp_ref.find_source()
    if src is None:
        pytest.skip(f"llama.cpp sources absent: set {llama_cpp_ref.ENV_VAR} to a llama-cpp-python sdist "
                    f"(pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==<version>)")
    return llama_cpp_ref.load()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_matches_llama_cpp(llama_ref, name, dist):
    block = block_of(name)
    x = make_rows(dist, 8, block * 3, block, rng_for("llama", name, dist))
    ours = quantize_gguf(x, name)
    ref = llama_ref.quantize(x, name)
    assert not mismatch(ours, ref), mismatch(ours, ref)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_half_inputs_quantize_as_their_f32_values(llama_ref, name):
    # f16 and bf16 rows are widened exactly, so they quantize as the same values in f32 do
    x = make_rows("normal", 4, 512, block_of(name), rng_for("half", name))
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        ref = llama_ref.quantize(t.float().numpy(), name)
        assert not mismatch(quantize_gguf(t, name), ref), (dtype, mismatch(quantize_gguf(t, name), ref))
    x16 = x.astype(np.float16)
    assert not mismatch(quantize_gguf(x16, name), llama_ref.quantize(x16.astype(np.float32), name))


@pytest.mark.skipif(not ops.cpu_isa_supported("avx2"), reason="this CPU has no AVX2")
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K", "Q6_K"])
def test_avx2_matches_scalar(name, dist):
    x = make_rows(dist, 6, 512, 256, rng_for("avx2", name, dist))
    before = ops.cpu_isa()
    try:
        ops.set_cpu_isa("scalar")
        scalar = quantize_gguf(x, name)
        ops.set_cpu_isa("avx2")
        avx2 = quantize_gguf(x, name)
    finally:
        ops.set_cpu_isa(before)
    assert not mismatch(avx2, scalar), mismatch(avx2, scalar)


@pytest.mark.parametrize("name", list(RMS_BOUNDS))
def test_round_trip_error(name):
    x = make_rows("normal", 32, 4096, block_of(name), rng_for("rms", name))
    q = quantize_gguf(x, name)
    y = gguf.quants.dequantize(q, GQT[name]).reshape(x.shape)
    err = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))
    worst = np.unravel_index(np.argmax(np.abs(y - x)), x.shape)
    assert err <= RMS_BOUNDS[name], f"{name}: relative RMS error {err:.4g} > {RMS_BOUNDS[name]} (largest at {worst})"


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_round_trip_special_blocks(name):
    # all-zero blocks come back as zeros; a constant block comes back within its type's error
    block = block_of(name)
    x = np.zeros((3, block * 2), dtype=np.float32)
    x[1] = -0.75
    x[2, :block] = 2.0
    y = gguf.quants.dequantize(quantize_gguf(x, name), GQT[name]).reshape(x.shape)
    assert np.all(y[0] == 0), y[0]
    err = np.max(np.abs(y[1:] - x[1:])) / 2.0
    assert err <= 4 * RMS_BOUNDS[name], f"{name}: constant blocks come back with error {err:.3g}"


def test_torch_and_numpy_inputs_agree():
    x = make_rows("normal", 5, 256, 256, rng_for("torch"))
    for name in ("Q4_0", "Q4_K"):
        assert np.array_equal(quantize_gguf(x, name), quantize_gguf(torch.from_numpy(x), name))
        assert np.array_equal(quantize_gguf(x, name), quantize_gguf(x.T.copy().T, name))  # non-contiguous view


def test_empty_rows():
    assert quantize_gguf(np.zeros((0, 256), np.float32), "Q6_K").shape == (0, 210)


@pytest.mark.parametrize("data, ggml_type, message", [
    (np.zeros((2, 48), np.float32), "Q4_0", "multiple of Q4_0's block size 32"),
    (np.zeros((2, 128), np.float32), "Q4_K", "multiple of Q4_K's block size 256"),
    (np.zeros(64, np.float32), "Q8_0", "2-D"),
    (np.zeros((2, 2, 32), np.float32), "Q8_0", "2-D"),
    (np.zeros((2, 32), np.float64), "Q8_0", "float32, float16 or bfloat16"),
    (torch.zeros(2, 32, dtype=torch.int32), "Q8_0", "float32, float16 or bfloat16"),
    (np.zeros((2, 32), np.float32), "Q4_K_M", "ggml_type"),
    (np.zeros((2, 32), np.float32), "IQ2_XXS", "ggml_type"),
    (np.zeros((2, 32), np.float32), 8, "ggml_type"),
])
def test_bad_arguments(data, ggml_type, message):
    with pytest.raises(ValueError, match=message):
        quantize_gguf(data, ggml_type)


@pytest.mark.parametrize("data, ggml_type, out, message", [
    (np.zeros((2, 64), np.float32), "Q4_0", np.zeros(71, np.uint8), "out has 71 bytes, Q4_0 needs 72"),
    (np.zeros((2, 64), np.float32), "Q4_0", np.zeros(72, np.int8), "out must be U8"),
    (np.zeros((2, 64), np.float32), "Q4_0", np.zeros((72, 2), np.uint8)[:, 0], "out must be contiguous"),
    (np.zeros((2, 48), np.float32), "Q4_0", np.zeros(54, np.uint8), r"data's row length \(48\) must be a multiple"),
    (np.zeros((64, 2), np.float32).T, "Q4_0", np.zeros(72, np.uint8), "data must be contiguous"),
    (np.zeros((2, 64), np.int32), "Q4_0", np.zeros(72, np.uint8), "data must be F32, F16 or BF16"),
    (np.zeros((2, 64), np.float32), "IQ2_XXS", np.zeros(72, np.uint8), "cannot quantize to 'IQ2_XXS'"),
])
def test_native_checks(data, ggml_type, out, message):
    # the C++ entry point checks its arguments itself (C++ callers have no Python layer in front)
    with pytest.raises(ValueError, match=message):
        ops.gguf_quantize(data, ggml_type, out)


def test_not_an_array():
    with pytest.raises(TypeError, match="data"):
        quantize_gguf([[0.0] * 32], "Q8_0")
