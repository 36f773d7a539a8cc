"""Flash attention, layered as in flash-attn: raw native calls -> torch.library custom ops (with fake
implementations, so they trace under torch.compile, and autograd) -> the public functions in
flashlm.ops.flash_attn_interface, whose signatures are flash-attn 2's.

Layout: q [batch, seqlen_q, heads, head_dim], k/v [batch, seqlen_k, kv_heads, head_dim] (heads % kv_heads == 0),
or packed [total, heads, head_dim] with int32 cu_seqlens. The row logsumexp is float32 [batch, heads, seqlen_q]
(packed: [heads, total_q]).
"""

from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import check_same_device, check_tensor
from flashlm.ops._util import cuda_stream


def _forward_outputs(q: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for q: out like q, lse float32 [batch, heads, seqlen_q] or, packed, [heads, total_q]."""
    if packed:
        check_tensor(q, "q", 3, "[total_q, heads, head_dim]")
    else:
        check_tensor(q, "q", 4, "[batch, seqlen_q, heads, head_dim]")
    lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(lse_shape, dtype=torch.float32, device=q.device))


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any batch/row/head strides but need each head's vector contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("flashlm::flash_attn_forward", mutates_args=(), device_types=("cpu", "cuda"))
def flash_attn_forward(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward: returns (out, lse)."""
    q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
    out, lse = _forward_outputs(q, cu_seqlens_q is not None)
    _C.flash_attention_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal, window_left, window_right, softcap, version, cuda_stream(q))
    return out, lse


@flash_attn_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, version):
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return _forward_outputs(q, cu_seqlens_q is not None)


@torch.library.custom_op("flashlm::flash_attn_backward", mutates_args=(), device_types=("cpu", "cuda"))
def flash_attn_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward (FlashAttention-2): returns (dq, dk, dv)."""
    dout, q, k, v, out = (_contiguous_last(t) for t in (dout, q, k, v, out))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    _C.flash_attention_backward(dout, q, k, v, out, lse.contiguous(), dq, dk, dv, delta, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                                cuda_stream(q))
    return dq, dk, dv


@flash_attn_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap):
    check_same_device(q=q, dout=dout, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Autograd through the forward op: the backward recomputes P from q, k and the saved logsumexp.

def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = inputs[3:12]  # cu_seqlens_q ... softcap (the backward has no `version`)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # The logsumexp is an auxiliary output (as in flash-attn): gradients flow through `out` only.
    dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("flashlm::flash_attn_forward", _backward, setup_context=_setup_context)
