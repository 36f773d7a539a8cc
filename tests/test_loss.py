"""The vocabulary-chunked losses (flashlm.ops.loss, csrc/loss/) against torch's cross_entropy, log_softmax and
kl_div in float64: values and the gradients of h, the projection weight and the bias, with vocabularies 1, 7,
32000 and 151936 (one chunk, ragged last chunks), masked and ignored tokens, one token, z-loss, temperature,
reverse and top-k KL and the combined distillation loss. Each result must be within twice the error of the same
torch computation in float32 (compare.assert_close_to_reference). The raw native steps: AVX2 against scalar,
opcheck, and bad arguments naming themselves.
"""

import pytest
import torch
import torch.nn.functional as F

from compare import assert_close, assert_close_to_reference
from conftest import cpu_isas, devices, per_kernel, use_isa
from flashlm import ops
from flashlm.ops import loss as L

VOCABS = [1, 7, 32000, 151936]
# (vocab, tokens, d, chunk_size): None is the default chunk; the small chunks make every vocabulary ragged.
SHAPES = [(1, 5, 8, None), (7, 9, 16, 3), (32000, 6, 12, None), (32000, 1, 8, 999), (151936, 4, 8, None)]


def make(vocab, tokens, d, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    teacher = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 3
    return [t.to(device) if t is not None else None for t in (h, w, b, targets, teacher)]


def leaves(dtype, *tensors):
    return [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]


def grads(loss, tensors):
    loss.backward()
    return [t.grad for t in tensors if t is not None]


def check(name, fused_fn, torch_fn, h, w, b):
    """fused_fn(h, w, b) in float32 against torch_fn in float64, torch_fn in float32 the baseline."""
    got_in, ref_in, base_in = leaves(torch.float32, h, w, b), leaves(torch.float64, h, w, b), leaves(torch.float32, h, w, b)
    got, ref, base = fused_fn(*got_in), torch_fn(*ref_in), torch_fn(*base_in)
    assert_close_to_reference(got.detach(), ref.detach(), base.detach(), name=f"{name} value", relative_floor=True,
                              equal_nan=True)
    if not torch.isfinite(ref).all():
        return
    for what, g, r, bg in zip(("dh", "dW", "db"), grads(got, got_in), grads(ref, ref_in), grads(base, base_in)):
        assert_close_to_reference(g, r, bg, name=f"{name} {what}")


def torch_ce(targets, ignore_index=-100, z_loss=0.0, reduction="mean"):
    def fn(h, w, b):
        z = F.linear(h, w, b)
        loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
        valid = targets != ignore_index
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
        return loss.sum() / valid.sum() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    return fn


def torch_kl(teacher, temperature=1.0, reverse=False, mask=None):
    """Per-token T^2 KL(teacher || student) (or reverse), mean over the masked tokens."""
    def fn(h, w, b):
        s = F.log_softmax(F.linear(h, w, b) / temperature, -1)
        t = F.log_softmax(teacher.to(s.dtype) / temperature, -1)
        # The forward KL's target as probabilities: kl_div's xlogy makes 0 * log 0 = 0 for impossible tokens.
        kl = F.kl_div(t, s, log_target=True, reduction="none") if reverse else F.kl_div(s, t.exp(), reduction="none")
        per_token = kl.sum(-1) * temperature ** 2
        keep = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask
        return torch.where(keep, per_token, 0.0).sum() / keep.sum()
    return fn


@pytest.mark.parametrize("device,isa,vocab,tokens,d,chunk", per_kernel(cpu=SHAPES, cuda=SHAPES))
def test_cross_entropy(device, isa, vocab, tokens, d, chunk, restore_isa):
    use_isa(isa)
    h, w, b, targets, _ = make(vocab, tokens, d, device)
    if tokens > 2:
        targets[1] = -100  # a masked position
    check("cross_entropy", lambda h, w, b: L.fused_linear_cross_entropy(h, w, targets, b, chunk_size=chunk),
          torch_ce(targets), h, w, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_z_loss_and_reductions(device, reduction):
    h, w, b, targets, _ = make(1000, 8, 16, device)
    targets[[0, 5]] = 3  # ignore_index other than -100
    targets[2] = 3

    def fused(h, w, b):
        out = L.fused_linear_cross_entropy(h, w, targets, b, ignore_index=3, z_loss=1e-2, reduction=reduction,
                                           chunk_size=128)
        return out.sum() if reduction == "none" else out

    def ref(h, w, b):
        out = torch_ce(targets, 3, 1e-2, reduction)(h, w, b)
        return out.sum() if reduction == "none" else out

    check(f"z_loss {reduction}", fused, ref, h, w, b)


@pytest.mark.parametrize("device", devices())
def test_ignore_index_everywhere(device):
    """No token counts: the mean is NaN as torch's, the sum 0, and every gradient 0."""
    h, w, b, targets, _ = make(50, 4, 8, device)
    targets[:] = -100
    hh, ww, bb = leaves(torch.float32, h, w, b)
    assert torch.isnan(L.fused_linear_cross_entropy(hh, ww, targets, bb))
    total = L.fused_linear_cross_entropy(hh, ww, targets, bb, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    for g in (hh.grad, ww.grad, bb.grad):
        assert_close(g, torch.zeros_like(g), name="gradient with every token ignored")
    soft = L.fused_linear_distill_loss(hh, ww, targets, torch.randn(4, 50, device=device), bb, reduction="sum")
    assert soft.item() == 0.0


@pytest.mark.parametrize("device,isa,vocab,tokens,d,chunk", per_kernel(cpu=SHAPES, cuda=SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
def test_kl_div(device, isa, vocab, tokens, d, chunk, reverse, restore_isa):
    use_isa(isa)
    h, w, b, _, teacher = make(vocab, tokens, d, device)
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    mask[tokens // 2] = tokens == 1  # a masked position where there is more than one token
    fused = lambda h, w, b: L.fused_linear_kl_div(h, w, teacher.float(), b, temperature=2.0, reverse=reverse,  # noqa: E731
                                                  mask=mask, chunk_size=chunk)
    check(f"kl reverse={reverse}", fused, torch_kl(teacher, 2.0, reverse, mask), h, w, b)


def test_kl_teacher_with_impossible_tokens():
    """Teacher logits of -inf (tokens it rules out) add nothing to the forward KL, as kl_div's 0 * log 0 = 0."""
    h, w, b, _, teacher = make(300, 5, 8, "cpu")
    teacher[:, 7] = float("-inf")
    teacher[2, 100:] = float("-inf")
    fused = lambda h, w, b: L.fused_linear_kl_div(h, w, teacher.float(), b, chunk_size=64)  # noqa: E731
    check("kl -inf teacher", fused, torch_kl(teacher), h, w, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("vocab,k", [(7, 1), (7, 7), (32000, 50), (151936, 20)])
def test_topk_kl(device, vocab, k):
    """The teacher's top k tokens, renormalised: sum_k p_k (log p_k - log q(index_k)), by hand in float64."""
    h, w, b, _, teacher = make(vocab, 6, 8, device)
    values, index = teacher.topk(k, dim=-1)
    temperature = 1.5

    def ref(h, w, b):
        log_q = F.log_softmax(F.linear(h, w, b) / temperature, -1).gather(1, index)
        log_p = F.log_softmax(values.to(log_q.dtype) / temperature, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2

    fused = lambda h, w, b: L.fused_linear_kl_div(h, w, None, b, topk_indices=index, topk_values=values.float(),  # noqa: E731
                                                  temperature=temperature, chunk_size=3000)
    check(f"top-{k} kl", fused, ref, h, w, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("topk", [False, True])
def test_distill_loss(device, topk):
    """alpha * soft + (1 - alpha) * hard, the ignored tokens in neither, the mean over the others."""
    h, w, b, targets, teacher = make(5000, 7, 16, device)
    targets[3] = -100
    alpha, temperature = 0.3, 2.0
    values, index = teacher.topk(5000 if not topk else 40, dim=-1)
    valid = targets != -100

    def ref(h, w, b):
        z = F.linear(h, w, b)
        hard = F.cross_entropy(z, targets, reduction="none")
        log_q = F.log_softmax(z / temperature, -1).gather(1, index)
        log_p = F.log_softmax(values.to(z.dtype) / temperature, -1)
        soft = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
        return torch.where(valid, alpha * soft + (1 - alpha) * hard, 0.0).sum() / valid.sum()

    teach = dict(topk_indices=index, topk_values=values.float()) if topk else dict(teacher_logits=teacher.float())
    fused = lambda h, w, b: L.fused_linear_distill_loss(h, w, targets, bias=b, alpha=alpha,  # noqa: E731
                                                        temperature=temperature, chunk_size=777, **teach)
    check(f"distill topk={topk}", fused, ref, h, w, b)


@pytest.mark.parametrize("device", devices())
def test_bfloat16(device):
    """bf16 h and weight: within twice the error of torch's own bf16 linear + cross_entropy."""
    h, w, b, targets, _ = make(3000, 8, 32, device)
    got_in, ref_in, base_in = leaves(torch.bfloat16, h, w, b), leaves(torch.float64, h, w, b), leaves(torch.bfloat16, h, w, b)
    ref_in = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in ref_in]  # the same rounded inputs
    got = L.fused_linear_cross_entropy(*got_in[:2], targets, got_in[2])
    ref = torch_ce(targets)(*ref_in)
    base = torch_ce(targets)(*base_in)
    assert_close_to_reference(got.detach().float(), ref.detach(), base.detach().float(), relative_floor=True,
                              name="bf16 loss")
    for what, g, r, bg in zip(("dh", "dW", "db"), grads(got, got_in), grads(ref, ref_in), grads(base, base_in)):
        assert g.dtype == torch.bfloat16
        assert_close_to_reference(g, r, bg, name=f"bf16 {what}")


# ---- the native steps ----------------------------------------------------------------------------------------

def _steps(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols + 5, generator=g)[:, :cols] * 4  # rows at a stride > cols
    t = torch.randn(rows, cols, generator=g) * 4
    index = torch.randint(-1, cols + 3, (rows, 3), generator=g)
    return x, t, index


def _run_steps(x, t, index, reverse):
    rows, cols = x.shape
    st = L._init_state(rows, 2, "cpu")
    picked = torch.zeros(rows, 3)
    L.logsumexp_chunk_(x, 3, 0.7, st, index, picked)
    kl = L._init_state(rows, 5, "cpu")
    L.kl_chunk_(x, t, 0.7, reverse, kl)
    lse = L._lse(st)
    g = torch.Generator().manual_seed(1)
    coef, weight = torch.randn(rows, generator=g), torch.rand(rows, 3, generator=g)
    dl = torch.randn(rows, cols, generator=g)  # accumulated into
    L.softmax_chunk_grad_(x, 3, 0.7, lse, coef, index, weight, dl, True)
    stats = torch.stack([lse, L._lse(kl[:, 2:4]), kl[:, 4] / kl[:, 1]], 1).contiguous()
    dk = torch.zeros(rows, cols)
    L.kl_chunk_grad_(x, t, 0.7, reverse, stats, coef, dk, False)
    return st, picked, kl, dl, dk


@pytest.mark.skipif("avx2" not in cpu_isas(), reason="the CPU lacks AVX2")
@pytest.mark.parametrize("cols", [1, 7, 8, 33, 4099])
@pytest.mark.parametrize("reverse", [False, True])
def test_avx2_matches_scalar(cols, reverse, restore_isa):
    x, t, index = _steps(6, cols)
    outs = []
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        outs.append(_run_steps(x, t, index, reverse))
    for name, a, s in zip(("lse state", "gathered", "kl state", "softmax grad", "kl grad"), outs[1], outs[0]):
        assert_close(a, s, rtol=2e-6, atol=1e-6, name=f"AVX2 vs scalar {name}")


def test_gathered_and_scattered_entries():
    """Indices outside the chunk (before it, after it, negative) are left alone; inside, they are picked."""
    x, t, index = _steps(4, 10)
    st, picked, _, dl, _ = _run_steps(x, t, index, False)
    for r in range(4):
        for k in range(3):
            col = int(index[r, k]) - 3
            assert picked[r, k] == (x[r, col] if 0 <= col < 10 else 0.0)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, t, index = (v.to(device) for v in _steps(5, 40))
    x = x.contiguous()
    rows = x.shape[0]
    st, kl = L._init_state(rows, 2, device), L._init_state(rows, 5, device)
    picked = torch.zeros(rows, 3, device=device)
    torch.library.opcheck(torch.ops.flashlm.logsumexp_chunk_.default, (x, 3, 0.5, st, index, picked))
    torch.library.opcheck(torch.ops.flashlm.kl_chunk_.default, (x, t, 0.5, True, kl))
    lse, coef = torch.randn(rows, device=device), torch.randn(rows, device=device)
    dl = torch.zeros_like(x)
    torch.library.opcheck(torch.ops.flashlm.softmax_chunk_grad_.default,
                          (x, 3, 0.5, lse, coef, index, torch.rand(rows, 3, device=device), dl, False))
    stats = torch.randn(rows, 3, device=device)
    torch.library.opcheck(torch.ops.flashlm.kl_chunk_grad_.default, (x, t, 0.5, False, stats, coef, dl, True))


# ---- bad arguments -----------------------------------------------------------------------------------------

def test_bad_arguments():
    h, w, b, targets, teacher = make(20, 4, 8, "cpu")
    h, w, b, teacher = h.float(), w.float(), b.float(), teacher.float()
    cases = [
        (lambda: L.fused_linear_cross_entropy(h, w, targets.float()), ValueError, "targets"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets[:3]), ValueError, "targets"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets + 20), ValueError, "targets"),
        (lambda: L.fused_linear_cross_entropy(h, w, -targets - 1), ValueError, "targets"),
        (lambda: L.fused_linear_cross_entropy(h, w[:, :5], targets), ValueError, "weight"),
        (lambda: L.fused_linear_cross_entropy(h, w.double(), targets), ValueError, "weight"),
        (lambda: L.fused_linear_cross_entropy(h.double(), w.double(), targets), ValueError, "h"),
        (lambda: L.fused_linear_cross_entropy(h, w[:0], targets), ValueError, "weight"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets, b[:3]), ValueError, "bias"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets, chunk_size=0), ValueError, "chunk_size"),
        (lambda: L.fused_linear_cross_entropy(h, w, targets, reduction="avg"), ValueError, "reduction"),
        (lambda: L.fused_linear_cross_entropy(None, w, targets), TypeError, "h"),
        (lambda: L.fused_linear_kl_div(h, w), ValueError, "teacher_logits"),
        (lambda: L.fused_linear_kl_div(h, w, teacher[:, :5]), ValueError, "teacher_logits"),
        (lambda: L.fused_linear_kl_div(h, w, teacher, temperature=0.0), ValueError, "temperature"),
        (lambda: L.fused_linear_kl_div(h, w, teacher, mask=torch.ones(4)), ValueError, "mask"),
        (lambda: L.fused_linear_kl_div(h, w, teacher, reverse="yes"), TypeError, "reverse"),
        (lambda: L.fused_linear_kl_div(h, w, topk_indices=targets[:, None], topk_values=teacher[:, :2]),
         ValueError, "topk_indices"),
        (lambda: L.fused_linear_kl_div(h, w, topk_indices=targets[:, None] + 20, topk_values=teacher[:, :1]),
         ValueError, "topk_indices"),
        (lambda: L.fused_linear_kl_div(h, w, topk_indices=targets[:, None], topk_values=teacher[:, :1], reverse=True),
         NotImplementedError, "reverse"),
        (lambda: L.fused_linear_distill_loss(h, w, targets, teacher, alpha=1.5), ValueError, "alpha"),
    ]
    for fn, error, name in cases:
        with pytest.raises(error, match=f"^{name}"):
            fn()


def test_native_steps_name_bad_arguments():
    x = torch.randn(4, 10)
    st = L._init_state(4, 2, "cpu")
    with pytest.raises(ValueError, match="^state"):
        L.logsumexp_chunk_(x, 0, 1.0, st[:, :1], None, None)
    with pytest.raises(ValueError, match="^scale"):
        L.logsumexp_chunk_(x, 0, float("nan"), st, None, None)
    with pytest.raises(ValueError, match="^start"):
        L.logsumexp_chunk_(x, -1, 1.0, st, None, None)
    with pytest.raises(ValueError, match="^index"):
        L.logsumexp_chunk_(x, 0, 1.0, st, torch.zeros(4, 2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="^gathered"):
        L.logsumexp_chunk_(x, 0, 1.0, st, torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="^dlogits"):
        L.softmax_chunk_grad_(x, 0, 1.0, torch.zeros(4), torch.zeros(4), None, None, torch.zeros(4, 9), False)
    with pytest.raises(ValueError, match="^teacher"):
        L.kl_chunk_(x, torch.zeros(4, 10, dtype=torch.float64), 1.0, False, L._init_state(4, 5, "cpu"))
    with pytest.raises(ValueError, match="^stats"):
        L.kl_chunk_grad_(x, x, 1.0, False, torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, 10), False)


def test_train_losses_take_a_linear_head():
    """flashlm.train.losses on [batch, time, d] hidden states and an nn.Linear head (or its weight alone)."""
    from flashlm.train.losses import distillation_loss, lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300)
    hidden = torch.randn(2, 5, 16)
    targets = torch.randint(0, 300, (2, 5))
    targets[1, 4] = -100
    ref = F.cross_entropy(head(hidden).double().reshape(10, 300), targets.reshape(10))
    assert_close(lm_loss(hidden, head, targets), ref, rtol=1e-5, name="lm_loss")
    no_bias = F.cross_entropy(F.linear(hidden, head.weight).double().reshape(10, 300), targets.reshape(10))
    assert_close(lm_loss(hidden, head.weight, targets), no_bias, rtol=1e-5, name="lm_loss, weight alone")
    teacher = torch.randn(2, 5, 300)
    # alpha = 0: the hard loss alone, whatever the teacher says.
    assert_close(distillation_loss(hidden, head, targets, teacher, alpha=0.0), ref, rtol=1e-5, name="alpha 0")
    with pytest.raises(TypeError, match="^head"):
        lm_loss(hidden, "lm_head", targets)


# Each public function given an argument of the wrong kind (test_bad_arguments' values: None, lists, numpy
# arrays, 0-dim and meta tensors, wrong dtypes, strings and out-of-range integers) raises naming it.
def _targets():
    return torch.randint(0, 20, (3,))


BAD_CASES = {
    "cross_entropy": (L.fused_linear_cross_entropy,
                      lambda: dict(h=torch.randn(3, 8), weight=torch.randn(20, 8), targets=_targets(),
                                   bias=torch.randn(20), ignore_index=-100, z_loss=0.0, chunk_size=7),
                      dict(h="tensor", weight="tensor", targets="tensor", bias="optional", ignore_index="int",
                           z_loss="float", chunk_size="int")),
    "kl_div": (L.fused_linear_kl_div,
               lambda: dict(h=torch.randn(3, 8), weight=torch.randn(20, 8), teacher_logits=torch.randn(3, 20),
                            temperature=2.0, mask=torch.ones(3, dtype=torch.bool)),
               dict(teacher_logits="optional", temperature="float", mask="optional")),
    "topk_kl_div": (L.fused_linear_kl_div,
                    lambda: dict(h=torch.randn(3, 8), weight=torch.randn(20, 8),
                                 topk_indices=torch.randint(0, 20, (3, 4)), topk_values=torch.randn(3, 4)),
                    dict(topk_indices="optional", topk_values="optional")),
    "distill": (L.fused_linear_distill_loss,
                lambda: dict(h=torch.randn(3, 8), weight=torch.randn(20, 8), targets=_targets(),
                             teacher_logits=torch.randn(3, 20), alpha=0.5, temperature=1.0),
                dict(targets="tensor", teacher_logits="optional", alpha="float", temperature="float")),
}
# Valid values among the bad ones: the default chunk size; without top-k values the teacher is missing, and
# the message names teacher_logits.
BAD_VALID = {("cross_entropy", "chunk_size", "None")}
BAD_ALIASES = {"topk_indices": ("teacher_logits",), "topk_values": ("teacher_logits",)}


@pytest.mark.parametrize("case,arg", [(case, arg) for case, (_, _, kinds) in BAD_CASES.items() for arg in kinds])
def test_bad_argument_raises_naming_it(case, arg):
    from test_bad_arguments import _bad_values, _names_argument

    fn, good, kinds = BAD_CASES[case]
    fn(**good())
    names = (arg, *BAD_ALIASES.get(arg, ()))
    for label, bad in _bad_values(kinds[arg], good()[arg]):
        if (case, arg, label) in BAD_VALID:
            continue
        args = good()
        args[arg] = bad
        with pytest.raises((TypeError, ValueError, NotImplementedError)) as info:
            fn(**args)
        assert _names_argument(str(info.value), names), f"{case}({arg}={label}): {info.value}"
