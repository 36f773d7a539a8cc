"""Tests of the KV-cache block manager (flashlm.runtime.block_manager), operation by operation: allocation,
appending, freeing, fork and copy-on-write, capacity and misuse, and what the kernels read (slots and block
tables). Prefix caching is in test_block_manager_prefix.py, random operation sequences against a simulated
model runner in test_block_manager_model.py."""

import pytest
import torch

from block_manager_state import held_blocks, snapshot
from flashlm.runtime.block_manager import BlockManager, BlockTableOverflowError, NoFreeBlocksError


# ---- construction and plain allocation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(num_blocks=0, block_size=4), "num_blocks"),
    (dict(num_blocks=4, block_size=0), "block_size"),
    (dict(num_blocks=4, block_size=4, max_blocks_per_seq=0), "max_blocks_per_seq"),
    (dict(num_blocks=4, block_size=2**16 + 1), "block_size"),  # (2^31 blocks: tests/test_hostile_files.py)
])
def test_constructor_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_blocks=2.5, block_size=4), "num_blocks"), (dict(num_blocks="8", block_size=4), "num_blocks"),
    (dict(num_blocks=None, block_size=4), "num_blocks"), (dict(num_blocks=True, block_size=4), "num_blocks"),
    (dict(num_blocks=4, block_size=2.0), "block_size"), (dict(num_blocks=4, block_size=4, max_blocks_per_seq="2"),
                                                         "max_blocks_per_seq"),
    (dict(num_blocks=4, block_size=4, enable_prefix_caching="no"), "enable_prefix_caching"),
])
def test_constructor_rejects_bad_types(kwargs, name):
    with pytest.raises(TypeError, match=rf"^{name}: expected"):
        BlockManager(**kwargs)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_allocate_gives_ceil_blocks_and_slots(block_size):
    bm = BlockManager(num_blocks=20, block_size=block_size)
    prompt = list(range(10))
    assert bm.allocate(7, prompt) == 0
    table = bm.block_table(7)
    assert len(table) == -(-10 // block_size)
    assert len(set(table)) == len(table)
    assert bm.seq_len(7) == 10 and bm.num_cached_tokens(7) == 0
    assert bm.num_free_blocks == 20 - len(table)
    assert bm.usage == pytest.approx(len(table) / 20)
    assert bm.slot_mapping(7, 0) == [table[t // block_size] * block_size + t % block_size for t in range(10)]
    assert bm.slot_mapping(7, 3, 5) == bm.slot_mapping(7, 0)[3:5]
    assert 7 in bm and len(bm) == 1 and bm.seq_ids() == [7]


def test_append_takes_a_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    tokens = list(range(1, 12))  # the caller's list: the manager reads it and keeps no copy
    bm.allocate(0, tokens[:3])
    assert bm.append(0, tokens[:4]) == [] and len(bm.block_table(0)) == 1    # all the rest: one token
    assert bm.append(0, tokens, 1) == [] and len(bm.block_table(0)) == 2     # the next one of a longer list
    assert bm.append(0, tokens) == [] and len(bm.block_table(0)) == 3        # the other six
    assert bm.seq_len(0) == 11 and tokens == list(range(1, 12))
    assert bm.num_free_blocks == 7


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [4])
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0 and len(bm) == 0
    assert sorted(bm.free_block_ids()) == list(range(6))


# ---- fork and copy-on-write ----------------------------------------------------------------------------------

def test_fork_shares_and_copies_a_partial_last_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = [1, 2, 3, 4, 5, 6]
    bm.allocate(0, prompt)
    bm.fork(0, 1)
    t = bm.block_table(0)
    assert bm.block_table(1) == t and bm.seq_len(1) == bm.seq_len(0) == 6
    assert [bm.ref_count(b) for b in t] == [2, 2] and bm.num_free_blocks == 6
    copies = bm.append(1, prompt + [7])
    assert len(copies) == 1 and copies[0][0] == t[1]
    dst = copies[0][1]
    assert bm.block_table(1) == [t[0], dst] and bm.block_table(0) == t
    assert bm.ref_count(t[1]) == 1 and bm.ref_count(dst) == 1 and bm.ref_count(t[0]) == 2
    assert bm.append(0, prompt + [8]) == []      # the parent now holds its last block alone
    assert bm.seq_len(0) == bm.seq_len(1) == 7


def test_fork_at_a_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2, 3, 4])
    bm.fork(0, 1)
    assert bm.append(1, [1, 2, 3, 4, 5, 6, 7]) == [] and bm.append(0, [1, 2, 3, 4, 9]) == []
    assert bm.block_table(0)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(0)[2] != bm.block_table(1)[2]


