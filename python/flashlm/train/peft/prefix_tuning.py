"""Prefix tuning (Li & Liang 2021) as PEFT's PrefixTuningConfig (prefix_projection=False): per layer P trainable
keys and values before every input's, seen by every position, the model frozen.

    tuned = PrefixTuning(model, num_virtual_tokens=20)
    logits, loss = tuned(idx, targets)
    opt = AdamW(trainable_parameters(tuned), lr=1e-2)          # the prefixes alone

The prefixes are PEFT's "prompt_embeddings" [P, n_layer * 2 * n_kv_head * head_dim]: row p holds, layer after
layer, that position's key then its value, each [n_kv_head, head_dim]; keys are taken as they are (no rope),
as HF models take a KV cache, and the input's tokens sit at positions P.. (PEFT passes the prefixes as past
key values). The init is nn.Embedding's (N(0, 1)), as PEFT's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flashlm.train.peft.common import virtual_token_table


def prefix_width(cfg) -> int:
    """The width of a virtual token's row: every layer's key and value."""
    return cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim


class PrefixTuning(nn.Module):
    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.prompt_embeddings = virtual_token_table(model, num_virtual_tokens, prefix_width(model.cfg))
        self.model = model

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def kv_prefix(self, batch: int) -> list:
        """Per layer (k, v), each [batch, P, n_kv_head, head_dim]."""
        cfg = self.model.cfg
        P = self.num_virtual_tokens
        kv = self.prompt_embeddings.view(P, cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim)
        kv = kv[None].expand(batch, -1, -1, -1, -1, -1)
        return [(kv[:, :, i, 0], kv[:, :, i, 1]) for i in range(cfg.n_layer)]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx: must be int64 [batch, seq], got {getattr(idx, 'shape', type(idx).__name__)}")
        return self.model(idx, targets, kv_prefix=self.kv_prefix(idx.shape[0]))
