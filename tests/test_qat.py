"""Quantization-aware training (flashlm.quant.qat), `flashlm train --qat` and its export.

References: the QAT forward against the real Int8Linear / Int4Linear (bit for bit, every CPU ISA) and against
float64 x @ W.T with x and W rounded by the quantizers' formulas written out here (W8A8: exact integer sums, a
float32 epilogue; W4A16: float32 sums in the kernel's order, allowed 4 sqrt(K) ulps of the sum of |terms|, as
test_int_gemm); the straight-through gradients against float64 products with the clipping mask computed from
the formulas; the recovery of RTN's loss against the same model fine-tuned in float for the same steps and then
rounded (so what helps is the quantization-aware forward, not the extra steps).
"""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

from compare import assert_close, assert_equal
from conftest import per_kernel, use_isa
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import GGUFLinear, Int4Linear, Int8Linear
from flashlm.quant.qat import GGUF_QAT_TYPES, QATLinear, apply_qat, convert_qat, fake_quant_weight, fake_quantize
from reference import linear

EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}

pytestmark = pytest.mark.usefixtures("restore_isa")


# -- the quantizers' formulas, written out ----------------------------------------------------------------------

def per_token_reference(x):
    """Int8Linear's rounding of x [M, K]: scale = absmax / 127, q = round_half_even(x * (127 / absmax))."""
    x = x.float()
    absmax = x.abs().amax(dim=1)
    inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, torch.zeros_like(absmax))
    return torch.round(x * inv[:, None]).clamp(-127, 127).double() * (absmax / 127.0).double()[:, None]


def int8_weight_reference(w):
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    return torch.round(w / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127).double() * s.double()


