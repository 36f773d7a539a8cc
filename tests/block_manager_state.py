"""What the block manager tests read of a BlockManager's state: the held blocks, and a snapshot of everything
its calls may change (to check that a call that raised changed nothing)."""


def held_blocks(bm):
    return sorted(b for b in range(bm.num_blocks) if bm.ref_count(b) > 0)


def snapshot(bm):
    seqs = {s: (bm.block_table(s), bm.seq_len(s), bm.num_cached_tokens(s), bm.num_released_blocks(s))
            for s in bm.seq_ids()}
    return (bm.free_block_ids(), bm.evictable_block_ids(), seqs, [bm.ref_count(b) for b in range(bm.num_blocks)],
            [bm.is_cached(b) for b in range(bm.num_blocks)], vars(bm.stats).copy())
