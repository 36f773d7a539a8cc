"""Flash attention, layered as in flash-attn: raw native calls -> torch.library custom ops (with fake
implementations, so they trace under torch.compile, and autograd) -> the public functions in
flashlm.ops.flash_attn_interface, whose signatures are flash-attn 2's.

Layout: q [batch, seqlen_q, heads, head_dim], k/v [batch, seqlen_k, kv_heads, head_dim] (heads % kv_heads == 0),
or packed [total, heads, head_dim] with int32 cu_seqlens. The row logsumexp is float32 [batch, heads, seqlen_q]
(packed: [heads, total_q]). Optional ALiBi slopes (float32 [heads] or [batch, heads], contiguous; CPU only) add
-slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key j. Rows of a packed batch outside every sequence (before cu_seqlens[0], from
cu_seqlens[-1] on) are rows that see no key: out 0, lse +inf, gradients 0.

forward_op and backward_op are the registered ops (torch.ops.flashlm.flash_attn_forward, ...), which eager
callers, training included, reach without the dispatcher (flashlm.ops._util.EagerOp); the public
flash_attn_forward and flash_attn_backward check their arguments first, so that a wrong type is a TypeError
naming the argument rather than the dispatcher's schema error (flash_attn_interface checks its own and calls
forward_op).
"""

import math
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import (as_float, as_int, check_optional_tensors, check_same_device, check_tensor,
                                check_tensors, contiguous, contiguous_last, is_large, new_output)
from flashlm.ops._util import backward_call, cuda_stream, custom_op

MAX_HEAD_DIM = 256  # the kernels' largest head_dim, on the CPU and on CUDA


def _lse_shape(q: torch.Tensor, packed: bool) -> tuple:
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def _forward_outputs(q: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for q (the fake implementation's)."""
    if packed:
        check_tensor(q, "q", 3, "[total_q, heads, head_dim]")
    else:
        check_tensor(q, "q", 4, "[batch, seqlen_q, heads, head_dim]")
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(_lse_shape(q, packed), dtype=torch.float32, device=q.device))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> None:
    """The shape relations of q, k and v that cost nothing to check, checked before a large copy or output is
    made for them (a stride-0 view of 2^32 rows costs nothing to make and terabytes to copy). The native
    checks, which see the tensors only after, check them all."""
    layout = "[total, heads, head_dim]" if packed else "[batch, seqlen, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, 3 if packed else 4, layout)
    head_dim = q.shape[-1]
    if head_dim < 1:
        raise ValueError(f"q: head_dim must be >= 1, got shape {list(q.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {head_dim} is above the kernels' {MAX_HEAD_DIM}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's {head_dim}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch {k.shape[0]} differs from q's {q.shape[0]}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {list(k.shape)} (k's), got {list(v.shape)}")


def _check_like(t: torch.Tensor, name: str, shape, layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {layout} = {list(shape)}, got {list(t.shape)}")


def _unsigned(seed: int, offset: int) -> tuple[int, int]:
    """The op schema's int64 seed and offset as the kernels' uint64 (torch's CUDA seeds use all 64 bits)."""
    return seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF


def _fill_outside(cu_seqlens: torch.Tensor, *rows) -> None:
    """For each (t, dim, value) of rows, sets the rows of t along `dim` outside every sequence of cu_seqlens (a CPU
    tensor the kernels have checked) to `value`."""
    offsets = cu_seqlens.numpy()  # no copy: two values, where indexing the tensor twice takes microseconds
    first, last = int(offsets[0]), int(offsets[-1])
    for t, dim, value in rows:
        if first > 0:
            t.narrow(dim, 0, first).fill_(value)
        if last < t.shape[dim]:
            t.narrow(dim, last, t.shape[dim] - last).fill_(value)


@custom_op("flashlm::flash_attn_forward", mutates_args=())
def forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    version: int,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    philox_seed: int = 0,
    philox_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    packed = cu_seqlens_q is not None
    if is_large(q) or is_large(k) or is_large(v):
        _check_inputs(q, k, v, packed)
    q, k, v = contiguous_last(q, "q"), contiguous_last(k, "k"), contiguous_last(v, "v")
    # Rows outside every sequence: filled first on CUDA (reading cu_seqlens there would synchronize), after the
    # kernel on the CPU, only those rows.
    device = q.device
    fill_first = packed and device.type != "cpu"
    out = new_output(q.shape, q.dtype, device, "q", 0.0 if fill_first else None)
    lse = new_output(_lse_shape(q, packed), torch.float32, device, "q", math.inf if fill_first else None)
    _C.flash_attention_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, window_left, window_right, softcap, version, cuda_stream(q),
                               alibi_slopes, dropout_p, *_unsigned(philox_seed, philox_offset))
    if packed and q.is_cpu:
        _fill_outside(cu_seqlens_q, (out, 0, 0.0), (lse, 1, math.inf))
    return out, lse


@forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, version, alibi_slopes=None, dropout_p=0.0, philox_seed=0, philox_offset=0):
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    return _forward_outputs(q, cu_seqlens_q is not None)


