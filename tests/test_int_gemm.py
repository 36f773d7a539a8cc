"""Integer GEMMs (W8A8, W4A16), the per-token activation quantizer and the RTN weight quantizers.

References: the quantizer against the same formula in torch (exact); W8A8 against the exact integer
product of the quantized operands with the epilogue in float64; W4A16 against float64 x @ W.T with W the
dequantized weights (reference.linear). Every CPU kernel runs under both ISAs (scalar, avx2:
`_C.set_cpu_isa`); CUDA cases of the same tests run in f16 and bf16 (skipped without a GPU). Tolerances:
W8A8's integer sums are exact, so only the float32 epilogue (three roundings) and the output dtype's
rounding are allowed; W4A16 accumulates in float32 in an order that differs between kernels, allowed
4 sqrt(K) float32 ulps of the sum of |terms|, plus the output dtype's rounding (compare.assert_close).
"""

import math

import pytest
import torch

import flashlm.ops as ops
from compare import assert_close, assert_equal
from conftest import per_kernel, use_isa
from flashlm import _C
from flashlm.ops.int_linear import _int8_gemm
from flashlm.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8_per_channel
from flashlm.quant.rtn import unpack_int4
from reference import linear

ISAS = ["scalar", pytest.param("avx2", marks=pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2"))]
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
MS = [1, 3, 16, 128]


pytestmark = pytest.mark.usefixtures("restore_isa")  # conftest.py: every test may switch the ISA


def quantize_reference(x):
    """quantize_per_token's formula in torch: scale = absmax / 127, q = round_half_even(x * (127 / absmax))."""
    x = x.float()
    absmax = x.abs().amax(dim=1)
    # A tensor / tensor division: torch turns `scalar / tensor` into a reciprocal and a multiply (not IEEE).
    inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, torch.zeros_like(absmax))
    return torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8), absmax / 127.0


# --- activation quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 7), (3, 300), (16, 64), (128, 1000)])
def test_quantize_per_token(isa, dtype, m, k):
    _C.set_cpu_isa(isa)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(dtype)
    x[0, : k // 2] = 0  # a half-zero row
    if m > 1:
        x[1] = 0        # an all-zero row: scale 0, q 0
    q, scales = ops.quantize_per_token(x)
    q_ref, s_ref = quantize_reference(x)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    mismatch = (q != q_ref).nonzero()
    assert len(mismatch) == 0, f"q differs at {mismatch[:5].tolist()}: {q[tuple(mismatch[0])]} vs {q_ref[tuple(mismatch[0])]}"
    assert torch.equal(scales, s_ref)
    assert q.min() >= -127


# --- W8A8 ------------------------------------------------------------------------------------------------

def int8_reference(x_q, x_scales, w, w_scales, bias):
    acc = linear(x_q, w)  # exact: |acc| < 2^53
    y = acc * x_scales.double()[:, None] * w_scales.double()[None, :]
    mag = y.abs()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,with_bias", [(300, 37, True), (64, 16, False), (513, 5, False), (1024, 50, True),
                                           (2309, 19, False)])  # 2309: K in three chunks of the AVX2 kernel
def test_int8_gemm(isa, m, out_dtype, k, n, with_bias):
    _C.set_cpu_isa(isa)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # -128 is fine in the weights
    x_scales, w_scales = torch.rand(m) * 0.01, torch.rand(n) * 0.01
    bias = torch.randn(n) if with_bias else None
    y = _int8_gemm(x_q, x_scales, w, w_scales, bias, out_dtype)
    ref, mag = int8_reference(x_q, x_scales, w, w_scales, bias)
    tol = 3 * EPS[torch.float32] * mag + (EPS[out_dtype] * ref.abs() if out_dtype != torch.float32 else 0) + 1e-30
    assert_close(y, ref, atol=tol, name=f"int8_gemm {isa} m={m} k={k} n={n} {out_dtype}")


@pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")
@pytest.mark.parametrize("m", [1, 5, 128])
@pytest.mark.parametrize("k", [777, 2309])
def test_int8_avx2_matches_scalar_exactly(m, k):
    # Exact int32 sums and the same float epilogue: the two kernels agree bit for bit.
    x = torch.randn(m, k)
    w_q, w_s = quantize_int8_per_channel(torch.randn(41, k))
    bias = torch.randn(41)
    out = {}
    for isa in ("scalar", "avx2"):
        _C.set_cpu_isa(isa)
        out[isa] = ops.int8_linear(x, w_q, w_s, bias)
    assert torch.equal(out["scalar"], out["avx2"]), (out["scalar"] - out["avx2"]).abs().max()


