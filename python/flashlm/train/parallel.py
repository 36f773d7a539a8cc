"""Data parallelism for the trainer: gradients averaged over ranks (flashlm.dist), optionally with the
optimizer state (ZeRO-1), the optimizer state and the gradients (ZeRO-2), or those and the parameters
(ZeRO-3) sharded over ranks.

    dp = DataParallel(model, lambda groups: AdamW(groups, lr=3e-4), zero_stage=1,
                      param_groups=model.param_groups(0.1))
    for micro in range(accum_steps):
        with dp.no_sync() if micro < accum_steps - 1 else contextlib.nullcontext():
            model(x, y)[1].div(accum_steps).backward()
    dp.finish_gradients()            # gradients averaged over ranks
    dp.unscale_(1 / scale); bad = dp.found_inf(); norm = dp.clip_grad_norm_(1.0)
    for g in dp.param_groups: g["lr"] = lr
    dp.step(); dp.zero_grad()

Without flashlm.dist.init() (one process) there is no communication: stage 0 is then exactly the plain
optimizer. Stage 0 keeps a full optimizer on every rank and averages gradients with GradientSync, bucket by
bucket while backward runs. Stages 1 and 2 are in flashlm.train.zero, stage 3 in flashlm.parallel.zero3:
there the model's parameters hold values only inside its forward and backward, so read or write them inside
`with dp.full_parameters():` (a no-op for the other stages). Every method that communicates is collective:
all ranks call it in the same order.
"""

import contextlib
import math
from typing import Callable, List, Optional

import torch

import flashlm.dist as fd


