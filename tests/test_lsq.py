"""Learned step sizes for int8 / int4 QAT (flashlm.quant.lsq, QATLinear(lsq=True)).

References: the steps' and weights' gradients against LSQ's piecewise formula evaluated in float64 from the
loss's gradient with respect to the dequantized weights (dy.T @ x, with x rounded per token as Int8Linear
rounds it for int8); the forward against the exported Int8Linear / Int4Linear bit for bit on every CPU ISA; a
short fine-tune where learning the steps ends at or below the straight-through QAT's loss (same seed, data and
steps), measured on the exported layers.
"""

import math

import pytest
import torch
from torch import nn

from compare import assert_close, assert_equal
from conftest import per_kernel, use_isa
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear, Int8Linear
from flashlm.quant.lsq import lsq_grads
from flashlm.quant.qat import QATLinear, apply_qat, convert_qat

pytestmark = pytest.mark.usefixtures("restore_isa")

CODES = {"int8": (-127, 127), "int4": (-8, 7)}


def per_token_reference(x):
    """Int8Linear's rounding of x [M, K] (float64): scale = absmax / 127, q = round(x * (127 / absmax))."""
    absmax = x.abs().amax(dim=1)
    inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, torch.zeros_like(absmax))
    return torch.round(x * inv[:, None]).clamp(-127, 127).double() * (absmax / 127.0).double()[:, None]


def lsq_layer(qat_type, k, n, group_size=None, seed=0):
    """A QATLinear with learned steps, moved off RTN's (each step times 0.6..1.3) so both ends clip."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, ::7] *= 5.0
    layer = QATLinear.from_linear(lin, qat_type, group_size, lsq=True)
    with torch.no_grad():
        layer.weight_step.mul_(0.6 + 0.7 * torch.rand(layer.weight_step.shape))
    return layer


def lsq_reference(grad_wq, w, step, qn, qp):
    """(dw, dstep) by LSQ's formula in float64: grad_wq, w [N, G, group]; step [N, G, 1]."""
    v = w.double() / step.double()
    d_step = torch.where(v <= qn, torch.full_like(v, qn), torch.where(v >= qp, torch.full_like(v, qp), v.round() - v))
    g = 1.0 / math.sqrt(w.numel() * qp)
    inside = (v > qn) & (v < qp)
    return grad_wq * inside, (grad_wq * d_step).sum(-1) * g, inside


@pytest.mark.parametrize("qat_type,group_size", [("int8", None), ("int4", 32), ("int4", 64)])
def test_gradients_follow_lsq_formula(qat_type, group_size):
    k, n = 128, 12
    layer = lsq_layer(qat_type, k, n, group_size, seed=2)
    x = torch.randn(3, 5, k, requires_grad=True)
    dy = torch.randn(3, 5, n)
    layer(x).backward(dy)

    rows = x.detach().reshape(-1, k).double()
    x_used = per_token_reference(rows) if qat_type == "int8" else rows
    grad_wq = dy.reshape(-1, n).double().T @ x_used  # d loss / d (dequantized weights)
    group = k if qat_type == "int8" else group_size
    step = layer.weight_step.detach().reshape(n, -1, 1)
    dw, dstep, inside = lsq_reference(grad_wq.reshape(n, -1, group), layer.weight.detach().reshape(n, -1, group),
                                      step, *CODES[qat_type])
    assert inside.any() and not inside.all(), "the steps should clip some weights and keep others"
    terms = (grad_wq.abs().reshape(n, -1, group) * CODES[qat_type][1]).sum(-1) / math.sqrt(n * k * CODES[qat_type][1])
    assert_close(layer.weight_step.grad.reshape(n, -1), dstep, atol=1e-5 * terms, name=f"{qat_type} d step")
    assert_close(layer.weight.grad, dw.reshape(n, k), atol=1e-5 * grad_wq.abs().max(), name=f"{qat_type} dW")
    assert_close(layer.bias.grad, dy.reshape(-1, n).double().sum(0), atol=1e-5, name="dbias")


