"""Speculative decoding: a small draft model proposes k tokens per sequence, the target model scores all of
them in one pass, and modified rejection sampling keeps exactly the target's output distribution (Leviathan
et al. 2023; Chen et al. 2023):

    draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
    at the first rejection the token is drawn from norm(max(p_i - q_i, 0)) and the rest are dropped;
    if all k are accepted, a bonus token is drawn from p_k.

Greedy requests have one-hot p and q, so they keep the target's argmax tokens exactly.

The speculative tokens' K and V go to the cache before the block manager hears of them: positions inside the
sequence's partly filled last block use its free slots (only this sequence writes there: the engine never
forks, and a shared last block disables speculation), positions beyond it use scratch blocks kept after the
block manager's. Accepted tokens are then appended to the block manager and their K/V rows copied from
scratch to their real slots, in both caches, so nothing rejected is ever named in the prefix cache.
The draft's cache follows the target's: in ordinary steps the draft runs over the same tokens (mirror).
"""

import torch

from flashlm.runtime.block_manager import BlockManager
from flashlm.runtime.model_runner import ModelRunner
from flashlm.runtime.sampler import SamplingInput


def scratch_blocks_per_seq(k: int, block_size: int) -> int:
    # k + 1 positions starting anywhere inside a block span at most ceil((k + 1) / bs) + 1 blocks.
    return -(-(k + 1) // block_size) + 1


def rejection_sample(sampler, target_probs, draft_probs, draft_tokens, inputs):
    """target_probs [B, k+1, V], draft_probs [B, k, V], draft_tokens int64 [B, k] -> (num_accepted [B],
    final [B]): the first num_accepted drafts are kept, then `final` (the correction, or the bonus token)."""
    B, k = draft_tokens.shape
    rows = torch.arange(B, device=draft_tokens.device)
    u = sampler.random(inputs, (k,), "uniform", device=target_probs.device)
    p_d = target_probs[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q_d = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    accept = u * q_d < p_d  # u < p/q without dividing by a q that may be 0
    num_accepted = accept.int().cumprod(dim=-1).sum(dim=-1)
    q_ext = torch.cat((draft_probs, torch.zeros_like(draft_probs[:, :1])), dim=1)  # q = 0 at the bonus position
    p_r, q_r = target_probs[rows, num_accepted], q_ext[rows, num_accepted]
    residual = (p_r - q_r).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p_r)  # p == q to rounding: draw from p
    return num_accepted, sampler.sample_from(residual, inputs)


class SpeculativeDecoder:
    def __init__(self, draft_runner: ModelRunner, num_speculative_tokens: int, scratch_base: int, max_num_seqs: int):
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens: must be >= 1, got {num_speculative_tokens}")
        self.draft = draft_runner
        self.k = num_speculative_tokens
        self.scratch_base = scratch_base
        self.per_seq = scratch_blocks_per_seq(self.k, draft_runner.block_size)
        self.max_num_seqs = max_num_seqs
        self.num_proposed = 0
        self.num_accepted = 0

    def can_speculate(self, batch, bm: BlockManager, max_model_len: int) -> bool:
        """Only pure decode steps of requests that allow it (SamplingParams.can_speculate: no penalties, no
        logprobs, no grammar), with room for k more tokens, and with no sequence sharing its last block."""
        if not len(batch) or len(batch) > self.max_num_seqs or batch.block_copies:
            return False
        for seq, n, sampling in zip(batch.seqs, batch.num_new, batch.sampling):
            if n != 1 or not sampling or not seq.params.can_speculate or seq.num_tokens + self.k > max_model_len:
                return False
            if bm.ref_count(bm.block_table(seq.seq_id)[-1]) != 1:
                return False
        return True

    def run(self, batch, bm: BlockManager, target: ModelRunner, generators) -> list:
        """One speculative step for a batch can_speculate accepted: per sequence, the list of new tokens (the
        accepted drafts, already computed and appended to the block manager, then one more)."""
        k, bs, device = self.k, bm.block_size, target.device
        seqs = batch.seqs
        B = len(seqs)
        lens = [seq.num_tokens for seq in seqs]  # the pending token sits at position len - 1
        tables = [bm.block_table(s.seq_id) + list(range(self.scratch_base + i * self.per_seq,
                                                          self.scratch_base + (i + 1) * self.per_seq))
                  for i, s in enumerate(seqs)]
        width = max(len(t) for t in tables)
        block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)

        def slot(i, pos):
            return tables[i][pos // bs] * bs + pos % bs

        inputs = [SamplingInput(s.params, s.prompt_ids, s.output_ids, generators.get(s.seq_id)) for s in seqs]
        sampler = target.sampler

        # Draft: k proposals, plus one more pass so the draft's cache also holds the last proposal's K/V.
        current = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.int64, device=device)
        drafts, draft_probs = [], []
        for j in range(k + 1):
            positions = [n - 1 + j for n in lens]
            paged = self.draft.paged_batch(positions, [slot(i, p) for i, p in enumerate(positions)], block_table,
                                           [n + j for n in lens], [1] * B, range(B if j < k else 0))
            logits = self.draft.forward(current, paged)
            if j < k:
                q = sampler.probs(logits, inputs)
                current = sampler.sample_from(q, inputs)
                drafts.append(current)
                draft_probs.append(q)
        drafts = torch.stack(drafts, dim=1)  # [B, k]
        draft_probs = torch.stack(draft_probs, dim=1)  # [B, k, V]

        # Target: the pending token and the k drafts of every sequence in one pass.
        tokens = torch.cat((torch.tensor([s.token_ids[-1] for s in seqs], device=device)[:, None], drafts), dim=1)
        positions = [n - 1 + j for n in lens for j in range(k + 1)]
        slots = [slot(i, n - 1 + j) for i, n in enumerate(lens) for j in range(k + 1)]
        paged = target.paged_batch(positions, slots, block_table, [n + k for n in lens], [k + 1] * B,
                                   range(B * (k + 1)))
        logits = target.forward(tokens.reshape(-1), paged)
        target_probs = sampler.probs(logits, [x for x in inputs for _ in range(k + 1)]).view(B, k + 1, -1)
        num_accepted, final = rejection_sample(sampler, target_probs, draft_probs, drafts, inputs)

        # Keep what fits in the cache; move the kept drafts' K/V from scratch to their real slots.
        out, src, dst = [], [], []
        drafts_list, final_list = drafts.tolist(), final.tolist()
        for i, s in enumerate(seqs):
            a = int(num_accepted[i])
            kept = a
            while kept > 0 and not bm.can_append(s.seq_id, kept):
                kept -= 1
            if kept:
                if bm.append(s.seq_id, s.token_ids + drafts_list[i][:kept]):
                    raise RuntimeError("speculative decoding: an unexpected copy-on-write (a forked sequence)")
                real_slots = bm.slot_mapping(s.seq_id, lens[i], lens[i] + kept)
                for pos, real in zip(range(lens[i], lens[i] + kept), real_slots):
                    if slot(i, pos) != real:
                        src.append(slot(i, pos))
                        dst.append(real)
            out.append(drafts_list[i][:kept] + [final_list[i] if kept == a else drafts_list[i][kept]])
            self.num_proposed += k
            self.num_accepted += a
        target.move_slots(src, dst)
        self.draft.move_slots(src, dst)
        return out

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0
