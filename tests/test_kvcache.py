"""The paged KV cache (flashlm.ops.kvcache, flash_attn_with_kvcache) on every device against plain references.

write_kv_cache is checked against torch indexing. Paged attention (decode and prefill) is checked against the
attention reference (reference.py) over the same K/V gathered from the blocks, in float64 and in the input
dtype: flashlm's error against float64 may be at most twice that of the input-dtype math plus a small floor
(compare.py), element by element here. Block tables shuffle the physical blocks; every CPU case runs on the
scalar reference and on the AVX2 kernels, CUDA cases in f16 and bf16. Failures name the tensor, the max error
and where it is.
"""

import math

import pytest
import torch

from compare import FLOOR, assert_close, assert_close_to_reference, assert_equal
from conftest import cpu_isas, devices, per_kernel, use_isa
from flashlm import ops
from flashlm.flash_attn_interface import flash_attn_varlen_func, flash_attn_with_kvcache
from flashlm.ops.kvcache import paged_attention, paged_attention_num_splits, write_kv_cache
from reference import attention, band_edges
from reference import paged_attention as paged_reference

pytestmark = pytest.mark.usefixtures("restore_isa")  # conftest.py: tests switch the ISA


def dtypes_for(device):
    return (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16, torch.bfloat16)


def make_cache(lens, block_size, kv_heads, head_dim, dtype, device="cpu", spare=3, gen=None):
    """Random caches holding len tokens per sequence in shuffled blocks, and the block table (int32, one
    unused column and a few unused blocks)."""
    need = [(n + block_size - 1) // block_size for n in lens]
    width = max(need + [1]) + 1
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(lens), width), -7, dtype=torch.int32)  # unread entries may hold anything
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    return k_cache, v_cache, table.to(device)


def check_close(name, got, exact, low, floor, equal_nan=False):
    """The 2x rule element by element, the floor relative to the value's magnitude; with equal_nan, NaN exactly
    where the reference has it."""
    assert_close_to_reference(got, exact, low, floor, name=name, elementwise=True, relative_floor=True,
                              equal_nan=equal_nan)


def check(q, k_cache, v_cache, table, lens, cu=None, num_splits=0, equal_nan=False, **opts):
    out, lse = paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=q.device),
                               cu, None, causal=opts.get("causal", True), window_size=opts.get("window", (-1, -1)),
                               softcap=opts.get("softcap", 0.0), num_splits=num_splits, return_lse=True)
    opts.setdefault("causal", True)
    exact, exact_lse = paged_reference(q.double(), k_cache, v_cache, table, lens, cu, **opts)
    low, _ = paged_reference(q, k_cache, v_cache, table, lens, cu, **opts)
    check_close("out", out, exact, low, FLOOR[q.dtype], equal_nan)
    check_close("lse", lse, exact_lse, None, 1e-5, equal_nan)
    return out, lse


# ---- write_kv_cache --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_cache(device, block_size):
    for dtype in dtypes_for(device):
        num_blocks, kv_heads, head_dim, tokens = 40 // block_size + 2, 3, 40, 20
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
        v_cache = torch.randn_like(k_cache)
        slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
        slots[::4] = -1
        key = torch.randn(tokens, kv_heads, head_dim).to(dtype).to(device)
        value = torch.randn(tokens, 2 * kv_heads, head_dim).to(dtype).to(device)[:, ::2]  # strided heads
        expect_k, expect_v = k_cache.clone().flatten(0, 1), v_cache.clone().flatten(0, 1)
        keep = slots >= 0
        expect_k[slots[keep]] = key[keep]
        expect_v[slots[keep]] = value[keep]
        write_kv_cache(key, value, k_cache, v_cache, slots)
        assert_equal(k_cache.flatten(0, 1), expect_k, name=f"k_cache ({dtype})")
        assert_equal(v_cache.flatten(0, 1), expect_v, name=f"v_cache ({dtype})")


