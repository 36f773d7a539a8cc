"""W8A8 with static activation scales (ops.int8_linear_static, Int8Linear's act_scale, quant.w8a8) and
SmoothQuant (quant.smoothquant).

References: the static op against the exact integer product of x quantized by the formula in float64
(round half to even of x / scale, clamped to +-127) with the epilogue in float64, as test_int_gemm checks the
dynamic op; the smoothed model against the original, both run in float64 (folding s into the norms and
weights is exact up to rounding); SmoothQuant's benefit as the W8A8 output error against float64 x @ W.T on
activations with injected outlier channels, with and without smoothing, over several seeds.
"""

import copy

import pytest
import torch
from torch import nn

import flashlm.ops as ops
from compare import assert_close
from conftest import per_kernel, use_isa
from eval_data import byte_model
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int8Linear, quantize_int8_per_channel
from flashlm.quant.calibrate import calibrate
from flashlm.quant.ranges import act_scale
from flashlm.quant.smoothquant import smooth_factors, smooth_model
from flashlm.quant.w8a8 import quantize_w8a8
from reference import linear

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

pytestmark = pytest.mark.usefixtures("restore_isa")


def static_reference(x, scale, w_q, w_s, bias):
    """(y, magnitude of its terms) in float64: x quantized with the one scale (x / scale is a float32
    division: the float64 quotient rounded once to float32 is the same number), exact integer sums."""
    x_q = torch.round((x.double() / scale).float()).double().clamp(-127, 127)
    acc = linear(x_q, w_q)
    y = acc * scale * w_s.double()[None, :]
    mag = y.abs()
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    return y, mag


