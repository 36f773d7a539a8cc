"""Megatron tensor parallelism of flashlm's Transformer (gpt2, llama and qwen2, GQA included).

    check_tensor_parallel(cfg, 2)              # before the mesh: heads, K/V heads, d_ff and vocab divide
    model = shard_model(full_model, mesh.tp)   # this rank's slices of every layer
    logits, loss = model(idx, targets)         # logits [B, T, vocab / tp]: no rank ever holds all of them
    norm = model.clip_grad_norm_(1.0)          # clipped by the norm over every shard
    state = gather_state_dict(model)           # the full model's state_dict, full tensors (collective)

Each block, with f = identity forward / all-reduce backward and g = all-reduce forward / identity backward:

    x -> norm -> f -> q, k, v (columns: this rank's heads) -> attention -> o (rows)            -> g -> + x
    x -> norm -> f -> fc | gate, up (columns: d_ff / tp)   -> act       -> proj | down (rows)  -> g -> + x

so one all-reduce per attention and one per MLP in each direction; the row-parallel biases are added once,
after g. Everything outside f..g (norms, residual stream, positions, row biases) is the same on every rank and
so are its gradients. K/V heads are split when n_kv_head divides by tp; with fewer K/V heads than ranks every
rank holds them all and uses the one its query heads share, its weights behind an f of their own so that
their gradients sum over the ranks. The embedding and the output layer hold vocab / tp rows each; the
cross-entropy combines the shards with an all-gather of the row maxima and one all-reduce of the sums.

Sequence parallelism (shard_model(..., sequence_parallel=True)): outside f..g each rank holds T / tp of the
positions, so f becomes an all-gather of the positions (reduce-scatter backward) and g a reduce-scatter
(all-gather backward), the same bytes as the all-reduce, and the norms' activations are 1 / tp the size. The
gradients of the tensors that act on positions (norms, gpt2's positions, row-parallel biases) are then
each rank's part and are summed over the group in backward. f and g live in regions.py.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.models.config import ModelConfig
from flashlm.models.transformer import (Block, LayerNorm, RMSNorm, Transformer, apply_rope, causal_attention, gelu,
                                       rope_tables, swiglu)
from flashlm.parallel.mesh import Group
from flashlm.parallel.regions import enter, leave

SUPPORTED_ARCHS = ("gpt2", "llama", "qwen2")
_COLUMN = ("attn.q", "mlp.fc", "mlp.gate", "mlp.up")  # output features split: weight rows and bias
_ROW = ("attn.o", "mlp.proj", "mlp.down")  # input features split: weight columns; the bias whole
_KV = ("attn.k", "attn.v")  # columns when split, whole when replicated


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """ValueError (naming the size) unless a model of `cfg` splits over `tp` ranks: n_head, d_ff and
    vocab_size divide by tp, and n_kv_head divides by tp or tp by n_kv_head. Call it before making the mesh."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: must be a ModelConfig, got {type(cfg).__name__}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp: must be an int >= 1, got {tp!r}")
    if cfg.arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"cfg.arch: tensor parallelism covers {SUPPORTED_ARCHS}, got {cfg.arch!r}")
    if cfg.sliding_window is not None:  # its attention is the plain causal one
        raise NotImplementedError(f"cfg.sliding_window: tensor parallelism has no sliding-window attention, got "
                                  f"{cfg.sliding_window}")
    check_splits(cfg, tp, "--tp", ("n_head", "d_ff", "vocab_size"), f"tp {tp}")


def check_splits(cfg: ModelConfig, size: int, flag: str, dims: tuple, said: str) -> None:
    """ValueError naming `flag` (and the size as `said`) unless each of cfg's `dims` divides by `size` and
    n_kv_head divides by size or size by n_kv_head (K/V heads are split, or replicated when fewer than the
    ranks): the rule of tensor parallelism in training and in serving."""
    for name in dims:
        if getattr(cfg, name) % size:
            raise ValueError(f"{flag}: {name} {getattr(cfg, name)} does not divide by {said}")
    if cfg.n_kv_head % size and size % cfg.n_kv_head:
        raise ValueError(f"{flag}: n_kv_head {cfg.n_kv_head} must divide by {said} or divide it (K/V heads are "
                         "split or replicated)")