def int4_weight_reference(w, group, symmetric):
    """(dequantized weights float64 [N, K], inside: codes not clamped) of rtn's int4 rule."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    if symmetric:  # the value of largest magnitude maps to code 0: s = m / -8, z = 8
        m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
        s, z = m / -8.0, torch.full_like(m, 8.0)
    else:  # min-max
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s = (hi - lo) / 15.0
        z = torch.round(-lo / torch.where(s != 0, s, torch.ones_like(s))).clamp(0, 15)
    codes = torch.round(g / torch.where(s != 0, s, torch.ones_like(s))) + z
    inside = (codes >= 0) & (codes <= 15)
    w_dq = (codes.clamp(0, 15) - z).double() * s.double()
    return w_dq.reshape(n, k), inside.reshape(n, k)


def qat_layer(qat_type, k, n, group_size=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, ::7] *= 5.0  # uneven columns: groups with a dominant value
    return QATLinear.from_linear(lin, qat_type, group_size)


CASES = [("int8", None, 7, 5, (3, 7)), ("int8", None, 200, 33, (2, 3, 200)), ("int8", None, 64, 16, (130, 64)),
         ("int4", None, 96, 40, (3, 5, 96)), ("int4", 64, 192, 9, (1, 192)), ("int4", None, 256, 24, (17, 256)),
         ("int4-asym", None, 96, 40, (3, 5, 96)), ("int4-asym", 32, 128, 31, (4, 128))]


@pytest.mark.parametrize("device,isa,dtype,case", per_kernel(
    cpu=[(dtype, case) for dtype in (torch.float32, torch.bfloat16) for case in CASES]))
def test_forward_equals_the_quantized_layer_bit_for_bit(device, isa, dtype, case):
    use_isa(isa)
    qat_type, group_size, k, n, shape = case
    layer = qat_layer(qat_type, k, n, group_size)
    x = (torch.randn(shape) * 3).to(dtype)
    y = layer(x)
    real = layer.to_quantized()
    assert isinstance(real, Int8Linear if qat_type == "int8" else Int4Linear)
    assert y.dtype == dtype and y.shape == shape[:-1] + (n,)
    assert_equal(y, real(x), name=f"QAT {qat_type} vs its quantized layer, {isa} {dtype} {shape}")

    rows = x.reshape(-1, k)
    w, b = layer.weight.detach(), layer.bias.detach()
    if qat_type == "int8":
        x_dq, w_dq = per_token_reference(rows), int8_weight_reference(w)
        tol = 3 * EPS[torch.float32] * linear(x_dq, w_dq).abs()  # exact integer sums; the epilogue's roundings
    else:
        x_dq, (w_dq, _) = rows.double(), int4_weight_reference(w, layer.group_size, qat_type == "int4")
        tol = 4 * math.sqrt(k) * EPS[torch.float32] * linear(x_dq.abs(), w_dq.abs())
    ref = linear(x_dq, w_dq, b)
    tol = tol + b.double().abs() * EPS[torch.float32] + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    assert_close(y.reshape(-1, n), ref, atol=tol, name=f"QAT {qat_type} vs float64 reference, {isa} {dtype}")


def llama(seed=0, d_model=64, d_ff=128):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=d_model, d_ff=d_ff,
                      seq_len=64)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("qat_type", ["int8", "int4", "int4-asym"])
def test_converted_model_reproduces_the_qat_model(qat_type):
    model = llama()
    plain_keys = set(model.state_dict())
    names = apply_qat(model, qat_type)
    assert len(names) == 2 * 7 and set(model.state_dict()) == plain_keys  # a QAT checkpoint is a float one
    # one group for all layers: the largest dividing K = 64 (attention, gate, up) and 128 (down)
    assert {model.get_submodule(n).group_size for n in names} == ({None} if qat_type == "int8" else {64})
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)[0]
        assert convert_qat(model) == names
        assert_equal(model(idx)[0], logits, name=f"{qat_type} model after convert_qat")


def test_qat_layers_share_the_float_parameters():
    lin = nn.Linear(64, 8)
    layer = QATLinear.from_linear(lin, "int4")
    assert layer.weight is lin.weight and layer.bias is lin.bias and layer.group_size == 64
    assert QATLinear.from_linear(nn.Linear(96, 8, bias=False), "int4").group_size == 32


# -- straight-through gradients --------------------------------------------------------------------------------

def test_fake_quantize_gradient_is_identity_inside_the_range_and_zero_outside():
    scale, qmin, qmax = 0.1, -8, 7  # codes -8..7: values in [-0.85, 0.75) round inside
    x = torch.tensor([-2.0, -0.9, -0.86, -0.84, -0.3, 0.0, 0.26, 0.74, 0.76, 1.0, 5.0], dtype=torch.float64,
                     requires_grad=True)
    y = fake_quantize(x, torch.tensor(scale, dtype=torch.float64), 0.0, qmin, qmax)
    dy = torch.arange(1.0, 12.0, dtype=torch.float64)
    y.backward(dy)
    inside = (x.detach() >= -0.85) & (x.detach() < 0.75)
    assert inside.tolist() == [False, False, False, True, True, True, True, True, False, False, False]
    assert_equal(x.grad, dy * inside, name="fake_quantize's gradient")
    assert_close(y.detach(), (x.detach() / scale).round().clamp(qmin, qmax) * scale, atol=1e-15, name="values")


@pytest.mark.parametrize("qat_type", ["int4", "int4-asym"])
def test_int4_gradients_pass_through_except_where_clipped(qat_type):
    layer = qat_layer(qat_type, 64, 6, group_size=32, seed=3)
    with torch.no_grad():  # a group whose largest value has an opposite near-twin
        layer.weight[0, :32] = torch.linspace(-0.99, 1.0, 32)  # s = 1 / -8: -0.99 rounds to code 16
    x = torch.randn(5, 64, requires_grad=True)
    dy = torch.randn(5, 6)
    layer(x).backward(dy)
    w_dq, inside = int4_weight_reference(layer.weight.detach(), 32, qat_type == "int4")
    if qat_type == "int4":
        assert not inside[0, 0] and not inside.all()
    want_dw = (dy.double().T @ x.detach().double()) * inside
    assert_close(layer.weight.grad, want_dw, atol=1e-5 * want_dw.abs().max(), name="dW (zero where clipped)")
    assert_close(x.grad, dy.double() @ w_dq, atol=1e-5 * w_dq.abs().max() * 6, name="dx = dy @ W_q")
    assert_close(layer.bias.grad, dy.double().sum(0), atol=1e-5, name="dbias")
    # fake_quant_weight: the same weights and mask as a plain differentiable function
    w = layer.weight.detach().clone().requires_grad_()
    w_fq = fake_quant_weight(w, qat_type, 32)
    assert_close(w_fq.detach(), w_dq, atol=1e-6, name="fake_quant_weight")
    g = torch.randn(w.shape)
    w_fq.backward(g)
    assert_equal(w.grad, g * inside, name="fake_quant_weight's gradient")


def test_int8_gradients_pass_straight_through():
    layer = qat_layer("int8", 40, 12, seed=4)
    x = torch.randn(2, 5, 40, requires_grad=True)
    dy = torch.randn(2, 5, 12)
    layer(x).backward(dy)
    w_dq = int8_weight_reference(layer.weight.detach())
    x_dq = per_token_reference(x.detach().reshape(-1, 40))
    d = dy.reshape(-1, 12).double()
    assert_close(x.grad.reshape(-1, 40), d @ w_dq, atol=1e-5, name="dx = dy @ W_q")
    assert_close(layer.weight.grad, d.T @ x_dq, atol=1e-5, name="dW = dy.T @ x_q")


# -- a short QAT fine-tune recovers RTN's loss -----------------------------------------------------------------

def corpus_bytes() -> torch.Tensor:
    """Python source from the standard library: varied text a byte-level model learns slowly."""
    import argparse
    import string
    import textwrap

    text = "".join(inspect.getsource(m) for m in (argparse, textwrap, string))
    return torch.tensor(list(text.encode()[:110_000]), dtype=torch.int64)


def fit(model, data, steps, lr, seed, T=64, B=16):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(data) - T - 1, (B,), generator=g).tolist()
        x = torch.stack([data[j:j + T] for j in i])
        y = torch.stack([data[j + 1:j + T + 1] for j in i])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def val_loss(model, data, T=64) -> float:
    n = (len(data) - 1) // T
    with torch.no_grad():
        return model(data[:n * T].view(n, T), data[1:n * T + 1].view(n, T))[1].item()


def rtn(model, qat_type):
    out = copy.deepcopy(model)
    apply_qat(out, qat_type)
    convert_qat(out)
    return out


def fold_outlier_channels(model, factor):
    """In each block, the input channel its norms weigh most is scaled up by factor in the linears that read it
    and down in the norm: the float model is unchanged (up to rounding), the weights get an outlier column as
    large LLMs' outlier features give them, and RTN's groups lose precision around it."""
    with torch.no_grad():
        for b in model.blocks:
            for norm, linears in ((b.attn_norm, (b.attn.q, b.attn.k, b.attn.v)), (b.mlp_norm, (b.mlp.gate, b.mlp.up))):
                ch = norm.weight.abs().argmax()
                norm.weight[ch] /= factor
                for lin in linears:
                    lin.weight[:, ch] *= factor


@pytest.fixture
def one_thread():
    """The same numbers on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("qat_type", ["int4", "Q4_0"])
