"""The paged KV cache called as a hostile user would, one argument mutated at a time: write_kv_cache,
paged_attention (decode, decode split over the context, prefill) and flash_attn_with_kvcache (contiguous
caches, decode and prefill). Results are compared with torch indexing and the float64 attention reference
(tests/reference.py), NaN exactly where the reference has NaN: a NaN in the context reaches the rows that read
it, a NaN past a sequence's length or in a block no table names reaches none. Each case runs in a forked
child (tests/robust.py).
"""

import math

import torch

import robust
from flashlm import flash_attn_interface as fa
from flashlm import ops
from reference import attention
from reference import paged_attention as paged_attention_reference
from robust_args import (WRAP, Entry, Mutation, apply, attention_options, dtype_mutations, edit, float_mutations,
                         int_mutations, layout_mutations, nan_at, poke, seeded, special_value_mutations, t64,
                         tensor_mutations, type_mutations, valid_call, wrapped)

B, H, HKV, D = 2, 4, 2, 32
RTOL = 2e-5  # float32 attention against float64, relative to the output's largest value


# -- write_kv_cache, paged_attention --------------------------------------------------------------------------

BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, HEADS = 10, 4, 2, 32, 4


def make_write():
    g = seeded(14)
    cache = (BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return dict(key=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g), value=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g),
                k_cache=torch.randn(cache, generator=g), v_cache=torch.randn(cache, generator=g),
                slot_mapping=torch.tensor([3, 0, 17, -1, 22]))


def write_reference(a):
    out = []
    for new, cache in ((a["key"], a["k_cache"]), (a["value"], a["v_cache"])):
        cache = torch.as_tensor(cache).double().clone()
        rows = cache.view(-1, *cache.shape[2:])
        slots = torch.as_tensor(a["slot_mapping"]).long()
        keep = slots >= 0
        rows[slots[keep]] = torch.as_tensor(new).double()[keep]
        out.append(cache)
    return tuple(out)


def call_write(a):
    ops.write_kv_cache(a["key"], a["value"], a["k_cache"], a["v_cache"], a["slot_mapping"])
    return a["k_cache"], a["v_cache"]


WRITE_KV_CACHE = Entry("flashlm.ops.write_kv_cache", make_write, call_write, write_reference, rtol_of_max=0.0)