def test_freeing_a_fork_keeps_the_shared_blocks():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)
    bm.free(0)
    assert held_blocks(bm) == sorted(bm.block_table(1)) and bm.num_free_blocks == 6
    assert bm.append(1, [1, 2, 3, 4]) == []      # sole holder again: no copy
    bm.free(1)
    assert bm.num_free_blocks == 8


# ---- capacity and misuse -------------------------------------------------------------------------------------

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
        bm.append(0, [1, 2, 3, 4, 5, 6])       # copy-on-write + one new block: 2 needed, 1 free
    assert snapshot(bm) == before and 2 not in bm
    assert not bm.can_append(0, 2) and bm.can_append(0, 1)
    assert len(bm.append(0, [1, 2, 3, 4])) == 1 and bm.num_free_blocks == 0
    assert not bm.can_append(0, 1)    # its last block is full: needs a new one
    assert bm.can_append(1, 1) and not bm.can_append(1, 2)  # 1 holds its partial block alone now
    with pytest.raises(NoFreeBlocksError):
        bm.append(1, [1, 2, 3, 9, 9])
    assert bm.append(1, [1, 2, 3, 9]) == []


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
        bm.append(0, [1, 2, 3, 4, 5])
    assert snapshot(bm) == before
    bm.append(0, [1, 2, 3, 4])


def test_misuse_raises_clear_errors():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate(0, [1, 2, 3])
    with pytest.raises(ValueError, match="sequence 0 is already allocated"):
        bm.allocate(0, [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(1, [])
    before = snapshot(bm)
    with pytest.raises(ValueError, match="empty"):
        bm.append(0, [1, 2, 3])           # no token after the three held
    with pytest.raises(ValueError, match="token_ids"):
        bm.append(0, [1, 2, 3, -1])
    with pytest.raises(TypeError, match="token_ids"):
        bm.allocate(1, 5)
    with pytest.raises(TypeError, match="token_ids"):
        bm.append(0, [1, 2, 3, 1.5])
    with pytest.raises(TypeError, match="token_ids"):
        bm.append(0, 4)                   # the sequence's tokens, not the new one alone
    with pytest.raises(ValueError, match="fewer than the 3 held and 2 new"):
        bm.append(0, [1, 2, 3, 4], 2)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.append(0, [1, 2, 3, 4], 0)
    assert snapshot(bm) == before
    with pytest.raises(TypeError, match="seq_id"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="fork child"):
        bm.fork(0, 0)
    with pytest.raises(KeyError, match="unknown sequence 5"):
        bm.fork(5, 6)
    for call in (bm.block_table, bm.seq_len, bm.num_cached_tokens, lambda s: bm.append(s, [1]),
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
    assert bm.block_tables_tensor([3], max_blocks=16).shape == (1, 16)
    for bad in (2, 17, 2**31):  # narrower than sequence 3's table; wider than there are blocks
        with pytest.raises(ValueError, match=rf"^max_blocks: must be in \[3, 16\].*got {bad}"):
            bm.block_tables_tensor([3], max_blocks=bad)
    with pytest.raises(TypeError, match="^max_blocks"):
        bm.block_tables_tensor([3], max_blocks=4.0)
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

    tokens = {0: [1, 2, 3, 4, 5, 6, 7], 1: [1, 2, 3, 4, 5, 6, 8, 9]}

    def write(s, start):
        slots = torch.tensor(bm.slot_mapping(s, start), dtype=torch.int64)
        flat[slots] = torch.stack([key_of(tokens[s][:i + 1]) for i in range(start, len(tokens[s]))])

    for s, prompt in tokens.items():
        write(s, bm.allocate(s, prompt))
    assert bm.num_cached_tokens(1) == 6
    bm.fork(1, 2)
    tokens[2] = list(tokens[1])
    for s, token in [(2, 11), (1, 12), (0, 13)]:
        tokens[s].append(token)
        for src, dst in bm.append(s, tokens[s]):
            cache[dst] = cache[src]
        write(s, bm.seq_len(s) - 1)
    tables, lens = bm.block_tables_tensor([0, 1, 2]), bm.seq_lens_tensor([0, 1, 2])
    for row, s in enumerate([0, 1, 2]):
        n = int(lens[row])
        gathered = cache[tables[row].long()].reshape(-1, heads, dim)[:n]
        expected = torch.stack([key_of(tokens[s][:i + 1]) for i in range(n)])
        assert torch.equal(gathered, expected), f"sequence {s} reads back wrong K rows"