def test_short_qat_fine_tune_recovers_most_of_rtn_loss(one_thread, qat_type):
    data = corpus_bytes()
    train, val = data[:100_000], data[100_000:]
    base = fit(llama(seed=0), train, steps=150, lr=3e-3, seed=0)
    float_loss = val_loss(base, val)
    fold_outlier_channels(base, 16.0)
    assert abs(val_loss(base, val) - float_loss) < 1e-4
    rtn_gap = val_loss(rtn(base, qat_type), val) - float_loss
    assert rtn_gap > 0.1, f"RTN {qat_type} costs only {rtn_gap:.4f} nats: nothing to recover"

    qat = copy.deepcopy(base)
    apply_qat(qat, qat_type)
    fit(qat, train, steps=40, lr=1e-3, seed=1)
    qat_loss = val_loss(qat, val)
    convert_qat(qat)
    assert val_loss(qat, val) == qat_loss  # the exported model is the one trained
    # The same steps in float, then RTN: the loss QAT saves is what its forward saves, not its extra steps.
    control = fit(copy.deepcopy(base), train, steps=40, lr=1e-3, seed=1)
    control_float = val_loss(control, val)
    control_gap = val_loss(rtn(control, qat_type), val) - control_float
    qat_gap = qat_loss - control_float
    print(f"{qat_type} loss above float: RTN {rtn_gap:.4f} (float {float_loss:.4f}); after 40 more steps, above "
          f"the float fine-tune's {control_float:.4f}: RTN {control_gap:.4f}, QAT {qat_gap:.4f}")
    # Measured: RTN +0.689 nats on the base; after the fine-tunes RTN +1.023, QAT +0.088. With other seeds
    # (base, fine-tune) (1, 2), (2, 5), (3, 7): RTN +0.249, +0.284, +0.369, QAT +0.040, +0.006, +0.019. The bar,
    # a quarter of RTN's gap, is 3x above the worst of the four. Q4_0 (blocks of 32, float16 scales): RTN +0.126
    # on the base, after the fine-tunes RTN +0.256, QAT +0.036.
    assert qat_gap < 0.25 * control_gap


