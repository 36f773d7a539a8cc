"""The regrouped (x4) GGUF layout: _C.gguf_repack and _C.gguf_matmul_repacked (the CPU kernels the native
decoder runs Q4_0 and Q8_0 weights through) against the plain gguf_matmul.

The regrouped kernels quantize x as the plain ones do and compute every output with the same integer block
sums and the same float32 operations in the same order, so each row of a batched product is bit-equal to the
plain GEMV of that row alone (M = 1), on the same ISA: scalar, AVX2, and AVX2 with the AVX-512 VNNI kernels
where the CPU has them (set_gguf_matmul_vnni). Every result is also held to test_gguf_matmul's float64 bounds,
and unpacking gives the original bytes back.
"""

import numpy as np
import pytest
import torch

from flashlm import _C
from test_gguf_matmul import check, weights

TYPES = ["Q4_0", "Q8_0"]
_FEATURES = _C.cpu_features()
_VNNI = _FEATURES["avx512f"] and _FEATURES["avx512bw"] and _FEATURES["avx512_vnni"]
# (ISA, whether the VNNI kernels may run)
KERNELS = [("scalar", False),
           pytest.param("avx2", False, marks=pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")),
           pytest.param("avx2", True, marks=pytest.mark.skipif(not (_VNNI and _C.cpu_isa_supported("avx2")),
                                                               reason="no AVX-512 VNNI"))]

pytestmark = pytest.mark.usefixtures("restore_isa")


@pytest.fixture
def vnni_switch():
    saved = _C.set_gguf_matmul_vnni(True)
    yield _C.set_gguf_matmul_vnni
    _C.set_gguf_matmul_vnni(saved)


def repack(raw: torch.Tensor, ggml_type: str, n: int, k: int) -> torch.Tensor:
    packed = torch.empty(raw.numel(), dtype=torch.uint8)
    _C.gguf_repack(raw.reshape(-1), packed, ggml_type, n, k, True)
    return packed


def plain(x, raw, ggml_type, n, bias=None):
    y = torch.empty(x.shape[0], n)
    _C.gguf_matmul(x, raw.reshape(-1), ggml_type, n, bias, y)
    return y


def repacked(x, packed, ggml_type, n, bias=None):
    y = torch.empty(x.shape[0], n)
    _C.gguf_matmul_repacked(x, packed, ggml_type, n, bias, y)
    return y


@pytest.mark.parametrize("isa,vnni", KERNELS)
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("n", [3, 37, 68])  # only a tail, groups and a tail of 1, whole groups of 4 and tiles of 16
def test_rows_equal_plain_gemv(isa, vnni, ggml_type, m, n, vnni_switch):
    _C.set_cpu_isa(isa)
    vnni_switch(vnni)
    k = 192  # three pairs of blocks
    raw, w, parts = weights(ggml_type, n, k, seed=m * 100 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m))
    packed = repack(raw, ggml_type, n, k)
    y = repacked(x, packed, ggml_type, n, bias)
    for i in range(m):  # each row as the plain GEMV computes it alone
        assert torch.equal(y[i], plain(x[i:i + 1], raw, ggml_type, n, bias)[0]), f"row {i}"
    check(y, x, ggml_type, w, parts, bias)


@pytest.mark.skipif(not (_VNNI and _C.cpu_isa_supported("avx2")), reason="no AVX-512 VNNI")
@pytest.mark.parametrize("ggml_type", TYPES)
def test_vnni_equals_avx2_on_extreme_quants(ggml_type, vnni_switch):
    """Quants at their extremes (Q8_0's -128 included) and activations at +-127: the VNNI kernels' unsigned
    weights with the offset moved to the activation sums give AVX2's integers exactly."""
    _C.set_cpu_isa("avx2")
    n, k, m = 20, 256, 9
    raw, _, _ = weights(ggml_type, n, k, seed=7)
    blocks = raw.reshape(-1, 18 if ggml_type == "Q4_0" else 34).clone()
    rng = np.random.default_rng(0)
    extremes = [0x00, 0xFF, 0x88] if ggml_type == "Q4_0" else [0x80, 0x7F, 0x81]
    blocks[:, 2:] = torch.from_numpy(rng.choice(extremes, size=tuple(blocks[:, 2:].shape)).astype(np.uint8))
    raw = blocks.reshape(n, -1)
    x = torch.from_numpy(rng.choice([-1.0, 1.0, 0.5], size=(m, k)).astype(np.float32))
    packed = repack(raw, ggml_type, n, k)
    vnni_switch(False)
    expected = repacked(x, packed, ggml_type, n)
    vnni_switch(True)
    assert torch.equal(repacked(x, packed, ggml_type, n), expected)
    assert torch.equal(expected, plain(x, raw, ggml_type, n))


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("n", [1, 4, 9])
def test_unpack_gives_the_blocks_back(ggml_type, n):
    k = 128
    raw, _, _ = weights(ggml_type, n, k, seed=n)
    packed = repack(raw, ggml_type, n, k)
    if n >= 4:
        assert not torch.equal(packed, raw.reshape(-1))  # the groups really are regrouped
    back = torch.empty_like(packed)
    _C.gguf_repack(packed, back, ggml_type, n, k, False)
    assert torch.equal(back, raw.reshape(-1))


def test_supported():
    assert _C.gguf_repack_supported("Q4_0", 5, 64) and _C.gguf_repack_supported("Q8_0", 4, 128)
    assert not _C.gguf_repack_supported("Q4_0", 4, 96)  # an odd number of blocks
    assert not _C.gguf_repack_supported("Q4_K", 4, 256)
    assert not _C.gguf_repack_supported("Q4_0", 0, 64)
    assert not _C.gguf_repack_supported("bogus", 4, 64)


def test_bad_input():
    n, k = 8, 64
    raw, _, _ = weights("Q4_0", n, k, seed=0)
    raw = raw.reshape(-1)
    packed = repack(raw, "Q4_0", n, k)
    x, y = torch.randn(2, k), torch.empty(2, n)
    with pytest.raises(ValueError, match="no regrouped layout"):
        _C.gguf_repack(raw, torch.empty_like(raw), "Q5_0", n, k, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        _C.gguf_repack(raw, torch.empty_like(raw), "Q4_0", 2 * n, k // 2, True)
    with pytest.raises(ValueError, match="dst has"):
        _C.gguf_repack(raw, torch.empty(raw.numel() - 1, dtype=torch.uint8), "Q4_0", n, k, True)
    with pytest.raises(ValueError, match="overlap"):
        _C.gguf_repack(raw, raw, "Q4_0", n, k, True)
    with pytest.raises(ValueError, match="ggml_type"):
        _C.gguf_repack(raw, torch.empty_like(raw), "IQ4_XS", n, k, True)
    with pytest.raises(ValueError, match="packed has"):
        _C.gguf_matmul_repacked(x, packed[:-1], "Q4_0", n, None, y)
    with pytest.raises(ValueError, match="y must be"):
        _C.gguf_matmul_repacked(x, packed, "Q4_0", n, None, torch.empty(2, n + 1))
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        _C.gguf_matmul_repacked(x.bfloat16(), packed, "Q4_0", n, None, y)
    with pytest.raises(ValueError, match="bias must be"):
        _C.gguf_matmul_repacked(x, packed, "Q4_0", n, torch.zeros(n - 1), y)
    with pytest.raises(ValueError, match="multiple of 64"):
        _C.gguf_matmul_repacked(torch.randn(2, 32), packed, "Q4_0", 2 * n, None, torch.empty(2, 2 * n))