def shard_dims(cfg: ModelConfig, tp: int) -> dict:
    """State-dict name -> the dimension split across the tp ranks (None: the whole tensor on every rank)."""
    kv_split = cfg.n_kv_head % tp == 0
    dims = {}
    for name in cfg.state_shapes():
        layer = name.rsplit(".", 1)[0].split(".", 2)[-1]  # "blocks.0.attn.q.weight" -> "attn.q"
        if name in ("tok_emb.weight", "lm_head.weight") or layer in _COLUMN or (layer in _KV and kv_split):
            dims[name] = 0
        elif layer in _ROW and name.endswith(".weight"):
            dims[name] = 1
        else:
            dims[name] = None
    return dims


class ParallelAttention(nn.Module):
    """This rank's n_head / tp query heads and the K/V heads they read; o row-parallel."""

    def __init__(self, cfg: ModelConfig, attn_impl: str, tp: Group, sequence_parallel: bool):
        super().__init__()
        hd, bias = cfg.head_dim, cfg.qkv_bias
        self.tp, self.sp, self.attn_impl, self.head_dim = tp, sequence_parallel, attn_impl, hd
        self.n_head = cfg.n_head // tp.size
        kv_split = cfg.n_kv_head % tp.size == 0
        self.n_kv_head = cfg.n_kv_head // tp.size if kv_split else 1
        held = self.n_kv_head if kv_split else cfg.n_kv_head
        # Replicated K/V: this rank's query heads all read K/V head rank * n_kv_head // tp.
        self.kv_used = None if kv_split else tp.rank * cfg.n_kv_head // tp.size
        self.q = nn.Linear(cfg.d_model, self.n_head * hd, bias=bias)
        self.k = nn.Linear(cfg.d_model, held * hd, bias=bias)
        self.v = nn.Linear(cfg.d_model, held * hd, bias=bias)
        self.o = nn.Linear(self.n_head * hd, cfg.d_model, bias=cfg.arch == "gpt2")

    def _kv(self, linear: nn.Linear, x):
        if self.kv_used is None:
            return linear(x)
        rows = slice(self.kv_used * self.head_dim, (self.kv_used + 1) * self.head_dim)
        w = enter(linear.weight, self.tp)[rows]
        b = None if linear.bias is None else enter(linear.bias, self.tp)[rows]
        return F.linear(x, w, b)

    def forward(self, x, rope, kv_prefix=None, attend=None):
        """attend: (q, k, v) -> the attention of this rank's heads, in place of the causal attention over x's
        positions (context parallelism passes its ring attention: parallel/context_model.py)."""
        if kv_prefix is not None:
            raise NotImplementedError("kv_prefix: not supported with tensor parallelism")
        x = enter(x, self.tp, self.sp)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self._kv(self.k, x).view(B, T, self.n_kv_head, self.head_dim)
        v = self._kv(self.v, x).view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = causal_attention(q, k, v, self.attn_impl) if attend is None else attend(q, k, v)
        return _row_output(self.o, y.reshape(B, T, self.n_head * self.head_dim), self.tp, self.sp)


