"""flash-attn 2's public functions on flashlm's kernels: switching is a change of import,

    from flashlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Same arguments and return values, plus one keyword of flashlm's own: `version=1|2` picks the forward loop
order (FlashAttention-1: K/V blocks outer; FlashAttention-2, the default: Q blocks outer). Inputs are
float32/bfloat16 on the CPU and float16/bfloat16 on CUDA. ALiBi (alibi_slopes, float32 [heads] or [batch,
heads]) adds -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key j, causal or not, as
flash-attn's reference does (under causal flash-attn's kernel drops the per-row constant, which changes its
lse but not its output), forward and backward, and over paged caches (flash_attn_with_kvcache,
flash_attn_varlen_func with block_table). flash_attn_varlen_func with a block_table attends over
paged caches (forward only, no dropout), and flash_attn_with_kvcache is the inference entry point: append new
K/V to a cache (contiguous or paged) in place and attend over it. The backward pass is always deterministic, so
`deterministic` is accepted and has nothing to switch.

Dropout (dropout_p in [0, 1), as flash-attn's: on the attention probabilities, kept ones scaled by
1 / (1 - dropout_p), lse being that of the probabilities before dropout): the mask is a Philox4x32-10 draw of
(seed, offset, batch, head, row, column) alone, so the backward pass draws it again instead of storing it, and
the CPU and CUDA kernels draw the same mask for the same seed and offset. The seed and offset come from torch's
generator for the tensors' device (flashlm's keyword `generator`, or the default one): on CUDA its seed and
offset, advanced past the call's batch * heads draws as flash-attn advances it; on the CPU a seed drawn from
it. torch.manual_seed therefore repeats a run's masks, outputs and gradients. With return_attn_probs and
dropout_p > 0 the third value is flash-attn's S_dmask: [batch, heads, seqlen_q, seqlen_k], each rounded up to
a multiple of 128, holding the softmax numerators exp(s - m) (m: the running max over key blocks of
_get_block_size_n() keys, from the last block back, as flash-attn's tests normalise them), negated where the
element is dropped; rows and columns are each sequence's own (0 outside it). Without dropout it is None, as
flash-attn's. flashlm.ops.attention.dropout_mask gives the mask itself.
"""

import math

import torch

from flashlm.ops._check import (INT32_MAX, ArgumentError, as_float, as_int, as_window, check_optional_tensors,
                                check_same_device, check_tensor, default_scale, index_tensor)
from flashlm.ops.attention import check_dropout_p, dropout_mask, forward_op, philox_state
from flashlm.ops.kvcache import paged_attention, write_kv_cache

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
]


def _check_unsupported(dropout_p, alibi_slopes):
    check_dropout_p(dropout_p)
    check_optional_tensors("alibi_slopes", alibi_slopes)  # its dtype, shape and device: the native checks


_PADDED = "[batch, seqlen, heads, head_dim]"
_PACKED = "[total, heads, head_dim]"


def _options(q, softmax_scale, window_size, version):
    if type(version) is not int or version not in (1, 2):  # 2.0 == 2, but the op's schema takes an int
        raise ValueError(f"version: must be 1 or 2, got {version!r}")
    left, right = as_window(window_size)
    return default_scale(q, softmax_scale), left, right


def _unpack(packed, name, ndim, dim, count, layout):
    """The `count` tensors packed along `dim` of an `ndim`-dimensional tensor laid out as `layout`."""
    check_tensor(packed, name, ndim, layout)
    if packed.shape[dim] != count:
        raise ValueError(f"{name}: expected {layout}, got shape {list(packed.shape)}")
    return packed.unbind(dim)


def _check_pair(a, a_name, b, b_name, layout):
    """Two tensors of one shape (k and v, rotary_cos and rotary_sin) with the dimensions of `layout`."""
    for name, t in ((a_name, a), (b_name, b)):
        check_tensor(t, name, layout.count(",") + 1, layout)
    if b.shape != a.shape:
        raise ValueError(f"{b_name}: shape {list(b.shape)} differs from {a_name}'s {list(a.shape)}")


def _result(out, lse, return_attn_probs, attn_probs=None):
    return (out, lse, attn_probs() if attn_probs else None) if return_attn_probs else out


def _get_block_size_n(device=None, head_dim=None, is_dropout=None, is_causal=None):
    """The key block size of S_dmask's unnormalised values (flash-attn's tests split the scores by it)."""
    return 64


