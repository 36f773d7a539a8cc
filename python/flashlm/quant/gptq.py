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
Those forward passes run on a dense copy of the block in calib_dtype whose linears take the dequantized int4
weights once rounded: through Int4Linear's kernel one TinyLlama block over 4096 tokens took 7.7-8.4 CPU s,
the float32 dense block 3.0-3.2 (load ~10). calib_dtype defaults to bfloat16 where bfloat16 matmuls are fast
(CUDA, GPTQ's own choice there being float16; CPUs with AMX or AVX512-BF16) and float32 elsewhere: see
default_calib_dtype. Each Hessian is a float32 product of those activations, and the rounding runs in float32
on the model's weights.
"""

import copy
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from flashlm.quant.calib_inputs import (block_linears, check_block_linears, check_calib_tokens, first_block_inputs,
                                        linear_input_hooks, run_block)
from flashlm.quant.linear import Int4Linear
from flashlm.quant.rtn import check_group_size, dequantize_int4, int4_codes, int4_group_params, pack_int4

BLOCK_SIZE = 128
SUB_BLOCK = 16  # divides every group size (rtn.GROUP_SIZES)
DEFAULT_DAMP = 0.01
HESSIAN_STRIP = 512
CALIB_DTYPES = (torch.bfloat16, torch.float32)


class HessianAccumulator:
    """H = 2 X^T X / T over every row of X given so far (a running mean, as GPTQ keeps it)."""

    def __init__(self, in_features: int):
        self.in_features, self.upper, self.rows, self._h = in_features, None, 0, None

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, in_features], on the device H is to live on; its product is taken in float32 whatever
        its dtype (a bfloat16 product, rounded to bfloat16 per call, left the damped Hessian of a small model's
        attention output indefinite)."""
        if self.upper is None:
            self.upper = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        t = x.shape[0]
        self.upper *= self.rows / (self.rows + t)
        self.rows += t
        x = x.float() * (2.0 / self.rows) ** 0.5
        # X^T X is symmetric: only the blocks on and above the diagonal are computed, in strips of
        # HESSIAN_STRIP rows (torch has no syrk). Measured for 4096 rows, 2 threads, load ~11: 5632 inputs
        # 1.70 -> 1.13 CPU s a call (a full addmm against strips of 512), 2048 inputs 0.24 -> 0.19.
        for i in range(0, self.in_features, HESSIAN_STRIP):
            self.upper[i:i + HESSIAN_STRIP, i:].addmm_(x[:, i:i + HESSIAN_STRIP].T, x[:, i:])
        self._h = None

    @property
    def h(self) -> Optional[torch.Tensor]:
        """The full symmetric H (None before any rows)."""
        if self._h is None and self.upper is not None:
            self._h = self.upper.triu() + self.upper.triu(1).T
        return self._h


def _check_damp(damp) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 < damp < 1e6:
        raise ValueError(f"damp: must be a positive number, got {damp!r}")


def _check_options(group_size: int, k: int, damp: float, block_size: int) -> None:
    check_group_size(group_size, k)
    _check_damp(damp)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % group_size:
        raise ValueError(f"block_size: must be a positive multiple of group_size {group_size}, got {block_size!r}")


@contextmanager
def _one_thread(device: torch.device):
    """One CPU thread for GPTQ's rounding (the Cholesky factors, the column loop, the block updates): on a host
    with other work, torch's thread pool waits on a descheduled thread at every step of a blocked factorisation
    or of a loop of small ops. Measured on the shared 2-core host, load average ~27: a 2048 x 2048 damped
    inverse's factors 16.3 s with 2 threads, 1.1 s with 1; one 5632 x 256 weight's column loop 2.29 s with 2,
    0.51 s with 1 (load ~8). The forward passes and the Hessian products (large GEMMs) keep every thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(h: torch.Tensor, where: str) -> torch.Tensor:
    """The upper Cholesky factor U of h^-1 (h^-1 = U^T U). With J the reversal of rows and columns, J h J = L L^T
    gives h = R R^T with R = J L J upper triangular, so h^-1 = R^-T R^-1 and U = R^-1: one Cholesky factor and
    one triangular inverse, where factor, inverse and factor again did ~1.7x the work (one thread, 5632 inputs:
    3.3 s against 1.9 s)."""
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        raise ValueError(f"damp: the damped Hessian of {where} is not positive definite; raise damp or give more "
                         "calibration data")
    return _upper_triangular_inverse(chol.flip(0, 1))


def _upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """r^-1 for an upper triangular r, by halves: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]. A
    triangular solve against the identity does not skip the zeros (one thread, 5632: 1.67 s, by halves 1.0 s)."""
    n = r.shape[0]
    if n <= 256:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True)
    m = n // 2
    a, c = _upper_triangular_inverse(r[:m, :m]), _upper_triangular_inverse(r[m:, m:])
    out = torch.zeros_like(r)
    out[:m, :m], out[m:, m:] = a, c
    out[:m, m:] = -(a @ r[:m, m:]) @ c
    return out


class PreparedHessian:
    """What GPTQ needs of one Hessian for every weight that reads its input (q, k and v; gate and up): the dead
    input columns, the act_order permutation and the upper Cholesky factor U of the damped inverse, computed
    once."""

    def __init__(self, hessian: torch.Tensor, damp: float = DEFAULT_DAMP, act_order: bool = False,
                 where: str = "weight"):
        if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1] or not hessian.is_floating_point():
            raise ValueError(f"hessian: expected a float [K, K] tensor, got {hessian.dtype} {tuple(hessian.shape)}")
        _check_damp(damp)
        self.dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
        H = hessian.detach().to(self.dtype).clone()
        if not bool(torch.isfinite(H).all()):
            raise ValueError(f"{where}: calibration inputs hold inf or NaN")
        self.k, self.act_order = H.shape[0], act_order
        self.dead = H.diagonal() == 0
        H[self.dead, self.dead] = 1.0
        self.perm = None
        if act_order:
            self.perm = torch.argsort(H.diagonal(), descending=True, stable=True)
            H = H[self.perm][:, self.perm]
        H.diagonal().add_(damp * H.diagonal().mean())
        with _one_thread(H.device):
            self.U = _inverse_cholesky(H, where)


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, hessian, group_size: int = 128, symmetric: bool = True,
                         damp: float = DEFAULT_DAMP, act_order: bool = False, block_size: int = BLOCK_SIZE,
                         where: str = "weight"):
    """GPTQ of w [N, K] with the Hessian [K, K] of its inputs (or a PreparedHessian of it, whose damp and
    act_order then apply) -> (codes uint8 [N, K] in 0..15, scales [N, K/group], zeros [N, K/group]) with
    w ~ (codes - zeros) * scales group-wise; zeros are 8 when symmetric. Runs in float64 when hessian is float64,
    else float32; scales and zeros come back as float32."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if isinstance(hessian, torch.Tensor) and (hessian.shape != (k, k) or not hessian.is_floating_point()):
        raise ValueError(f"hessian: expected a float [{k}, {k}] tensor, got {hessian.dtype} {tuple(hessian.shape)}")
    if not isinstance(hessian, torch.Tensor) and hessian.k != k:
        raise ValueError(f"hessian: prepared for K = {hessian.k}, the weights have K = {k}")
    _check_options(group_size, k, damp, block_size)
    prepared = hessian if isinstance(hessian, PreparedHessian) else PreparedHessian(hessian, damp, act_order, where)
    dtype, act_order, perm, U = prepared.dtype, prepared.act_order, prepared.perm, prepared.U
    W = w.detach().to(U.device, dtype).clone()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{where}: weights or calibration inputs hold inf or NaN")
    W[:, prepared.dead] = 0.0
    groups = k // group_size
    scales = torch.zeros(n, groups, dtype=dtype, device=W.device)
    zeros = torch.zeros(n, groups, dtype=dtype, device=W.device)
    if act_order:
        s, z = int4_group_params(W.reshape(n, groups, group_size), symmetric, 1.0)
        scales, zeros = s[..., 0], z[..., 0]
        W = W[:, perm]
        group_of = (perm // group_size).tolist()
    # Column-major from here (Wt [K, N]): each column rounded is one contiguous row, and the error feedback
    # within a block updates whole rows; strided column access of [N, K] cost most of the time.
    with _one_thread(W.device):
        codes = _round_columns(W.T.contiguous(), U, scales, zeros, group_size, symmetric, block_size,
                               group_of if act_order else None)
    codes = codes.T
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scales.float(), zeros.float()


def _round_columns(Wt, U, scales, zeros, group_size: int, symmetric: bool, block_size: int, group_of):
    """GPTQ's loop over the columns of W, given transposed (Wt [K, N], updated in place): the codes [K, N], with
    scales and zeros [N, K/group] filled as each group starts (or given, with group_of: act_order's static
    groups, group_of[j] the group of the j-th column rounded)."""
    k, n = Wt.shape
    codes = torch.zeros(k, n, dtype=Wt.dtype, device=Wt.device)
    group = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]
        errs = torch.zeros(i2 - i1, n, dtype=Wt.dtype, device=Wt.device)
        # Within the block, columns in runs of SUB_BLOCK: the per-column feedback touches the run's rows only,
        # the rest of the block takes the run's errors in one product. A run starts every group (SUB_BLOCK
        # divides the group sizes), so a group's params see every earlier column's feedback.
        for j1 in range(0, i2 - i1, SUB_BLOCK):
            j2 = min(j1 + SUB_BLOCK, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                g = group_of[col] if group_of is not None else col // group_size
                if group_of is None and col % group_size == 0:  # the params from the error-corrected weights
                    s, z = int4_group_params(W1[i:i + group_size].T, symmetric, 1.0)
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                if g != group:  # the group's params, contiguous, once per group (the loop's ops are small)
                    group, s, z = g, scales[:, g].contiguous(), zeros[:, g].contiguous()
                    safe = torch.where(s != 0, s, torch.ones_like(s))
                u = codes[col]
                torch.div(W1[i], safe, out=u).round_().add_(z).clamp_(0, 15)  # rtn.int4_codes, in place
                err = errs[i]
                torch.sub(W1[i], (u - z).mul_(s), out=err).div_(U1[i, i])
                W1[i + 1:j2].addr_(U1[i, i + 1:j2], err, alpha=-1.0)
            W1[j2:] -= U1[j1:j2, j2:].T @ errs[j1:j2]
        Wt[i2:] -= U[i1:i2, i2:].T @ errs
    return codes


def gptq_linear(linear: nn.Linear, hessian, group_size: int = 128, symmetric: bool = True,
                damp: float = DEFAULT_DAMP, act_order: bool = False, where: str = "weight") -> Int4Linear:
    """An Int4Linear of linear's weights rounded by GPTQ against the Hessian of its inputs (or a PreparedHessian
    of it)."""
    codes, scales, zeros = gptq_quantize_weight(linear.weight, hessian, group_size, symmetric, damp, act_order,
                                                where=where)
    packed = pack_int4(codes, group_size)
    return Int4Linear.from_quantized(linear, packed, scales, None if symmetric else zeros, group_size)


def default_calib_dtype(device) -> torch.dtype:
    """The calibration forward's dtype when none is given: bfloat16 on CUDA and on CPUs with bfloat16 matmul
    instructions (AMX, AVX512-BF16), float32 on other CPUs, where torch emulates bfloat16 matmuls. Measured, a
    4096 x 2048 x 5632 GEMM: on AMX (load 0.6) 488 GFLOP/s bfloat16, 170 float32; on AVX-512 without BF16 (load
    ~4) 33 GFLOP/s per CPU second bfloat16, 140 float32, and a TinyLlama block over 4096 tokens 11.4 CPU s
    bfloat16, 3.1 float32. (AVX512-BF16 without AMX was not measured; its dot-product instruction doubles
    float32's multiply-adds per instruction.)"""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    # torch's own reading of cpuid, a private helper: a torch without it gets float32 (~3x slower on AMX)
    features = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    return torch.bfloat16 if features.get("amx_bf16") or features.get("avx512_bf16") else torch.float32


@torch.no_grad()
def gptq_quantize(model, calib_tokens: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  damp: float = DEFAULT_DAMP, act_order: bool = False, progress: Optional[callable] = None,
                  calib_dtype: Optional[torch.dtype] = None):
    """Replaces every block linear of a flashlm Transformer by a GPTQ-rounded Int4Linear, in place, block by block
    over calib_tokens (int64 [rows, seq]); embeddings, norms and the lm head stay float. Returns the model.
    calib_dtype: the blocks' calibration forward, bfloat16 or float32 (None: default_calib_dtype of the model's
    device); the Hessians are summed in float32 and the rounding runs in float32 on the model's own weights
    either way. progress(i, n_blocks), when given, is called after each block."""
    tokens = check_calib_tokens(calib_tokens, model)
    _check_options(group_size, group_size, damp, BLOCK_SIZE)
    if calib_dtype is None:
        calib_dtype = default_calib_dtype(next(model.parameters()).device)
    if calib_dtype not in CALIB_DTYPES:
        raise ValueError(f"calib_dtype: must be one of {CALIB_DTYPES}, got {calib_dtype!r}")
    check_block_linears(model, group_size)
    xs, ropes = first_block_inputs(model, tokens)
    xs = xs.to(calib_dtype)
    for i, block in enumerate(model.blocks):
        work = copy.deepcopy(block).to(calib_dtype)  # its linears take the int4 weights, dequantized
        linears = block_linears(work)
        hessians = {name: HessianAccumulator(m.in_features) for name, m in linears}
        with linear_input_hooks(work, lambda name, x: hessians[name].add(x)) as shared:
            run_block(work, xs, ropes[i])
        prepared = {}
        for name, linear in block_linears(block):
            if name not in shared:  # a layer the block's forward never calls
                raise ValueError(f"calib_tokens: blocks.{i}.{name} received no calibration input")
            where = f"blocks.{i}.{name}"
            if shared[name] not in prepared:  # q, k and v (gate and up) share their input's Hessian
                prepared[shared[name]] = PreparedHessian(hessians[shared[name]].h, damp, act_order, where)
            q = gptq_linear(linear, prepared[shared[name]], group_size, symmetric, damp, act_order, where=where)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, q)
            w = dequantize_int4(q.weight, q.scales, q.zeros, group_size)
            work.get_submodule(name).weight.copy_(w)
        del hessians, prepared
        if i + 1 < len(model.blocks):
            xs = run_block(work, xs, ropes[i])  # the quantized block feeds the next
        if progress is not None:
            progress(i + 1, len(model.blocks))
    return model
