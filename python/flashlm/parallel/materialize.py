"""A model built without storage, its initial values made one tensor at a time (deferred initialisation).

    model, init = deferred_init(lambda: Transformer(cfg))   # parameters on the meta device: no memory
    init.replay(take)          # take(name, full_value) for every parameter, in the order its value is final
    materialize(model, {name: tensor})   # the meta parameters named there become those tensors

A model-parallel rank holds a slice of the model (a tensor-parallel shard, a pipeline stage), yet its initial
values must be the ones a full model built on one process gets with the same seed, to the bit. Building the
full model first needs the whole model's memory on every rank. Instead the constructor runs on the meta
device under a recorder of the ops it applies to tensors; replay() runs them again on the CPU, in the same
order and with the same arguments, so the global torch generator hands out the same numbers: each parameter's
value is made whole (a random draw needs the full tensor to consume the generator as the constructor did),
handed to `take` (which keeps the slice this rank holds) and dropped before the next. A draw whose value a
later op overwrites (nn.Linear's own kaiming init, redrawn by Transformer.reset_parameters) is made and
dropped too, for the generator's sake. At most one full tensor exists at a time besides what `take` keeps
(a value that a later op reads, a uniform_ followed by erfinv_ and mul_, is kept until that op).

Random ops are told apart by torch's own tag (nondeterministic_seeded); ops that write a whole tensor whatever
it held (fill_, zero_ and the random in-place draws) start a value; any other in-place op on a parameter
updates the value it follows. A parameter whose value no in-place op set (a factory's torch.ones wrapped in a
Parameter, never reset) cannot be replayed and is refused by name, as is an op that reads another tensor
(torch's trunc_normal_, which draws until its values fall inside the bounds, runs nothing on the meta device and
is refused the same way).
"""

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flashlm.parallel.tensor import TensorParallelTransformer

# In-place ops whose result does not depend on what the tensor held.
_OVERWRITING = {"fill_", "zero_"}


def _is_random(func) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags


def _inplace_name(func) -> Optional[str]:
    name = func._schema.name.split("::")[-1]
    return name if name.endswith("_") else None


