"""flash-attn's paged and KV-cache entry points in the cases flash-attn's own tests run: ALiBi, sequences with
more queries than keys (bottom-right aligned, as the non-paged varlen path), left-padded caches (cache_leftpad)
and the exception a cache overflow raises. Against the float64 reference (reference.py) and the non-paged varlen
path, on every CPU kernel ISA and on CUDA (skipped without a GPU).
"""

import math

import pytest
import torch

from compare import FLOOR, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.flash_attn_interface import flash_attn_varlen_func, flash_attn_with_kvcache
from flashlm.ops._check import ArgumentError
from reference import attention

pytestmark = pytest.mark.usefixtures("restore_isa")

KERNELS = per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)], cuda=[(torch.float16,), (torch.bfloat16,)])


def randn(*shape, dtype=torch.float32, device="cpu", gen):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def check_sequence(name, out, lse, q, k, v, dtype, **opts):
    """out [sq, H, D] and lse [H, sq] of one sequence against attention over k, v [sk, Hkv, D] (float64 and
    the dtype's own, flash-attn's rule), bottom-right aligned."""
    exact, exact_lse = attention(q[None].double(), k[None].double(), v[None].double(), **opts)
    low, _ = attention(q[None], k[None], v[None], **opts)
    assert_close_to_reference(out.cpu(), exact[0], low[0], FLOOR[dtype], name=f"{name} out", relative_floor=True)
    assert_close_to_reference(lse.cpu(), exact_lse[0], None, 1e-5, name=f"{name} lse", relative_floor=True)


