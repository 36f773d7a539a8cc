"""Argument checks shared by the flashlm.ops wrappers, so that every bad argument raises an exception whose
message starts with the argument's name: TypeError for the wrong kind of object (None, a list or a numpy
array where a tensor goes, a float where an integer goes), ValueError for a wrong dtype, device, rank or value.

The native code checks shapes, dtypes and devices again (it is also called from C++); these checks are the
ones it cannot make (the Python objects themselves) or must not see too late (an int64 index tensor narrowed
to int32 wraps without a word; a tensor that is not a tensor breaks the wrapper's own code first).

Decode steps call the wrappers per layer, and each call's own Python work is a good part of its time at that
size (a paged-attention decode of a short context takes ~20 us): the common case comes first in each check.
"""

import math
import numbers
import operator
from typing import Optional

import torch

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_Tensor = torch.Tensor  # a module global: cheaper to reach than torch's attribute, call after call


class ArgumentError(ValueError, RuntimeError):
    """A bad argument where flash-attn raises RuntimeError (its TORCH_CHECK): both a ValueError, as flashlm's
    bad input is, and a RuntimeError, so that code written against flash-attn catches it too."""


def check_tensor(t, name: str, ndim: Optional[int] = None, layout: str = "", min_ndim: int = 0) -> None:
    """A torch.Tensor with `ndim` dimensions (or at least `min_ndim`); `layout` names them in the message."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is None and not min_ndim:
        return
    dims = t.dim()
    if dims != ndim if ndim is not None else dims < min_ndim:
        want = f"{ndim} dimensions" if ndim is not None else f"at least {min_ndim} dimension{'s' * (min_ndim > 1)}"
        raise ValueError(f"{name}: expected {want}{' ' + layout if layout else ''}, got shape {list(t.shape)}")


def check_tensors(names: str, *tensors, readable: bool = False) -> None:
    """check_tensor for each of `tensors`, named in order by the space-separated `names`; with `readable`,
    check_device too."""
    for t in tensors:
        if not isinstance(t, _Tensor) or (readable and not (t.is_cpu or t.is_cuda)):
            _name_the_bad_one(names, tensors, readable, optional=False)


def check_optional_tensors(names: str, *tensors, readable: bool = False) -> None:
    """check_tensors for the tensors that are not None (optional ones left out)."""
    for t in tensors:
        if t is not None and (not isinstance(t, _Tensor) or (readable and not (t.is_cpu or t.is_cuda))):
            _name_the_bad_one(names, tensors, readable, optional=True)


def _name_the_bad_one(names: str, tensors, readable: bool, optional: bool) -> None:
    """Raises for the first bad tensor, by its name."""
    for name, t in zip(names.split(), tensors):
        if t is not None or not optional:
            check_tensor(t, name)
            if readable:
                check_device(t, name)


def check_device(t: torch.Tensor, name: str) -> None:
    """A tensor the kernels can read: on the CPU or a CUDA device (not meta, not another backend)."""
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(f"{name}: only CPU and CUDA tensors are supported, got a tensor on {t.device}")


def check_same_device(**tensors) -> None:
    """Every tensor given (None: left out) on the device of the first. The fake implementations call it too:
    the dispatcher sends a call that mixes a meta tensor with CPU ones to the fake, which would otherwise
    return empty tensors as if the kernel had run."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t
        elif t.device != first.device:
            raise ValueError(f"{name}: on {t.device}, {first_name} on {first.device}; all tensors must be on one "
                             "device")


