"""The scheduler driven by a simulated model runner that keeps a fake paged KV cache: every computed token
writes its prefix into its cache slot, and every step checks that each sequence's context slots hold its
own prefix. Outputs are compared with each prompt generated alone; budgets, preemption, chunked prefill,
prefix caching and stop rules are checked on the way."""

import random

import pytest

from flashlm.runtime.block_manager import BlockManager
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.scheduler import Scheduler
from flashlm.runtime.sequence import Sequence, Status

VOCAB = 50


def next_token(tokens) -> int:
    """A deterministic stand-in for a model: the next token depends on the whole context."""
    h = 0
    for t in tokens:
        h = (h * 1000003 + t + 1) % 2**61
    return h % VOCAB


class FakeRunner:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.cache = {}  # slot -> the tuple of token ids up to and including the token stored there

    def run(self, batch):
        bs = self.bm.block_size
        for src, dst in batch.block_copies:
            for o in range(bs):
                if src * bs + o in self.cache:
                    self.cache[dst * bs + o] = self.cache[src * bs + o]
        out = []
        for seq, start, n, sampling in zip(batch.seqs, batch.starts, batch.num_new, batch.sampling):
            table = self.bm.block_table(seq.seq_id)
            assert self.bm.seq_len(seq.seq_id) == start + n, "the block manager must hold exactly the computed tokens"
            for p in range(start):
                slot = table[p // bs] * bs + p % bs
                assert self.cache.get(slot) == tuple(seq.token_ids[:p + 1]), f"seq {seq.seq_id}: stale KV at {p}"
            for p, slot in zip(range(start, start + n), self.bm.slot_mapping(seq.seq_id, start, start + n)):
                self.cache[slot] = tuple(seq.token_ids[:p + 1])
            if sampling:
                out.append(next_token(seq.token_ids))
        return out


def reference(prompt, max_tokens, max_model_len, eos=None):
    tokens = list(prompt)
    while True:
        t = next_token(tokens)
        tokens.append(t)
        if t == eos or len(tokens) - len(prompt) >= max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):]


def drive(sched, runner, max_steps=10000):
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len(batch) > 0, "a step with work to do scheduled nothing"
        sched.update(batch, runner.run(batch))
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


@pytest.mark.parametrize("num_blocks, block_size, budget, max_seqs", [
    (200, 4, 64, 8),     # roomy
    (12, 4, 16, 4),      # tight: preemption
    (9, 2, 8, 8),        # tighter, small blocks
    (7, 8, 5, 3),        # chunked prefill with a budget below most prompts
    (40, 1, 32, 16),     # block size 1
])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_matches_one_at_a_time(num_blocks, block_size, budget, max_seqs, seed):
    rng = random.Random(seed)
    max_model_len = min(40, num_blocks * block_size)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    shared = [rng.randrange(VOCAB) for _ in range(12)]  # a common prefix for some prompts (cache hits)
    seqs, expected = [], []
    for i in range(20):
        length = rng.randint(1, max_model_len // 2)
        prompt = (shared[:length] if rng.random() < 0.4 else []) + [rng.randrange(VOCAB) for _ in range(length)]
        prompt = prompt[:max_model_len - 1]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 15))
        seqs.append(Sequence(i, prompt, params))
        expected.append(reference(prompt, params.max_tokens, max_model_len))
    for s in seqs[:12]:
        sched.add(s)
    runner = FakeRunner(bm)
    for _ in range(3):  # more arrive while the first are running
        batch = sched.schedule()
        sched.update(batch, runner.run(batch))
    for s in seqs[12:]:
        sched.add(s)
    drive(sched, runner)
    for s, want in zip(seqs, expected):
        assert s.status is Status.FINISHED and s.output_ids == want, f"sequence {s.seq_id}"
    assert bm.seq_ids() == [] and bm.num_free_blocks == num_blocks
    if num_blocks <= 12:
        assert sched.num_preemptions > 0, "the tight cache was meant to force preemption"


def test_long_prompt_is_prefilled_in_chunks():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=100)
    seq = Sequence(0, list(range(30)), SamplingParams(max_tokens=2))
    sched.add(seq)
    runner = FakeRunner(bm)
    chunks = []
    while sched.has_work():
        batch = sched.schedule()
        chunks.append((batch.starts[0], batch.num_new[0], batch.sampling[0]))
        sched.update(batch, runner.run(batch))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True), (30, 1, True)]


def test_prefix_cache_hit_skips_computation():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    runner = FakeRunner(bm)
    prompt = list(range(1, 19))
    a = Sequence(0, prompt, SamplingParams(max_tokens=3))
    sched.add(a)
    drive(sched, runner)
    b = Sequence(1, prompt + [7], SamplingParams(max_tokens=3))
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_prompt_tokens == 16 and batch.starts == [16] and batch.num_new == [3]
    sched.update(batch, runner.run(batch))
    drive(sched, runner)
    assert b.output_ids == reference(prompt + [7], 3, 64)


def test_stop_rules():
    bm = BlockManager(64, 4)
    runner = FakeRunner(bm)
    prompt = [3, 1, 4]
    free_run = reference(prompt, 30, 60)
    eos = free_run[4]
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=60, eos_token_ids=[eos])
    stop_at_eos = Sequence(0, prompt, SamplingParams(max_tokens=30))
    ignore = Sequence(1, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    stop_id = Sequence(2, prompt, SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[free_run[2]]))
    long = Sequence(3, list(range(55)), SamplingParams(max_tokens=None, ignore_eos=True))
    for s in (stop_at_eos, ignore, stop_id, long):
        sched.add(s)
    drive(sched, runner)
    first_eos = free_run.index(eos)
    assert stop_at_eos.output_ids == free_run[:first_eos + 1] and stop_at_eos.finish_reason == "stop"
    assert ignore.output_ids == free_run and ignore.finish_reason == "length"
    assert stop_id.output_ids == free_run[:free_run.index(free_run[2]) + 1] and stop_id.finish_reason == "stop"
    assert long.num_tokens == 60 and long.finish_reason == "length"


def test_finish_from_outside_frees_blocks():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
    a, b = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=50)), Sequence(1, [4, 5], SamplingParams(max_tokens=50))
    sched.add(a)
    sched.add(b)
    runner = FakeRunner(bm)
    batch = sched.schedule()
    sched.update(batch, runner.run(batch))
    sched.finish(a, "stop")  # e.g. a stop string the engine found
    sched.finish(b, "abort")
    assert not sched.has_work() and bm.num_free_blocks == 16 and a.finish_reason == "stop"


def test_bad_arguments():
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=4, max_model_len=17)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4, max_model_len=16)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=4, max_model_len=16)
    with pytest.raises(ValueError, match="prompt_ids"):
        sched.add(Sequence(0, list(range(16))))
    with pytest.raises(ValueError, match="prompt_ids"):
        Sequence(1, [])
    s = Sequence(2, [1])
    sched.add(s)
    batch = sched.schedule()
    with pytest.raises(ValueError, match="next_tokens"):
        sched.update(batch, [1, 2])
