"""flashlm.ops.moe (route, expert_matmul, expert_ffn) against float64 references written per expert.

route: against a float64 torch reference (a stable descending sort, so ties go to the lower expert index),
both modes, renormalize on and off, k = 1, 2 and E; its gradient against float64 autograd of the same formula.
expert_matmul: against a per-expert float64 loop, every GGUF type (the bounds of test_gguf_matmul.check, per
expert: exact against the quantized-x product, and within one quantization step per element of x against
x @ W.T) and float32/bfloat16 weights (the baseline rule of compare.assert_close_to_reference), E in {4, 8, 64},
rows per expert from 0 upward (experts left empty, every row on one expert), R = 1 and 37, AVX2 and scalar.
expert_ffn: against the float64 loop over dequantized weights (float weights: the baseline rule; GGUF: x and
the intermediate are each quantized to 8-bit blocks, so a relative (Frobenius) error below RTOL_TYPICAL, as
test_gguf_matmul asserts for one product, and elementwise within the quantization steps of both products),
gradients against float64 autograd; bad input named. CUDA cases skip without a GPU; CUDA multiplies GGUF
blocks with x unquantized, so its GGUF cases hold to the baseline rule against the dequantized weights.
"""

import functools

import gguf
import numpy as np
import pytest
import torch

from compare import assert_close, assert_close_to_reference
from conftest import per_device, per_kernel, use_isa
from flashlm import _C
from flashlm.ops import moe
from flashlm.quant.gguf_experts import GGUFExperts
from reference import moe_activate, moe_expert_ffn, moe_route
from test_gguf_matmul import RTOL_TYPICAL, TYPES, check, decode, k_for, quantize_x, weights

pytestmark = pytest.mark.usefixtures("restore_isa")


# --- references --------------------------------------------------------------------------------------------------

def route_formula(logits64, experts, softmax_first, renormalize):
    """The weights as a differentiable float64 function of the logits, for the selection `experts`."""
    if softmax_first and not renormalize:
        return torch.softmax(logits64, -1).gather(1, experts)
    return torch.softmax(logits64.gather(1, experts), -1)


def quantized_pairs(x, experts, gate, up, down, ggml_type, activation="silu"):
    """Each (token, expert) pair's down_e(act(gate_e xq) * up_e xq) with the intermediate quantized too, as the
    GGUF kernels round x and h to 8-bit blocks (test_gguf_matmul.quantize_x), in float64: [T * k, D]."""
    flat = experts.reshape(-1).long()
    gate, up, down = gate.detach(), up.detach(), down.detach()
    xq, _ = quantize_x(x.detach().repeat_interleave(experts.shape[1], 0).double(), ggml_type)
    h = moe_activate(torch.einsum("rfd,rd->rf", gate[flat], xq), activation) * torch.einsum("rfd,rd->rf", up[flat], xq)
    hq, _ = quantize_x(h.float(), ggml_type)
    return torch.einsum("rdf,rf->rd", down[flat], hq)


