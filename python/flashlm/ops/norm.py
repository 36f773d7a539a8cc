"""RMSNorm (flashlm/norm/rms_norm.h) as a torch.library custom op, with a fake implementation so it traces
under torch.compile.

    out = rms_norm(x, weight, eps)                      # HF LlamaRMSNorm: weight * (x / rms(x)).to(x.dtype)
    out = rms_norm(x, weight, eps, residual=residual)   # vLLM's fused_add_rms_norm: residual += x (in place),
                                                        # then out = rms_norm(residual)

x is [..., d] (float32 or bfloat16 on the CPU, float16 too on CUDA); weight [d] in x's dtype or float32;
out has x's shape and dtype. Statistics in float32; for 16-bit x, y = x / rms(x) is rounded to x's dtype
before the weight multiplies it, as HF's module computes it. rms_norm has no autograd (the model calls it where
no gradient is wanted, and for the fused residual form); the training path calls

    out = rms_norm_train(x, weight, eps)                # the same forward, differentiable: its backward
                                                        # (rms_norm_backward) is a native kernel too
"""

from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import (as_float, check_fits, check_optional_tensors, check_same_device, check_tensor,
                                check_tensors, contiguous)
from flashlm.ops._util import backward_call, cuda_stream, custom_op


def _as_rows(t: torch.Tensor) -> bool:
    """Whether the native code can see t [..., d] as [rows, d] in place: a contiguous last dimension and leading
    dimensions that collapse into one row stride (any contiguous tensor; a 2-D one with strided rows)."""
    if t.is_contiguous():
        return True
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    expect = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if expect is not None and stride != expect:
            return False
        expect = stride * size
    return True


def _view_as_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A view x the native code can read as rows: itself, or a contiguous copy. Either way the output (and the
    copy) may be far larger than x's memory (a stride-0 view of 2^32 rows), so they are checked to fit first."""
    if _as_rows(x):
        check_fits(x.numel() * x.element_size(), "x", "an output of x's size", x.device)
        return x
    if weight.shape != x.shape[-1:]:  # before the copy: a stride-0 view of 2^32 columns is a wrong d first
        raise ValueError(f"x: last dimension {x.shape[-1]} differs from weight's shape {list(weight.shape)} [d]")
    return contiguous(x, "x")


def _plain(t: torch.Tensor) -> torch.Tensor:
    # DLPack refuses tensors that require grad (a module's weight under no_grad); the op has no autograd.
    return t.detach() if t.requires_grad else t


def _check(x, weight, residual) -> None:
    """The checks the native code cannot make: it sees [..., d] tensors as [rows, d]."""
    check_tensors("x weight", x, weight, readable=True)
    check_optional_tensors("residual", residual, readable=True)
    if x.dim() == 0:
        check_tensor(x, "x", layout="[..., d]", min_ndim=1)  # raises
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


@custom_op("flashlm::rms_norm", mutates_args=("residual",))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dimension, in x's dtype; with residual: residual += x first (in
    place, rounded to x's dtype) and the sum is what is normalised."""
    # Decode-sized calls are dominated by this function's own overhead (the kernel takes ~1 us): no views,
    # and torch.empty_like, several us cheaper than torch.empty(shape, dtype=, device=).
    _check(x, weight, residual)
    eps = as_float(eps, "eps")
    if not x.is_contiguous():
        x = _view_as_rows(x, weight)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    stream = cuda_stream(x) if x.is_cuda else 0
    if residual is not None and not _as_rows(residual):  # update a copy, then the tensor itself
        work = contiguous(residual.detach(), "residual")
        _C.rms_norm(_plain(x), _plain(weight), out, work, eps, stream)
        residual.copy_(work)
        return out
    _C.rms_norm(_plain(x), _plain(weight), out, None if residual is None else _plain(residual), eps, stream)
    return out


@rms_norm.register_fake
def _(x, weight, eps, residual=None):
    _check(x, weight, residual)
    check_same_device(x=x, weight=weight, residual=residual)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("flashlm::rms_norm_train", mutates_args=())
def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x, weight, eps) as a differentiable op (no residual)."""
    return rms_norm(_plain(x), _plain(weight), eps)


@rms_norm_train.register_fake
def _(x, weight, eps):
    _check(x, weight, None)
    check_same_device(x=x, weight=weight)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("flashlm::rms_norm_backward", mutates_args=())
def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight in weight's dtype) of out = rms_norm(x, weight, eps) given dout."""
    _check(x, weight, None)
    check_tensors("dout", dout)
    if dout.shape != x.shape:
        raise ValueError(f"dout: shape {tuple(dout.shape)} differs from x's {tuple(x.shape)}")
    eps = as_float(eps, "eps")
    x, dout = contiguous(_plain(x), "x"), contiguous(_plain(dout), "dout")
    dx = torch.empty_like(x)
    dweight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    _C.rms_norm_backward(x, _plain(weight), dout, dx, dweight, eps, cuda_stream(x) if x.is_cuda else 0)
    return dx, dweight.to(weight.dtype)


@rms_norm_backward.register_fake
def _(x, weight, dout, eps):
    _check(x, weight, None)
    check_same_device(x=x, weight=weight, dout=dout)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


def _train_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _train_grad(ctx, dout):
    x, weight = ctx.saved_tensors
    dx, dweight = backward_call(ctx, rms_norm_backward, x, weight, dout.to(x.dtype), ctx.eps)
    return dx, dweight if ctx.needs_input_grad[1] else None, None


rms_norm_train.register_autograd(_train_grad, setup_context=_train_setup, eager=True)