@pytest.mark.parametrize("device,isa,dtype,shape", per_kernel(
    cpu=[(dtype, (2, 3, 200)) for dtype in (torch.float32, torch.bfloat16)],
    # K % 16 == 0 takes the CUDA kernels' 16-byte loads, other K their byte loads.
    cuda=[(dtype, (m, 1024 if m % 2 == 0 else 1000)) for dtype in (torch.float16, torch.bfloat16)
          for m in (1, 2, 3, 16, 128, 300)]))
def test_int8_linear_end_to_end(device, isa, dtype, shape):
    # int8_linear = quantize_per_token + int8 GEMM; leading dimensions are kept.
    use_isa(isa)
    k, n = shape[-1], 24 if device == "cpu" else 200
    x = torch.randn(shape).to(dtype)
    w_q, w_s = quantize_int8_per_channel(torch.randn(n, k))
    bias = torch.randn(n)
    x_q, x_s = quantize_reference(x.reshape(-1, k))
    q, s = ops.quantize_per_token(x.reshape(-1, k).to(device))
    assert torch.equal(q.cpu(), x_q) and torch.equal(s.cpu(), x_s)
    y = ops.int8_linear(x.to(device), w_q.to(device), w_s.to(device), bias.to(device)).cpu()
    assert y.shape == shape[:-1] + (n,) and y.dtype == dtype
    ref, mag = int8_reference(x_q, x_s, w_q, w_s, bias)
    tol = 3 * EPS[torch.float32] * mag + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    assert_close(y.reshape(-1, n), ref, atol=tol, name=f"int8_linear {device} {isa} {shape} {dtype}")


@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                       cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_nan_activation_rows_propagate(device, isa, dtype):
    # A NaN anywhere in a row (the AVX2 quantizer's vector part, its tail) makes the row's scale NaN, as
    # absmax / 127 is in float arithmetic, and so every output of the row; the other rows are untouched.
    use_isa(isa)
    m, k, n = 4, 300, 24  # 300: 37 vectors of 8 and a tail of 4
    x = torch.randn(m, k).to(dtype)
    x[1, 17] = float("nan")
    x[2, k - 1] = float("nan")
    x_q, x_s = quantize_reference(x)
    q, s = ops.quantize_per_token(x.to(device))
    assert_equal(s.cpu(), x_s, name=f"scales {device} {isa} {dtype}", nan_equal=True)
    assert s[1:3].isnan().all()
    finite = [0, 3]
    assert torch.equal(q.cpu()[finite], x_q[finite])
    w_q, w_s = quantize_int8_per_channel(torch.randn(n, k))
    bias = torch.randn(n)
    y = ops.int8_linear(x.to(device), w_q.to(device), w_s.to(device), bias.to(device)).cpu()
    assert y[1:3].isnan().all(), y[1:3]
    ref, mag = int8_reference(x_q[finite], x_s[finite], w_q, w_s, bias)
    tol = 3 * EPS[torch.float32] * mag + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    assert_close(y[finite], ref, atol=tol, name=f"int8_linear {device} {isa} {dtype}, the rows without NaN")


# --- W4A16 -----------------------------------------------------------------------------------------------

