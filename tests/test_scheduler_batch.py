"""The scheduler's batched paths against its general ones: the running sequences' blocks taken in one
BlockManager.append_batch call against the sequence-by-sequence loop that preempts, and update()'s array checks
of one token per sequence against its loop over the tokens (given as numpy integers, which take the loop).
Each pair runs the same random workload, step for step, and must agree on every batch and every outcome."""

import random

import numpy as np
import pytest

from flashlm.runtime.block_manager import BlockManager
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.scheduler import Scheduler
from flashlm.runtime.sequence import Sequence
from test_scheduler import VOCAB, FakeRunner


def workload(seed, max_model_len):
    """20 (prompt, params) pairs with every stop rule: EOS (or ignore_eos), stop token ids, max_tokens (0 and
    None included) and prompts near max_model_len."""
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(12)]
    out = []
    for _ in range(20):
        length = rng.randint(1, max_model_len // 2)
        prompt = (shared[:length] if rng.random() < 0.4 else []) + [rng.randrange(VOCAB) for _ in range(length)]
        params = SamplingParams(temperature=0, max_tokens=rng.choice([0, 1, 3, 9, 15, None]),
                                ignore_eos=rng.random() < 0.3,
                                stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 0, 1, 3])))
        out.append((prompt[:max_model_len - 1], params))
    return out


def run(num_blocks, block_size, budget, max_seqs, seed, one_by_one=False, numpy_tokens=False):
    """Every step's batch and the sequences' outcomes for the workload, with the batched paths or without."""
    max_model_len = min(40, num_blocks * block_size)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                      eos_token_ids=[3, 7])
    if one_by_one:
        sched._schedule_running = sched._schedule_one_by_one
    seqs = [Sequence(i, p, params) for i, (p, params) in enumerate(workload(seed, max_model_len))]
    for s in seqs:
        sched.add(s)
    runner, steps = FakeRunner(bm), []
    while sched.has_work():
        batch = sched.schedule()
        tokens = runner.run(batch)
        if numpy_tokens:
            tokens = [np.int64(t) for t in tokens]
        finished = sched.update(batch, tokens)
        steps.append(([s.seq_id for s in batch.seqs], batch.starts, batch.num_new, batch.sampling, batch.block_copies,
                      [s.seq_id for s in batch.preempted], [s.seq_id for s in finished]))
        assert len(steps) < 5000, "no progress"
    outcomes = [(s.token_ids, s.finish_reason, s.status) for s in seqs]
    return steps, outcomes, sched.num_appended


CASES = [(200, 4, 64, 8), (12, 4, 16, 4), (9, 2, 8, 8), (7, 8, 5, 3), (40, 1, 32, 16)]


@pytest.mark.parametrize("num_blocks, block_size, budget, max_seqs", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_in_one_call_schedule_as_one_at_a_time(num_blocks, block_size, budget, max_seqs, seed):
    assert run(num_blocks, block_size, budget, max_seqs, seed) == \
        run(num_blocks, block_size, budget, max_seqs, seed, one_by_one=True)


@pytest.mark.parametrize("num_blocks, block_size, budget, max_seqs", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stop_checks_over_arrays_end_as_the_loop(num_blocks, block_size, budget, max_seqs, seed):
    steps, outcomes, appended = run(num_blocks, block_size, budget, max_seqs, seed)
    assert (steps, outcomes, appended) == run(num_blocks, block_size, budget, max_seqs, seed, numpy_tokens=True)
    reasons = {reason for _, reason, _ in outcomes}
    assert {"stop", "length"} <= reasons, "the workload was meant to end sequences both ways"
    assert appended == sum(len(t) for t, _, _ in outcomes) - sum(len(p) for p, _ in workload(seed, min(40, num_blocks * block_size)))


def test_each_stop_rule_over_arrays():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_model_len=12, eos_token_ids=[5])
    rules = [SamplingParams(max_tokens=None), SamplingParams(max_tokens=None, ignore_eos=True),
             SamplingParams(max_tokens=None, stop_token_ids=[9]), SamplingParams(max_tokens=2),
             SamplingParams(max_tokens=None)]
    prompts = [[1, 2], [1, 2], [1, 2], [1, 2], list(range(10))]
    seqs = [Sequence(i, p, r) for i, (p, r) in enumerate(zip(prompts, rules))]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert sched.update(batch, [6, 6, 6, 6, 6]) == []
    batch = sched.schedule()
    # EOS ends 0 but not 1 (ignore_eos); 9 ends 2 (its stop token); 3 has its 2 tokens; 4 reaches max_model_len.
    finished = sched.update(batch, [5, 5, 9, 1, 1])
    assert [s.seq_id for s in finished] == [0, 2, 3, 4]
    assert [s.finish_reason for s in seqs] == ["stop", None, "stop", "length", "length"]
    assert seqs[1].output_ids == [6, 5] and sched.running == [seqs[1]]
