"""ZeRO stages 1 and 2 for DataParallel (flashlm.train.parallel): the optimizer state, and for stage 2 the
averaged gradients, sharded over ranks: the world's, or a mesh's dp group for the part of the model a rank holds
(flashlm.train.parallel_step).

Layout. Each param group is flattened, in its order, into buckets of about bucket_mb holding whole
parameters (cut from the end of the group, since backward produces the last parameters first). Each bucket
is padded with zeros to a multiple of the world size and split into world_size equal slices; rank r owns
slice r of every bucket. Its shard of a group is those slices concatenated: one flat tensor per group,
which the inner optimizer steps (so a fused optimizer such as flashlm's AdamW takes it as is), with a
master copy of the parameters' values in that slice.

A step. The bucket's gradients are copied into a flat buffer and reduce-scattered (averaged over ranks);
this rank's slice lands in the shard's .grad. The inner optimizer updates the shard, and an all-gather of
each group's shard writes the new values back into every rank's parameters.
  - Stage 1 reduces after backward, in finish_gradients (nothing overlaps backward; the CPU ring runs on a
    background thread while the next bucket is packed). The local, unaveraged .grad of the parameters stay
    until zero_grad: per rank the full gradients plus 1/world_size of the optimizer state.
  - Stage 2 reduces during backward: a hook on each parameter notes its gradient; when a bucket is complete
    (and every bucket before it in launch order has been launched) it is packed, the parameters' .grad are
    dropped, and its reduce-scatter starts (a background thread for CPU tensors, so the ring runs while
    autograd computes the next gradients; inline on the current stream for CUDA tensors). What is left to
    wait for after backward is the last buckets' reductions. At the step a rank holds 1/world_size of the
    gradients and of the optimizer state. Micro-steps under no_sync() accumulate full local gradients (no
    communication); the backward after them reduces the sum. With reduce_in_backward=False stage 2 reduces in
    finish_gradients as stage 1 does, dropping each bucket's full gradients once packed: a pipeline stage runs
    one backward per micro-batch inside a step, and its gradients are complete only after the tied embedding's
    sum between stages (flashlm.train.parallel_step). With reduce_in_backward=True stage 1 launches from the
    hooks as stage 2 does, keeping the local gradients (a mesh's dp group without a pipeline or cp: the same
    buckets reduced, only earlier).
Buckets are launched in one fixed order on every rank (the order in which backward completes them), so all
ranks run the same sequence of collectives.
"""

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flashlm.dist.grad_sync import BucketHooks
from flashlm.parallel.zero3_state import check_saved_groups, owned_parts


