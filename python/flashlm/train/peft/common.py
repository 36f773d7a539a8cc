"""What every PEFT method shares: freezing the base, the parameters the optimiser gets, and checks of the counts
a method is built with."""

from __future__ import annotations

import torch
from torch import nn


def freeze(model: nn.Module) -> None:
    """No parameter of the base gets a gradient (nor, through trainable_parameters, optimiser state)."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad (after a PEFT method: the adapter's alone), for the optimiser:
    flashlm.train.optim.AdamW(trainable_parameters(model), lr=...)."""
    return [p for p in model.parameters() if p.requires_grad]


def positive_int(value, name: str) -> int:
    """value as a count > 0; ValueError naming `name` otherwise (bools, floats and strings included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def virtual_token_table(model: nn.Module, num_virtual_tokens, width: int) -> nn.Parameter:
    """Freezes model (a Transformer) and returns the trainable rows of P virtual tokens, [P, width] in the
    embedding table's dtype and device, N(0, 1) as nn.Embedding (PEFT's prompt encoders) initialises them."""
    P = positive_int(num_virtual_tokens, "num_virtual_tokens")
    if P >= model.cfg.seq_len:
        raise ValueError(f"num_virtual_tokens: must leave room for a token in seq_len={model.cfg.seq_len}, got {P}")
    freeze(model)
    emb = model.tok_emb  # an nn.Embedding, or a GGUFEmbedding (blocks in a buffer, its dtype a property)
    dtype = emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype
    device = next(iter(list(emb.parameters()) + list(emb.buffers()))).device
    rows = nn.Parameter(torch.empty(P, width, dtype=dtype, device=device))
    nn.init.normal_(rows)
    return rows
