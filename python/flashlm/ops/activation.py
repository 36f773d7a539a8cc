"""The activation kernels (flashlm/activation/silu_mul.h, gelu_tanh.h) as torch.library custom ops with fake
implementations, and autograd for the training path.

    h = silu_mul(gate, up)     # F.silu(gate) * up in one pass: a Llama MLP's input to its down projection
    h = gelu_tanh(x)           # F.gelu(x, approximate="tanh"): GPT-2's MLP

Both are differentiable: their backward passes are native kernels too (silu_mul_backward, gelu_tanh_backward),
f32 math rounded once to the dtype. Tensors of one shape and dtype (float32 or bfloat16 on the CPU, float16
too on CUDA).
"""

import torch

from flashlm import _C
from flashlm.ops._check import check_same_device, check_tensors
from flashlm.ops._util import backward_call, cuda_stream, custom_op


def _check(names: str, first, *others) -> None:
    check_tensors(names, first, *others)
    for name, t in zip(names.split()[1:], others):
        if t.shape != first.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {names.split()[0]}'s {tuple(first.shape)}")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """t as the native code reads it: contiguous, and detached (DLPack refuses tensors that require grad)."""
    return (t if t.is_contiguous() else t.contiguous()).detach()


@custom_op("flashlm::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, element-wise, in gate's dtype."""
    _check("gate up", gate, up)
    gate, up = _plain(gate), _plain(up)
    out = torch.empty_like(gate)
    _C.silu_mul(gate, up, out, cuda_stream(gate))
    return out


@silu_mul.register_fake
def _(gate, up):
    _check("gate up", gate, up)
    check_same_device(gate=gate, up=up)
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@custom_op("flashlm::silu_mul_backward", mutates_args=())
def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup): the gradients of silu(gate) * up given the output's gradient dout."""
    _check("gate up dout", gate, up, dout)
    gate, up, dout = _plain(gate), _plain(up), _plain(dout)
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    _C.silu_mul_backward(gate, up, dout, dgate, dup, cuda_stream(gate))
    return dgate, dup


@silu_mul_backward.register_fake
def _(gate, up, dout):
    _check("gate up dout", gate, up, dout)
    check_same_device(gate=gate, up=up, dout=dout)
    return torch.empty_like(gate), torch.empty_like(gate)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return backward_call(ctx, silu_mul_backward, gate, up, dout.to(gate.dtype))


silu_mul.register_autograd(_silu_mul_grad, setup_context=_silu_mul_setup, eager=True)


@custom_op("flashlm::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form, element-wise, in x's dtype."""
    check_tensors("x", x)
    x = _plain(x)
    out = torch.empty_like(x)
    _C.gelu_tanh(x, out, cuda_stream(x))
    return out


@gelu_tanh.register_fake
def _(x):
    check_tensors("x", x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("flashlm::gelu_tanh_backward", mutates_args=())
def gelu_tanh_backward(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """dout * gelu_tanh'(x)."""
    _check("x dout", x, dout)
    x, dout = _plain(x), _plain(dout)
    dx = torch.empty_like(x)
    _C.gelu_tanh_backward(x, dout, dx, cuda_stream(x))
    return dx


@gelu_tanh_backward.register_fake
def _(x, dout):
    _check("x dout", x, dout)
    check_same_device(x=x, dout=dout)
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_grad(ctx, dout):
    (x,) = ctx.saved_tensors
    return backward_call(ctx, gelu_tanh_backward, x, dout.to(x.dtype))


gelu_tanh.register_autograd(_gelu_grad, setup_context=_gelu_setup, eager=True)
