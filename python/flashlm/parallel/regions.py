"""The autograd functions that frame a tensor-parallel region (Megatron's f and g, and their sequence-parallel
forms): each is a collective of the group in forward and the conjugate one in backward.

    enter(x, tp, sp)   x [B, T, d] the same on every rank (sp: this rank's T / tp positions) -> x [B, T, d]
                       on every rank, to be multiplied by column-parallel weights.
                       forward identity, backward all-reduce (sp: all-gather / reduce-scatter on T)
    leave(y, tp, sp)   y [B, T, d], this rank's partial sum (a row-parallel product) -> the sum over the group
                       (sp: this rank's T / tp positions of it).
                       forward all-reduce, backward identity (sp: reduce-scatter / all-gather on T)

A group of one rank passes tensors through.
"""

import torch

from flashlm.parallel.mesh import Group


def _identity(x, group: Group):
    return x.view_as(x)


def _sum(x, group: Group):
    return group.all_reduce(x.contiguous())


def _gather_positions(x, group: Group):
    """[B, T / n, ...] of every rank -> [B, T, ...] (the group's collectives concatenate the first dimension)."""
    return group.all_gather(x.movedim(1, 0).contiguous()).movedim(0, 1)


def _scatter_positions(x, group: Group):
    """[B, T, ...], summed over the group -> this rank's [B, T / n, ...]."""
    return group.reduce_scatter(x.movedim(1, 0).contiguous()).movedim(0, 1)


class _Conjugate(torch.autograd.Function):
    """forward_op forward and backward_op backward (each (tensor, group) -> tensor)."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.group), None, None, None


def enter(x, group: Group, sequence_parallel: bool = False):
    if group.size == 1:
        return x
    ops = (_gather_positions, _scatter_positions) if sequence_parallel else (_identity, _sum)
    return _Conjugate.apply(x, group, *ops)


def leave(x, group: Group, sequence_parallel: bool = False):
    if group.size == 1:
        return x
    ops = (_scatter_positions, _gather_positions) if sequence_parallel else (_sum, _identity)
    return _Conjugate.apply(x, group, *ops)