def make_table(lens, gen_seed=15, width=4, blocks=BLOCKS):
    perm = torch.randperm(blocks, generator=seeded(gen_seed)).to(torch.int32)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for s, n in enumerate(lens):
        need = -(-n // BLOCK_SIZE)
        table[s, :need] = perm[used:used + need]
        used += need
    return table


def make_decode(lens=(5, 1, 13), blocks=BLOCKS, width=4, num_splits=0):
    g = seeded(16)
    cache = (blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return dict(q=torch.randn(len(lens), HEADS, HEAD_DIM, generator=g), k_cache=torch.randn(cache, generator=g),
                v_cache=torch.randn(cache, generator=g), block_table=make_table(lens, width=width, blocks=blocks),
                seq_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=None, max_seqlen_q=None,
                softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, num_splits=num_splits)


def make_prefill():
    a = make_decode()
    a.update(q=torch.randn(6, HEADS, HEAD_DIM, generator=seeded(17)), cu_seqlens_q=torch.tensor([0, 2, 3, 6], dtype=torch.int32),
             max_seqlen_q=3)
    return a


def call_paged(a):
    return ops.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"], a["cu_seqlens_q"],
                                  a["max_seqlen_q"], a["softmax_scale"], a["causal"], a["window_size"], a["softcap"],
                                  a["num_splits"], return_lse=True)


def paged_reference(a):
    q = torch.as_tensor(a["q"]).double()
    scale = q.shape[-1] ** -0.5 if a["softmax_scale"] is None else float(a["softmax_scale"])
    lens = [int(n) for n in torch.as_tensor(a["seq_lens"])]
    cu = None if a["cu_seqlens_q"] is None else [int(c) for c in torch.as_tensor(a["cu_seqlens_q"])]
    window = tuple(int(w) for w in a["window_size"])
    return paged_attention_reference(q, torch.as_tensor(a["k_cache"]).double(), torch.as_tensor(a["v_cache"]).double(),
                           torch.as_tensor(a["block_table"]).long(), lens, cu, causal=bool(a["causal"]), window=window,
                           softcap=float(a["softcap"]), scale=scale)


PAGED_DECODE = Entry("flashlm.ops.paged_attention (decode)", make_decode, call_paged, paged_reference, rtol_of_max=1e-5)
PAGED_SPLITS = Entry("flashlm.ops.paged_attention (decode, 4 splits)",
                     lambda: make_decode((61, 3), blocks=20, width=16, num_splits=4), call_paged, paged_reference,
                     rtol_of_max=1e-5)
PAGED_PREFILL = Entry("flashlm.ops.paged_attention (prefill)", make_prefill, call_paged, paged_reference,
                      rtol_of_max=1e-5)


def at_token(a, seq, token):
    """(block, offset) of token `token` of sequence `seq` in the cache."""
    return int(a["block_table"][seq, token // BLOCK_SIZE]), token % BLOCK_SIZE


def cache_nan(cache, seq, token, what):
    def change(a):
        block, offset = at_token(a, seq, token)
        a[cache] = poke(a[cache], (block, offset, 1, 0), math.nan)
    return Mutation(cache, f"NaN at token {token} of sequence {seq} ({what})", change, "correct")


def unused_block_nan(cache):
    def change(a):
        used = set(a["block_table"].reshape(-1).tolist())
        spare = next(b for b in range(a[cache].shape[0]) if b not in used)
        a[cache] = poke(a[cache], (spare, 0, 0, 0), math.nan)
    return Mutation(cache, "NaN in a block no table names", change, "correct")


def table_entry(value, dtype=torch.int32):
    def change(a):
        table = a["block_table"].to(dtype)
        table[2, 1] = value
        a["block_table"] = table
    return change


def paged_cases():
    cases = WRITE_KV_CACHE.cases(
        valid_call(),
        Mutation("slot_mapping", "3 + 2**32", apply("slot_mapping", lambda s: poke(s, 0, 3 + WRAP))),
        Mutation("slot_mapping", f"{BLOCKS * BLOCK_SIZE} (one past the cache)",
                 apply("slot_mapping", lambda s: poke(s, 0, BLOCKS * BLOCK_SIZE))),
        Mutation("slot_mapping", "-2", apply("slot_mapping", lambda s: poke(s, 0, -2))),
        Mutation("slot_mapping", "-2**63", apply("slot_mapping", lambda s: poke(s, 0, -(1 << 63)))),
        Mutation("slot_mapping", "the same slot twice", apply("slot_mapping", lambda s: poke(s, 1, 3)), "either"),
        *dtype_mutations("slot_mapping", (torch.int32, torch.float32, torch.uint8)),
        Mutation("slot_mapping", "4 slots for 5 tokens", apply("slot_mapping", lambda s: s[:4]), names=("slot_mapping", "key")),
        Mutation("slot_mapping", "shape [5, 1]", apply("slot_mapping", lambda s: s[:, None])),
        Mutation("slot_mapping", "not contiguous", apply("slot_mapping", lambda s: torch.stack([s, s], 1)[:, 0]),
                 "either"),
        Mutation("slot_mapping", "on the meta device", apply("slot_mapping", lambda s: s.to("meta")), "either"),
        Mutation("slot_mapping", "dimension 0 + 2**32 (a stride-0 view)", apply("slot_mapping", lambda s: wrapped(s, 0)),
                 names=("slot_mapping", "key")),
        *type_mutations("slot_mapping"),
        *tensor_mutations("key", dtypes=(torch.bfloat16, torch.float64, torch.int32)),
        Mutation("key", "dimension 0 + 2**32 (a stride-0 view)", apply("key", lambda t: wrapped(t, 0)),
                 names=("key", "value", "slot_mapping")),
        Mutation("key", "dimension 2 + 2**32 (a stride-0 view)", apply("key", lambda t: wrapped(t, 2)),
                 names=("key", "value", "k_cache")),
        Mutation("key", "3 heads", apply("key", lambda t: torch.cat([t, t[:, :1]], 1)), names=("key", "k_cache")),
        Mutation("key", "head_dim 31", apply("key", lambda t: t[..., :31].clone()), names=("key", "k_cache")),
        Mutation("value", "6 tokens", apply("value", lambda t: torch.cat([t, t[:1]])), names=("value", "key")),
        *special_value_mutations("value", values=(math.nan,)),
        *dtype_mutations("k_cache", (torch.bfloat16, torch.float64, torch.int32)),
        Mutation("k_cache", "on the meta device", apply("k_cache", lambda t: t.to("meta")), "either"),
        Mutation("k_cache", "dimension 0 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 0))),
        Mutation("k_cache", "dimension 1 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 1))),
        Mutation("k_cache", "heads at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 2)[:, :, ::2]), "either"),
        Mutation("k_cache", "blocks at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 0)[::2]), "either"),
        Mutation("k_cache", "3-dim [40, 2, 32]", apply("k_cache", lambda t: t.reshape(-1, KV_HEADS, HEAD_DIM))),
        *type_mutations("k_cache"),
        Mutation("v_cache", "5 blocks (k_cache has 10)", apply("v_cache", lambda t: t[:5].clone()),
                 names=("v_cache", "k_cache")),
        Mutation("v_cache", "bfloat16 (k_cache float32)", apply("v_cache", lambda t: t.bfloat16()), "either",
                 names=("v_cache", "k_cache")),
    )
    decode = [
        valid_call(),
        *special_value_mutations("q", values=(math.nan,)),
        cache_nan("k_cache", 2, 6, "inside the context"),
        cache_nan("v_cache", 2, 6, "inside the context"),
        cache_nan("k_cache", 0, 6, "past seq_lens, in the sequence's last block"),
        cache_nan("v_cache", 0, 7, "past seq_lens, in the sequence's last block"),
        unused_block_nan("k_cache"), unused_block_nan("v_cache"),
        *dtype_mutations("q", (torch.bfloat16, torch.float64, torch.float16)),
        Mutation("q", "on the meta device", apply("q", lambda t: t.to("meta")), "either"),
        Mutation("q", "3 heads (kv_heads 2)", apply("q", lambda t: t[:, :3].clone()), names=("q", "k_cache")),
        Mutation("q", "head_dim 31", apply("q", lambda t: t[..., :31].clone()), names=("q", "k_cache")),
        Mutation("q", "2-dim", apply("q", lambda t: t.reshape(3, -1))),
        Mutation("q", "dimension 0 + 2**32 (a stride-0 view)", apply("q", lambda t: wrapped(t, 0)),
                 names=("q", "seq_lens", "block_table")),
        Mutation("q", "dimension 2 + 2**32 (a stride-0 view)", apply("q", lambda t: wrapped(t, 2)),
                 names=("q", "k_cache")),
        *layout_mutations("q"),
        *type_mutations("q"),
        *dtype_mutations("k_cache", (torch.bfloat16, torch.float16)),
        Mutation("k_cache", "on the meta device", apply("k_cache", lambda t: t.to("meta")), "either"),
        Mutation("k_cache", "head_dim 31", apply("k_cache", lambda t: t[..., :31].clone()), names=("k_cache", "q")),
        Mutation("k_cache", "dimension 0 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 0)), "either"),
        Mutation("k_cache", "dimension 1 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 1)), "either"),
        Mutation("k_cache", "blocks at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 0)[::2]), "either"),
        Mutation("v_cache", "5 blocks (k_cache has 10)", apply("v_cache", lambda t: t[:5].clone()),
                 names=("v_cache", "k_cache")),
        Mutation("v_cache", "bfloat16 (k_cache float32)", apply("v_cache", lambda t: t.bfloat16()), "either",
                 names=("v_cache", "k_cache")),
        Mutation("block_table", f"an entry {BLOCKS} (one past the cache)", table_entry(BLOCKS)),
        Mutation("block_table", "an entry -1", table_entry(-1)),
        Mutation("block_table", "an entry 2**31 - 1", table_entry((1 << 31) - 1)),
        Mutation("block_table", "int64 with an entry 1 + 2**32", table_entry(1 + WRAP, torch.int64)),
        Mutation("block_table", "int64", apply("block_table", lambda t: t.long()), "either"),
        Mutation("block_table", "float32", apply("block_table", lambda t: t.float())),
        Mutation("block_table", "2 rows for 3 sequences", apply("block_table", lambda t: t[:2]),
                 names=("block_table", "seq_lens", "q")),
        Mutation("block_table", "1 column (sequences need 4)", apply("block_table", lambda t: t[:, :1].clone()),
                 names=("block_table", "seq_lens")),
        Mutation("block_table", "columns at stride 2", apply("block_table", lambda t: torch.cat([t, t], 1)[:, ::2]),
                 "either"),
        Mutation("block_table", "on the meta device", apply("block_table", lambda t: t.to("meta")), "either"),
        Mutation("block_table", "dimension 1 + 2**32 (a stride-0 view)", apply("block_table", lambda t: wrapped(t, 1))),
        *type_mutations("block_table"),
        Mutation("seq_lens", "17 (the table holds 16 tokens)", apply("seq_lens", lambda t: poke(t, 2, 17)),
                 names=("seq_lens", "block_table")),
        Mutation("seq_lens", "-1", apply("seq_lens", lambda t: poke(t, 0, -1))),
        Mutation("seq_lens", "0 (an empty sequence)", apply("seq_lens", lambda t: poke(t, 0, 0)), "either"),
        Mutation("seq_lens", "int64", apply("seq_lens", lambda t: t.long()), "either"),
        Mutation("seq_lens", "int64, 5 + 2**32", apply("seq_lens", lambda t: poke(t.long(), 0, 5 + WRAP))),
        Mutation("seq_lens", "float32", apply("seq_lens", lambda t: t.float())),
        Mutation("seq_lens", "2 lengths for 3 sequences", apply("seq_lens", lambda t: t[:2]),
                 names=("seq_lens", "q", "block_table")),
        Mutation("seq_lens", "dimension 0 + 2**32 (a stride-0 view)", apply("seq_lens", lambda t: wrapped(t, 0)),
                 names=("seq_lens", "q", "block_table")),
        *type_mutations("seq_lens"),
        *int_mutations("num_splits", 4, zero=None, huge="either"),
        Mutation("num_splits", "1000", apply("num_splits", lambda _: 1000), "either"),
        *float_mutations("softmax_scale", none=None),
        Mutation("softmax_scale", "0.0", apply("softmax_scale", lambda _: 0.0), "either"),
        Mutation("window_size", "(2**32 + 1, -1)", apply("window_size", lambda _: (1 + WRAP, -1)), "either"),
        Mutation("window_size", "(2, 0)", apply("window_size", lambda _: (2, 0)), "correct"),
        Mutation("window_size", "(-5, -5)", apply("window_size", lambda _: (-5, -5)), "either"),
        Mutation("window_size", "(1,)", apply("window_size", lambda _: (1,))),
        Mutation("window_size", "None", apply("window_size", lambda _: None)),
        *float_mutations("softcap"),
        Mutation("softcap", "5.0", apply("softcap", lambda _: 5.0), "correct"),
    ]
    cases += PAGED_DECODE.cases(*decode)
    cases += PAGED_SPLITS.cases(
        valid_call(),
        cache_nan("k_cache", 0, 30, "inside the context, in a middle split"),
        cache_nan("v_cache", 0, 45, "inside the context, in a later split"),
        cache_nan("k_cache", 0, 62, "past seq_lens, in the sequence's last block"),
        cache_nan("v_cache", 0, 63, "past seq_lens, in the sequence's last block"),
        *special_value_mutations("q", index=HEADS * HEAD_DIM, values=(math.nan,)),
        Mutation("softmax_scale", "nan", apply("softmax_scale", lambda _: math.nan), "either"),
        *int_mutations("num_splits", 4, zero=None, huge="either", types=False),
        Mutation("num_splits", "64 (more than the context's blocks)", apply("num_splits", lambda _: 64), "correct"),
    )
    cases += PAGED_PREFILL.cases(
        valid_call(),
        *special_value_mutations("q", index=4 * HEADS * HEAD_DIM, values=(math.nan,)),
        cache_nan("k_cache", 2, 12, "seen only by the sequence's last query"),
        cache_nan("k_cache", 2, 5, "seen by every query of the sequence"),
        cache_nan("k_cache", 2, 14, "past seq_lens"),
        # Both entries poked: [0, 2, 3, 6] with only entry 1 set to 3 is [0, 3, 3, 6], which is valid.
        Mutation("cu_seqlens_q", "decreasing [0, 3, 2, 6]", apply("cu_seqlens_q", lambda t: poke(poke(t, 1, 3), 2, 2))),
        Mutation("cu_seqlens_q", "ending past q's 6 rows", apply("cu_seqlens_q", lambda t: poke(t, 3, 7))),
        Mutation("cu_seqlens_q", "ending before q's last row", apply("cu_seqlens_q", lambda t: poke(t, 3, 5)), "either"),
        Mutation("cu_seqlens_q", "starting at -1", apply("cu_seqlens_q", lambda t: poke(t, 0, -1))),
        Mutation("cu_seqlens_q", "more queries than tokens ([0, 6, 6, 6])",
                 apply("cu_seqlens_q", lambda t: torch.tensor([0, 6, 6, 6], dtype=torch.int32)),
                 names=("cu_seqlens_q", "seq_lens")),
        Mutation("cu_seqlens_q", "int64", apply("cu_seqlens_q", lambda t: t.long()), "either"),
        Mutation("cu_seqlens_q", "int64, an entry 3 + 2**32", apply("cu_seqlens_q", lambda t: poke(t.long(), 2, 3 + WRAP))),
        Mutation("cu_seqlens_q", "3 entries for 3 sequences", apply("cu_seqlens_q", lambda t: t[:3]),
                 names=("cu_seqlens_q", "seq_lens")),
        Mutation("cu_seqlens_q", "float32", apply("cu_seqlens_q", lambda t: t.float())),
        Mutation("cu_seqlens_q", "on the meta device", apply("cu_seqlens_q", lambda t: t.to("meta")), "either"),
        Mutation("cu_seqlens_q", "a list", apply("cu_seqlens_q", lambda t: t.tolist()), "either"),
        Mutation("max_seqlen_q", "2 (the longest has 3)", apply("max_seqlen_q", lambda _: 2), "either"),
        Mutation("max_seqlen_q", "None (read from cu_seqlens_q)", apply("max_seqlen_q", lambda _: None), "correct"),
        *int_mutations("max_seqlen_q", 3, zero="either", huge="either", none=None),
        Mutation("seq_lens", "1 for a sequence of 3 queries (bottom-right: causal, the first two see no key)",
                 apply("seq_lens", lambda t: poke(t, 2, 1)), "correct"),
        Mutation("causal", "False", apply("causal", lambda _: False), "correct"),
        Mutation("window_size", "(1, 0)", apply("window_size", lambda _: (1, 0)), "correct"),
        Mutation("window_size", "(0, 2**32)", apply("window_size", lambda _: (0, WRAP)), "either"),
    )
    return cases


# -- flash_attn_with_kvcache ----------------------------------------------------------------------------------

CACHE_LEN, NEW = 16, 2


def make_kvcache():
    g = seeded(31)
    return dict(q=torch.randn(B, NEW, H, D, generator=g), k_cache=torch.randn(B, CACHE_LEN, HKV, D, generator=g),
                v_cache=torch.randn(B, CACHE_LEN, HKV, D, generator=g), k=torch.randn(B, NEW, HKV, D, generator=g),
                v=torch.randn(B, NEW, HKV, D, generator=g), cache_seqlens=torch.tensor([5, 9], dtype=torch.int32),
                cache_batch_idx=None, block_table=None, softmax_scale=None, causal=True, window_size=(-1, -1),
                softcap=0.0, num_splits=0)


def call_kvcache(a):
    out, lse = fa.flash_attn_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"],
                                          cache_seqlens=a["cache_seqlens"], cache_batch_idx=a["cache_batch_idx"],
                                          block_table=a["block_table"], softmax_scale=a["softmax_scale"],
                                          causal=a["causal"], window_size=a["window_size"], softcap=a["softcap"],
                                          num_splits=a["num_splits"], return_softmax_lse=True)
    return out, lse, a["k_cache"], a["v_cache"]


def kvcache_reference(a):
    """The new K/V written after each row's cached tokens, then attention over the cached and new tokens."""
    q, kc, vc = t64(a["q"]), t64(a["k_cache"]).clone(), t64(a["v_cache"]).clone()
    lens = torch.as_tensor(a["cache_seqlens"]).tolist()
    lens = lens if isinstance(lens, list) else [lens] * q.shape[0]
    rows = list(range(q.shape[0])) if a["cache_batch_idx"] is None else torch.as_tensor(a["cache_batch_idx"]).tolist()
    new = 0 if a["k"] is None else torch.as_tensor(a["k"]).shape[1]
    outs, lses = [], []
    for b, (row, n) in enumerate(zip(rows, lens)):
        if new:
            kc[row, n:n + new], vc[row, n:n + new] = t64(a["k"])[b], t64(a["v"])[b]
        out, lse = attention(q[b:b + 1], kc[row:row + 1, :n + new], vc[row:row + 1, :n + new], **attention_options(a))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), kc, vc


KVCACHE = Entry("flash_attn_with_kvcache", make_kvcache, call_kvcache, kvcache_reference, rtol_of_max=RTOL)


def make_kvcache_decode():
    a = make_kvcache()
    return dict(a, q=a["q"][:, :1].clone(), k=a["k"][:, :1].clone(), v=a["v"][:, :1].clone())


KVCACHE_DECODE = Entry("flash_attn_with_kvcache (decode)", make_kvcache_decode, call_kvcache, kvcache_reference,
                       rtol_of_max=RTOL)


def kvcache_cases():
    lens = ("cache_seqlens",)
    cases = KVCACHE.cases(
        valid_call(),
        nan_at("q", (1, 0, 2, 3), "one query row"),
        nan_at("k", (0, 1, 1, 0), "a new key only the last query sees"),
        nan_at("k_cache", (0, 12, 0, 0), "past the cached and new tokens"),
        nan_at("k_cache", (1, 2, 0, 0), "a cached key"),
        nan_at("v_cache", (0, 15, 1, 4), "past the cached and new tokens"),
        Mutation("cache_seqlens", "an int 5", apply("cache_seqlens", lambda _: 5), "correct"),
        Mutation("cache_seqlens", "an int 5 + 2**32", apply("cache_seqlens", lambda _: 5 + WRAP), names=lens),
        Mutation("cache_seqlens", "an int -1", apply("cache_seqlens", lambda _: -1), names=lens),
        Mutation("cache_seqlens", "15 (no room for 2 new)", apply("cache_seqlens", lambda t: poke(t, 1, 15)), names=lens),
        Mutation("cache_seqlens", "int64", apply("cache_seqlens", lambda t: t.long()), "either"),
        Mutation("cache_seqlens", "int64, 5 + 2**32", apply("cache_seqlens", lambda t: poke(t.long(), 0, 5 + WRAP)),
                 names=lens),
        Mutation("cache_seqlens", "float32", apply("cache_seqlens", lambda t: t.float())),
        Mutation("cache_seqlens", "3 lengths for 2 rows", apply("cache_seqlens", lambda t: torch.cat([t, t[:1]])),
                 names=("cache_seqlens", "q")),
        Mutation("cache_seqlens", "None (with new k, v)", apply("cache_seqlens", lambda _: None)),
        Mutation("cache_seqlens", "a string", apply("cache_seqlens", lambda _: "5")),
        Mutation("cache_batch_idx", "[1, 0] (rows swapped)", apply("cache_batch_idx", lambda _: torch.tensor([1, 0])),
                 "correct"),
        Mutation("cache_batch_idx", "[2, 0] (row 2 of 2)", apply("cache_batch_idx", lambda _: torch.tensor([2, 0]))),
        Mutation("cache_batch_idx", "[-1, 0]", apply("cache_batch_idx", lambda _: torch.tensor([-1, 0]))),
        Mutation("cache_batch_idx", "[1 + 2**32, 0]", apply("cache_batch_idx", lambda _: torch.tensor([1 + WRAP, 0]))),
        Mutation("cache_batch_idx", "[0, 0] (one row for both)", apply("cache_batch_idx", lambda _: torch.tensor([0, 0])),
                 "either"),
        Mutation("cache_batch_idx", "float32", apply("cache_batch_idx", lambda _: torch.tensor([1.0, 0.0]))),
        Mutation("cache_batch_idx", "a list", apply("cache_batch_idx", lambda _: [1, 0]), "either"),
        Mutation("k", "3 heads", apply("k", lambda t: torch.cat([t, t[:, :, :1]], 2)), names=("k", "k_cache")),
        Mutation("k", "20 new tokens (the cache holds 16)", edit(lambda a: a.update(
            k=torch.randn(B, 20, HKV, D, generator=seeded(32)), v=torch.randn(B, 20, HKV, D, generator=seeded(33)))),
            names=("k", "cache_seqlens")),
        Mutation("k", "bfloat16", apply("k", lambda t: t.bfloat16()), "either", rtol_of_max=3e-2),
        Mutation("k", "a stride-0 view of 2**32 + 2 new tokens", apply("k", lambda t: wrapped(t, 1)),
                 names=("k", "v", "cache_seqlens")),
        Mutation("v", "None (k given)", apply("v", lambda _: None), names=("k", "v")),
        Mutation("v", "1 new token (k has 2)", apply("v", lambda t: t[:, :1].clone()), names=("v", "k")),
        Mutation("k_cache", "a stride-0 view of 2**32 + 16 positions",
                 edit(lambda a: a.update(k_cache=wrapped(a["k_cache"], 1), k=None, v=None)),
                 names=("k_cache", "v_cache")),
        Mutation("k_cache", "3-dim", apply("k_cache", lambda t: t.reshape(B, -1, D)), names=("k_cache", "v_cache")),
        Mutation("k_cache", "bfloat16 (v_cache float32)", apply("k_cache", lambda t: t.bfloat16()), "either",
                 names=("k_cache", "v_cache")),
        Mutation("k_cache", "on the meta device", apply("k_cache", lambda t: t.to("meta"))),
        *type_mutations("k_cache"),
        Mutation("q", "3-dim", apply("q", lambda t: t[:, 0])),
        Mutation("q", "head_dim 31", apply("q", lambda t: t[..., :31].clone()), names=("q", "k_cache")),
        *int_mutations("num_splits", 0, zero=None, huge="either", none="raise"),
        *float_mutations("softmax_scale", none=None),
        Mutation("window_size", "(2**32 + 1, 0)", apply("window_size", lambda _: (1 + WRAP, 0)), "either"),
        Mutation("softcap", "5.0", apply("softcap", lambda _: 5.0), "correct"),
    )
    cases += KVCACHE_DECODE.cases(
        valid_call(),
        nan_at("q", (1, 0, 2, 3), "one query row"),
        nan_at("k_cache", (0, 8, 0, 0), "past the cached and new tokens"),
        nan_at("k_cache", (1, 2, 1, 0), "a cached key"),
        *int_mutations("num_splits", 0, zero=None, huge="either", types=False),
        Mutation("num_splits", "8", apply("num_splits", lambda _: 8), "correct"),
    )
    return cases



CASES = paged_cases() + kvcache_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