def expert_rows(pattern, r, e, seed):
    """experts [R] int32: "spread" (rows cycle over every other expert: half of them empty), "ramp" (expert i
    gets i rows, 0, 1, 2, ..., shuffled), "one" (every row on the last expert)."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "one":
        ex = torch.full((r,), e - 1)
    elif pattern == "spread":
        ex = (torch.arange(r) * 2) % e
    else:
        ramp = torch.cat([torch.full((i,), i) for i in range(e)])[:r]
        ex = torch.cat([ramp, torch.randint(0, e, (r - ramp.numel(),), generator=gen)])
        ex = ex[torch.randperm(r, generator=gen)]
    return ex.to(torch.int32)


# --- route ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float32,), (torch.float16,), (torch.bfloat16,)]))
@pytest.mark.parametrize("e,k", [(4, 1), (8, 2), (64, 2), (8, 8)])
@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("softmax_first,renormalize", [(True, True), (True, False), (False, False), (False, True)])
@pytest.mark.parametrize("ties", [False, True])
def test_route_matches_reference(device, dtype, e, k, t, softmax_first, renormalize, ties):
    """Routing has one CPU kernel (scalar: T * E work, nothing to vectorize at today's E)."""
    gen = torch.Generator().manual_seed(e * 100 + t)
    # ties: small integers, so most rows hold equal logits (and equal probabilities) across experts
    logits = torch.randint(-2, 2, (t, e), generator=gen).float() if ties else 3 * torch.randn(t, e, generator=gen)
    logits = logits.to(dtype)
    w, ex = moe.route(logits.to(device), k, softmax_first=softmax_first, renormalize=renormalize)
    ref_w, ref_ex = moe_route(logits, k, softmax_first, renormalize)
    assert w.dtype == torch.float32 and ex.dtype == torch.int32 and w.shape == ex.shape == (t, k)
    assert torch.equal(ex.cpu().long(), ref_ex), f"experts differ:\n{ex}\n{ref_ex}"
    assert_close(w.cpu(), ref_w, atol=1e-7, rtol=4e-6, name="weights")
    if not ties and dtype == torch.float32 and device == "cpu":
        # torch.topk on the CPU breaks ties the same way; for distinct values it must agree anyway
        p = torch.softmax(logits, -1) if softmax_first else logits
        assert torch.equal(ex.long(), p.topk(k, -1).indices)


def test_route_ties_go_to_the_lower_index():
    w, ex = moe.route(torch.zeros(3, 6), 4, softmax_first=False)
    assert ex.tolist() == [[0, 1, 2, 3]] * 3 and torch.allclose(w, torch.full((3, 4), 0.25))
    w, ex = moe.route(torch.tensor([[1.0, 5.0, 5.0, 1.0, 5.0]]), 2)
    assert ex.tolist() == [[1, 2]] and torch.allclose(w, torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("softmax_first,renormalize", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_gradient(softmax_first, renormalize, dtype):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 8, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(9, 2, generator=gen)
    w, ex = moe.route(logits, 2, softmax_first=softmax_first, renormalize=renormalize)
    (w * g).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    (route_formula(l64, ex.long(), softmax_first, renormalize) * g.double()).sum().backward()
    assert logits.grad.dtype == dtype
    assert_close(logits.grad.double(), l64.grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5 if
                 dtype == torch.float32 else 1e-2, name="d router_logits")


# --- expert_matmul ---------------------------------------------------------------------------------------------------

N = 24
# expert_ffn with GGUF weights against a float64 reference that quantizes x and the intermediate as the kernels do
# (relative Frobenius error). What is left is float32 rounding, amplified where the random blocks' scaled quants
# and offsets cancel, and elements of the intermediate whose f32 and f64 values round to neighbouring steps:
# measured at most 9e-4 (Q6_K), 1e-5 and below for most types.
RTOL_QUANTIZED = 2e-3


@functools.lru_cache(maxsize=8)  # the scalar and AVX2 cases share them (the float64 decoding takes seconds at E = 64)
def gguf_experts(ggml_type, e, n, k, seed):
    """(GGUFExperts, W float64 [E, N, K], |a q| + |b| [E, N, K]) from random blocks (test_gguf_matmul.weights);
    not to be modified."""
    raw, w, parts = weights(ggml_type, e * n, k, seed)
    return GGUFExperts(raw.reshape(e, n, -1), ggml_type, (e, n, k)), w.reshape(e, n, k), parts.reshape(e, n, k)


@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()]))
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("e", [4, 8, 64])
@pytest.mark.parametrize("r,pattern", [(1, "spread"), (1, "one"), (37, "spread"), (37, "ramp"), (37, "one")])
def test_expert_matmul_gguf(device, isa, ggml_type, e, r, pattern):
    use_isa(isa)
    k = k_for(ggml_type)
    w, w64, parts = gguf_experts(ggml_type, e, N, k, seed=e + r)
    x = torch.randn(r, k, generator=torch.Generator().manual_seed(r))
    ex = expert_rows(pattern, r, e, seed=r)
    y = moe.expert_matmul(x, ex, w)
    assert y.shape == (r, N) and y.dtype == x.dtype
    for expert in ex.unique().tolist():  # every row checked once, against its own expert's weight
        rows = (ex == expert).nonzero().squeeze(1)
        check(y[rows], x[rows], ggml_type, w64[expert], parts[expert], typical=False)


