"""ZeRO stage 3: the parameters, their gradients and the optimizer state all sharded over the data-parallel
ranks: the world (flashlm.train.parallel.DataParallel(model, ..., zero_stage=3)) or a mesh's dp group, over the
part of the model a rank holds (its tensor-parallel shard, its pipeline stage: flashlm.train.parallel_step).

Layout. The model is cut into units: each child of model.blocks (a transformer block) is one, and every
other trainable parameter (embeddings, final norm, lm head; the whole model when it has no .blocks) makes
one more, the "outer" unit. A unit's parameters, per param group, are laid out in one flat segment padded
with zeros to a multiple of the group's size; rank r keeps slice r of every segment: the master values (one
tensor per segment, which the inner optimizer steps, so its state covers that slice only) and, after
backward, the averaged gradient of that slice. A unit's full flat buffer exists only while the unit is in
use: the module's parameters are views into it, and between uses its storage is resized to 0 and the
parameters point at an empty tensor (reading one then gives 0 elements, never freed memory). A parameter named
in `separate` gets a segment of its own: its slices are then the same elements wherever it is held (a pipeline's
tied embedding, on the first and last stage, whose gradient slices are summed between the two).

A step.
  - Forward: the outer unit is gathered when the model's forward starts and kept until its gradients are
    reduced (the tied embedding is used first and last). Before block i runs it is gathered (waiting for
    the prefetch) and block i + 1's all-gather is started on the background thread; after block i it is
    freed, so at most two blocks are materialised at once.
  - Backward: a hook on each block's output fires before that block's backward: the block is gathered again
    and block i - 1's all-gather is prefetched. (Under activation checkpointing the block's forward runs
    again there, on the gathered parameters.) When every parameter of a unit has its gradient, the unit's
    gradients are packed, reduce-scattered (averaged) on the background thread into this rank's gradient
    slice, the parameters' .grad dropped and the unit freed.
  - Accumulation: every backward reduce-scatters, and the slices of successive micro-steps are summed, so
    a rank never holds more than its slice of the gradients between micro-steps (no_sync() changes
    nothing: there is no full local gradient to accumulate into).
  - Step: the inner optimizer updates the shards; the next forward gathers the new values.
Every collective runs on one background thread, in the order the hooks submit them: the same on every
rank, because every rank runs the same graph (every trainable parameter must get a gradient in each
backward, as a Transformer's do).

Pipeline stages (keep_outer=True). A stage runs one forward and one backward per micro-batch, interleaved under
1F1B, and every one of them gathers each block as it goes: a block is gathered for micro-batch k's forward, freed,
gathered again for its backward, and its gradients reduce-scattered after each micro-batch's backward (summed
into the slices). Gathering once per step instead would keep the stage's every block materialised from the first
forward to the last backward: no saving over holding the stage whole. The per-micro-batch choice keeps ZeRO-3's
memory (two blocks at once) at the cost of m times the communication: per step and block 2m all-gathers and m
reduce-scatters of its parameters, against 2 and 1 without a pipeline (DeepSpeed avoids this by allowing only
ZeRO-1 with pipelines). The outer unit (embeddings, head) stays materialised from the step's first forward to
its step: 1F1B runs a micro-batch's forward between another's forward and backward, which still needs it.

State (zero3_state.py). A checkpoint holds full tensors: full_state_dict() and state_dict(rank0_only=True) make
them one parameter at a time onto rank 0 (no block is gathered for it); load_full_state_dict() and
load_state_dict() copy this rank's slices out of full tensors (a memory-mapped checkpoint is read only there).
"""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import flashlm.dist as fd
from flashlm.parallel.zero3_state import Zero3State, owned_parts


class WorldGroup:
    """flashlm.dist's world (or one process) as a group: what Zero3 and ShardedOptimizer ask of one (rank,
    size, all_gather, reduce_scatter, broadcast), as a mesh's Group (flashlm.parallel.mesh) answers it too."""

    name = "world"

    def __init__(self):
        initialized = fd.is_initialized()
        self.rank = fd.get_rank() if initialized else 0
        self.size = fd.get_world_size() if initialized else 1

    def all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        return fd.all_gather(shard)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return fd.broadcast(tensor, src)

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return fd.reduce_scatter(tensor, op)


