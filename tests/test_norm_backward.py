"""RMSNorm's training path: rms_norm_train (the forward kernel as a differentiable op) and its backward kernel
(flashlm.ops.norm.rms_norm_backward).

References: the formula's gradients in float64 through torch's autograd (f32 inputs: a few f32 ulp of the
gradients' scale); for bf16, torch's autograd of HF's formula run in bf16 as the baseline of
compare.assert_close_to_reference (at most twice its error plus a floor); the scalar kernel bit for bit (AVX2);
a weight gradient that does not depend on the thread count; opcheck for the registrations. CUDA cases are marked
and skipped without a GPU.
"""

import pytest
import torch

import flashlm.ops as ops
from compare import assert_close, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.ops.norm import rms_norm, rms_norm_backward, rms_norm_train

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EPS = 1e-6
EPS32 = torch.finfo(torch.float32).eps


def inputs(rows, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=gen) * 2).to(dtype)
    w = (1 + torch.randn(d, generator=gen) * 0.5).to(dtype)
    dout = torch.randn(rows, d, generator=gen).to(dtype)
    return x, w, dout


def formula(x, w, eps=EPS):
    """HF's LlamaRMSNorm in x's dtype (statistics in f32), or float64 for float64 inputs."""
    h = x.float() if x.dtype != torch.float64 else x
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def grads(x, w, dout, dtype=None):
    """(dx, dw) of formula(x, w) through torch's autograd, the inputs cast to dtype first (None: as given)."""
    x, w = (t.to(dtype or t.dtype).detach().requires_grad_() for t in (x, w))
    formula(x, w).backward(dout.to(dtype or dout.dtype))
    return x.grad, w.grad


@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("device,isa,d", per_kernel(cpu=[(1,), (7,), (64,), (4097,)], cuda=[(7,), (64,), (4097,)]))
def test_float32_against_float64(device, isa, d, rows, restore_isa):
    use_isa(isa)
    x, w, dout = inputs(rows, d, seed=rows * 7 + d)
    dx, dw = rms_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)
    assert dx.dtype == dw.dtype == torch.float32 and dx.shape == x.shape and dw.shape == w.shape
    want_dx, want_dw = grads(x, w, dout, torch.float64)
    # dx = inv (g - y c), g = dout w, c = mean(g y): f32 roundings of the two terms, which may cancel (at d = 1
    # they do, to eps / (x^2 + eps)), and of c's sum over d.
    x64 = x.double()
    inv = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    g, y = dout.double() * w.double(), x64 * inv
    terms = inv * (g.abs() + y.abs() * (g * y).abs().mean(-1, keepdim=True) * d ** 0.5)
    assert_close(dx.cpu(), want_dx, atol=8 * EPS32 * terms, name=f"dx d={d}")
    assert_close(dw.cpu(), want_dw, rtol=8 * EPS32, rtol_of_max=4 * EPS32 * rows ** 0.5, name=f"dweight d={d}")


@pytest.mark.parametrize("device,isa,dtype,weight_dtype", per_kernel(
    cpu=[(torch.bfloat16, torch.bfloat16)], cuda=[(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]))
def test_16_bit_against_float64_and_torch(device, isa, dtype, weight_dtype, restore_isa):
    use_isa(isa)
    x, w, dout = inputs(65, 300, dtype, seed=4)
    w = w.to(weight_dtype)
    dx, dw = rms_norm_backward(x.to(device), w.to(device), dout.to(device), EPS)
    assert dx.dtype == dtype and dw.dtype == weight_dtype
    want_dx, want_dw = grads(x, w, dout, torch.float64)
    base_dx, base_dw = grads(x, w, dout)
    assert_close_to_reference(dx.cpu(), want_dx, base_dx, name="dx")
    assert_close_to_reference(dw.cpu(), want_dw, base_dw, name="dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 9, 31, 33, 256, 1000])
def test_avx2_equals_scalar_bit_for_bit(dtype, d, restore_isa):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 on this CPU")
    x, w, dout = inputs(37, d, dtype, seed=d)
    outs = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs[isa] = rms_norm_backward(x, w, dout, EPS)
    assert_equal(outs["avx2"][0], outs["scalar"][0], name="dx: AVX2 vs scalar")
    assert_equal(outs["avx2"][1], outs["scalar"][1], name="dweight: AVX2 vs scalar")


def test_weight_gradient_does_not_depend_on_threads():
    x, w, dout = inputs(2000, 96, seed=9)
    saved = ops.num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            results.append(rms_norm_backward(x, w, dout, EPS))
    finally:
        ops.set_num_threads(saved)
    for dx, dw in results[1:]:
        assert_equal(dx, results[0][0], name="dx")
        assert_equal(dw, results[0][1], name="dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_is_the_kernels(dtype):
    x, w, dout = inputs(2 * 5, 48, dtype, seed=3)
    x3, dout3 = x.view(2, 5, 48), dout.view(2, 5, 48)
    xg, wg = x3.clone().requires_grad_(), w.clone().requires_grad_()
    out = rms_norm_train(xg, wg, EPS)
    assert_equal(out, rms_norm(x3, w, EPS), name="forward")
    out.backward(dout3)
    dx, dw = rms_norm_backward(x, w, dout, EPS)
    assert_equal(xg.grad, dx.view(2, 5, 48), name="dx")
    assert_equal(wg.grad, dw, name="dweight")
    xg.grad = None  # a frozen weight: no gradient for it
    rms_norm_train(xg, w, EPS).backward(dout3)
    assert_equal(xg.grad, dx.view(2, 5, 48), name="dx, frozen weight")


def test_opcheck():
    x, w, dout = inputs(6, 40, seed=1)
    torch.library.opcheck(torch.ops.flashlm.rms_norm_train, (x.requires_grad_(), w.requires_grad_(), EPS))
    torch.library.opcheck(torch.ops.flashlm.rms_norm_backward, (x.detach(), w.detach(), dout, EPS))


def test_bad_input_names_the_argument():
    x, w, dout = inputs(4, 8)
    with pytest.raises(ValueError, match=r"dout: shape \(4, 7\) differs from x's \(4, 8\)"):
        rms_norm_backward(x, w, dout[:, :7], EPS)
    with pytest.raises(ValueError, match="dout: dtype BF16 differs from x's F32"):
        rms_norm_backward(x, w, dout.bfloat16(), EPS)
    with pytest.raises(ValueError, match=r"weight: expected shape \[d\] = \[8\]"):
        rms_norm_backward(x, w[:7], dout, EPS)
    with pytest.raises(ValueError, match="eps: must be finite"):
        rms_norm_backward(x, w, dout, float("nan"))
    with pytest.raises(TypeError, match="dout: expected a torch.Tensor"):
        rms_norm_backward(x, w, None, EPS)
