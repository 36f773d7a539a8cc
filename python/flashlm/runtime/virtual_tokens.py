"""Prompt tuning's virtual tokens in the runtime: the adapter's P embeddings come before every request's prompt.

Each sequence starts with P placeholder ids (vocab_size .. vocab_size + P - 1), so the scheduler, the paged KV
cache, prefix caching (every sequence shares those first blocks) and the max-length checks count them as the
tokens they stand for; the model's embedding looks the placeholders up in the adapter's table. Their positions
are 0 .. P - 1 and the prompt's tokens follow at P.., as PEFT's generate feeds them (inputs_embeds with the
virtual tokens first). The sampler, penalties and outputs see the real tokens only (Sequence.num_virtual).
"""

import torch
from torch import nn


class VirtualTokenEmbedding(nn.Module):
    """The model's token embedding, with ids vocab_size + i looked up in prompt[i] instead."""

    def __init__(self, embedding: nn.Module, prompt: torch.Tensor, vocab_size: int):
        super().__init__()
        self.embedding = embedding
        self.vocab_size = vocab_size
        self.register_buffer("prompt", prompt.detach().clone(), persistent=False)

    @property
    def weight(self):  # a tied lm head reads the token table (Transformer.logits)
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.vocab_size
        x = self.embedding(torch.where(virtual, 0, ids))
        if virtual.any():
            x[virtual] = self.prompt[ids[virtual] - self.vocab_size].to(x.dtype)
        return x


def add_virtual_tokens(model: nn.Module, prompt: torch.Tensor) -> list:
    """Puts prompt [P, d_model]'s rows before every sequence of model (in place); returns the P placeholder ids
    a sequence starts with."""
    cfg = model.cfg
    if prompt.dim() != 2 or prompt.shape[1] != cfg.d_model or prompt.shape[0] < 1:
        raise ValueError(f"prompt: must be [P, {cfg.d_model}], got {tuple(prompt.shape)}")
    model.tok_emb = VirtualTokenEmbedding(model.tok_emb, prompt, cfg.vocab_size)
    return list(range(cfg.vocab_size, cfg.vocab_size + prompt.shape[0]))