class ParallelMLP(nn.Module):
    """gpt2's fc -> gelu -> proj or llama's down(silu(gate) * up), d_ff / tp columns on this rank."""

    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool, train_kernels: bool = False):
        super().__init__()
        self.tp, self.sp = tp, sequence_parallel
        self.train_kernels = train_kernels  # the model's activation kernels (Transformer's training path)
        d, ff = cfg.d_model, cfg.d_ff // tp.size
        self.gated = cfg.arch != "gpt2"
        if self.gated:
            self.gate = nn.Linear(d, ff, bias=False)
            self.up = nn.Linear(d, ff, bias=False)
            self.down = nn.Linear(ff, d, bias=False)
        else:
            self.fc = nn.Linear(d, ff)
            self.proj = nn.Linear(ff, d)

    def forward(self, x):
        x = enter(x, self.tp, self.sp)
        if self.gated:
            return _row_output(self.down, swiglu(self.gate(x), self.up(x), self.train_kernels), self.tp, self.sp)
        return _row_output(self.proj, gelu(self.fc(x), self.train_kernels), self.tp, self.sp)


def _row_output(linear: nn.Linear, x, tp: Group, sequence_parallel: bool):
    """A row-parallel layer: this rank's partial product, summed over the group (g), then the bias once."""
    y = leave(F.linear(x, linear.weight), tp, sequence_parallel)
    return y if linear.bias is None else y + linear.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V / tp, (rank + 1) * V / tp) of the embedding table; a token of another rank's rows
    contributes zeros here, and the sum over the group (g) is every token's row."""

    def __init__(self, vocab_size: int, dim: int, tp: Group, sequence_parallel: bool):
        super().__init__()
        self.tp, self.sp = tp, sequence_parallel
        rows = vocab_size // tp.size
        self.start = tp.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, idx):
        local = idx - self.start
        here = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight).masked_fill(~here.unsqueeze(-1), 0.0)
        return leave(x, self.tp, self.sp)


