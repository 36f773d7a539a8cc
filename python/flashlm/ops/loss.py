"""Cross-entropy and KL divergence of a final projection's logits, computed one vocabulary chunk at a time
(flashlm/loss/chunked_loss.h), so that the [tokens, vocab] float logits never exist at once:

    loss = fused_linear_cross_entropy(h, lm_head.weight, targets)            # F.cross_entropy(h @ W.T, targets)
    soft = fused_linear_kl_div(h, W, teacher_logits, temperature=2.0)       # T^2 * KL(teacher || student)
    soft = fused_linear_kl_div(h, W, topk_indices=idx, topk_values=vals)   # teacher's top k, renormalised
    loss = fused_linear_distill_loss(h, W, targets, teacher_logits, alpha=0.5, temperature=2.0)

h [..., d] and the projection weight [V, d] (bias [V] optional): float32, bfloat16 or float16, one dtype. The
logits come from torch's matmul (flashlm has no float GEMM of its own) and are folded, one vocabulary chunk at a
time, into an online logsumexp by the native kernels. Two paths:
- a reduced loss ("mean"/"sum") with a gradient wanted: the loss is a scalar at the end of the graph, so the
  forward computes the gradients too, a block of rows at a time (its [rows, V] f32 logits, ROW_BLOCK_BYTES),
  the kernels writing dL/dlogits over the logits, two GEMMs making dh and dW from them; the backward only scales
  them by the incoming gradient (as Liger-Kernel's fused linear cross-entropy). Torch's three GEMMs, no more.
- per-row losses ("none"), or no gradient wanted (evaluation): the forward keeps no logits, [rows, chunk] at a
  time; the backward, if any, recomputes each chunk's logits (a fourth GEMM).
Teacher logits are constants (no gradient).
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import as_bool, as_float, as_int, as_str, check_optional_tensors, check_tensor
from flashlm.ops._check import check_device, check_same_device
from flashlm.ops._util import cuda_stream, custom_op

# Vocabulary columns per chunk: two [tokens, chunk] f32 buffers live at once (the chunk's logits and its
# dlogits), 16 MiB each at 1024 tokens. Not tuned: at these sizes each chunk GEMM has thousands of columns and
# the step runs at the GEMM's speed (bench/results/loss.md).
DEFAULT_CHUNK = 4096
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")


# ---- the native steps, as torch.library ops (they write their outputs in place) ---------------------------

@custom_op("flashlm::logsumexp_chunk_", mutates_args=("state", "gathered"))
def logsumexp_chunk_(logits: torch.Tensor, start: int, scale: float, state: torch.Tensor,
                     index: Optional[torch.Tensor], gathered: Optional[torch.Tensor]) -> None:
    """Folds a chunk of logits into state [rows, 2] (max, sum); gathers logits at `index` into `gathered`."""
    _C.logsumexp_chunk(logits, start, scale, state, index, gathered, cuda_stream(logits))


@custom_op("flashlm::softmax_chunk_grad_", mutates_args=("dlogits",))
def softmax_chunk_grad_(logits: torch.Tensor, start: int, scale: float, lse: torch.Tensor, coef: torch.Tensor,
                        index: Optional[torch.Tensor], weight: Optional[torch.Tensor], dlogits: torch.Tensor,
                        accumulate: bool) -> None:
    """dlogits (+)= coef * softmax(scale * logits) - weight at index."""
    _C.softmax_chunk_grad(logits, start, scale, lse, coef, index, weight, dlogits, accumulate, cuda_stream(logits))


@custom_op("flashlm::kl_chunk_", mutates_args=("state",))
def kl_chunk_(logits: torch.Tensor, teacher: torch.Tensor, scale: float, reverse: bool, state: torch.Tensor) -> None:
    """Folds a chunk into the running KL state [rows, 5]."""
    _C.kl_chunk(logits, teacher, scale, reverse, state, cuda_stream(logits))


@custom_op("flashlm::kl_chunk_grad_", mutates_args=("dlogits",))
def kl_chunk_grad_(logits: torch.Tensor, teacher: torch.Tensor, scale: float, reverse: bool, stats: torch.Tensor,
                   coef: torch.Tensor, dlogits: torch.Tensor, accumulate: bool) -> None:
    """dlogits (+)= coef * dKL/d(scaled logits)."""
    _C.kl_chunk_grad(logits, teacher, scale, reverse, stats, coef, dlogits, accumulate, cuda_stream(logits))


@custom_op("flashlm::distill_chunk_grad_", mutates_args=("dlogits",))
def distill_chunk_grad_(logits: torch.Tensor, teacher: torch.Tensor, start: int, scale: float, reverse: bool,
                        stats: torch.Tensor, coef: torch.Tensor, lse: torch.Tensor, hard_coef: torch.Tensor,
                        index: Optional[torch.Tensor], weight: Optional[torch.Tensor], dlogits: torch.Tensor) -> None:
    """dlogits = coef * dKL/d(scaled logits) + hard_coef * softmax(logits) - weight at index: both terms' gradient
    in one pass (dlogits may be logits)."""
    _C.distill_chunk_grad(logits, teacher, start, scale, reverse, stats, coef, lse, hard_coef, index, weight, dlogits,
                          cuda_stream(logits))


def _fake_step(logits, *tensors):
    check_same_device(logits=logits, **{f"arg{i}": t for i, t in enumerate(tensors)})


for _op in (logsumexp_chunk_, softmax_chunk_grad_, kl_chunk_, kl_chunk_grad_, distill_chunk_grad_):
    _op.register_fake(lambda logits, *args: _fake_step(logits, *(a for a in args if isinstance(a, torch.Tensor))))


# ---- the chunked losses -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    hard: bool           # cross-entropy on targets
    ignore_index: int
    z_loss: float
    soft: Optional[str]  # "dense", "topk" or None
    temperature: float
    reverse: bool
    chunk: int


class _ChunkLogits:
    """[rows, c1 - c0] f32 logits of vocabulary entries [c0, c1), written into one buffer reused chunk after chunk
    (a fresh [rows, chunk] tensor per chunk is a fresh mmap to fault in)."""

    def __init__(self, h, weight, bias, chunk):
        self.h, self.weight, self.bias = h, weight, bias
        self.buf = torch.empty(h.shape[0] * min(chunk, weight.shape[0]), dtype=h.dtype, device=h.device)

    def __call__(self, c0, c1):
        out = self.buf[:self.h.shape[0] * (c1 - c0)].view(self.h.shape[0], c1 - c0)
        w = self.weight[c0:c1].t()
        if self.bias is None:
            torch.mm(self.h, w, out=out)
        else:
            torch.addmm(self.bias[c0:c1], self.h, w, out=out)
        return out if out.dtype == torch.float32 else out.float()


def _init_state(rows, width, device):
    state = torch.zeros(rows, width, dtype=torch.float32, device=device)
    state[:, 0] = -math.inf
    if width == 5:
        state[:, 2] = -math.inf
    return state


def _lse(state):
    return state[:, 0] + state[:, 1].log()


def _forward(spec, logits_of, rows, vocab, device, targets, teacher, topk_index, topk_values):
    """Per-row hard and soft losses (f32 [rows]; zeros for a part not asked for) and what their gradients need,
    the logits of vocabulary entries [c0, c1) being logits_of(c0, c1) (f32 [rows, c1 - c0])."""
    scale = 1.0 / spec.temperature
    saved = {}
    zeros = torch.zeros(rows, dtype=torch.float32, device=device)
    if spec.hard:
        valid = targets != spec.ignore_index
        tgt = torch.where(valid, targets, -1).unsqueeze(1).contiguous()
        state_h, picked = _init_state(rows, 2, device), torch.zeros(rows, 1, dtype=torch.float32, device=device)
    if spec.soft == "dense":
        state_s = _init_state(rows, 5, device)
    elif spec.soft == "topk":
        state_s = _init_state(rows, 2, device)
        picked_s = torch.zeros(topk_index.shape, dtype=torch.float32, device=device)
    for c0 in range(0, vocab, spec.chunk):
        c1 = min(vocab, c0 + spec.chunk)
        z = logits_of(c0, c1)
        if spec.hard:
            logsumexp_chunk_(z, c0, 1.0, state_h, tgt, picked)
        if spec.soft == "dense":
            kl_chunk_(z, teacher[:, c0:c1].float(), scale, spec.reverse, state_s)
        elif spec.soft == "topk":
            logsumexp_chunk_(z, c0, scale, state_s, topk_index, picked_s)
    hard = soft = zeros
    if spec.hard:
        lse = _lse(state_h)
        hard = torch.where(valid, lse - picked[:, 0] + spec.z_loss * lse * lse, 0.0)
        saved.update(valid=valid, tgt=tgt, lse_h=lse)
    t2 = spec.temperature ** 2
    if spec.soft == "dense":
        lse_s, lse_t = _lse(state_s), state_s[:, 2] + state_s[:, 3].log()
        own = state_s[:, 1] if spec.reverse else state_s[:, 3]
        mean = state_s[:, 4] / own
        soft = t2 * (mean + (lse_t - lse_s if spec.reverse else lse_s - lse_t))
        saved.update(stats=torch.stack([lse_s, lse_t, mean], 1).contiguous())
    elif spec.soft == "topk":
        lse_s = _lse(state_s)
        log_pt = torch.log_softmax(topk_values.float() * scale, dim=1)
        p_t = log_pt.exp()
        cross = (p_t * torch.where(p_t > 0, log_pt - picked_s * scale, 0.0)).sum(1)
        soft = t2 * (cross + lse_s)
        saved.update(lse_s=lse_s, p_t=p_t)
    return hard, soft, saved


def _coefs(spec, saved, g_hard, g_soft):
    """Per-row factors of the logits' gradient, g_hard and g_soft [rows] being dL/d(each row's hard and soft
    loss)."""
    coefs = {}
    if spec.hard:
        g = torch.where(saved["valid"], g_hard.float(), 0.0)
        coefs.update(hard=(g * (1 + 2 * spec.z_loss * saved["lse_h"])).contiguous(), target=g.unsqueeze(1).contiguous())
    if spec.soft:
        coefs["soft"] = (g_soft.float() * spec.temperature).contiguous()  # T^2 * d/d(logits / T)
        if spec.soft == "topk":
            coefs["topk"] = (coefs["soft"].unsqueeze(1) * saved["p_t"]).contiguous()
    return coefs


def _chunk_grad(spec, saved, coefs, z, c0, teacher, topk_index, dl):
    """dL/dlogits of vocabulary entries [c0, c0 + cols) into dl; dl may be z itself where one term writes it
    (the kernels read each element before they write it)."""
    scale, c1 = 1.0 / spec.temperature, c0 + z.shape[1]
    if spec.hard and spec.soft == "dense":  # one pass for both terms
        distill_chunk_grad_(z, teacher[:, c0:c1].float(), c0, scale, spec.reverse, saved["stats"], coefs["soft"],
                            saved["lse_h"], coefs["hard"], saved["tgt"], coefs["target"], dl)
        return
    if spec.hard:
        softmax_chunk_grad_(z, c0, 1.0, saved["lse_h"], coefs["hard"], saved["tgt"], coefs["target"], dl, False)
    if spec.soft == "dense":
        kl_chunk_grad_(z, teacher[:, c0:c1].float(), scale, spec.reverse, saved["stats"], coefs["soft"], dl,
                       spec.hard)
    elif spec.soft == "topk":
        softmax_chunk_grad_(z, c0, scale, saved["lse_s"], coefs["soft"], topk_index, coefs["topk"], dl, spec.hard)


def _backward(spec, saved, g_hard, g_soft, h, weight, bias, teacher, topk_index, needs):
    """The gradients of per-row losses: each chunk's logits recomputed (the fourth GEMM)."""
    rows, vocab = h.shape[0], weight.shape[0]
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if needs[0] else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs[1] else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if needs[2] else None
    coefs = _coefs(spec, saved, g_hard, g_soft)
    buf = torch.empty(rows, min(spec.chunk, vocab), dtype=torch.float32, device=h.device)
    chunk_logits = _ChunkLogits(h, weight, bias, spec.chunk)
    for c0 in range(0, vocab, spec.chunk):
        c1 = min(vocab, c0 + spec.chunk)
        dl = buf[:, :c1 - c0]
        _chunk_grad(spec, saved, coefs, chunk_logits(c0, c1), c0, teacher, topk_index, dl)
        dl = dl if h.dtype == torch.float32 else dl.to(h.dtype)
        if dh is not None:  # accumulated in f32 over the chunks
            if dl.dtype == torch.float32:
                dh.addmm_(dl, weight[c0:c1])
            else:
                dh.add_(torch.mm(dl, weight[c0:c1]))
        if dw is not None:
            torch.mm(dl.t(), h, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = dl.sum(0)
    return (dh.to(h.dtype) if dh is not None else None), dw, db


class _ChunkedLinearLoss(torch.autograd.Function):
    """Per-row losses (reduction "none", or no gradient wanted): the forward keeps no logits, the backward
    recomputes them."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, teacher, topk_index, topk_values, spec):
        logits_of = _ChunkLogits(h, weight, bias, spec.chunk)
        hard, soft, saved = _forward(spec, logits_of, h.shape[0], weight.shape[0], h.device, targets, teacher,
                                     topk_index, topk_values)
        ctx.spec, ctx.saved = spec, saved
        ctx.save_for_backward(h, weight, bias, teacher, topk_index)
        return hard, soft

    @staticmethod
    def backward(ctx, g_hard, g_soft):
        h, weight, bias, teacher, topk_index = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        dh, dw, db = _backward(ctx.spec, ctx.saved, g_hard, g_soft, h, weight, bias, teacher, topk_index, needs)
        return dh, dw, db, None, None, None, None, None


# ---- the one-pass path: a reduced loss whose gradients the forward computes ---------------------------------

# Bytes of the one-pass path's large buffer (two for cross-entropy with a top-k teacher), a block of rows'
# logits [rows, V] f32 (overwritten by their gradient): 64 MiB is 110 rows at vocab 151936, 512 at 32000. More
# rows per block make the dW update (dW += dlogits^T @ h_block, which reads and writes all of dW [V, d]) a bigger
# GEMM: 128 MiB measured 6-9% less CPU time at 152k (bench/results/loss.md), but takes the memory at 152k to the
# edge of 1/4 of torch eager's peak; fewer rows, less memory.
ROW_BLOCK_BYTES = 64 << 20


def _row_block(rows, vocab):
    return max(1, min(rows, ROW_BLOCK_BYTES // (4 * vocab)))


def _project(h, weight, bias, out, low):
    """out (f32 [rows, V]) = h @ weight.T + bias, through low (h's dtype, same size) when h is not f32."""
    dst = out if low is None else low
    if bias is None:
        torch.mm(h, weight.t(), out=dst)
    else:
        torch.addmm(bias, h, weight.t(), out=dst)
    if low is not None:
        out.copy_(low)


def _weighted_sum(per_row, w):
    """sum of w * per_row over the rows where w != 0 (a row that does not count adds 0, even a NaN)."""
    return torch.where(w != 0, w * per_row, 0.0).sum()


def _add_grads(dl, c0, hb, weight, dh, dw, db, first_block, low_buf):
    """Adds what dL/dlogits dl [n, cols] of vocabulary entries [c0, c0 + cols) for the rows hb [n, d] gives:
    dh (f32 or h's dtype, [n, d]) += dl @ weight[c0:c1] (set at c0 = 0), dw[c0:c1] += dl^T @ hb (set in the first
    block) and db[c0:c1] += dl.sum(0). The GEMMs run in h's dtype (dl converted through low_buf)."""
    c1 = c0 + dl.shape[1]
    if db is not None:
        db[c0:c1] += dl.sum(0)
    g = dl if low_buf is None else low_buf[:dl.numel()].view(dl.shape).copy_(dl)
    if dh is not None:
        _add_product(dh, g, weight[c0:c1], c0 == 0)
    if dw is not None:
        _add_product(dw[c0:c1], g.t(), hb, first_block)


def _add_product(out, a, b, first):
    """out (=)+= a @ b: set when first; through a temporary where out's dtype is not a's (an f32 sum of bf16)."""
    if out.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(torch.mm(a, b))
    else:
        out.add_(torch.mm(a, b))


def _forward_with_grads(spec, h, weight, bias, targets, teacher, topk_index, topk_values, w_hard, w_soft, needs):
    """sum over rows of w_hard * hard + w_soft * soft, and its gradients for h, weight and bias (those `needs`
    asks for). Block of rows by block: its logits [n, V] in one GEMM, the losses folded over whole rows, then
    dL/dlogits written over the logits (both terms by one kernel with a dense teacher), turned into dh and dW by
    two GEMMs: torch's three GEMMs and no recomputation, for one [n, V] f32 buffer (ROW_BLOCK_BYTES), two for
    cross-entropy with a top-k teacher (its two kernels each read the logits). A low-precision teacher goes
    chunk by chunk (each chunk converted to f32). The kernels cover the whole block before the GEMMs:
    alternating flashlm's pool and torch's chunk by chunk, or copying a chunk's gradient back into the logits'
    strided columns with torch, cost seconds a block at 152k on a loaded 2-core machine (each pool waiting for
    threads the other holds)."""
    rows, vocab, dev, f32 = h.shape[0], weight.shape[0], h.device, torch.float32
    block = _row_block(rows, vocab)
    several = block < rows
    dh = torch.empty(h.shape, dtype=h.dtype, device=dev) if needs[0] else None
    dw_dtype = f32 if several else weight.dtype  # several blocks add up in f32
    dw = torch.empty(weight.shape, dtype=dw_dtype, device=dev) if needs[1] else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if needs[2] else None
    dh32 = torch.empty(block, h.shape[1], dtype=f32, device=dev) if needs[0] and h.dtype != f32 else None
    z_buf = torch.empty(block * vocab, dtype=f32, device=dev)
    low_buf = torch.empty(block * vocab, dtype=h.dtype, device=dev) if h.dtype != f32 else None
    # Cross-entropy with top-k KL: two kernels each read the logits, so the gradient goes to a second buffer;
    # with the dense KL one kernel writes both terms' gradient over the logits.
    two_passes = spec.hard and spec.soft == "topk"
    tmp = torch.empty(block * vocab, dtype=f32, device=dev) if two_passes else None
    if teacher is None or teacher.dtype == f32:
        # The logits exist whole: each kernel takes a block's full rows in one call (38 calls a block fewer at
        # 152k, each a hand-off between torch's threads and flashlm's pool); a low-precision teacher still goes
        # chunk by chunk, each chunk converted to f32.
        spec = replace(spec, chunk=vocab)
    total = torch.zeros((), dtype=f32, device=dev)
    zero_w = torch.zeros(rows, dtype=f32, device=dev)
    w_hard = zero_w if w_hard is None else w_hard
    w_soft = zero_w if w_soft is None else w_soft
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        n, hb = r1 - r0, h[r0:r1]
        part = lambda t: None if t is None else t[r0:r1]  # noqa: E731
        z = z_buf[:n * vocab].view(n, vocab)
        low = None if low_buf is None else low_buf[:n * vocab].view(n, vocab)
        _project(hb, weight, bias, z, low)
        teacher_b, index_b = part(teacher), part(topk_index)
        hard, soft, saved = _forward(spec, lambda c0, c1: z[:, c0:c1], n, vocab, dev, part(targets), teacher_b,
                                     index_b, part(topk_values))
        wh, ws = w_hard[r0:r1], w_soft[r0:r1]
        total += _weighted_sum(hard, wh) + _weighted_sum(soft, ws)
        coefs = _coefs(spec, saved, wh, ws)
        dh_b = None if dh is None else dh[r0:r1] if dh32 is None else dh32[:n]
        # The gradient overwrites the logits (each element is read before it is written), or goes to tmp.
        dl = z if tmp is None else tmp[:n * vocab].view(n, vocab)
        for c0 in range(0, vocab, spec.chunk):
            c1 = min(vocab, c0 + spec.chunk)
            _chunk_grad(spec, saved, coefs, z[:, c0:c1], c0, teacher_b, index_b, dl[:, c0:c1])
        _add_grads(dl, 0, hb, weight, dh_b, dw, db, r0 == 0, low_buf)
        if dh32 is not None:
            dh[r0:r1].copy_(dh_b)
    return (total, dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))


class _FusedLinearLoss(torch.autograd.Function):
    """sum over rows of w_hard * hard + w_soft * soft (the row weights are constants: a mean's 1/count, alpha,
    the mask), its gradients made in the forward; the backward only scales them by the incoming gradient, as
    the loss is a scalar at the end of the graph. The gradients are handed over once (not a graph to run
    backward through twice)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, teacher, topk_index, topk_values, w_hard, w_soft, spec):
        needs = ctx.needs_input_grad[:3]
        total, *ctx.grads = _forward_with_grads(spec, h, weight, bias, targets, teacher, topk_index, topk_values,
                                                w_hard, w_soft, needs)
        return total

    @staticmethod
    def backward(ctx, g):
        grads, ctx.grads = ctx.grads, None  # released: autograd can take the tensors over without a copy
        if grads is None:
            raise RuntimeError("fused linear loss: backward through it runs once (its gradients were made in the "
                               "forward and are handed over)")
        if not bool(g == 1):
            grads = [None if t is None else t.mul_(g.to(t.dtype)) for t in grads]
        return (*grads, None, None, None, None, None, None, None)


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _row_weights(keep, reduction):
    """Each row's weight in a "mean" (1 / count where it counts) or a "sum" (1 where it counts)."""
    w = keep.float()
    return w / keep.sum().clamp(min=1) if reduction == "mean" else w


def _finish(total, keep, reduction):
    """A mean over no rows is NaN, as torch's."""
    return torch.where(keep.any(), total, math.nan) if reduction == "mean" else total


# ---- argument checks ---------------------------------------------------------------------------------------

def _check_projection(h, weight, bias):
    """h [..., d] as [rows, d]; weight [V, d]; bias [V] or None: one floating dtype, one device."""
    check_tensor(h, "h", min_ndim=1)
    check_tensor(weight, "weight", 2, "[vocab, d]")
    check_optional_tensors("bias", bias)
    for name, t in (("h", h), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(t, name)
            if t.dtype not in _FLOATS:
                raise ValueError(f"{name}: dtype must be float32, bfloat16 or float16, got {t.dtype}")
    if weight.dtype != h.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from h's {h.dtype}")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight: shape {list(weight.shape)} does not match h's d = {h.shape[-1]}")
    if weight.shape[0] < 1:
        raise ValueError("weight: the vocabulary (its first dimension) is empty")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.dtype != h.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} differs from h's {h.dtype}")
    check_same_device(h=h, weight=weight, bias=bias)
    return h.reshape(-1, h.shape[-1])


def _check_targets(targets, lead, vocab, ignore_index, name="targets"):
    check_tensor(targets, name)
    check_device(targets, name)
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name}: expected an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"{name}: shape {list(targets.shape)} differs from h's leading shape {list(lead)}")
    targets = targets.reshape(-1).long()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        at = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name}[{at}]: {int(targets[at])} is outside [0, {vocab}) and not ignore_index "
                         f"({ignore_index})")
    return targets


