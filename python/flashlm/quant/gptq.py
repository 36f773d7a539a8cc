"""GPTQ int4 (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"; the reference is the gptq/AutoGPTQ repos' fasterquant), producing Int4Linear weights in the
packed layout of quant/rtn.py.

For a linear with weights W [N, K] and calibration inputs X [T, K], GPTQ minimises ||X W^T - X Q^T|| by rounding
W one column at a time and spreading each column's rounding error over the columns not yet rounded, through
the inverse of the Hessian H = 2 X^T X / T:
- H is damped, H + damp * mean(diag H) * I; a column no input ever reaches (diag 0) gets diag 1 and weight 0.
- U = the upper Cholesky factor of H^-1; after rounding column j, err = (w_j - q_j) / U[j, j] and the later
  columns take w -= err * U[j, j+1:]. Within a block of 128 columns this runs column by column; the columns
  after the block are updated once per block (the "lazy batch" update, one matrix product).
- Scales and zero points (rtn.py's rule, symmetric or min-max) are set for a group when its first column is
  reached, from the error-corrected weights of the whole group. (The reference repos read the group of the
  weights as they stood at the start of the 128-column block: the same thing for group 128, slightly stale for
  groups 32 and 64 inside a block. Here the blocked and the plain column-by-column algorithms agree exactly.)
- act_order: columns are rounded in order of decreasing diag(H). With groups, each group's scale and zero point
  are set up front from the original weights of its K-contiguous columns (AutoGPTQ's static groups), so the
  stored weights keep the Int4Linear layout: codes are permuted back, scales stay per contiguous group.

gptq_quantize runs a model block by block: each block's Hessians come from the outputs of the blocks before it
already quantized (as GPTQ does), then its linears become Int4Linear and it is run again to feed the next.
"""

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from flashlm.quant.calib_inputs import (block_linears, check_block_linears, check_calib_tokens, first_block_inputs,
                                        linear_input_hooks, run_block)
from flashlm.quant.linear import Int4Linear
from flashlm.quant.rtn import check_group_size, int4_codes, int4_group_params, pack_int4

BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01


