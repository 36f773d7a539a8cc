"""Model parallelism in the trainer: `flashlm train --dp --tp --pp --cp` over parallel/'s mesh.

    sizes = layout_sizes(cfg, world_size)       # before any process group: the product is the world size
    check_layout(cfg, cfg.model_config(), sizes)  # heads, layers, batch and sequence fit the layout
    model, init = deferred_init(lambda: Transformer(model_cfg))  # on the meta device: no storage
    mp = ModelParallel(model, cfg, sizes, make_optimizer, init=init)  # this rank's part, with its values
    loss = mp.forward_backward(idx, targets, loss_scale, autocast)   # per micro-step; adds to the gradients
    mp.finish_gradients(); scaler.step(mp, grad_clip); mp.zero_grad()

ModelParallel answers what the trainer asks of DataParallel (param_groups, no_sync, finish_gradients,
unscale_, found_inf, clip_grad_norm_, step, zero_grad, state_dict, full_parameters, close), so the loop, the loss
scaler and the checkpoints are the trainer's own. Each rank holds its part of the model: tensor parallelism
slices every layer (parallel/tensor.py, sequence parallelism optional), pipeline parallelism keeps the stage's
layers (parallel/pipeline.py, GPipe or 1F1B over micro-batches), context parallelism the rank's tokens of each
sequence (parallel/context_model.py); data parallelism averages the gradients of the replicas over the dp group.

Without a pipeline or cp, the dp reduction overlaps backward as DataParallel's does: the gradients are packed into
buckets of bucket_mb MB (in reverse model order, as backward produces them) and each bucket's all-reduce (ZeRO 1/2:
reduce-scatter) starts from the gradient hooks on a background thread as soon as backward has completed it, while
autograd computes the rest; the trainer's accumulation micro-steps before the last run under no_sync(). The sums are
those of the same buckets reduced after backward: bit-equal for dp 2 (two addends), and for ZeRO the same buckets as
before. A pipeline stage runs one backward per micro-batch and its tied embedding's gradient is complete only
after the stages' sum, and cp's shares are summed over cp before dp: there everything is reduced in
finish_gradients.

Context parallelism composes with the others. With tp, each tp rank runs ring attention on its own heads over
the cp ranks of its tp coordinate. With pp, every stage holds the same cp slice of each sequence (the pipeline's
messages are [micro-batch, slice, d_model] and travel between the stages of one (dp, cp, tp) coordinate). The
loss of each rank is its share of the mean over all the batch's tokens (its token losses' sum over the count of
every cp rank's targets), so the shares add up to the mean; the cp ranks' gradients (each its tokens' share of
the whole) are summed over cp, then averaged over dp. Every cp rank then holds the same gradients, so the clip
norm is summed over tp and pp only: each element counted once. Sequence
parallelism is refused with --cp (its T / tp positions would have to divide each rank's ragged slice).

Start-up and checkpoints hold no full model. The trainer builds the Transformer on the meta device
(flashlm.parallel.materialize.deferred_init) and each rank makes the initial values of the parameters it holds
only, replaying the initialisation's draws one full tensor at a time: the values of the full model built with
the same seed, to the bit. Checkpoints are layout-free: full_state_dict() gathers the full tensors one at a time
onto rank 0 (tp slices all-gathered, each pipeline stage's broadcast from it) and load_full_state_dict() has
every rank take its part of them, so a checkpoint written at one layout loads at any other
(parallel_state.py). The optimizer state travels the same way, in the format of a plain optimizer over the full
model's param groups (DataParallel's, so ZeRO runs read it).
Clipping uses the norm over all shards: the squares of split tensors summed over tp, a replicated tensor counted
once, the stages' sums added, the tied embedding counted on the first stage only.

ZeRO (--zero-stage) shards over the mesh's dp group what each rank holds (its tp shard of its stage's layers), with
the trainer's optimizer inside flashlm.train.zero's ShardedOptimizer (1, 2) or flashlm.parallel.zero3's Zero3 (3):
  - 1 and 2: under pp or cp the gradients are whole until finish_gradients, which sums the tied embedding's
    between the stages and the sequence shares' over cp, then reduce-scatters them over dp (stage 2 drops the whole
    ones as each bucket is packed); otherwise each bucket is reduce-scattered from the hooks during backward. The
    optimizer steps this rank's slices and the new values are all-gathered over dp.
  - 3: the parameters too; each block is gathered over dp before each micro-batch's forward and backward and its
    gradients reduce-scattered after each micro-batch's backward (zero3.py says why and what it costs). The tied
    embedding has its own segment, so the first and last stages' slices are the same elements: their gradient
    slices are summed between the stages as the whole gradients are without ZeRO.
  The clip norm sums the squares of the parts each rank owns over dp (each element owned once), then over tp and
  pp as above. Checkpoints stay layout-free: full_parameters() gathers the dp slices first.

On GPUs (each rank on cuda:LOCAL_RANK) the groups move CUDA tensors over NCCL rings of their own and the pipeline's
links are NCCL rings too (parallel/cuda_mesh.py); the ranks' devices are compared before any group is made (all on
the CPU or all on GPUs of their own, with the NCCL transport at hand), so that a misplaced rank is refused by name
on every rank rather than left waiting for the others.

Not covered (each refused by name before any group is made): sequence parallelism with context parallelism;
l1, qat and sparsity masks.
"""

