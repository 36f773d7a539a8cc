"""Full tensors of a model-parallel run (flashlm.train.parallel_step.ModelParallel), for checkpoints, sampling
and export, without a full model resident on any rank but the one that writes the checkpoint.

    state = mp.full_state_dict()     # rank 0: name -> full float32 CPU tensor; the other ranks: {}
    mp.load_full_state_dict(state)   # every rank copies its part out of the full tensors
    opt = mp.state_dict()            # the optimizer state, the same way (rank 0 holds it)

As torch FSDP's full state dict with rank0_only and offload_to_cpu: the tensors are gathered one at a time, in
the full model's order. A tensor split over tp is all-gathered by the tp ranks of the stage that holds it (the
tied embedding: the first stage's copy), then broadcast over pp from that stage, and rank 0 (the first rank of
every group) keeps it on the CPU; every other rank holds at most that one full tensor at a time. Under ZeRO-3 each
tensor's tp shard is first made whole from its dp slices (flashlm.parallel.zero3_state: broadcast by the dp ranks
that hold them), one tensor at a time too, and loading copies only the rank's dp slices of its tp shard out of
the full tensors: no rank materialises its part (its tp shard of its stage, the whole model at tp = pp = 1). Every
dp replica runs the same collectives, so the gathers are collective of the whole mesh.

A checkpoint of any layout loads at any other: a full tensor is sliced as the parameter is (its tp dimension;
the stages take the parameters they hold, by name).
"""

import contextlib

import torch

from flashlm.parallel.zero3 import Zero3


