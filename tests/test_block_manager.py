"""Tests of the KV-cache block manager (flashlm.runtime.block_manager): every operation and misuse by hand,
then a hypothesis state machine that runs random allocate/append/fork/free/reset sequences against a
simulated model runner (the "cache" records, per slot, the whole token prefix its K/V would be computed
from) and checks after every step that each sequence reads back exactly its own tokens, that no block leaks
or is owned twice, that ref counts count block-table references, that prefix hits are the longest possible
and reuse the very blocks that hold the prefix, that only unused blocks are evicted, and that statistics add up."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import flashlm.runtime.block_manager as block_manager_module
from flashlm.runtime.block_manager import (
    BlockManager,
    BlockTableOverflowError,
    NoFreeBlocksError,
    block_hash,
)


def held_blocks(bm):
    return sorted(b for b in range(bm.num_blocks) if bm.ref_count(b) > 0)


# ---- construction and plain allocation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(num_blocks=0, block_size=4), "num_blocks"),
    (dict(num_blocks=4, block_size=0), "block_size"),
    (dict(num_blocks=4, block_size=4, max_blocks_per_seq=0), "max_blocks_per_seq"),
])
def test_constructor_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_allocate_gives_ceil_blocks_and_slots(block_size):
    bm = BlockManager(num_blocks=20, block_size=block_size)
    prompt = list(range(10))
    assert bm.allocate(7, prompt) == 0
    table = bm.block_table(7)
    assert len(table) == -(-10 // block_size)
    assert len(set(table)) == len(table)
    assert bm.seq_len(7) == 10 and bm.token_ids(7) == prompt and bm.num_cached_tokens(7) == 0
    assert bm.num_free_blocks == 20 - len(table)
    assert bm.usage == pytest.approx(len(table) / 20)
    assert bm.slot_mapping(7, 0) == [table[t // block_size] * block_size + t % block_size for t in range(10)]
    assert bm.slot_mapping(7, 3, 5) == bm.slot_mapping(7, 0)[3:5]
    assert 7 in bm and len(bm) == 1 and bm.seq_ids() == [7]


def test_append_takes_a_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    assert bm.append(0, 4) == [] and len(bm.block_table(0)) == 1
    assert bm.append(0, [5]) == [] and len(bm.block_table(0)) == 2
    assert bm.append(0, [6, 7, 8, 9, 10, 11]) == [] and len(bm.block_table(0)) == 3
    assert bm.seq_len(0) == 11 and bm.token_ids(0) == list(range(1, 12))
    assert bm.num_free_blocks == 7


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [4])
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0 and len(bm) == 0
    assert sorted(bm.free_block_ids()) == list(range(6))


# ---- prefix caching ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, block_size, expected", [
    (10, 4, 8),   # two full blocks hit, the partial third is computed
    (8, 4, 4),    # all full, but the last token must be computed: the second block is recomputed
    (4, 4, 0),
    (3, 1, 2),
    (1, 1, 0),
])
def test_same_prompt_hits_its_full_blocks_but_never_the_last_token(n, block_size, expected):
    bm = BlockManager(num_blocks=16, block_size=block_size)
    prompt = [5 + i % 3 for i in range(n)]
    assert bm.allocate(0, prompt) == 0
    assert bm.allocate(1, prompt) == expected
    assert bm.num_cached_tokens(1) == expected
    hit_blocks = expected // block_size
    t0, t1 = bm.block_table(0), bm.block_table(1)
    assert t1[:hit_blocks] == t0[:hit_blocks]
    assert not set(t1[hit_blocks:]) & set(t0)
    for b in t0[:hit_blocks]:
        assert bm.ref_count(b) == 2
    assert bm.stats.queries == 2 and bm.stats.queried_tokens == 2 * n and bm.stats.hit_tokens == expected


def test_hit_needs_the_whole_prefix_to_match():
    bm = BlockManager(num_blocks=16, block_size=2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    assert bm.allocate(1, [1, 2, 3, 9, 5]) == 2   # first block only
    assert bm.allocate(2, [9, 2, 3, 4, 5]) == 0   # same second block after a different first: no hit
    assert bm.allocate(3, [3, 4, 5]) == 0          # block [3, 4] exists, but not as a first block


def test_freed_cached_blocks_are_revived_by_a_hit():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    table = bm.block_table(0)
    bm.free(0)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # Tail first into the LRU pool: the second block would be evicted before the first.
    assert bm.evictable_block_ids() == [table[1], table[0]]
    assert bm.can_allocate([1, 2, 3, 4, 6]) and not bm.can_allocate(5 + 4 * 2)
    assert bm.allocate(1, [1, 2, 3, 4, 6]) == 4
    assert bm.block_table(1)[:2] == table[:2]
    assert bm.evictable_block_ids() == [] and bm.num_free_blocks == 1


def test_eviction_prefers_never_named_blocks_then_least_recently_freed():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.allocate(0, [1, 1, 9])        # block [1, 1] named
    bm.allocate(1, [2, 2, 9])        # block [2, 2] named
    a, b = bm.block_table(0)[0], bm.block_table(1)[0]
    bm.free(0)
    bm.free(1)
    assert bm.evictable_block_ids() == [a, b] and len(bm.free_block_ids()) == 3
    bm.allocate(2, [7])              # a never-named block: nothing evicted
    bm.allocate(3, [7, 7, 7, 7])     # needs 2 blocks, 2 never-named left
    assert bm.is_cached(a) and bm.is_cached(b) and bm.free_block_ids() == []
    bm.allocate(4, [8])              # evicts a, the least recently freed
    assert not bm.is_cached(a) and bm.is_cached(b) and bm.block_table(4) == [a]
    bm.free(4)                       # a comes back unnamed
    assert bm.free_block_ids() == [a]
    assert bm.allocate(5, [2, 2, 9]) == 2 and bm.block_table(5) == [b, a]
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(6, [1, 1, 9])


def test_full_blocks_appended_enter_the_cache():
    bm = BlockManager(num_blocks=8, block_size=3)
    bm.allocate(0, [1, 2])
    bm.append(0, 3)
    bm.append(0, [4, 5, 6, 7])
    t0 = bm.block_table(0)
    assert [bm.is_cached(b) for b in t0] == [True, True, False]
    assert bm.allocate(1, [1, 2, 3, 4, 5, 6, 0]) == 6
    assert bm.block_table(1)[:2] == t0[:2]


def test_a_duplicate_full_block_stays_out_of_the_cache():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2])           # [1, 2] is named; cannot be hit by a 2-token prompt
    bm.allocate(1, [1, 2])           # computes it again in its own block
    t0, t1 = bm.block_table(0), bm.block_table(1)
    assert t0 != t1 and bm.is_cached(t0[0]) and not bm.is_cached(t1[0])
    bm.free(1)
    assert t1[0] in bm.free_block_ids()


def test_a_hash_collision_does_not_share_content(monkeypatch):
    # A name that ignores the previous block: [2, 2] after [1, 1] and [2, 2] first get the same name.
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: block_hash(None, tokens))
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 1, 2, 2, 9])
    assert bm.allocate(1, [2, 2, 9]) == 0
    # A name that ignores everything: a different block under a known name is not a hit either.
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: b"\1" * 32)
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 1, 9])
    assert bm.allocate(1, [3, 3, 9]) == 0
    assert bm.allocate(2, [1, 1, 9]) == 2


def test_block_hash_is_deterministic_and_chained():
    h = block_hash(None, (1, 2, 3))
    assert h == block_hash(None, [1, 2, 3]) and len(h) == 32
    assert h != block_hash(None, (3, 2, 1)) and h != block_hash(None, (1, 2))
    assert block_hash(h, (4,)) != block_hash(block_hash(None, (1, 2, 4)), (4,))
    assert block_hash(None, (1 << 40,)) != block_hash(None, (1,))


def test_reset_prefix_cache_forgets_every_name():
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [4, 5, 6])
    bm.free(0)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.evictable_block_ids() == []
    assert bm.num_free_blocks == 4 and held_blocks(bm) == sorted(bm.block_table(1))
    assert bm.allocate(2, [1, 2, 3]) == 0 and bm.allocate(3, [4, 5, 6]) == 0
    assert bm.stats.queries == 4
    bm.reset_stats()
    assert bm.stats.queries == 0 and bm.stats.hit_rate == 0.0


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    assert bm.allocate(1, [1, 2, 3]) == 0 and bm.num_cached_blocks == 0
    bm.free(0)
    assert bm.evictable_block_ids() == [] and bm.num_free_blocks == 6


def test_hit_rate():
    bm = BlockManager(num_blocks=16, block_size=2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.allocate(1, [1, 2, 3, 4, 6])
    assert bm.stats.hit_tokens == 4 and bm.stats.queried_tokens == 10 and bm.stats.hit_rate == pytest.approx(0.4)


# ---- fork and copy-on-write ----------------------------------------------------------------------------------

def test_fork_shares_and_copies_a_partial_last_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2, 3, 4, 5, 6])
    bm.fork(0, 1)
    t = bm.block_table(0)
    assert bm.block_table(1) == t and bm.token_ids(1) == bm.token_ids(0)
    assert [bm.ref_count(b) for b in t] == [2, 2] and bm.num_free_blocks == 6
    copies = bm.append(1, 7)
    assert len(copies) == 1 and copies[0][0] == t[1]
    dst = copies[0][1]
    assert bm.block_table(1) == [t[0], dst] and bm.block_table(0) == t
    assert bm.ref_count(t[1]) == 1 and bm.ref_count(dst) == 1 and bm.ref_count(t[0]) == 2
    assert bm.append(0, 8) == []      # the parent now holds its last block alone
    assert bm.token_ids(0)[-1] == 8 and bm.token_ids(1)[-1] == 7


def test_fork_at_a_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2, 3, 4])
    bm.fork(0, 1)
    assert bm.append(1, [5, 6, 7]) == [] and bm.append(0, 9) == []
    assert bm.block_table(0)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(0)[2] != bm.block_table(1)[2]


def test_freeing_a_fork_keeps_the_shared_blocks():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)
    bm.free(0)
    assert held_blocks(bm) == sorted(bm.block_table(1)) and bm.num_free_blocks == 6
    assert bm.append(1, 4) == []      # sole holder again: no copy
    bm.free(1)
    assert bm.num_free_blocks == 8


# ---- capacity and misuse -------------------------------------------------------------------------------------

def snapshot(bm):
    seqs = {s: (bm.block_table(s), bm.token_ids(s)) for s in bm.seq_ids()}
    return (bm.free_block_ids(), bm.evictable_block_ids(), seqs, [bm.ref_count(b) for b in range(bm.num_blocks)],
            [bm.is_cached(b) for b in range(bm.num_blocks)], vars(bm.stats).copy())


def test_out_of_blocks_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)
    before = snapshot(bm)
    assert not bm.can_allocate(5) and not bm.can_allocate([1, 2, 3, 4, 5, 6])
    with pytest.raises(NoFreeBlocksError, match="sequence 2"):
        bm.allocate(2, [1, 2, 3, 4, 5, 6])
    assert not bm.can_append(0, 3)
    with pytest.raises(NoFreeBlocksError, match="sequence 0"):
        bm.append(0, [4, 5, 6])       # copy-on-write + one new block: 2 needed, 1 free
    assert snapshot(bm) == before and 2 not in bm
    assert not bm.can_append(0, 2) and bm.can_append(0, 1)
    assert len(bm.append(0, 4)) == 1 and bm.num_free_blocks == 0
    assert not bm.can_append(0, 1)    # its last block is full: needs a new one
    assert bm.can_append(1, 1) and not bm.can_append(1, 2)  # 1 holds its partial block alone now
    with pytest.raises(NoFreeBlocksError):
        bm.append(1, [9, 9])
    assert bm.append(1, 9) == []


def test_no_free_blocks_error_is_not_a_value_error():
    # The scheduler catches it to defer or preempt; misuse (ValueError, KeyError) must not be caught with it.
    assert issubclass(NoFreeBlocksError, RuntimeError) and not issubclass(NoFreeBlocksError, ValueError)


def test_can_allocate_counts_hits_and_a_count_is_conservative():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(5) and bm.can_allocate([1, 2, 3, 4, 6])  # two held blocks hit, one fresh
    assert not bm.can_allocate([1, 2, 3, 9, 9])
    bm.allocate(1, [1, 2, 3, 4, 6])
    assert bm.num_free_blocks == 0
    bm.free(0)
    bm.free(1)
    assert bm.can_allocate([1, 2, 3, 4, 5, 6, 7, 8]) and not bm.can_allocate(9)
    bm.allocate(2, [7, 7, 7, 7])     # takes the two never-named blocks; the two cached ones stay free
    assert bm.num_free_blocks == 2
    # Two hits that revive pooled blocks plus one fresh block: 3 > 2, though only one block is new.
    assert not bm.can_allocate([1, 2, 3, 4, 5]) and bm.can_allocate([1, 2, 3])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, [1, 2, 3, 4, 5])
    assert bm.allocate(3, [1, 2, 3]) == 2 and bm.num_free_blocks == 0


def test_block_table_overflow():
    bm = BlockManager(num_blocks=16, block_size=2, max_blocks_per_seq=2)
    with pytest.raises(BlockTableOverflowError, match="max_blocks_per_seq=2"):
        bm.allocate(0, [1, 2, 3, 4, 5])
    bm.allocate(0, [1, 2, 3])
    before = snapshot(bm)
    with pytest.raises(ValueError, match="sequence 0"):
        bm.append(0, [4, 5])
    assert snapshot(bm) == before
    bm.append(0, 4)


def test_misuse_raises_clear_errors():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2, 3])
    with pytest.raises(ValueError, match="sequence 0 is already allocated"):
        bm.allocate(0, [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(1, [])
    with pytest.raises(ValueError, match="empty"):
        bm.append(0, [])
    with pytest.raises(ValueError, match="token_ids"):
        bm.append(0, -1)
    with pytest.raises(TypeError, match="token_ids"):
        bm.allocate(1, 5)
    with pytest.raises(TypeError, match="token_ids"):
        bm.append(0, [1.5])
    with pytest.raises(TypeError, match="seq_id"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="fork child"):
        bm.fork(0, 0)
    with pytest.raises(KeyError, match="unknown sequence 5"):
        bm.fork(5, 6)
    for call in (bm.block_table, bm.seq_len, bm.num_cached_tokens, bm.token_ids, lambda s: bm.append(s, 1),
                 lambda s: bm.can_append(s), lambda s: bm.slot_mapping(s, 0)):
        with pytest.raises(KeyError, match="unknown sequence 9"):
            call(9)
    bm.free(0)
    with pytest.raises(KeyError, match="cannot free sequence 0"):
        bm.free(0)
    with pytest.raises(ValueError, match="prompt length"):
        bm.can_allocate(0)
    with pytest.raises(ValueError, match="block_id"):
        bm.ref_count(8)
    assert bm.num_free_blocks == 8 and len(bm) == 0


# ---- what the kernels read -----------------------------------------------------------------------------------

def test_block_tables_tensor_and_seq_lens():
    bm = BlockManager(num_blocks=16, block_size=2)
    bm.allocate(3, [1, 2, 3, 4, 5])
    bm.allocate(1, [9])
    t = bm.block_tables_tensor([1, 3])
    assert t.dtype == torch.int32 and t.shape == (2, 3)
    assert t[0].tolist() == bm.block_table(1) + [0, 0] and t[1].tolist() == bm.block_table(3)
    assert bm.block_tables_tensor([3], max_blocks=5)[0].tolist() == bm.block_table(3) + [0, 0]
    assert bm.block_tables_tensor([]).shape == (0, 1)
    with pytest.raises(ValueError, match="max_blocks"):
        bm.block_tables_tensor([3], max_blocks=2)
    lens = bm.seq_lens_tensor([3, 1])
    assert lens.dtype == torch.int32 and lens.tolist() == [5, 1]


def test_slot_mapping_range_is_checked():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(0, [1, 2, 3])
    assert bm.slot_mapping(0, 3) == []
    for start, end in [(-1, 2), (2, 1), (0, 4)]:
        with pytest.raises(ValueError, match="slot range"):
            bm.slot_mapping(0, start, end)


def test_a_paged_cache_written_through_slots_reads_back_through_tables():
    # K rows written at slot_mapping and gathered through block_tables_tensor give back each sequence's rows.
    bs, heads, dim = 3, 2, 4
    bm = BlockManager(num_blocks=12, block_size=bs)
    cache = torch.full((12, bs, heads, dim), float("nan"))
    flat = cache.view(-1, heads, dim)

    def key_of(tokens):  # a K row determined by the whole prefix, as a model's would be
        g = torch.Generator().manual_seed(hash(tuple(tokens)) % (1 << 31))
        return torch.randn(heads, dim, generator=g)

    def write(s, start):
        tokens = bm.token_ids(s)
        slots = torch.tensor(bm.slot_mapping(s, start), dtype=torch.int64)
        flat[slots] = torch.stack([key_of(tokens[:i + 1]) for i in range(start, len(tokens))])

    for s, prompt in {0: [1, 2, 3, 4, 5, 6, 7], 1: [1, 2, 3, 4, 5, 6, 8, 9]}.items():
        write(s, bm.allocate(s, prompt))
    assert bm.num_cached_tokens(1) == 6
    bm.fork(1, 2)
    for s, token in [(2, 11), (1, 12), (0, 13)]:
        for src, dst in bm.append(s, token):
            cache[dst] = cache[src]
        write(s, bm.seq_len(s) - 1)
    tables, lens = bm.block_tables_tensor([0, 1, 2]), bm.seq_lens_tensor([0, 1, 2])
    for row, s in enumerate([0, 1, 2]):
        n = int(lens[row])
        gathered = cache[tables[row].long()].reshape(-1, heads, dim)[:n]
        expected = torch.stack([key_of(bm.token_ids(s)[:i + 1]) for i in range(n)])
        assert torch.equal(gathered, expected), f"sequence {s} reads back wrong K rows"


# ---- random operation sequences against a simulated model runner ---------------------------------------------

VOCAB = st.integers(0, 1)   # two tokens: prompts share prefixes often


class BlockManagerMachine(RuleBasedStateMachine):
    """Runs random operations on a small BlockManager. The simulated runner writes, for each token, the
    whole prefix ending at it (what its K/V depends on) into the slot the manager gives, does the copies
    `append` asks for, and never writes the prompt tokens `allocate` reports cached."""

    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(1, 16), caching=st.sampled_from([True, False]),
                max_blocks=st.one_of(st.none(), st.integers(2, 8)))
    def setup(self, block_size, num_blocks, caching, max_blocks):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching, max_blocks_per_seq=max_blocks)
        self.bs = block_size
        self.kv = {b: [None] * block_size for b in range(num_blocks)}  # block -> the prefix held by each slot
        self.tokens = {}       # live sequence -> its tokens, as the test knows them
        self.freed = []        # the tokens of the last few freed sequences
        self.next_id = 0
        self.hit_tokens = self.queried_tokens = self.queries = 0

    # -- the simulated runner --

    def write(self, seq_id, start):
        tokens = self.tokens[seq_id]
        for pos, slot in zip(range(start, len(tokens)), self.bm.slot_mapping(seq_id, start)):
            self.kv[slot // self.bs][slot % self.bs] = tuple(tokens[:pos + 1])

    def cached_prefixes(self):
        """The prefix each named block holds (read from the simulated cache), checked to be unique."""
        found = {}
        for b in range(self.bm.num_blocks):
            if self.bm.is_cached(b):
                prefix = self.kv[b][-1]
                assert prefix is not None and prefix not in found, f"block {b} named but holds {prefix}"
                found[prefix] = b
        return found

    def check_evictions(self, before, taken, hits=()):
        """A call that took `taken` fresh blocks used the never-named free blocks first, then evicted the
        oldest blocks of the LRU pool (other than its hits), and left every other named block named."""
        free_before, evictable_before, _, refs_before, cached_before, _ = before
        pool = [b for b in evictable_before if b not in hits]
        evicted = [b for b in pool if self.bm.ref_count(b) > 0]
        assert evicted == pool[:max(0, taken - len(free_before))], f"evicted {evicted} of {pool} taking {taken}"
        assert all(self.bm.is_cached(b) for b in pool[len(evicted):]), "an unused named block lost its name"
        assert all(self.bm.is_cached(b) for b in range(self.bm.num_blocks) if cached_before[b] and refs_before[b]), (
            "a held named block lost its name")

    # -- rules --

    def live(self, data):
        return data.draw(st.sampled_from(sorted(self.tokens)))

    @rule(data=st.data())
    def allocate(self, data):
        prompt = data.draw(st.lists(VOCAB, min_size=1, max_size=8))
        earlier = sorted(self.tokens.values()) + self.freed
        if earlier and data.draw(st.integers(0, 3)):   # mostly continue a live or freed sequence's prefix
            other = data.draw(st.sampled_from(earlier))
            prompt = other[:data.draw(st.integers(0, len(other)))] + prompt
        seq_id, self.next_id = self.next_id, self.next_id + 1
        bs, n = self.bs, len(prompt)
        expected_hits = []
        if self.bm.enable_prefix_caching:
            cached = self.cached_prefixes()
            for i in range((n - 1) // bs):
                b = cached.get(tuple(prompt[:(i + 1) * bs]))
                if b is None:
                    break
                expected_hits.append(b)
        can = self.bm.can_allocate(prompt)
        if self.bm.can_allocate(n):
            assert can, "a token count is more optimistic than the token ids"
        before = snapshot(self.bm)
        try:
            cached_tokens = self.bm.allocate(seq_id, prompt)
        except BlockTableOverflowError:
            assert -(-n // bs) > self.bm.max_blocks_per_seq
            assert snapshot(self.bm) == before
            return
        except NoFreeBlocksError:
            assert not can, "can_allocate said yes but allocate ran out"
            assert snapshot(self.bm) == before
            if self.tokens:   # preempt someone, as a scheduler would, so that the cache keeps turning over
                self.free(data)
            return
        assert can, "can_allocate said no but allocate succeeded"
        table = self.bm.block_table(seq_id)
        assert cached_tokens == len(expected_hits) * bs and table[:len(expected_hits)] == expected_hits
        self.check_evictions(before, len(table) - len(expected_hits), expected_hits)
        self.tokens[seq_id] = list(prompt)
        self.queries += 1
        self.queried_tokens += n
        self.hit_tokens += cached_tokens
        self.write(seq_id, cached_tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(VOCAB, min_size=1, max_size=5))
    def append(self, data, new):
        seq_id = self.live(data)
        old = self.bm.block_table(seq_id)
        n = len(self.tokens[seq_id])
        must_copy = n % self.bs != 0 and self.bm.ref_count(old[-1]) > 1
        can = self.bm.can_append(seq_id, len(new))
        before = snapshot(self.bm)
        try:
            copies = self.bm.append(seq_id, new if len(new) > 1 else new[0])
        except BlockTableOverflowError:
            assert -(-(n + len(new)) // self.bs) > self.bm.max_blocks_per_seq
            assert snapshot(self.bm) == before
            return
        except NoFreeBlocksError:
            assert not can
            assert snapshot(self.bm) == before
            return
        assert can
        table = self.bm.block_table(seq_id)
        assert table[:len(old) - 1] == old[:-1]
        if must_copy:
            assert copies == [(old[-1], table[len(old) - 1])], f"copy-on-write of a shared block: {copies}"
        else:
            assert copies == [] and table[:len(old)] == old
        self.check_evictions(before, len(table) - len(old) + len(copies))
        for src, dst in copies:
            self.kv[dst] = list(self.kv[src])
        self.tokens[seq_id] += new
        self.write(seq_id, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.live(data)
        child, self.next_id = self.next_id, self.next_id + 1
        free_before = self.bm.num_free_blocks
        self.bm.fork(parent, child)
        assert self.bm.block_table(child) == self.bm.block_table(parent) and self.bm.num_free_blocks == free_before
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = self.live(data)
        table = self.bm.block_table(seq_id)
        cached_before = [self.bm.is_cached(b) for b in range(self.bm.num_blocks)]
        pool_before = self.bm.evictable_block_ids()
        self.bm.free(seq_id)
        self.freed = self.freed[-3:] + [self.tokens.pop(seq_id)]
        assert [self.bm.is_cached(b) for b in range(self.bm.num_blocks)] == cached_before, "free evicted"
        # Released named blocks join the LRU pool's young end, the sequence's tail first.
        released = [b for b in reversed(table) if self.bm.ref_count(b) == 0 and self.bm.is_cached(b)]
        assert self.bm.evictable_block_ids() == pool_before + released
        with pytest.raises(KeyError):
            self.bm.free(seq_id)

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()
        assert self.bm.num_cached_blocks == 0 and self.bm.evictable_block_ids() == []

    # -- what must hold after every step --

    @invariant()
    def blocks_are_accounted_for(self):
        bm = self.bm
        free, evictable = bm.free_block_ids(), bm.evictable_block_ids()
        held = held_blocks(bm)
        assert len(free) + len(evictable) + len(held) == bm.num_blocks, "a block leaked or is counted twice"
        assert set(free) | set(evictable) | set(held) == set(range(bm.num_blocks))
        assert bm.num_free_blocks == len(free) + len(evictable)
        assert all(not bm.is_cached(b) for b in free), "a free block kept its name"
        assert all(bm.is_cached(b) for b in evictable), "an unnamed block waits in the LRU pool"
        if not bm.enable_prefix_caching:
            assert bm.num_cached_blocks == 0
        assert bm.num_cached_blocks == sum(bm.is_cached(b) for b in range(bm.num_blocks))
        self.cached_prefixes()

    @invariant()
    def ref_counts_count_table_references(self):
        refs = [0] * self.bm.num_blocks
        for seq_id in self.tokens:
            table = self.bm.block_table(seq_id)
            assert len(set(table)) == len(table), f"sequence {seq_id} holds a block twice: {table}"
            for b in table:
                refs[b] += 1
        assert refs == [self.bm.ref_count(b) for b in range(self.bm.num_blocks)]

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        bs = self.bs
        for seq_id, tokens in self.tokens.items():
            table = self.bm.block_table(seq_id)
            assert self.bm.seq_len(seq_id) == len(tokens) and self.bm.token_ids(seq_id) == tokens
            assert len(table) == -(-len(tokens) // bs)
            for pos in range(len(tokens)):
                got = self.kv[table[pos // bs]][pos % bs]
                assert got == tuple(tokens[:pos + 1]), (
                    f"sequence {seq_id} position {pos} (block {table[pos // bs]}) reads {got}, not {tokens[:pos + 1]}")

    @invariant()
    def a_shared_prefix_is_held_once(self):
        # Any two sequences whose first blocks hold the same prefix and are named share those very blocks.
        if not self.bm.enable_prefix_caching:
            return
        owner = {}
        for seq_id, tokens in self.tokens.items():
            for i, b in enumerate(self.bm.block_table(seq_id)[:len(tokens) // self.bs]):
                if self.bm.is_cached(b):
                    prefix = tuple(tokens[:(i + 1) * self.bs])
                    assert owner.setdefault(prefix, b) == b, f"prefix {prefix} named in two blocks"

    @invariant()
    def statistics_add_up(self):
        s = self.bm.stats
        assert (s.queries, s.queried_tokens, s.hit_tokens) == (self.queries, self.queried_tokens, self.hit_tokens)
        assert 0.0 <= s.hit_rate <= 1.0
        assert self.bm.usage == pytest.approx(1 - self.bm.num_free_blocks / self.bm.num_blocks)


# A bounded run for CI (a few seconds); FLASHLM_HYPOTHESIS_EXAMPLES=2000 explores much further.
BlockManagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("FLASHLM_HYPOTHESIS_EXAMPLES", "100")), stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_block_manager_state_machine = BlockManagerMachine.TestCase
