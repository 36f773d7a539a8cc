"""Cases for the robustness suite built from one valid call and its mutations, one argument at a time.

    entry = Entry("flashlm.ops.silu_mul", make, call, reference)
    cases = entry.cases(valid_call(), *tensor_mutations("gate"), Mutation("up", "shape [3, 63]", ...))

`make()` builds the valid call's arguments (fresh, seeded), `call(args)` runs the entry point, and
`reference(args)` computes the expected result independently (float64 torch, gguf-py) from a copy of the
arguments taken before the call (in-place ops change them). A returned result is compared with the reference
by `close` (NaN exactly where the reference has NaN, infinities exactly, the rest within a tolerance).

The mutation builders cover what a hostile caller passes: other dtypes, the meta device, other ranks, views
that are not contiguous, NaN and infinities, sizes past int32 as stride-0 views (`wrapped`: a dimension
d + 2**32, so that a kernel counting in int32 would see d and agree with the other arguments), and wrong types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from compare import assert_close
from robust import Case, HarnessError

WRAP = 1 << 32  # added to a size or an index: what an int32 wrap would turn back into the original


@dataclass
class Mutation:
    """One change of a valid call: `apply(args)` edits the argument dict in place."""

    arg: str
    what: str
    apply: Callable[[dict], None]
    expect: str = "raise"
    names: tuple = ()
    rtol_of_max: Optional[float] = None  # a tolerance of its own (16-bit inputs), else the entry's

    @property
    def label(self) -> str:
        return f"{self.arg}: {self.what}"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t64(x) -> torch.Tensor:
    return torch.as_tensor(x).double()


def attention_options(a: dict) -> dict:
    """tests/reference.py's attention keywords from a call's arguments (q, softmax_scale, causal, window_size,
    softcap, alibi_slopes; absent ones at their defaults)."""
    q = torch.as_tensor(a["q"])
    scale = q.shape[-1] ** -0.5 if a.get("softmax_scale") is None else float(a["softmax_scale"])
    return dict(causal=bool(a.get("causal", False)), window=tuple(int(w) for w in a.get("window_size", (-1, -1))),
                softcap=float(a.get("softcap", 0.0)), scale=scale, alibi_slopes=a.get("alibi_slopes"))


def valid_call() -> Mutation:
    """The unmutated call: must return the reference's result (this also checks the reference)."""
    return Mutation("-", "a valid call", lambda args: None, "correct")


def snapshot(value):
    """A copy of the arguments as they were before the call (small tensors cloned; views of huge sizes kept)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if not value.is_meta and value.numel() < (1 << 24) else value
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def _meta_free(value):
    if isinstance(value, torch.Tensor):
        return not value.is_meta
    if isinstance(value, (list, tuple)):
        return all(_meta_free(v) for v in value)
    return True


def close(got, want, rtol_of_max=1e-5, atol=0.0, name="result"):
    """got matches want: tensors (nested in tuples/lists) of equal shape, NaN and infinities in the same places,
    other values within atol + rtol_of_max * max|want|. A want of None is not checked. Meta results must
    match a meta reference's shapes."""
    if want is None:
        return
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), \
            f"{name}: expected {len(want)} values, got {type(got).__name__}"
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, rtol_of_max, atol, f"{name}[{i}]")
        return
    if not isinstance(want, torch.Tensor):
        assert got == want, f"{name}: {got!r}, expected {want!r}"
        return
    if type(got).__module__ == "numpy":
        got = torch.from_numpy(got)
    assert isinstance(got, torch.Tensor), f"{name}: expected a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {list(got.shape)}, expected {list(want.shape)}"
    if want.is_meta or got.is_meta:
        assert got.is_meta, f"{name}: a result on {got.device} for meta inputs"
        return
    assert_close(got.detach().double().cpu(), want.detach().double().cpu(), atol=atol, rtol_of_max=rtol_of_max,
                 name=name, equal_nan=True)


