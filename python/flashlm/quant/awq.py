"""AWQ int4 (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"), producing Int4Linear weights in
the packed layout of quant/rtn.py.

The few input channels that carry large activations matter most; AWQ protects them by scaling: for linears
that share an input x, W x = (W diag(s)) (x / s), and rounding W diag(s) loses less on the channels with large
s. Per group of linears:
- s = mean|x|^alpha per input channel (normalised by sqrt(max s * min s)), alpha searched over a grid of 20
  points in [0, 1) for the smallest output error ||X W^T - X (Q(W s) / s)^T||^2 of the group on calibration
  rows (alpha = 0 is plain RTN, so the chosen scales never do worse on them);
- 1/s is folded into the operation that produces x, so the float model computes the same function: the
  block's norm for q/k/v and gate/up (fc for gpt2), v for o (when v's outputs are o's inputs one to one, i.e.
  no grouped KV heads), up for down (down's input is act(gate) * up, linear in up). gpt2's proj follows a GELU
  and keeps s = 1, as do linears whose input has no foldable producer.
- Optional clipping search: each output row's group range is shrunk by the ratio in 1.0 .. 0.5 that gives the
  smallest error of the group's partial outputs X_g (w_g - q_g)^T on a sample of calibration rows (AWQ's
  auto_clip); q and k are left unclipped, as AWQ does (their errors pass through the softmax).

awq_quantize runs block by block over the float model (as AWQ does): folding leaves each block's outputs
unchanged, so the next block's inputs are the float block's outputs.
"""

from typing import Optional

import torch
from torch import nn

from flashlm.quant.calib_inputs import (block_linears, check_block_linears, check_calib_tokens, first_block_inputs,
                                        linear_input_hooks, run_block)
from flashlm.quant.linear import Int4Linear
from flashlm.quant.rtn import (check_group_size, dequantize_int4, int4_codes, int4_group_params, pack_int4,
                               quantize_int4)

N_GRID = 20
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5
SEARCH_ROWS = 2048   # calibration rows (tokens) per input kept for the scale search
CLIP_ROWS = 512      # of which the clipping search reads this many (AWQ's n_sample_token)
NO_CLIP = ("attn.q", "attn.k")


def _scale_groups(block: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """(the module whose output is the linears' input, the linears' dotted names) for each foldable group."""
    groups = [(block.attn_norm, ["attn.q", "attn.k", "attn.v"])]
    if block.attn.v.out_features == block.attn.o.in_features:
        groups.append((block.attn.v, ["attn.o"]))
    if hasattr(block.mlp, "gate"):
        groups += [(block.mlp_norm, ["mlp.gate", "mlp.up"]), (block.mlp.up, ["mlp.down"])]
    else:
        groups.append((block.mlp_norm, ["mlp.fc"]))
    return [(prev, names) for prev, names in groups if getattr(prev, "weight", None) is not None]


class _InputStats:
    """mean|x| per input channel over every row, and every stride-th row of each call (the search sample)."""

    def __init__(self, stride: int):
        self.abs_sum, self.rows, self.stride, self.sample = 0.0, 0, stride, []

    def add(self, x: torch.Tensor) -> None:
        self.abs_sum = self.abs_sum + x.abs().sum(dim=0, dtype=torch.float64)
        self.rows += x.shape[0]
        self.sample.append(x[::self.stride].clone())

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.rows).float()


