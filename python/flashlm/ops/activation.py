"""silu_mul (flashlm/activation/silu_mul.h) as a torch.library custom op with a fake implementation.

    h = silu_mul(gate, up)     # F.silu(gate) * up in one pass: a Llama MLP's input to its down projection

gate and up: one shape and dtype (float32 or bfloat16 on the CPU, float16 too on CUDA). No autograd: the model
calls it only where no gradient is wanted (flashlm.models.transformer.GatedMLP).
"""

import torch

from flashlm import _C
from flashlm.ops._check import check_same_device, check_tensors
from flashlm.ops._util import cuda_stream, custom_op


def _check(gate, up) -> None:
    check_tensors("gate up", gate, up)
    if up.shape != gate.shape:
        raise ValueError(f"up: shape {tuple(up.shape)} differs from gate's {tuple(gate.shape)}")


@custom_op("flashlm::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, element-wise, in gate's dtype."""
    _check(gate, up)
    gate = gate if gate.is_contiguous() else gate.contiguous()
    up = up if up.is_contiguous() else up.contiguous()
    out = torch.empty_like(gate)
    _C.silu_mul(gate.detach(), up.detach(), out, cuda_stream(gate))
    return out


@silu_mul.register_fake
def _(gate, up):
    _check(gate, up)
    check_same_device(gate=gate, up=up)
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