def on_device(w, device):
    """A copy of GGUFExperts `w` on `device` (the cached ones stay on the CPU)."""
    return GGUFExperts(w.raw.to(device), w.ggml_type, w.shape)


@pytest.mark.parametrize("device,x_dtype", per_device(cuda=[(torch.float32,), (torch.float16,), (torch.bfloat16,)]))
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("e", [4, 8, 64])
@pytest.mark.parametrize("r,pattern", [(1, "spread"), (1, "one"), (37, "spread"), (37, "ramp"), (37, "one"),
                                       (300, "ramp")])
def test_expert_matmul_gguf_cuda(device, x_dtype, ggml_type, e, r, pattern):
    """CUDA groups the rows by expert and multiplies each expert's decoded blocks with its rows of x as they are
    (no 8-bit quantization of x): against the per-expert float64 loop over the dequantized weights, by the
    baseline rule (the same loop in float32, x's dtype out). "one" puts 37 rows on one expert (several batches
    of rows sharing a weight row, the last one short); "ramp" leaves experts empty."""
    k = k_for(ggml_type)
    w, w64, _ = gguf_experts(ggml_type, e, N, k, seed=e + r)
    x = (torch.randn(r, k, generator=torch.Generator().manual_seed(r)) / k ** 0.5).to(x_dtype)
    ex = expert_rows(pattern, r, e, seed=r)
    y = moe.expert_matmul(x.to(device), ex.to(device), on_device(w, device)).cpu()
    assert y.shape == (r, N) and y.dtype == x_dtype
    ref, base = torch.zeros(r, N, dtype=torch.float64), torch.zeros(r, N, dtype=x_dtype)
    for expert in ex.unique().tolist():
        rows = (ex == expert).nonzero().squeeze(1)
        ref[rows] = x[rows].double() @ w64[expert].T
        base[rows] = (x[rows].float() @ w64[expert].float().T).to(x_dtype)
    assert_close_to_reference(y, ref, base, relative_floor=True, name=f"{ggml_type}: y")


@pytest.mark.parametrize("device,isa,x_dtype,w_dtype", per_kernel(
    cpu=[(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.bfloat16, torch.bfloat16)],
    cuda=[(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]))
@pytest.mark.parametrize("e", [4, 8, 64])
@pytest.mark.parametrize("r,pattern", [(1, "spread"), (37, "ramp"), (37, "one")])
@pytest.mark.parametrize("k", [64, 70])  # 70: not a multiple of the 8-wide vectors
def test_expert_matmul_float(device, isa, x_dtype, w_dtype, e, r, pattern, k):
    use_isa(isa)
    gen = torch.Generator().manual_seed(e * r + k)
    w = torch.randn(e, 27, k, generator=gen).to(w_dtype)  # 27 outputs: the AVX2 tiles of 2 and 4 leave a ragged end
    x = torch.randn(r, k, generator=gen).to(x_dtype)
    ex = expert_rows(pattern, r, e, seed=r)
    y = moe.expert_matmul(x.to(device), ex.to(device), w.to(device)).cpu()
    assert y.dtype == x_dtype
    ref = torch.einsum("rnk,rk->rn", w.double()[ex.long()], x.double())
    base = torch.einsum("rnk,rk->rn", w.float()[ex.long()], x.float()).to(x_dtype)  # f32 products, x's dtype out
    assert_close_to_reference(y, ref, base, relative_floor=True, name="y")


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q6_K"])
def test_expert_matmul_avx2_matches_scalar(ggml_type, restore_isa):
    """The two ISAs multiply the same quantized rows with the same integer dot products."""
    if not _C.cpu_isa_supported("avx2"):
        pytest.skip("no AVX2")
    k = k_for(ggml_type)
    w, _, _ = gguf_experts(ggml_type, 8, N, k, seed=3)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(3))
    ex = expert_rows("ramp", 37, 8, seed=3)
    use_isa("scalar")
    scalar = moe.expert_matmul(x, ex, w)
    use_isa("avx2")
    avx2 = moe.expert_matmul(x, ex, w)
    assert_close(avx2, scalar, rtol=1e-5, rtol_of_max=1e-6, name="avx2 vs scalar")