class HessianAccumulator:
    """H = 2 X^T X / T over every row of X given so far (a running mean, as GPTQ keeps it)."""

    def __init__(self, in_features: int):
        self.in_features, self.h, self.rows = in_features, None, 0

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, in_features], on the device H is to live on."""
        if self.h is None:
            self.h = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        t = x.shape[0]
        self.h *= self.rows / (self.rows + t)
        self.rows += t
        x = x.float() * (2.0 / self.rows) ** 0.5
        self.h.addmm_(x.T, x)


def _check_options(group_size: int, k: int, damp: float, block_size: int) -> None:
    check_group_size(group_size, k)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 < damp < 1e6:
        raise ValueError(f"damp: must be a positive number, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % group_size:
        raise ValueError(f"block_size: must be a positive multiple of group_size {group_size}, got {block_size!r}")


@contextmanager
def _one_thread(device: torch.device):
    """One CPU thread for the column loop: its ops are a few thousand elements each, and on a machine with other
    work the thread pool's hand-offs cost several times the work itself (measured 4.5x on a loaded 2-core host).
    The block GEMMs outside keep every thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(h: torch.Tensor, where: str) -> torch.Tensor:
    """The upper Cholesky factor U of h^-1 (h^-1 = U^T U)."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(f"damp: the damped Hessian of {where} is not positive definite; raise damp or give more "
                         "calibration data")
    return chol


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                         damp: float = DEFAULT_DAMP, act_order: bool = False, block_size: int = BLOCK_SIZE,
                         where: str = "weight"):
    """GPTQ of w [N, K] with the Hessian [K, K] of its inputs -> (codes uint8 [N, K] in 0..15, scales [N, K/group],
    zeros [N, K/group]) with w ~ (codes - zeros) * scales group-wise; zeros are 8 when symmetric. Runs in float64
    when hessian is float64, else float32; scales and zeros come back as float32."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if hessian.shape != (k, k) or not hessian.is_floating_point():
        raise ValueError(f"hessian: expected a float [{k}, {k}] tensor, got {hessian.dtype} {tuple(hessian.shape)}")
    _check_options(group_size, k, damp, block_size)
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    H = hessian.detach().to(W.device, dtype).clone()
    if not bool(torch.isfinite(H).all()) or not bool(torch.isfinite(W).all()):
        raise ValueError(f"{where}: weights or calibration inputs hold inf or NaN")
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = k // group_size
    scales = torch.zeros(n, groups, dtype=dtype, device=W.device)
    zeros = torch.zeros(n, groups, dtype=dtype, device=W.device)
    perm = None
    if act_order:
        s, z = int4_group_params(W.reshape(n, groups, group_size), symmetric, 1.0)
        scales, zeros = s[..., 0], z[..., 0]
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = (perm // group_size).tolist()
    H.diagonal().add_(damp * H.diagonal().mean())
    U = _inverse_cholesky(H, where)
    # Column-major from here (Wt [K, N]): each column rounded is one contiguous row, and the error feedback
    # within a block updates whole rows; strided column access of [N, K] cost most of the time.
    Wt = W.T.contiguous()
    codes = torch.zeros(k, n, dtype=dtype, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]
        errs = torch.zeros(i2 - i1, n, dtype=dtype, device=W.device)
        with _one_thread(W.device):
            for i in range(i2 - i1):
                col = i1 + i
                if act_order:
                    g = group_of[col]
                else:
                    g = col // group_size
                    if col % group_size == 0:  # the group's params from its error-corrected weights
                        s, z = int4_group_params(W1[i:i + group_size].T, symmetric, 1.0)
                        scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                s, z = scales[:, g], zeros[:, g]
                u = int4_codes(W1[i], s, z)
                codes[col] = u
                err = (W1[i] - (u - z) * s) / U1[i, i]
                W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
                errs[i] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ errs
    codes = codes.T
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scales.float(), zeros.float()


def gptq_linear(linear: nn.Linear, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                damp: float = DEFAULT_DAMP, act_order: bool = False, where: str = "weight") -> Int4Linear:
    """An Int4Linear of linear's weights rounded by GPTQ against the Hessian of its inputs."""
    codes, scales, zeros = gptq_quantize_weight(linear.weight, hessian, group_size, symmetric, damp, act_order,
                                                where=where)
    packed = pack_int4(codes, group_size)
    return Int4Linear.from_quantized(linear, packed, scales, None if symmetric else zeros, group_size)


@torch.no_grad()
def gptq_quantize(model, calib_tokens: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  damp: float = DEFAULT_DAMP, act_order: bool = False, progress: Optional[callable] = None):
    """Replaces every block linear of a flashlm Transformer by a GPTQ-rounded Int4Linear, in place, block by block
    over calib_tokens (int64 [rows, seq]); embeddings, norms and the lm head stay float. Returns the model.
    progress(i, n_blocks), when given, is called after each block."""
    tokens = check_calib_tokens(calib_tokens, model)
    _check_options(group_size, group_size, damp, BLOCK_SIZE)
    check_block_linears(model, group_size)
    xs, ropes = first_block_inputs(model, tokens)
    for i, block in enumerate(model.blocks):
        linears = block_linears(block)
        hessians = {name: HessianAccumulator(m.in_features) for name, m in linears}
        with linear_input_hooks(block, lambda name, x: hessians[name].add(x)) as shared:
            run_block(block, xs, ropes[i])
        for name, linear in linears:
            if name not in shared:  # a layer the block's forward never calls
                raise ValueError(f"calib_tokens: blocks.{i}.{name} received no calibration input")
            h = hessians[shared[name]].h
            q = gptq_linear(linear, h, group_size, symmetric, damp, act_order, where=f"blocks.{i}.{name}")
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, q)
        xs = run_block(block, xs, ropes[i])  # the quantized block feeds the next
        if progress is not None:
            progress(i + 1, len(model.blocks))
    return model