def test_lsq_grads_on_the_range_ends():
    """v = w / step decides (LSQ's rule): v in (qp, qp + 0.5) rounds to qp yet counts as clipped."""
    qn, qp = -8, 7
    v = torch.tensor([-9.0, -8.0, -7.6, -0.4, 0.3, 6.6, 7.0, 7.3, 9.0], dtype=torch.float64)
    codes = v.round().clamp(qn, qp)
    grad = torch.arange(1.0, 10.0, dtype=torch.float64)
    dw, dstep = lsq_grads(grad, codes, v, qn, qp, (1,), 0.5)
    inside = torch.tensor([False, False, True, True, True, True, False, False, False])
    assert_equal(dw, grad * inside, name="dw")
    per_value = torch.tensor([qn, qn, -8 + 7.6, 0.4, -0.3, 7 - 6.6, qp, qp, qp], dtype=torch.float64)
    assert_close(dstep, (grad * per_value).sum().reshape(1) * 0.5, atol=1e-12, name="dstep")


CASES = [("int8", None, 7, 5, (3, 7)), ("int8", None, 200, 33, (2, 3, 200)), ("int4", None, 96, 40, (3, 5, 96)),
         ("int4", 64, 192, 9, (1, 192)), ("int4", 32, 256, 24, (17, 256))]


@pytest.mark.parametrize("device,isa,dtype,case", per_kernel(
    cpu=[(dtype, case) for dtype in (torch.float32, torch.bfloat16) for case in CASES]))
def test_export_equals_the_lsq_forward_bit_for_bit(device, isa, dtype, case):
    use_isa(isa)
    qat_type, group_size, k, n, shape = case
    layer = lsq_layer(qat_type, k, n, group_size)
    x = (torch.randn(shape) * 3).to(dtype)
    y = layer(x)
    real = layer.to_quantized()
    assert isinstance(real, Int8Linear if qat_type == "int8" else Int4Linear)
    scales = real.weight_scales if qat_type == "int8" else real.scales
    assert_equal(scales, layer.weight_step.detach(), name="exported scales are the learned steps")
    assert_equal(y, real(x), name=f"LSQ {qat_type} vs its quantized layer, {isa} {dtype} {shape}")


def regression_fit(lsq, qat_type, seed=0, steps=150):
    """A layer near a target linear map fitted with QAT (Adam, same data and steps either way); returns the
    exported layer's mean squared error on all the data."""
    torch.manual_seed(seed)
    k, n = 128, 32
    target = torch.randn(n, k) * torch.linspace(0.2, 2.0, k)
    x = torch.randn(1024, k)
    y = x @ target.T
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(target + 0.05 * torch.randn(n, k))
    layer = QATLinear.from_linear(lin, qat_type, 32 if qat_type == "int4" else None, lsq=lsq)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    batches = torch.randint(0, 1024, (steps, 64), generator=torch.Generator().manual_seed(seed))
    for idx in batches:
        loss = (layer(x[idx]) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (layer.to_quantized()(x) - y).square().mean().item()


@pytest.mark.parametrize("qat_type", ["int8", "int4"])
def test_learned_steps_fine_tune_no_worse_than_straight_through(qat_type):
    ste, lsq = regression_fit(False, qat_type), regression_fit(True, qat_type)
    assert lsq <= ste, f"{qat_type}: LSQ ended at {lsq}, the straight-through QAT at {ste}"


def test_model_with_learned_steps_converts_exactly():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                      seq_len=64)
    model = Transformer(cfg).eval()
    names = apply_qat(model, "int4", lsq=True)
    steps = [model.get_submodule(n).weight_step for n in names]
    assert all(isinstance(s, nn.Parameter) and s.requires_grad for s in steps)
    assert {f"{n}.weight_step" for n in names} <= set(model.state_dict())
    with torch.no_grad():
        for s in steps:
            s.mul_(0.9)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)[0]
        assert convert_qat(model) == names
        assert_equal(model(idx)[0], logits, name="int4 LSQ model after convert_qat")


@pytest.mark.parametrize("qat_type", ["int4-asym", "Q4_0", "Q8_0", "Q4_K"])
def test_lsq_needs_int8_or_int4(qat_type):
    with pytest.raises(ValueError, match="lsq"):
        QATLinear(64, 8, qat_type=qat_type, lsq=True)
    with pytest.raises(ValueError, match="lsq"):
        apply_qat(Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=1, n_head=2, d_model=64, d_ff=128,
                                          seq_len=16)), qat_type, lsq=True)
    with pytest.raises(ValueError, match="lsq"):
        QATLinear(64, 8, qat_type="int8", lsq=1)
