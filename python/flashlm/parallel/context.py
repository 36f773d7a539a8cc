"""Context parallelism: ring attention over a sequence split across `cp` ranks, forward and backward.

    layout = SequenceLayout(seq_len, cp)                     # zig-zag (default) or zigzag=False: contiguous
    tokens = shard_sequence(tokens, layout, rank)            # [batch, seq_len] -> this rank's [batch, local_len]
    positions = layout.positions(rank)                       # the global positions it holds, for rope
    out = ring_attention(q, k, v, transport, layout)         # q/k/v/out [batch, local_len, heads, head_dim]
    full = gather_sequence([out_0, ..., out_cp-1], layout)   # the shards of every rank -> [batch, seq_len, ...]

The layout. The sequence is cut into chunks as even as integers allow (chunk i has seq_len // n tokens, one more
for i < seq_len % n). Zig-zag: n = 2 cp chunks, rank r holds chunks r and 2 cp - 1 - r (in that order), so under a
causal mask every rank has the same work (an early chunk sees few keys, its partner many). Contiguous: n = cp,
rank r holds chunk r. Uneven lengths give ragged chunks rather than padding, so that no rank holds padding tokens
that the model's other layers, its loss and its positions would have to mask; every chunk must have a token
(seq_len >= n).

The transport is anything with `rank`, `world_size` and `sendrecv(send, recv)`, as flashlm.ops.comm.Ring has:
send a tensor to the right neighbour (rank + 1) and receive the left one's into `recv` in place (either may be
None), blocking until both are done.

Forward on rank r, cp steps: at step s it holds the K/V block of rank (r - s) mod cp and attends each of its
query chunks to each of the block's key chunks with flashlm's flash attention: under a causal mask a key chunk
before the query chunk is seen whole, the same chunk with the causal mask (square: both alignments agree), a
later one not at all. The partial outputs merge by their logsumexp in float32; then the block moves one rank to
the right. Backward walks the same ring with the forward's final out and lse, so every pair's probabilities are
the global ones: dQ accumulates locally, dK/dV (float32) travel with their K/V block, and one last step brings
them home to the block's owner.
"""

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

from flashlm.ops._check import as_bool, as_int, check_tensor, default_scale
from flashlm.ops.attention import flash_attn_backward, flash_attn_forward


class Transport(Protocol):
    """The ring that carries the blocks: this rank, the ring's size, and one point-to-point step."""

    rank: int
    size: int

    def sendrecv(self, send: Optional[torch.Tensor], recv: Optional[torch.Tensor]) -> None:
        """Sends `send` to rank (rank + 1) % size and receives rank (rank - 1) % size's into `recv`, in place."""


def _count(value, name: str) -> int:
    if isinstance(value, bool):  # an int to Python, never a count here
        raise TypeError(f"{name}: expected an integer, got bool")
    return as_int(value, name)