class _Op:
    """One recorded call: func(target, *args, **kwargs) for an in-place op on `target`, func(*args, **kwargs)
    for a random factory (target None)."""

    def __init__(self, func, target, args, kwargs):
        self.func, self.target, self.args, self.kwargs = func, target, args, kwargs
        self.inplace = target is not None
        self.shape = tuple(target.shape) if target is not None else None
        self.dtype = target.dtype if target is not None else None
        name = _inplace_name(func)
        self.starts = _is_random(func) or name in _OVERWRITING  # the value before is not read

    def run(self, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The op on the CPU: on `value` (a fresh tensor when the op starts one), or the factory call."""
        if not self.inplace:
            kwargs = {**self.kwargs, "device": torch.device("cpu")} if "device" in self.kwargs else self.kwargs
            self.func(*self.args, **kwargs)
            return None
        if self.starts:
            value = torch.empty(self.shape, dtype=self.dtype)
        self.func(value, *self.args, **self.kwargs)
        return value


class _Recorder(TorchDispatchMode):
    """Records the random ops and the in-place ops on tensors that a constructor runs (on the meta device)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inplace = _inplace_name(func) is not None and args and torch.is_tensor(args[0])
        if inplace or _is_random(func):
            rest = args[1:] if inplace else args
            if any(torch.is_tensor(a) for a in rest) or any(torch.is_tensor(v) for v in kwargs.values()):
                raise NotImplementedError(f"deferred_init: {func} reads another tensor; only ops that take "
                                          "numbers can be replayed")
            self.ops.append(_Op(func, args[0] if inplace else None, tuple(rest), dict(kwargs)))
        return out


class InitRecord:
    """The ops a module's constructor ran, to replay them on the CPU (see the module's docstring)."""

    def __init__(self, ops: list, module: nn.Module, check: bool = True):
        names = {id(p): n for n, p in module.named_parameters()}
        self._ops = []
        for op in ops:  # an in-place op on a temporary (not a parameter) matters only when it draws
            if op.target is not None and id(op.target) not in names and not _is_random(op.func):
                continue
            self._ops.append((op, names.get(id(op.target)) if op.target is not None else None))
            op.target = None  # identified by its name now: the record holds no tensor
        self.names = list(names.values())
        written = {n for _, n in self._ops if n is not None}
        missing = [n for n in self.names if n not in written]
        if missing and check:
            raise ValueError(f"deferred_init: no in-place op sets {missing[:4]}: their values cannot be replayed")
        first = {}
        for i, (op, name) in enumerate(self._ops):
            if check and name is not None and name not in first and not op.starts:
                raise ValueError(f"deferred_init: {op.func} reads {name} before any op sets it")
            first.setdefault(name, i)

    @torch.no_grad()
    def replay(self, take: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
        """Runs the recorded ops on the CPU in their order (the global generator advances as the constructor's
        did) and calls take(name, value) once per parameter with its final full value, float32 on the CPU as
        the constructor made it; take keeps what it needs (a slice: clone it) before the value is dropped.
        take None: only the generator advances."""
        last = {name: i for i, (_, name) in enumerate(self._ops) if name is not None}
        following = {}  # op index -> whether the next op on the same tensor reads its value
        nxt = {}
        for i in range(len(self._ops) - 1, -1, -1):
            op, name = self._ops[i]
            if name is not None:
                following[i] = name in nxt and not self._ops[nxt[name]][0].starts
                nxt[name] = i
        values = {}
        for i, (op, name) in enumerate(self._ops):
            needed = name is not None and take is not None and (i == last[name] or following[i])
            if name is None or _is_random(op.func) or needed:
                value = op.run(values.pop(name, None) if name is not None else None)
            else:
                continue  # a non-random write whose value is overwritten before it is read
            if name is None:
                continue
            if take is not None and i == last[name]:
                take(name, value)
            elif needed:
                values[name] = value


def deferred_init(build: Callable[[], nn.Module], check: bool = True):
    """(module, InitRecord): build() run on the meta device, its parameters without storage, and the record
    of the ops that set their values. Buffers are meta too: the caller makes them (Transformer.make_buffers).
    check False: the record is for its draws only (replay() without take), and a value it cannot replay is no
    error."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        module = build()
    return module, InitRecord(recorder.ops, module, check=check)


def is_deferred(module: nn.Module) -> bool:
    """Whether some parameter of `module` has no storage (the meta device)."""
    return any(p.is_meta for p in module.parameters())


def materialize(module: nn.Module, values: dict, device=None) -> None:
    """Each parameter named in `values` (name -> tensor of its shape) takes that tensor in place
    (torch.utils.swap_tensors: the Parameter object stays, so modules sharing it see the value, and so do its
    gradient hooks, such as sequence parallelism's all-reduce). The others are left as they are."""
    params = dict(module.named_parameters())
    for name, value in values.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"values: {name} is not a parameter of the module")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"values: {name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
        value = value.to(device if device is not None else value.device, p.dtype)
        hooks = p._backward_hooks  # the Python object keeps them, the autograd state swapped out loses them
        torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
        if hooks:
            p._backward_hooks = hooks  # registers them on the new tensor's autograd state


def start_part(model: nn.Module, tp, sequence_parallel: bool, device) -> tuple:
    """(part, its InitRecord or None) for a Transformer built by deferred_init, its buffers made on `device`:
    over tp > 1 ranks a TensorParallelTransformer of this rank's shapes (shard_model's), itself on the meta device
    with its constructor's draws recorded, so that materialize_part draws them after the full model's, as
    shard_model's order had them; else the meta model itself. Either way no parameter has storage yet: a
    pipeline stage then makes only its own layers (at most 1 / (tp * pp) of the model, and the ends it holds)."""
    if tp.size == 1:
        model.make_buffers(device)
        return model, None
    attn_impl = model.blocks[0].attn.attn_impl
    part, init = deferred_init(lambda: TensorParallelTransformer(model.cfg, tp, attn_impl, sequence_parallel),
                               check=False)
    part.make_buffers(device)
    part.checkpointing = model.checkpointing
    return part, init


def materialize_part(part: nn.Module, init: InitRecord, names, part_init: Optional[InitRecord] = None,
                     device=None) -> None:
    """The parameters `names` of `part` (start_part's, on the meta device) take their values on `device`: the full
    model's (init replayed), sliced as the part's tp dimensions say (a copy: the full value is dropped); then
    part_init's draws replay. The others stay on the meta device."""
    dims, tp = getattr(part, "tp_dims", None), getattr(part, "tp", None)
    kept = {}

    def take(name, value):
        if name not in names:
            return
        dim = dims[name] if dims is not None else None
        if dim is not None:
            n = value.shape[dim] // tp.size
            value = value.narrow(dim, tp.rank * n, n).clone()
        kept[name] = value

    init.replay(take)
    if part_init is not None:
        part_init.replay()
    materialize(part, kept, device)
