"""silu_mul (flashlm.ops.silu_mul): SwiGLU's silu(gate) * up.

References: float64 silu(g) * u (f32 inputs, within a few f32 ulp); torch's bf16 formula F.silu(g) * u to one
bf16 ulp (both round silu first, then the product, but their exps differ in the last f32 bit); the scalar
kernel bit for bit (AVX2). CUDA cases of the same tests (f32, f16, bf16) are marked and skipped without a GPU.
Bounds are compare.assert_close's.
"""

import pytest
import torch
import torch.nn.functional as F

import flashlm.ops as ops
from compare import assert_close, assert_equal
from conftest import per_kernel, use_isa

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]


def reference_f64(g, u):
    g, u = g.double(), u.double()
    return g * torch.sigmoid(g) * u


def inputs(shape, dtype=torch.float32, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(shape, generator=gen) * scale).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype)
    return g, u


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 2048), (3, 1000), (5, 33, 17), (40000,)])
def test_float32_against_float64(isa, shape, restore_isa):
    ops.set_cpu_isa(isa)
    g, u = inputs(shape, seed=len(shape) * 100 + shape[-1])
    out = ops.silu_mul(g, u)
    assert out.shape == g.shape and out.dtype == torch.float32
    want = reference_f64(g, u)
    # exp within 2 ulp, a division and a product: 4 ulp of the result, plus an absolute floor for results
    # that cancel to near zero (u near 0).
    assert_close(out, want, atol=1e-30, rtol=4 * torch.finfo(torch.float32).eps, name=f"out {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 9, 255, 4103])
def test_avx2_equals_scalar_bit_for_bit(dtype, n, restore_isa):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 on this CPU")
    g, u = inputs((n,), dtype, seed=n)
    g[:6] = torch.tensor([0.0, -0.0, 88.5, -88.5, 1e-30, -1000.0]).to(dtype)[: min(6, n)]
    outs = []
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs.append(ops.silu_mul(g, u))
    assert_equal(outs[1], outs[0], name="AVX2 vs scalar")


@pytest.mark.parametrize("device,isa,dtype", per_kernel(
    cpu=[(torch.bfloat16,)], cuda=[(torch.float32,), (torch.float16,), (torch.bfloat16,)]))
def test_is_torch_formula(device, isa, dtype, restore_isa):
    use_isa(isa)
    g, u = inputs((4, 3000), dtype, seed=3)
    out = ops.silu_mul(g.to(device), u.to(device)).cpu()
    assert out.dtype == dtype
    if device == "cpu":
        want = F.silu(g) * u
        # both round silu to bf16 first: one bf16 ulp of silu times |u| (<= 1 ulp of the product) plus the
        # product's own rounding.
        assert_close(out.float(), want.float(), atol=1e-38, rtol=2 * torch.finfo(torch.bfloat16).eps, name="out")
        assert (out == want).float().mean().item() > 0.99  # nearly all bit-equal
    else:  # silu rounded to dtype (CUDA's expf differs from torch's CPU exp), times u in float32
        want = F.silu(g.float()).to(dtype).float() * u.float()
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert_close(out.float(), want, atol=1e-6, rtol=tol, name="out")


@pytest.mark.parametrize("isa", ISAS)
def test_special_values(isa, restore_isa):
    ops.set_cpu_isa(isa)
    g = torch.tensor([float("inf"), float("-inf"), float("nan"), 1000.0, -1000.0, 0.0, 20.0, -20.0, 1.0])
    u = torch.ones_like(g) * 2
    out = ops.silu_mul(g, u)
    want = F.silu(g) * u  # silu(-inf) = -inf / (1 + inf) is NaN in torch too
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[1:3]).all()
    assert out[0] == float("inf") and out[3] == 2000.0 and out[4] == 0 and out[5] == 0
    assert_close(out[6:], reference_f64(g[6:], u[6:]).float(), rtol=1e-6, name="out of finite g")


def test_non_contiguous_inputs_and_grad_free_model_path():
    g, u = inputs((6, 10))
    out = ops.silu_mul(g.t(), u.t())
    assert_close(out, (F.silu(g) * u).t(), atol=1e-7, rtol=1e-6, name="out of transposed g, u")


def test_bad_input_names_the_argument():
    g, u = inputs((4, 8))
    with pytest.raises(ValueError, match=r"up: shape \(4, 7\) differs from gate's \(4, 8\)"):
        ops.silu_mul(g, u[:, :7])
    with pytest.raises(ValueError, match="up: dtype BF16 differs from gate's F32"):
        ops.silu_mul(g, u.bfloat16())
    with pytest.raises(ValueError, match="gate: dtype must be F32 or BF16 on the CPU, got F64"):
        ops.silu_mul(g.double(), u.double())
    with pytest.raises(TypeError, match="gate: expected a torch.Tensor"):
        ops.silu_mul([1.0], u)
