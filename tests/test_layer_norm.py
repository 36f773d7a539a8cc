"""LayerNorm's native kernels (flashlm.ops.layer_norm: the forward as a differentiable op, and its backward).

References: torch's F.layer_norm and its autograd in float64 on the same (rounded) inputs, within bounds
derived from the f32 sums (a row sum of d terms in 32 lanes: at most d/32 + 8 roundings of the sum's terms'
magnitude) and the element-wise steps (a few f32 ulp); for bf16, torch's layer_norm run in bf16 as the baseline
of compare.assert_close_to_reference; the scalar kernels bit for bit (AVX2); weight and bias gradients that do
not depend on the thread count; opcheck for the registrations. CUDA cases are marked and skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import flashlm.ops as ops
from compare import assert_close, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.ops.layer_norm import layer_norm, layer_norm_backward, layer_norm_with_stats

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EPS = 1e-5
EPS32 = torch.finfo(torch.float32).eps


def inputs(rows, d, dtype=torch.float32, seed=0, offset=0.5, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(rows, d, generator=gen) * scale).to(dtype)
    w = (1 + torch.randn(d, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(d, generator=gen) * 0.5).to(dtype)
    dout = torch.randn(rows, d, generator=gen).to(dtype)
    return x, w, b, dout


def reference(x, w, b, dout, dtype=torch.float64):
    """(out, dx, dweight, dbias) of torch's layer_norm and autograd, the inputs cast to dtype first."""
    x, w, b = (t.to(dtype).detach().requires_grad_() for t in (x, w, b))
    out = F.layer_norm(x, x.shape[-1:], w, b, EPS)
    out.backward(dout.to(dtype))
    return out.detach(), x.grad, w.grad, b.grad


def row_sum_roundings(d):
    """How many f32 roundings one lane of a row sum can take, times a margin of 2 for the tree of lanes."""
    return 2 * (d // 32 + 8)


def stats(x):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + EPS)
    return mean, rstd


@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("device,isa,d", per_kernel(cpu=[(1,), (7,), (768,), (1000,)], cuda=[(7,), (768,), (1000,)]))
def test_float32_forward_against_float64(device, isa, d, rows, restore_isa):
    use_isa(isa)
    x, w, b, _ = inputs(rows, d, seed=rows * 7 + d)
    out = layer_norm(x.to(device), w.to(device), b.to(device), EPS)
    assert out.dtype == torch.float32 and out.shape == x.shape
    want = reference(x, w, b, torch.zeros_like(x))[0]
    # The mean is off by up to k eps mean|x| (k: row_sum_roundings), shifting xhat by that times rstd; the
    # variance by k eps relative (and xhat by half that); then four element-wise roundings.
    mean, rstd = stats(x)
    k = row_sum_roundings(d)
    xhat_w = ((x.double() - mean) * rstd * w.double()).abs()
    err_mean = k * EPS32 * x.double().abs().mean(-1, keepdim=True)
    atol = w.double().abs() * rstd * err_mean + xhat_w * k * EPS32 + 4 * EPS32 * (xhat_w + b.double().abs())
    assert_close(out.cpu(), want, atol=atol, name=f"out d={d}")


@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("device,isa,d", per_kernel(cpu=[(1,), (7,), (768,), (1000,)], cuda=[(7,), (768,), (1000,)]))
def test_float32_backward_against_float64(device, isa, d, rows, restore_isa):
    use_isa(isa)
    x, w, b, dout = inputs(rows, d, seed=rows * 5 + d)
    dx, dw, db = layer_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)
    assert dx.dtype == dw.dtype == db.dtype == torch.float32 and dx.shape == x.shape and dw.shape == db.shape == w.shape
    _, want_dx, want_dw, want_db = reference(x, w, b, dout)
    # dx = rstd ((g - c1) - xhat c2), g = dout w, c1 = mean(g), c2 = mean(g xhat): the sums' roundings (k eps
    # of their terms' magnitudes), xhat's (as in the forward), and the element-wise steps, whose terms may
    # cancel (at d = 1 they do: dx = 0).
    mean, rstd = stats(x)
    k = row_sum_roundings(d)
    x64, g = x.double(), dout.double() * w.double()
    xhat = (x64 - mean) * rstd
    xhat_err = rstd * k * EPS32 * x64.abs().mean(-1, keepdim=True) + k * EPS32 * xhat.abs()
    gx = (g * xhat).abs().mean(-1, keepdim=True)
    terms = g.abs() + g.abs().mean(-1, keepdim=True) + xhat.abs() * gx
    atol = rstd * (4 * k * EPS32 * terms + xhat_err * gx + xhat.abs() * g.abs().mean(-1, keepdim=True) * xhat_err)
    assert_close(dx.cpu(), want_dx, atol=atol, name=f"dx d={d}")
    # The sums over rows: blocks of >= 16 rows added in order, each term off by xhat's error.
    n = rows + 16
    dw_terms = (dout.double() * xhat).abs().sum(0)
    assert_close(dw.cpu(), want_dw, atol=n * EPS32 * dw_terms + (dout.double().abs() * xhat_err).sum(0),
                 name=f"dweight d={d}")
    assert_close(db.cpu(), want_db, atol=n * EPS32 * dout.double().abs().sum(0), name=f"dbias d={d}")