@pytest.mark.parametrize("weight_kind", ["f32", "bf16", "Q8_0", "Q4_K"])
def test_expert_matmul_gradients(weight_kind):
    gen = torch.Generator().manual_seed(11)
    e, n, k, r = 8, 16, 256, 37
    w_float = torch.randn(e, n, k, generator=gen) / 16
    if weight_kind in ("f32", "bf16"):
        w = w_float.to(torch.bfloat16 if weight_kind == "bf16" else torch.float32).requires_grad_()
        w64 = w.detach().double()
    else:
        w = GGUFExperts.from_float(w_float, weight_kind)
        w64 = w.dequantize().double()
    x = torch.randn(r, k, generator=gen).requires_grad_()
    ex = expert_rows("ramp", r, e, seed=1)
    dy = torch.randn(r, n, generator=gen)
    (moe.expert_matmul(x, ex, w) * dy).sum().backward()
    dx_ref = torch.einsum("rnk,rn->rk", w64[ex.long()], dy.double())
    dx_base = torch.einsum("rnk,rn->rk", w64.float()[ex.long()], dy)
    assert_close_to_reference(x.grad, dx_ref, dx_base, relative_floor=True, name="dx")
    if isinstance(w, torch.Tensor):
        onehot = torch.nn.functional.one_hot(ex.long(), e).double()  # [R, E]
        dw_ref = torch.einsum("re,rn,rk->enk", onehot, dy.double(), x.detach().double())
        dw_base = torch.einsum("re,rn,rk->enk", onehot.float(), dy, x.detach()).to(w.dtype)
        assert_close_to_reference(w.grad, dw_ref, dw_base, relative_floor=True, name="dW")
        absent = sorted(set(range(e)) - set(ex.tolist()))
        assert (w.grad[absent] == 0).all()


# --- expert_ffn ------------------------------------------------------------------------------------------------------

