"""The KV-cache block manager (flashlm.runtime.block_manager) under a hypothesis state machine: random
allocate/append/fork/free/reset sequences against a simulated model runner (the "cache" records, per slot, the
whole token prefix its K/V would be computed from), checking after every step that each sequence reads back
exactly its own tokens, that no block leaks or is owned twice, that ref counts count block-table references,
that prefix hits are the longest possible and reuse the very blocks that hold the prefix, that only unused
blocks are evicted, and that statistics add up."""

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from block_manager_state import held_blocks, snapshot
from flashlm.runtime.block_manager import BlockManager, BlockTableOverflowError, NoFreeBlocksError


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
    @rule(data=st.data(), new=st.lists(VOCAB, min_size=1, max_size=5), later=st.lists(VOCAB, max_size=3))
    def append(self, data, new, later):
        seq_id = self.live(data)
        old = self.bm.block_table(seq_id)
        n = len(self.tokens[seq_id])
        must_copy = n % self.bs != 0 and self.bm.ref_count(old[-1]) > 1
        can = self.bm.can_append(seq_id, len(new))
        before = snapshot(self.bm)
        try:
            # The sequence's whole list, as the scheduler gives it: all of the rest, or a count of a longer list.
            if later:
                copies = self.bm.append(seq_id, self.tokens[seq_id] + new + later, len(new))
            else:
                copies = self.bm.append(seq_id, self.tokens[seq_id] + new)
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
            assert self.bm.seq_len(seq_id) == len(tokens)
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
    max_examples=int(os.environ.get("FLASHLM_HYPOTHESIS_EXAMPLES", "100")), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_block_manager_state_machine = BlockManagerMachine.TestCase