def random_int4(n, k, group, symmetric):
    """Random packed weights, scales (some negative, as the symmetric quantizer writes) and zero points."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = torch.randn(n, k // group) * 0.1
    zeros = None if symmetric else torch.randint(0, 16, (n, k // group)).float()
    return packed, scales, zeros


def int4_reference(x, packed, scales, zeros, group, bias):
    w = dequantize_int4(packed, scales, zeros, group, torch.float64)
    u = unpack_int4(packed, group).double().reshape(w.shape[0], -1, group)
    z = 8.0 if zeros is None else zeros.double()[:, :, None]
    # Magnitude of the terms either kernel adds: (u - z) s x directly or s (u x - z x) (the AVX2 GEMV).
    w_mag = ((u + z) * scales.double().abs()[:, :, None]).reshape(w.shape)
    return linear(x, w, bias), linear(x.abs(), w_mag, None if bias is None else bias.abs())


@pytest.mark.parametrize("device,isa,dtype,m,symmetric,group", per_kernel(
    cpu=[(dtype, m, symmetric, group) for dtype in (torch.float32, torch.bfloat16) for m in MS
         for symmetric in (True, False) for group in (32, 64, 128)],
    cuda=[(dtype, m, symmetric, group) for dtype in (torch.float16, torch.bfloat16) for m in (1, 3, 8, 16, 128, 300)
          for symmetric in (True, False) for group in (32, 128)]))
def test_int4_gemm(device, isa, dtype, m, symmetric, group):
    use_isa(isa)
    if device == "cpu":
        k, n, with_bias = 3 * group if m > 3 else 9 * group, 37, (m + group) % 3 != 0
    else:
        k, n, with_bias = 9 * group, 200, True
    x = torch.randn(m, k).to(dtype)
    packed, scales, zeros = random_int4(n, k, group, symmetric)
    bias = torch.randn(n) if with_bias else None
    y = ops.int4_linear(*(None if t is None else t.to(device) for t in (x, packed, scales, zeros)), group,
                        None if bias is None else bias.to(device)).cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    ref, mag = int4_reference(x, packed, scales, zeros, group, bias)
    tol = 4 * math.sqrt(k) * EPS[torch.float32] * mag + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    if device == "cuda":  # the tensor-core path rounds the dequantized weights to x's dtype before multiplying
        tol = tol + 2 * EPS[dtype] * mag
    assert_close(y, ref, atol=tol, name=f"int4 {device} {isa} m={m} k={k} group={group} sym={symmetric} {dtype}")


@pytest.mark.parametrize("m", [1, 2, 4, 5, 33])
def test_int4_paths_agree(m):
    # The GEMV (M <= 4) and GEMM (M > 4) paths and the scalar kernel on larger K (several K chunks).
    k, n, group = 1536, 70, 64
    x = torch.randn(m, k)
    packed, scales, zeros = random_int4(n, k, group, False)
    ref, mag = int4_reference(x, packed, scales, zeros, group, None)
    for isa in ("scalar", "avx2") if _C.cpu_isa_supported("avx2") else ("scalar",):
        _C.set_cpu_isa(isa)
        y = ops.int4_linear(x, packed, scales, zeros, group)
        assert_close(y, ref, atol=4 * math.sqrt(k) * EPS[torch.float32] * mag, name=f"int4 {isa} m={m}")


@pytest.mark.parametrize("threads", [1, 3])
def test_int4_gemv_with_flush_denormal(threads):
    # On AMD cores the AVX2 GEMV reads weights as subnormal floats; with denormals-are-zero on (as
    # torch.set_flush_denormal sets it in the calling thread, which runs ranges too) they must not read as 0.
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    saved = ops.num_threads()
    try:
        ops.set_num_threads(threads)
        for m, group in [(1, 128), (2, 32), (4, 64)]:
            x = torch.randn(m, 8 * group)
            packed, scales, zeros = random_int4(45, 8 * group, group, m % 2 == 0)
            y = ops.int4_linear(x, packed, scales, zeros, group)
            ref, mag = int4_reference(x, packed, scales, zeros, group, None)
            assert_close(y, ref, atol=4 * math.sqrt(x.shape[1]) * EPS[torch.float32] * mag, name=f"int4 flush m={m}")
    finally:
        torch.set_flush_denormal(False)
        ops.set_num_threads(saved)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("big", [2.0**36, 3e30])
def test_int4_gemv_huge_and_nan_activations(isa, big):
    # |x| >= 2^36 takes the GEMV's other variant (the subnormal one scales x by up to 2^90); NaN propagates.
    _C.set_cpu_isa(isa)
    k, group = 512, 64
    x = torch.randn(3, k)
    x[0, 5] = big
    x[1, 100] = -big / 3
    packed, scales, zeros = random_int4(21, k, group, False)
    y = ops.int4_linear(x, packed, scales, zeros, group)
    ref, mag = int4_reference(x, packed, scales, zeros, group, None)
    assert_close(y, ref, atol=4 * math.sqrt(k) * EPS[torch.float32] * mag, name=f"int4 {isa} |x| = {big}")
    x[2, 7] = float("nan")
    y = ops.int4_linear(x, packed, scales, zeros, group)
    assert y[2].isnan().all() and not y[:2].isnan().any()


# --- argument checks ---------------------------------------------------------------------------------------

def test_bad_arguments():
    x = torch.randn(2, 256)
    packed, scales, zeros = random_int4(8, 256, 128, False)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_linear(x, packed, scales, zeros, group_size=48)
    with pytest.raises(ValueError, match="scales"):
        ops.int4_linear(x, packed, scales[:, :1], zeros, group_size=128)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_linear(torch.randn(2, 96), torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 1), group_size=64)
    with pytest.raises(ValueError, match="x"):
        ops.int4_linear(x.half(), packed, scales, zeros, group_size=128)
    with pytest.raises(ValueError, match="x"):
        ops.int4_linear(torch.randn(2, 128), packed, scales, zeros, group_size=128)
    with pytest.raises(ValueError, match="zeros"):
        ops.int4_linear(x, packed, scales, zeros[:, :1], group_size=128)
    w_q, w_s = quantize_int8_per_channel(torch.randn(8, 256))
    with pytest.raises(ValueError, match="w_scales"):
        ops.int8_linear(x, w_q, w_s[:4])
    with pytest.raises(ValueError, match="bias"):
        ops.int8_linear(x, w_q, w_s, torch.zeros(3))
    with pytest.raises(ValueError, match="w_int8"):
        ops.int8_linear(x, w_q.float(), w_s)
    with pytest.raises(ValueError, match="x"):
        ops.int8_linear(torch.randn(2, 255), w_q, w_s)
    # The native checks, reached directly: -128 in x, wrong dtypes and shapes.
    out = torch.empty(2, 8)
    bad = torch.full((2, 256), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"x: values must lie in \[-127, 127\]"):
        _C.int8_gemm(bad, torch.ones(2), w_q, w_s, None, out)
    with pytest.raises(ValueError, match="x_scales"):
        _C.int8_gemm(bad.clamp(-127, 127), torch.ones(3), w_q, w_s, None, out)
    with pytest.raises(ValueError, match="out"):
        _C.int8_gemm(bad.clamp(-127, 127), torch.ones(2), w_q, w_s, None, torch.empty(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="w"):
        _C.int4_gemm(x, packed.view(torch.int8), scales, None, None, out, 128)
    with pytest.raises(ValueError, match="q"):
        _C.quantize_per_token(x, torch.empty(2, 255, dtype=torch.int8), torch.empty(2))


# --- quantizers ----------------------------------------------------------------------------------------------

def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_int8_per_channel_error():
    w = torch.randn(64, 1024) * torch.rand(64, 1) * 3
    q, s = quantize_int8_per_channel(w)
    w_hat = q.double() * s.double()[:, None]
    # Round to nearest: every element within half a step of its channel, plus the float32 rounding of w / s
    # that the rounding sees (|w / s| <= 127, so at most 127 * 2^-24 of a step).
    assert ((w_hat - w.double()).abs() <= s.double()[:, None] * (0.5 + 127 * 2.0**-24)).all()
    # Gaussian rows of 1024: absmax ~ 3.2-3.9 sigma, so the error (step / sqrt 12) is ~0.8-1% of the RMS.
    assert rel_rms(w_hat, w) < 0.012


# Relative RMS error on Gaussian weights [128, 1024] with min-max scales: about step / sqrt(12) over the RMS
# (symmetric step = absmax / 8, asymmetric = range / 15). Measured over 5 seeds (spread < 1%): symmetric
# 0.086, 0.095, 0.103 and asymmetric 0.081, 0.091, 0.101 for groups of 32, 64, 128; the bounds are ~10% above.
INT4_BOUND = {(True, 32): 0.095, (True, 64): 0.105, (True, 128): 0.115,
              (False, 32): 0.09, (False, 64): 0.10, (False, 128): 0.11}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantizer_error(symmetric, group):
    w = torch.randn(128, 1024)
    packed, s, z = quantize_int4(w, group, symmetric)
    w_hat = dequantize_int4(packed, s, z, group, torch.float64)
    # Without clipping every element is within one step of its value (half a step, but for the clamped end).
    step = s.double().abs().repeat_interleave(group, dim=1)
    assert ((w_hat - w.double()).abs() <= step * (1 + 1e-6)).all()
    err = rel_rms(w_hat, w)
    assert err < INT4_BOUND[(symmetric, group)], f"relative RMS {err:.4f}"
    packed_c, s_c, z_c = quantize_int4(w, group, symmetric, search_clip=True)
    w_clip = dequantize_int4(packed_c, s_c, z_c, group, torch.float64)
    # The search includes ratio 1.0 and keeps the best per group: no group gets worse.
    per_group = lambda v: (v - w.double()).square().reshape(128, -1, group).sum(-1)  # noqa: E731
    assert (per_group(w_clip) <= per_group(w_hat) * (1 + 1e-9) + 1e-12).all()
    assert rel_rms(w_clip, w) < err


def test_quantizer_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 128), 16)
    with pytest.raises(ValueError, match="w"):
        quantize_int8_per_channel(torch.randn(4))
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(96, 8, group_size=64)


# --- modules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_module(dtype):
    linear = torch.nn.Linear(512, 96)
    x = torch.randn(3, 7, 512)
    mod = Int8Linear.from_float(linear)
    y, y_ref = mod(x.to(dtype)), linear(x).detach()
    # The output error comes from the weights' and the activations' rounding (~1% RMS each for Gaussian data,
    # independent); allow their sum, plus bf16's rounding of x and y.
    w_err = rel_rms(mod.weight.double() * mod.weight_scales.double()[:, None], linear.weight.detach())
    x_q, x_s = quantize_reference(x.to(dtype).reshape(-1, 512))
    x_err = rel_rms(x_q.double() * x_s.double()[:, None], x.reshape(-1, 512))
    bound = 1.5 * (w_err + x_err) + (2 * EPS[dtype] if dtype != torch.float32 else 0)
    err = rel_rms(y.float() - linear.bias.detach(), y_ref - linear.bias.detach())
    assert err < bound, f"relative RMS {err:.4f} > {bound:.4f}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 9])
def test_int4_linear_module(symmetric, m):
    linear = torch.nn.Linear(256, 48)
    x = torch.randn(m, 256)
    mod = Int4Linear.from_float(linear, group_size=64, symmetric=symmetric, search_clip=True)
    w_hat = dequantize_int4(mod.weight, mod.scales, mod.zeros, 64, torch.float64)
    # With Gaussian x, the output error relative to x @ W.T is about the weights' relative error.
    w_err = rel_rms(w_hat, linear.weight.detach())
    y, y_ref = mod(x), linear(x).detach()
    err = rel_rms(y - linear.bias.detach(), y_ref - linear.bias.detach())
    assert err < 2.0 * w_err, f"relative RMS {err:.4f} vs weight error {w_err:.4f}"
    ref, mag = int4_reference(x, mod.weight, mod.scales, mod.zeros, 64, mod.bias)
    assert_close(y, ref, atol=4 * math.sqrt(256) * EPS[torch.float32] * mag,
                 name="Int4Linear vs its dequantized weights")


# --- registration, CUDA alignment, empty shapes -------------------------------------------------------------

def test_custom_ops_register_fake():
    # The torch.library ops (schemas, fake implementations for torch.compile) pass torch's own checks.
    x = torch.randn(5, 256)
    w_q, w_s = quantize_int8_per_channel(torch.randn(24, 256))
    x_q, x_s = ops.quantize_per_token(x)
    packed, scales, zeros = random_int4(24, 256, 64, False)
    torch.library.opcheck(torch.ops.flashlm.quantize_per_token.default, (x,))
    torch.library.opcheck(torch.ops.flashlm.int8_gemm.default, (x_q, x_s, w_q, w_s, torch.randn(24), torch.float32))
    torch.library.opcheck(torch.ops.flashlm.int4_gemm.default, (x, packed, scales, zeros, None, 64))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 40])
def test_int4_cuda_unaligned(m):
    # x and w one element off 16-byte alignment: the kernels' byte-load variants.
    k, n, group = 256, 72, 64
    x = torch.randn(m * k + 1).to(torch.float16)[1:].view(m, k)
    packed, scales, zeros = random_int4(n, k, group, False)
    w_buf = torch.empty(n * k // 2 + 1, dtype=torch.uint8, device="cuda")
    w = w_buf[1:].view(n, k // 2)
    w.copy_(packed)
    x_buf = torch.empty(m * k + 1, dtype=torch.float16, device="cuda")
    x_cuda = x_buf[1:].view(m, k)
    x_cuda.copy_(x)
    y = ops.int4_linear(x_cuda, w, scales.cuda(), zeros.cuda(), group).cpu()
    ref, mag = int4_reference(x, packed, scales, zeros, group, None)
    tol = 4 * math.sqrt(k) * EPS[torch.float32] * mag + 2 * EPS[torch.float16] * mag + EPS[torch.float16] * ref.abs()
    assert_close(y, ref, atol=tol, name=f"int4 cuda unaligned m={m}")


@pytest.mark.parametrize("isa", ISAS)
def test_empty_shapes(isa):
    # No rows: an empty output. K = 0: every dot product is 0, so y is the bias.
    _C.set_cpu_isa(isa)
    bias = torch.randn(3)
    assert ops.int8_linear(torch.randn(0, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)).shape == (0, 3)
    assert ops.int4_linear(torch.randn(0, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 2),
                           group_size=32).shape == (0, 3)
    y8 = ops.int8_linear(torch.randn(2, 0), torch.zeros(3, 0, dtype=torch.int8), torch.ones(3), bias)
    y4 = ops.int4_linear(torch.randn(2, 0), torch.zeros(3, 0, dtype=torch.uint8), torch.ones(3, 0), None, 32, bias)
    assert torch.equal(y8, bias.expand(2, 3)) and torch.equal(y4, bias.expand(2, 3))
    q, s = ops.quantize_per_token(torch.randn(4, 0))
    assert q.shape == (4, 0) and torch.equal(s, torch.zeros(4))
