"""LayerNorm (flashlm/norm/layer_norm.h) as a differentiable torch.library custom op, with a fake
implementation so it traces under torch.compile.

    out = layer_norm(x, weight, bias, eps)   # F.layer_norm(x, (d,), weight, bias, eps)
    out, mean, rstd = layer_norm_with_stats(x, weight, bias, eps)   # the op itself: and each row's statistics

x is [..., d] (float32 or bfloat16 on the CPU, float16 too on CUDA); weight [d] in x's dtype or float32, bias
[d] in the weight's dtype or None; out has x's shape and dtype. Statistics and the affine step in float32,
rounded once to x's dtype. Its backward (layer_norm_backward) is a native kernel too, fed the forward's row
statistics (two passes over x fewer than recomputing them; the same bits): the weight's and the bias's gradients
are summed over rows in a fixed order of row blocks on the CPU (the same bits for any thread count).
"""

from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import (as_float, check_optional_tensors, check_same_device, check_tensor, check_tensors,
                                contiguous)
from flashlm.ops._util import backward_call, cuda_stream, custom_op


def _check(x, weight, bias) -> None:
    """The checks the native code cannot make (it sees [..., d] tensors as [rows, d]), and the shape one before a
    contiguous copy of x is made."""
    check_tensors("x weight", x, weight, readable=True)
    check_optional_tensors("bias", bias, readable=True)
    if x.dim() == 0:
        check_tensor(x, "x", layout="[..., d]", min_ndim=1)  # raises
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: shape {list(weight.shape)} differs from x's last dimension [{x.shape[-1]}]")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"bias: shape {list(bias.shape)} differs from weight's {list(weight.shape)}")


def _plain(t: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """t as the native code reads it: contiguous, and detached (DLPack refuses tensors that require grad)."""
    return None if t is None else contiguous(t.detach(), name)


@custom_op("flashlm::layer_norm", mutates_args=())
def layer_norm_with_stats(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layernorm(x) * weight + bias over the last dimension in x's dtype, each row's mean, each row's rstd):
    the statistics (float32, x's leading shape) are what the backward takes instead of recomputing them."""
    _check(x, weight, bias)
    eps = as_float(eps, "eps")
    x = _plain(x, "x")
    out = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _C.layer_norm(x, _plain(weight, "weight"), _plain(bias, "bias"), out, mean.view(-1), rstd.view(-1), eps,
                  cuda_stream(x))
    return out, mean, rstd


@layer_norm_with_stats.register_fake
def _(x, weight, bias, eps):
    _check(x, weight, bias)
    check_same_device(x=x, weight=weight, bias=bias)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), mean, torch.empty_like(mean)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """layernorm(x) * weight + bias over the last dimension, in x's dtype (differentiable). Eager training calls
    run the registered op's function and backward without the dispatcher (register_autograd's eager=True: a
    LayerNorm of gpt2's [512, 256] took ~100 us more per forward + backward through it, as much as the kernels);
    torch.compile traces the registered op."""
    return layer_norm_with_stats(x, weight, bias, eps)[0]


@custom_op("flashlm::layer_norm_backward", mutates_args=())
def layer_norm_backward(x: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor, eps: float,
                        mean: Optional[torch.Tensor] = None,
                        rstd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight and dbias in weight's dtype) of out = layer_norm(x, weight, bias, eps) given
    dout (the bias does not enter the gradients); mean and rstd: the forward's (layer_norm_with_stats), else
    recomputed from x alike."""
    _check(x, weight, None)
    check_tensors("dout", dout)
    check_optional_tensors("mean rstd", mean, rstd)
    if dout.shape != x.shape:
        raise ValueError(f"dout: shape {tuple(dout.shape)} differs from x's {tuple(x.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None and t.shape != x.shape[:-1]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from x's rows {tuple(x.shape[:-1])}")
    eps = as_float(eps, "eps")
    x, dout = _plain(x, "x"), _plain(dout, "dout")
    mean, rstd = (None if t is None else _plain(t, name).view(-1) for t, name in ((mean, "mean"), (rstd, "rstd")))
    dx = torch.empty_like(x)
    dweight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    dbias = torch.empty_like(dweight)
    _C.layer_norm_backward(x, _plain(weight, "weight"), dout, dx, dweight, dbias, mean, rstd, eps, cuda_stream(x))
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype)


@layer_norm_backward.register_fake
def _(x, weight, dout, eps, mean=None, rstd=None):
    _check(x, weight, None)
    check_same_device(x=x, weight=weight, dout=dout, mean=mean, rstd=rstd)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps = eps


def _grad(ctx, dout, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward_call(ctx, layer_norm_backward, x, weight, dout.to(x.dtype), ctx.eps, mean, rstd)
    wants = ctx.needs_input_grad
    return dx, dweight if wants[1] else None, dbias if wants[2] else None, None


layer_norm_with_stats.register_autograd(_grad, setup_context=_setup, eager=True)
