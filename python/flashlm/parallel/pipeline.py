"""Pipeline parallelism: consecutive layers of a Transformer on each stage, micro-batches, and the GPipe and
1F1B schedules over flashlm's rings.

    plan = PipelinePlan(n_layer=cfg.n_layer, stages=4, batch_size=16, micro_batches=8, seq_len=256)
    links = shm_stage_links(job, stage, plan, tied=cfg.tie_embeddings)     # (or the mesh's)
    pipe = Pipeline(PipelineStage(model, stage, plan), links, plan)
    loss = pipe.forward_backward(idx, targets)     # adds to the stage's .grad
    pipe.finish_gradients(); pipe.clip_grad_norm_(1.0); optimizer.step()

Stage s holds the layers plan.layers(s) (as even a split as there is); the first stage also the embeddings, the
last the final norm and the head. Stages s and s+1 share a 2-rank ring (StageLinks.next of s, .prev of s+1; s is
its rank 0), each the other's right neighbour: activations go forward and their gradients back through
Ring.sendrecv. Every message is [batch_size / m, seq_len, d_model] in the parameters' dtype, so the receiver
allocates it without being told, and the ring refuses one of another size or dtype.

Schedules, m micro-batches over p stages, as Megatron-LM runs them:
  gpipe: the m forwards, then the m backwards: a stage keeps m micro-batches of activations.
  1f1b: stage s runs p - s - 1 forwards (warm-up), then one forward and one backward at a time (steady
    state), then the remaining backwards (cool-down): at most p - s micro-batches are kept.
  A forward's send to the next stage and the receive of a gradient from it that follows are one sendrecv (as
  are a backward's send to the previous stage and the next forward's receive), so two neighbours that send to
  each other at once never wait on each other, whatever the message size.
Either way a stage idles at least (p - 1) / (m + p - 1) of a step (the bubble); each step measures its own.

Context parallelism (PipelineStage(..., context=ContextShard(cp_ring, layout)), parallel/context_model.py): every
stage holds the same cp slice of each sequence (the plan's seq_len is the slice's length), its blocks run ring
attention over the cp ranks of the stage, rope and gpt2's positions are the slice's global positions, and the
last stage's loss is its share of the mean over the whole sequences (the cp ranks' shares add up to it). The
links join the stages of one cp coordinate, so activations never cross the cp dimension.

Tied embeddings: the first stage's embedding table and the last stage's head are copies of one weight; their
gradients are summed between the two (StageLinks.tied) before clipping, so the copies take the same steps.
"""

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.models import Transformer
from flashlm.ops import comm
from flashlm.ops._check import as_int
from flashlm.parallel.tensor import vocab_parallel_cross_entropy

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipelinePlan:
    """The layout of a pipeline, checked before anything is connected."""
    n_layer: int
    stages: int
    batch_size: int
    micro_batches: int
    seq_len: int
    schedule: str = "1f1b"

    def __post_init__(self):
        for name in ("n_layer", "stages", "batch_size", "micro_batches", "seq_len"):
            as_int(getattr(self, name), name, 1)
        if self.n_layer < self.stages:
            raise ValueError(f"stages: {self.stages} pipeline stages need at least {self.stages} layers, "
                             f"the model has {self.n_layer}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches: {self.micro_batches} micro-batches do not divide the batch of "
                             f"{self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")

    def layers(self, stage: int) -> range:
        """The layers of `stage`: stage s starts at s * n_layer // stages."""
        as_int(stage, "stage", 0, self.stages - 1)
        return range(stage * self.n_layer // self.stages, (stage + 1) * self.n_layer // self.stages)

    def bubble(self) -> float:
        """The schedules' idle fraction at best, (p - 1) / (m + p - 1)."""
        return (self.stages - 1) / (self.micro_batches + self.stages - 1)


@dataclass
class StageLinks:
    """The rings a stage talks over: 2-rank rings to the previous and next stage (None at the ends), one over
    all stages (the clip norm), and a 2-rank ring between the first and last stage (tied embeddings; None on
    the other stages and without tying)."""
    stage: int
    stages: int
    prev: Optional[comm.Ring] = None
    next: Optional[comm.Ring] = None
    group: Optional[comm.Ring] = None
    tied: Optional[comm.Ring] = None


def shm_stage_links(job: str, stage: int, plan: PipelinePlan, tied: bool, timeout: float = 60.0,
                    slice_bytes: int = 0) -> StageLinks:
    """Connects stage `stage`'s rings over shared memory (collective: every stage calls it with the same
    `job`, new for every pipeline). Each call waits at most `timeout` seconds for a peer; `slice_bytes` as
    comm.shm_ring's."""
    return stage_links(stage, plan, tied,
                       lambda name, rank, world: comm.shm_ring(f"{job}-{name}", rank, world, timeout, slice_bytes))


def stage_links(stage: int, plan: PipelinePlan, tied: bool, connect) -> StageLinks:
    """Stage `stage`'s rings, each connected by connect(name, rank, world_size) (collective over the ring's ranks;
    the name is the same on each: shared memory, or NCCL on GPUs through parallel/cuda_mesh.py's nccl_connect)."""
    p = plan.stages
    as_int(stage, "stage", 0, p - 1)
    # In stage order, so that every stage meets its neighbours in the order they connect.
    links = StageLinks(stage, p)
    if stage > 0:
        links.prev = connect(f"link{stage - 1}", 1, 2)
    if stage < p - 1:
        links.next = connect(f"link{stage}", 0, 2)
    if p > 1:
        links.group = connect("stages", stage, p)
        if tied and stage in (0, p - 1):
            links.tied = connect("tied", 0 if stage == 0 else 1, 2)
    return links


def block_forward(block, x, rope):
    return block(x, rope)


class PipelineStage(nn.Module):
    """A stage's part of `model` (its modules, not copies): the layers plan.layers(stage); the embeddings on the
    first stage, the final norm and head on the last (the embedding table too when tied)."""

    def __init__(self, model: Transformer, stage: int, plan: PipelinePlan, context=None):
        super().__init__()
        if not isinstance(model, Transformer):
            raise ValueError(f"model: must be a flashlm Transformer, got {type(model).__name__}")
        if model.cfg.n_layer != plan.n_layer:
            raise ValueError(f"model: has {model.cfg.n_layer} layers, the plan {plan.n_layer}")
        if plan.seq_len > model.cfg.seq_len:
            raise ValueError(f"seq_len: {plan.seq_len} is longer than the model's {model.cfg.seq_len}")
        self.cfg = model.cfg
        # A tensor-parallel model (parallel/tensor.py) keeps its own head and loss over the vocabulary shards;
        # with sequence parallelism its stages pass T / tp positions.
        self.tp = getattr(model, "tp", None)
        self.seq_shards = self.tp.size if getattr(model, "sp", False) else 1
        self.sp = self.seq_shards > 1
        # A ContextShard: this cp rank's slice of each sequence (see the module's docstring), or None.
        self.context = context
        if context is not None and (self.sp or context.local_len != plan.seq_len):
            raise ValueError(f"context: the plan's seq_len {plan.seq_len} must be the cp slice's "
                             f"{context.local_len}, without sequence parallelism")
        self._logits = type(model).logits
        self.stage, self.stages = stage, plan.stages
        self.first, self.last = stage == 0, stage == plan.stages - 1
        self.layer_ids = plan.layers(stage)
        self.checkpointing = model.checkpointing
        self.blocks = nn.ModuleList(model.blocks[i] for i in self.layer_ids)
        keep_table = self.first or (self.last and self.cfg.tie_embeddings)
        self.tok_emb = model.tok_emb if keep_table else None
        self.pos_emb = model.pos_emb if self.first else None
        self.final_norm = model.final_norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
            if hasattr(model, name):
                self.register_buffer(name, getattr(model, name), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """First stage: token ids int64 [b, T]; later stages: the hidden states [b, T, d] the previous stage
        returned. Returns hidden states [b, T, d], or on the last stage the logits [b, T, vocab]. The steps are
        Transformer.forward's (its own helpers, on the same buffers and modules), so the stages compose to it."""
        x = Transformer._scale_embeddings(self, self.tok_emb(inputs)) if self.first else inputs
        T = inputs.shape[1] if self.first else inputs.shape[1] * self.seq_shards  # attention sees all T
        positions = torch.arange(T, device=x.device) if self.context is None else self.context.positions(x.device)
        run = block_forward if self.context is None else self.context.block
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        ropes = Transformer._ropes(self, positions, x.dtype)
        for i, block in zip(self.layer_ids, self.blocks):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(run, block, x, ropes[i], use_reentrant=False)
            else:
                x = run(block, x, ropes[i])
        return self._logits(self, self.final_norm(x)) if self.last else x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean token cross-entropy of the last stage's logits (over the vocabulary shards under tensor
        parallelism: no rank holds the full logits); with context parallelism this cp rank's share of it."""
        if self.context is not None:
            return self.context.loss(logits, targets, self.tp)
        flat = logits.float().view(targets.numel(), -1)
        if self.tp is not None:
            return vocab_parallel_cross_entropy(flat, targets.reshape(-1), self.tp)
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)

    def tied_weight(self) -> Optional[nn.Parameter]:
        """The embedding table when it is tied across the first and last of several stages, else None."""
        tied = self.cfg.tie_embeddings and self.stages > 1 and (self.first or self.last)
        return self.tok_emb.weight if tied else None


