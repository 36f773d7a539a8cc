"""The fused AdamW step (flashlm/optim/adamw.h) over a list of tensors: one parameter group.

Not a torch.library op: it updates lists of tensors in place and is called from an optimizer's step(),
outside autograd and compilation.
"""

from typing import Sequence, Union

import torch

from flashlm import _C
from flashlm.ops._check import as_bool, as_float, as_int, check_tensor, check_tensors
from flashlm.ops._util import cuda_stream

PARAM_DTYPES_CPU = (torch.float32, torch.bfloat16)
PARAM_DTYPES_CUDA = (torch.float32, torch.float16, torch.bfloat16)


def _check_list(tensors, name: str, n: int, device: torch.device) -> None:
    """A list of n tensors on `device`."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != n:
        raise ValueError(f"{name}: {len(tensors)} tensors for {n} params")
    for i, t in enumerate(tensors):
        check_tensor(t, f"{name}[{i}]")
        if t.device != device:
            raise ValueError(f"{name}[{i}]: on {t.device}, params[0] on {device}; one call takes one device")


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
        raise TypeError(f"params: expected a list of tensors, got {type(params).__name__}")
    n = len(params)
    device = None
    if n:
        check_tensors("params[0]", params[0], readable=True)
        device = params[0].device
    for name, tensors in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        _check_list(tensors, name, n, device)
    if isinstance(step, (list, tuple)):
        steps = [as_int(s, f"step[{i}]") for i, s in enumerate(step)]
    else:
        steps = [as_int(step, "step")] * n
    if len(steps) != n:
        raise ValueError(f"step: {len(steps)} values for {n} params")
    hyper = [as_float(v, name) for name, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
                                                ("weight_decay", weight_decay))]
    maximize = as_bool(maximize, "maximize")
    if n == 0:
        return
    allowed = PARAM_DTYPES_CUDA if device.type == "cuda" else PARAM_DTYPES_CPU
    for i, p in enumerate(params):
        if p.dtype not in allowed:
            raise ValueError(f"params[{i}]: dtype must be one of {allowed} on {p.device.type}, got {p.dtype}")
    _C.adamw_step(
        [_plain(p) for p in params], [_plain(g) for g in grads], [_plain(m) for m in exp_avgs],
        [_plain(v) for v in exp_avg_sqs], steps, *hyper, maximize, cuda_stream(params[0]))
