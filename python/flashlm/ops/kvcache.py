"""The paged KV cache (vLLM's layout) as torch.library custom ops, with fake implementations so they trace
under torch.compile.

Per layer, k_cache and v_cache are [num_blocks, block_size, kv_heads, head_dim]. Token t of sequence s lives
in block block_table[s, t // block_size] (int32 [num_seqs, max_blocks]) at offset t % block_size, and
seq_lens[s] (int32) counts its tokens, the new ones included. Queries are the new tokens, packed
[num_tokens, heads, head_dim] with int32 cu_seqlens_q [num_seqs + 1], or one per sequence (decode) without
it; they sit at the end of their sequence (bottom-right alignment; a sequence may have fewer tokens than queries,
and then under causal its first queries see none). The lse is float32 [heads, num_tokens]. Optional ALiBi slopes
(float32 [heads] or [num_seqs, heads]) add -slope * |position of the query - t| to the score of token t.
"""

import math
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import (INT32_MAX, INT32_MIN, as_float, as_int, as_str, as_window, check_optional_tensors,
                                check_same_device, check_tensor, check_tensors, contiguous_last, default_scale,
                                is_large, new_output)
from flashlm.ops._util import cuda_stream, custom_op


def _check_rows(t: torch.Tensor, name: str, k_cache: torch.Tensor) -> None:
    """Heads and head_dim of a [tokens, heads, head_dim] tensor against k_cache's, checked before a large copy or
    output is made for it (the native checks, which see it only after, check them all)."""
    if t.dim() != 3 or k_cache.dim() != 4:
        return
    if name != "q" and t.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"{name}: expected [num_tokens, kv_heads, head_dim] = [{t.shape[0]}, {k_cache.shape[2]}, "
                         f"{k_cache.shape[3]}] (k_cache's), got {list(t.shape)}")
    if t.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{name}: head_dim {t.shape[2]} differs from k_cache's {k_cache.shape[3]}")


@custom_op("flashlm::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Writes key/value [num_tokens, kv_heads, head_dim] into the caches at slot_mapping (int64 [num_tokens],
    block * block_size + offset; -1 skips a token). Slots outside the cache raise on the CPU."""
    check_tensors("key value k_cache v_cache slot_mapping", key, value, k_cache, v_cache, slot_mapping)
    if is_large(key) or is_large(value):
        _check_rows(key, "key", k_cache)
        _check_rows(value, "value", k_cache)
    _C.write_kv_cache(contiguous_last(key, "key"), contiguous_last(value, "value"), k_cache, v_cache, slot_mapping,
                      cuda_stream(k_cache))


@write_kv_cache.register_fake
def _(key, value, k_cache, v_cache, slot_mapping):
    check_same_device(k_cache=k_cache, key=key, value=value, v_cache=v_cache, slot_mapping=slot_mapping)
    return None


def _outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for q as the fake implementation makes them: out like q, lse float32 [heads, num_tokens]."""
    check_tensor(q, "q", 3, "[num_tokens, heads, head_dim]")
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


@custom_op("flashlm::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], max_seqlen_q: int,
                     softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                     num_splits: int, alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(q, "q", 3, "[num_tokens, heads, head_dim]")
    if is_large(q):
        _check_rows(q, "q", k_cache)
        if cu_seqlens_q is None and seq_lens.dim() == 1 and q.shape[0] != seq_lens.shape[0]:
            raise ValueError(f"q: decode (no cu_seqlens_q) takes one query per sequence: {seq_lens.shape[0]} rows "
                             f"(seq_lens), got shape {list(q.shape)}")
    q = contiguous_last(q, "q")
    # Rows of q past cu_seqlens_q[-1] belong to no sequence: out 0 and lse +inf, as a row that sees no key.
    out = new_output(q.shape, q.dtype, q.device, "q", 0.0)
    lse = new_output((q.shape[1], q.shape[0]), torch.float32, q.device, "q", math.inf)
    _C.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, out, lse,
                       softmax_scale, causal, window_left, window_right, softcap, num_splits, cuda_stream(q),
                       alibi_slopes)
    return out, lse


@_paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, softmax_scale, causal, window_left,
      window_right, softcap, num_splits, alibi_slopes=None):
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                      cu_seqlens_q=cu_seqlens_q, alibi_slopes=alibi_slopes)
    return _outputs(q)


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q=None, max_seqlen_q=None,
                    softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0,
                    return_lse=False, alibi_slopes=None):
    """Attention of the new tokens q over the paged caches. Returns out (like q), and lse with return_lse.

    q: [num_tokens, heads, head_dim]; without cu_seqlens_q, one query per sequence (decode). max_seqlen_q
    defaults to the longest sequence's query count (read from cu_seqlens_q, which syncs on CUDA).
    num_splits (decode): context parts attended in parallel and merged by lse; 0 lets the library choose.
    """
    check_tensor(q, "q", 3, "[num_tokens, heads, head_dim]")
    check_tensors("k_cache v_cache block_table seq_lens", k_cache, v_cache, block_table, seq_lens)
    check_optional_tensors("cu_seqlens_q alibi_slopes", cu_seqlens_q, alibi_slopes)
    if max_seqlen_q is not None:
        max_seqlen_q = as_int(max_seqlen_q, "max_seqlen_q", 0)
    elif cu_seqlens_q is None:
        max_seqlen_q = 0
    else:
        check_tensor(cu_seqlens_q, "cu_seqlens_q", 1, "[num_seqs + 1]")
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    left, right = as_window(window_size)
    scale, softcap = default_scale(q, softmax_scale), as_float(softcap, "softcap")
    out, lse = _paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, scale,
                                bool(causal), left, right, softcap, as_int(num_splits, "num_splits", 0, INT32_MAX),
                                alibi_slopes)
    return (out, lse) if return_lse else out


def paged_attention_num_splits(device_type: str, num_seqs: int, kv_heads: int, max_seq_len: int,
                               block_size: int) -> int:
    """The decode split count the library picks on "cpu" or "cuda"."""
    if as_str(device_type, "device_type") not in ("cpu", "cuda"):
        raise ValueError(f"device_type: must be 'cpu' or 'cuda', got {device_type!r}")
    # Counts the dispatcher holds in 32 bits (their products then fit the heuristic's int64); a batch may be
    # empty and a context may be empty, a cache has at least one head and one token per block.
    return _C.paged_attention_num_splits(1 if device_type == "cuda" else 0,
                                         as_int(num_seqs, "num_seqs", 0, INT32_MAX),
                                         as_int(kv_heads, "kv_heads", 1, INT32_MAX),
                                         as_int(max_seq_len, "max_seq_len", 0),
                                         as_int(block_size, "block_size", 1, INT32_MAX))
