"""flash-attn 2's public functions on flashlm's kernels: switching is a change of import,

    from flashlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Same arguments and return values, plus one keyword of flashlm's own: `version=1|2` picks the forward loop
order (FlashAttention-1: K/V blocks outer; FlashAttention-2, the default: Q blocks outer). Inputs are
float32/bfloat16 on the CPU and float16/bfloat16 on CUDA. What flashlm does not implement raises instead of
being ignored: dropout_p > 0 and alibi_slopes raise NotImplementedError. flash_attn_varlen_func with a
block_table attends over paged caches (forward only), and flash_attn_with_kvcache is the inference entry
point: append new K/V to a cache (contiguous or paged) in place and attend over it. The backward pass is
always deterministic, so `deterministic` is accepted and has nothing to switch. With return_attn_probs the
third value is None: flash-attn returns the dropout mask there, and there is no dropout.
"""

import torch

from flashlm.ops.attention import flash_attn_forward
from flashlm.ops.kvcache import paged_attention, write_kv_cache

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
]


def _check_unsupported(dropout_p, alibi_slopes):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: flashlm's attention has no dropout; pass 0.0 (got {dropout_p})")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported by flashlm's attention")


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

    With block_table (int32 [batch, max_blocks]), k and v are paged caches [num_blocks, block_size, kv_heads,
    head_dim] (flashlm.ops.kvcache) and cu_seqlens_k the context lengths; that path has no backward.

    Returns out [total_q, heads, head_dim]; with return_attn_probs, (out, softmax_lse [heads, total_q], None).
    """
    _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_unsupported(dropout_p, alibi_slopes)
    scale, left, right = _options(q, softmax_scale, window_size, version)
    if block_table is not None:
        # k and v are paged caches [num_blocks, block_size, kv_heads, head_dim]; cu_seqlens_k gives each
        # sequence's context length, whose last queries q holds.
        seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        out, lse = paged_attention(q, k, v, block_table, seq_lens, cu_seqlens_q, int(max_seqlen_q), scale, causal,
                                   (left, right), softcap, return_lse=True)
        return _result(out, lse, return_attn_probs)
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


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x [B, S, H, D] at int64 positions [B, S] over its first 2 * cos.shape[1] dims:
    pairs (0, 1), (2, 3), ... when interleaved (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX)."""
    half = cos.shape[1]
    c = cos[positions].unsqueeze(2).float()  # [B, S, 1, half]
    s = sin[positions].unsqueeze(2).float()
    rot, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), rest), dim=-1)


def _cache_table(q, k_cache, cache_batch_idx, block_table):
    """The block table of the cache: block_table itself, or for a contiguous cache [B_cache, S_cache, ...]
    one block of S_cache tokens per sequence (row cache_batch_idx[b], default b)."""
    batch = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not supported with a paged cache (block_table)")
        return block_table
    if cache_batch_idx is None:
        return torch.arange(batch, dtype=torch.int32, device=q.device).view(batch, 1)
    if cache_batch_idx.shape != (batch,):
        raise ValueError(f"cache_batch_idx: expected shape [{batch}], got {list(cache_batch_idx.shape)}")
    return cache_batch_idx.to(torch.int32).view(batch, 1)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q [batch, seqlen_q, heads, head_dim] over a KV cache, after appending k, v to it in place.

    k_cache, v_cache: [batch_cache, seqlen_cache, kv_heads, head_dim], or with block_table (int32
    [batch, max_blocks]) paged caches [num_blocks, block_size, kv_heads, head_dim]. k, v (optional):
    [batch, seqlen_new, kv_heads, head_dim], written at positions cache_seqlens .. cache_seqlens + seqlen_new
    (cache_seqlens: int or int32 [batch], the tokens already cached; None, without k and v: the whole
    contiguous cache).
    cache_batch_idx (contiguous caches): which cache row each sequence uses. rotary_cos/sin
    [seqlen_ro, rotary_dim / 2]: rotate k at its positions and q at cache_seqlens + i when causal or local,
    else at cache_seqlens. q's rows are the last of each sequence (bottom-right alignment).

    Returns out [batch, seqlen_q, heads, head_dim]; with return_softmax_lse, (out, lse [batch, heads, seqlen_q]).
    """
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    _check_unsupported(0.0, alibi_slopes)
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: left-padded caches are not supported by flashlm")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    if q.dim() != 4:
        raise ValueError(f"q: expected [batch, seqlen_q, heads, head_dim], got {list(q.shape)}")
    scale, left, right = _options(q, softmax_scale, window_size, 2)
    batch, seqlen_q, heads, head_dim = q.shape
    table = _cache_table(q, k_cache, cache_batch_idx, block_table)
    block_size = k_cache.shape[1]
    if cache_seqlens is None:  # as in flash-attn: the whole contiguous cache, and nothing to append to
        if block_table is not None or k is not None:
            raise ValueError("cache_seqlens: required with a paged cache (block_table) or new k, v")
        cache_seqlens = k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = cache_seqlens.to(torch.int32)
    new = 0 if k is None else k.shape[1]
    capacity = table.shape[1] * block_size
    if q.device.type == "cpu" and bool(((cache_seqlens < 0) | (cache_seqlens + new > capacity)).any()):
        raise ValueError(f"cache_seqlens: cached plus {new} new tokens must fit the cache's {capacity} per sequence, "
                         f"got {cache_seqlens.tolist()}")
    if rotary_cos is not None:
        steps = torch.arange(max(seqlen_q, new), device=q.device)
        start = cache_seqlens.long()[:, None]
        q_pos = start + steps[:seqlen_q] if (causal or left >= 0 or right >= 0) else start.expand(batch, seqlen_q)
        q = _rotate(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, start + steps[:new], rotary_interleaved)
    if k is not None:
        pos = cache_seqlens.long()[:, None] + torch.arange(new, device=q.device)
        blocks = table.long().gather(1, (pos // block_size).clamp(max=table.shape[1] - 1))
        # Past the cache (on CUDA, where it is not checked above) a token is skipped, never written elsewhere.
        slots = torch.where(pos < capacity, blocks * block_size + pos % block_size, -1)
        kv_heads = k_cache.shape[2]
        write_kv_cache(k.reshape(batch * new, kv_heads, head_dim), v.reshape(batch * new, kv_heads, head_dim),
                       k_cache, v_cache, slots.reshape(-1))
    seq_lens = (cache_seqlens + new).to(torch.int32)
    rows = q.reshape(batch * seqlen_q, heads, head_dim)
    if seqlen_q == 1:  # decode: one query per sequence, split-K over the context
        out, lse = paged_attention(rows, k_cache, v_cache, table.contiguous(), seq_lens, None, None, scale, causal,
                                   (left, right), softcap, num_splits, return_lse=True)
    else:
        cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        out, lse = paged_attention(rows, k_cache, v_cache, table.contiguous(), seq_lens, cu_q, seqlen_q, scale,
                                   causal, (left, right), softcap, num_splits, return_lse=True)
    out = out.view(batch, seqlen_q, heads, head_dim)
    return (out, lse.view(heads, batch, seqlen_q).permute(1, 0, 2)) if return_softmax_lse else out
