"""Importance matrices (llama.cpp's imatrix) and quantization with them.

- flashlm's quantizers given an imatrix against llama.cpp's own quantize_<type>(src, dst, nrow, n_per_row,
  imatrix) compiled from the llama-cpp-python sdist (tests/llama_cpp_ref.py), bit for bit, for every type
  that takes one (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS), with and without an imatrix; skipped
  only where the sources are absent (`.ci/run` provides them);
- the AVX2 scale searches under an imatrix against the scalar ones;
- that an imatrix lowers the activation-weighted error on a layer with skewed input channels.
"""

import numpy as np
import pytest

import llama_cpp_ref
from flashlm import ops
from flashlm.quant import GGUF_QUANT_TYPES, quantize_gguf
from test_gguf_quantize import make_rows, mismatch, rng_for

IMATRIX_TYPES = list(llama_cpp_ref.IMATRIX_TYPES)
DISTRIBUTIONS = ["normal", "outliers", "zero_blocks", "constant_blocks", "mixed_scales"]


def importance(kind, n, rng):
    """Imatrix values of a named kind: None, skewed (a few channels 100-1000x the rest), with zeros."""
    if kind == "none":
        return None
    values = rng.random(n).astype(np.float32) ** 2
    if kind == "skewed":
        hot = rng.choice(n, max(1, n // 50), replace=False)
        values[hot] *= rng.uniform(100, 1000, len(hot)).astype(np.float32)
    elif kind == "zeros":  # dead channels, and one whole block of them
        values[rng.random(n) < 0.2] = 0
        values[:32] = 0
    return values


@pytest.fixture(scope="module")
def llama_ref():
    src = llama_cpp_ref.find_source()
    if src is None:
        pytest.skip(f"llama.cpp sources absent: set {llama_cpp_ref.ENV_VAR} to a llama-cpp-python sdist")
    return llama_cpp_ref.load()


@pytest.mark.parametrize("kind", ["none", "skewed", "zeros"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_matches_llama_cpp(llama_ref, name, dist, kind):
    block = GGUF_QUANT_TYPES[name][0]
    rng = rng_for("imatrix", name, dist, kind)
    x = make_rows(dist, 5, max(block * 3, 256), block, rng)  # 5 rows: threads split unevenly
    qw = importance(kind, x.shape[1], rng)
    ours = quantize_gguf(x, name, imatrix=qw)
    ref = llama_ref.quantize_imatrix(x, name, qw)
    assert not mismatch(ours, ref), mismatch(ours, ref)


@pytest.mark.skipif(not ops.cpu_isa_supported("avx2"), reason="this CPU has no AVX2")
@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_avx2_matches_scalar(name):
    rng = rng_for("imatrix-avx2", name)
    x = make_rows("outliers", 6, 512, 256, rng)
    qw = importance("skewed", 512, rng)
    before = ops.cpu_isa()
    try:
        ops.set_cpu_isa("scalar")
        scalar = quantize_gguf(x, name, imatrix=qw)
        ops.set_cpu_isa("avx2")
        avx2 = quantize_gguf(x, name, imatrix=qw)
    finally:
        ops.set_cpu_isa(before)
    assert not mismatch(avx2, scalar), mismatch(avx2, scalar)


@pytest.mark.parametrize("name", ["Q8_0", "F16"])
def test_types_without_weights_ignore_the_imatrix(name):
    x = make_rows("normal", 3, 64, 32, rng_for("ignore", name))
    assert np.array_equal(quantize_gguf(x, name, imatrix=np.ones(64, np.float32)), quantize_gguf(x, name))


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS"])
def test_imatrix_lowers_the_weighted_error(name):
    # a layer whose inputs have a few loud channels: the output error sum_j E[x_j^2] (w_ij - q_ij)^2 is
    # what an imatrix (E[x_j^2] per column) lets the quantizer minimise
    import gguf

    rng = rng_for("weighted", name)
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    act = rng.standard_normal((512, 1024)).astype(np.float32)
    act[:, rng.choice(1024, 16, replace=False)] *= 30
    qw = np.mean(act.astype(np.float64) ** 2, axis=0).astype(np.float32)

    def weighted_error(q):
        y = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name]).reshape(w.shape)
        return float(np.sum(qw * (y.astype(np.float64) - w) ** 2))

    plain, weighted = weighted_error(quantize_gguf(w, name)), weighted_error(quantize_gguf(w, name, imatrix=qw))
    assert weighted < 0.8 * plain, f"{name}: weighted error {weighted:.4g} with an imatrix vs {plain:.4g} without"


@pytest.mark.parametrize("imatrix, error, message", [
    (np.ones(63, np.float32), ValueError, "imatrix: expected 64 values"),
    (np.ones((2, 64), np.float32), ValueError, "imatrix: expected 64 values"),
    (np.full(64, np.nan, np.float32), ValueError, "imatrix: values must be finite"),
    (-np.ones(64, np.float32), ValueError, "imatrix: values must be finite and non-negative"),
    ([1.0] * 64, TypeError, "imatrix"),
])
def test_bad_imatrix(imatrix, error, message):
    with pytest.raises(error, match=message):
        quantize_gguf(np.zeros((2, 64), np.float32), "Q4_0", imatrix=imatrix)


@pytest.mark.parametrize("importance_arr, message", [
    (np.ones(63, np.float32), "importance has 63 values, data's rows have 64"),
    (np.ones(64, np.float64), "importance must be F32"),
    (np.ones(128, np.float32)[::2], "importance must be contiguous"),
])
def test_native_checks(importance_arr, message):
    with pytest.raises(ValueError, match=message):
        ops.gguf_quantize(np.zeros((2, 64), np.float32), "Q4_0", np.zeros(72, np.uint8), importance_arr)