@dataclass
class Entry:
    """A public entry point and a valid call of it."""

    name: str
    make: Callable[[], dict]
    call: Callable[[dict], Any]
    reference: Optional[Callable[[dict], Any]] = None
    rtol_of_max: float = 1e-5
    atol: float = 0.0
    timeout: float = 10.0
    compare: Optional[Callable[[Any, Any], None]] = None  # (result, reference); default `close`

    def case(self, m: Mutation) -> Case:
        box = {}

        def call():
            try:
                args = self.make()
                m.apply(args)
                box["args"] = snapshot(args)
            except Exception as e:
                raise HarnessError(f"building the call failed: {type(e).__name__}: {e}") from e
            return self.call(args)

        def check(result):
            args = box["args"]
            if not _meta_free(list(args.values())):  # meta inputs: the valid call's shapes, on meta
                want = _on_meta(self.reference(self.make()))
            else:
                want = self.reference(args)
            if self.compare is not None:
                self.compare(result, want)
            else:
                close(result, want, self.rtol_of_max if m.rtol_of_max is None else m.rtol_of_max, self.atol)

        return Case(self.name, m.label, call, m.names or (m.arg,), m.expect,
                    check if m.expect != "raise" else None, timeout=self.timeout)

    def cases(self, *mutations: Mutation) -> list:
        return [self.case(m) for m in mutations]


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_on_meta(v) for v in value)
    return value


# -- mutation builders ----------------------------------------------------------------------------------------

def _set(arg, fn):
    def apply(args):
        args[arg] = fn(args[arg])
    return apply


def strided_last(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last dimension at stride 2 (not contiguous)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
    buf[..., 0] = t
    return buf[..., 0]


def strided_rows(t: torch.Tensor) -> torch.Tensor:
    """The same values, the last dimension contiguous but each row twice as far apart."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., :t.shape[-1]] = t
    return buf[..., :t.shape[-1]]


def transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major in the last two dimensions."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def wrapped(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A stride-0 view whose dimension `dim` has t.shape[dim] + 2**32 elements (all equal to the first slice)."""
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim] += WRAP
    return t.narrow(dim, 0, 1).expand(shape)


