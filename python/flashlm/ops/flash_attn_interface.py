"""flash-attn 2's public functions on flashlm's kernels: switching is a change of import,

    from flashlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Same arguments and return values, plus one keyword of flashlm's own: `version=1|2` picks the forward loop
order (FlashAttention-1: K/V blocks outer; FlashAttention-2, the default: Q blocks outer). Inputs are
float32/bfloat16 on the CPU and float16/bfloat16 on CUDA. What flashlm does not implement raises instead of
being ignored: dropout_p > 0, alibi_slopes and block_table raise NotImplementedError. The backward pass is
always deterministic, so `deterministic` is accepted and has nothing to switch. With return_attn_probs the
third value is None: flash-attn returns the dropout mask there, and there is no dropout.
"""

import torch

from flashlm.ops.attention import flash_attn_forward

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
]


def _check_unsupported(dropout_p, alibi_slopes, block_table=None):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: flashlm's attention has no dropout; pass 0.0 (got {dropout_p})")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported by flashlm's attention")
    if block_table is not None:
        raise NotImplementedError("block_table: paged K/V is not supported by flash_attn_varlen_func")


def _options(q, softmax_scale, window_size, version):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected a pair of ints (left, right), got {window_size!r}") from None
    if version not in (1, 2):
        raise ValueError(f"version: must be 1 or 2, got {version!r}")
    return float(softmax_scale), left, right


def _check_tensors(**tensors):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, version=2):
    """q: [batch, seqlen_q, heads, head_dim]; k, v: [batch, seqlen_k, kv_heads, head_dim].

    Returns out [batch, seqlen_q, heads, head_dim]; with return_attn_probs, (out, softmax_lse, None), softmax_lse
    being float32 [batch, heads, seqlen_q].
    """
    _check_tensors(q=q, k=k, v=v)
    _check_unsupported(dropout_p, alibi_slopes)
    scale, left, right = _options(q, softmax_scale, window_size, version)
    out, lse = flash_attn_forward(q, k, v, None, None, 0, 0, scale, bool(causal), left, right, float(softcap), version)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, version=2):
    """Packed variable-length batch. q: [total_q, heads, head_dim]; k, v: [total_k, kv_heads, head_dim];
    cu_seqlens_q/k: int32 [batch + 1], the cumulative sequence lengths; max_seqlen_q/k: the longest sequence.

    Returns out [total_q, heads, head_dim]; with return_attn_probs, (out, softmax_lse [heads, total_q], None).
    """
    _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_unsupported(dropout_p, alibi_slopes, block_table)
    scale, left, right = _options(q, softmax_scale, window_size, version)
    out, lse = flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale,
                                  bool(causal), left, right, float(softcap), version)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              version=2):
    """qkv: [batch, seqlen, 3, heads, head_dim]."""
    _check_tensors(qkv=qkv)
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, version=version)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             version=2):
    """q: [batch, seqlen_q, heads, head_dim]; kv: [batch, seqlen_k, 2, kv_heads, head_dim]."""
    _check_tensors(q=q, kv=kv)
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, version=version)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, version=2):
    """qkv: [total, 3, heads, head_dim]; cu_seqlens: int32 [batch + 1]."""
    _check_tensors(qkv=qkv)
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  version=version)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, version=2):
    """q: [total_q, heads, head_dim]; kv: [total_k, 2, kv_heads, head_dim]."""
    _check_tensors(q=q, kv=kv)
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, version=version)