class _Segment:
    """The parameters of one param group inside a unit: offsets in the padded segment, this rank's slice."""

    def __init__(self, group, params, world_size, start):
        self.group, self.params = group, params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.padded = -(-n // world_size) * world_size
        self.slice = self.padded // world_size  # elements per rank
        self.start = start  # in the unit's full buffer
        self.shard_start = 0  # in the unit's shard (set by _Unit)
        self.shard = None  # this rank's master values (the tensor the inner optimizer steps)
        self.grad_sum = None  # this rank's averaged gradient slice, summed over the step's backward passes


class _Unit:
    """One block (or the outer parameters): its segments, its full buffer while materialised."""

    def __init__(self, module, segments, dtype, device):
        self.module, self.segments = module, segments  # module: the block (None for the outer unit)
        self.params = [p for s in segments for p in s.params]
        self.numel = sum(s.padded for s in segments)
        self.shard_numel = 0
        for s in segments:
            s.shard_start = self.shard_numel
            self.shard_numel += s.slice
        # empty, not zeros: its pages are first written by a gather, so building every unit's buffer (freed at
        # once) costs no resident memory, where zeros would hold the whole model for a moment
        self.full = torch.empty(self.numel, dtype=dtype, device=device)
        self.views = [self.full[s.start + o:s.start + o + p.numel()].view_as(p)
                      for s in segments for p, o in zip(s.params, s.offsets)]
        self.ready = True  # the full buffer holds the parameters' values
        self.future = None  # a pending all-gather
        self.arrived = set()  # parameters whose gradient came in this backward


class Zero3(Zero3State):
    """The ZeRO-3 side of DataParallel; the same methods as its stage 0..2 counterparts."""

    sharded = True

    def __init__(self, model, groups, make_optimizer, group, separate=(), keep_outer: bool = False, init=None,
                 device=None):
        """init: the InitRecord of a model built on the meta device (flashlm.parallel.materialize), whose replay
        fills this rank's slices one full tensor at a time (no rank holds the model); device: then where the
        shards go (default: the CPU)."""
        self.shard_group = group  # the ranks the parameters are sharded over (WorldGroup, or a mesh's dp group)
        self.rank, self.world_size = group.rank, group.size
        self.keep_outer = keep_outer  # the outer unit stays from the first forward to the step (pipelines)
        separate = {id(p) for p in separate}
        self.groups = [g["params"] for g in groups]
        group_of = {id(p): gi for gi, params in enumerate(self.groups) for p in params}
        p0 = self.groups[0][0] if self.groups[0] else next(p for ps in self.groups for p in ps)
        dtype, device = p0.dtype, (p0.device if init is None else torch.device(device or "cpu"))
        blocks = getattr(model, "blocks", None)
        blocks = list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []
        claimed, parts = set(), []
        for i, block in enumerate(blocks):
            params = [p for p in block.parameters() if id(p) in group_of]
            for p in params:
                if id(p) in claimed:
                    raise ValueError(f"model: a parameter of shape {tuple(p.shape)} is shared between blocks; "
                                     f"ZeRO-3 gathers each block's parameters on their own")
                claimed.add(id(p))
            parts.append((block, params))
        outer = [p for p in model.parameters() if id(p) in group_of and id(p) not in claimed]
        parts.append((None, outer))
        self.units = []  # the blocks with trainable parameters in model order, then the outer unit
        for module, params in parts:
            segments, start = [], 0
            for gi in range(len(self.groups)):
                ps = [p for p in params if group_of[id(p)] == gi]
                alone = [[p] for p in ps if id(p) in separate]
                for chunk in alone + [[p for p in ps if id(p) not in separate]]:
                    if chunk:
                        segments.append(_Segment(gi, chunk, self.world_size, start))
                        start += segments[-1].padded
            if segments:
                self.units.append(_Unit(module, segments, dtype, device))
        self.outer = self.units[-1] if outer else None
        self.blocks = [u for u in self.units if u is not self.outer]
        self._unit_of = {p: u for u in self.units for p in u.params}
        self._shape = {p: p.shape for u in self.units for p in u.params}  # p itself is empty while freed
        self.segments = [s for u in self.units for s in u.segments]
        if init is None:
            self._shard_from_params()
        else:
            self._shard_from_init(model, init)

        self._lock = threading.Lock()
        self.materialized_bytes = 0
        self.peak_materialized_bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlm-zero3")
        self._pending = []  # reduce-scatters not yet waited for
        self._in_backward = False
        self._pinned = False  # inside full_parameters(): everything stays materialised
        for u in self.units:
            self._free(u, count=False)
        self._hooks = [model.register_forward_pre_hook(self._before_model),
                       model.register_forward_hook(self._after_model)]
        for i, unit in enumerate(self.blocks):
            self._hooks.append(unit.module.register_forward_pre_hook(lambda m, a, i=i: self._before_block(i)))
            self._hooks.append(unit.module.register_forward_hook(lambda m, a, out, i=i: self._after_block(i, out)))
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for u in self.units for p in u.params]

        inner = []
        for gi, g in enumerate(groups):
            shards = [s.shard for s in self.segments if s.group == gi]
            inner.append({**{k: v for k, v in g.items() if k != "params"},
                          "params": shards or [torch.zeros(0, dtype=dtype, device=device)]})
        self._inner_params = [p for g in inner for p in g["params"]]
        self.optimizer = make_optimizer(inner)

    # ---- materialising --------------------------------------------------------------------------------

    @torch.no_grad()
    def _shard_from_init(self, model, init) -> None:
        """Each segment's shard takes this rank's slice of the initial values that init's replay makes one
        parameter at a time; the meta parameters become empty tensors of the shards' device (as _free leaves
        them)."""
        name_of = {id(p): n for n, p in model.named_parameters()}
        where = {name_of[id(p)]: (s, o) for s in self.segments for p, o in zip(s.params, s.offsets)}
        u0 = self.units[0].full
        for s in self.segments:
            s.shard = torch.zeros(s.slice, dtype=u0.dtype, device=u0.device)

        def take(name, value):
            if name in where:
                s, o = where[name]
                lo = self.rank * s.slice
                for _, first, count, pos in owned_parts([value.numel()], [o], lo, lo + s.slice):
                    s.shard[pos:pos + count].copy_(value.reshape(-1)[first:first + count])

        init.replay(take)
        for u in self.units:
            for p in u.params:
                if p.is_meta:
                    torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(0, dtype=u0.dtype, device=u0.device),
                                                                   requires_grad=p.requires_grad))

    @torch.no_grad()
    def _shard_from_params(self) -> None:
        """Each segment's shard takes this rank's slice of the parameters' current values."""
        for u in self.units:
            for s in u.segments:
                flat = torch.zeros(s.padded, dtype=u.full.dtype, device=u.full.device)
                for p, o in zip(s.params, s.offsets):
                    flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                s.shard = flat[self.rank * s.slice:(self.rank + 1) * s.slice].clone()

    def _count(self, delta: int) -> None:
        with self._lock:
            self.materialized_bytes += delta
            self.peak_materialized_bytes = max(self.peak_materialized_bytes, self.materialized_bytes)

    @torch.no_grad()
    def _gather_into(self, u: _Unit) -> None:
        """(Background thread.) Every rank's slices of unit u into its full buffer."""
        shard = torch.cat([s.shard for s in u.segments])
        gathered = (shard if self.world_size == 1 else self.shard_group.all_gather(shard)).view(self.world_size, -1)
        u.full.untyped_storage().resize_(u.numel * u.full.element_size())
        self._count(u.numel * u.full.element_size())
        for s in u.segments:
            u.full[s.start:s.start + s.padded].copy_(gathered[:, s.shard_start:s.shard_start + s.slice].reshape(-1))

    def _fetch(self, u: _Unit) -> None:
        """Starts gathering u unless it is materialised or on its way."""
        if not u.ready and u.future is None:
            u.future = self._executor.submit(self._gather_into, u)

    def _wait(self, u: _Unit) -> None:
        """Unit u materialised, its parameters pointing into its full buffer."""
        self._fetch(u)
        if u.future is not None:
            future, u.future = u.future, None
            future.result()
            for p, v in zip(u.params, u.views):
                p.data = v
            u.ready = True

    def _free(self, u: _Unit, count: bool = True) -> None:
        if not u.ready:
            return
        for p in u.params:
            p.data = torch.empty(0, dtype=u.full.dtype, device=u.full.device)
        u.full.untyped_storage().resize_(0)
        u.ready = False
        if count:
            self._count(-u.numel * u.full.element_size())

    def _sync(self) -> None:
        """Waits for every collective submitted so far (their errors surface here)."""
        pending, self._pending = self._pending, []
        for u in self.units:
            if u.future is not None:
                self._wait(u)
        for f in pending:
            f.result()

    # ---- hooks ----------------------------------------------------------------------------------------

    def _before_model(self, module, args):
        if self._pinned:
            return
        self._in_backward = False
        if self.outer is not None:
            self._wait(self.outer)
        if self.blocks:
            self._fetch(self.blocks[0])

    def _after_model(self, module, args, output):
        if not self._pinned and not torch.is_grad_enabled() and self.outer is not None:
            self._free(self.outer)  # no backward will need it

    def _before_block(self, i: int):
        if self._pinned:
            return
        self._wait(self.blocks[i])
        if not self._in_backward and i + 1 < len(self.blocks):
            self._fetch(self.blocks[i + 1])

    def _after_block(self, i: int, output):
        if self._pinned or self._in_backward:  # a recomputation for backward: the hooks there free it
            return
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(lambda grad, i=i: self._before_block_backward(i))
        self._free(self.blocks[i])

    def _before_block_backward(self, i: int):
        self._in_backward = True
        self._wait(self.blocks[i])
        if i > 0:
            self._fetch(self.blocks[i - 1])

    def _on_grad(self, p: torch.Tensor) -> None:
        u = self._unit_of[p]
        u.arrived.add(p)
        if len(u.arrived) == len(u.params):
            self._reduce(u)

    @torch.no_grad()
    def _reduce(self, u: _Unit) -> None:
        """Starts the reduce-scatter of unit u's gradients (zeros where none came) and frees the unit."""
        flat = torch.zeros(self.world_size, u.shard_numel, dtype=u.full.dtype, device=u.full.device)
        for s in u.segments:
            padded = torch.zeros(s.padded, dtype=flat.dtype, device=flat.device)
            for p, o in zip(s.params, s.offsets):
                if p.grad is not None:
                    padded[o:o + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
            flat[:, s.shard_start:s.shard_start + s.slice].copy_(padded.view(self.world_size, s.slice))
        u.arrived.clear()
        self._pending.append(self._executor.submit(self._reduce_into, u, flat.view(-1)))
        if not self._pinned and not (self.keep_outer and u is self.outer):
            self._free(u)

    def _reduce_into(self, u: _Unit, flat: torch.Tensor) -> None:
        """(Background thread.) This rank's slice of the mean over ranks, added to the segments' sums."""
        mine = flat if self.world_size == 1 else self.shard_group.reduce_scatter(flat, "avg")
        for s in u.segments:
            part = mine[s.shard_start:s.shard_start + s.slice]
            if s.grad_sum is None:
                s.grad_sum = part.clone()
            else:
                s.grad_sum.add_(part)

    # ---- the DataParallel interface ---------------------------------------------------------------------

    def no_sync(self):
        return contextlib.nullcontext()  # every backward reduces into the sharded sums

    def finish_gradients(self) -> None:
        for u in self.units:  # units some of whose parameters got no gradient: the rest count as zero
            if u.arrived:
                self._reduce(u)
        self._sync()
        for s in self.segments:
            s.shard.grad = s.grad_sum if s.grad_sum is not None else torch.zeros_like(s.shard)
            s.grad_sum = None

    def grads(self):
        return [s.shard.grad for s in self.segments if s.shard.grad is not None]

    def stepped_params(self):
        return [s.shard for s in self.segments]

    def owned_grads(self) -> list:
        """(parameter, the part of its gradient in this rank's slices, flat) for every part a rank holds: each
        element on exactly one rank of the group (the padding on none), for norms summed over the group."""
        out = []
        for s in self.segments:
            if s.shard.grad is not None:
                numels = [self._shape[p].numel() for p in s.params]
                for i, _, count, pos in owned_parts(numels, s.offsets, self.rank * s.slice, (self.rank + 1) * s.slice):
                    out.append((s.params[i], s.shard.grad[pos:pos + count]))
        return out

    def separate_grad(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the gradient of a parameter given in `separate` (after finish_gradients)."""
        return next(s.shard.grad for s in self.segments if len(s.params) == 1 and s.params[0] is p)

    def zero_grad(self) -> None:
        for u in self.units:
            for p in u.params:
                p.grad = None
        for s in self.segments:
            s.shard.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self._sync()
        for u in self.units:  # stale once the shards move; the next forward gathers the new values
            self._free(u)
        self.optimizer.step()

    @contextlib.contextmanager
    def full_parameters(self):
        """Every unit materialised (collective); on exit the shards take this rank's slices of the values
        (which the caller may have changed, the same on every rank) and the units are freed."""
        self._sync()
        for u in self.units:
            self._wait(u)
        self._pinned = True
        try:
            yield
        finally:
            self._pinned = False
            with torch.no_grad():
                for u in self.units:
                    for s in u.segments:
                        mine = u.full[s.start + self.rank * s.slice:s.start + (self.rank + 1) * s.slice]
                        s.shard.copy_(mine)
                    self._free(u)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._executor.shutdown(wait=True)
