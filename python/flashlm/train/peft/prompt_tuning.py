"""Prompt tuning (Lester et al. 2021) as PEFT's PromptTuningConfig: P trainable virtual-token embeddings placed
before every input's, the model frozen.

    tuned = PromptTuning(model, num_virtual_tokens=20)           # or init_token_ids=tokenizer.encode("...")
    logits, loss = tuned(idx, targets)                           # logits of idx's positions only
    opt = AdamW(trainable_parameters(tuned), lr=3e-2)            # the prompt alone

The prompt is PEFT's "prompt_embeddings" [P, d_model]. A random init is nn.Embedding's (N(0, 1)), PEFT's
RANDOM; init_token_ids copies those tokens' embeddings, repeated to fill P, as PEFT's TEXT init does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from flashlm.train.peft.common import virtual_token_table


class PromptTuning(nn.Module):
    def __init__(self, model: nn.Module, num_virtual_tokens: int, init_token_ids: Optional[Sequence[int]] = None):
        super().__init__()
        cfg = model.cfg
        ids = None if init_token_ids is None else _token_ids(init_token_ids, cfg.vocab_size)
        self.prompt_embeddings = virtual_token_table(model, num_virtual_tokens, cfg.d_model)
        self.model = model
        P = self.num_virtual_tokens
        if ids is not None:
            ids = (ids * math.ceil(P / len(ids)))[:P]
            with torch.no_grad():
                self.prompt_embeddings.copy_(model.tok_emb(torch.tensor(ids, device=self.prompt_embeddings.device)))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        return self.model(idx, targets, prompt=self.prompt_embeddings[None])


def _token_ids(ids, vocab_size: int) -> list[int]:
    ids = list(ids) if isinstance(ids, (list, tuple, range)) else []
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"init_token_ids: must be a non-empty list of token ids in [0, {vocab_size}), got {ids!r}")
    return ids