def _dropout(q, batch, heads, dropout_p, generator):
    """(dropout_p, seed, offset) of a call: dropout_p checked, the seed and offset drawn only when it is > 0."""
    p = check_dropout_p(dropout_p)
    return (p, *philox_state(q.device, batch * heads, generator)) if p > 0 else (0.0, 0, 0)


def _round128(n):
    return (n + 127) // 128 * 128


def _attn_probs(q, k, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, alibi_slopes, drop):
    """flash-attn's S_dmask (see the module's docstring), for return_attn_probs with dropout: the numerators of
    the scores recomputed in float32, signed by the kernels' mask. q, k: [B, S, H, D] or packed with cu_q/cu_k."""
    batch = q.shape[0] if cu_q is None else cu_q.shape[0] - 1
    heads = q.shape[-2]
    sq, sk = (q.shape[1], k.shape[1]) if cu_q is None else (max_q, max_k)
    keep = dropout_mask(batch, heads, sq, sk, *drop).to(q.device)
    s_dmask = torch.zeros(batch, heads, _round128(sq), _round128(sk), dtype=q.dtype, device=q.device)
    n = _get_block_size_n()
    for b in range(batch):
        if cu_q is None:
            qb, kb = q[b], k[b]
        else:
            qb, kb = q[int(cu_q[b]):int(cu_q[b + 1])], k[int(cu_k[b]):int(cu_k[b + 1])]
        lq, lk = qb.shape[0], kb.shape[0]
        if lq == 0 or lk == 0:
            continue
        kb = kb.repeat_interleave(heads // kb.shape[1], dim=1)
        s = torch.einsum("ihd,jhd->hij", qb.float(), kb.float()) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=q.device)[None, :]
        if alibi_slopes is not None:  # the kernels add the bias before the row max, so the numerators hold it
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s - slopes.float()[:, None, None] * (i - j).abs()
        seen = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if left >= 0:
            seen &= j >= i - left
        if right >= 0:
            seen &= j <= i + right
        s = s.masked_fill(~seen, -math.inf)
        blocks = torch.nn.functional.pad(s, (0, -lk % n), value=-math.inf).unflatten(-1, (-1, n))
        m = blocks.amax(-1).flip(-1).cummax(-1).values.flip(-1)  # flash-attn walks key blocks last to first
        m = m.masked_fill(m == -math.inf, 0.0)
        num = torch.exp(blocks - m[..., None]).flatten(-2)[..., :lk]
        s_dmask[b, :, :lq, :lk] = torch.where(keep[b, :, :lq, :lk], num, -num).to(q.dtype)
    return s_dmask


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, version=2, generator=None):
    """q: [batch, seqlen_q, heads, head_dim]; k, v: [batch, seqlen_k, kv_heads, head_dim].

    Returns out [batch, seqlen_q, heads, head_dim]; with return_attn_probs, (out, softmax_lse, S_dmask), softmax_lse
    being float32 [batch, heads, seqlen_q] and S_dmask None without dropout (see the module's docstring).
    generator: where dropout's seed comes from (default: the device's default generator).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, 4, _PADDED)
    _check_unsupported(dropout_p, alibi_slopes)
    scale, left, right = _options(q, softmax_scale, window_size, version)
    softcap = as_float(softcap, "softcap")
    drop = _dropout(q, q.shape[0], q.shape[2], dropout_p, generator)
    out, lse = forward_op(q, k, v, None, None, 0, 0, scale, bool(causal), left, right, softcap, version, alibi_slopes,
                          *drop)
    probs = drop[0] > 0 and (lambda: _attn_probs(q, k, None, None, 0, 0, scale, left, 0 if causal else right,
                                                 softcap, alibi_slopes, drop))
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, version=2,
                           generator=None):
    """Packed variable-length batch. q: [total_q, heads, head_dim]; k, v: [total_k, kv_heads, head_dim];
    cu_seqlens_q/k: int32 [batch + 1], the cumulative sequence lengths; max_seqlen_q/k: the longest sequence.

    With block_table (int32 [batch, max_blocks]), k and v are paged caches [num_blocks, block_size, kv_heads,
    head_dim] (flashlm.ops.kvcache) and cu_seqlens_k the context lengths; that path has no backward and no
    dropout.

    Returns out [total_q, heads, head_dim]; with return_attn_probs, (out, softmax_lse [heads, total_q], S_dmask),
    S_dmask None without dropout (see the module's docstring).
    """
    check_tensor(q, "q", 3, _PACKED)
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, 3 if block_table is None else 4, _PACKED if block_table is None else "(paged cache)")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(t, name, 1, "[batch + 1]")
    _check_unsupported(dropout_p, alibi_slopes)
    scale, left, right = _options(q, softmax_scale, window_size, version)
    max_seqlen_q, max_seqlen_k = as_int(max_seqlen_q, "max_seqlen_q", 0), as_int(max_seqlen_k, "max_seqlen_k", 0)
    if block_table is not None and check_dropout_p(dropout_p) > 0:
        raise NotImplementedError("dropout_p: paged attention (block_table) has no dropout, as flash-attn's")
    if block_table is not None:
        # k and v are paged caches [num_blocks, block_size, kv_heads, head_dim]; cu_seqlens_k gives each
        # sequence's context length, whose last queries q holds.
        check_same_device(q=q, cu_seqlens_k=cu_seqlens_k)
        cu_k = index_tensor(cu_seqlens_k, "cu_seqlens_k", 1, low=0)  # then the differences cannot wrap
        seq_lens = cu_k[1:] - cu_k[:-1]
        if seq_lens.is_cpu and bool((seq_lens < 0).any()):
            raise ValueError(f"cu_seqlens_k: must be non-decreasing, got {cu_k.tolist()}")
        out, lse = paged_attention(q, k, v, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale, causal,
                                   (left, right), softcap, return_lse=True, alibi_slopes=alibi_slopes)
        return _result(out, lse, return_attn_probs)
    softcap = as_float(softcap, "softcap")
    drop = _dropout(q, cu_seqlens_q.shape[0] - 1, q.shape[1], dropout_p, generator)
    out, lse = forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal), left,
                          right, softcap, version, alibi_slopes, *drop)
    probs = drop[0] > 0 and (lambda: _attn_probs(q, k, cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), max_seqlen_q,
                                                 max_seqlen_k, scale, left, 0 if causal else right, softcap,
                                                 alibi_slopes, drop))
    return _result(out, lse, return_attn_probs, probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              version=2, generator=None):
    """qkv: [batch, seqlen, 3, heads, head_dim]."""
    q, k, v = _unpack(qkv, "qkv", 5, 2, 3, "[batch, seqlen, 3, heads, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, version=version, generator=generator)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             version=2, generator=None):
    """q: [batch, seqlen_q, heads, head_dim]; kv: [batch, seqlen_k, 2, kv_heads, head_dim]."""
    k, v = _unpack(kv, "kv", 5, 2, 2, "[batch, seqlen_k, 2, kv_heads, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, version=version, generator=generator)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, version=2, generator=None):
    """qkv: [total, 3, heads, head_dim]; cu_seqlens: int32 [batch + 1]."""
    check_tensor(cu_seqlens, "cu_seqlens", 1, "[batch + 1]")
    max_seqlen = as_int(max_seqlen, "max_seqlen", 0)
    q, k, v = _unpack(qkv, "qkv", 4, 1, 3, "[total, 3, heads, head_dim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  version=version, generator=generator)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, version=2,
                                    generator=None):
    """q: [total_q, heads, head_dim]; kv: [total_k, 2, kv_heads, head_dim]."""
    k, v = _unpack(kv, "kv", 4, 1, 2, "[total_k, 2, kv_heads, head_dim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, version=version, generator=generator)


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
        check_tensor(block_table, "block_table", 2, "[batch, max_blocks]")
        if block_table.dtype != torch.int32:  # checked here: k and v are written before the kernel would
            raise ValueError(f"block_table: must be int32, got {block_table.dtype}")
        return block_table
    if cache_batch_idx is None:
        return torch.arange(batch, dtype=torch.int32, device=q.device).view(batch, 1)
    rows = index_tensor(cache_batch_idx, "cache_batch_idx", 1, low=0, high=k_cache.shape[0] - 1)
    if rows.shape != (batch,):
        raise ValueError(f"cache_batch_idx: expected shape [{batch}], got {list(rows.shape)}")
    return rows.view(batch, 1)


def _leftpad_view(k_cache, v_cache, table, pad):
    """A contiguous cache [B_cache, S_cache, ...] whose sequence b starts at position pad[b] of its row, as a
    paged cache of one-token blocks ([B_cache * S_cache, 1, ...], a copy where the rows cannot be merged) and
    the block table [batch, S_cache] of its sequences: token t of sequence b is position pad[b] + t."""
    rows, seqlen = k_cache.shape[0], k_cache.shape[1]
    if rows * seqlen > INT32_MAX:
        raise ValueError(f"cache_leftpad: needs a cache of at most {INT32_MAX} tokens, got shape {list(k_cache.shape)}")
    steps = torch.arange(seqlen, device=table.device)
    tokens = table.long() * seqlen + pad[:, None].long() + steps
    tokens = tokens.clamp(max=rows * seqlen - 1).to(torch.int32)  # past the sequence: never read
    flat = [c.reshape(rows * seqlen, 1, *c.shape[2:]) for c in (k_cache, v_cache)]
    return flat[0], flat[1], tokens


def _cache_lengths(cache_seqlens, batch, device):
    """cache_seqlens (an int, or an integer tensor [batch]) as int64 [batch]."""
    if not isinstance(cache_seqlens, torch.Tensor):
        return torch.full((batch,), as_int(cache_seqlens, "cache_seqlens", 0, INT32_MAX), dtype=torch.int64,
                          device=device)
    lens = index_tensor(cache_seqlens, "cache_seqlens", 1)  # int32 as flash-attn's; int64 values are checked
    if lens.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected shape [{batch}], got {list(lens.shape)}")
    return lens.long()


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q [batch, seqlen_q, heads, head_dim] over a KV cache, after appending k, v to it in place.

    k_cache, v_cache: [batch_cache, seqlen_cache, kv_heads, head_dim], or with block_table (int32
    [batch, max_blocks]) paged caches [num_blocks, block_size, kv_heads, head_dim]. k, v (optional):
    [batch, seqlen_new, kv_heads, head_dim], written at positions cache_seqlens .. cache_seqlens + seqlen_new
    (cache_seqlens: int or int32 [batch], the tokens already cached; None, without k and v: the whole
    contiguous cache; int64 is read to check it fits int32, which synchronizes on CUDA).
    cache_batch_idx (contiguous caches): which cache row each sequence uses. cache_leftpad (contiguous caches,
    integer [batch], at most cache_seqlens): sequence b's keys start at position cache_leftpad[b] of its row,
    those before are not part of it (new k, v still go at cache_seqlens). rotary_cos/sin [seqlen_ro,
    rotary_dim / 2]: rotate k at its cache positions and q at cache_seqlens + i when causal or local, else at
    cache_seqlens. q's rows are the last of each sequence (bottom-right alignment); a sequence may have fewer
    keys than queries (cache_seqlens + seqlen_new < seqlen_q), and then under causal its first queries see no
    key (out 0, lse +inf). A cache_seqlens plus seqlen_new past the cache raises ArgumentError (a ValueError
    and a RuntimeError) naming block_table for paged caches, as flash-attn does.

    Returns out [batch, seqlen_q, heads, head_dim]; with return_softmax_lse, (out, lse [batch, heads, seqlen_q]).
    """
    check_tensor(q, "q", 4, "[batch, seqlen_q, heads, head_dim]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, 4, "[batch_cache or num_blocks, seqlen_cache or block_size, kv_heads, head_dim]")
    _check_unsupported(0.0, alibi_slopes)
    if cache_leftpad is not None and block_table is not None:  # as in flash-attn
        raise NotImplementedError("cache_leftpad: not supported with a paged cache (block_table)")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} differs from q's {head_dim}")
    if k is not None:
        _check_pair(k, "k", v, "v", "[batch, seqlen_new, kv_heads, head_dim]")
        if k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k: expected [{batch}, seqlen_new, {kv_heads}, {head_dim}], got {list(k.shape)}")
        for name, t, cache_name, cache in (("k", k, "k_cache", k_cache), ("v", v, "v_cache", v_cache)):
            if t.dtype != cache.dtype:  # written into the cache as they are
                raise ValueError(f"{name}: dtype {t.dtype} differs from {cache_name}'s {cache.dtype}")
    if rotary_cos is not None:
        _check_pair(rotary_cos, "rotary_cos", rotary_sin, "rotary_sin", "[seqlen_ro, rotary_dim / 2]")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_cos: rotary_dim = {2 * rotary_cos.shape[1]} is above head_dim = {head_dim}")
    check_optional_tensors("cache_batch_idx block_table", cache_batch_idx, block_table)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                      cache_seqlens=cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None,
                      cache_batch_idx=cache_batch_idx, block_table=block_table)
    scale, left, right = _options(q, softmax_scale, window_size, 2)
    table = _cache_table(q, k_cache, cache_batch_idx, block_table)
    block_size = k_cache.shape[1]
    if cache_seqlens is None:  # as in flash-attn: the whole contiguous cache, and nothing to append to
        if block_table is not None or k is not None:
            raise ValueError("cache_seqlens: required with a paged cache (block_table) or new k, v")
        cache_seqlens = k_cache.shape[1]
    lens = _cache_lengths(cache_seqlens, batch, q.device)  # int64: lens + new cannot wrap
    new = 0 if k is None else k.shape[1]
    capacity = table.shape[1] * block_size
    if q.device.type == "cpu" and bool(((lens < 0) | (lens + new > min(capacity, INT32_MAX))).any()):
        if bool((lens < 0).any()):
            raise ArgumentError(f"cache_seqlens: must be >= 0, got {lens.tolist()}")
        # Named as flash-attn names it: a paged cache's capacity is what block_table addresses.
        name, holds = ("block_table", "addresses") if block_table is not None else ("cache_seqlens", "holds")
        raise ArgumentError(f"{name}: cache_seqlens plus {new} new tokens must fit the {capacity} tokens per sequence "
                            f"the cache {holds}, got cache_seqlens = {lens.tolist()}")
    if cache_leftpad is not None:  # keys before pad[b] are not part of sequence b
        pad = index_tensor(cache_leftpad, "cache_leftpad", 1, low=0, high=INT32_MAX)
        if pad.shape != (batch,):
            raise ValueError(f"cache_leftpad: expected shape [{batch}], got {list(pad.shape)}")
        if pad.is_cpu and bool((pad > lens).any()):
            raise ValueError(f"cache_leftpad: must be <= cache_seqlens, got {pad.tolist()} and {lens.tolist()}")
    if rotary_cos is not None:  # at cache positions, left padding included (flash-attn's)
        steps = torch.arange(max(seqlen_q, new), device=q.device)
        start = lens[:, None]
        q_pos = start + steps[:seqlen_q] if (causal or left >= 0 or right >= 0) else start.expand(batch, seqlen_q)
        k_pos = start + steps[:new]
        for pos in (q_pos, k_pos):  # on the CPU: reading them on CUDA would synchronize
            if pos.is_cpu and pos.numel() and int(pos.max()) >= rotary_cos.shape[0]:
                raise ValueError(f"rotary_cos: has {rotary_cos.shape[0]} positions, position {int(pos.max())} is "
                                 "needed")
        q = _rotate(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, k_pos, rotary_interleaved)
    if k is not None:
        pos = lens[:, None] + torch.arange(new, device=q.device)
        blocks = table.long().gather(1, (pos // block_size).clamp(min=0, max=table.shape[1] - 1))
        # Outside the cache (on CUDA, where it is not checked above) a token is skipped, never written elsewhere.
        slots = torch.where((pos >= 0) & (pos < capacity), blocks * block_size + pos % block_size, -1)
        write_kv_cache(k.reshape(batch * new, kv_heads, head_dim), v.reshape(batch * new, kv_heads, head_dim),
                       k_cache, v_cache, slots.reshape(-1))
    # Within the capacity on the CPU (checked above); on CUDA the kernels clamp to it.
    seq_lens = (lens + new).clamp(0, INT32_MAX).to(torch.int32)
    if cache_leftpad is not None:
        k_cache, v_cache, table = _leftpad_view(k_cache, v_cache, table, pad)
        seq_lens = (seq_lens - pad).clamp(min=0)
    rows = q.reshape(batch * seqlen_q, heads, head_dim)
    if seqlen_q == 1:  # decode: one query per sequence, split-K over the context
        out, lse = paged_attention(rows, k_cache, v_cache, table.contiguous(), seq_lens, None, None, scale, causal,
                                   (left, right), softcap, num_splits, return_lse=True, alibi_slopes=alibi_slopes)
    else:
        cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        out, lse = paged_attention(rows, k_cache, v_cache, table.contiguous(), seq_lens, cu_q, seqlen_q, scale,
                                   causal, (left, right), softcap, num_splits, return_lse=True,
                                   alibi_slopes=alibi_slopes)
    out = out.view(batch, seqlen_q, heads, head_dim)
    return (out, lse.view(heads, batch, seqlen_q).permute(1, 0, 2)) if return_softmax_lse else out