@pytest.mark.parametrize("device,isa,dtype,shape", per_kernel(
    cpu=[(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in ((2, 3, 200), (1, 64), (130, 300))],
    cuda=[(dtype, (m, 1024)) for dtype in (torch.float16, torch.bfloat16) for m in (1, 3, 128)]))
def test_int8_linear_static(device, isa, dtype, shape):
    use_isa(isa)
    k, n = shape[-1], 24
    x = (torch.randn(shape) * 2).to(dtype)
    x.view(-1, k)[0, 0] = 1000.0  # clipped to 127 * scale
    scale = 0.05  # |x| past 6.35 is clipped
    w_q, w_s = quantize_int8_per_channel(torch.randn(n, k))
    bias = torch.randn(n)
    y = ops.int8_linear_static(x.to(device), torch.tensor(scale).to(device), w_q.to(device), w_s.to(device),
                               bias.to(device)).cpu()
    assert y.shape == shape[:-1] + (n,) and y.dtype == dtype
    ref, mag = static_reference(x.reshape(-1, k), torch.tensor(scale).float().double(), w_q, w_s, bias)
    tol = 3 * EPS[torch.float32] * mag + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    assert_close(y.reshape(-1, n), ref, atol=tol, name=f"int8_linear_static {device} {isa} {shape} {dtype}")


def static_codes_reference(x, scale):
    """round_half_even(x / scale) clamped to +-127, in float64 (x / scale rounded once to float32, as above)."""
    return torch.round((x.double() / scale).float()).clamp(-127, 127).to(torch.int8)


@pytest.mark.parametrize("device,isa,dtype,shape", per_kernel(
    cpu=[(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in ((1, 7), (3, 33), (5, 100), (17, 256))],
    cuda=[(dtype, (m, 1000)) for dtype in (torch.float16, torch.bfloat16, torch.float32) for m in (1, 40)]))
def test_quantize_static_is_the_formula_bit_for_bit(device, isa, dtype, shape):
    """The native static quantizer (scalar, AVX2 with its 32-wide body and tails, CUDA) against the formula,
    with exact ties (x = (j + 1/2) * scale, rounded to even), values past 127 * scale and signed zeros."""
    use_isa(isa)
    scale = torch.tensor(0.0625)
    x = torch.randn(shape) * 4
    flat = x.view(-1)
    ties = (torch.arange(-10, 10, dtype=torch.float32) + 0.5) * scale
    flat[:min(len(ties), flat.numel())] = ties[:flat.numel()]
    flat[-1], flat[len(flat) // 2] = 1e6, -1e6
    if flat.numel() > 25:
        flat[20], flat[21] = 0.0, -0.0
    x = x.to(dtype)
    q = ops.quantize_static(x.to(device), scale.to(device)).cpu()
    assert q.dtype == torch.int8 and q.shape == x.shape
    want = static_codes_reference(x.float(), scale.double())
    assert torch.equal(q, want), f"{(q != want).sum()} codes differ ({device} {isa} {dtype} {shape})"
    # the op: the int8 GEMM of those codes with the scale for every row, bit for bit
    w_q, w_s = quantize_int8_per_channel(torch.randn(9, shape[-1]))
    y = ops.int8_linear_static(x.to(device), scale.to(device), w_q.to(device), w_s.to(device)).cpu()
    from flashlm.ops.int_linear import _int8_gemm

    y_ref = _int8_gemm(want.to(device), scale.expand(shape[0]).contiguous().to(device), w_q.to(device),
                       w_s.to(device), None, x.dtype).cpu()
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       y_ref.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_quantize_static_refuses():
    x = torch.randn(2, 16)
    for bad, match in ((torch.tensor([0.1, 0.2]), "act_scale"), (torch.tensor(0.1, dtype=torch.float64), "act_scale")):
        with pytest.raises(ValueError, match=match):
            ops.quantize_static(x, bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            ops.quantize_static(x, torch.tensor(bad))
    with pytest.raises(ValueError, match="x"):
        ops.quantize_static(torch.randn(2, 16, dtype=torch.float64), torch.tensor(0.1))


def test_int8_linear_static_gradient_passes_rounding_through():
    lin = nn.Linear(40, 12)
    q = Int8Linear.from_float(lin, act_scale=0.03)
    x = torch.randn(5, 40, requires_grad=True)
    dy = torch.randn(5, 12)
    q(x).backward(dy)
    w = q.weight.double() * q.weight_scales.double()[:, None]
    torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-5, atol=1e-6)


def test_act_scale_arguments_and_state():
    lin = nn.Linear(16, 8)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="^act_scale"):
            Int8Linear.from_float(lin, act_scale=bad)
    q = Int8Linear.from_float(lin, act_scale=0.1)
    with pytest.raises(ValueError, match="^act_scale"):
        ops.int8_linear_static(torch.randn(2, 16), torch.tensor([0.1, 0.2]), q.weight, q.weight_scales)
    with pytest.raises(ValueError, match="^act_scale"):
        ops.int8_linear_static(torch.randn(2, 16), torch.tensor(0.0), q.weight, q.weight_scales)
    # the scale is a buffer: it is saved and loaded with the weights
    r = Int8Linear(16, 8, static_act=True)
    r.load_state_dict(q.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(r(x), q(x)) and float(r.act_scale) == pytest.approx(0.1)
    q.set_act_scale(None)
    assert "act_scale" not in q.state_dict() and "per-token" in repr(q)


# --- SmoothQuant ---------------------------------------------------------------------------------------------

def float64_model(arch, seed=0):
    cfg = ModelConfig(arch=arch, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4,
                      d_model=64, seq_len=64)
    torch.manual_seed(seed)
    model = Transformer(cfg, attn_impl="sdpa").double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms far from 1, outlier channels, as trained models have
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 2 + 0.1)
                p[::13] *= 25
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothed_model_equals_original(arch, alpha):
    model = float64_model(arch)
    ids = torch.randint(0, 96, (256,), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, ids, seq_len=64, batch_size=2)
    smoothed = copy.deepcopy(model)
    factors = smooth_model(smoothed, stats, alpha)
    assert len(factors) == 4 and any(bool((s != 1).any()) for s in factors.values())
    x = ids[:64].view(1, 64)
    with torch.no_grad():
        want, got = model(x)[0], smoothed(x)[0]
    err = (got - want).abs().max().item()
    assert err <= 1e-12 * want.abs().max().item() * 64, f"max |logit error| {err}"


def w8a8_error(x, w, s, static):
    """Relative error of W8A8 (x / s) @ (w * s).T against float64 x @ w.T."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w * s)
    xs = x / s
    q = Int8Linear.from_float(lin, act_scale=float(xs.abs().max()) / 127 if static else None)
    ref = linear(x, w)
    return ((q(xs).double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_smoothing_lowers_w8a8_error_on_outlier_channels(static, seed):
    g = torch.Generator().manual_seed(seed)
    t, k, n = 64, 256, 96
    x = torch.randn(t, k, generator=g)
    outliers = torch.randperm(k, generator=g)[:4]
    x[:, outliers] *= 60  # a few channels an order of magnitude beyond the rest, as in LLM activations
    w = torch.randn(n, k, generator=g) * 0.05
    s = smooth_factors(x.abs().amax(dim=0), [w], alpha=0.5)
    plain, smoothed = w8a8_error(x, w, torch.ones(k), static), w8a8_error(x, w, s, static)
    assert smoothed < 0.5 * plain, f"error with smoothing {smoothed:.4g}, without {plain:.4g}"


def test_smooth_factors_formula():
    a = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w1, w2 = torch.tensor([[1.0, 2.0, -4.0, 0.0]]), torch.tensor([[-2.0, 1.0, 1.0, 0.0]])
    s = smooth_factors(a, [w1, w2], alpha=0.5)
    assert torch.equal(s, torch.tensor([4.0 ** 0.5 / 2.0 ** 0.5, 1.0, 3.0 / 2.0, 1.0]))
    with pytest.raises(ValueError, match="^alpha"):
        smooth_factors(a, [w1], alpha=1.5)
    with pytest.raises(ValueError, match="^weights"):
        smooth_factors(a, [torch.zeros(2, 3)])


def test_smooth_and_quantize_refuse_what_they_cannot_do():
    model = byte_model(seq_len=32)
    stats = calibrate(model, torch.arange(64) % 256, seq_len=32)
    quantize_w8a8(model)
    with pytest.raises(ValueError, match="^model: blocks.0.attn.q is Int8Linear"):
        smooth_model(model, stats)
    with pytest.raises(ValueError, match="^model"):
        quantize_w8a8(model)
    with pytest.raises(ValueError, match="^stats"):
        quantize_w8a8(byte_model(seq_len=32), None, "kl")
    with pytest.raises(ValueError, match="^act_calib"):
        quantize_w8a8(byte_model(seq_len=32), stats, "max")


@pytest.mark.parametrize("act_calib", [None, "minmax", "percentile", "kl"])
def test_quantize_w8a8_model(act_calib):
    # Every block linear becomes Int8Linear with the static scale its statistics give (or per-token scales);
    # the logits stay near the float model's (a scale off by a factor, or a wrong layer's, is far off).
    model = byte_model(seq_len=64)
    ids = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, seq_len=64, batch_size=4)
    x = ids[:64].view(1, 64)
    with torch.no_grad():
        want = model(x)[0]
    scales = quantize_w8a8(model, stats, act_calib)
    assert len(scales) == 14 and all((s is None) == (act_calib is None) for s in scales.values())
    for name, scale in scales.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Linear)
        if act_calib is not None:
            assert scale == act_scale(stats[name], act_calib) and float(layer.act_scale) == pytest.approx(scale)
    with torch.no_grad():
        got = model(x)[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.1, rel  # 0.02-0.07 on this random model