class Pipeline:
    """Runs a stage's part of each step: the schedule's forwards and backwards, the tied gradients' sum, and
    clipping by the norm over all stages. `stats` holds the last forward_backward's measurements: its seconds,
    the bubble (the fraction of them outside forward and backward compute: waiting for and moving messages),
    the formula's bubble, and the most micro-batches whose activations were kept at once."""

    def __init__(self, stage: PipelineStage, links: StageLinks, plan: PipelinePlan):
        if links.stage != stage.stage or links.stages != plan.stages or stage.stages != plan.stages:
            raise ValueError(f"links: for stage {links.stage} of {links.stages}, the module is stage {stage.stage} "
                             f"of {stage.stages}, the plan has {plan.stages} stages")
        missing = [name for name, needed in (("prev", not stage.first), ("next", not stage.last),
                                             ("group", plan.stages > 1), ("tied", stage.tied_weight() is not None))
                   if needed and getattr(links, name) is None]
        if missing:
            raise ValueError(f"links: stage {stage.stage} needs the rings {missing}")
        self.stage, self.links, self.plan = stage, links, plan
        weight = next(stage.blocks.parameters())
        self.dtype, self.device = weight.dtype, weight.device  # of the activations and their gradients
        self.stats: dict = {}

    # ---- One step ----------------------------------------------------------------------------------------

    def forward_backward(self, idx: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                         loss_scale: float = 1.0) -> Optional[float]:
        """One batch through the pipeline, its gradients added to the stage's parameters. The first stage takes
        idx, the last targets (int64 [batch_size, seq_len]; the others may pass None). Each micro-batch's loss
        is its mean token cross-entropy times loss_scale / m, so the m of them add up to the batch's (as
        gradient accumulation does). Returns the batch's mean loss on the last stage, None elsewhere."""
        st, plan = self.stage, self.plan
        m = plan.micro_batches
        self._idx = self._micro_batches(idx, "idx") if st.first else None
        self._targets = self._micro_batches(targets, "targets") if st.last else None
        self._scale = float(loss_scale) / m
        self._saved, self._peak, self._busy, self._loss = {}, 0, 0.0, torch.zeros((), device=self.device)
        start = time.perf_counter()
        if plan.schedule == "gpipe":
            self._gpipe(m)
        else:
            self._one_f_one_b(m)
        total = time.perf_counter() - start
        self.stats = {"seconds": total, "bubble": 1.0 - self._busy / total if total > 0 else 0.0,
                      "bubble_formula": plan.bubble(), "peak_in_flight": self._peak}
        return float(self._loss) / m if st.last else None

    @torch.no_grad()
    def forward_only(self, idx: Optional[torch.Tensor] = None,
                     targets: Optional[torch.Tensor] = None) -> Optional[float]:
        """One batch forward through the pipeline without gradients (evaluation): the mean loss on the last stage,
        None elsewhere. Arguments as forward_backward's."""
        st, m = self.stage, self.plan.micro_batches
        self._idx = self._micro_batches(idx, "idx") if st.first else None
        targets = self._micro_batches(targets, "targets") if st.last else None
        total = 0.0
        for i in range(m):
            y = st(self._idx[i] if st.first else self._recv_forward())
            if st.last:
                total += float(st.loss(y, targets[i]))
            else:
                self._send_forward(y)
        return total / m if st.last else None

    def _gpipe(self, m):
        for i in range(m):
            self._send_forward(self._forward(i, self._recv_forward()))
        for i in range(m):
            self._send_backward(self._backward(i, self._recv_backward()))

    def _one_f_one_b(self, m):
        warm = min(self.plan.stages - self.stage.stage - 1, m)
        steady = m - warm
        for i in range(warm):
            self._send_forward(self._forward(i, self._recv_forward()))
        x = self._recv_forward() if steady else None
        for i in range(steady):
            dy = self._send_forward_recv_backward(self._forward(warm + i, x))
            dx = self._backward(i, dy)
            if i == steady - 1:
                self._send_backward(dx)
            else:
                x = self._send_backward_recv_forward(dx)
        for i in range(steady, m):
            self._send_backward(self._backward(i, self._recv_backward()))

    def _micro_batches(self, t, name):
        want = (self.plan.batch_size, self.plan.seq_len)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != want:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: stage {self.stage.stage} needs int64 {list(want)}, got {got}")
        return t.chunk(self.plan.micro_batches)

    # ---- Compute -----------------------------------------------------------------------------------------

    def _forward(self, i, x):
        """Micro-batch i's forward from x (the previous stage's output; None on the first): returns what goes
        to the next stage (None on the last) and keeps what its backward needs."""
        start = time.perf_counter()
        st = self.stage
        if x is not None:
            x.requires_grad_(True)
        y = st(self._idx[i] if st.first else x)
        if st.last:
            loss = st.loss(y, self._targets[i])
            self._loss += loss.detach()
            y = loss * self._scale
        self._saved[i] = (x, y)
        self._peak = max(self._peak, len(self._saved))
        self._busy += time.perf_counter() - start
        return None if st.last else y.detach()

    def _backward(self, i, dy):
        """Micro-batch i's backward from dy (the gradient of its output; None on the last stage): returns the
        gradient of its input for the previous stage (None on the first)."""
        start = time.perf_counter()
        x, y = self._saved.pop(i)
        torch.autograd.backward(y, dy)
        dx = None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x))
        self._busy += time.perf_counter() - start
        return dx

    # ---- Messages (Megatron-LM's p2p pairs) --------------------------------------------------------------

    def _message(self):
        p = self.plan
        return torch.empty(p.batch_size // p.micro_batches, p.seq_len // self.stage.seq_shards, self.stage.cfg.d_model,
                           dtype=self.dtype, device=self.device)

    def _recv_forward(self):
        return None if self.stage.first else self.links.prev.sendrecv(recv=self._message())

    def _send_forward(self, y):
        if not self.stage.last:
            self.links.next.sendrecv(send=y.to(self.dtype).contiguous())

    def _recv_backward(self):
        return None if self.stage.last else self.links.next.sendrecv(recv=self._message())

    def _send_backward(self, dx):
        if not self.stage.first:
            self.links.prev.sendrecv(send=dx.to(self.dtype).contiguous())

    def _send_forward_recv_backward(self, y):
        return None if self.stage.last else self.links.next.sendrecv(y.to(self.dtype).contiguous(), self._message())

    def _send_backward_recv_forward(self, dx):
        return None if self.stage.first else self.links.prev.sendrecv(dx.to(self.dtype).contiguous(), self._message())

    # ---- After the batches of a step ---------------------------------------------------------------------

    def finish_gradients(self) -> None:
        """Sums the tied embedding's gradient between the first and last stage (both then hold the total)."""
        w = self.stage.tied_weight()
        if w is None:
            return
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        self.links.tied.allreduce(w.grad, "sum")

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The L2 norm of the gradients of all stages (the tied weight counted once, on the first stage); when
        max_norm > 0 they are scaled by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_
        does. Call after finish_gradients, on every stage."""
        params = list(self.stage.parameters())
        copy = self.stage.tied_weight() if self.stage.last else None  # counted on the first stage
        grads = [p.grad for p in params if p.grad is not None and p is not copy]
        total = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.links.group is not None:
            squared = total.square().reshape(1).to(torch.float32)
            self.links.group.allreduce(squared, "sum")
            total = squared.sqrt().reshape(())
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)
