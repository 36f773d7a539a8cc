"""model_runner.token_slots (a step's positions and cache slots in a few array ops) against the block manager's
per-sequence slot_mapping, for packed batches of decodes and prefill chunks of awkward lengths."""

import random

import pytest
import torch

from flashlm.runtime.block_manager import BlockManager
from flashlm.runtime.model_runner import token_slots


@pytest.mark.parametrize("seed", range(5))
def test_token_slots_match_slot_mapping(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=256, block_size=4, enable_prefix_caching=False)
    seq_ids, starts, num_new = [], [], []
    for seq_id in range(rng.randint(1, 12)):
        length = rng.randint(1, 40)
        bm.allocate(seq_id, [rng.randrange(100) for _ in range(length)])
        start = rng.randrange(length)
        seq_ids.append(seq_id)
        starts.append(start)
        num_new.append(rng.randint(1, length - start))  # a decode (1) or a chunk up to the sequence's end
    positions, slots = token_slots(bm.block_tables_tensor(seq_ids), starts, num_new, bm.block_size)
    want_positions = [p for s, n in zip(starts, num_new) for p in range(s, s + n)]
    want_slots = [t for i, s, n in zip(seq_ids, starts, num_new) for t in bm.slot_mapping(i, s, s + n)]
    assert positions.dtype == slots.dtype == torch.int64
    assert positions.tolist() == want_positions
    assert slots.tolist() == want_slots


def test_token_slots_empty_batch():
    positions, slots = token_slots(torch.zeros((0, 1), dtype=torch.int32), [], [], 16)
    assert positions.tolist() == slots.tolist() == []
