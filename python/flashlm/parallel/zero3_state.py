"""ZeRO-3's state as full tensors (flashlm.parallel.zero3.Zero3, mixed in): the model's parameters and the
optimizer state, laid out as a plain model and optimizer hold them, without any rank holding all of them.

    full = zero.full_state_dict(model)     # rank 0 of the group: name -> float32 CPU tensor; the others: {}
    zero.load_full_state_dict(model, full) # every rank copies its slices out of the full tensors
    opt = zero.state_dict(rank0_only=True) # the optimizer state, the same way

As torch FSDP's full state dict with rank0_only and offload_to_cpu: the tensors are made whole one at a time, in
the model's order. A parameter's elements lie in the slices of one or more consecutive ranks of its segment;
each of those ranks broadcasts its part into a buffer of the parameter's size on every rank (the ranks cannot
all-gather: their parts differ in size), so a rank holds at most one full tensor at a time besides what it
keeps. Loading reads only this rank's slices out of the full tensors: from a memory-mapped checkpoint, only
their pages are read.
"""

import torch


def owned_parts(numels, offsets, lo: int, hi: int) -> list:
    """The parts of parameters flattened at `offsets` (of `numels` elements) that fall in [lo, hi), a rank's
    slice: (index of the parameter, its first element there, count, position from lo)."""
    parts = []
    for i, (n, o) in enumerate(zip(numels, offsets)):
        a, b = max(o, lo), min(o + n, hi)
        if a < b:
            parts.append((i, a - o, b - a, a - lo))
    return parts


def check_saved_groups(saved_groups, groups) -> None:
    """A full optimizer state's param groups must hold as many parameters as `groups` (lists of them)."""
    if len(saved_groups) != len(groups) or any(len(g["params"]) != len(ps) for g, ps in zip(saved_groups, groups)):
        raise ValueError(f"state_dict: its param groups hold {[len(g['params']) for g in saved_groups]} "
                         f"parameters, these hold {[len(ps) for ps in groups]}")


