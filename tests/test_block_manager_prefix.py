"""Prefix caching in the KV-cache block manager (flashlm.runtime.block_manager): hits on full blocks of a
cached prefix (never the last token), chained names, revival from and eviction out of the LRU pool, hash
collisions, resets and statistics."""

import pytest

import flashlm.runtime.block_manager as block_manager_module
from block_manager_state import held_blocks
from flashlm.runtime.block_manager import BlockManager, NoFreeBlocksError, block_hash


# ---- hits ------------------------------------------------------------------------------------------

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
    # Each block is named when an append fills it, from the tokens held before and the new ones.
    bm = BlockManager(num_blocks=8, block_size=3)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    bm.allocate(0, tokens[:2])
    bm.append(0, tokens[:3])
    bm.append(0, tokens)
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



def test_allocate_without_reusing_the_cache_computes_everything_and_keeps_one_name():
    bm = BlockManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    assert bm.allocate(0, prompt) == 0 and bm.allocate(1, prompt) == 4
    assert bm.can_allocate(prompt, reuse_cache=False) and bm.allocate(2, prompt, reuse_cache=False) == 0
    assert not set(bm.block_table(2)) & set(bm.block_table(0))  # fresh blocks throughout
    named = bm.num_cached_blocks
    bm.free(0), bm.free(1), bm.free(2)
    assert bm.num_cached_blocks == named and bm.allocate(3, prompt) == 4  # the name stayed with the first block
    with pytest.raises(TypeError, match="^reuse_cache"):
        bm.allocate(4, prompt, reuse_cache="no")
