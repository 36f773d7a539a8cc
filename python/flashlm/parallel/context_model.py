"""Context-parallel training of flashlm's Transformer: the sequence split over cp ranks, ring attention inside.

    model = ContextParallelTransformer(full_model, mesh.cp.ring)   # the whole model on every cp rank
    layout = SequenceLayout(seq_len, cp)
    idx, targets = (shard_sequence(t, layout, ring.rank) for t in (idx, targets))
    logits, loss = model(idx, targets, layout)   # logits of this rank's tokens; loss: its share of the mean
    loss.backward()
    model.all_reduce_gradients()                 # summed over the cp ranks: the whole sequence's gradients
    torch.nn.utils.clip_grad_norm_(full_model.parameters(), 1.0); optimizer.step()

Every layer but attention works token by token, so each rank runs it on the tokens it holds (its zig-zag shard,
context.py's SequenceLayout), with rope and gpt2's position table at the tokens' global positions
(layout.positions). Attention is ring attention over the cp ranks' ring, causal by the global positions. The
loss is the sum of this rank's token losses divided by the count of targets over the whole sequence (one
all-reduce of the counts), so the ranks' losses add up to the one-process mean and so do their gradients: the
all-reduce sums them. Every rank then holds the same gradients and takes the same optimizer step.

The model's own modules and parameters are used as they are (nothing is copied): the wrapper only replaces
the sequence-wide parts of the forward pass. gemma's and phi3's sliding windows and soft-capped scores are not covered
(ring attention has neither); the model's attn_impl is not consulted (ring attention runs flashlm's flash
attention on every block).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.models.transformer import Attention, Block, Transformer
from flashlm.parallel.context import SequenceLayout, ring_attention

IGNORE_INDEX = -100  # Transformer.forward's


def check_context_parallel(model: Transformer) -> None:
    """NotImplementedError unless the model's attention is what ring attention computes."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a flashlm Transformer, got {type(model).__name__}")
    if model.cfg.gemma or model.cfg.sliding_window is not None:
        raise NotImplementedError(f"model: context parallelism does not cover {model.cfg.arch}'s sliding windows "
                                  "and soft-capped scores")


class ContextParallelTransformer(nn.Module):
    """model (a Transformer, its parameters whole on every rank) run on this rank's part of the sequence;
    `ring` is the cp group's: rank, world_size, sendrecv and allreduce (comm.Ring)."""

    def __init__(self, model: Transformer, ring):
        super().__init__()
        check_context_parallel(model)
        for attr in ("rank", "world_size", "sendrecv", "allreduce"):
            if not hasattr(ring, attr):
                raise TypeError(f"ring: {type(ring).__name__} has no `{attr}` (a comm.Ring has them all)")
        self.model = model
        self.ring = ring

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor], layout: SequenceLayout):
        """idx, targets int64 [batch, local_len]: this rank's tokens of the sequence in `layout` (shard_sequence's
        order). Returns (logits [batch, local_len, vocab], loss: this rank's share of the whole sequence's mean
        loss, or None without targets). Every rank of the ring calls it together."""
        model, rank = self.model, self._check(idx, targets, layout)
        positions = layout.positions(rank, device=idx.device)
        x = model._scale_embeddings(model.tok_emb(idx))
        if model.pos_emb is not None:
            x = x + model.pos_emb(positions)
        for block, rope in zip(model.blocks, model._ropes(positions, x.dtype)):
            if model.checkpointing and model.training and torch.is_grad_enabled():
                # recomputed in backward: its ring attention runs again, on every rank in the same order
                x = checkpoint(self._block, block, x, rope, layout, use_reentrant=False)
            else:
                x = self._block(block, x, rope, layout)
        logits = model.logits(model.final_norm(x))
        if targets is None:
            return logits, None
        count = (targets != IGNORE_INDEX).sum().float().reshape(1)
        self.ring.allreduce(count)  # the whole sequence's targets (exact: float32 counts to 2^24)
        total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return logits, total / count[0]

    def all_reduce_gradients(self) -> None:
        """Each parameter's gradient := its sum over the cp ranks (one all-reduce of them all, flattened).
        A parameter without a gradient on this rank counts as zeros, so every rank sends the same sizes."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
                          for p in params])
        self.ring.allreduce(flat)
        start = 0
        for p in params:
            summed = flat[start:start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)

    def _check(self, idx, targets, layout) -> int:
        """This rank, after the checks every rank makes before its first message."""
        if not isinstance(layout, SequenceLayout):
            raise TypeError(f"layout: expected a SequenceLayout, got {type(layout).__name__}")
        if layout.seq_len > self.model.cfg.seq_len:
            raise ValueError(f"layout: seq_len {layout.seq_len} exceeds the model's seq_len {self.model.cfg.seq_len}")
        world = self.ring.world_size
        if world != layout.cp:
            raise ValueError(f"ring: {world} ranks, the layout is for cp={layout.cp}")
        rank = self.ring.rank
        want = layout.local_len(rank)
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[1] != want:
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx: rank {rank} holds {want} of the {layout.seq_len} tokens: expected int64 "
                             f"[batch, {want}], got {got}")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape
                                    or targets.dtype != torch.int64):
            got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) \
                else type(targets).__name__
            raise ValueError(f"targets: must be int64 with idx's shape {tuple(idx.shape)}, got {got}")
        # Token ids checked here rather than failing inside one rank's forward while the others wait on the ring.
        vocab = self.model.cfg.vocab_size
        if idx.numel() and not bool(((idx >= 0) & (idx < vocab)).all()):
            raise ValueError(f"idx: token ids must be in [0, {vocab})")
        if targets is not None and targets.numel() and \
                not bool((((targets >= 0) & (targets < vocab)) | (targets == IGNORE_INDEX)).all()):
            raise ValueError(f"targets: must be in [0, {vocab}) or {IGNORE_INDEX} (ignored)")
        return rank

    def _block(self, block: Block, x, rope, layout: SequenceLayout):
        """Block.forward with ring attention (the supported archs have no post-norms)."""
        x = x + self._attention(block.attn, block.attn_norm(x), rope, layout)
        return x + block.mlp(block.mlp_norm(x))

    def _attention(self, attn: Attention, x, rope, layout: SequenceLayout):
        """Attention.forward over the whole sequence's keys: this rank's q, k and v, the rest from the ring."""
        B, T, _ = x.shape
        q = attn.q(x).view(B, T, attn.n_head, attn.head_dim)
        k = attn.k(x).view(B, T, attn.n_kv_head, attn.head_dim)
        v = attn.v(x).view(B, T, attn.n_kv_head, attn.head_dim)
        q, k = attn._rotate(q, k, rope)
        y = ring_attention(q, k, v, self.ring, layout, True, attn.scale)
        return attn.o(y.reshape(B, T, attn.n_head * attn.head_dim))
