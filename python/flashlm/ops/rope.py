"""The training path's rotary embedding (flashlm/runtime/rope.h) as a differentiable torch.library custom op.

    q = rope(q, cos, sin)      # q [..., T, heads, hd]; cos, sin [T, hd]: rope_factors' tables (sin signed)

The same result as flashlm.models.transformer.apply_rope (in float32 bit for bit: the kernel rounds as torch's
addcmul), in one pass; its gradient is the transposed rotation (rope_backward), one pass too. The tables are
constants (no gradient). float32 or bfloat16 on the CPU, float16 too on CUDA; the tables in x's dtype.
"""

import torch

from flashlm import _C
from flashlm.ops._check import check_same_device, check_tensor, check_tensors, contiguous
from flashlm.ops._util import backward_call, cuda_stream, custom_op


def _check(x, cos, sin, name="x") -> None:
    check_tensors(f"{name} cos sin", x, cos, sin)
    check_tensor(x, name, layout="[..., T, heads, hd]", min_ndim=3)
    want = (x.shape[-3], x.shape[-1])
    for table_name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"{table_name}: expected shape [T, hd] = {list(want)}, got {list(t.shape)}")


def _run(x, cos, sin, transpose: bool) -> torch.Tensor:
    x, cos, sin = (contiguous(t.detach(), n) for t, n in ((x, "x"), (cos, "cos"), (sin, "sin")))
    out = torch.empty_like(x)
    _C.rope_rotate(x, cos, sin, out, transpose, cuda_stream(x))
    return out


@custom_op("flashlm::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + roll(x, hd / 2) * sin over the last dimension, position t = x's dimension -3."""
    _check(x, cos, sin)
    return _run(x, cos, sin, False)


@rope.register_fake
def _(x, cos, sin):
    _check(x, cos, sin)
    check_same_device(x=x, cos=cos, sin=sin)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("flashlm::rope_backward", mutates_args=())
def rope_backward(dout: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rope(x, cos, sin) with respect to x, given dout: the transposed rotation."""
    _check(dout, cos, sin, "dout")
    return _run(dout, cos, sin, True)


@rope_backward.register_fake
def _(dout, cos, sin):
    _check(dout, cos, sin, "dout")
    check_same_device(dout=dout, cos=cos, sin=sin)
    return torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _grad(ctx, dout):
    cos, sin = ctx.saved_tensors
    return backward_call(ctx, rope_backward, dout.to(cos.dtype), cos, sin), None, None


rope.register_autograd(_grad, setup_context=_setup, eager=True)
