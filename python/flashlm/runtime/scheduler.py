"""Scheduler: which sequences run in the next step and how many of their tokens, under a token budget and
the KV cache's blocks. Policy only: the BlockManager owns the blocks, the model runner the tensors.

    sched = Scheduler(block_manager, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=4096)
    sched.add(Sequence(0, prompt_ids, params))
    while sched.has_work():
        batch = sched.schedule()            # [(seq, start, num_new)], block copies, preempted sequences
        tokens = runner.run(batch).tokens   # the next token of each batch.sampling sequence
        finished = sched.update(batch, tokens)

One step mixes decodes and prefill chunks, as vLLM's v1 scheduler does: the running sequences come first
(each decode is one token; a prompt still being prefilled takes what is left of the budget), then waiting
sequences are admitted in arrival order while the budget, max_num_seqs and the free blocks allow. A prompt
longer than the budget is prefilled in chunks over several steps.

When a running sequence needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue to be recomputed later (prompt and
output so far; the prefix cache often makes that cheap). No sequence is admitted in a step that preempted.
Because max_model_len fits in the cache, a lone sequence always fits, so preemption cannot loop forever.

Prefix caching: a sequence is allocated with its first chunk (the whole prompt when it fits the budget), so
blocks named in the cache are the ones this step writes (the block manager's timing contract); hits beyond
a first chunk are not looked for. A sequence that wants prompt logprobs takes no hits past the position that
predicts the first one not computed yet (each of those positions' logits is needed).
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from flashlm.runtime.block_manager import BlockManager, NoFreeBlocksError
from flashlm.runtime.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list = field(default_factory=list)  # Sequence
    starts: list = field(default_factory=list)  # each sequence computes tokens [start, start + num_new)
    num_new: list = field(default_factory=list)
    sampling: list = field(default_factory=list)  # whether each chunk ends at the sequence's last token: sampled
    block_copies: list = field(default_factory=list)  # (src, dst) blocks to copy before any cache write
    preempted: list = field(default_factory=list)  # sequences sent back to the waiting queue this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


    def __len__(self):
        return len(self.seqs)


class _StopRules:
    """When each sampling sequence of a batch ends, as arrays over the batch: built when the batch's sequences
    change, not every step."""

    def __init__(self, seqs: list, eos_token_ids, max_model_len: int):
        self.seqs = seqs
        params = [seq.params for seq in seqs]
        # Rows that asked for the prompt alone (max_tokens=0): update() takes its general path for them.
        self.zero_rows = [i for i, p in enumerate(params) if p.max_tokens == 0] or None
        self.eos_ids = np.array(sorted(eos_token_ids), dtype=np.int64)[None, :]
        self.eos_applies = np.array([not p.ignore_eos for p in params], dtype=bool)
        self.stop_id_rows = [i for i, p in enumerate(params) if p.stop_token_ids]
        # A sequence ends at max_model_len tokens, or at max_tokens output tokens after its prompt.
        self.max_lengths = np.array([max_model_len if p.max_tokens is None
                                     else min(max_model_len, seq.num_prompt_tokens + p.max_tokens)
                                     for seq, p in zip(seqs, params)], dtype=np.int64)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 2048, eos_token_ids=()):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens: must be >= max_num_seqs={max_num_seqs} so every running "
                             f"sequence can decode in one step, got {max_num_batched_tokens}")
        capacity = block_manager.num_blocks * block_manager.block_size
        if not 1 <= max_model_len <= capacity:
            raise ValueError(f"max_model_len: must be in [1, {capacity}] (the KV cache holds {block_manager.num_blocks} "
                             f"blocks of {block_manager.block_size} tokens), got {max_model_len}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.waiting: deque = deque()
        self.running: list = []  # in arrival order
        self.num_preemptions = 0
        self.num_appended = 0  # output tokens update() has appended (the engine's count of tokens produced)
        self._rules = None  # the last batch's _StopRules

    def add(self, seq: Sequence) -> None:
        if seq.status is not Status.WAITING or seq.seq_id in self.bm:
            raise ValueError(f"seq: sequence {seq.seq_id} is already scheduled")
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(f"prompt_ids: {seq.num_tokens} tokens leave no room to generate within max_model_len "
                             f"{self.max_model_len}")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch)
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chunk = seq.token_ids[:min(seq.num_tokens, budget)]
            limit = seq.max_cached_prompt_tokens  # prompt logprobs need their positions computed
            if not self.bm.can_allocate(chunk, max_cached_tokens=limit):
                break  # first come, first served: later arrivals wait too
            cached = self.bm.allocate(seq.seq_id, chunk, max_cached_tokens=limit)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.num_computed = cached
            seq.num_cached_prompt_tokens = cached
            self.running.append(seq)
            n = len(chunk) - cached
            self._add_to_batch(batch, seq, n)
            budget -= n
        return batch

    def _schedule_running(self, batch: ScheduledBatch) -> int:
        """Schedules the running sequences (their next tokens, under the budget) into the empty batch; returns the
        budget left. The blocks of all of them are taken in one block-manager call when they fit, the common case;
        otherwise sequence by sequence, preempting the newest as the cache runs out (the same outcome where they
        fit: no preemption, the same appends in the same order)."""
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if budget <= 0:
                break
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            self._add_to_batch(batch, seq, n)
            budget -= n
        try:
            batch.block_copies = self.bm.append_batch(
                [seq.seq_id for seq in batch.seqs], [seq.token_ids for seq in batch.seqs],
                [start + n for start, n in zip(batch.starts, batch.num_new)])
        except NoFreeBlocksError:  # nothing was appended: again one at a time, preempting
            batch.seqs, batch.starts, batch.num_new, batch.sampling = [], [], [], []
            return self._schedule_one_by_one(batch)
        return budget

    def _schedule_one_by_one(self, batch: ScheduledBatch) -> int:
        """_schedule_running when the cache cannot hold every running sequence's next tokens: each takes its
        blocks in turn, and when they run out the newest running sequence is preempted."""
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            num_new = max(0, seq.num_computed + n - self.bm.seq_len(seq.seq_id))  # tokens the manager lacks
            while num_new and not self.bm.can_append(seq.seq_id, num_new):
                victim = self.running[-1]  # the newest; never one already scheduled, those come before seq
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # seq preempted itself; self.running[i] is now the next one
            if num_new:
                batch.block_copies += self.bm.append(seq.seq_id, seq.token_ids, num_new)
            self._add_to_batch(batch, seq, n)
            budget -= n
            i += 1
        return budget

    def update(self, batch: ScheduledBatch, next_tokens) -> list:
        """Records a finished step: the computed tokens, then next_tokens[j] for the j-th sampling sequence of
        the batch: one token, or a list of several (speculative decoding: all but the last of them already
        computed and in the block manager). Finishes sequences on max_tokens, max_model_len, EOS (unless
        ignore_eos) or a stop token id, dropping any tokens after the one that finished them, and frees their
        blocks; returns them. Stop strings are the engine's (it detokenizes) via finish()."""
        sampling = [seq for seq, s in zip(batch.seqs, batch.sampling) if s]
        if len(next_tokens) != len(sampling):
            raise ValueError(f"next_tokens: expected {len(sampling)} entries (one per sampling sequence), "
                             f"got {len(next_tokens)}")
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new):
            seq.num_computed = start + n
        if all(type(t) is int for t in next_tokens):  # one token each: checked for the whole batch at once
            rules = self._stop_rules(sampling)
            if rules.zero_rows is None:
                return self._update_one_each(sampling, next_tokens, rules)
        finished = []
        for seq, tokens in zip(sampling, next_tokens):
            tokens = [int(tokens)] if isinstance(tokens, int) or getattr(tokens, "ndim", 1) == 0 else [int(t) for t in tokens]
            if not tokens:
                raise ValueError(f"next_tokens: no token for sequence {seq.seq_id}")
            if seq.params.max_tokens == 0:  # the prompt alone was asked for (scored): its prefill is done
                self.finish(seq, "length")
                finished.append(seq)
                continue
            seq.num_computed += len(tokens) - 1
            for token in tokens:
                seq.token_ids.append(token)
                self.num_appended += 1
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        return finished

    def _update_one_each(self, sampling: list, tokens: list, rules: "_StopRules") -> list:
        """update() of one new token per sampling sequence: the tokens appended, then the stop token ids, EOS,
        max_tokens and max_model_len checked as arrays over the batch (stop_token_ids row by row only for the
        sequences that have them)."""
        for seq, token in zip(sampling, tokens):
            seq.token_ids.append(token)
        self.num_appended += len(tokens)
        toks = np.array(tokens, dtype=np.int64)
        stop = (toks[:, None] == rules.eos_ids).any(axis=1) & rules.eos_applies
        for i in rules.stop_id_rows:
            stop[i] |= tokens[i] in sampling[i].params.stop_token_ids
        lengths = np.fromiter(map(len, (seq.token_ids for seq in sampling)), dtype=np.int64, count=len(sampling))
        length = lengths >= rules.max_lengths
        finished = []
        for i in np.flatnonzero(stop | length).tolist():
            self.finish(sampling[i], "stop" if stop[i] else "length")
            finished.append(sampling[i])
        return finished

    def _stop_rules(self, sampling: list) -> "_StopRules":
        """The batch's _StopRules: the last ones while the same sequences sample (compared by identity)."""
        rules = self._rules
        if rules is None or rules.seqs != sampling:
            rules = self._rules = _StopRules(sampling, self.eos_token_ids, self.max_model_len)
        return rules

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Ends a sequence (waiting or running) and frees its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _finish_reason(self, seq: Sequence, token: int):
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.starts.append(seq.num_computed)
        batch.num_new.append(n)
        batch.sampling.append(seq.num_computed + n == len(seq.token_ids))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Ahead of every later arrival, behind earlier preempted ones.
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival < seq.arrival:
            pos += 1
        self.waiting.insert(pos, seq)
