"""The training path's rotary embedding (flashlm.ops.rope): rope and its gradient rope_backward.

References: float64 rotate-half (x * cos + rotate_half(x) * sin, HF's formula) and its gradient through torch's
autograd; flashlm.models.transformer.apply_rope (torch's addcmul) bit for bit in float32, whose roundings the
kernel takes; for bf16, torch's bf16 formula as the baseline of compare.assert_close_to_reference; the scalar
kernel bit for bit (AVX2); opcheck. CUDA cases are marked and skipped without a GPU.
"""

import pytest
import torch

import flashlm.ops as ops
from compare import assert_close, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.models import ModelConfig
from flashlm.models.transformer import apply_rope, rope_factors, rope_tables
from flashlm.ops.rope import rope, rope_backward

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EPS32 = torch.finfo(torch.float32).eps


def tables(T, hd, dtype=torch.float32):
    """(cos, signed sin) [T, hd] as the model makes them, and [T, 1, hd] for apply_rope."""
    cfg = ModelConfig(arch="llama", vocab_size=64, n_layer=1, n_head=1, d_model=hd, seq_len=T)
    c, s = rope_factors(*rope_tables(cfg), dtype)
    return c[:, 0], s[:, 0], (c, s)


def reference_f64(x, cos, sin, dout):
    """(rope(x), d rope / dx applied to dout) in float64: HF's rotate_half form."""
    x = x.double().requires_grad_()
    half = x.shape[-1] // 2
    signed = sin.double()[:, None, :]
    sin_abs = torch.cat((-signed[..., :half], signed[..., half:]), dim=-1)  # HF's plain sin table
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    y = x * cos.double()[:, None, :] + rotated * sin_abs
    y.backward(dout.double())
    return y.detach(), x.grad


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 5, 3, 16), (1, 7, 2, 6), (3, 33, 4, 64), (9, 2, 128)])
@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_float32_against_float64(device, isa, shape, restore_isa):
    use_isa(isa)
    T, hd = shape[-3], shape[-1]
    cos, sin, _ = tables(T, hd)
    gen = torch.Generator().manual_seed(sum(shape))
    x, dout = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    y = rope(x.to(device), cos.to(device), sin.to(device)).cpu()
    dx = rope_backward(dout.to(device), cos.to(device), sin.to(device)).cpu()
    want_y, want_dx = reference_f64(x, cos, sin, dout)
    # the f32 tables' own rounding (cos, sin within eps / 2 of the f64 ones) and two roundings of the result
    assert_close(y, want_y, atol=2 * EPS32 * x.abs().amax(-1, keepdim=True), rtol=2 * EPS32, name=f"rope {shape}")
    assert_close(dx, want_dx, atol=2 * EPS32 * dout.abs().amax(-1, keepdim=True), rtol=2 * EPS32,
                 name=f"rope grad {shape}")


@pytest.mark.parametrize("isa", ISAS)
def test_is_apply_rope_bit_for_bit_and_its_gradient(isa, restore_isa):
    ops.set_cpu_isa(isa)
    cos, sin, factors = tables(17, 32)
    x = torch.randn(2, 17, 3, 32, requires_grad=True)
    y, want = rope(x, cos, sin), apply_rope(x, *factors)
    assert_equal(y, want, name="rope vs apply_rope")
    dout = torch.randn_like(want)
    (dx,) = torch.autograd.grad(y, x, dout)
    (want_dx,) = torch.autograd.grad(want, x, dout)
    assert_close(dx, want_dx, atol=4 * EPS32 * dout.abs().max(), name="gradient vs apply_rope's")
    assert_equal(dx, rope_backward(dout, cos, sin), name="autograd is rope_backward")


@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.bfloat16,)], cuda=[(torch.bfloat16,), (torch.float16,)]))
def test_16_bit_against_float64_and_torch(device, isa, dtype, restore_isa):
    use_isa(isa)
    cos, sin, factors = tables(40, 64, dtype)
    gen = torch.Generator().manual_seed(3)
    x, dout = (torch.randn(2, 40, 4, 64, generator=gen).to(dtype) for _ in range(2))
    want_y, want_dx = reference_f64(x, cos, sin, dout)
    xt = x.clone().requires_grad_()
    base = apply_rope(xt, *factors)
    base.backward(dout)
    y = rope(x.to(device), cos.to(device), sin.to(device)).cpu()
    dx = rope_backward(dout.to(device), cos.to(device), sin.to(device)).cpu()
    assert y.dtype == dx.dtype == dtype
    assert_close_to_reference(y, want_y, base.detach(), name="rope")
    assert_close_to_reference(dx, want_dx, xt.grad, name="rope grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [2, 12, 16, 64, 96])
def test_avx2_equals_scalar_bit_for_bit(dtype, hd, restore_isa):
    if "avx2" not in ISAS:
        pytest.skip("no AVX2 on this CPU")
    cos, sin, _ = tables(9, hd, dtype)
    x = torch.randn(3, 9, 5, hd).to(dtype)
    outs = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs[isa] = (rope(x, cos, sin), rope_backward(x, cos, sin))
    for a, b, name in zip(outs["avx2"], outs["scalar"], ("rope", "rope_backward")):
        assert_equal(a, b, name=f"{name}: AVX2 vs scalar")


def test_opcheck():
    cos, sin, _ = tables(6, 16)
    x = torch.randn(2, 6, 3, 16)
    torch.library.opcheck(torch.ops.flashlm.rope, (x.requires_grad_(), cos, sin))
    torch.library.opcheck(torch.ops.flashlm.rope_backward, (x.detach(), cos, sin))


def test_bad_input_names_the_argument():
    cos, sin, _ = tables(6, 16)
    x = torch.randn(2, 6, 3, 16)
    with pytest.raises(ValueError, match=r"cos: expected shape \[T, hd\] = \[6, 16\], got \[5, 16\]"):
        rope(x, cos[:5], sin)
    with pytest.raises(ValueError, match="x: expected at least 3 dimensions"):
        rope(x[0, 0], cos, sin)
    with pytest.raises(ValueError, match="x: the head dimension must be even"):
        rope(x[..., :15], cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="sin: dtype BF16 differs from x's F32"):
        rope(x, cos, sin.bfloat16())
    with pytest.raises(TypeError, match="cos: expected a torch.Tensor"):
        rope(x, None, sin)
