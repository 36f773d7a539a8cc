"""The one-pass path of the fused losses (flashlm.ops.loss): a reduced loss whose gradients the forward computes
block of rows by block, the backward only scaling them. Against torch in float64 as tests/test_loss.py, with
blocks of a few rows (ROW_BLOCK_BYTES made small) so that every loss crosses block boundaries; the gradient
scaled by the caller; the per-row path (no gradient wanted) never taking the one-pass one.
"""

import pytest
import torch

from compare import assert_close, assert_close_to_reference
from conftest import cpu_isas, devices
from flashlm import ops
from flashlm.ops import loss as L
import test_loss
from test_loss import _steps, check, grads, leaves, make, torch_ce, torch_kl


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows at vocab 1000 (rows of 11 tokens: 3, 3, 3, 2)."""
    monkeypatch.setattr(L, "ROW_BLOCK_BYTES", 3 * 4 * 1000)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_over_row_blocks(device, reduction, small_blocks):
    h, w, b, targets, _ = make(1000, 11, 16, device)
    targets[[1, 7]] = -100
    assert L._row_block(11, 1000) == 3
    check(f"ce blocks {reduction}",
          lambda h, w, b: L.fused_linear_cross_entropy(h, w, targets, b, z_loss=1e-3, reduction=reduction,
                                                       chunk_size=300),
          torch_ce(targets, z_loss=1e-3, reduction=reduction), h, w, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reverse", [False, True])
def test_kl_over_row_blocks(device, reverse, small_blocks):
    h, w, b, _, teacher = make(1000, 11, 16, device)
    mask = torch.ones(11, dtype=torch.bool, device=device)
    mask[[0, 5]] = False
    check(f"kl blocks reverse={reverse}",
          lambda h, w, b: L.fused_linear_kl_div(h, w, teacher.float(), b, temperature=2.0, reverse=reverse, mask=mask,
                                                chunk_size=256),
          torch_kl(teacher, 2.0, reverse, mask), h, w, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("topk", [False, True])
def test_distill_over_row_blocks(device, topk, small_blocks):
    """Both terms: with the dense teacher one kernel writes both terms' gradient over the logits; with the top k
    the gradient goes through a second buffer."""
    h, w, b, targets, teacher = make(1000, 11, 16, device)
    targets[4] = -100
    values, index = teacher.topk(30 if topk else 1000, dim=-1)
    valid = targets != -100
    alpha, temperature = 0.7, 1.5

    def ref(h, w, b):
        z = torch.nn.functional.linear(h, w, b)
        hard = torch.nn.functional.cross_entropy(z, targets, reduction="none")
        log_q = torch.log_softmax(z / temperature, -1).gather(1, index)
        log_p = torch.log_softmax(values.to(z.dtype) / temperature, -1)
        soft = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
        return torch.where(valid, alpha * soft + (1 - alpha) * hard, 0.0).sum() / valid.sum()

    teach = dict(topk_indices=index, topk_values=values.float()) if topk else dict(teacher_logits=teacher.float())
    check(f"distill blocks topk={topk}",
          lambda h, w, b: L.fused_linear_distill_loss(h, w, targets, bias=b, alpha=alpha, temperature=temperature,
                                                      chunk_size=333, **teach),
          ref, h, w, b)


@pytest.mark.parametrize("device", devices())
def test_bfloat16_over_row_blocks(device, monkeypatch):
    """bf16 (test_loss.py's case, 8 tokens at vocab 3000) in blocks of 3 rows: the weight's gradient adds up over
    the blocks in f32 and is handed back in bf16."""
    monkeypatch.setattr(L, "ROW_BLOCK_BYTES", 3 * 4 * 3000)
    test_loss.test_bfloat16(device)


@pytest.mark.parametrize("device", devices())
def test_incoming_gradient_scales_the_gradients(device):
    """(3 * loss).backward(): the gradients made in the forward, times 3; a frozen weight gets none."""
    h, w, _, targets, teacher = make(500, 6, 8, device)
    fused = lambda h, w: 3.0 * L.fused_linear_distill_loss(h, w, targets, teacher.float(), alpha=0.4)  # noqa: E731

    def ref(h, w):
        z = torch.nn.functional.linear(h, w)
        soft = torch_kl(teacher)(h, w, None)
        return 3.0 * (0.4 * soft + 0.6 * torch.nn.functional.cross_entropy(z, targets))

    got_in, ref_in, base_in = leaves(torch.float32, h, w), leaves(torch.float64, h, w), leaves(torch.float32, h, w)
    for what, g, r, bg in zip(("dh", "dW"), grads(fused(*got_in), got_in), grads(ref(*ref_in), ref_in),
                              grads(ref(*base_in), base_in)):
        assert_close_to_reference(g, r, bg, name=f"3 * loss {what}")
    hh, ww = leaves(torch.float32, h, w)
    ww.requires_grad_(False)
    fused(hh, ww).backward()
    assert ww.grad is None and hh.grad is not None
    assert_close(hh.grad, got_in[0].grad, rtol=1e-6, atol=1e-7, name="dh with the weight frozen")


def test_backward_runs_once():
    h, w, _, targets, _ = make(50, 3, 8, "cpu")
    hh, ww = leaves(torch.float32, h, w)
    loss = L.fused_linear_cross_entropy(hh, ww, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_gradient_wanted_takes_the_per_row_path(monkeypatch):
    """Under no_grad, or with no input requiring grad, nothing of the gradient is computed (evaluation)."""
    h, w, b, targets, teacher = make(300, 5, 8, "cpu")
    hh, ww, bb = leaves(torch.float32, h, w, b)
    want = L.fused_linear_distill_loss(hh, ww, targets, teacher.float(), bb).item()

    def refuse(*args, **kwargs):
        raise AssertionError("the one-pass path ran without a gradient wanted")

    monkeypatch.setattr(L, "_forward_with_grads", refuse)
    with torch.no_grad():
        got = L.fused_linear_distill_loss(hh, ww, targets, teacher.float(), bb)
    assert_close(got, torch.tensor(want), rtol=1e-6, atol=0, name="no_grad loss")
    frozen = [t.detach() for t in (hh, ww, bb)]
    got = L.fused_linear_distill_loss(frozen[0], frozen[1], targets, teacher.float(), frozen[2])
    assert not got.requires_grad
    assert_close(got, torch.tensor(want), rtol=1e-6, atol=0, name="frozen inputs loss")


# ---- the distillation step: both terms' gradient in one pass ------------------------------------------------

def _two_steps_and_one(x, t, index, reverse, in_place):
    """softmax_chunk_grad_ (scale 1) then kl_chunk_grad_ accumulated, and distill_chunk_grad_ (over x itself when
    in_place): the same dL/dlogits."""
    rows, cols = x.shape
    st, kl = L._init_state(rows, 2, "cpu"), L._init_state(rows, 5, "cpu")
    L.logsumexp_chunk_(x, 3, 1.0, st, None, None)
    L.kl_chunk_(x, t, 0.7, reverse, kl)
    lse = L._lse(st)
    stats = torch.stack([L._lse(kl), L._lse(kl[:, 2:4]), kl[:, 4] / kl[:, 1 if reverse else 3]], 1).contiguous()
    g = torch.Generator().manual_seed(2)
    hard, soft = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    weight = torch.rand(rows, 3, generator=g)
    hard[1] = 0.0  # an ignored row: no hard term
    two = torch.empty(rows, cols)
    L.softmax_chunk_grad_(x, 3, 1.0, lse, hard, index, weight, two, False)
    L.kl_chunk_grad_(x, t, 0.7, reverse, stats, soft, two, True)
    one = x.clone() if in_place else torch.full((rows, cols), float("nan"))
    L.distill_chunk_grad_(one if in_place else x, t, 3, 0.7, reverse, stats, soft, lse, hard, index, weight, one)
    return two, one


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("cols", [1, 7, 8, 33, 4099])
@pytest.mark.parametrize("reverse", [False, True])
def test_distill_step_is_the_two_steps(isa, cols, reverse, restore_isa):
    ops.set_cpu_isa(isa)
    x, t, index = _steps(6, cols)
    for in_place in (False, True):
        two, one = _two_steps_and_one(x.contiguous() if in_place else x, t, index, reverse, in_place)
        assert_close(one, two, rtol=2e-6, atol=1e-6, name=f"{isa} distill step (in place: {in_place})")


@pytest.mark.skipif("avx2" not in cpu_isas(), reason="the CPU lacks AVX2")
def test_distill_step_avx2_matches_scalar(restore_isa):
    x, t, index = _steps(5, 4099, seed=3)
    outs = []
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs.append(_two_steps_and_one(x, t, index, False, False)[1])
    assert_close(outs[1], outs[0], rtol=2e-6, atol=1e-6, name="AVX2 vs scalar distill step")


@pytest.mark.parametrize("device", devices())
def test_distill_step_opcheck(device):
    x, t, index = (v.to(device) for v in _steps(5, 40))
    rows = x.shape[0]
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    torch.library.opcheck(torch.ops.flashlm.distill_chunk_grad_.default,
                          (x.contiguous(), t, 3, 0.5, False, r(rows, 3), r(rows), r(rows), r(rows), index,
                           torch.rand(rows, 3, device=device), torch.zeros(rows, 40, device=device)))


def test_distill_step_names_bad_arguments():
    x = torch.randn(4, 10)
    z, stats = torch.zeros(4), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="^hard_coef"):
        L.distill_chunk_grad_(x, x, 0, 1.0, False, stats, z, z, torch.zeros(3), None, None, torch.zeros(4, 10))
    with pytest.raises(ValueError, match="^lse"):
        L.distill_chunk_grad_(x, x, 0, 1.0, False, stats, z, z.double(), z, None, None, torch.zeros(4, 10))
    with pytest.raises(ValueError, match="^weight"):
        L.distill_chunk_grad_(x, x, 0, 1.0, False, stats, z, z, z, torch.zeros(4, 2, dtype=torch.int64),
                              torch.zeros(4, 3), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="^teacher"):
        L.distill_chunk_grad_(x, x[:, :9], 0, 1.0, False, stats, z, z, z, None, None, torch.zeros(4, 10))