import contextlib
from typing import Callable

import torch

import flashlm.dist as fd
from flashlm.dist.grad_sync import GradientSync
from flashlm.models import Transformer
from flashlm.parallel import Mesh, check_sizes, check_tensor_parallel, shard_model
from flashlm.parallel.context import SequenceLayout, shard_sequence
from flashlm.parallel.context_model import ContextParallelTransformer, ContextShard, sum_gradients
from flashlm.parallel.cuda_mesh import check_mesh_devices, cuda_index, nccl_connect
from flashlm.parallel.materialize import InitRecord, materialize_part, start_part
from flashlm.parallel.pipeline import Pipeline, PipelinePlan, PipelineStage, shm_stage_links, stage_links
from flashlm.parallel.zero3 import Zero3
from flashlm.train.parallel_state import FullState
from flashlm.train.zero import ShardedOptimizer

BUCKET_MB = 25.0  # the dp reduction's gradient buckets: DataParallel's default


class GroupGradientSync(GradientSync):
    """GradientSync (DDP's buckets, all-reduced from the gradient hooks on a background thread) over a mesh's dp
    group instead of the world."""

    def __init__(self, params: list, group, bucket_mb: float):
        self.group = group
        super().__init__(params, bucket_mb, "avg")

    def _launch(self, b) -> None:
        b.launched = True
        b.future = self._executor.submit(self.group.all_reduce, b.flat, "avg")


def layout_sizes(cfg, world_size: int) -> dict:
    """The mesh sizes {dp, tp, pp, cp} of a run: cfg's, dp None meaning the world over tp * pp * cp ranks.
    ValueError naming the flags unless their product is the world size."""
    rest = cfg.tp * cfg.pp * cfg.cp
    dp = cfg.dp
    if dp is None:
        if world_size % rest:
            raise ValueError(f"--tp/--pp/--cp: --tp {cfg.tp} x --pp {cfg.pp} x --cp {cfg.cp} = {rest} ranks do not "
                             f"divide the world of {world_size}")
        dp = world_size // rest
    return check_sizes(world_size, dp=dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp)


def is_model_parallel(sizes: dict) -> bool:
    return sizes["tp"] * sizes["pp"] * sizes["cp"] > 1


def check_layout(cfg, model_cfg, sizes: dict) -> None:
    """ValueError / NotImplementedError (naming the flag) unless the model and the batches fit the layout."""
    tp, pp, cp = sizes["tp"], sizes["pp"], sizes["cp"]
    if not is_model_parallel(sizes):
        return
    if cp > 1 and cfg.sequence_parallel:
        raise NotImplementedError("--sequence-parallel: not with --cp (the positions of a context-parallel slice "
                                  "are not split over tp)")
    if tp > 1:
        check_tensor_parallel(model_cfg, tp)
        if cfg.sequence_parallel and cfg.seq_len % tp:
            raise ValueError(f"--sequence-parallel: seq_len {cfg.seq_len} does not divide by tp {tp}")
    if pp > 1:
        try:
            PipelinePlan(model_cfg.n_layer, pp, cfg.batch_size, cfg.micro_batches, cfg.seq_len, cfg.pp_schedule)
        except ValueError as e:  # the plan's names are its own: say which flag
            raise ValueError(f"--pp: {e}") from e
    if cp > 1:
        if model_cfg.gemma or model_cfg.sliding_window is not None:  # check_context_parallel's rule, on the config
            raise NotImplementedError(f"--cp: context parallelism does not cover {model_cfg.arch}'s sliding windows "
                                      "and soft-capped scores")
        try:
            SequenceLayout(cfg.seq_len, cp)
        except ValueError as e:
            raise ValueError(f"--cp: {e}") from e


