"""The training path's activation kernels: GELU(tanh) forward and backward (flashlm.ops.activation.gelu_tanh,
gelu_tanh_backward) and silu_mul's backward (silu_mul_backward), and their autograd.

References: the formulas in float64 on the same inputs, with bounds derived from the kernels' f32 error (tanh
as 1 - 2 / (1 + exp(2z)) is within a few f32 eps of tanh absolutely, not relatively, so the bounds scale with
|x| where it multiplies); for bf16, torch's own bf16 autograd as the baseline of compare.assert_close_to_reference
(flash-attn's rule: at most twice its error plus a floor); the scalar kernel bit for bit (AVX2); torch.library's
opcheck for the registrations. CUDA cases of the same tests are marked and skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import flashlm.ops as ops
from compare import assert_close, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.ops.activation import gelu_tanh, gelu_tanh_backward, silu_mul, silu_mul_backward

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EPS32 = torch.finfo(torch.float32).eps
SHAPES = [(1,), (7,), (3, 1000), (5, 33, 17), (40000,)]
SPECIAL = [0.0, -0.0, 88.5, -88.5, 1e-30, -1000.0, 1000.0, 30.0, -30.0]


def inputs(shape, n=2, dtype=torch.float32, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    first = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return (first, *(torch.randn(shape, generator=gen).to(dtype) for _ in range(n - 1)))


def gelu_grads_f64(x, dout):
    """(gelu(x), dout * gelu'(x)) in float64 through torch's autograd of its tanh formula."""
    x = x.double().requires_grad_()
    y = F.gelu(x, approximate="tanh")
    y.backward(dout.double())
    return y.detach(), x.grad


def silu_mul_grads_f64(g, u, dout):
    g, u = g.double().requires_grad_(), u.double().requires_grad_()
    (F.silu(g) * u).backward(dout.double())
    return g.grad, u.grad


# ---- against float64 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_gelu_float32_against_float64(device, isa, shape, restore_isa):
    use_isa(isa)
    x, dout = inputs(shape, seed=shape[-1])
    y = gelu_tanh(x.to(device)).cpu()
    dx = gelu_tanh_backward(x.to(device), dout.to(device)).cpu()
    assert y.dtype == dx.dtype == torch.float32 and y.shape == dx.shape == x.shape
    want_y, want_dx = gelu_grads_f64(x, dout)
    # t = tanh(.) within d = 4 eps absolutely: y = x (1 + t) / 2 moves by |x| d / 2, dx by
    # |dout| d (1/2 + |x| a (1 + 3 b x^2)); plus a few roundings of the result.
    d, a, b = 4 * EPS32, 0.7978845608028654, 0.044715
    x64, dout64 = x.double(), dout.double()
    assert_close(y, want_y, atol=x64.abs() * d / 2 + 1e-30, rtol=4 * EPS32, name=f"gelu {shape}")
    slope = 0.5 + x64.abs() * a * (1 + 3 * b * x64 ** 2)
    assert_close(dx, want_dx, atol=dout64.abs() * d * slope + 1e-30, rtol=6 * EPS32, name=f"gelu grad {shape}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_silu_mul_backward_float32_against_float64(device, isa, shape, restore_isa):
    use_isa(isa)
    g, u, dout = inputs(shape, n=3, seed=shape[-1] + 1)
    dg, du = silu_mul_backward(g.to(device), u.to(device), dout.to(device))
    want_dg, want_du = silu_mul_grads_f64(g, u, dout)
    # s = sigmoid(g) within a few eps relatively; 1 - s then carries an absolute error of ~eps, which g scales.
    scale = (dout.double() * u.double()).abs()
    assert_close(dg.cpu(), want_dg, atol=scale * 8 * EPS32 * (1 + g.double().abs()) + 1e-30, rtol=8 * EPS32,
                 name=f"dgate {shape}")
    assert_close(du.cpu(), want_du, atol=1e-30, rtol=6 * EPS32, name=f"dup {shape}")


@pytest.mark.parametrize("device,isa,dtype", per_kernel(
    cpu=[(torch.bfloat16,)], cuda=[(torch.bfloat16,), (torch.float16,)]))
def test_16_bit_against_float64_and_torch(device, isa, dtype, restore_isa):
    """bf16 (f16) inputs: within twice torch's own low-precision error of the float64 result."""
    use_isa(isa)
    x, u, dout = inputs((4, 3001), n=3, dtype=dtype, seed=11)
    want_y, want_dx = gelu_grads_f64(x, dout)
    xt = x.clone().requires_grad_()
    base_y = F.gelu(xt, approximate="tanh")
    base_y.backward(dout)
    dev = [t.to(device) for t in (x, u, dout)]
    assert_close_to_reference(gelu_tanh(dev[0]).cpu(), want_y, base_y.detach(), name="gelu")
    assert_close_to_reference(gelu_tanh_backward(dev[0], dev[2]).cpu(), want_dx, xt.grad, name="gelu grad")
    want_dg, want_du = silu_mul_grads_f64(x, u, dout)
    gt, ut = x.clone().requires_grad_(), u.clone().requires_grad_()
    (F.silu(gt) * ut).backward(dout)
    dg, du = silu_mul_backward(*dev)
    assert dg.dtype == du.dtype == dtype
    assert_close_to_reference(dg.cpu(), want_dg, gt.grad, name="dgate")
    assert_close_to_reference(du.cpu(), want_du, ut.grad, name="dup")


# ---- AVX2 against scalar, special values ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 9, 255, 4103])
def test_avx2_equals_scalar_bit_for_bit(dtype, n, restore_isa):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 on this CPU")
    x, u, dout = inputs((n,), n=3, dtype=dtype, seed=n)
    x[: len(SPECIAL)] = torch.tensor(SPECIAL).to(dtype)[:n]
    outs = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs[isa] = (gelu_tanh(x), gelu_tanh_backward(x, dout), *silu_mul_backward(x, u, dout))
    for name, a, b in zip(("gelu", "gelu grad", "dgate", "dup"), outs["avx2"], outs["scalar"]):
        assert_equal(a, b, name=f"{name}: AVX2 vs scalar")


@pytest.mark.parametrize("isa", ISAS)
def test_special_values(isa, restore_isa):
    ops.set_cpu_isa(isa)
    x = torch.tensor([float("inf"), float("nan"), 1000.0, -1000.0, 0.0, -0.0, 10.0, -10.0])
    y = gelu_tanh(x)
    assert y[0] == float("inf") and torch.isnan(y[1]) and y[2] == 1000.0 and y[3] == 0 and y[4] == 0
    assert_close(y[6:], F.gelu(x[6:].double(), approximate="tanh").float(), atol=1e-6, rtol=1e-6, name="gelu(+-10)")
    dx = gelu_tanh_backward(x, torch.ones_like(x))
    assert torch.isnan(dx[1]) and dx[2] == 1 and dx[3] == 0 and dx[4] == 0.5
    dg, du = silu_mul_backward(x, torch.ones_like(x), torch.ones_like(x))
    assert torch.isnan(dg[1]) and dg[2] == 1 and dg[3] == 0 and dg[4] == 0.5 and du[2] == 1000.0 and du[4] == 0


# ---- autograd ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_is_the_kernels(dtype):
    x, u, dout = inputs((3, 2, 37), n=3, dtype=dtype, seed=5)
    xg, ug = x.clone().requires_grad_(), u.clone().requires_grad_()
    gelu_tanh(xg).backward(dout)
    assert_equal(xg.grad, gelu_tanh_backward(x, dout), name="gelu autograd")
    xg.grad = None
    silu_mul(xg, ug).backward(dout)
    dg, du = silu_mul_backward(x, u, dout)
    assert_equal(xg.grad, dg, name="silu_mul autograd dgate")
    assert_equal(ug.grad, du, name="silu_mul autograd dup")


def test_opcheck():
    x, u = inputs((4, 19), seed=2)
    for op, args in ((torch.ops.flashlm.gelu_tanh, (x.requires_grad_(),)),
                     (torch.ops.flashlm.silu_mul, (x, u.requires_grad_())),
                     (torch.ops.flashlm.gelu_tanh_backward, (x.detach(), u.detach())),
                     (torch.ops.flashlm.silu_mul_backward, (x.detach(), u.detach(), u.detach() * 2))):
        torch.library.opcheck(op, args)


def test_bad_input_names_the_argument():
    x, u, dout = inputs((4, 8), n=3)
    with pytest.raises(ValueError, match=r"dout: shape \(4, 7\) differs from x's \(4, 8\)"):
        gelu_tanh_backward(x, dout[:, :7])
    with pytest.raises(ValueError, match="dout: dtype BF16 differs from x's F32"):
        gelu_tanh_backward(x, dout.bfloat16())
    with pytest.raises(ValueError, match="x: dtype must be F32 or BF16 on the CPU, got F64"):
        gelu_tanh(x.double())
    with pytest.raises(ValueError, match="up: dtype BF16 differs from gate's F32"):
        silu_mul_backward(x, u.bfloat16(), dout)
    with pytest.raises(ValueError, match=r"dout: shape \(4, 7\) differs from gate's \(4, 8\)"):
        silu_mul_backward(x, u, dout[:, :7])
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        gelu_tanh([1.0])
