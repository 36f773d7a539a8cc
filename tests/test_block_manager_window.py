"""The block manager with a sliding window (Mistral's): blocks wholly before a sequence's window are released as
it grows, so a long generation holds about ceil(window / block_size) + 1 blocks; placeholders keep positions
in the table; released named blocks stay correct prefix-cache hits; fork and copy-on-write still hold.

A simulated cache (slot -> the (position, token) written there) checks, after every step, that each position
a later query reads (the window) still holds what was written for it: whatever was released, reused or
revived on the way."""

import random

import pytest

from block_manager_state import held_blocks, snapshot
from flashlm.runtime.block_manager import BlockManager, NoFreeBlocksError


class SimulatedCache:
    """The cache's contents as the runner would write them: slot -> (position, token id)."""

    def __init__(self, bm: BlockManager):
        self.bm, self.slots = bm, {}

    def write(self, seq_id: int, tokens: list, start: int):
        for p, slot in zip(range(start, len(tokens)), self.bm.slot_mapping(seq_id, start, len(tokens))):
            self.slots[slot] = (p, tokens[p])

    def check_window(self, seq_id: int, tokens: list, window: int):
        """Every position the sequence's next query reads is in a held block and holds its own token."""
        bm, bs = self.bm, self.bm.block_size
        table, n = bm.block_table(seq_id), len(tokens)
        released = bm.num_released_blocks(seq_id)
        for p in range(max(0, n - window + 1), n):
            assert p // bs >= released, f"position {p} of sequence {seq_id} is in a released block"
            block = table[p // bs]
            assert bm.ref_count(block) > 0, f"position {p} of sequence {seq_id}: block {block} is not held"
            assert self.slots.get(block * bs + p % bs) == (p, tokens[p]), f"position {p} of sequence {seq_id}"


    def check_hits(self, seq_id: int, tokens: list, cached: int):
        """The cached prompt positions hold what the sequence that wrote them wrote there."""
        bs = self.bm.block_size
        for p in range(cached):
            block = self.bm.block_table(seq_id)[p // bs]
            assert self.slots[block * bs + p % bs] == (p, tokens[p]), f"cached position {p} of sequence {seq_id}"


def _generate(bm, cache, prompt, steps, window, seq_id=0):
    """A sequence of the prompt grown by `steps` one-token steps; its tokens."""
    tokens = list(prompt)
    bm.allocate(seq_id, tokens)
    cache.write(seq_id, tokens, 0)
    for step in range(steps):
        _grow(bm, cache, seq_id, tokens, [step], window)
    return tokens


def _grow(bm, cache, seq_id, tokens, new, window):
    """Appends the new tokens (one step), writes them, checks the window."""
    n = len(tokens)
    tokens += new
    assert bm.append(seq_id, tokens) == []
    cache.write(seq_id, tokens, n)
    cache.check_window(seq_id, tokens, window)


@pytest.mark.parametrize("window", [0, -1])
def test_window_must_be_positive(window):
    with pytest.raises(ValueError, match="window"):
        BlockManager(num_blocks=8, block_size=4, window=window)


@pytest.mark.parametrize("window", [2.5, "5", True])
def test_window_must_be_an_int(window):
    with pytest.raises(TypeError, match="^window: expected"):
        BlockManager(num_blocks=8, block_size=4, window=window)


@pytest.mark.parametrize("block_size, window", [(4, 5), (4, 8), (1, 3), (16, 5), (3, 1), (5, 23)])
def test_long_generation_holds_a_bounded_number_of_blocks(block_size, window):
    bound = -(-window // block_size) + 1
    bm = BlockManager(num_blocks=2 * bound, block_size=block_size, window=window)  # far fewer than 300 tokens need
    cache = SimulatedCache(bm)
    tokens = [7] * 3
    bm.allocate(0, tokens)
    cache.write(0, tokens, 0)
    for step in range(300):
        _grow(bm, cache, 0, tokens, [step % 11], window)
        assert len(held_blocks(bm)) <= bound, f"step {step}: {len(held_blocks(bm))} blocks held, bound {bound}"
    released = bm.num_released_blocks(0)
    assert released == max(0, len(tokens) - 1 - window + 1) // block_size  # all but the window's, before the step
    assert bm.block_table(0)[:released] == [0] * released  # placeholders keep later positions in place
    bm.free(0)
    assert held_blocks(bm) == [] and bm.num_free_blocks == bm.num_blocks


def test_without_a_window_every_block_is_kept():
    bm = BlockManager(num_blocks=64, block_size=4)
    bm.allocate(0, [1] * 5)
    bm.append(0, [1] * 200)
    assert bm.num_released_blocks(0) == 0 and len(held_blocks(bm)) == 50


def test_a_chunk_keeps_what_its_first_query_reads():
    """The keys of the step's first query (n - window + 1 on) stay, however many tokens the step appends."""
    bm = BlockManager(num_blocks=16, block_size=4, window=6)
    bm.allocate(0, list(range(8)))
    bm.append(0, list(range(20)))  # n = 8: its first query reads 3.., so only block 0 goes
    assert bm.num_released_blocks(0) == 0
    bm.append(0, list(range(21)))  # n = 20: reads 15..: blocks 0-2 go
    assert bm.num_released_blocks(0) == 3 and len(held_blocks(bm)) == 3


def test_append_counts_the_blocks_it_releases_as_free():
    """A full cache still grows a windowed sequence: the block it releases is the one it takes."""
    bm = BlockManager(num_blocks=3, block_size=4, window=4, enable_prefix_caching=False)
    cache = SimulatedCache(bm)
    tokens = list(range(12))
    bm.allocate(0, tokens)
    cache.write(0, tokens, 0)
    assert bm.num_free_blocks == 0 and bm.can_append(0, 1)
    _grow(bm, cache, 0, tokens, [99], 4)  # n = 12: positions 9.. read; blocks 0 and 1 go, one is taken
    assert bm.num_released_blocks(0) == 2 and bm.num_free_blocks == 1
    assert not bm.can_append(0, 9)  # needs 3 blocks past the 2 (n = 13: 10.. read, blocks 0-1 already gone)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.append(0, tokens + [1] * 9)
    assert snapshot(bm) == before  # nothing released by the append that failed


def test_slots_of_released_positions_are_refused():
    bm = BlockManager(num_blocks=8, block_size=4, window=4)
    bm.allocate(0, list(range(12)))
    bm.append(0, list(range(13)))
    with pytest.raises(ValueError, match="released"):
        bm.slot_mapping(0, 0, 13)
    assert len(bm.slot_mapping(0, 8, 13)) == 5


def test_prefix_hit_on_released_blocks_is_correct():
    """A's prompt blocks, released as A grew past them, wait named in the pool: B's prompt with that prefix hits
    them and reads what A wrote."""
    bs, window = 4, 5
    bm = BlockManager(num_blocks=32, block_size=bs, window=window)
    cache = SimulatedCache(bm)
    prompt = list(range(100, 112))
    a = _generate(bm, cache, prompt, 20, window)
    assert bm.num_released_blocks(0) >= 3  # every block of the prompt
    released_blocks = [b for b in range(bm.num_blocks) if bm.is_cached(b) and bm.ref_count(b) == 0]
    assert len(released_blocks) >= 3
    b_tokens = prompt + [5, 6, 7]
    cached = bm.allocate(1, b_tokens)
    assert cached == 12  # the whole prompt, from blocks A released
    cache.check_hits(1, b_tokens, cached)
    cache.write(1, b_tokens, cached)
    cache.check_window(1, b_tokens, window)
    _grow(bm, cache, 1, b_tokens, [1], window)  # B's own growth releases its hits again: n = 15 reads 11..
    assert bm.num_released_blocks(1) == 2
    cache.check_window(0, a, window)


def test_evicted_released_blocks_are_not_hit():
    """Once a released block is handed out again, its name goes with it: a later prompt misses, not reads
    another sequence's keys."""
    bs, window = 4, 4
    bm = BlockManager(num_blocks=4, block_size=bs, window=window)
    cache = SimulatedCache(bm)
    prompt = list(range(50, 58))
    _generate(bm, cache, prompt, 40, window)  # the pool is small: A's released prompt blocks get reused
    bm.free(0)
    cached = bm.allocate(1, prompt + [1])
    assert cached == 0
    cache.check_hits(1, prompt, cached)


def test_fork_after_release_shares_only_held_blocks():
    bs, window = 4, 5
    bm = BlockManager(num_blocks=32, block_size=bs, window=window)
    cache = SimulatedCache(bm)
    a = _generate(bm, cache, list(range(30)), 1, window)
    bm.fork(0, 1)
    assert bm.num_released_blocks(1) == bm.num_released_blocks(0) > 0
    b = list(a)
    n = len(a)
    b += [3]
    copies = bm.append(1, b)  # the shared partly filled last block is copied for the child
    assert len(copies) == 1
    src, dst = copies[0]
    for off in range(n % bs):  # the runner's copy
        cache.slots[dst * bs + off] = cache.slots[src * bs + off]
    cache.write(1, b, n)
    _grow(bm, cache, 0, a, [2], window)
    cache.check_window(1, b, window)
    bm.free(0)
    bm.free(1)
    assert held_blocks(bm) == [] and bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_keep_their_windows(seed):
    """Several sequences with shared prompt prefixes grow, fork and finish at random on a small pool."""
    rng = random.Random(seed)
    bs, window = rng.choice([1, 2, 4]), rng.choice([1, 3, 6, 9])
    bm = BlockManager(num_blocks=40, block_size=bs, window=window)
    cache = SimulatedCache(bm)
    seqs, next_id = {}, 0
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for _ in range(300):
        op = rng.random()
        if op < 0.15 or not seqs:
            tokens = rng.choice(prefixes)[:rng.randint(1, 12)] + [rng.randrange(50) for _ in range(rng.randint(0, 3))]
            if bm.can_allocate(tokens):
                cached = bm.allocate(next_id, tokens)
                cache.write(next_id, tokens, cached)
                cache.check_window(next_id, tokens, window)
                seqs[next_id] = tokens
                next_id += 1
        elif op < 0.2:
            parent = rng.choice(list(seqs))
            bm.fork(parent, next_id)
            seqs[next_id] = list(seqs[parent])
            next_id += 1
        elif op < 0.3:
            sid = rng.choice(list(seqs))
            bm.free(sid)
            del seqs[sid]
        else:
            sid = rng.choice(list(seqs))
            tokens = seqs[sid]
            new = [rng.randrange(50) for _ in range(rng.randint(1, 3))]
            if bm.can_append(sid, len(new)):
                n = len(tokens)
                tokens += new
                for src, dst in bm.append(sid, tokens):
                    for off in range(bs):
                        if src * bs + off in cache.slots:
                            cache.slots[dst * bs + off] = cache.slots[src * bs + off]
                cache.write(sid, tokens, n)
        for sid, tokens in seqs.items():
            cache.check_window(sid, tokens, window)
    for sid in list(seqs):
        bm.free(sid)
    assert held_blocks(bm) == [] and bm.num_free_blocks == bm.num_blocks


def test_kv_window_is_every_models_window():
    """The engine's cache window: Mistral's; none for gemma's mixed local and global layers, for a model with
    no window, or where a draft model attends further than the target's window."""
    from types import SimpleNamespace

    from flashlm.models import ModelConfig
    from flashlm.runtime.model_runner import kv_window

    def model(**kw):
        return SimpleNamespace(cfg=ModelConfig(n_layer=2, n_head=2, d_model=16, **kw))

    mistral, wide = model(arch="llama", sliding_window=6), model(arch="llama", sliding_window=9)
    gemma = model(arch="gemma2", sliding_window=6, head_dim=8)
    assert kv_window(mistral) == 6 and kv_window(mistral, None) == 6 and kv_window(mistral, wide) == 9
    assert kv_window(gemma) is None and kv_window(model(arch="llama")) is None
    assert kv_window(mistral, model(arch="llama")) is None and kv_window(mistral, gemma) is None
