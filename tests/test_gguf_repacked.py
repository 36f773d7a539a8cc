"""The regrouped (x4) GGUF layout: _C.gguf_repack and _C.gguf_matmul_repacked (the CPU kernels the native
decoder runs Q4_0, Q8_0, Q4_K and Q6_K weights through) against the plain gguf_matmul.

The regrouped kernels quantize x as the plain ones do and compute every output with the same integer block
sums and the same float32 operations in the same order, so each row of a batched product is bit-equal to the
plain GEMV of that row alone (M = 1), on the same ISA: scalar, AVX2, and AVX2 with the AVX-512 VNNI kernels
where the CPU has them (set_gguf_matmul_vnni). The same holds for gguf_matmul on the plain blocks at a batch of
8 rows or more, where the VNNI kernels run on panels regrouped on the fly. Every result is also held to test_gguf_matmul's float64 bounds,
and unpacking gives the original bytes back.
"""

import numpy as np
import pytest
import torch

from flashlm import _C
from test_gguf_matmul import check, weights

TYPES = ["Q4_0", "Q8_0", "Q4_K", "Q6_K"]
K_QUANTS = ("Q4_K", "Q6_K")
# K for the batched tests: three pairs of 32-element blocks, or two super-blocks of 256
BATCH_K = {"Q4_0": 192, "Q8_0": 192, "Q4_K": 512, "Q6_K": 512}
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
    k = BATCH_K[ggml_type]
    raw, w, parts = weights(ggml_type, n, k, seed=m * 100 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m))
    packed = repack(raw, ggml_type, n, k)
    y = repacked(x, packed, ggml_type, n, bias)
    for i in range(m):  # each row as the plain GEMV computes it alone
        assert torch.equal(y[i], plain(x[i:i + 1], raw, ggml_type, n, bias)[0]), f"row {i}"
    # The typical (Frobenius) error is a statistic over the outputs: with the K-quants' coarser 256-value
    # activation blocks, a handful of outputs can stray above it (2 x 3 of Q4_K: 1.8e-2); the elementwise
    # bounds hold for every case.
    check(y, x, ggml_type, w, parts, bias, typical=ggml_type not in K_QUANTS or m * n >= 16)


@pytest.mark.parametrize("isa,vnni", KERNELS)
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("m", [7, 8, 33, 130])  # below and from the batch that regroups plain weights on the fly
@pytest.mark.parametrize("n,k_blocks", [(3, 1), (37, 1), (68, 2)])  # K: BATCH_K, or twice it (the panel buffer grows)
def test_plain_batch_equals_plain_gemv(isa, vnni, ggml_type, m, n, k_blocks, vnni_switch):
    """gguf_matmul on the plain blocks at a batch of rows: from 8 rows on, with the AVX-512 VNNI kernels, each
    panel of 16 weight rows is regrouped into a per-thread buffer and multiplied by the x4 kernels; every row
    still equals the plain GEMV of that row alone."""
    _C.set_cpu_isa(isa)
    vnni_switch(vnni)
    k = BATCH_K[ggml_type] * k_blocks
    raw, w, parts = weights(ggml_type, n, k, seed=m * 100 + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n + k))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m))
    y = plain(x, raw, ggml_type, n, bias)
    for i in range(m):
        assert torch.equal(y[i], plain(x[i:i + 1], raw, ggml_type, n, bias)[0]), f"row {i}"
    check(y, x, ggml_type, w, parts, bias, typical=ggml_type not in K_QUANTS or m * n >= 16)


