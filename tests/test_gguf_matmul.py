"""flashlm.ops.gguf_linear (y = x @ W.T + bias with W in GGML blocks) against float64 references.

Weights: fresh random blocks (flashlm.io.random_blocks: random bytes, finite random scales) and, for the types
gguf-py can quantize, gguf.quants.quantize of Gaussian weights; decoded in float64 by gguf-py's
`gguf.quants.dequantize` (independent of flashlm's bit layouts).

The CPU kernels quantize each row of x to 8-bit blocks before multiplying (32 values per scale d = max|x| / 127
for the 32-element types; 256 per scale with the largest magnitude at -128 for the K-quants), so two checks:
  * exact:   against xq @ W.T in float64, xq being x quantized by the same rule in numpy float32. What is left
             is float32 rounding: the products d_w * d_x, the per-block multiply-add, the sum over blocks, and
             the cancellation between the scaled quants and the offsets (value = a * q + b is computed as
             a * sum(q x) + b * sum(x)). Bound: RTOL_EXACT * sum_k |xq_k| (|a q|_k + |b|_k). A wrong scale,
             offset, nibble or bit moves a result by O(1) of that sum; measured errors stay below 6e-8 of it.
  * float64: against x @ W.T. Each element of x moves by at most one quantization step (half a step when
             rounded, a whole one where Q8_K clamps +128 to 127): |y - ref| <= sum_k |w_nk| step_k plus the
             exact check's slack, a rigorous bound. The typical relative (Frobenius) error is about
             step / sqrt(12) / rms(x), ~6e-3 for Gaussian x (measured 4-9e-3, the rigorous bound is ~10x above
             the largest measured error); asserted below 1.5e-2.
bf16 x is quantized from its bf16 values; a bf16 y adds up to 2^-8 of |y|. CUDA (f16, bf16, f32; skipped without
a GPU) dequantizes the weights exactly and does not quantize x: one bound against x @ W.T (see test_matches_reference).
The bounds are elementwise (compare.assert_close); the references are reference.linear in float64.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from compare import assert_close
from conftest import per_kernel, use_isa
from flashlm import _C, ops
from flashlm.io.random_blocks import random_blocks
from reference import linear

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
ISAS = ["scalar", pytest.param("avx2", marks=pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2"))]
RTOL_EXACT = 1e-6
RTOL_TYPICAL = 1.5e-2
N = 37  # not a multiple of the 16-row weight tile nor of the 4-row activation group
# Byte ranges of each block's quants (ggml-common.h): zeroing them leaves only the offsets b.
QUANT_BYTES = {"Q4_0": (2, 18), "Q4_1": (4, 20), "Q5_0": (2, 22), "Q5_1": (4, 24), "Q8_0": (2, 34),
               "Q4_K": (16, 144), "Q5_K": (16, 176), "Q6_K": (0, 192)}


def k_for(ggml_type: str, blocks: int = 2) -> int:
    return 256 * blocks if ggml_type in K_TYPES else 32 * (2 * blocks + 1)  # K-quants: 512; others 160


pytestmark = pytest.mark.usefixtures("restore_isa")  # conftest.py: every test may switch the ISA


def decode(raw: np.ndarray, ggml_type: str, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw.reshape(n, -1), GQT[ggml_type]).astype(np.float64).reshape(n, k)


def weights(ggml_type: str, n: int, k: int, seed: int):
    """(raw uint8 tensor [n, row bytes], W [n, k], |a q| + |b| [n, k]) with W = a q + b per element."""
    raw = random_blocks(ggml_type, n * k, seed)
    w = decode(raw, ggml_type, n, k)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[GQT[ggml_type]][1]).copy()
    lo, hi = QUANT_BYTES[ggml_type]
    blocks[:, lo:hi] = 0
    b = decode(blocks.reshape(-1), ggml_type, n, k)
    return torch.from_numpy(raw.reshape(n, -1)), torch.from_numpy(w), torch.from_numpy(np.abs(w - b) + np.abs(b))


def quantize_x(x: torch.Tensor, ggml_type: str):
    """(xq, step) float64 [M, K]: x quantized as the kernels do (numpy float32 arithmetic), and the scale d of
    each element's block."""
    x = x.float().numpy()
    m, k = x.shape
    if ggml_type in K_TYPES:
        xb = x.reshape(m, k // 256, 256)
        idx = np.abs(xb).argmax(-1)[..., None]  # first element of largest magnitude, as ggml picks it
        vmax = np.take_along_axis(xb, idx, -1)
        with np.errstate(divide="ignore"):
            iscale = np.where(vmax != 0, np.float32(-128) / vmax, np.float32(0)).astype(np.float32)
            d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
        q = np.clip(np.rint(iscale * xb), -128, 127)
    else:
        xb = x.reshape(m, k // 32, 32)
        d = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        q = np.clip(np.rint(xb * inv), -127, 127)
    xq = (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k)
    step = (np.abs(d.astype(np.float64)) * np.ones(xb.shape)).reshape(m, k)
    return torch.from_numpy(xq), torch.from_numpy(step)


def check(y, x, ggml_type, w, parts, bias=None, typical=True):
    """Asserts both bounds of the module docstring; x is what the kernel saw (after any bf16 rounding)."""
    out_dtype = y.dtype
    y = y.double().reshape(-1, w.shape[0])
    x = x.double().reshape(-1, w.shape[1])
    xq, step = quantize_x(x, ggml_type)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact_ref = linear(xq, w, b)
    slack = RTOL_EXACT * linear(xq.abs(), parts, b.abs())
    if out_dtype == torch.bfloat16:
        slack = slack + 2.0**-8 * exact_ref.abs()
    assert_close(y, exact_ref, atol=slack, name=f"{ggml_type}: vs quantized-x reference")
    ref = linear(x, w, b)
    assert_close(y, ref, atol=linear(step, w.abs()) + slack, name=f"{ggml_type}: vs float64 reference")
    if typical:
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < RTOL_TYPICAL, f"{ggml_type}: relative error {rel:.3e} >= {RTOL_TYPICAL}"


@pytest.mark.parametrize("device,isa,dtype,m", per_kernel(
    cpu=[(torch.float32, m) for m in (1, 3, 16, 128)],
    cuda=[(dtype, m) for dtype in (torch.float16, torch.bfloat16, torch.float32) for m in (1, 3, 8, 16, 128)]))
@pytest.mark.parametrize("ggml_type", TYPES)
def test_matches_reference(ggml_type, device, isa, dtype, m):
    use_isa(isa)
    k = k_for(ggml_type)
    raw, w, parts = weights(ggml_type, N, k, seed=m)
    gen = torch.Generator().manual_seed(m)
    if device == "cpu":
        x = torch.randn(m, k, generator=gen)
        check(ops.gguf_linear(x, raw, ggml_type, (N, k)), x, ggml_type, w, parts)
        return
    # CUDA dequantizes the weights exactly (no activation quantization): the error is the input dtype's rounding
    # of x (the reference uses the rounded x) plus f32 accumulation of f16/bf16 products (GEMM path) and the
    # output rounding, and the tensor-core path rounds W to the input dtype: one more rounding of each weight.
    # Bounded by 2 * 2^-7 (bf16) or 2 * 2^-10 (f16) times sum |x| |w| (+ |bias|).
    x = (0.25 * torch.randn(m, k, generator=gen)).to(dtype)  # keeps every f16 output far below 65504
    b = torch.randn(N, generator=gen).to(dtype)
    y = ops.gguf_linear(x.to(device), raw.to(device), ggml_type, (N, k), bias=b.to(device)).cpu()
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-10}[dtype]
    assert_close(y, linear(x, w, b), atol=2 * eps * linear(x.abs(), w.abs(), b.abs()) + 1e-6,
                 name=f"{ggml_type} {dtype} M={m}")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_bias_dtypes_batch_dims(ggml_type, dtype, bias):
    k = k_for(ggml_type, blocks=1)
    raw, w, parts = weights(ggml_type, N, k, seed=7)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, k, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = ops.gguf_linear(x, raw, ggml_type, (N, k), bias=b)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    check(y, x, ggml_type, w, parts, bias=b)


@pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")
@pytest.mark.parametrize("ggml_type", TYPES)
def test_avx2_matches_scalar(ggml_type):
    """Both paths quantize x identically and sum the same integers; only float32 rounding may differ."""
    k = k_for(ggml_type, blocks=3)
    raw, w, parts = weights(ggml_type, 70, k, seed=11)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(5))
    out = {}
    for isa in ("scalar", "avx2"):
        _C.set_cpu_isa(isa)
        out[isa] = ops.gguf_linear(x, raw, ggml_type, (70, k)).double()
    xq, _ = quantize_x(x, ggml_type)
    assert_close(out["avx2"], out["scalar"], atol=RTOL_EXACT * linear(xq.abs(), parts),
                 name=f"{ggml_type}: AVX2 vs scalar")