def as_int(value, name: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """An integer (int, numpy integer, integer tensor of one element) in [low, high], as an int."""
    if type(value) is int and low <= value <= high:  # the common case, first: decode steps call this per layer
        return value
    if isinstance(value, (float, str, bytes)) or value is None:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None
    if not low <= n <= high:
        raise ValueError(f"{name}: must be in [{low}, {high}], got {n}")
    return n


def as_float(value, name: str) -> float:
    """A real number (int, float, numpy scalar, tensor of one element) as a float; its range is the kernels'
    to check (they name the argument too)."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes, bool)) or not (isinstance(value, (numbers.Real, torch.Tensor))):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a number, got a tensor of shape {list(value.shape)}") from None


def as_bool(value, name: str) -> bool:
    """A flag: a bool (or numpy's), not any object that has a truth value ("no" is a non-empty string, true)."""
    if value is True or value is False:
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def as_str(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    return value


def as_window(window_size, name: str = "window_size") -> tuple[int, int]:
    """(left, right) of a local attention window, each -1 (unbounded) or more."""
    if type(window_size) is tuple and len(window_size) == 2:
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return window_size
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair of ints (left, right), got {window_size!r}") from None
    return as_int(left, f"{name}[0]", -1), as_int(right, f"{name}[1]", -1)


def index_tensor(t, name: str, ndim: int, dtype: torch.dtype = torch.int32, low: Optional[int] = None,
                 high: Optional[int] = None) -> torch.Tensor:
    """An integer index tensor as `dtype` (int32 or int64), its values in [low, high] (default: dtype's range).

    The values are read where the conversion narrows them (int64 -> int32 would wrap 2**32 + 3 to 3) and,
    for narrower bounds, on the CPU; CUDA tensors already of `dtype` are not read (that would synchronize),
    the kernels clamp there instead."""
    check_tensor(t, name, ndim)
    check_device(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {t.dtype}")
    info = torch.iinfo(dtype)
    low = info.min if low is None else low
    high = info.max if high is None else high
    narrows = torch.iinfo(t.dtype).max > info.max or torch.iinfo(t.dtype).min < info.min
    bounded = (low, high) != (info.min, info.max)
    if t.numel() and (narrows or (bounded and t.device.type == "cpu")):
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < low or hi > high:
            at = torch.nonzero((t < low) | (t > high))[0].tolist()
            raise ValueError(f"{name}{at}: {int(t[tuple(at)])} is outside [{low}, {high}]")
    return t if t.dtype == dtype else t.to(dtype)


def default_scale(q: torch.Tensor, softmax_scale, name: str = "q") -> float:
    """softmax_scale as a float; None: 1 / sqrt(head_dim), q's last dimension."""
    if softmax_scale is not None:
        return as_float(softmax_scale, "softmax_scale")
    head_dim = q.shape[-1] if q.dim() else 0
    if head_dim < 1:
        raise ValueError(f"{name}: head_dim (the last dimension) must be >= 1, got shape {list(q.shape)}")
    return head_dim ** -0.5


# Below this many bytes an allocation is not checked against the memory the device has left (the check reads
# /proc/meminfo, tens of microseconds: nothing next to what a gigabyte takes to fill, too much per decode step).
_CHECKED_ALLOCATION = 1 << 30


def check_fits(nbytes: int, name: str, what: str, device) -> None:
    """ValueError naming the argument when an allocation it implies (a contiguous copy of a view, an output of
    its size) cannot fit in the memory `device` has left, instead of the allocator's error halfway through.
    A stride-0 view of 2^32 rows costs nothing to make and a terabyte to copy."""
    if nbytes < _CHECKED_ALLOCATION:
        return
    from flashlm.ops.device import available_memory

    available = available_memory(device)
    if available is not None and nbytes > available:
        raise ValueError(f"{name}: {what} needs {nbytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                         f"{torch.device(device)} has available")


def contiguous(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as a contiguous tensor, checked first to fit in memory when it is a view that must be copied."""
    if t.is_contiguous():
        return t
    check_fits(t.numel() * t.element_size(), name, f"a contiguous copy of this {list(t.shape)} view", t.device)
    return t.contiguous()


def is_large(t: torch.Tensor) -> bool:
    """Whether a copy of t, or an output of its size, is one that check_fits checks. The wrappers check the cheap
    shape relations of such tensors first, so that the error says what is wrong rather than what it would
    take; for the others the native checks say it, without a cost per call."""
    return t.numel() * t.element_size() >= _CHECKED_ALLOCATION


def contiguous_last(t: torch.Tensor, name: str) -> torch.Tensor:
    """t with its last dimension contiguous, as the kernels need (they take any other strides): copied only
    where it is not, the copy checked to fit as by contiguous()."""
    if t.dim() == 0 or t.stride(-1) == 1:
        return t
    if t.numel() == 0:  # torch calls any empty tensor contiguous and keeps its strides (e.g. 0 from expand)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return contiguous(t, name)


def new_output(shape, dtype: torch.dtype, device, name: str, fill: Optional[float] = None) -> torch.Tensor:
    """A new tensor of `shape` for a kernel to write, checked first to fit (`name`: the argument whose size it
    follows); `fill`: its initial value, else uninitialised."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _CHECKED_ALLOCATION:  # here too, not only in check_fits: a call per output costs per step
        check_fits(nbytes, name, f"an output of shape {list(shape)}", device)
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)