def extreme_blocks(raw: torch.Tensor, ggml_type: str, rng) -> torch.Tensor:
    """raw's blocks with every quant byte (and the K-quants' scale bytes) drawn from values at their extremes;
    the f16 scales are kept."""
    # byte ranges [start, stop) of a block to overwrite, and the values to draw from
    extremes = {"Q4_0": (18, [(2, 18)], [0x00, 0xFF, 0x88]),
                "Q8_0": (34, [(2, 34)], [0x80, 0x7F, 0x81]),
                "Q4_K": (144, [(4, 144)], [0x00, 0xFF, 0x3F, 0xC0]),  # 6-bit scales and mins 0 or 63, nibbles 0 or 15
                "Q6_K": (210, [(0, 208)], [0x00, 0xFF, 0x80, 0x7F])}  # 6-bit quants 0 or 63, scales -128 or 127
    size, ranges, values = extremes[ggml_type]
    blocks = raw.reshape(-1, size).clone()
    for start, stop in ranges:
        blocks[:, start:stop] = torch.from_numpy(rng.choice(values, size=(blocks.shape[0], stop - start)).astype(np.uint8))
    return blocks.reshape(raw.shape)


@pytest.mark.skipif(not (_VNNI and _C.cpu_isa_supported("avx2")), reason="no AVX-512 VNNI")
@pytest.mark.parametrize("ggml_type", TYPES)
def test_vnni_equals_avx2_on_extreme_quants(ggml_type, vnni_switch):
    """Quants and scales at their extremes (Q8_0's -128 included) and activations at +-127: the VNNI kernels'
    integers (unsigned weights with the offset moved to the activation sums for Q4_0 / Q8_0; the K-quants'
    scaled int16 pair sums) are AVX2's exactly."""
    _C.set_cpu_isa("avx2")
    n, k, m = 20, 512 if ggml_type in K_QUANTS else 256, 9
    raw, _, _ = weights(ggml_type, n, k, seed=7)
    rng = np.random.default_rng(0)
    raw = extreme_blocks(raw, ggml_type, rng)
    x = torch.from_numpy(rng.choice([-1.0, 1.0, 0.5], size=(m, k)).astype(np.float32))
    packed = repack(raw, ggml_type, n, k)
    vnni_switch(False)
    expected = repacked(x, packed, ggml_type, n)
    vnni_switch(True)
    assert torch.equal(repacked(x, packed, ggml_type, n), expected)
    assert torch.equal(expected, plain(x, raw, ggml_type, n))
    for i in range(m):  # and row by row, the GEMV
        assert torch.equal(expected[i], plain(x[i:i + 1], raw, ggml_type, n)[0]), f"row {i}"


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("n", [1, 4, 9])
def test_unpack_gives_the_blocks_back(ggml_type, n):
    k = 512 if ggml_type in K_QUANTS else 128
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
    assert _C.gguf_repack_supported("Q4_K", 4, 256) and _C.gguf_repack_supported("Q6_K", 3, 512)
    assert not _C.gguf_repack_supported("Q4_K", 4, 128)  # not a whole super-block
    assert not _C.gguf_repack_supported("Q6_K", 4, 320)
    assert not _C.gguf_repack_supported("Q5_K", 4, 256)
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


@pytest.mark.parametrize("ggml_type", K_QUANTS)
def test_bad_input_k_quants(ggml_type):
    """K not a whole number of super-blocks is refused by name, as are a Q5_K weight and a short buffer."""
    n, k = 4, 512
    raw, _, _ = weights(ggml_type, n, k, seed=0)
    raw = raw.reshape(-1)
    packed = repack(raw, ggml_type, n, k)
    with pytest.raises(ValueError, match=f"regrouped layout of {ggml_type} needs N > 0 and K a positive multiple of 256"):
        _C.gguf_repack(raw, torch.empty_like(raw), ggml_type, 4 * n, k // 4, True)
    with pytest.raises(ValueError, match="multiple of 256, got 4 x 128"):
        _C.gguf_matmul_repacked(torch.randn(2, 128), packed, ggml_type, 4, None, torch.empty(2, 4))
    with pytest.raises(ValueError, match="no regrouped layout"):
        _C.gguf_repack(raw, torch.empty_like(raw), "Q5_K", n, k, True)
    with pytest.raises(ValueError, match="packed has"):
        _C.gguf_matmul_repacked(torch.randn(2, k), packed[:-1], ggml_type, n, None, torch.empty(2, n))