class ModelParallel(FullState):
    """This rank's part of `model` (a full Transformer, the same on every rank) on a dp x pp x cp x tp mesh,
    with its optimizer (`make_optimizer(param_groups)`) over the parameters it holds.

    `model` built on the meta device (flashlm.parallel.materialize.deferred_init, `init` its record): no rank
    holds it; each makes the values of the parameters it holds, those of the model with the same seed, to the
    bit (start_part), and checkpoints go through full_state_dict / load_full_state_dict (parallel_state.py).
    `device`: where the part goes (default: the model's, the CPU for a meta one). A `model` with its values (init
    None) stays the full model: full_parameters() fills it."""

    def __init__(self, model: Transformer, cfg, sizes: dict, make_optimizer: Callable, timeout: float = 60.0,
                 overlap: bool = True, bucket_mb: float = BUCKET_MB, init: InitRecord = None, device=None):
        check_layout(cfg, model.cfg, sizes)
        self.deferred = init is not None
        if device is None:
            device = torch.device("cpu") if self.deferred else next(model.parameters()).device
        device = torch.device(device)
        # Before any group, on every rank alike, so that every rank says it rather than waiting on another.
        check_mesh_devices(device)
        self.full, self.device = model, device
        self.mesh = mesh = Mesh(**sizes, timeout=timeout)
        part_init = None
        if self.deferred:  # the tp part (its own draws recorded) or the meta model with its tables
            self.part, part_init = start_part(model, mesh.tp, cfg.sequence_parallel, device)
        else:
            self.part = shard_model(model, mesh.tp, cfg.sequence_parallel) if mesh.tp.size > 1 else model
        self.stage = self.pipe = self.context = self.layout = None
        held = self.part
        shard, seq_len = None, cfg.seq_len
        if mesh.cp.size > 1:  # this rank's slice of every sequence
            self.layout = SequenceLayout(cfg.seq_len, mesh.cp.size)
            shard = ContextShard(mesh.cp.ring_on(device), self.layout)
            seq_len = shard.local_len
        if mesh.pp.size > 1:
            self.plan = PipelinePlan(model.cfg.n_layer, mesh.pp.size, cfg.batch_size, cfg.micro_batches, seq_len,
                                     cfg.pp_schedule)
            self.stage = held = PipelineStage(self.part, mesh.pp.rank, self.plan, context=shard)
            if self.deferred:  # the stage's values, before the pipeline reads their device
                self._start_values(held, init, part_init)
            # The first rank of the pp group names its links: one pipeline per (dp, cp, tp) coordinate.
            job = f"{mesh.job}-pipe{mesh.pp.ranks[0]}"
            if device.type == "cuda":
                links = stage_links(mesh.pp.rank, self.plan, model.cfg.tie_embeddings,
                                    nccl_connect(job, cuda_index(device), timeout))
            else:
                links = shm_stage_links(job, mesh.pp.rank, self.plan, tied=model.cfg.tie_embeddings, timeout=timeout)
            self.pipe = Pipeline(self.stage, links, self.plan)
        elif shard is not None:
            self.context = ContextParallelTransformer(self.part, mesh.cp.ring_on(device))
        if self.deferred and self.stage is None:  # the values of what this rank holds, before anything hooks on
            self._start_values(held, init, part_init)
        # The parameters this rank trains, by their full model's names.
        name_of = {id(p): n for n, p in self.part.named_parameters()}
        self.params = {name_of[id(p)]: p for p in held.parameters() if p.requires_grad}
        self._names = {id(p): n for n, p in self.params.items()}
        tied = self.stage.tied_weight() if self.stage is not None and self.stage.last else None
        self._tied_copy = None if tied is None or self.stage.first else name_of[id(tied)]  # counted on stage 0
        self.tp_dims = getattr(self.part, "tp_dims", {n: None for n in name_of.values()})
        mine = {id(p) for p in self.params.values()}
        self.groups = [{**g, "params": [p for p in g["params"] if id(p) in mine]}
                       for g in self.part.param_groups(cfg.weight_decay)]
        # ZeRO-3 empties the parameters between uses (the full model's own too, where a stage holds them)
        self._shapes = {n: p.shape for n, p in self.params.items()}
        self._full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self._full_group_names = self._full_names()  # before ZeRO-3 empties them: param_groups() sorts by dimension
        # The dp reduction overlapped with backward where a backward is a whole micro-step's and its gradients are
        # complete when it ends (see the module's docstring): not under a pipeline nor under cp.
        self.overlap = overlap and mesh.dp.size > 1 and self.pipe is None and self.layout is None
        self.bucket_mb = bucket_mb
        self.zero = self._sharded(cfg.zero_stage, held, make_optimizer) if cfg.zero_stage else None
        self.sync = None  # without ZeRO: the buckets' all-reduces over dp, launched from the gradient hooks
        if self.overlap and self.zero is None:
            self.sync = GroupGradientSync(list(self.params.values()), mesh.dp, bucket_mb)
        self.optimizer = self.zero.optimizer if self.zero is not None else make_optimizer(self.groups)
        self._stepper = self.zero if self.zero is not None else self.optimizer  # step, state_dict, load_state_dict

    def _start_values(self, held: torch.nn.Module, init: InitRecord, part_init) -> None:
        """The parameters of `held` take their initial values (materialize_part); the rest of the model stays
        without storage."""
        name_of = {id(p): n for n, p in self.part.named_parameters()}
        materialize_part(self.part, init, {name_of[id(p)] for p in held.parameters()}, part_init, self.device)

    def _sharded(self, stage: int, held: torch.nn.Module, make_optimizer: Callable):
        """ZeRO `stage` over the dp group for the parameters this rank holds: ShardedOptimizer or Zero3, holding
        the optimizer."""
        if stage < 3:
            ordered = [p for p in held.parameters() if id(p) in self._names]
            return ShardedOptimizer(self.groups, ordered, make_optimizer, stage, self.bucket_mb, self.mesh.dp,
                                    reduce_in_backward=self.overlap)
        table = self.stage.tied_weight() if self.stage is not None else None  # on the first and last stage
        # Without a pipeline, cp runs the Transformer's pieces through ContextParallelTransformer (the model's own
        # forward never runs): the wrapper's hooks gather the outer unit and its `blocks` are the model's, each a
        # unit gathered around its own forward and backward, as a pipeline stage's blocks are.
        return Zero3(held if self.context is None else self.context, self.groups, make_optimizer, self.mesh.dp,
                     separate=[table] if table is not None else [], keep_outer=self.pipe is not None)

    # ---- One step (the trainer's loop) -----------------------------------------------------------------

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def no_sync(self):
        """Micro-steps inside accumulate gradients locally; the backward after them launches the dp reduction (when
        it overlaps backward; otherwise everything is reduced in finish_gradients and this changes nothing)."""
        if self.sync is not None:
            return self.sync.no_sync()
        return self.zero.no_sync() if self.zero is not None else contextlib.nullcontext()

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor, loss_scale: float,
                         autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """One micro-step of this dp rank's batch (int64 [batch_size, seq_len], the same on every rank of its
        replica): gradients of loss * loss_scale added. Returns the batch's mean loss, on every rank."""
        mesh = self.mesh
        if self.layout is not None:
            idx, targets = (shard_sequence(t, self.layout, mesh.cp.rank) for t in (idx, targets))
        if self.pipe is not None:
            with autocast():
                loss = self.pipe.forward_backward(idx if self.stage.first else None,
                                                  targets if self.stage.last else None, loss_scale)
            loss = mesh.pp.all_reduce(torch.tensor([loss or 0.0]))[0]  # the last stage's; 0 elsewhere
        else:
            with autocast():
                if self.context is not None:
                    _, loss = self.context(idx, targets, self.layout)
                else:
                    _, loss = self.part(idx, targets)
            (loss * loss_scale).backward()
            loss = loss.detach().float()
        return self._sum_shares(loss)

    def _sum_shares(self, loss: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss from this cp rank's share of it (the shares' sum over cp)."""
        if self.layout is None:
            return loss
        return self.mesh.cp.all_reduce(loss.float().reshape(1))[0]

    @torch.no_grad()
    def evaluate_loss(self, idx: torch.Tensor, targets: torch.Tensor, autocast: Callable) -> torch.Tensor:
        """The mean loss of one batch (as forward_backward's), without gradients."""
        if self.layout is not None:
            idx, targets = (shard_sequence(t, self.layout, self.mesh.cp.rank) for t in (idx, targets))
        with autocast():
            if self.pipe is not None:
                loss = self.pipe.forward_only(idx if self.stage.first else None, targets if self.stage.last else None)
                loss = self.mesh.pp.all_reduce(torch.tensor([loss or 0.0]))[0]
            elif self.context is not None:
                loss = self.context(idx, targets, self.layout)[1]
            else:
                loss = self.part(idx, targets)[1]
        return self._sum_shares(loss.float())

    def finish_gradients(self) -> None:
        """The step's gradients: the tied embedding's summed between the first and last stage, the sequence
        shares' summed over cp, the replicas' averaged over dp (with ZeRO, reduce-scattered: this rank's slices)."""
        if isinstance(self.zero, Zero3):  # the gradients are already this rank's dp slices, summed over micro-steps
            self.zero.finish_gradients()
            if self.pipe is not None and self.stage.tied_weight() is not None:
                self.pipe.links.tied.allreduce(self.zero.separate_grad(self.stage.tied_weight()), "sum")
            if self.mesh.cp.size > 1:  # every cp rank holds the same slices of the same part
                for g in self.zero.grads():
                    self.mesh.cp.all_reduce(g)
            return
        if self.pipe is not None:
            self.pipe.finish_gradients()
        if self.layout is not None:  # the stage's parameters only (under pp the others are not held)
            sum_gradients(list(self.params.values()), self.mesh.cp)
        if self.zero is not None:
            self.zero.finish_gradients()
        elif self.sync is not None:
            self.sync.wait()
        elif self.mesh.dp.size > 1:
            params = list(self.params.values())
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
                              for p in params])
            self.mesh.dp.all_reduce(flat, "avg")
            start = 0
            for p in params:
                p.grad = flat[start:start + p.numel()].view_as(p).to(p.dtype).clone()
                start += p.numel()

    def _grads(self) -> list:
        if self.zero is not None:
            return self.zero.grads()
        return [p.grad for p in self.params.values() if p.grad is not None]

    def unscale_(self, inv_scale: float) -> None:
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, float(inv_scale))

    def found_inf(self) -> bool:
        """True when any rank's gradients hold inf or NaN (the same answer on every rank)."""
        local = any(not bool(g.isfinite().all()) for g in self._grads())
        flag = torch.tensor([1.0 if local else 0.0])
        fd.all_reduce(flag, "sum")
        return bool(flag.item() > 0)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The L2 norm of the full model's gradient (every rank's shares; see the module's docstring); when
        max_norm > 0 the gradients are scaled by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_."""
        if self.zero is not None:  # the parts of the gradients this rank owns of its dp group's
            pieces = [(self._names[id(p)], g) for p, g in self.zero.owned_grads()]
        else:
            pieces = [(name, p.grad) for name, p in self.params.items() if p.grad is not None]
        squares = torch.zeros(2, device=self.device)  # split over tp, whole on every tp rank (the grads' device)
        for name, g in pieces:
            if name != self._tied_copy:
                squares[0 if self.tp_dims[name] is not None else 1] += g.detach().float().square().sum()
        if self.zero is not None:
            self.mesh.dp.all_reduce(squares)
        split, whole = squares[:1], squares[1:]
        squared = self.mesh.tp.all_reduce(split) + whole
        total = self.mesh.pp.all_reduce(squared).sqrt().reshape(())
        if max_norm > 0:
            stepped = self.zero.stepped_params() if self.zero is not None else list(self.params.values())
            torch.nn.utils.clip_grads_with_norm_(stepped, max_norm, total)
        return float(total)

    def step(self) -> None:
        self._stepper.step()

    def zero_grad(self) -> None:
        if self.zero is not None:
            self.zero.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.zero is not None:
            self.zero.close()  # its hooks and background thread; the rings close with the process
        if self.sync is not None:
            self.sync.remove()