@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_large_offset_keeps_the_variance(device, isa, restore_isa):
    """x = 1000 + N(0, 1): the two-pass variance keeps its digits (E[x^2] - mean^2 would lose all but ~1 of them
    in f32), so out stays within the mean's rounding of the reference."""
    use_isa(isa)
    x, w, b, dout = inputs(64, 768, seed=11, offset=1000.0, scale=1.0)
    out = layer_norm(x.to(device), w.to(device), b.to(device), EPS).cpu()
    dx = layer_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)[0].cpu()
    want, want_dx, _, _ = reference(x, w, b, dout)
    mean, rstd = stats(x)
    k = row_sum_roundings(768)
    xhat_err = rstd * k * EPS32 * x.double().abs().mean(-1, keepdim=True)  # ~ 1000 k eps: the mean's rounding
    assert_close(out, want, atol=w.double().abs() * (xhat_err + 8 * EPS32) + 4 * EPS32 * b.double().abs(),
                 rtol=8 * EPS32, name="out")
    g = dout.double() * w.double()
    assert_close(dx, want_dx, atol=rstd * 8 * xhat_err * (g.abs().max() + 1), rtol=8 * EPS32, name="dx")


@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_extremes(device, isa, restore_isa):
    """A constant row normalises to the bias exactly; a row with inf or NaN gives NaN (no crash), other rows
    are untouched by it."""
    use_isa(isa)
    x, w, b, dout = inputs(3, 33, seed=2)
    x[0] = 7.25
    x[1, 5] = float("inf")
    out = layer_norm(x.to(device), w.to(device), b.to(device), EPS).cpu()
    assert_equal(out[0], b, name="constant row")
    assert torch.isnan(out[1]).all()
    want = reference(x[2:], w, b, dout[2:])[0]
    assert_close(out[2:], want, rtol=64 * EPS32, atol=64 * EPS32, name="finite row")
    dx, dw, db = layer_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)
    assert torch.isnan(dx[1].cpu()).all() and torch.isnan(dw.cpu()).all()
    assert_close(db.cpu(), dout.double().sum(0), rtol=4 * EPS32, name="dbias")