def test_write_kv_cache_rejects_bad_input():
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, k_cache, v_cache, torch.tensor([0, 32, 1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, k_cache, v_cache, torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, k_cache, v_cache, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="key"):
        write_kv_cache(key.bfloat16(), key, k_cache, v_cache, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="value"):
        write_kv_cache(key, torch.randn(3, 1, 16), k_cache, v_cache, torch.tensor([0, 1, 2]))
    assert k_cache.abs().sum() == 0, "a rejected write must not touch the cache"


# ---- decode ----------------------------------------------------------------------------------------------

# (lens, block_size, heads, kv_heads, head_dim): 1 token to thousands, every block size, GQA 1/2/4/MQA.
DECODE_CASES = [
    ([1, 7, 300, 33], 16, 4, 4, 64),
    ([2500, 1, 100], 32, 8, 2, 128),
    ([17, 64, 5], 1, 8, 2, 40),
    ([700, 256, 257], 256, 8, 1, 80),
    ([129, 40], 16, 16, 4, 72),
    ([100, 5], 16, 48, 1, 64),
    ([3000], 16, 32, 8, 128),
]


@pytest.mark.parametrize("device,isa,dtype,case,splits", per_kernel(
    cpu=[(dtype, case, 0) for dtype in (torch.float32, torch.bfloat16) for case in DECODE_CASES],
    cuda=[(dtype, ([1, 300, 2500, 17], 16, 8, 2, 128), splits) for dtype in (torch.float16, torch.bfloat16)
          for splits in (1, 4, 0)]))
def test_decode(device, isa, dtype, case, splits):
    use_isa(isa)
    lens, block_size, heads, kv_heads, head_dim = case
    gen = torch.Generator().manual_seed(len(lens) * 1000 + head_dim)
    k_cache, v_cache, table = make_cache(lens, block_size, kv_heads, head_dim, dtype, device, gen=gen)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype).to(device)
    check(q, k_cache, v_cache, table, lens, num_splits=splits)


@pytest.mark.parametrize("opts", [dict(window=(50, -1)), dict(softcap=5.0), dict(causal=False, window=(10, 3))])
@pytest.mark.parametrize("isa", cpu_isas())
def test_decode_masking(isa, opts):
    use_isa(isa)
    lens = [1, 40, 600]
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, torch.float32)
    q = torch.randn(len(lens), 4, 64)
    check(q, k_cache, v_cache, table, lens, **opts)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_splits_equal_unsplit(isa, dtype):
    use_isa(isa)
    lens = [1, 90, 1000, 1500]
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, dtype)
    q = torch.randn(len(lens), 8, 64).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    base, base_lse = check(q, k_cache, v_cache, table, lens, num_splits=1)
    for splits in range(2, 9):
        out, lse = paged_attention(q, k_cache, v_cache, table, seq_lens, num_splits=splits, return_lse=True,
                                   softcap=0.0)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_close(out, base, atol=tol, rtol=tol, name=f"out with {splits} splits")
        assert_close(lse, base_lse, atol=1e-5, rtol=1e-5, name=f"lse with {splits} splits")
    check(q, k_cache, v_cache, table, lens, num_splits=5, window=(300, -1))


@pytest.mark.parametrize("isa", cpu_isas())
def test_decode_empty_context(isa):
    use_isa(isa)
    k_cache, v_cache, table = make_cache([0, 5], 4, 1, 16, torch.float32)
    q = torch.randn(2, 2, 16)
    for splits in (1, 3):
        out, lse = paged_attention(q, k_cache, v_cache, table, torch.tensor([0, 5], dtype=torch.int32),
                                   num_splits=splits, return_lse=True)
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a row that sees no key must be 0"
        assert torch.isinf(lse[:, 0]).all() and (lse[:, 0] > 0).all(), "its lse must be +inf"
        assert torch.isfinite(lse[:, 1]).all()


# ---- prefill ---------------------------------------------------------------------------------------------

# (lens, q_lens, block_size, heads, kv_heads, head_dim): whole prompts and chunks after a cached prefix.
PREFILL_CASES = [
    ([70, 1, 300], [70, 1, 45], 16, 4, 2, 64),
    ([33, 500], [5, 130], 1, 6, 6, 40),
    ([1200, 9], [64, 9], 256, 8, 1, 80),
    ([257, 100], [200, 0], 32, 8, 4, 128),
]


@pytest.mark.parametrize("device,isa,dtype,case,opts", per_kernel(
    cpu=[(dtype, case, {}) for dtype in (torch.float32, torch.bfloat16) for case in PREFILL_CASES],
    cuda=[(dtype, ([300, 33, 1000], [300, 1, 64], block_size, 8, 4, 64), dict(window=(100, -1)))
          for dtype in (torch.float16, torch.bfloat16) for block_size in (16, 256)]))