@custom_op("flashlm::flash_attn_backward", mutates_args=())
def backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    philox_seed: int = 0,
    philox_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = cu_seqlens_q is not None
    if any(is_large(t) for t in (dout, q, k, v, out, lse)):
        _check_inputs(q, k, v, packed)
        layout = "[total_q, heads, head_dim]" if packed else "[batch, seqlen_q, heads, head_dim]"
        for name, t in (("dout", dout), ("out", out)):
            _check_like(t, name, q.shape, f"{layout} (q's)")
        _check_like(lse, "lse", _lse_shape(q, packed), "[heads, total_q]" if packed else "[batch, heads, seqlen_q]")
    dout, q, k, v, out = (contiguous_last(t, n) for t, n in ((dout, "dout"), (q, "q"), (k, "k"), (v, "v"),
                                                              (out, "out")))
    fill_first = packed and not q.is_cpu  # rows outside every sequence, as in the forward
    dq, dk, dv = (new_output(t.shape, t.dtype, t.device, name, 0.0 if fill_first else None)
                  for t, name in ((q, "q"), (k, "k"), (v, "v")))
    delta = new_output(lse.shape, torch.float32, lse.device, "lse")
    _C.flash_attention_backward(dout, q, k, v, out, contiguous(lse, "lse"), dq, dk, dv, delta, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                                window_right, softcap, cuda_stream(q), alibi_slopes, dropout_p,
                                *_unsigned(philox_seed, philox_offset))
    if packed and q.is_cpu:
        _fill_outside(cu_seqlens_q, (dq, 0, 0.0))
        _fill_outside(cu_seqlens_k, (dk, 0, 0.0), (dv, 0, 0.0))
    return dq, dk, dv


@backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes=None, dropout_p=0.0, philox_seed=0, philox_offset=0):
    check_same_device(q=q, dout=dout, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      alibi_slopes=alibi_slopes)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Autograd through the forward op: the backward recomputes P from q, k and the saved logsumexp, and the dropout
# mask from the saved seed and offset.

