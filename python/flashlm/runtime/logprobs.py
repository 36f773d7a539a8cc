"""Log-probabilities of chosen tokens and the top N of their distributions, in one batch of tensor ops.

    rows = token_logprobs(logprobs, tokens, [5, 0, 20])   # logprobs float32 [R, V] (log_softmax), tokens [R]
    rows[0].logprob, rows[0].rank, rows[0].top_ids        # the token's, its rank (1: most likely), the top 5

The sampler takes them for output tokens (from the distribution it draws from), the model runner for prompt
tokens (from the model's logits); the engine turns them into outputs.Logprob dicts.
"""

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    rank: int  # 1 + how many tokens are strictly more likely
    top_ids: list  # the N most likely tokens, most likely first
    top_logprobs: list


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num_top: Sequence[int]) -> list:
    """One TokenLogprobs per row of logprobs [R, V] for tokens int64 [R], row r with its num_top[r] most likely
    tokens. One topk of the largest N for all rows, one copy to the host."""
    chosen = logprobs.gather(1, tokens[:, None])
    rank = (logprobs > chosen).sum(dim=1) + 1
    top = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=1)
    rows = zip(tokens.tolist(), chosen[:, 0].tolist(), rank.tolist(), top.indices.tolist(), top.values.tolist())
    return [TokenLogprobs(t, lp, r, ids[:n], lps[:n]) for (t, lp, r, ids, lps), n in zip(rows, num_top)]