class _Bucket:
    """Whole parameters of one group, flattened; padded to a multiple of the world size."""

    def __init__(self, group, params, world_size, rank, shard_offset):
        self.group = group
        self.params = params
        self.offsets, offset = [], 0
        for p in params:
            self.offsets.append(offset)
            offset += p.numel()
        self.padded = -(-offset // world_size) * world_size
        self.slice = self.padded // world_size  # elements per rank
        self.shard_offset = shard_offset  # where this bucket's slice sits in the rank's shard of the group
        # The parts of parameters in this rank's slice: (param, first element, count, position in the shard).
        self.own = [(params[i], first, count, shard_offset + pos) for i, first, count, pos in
                    owned_parts([p.numel() for p in params], self.offsets, rank * self.slice, (rank + 1) * self.slice)]
        self.arrived = set()
        self.launched = False
        self.result = None  # this rank's averaged slice, or a future of it

    def pack(self, free: bool) -> torch.Tensor:
        """The bucket's gradients in one flat buffer (zeros for parameters without one)."""
        p0 = self.params[0]
        flat = torch.zeros(self.padded, dtype=p0.dtype, device=p0.device)
        for p, o in zip(self.params, self.offsets):
            if p.grad is not None:
                flat[o:o + p.numel()].copy_(p.grad.reshape(-1))
                if free:
                    p.grad = None
        return flat

    def unpack_params(self, full: torch.Tensor) -> None:
        """Copies the bucket's parameter values out of `full`, the gathered bucket (padded length)."""
        for p, o in zip(self.params, self.offsets):
            p.copy_(full[o:o + p.numel()].view_as(p))


class ShardedOptimizer(BucketHooks):
    """The ZeRO side of DataParallel (stage 1 or 2); the same methods as its stage-0 counterpart."""

    sharded = True
    _finish_call = "finish_gradients()"

    def __init__(self, groups, ordered, make_optimizer, stage, bucket_mb, group, reduce_in_backward=None):
        # group: the ranks the state is sharded over (zero3.WorldGroup, or a mesh's dp group); reduce_in_backward:
        # the reduce-scatters launched from the gradient hooks (True) or in finish_gradients (False); None: from the
        # hooks for stage 2 only (DataParallel's)
        self.stage, self.shard_group = stage, group
        self.rank, self.world_size = rank, world_size = group.rank, group.size
        self.groups = [g["params"] for g in groups]
        p0 = ordered[0]
        limit = max(1, int(bucket_mb * 1e6) // p0.element_size())  # elements per bucket
        self.buckets, self.shards = [], []
        for gi, params in enumerate(self.groups):
            cut, current, size = [], [], 0
            for p in reversed(params):
                if current and size + p.numel() > limit:
                    cut.append(current[::-1])
                    current, size = [], 0
                current.append(p)
                size += p.numel()
            if current:
                cut.append(current[::-1])
            offset = 0
            for bucket_params in reversed(cut):
                b = _Bucket(gi, bucket_params, world_size, rank, offset)
                self.buckets.append(b)
                offset += b.slice
            self.shards.append(torch.zeros(offset, dtype=p0.dtype, device=p0.device))
        self._load_shards_from_params()
        position = {id(p): i for i, p in enumerate(ordered)}
        # Launch order: the bucket whose first parameter comes latest in the model is completed first.
        self._order = sorted(self.buckets, key=lambda b: -min(position[id(p)] for p in b.params))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlm-zero")
        # Without hooks the launches are in finish_gradients.
        in_backward = stage == 2 if reduce_in_backward is None else reduce_in_backward
        self._install_hooks(ordered if in_backward else [])
        self.optimizer = make_optimizer([{**{k: v for k, v in g.items() if k != "params"}, "params": [shard]}
                                         for g, shard in zip(groups, self.shards)])

    # ---- gradients ------------------------------------------------------------------------------------

    def no_sync(self):
        if not self._hooks:  # everything is communicated in finish_gradients
            return contextlib.nullcontext()
        return super().no_sync()

    def _launch(self, b: _Bucket) -> None:
        b.launched = True
        flat = b.pack(free=self.stage == 2)
        if self.world_size == 1:
            b.result = flat
        elif flat.device.type == "cpu":
            b.result = self._executor.submit(self.shard_group.reduce_scatter, flat, "avg")
        else:
            b.result = self.shard_group.reduce_scatter(flat, "avg")

    def finish_gradients(self) -> None:
        if not self._enabled:
            raise RuntimeError("DataParallel.finish_gradients: called inside no_sync()")
        for b in self._order[self._next:]:  # parameters without a gradient this step count as zero
            b.arrived.update(b.params)
        self._launch_ready()
        grads = [torch.zeros_like(s) for s in self.shards]
        try:
            for b in self._order:
                result = b.result.result() if isinstance(b.result, Future) else b.result
                grads[b.group][b.shard_offset:b.shard_offset + b.slice].copy_(result)
        finally:
            for b in self.buckets:
                b.arrived.clear()
                b.launched = False
                b.result = None
            self._next = 0
        for shard, g in zip(self.shards, grads):
            shard.grad = g

    def grads(self):
        return [s.grad for s in self.shards if s.grad is not None]

    def stepped_params(self):
        return self.shards

    def owned_grads(self) -> list:
        """(parameter, the part of its gradient in this rank's shard, flat) for every part this rank owns: each
        element on exactly one rank of the group, for norms summed over it."""
        return [(p, s.grad[pos:pos + count]) for b in self.buckets for s in [self.shards[b.group]]
                if s.grad is not None for p, _, count, pos in b.own]

    def zero_grad(self) -> None:
        for params in self.groups:
            for p in params:
                p.grad = None
        for s in self.shards:
            s.grad = None

    # ---- parameters -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _load_shards_from_params(self) -> None:
        """The master shards take the parameters' current values (which the trainer may have loaded)."""
        for b in self.buckets:
            shard = self.shards[b.group]
            for p, first, count, pos in b.own:
                shard[pos:pos + count].copy_(p.detach().reshape(-1)[first:first + count])

    def _gather(self, gi: int, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's shard of group gi (or a tensor of the same layout), as a [world_size, shard] view."""
        full = shard if self.world_size == 1 else self.shard_group.all_gather(shard.contiguous())
        return full.view(self.world_size, -1)

    def _bucket_full(self, b: _Bucket, gathered: torch.Tensor) -> torch.Tensor:
        """Bucket b's padded flat values out of a gathered group ([world_size, shard])."""
        return gathered[:, b.shard_offset:b.shard_offset + b.slice].reshape(-1)

    @torch.no_grad()
    def step(self) -> None:
        self._load_shards_from_params()
        self.optimizer.step()
        for gi, shard in enumerate(self.shards):
            if not shard.numel():  # a group without trainable parameters
                continue
            gathered = self._gather(gi, shard)
            for b in self.buckets:
                if b.group == gi:
                    b.unpack_params(self._bucket_full(b, gathered))

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The inner optimizer's state gathered and split per parameter, numbered as a plain optimizer over
        the groups numbers them (collective)."""
        inner = self.optimizer.state_dict()
        state, groups, index = {}, [], 0
        for gi, params in enumerate(self.groups):
            ids = list(range(index, index + len(params)))
            index += len(params)
            saved = inner["param_groups"][gi]
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
            shard_state = inner["state"].get(saved["params"][0])
            if not shard_state or not self.shards[gi].numel():
                continue
            per_param = {id(p): {} for p in params}
            for key in sorted(shard_state):
                value = shard_state[key]
                if torch.is_tensor(value) and value.shape == self.shards[gi].shape:
                    gathered = self._gather(gi, value)
                    for b in self.buckets:
                        if b.group == gi:
                            full = self._bucket_full(b, gathered)
                            for p, o in zip(b.params, b.offsets):
                                per_param[id(p)][key] = full[o:o + p.numel()].view_as(p).clone()
                else:
                    for d in per_param.values():
                        d[key] = value.clone() if torch.is_tensor(value) else value
            state.update(zip(ids, (per_param[id(p)] for p in params)))
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes a full state (any stage's state_dict): this rank keeps the slices of its shards."""
        saved_groups = state_dict["param_groups"]
        check_saved_groups(saved_groups, self.groups)
        inner_state, inner_groups = {}, []
        for gi, (saved, params) in enumerate(zip(saved_groups, self.groups)):
            inner_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [gi]})
            states = {id(p): state_dict["state"].get(i) for p, i in zip(params, saved["params"])}
            present = [(p, states[id(p)]) for p in params if states[id(p)]]
            if not present:
                continue
            shard_state = {}
            for key, value in present[0][1].items():
                if not _is_elementwise(key, value, present[0][0]):
                    shard_state[key] = value
                    continue
                shard = torch.zeros(self.shards[gi].shape, dtype=value.dtype, device=self.shards[gi].device)
                for p, s in present:
                    if key not in s or tuple(s[key].shape) != tuple(p.shape):
                        raise ValueError(f"state_dict: '{key}' of a parameter of shape {tuple(p.shape)} has shape "
                                         f"{tuple(s[key].shape) if key in s else None}")
                for b in self.buckets:
                    if b.group == gi:
                        for p, first, count, pos in b.own:
                            s = states[id(p)]
                            if s:
                                shard[pos:pos + count].copy_(s[key].reshape(-1)[first:first + count])
                shard_state[key] = shard
            inner_state[gi] = shard_state
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": inner_groups})

    def close(self) -> None:
        self._remove_hooks()
        self._executor.shutdown(wait=True)


def _is_elementwise(key, value, p) -> bool:
    """Whether a per-parameter state entry holds one value per element (sharded) or one for the whole
    parameter (such as AdamW's step, replicated)."""
    return torch.is_tensor(value) and tuple(value.shape) == tuple(p.shape) and not (p.dim() == 0 and key == "step")