class Zero3State:
    """Zero3's state methods (the attributes are Zero3's: segments, shard_group, rank, world_size, _shape)."""

    def _full_value(self, s, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Parameter i of segment s whole (its shape) on every rank, from `flat`: this rank's slice of a tensor
        laid out as s's shard (its values, or an optimizer state of them). Collective of the group."""
        shape = self._shape[s.params[i]]
        o, n = s.offsets[i], shape.numel()
        full = torch.empty(n, dtype=flat.dtype, device=flat.device)
        for r in range(o // s.slice, -(-(o + n) // s.slice)):  # the ranks whose slices hold a part of it
            lo, hi = max(o, r * s.slice), min(o + n, (r + 1) * s.slice)
            part = full[lo - o:hi - o]
            if r == self.rank:
                part.copy_(flat[lo - r * s.slice:hi - r * s.slice])
            if self.world_size > 1:
                self.shard_group.broadcast(part, src=r)
        return full.view(shape)

    def _locate(self, p: torch.Tensor) -> tuple:
        """(segment, index in it) of parameter p."""
        return next((s, i) for s in self.segments for i, q in enumerate(s.params) if q is p)

    def full_value(self, p: torch.Tensor) -> torch.Tensor:
        """Parameter p (one this Zero3 shards) whole on every rank of the group, from the shards. Collective of the
        group: every rank asks for the same parameters in the same order."""
        self._sync()
        s, i = self._locate(p)
        return self._full_value(s, i, s.shard)

    def _shard_state(self, s, inner: dict) -> dict:
        """Segment s's shard's entry of inner (the inner optimizer's state_dict): {} before its first step."""
        return inner["state"].get(next(j for j, q in enumerate(self._inner_params) if q is s.shard)) or {}

    @staticmethod
    def _elementwise(s, key: str, value) -> bool:
        """Whether optimizer value `key` of segment s is laid out as its shard (a moment; the step is not)."""
        return torch.is_tensor(value) and value.shape == s.shard.shape and key != "step"

    def inner_state(self) -> dict:
        """The inner optimizer's state_dict (references to the shards' state), once every collective is done."""
        self._sync()
        return self.optimizer.state_dict()

    def state_keys(self, p: torch.Tensor, inner: dict) -> list:
        """The names of parameter p's optimizer values in inner (inner_state()), sorted; [] before the first step."""
        return sorted(self._shard_state(self._locate(p)[0], inner))

    def state_shape(self, p: torch.Tensor, key: str, inner: dict) -> tuple:
        """The shape state_value(p, key, inner) has: p's for an elementwise value, the value's own for the rest."""
        s, i = self._locate(p)
        value = self._shard_state(s, inner)[key]
        return tuple(self._shape[p]) if self._elementwise(s, key, value) else tuple(value.shape)

    def state_value(self, p: torch.Tensor, key: str, inner: dict):
        """Inner optimizer value `key` of parameter p as a plain optimizer holds it, on every rank of the group: an
        elementwise one made whole from the slices (p's shape; collective of the group), another (the step) as it
        is. inner: inner_state()."""
        s, i = self._locate(p)
        value = self._shard_state(s, inner)[key]
        if self._elementwise(s, key, value):
            return self._full_value(s, i, value)
        return value.clone() if torch.is_tensor(value) else value

    def shards(self, p: torch.Tensor) -> bool:
        """Whether this Zero3 shards parameter p."""
        return any(q is p for s in self.segments for q in s.params)

    @torch.no_grad()
    def load_values(self, value_of) -> None:
        """Every shard takes this rank's slices of its parameters' values: value_of(p) -> parameter p's full value
        (its shape; a memory-mapped one is read only there), asked once per parameter this rank's slices hold."""
        self._sync()
        for u in self.units:  # stale once the shards change: the next use gathers the new values
            self._free(u)
        for s in self.segments:
            lo = self.rank * s.slice
            numels = [self._shape[p].numel() for p in s.params]
            for i, first, count, pos in owned_parts(numels, s.offsets, lo, lo + s.slice):
                s.shard[pos:pos + count].copy_(value_of(s.params[i]).reshape(-1)[first:first + count])

    def _where(self, model: torch.nn.Module) -> dict:
        """name -> (segment, index in it) for every parameter of `model` that this Zero3 shards."""
        index = {id(p): (s, i) for s in self.segments for i, p in enumerate(s.params)}
        return {n: index[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in index}

    @torch.no_grad()
    def full_state_dict(self, model: torch.nn.Module) -> dict:
        """model.state_dict()'s tensors (model: the one given to Zero3) whole, float32 on the CPU, on rank 0 of the
        group; {} on the other ranks. Collective."""
        self._sync()
        where, keep = self._where(model), self.rank == 0
        full = {}
        for name, value in model.state_dict(keep_vars=True).items():
            if name in where:
                s, i = where[name]
                value = self._full_value(s, i, s.shard)
                if keep:
                    full[name] = value.to("cpu", torch.float32)  # (a fresh tensor: no copy when it is already)
            elif keep:
                full[name] = value.detach().to("cpu", torch.float32, copy=True)
            del value
        return full

    @torch.no_grad()
    def load_full_state_dict(self, model: torch.nn.Module, full: dict) -> None:
        """Every shard takes this rank's slices of `full` (model.state_dict()'s tensors whole, as
        full_state_dict gives them; memory-mapped ones are read only there). ValueError naming the tensors
        unless they are the model's."""
        own = model.state_dict(keep_vars=True)
        if set(full) != set(own):
            raise ValueError(f"full: its tensors are not the model's (extra or missing: "
                             f"{sorted(set(full) ^ set(own))[:4]})")
        where = self._where(model)
        for name, value in own.items():
            shape = tuple(self._shape[where[name][0].params[where[name][1]]]) if name in where else tuple(value.shape)
            if tuple(full[name].shape) != shape:
                raise ValueError(f"full: {name} has shape {tuple(full[name].shape)}, the model's {shape}")
        name_of = {id(s.params[i]): n for n, (s, i) in where.items()}
        self.load_values(lambda p: full[name_of[id(p)]])
        for name, value in own.items():
            if name not in where:  # a buffer, a parameter left out of the groups: whole on every rank
                value.copy_(full[name])

    def state_dict(self, rank0_only: bool = False) -> dict:
        """The inner optimizer's state made whole and split per parameter, numbered as a plain optimizer over
        the groups numbers them, on every rank (rank0_only: on rank 0 of the group; the other ranks get the param
        groups and no state). Collective."""
        keep = not rank0_only or self.rank == 0
        inner = self.inner_state()
        ids = {}
        for params in self.groups:
            for p in params:
                ids[id(p)] = len(ids)
        state, groups = {}, []
        for gi, params in enumerate(self.groups):
            saved = inner["param_groups"][gi]
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": [ids[id(p)] for p in params]})
        per_param = {}
        for s in self.segments:
            for key in sorted(self._shard_state(s, inner)):
                for p in s.params:
                    full = self.state_value(p, key, inner)  # (collective: on every rank)
                    if keep:
                        per_param.setdefault(id(p), {})[key] = full
                    del full
        for params in self.groups:
            for p in params:
                if id(p) in per_param:
                    state[ids[id(p)]] = per_param[id(p)]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes a full state (any stage's state_dict, or a memory-mapped one): this rank copies out the slices
        of its shards only."""
        saved_groups = state_dict["param_groups"]
        check_saved_groups(saved_groups, self.groups)
        index_of = {id(p): i for i, p in enumerate(self._inner_params)}
        states = {id(p): state_dict["state"].get(i)
                  for saved, params in zip(saved_groups, self.groups) for p, i in zip(params, saved["params"])}
        inner_state = {}
        for s in self.segments:
            present = [(p, states[id(p)]) for p in s.params if states[id(p)]]
            if not present:
                continue
            shard_state = {}
            first_p, first = present[0]
            for key, value in first.items():
                if not (torch.is_tensor(value) and tuple(value.shape) == tuple(self._shape[first_p])
                        and key != "step"):
                    shard_state[key] = value
                    continue
                for p, st in present:
                    shape = tuple(self._shape[p])
                    if key not in st or not torch.is_tensor(st[key]) or tuple(st[key].shape) != shape:
                        got = tuple(st[key].shape) if torch.is_tensor(st.get(key)) else None
                        raise ValueError(f"state_dict: '{key}' of a parameter of shape {shape} has shape {got}")
                flat = torch.zeros(s.slice, dtype=value.dtype, device=s.shard.device)
                lo = self.rank * s.slice
                numels = [self._shape[p].numel() for p in s.params]
                for i, first_el, count, pos in owned_parts(numels, s.offsets, lo, lo + s.slice):
                    st = states[id(s.params[i])]
                    if st:
                        flat[pos:pos + count].copy_(st[key].reshape(-1)[first_el:first_el + count])
                shard_state[key] = flat
            inner_state[index_of[id(s.shard)]] = shard_state
        inner_groups = []
        n = 0
        for gi, g in enumerate(self.optimizer.param_groups):
            inner_groups.append({**{k: v for k, v in saved_groups[gi].items() if k != "params"},
                                 "params": list(range(n, n + len(g["params"])))})
            n += len(g["params"])
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": inner_groups})