class DataParallel:
    """`make_optimizer(param_groups) -> torch.optim.Optimizer` builds the optimizer: on the model's
    parameters for stage 0, on flat per-rank shards (one tensor per group for stages 1 and 2, per block and
    group for stage 3), so it must take any float tensor (flashlm's AdamW and torch's optimizers do). `param_groups`: the groups to
    optimize, as from model.param_groups(weight_decay) (default: every trainable parameter of `model` in one
    group); parameters that do not require grad are left out. `bucket_mb`: the size of the gradient buckets
    reduced together. `init` (ZeRO-3 only): the InitRecord of a model built on the meta device
    (flashlm.parallel.materialize.deferred_init); each rank then makes only its shards of the initial values, on
    `device`, and no rank holds the whole model until full_parameters()."""

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable, zero_stage: int = 0,
                 bucket_mb: float = 25.0, *, param_groups: Optional[list] = None, init=None, device=None):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_optimizer):
            raise ValueError("make_optimizer: must be callable (param_groups -> torch.optim.Optimizer)")
        if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage!r}")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not 0 < bucket_mb < math.inf:
            raise ValueError(f"bucket_mb: must be a number > 0, got {bucket_mb!r}")
        groups = _checked_groups(model, param_groups)
        kinds = {(p.device, p.dtype) for g in groups for p in g["params"]}
        if zero_stage > 0 and len(kinds) > 1:
            raise ValueError(f"{'model' if param_groups is None else 'param_groups'}: ZeRO needs every parameter on "
                             f"one device with one dtype, got {sorted(str(k) for k in kinds)}")
        self.zero_stage = zero_stage
        self._model = model
        if fd.is_initialized():
            self.rank, self.world_size = fd.get_rank(), fd.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        if init is not None and zero_stage != 3:
            raise ValueError(f"init: a model built on the meta device starts under ZeRO-3 only, got zero_stage "
                             f"{zero_stage}")
        params = [p for g in groups for p in g["params"]]
        self._param_bytes = sum(p.numel() * p.element_size() for p in params)
        if self.world_size > 1 and init is None:  # (a replay makes the same values on every rank)
            _broadcast_from_rank0(params)
        in_groups = {id(p) for p in params}
        # The model's order: backward produces gradients in its reverse, and clip_grad_norm_(model.parameters())
        # sums the norms in it.
        ordered = [p for p in model.parameters() if id(p) in in_groups]
        if zero_stage == 0:
            self._impl = _Replicated(groups, ordered, make_optimizer, bucket_mb, self.world_size)
        elif zero_stage == 3:
            from flashlm.parallel.zero3 import WorldGroup, Zero3

            self._impl = Zero3(model, groups, make_optimizer, WorldGroup(), init=init, device=device)
        else:
            from flashlm.parallel.zero3 import WorldGroup
            from flashlm.train.zero import ShardedOptimizer

            self._impl = ShardedOptimizer(groups, ordered, make_optimizer, zero_stage, bucket_mb, WorldGroup())
        # The device that carries the small collectives (the inf flag, the squared norm).
        self._device = params[0].device if init is None else torch.device(device or "cpu")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer (on the model's parameters for stage 0, on this rank's shards otherwise)."""
        return self._impl.optimizer

    @property
    def param_groups(self) -> List[dict]:
        """The inner optimizer's param groups, in the order of the groups given: set g["lr"] on each."""
        return self._impl.optimizer.param_groups

    def no_sync(self):
        """Backward passes inside accumulate gradients locally, without communication; the next backward
        outside (and finish_gradients) reduces the accumulated sum. (Stage 3 reduces every backward's
        gradients into its shards instead: no rank holds the full gradients.)"""
        return self._impl.no_sync()

    def finish_gradients(self) -> None:
        """After the last micro-step's backward: the gradients to step are now averaged over ranks."""
        self._impl.finish_gradients()

    def unscale_(self, inv_scale: float) -> None:
        """Multiplies the gradients that will be stepped by inv_scale (undoing a loss scale)."""
        grads = self._impl.grads()
        if grads:
            torch._foreach_mul_(grads, float(inv_scale))

    def found_inf(self) -> bool:
        """True when any gradient to step holds inf or NaN on any rank (the same answer on every rank)."""
        grads = self._impl.grads()
        local = False
        if grads:
            maxima = torch._foreach_norm(grads, math.inf)  # max |g|: inf or NaN exactly when g has one
            local = not bool(torch.stack([m.to(grads[0].device) for m in maxima]).isfinite().all())
        if self.world_size == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self._device)
        fd.all_reduce(flag, "sum")
        return bool(flag.item() > 0)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The L2 norm over all ranks' averaged gradients; when max_norm > 0 the gradients are scaled by
        min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does."""
        grads = self._impl.grads()
        total = torch.nn.utils.get_total_norm(grads)  # 0 without gradients
        if self._impl.sharded and self.world_size > 1:  # every rank joins, whatever it holds
            squared = total.square().reshape(1).to(self._device, torch.float32)
            fd.all_reduce(squared, "sum")
            total = squared.sqrt().reshape(())
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self._impl.stepped_params(), max_norm, total)
        return float(total)

    def step(self) -> None:
        self._impl.step()

    def full_parameters(self):
        """A context in which the model's parameters hold their full values, to read (a checkpoint, an
        evaluation on one rank) or to write (loading weights: the same values on every rank). Collective
        for stage 3, which gathers them and afterwards keeps its slice of them; a no-op otherwise."""
        impl = getattr(self._impl, "full_parameters", None)
        return impl() if impl is not None else contextlib.nullcontext()

    @property
    def materialized_bytes(self) -> int:
        """Bytes of full parameter values this rank holds now: for stage 3 the gathered units (none between
        steps), for the other stages every parameter's."""
        return self._impl.materialized_bytes if self.zero_stage == 3 else self._param_bytes

    @property
    def peak_materialized_bytes(self) -> int:
        """The most materialized_bytes has been since this DataParallel was made (or the last
        reset_peak_materialized_bytes())."""
        return self._impl.peak_materialized_bytes if self.zero_stage == 3 else self._param_bytes

    def reset_peak_materialized_bytes(self) -> None:
        if self.zero_stage == 3:
            self._impl.peak_materialized_bytes = self._impl.materialized_bytes

    def zero_grad(self) -> None:
        self._impl.zero_grad()

    def state_dict(self, rank0_only: bool = False) -> dict:
        """The full optimizer state in the format of a plain optimizer over the given param groups (as
        torch's Optimizer.state_dict: parameters numbered in group order), the same on every rank. A copy:
        later steps do not change it. rank0_only: only rank 0 gets the state (the others: the param groups
        and no state); under stage 3 no other rank then holds more than one full tensor of it at a time."""
        if self.zero_stage == 3:
            return self._impl.state_dict(rank0_only=rank0_only)
        state = self._impl.state_dict()
        return state if not rank0_only or self.rank == 0 else {**state, "state": {}}

    def full_state_dict(self) -> dict:
        """The model's state_dict, float32 on the CPU, on rank 0 ({} on the other ranks). Under stage 3 made
        whole one tensor at a time from the shards: no rank holds the model (collective)."""
        if self.zero_stage == 3:
            return self._impl.full_state_dict(self._model)
        if self.rank != 0:
            return {}
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self._model.state_dict().items()}

    def load_full_state_dict(self, full: dict) -> None:
        """The model takes `full` (a state_dict, as full_state_dict gives it; the same on every rank). Under stage
        3 each rank copies only its slices out of it (from a memory-mapped checkpoint, only their pages are
        read)."""
        if self.zero_stage == 3:
            self._impl.load_full_state_dict(self._model, full)
        else:
            self._model.load_state_dict(full)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict() of any stage (or of a plain optimizer over the same groups)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict: must be a dict with 'state' and 'param_groups'")
        self._impl.load_state_dict(state_dict)

    def close(self) -> None:
        """Removes the gradient hooks and stops background threads."""
        self._impl.close()


