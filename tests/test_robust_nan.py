"""NaN propagation through attention in seeded random configurations: one NaN placed in q, K or V of a valid
call, and the output (and lse) must be NaN exactly where the float64 softmax reference (tests/reference.py)
has NaN and equal to it elsewhere. Families: flash_attn_func (padded, GQA, causal, windows, softcap),
flash_attn_varlen_func, paged decode (block sizes and split counts), paged prefill and flash_attn_with_kvcache.

A NaN in K reaches the rows whose softmax sees that key (a masked key's score is replaced before the
softmax: no NaN); a NaN in V is placed only where every row sees it (the reference multiplies a masked value
by a zero probability, which a kernel skipping the masked block rightly does not). Each case runs in a
forked child (tests/robust.py); the configurations come from random.Random(seed) with fixed seeds.
"""

import math
import random

import torch

import robust
from flashlm import flash_attn_interface as fa
from flashlm import ops
from reference import attention, paged_attention
from robust_args import Entry, Mutation, poke

CASES_PER_FAMILY = 24
RTOL = 2e-5
GQA = ((4, 4), (4, 2), (4, 1), (6, 3), (2, 2))
HEAD_DIMS = (16, 32, 64, 96, 128)


def t64(x):
    return torch.as_tensor(x).double()


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def nan_in(arg, index):
    """A mutation setting args[arg][index] to NaN: the reference decides where it must show."""
    def apply(a):
        a[arg] = poke(a[arg], index, math.nan)
    return Mutation(arg, f"NaN at {tuple(index)}", apply, "correct")


def pick(rng, shape):
    return tuple(rng.randrange(n) for n in shape)


# -- padded -----------------------------------------------------------------------------------------------------

def padded_family(seed):
    rng = random.Random(seed)
    b, sq, sk = rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 12)
    (h, hkv), d = rng.choice(GQA), rng.choice(HEAD_DIMS)
    causal = rng.random() < 0.5
    window = (-1, -1) if rng.random() < 0.6 else (rng.randint(0, 4), rng.randint(0, 4))
    softcap = rng.choice((0.0, 0.0, 5.0))
    cfg = f"B={b} Sq={sq} Sk={sk} H={h}/{hkv} D={d} causal={causal} window={window} softcap={softcap}"

    def make():
        g = torch.Generator().manual_seed(seed)
        return dict(q=randn(g, b, sq, h, d), k=randn(g, b, sk, hkv, d), v=randn(g, b, sk, hkv, d))

    def call(a):
        out, lse, _ = fa.flash_attn_func(a["q"], a["k"], a["v"], causal=causal, window_size=window, softcap=softcap,
                                         return_attn_probs=True)
        return out, lse

    def reference(a):
        return attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), causal=causal, window=window, softcap=softcap)

    everyone_sees_all = not causal and window == (-1, -1)
    where = rng.choice(("q", "k", "v") if everyone_sees_all else ("q", "k"))
    shape = (b, sq, h, d) if where == "q" else (b, sk, hkv, d)
    entry = Entry(f"flash_attn_func (seed {seed}: {cfg})", make, call, reference, rtol_of_max=RTOL)
    return entry.case(nan_in(where, pick(rng, shape)))


# -- varlen -----------------------------------------------------------------------------------------------------