def poke(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def nan_at(arg, index, what, expect="correct"):
    """args[arg][index] = NaN: the reference decides where it must show."""
    return Mutation(arg, f"NaN at {index} ({what})", _set(arg, lambda t: poke(t, index, math.nan)), expect)


# A result computed in a 16-bit dtype, against float64: a relative step of 2**-8 per rounding, a few roundings.
LOW_PRECISION_RTOL = 3e-2


def dtype_mutations(arg, dtypes=(torch.float64, torch.float16, torch.int32, torch.bool), expect="either"):
    """The argument converted to each dtype: a correct result (within a 16-bit tolerance for 16-bit dtypes) or
    an error naming it."""
    return [Mutation(arg, f"dtype {str(d).removeprefix('torch.')}", _set(arg, lambda t, d=d: t.to(d)), expect,
                     rtol_of_max=LOW_PRECISION_RTOL if d in (torch.float16, torch.bfloat16) else None)
            for d in dtypes]


def type_mutations(arg, none="raise", convertible="either"):
    """None, a list, a numpy array, a string and an int where a tensor belongs."""
    return [
        Mutation(arg, "None", _set(arg, lambda t: None), none),
        Mutation(arg, "a nested list", _set(arg, lambda t: t.tolist()), convertible),
        Mutation(arg, "a numpy array", _set(arg, lambda t: t.numpy()), convertible),
        Mutation(arg, "a string", _set(arg, lambda t: "tensor")),
        Mutation(arg, "an int", _set(arg, lambda t: 3)),
    ]


def layout_mutations(arg, expect="either", matrix=True):
    """Non-contiguous views of the same values: a correct result, or an error naming the argument (`matrix`:
    the argument has at least two dimensions)."""
    muts = [Mutation(arg, "last dimension at stride 2", _set(arg, strided_last), expect)]
    if matrix:
        muts += [Mutation(arg, "rows twice as far apart", _set(arg, strided_rows), expect),
                 Mutation(arg, "stored transposed", _set(arg, transposed_storage), expect)]
    return muts


def special_value_mutations(arg, index=0, values=(math.nan, math.inf, -math.inf)):
    """One element NaN or infinite: the result must be the reference's (NaN propagates)."""
    return [Mutation(arg, f"element {index} = {v}", _set(arg, lambda t, v=v: poke(t, _flat_index(t, index), v)),
                     "correct") for v in values]


def _flat_index(t, index):
    return tuple(int(i) for i in np.unravel_index(index, tuple(t.shape))) if t.dim() else ()


def tensor_mutations(arg, *, dims=(), dtypes=(torch.float64, torch.float16, torch.int32, torch.bool),
                     layout=True, values=True, meta=True, types=True, optional=False, matrix=True):
    """The usual hostile versions of a float tensor argument: `dims` lists the dimensions to wrap past int32,
    `matrix` says it has at least two dimensions, `optional` that None is a valid value."""
    muts = list(dtype_mutations(arg, dtypes))
    if meta:
        muts.append(Mutation(arg, "on the meta device", _set(arg, lambda t: t.to("meta")), "either"))
    muts.append(Mutation(arg, "0-dim", _set(arg, lambda t: t.reshape(-1)[0].clone())))
    muts += [Mutation(arg, f"dimension {d} + 2**32 (a stride-0 view)", _set(arg, lambda t, d=d: wrapped(t, d)))
             for d in dims]
    if layout:
        muts += layout_mutations(arg, matrix=matrix)
    if values:
        muts += special_value_mutations(arg)
    if types:
        muts += type_mutations(arg, none="either" if optional else "raise")
    return muts


def int_mutations(arg, valid: int, *, wrap=True, negative=True, zero="raise", types=True, huge="raise", none="raise"):
    """Hostile values where an int is taken: 0, -1, 2**31, valid + 2**32 (an int32 wrap gives `valid` back),
    2**63 and 2**64 (past int64), a float with a fraction, None and a string (`none`: what None expects, or
    None where None is a valid value and not a mutation)."""
    muts = []
    if zero is not None:
        muts.append(Mutation(arg, "0", _set(arg, lambda v: 0), zero))
    if negative:
        muts.append(Mutation(arg, "-1", _set(arg, lambda v: -1)))
    if huge is not None:
        muts += [Mutation(arg, f"{label}", _set(arg, lambda v, x=x: x), huge)
                 for label, x in (("2**31", 1 << 31), ("2**63", 1 << 63), ("2**64 + 1", (1 << 64) + 1))]
    if wrap:
        muts.append(Mutation(arg, f"{valid} + 2**32", _set(arg, lambda v: valid + WRAP), huge or "raise"))
    if types:
        muts += [Mutation(arg, "a string", _set(arg, lambda v: "1")),
                 Mutation(arg, f"{valid}.5 (a float)", _set(arg, lambda v: valid + 0.5))]
        if none is not None:
            muts.append(Mutation(arg, "None", _set(arg, lambda v: None), none))
    return muts


def float_mutations(arg, nan="either", inf="either", negative="either", none="raise"):
    """NaN, infinity and a negative value where a float is taken, None and a string. A NaN parameter (a scale,
    a learning rate) may be refused or propagate: "either" by default, checked against the reference."""
    muts = [Mutation(arg, "nan", _set(arg, lambda v: math.nan), nan),
            Mutation(arg, "inf", _set(arg, lambda v: math.inf), inf),
            Mutation(arg, "-1.0", _set(arg, lambda v: -1.0), negative),
            Mutation(arg, "a string", _set(arg, lambda v: "x"))]
    if none is not None:
        muts.append(Mutation(arg, "None", _set(arg, lambda v: None), none))
    return muts


def apply(arg, fn):
    """An `apply` for Mutation that replaces args[arg] by fn(args[arg])."""
    return _set(arg, fn)


def edit(fn):
    """An `apply` for Mutation that edits the argument dict (several arguments at once)."""
    return fn