@dataclass(frozen=True)
class SequenceLayout:
    """Which tokens of a sequence of seq_len each of cp ranks holds (see the module's docstring)."""

    seq_len: int
    cp: int
    zigzag: bool = True

    def __post_init__(self):
        cp, seq_len = _count(self.cp, "cp"), _count(self.seq_len, "seq_len")
        if cp < 1:
            raise ValueError(f"cp: must be >= 1, got {cp}")
        object.__setattr__(self, "zigzag", as_bool(self.zigzag, "zigzag"))
        chunks = 2 * cp if self.zigzag else cp
        if seq_len < chunks:
            kind = "zig-zag" if self.zigzag else "contiguous"
            raise ValueError(f"seq_len: {seq_len} is shorter than the {chunks} chunks of a {kind} layout over "
                             f"cp={cp} ranks (every chunk needs a token)")
        object.__setattr__(self, "cp", cp)
        object.__setattr__(self, "seq_len", seq_len)

    @property
    def num_chunks(self) -> int:
        return 2 * self.cp if self.zigzag else self.cp

    def chunk(self, i: int) -> tuple[int, int]:
        """(start, length) of chunk i in the full sequence."""
        base, extra = divmod(self.seq_len, self.num_chunks)
        return i * base + min(i, extra), base + (i < extra)

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The chunks rank holds, in the order it holds them."""
        return (rank, 2 * self.cp - 1 - rank) if self.zigzag else (rank,)

    def local_chunks(self, rank: int) -> list[tuple[int, int, int]]:
        """(chunk, start in the rank's local sequence, length) of each chunk rank holds."""
        found, start = [], 0
        for i in self.chunks_of(rank):
            length = self.chunk(i)[1]
            found.append((i, start, length))
            start += length
        return found

    def local_len(self, rank: int) -> int:
        return sum(self.chunk(i)[1] for i in self.chunks_of(rank))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 [local_len]: the global position of each token rank holds (rope's positions)."""
        rank = self._rank(rank)
        return torch.cat([torch.arange(start, start + length, device=device)
                          for start, length in map(self.chunk, self.chunks_of(rank))])

    def _rank(self, rank) -> int:
        return as_int(rank, "rank", 0, self.cp - 1)


def _sequence_dim(x: torch.Tensor, name: str, dim) -> int:
    if x.dim() == 0:
        raise ValueError(f"{name}: a 0-d tensor has no sequence dimension")
    return as_int(dim, "dim", -x.dim(), x.dim() - 1) % x.dim()


def shard_sequence(x: torch.Tensor, layout: SequenceLayout, rank: int, dim: int = 1) -> torch.Tensor:
    """The part of x (the whole sequence along `dim`: tokens [batch, seq_len], q [batch, seq_len, heads, head_dim],
    positions [seq_len] with dim=0) that rank holds: its chunks concatenated along `dim` (a copy)."""
    check_tensor(x, "x")
    dim = _sequence_dim(x, "x", dim)
    if x.shape[dim] != layout.seq_len:
        raise ValueError(f"x: dimension {dim} has {x.shape[dim]} tokens, the layout's seq_len is {layout.seq_len}")
    rank = layout._rank(rank)
    return torch.cat([x.narrow(dim, *layout.chunk(i)) for i in layout.chunks_of(rank)], dim)


def gather_sequence(shards: Sequence[torch.Tensor], layout: SequenceLayout, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's part (shards[r] is rank r's, as shard_sequence gives it)."""
    if isinstance(shards, torch.Tensor) or len(shards) != layout.cp:
        got = "a tensor" if isinstance(shards, torch.Tensor) else f"{len(shards)}"
        raise ValueError(f"shards: expected a sequence of cp={layout.cp} tensors, got {got}")
    for r, shard in enumerate(shards):
        check_tensor(shard, f"shards[{r}]")
    dim = _sequence_dim(shards[0], "shards[0]", dim)
    pieces = {}
    for r, shard in enumerate(shards):
        if shard.dim() != shards[0].dim() or shard.shape[dim] != layout.local_len(r):
            raise ValueError(f"shards[{r}]: expected {layout.local_len(r)} tokens along dimension {dim}, got shape "
                             f"{list(shard.shape)}")
        for i, start, length in layout.local_chunks(r):
            pieces[i] = shard.narrow(dim, start, length)
    return torch.cat([pieces[i] for i in range(layout.num_chunks)], dim)


# --- ring attention --------------------------------------------------------------------------------------------

def _check_ring(q, k, v, transport, layout: SequenceLayout, causal) -> int:
    """This rank, after the checks that every rank makes before its first message (a rank that fails later
    leaves its neighbours waiting on the transport)."""
    as_bool(causal, "causal")
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout: expected a SequenceLayout, got {type(layout).__name__}")
    for attr in ("rank", "world_size", "sendrecv"):
        if not hasattr(transport, attr):
            raise TypeError(f"transport: {type(transport).__name__} has no `{attr}` (rank, world_size, sendrecv)")
    size = as_int(transport.world_size, "transport.world_size", 1)
    if size != layout.cp:
        raise ValueError(f"transport.world_size: {size} ranks, the layout is for cp={layout.cp}")
    rank = as_int(transport.rank, "transport.rank", 0, size - 1)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, 4, "[batch, local_len, heads, head_dim]")
        if t.shape[1] != layout.local_len(rank):
            raise ValueError(f"{name}: rank {rank} holds {layout.local_len(rank)} of the {layout.seq_len} tokens, "
                             f"got shape {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected shape {list(k.shape)} (k's), got {list(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k: shape {list(k.shape)} does not go with q's {list(q.shape)} (same batch and head_dim, "
                         f"heads a multiple of kv_heads)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"k, v: dtypes {k.dtype}, {v.dtype} differ from q's {q.dtype}")
    return rank


def _blocks(layout: SequenceLayout, rank: int, origin: int, causal: bool):
    """The attention calls of rank's queries with origin's block: (query start, query length, key start, key
    length, causal), starts in rank's local sequence and in origin's. Unmasked: one call. Causal: a rank's chunks
    are in global order, so its own block is one causal call over its whole sequence (a key chunk before the query
    chunk seen whole, the same chunk causally, a later one not at all). Another rank's block shares no chunk with
    it; the pairs with the key chunk first are seen whole, and in both layouts they are every pair of some query
    chunks and some key chunks (zig-zag, origin before rank: both query chunks with the block's first chunk;
    origin after: the second query chunk with both; contiguous: all or nothing), adjacent in their local
    sequences: one call, or none."""
    if not causal or origin == rank:
        return [(0, layout.local_len(rank), 0, layout.local_len(origin), causal)]
    pairs = [(q, k) for q in layout.local_chunks(rank) for k in layout.local_chunks(origin) if k[0] < q[0]]
    if not pairs:
        return []
    queries, keys = sorted({q for q, _ in pairs}), sorted({k for _, k in pairs})
    assert len(pairs) == len(queries) * len(keys), "a layout whose causal pairs are not one rectangle"
    q_start, k_start = queries[0][1], keys[0][1]
    return [(q_start, sum(q[2] for q in queries), k_start, sum(k[2] for k in keys), False)]


def _pass_on(transport, send: torch.Tensor, layout: SequenceLayout, from_origin: int) -> torch.Tensor:
    """Sends this block ([2, batch, local_len, kv_heads, head_dim]: K and V, or their gradients) right and returns
    the left neighbour's, whose owner is from_origin (ragged chunks: its length may differ)."""
    recv = send.new_empty((2, send.shape[1], layout.local_len(from_origin)) + tuple(send.shape[3:]))
    transport.sendrecv(send, recv)
    return recv


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """out, lse (float32 views of some rows) become the attention over their keys and the block's together."""
    new = torch.logaddexp(lse, block_lse)
    old_weight = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # [batch, rows, heads, 1]
    new_weight = torch.exp(block_lse - new).transpose(1, 2).unsqueeze(-1)
    out.mul_(old_weight).add_(block_out.float() * new_weight)
    lse.copy_(new)


def ring_attention_forward(q, k, v, transport, layout: SequenceLayout, causal: bool = False,
                           softmax_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [batch, local_len, heads, head_dim] in q's dtype, lse float32 [batch, heads, local_len]) of this
    rank's queries over the whole sequence's keys. Every rank calls it together."""
    rank = _check_ring(q, k, v, transport, layout, causal)
    scale = default_scale(q, softmax_scale)
    cp = layout.cp
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -torch.inf, dtype=torch.float32, device=q.device)
    kv = torch.stack((k, v))
    for step in range(cp):
        origin = (rank - step) % cp
        for qs, qn, ks, kn, masked in _blocks(layout, rank, origin, causal):
            block_out, block_lse = flash_attn_forward(q.narrow(1, qs, qn), kv[0].narrow(1, ks, kn),
                                                      kv[1].narrow(1, ks, kn), None, None, 0, 0, scale, masked,
                                                      -1, -1, 0.0, 2)
            _merge(out.narrow(1, qs, qn), lse.narrow(2, qs, qn), block_out, block_lse)
        if step + 1 < cp:
            kv = _pass_on(transport, kv, layout, (origin - 1) % cp)
    return out.to(q.dtype), lse


def ring_attention_backward(dout, q, k, v, out, lse, transport, layout: SequenceLayout, causal: bool = False,
                            softmax_scale: Optional[float] = None):
    """(dq, dk, dv) of this rank's q, k and v from ring_attention_forward's out and lse and the gradient of out.
    Every rank calls it together."""
    rank = _check_ring(q, k, v, transport, layout, causal)
    for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape),
                           ("lse", lse, (q.shape[0], q.shape[2], q.shape[1]))):
        check_tensor(t, name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    scale = default_scale(q, softmax_scale)
    cp = layout.cp
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack((k, v))
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # the gradient of the block held
    for step in range(cp):
        origin = (rank - step) % cp
        for qs, qn, ks, kn, masked in _blocks(layout, rank, origin, causal):
            dq_pair, dk_pair, dv_pair = flash_attn_backward(
                dout.narrow(1, qs, qn), q.narrow(1, qs, qn), kv[0].narrow(1, ks, kn), kv[1].narrow(1, ks, kn),
                out.narrow(1, qs, qn), lse.narrow(2, qs, qn), None, None, 0, 0, scale, masked, -1, -1, 0.0)
            dq.narrow(1, qs, qn).add_(dq_pair)
            dkv[0].narrow(1, ks, kn).add_(dk_pair)
            dkv[1].narrow(1, ks, kn).add_(dv_pair)
        if cp > 1:  # after the last step the block's gradient goes one more rank right: to its owner
            if step + 1 < cp:
                kv = _pass_on(transport, kv, layout, (origin - 1) % cp)
            dkv = _pass_on(transport, dkv, layout, (origin - 1) % cp)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """ring_attention_forward and its backward as one differentiable op (out only; lse is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, transport, layout, causal, softmax_scale):
        out, lse = ring_attention_forward(q, k, v, transport, layout, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (transport, layout, causal, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(dout, q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, transport, layout: SequenceLayout, causal: bool = False,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, differentiable: q [batch, local_len, heads,
    head_dim], k/v [batch, local_len, kv_heads, head_dim] (heads % kv_heads == 0), this rank's tokens in `layout`
    (shard_sequence's order; causal masks follow the global positions). Every rank calls it together."""
    return RingAttention.apply(q, k, v, transport, layout, causal, softmax_scale)