def cumulative(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def varlen_family(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    lens_q, lens_k = [rng.randint(0, 7) for _ in range(n)], [rng.randint(1, 9) for _ in range(n)]
    lens_q[0] = max(lens_q[0], 1)
    cu_q, cu_k = cumulative(lens_q), cumulative(lens_k)
    (h, hkv), d = rng.choice(GQA), rng.choice(HEAD_DIMS)
    causal = rng.random() < 0.5
    cfg = f"q lens {lens_q} k lens {lens_k} H={h}/{hkv} D={d} causal={causal}"

    def make():
        g = torch.Generator().manual_seed(seed)
        return dict(q=randn(g, cu_q[-1], h, d), k=randn(g, cu_k[-1], hkv, d), v=randn(g, cu_k[-1], hkv, d))

    def call(a):
        out, lse, _ = fa.flash_attn_varlen_func(a["q"], a["k"], a["v"], torch.tensor(cu_q, dtype=torch.int32),
                                                torch.tensor(cu_k, dtype=torch.int32), max(lens_q), max(lens_k),
                                                causal=causal, return_attn_probs=True)
        return out, lse

    def reference(a):
        return attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)

    where = rng.choice(("q", "k", "v") if not causal else ("q", "k"))
    shape = (cu_q[-1], h, d) if where == "q" else (cu_k[-1], hkv, d)
    entry = Entry(f"flash_attn_varlen_func (seed {seed}: {cfg})", make, call, reference, rtol_of_max=RTOL)
    return entry.case(nan_in(where, pick(rng, shape)))


# -- paged: decode with splits, prefill, with_kvcache -----------------------------------------------------------

def paged_layout(rng, lens, block_size):
    """A shuffled block table for `lens` tokens per sequence, with spare blocks: (table, num_blocks)."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    table = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    used = 0
    for s, k in enumerate(need):
        table[s, :k] = torch.tensor(perm[used:used + k], dtype=torch.int32)
        used += k
    return table, num_blocks


def paged_family(seed, prefill):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    block_size = rng.choice((1, 4, 16, 32))
    lens = [rng.randint(1, 70) for _ in range(n)]
    queries = [rng.randint(1, min(4, m)) for m in lens] if prefill else [1] * n
    (h, hkv), d = rng.choice(GQA), rng.choice(HEAD_DIMS)
    splits = 0 if prefill else rng.choice((0, 1, 2, 4, 8))
    table, num_blocks = paged_layout(rng, lens, block_size)
    cu_q = cumulative(queries)
    cfg = f"lens {lens} queries {queries} block {block_size} H={h}/{hkv} D={d} splits={splits}"

    def make():
        g = torch.Generator().manual_seed(seed)
        cache = (num_blocks, block_size, hkv, d)
        return dict(q=randn(g, cu_q[-1], h, d), k_cache=randn(g, *cache), v_cache=randn(g, *cache))

    def call(a):
        return ops.paged_attention(a["q"], a["k_cache"], a["v_cache"], table, torch.tensor(lens, dtype=torch.int32),
                                   torch.tensor(cu_q, dtype=torch.int32) if prefill else None,
                                   num_splits=splits, return_lse=True)

    def reference(a):
        return paged_attention(t64(a["q"]), t64(a["k_cache"]), t64(a["v_cache"]), table.long(), lens,
                               cu_q if prefill else None, causal=True)

    where = rng.choice(("q", "k_cache", "k_cache", "v_cache"))
    if where == "q":
        index = pick(rng, (cu_q[-1], h, d))
    else:
        # Any slot of the cache: inside a context, past one (stale), or in a spare block.
        index = pick(rng, (num_blocks, block_size, hkv, d))
        if where == "v_cache":  # V only where every query of its sequence sees it (causal prefill masks)
            s = rng.randrange(n)
            token = rng.randrange(lens[s] - queries[s] + 1)
            index = (int(table[s, token // block_size]), token % block_size) + index[2:]
    name = "paged_attention (" + ("prefill" if prefill else "decode") + f", seed {seed}: {cfg})"
    return Entry(name, make, call, reference, rtol_of_max=RTOL).case(nan_in(where, index))


def kvcache_family(seed):
    rng = random.Random(seed)
    b, capacity = rng.randint(1, 3), rng.choice((8, 16, 40))
    new, sq = rng.randint(0, 2), rng.randint(1, 3)
    cached = [rng.randint(max(0, sq - new), capacity - new) for _ in range(b)]
    (h, hkv), d = rng.choice(GQA), rng.choice(HEAD_DIMS)
    cfg = f"B={b} cache {capacity} cached {cached} new {new} Sq={sq} H={h}/{hkv} D={d}"

    def make():
        g = torch.Generator().manual_seed(seed)
        a = dict(q=randn(g, b, sq, h, d), k_cache=randn(g, b, capacity, hkv, d), v_cache=randn(g, b, capacity, hkv, d))
        a.update(k=randn(g, b, new, hkv, d), v=randn(g, b, new, hkv, d)) if new else a.update(k=None, v=None)
        return a

    def call(a):
        out, lse = fa.flash_attn_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"],
                                              cache_seqlens=torch.tensor(cached, dtype=torch.int32), causal=True,
                                              return_softmax_lse=True)
        return out, lse

    def reference(a):
        kc, vc = t64(a["k_cache"]).clone(), t64(a["v_cache"]).clone()
        outs, lses = [], []
        for i, n in enumerate(cached):
            if new:
                kc[i, n:n + new], vc[i, n:n + new] = t64(a["k"])[i], t64(a["v"])[i]
            out, lse = attention(t64(a["q"])[i:i + 1], kc[i:i + 1, :n + new], vc[i:i + 1, :n + new], causal=True)
            outs.append(out), lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    where = rng.choice(("q", "k_cache", "k_cache") + (("k",) if new else ()))
    shapes = {"q": (b, sq, h, d), "k_cache": (b, capacity, hkv, d), "k": (b, new, hkv, d)}
    entry = Entry(f"flash_attn_with_kvcache (seed {seed}: {cfg})", make, call, reference, rtol_of_max=RTOL)
    return entry.case(nan_in(where, pick(rng, shapes[where])))


SEEDS = range(1000, 1000 + CASES_PER_FAMILY)
CASES = ([padded_family(s) for s in SEEDS] + [varlen_family(s) for s in SEEDS]
         + [paged_family(s, prefill=False) for s in SEEDS] + [paged_family(s, prefill=True) for s in SEEDS]
         + [kvcache_family(s) for s in SEEDS])
verdicts, test_hostile_case = robust.tests_of(CASES)