class _PositionShard(nn.Embedding):
    """gpt2's position table, whole on every rank, looked up at this rank's T / tp positions only."""

    def __init__(self, seq_len: int, dim: int, tp: Group):
        super().__init__(seq_len, dim)
        self.tp = tp

    def forward(self, positions):
        n = positions.shape[0] // self.tp.size
        return super().forward(positions[self.tp.rank * n:(self.tp.rank + 1) * n])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, group, ignore_index, mean):
        ctx.dtype = logits.dtype
        logits = logits.float()
        # The max over the whole vocabulary (the ring sums only): every rank's row maxima, gathered.
        row_max = group.all_gather(logits.max(dim=-1).values.contiguous()[None]).max(dim=0).values
        shifted = logits - row_max[:, None]
        local = targets - start
        here = (local >= 0) & (local < logits.shape[1])
        picked = shifted.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1).masked_fill(~here, 0.0)
        exp = shifted.exp()
        sums = group.all_reduce(torch.stack((exp.sum(dim=-1), picked)))  # [2, N]: sum of exp, target's logit
        valid = targets != ignore_index
        count = valid.sum() if mean else torch.ones((), dtype=torch.int64)  # the divisor
        losses = (sums[0].log() - sums[1]) * valid
        ctx.save_for_backward(exp.div_(sums[0][:, None]), local, here & valid, valid, count)
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local, hit, valid, count = ctx.saved_tensors
        g = softmax * valid[:, None]
        rows = hit.nonzero().squeeze(1)
        g[rows, local[rows]] -= 1.0
        return (g * (grad / count)).to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """torch's F.cross_entropy (mean over the targets that are not ignore_index, or their sum with
    reduction="sum") of logits split by vocabulary over `group`: logits [N, V / size] hold columns
    [rank * V / size, ...) of the full [N, V]; targets int64 [N], the same on every rank. Computed in float32;
    a collective."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: must be 'mean' or 'sum', got {reduction!r}")
    if logits.dim() != 2 or 0 in logits.shape:
        raise ValueError(f"logits: must be [N, vocab / tp] with N, vocab / tp >= 1, got {tuple(logits.shape)}")
    if targets.dtype != torch.int64 or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: must be int64 [{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    vocab = logits.shape[1] * group.size
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets: must be in [0, {vocab}) or ignore_index {ignore_index}, got "
                         f"{int(targets[bad][0])}")
    return _VocabParallelCrossEntropy.apply(logits, targets, group.rank * logits.shape[1], group, ignore_index,
                                            reduction == "mean")


class TensorParallelTransformer(Transformer):
    """This tp rank's part of a Transformer: the same parameter names, with the shapes of its slices. Build
    one with shard_model; forward gives vocab-parallel logits and the loss over the whole vocabulary."""

    def __init__(self, cfg: ModelConfig, tp: Group, attn_impl: str = "flashlm", sequence_parallel: bool = False):
        check_tensor_parallel(cfg, tp.size)
        if not isinstance(sequence_parallel, bool):
            raise ValueError(f"sequence_parallel: must be a bool, got {sequence_parallel!r}")
        nn.Module.__init__(self)
        self.cfg, self.tp, self.sp = cfg, tp, sequence_parallel
        self.checkpointing = False
        self.tp_dims = shard_dims(cfg, tp.size)
        self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, tp, sequence_parallel)
        self.pos_emb = None
        if cfg.arch == "gpt2":
            self.pos_emb = _PositionShard(cfg.seq_len, cfg.d_model, tp) if sequence_parallel else \
                nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList()
        for i in range(cfg.n_layer):
            block = Block(cfg, attn_impl, i)  # its norms; its attention and MLP swapped for this rank's slices
            block.attn = ParallelAttention(cfg, attn_impl, tp, sequence_parallel)
            block.mlp = ParallelMLP(cfg, tp, sequence_parallel, attn_impl == "flashlm")
            self.blocks.append(block)
        self.final_norm = LayerNorm(cfg.d_model, cfg.norm_eps, attn_impl == "flashlm") if cfg.arch == "gpt2" else \
            RMSNorm(cfg.d_model, cfg.norm_eps, attn_impl == "flashlm")
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size // tp.size, bias=False)
        if cfg.rotary:
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if sequence_parallel and tp.size > 1:
            # Outside the regions each rank sees only its positions: the gradients of what acts there (norms,
            # positions, row-parallel biases) are this rank's part of the sum, completed in backward.
            for name, p in self.named_parameters():
                if self.tp_dims[name] is None and name.rsplit(".", 1)[0].split(".", 2)[-1] not in _KV:
                    p.register_hook(lambda grad: tp.all_reduce(grad.clone()))

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, prompt=None, kv_prefix=None):
        """This rank's logits [B, T, vocab / tp] (columns rank * vocab / tp ...) and, with targets, the
        cross-entropy over the whole vocabulary (the same on every rank)."""
        if prompt is not None or kv_prefix is not None:
            raise NotImplementedError("prompt, kv_prefix: not supported with tensor parallelism")
        if idx.dtype != torch.int64 or idx.dim() != 2:
            raise ValueError(f"idx: must be int64 [batch, seq], got {idx.dtype} {tuple(idx.shape)}")
        T = idx.shape[1]
        if not 0 < T <= self.cfg.seq_len:
            raise ValueError(f"idx: sequence length must be in [1, seq_len={self.cfg.seq_len}], got {T}")
        if self.sp and T % self.tp.size:
            raise ValueError(f"idx: with sequence parallelism the sequence length must divide by tp "
                             f"{self.tp.size}, got {T}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets: must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if bool(((idx < 0) | (idx >= self.cfg.vocab_size)).any()):  # each rank looks up only its own rows
            raise ValueError(f"idx: token ids must be in [0, {self.cfg.vocab_size}), got {int(idx.min())}.."
                             f"{int(idx.max())}")
        positions = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx)  # [B, T, d] (sequence parallel: [B, T / tp, d], this rank's positions)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        for block, rope in zip(self.blocks, self._ropes(positions, x.dtype)):  # attention sees all T positions
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, None, use_reentrant=False)
            else:
                x = block(x, rope)
        logits = self.logits(self.final_norm(x))
        loss = None
        if targets is not None:
            flat = logits.reshape(-1, logits.shape[-1])
            loss = vocab_parallel_cross_entropy(flat, targets.reshape(-1), self.tp)
        return logits, loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
        return F.linear(enter(x, self.tp, self.sp), weight)

    def forward_paged(self, *args, **kwargs):
        raise NotImplementedError("forward_paged: tensor-parallel serving is not built on this class")

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scales every gradient by max_norm / (norm + 1e-6) where that is below 1, as torch's
        clip_grad_norm_ on the full model: the norm over all shards (split tensors' squares summed over the
        group, the replicated ones counted once). Returns the norm (not finite: nothing is scaled, and the
        caller skips the step). A collective of the tp group."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < math.inf:
            raise ValueError(f"max_norm: must be a positive finite number, got {max_norm!r}")
        params = dict(self.named_parameters())
        device = next(iter(params.values())).device  # the group's ring for the gradients' device
        split, whole = torch.zeros(1, device=device), torch.zeros(1, device=device)
        for name, p in params.items():
            if p.grad is not None:
                target = split if self.tp_dims[name] is not None else whole
                target += p.grad.detach().float().square().sum()
        norm = math.sqrt(float(self.tp.all_reduce(split) + whole))
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm


def shard_model(model: Transformer, tp: Group, sequence_parallel: bool = False) -> TensorParallelTransformer:
    """A TensorParallelTransformer holding this rank's slices of `model` (copies; `model` is not changed),
    with its attention implementation and checkpointing. `model` must be the same on every rank of tp.
    sequence_parallel: between the regions (norms, residual stream) each rank holds T / tp positions, and the
    regions' all-reduces become an all-gather and a reduce-scatter of the positions."""
    if type(model) is not Transformer:
        raise ValueError(f"model: must be a flashlm Transformer, got {type(model).__name__}")
    attn_impl = model.blocks[0].attn.attn_impl
    part = TensorParallelTransformer(model.cfg, tp, attn_impl, sequence_parallel)
    part.checkpointing = model.checkpointing
    full = model.state_dict()
    if set(full) != set(part.tp_dims):
        raise ValueError(f"model: its parameters are not those of its config (extra or missing: "
                         f"{sorted(set(full) ^ set(part.tp_dims))[:4]})")
    with torch.no_grad():
        for name, p in part.named_parameters():
            p.copy_(_slice(full[name], part.tp_dims[name], tp))
    return part


