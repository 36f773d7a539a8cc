"""Learned step size quantization (LSQ, Esser et al. 2020) for the int8 and symmetric int4 QAT weights.

A weight w with step s becomes w_q = clamp(round(w / s), qn, qp) * s. The step is a trained parameter (one per
output channel for int8, one per group for int4), initialised from RTN's scale (flashlm.quant.rtn), and its
gradient is LSQ's:

    d w_q / d s = round(v) - v   where qn < v < qp   (v = w / s)
                = qn             where v <= qn
                = qp             where v >= qp

summed over the weights sharing the step and multiplied by the grad scale g = 1 / sqrt(numel * qp) (numel: the
layer's weight count, qp: the largest positive code), which keeps the steps' updates in proportion to the
weights'. The weights' gradient is the straight-through one on the same range: the identity where
qn < v < qp, zero elsewhere (LSQ's rule; it is v, not the rounded code, that decides).

Codes: int8 -127..127 (Int8Linear's), symmetric int4 -8..7 (Int4Linear's codes 0..15 less its zero point 8).
RTN's symmetric int4 step is negative where a group's largest magnitude is negative (it maps to code -8); the
formulas hold for either sign. A zero step (an all-zero group or row at initialisation) counts as 1 when
dividing, as rtn rounds it, so the layer's values there stay zero.
"""

import math

import torch

INT8_CODES = (-127, 127)
INT4_CODES = (-8, 7)


def safe_step(step: torch.Tensor) -> torch.Tensor:
    """step with its zeros replaced by 1 (the divisor rtn uses)."""
    return torch.where(step != 0, step, torch.ones_like(step))


def lsq_grad_scale(numel: int, qp: int) -> float:
    """LSQ's gradient scale 1 / sqrt(numel * qp)."""
    return 1.0 / math.sqrt(numel * qp)


def lsq_codes(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, v): codes = clamp(round(v), qn, qp) as float32 and v = w / step (step broadcast against w)."""
    v = w.detach().float() / safe_step(step.detach().float())
    return torch.round(v).clamp_(qn, qp), v


def lsq_grads(grad_wq: torch.Tensor, codes: torch.Tensor, v: torch.Tensor, qn: int, qp: int, step_shape,
              grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw, dstep) from grad_wq, the loss's gradient with respect to the dequantized weights (codes * step).
    codes, v and grad_wq share one shape; dstep is summed to step_shape (which broadcasts against it)."""
    inside = (v > qn) & (v < qp)
    dw = grad_wq * inside
    # round(v) - v inside; outside, the clamped code is qn or qp, which codes already hold.
    d_step = torch.where(inside, codes - v, codes)
    dims = [i for i, n in enumerate(step_shape) if n == 1 and codes.shape[i] != 1]
    dstep = (grad_wq.float() * d_step).sum(dim=dims, keepdim=True) * grad_scale
    return dw, dstep