def test_prefill(device, isa, dtype, case, opts):
    use_isa(isa)
    lens, q_lens, block_size, heads, kv_heads, head_dim = case
    gen = torch.Generator().manual_seed(sum(lens) + head_dim)
    k_cache, v_cache, table = make_cache(lens, block_size, kv_heads, head_dim, dtype, device, gen=gen)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    q = torch.randn(int(cu[-1]) + 2, heads, head_dim, generator=gen).to(dtype).to(device)  # 2 rows in no sequence
    out, _ = check(q, k_cache, v_cache, table, lens, cu, **opts)
    assert_equal(out[-2:], torch.zeros_like(out[-2:]), name="rows past cu_seqlens_q[-1]")


@pytest.mark.parametrize("opts", [dict(window=(40, -1)), dict(softcap=3.0), dict(causal=False),
                                  dict(causal=False, window=(20, 7))])
@pytest.mark.parametrize("isa", cpu_isas())
def test_prefill_masking(isa, opts):
    use_isa(isa)
    lens, q_lens = [150, 60], [100, 60]
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, torch.float32)
    cu = torch.tensor([0, 100, 160], dtype=torch.int32)
    check(torch.randn(160, 4, 64), k_cache, v_cache, table, lens, cu, **opts)


# ---- NaN and inf -----------------------------------------------------------------------------------------
# out and lse are NaN (or +-inf) exactly where the float64 reference's are (csrc/attention/shared_softmax.h),
# the rest within the 2x rule; what a query does not see (slots past its sequence's length, blocks the
# sequence does not own, keys outside its window) never reaches it, whatever they hold.

VALUES = [math.nan, math.inf, -math.inf]