def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    # cu_seqlens_q ... softcap, then alibi_slopes and dropout's (the backward has no `version`)
    ctx.options = inputs[3:12] + inputs[13:]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # The logsumexp is an auxiliary output (as in flash-attn): gradients flow through `out` only.
    dq, dk, dv = backward_call(ctx, backward_op, dout, q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * 14  # the slopes and the dropout arguments are constants: no gradient


# eager=True: eager training calls skip the dispatcher's autograd layer. A causal forward + backward on a
# [2, 8, 4, 64] batch (one thread, CPU time) cost 499 us through it, 255 us without, SDPA 197-207 us: about
# 1 ms a step of a 4-layer model.
forward_op.register_autograd(_backward, setup_context=_setup_context, eager=True)


# The public names: the ops, their arguments checked first.

def _checked_options(max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap) -> tuple:
    return (as_int(max_seqlen_q, "max_seqlen_q", 0), as_int(max_seqlen_k, "max_seqlen_k", 0),
            as_float(softmax_scale, "softmax_scale"), bool(causal), as_int(window_left, "window_left", -1),
            as_int(window_right, "window_right", -1), as_float(softcap, "softcap"))


def _checked_dropout(dropout_p, philox_seed, philox_offset) -> tuple:
    return (check_dropout_p(dropout_p), as_int(philox_seed, "philox_seed"), as_int(philox_offset, "philox_offset"))


def flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, version, alibi_slopes=None, dropout_p=0.0, philox_seed=0,
                       philox_offset=0):
    """Attention forward: returns (out, lse). cu_seqlens_q/k (int32 [batch + 1]) make q, k, v packed batches;
    window sides are -1 (unbounded) or more; version 1 or 2 picks the loop order (flash_attn_interface).
    dropout_p in [0, 1) drops P's elements by the Philox draw of (philox_seed, philox_offset) (dropout_mask)."""
    check_tensors("q k v", q, k, v)
    check_optional_tensors("cu_seqlens_q cu_seqlens_k alibi_slopes", cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    version = as_int(version, "version")
    if version not in (1, 2):
        raise ValueError(f"version: must be 1 or 2, got {version}")
    options = _checked_options(max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    return forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, *options, version, alibi_slopes,
                      *_checked_dropout(dropout_p, philox_seed, philox_offset))


def flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, window_left, window_right, softcap, alibi_slopes=None, dropout_p=0.0, philox_seed=0,
                        philox_offset=0):
    """Attention backward (FlashAttention-2) from the forward's out and lse: returns (dq, dk, dv). The dropout
    arguments are the forward's: the mask is drawn again, never stored."""
    check_tensors("dout q k v out lse", dout, q, k, v, out, lse)
    check_optional_tensors("cu_seqlens_q cu_seqlens_k alibi_slopes", cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    options = _checked_options(max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    return backward_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *options, alibi_slopes,
                       *_checked_dropout(dropout_p, philox_seed, philox_offset))


# Dropout: the kernels draw the mask from a Philox4x32-10 counter (csrc/attention/shared_dropout.h), so a seed
# and an offset are all a forward pass and its backward share.

def check_dropout_p(dropout_p) -> float:
    """dropout_p as a float in [0, 1)."""
    p = as_float(dropout_p, "dropout_p")
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p: must be in [0, 1), got {p}")
    return p


def philox_state(device, draws: int, generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """(seed, offset) for a dropout call on `device` that draws `draws` (batch * heads) Philox subsequences,
    taken from `generator` or the device's default generator, so that torch.manual_seed makes runs repeat.
    CUDA generators are Philox themselves: their seed, and their offset, advanced past this call's draws as
    flash-attn advances it. The CPU generator (a Mersenne twister) gives a fresh 63-bit seed per call, offset 0."""
    device = torch.device(device)
    if generator is None:
        if device.type == "cuda":
            generator = torch.cuda.default_generators[device.index if device.index is not None
                                                      else torch.cuda.current_device()]
        else:
            generator = torch.default_generator
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator: on {generator.device}, the tensors are on {device}")
    if device.type == "cuda":
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + (draws + 3) // 4 * 4)  # torch keeps CUDA offsets multiples of 4
        return seed - (1 << 64) if seed >= 1 << 63 else seed, offset  # the op schema's int64
    seed = int(torch.randint(0, 1 << 62, (), generator=generator))
    return seed, 0


def dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, philox_seed: int,
                 philox_offset: int) -> torch.Tensor:
    """The keep mask (bool [batch, heads, seqlen_q, seqlen_k], CPU) that a forward pass with these dropout
    arguments applies: element (b, h, i, j) is row i and column j of sequence b's own (packed batches too).
    The same on every device and kernel."""
    shape = tuple(as_int(n, name, 0) for n, name in ((batch, "batch"), (heads, "heads"), (seqlen_q, "seqlen_q"),
                                                      (seqlen_k, "seqlen_k")))
    p = check_dropout_p(dropout_p)
    mask = torch.empty(shape, dtype=torch.uint8)
    _C.flash_attention_dropout_mask(mask, p, *_unsigned(as_int(philox_seed, "philox_seed"),
                                                        as_int(philox_offset, "philox_offset")))
    return mask.bool()
