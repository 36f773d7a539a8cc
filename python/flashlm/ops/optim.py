"""The fused AdamW step (flashlm/optim/adamw.h) over a list of tensors: one parameter group.

Not a torch.library op: it updates lists of tensors in place and is called from an optimizer's step(),
outside autograd and compilation.
"""

from typing import Sequence, Union

import torch

from flashlm import _C
from flashlm.ops._util import cuda_stream

PARAM_DTYPES_CPU = (torch.float32, torch.bfloat16)
PARAM_DTYPES_CUDA = (torch.float32, torch.float16, torch.bfloat16)


def _check_list(tensors, name: str, n: int) -> None:
    if not isinstance(tensors, (list, tuple)):
        raise ValueError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != n:
        raise ValueError(f"{name}: {len(tensors)} tensors for {n} params")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")


def _plain(t: torch.Tensor) -> torch.Tensor:
    # DLPack refuses tensors that require grad; the update is outside autograd anyway.
    return t.detach() if t.requires_grad else t


def adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: Union[int, Sequence[int]],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """One AdamW update of every params[i] in place, with torch.optim.AdamW's semantics.

    params and grads share a dtype (float32 or bfloat16; float16 too on CUDA); exp_avgs and exp_avg_sqs are
    float32; all contiguous, on one device. `step` is the step count after this update (1 for the first),
    one for all or one per parameter.
    """
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"params: expected a list of tensors, got {type(params).__name__}")
    n = len(params)
    _check_list(params, "params", n)
    _check_list(grads, "grads", n)
    _check_list(exp_avgs, "exp_avgs", n)
    _check_list(exp_avg_sqs, "exp_avg_sqs", n)
    steps = [int(step)] * n if isinstance(step, (int, float)) else [int(s) for s in step]
    if len(steps) != n:
        raise ValueError(f"step: {len(steps)} values for {n} params")
    if n == 0:
        return
    device = params[0].device
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"params[{i}]: on {p.device}, params[0] on {device}; one call takes one device")
        allowed = PARAM_DTYPES_CUDA if p.device.type == "cuda" else PARAM_DTYPES_CPU
        if p.dtype not in allowed:
            raise ValueError(f"params[{i}]: dtype must be one of {allowed} on {p.device.type}, got {p.dtype}")
    _C.adamw_step(
        [_plain(p) for p in params], [_plain(g) for g in grads], [_plain(m) for m in exp_avgs],
        [_plain(v) for v in exp_avg_sqs], steps, float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(maximize), cuda_stream(params[0]))
