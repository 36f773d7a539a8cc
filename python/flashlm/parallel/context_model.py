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
the sequence-wide parts of the forward pass. Those parts live in ContextShard, which the pipeline's stages use
too (CP x PP: every stage holds the same cp slice of the sequence). The model may be tensor parallel (CP x TP,
parallel/tensor.py): each tp rank runs ring attention on its own heads (heads are independent, so the cp ring of
one tp coordinate carries only those), the row-parallel o-projection sums over tp as usual, and the loss is the
vocabulary-parallel cross-entropy's sum over the rank's tokens. gemma's and phi3's sliding windows and
soft-capped scores are not covered (ring attention has neither); the model's attn_impl is not consulted (ring
attention runs flashlm's flash attention on every block).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.models.transformer import Block, Transformer
from flashlm.parallel.context import SequenceLayout, ring_attention
from flashlm.parallel.mesh import Group
from flashlm.parallel.tensor import vocab_parallel_cross_entropy

IGNORE_INDEX = -100  # Transformer.forward's


def check_context_parallel(model: Transformer) -> None:
    """NotImplementedError unless the model's attention is what ring attention computes."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a flashlm Transformer, got {type(model).__name__}")
    if model.cfg.gemma or model.cfg.sliding_window is not None:
        raise NotImplementedError(f"model: context parallelism does not cover {model.cfg.arch}'s sliding windows "
                                  "and soft-capped scores")


def _check_ring(ring) -> None:
    for attr in ("rank", "world_size", "sendrecv", "allreduce"):
        if not hasattr(ring, attr):
            raise TypeError(f"ring: {type(ring).__name__} has no `{attr}` (a comm.Ring has them all)")


def sum_gradients(params: list, group) -> None:
    """Each parameter's gradient := its sum over `group` (a mesh Group, or a comm.Ring: anything with
    all_reduce or allreduce), one all-reduce of them all, flattened. A parameter without a gradient on this rank
    counts as zeros, so every rank sends the same sizes."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1) for p in params])
    (group.all_reduce if hasattr(group, "all_reduce") else group.allreduce)(flat)
    start = 0
    for p in params:
        summed = flat[start:start + p.numel()].view_as(p).to(p.dtype)
        start += p.numel()
        if p.grad is None:
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)


class ContextShard:
    """The sequence-wide steps of a model run on this rank's part of each sequence: the positions it holds,
    a block with ring attention over the cp ring, and its share of the loss. ring: the cp group's comm.Ring
    (rank, world_size, sendrecv, allreduce); layout: the SequenceLayout of the sequences."""

    def __init__(self, ring, layout: SequenceLayout):
        _check_ring(ring)
        if not isinstance(layout, SequenceLayout):
            raise TypeError(f"layout: expected a SequenceLayout, got {type(layout).__name__}")
        if ring.world_size != layout.cp:
            raise ValueError(f"ring: {ring.world_size} ranks, the layout is for cp={layout.cp}")
        self.ring, self.layout, self.rank = ring, layout, ring.rank

    @property
    def local_len(self) -> int:
        return self.layout.local_len(self.rank)

    def positions(self, device=None) -> torch.Tensor:
        return self.layout.positions(self.rank, device=device)

    def block(self, block: Block, x, rope):
        """Block.forward with ring attention over the cp ring (the supported archs have no post-norms), called
        through the module so that hooks on it run (ZeRO-3 gathers a block's parameters in them). A tensor-
        parallel attention runs the ring on its own heads."""
        scale = getattr(block.attn, "scale", None)
        return block(x, rope, None, lambda q, k, v: ring_attention(q, k, v, self.ring, self.layout, True, scale))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, tp: Optional[Group] = None) -> torch.Tensor:
        """This rank's share of the mean token loss over the whole sequences: the sum of its token losses
        (over the vocabulary shards of `tp` when given) divided by the count of targets over every cp rank (one
        all-reduce of the counts), so the ranks' shares add up to the mean even when their counts differ."""
        count = (targets != IGNORE_INDEX).sum().float().reshape(1)
        self.ring.allreduce(count)  # exact: float32 counts to 2^24
        flat = logits.float().reshape(targets.numel(), -1)
        if tp is not None:
            total = vocab_parallel_cross_entropy(flat, targets.reshape(-1), tp, IGNORE_INDEX, reduction="sum")
        else:
            total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return total / count[0]


class ContextParallelTransformer(nn.Module):
    """model (a Transformer, its parameters whole on every rank) run on this rank's part of the sequence;
    `ring` is the cp group's: rank, world_size, sendrecv and allreduce (comm.Ring)."""

    def __init__(self, model: Transformer, ring):
        super().__init__()
        check_context_parallel(model)
        _check_ring(ring)
        self.model = model
        self.ring = ring

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's blocks. ZeRO-3 (zero3.py) makes each one a unit of its own, gathered around its forward and
        backward by hooks on the module (ContextShard.block calls it), so at most two are materialised at once."""
        return self.model.blocks

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor], layout: SequenceLayout):
        """idx, targets int64 [batch, local_len]: this rank's tokens of the sequence in `layout` (shard_sequence's
        order). Returns (logits [batch, local_len, vocab], loss: this rank's share of the whole sequence's mean
        loss, or None without targets). Every rank of the ring calls it together."""
        model = self.model
        self._check(idx, targets, layout)
        shard = ContextShard(self.ring, layout)
        positions = shard.positions(idx.device)
        x = model._scale_embeddings(model.tok_emb(idx))
        if model.pos_emb is not None:
            x = x + model.pos_emb(positions)
        for block, rope in zip(model.blocks, model._ropes(positions, x.dtype)):
            if model.checkpointing and model.training and torch.is_grad_enabled():
                # recomputed in backward: its ring attention runs again, on every rank in the same order
                x = checkpoint(shard.block, block, x, rope, use_reentrant=False)
            else:
                x = shard.block(block, x, rope)
        logits = model.logits(model.final_norm(x))
        if targets is None:
            return logits, None
        return logits, shard.loss(logits, targets, getattr(model, "tp", None))

    def all_reduce_gradients(self) -> None:
        """Each parameter's gradient := its sum over the cp ranks (sum_gradients over the ring)."""
        sum_gradients(list(self.model.parameters()), self.ring)

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