@pytest.mark.skipif(not (_C.cpu_isa_supported("avx2") and _C.cpu_features()["avx_vnni"]), reason="no AVX-VNNI")
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("m", [1, 6])
def test_vnni_equals_avx2(ggml_type, m):
    """The AVX-VNNI kernels (vpdpwssd for the K-quants' scaled sums) add the same integers as AVX2's madd and
    add: bit-equal results. Q6_K and the K-quants' extreme quants and scales come from random blocks."""
    _C.set_cpu_isa("avx2")
    k = k_for(ggml_type, blocks=3)
    raw, _, _ = weights(ggml_type, 70, k, seed=17)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
    out = {}
    try:
        for vnni in (False, True):
            _C.set_gguf_matmul_vnni(vnni)
            out[vnni] = ops.gguf_linear(x, raw, ggml_type, (70, k))
    finally:
        _C.set_gguf_matmul_vnni(True)
    assert torch.equal(out[True], out[False])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_a_row_does_not_depend_on_the_batch(isa, ggml_type):
    """Each output row is computed the same way whether x has 1 row (GEMV, four weight rows at a time) or many
    (GEMM tiles of activation rows): batched serving gives the bits of one-at-a-time serving."""
    _C.set_cpu_isa(isa)
    k = k_for(ggml_type, blocks=3)
    raw, _, _ = weights(ggml_type, 70, k, seed=13)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(6))
    together = ops.gguf_linear(x, raw, ggml_type, (70, k))
    for i in range(7):
        alone = ops.gguf_linear(x[i:i + 1], raw, ggml_type, (70, k))
        assert torch.equal(alone[0], together[i]), f"{ggml_type} row {i}"


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_py_quantized_weights(ggml_type):
    """Realistic blocks: Gaussian weights quantized by gguf-py."""
    k, n = 256, 33
    gen = torch.Generator().manual_seed(1)
    wf = torch.randn(n, k, generator=gen).numpy()
    raw = gguf.quants.quantize(wf, GQT[ggml_type])
    w = decode(raw, ggml_type, n, k)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[GQT[ggml_type]][1]).copy()
    lo, hi = QUANT_BYTES[ggml_type]
    blocks[:, lo:hi] = 0
    b = decode(blocks.reshape(-1), ggml_type, n, k)
    x = torch.randn(4, k, generator=gen)
    y = ops.gguf_linear(x, torch.from_numpy(raw), ggml_type, (n, k))
    check(y, x, ggml_type, torch.from_numpy(w), torch.from_numpy(np.abs(w - b) + np.abs(b)))


@pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")
@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q8_0", "Q4_1", *K_TYPES])
def test_avx2_quantizer_on_awkward_rows(ggml_type):
    """float32 x goes through the AVX2 activation quantizer, bfloat16 x through the scalar one; with x exactly
    bfloat16 both see the same values and must make the same blocks, so y from float32 x rounded to bfloat16
    equals y from bfloat16 x, bit for bit. The rows: the largest magnitude twice with either sign first (the
    first decides the sign of the scale, and which of them clamps from +128 to 127), values that scale to
    exact halves (rounded to even; Q8_K's scale is 1 there), an all-zero block, a subnormal largest value (left
    to the scalar code), and values whose 32-block scale max|x| / 127 is subnormal with a finite inverse. The first four rows are also held to the exact bound of the numpy quantization."""
    _C.set_cpu_isa("avx2")
    k, n = 512, 70
    raw, w, parts = weights(ggml_type, n, k, seed=3)
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(6, k, generator=g) * 6 - 3).bfloat16().float()  # |x| < 3
    x[0, 10], x[0, 200] = -4.0, 4.0
    x[1, 3], x[1, 300] = 4.0, -4.0
    x[2, :256] = torch.arange(-128.0, 128.0) + 0.5  # scale 1 after the first value: halves
    x[2, 0] = -128.0
    x[3, :256] = 0.0
    x[4] = (x[4] * 1e-39).bfloat16().float()  # bfloat16 has float32's subnormals (with fewer bits)
    x[5] = (x[5] * 4e-37).bfloat16().float()  # max|x| / 127 subnormal, its inverse finite
    y32 = ops.gguf_linear(x, raw, ggml_type, (n, k))
    y16 = ops.gguf_linear(x.bfloat16(), raw, ggml_type, (n, k))
    assert torch.equal(y32.bfloat16(), y16)
    check(y32[:4], x[:4], ggml_type, w, parts, typical=False)


