"""Prompt and prefix tuning's virtual tokens in the runtime: the adapter's P embeddings (prompt tuning) or P keys
and values per layer (prefix tuning) come before every request's prompt.

Each sequence starts with P placeholder ids (vocab_size .. vocab_size + P - 1), so the scheduler, the paged KV
cache, prefix caching (every sequence shares those first blocks) and the max-length checks count them as the
tokens they stand for. Prompt tuning: the model's embedding looks the placeholders up in the adapter's table;
their positions are 0 .. P - 1 and the prompt's tokens follow at P.., as PEFT's generate feeds them
(inputs_embeds with the virtual tokens first). Prefix tuning: KVPrefix writes their K and V into the cache.
The sampler, penalties and outputs see the real tokens only (Sequence.num_virtual).
"""

from dataclasses import replace

import torch
from torch import nn

from flashlm.runtime.model_runner import token_slots


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


def placeholder_ids(cfg, P: int) -> list:
    """The ids of a sequence's P virtual tokens: past the vocabulary, so no real token is one."""
    return list(range(cfg.vocab_size, cfg.vocab_size + P))


def add_prompt(model: nn.Module, prompt: torch.Tensor) -> list:
    """Puts prompt [P, d_model]'s rows before every sequence of model (in place); returns the P placeholder ids
    a sequence starts with."""
    cfg = model.cfg
    if prompt.dim() != 2 or prompt.shape[1] != cfg.d_model or prompt.shape[0] < 1:
        raise ValueError(f"prompt: must be [P, {cfg.d_model}], got {tuple(prompt.shape)}")
    model.tok_emb = VirtualTokenEmbedding(model.tok_emb, prompt, cfg.vocab_size)
    return placeholder_ids(cfg, prompt.shape[0])


class KVPrefix:
    """Prefix tuning's per-layer keys and values in the paged KV cache: a sequence's placeholder positions
    0 .. P - 1 get the adapter's K and V written straight into their slots (taken as they are, no rope, as PEFT
    passes them as past key values) instead of being computed; the step's forward runs the real tokens alone,
    at positions P.., and attends to the prefix through the cache like to any earlier token."""

    def __init__(self, table: torch.Tensor, cfg):
        self.P = table.shape[0]
        # PEFT's prompt_embeddings row p: layer after layer, that position's key then its value [n_kv_head, hd]
        self.kv = table.detach().reshape(self.P, cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim)

    def write(self, batch, bm, kv_caches):
        """Writes the K/V of batch's placeholder positions into kv_caches; returns the batch without them (the
        tokens the forward computes)."""
        virtual = []  # (seq_id, start, count) of the placeholder positions this step computes
        rest = []  # (seq, start, count) of the real tokens
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new):
            count = max(0, min(start + n, self.P) - start)
            if count:
                virtual.append((seq.seq_id, start, count))
            if n > count:
                rest.append((seq, start + count, n - count))
        if virtual:
            ids, starts, counts = zip(*virtual)
            positions, slots = token_slots(bm.block_tables_tensor(list(ids)), starts, counts, bm.block_size)
            for layer, (k_cache, v_cache) in enumerate(kv_caches):
                for j, cache in enumerate((k_cache, v_cache)):
                    rows = cache.view(-1, *cache.shape[2:])
                    rows[slots.to(rows.device)] = self.kv[positions, layer, j].to(rows.device, rows.dtype)
        seqs, starts, counts = (list(c) for c in zip(*rest)) if rest else ([], [], [])
        return replace(batch, seqs=seqs, starts=starts, num_new=counts)