# -- the GGML block types --------------------------------------------------------------------------------------

def fp16(t):
    return t.to(torch.float16).double()


def q8_0_reference(w):
    """ggml's quantize_row_q8_0 written out: per 32 values d = absmax / 127 (stored as float16),
    q = round_half_away(w / d); returns (dequantized float64, block bytes)."""
    n, k = w.shape
    g = w.double().reshape(n, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d.float().double(), torch.zeros_like(d))
    q = torch.trunc(g * inv + torch.sign(g) * 0.5).clamp(-127, 127)  # roundf: half away from zero
    raw = torch.cat([d.to(torch.float16).view(torch.uint8).reshape(n, k // 32, 2),
                     q.to(torch.int8).view(torch.uint8)], -1).reshape(n, -1)
    return (q * fp16(d)).reshape(n, k), raw


def q4_0_reference(w):
    """ggml's quantize_row_q4_0: the value m of largest magnitude gives d = m / -8 (float16),
    q = min(15, int(w / d + 8.5)), low nibbles the first 16 values, high nibbles the last 16."""
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
    d = m / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.trunc(g * inv + 8.5).clamp(max=15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    raw = torch.cat([d.to(torch.float16).view(torch.uint8).reshape(n, k // 32, 2), nibbles], -1).reshape(n, -1)
    return ((q.double() - 8) * fp16(d)).reshape(n, k), raw


def q8_activation_reference(x):
    """The CPU kernel's rounding of x [M, K] (ggml's quantize_row_q8_1): per 32 values d = absmax / 127 in
    float32 (not float16), q = round(x * (1 / d))."""
    m, k = x.shape
    g = x.float().reshape(m, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(g * inv).clamp(-127, 127).double() * d.double()).reshape(m, k)


GGUF_REFERENCES = {"Q8_0": q8_0_reference, "Q4_0": q4_0_reference}
GGUF_CASES = [("Q8_0", 64, 9, (3, 5, 64)), ("Q8_0", 96, 17, (40, 96)), ("Q4_0", 96, 40, (3, 5, 96)),
              ("Q4_0", 256, 8, (1, 256)), ("Q4_K", 256, 12, (2, 3, 256)), ("Q4_K", 512, 5, (33, 512))]


@pytest.mark.parametrize("device,isa,dtype,case", per_kernel(
    cpu=[(dtype, case) for dtype in (torch.float32, torch.bfloat16) for case in GGUF_CASES]))
def test_gguf_forward_equals_the_gguf_layer_bit_for_bit(device, isa, dtype, case):
    use_isa(isa)
    qat_type, k, n, shape = case
    layer = qat_layer(qat_type, k, n)
    x = (torch.randn(shape) * 3).to(dtype)
    y = layer(x)
    real = layer.to_quantized()
    assert isinstance(real, GGUFLinear) and real.ggml_type == qat_type
    assert y.dtype == dtype and y.shape == shape[:-1] + (n,)
    assert_equal(y, real(x), name=f"QAT {qat_type} vs GGUFLinear, {isa} {dtype} {shape}")
    if qat_type not in GGUF_REFERENCES:
        return
    # The weights: the bytes of ggml's formulas. The product: the CPU kernel rounds x to Q8_0 blocks too.
    w, b = layer.weight.detach(), layer.bias.detach()
    w_dq, raw = GGUF_REFERENCES[qat_type](w)
    assert_equal(real.raw, raw, name=f"{qat_type} weight bytes")
    rows = x.reshape(-1, k).float()
    x_dq = q8_activation_reference(rows)
    ref = linear(x_dq, w_dq, b)
    # float32 sums of exact block products in the kernel's order; the bias is cast to x's dtype
    tol = 4 * math.sqrt(k) * EPS[torch.float32] * linear(x_dq.abs(), w_dq.abs()) + b.double().abs() * EPS[dtype]
    tol = tol + (EPS[dtype] * ref.abs() if dtype != torch.float32 else 0)
    assert_close(y.reshape(-1, n).double(), ref, atol=tol, name=f"QAT {qat_type} vs float64 reference, {isa} {dtype}")


@pytest.mark.parametrize("qat_type", GGUF_QAT_TYPES)
def test_gguf_gradients_are_the_identity(qat_type):
    """Every value lies inside its own block's range: nothing is clipped, dW = dy.T @ x and dx = dy @ W_q."""
    k = 256
    layer = qat_layer(qat_type, k, 6, seed=5)
    x = torch.randn(2, 5, k, requires_grad=True)
    dy = torch.randn(2, 5, 6)
    layer(x).backward(dy)
    w_dq = layer.to_quantized()
    from flashlm.ops import dequantize

    w_dq = dequantize(w_dq.raw.reshape(-1), qat_type, (6, k)).double()
    d = dy.reshape(-1, 6).double()
    assert_close(layer.weight.grad, d.T @ x.detach().reshape(-1, k).double(), atol=1e-5, name="dW = dy.T @ x")
    assert_close(x.grad.reshape(-1, k), d @ w_dq, atol=1e-5 * w_dq.abs().max() * 6, name="dx = dy @ W_q")
    assert_close(layer.bias.grad, d.sum(0), atol=1e-5, name="dbias")
    w = layer.weight.detach().clone().requires_grad_()
    w_fq = fake_quant_weight(w, qat_type)
    assert_equal(w_fq.detach().double(), w_dq, name="fake_quant_weight")
    g = torch.randn(w.shape)
    w_fq.backward(g)
    assert_equal(w.grad, g, name="fake_quant_weight's gradient")


@pytest.mark.parametrize("qat_type", GGUF_QAT_TYPES)
def test_gguf_converted_model_reproduces_the_qat_model(qat_type):
    model = llama(d_model=256, d_ff=512)
    names = apply_qat(model, qat_type)
    assert len(names) == 2 * 7 and {model.get_submodule(n).group_size for n in names} == {None}
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)[0]
        assert convert_qat(model) == names
        assert all(isinstance(model.get_submodule(n), GGUFLinear) for n in names)
        assert_equal(model(idx)[0], logits, name=f"{qat_type} model after convert_qat")


# -- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match="^qat: must be one of"):
        apply_qat(llama(), "int3")
    with pytest.raises(ValueError, match="^model: expected a flashlm Transformer"):
        apply_qat(nn.Linear(4, 4), "int8")
    model = llama()
    apply_qat(model, "int8")
    with pytest.raises(ValueError, match="^model: blocks.0.attn.q is QATLinear, not a float nn.Linear"):
        apply_qat(model, "int4")
    with pytest.raises(ValueError, match="^model: has no QATLinear layers"):
        convert_qat(llama())
    with pytest.raises(ValueError, match="^group_size: 128 does not divide K = 64"):
        apply_qat(llama(), "int4", group_size=128)
    odd = Transformer(ModelConfig(arch="llama", vocab_size=32, n_layer=1, n_head=2, d_model=48, d_ff=96, seq_len=8))
    with pytest.raises(ValueError, match="^quantize: int4 needs in_features divisible by 32"):
        apply_qat(odd, "int4")
    assert not any(isinstance(m, QATLinear) for m in odd.modules())  # checked before any layer is replaced
    with pytest.raises(ValueError, match="^group_size: only int4"):
        QATLinear(64, 8, qat_type="int8", group_size=32)
    with pytest.raises(ValueError, match="^group_size: must be one of"):
        QATLinear(64, 8, qat_type="int4", group_size=16)
    with pytest.raises(ValueError, match="^in_features: Q4_K needs a multiple of its block size, got 64"):
        apply_qat(llama(), "Q4_K")
    with pytest.raises(ValueError, match="^in_features: Q4_0 needs a multiple of its block size, got 48"):
        fake_quant_weight(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(ValueError, match="^group_size: only int4"):
        QATLinear(64, 8, qat_type="Q8_0", group_size=32)
    with pytest.raises(ValueError, match="^w: expected a float"):
        fake_quant_weight(torch.zeros(4, 32, dtype=torch.int32), "int4")
    with pytest.raises(ValueError, match="^qmin, qmax"):
        fake_quantize(torch.zeros(3), torch.tensor(1.0), 0.0, 7, -8)
    with pytest.raises(ValueError, match="^scale, zero: shapes"):
        fake_quantize(torch.zeros(3, 4), torch.ones(3), 0.0, -8, 7)
    with pytest.raises(ValueError, match="^scale: expected a float tensor"):
        fake_quantize(torch.zeros(3), 0.5, 0.0, -8, 7)


# -- flashlm train / finetune --qat, and the export ----------------------------------------------------------

def logits_of(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def train_tiny(tmp_path_factory, qat: str, steps: int):
    """A `flashlm train --qat QAT` run of the tiny preset (gpt2: K = 64 and 256) for `steps` steps."""
    from flashlm.train.config import TrainConfig
    from flashlm.train.trainer import Trainer

    folder = tmp_path_factory.mktemp("qat")
    text = folder / "text.txt"
    text.write_bytes(bytes(corpus_bytes().tolist()))
    cfg = TrainConfig.from_sources("tiny", overrides=dict(
        data=[str(text)], data_cache=str(folder / "cache"), out_dir=str(folder / "run"), progress=False,
        sample_tokens=0, max_steps=steps, eval_interval=steps, ckpt_interval=steps, qat=qat))
    trainer = Trainer(cfg)
    trainer.train()
    trainer.dp.close()
    return trainer


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A `flashlm train --qat int4-asym` run (groups of 64)."""
    return train_tiny(tmp_path_factory, "int4-asym", 4)


def test_train_with_qat_exports_the_model_it_trained(qat_run, tmp_path, capsys):
    from flashlm.cli import main
    from flashlm.io import load_model

    layers = [m for m in qat_run.model.modules() if isinstance(m, QATLinear)]
    assert len(layers) == 2 * 6 and {(m.qat_type, m.group_size) for m in layers} == {("int4-asym", 64)}
    out = tmp_path / "int4.pt"
    assert main(["quantize", str(qat_run.out_dir), str(out), "--method", "qat"]) == 0
    assert "int4 g64 asym as trained with --qat int4-asym" in capsys.readouterr().out
    exported = load_model(str(out))
    assert sum(isinstance(m, Int4Linear) for m in exported.model.modules()) == 2 * 6
    idx = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    assert_equal(logits_of(exported.model, idx), logits_of(qat_run.model, idx), name="exported vs QAT logits")


def test_finetune_full_with_qat(qat_run, tmp_path):
    from flashlm.io.qat_export import export_qat, qat_setting
    from flashlm.train.finetune import FinetuneConfig, FineTuner

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in ("red", "green", "blue", "black") * 6]
    data.write_text("".join(f'{{"prompt": "{r["prompt"]}", "completion": "{r["completion"]}"}}\n' for r in rows))
    ft = FinetuneConfig(model=str(qat_run.out_dir), data=str(data), method="full", qat="int8", max_steps=2,
                        batch_size=4, eval_interval=2, ckpt_interval=2, out_dir=str(tmp_path / "ft"), progress=False)
    tuner = FineTuner(ft)
    assert all(m.qat_type == "int8" for m in tuner.model.base.modules() if isinstance(m, QATLinear))
    tuner.train()
    tuner.dp.close()
    assert qat_setting(str(tmp_path / "ft")) == ("int8", None)
    from flashlm.io import load_model

    assert export_qat(str(tmp_path / "ft"), str(tmp_path / "int8.pt"))["group_size"] is None
    exported = load_model(str(tmp_path / "int8.pt"))
    assert sum(isinstance(m, Int8Linear) for m in exported.model.modules()) == 2 * 6
    idx = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert_equal(logits_of(exported.model, idx), logits_of(tuner.model.base, idx), name="exported vs int8 QAT logits")


def test_qat_settings_are_checked(qat_run, tmp_path):
    from flashlm.io.qat_export import export_qat
    from flashlm.train.export import export_qat_run
    from flashlm.train.config import TrainConfig
    from flashlm.train.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="^qat: must be one of"):
        TrainConfig(qat="int2")
    with pytest.raises(ValueError, match="^qat_group_size: must be one of"):
        TrainConfig(qat="int8", qat_group_size=32)
    with pytest.raises(ValueError, match="^qat_group_size: must be one of"):
        TrainConfig(qat="int4", qat_group_size=48)
    with pytest.raises(ValueError, match="^qat_group_size: must be one of"):
        TrainConfig(qat="Q4_0", qat_group_size=32)
    with pytest.raises(ValueError, match="^qat_group_size: goes with qat"):
        TrainConfig(qat_group_size=32)
    with pytest.raises(ValueError, match="^qat: not available with zero_stage 3"):
        TrainConfig(qat="int4", zero_stage=3)
    with pytest.raises(ValueError, match="^qat: only with method full"):
        FinetuneConfig(method="lora", qat="int4")
    float_run = tmp_path / "float.pt"
    state = torch.load(next(qat_run.out_dir.glob("*.pt")), weights_only=False)
    state["train_config"]["qat"] = None
    torch.save(state, float_run)
    with pytest.raises(ValueError, match="was not trained with --qat"):
        export_qat(str(float_run), str(tmp_path / "y.pt"))
    state["train_config"]["qat"] = "Q4_0"
    torch.save(state, float_run)
    with pytest.raises(ValueError, match="^qat: a run trained with --qat Q4_0 has no quantized checkpoint form"):
        export_qat(str(float_run), str(tmp_path / "y.pt"))
    with pytest.raises(ValueError, match="^output: a run trained with --qat Q4_0 is written as a GGUF file: give a"):
        export_qat_run(str(float_run), str(tmp_path / "y.pt"))
    state["train_config"]["qat"] = "int4; rm"
    torch.save(state, float_run)
    with pytest.raises(ValueError, match="^qat: must be one of"):
        export_qat(str(float_run), str(tmp_path / "y.pt"))


@pytest.fixture(scope="module")
def q4_0_run(tmp_path_factory):
    """A `flashlm train --qat Q4_0` run (whole Q4_0 blocks)."""
    return train_tiny(tmp_path_factory, "Q4_0", 3)


def test_gguf_qat_run_exports_the_gguf_file_it_trained_for(q4_0_run, tmp_path, capsys):
    """The GGUF file's block linears hold the QAT quantizer's bytes (gguf_blocks of the trained weights, rows of
    q|k|v fused as llama.cpp's gpt2 attn_qkv), every other tensor is F32, and flashlm's model loaded from it
    computes the QAT model's logits bit for bit: the same GGUF kernel on the same bytes, the rest float32 in the
    same order. llama.cpp loads the file and decodes the same greedy tokens."""
    from gguf import GGUFReader

    from flashlm.cli import main
    from flashlm.io import load_model
    from flashlm.quant.qat import gguf_blocks

    model = q4_0_run.model
    out = tmp_path / "q4_0.gguf"
    assert main(["quantize", str(q4_0_run.out_dir), str(out), "--method", "qat"]) == 0
    assert "Q4_0 as trained with --qat Q4_0" in capsys.readouterr().out
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    quantized = {n for n, t in tensors.items() if t.tensor_type.name != "F32"}
    assert len(quantized) == 4 * model.cfg.n_layer and {tensors[n].tensor_type.name for n in quantized} == {"Q4_0"}
    for i, block in enumerate(model.blocks):
        qkv = torch.cat([block.attn.q.weight, block.attn.k.weight, block.attn.v.weight])
        for name, w in (("attn_qkv", qkv), ("attn_output", block.attn.o.weight), ("ffn_up", block.mlp.fc.weight),
                        ("ffn_down", block.mlp.proj.weight)):
            got = torch.as_tensor(tensors[f"blk.{i}.{name}.weight"].data.copy()).reshape(w.shape[0], -1)
            assert_equal(got, gguf_blocks(w, "Q4_0"), name=f"blk.{i}.{name} bytes")
    exported = load_model(str(out))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    assert_equal(logits_of(exported.model, idx), logits_of(model, idx), name="GGUF vs Q4_0 QAT logits")

    from flashlm.runtime.simple_generate import generate
    from test_export import llama_cpp_greedy, llama_cpp_model

    assert exported.tokenizer is not None  # the run's tokenizer went into the file: llama.cpp loads it
    prompt = [5, 9, 12, 3, 40, 41, 7]
    want = generate(model.eval(), torch.tensor([prompt]), 16, temperature=0)[0].tolist()
    got, _ = llama_cpp_greedy(llama_cpp_model(out), prompt, want)
    assert got == want, "llama.cpp's greedy tokens vs flashlm's"


def test_per_tensor_plan_is_checked():
    from flashlm.quant.mix import MixPlanner, ModelInfo

    names = ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    info = ModelInfo("llama", 1, 2, 2)
    planner = MixPlanner("F32", info, names, types={"blk.0.attn_q.weight": "Q4_0"})
    assert [planner.type_for(n, (64, 64), "F32") for n in names] == ["F32", "F32", "Q4_0"]
    with pytest.raises(ValueError, match="^types: 'blk.0.attn_norm.weight' is not a quantizable weight"):
        MixPlanner("F32", info, names, types={"blk.0.attn_norm.weight": "Q4_0"})
    with pytest.raises(ValueError, match="^types: 'blk.1.attn_q.weight' is not a quantizable weight"):
        MixPlanner("F32", info, names, types={"blk.1.attn_q.weight": "Q4_0"})
    with pytest.raises(ValueError, match="^types: 'blk.0.attn_q.weight' has type 'Q4'"):
        MixPlanner("F32", info, names, types={"blk.0.attn_q.weight": "Q4"})
    with pytest.raises(ValueError, match="^types: blk.0.attn_q.weight's rows of 64 are not whole Q4_K blocks"):
        MixPlanner("F32", info, names, types={"blk.0.attn_q.weight": "Q4_K"}).type_for(names[2], (64, 64), "F32")