def with_nonfinite(cache, table, lens, value, past):
    """A copy of a cache with `value` in each sequence's tokens: the whole last token of K/V head 0, an element of
    a middle token and of the first; with past, in every slot after a sequence's last token in its last block
    and in every block no sequence owns instead."""
    cache = cache.clone()
    bs = cache.shape[1]
    owned = set()
    for s, n in enumerate(lens):
        blocks = [int(b) for b in table[s, :(n + bs - 1) // bs]]
        owned.update(blocks)
        if n == 0:
            continue
        if past:
            cache[blocks[-1], (n - 1) % bs + 1:] = value
        else:
            cache[blocks[(n - 1) // bs], (n - 1) % bs, 0] = value
            cache[blocks[n // 2 // bs], n // 2 % bs, -1, 3] = value
            cache[blocks[0], 0, -1, 5] = value
    if past:
        for b in set(range(cache.shape[0])) - owned:
            cache[b] = value
    return cache


def nonfinite_inputs(q, k_cache, v_cache, table, lens, where, value):
    """q, k_cache, v_cache with `value` placed by `where`: "q" (an element of one row, the whole of another),
    "k", "v" (the sequences' tokens) or "k past", "v past" (what no sequence reads)."""
    if where == "q":
        q = q.clone()
        q[1, 0, 5] = value
        q[-3, -1] = value
        return q, k_cache, v_cache
    cache = with_nonfinite(k_cache if where[0] == "k" else v_cache, table, lens, value, where.endswith("past"))
    return (q, cache, v_cache) if where[0] == "k" else (q, k_cache, cache)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["q", "k", "v", "k past", "v past"])
@pytest.mark.parametrize("device,isa,dtype,splits", per_kernel(
    cpu=[(torch.float32, 1), (torch.bfloat16, 3)], cuda=[(torch.float16, 1), (torch.bfloat16, 4)]))
def test_decode_nonfinite(device, isa, dtype, splits, where, value):
    use_isa(isa)
    lens = [1, 40, 300, 0, 77]
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, dtype, device, gen=gen)
    q = torch.randn(len(lens), 4, 64, generator=gen).to(dtype).to(device)
    q, k_cache, v_cache = nonfinite_inputs(q, k_cache, v_cache, table, lens, where, value)
    for opts in (dict(), dict(window=(50, -1)), dict(softcap=5.0)):
        check(q, k_cache, v_cache, table, lens, num_splits=splits, equal_nan=True, **opts)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["q", "k", "v", "k past", "v past"])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_prefill_nonfinite(device, isa, dtype, where, value):
    use_isa(isa)
    lens, q_lens = [70, 1, 300], [70, 1, 45]
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, dtype, device, gen=gen)
    cu = torch.tensor([0, 70, 71, 116], dtype=torch.int32, device=device)
    q = torch.randn(118, 4, 64, generator=gen).to(dtype).to(device)  # 2 rows in no sequence
    q, k_cache, v_cache = nonfinite_inputs(q, k_cache, v_cache, table, lens, where, value)
    for opts in (dict(), dict(window=(20, -1)), dict(causal=False, window=(10, 3)), dict(softcap=5.0)):
        out, _ = check(q, k_cache, v_cache, table, lens, cu, equal_nan=True, **opts)
        assert_equal(out[-2:], torch.zeros_like(out[-2:]), name="rows past cu_seqlens_q[-1]")


@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_nan_slot_just_outside_the_window(device, isa, dtype):
    # A cached key just outside a query's band (before its window; after a prefill row's window or causal
    # diagonal, where the next rows look) is NaN, one slot at a time (the first and last such slots of each
    # sequence): it reaches exactly the rows that see it.
    use_isa(isa)
    lens, q_lens = [40, 9, 70], [5, 9, 1]
    gen = torch.Generator().manual_seed(8)
    k_cache, v_cache, table = make_cache(lens, 16, 2, 64, dtype, device, gen=gen)
    cu = torch.tensor([0, 5, 14, 15], dtype=torch.int32, device=device)
    q = torch.randn(15, 4, 64, generator=gen).to(dtype).to(device)
    for causal, window in ((True, (7, -1)), (False, (3, 2))):
        for s in range(len(lens)):
            for count, rows, splits in ((q_lens[s], cu, 0), (1, None, 3)):  # prefill, then decode (split)
                edges = band_edges(count, lens[s], causal, window)
                for j in edges[:1] + edges[-1:]:
                    block, offset = int(table[s, j // 16]), j % 16
                    kc = k_cache.clone()
                    kc[block, offset, 1, 7] = math.nan
                    queries = q if rows is not None else q[cu[1:] - 1]  # decode: each sequence's last row
                    check(queries, kc, v_cache, table, lens, rows, num_splits=splits, equal_nan=True, causal=causal,
                          window=window)


@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("device", devices())
def test_flash_attn_with_kvcache_nonfinite(device, seqlen_q):
    # NaN in the cache past what each sequence holds changes nothing; NaN in a new value reaches the queries that
    # see it, as in the reference.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    batch, heads, kv_heads, head_dim, capacity = 3, 4, 2, 64, 64
    cache_lens = torch.tensor([5, 0, 40], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, k, v, q = (torch.randn(shape, generator=gen).to(dtype).to(device) for shape in (
        (batch, capacity, kv_heads, head_dim), (batch, capacity, kv_heads, head_dim), (batch, seqlen_q, kv_heads, head_dim),
        (batch, seqlen_q, kv_heads, head_dim), (batch, seqlen_q, heads, head_dim)))
    ends = (cache_lens + seqlen_q).tolist()
    for b, n in enumerate(ends):
        k_cache[b, n:] = math.nan
        v_cache[b, n:] = math.inf
    v = v.clone()
    v[2, 0, 1] = math.nan  # the first new token of sequence 2: every query of it sees it
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_lens, causal=True, return_softmax_lse=True)
    for b, n in enumerate(ends):
        kc_b, vc_b = kc[b:b + 1, :n].double(), vc[b:b + 1, :n].double()
        exact, exact_lse = attention(q[b:b + 1].double(), kc_b, vc_b, causal=True)
        low, _ = attention(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal=True)
        check_close(f"out[{b}]", out[b:b + 1], exact, low, FLOOR[dtype], equal_nan=True)
        check_close(f"lse[{b}]", lse[b:b + 1], exact_lse, None, 1e-5, equal_nan=True)
    assert torch.isnan(out[2, :, 2:]).all() and torch.isfinite(out[:2]).all()


# ---- errors ----------------------------------------------------------------------------------------------

def test_paged_attention_rejects_bad_input():
    lens = [10, 20]
    k_cache, v_cache, table = make_cache(lens, 8, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)

    def run(**kw):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens)
        args.update(kw)
        return paged_attention(**args)

    bad_table = table.clone()
    bad_table[1, 2] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        run(block_table=bad_table)
    bad_table[1, 2] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        run(block_table=bad_table)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        run(seq_lens=torch.tensor([table.shape[1] * 8 + 1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        run(seq_lens=seq_lens.long())
    with pytest.raises(ValueError, match="block_table"):
        run(block_table=table.long())
    with pytest.raises(ValueError, match="k_cache"):
        run(k_cache=k_cache.bfloat16())
    with pytest.raises(ValueError, match="v_cache"):
        run(v_cache=v_cache[:, :4])
    with pytest.raises(ValueError, match="q"):
        run(q=torch.randn(3, 4, 32))
    with pytest.raises(ValueError, match="k_cache"):
        run(q=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        run(q=torch.randn(8, 4, 32), cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = -1 is outside"):  # fewer tokens than queries is fine
        run(seq_lens=torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        run(num_splits=-1)


def test_num_splits_heuristic():
    # Few (sequence, K/V head) pairs and a long context split; a full batch or a short context does not.
    assert paged_attention_num_splits("cuda", 1, 8, 32768, 16) >= 16
    assert paged_attention_num_splits("cuda", 64, 8, 32768, 16) == 1
    assert paged_attention_num_splits("cuda", 1, 8, 300, 16) == 1
    assert paged_attention_num_splits("cpu", 32, 8, 8192, 16) == 1
    for dev in ("cpu", "cuda"):
        for seqs, heads, length in [(1, 1, 1), (2, 1, 100000), (7, 4, 4096)]:
            n = paged_attention_num_splits(dev, seqs, heads, length, 16)
            assert 1 <= n <= 64 and (n == 1 or length // n >= 256), (dev, seqs, heads, length, n)


# ---- flash-attn interface --------------------------------------------------------------------------------

@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_flash_attn_with_kvcache_appends_then_attends(paged, seqlen_q):
    batch, heads, kv_heads, head_dim, capacity, new = 3, 4, 2, 32, 64, seqlen_q
    cache_lens = torch.tensor([5, 0, 40], dtype=torch.int32)
    dense_k = torch.randn(batch, capacity, kv_heads, head_dim)
    dense_v = torch.randn(batch, capacity, kv_heads, head_dim)
    k, v = torch.randn(batch, new, kv_heads, head_dim), torch.randn(batch, new, kv_heads, head_dim)
    q = torch.randn(batch, seqlen_q, heads, head_dim)
    if paged:  # the same contents, in shuffled blocks of 16
        block_size = 16
        perm = torch.randperm(batch * capacity // block_size).to(torch.int32)
        table = perm.view(batch, -1)
        k_cache = torch.zeros(len(perm), block_size, kv_heads, head_dim)
        v_cache = torch.zeros_like(k_cache)
        k_cache[table.long()] = dense_k.view(batch, -1, block_size, kv_heads, head_dim)
        v_cache[table.long()] = dense_v.view(batch, -1, block_size, kv_heads, head_dim)
        kw = dict(block_table=table)
    else:  # cache rows in another order, picked by cache_batch_idx
        order = torch.tensor([2, 0, 1])
        k_cache, v_cache = torch.zeros_like(dense_k), torch.zeros_like(dense_v)
        k_cache[order], v_cache[order] = dense_k, dense_v
        kw = dict(cache_batch_idx=order.to(torch.int32))
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_lens, causal=True,
                                       return_softmax_lse=True, **kw)
    for b in range(batch):
        n = int(cache_lens[b])
        dense_k[b, n:n + new], dense_v[b, n:n + new] = k[b], v[b]
    total = (cache_lens + new).tolist()
    # Each sequence against the first total[b] rows of its dense cache, in float64.
    expect = torch.cat([attention(q[b:b + 1].double(), dense_k[b:b + 1, :n].double(), dense_v[b:b + 1, :n].double(),
                                  causal=True)[0] for b, n in enumerate(total)])
    check_close("out", out, expect, expect.float(), 1e-5)
    assert lse.shape == (batch, heads, seqlen_q)
    if paged:
        got_k = k_cache[table.long()].reshape(batch, capacity, kv_heads, head_dim)
    else:
        got_k = k_cache[order]
    assert_equal(got_k, dense_k, name="the cache, the new keys written at cache_seqlens")


def test_flash_attn_with_kvcache_rotary():
    batch, heads, head_dim, cache_len = 2, 2, 16, 6
    k_cache = torch.randn(batch, 10, heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    q, k, v = torch.randn(batch, 1, heads, head_dim), torch.randn(batch, 1, heads, head_dim), torch.randn(
        batch, 1, heads, head_dim)
    angles = torch.arange(20.0)[:, None] * torch.tensor([1.0, 0.1, 0.01])[None, :]  # rotary_dim 6 < head_dim
    cos, sin = angles.cos(), angles.sin()
    for interleaved in (True, False):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_len,
                                      causal=True, rotary_interleaved=interleaved)
        # Rotate by hand: pairs (0,1),(2,3),(4,5) or (0,3),(1,4),(2,5), at position cache_len.
        c, s = cos[cache_len], sin[cache_len]

        def rot(x):
            x = x.clone()
            idx = [(0, 1), (2, 3), (4, 5)] if interleaved else [(0, 3), (1, 4), (2, 5)]
            for f, (a, b) in enumerate(idx):
                xa, xb = x[..., a].clone(), x[..., b].clone()
                x[..., a], x[..., b] = xa * c[f] - xb * s[f], xa * s[f] + xb * c[f]
            return x

        assert_close(kc[:, cache_len], rot(k)[:, 0], atol=1e-6, rtol=1e-5, name="k, rotated before it is cached")
        expect = flash_attn_with_kvcache(rot(q), k_cache.clone(), v_cache.clone(), rot(k), v,
                                         cache_seqlens=cache_len, causal=True)
        assert_close(out, expect, atol=1e-6, rtol=1e-5, name="out")


def test_flash_attn_with_kvcache_rejects_bad_input():
    k_cache = torch.zeros(2, 8, 1, 16)
    q, k = torch.randn(2, 1, 2, 16), torch.randn(2, 3, 1, 16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k, cache_seqlens=6)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):  # with a paged cache, as in flash-attn
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, cache_leftpad=torch.zeros(2).int(),
                                block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="k, v"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, None, cache_seqlens=1)
    with pytest.raises(ValueError, match="k: dtype torch.bfloat16 differs from k_cache's torch.float32"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k.bfloat16(), k, cache_seqlens=1)
    assert k_cache.abs().sum() == 0


def test_flash_attn_varlen_func_block_table():
    lens, q_lens = [40, 90], [40, 7]
    k_cache, v_cache, table = make_cache(lens, 16, 2, 32, torch.float32)
    cu_q = torch.tensor([0, 40, 47], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 130], dtype=torch.int32)
    q = torch.randn(47, 4, 32)
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 40, 90, causal=True, block_table=table)
    exact, _ = paged_reference(q.double(), k_cache, v_cache, table, lens, cu_q, causal=True)
    assert_close(out, exact, atol=1e-5, rtol=1e-5, name="out")


# ---- CUDA only (run where a GPU is) -----------------------------------------------------------------------------

@pytest.mark.cuda
def test_write_kv_cache_cuda_skips_out_of_range():
    k_cache = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 2, 64, device="cuda", dtype=torch.bfloat16)
    write_kv_cache(key, key, k_cache, v_cache, torch.tensor([5, -1, 64], device="cuda"))
    assert k_cache.flatten(0, 1)[5].eq(1).all() and k_cache.sum() == 128


def test_ops_trace():
    # Schema, fake implementations (shapes without running) and AOT dispatch of both custom ops.
    lens = [7, 12]
    k_cache, v_cache, table = make_cache(lens, 4, 2, 16, torch.float32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    for q, cu_q, max_q in ((torch.randn(2, 4, 16), None, 0), (torch.randn(5, 4, 16), cu, 3)):
        torch.library.opcheck(torch.ops.flashlm.paged_attention.default,
                              (q, k_cache, v_cache, table, seq_lens, cu_q, max_q, 0.25, True, -1, -1, 0.0, 0))
    key = torch.randn(3, 2, 16)
    torch.library.opcheck(torch.ops.flashlm.write_kv_cache.default,
                          (key, key, k_cache, v_cache, torch.tensor([0, 5, -1])))


@pytest.mark.cuda
def test_cu_seqlens_q_on_another_device_is_rejected():
    k_cache, v_cache, table = make_cache([5], 4, 1, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention(torch.randn(5, 1, 16).bfloat16(), k_cache, v_cache, table, torch.tensor([5], dtype=torch.int32),
                        torch.tensor([0, 5], dtype=torch.int32, device="cuda"), 5)