def test_non_finite_x_gives_nan_rows():
    raw, _, _ = weights("Q4_0", N, 64, seed=2)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    for ggml_type, k in (("Q4_0", 64),):
        y = ops.gguf_linear(x, raw, ggml_type, (N, k))
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()


def test_zero_sizes():
    raw = torch.empty(0, dtype=torch.uint8)
    assert ops.gguf_linear(torch.randn(3, 32), raw, "Q8_0", (0, 32)).shape == (3, 0)
    raw, _, _ = weights("Q8_0", 5, 32, seed=0)
    assert ops.gguf_linear(torch.randn(0, 32), raw, "Q8_0", (5, 32)).shape == (0, 5)
    y = ops.gguf_linear(torch.randn(2, 0), torch.empty(0, dtype=torch.uint8), "Q4_K", (4, 0), bias=torch.ones(4))
    assert torch.equal(y, torch.ones(2, 4))


def test_bad_input_raises():
    raw, _, _ = weights("Q4_0", 8, 64, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="ggml_type"):
        ops.gguf_linear(x, raw, "Q2_K", (8, 64))
    with pytest.raises(ValueError, match="ggml_type"):
        ops.gguf_linear(x, raw, "F16", (8, 64))
    with pytest.raises(ValueError, match="multiple"):
        ops.gguf_linear(torch.randn(2, 48), raw, "Q4_0", (8, 48))
    with pytest.raises(ValueError, match="raw"):
        ops.gguf_linear(x, raw[:, :-1], "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="raw"):
        ops.gguf_linear(x, raw.view(torch.int8), "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="x"):
        ops.gguf_linear(torch.randn(2, 32), raw, "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="x"):
        ops.gguf_linear(x.half(), raw, "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="bias"):
        ops.gguf_linear(x, raw, "Q4_0", (8, 64), bias=torch.zeros(7))
    with pytest.raises(ValueError, match="shape"):
        ops.gguf_linear(x, raw, "Q4_0", (8,))
    # The native checks, reached directly.
    y = torch.empty(2, 8)
    with pytest.raises(ValueError, match="weight has"):
        _C.gguf_matmul(x, raw.reshape(-1)[:-18], "Q4_0", 8, None, y)
    with pytest.raises(ValueError, match="y must be"):
        _C.gguf_matmul(x, raw.reshape(-1), "Q4_0", 8, None, torch.empty(2, 7))
    with pytest.raises(ValueError, match="bias must have"):
        _C.gguf_matmul(x, raw.reshape(-1), "Q4_0", 8, torch.zeros(8, dtype=torch.bfloat16), y)
    with pytest.raises(ValueError, match="ggml_type"):
        _C.gguf_matmul(x, raw.reshape(-1), "IQ4_XS", 8, None, y)


def test_fake_tensor_and_opcheck():
    raw, _, _ = weights("Q4_K", 6, 256, seed=0)
    x = torch.randn(2, 256)
    torch.library.opcheck(torch.ops.flashlm.gguf_linear.default, (x, raw, "Q4_K", 6, None))
    torch.library.opcheck(torch.ops.flashlm.gguf_linear.default, (x, raw, "Q4_K", 6, torch.randn(6)))


# --- GGUFLinear --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_gguf_linear_module_from_float(ggml_type):
    """from_float quantizes the weight; the module then equals ops.gguf_linear on those blocks, and is close
    to the float layer (weight quantization error included: 4-bit ~10% relative, 8-bit < 2%)."""
    from flashlm.quant import GGUFLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 40)
    layer = GGUFLinear.from_float(lin, ggml_type=ggml_type)
    assert layer.raw.dtype == torch.uint8 and layer.raw.shape == (40, gguf_row_bytes(ggml_type, 512))
    x = torch.randn(2, 5, 512)
    y = layer(x)
    assert torch.equal(y, ops.gguf_linear(x, layer.raw, ggml_type, (40, 512), lin.bias.detach()))
    ref = lin(x).detach()
    rel = ((y - ref).norm() / (ref - lin.bias.detach()).norm()).item()
    assert rel < (0.02 if ggml_type == "Q8_0" else 0.15), f"{ggml_type}: relative error {rel:.3e}"


def gguf_row_bytes(ggml_type, k):
    size, nbytes = gguf.GGML_QUANT_SIZES[GQT[ggml_type]]
    return k // size * nbytes


def test_gguf_linear_module_bad_input():
    from flashlm.quant import GGUFLinear

    with pytest.raises(ValueError, match="ggml_type"):
        GGUFLinear.from_float(torch.nn.Linear(64, 8), ggml_type="Q3_K")
    with pytest.raises(ValueError, match="multiple"):
        GGUFLinear.from_float(torch.nn.Linear(48, 8), ggml_type="Q8_0")
    with pytest.raises(ValueError, match="raw"):
        GGUFLinear(torch.zeros(10, dtype=torch.uint8), "Q8_0", (8, 64))


def test_gguf_linear_module_from_gguf(tmp_path):
    """A tensor written by gguf-py's GGUFWriter, read by flashlm.io.gguf, multiplied in its blocks."""
    from flashlm.io.gguf import GGUFFile
    from flashlm.quant import GGUFLinear

    n, k = 24, 256
    raw, w, parts = weights("Q6_K", n, k, seed=4)
    bias = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "test")
    writer.add_tensor("w", raw.numpy(), raw_dtype=GQT.Q6_K)  # shape from the bytes: [n, row bytes]
    writer.add_tensor("b", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(tmp_path / "t.gguf") as f:
        layer = GGUFLinear.from_gguf(f, "w", bias="b")
    assert (layer.out_features, layer.in_features, layer.ggml_type) == (n, k, "Q6_K")
    x = torch.randn(3, k)
    check(layer(x), x, "Q6_K", w, parts, bias=torch.from_numpy(bias))