@pytest.mark.parametrize("device,isa,dtype,weight_dtype", per_kernel(
    cpu=[(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    cuda=[(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]))
def test_16_bit_against_float64_and_torch(device, isa, dtype, weight_dtype, restore_isa):
    use_isa(isa)
    x, w, b, dout = inputs(65, 300, dtype, seed=4)
    w, b = w.to(weight_dtype), b.to(weight_dtype)
    out = layer_norm(x.to(device), w.to(device), b.to(device), EPS)
    dx, dw, db = layer_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)
    assert out.dtype == dx.dtype == dtype and dw.dtype == db.dtype == weight_dtype
    want = reference(x, w, b, dout)
    base = _torch_in_dtypes(x, w, b, dout)
    for name, got, ref, bl in zip(("out", "dx", "dweight", "dbias"), (out, dx, dw, db), want, base):
        assert_close_to_reference(got.cpu(), ref, bl, name=name)


def _torch_in_dtypes(x, w, b, dout):
    """torch's layer_norm and autograd in the inputs' own dtypes (f32 statistics, 16-bit results)."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = F.layer_norm(x, x.shape[-1:], w, b, EPS)
    out.backward(dout)
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("d", [1, 7, 31, 33, 256, 768, 1000])
def test_avx2_equals_scalar_bit_for_bit(dtype, weight_dtype, d, restore_isa):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 on this CPU")
    x, w, b, dout = inputs(37, d, dtype, seed=d)
    w, b = w.to(weight_dtype), b.to(weight_dtype)
    outs = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        out, mean, rstd = layer_norm_with_stats(x, w, b, EPS)
        saved = layer_norm_backward(x, w, dout, EPS, mean, rstd)
        recomputed = layer_norm_backward(x, w, dout, EPS)
        for name, a, r in zip(("dx", "dweight", "dbias"), saved, recomputed):
            assert_equal(a, r, name=f"{isa} {name}: the forward's statistics vs recomputed")
        outs[isa] = (out, mean, rstd, layer_norm(x, w, None, EPS), *saved)
    names = ("out", "mean", "rstd", "out without bias", "dx", "dweight", "dbias")
    for name, a, s in zip(names, outs["avx2"], outs["scalar"]):
        assert_equal(a, s, name=f"{name}: AVX2 vs scalar")


def test_gradients_do_not_depend_on_threads():
    x, w, _, dout = inputs(2000, 96, seed=9)
    saved = ops.num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            results.append(layer_norm_backward(x, w, dout, EPS))
    finally:
        ops.set_num_threads(saved)
    for got in results[1:]:
        for name, a, want in zip(("dx", "dweight", "dbias"), got, results[0]):
            assert_equal(a, want, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_is_the_kernels(dtype):
    x, w, b, dout = inputs(2 * 5, 48, dtype, seed=3)
    x3, dout3 = x.view(2, 5, 48), dout.view(2, 5, 48)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x3, w, b))
    out = layer_norm(xg, wg, bg, EPS)
    with torch.no_grad():
        assert_equal(out, layer_norm(x3, w, b, EPS), name="forward")
    out.backward(dout3)
    dx, dw, db = layer_norm_backward(x, w, dout, EPS)
    assert_equal(xg.grad, dx.view(2, 5, 48), name="dx")
    assert_equal(wg.grad, dw, name="dweight")
    assert_equal(bg.grad, db, name="dbias")
    xg.grad = None  # frozen weight and no bias: a gradient for x alone
    layer_norm(xg, w, None, EPS).backward(dout3)
    assert_equal(xg.grad, dx.view(2, 5, 48), name="dx, frozen weight")


def test_opcheck():
    x, w, b, dout = inputs(6, 40, seed=1)
    torch.library.opcheck(torch.ops.flashlm.layer_norm,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), EPS))
    torch.library.opcheck(torch.ops.flashlm.layer_norm, (x.detach(), w.detach(), None, EPS))
    torch.library.opcheck(torch.ops.flashlm.layer_norm_backward, (x.detach(), w.detach(), dout, EPS))
    _, mean, rstd = layer_norm_with_stats(x.detach(), w.detach(), b.detach(), EPS)
    torch.library.opcheck(torch.ops.flashlm.layer_norm_backward, (x.detach(), w.detach(), dout, EPS, mean, rstd))


def test_bad_input_names_the_argument():
    x, w, b, dout = inputs(4, 8)
    with pytest.raises(ValueError, match=r"dout: shape \(4, 7\) differs from x's \(4, 8\)"):
        layer_norm_backward(x, w, dout[:, :7], EPS)
    with pytest.raises(ValueError, match="dout: dtype BF16 differs from x's F32"):
        layer_norm_backward(x, w, dout.bfloat16(), EPS)
    with pytest.raises(ValueError, match=r"weight: shape \[7\] differs from x's last dimension \[8\]"):
        layer_norm(x, w[:7], b, EPS)
    with pytest.raises(ValueError, match=r"bias: shape \[7\] differs from weight's \[8\]"):
        layer_norm(x, w, b[:7], EPS)
    with pytest.raises(ValueError, match=r"bias: dtype must be weight's \(F32\), got BF16"):
        layer_norm(x, w, b.bfloat16(), EPS)
    with pytest.raises(ValueError, match=r"weight: dtype must be x's \(BF16\) or F32, got F16"):
        layer_norm(x.bfloat16(), w.half(), None, EPS)
    with pytest.raises(ValueError, match="x: dtype must be F32 or BF16 on the CPU"):
        layer_norm(x.half(), w.half(), None, EPS)
    with pytest.raises(ValueError, match="eps: must be finite"):
        layer_norm(x, w, b, float("nan"))
    with pytest.raises(TypeError, match="eps: expected a number"):
        layer_norm(x, w, b, "1e-5")
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor"):
        layer_norm(x, w, [0.0] * 8, EPS)
    with pytest.raises(TypeError, match="dout: expected a torch.Tensor"):
        layer_norm_backward(x, w, None, EPS)
    _, mean, rstd = layer_norm_with_stats(x, w, b, EPS)
    with pytest.raises(ValueError, match=r"rstd: must be given with mean"):
        layer_norm_backward(x, w, dout, EPS, mean, None)
    with pytest.raises(ValueError, match=r"mean: shape \(3,\) differs from x's rows \(4,\)"):
        layer_norm_backward(x, w, dout, EPS, mean[:3], rstd)
    with pytest.raises(ValueError, match="rstd: dtype must be F32, got BF16"):
        layer_norm_backward(x, w, dout, EPS, mean, rstd.bfloat16())
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        layer_norm(torch.tensor(1.0), w, b, EPS)