def _check_teacher(teacher, topk_indices, topk_values, rows, lead, vocab, reverse):
    """The teacher as ("dense", logits [rows, V]) or ("topk", indices [rows, k], values [rows, k])."""
    if teacher is not None:
        if topk_indices is not None or topk_values is not None:
            raise ValueError("teacher_logits: give either teacher_logits or topk_indices/topk_values, not both")
        check_tensor(teacher, "teacher_logits", min_ndim=1)
        check_device(teacher, "teacher_logits")
        if teacher.dtype not in _FLOATS:
            raise ValueError(f"teacher_logits: dtype must be float32, bfloat16 or float16, got {teacher.dtype}")
        if tuple(teacher.shape) != (*lead, vocab):
            raise ValueError(f"teacher_logits: expected shape {[*lead, vocab]}, got {list(teacher.shape)}")
        teacher = teacher.detach().reshape(rows, vocab)
        if teacher.stride(-1) != 1:
            teacher = teacher.contiguous()
        return "dense", teacher, None, None
    if topk_indices is None or topk_values is None:
        raise ValueError("teacher_logits: no teacher given (teacher_logits, or topk_indices with topk_values)")
    if reverse:
        raise NotImplementedError("reverse: reverse KL needs the teacher's whole distribution; top-k teacher "
                                  "logits give it no mass outside the k tokens (the KL is infinite)")
    check_tensor(topk_values, "topk_values", min_ndim=1)
    check_device(topk_values, "topk_values")
    if topk_values.dtype not in _FLOATS:
        raise ValueError(f"topk_values: dtype must be float32, bfloat16 or float16, got {topk_values.dtype}")
    if tuple(topk_values.shape[:-1]) != tuple(lead) or topk_values.shape[-1] < 1:
        raise ValueError(f"topk_values: expected shape {[*lead, 'k']} with k >= 1, got {list(topk_values.shape)}")
    k = topk_values.shape[-1]
    check_tensor(topk_indices, "topk_indices")
    if tuple(topk_indices.shape) != tuple(topk_values.shape):
        raise ValueError(f"topk_indices: shape {list(topk_indices.shape)} differs from topk_values' "
                         f"{list(topk_values.shape)}")
    index = _check_targets(topk_indices, topk_values.shape, vocab, ignore_index=-1, name="topk_indices")
    if bool((index < 0).any()):
        raise ValueError(f"topk_indices: every index must be in [0, {vocab})")
    return "topk", None, index.reshape(rows, k).contiguous(), topk_values.detach().reshape(rows, k)