class _Replicated:
    """Stage 0: a full optimizer on every rank, gradients averaged with GradientSync during backward."""

    sharded = False

    def __init__(self, groups, params, make_optimizer, bucket_mb, world_size):
        self.params = params
        self.optimizer = make_optimizer(groups)
        # GradientSync launches each bucket's allreduce as soon as backward has produced all its gradients
        # (on a background thread for CPU tensors), so communication overlaps the rest of backward.
        self.sync = fd.GradientSync(self.params, bucket_mb=bucket_mb) if world_size > 1 else None

    def no_sync(self):
        return self.sync.no_sync() if self.sync is not None else contextlib.nullcontext()

    def finish_gradients(self):
        if self.sync is not None:
            self.sync.wait()

    def grads(self):
        return [p.grad for p in self.params if p.grad is not None]

    def stepped_params(self):
        return self.params

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        if self.sync is None:
            self.optimizer.zero_grad(set_to_none=True)
            return
        # After GradientSync.wait each .grad is a view into its bucket: zeroing in place keeps the views, so
        # the next backward accumulates straight into the buckets.
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        # A snapshot, as the gathered state of the ZeRO stages is: torch's holds the live tensors.
        sd = self.optimizer.state_dict()
        return {"state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in sd["state"].items()},
                "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def close(self):
        if self.sync is not None:
            self.sync.remove()
            self.sync = None


def _checked_groups(model: torch.nn.Module, param_groups) -> List[dict]:
    """The param groups as a list of dicts with lists of trainable parameters of `model`, each once."""
    if param_groups is None:
        param_groups = [{"params": list(model.parameters())}]
    elif isinstance(param_groups, torch.Tensor):
        raise ValueError("param_groups: must be a list of dicts or of parameters, got a tensor")
    param_groups = list(param_groups)
    if param_groups and not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]
    owned = {id(p) for p in model.parameters()}
    seen, groups = set(), []
    for i, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"param_groups: group {i} must be a dict with 'params'")
        ps = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        kept = []
        for p in ps:
            if not isinstance(p, torch.Tensor) or id(p) not in owned:
                raise ValueError(f"param_groups: group {i} holds something that is not a parameter of model")
            if id(p) in seen:
                raise ValueError(f"param_groups: a parameter of shape {tuple(p.shape)} is in more than one group")
            seen.add(id(p))
            if p.requires_grad:
                kept.append(p)
        groups.append({**g, "params": kept})
    if not any(g["params"] for g in groups):
        raise ValueError("param_groups: no trainable parameters")
    return groups


def _broadcast_from_rank0(params) -> None:
    """Every rank starts from rank 0's parameters: one broadcast per (device, dtype) of the flattened set."""
    by_kind = {}
    for p in params:
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    for ps in by_kind.values():
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            fd.broadcast(flat, src=0)
            offset = 0
            for p in ps:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
