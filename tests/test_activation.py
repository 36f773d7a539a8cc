"""silu_mul (flashlm.ops.silu_mul): SwiGLU's silu(gate) * up.

References: float64 silu(g) * u (f32 inputs, within a few f32 ulp); torch's bf16 formula F.silu(g) * u to one
bf16 ulp (both round silu first, then the product, but their exps differ in the last f32 bit); the scalar
kernel bit for bit (AVX2). CUDA cases are marked and skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import flashlm.ops as ops

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
    err = (out.double() - want).abs()
    bound = 4 * torch.finfo(torch.float32).eps * want.abs() + 1e-30
    assert bool((err <= bound).all()), f"worst {(err / (want.abs() + 1e-30)).max().item():.3g} relative"


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
    assert torch.equal(outs[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       outs[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_is_torch_formula_to_one_ulp(isa, restore_isa):
    ops.set_cpu_isa(isa)
    g, u = inputs((4, 3000), torch.bfloat16, seed=3)
    out = ops.silu_mul(g, u)
    want = F.silu(g) * u
    assert out.dtype == torch.bfloat16
    diff = (out.float() - want.float()).abs()
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
    # both round silu to bf16 first: one bf16 ulp of silu times |u| (<= 1 ulp of the product) plus the product's
    # own rounding.
    assert bool((diff <= 2 * ulp + 1e-38).all())
    assert (out == want).float().mean().item() > 0.99  # nearly all bit-equal


@pytest.mark.parametrize("isa", ISAS)
def test_special_values(isa, restore_isa):
    ops.set_cpu_isa(isa)
    g = torch.tensor([float("inf"), float("-inf"), float("nan"), 1000.0, -1000.0, 0.0, 20.0, -20.0, 1.0])
    u = torch.ones_like(g) * 2
    out = ops.silu_mul(g, u)
    want = F.silu(g) * u  # silu(-inf) = -inf / (1 + inf) is NaN in torch too
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[1:3]).all()
    assert out[0] == float("inf") and out[3] == 2000.0 and out[4] == 0 and out[5] == 0
    assert torch.allclose(out[6:], reference_f64(g[6:], u[6:]).float(), rtol=1e-6, atol=0)


def test_non_contiguous_inputs_and_grad_free_model_path():
    g, u = inputs((6, 10))
    out = ops.silu_mul(g.t(), u.t())
    torch.testing.assert_close(out, (F.silu(g) * u).t(), rtol=1e-6, atol=1e-7)


def test_bad_input_names_the_argument():
    g, u = inputs((4, 8))
    with pytest.raises(ValueError, match=r"up: shape \(4, 7\) differs from gate's \(4, 8\)"):
        ops.silu_mul(g, u[:, :7])
    with pytest.raises(ValueError, match="up: dtype BF16 differs from gate's F32"):
        ops.silu_mul(g, u.bfloat16())
    with pytest.raises(ValueError, match="gate: dtype must be F32 or BF16 on the CPU, got F64"):
        ops.silu_mul(g.double(), u.double())
    with pytest.raises(ValueError, match="gate: expected a torch.Tensor"):
        ops.silu_mul([1.0], u)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_against_cpu(dtype):
    g, u = inputs((3, 5000), dtype, seed=7)
    got = ops.silu_mul(g.cuda(), u.cuda()).cpu()
    want = F.silu(g.float()).to(dtype).float() * u.float()
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=1e-6)