def paged_copy(dense, block_size, gen):
    """dense [B, S, Hkv, D] (S a multiple of block_size) as a paged cache in shuffled blocks, and its table."""
    batch, seqlen = dense.shape[:2]
    perm = torch.randperm(batch * seqlen // block_size, generator=gen).to(torch.int32)
    table = perm.view(batch, -1).to(dense.device)
    cache = torch.zeros(len(perm), block_size, *dense.shape[2:], dtype=dense.dtype, device=dense.device)
    cache[table.long()] = dense.view(batch, -1, block_size, *dense.shape[2:])
    return cache, table


# ---- more queries than keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (3, 2))])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("device,isa,dtype", KERNELS)
def test_kvcache_more_queries_than_keys(device, isa, dtype, paged, causal, window):
    use_isa(isa)
    gen = torch.Generator().manual_seed(0)
    batch, seqlen_q, heads, kv_heads, d, capacity, new = 3, 12, 4, 2, 32, 32, 2
    cache_lens = torch.tensor([0, 5, 20], dtype=torch.int32)  # + new: 2 and 7 keys (< 12 queries), and 22
    dense_k, dense_v = (randn(batch, capacity, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    k, v = (randn(batch, new, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    q = randn(batch, seqlen_q, heads, d, dtype=dtype, device=device, gen=gen)
    if paged:
        k_cache, table = paged_copy(dense_k, 8, torch.Generator().manual_seed(1))
        v_cache, _ = paged_copy(dense_v, 8, torch.Generator().manual_seed(1))
        kw = dict(block_table=table)
    else:
        k_cache, v_cache, kw = dense_k.clone(), dense_v.clone(), {}
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_lens.to(device), causal=causal,
                                       window_size=window, return_softmax_lse=True, **kw)
    lens = (cache_lens + new).tolist()
    keys_k, keys_v = [], []
    for b in range(batch):
        n = int(cache_lens[b])
        keys_k.append(torch.cat([dense_k[b, :n], k[b]]).cpu())
        keys_v.append(torch.cat([dense_v[b, :n], v[b]]).cpu())
        check_sequence(f"sequence {b}", out[b], lse[b], q[b].cpu(), keys_k[b], keys_v[b], dtype, causal=causal,
                       window=window)
    if causal:  # queries before the first key: out 0, lse +inf (flash-attn's)
        for b, n in enumerate(lens):
            if n < seqlen_q:
                assert bool((out[b, :seqlen_q - n] == 0).all()) and bool((lse[b, :, :seqlen_q - n] == math.inf).all())
    # The non-paged varlen path on the same keys gives the same rows.
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    varlen = flash_attn_varlen_func(q.reshape(-1, heads, d), torch.cat(keys_k).to(device), torch.cat(keys_v).to(device),
                                    cu_q, cu_k, seqlen_q, max(lens), causal=causal, window_size=window)
    for b in range(batch):
        assert_close_to_reference(out[b].cpu(), varlen[b * seqlen_q:(b + 1) * seqlen_q].cpu().double(), None,
                                  FLOOR[dtype], name="out against the varlen path", relative_floor=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("device,isa,dtype", KERNELS)
def test_varlen_block_table_more_queries_than_keys(device, isa, dtype, causal):
    use_isa(isa)
    gen = torch.Generator().manual_seed(2)
    q_lens, k_lens, heads, kv_heads, d, capacity = [9, 70, 1, 4], [3, 50, 0, 30], 4, 1, 64, 64
    dense_k, dense_v = (randn(len(k_lens), capacity, kv_heads, d, dtype=dtype, device=device, gen=gen)
                        for _ in range(2))
    k_cache, table = paged_copy(dense_k, 16, torch.Generator().manual_seed(3))
    v_cache, _ = paged_copy(dense_v, 16, torch.Generator().manual_seed(3))
    q = randn(sum(q_lens), heads, d, dtype=dtype, device=device, gen=gen)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), causal=causal,
                                         block_table=table, return_attn_probs=True)
    for b, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        check_sequence(f"sequence {b}", out[rows], lse[:, rows], q[rows].cpu(), dense_k[b, :nk].cpu(),
                       dense_v[b, :nk].cpu(), dtype, causal=causal)


# ---- ALiBi over caches -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("layout", ["paged", "contiguous", "leftpad"])
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 1), (1, 3), (6, 0)])
@pytest.mark.parametrize("device,isa,dtype", KERNELS)
def test_kvcache_alibi(device, isa, dtype, seqlen_q, num_splits, layout, per_batch, causal):
    use_isa(isa)
    gen = torch.Generator().manual_seed(6)
    batch, heads, kv_heads, d, capacity, new = 3, 4, 2, 32, 48, seqlen_q
    cache_lens = torch.tensor([0, 9, 40], dtype=torch.int32)
    pad = torch.tensor([0, 4, 13], dtype=torch.int32) if layout == "leftpad" else torch.zeros(batch, dtype=torch.int32)
    dense_k, dense_v = (randn(batch, capacity, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    k, v = (randn(batch, new, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    q = randn(batch, seqlen_q, heads, d, dtype=dtype, device=device, gen=gen)
    slopes = (torch.rand((batch, heads) if per_batch else (heads,), generator=gen) * 0.3).to(device)
    if layout == "paged":
        k_cache, table = paged_copy(dense_k, 16, torch.Generator().manual_seed(7))
        v_cache, _ = paged_copy(dense_v, 16, torch.Generator().manual_seed(7))
        kw = dict(block_table=table)
    else:
        k_cache, v_cache = dense_k.clone(), dense_v.clone()
        kw = dict(cache_leftpad=pad.to(device)) if layout == "leftpad" else {}
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_lens.to(device), causal=causal,
                                       alibi_slopes=slopes, num_splits=num_splits, return_softmax_lse=True, **kw)
    for b in range(batch):
        first, n = int(pad[b]), int(cache_lens[b])
        keys_k = torch.cat([dense_k[b, first:n], k[b]]).cpu()
        keys_v = torch.cat([dense_v[b, first:n], v[b]]).cpu()
        check_sequence(f"sequence {b}", out[b], lse[b], q[b].cpu(), keys_k, keys_v, dtype, causal=causal,
                       alibi_slopes=(slopes[b] if per_batch else slopes).cpu())


@pytest.mark.parametrize("device,isa,dtype", KERNELS)
def test_varlen_block_table_alibi(device, isa, dtype):
    use_isa(isa)
    gen = torch.Generator().manual_seed(8)
    q_lens, k_lens, heads, kv_heads, d, capacity = [9, 70, 1], [3, 80, 20], 4, 2, 64, 80
    dense_k, dense_v = (randn(len(k_lens), capacity, kv_heads, d, dtype=dtype, device=device, gen=gen)
                        for _ in range(2))
    k_cache, table = paged_copy(dense_k, 16, torch.Generator().manual_seed(9))
    v_cache, _ = paged_copy(dense_v, 16, torch.Generator().manual_seed(9))
    q = randn(sum(q_lens), heads, d, dtype=dtype, device=device, gen=gen)
    slopes = (torch.rand(len(q_lens), heads, generator=gen) * 0.3).to(device)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), causal=True,
                                         block_table=table, alibi_slopes=slopes, return_attn_probs=True)
    for b, nk in enumerate(k_lens):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        check_sequence(f"sequence {b}", out[rows], lse[:, rows], q[rows].cpu(), dense_k[b, :nk].cpu(),
                       dense_v[b, :nk].cpu(), dtype, causal=True, alibi_slopes=slopes[b].cpu())


# ---- cache_leftpad --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (4, 0))])
@pytest.mark.parametrize("seqlen_q,new", [(1, 1), (5, 5), (3, 0)])
@pytest.mark.parametrize("device,isa,dtype", KERNELS)
def test_kvcache_leftpad(device, isa, dtype, seqlen_q, new, causal, window):
    use_isa(isa)
    gen = torch.Generator().manual_seed(4)
    batch, heads, kv_heads, d, capacity = 3, 4, 2, 32, 40
    cache_lens = torch.tensor([10, 30, 3], dtype=torch.int32)
    pad = torch.tensor([4, 0, 3], dtype=torch.int32)  # sequence 2 is all padding before the new tokens
    k_cache, v_cache = (randn(batch, capacity, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    before_k = k_cache.clone()
    k, v = ((randn(batch, new, kv_heads, d, dtype=dtype, device=device, gen=gen) for _ in range(2)) if new
            else (None, None))
    q = randn(batch, seqlen_q, heads, d, dtype=dtype, device=device, gen=gen)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_lens.to(device),
                                       cache_leftpad=pad.to(device), causal=causal, window_size=window,
                                       return_softmax_lse=True)
    for b in range(batch):
        first, end = int(pad[b]), int(cache_lens[b]) + new
        if new:  # written after cache_seqlens, the padding left as it was
            assert_equal(k_cache[b, end - new:end].cpu(), k[b].cpu(), name="new keys at cache_seqlens")
            assert_equal(k_cache[b, :first].cpu(), before_k[b, :first].cpu(), name="the padding")
        check_sequence(f"sequence {b}", out[b], lse[b], q[b].cpu(), k_cache[b, first:end].cpu(),
                       v_cache[b, first:end].cpu(), dtype, causal=causal, window=window)


def test_kvcache_leftpad_rotary_positions_are_cache_positions():
    """flash-attn rotates q and the new keys at their cache positions (cache_seqlens + i), padding included: the
    same as a call without padding on the row shifted left by the pad, with rotary tables shifted as much."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, d, capacity, new = 2, 2, 16, 16, 2
    k_cache, v_cache = randn(batch, capacity, 1, d, gen=gen), randn(batch, capacity, 1, d, gen=gen)
    k, v, q = randn(batch, new, 1, d, gen=gen), randn(batch, new, 1, d, gen=gen), randn(batch, new, heads, d, gen=gen)
    cos, sin = randn(capacity, 4, gen=gen), randn(capacity, 4, gen=gen)
    cache_lens, pad = torch.tensor([6, 9], dtype=torch.int32), torch.tensor([2, 5], dtype=torch.int32)
    k_pad, v_pad = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, k_pad, v_pad, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_lens,
                                  cache_leftpad=pad, causal=True)
    for b in range(batch):
        p, n = int(pad[b]), int(cache_lens[b])
        kc, vc = k_cache[b:b + 1, p:].clone(), v_cache[b:b + 1, p:].clone()
        kc = torch.cat([kc, torch.zeros(1, p, 1, d)], dim=1)
        vc = torch.cat([vc, torch.zeros(1, p, 1, d)], dim=1)
        expect = flash_attn_with_kvcache(q[b:b + 1], kc, vc, k[b:b + 1], v[b:b + 1], rotary_cos=cos[p:],
                                         rotary_sin=sin[p:], cache_seqlens=n - p, causal=True)
        assert_close_to_reference(out[b:b + 1], expect.double(), None, 1e-5, name=f"sequence {b}",
                                  relative_floor=True)
        assert_equal(k_pad[b, n:n + new], kc[0, n - p:n - p + new], name="rotated keys at cache positions")


def test_kvcache_leftpad_bad_input():
    k_cache = torch.zeros(2, 8, 1, 16)
    q = torch.randn(2, 1, 2, 16)
    table = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):  # as flash-attn (a RuntimeError there too)
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, block_table=table,
                                cache_leftpad=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_leftpad: must be <= cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cache_leftpad\[1\]: -1 is outside"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"cache_leftpad: expected shape \[2\]"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=torch.zeros(3).int())
    with pytest.raises(ValueError, match="cache_leftpad: expected an integer tensor"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=torch.zeros(2))
    with pytest.raises(TypeError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=[0, 0])


# ---- exceptions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("append", [False, True])
def test_paged_capacity_overflow_names_block_table(append):
    """flash-attn's regression test: a length past what block_table addresses raises a RuntimeError naming
    block_table; flashlm's is also a ValueError. Exactly at capacity does not raise."""
    block_size = 16
    k_cache = torch.randn(4, block_size, 1, 32)
    table = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(1, 1, 1, 32)
    new = torch.randn(1, 1, 1, 32) if append else None
    lens = torch.tensor([block_size if append else block_size + 1], dtype=torch.int32)
    for error in (RuntimeError, ValueError, ArgumentError):
        with pytest.raises(error, match="^block_table: "):
            flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, new, cache_seqlens=lens, block_table=table)
    flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=torch.tensor([block_size], dtype=torch.int32),
                            block_table=table)


def test_contiguous_capacity_overflow_names_cache_seqlens():
    k_cache = torch.zeros(1, 8, 1, 16)
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(ArgumentError, match="^cache_seqlens: cache_seqlens plus 0 new tokens must fit the 8"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=torch.tensor([9], dtype=torch.int32))
    with pytest.raises(ArgumentError, match="^cache_seqlens: must be >= 0"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=torch.tensor([-1], dtype=torch.int32))