def routed(t, e, k, seed, pattern="random"):
    """(weights float32, experts int32) [T, k]: routed from random logits, or every token on experts 0 .. k-1."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "one":
        ex = torch.arange(k, dtype=torch.int32).expand(t, k).contiguous()
        return torch.softmax(torch.randn(t, k, generator=gen), -1), ex
    return moe.route(torch.randn(t, e, generator=gen), k)


@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float32,), (torch.bfloat16,)]))
@pytest.mark.parametrize("e,k,pattern", [(4, 1, "random"), (8, 2, "random"), (64, 2, "random"), (8, 2, "one")])
@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_expert_ffn_float(device, isa, dtype, e, k, pattern, t, activation):
    use_isa(isa)
    gen = torch.Generator().manual_seed(e + t + k)
    d, f = 64, 41
    gate, up = (torch.randn(e, f, d, generator=gen) / 8 for _ in range(2))
    down = torch.randn(e, d, f, generator=gen) / 8
    x = torch.randn(t, d, generator=gen).to(dtype)
    w, ex = routed(t, e, k, seed=t, pattern=pattern)
    out = moe.expert_ffn(x.to(device), w.to(device), ex.to(device), gate.to(device), up.to(device), down.to(device),
                         activation).cpu()
    assert out.dtype == dtype and out.shape == (t, d)
    ref = moe_expert_ffn(x, w, ex, gate, up, down, activation)
    base = moe_expert_ffn(x, w, ex, gate, up, down, activation, dtype=torch.float32).to(dtype)
    assert_close_to_reference(out, ref, base, relative_floor=True, name="out")


@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()]))
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("e,k,t,pattern", [(4, 1, 1, "random"), (8, 2, 37, "random"), (64, 2, 37, "random"),
                                           (8, 2, 37, "one"), (64, 1, 1, "random")])
def test_expert_ffn_gguf(device, isa, ggml_type, e, k, t, pattern):
    use_isa(isa)
    d = f = k_for(ggml_type, blocks=1)  # 96 or 256
    gate, g64, _ = gguf_experts(ggml_type, e, f, d, seed=1)
    up, u64, _ = gguf_experts(ggml_type, e, f, d, seed=2)
    down, d64, _ = gguf_experts(ggml_type, e, d, f, seed=3)
    scale = 1 / d  # random blocks' values are O(1): keep the intermediate O(1) too
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)) * scale ** 0.5
    w, ex = routed(t, e, k, seed=t + e, pattern=pattern)
    out = moe.expert_ffn(x, w, ex, gate, up, down)
    # The per-expert float64 loop, vectorized: every (token, expert) pair a row, xs [T * k, D], with its
    # expert's weights gathered. ref_q quantizes x and the intermediate to 8-bit blocks as the kernels do.
    flat = ex.reshape(-1).long()
    xs, wk = x.repeat_interleave(k, 0).double(), w.reshape(-1, 1).double()
    wg, wu, wd = g64[flat], u64[flat], d64[flat]
    _, xstep = quantize_x(xs, ggml_type)
    ref_q = (wk * quantized_pairs(x, ex, g64, u64, d64, ggml_type)).reshape(t, k, d).sum(1)
    # Elementwise against float64 without quantization: x moves by at most one quantization step per element
    # (so g, u by sum |w| step), h by what that makes of silu(g) u (|silu'| <= 1.1), and then by one step of its
    # own quantization (at the scale of the largest h that x's steps allow).
    g, u = torch.einsum("rfd,rd->rf", wg, xs), torch.einsum("rfd,rd->rf", wu, xs)
    dg, du = torch.einsum("rfd,rd->rf", wg.abs(), xstep), torch.einsum("rfd,rd->rf", wu.abs(), xstep)
    h = torch.nn.functional.silu(g) * u
    ref = (wk * torch.einsum("rdf,rf->rd", wd, h)).reshape(t, k, d).sum(1)
    dh = 1.1 * u.abs() * dg + (torch.nn.functional.silu(g).abs() + 1.1 * dg) * du
    _, hstep = quantize_x((h.abs() + dh).float(), ggml_type)
    bound = (wk * (torch.einsum("rdf,rf->rd", wd.abs(), dh + hstep + 1e-5 * h.abs()))).reshape(t, k, d).sum(1)
    rel = ((out.double() - ref_q).norm() / ref_q.norm()).item()
    assert rel < RTOL_QUANTIZED, f"{ggml_type}: relative error {rel:.3e} against the quantized reference"
    assert_close(out.double(), ref, atol=bound, name=f"{ggml_type}: out vs float64")


@pytest.mark.parametrize("device,dtype", per_device(cuda=[(torch.float32,), (torch.bfloat16,)]))
@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("e,k,t", [(4, 1, 1), (8, 2, 37), (64, 2, 37)])
def test_expert_ffn_gguf_cuda(device, dtype, ggml_type, e, k, t):
    """The feed-forward over GGUF experts on CUDA (three grouped expert matmuls, x unquantized): against the
    float64 loop over tokens with the dequantized weights, by the baseline rule (composed_baseline)."""
    d = f = k_for(ggml_type, blocks=1)
    gate, g64, _ = gguf_experts(ggml_type, e, f, d, seed=1)
    up, u64, _ = gguf_experts(ggml_type, e, f, d, seed=2)
    down, d64, _ = gguf_experts(ggml_type, e, d, f, seed=3)
    x = (torch.randn(t, d, generator=torch.Generator().manual_seed(t)) / d).to(dtype)
    w, ex = routed(t, e, k, seed=t + e)
    out = moe.expert_ffn(x.to(device), w.to(device), ex.to(device), on_device(gate, device), on_device(up, device),
                         on_device(down, device)).cpu()
    assert out.dtype == dtype and out.shape == (t, d)
    ref = moe_expert_ffn(x, w, ex, g64, u64, d64)
    assert_close_to_reference(out, ref, composed_baseline(x, w, ex, g64, u64, d64), relative_floor=True,
                              name=f"{ggml_type}: out")


def composed_baseline(x, weights, experts, gate, up, down):
    """The feed-forward in float32 products with x's dtype at the points where CUDA's composition of expert
    matmuls and torch ops rounds (each product's output, the activation, act(g) * u): every (token, expert)
    pair a row, [T, D] in x's dtype."""
    dtype, (t, k) = x.dtype, experts.shape
    flat = experts.reshape(-1).long()
    xs = x.repeat_interleave(k, 0).float()

    def product(w, rows):
        return torch.einsum("rnk,rk->rn", w[flat].float(), rows.float()).to(dtype)

    g, u = product(gate, xs), product(up, xs)
    h = torch.nn.functional.silu(g.float()).to(dtype) * u
    y = product(down, h)
    return (y.float().reshape(t, k, -1) * weights.unsqueeze(-1)).sum(1).to(dtype)


@pytest.mark.parametrize("weight_kind", ["f32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_expert_ffn_gradients(weight_kind, activation):
    gen = torch.Generator().manual_seed(7)
    e, k, t, d, f = 8, 2, 13, 256, 256
    floats = [torch.randn(e, f, d, generator=gen) / 16, torch.randn(e, f, d, generator=gen) / 16,
              torch.randn(e, d, f, generator=gen) / 16]
    if weight_kind == "f32":
        params = [p.clone().requires_grad_() for p in floats]
        dequantized = [p.detach() for p in params]
    else:
        params = [GGUFExperts.from_float(p, weight_kind) for p in floats]
        dequantized = [p.dequantize() for p in params]
    x = torch.randn(t, d, generator=gen).requires_grad_()
    logits = torch.randn(t, e, generator=gen).requires_grad_()
    w, ex = moe.route(logits, k)
    dout = torch.randn(t, d, generator=gen)
    (moe.expert_ffn(x, w, ex, *params, activation=activation) * dout).sum().backward()
    x64, l64 = x.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in dequantized]
    w64 = route_formula(l64, ex.long(), True, True)
    (moe_expert_ffn(x64, w64, ex, *p64, activation) * dout.double()).sum().backward()
    if weight_kind == "f32":
        xf, lf = x.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
        pf = [p.detach().clone().requires_grad_() for p in dequantized]
        (moe_expert_ffn(xf, route_formula(lf, ex.long(), True, True), ex, *pf, activation, dtype=torch.float32)
         * dout).sum().backward()
        for name, got, ref, base in [("dx", x.grad, x64.grad, xf.grad), ("d logits", logits.grad, l64.grad, lf.grad),
                                     *[(f"d {n}", p.grad, q.grad, b.grad) for n, p, q, b in
                                       zip(("gate", "up", "down"), params, p64, pf)]]:
            assert_close_to_reference(got, ref, base, relative_floor=True, name=name)
    else:
        # x is quantized to 8-bit blocks in the forward: dx carries its error as the output does (within
        # RTOL_TYPICAL of the float64 gradient). The routing weights' gradient is dout . (each expert's output):
        # differences of those outputs, so it is compared with the outputs the kernels compute (quantized_pairs).
        rel = ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item()
        assert rel < RTOL_TYPICAL, f"dx: relative error {rel:.3e} >= {RTOL_TYPICAL}"
        y_pairs = quantized_pairs(x, ex, *p64, weight_kind, activation).reshape(t, k, d)
        lq = logits.detach().double().requires_grad_()
        (route_formula(lq, ex.long(), True, True) * (y_pairs * dout.double()[:, None]).sum(-1)).sum().backward()
        rel = ((logits.grad.double() - lq.grad).norm() / lq.grad.norm()).item()
        assert rel < RTOL_QUANTIZED, f"d logits: relative error {rel:.3e} against the quantized outputs' gradient"


def test_expert_ffn_grouped_kernel_matches_composed_ops():
    """The one native call (no autograd) and the expert_matmul composition (autograd) agree on float weights."""
    gen = torch.Generator().manual_seed(2)
    e, k, t, d, f = 8, 2, 37, 64, 48
    gate, up = (torch.randn(e, f, d, generator=gen) / 8 for _ in range(2))
    down = torch.randn(e, d, f, generator=gen) / 8
    x = torch.randn(t, d, generator=gen)
    w, ex = routed(t, e, k, seed=2)
    fused = moe.expert_ffn(x, w, ex, gate, up, down)
    composed = moe.expert_ffn(x.clone().requires_grad_(), w, ex, gate, up, down)
    assert composed.requires_grad
    assert_close(fused, composed.detach(), atol=1e-6, rtol=1e-5, name="fused vs composed")


# --- GGUFExperts ---------------------------------------------------------------------------------------------------

def test_gguf_experts_from_float_and_dequantize():
    w = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0))
    q = GGUFExperts.from_float(w, "Q8_0")
    assert q.shape == (4, 8, 64) and q.raw.shape == (4, 8, 2 * 34) and q.ggml_type == "Q8_0"
    ref = decode(q.raw.numpy().reshape(-1), "Q8_0", 32, 64).reshape(4, 8, 64)  # gguf-py's decoding
    assert torch.equal(q.dequantize().double(), torch.from_numpy(ref))
    assert (q.dequantize() - w).abs().max() < 0.05