def _slice(tensor: torch.Tensor, dim: Optional[int], tp: Group) -> torch.Tensor:
    if dim is None:
        return tensor
    n = tensor.shape[dim] // tp.size
    return tensor.narrow(dim, tp.rank * n, n)


def gather_state_dict(model: TensorParallelTransformer) -> dict:
    """The full model's state_dict (name -> full tensor, on every rank) from the tp group's slices: the
    state dict shard_model started from, for checkpoints and export. A collective of the tp group."""
    full = {}
    for name, p in model.state_dict().items():
        dim = model.tp_dims[name]
        if dim is None:
            full[name] = p.detach().clone()
        else:  # all_gather concatenates along the first dimension: move the split one there and back
            shard = p.detach().movedim(dim, 0).contiguous()
            full[name] = model.tp.all_gather(shard).movedim(0, dim).contiguous()
    return full


def load_full_state_dict(model: TensorParallelTransformer, full: dict) -> None:
    """Copies this rank's slices of `full` (a full model's state_dict, as gather_state_dict gives it) into
    `model`'s parameters: the inverse of gather_state_dict, without communication."""
    own = model.state_dict()
    if set(full) != set(own):
        missing = sorted(set(full) ^ set(own))[:4]
        raise ValueError(f"full: its tensors are not the model's (extra or missing: {missing})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = _slice(full[name], model.tp_dims[name], model.tp)
            if part.shape != p.shape:
                raise ValueError(f"full: {name} has shape {tuple(full[name].shape)}, not the full model's")
            p.copy_(part)