class FullState:
    """ModelParallel's checkpoint methods (mixed in; the attributes are ModelParallel's)."""

    def _owner(self, name: str) -> int:
        """The pipeline stage whose copy of a full-model tensor is saved (the tied table: the first stage's)."""
        if self.stage is None or name.startswith(("tok_emb.", "pos_emb.")):
            return 0
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
            return next(s for s in range(self.plan.stages) if layer in self.plan.layers(s))
        return self.plan.stages - 1

    @property
    def keeps_full(self) -> bool:
        """Whether this rank keeps the gathered tensors: rank 0, the first of every group."""
        return all(c == 0 for c in self.mesh.coords.values())

    def _gather(self, value_of, shapes: dict, everywhere: bool = False) -> dict:
        """Full tensors from every rank's parts, one at a time: {name: full float32 CPU tensor} on rank 0, {}
        elsewhere (everywhere: on every rank, on its device). value_of(name) -> this rank's tensor (asked for the
        names it holds, in the order of shapes; float32 or an exact cast of it); shapes: name -> the full tensor's
        shape, for every name. A tensor shaped as its parameter's slice is all-gathered along the parameter's split
        dimension; the rest are whole on every tp rank. Collective of the whole mesh (tp then pp)."""
        keep, pp = everywhere or self.keeps_full, self.mesh.pp
        full = {}
        for name, shape in shapes.items():
            owner = self._owner(name)
            t = None
            if self.stage is None or owner == pp.rank:
                t = value_of(name)
                dim = self.tp_dims[name]
                if dim is not None and t.shape == self._shapes[name] and self.mesh.tp.size > 1:
                    t = self.mesh.tp.all_gather(t.float().movedim(dim, 0).contiguous()).movedim(0, dim)
                t = t.float().contiguous()
            if self.stage is not None:
                # On the model's device on every stage: the broadcast goes over that device's ring.
                t = t.to(self.device) if t is not None else torch.empty(shape, device=self.device)
                pp.broadcast(t, src=owner)
            if keep:
                full[name] = t.view(shape).clone() if everywhere else t.to("cpu", copy=True).view(shape)
            del t
        return full

    def _slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor shaped as parameter `name` (others: whole)."""
        dim, tp = self.tp_dims[name], self.mesh.tp
        if dim is None or full.dim() == 0:
            return full
        n = full.shape[dim] // tp.size
        return full.narrow(dim, tp.rank * n, n)

    def _value_of(self, name: str) -> torch.Tensor:
        """This rank's value of parameter `name`: under ZeRO-3 made whole from the dp slices when asked
        (collective of the dp group: its ranks hold the same names and ask in the same order)."""
        p = self.params[name]
        if isinstance(self.zero, Zero3) and self.zero.shards(p):
            return self.zero.full_value(p)
        return p.detach()

    def _zero3_gathered(self):
        """Under ZeRO-3, this rank's parameters materialised inside (its dp slices gathered), re-sharded from their
        values on leaving; else nothing."""
        return self.zero.full_parameters() if isinstance(self.zero, Zero3) else contextlib.nullcontext()

    def full_state_dict(self) -> dict:
        """The full model's parameters: {name: float32 CPU tensor} in the full model's order on rank 0, {} on the
        other ranks. Collective."""
        with torch.no_grad():
            return self._gather(self._value_of, self._full_shapes)

    def load_full_state_dict(self, full: dict) -> None:
        """Every parameter this rank holds takes its part of `full` (a full model's state_dict, as
        full_state_dict gives it). ValueError naming the tensors unless they are the model's."""
        if set(full) != set(self._full_shapes):
            raise ValueError(f"full: its tensors are not the model's (extra or missing: "
                             f"{sorted(set(full) ^ set(self._full_shapes))[:4]})")
        for name, shape in self._full_shapes.items():
            if tuple(full[name].shape) != shape:
                raise ValueError(f"full: {name} has shape {tuple(full[name].shape)}, the model's {shape}")
        zero3 = self.zero if isinstance(self.zero, Zero3) else None
        with torch.no_grad():
            if zero3 is not None:  # the shards take their dp slices of the tp shards, one tensor at a time
                zero3.load_values(lambda p: self._slice(self._names[id(p)], full[self._names[id(p)]]))
            for name, p in self.params.items():
                if zero3 is None or not zero3.shards(p):
                    p.copy_(self._slice(name, full[name]))

    @contextlib.contextmanager
    def full_parameters(self):
        """The full model (the Transformer given, when it was given with its values) holds every parameter's
        full value inside; on leaving, each rank takes its part back from it (so loading a checkpoint into it
        loads every rank). Collective. A model built on the meta device has no room for them: use
        full_state_dict / load_full_state_dict."""
        if self.deferred:
            raise RuntimeError("full_parameters: the full model was built without storage (meta device); use "
                               "full_state_dict() and load_full_state_dict()")
        with self._zero3_gathered():  # the dp slices gathered first (ZeRO-3), and taken back from the part last
            with torch.no_grad():
                gathered = self._gather(lambda n: self.params[n].detach(), self._full_shapes, everywhere=True)
                for n, p in self.full.named_parameters():
                    p.copy_(gathered[n])
            yield
            with torch.no_grad():
                if self.part is not self.full:
                    values = self.full.state_dict()
                    for name, p in self.params.items():
                        p.copy_(self._slice(name, values[name]))
                # else: the stage's modules are the full model's own

    def _full_names(self) -> list:
        """The full model's trainable parameters' names in the order of its param groups (the numbering of a
        plain optimizer's state_dict)."""
        name_of = {id(p): n for n, p in self.full.named_parameters()}
        return [[name_of[id(p)] for p in g["params"]] for g in self.full.param_groups(0.0)]

    def state_dict(self) -> dict:
        """The optimizer state as a plain optimizer over the full model's param groups would hold it (full
        tensors, parameters numbered in group order) on rank 0; the other ranks' hold the param groups and no
        state. Collective. Under ZeRO-3 each value is made whole from its dp slices when gathered, one at a time."""
        if isinstance(self.zero, Zero3):
            inner = self.zero.inner_state()  # (references to the shards' state: no copies)
            saved_groups = inner["param_groups"]  # one per group of self.groups, as Zero3 makes them
            first = next(iter(self.params))
            keys = self.zero.state_keys(self.params[first], inner)

            def shape(key):  # a parameter holding `key`, and the shape of its value
                return first, self.zero.state_shape(self.params[first], key, inner)

            def value(name, key):  # (collective of the dp group)
                return self.zero.state_value(self.params[name], key, inner)
        else:
            local = self._stepper.state_dict()
            saved_groups, by_name = local["param_groups"], {}
            for g, saved in zip(self.groups, saved_groups):
                for p, i in zip(g["params"], saved["params"]):
                    by_name[self._names[id(p)]] = local["state"].get(i, {})
            keys = sorted(next((s for s in by_name.values() if s), {}))

            def shape(key):
                name = next(n for n, s in by_name.items() if key in s)
                return name, tuple(by_name[name][key].shape)

            def value(name, key):
                return by_name[name][key]
        full_groups = self._full_group_names
        state = {n: {} for group in full_groups for n in group}
        for key in keys:
            # Every rank runs the same optimizer: a key is shaped as its parameter (moments) or not (the step).
            name, got = shape(key)
            param_shaped = got == tuple(self._shapes[name])
            shapes = {n: self._full_shapes[n] if param_shaped else got for n in state}
            for n, v in self._gather(lambda n: value(n, key), shapes).items():
                state[n][key] = v
        numbered, groups, i = {}, [], 0
        for names, saved in zip(full_groups, saved_groups):
            ids = list(range(i, i + len(names)))
            numbered.update({j: state[n] for j, n in zip(ids, names) if state[n]})
            groups.append({**saved, "params": ids})
            i += len(names)
        return {"state": numbered, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict() of any layout (or DataParallel's, of any ZeRO stage): this rank takes its part."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict: must be a dict with 'state' and 'param_groups'")
        full_groups = self._full_group_names
        saved_groups = state_dict["param_groups"]
        if [len(g.get("params", ())) for g in saved_groups] != [len(names) for names in full_groups]:
            raise ValueError(f"state_dict: its param groups hold {[len(g.get('params', ())) for g in saved_groups]} "
                             f"parameters, the model's {[len(names) for names in full_groups]}")
        index = {n: i for names, g in zip(full_groups, saved_groups) for n, i in zip(names, g["params"])}
        local_state, local_groups, j = {}, [], 0
        for g, saved in zip(self.groups, saved_groups):
            ids = []
            for p in g["params"]:
                name = self._names[id(p)]
                entry = state_dict["state"].get(index[name])
                if entry:
                    local_state[j] = {k: self._local_state(name, k, v) for k, v in entry.items()}
                ids.append(j)
                j += 1
            local_groups.append({**saved, "params": ids})
        self._stepper.load_state_dict({"state": local_state, "param_groups": local_groups})

    def _local_state(self, name: str, key: str, value):
        """This rank's part of a saved optimizer value of parameter `name`: a tensor shaped as the full
        parameter is sliced as the parameter is; a scalar (the step) is whole."""
        if not torch.is_tensor(value) or value.dim() == 0:
            return value
        shape = self._full_shapes[name]
        if value.shape != shape:
            raise ValueError(f"state_dict: {key} of {name} has shape {tuple(value.shape)}, the parameter "
                             f"{tuple(shape)}")
        return self._slice(name, value)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters of `module` that have storage (the meta device's have none)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta and p.numel())
