"""What every PEFT method shares: freezing the base, the parameters the optimiser gets, and checks of the counts
a method is built with."""

from __future__ import annotations

import torch
from torch import nn

from flashlm.models.lora import freeze, positive_int  # noqa: F401 (re-exported)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad (after a PEFT method: the adapter's alone), for the optimiser:
    flashlm.train.optim.AdamW(trainable_parameters(model), lr=...)."""
    return [p for p in model.parameters() if p.requires_grad]


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
