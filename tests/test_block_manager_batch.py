"""BlockManager.append_batch (a whole step's appends in one call) against the same appends made one at a time
with append(): the same tables, copies, names and free lists, over random workloads with forks, prefix
caching and a sliding window; all or nothing when the blocks run out; its argument checks."""

import random

import pytest

from block_manager_state import snapshot
from flashlm.runtime.block_manager import BlockManager, NoFreeBlocksError


def twin_managers(seed, **kwargs):
    """Two managers given the same random allocations and forks, the token lists of their sequences, and
    whether any is a fork."""
    rng = random.Random(seed)
    bms = [BlockManager(**kwargs) for _ in range(2)]
    tokens, forked = {}, False
    for sid in range(rng.randint(1, 8)):
        if tokens and rng.random() < 0.3:  # a fork of an earlier sequence
            parent = rng.choice(list(tokens))
            for bm in bms:
                bm.fork(parent, sid)
            tokens[sid] = list(tokens[parent])
            forked = True
            continue
        prompt = [rng.randrange(4) for _ in range(rng.randint(1, 12))]  # few ids: prefix hits happen
        if not bms[0].can_allocate(prompt):
            break
        for bm in bms:
            bm.allocate(sid, prompt)
        tokens[sid] = prompt
    return rng, bms, tokens, forked


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("window", [None, 5])
def test_append_batch_equals_appends_one_at_a_time(seed, window):
    rng, (batched, single), tokens, forked = twin_managers(seed, num_blocks=rng_blocks(seed), block_size=rng_block_size(seed),
                                                   window=window)
    for _ in range(12):
        ids = [s for s in tokens if rng.random() < 0.8]
        rng.shuffle(ids)
        ends = []
        for sid in ids:  # mostly one token (a decode), sometimes a chunk, sometimes none new
            grow = rng.choice([1, 1, 1, 2, 5, 0])
            tokens[sid] += [rng.randrange(4) for _ in range(grow)]
            ends.append(len(tokens[sid]))
        before = snapshot(batched)
        try:
            got = batched.append_batch(ids, [tokens[s] for s in ids], ends)
        except NoFreeBlocksError:
            got = None
            assert snapshot(batched) == before
        fits, copies = True, []
        for sid, end in zip(ids, ends):
            new = end - single.seq_len(sid)
            if new > 0 and not single.can_append(sid, new):
                fits = False
                break
            if new > 0:
                copies += single.append(sid, tokens[sid], new)
        if not fits:  # the scheduler preempts here: the batched call must have refused, changing nothing
            assert got is None
            return
        if got is None:
            # Refused though the appends fit one at a time: allowed only where an earlier append of the batch frees
            # a block a later one counted as taken (a copy-on-write of a shared block, a release by the window),
            # and then the scheduler goes one at a time; the twins are brought level the same way.
            assert forked or window is not None
            for sid, end in zip(ids, ends):
                if end > batched.seq_len(sid):
                    batched.append(sid, tokens[sid], end - batched.seq_len(sid))
        else:
            assert got == copies
        assert snapshot(batched) == snapshot(single)


def rng_blocks(seed):
    return random.Random(seed + 1000).randint(6, 40)


def rng_block_size(seed):
    return random.Random(seed + 2000).choice([1, 2, 4])


def test_append_batch_is_all_or_nothing():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [4, 5, 6])  # one block left
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError, match="sequence 1"):  # 0 takes the last free block, 1 finds none
        bm.append_batch([0, 1], [[1, 2, 3, 7, 8], [4, 5, 6, 9, 9]], [5, 5])
    assert snapshot(bm) == before
    assert bm.append_batch([0, 1], [[1, 2, 3, 7], [4, 5, 6, 9]], [4, 4]) == []  # the decode step fits
    assert bm.seq_len(0) == bm.seq_len(1) == 4 and bm.num_free_blocks == 1


def test_append_batch_holds_nothing_new_where_a_sequence_has_its_tokens():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, [1, 2, 3])
    before = snapshot(bm)
    assert bm.append_batch([0], [[1, 2, 3]], [2]) == [] and snapshot(bm) == before


def test_append_batch_checks_its_arguments():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2, 3])
    bm.allocate(1, [1, 2])
    before = snapshot(bm)
    with pytest.raises(ValueError, match="one entry per sequence"):
        bm.append_batch([0, 1], [[1, 2, 3, 4]], [4])
    with pytest.raises(ValueError, match="twice"):
        bm.append_batch([0, 0], [[1, 2, 3, 4]] * 2, [4, 4])
    with pytest.raises(KeyError, match="unknown sequence 7"):
        bm.append_batch([0, 7], [[1, 2, 3, 4], [1]], [4, 1])
    with pytest.raises(TypeError, match="seq_id"):
        bm.append_batch([0.0], [[1, 2, 3, 4]], [4])
    with pytest.raises(ValueError, match="fewer than the 5"):
        bm.append_batch([0], [[1, 2, 3, 4]], [5])
    with pytest.raises(ValueError, match="token_lists: token ids"):  # the one new token of a decode step is checked too
        bm.append_batch([0, 1], [[1, 2, 3, 4], [1, 2, -5]], [4, 3])
    with pytest.raises(TypeError, match="ends"):
        bm.append_batch([0], [[1, 2, 3, 4]], [4.0])
    with pytest.raises(TypeError, match="token_lists"):
        bm.append_batch([0], [{1, 2, 3, 4}], [4])
    assert snapshot(bm) == before