def _reduce(per_row, weight_rows, reduction):
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / weight_rows


def _options(temperature, chunk_size, reduction):
    temperature = as_float(temperature, "temperature")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")
    chunk = DEFAULT_CHUNK if chunk_size is None else as_int(chunk_size, "chunk_size", 1)
    if as_str(reduction, "reduction") not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    return temperature, chunk


def _hard_options(ignore_index, z_loss):
    ignore_index = as_int(ignore_index, "ignore_index")
    z_loss = as_float(z_loss, "z_loss")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss: must be finite and >= 0, got {z_loss}")
    return ignore_index, z_loss


# ---- the public functions ----------------------------------------------------------------------------------

def fused_linear_cross_entropy(h, weight, targets, bias=None, *, ignore_index: int = -100, z_loss: float = 0.0,
                               reduction: str = "mean", chunk_size: Optional[int] = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T + bias, targets, ignore_index=..., reduction=...) plus, per token,
    z_loss * logsumexp(logits)^2 (PaLM's z-loss), without the [tokens, V] logits. Shape of targets: h's leading
    shape; "mean" is over the tokens not ignored (NaN when there are none, as torch)."""
    rows2d = _check_projection(h, weight, bias)
    _, chunk = _options(1.0, chunk_size, reduction)
    ignore_index, z_loss = _hard_options(ignore_index, z_loss)
    targets = _check_targets(targets, h.shape[:-1], weight.shape[0], ignore_index)
    check_same_device(h=h, targets=targets)
    spec = _Spec(True, ignore_index, z_loss, None, 1.0, False, chunk)
    if reduction != "none" and _wants_grad(h, weight, bias):
        valid = targets != ignore_index
        total = _FusedLinearLoss.apply(rows2d, weight, bias, targets, None, None, None,
                                       _row_weights(valid, reduction), None, spec)
        return _finish(total, valid, reduction)
    hard, _ = _ChunkedLinearLoss.apply(rows2d, weight, bias, targets, None, None, None, spec)
    hard = hard.reshape(h.shape[:-1])
    return _reduce(hard, (targets != ignore_index).sum(), reduction)


def fused_linear_kl_div(h, weight, teacher_logits=None, bias=None, *, topk_indices=None, topk_values=None,
                        temperature: float = 1.0, reverse: bool = False, mask=None, reduction: str = "mean",
                        chunk_size: Optional[int] = None) -> torch.Tensor:
    """Hinton's soft loss per token: T^2 * KL(softmax(teacher / T) || softmax(student / T)) with student logits
    h @ weight.T + bias, or KL(student || teacher) with `reverse`. The teacher: logits [..., V], or its top k
    tokens (topk_indices, topk_values [..., k]; the teacher's distribution renormalised over them). `mask`
    (bool, h's leading shape): the tokens that count; "mean" is over them."""
    rows2d = _check_projection(h, weight, bias)
    temperature, chunk = _options(temperature, chunk_size, reduction)
    reverse = as_bool(reverse, "reverse")
    lead, rows, vocab = h.shape[:-1], rows2d.shape[0], weight.shape[0]
    kind, teacher, index, values = _check_teacher(teacher_logits, topk_indices, topk_values, rows, lead, vocab,
                                                  reverse)
    check_same_device(h=h, teacher_logits=teacher, topk_indices=index, topk_values=values)
    keep = _check_mask(mask, lead, h.device)
    spec = _Spec(False, 0, 0.0, kind, temperature, reverse, chunk)
    if reduction != "none" and _wants_grad(h, weight, bias):
        counted = torch.ones(rows, dtype=torch.bool, device=h.device) if keep is None else keep.reshape(rows)
        total = _FusedLinearLoss.apply(rows2d, weight, bias, None, teacher, index, values, None,
                                       _row_weights(counted, reduction), spec)
        return _finish(total, counted, reduction)
    _, soft = _ChunkedLinearLoss.apply(rows2d, weight, bias, None, teacher, index, values, spec)
    soft = soft.reshape(lead)
    if keep is None:
        return _reduce(soft, soft.numel(), reduction)
    soft = torch.where(keep, soft, 0.0)
    return _reduce(soft, keep.sum(), reduction)


def fused_linear_distill_loss(h, weight, targets, teacher_logits=None, bias=None, *, topk_indices=None,
                              topk_values=None, alpha: float = 0.5, temperature: float = 1.0, reverse: bool = False,
                              ignore_index: int = -100, z_loss: float = 0.0, reduction: str = "mean",
                              chunk_size: Optional[int] = None) -> torch.Tensor:
    """alpha * soft + (1 - alpha) * hard, per token: fused_linear_kl_div's soft loss and
    fused_linear_cross_entropy's hard loss, from one pass over the vocabulary. Tokens whose target is
    ignore_index count in neither; "mean" is over the others."""
    rows2d = _check_projection(h, weight, bias)
    temperature, chunk = _options(temperature, chunk_size, reduction)
    reverse = as_bool(reverse, "reverse")
    alpha = as_float(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    ignore_index, z_loss = _hard_options(ignore_index, z_loss)
    lead, rows, vocab = h.shape[:-1], rows2d.shape[0], weight.shape[0]
    targets = _check_targets(targets, lead, vocab, ignore_index)
    kind, teacher, index, values = _check_teacher(teacher_logits, topk_indices, topk_values, rows, lead, vocab,
                                                  reverse)
    check_same_device(h=h, targets=targets, teacher_logits=teacher, topk_indices=index, topk_values=values)
    spec = _Spec(True, ignore_index, z_loss, kind, temperature, reverse, chunk)
    valid = targets != ignore_index
    if reduction != "none" and _wants_grad(h, weight, bias):
        w = _row_weights(valid, reduction)
        total = _FusedLinearLoss.apply(rows2d, weight, bias, targets, teacher, index, values, (1.0 - alpha) * w,
                                       alpha * w, spec)
        return _finish(total, valid, reduction)
    hard, soft = _ChunkedLinearLoss.apply(rows2d, weight, bias, targets, teacher, index, values, spec)
    per_row = (alpha * torch.where(valid, soft, 0.0) + (1.0 - alpha) * hard).reshape(lead)
    return _reduce(per_row, valid.sum(), reduction)


def _check_mask(mask, lead, device):
    if mask is None:
        return None
    check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask: shape {list(mask.shape)} differs from h's leading shape {list(lead)}")
    check_same_device(h=torch.empty(0, device=device), mask=mask)
    return mask