def _evenly(x: torch.Tensor, rows: int) -> torch.Tensor:
    """About `rows` rows of x, evenly spaced."""
    return x[::max(1, x.shape[0] // rows)]


def _fake_int4(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    packed, s, z = quantize_int4(w, group_size, symmetric)
    return dequantize_int4(packed, s, z, group_size)


def search_scales(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], group_size: int,
                  symmetric: bool, n_grid: int = N_GRID) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales s [K] (and their alpha) minimising the output error of weights (each [N_i, K])
    rounded as Q(W s) / s, on calibration rows x [T, K]."""
    w = torch.cat(weights).float()
    ref = x @ w.T
    best = (float("inf"), None, 0.0)
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (x @ (_fake_int4(w * s, group_size, symmetric) / s).T - ref).square().mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output divided by s (a norm's weight and bias, or a linear's output rows), the linears' input
    columns multiplied by s: the composition computes the same function."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for linear in linears:
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, symmetric: bool,
                ratios=CLIP_RATIOS, rows_per_chunk: int = 256) -> torch.Tensor:
    """Per output row and group, the range ratio [N, K/group, 1] minimising the squared partial outputs
    x_g (w_g - q_g)^T summed over the calibration rows x [T, K]."""
    n, k = w.shape
    xg = x.reshape(x.shape[0], k // group_size, group_size).permute(1, 2, 0)  # [G, group, T]
    best_ratio = torch.ones(n, k // group_size, 1, device=w.device)
    for r0 in range(0, n, rows_per_chunk):
        g = w[r0:r0 + rows_per_chunk].float().reshape(-1, k // group_size, group_size)  # [n', G, group]
        best_err = None
        for r in ratios:
            s, z = int4_group_params(g, symmetric, r)
            diff = g - (int4_codes(g, s, z) - z) * s
            err = torch.matmul(diff.transpose(0, 1), xg).square().sum(-1).T[..., None]  # [n', G, 1]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0:r0 + rows_per_chunk] = torch.where(better, r, best_ratio[r0:r0 + rows_per_chunk])
    return best_ratio


def int4_linear_with_ratios(linear: nn.Linear, ratio: Optional[torch.Tensor], group_size: int,
                            symmetric: bool) -> Int4Linear:
    """An Int4Linear of linear's weights with each row's group range scaled by ratio [N, K/group, 1] (None: 1)."""
    n, k = linear.weight.shape
    g = linear.weight.detach().float().reshape(n, k // group_size, group_size)
    s, z = int4_group_params(g, symmetric, 1.0 if ratio is None else ratio)
    packed = pack_int4(int4_codes(g, s, z).to(torch.uint8).reshape(n, k), group_size)
    return Int4Linear.from_quantized(linear, packed, s.reshape(n, -1).contiguous(),
                                     None if symmetric else z.reshape(n, -1).contiguous(), group_size)


@torch.no_grad()
def awq_quantize(model, calib_tokens: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                 clip: bool = True, n_grid: int = N_GRID, fold_only: bool = False, progress=None):
    """AWQ over a flashlm Transformer, in place: scales searched and folded block by block over calib_tokens
    (int64 [rows, seq]), then (unless fold_only) every block linear replaced by an Int4Linear, its clipping
    searched when clip. Returns {"blocks.i.<first linear>": alpha} of each scaled group."""
    tokens = check_calib_tokens(calib_tokens, model)
    check_group_size(group_size, group_size)
    check_block_linears(model, group_size)
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid: must be a positive integer, got {n_grid!r}")
    xs, ropes = first_block_inputs(model, tokens)
    stride = max(1, -(-tokens.numel() // SEARCH_ROWS))
    alphas = {}
    for i, block in enumerate(model.blocks):
        linears = dict(block_linears(block))
        stats = {name: _InputStats(stride) for name in linears}
        with linear_input_hooks(block, lambda name, x: stats[name].add(x)) as shared:
            ys = run_block(block, xs, ropes[i])
        samples = {name: torch.cat(st.sample) for name, st in stats.items() if st.rows}
        for prev, names in _scale_groups(block):
            key = shared[names[0]]
            if any(shared[n] != key for n in names):
                raise ValueError(f"model: blocks.{i}: {', '.join(names)} do not share their input; AWQ cannot "
                                 "scale them together")
            s, alpha = search_scales(samples[key], stats[key].mean_abs(), [linears[n].weight for n in names],
                                     group_size, symmetric, n_grid)
            fold_scales(prev, [linears[n] for n in names], s)
            samples[key] = samples[key] / s  # the linears' inputs from now on
            alphas[f"blocks.{i}.{names[0]}"] = alpha
        if not fold_only:
            for name, linear in linears.items():
                ratio = None
                if clip and name not in NO_CLIP:
                    ratio = search_clip(linear.weight, _evenly(samples[shared[name]], CLIP_ROWS), group_size,
                                        symmetric)
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf,
                        int4_linear_with_ratios(linear, ratio, group_size, symmetric))
        xs = ys  # folding left the block's outputs as they were
        if progress is not None:
            progress(i + 1, len(model.blocks))
    return alphas