def test_gguf_experts_from_gguf(tmp_path):
    from flashlm.io.gguf import GGUFFile

    e, n, k = 4, 8, 64
    w = np.random.default_rng(0).standard_normal((e, n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w.reshape(e * n, k), gguf.GGMLQuantizationType.Q4_0)
    path = tmp_path / "experts.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_gate_exps.weight", raw.reshape(e, n, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blk.0.attn_q.weight", w[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(str(path)) as f:
        assert f.tensor("blk.0.ffn_gate_exps.weight").gguf_shape == (k, n, e)  # ggml's order: [K, N, E]
        q = GGUFExperts.from_gguf(f, "blk.0.ffn_gate_exps.weight")
        with pytest.raises(ValueError, match="^name: .*3-D"):
            GGUFExperts.from_gguf(f, "blk.0.attn_q.weight")
    assert q.shape == (e, n, k) and q.ggml_type == "Q4_0"
    assert np.array_equal(q.raw.numpy().reshape(-1), raw.reshape(-1))
    x = torch.randn(3, k)
    ex = torch.tensor([3, 0, 3], dtype=torch.int32)
    check(moe.expert_matmul(x, ex, q)[[0, 2]], x[[0, 2]], "Q4_0",
          torch.from_numpy(decode(raw[3 * n:4 * n].reshape(-1), "Q4_0", n, k)), torch.ones(n, k), typical=False)


# --- bad input, torch.library ----------------------------------------------------------------------------------------

def test_bad_input_is_named():
    x, w = torch.randn(5, 64), torch.randn(4, 8, 64)
    ex = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^experts\[2\]: 4 is outside \[0, 3\]"):
        moe.expert_matmul(x, torch.tensor([0, 1, 4, 3, 0], dtype=torch.int32), w)
    with pytest.raises(ValueError, match=r"^experts\[1\]: -1 is outside"):
        moe.expert_matmul(x, torch.tensor([0, -1, 2, 3, 0]), w)
    with pytest.raises(ValueError, match=r"^experts.*outside"):
        moe.expert_matmul(x, torch.tensor([0, 1, 2, 3, 2**32]), w)
    with pytest.raises(ValueError, match=r"^experts: expected \[5\]"):
        moe.expert_matmul(x, ex[:4], w)
    with pytest.raises(ValueError, match=r"^experts: expected an integer tensor"):
        moe.expert_matmul(x, ex.float(), w)
    with pytest.raises(ValueError, match=r"^x: expected \[R, 64\]"):
        moe.expert_matmul(torch.randn(5, 32), ex, w)
    with pytest.raises(ValueError, match=r"^x: torch.float64"):
        moe.expert_matmul(x.double(), ex, w)
    with pytest.raises(ValueError, match=r"^weight: expected 3 dimensions"):
        moe.expert_matmul(x, ex, w[0])
    with pytest.raises(ValueError, match=r"^weight: torch.int32"):
        moe.expert_matmul(x, ex, w.int())
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        moe.expert_matmul(x.numpy(), ex, w)
    q = GGUFExperts.from_float(w, "Q8_0")
    with pytest.raises(ValueError, match=r"^experts\[2\]: 7 is outside"):
        moe.expert_matmul(x, torch.tensor([0, 1, 7, 3, 0]), q)
    q.raw = q.raw[:, :, :-1]  # a tampered size
    with pytest.raises(ValueError, match=r"^raw: "):
        moe.expert_matmul(x, ex, q)
    with pytest.raises(ValueError, match=r"^shape: E"):
        GGUFExperts(torch.zeros(0, dtype=torch.uint8), "Q8_0", (0, 8, 64))
    with pytest.raises(ValueError, match=r"^ggml_type: "):
        GGUFExperts.from_float(w, "Q2_K")

    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^top_k: must be in \[1, 4\]"):
        moe.route(logits, 5)
    with pytest.raises(ValueError, match=r"^top_k: "):
        moe.route(logits, 0)
    with pytest.raises(TypeError, match=r"^top_k: "):
        moe.route(logits, 2.0)
    with pytest.raises(TypeError, match=r"^softmax_first: "):
        moe.route(logits, 2, softmax_first="no")
    with pytest.raises(ValueError, match=r"^router_logits: expected 2 dimensions"):
        moe.route(logits[0], 2)
    with pytest.raises(ValueError, match=r"^router_logits: torch.float64"):
        moe.route(logits.double(), 2)
    nan = logits.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^router_logits: row 3 holds a NaN"):
        moe.route(nan, 2)

    gate, up, down = torch.randn(4, 16, 64), torch.randn(4, 16, 64), torch.randn(4, 64, 16)
    rw, rex = moe.route(logits, 2)
    with pytest.raises(ValueError, match=r"^down: expected \[4, 64, 16\]"):
        moe.expert_ffn(x, rw, rex, gate, up, down.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match=r"^up: expected \[4, 16, 64\]"):
        moe.expert_ffn(x, rw, rex, gate, up[:3], down)
    with pytest.raises(ValueError, match=r"^weights: expected \[5, 2\]"):
        moe.expert_ffn(x, rw[:, :1], rex, gate, up, down)
    with pytest.raises(ValueError, match=r"^experts\[.*outside"):
        moe.expert_ffn(x, rw, rex + 3, gate, up, down)
    with pytest.raises(ValueError, match=r"^activation: "):
        moe.expert_ffn(x, rw, rex, gate, up, down, activation="relu")
    with pytest.raises(ValueError, match=r"^moe_expert_matmul: experts\[0\] = 9 is outside \[0, 4\)"):
        _C.moe_expert_matmul(x, torch.full((5,), 9, dtype=torch.int32), w, "F32", 4, 8, 64, torch.empty(5, 8))


def test_empty_inputs():
    w = torch.randn(4, 8, 64)
    assert moe.expert_matmul(torch.randn(0, 64), torch.zeros(0, dtype=torch.int32), w).shape == (0, 8)
    rw, rex = moe.route(torch.randn(0, 4), 2)
    assert rw.shape == rex.shape == (0, 2)
    out = moe.expert_ffn(torch.randn(0, 64), rw, rex, torch.randn(4, 16, 64), torch.randn(4, 16, 64),
                         torch.randn(4, 64, 16))
    assert out.shape == (0, 64)


def test_fake_tensor_and_opcheck():
    x, w = torch.randn(6, 64), torch.randn(4, 8, 64)
    ex = torch.tensor([0, 3, 3, 1, 0, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashlm.moe_expert_matmul.default, (x, ex, w, "F32", 4, 8, 64))
    q = GGUFExperts.from_float(w, "Q4_0")
    torch.library.opcheck(torch.ops.flashlm.moe_expert_matmul.default, (x, ex, q.raw, "Q4_0", 4, 8, 64))
    torch.library.opcheck(torch.ops.flashlm.moe_route.default, (torch.randn(6, 4), 2, True, True))
    rw, rex = moe.route(torch.randn(6, 4), 2)
    gate, up, down = torch.randn(4, 16, 64), torch.randn(4, 16, 64), torch.randn(4, 64, 16)
    torch.library.opcheck(torch.ops.flashlm.moe_expert_ffn.default,
                          (x, rw, rex, gate, "F32", up, "F32", down, "F32", 4, 16, "silu"))
    with torch.device("meta"):
        y = torch.ops.flashlm.moe_expert_matmul.default(torch.empty(6, 64), torch.empty(6, dtype=torch.int32),
                                                        torch.empty(4, 8, 64), "F32", 4, 8, 64)
    assert y.shape == (6, 8) and y.device.type == "meta"


def test_compiles():
    x, w = torch.randn(6, 64), torch.randn(4, 8, 64)
    logits = torch.randn(6, 4)

    def layer(x, logits):
        rw, rex = moe.route(logits, 2)
        return moe.expert_matmul(x, rex[:, 0].contiguous(), w) * rw[:, :1]

    torch._dynamo.reset()
    assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x, logits), layer(x, logits), atol=1e-6, rtol=1e-6)
