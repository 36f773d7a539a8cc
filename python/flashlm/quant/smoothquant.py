"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a linear layer carry activations far larger than the rest, and one int8 scale per
token (or per tensor) must cover them, so the other channels get few levels. SmoothQuant divides input
channel j by s_j and multiplies weight column j by s_j, which leaves x @ W.T unchanged:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (alpha = 0.5 by default)

with max|W_j| over every layer fed by the same input. Dividing x by s costs nothing where x comes out of a
norm: the norm's weight (and bias) is divided by s instead. So the layers smoothed are those right after a
block's norms: q, k, v after attn_norm, and gate, up (llama) or fc (gpt2) after mlp_norm. The channel maxima
come from a calibration pass over the float model (flashlm.quant.calibrate); quantize with
flashlm.quant.w8a8 afterwards.
"""

import torch
from torch import nn

from flashlm.quant.calibrate import LayerStats

# (norm, the linears that read its output) of each block
SMOOTH_GROUPS = (("attn_norm", ("attn.q", "attn.k", "attn.v")),
                 ("mlp_norm", ("mlp.gate", "mlp.up")),
                 ("mlp_norm", ("mlp.fc",)))


def smooth_factors(act_absmax: torch.Tensor, weights: list, alpha: float = 0.5) -> torch.Tensor:
    """s [K] float32 for input channels with activation maxima act_absmax [K] feeding weights [N_i, K]; a
    channel whose activations or weights are all zero keeps s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    k = act_absmax.shape[0]
    if any(w.dim() != 2 or w.shape[1] != k for w in weights):
        raise ValueError(f"weights: every weight must be [N, {k}], got {[tuple(w.shape) for w in weights]}")
    a = act_absmax.double()
    w = torch.cat([w.detach().double().abs() for w in weights]).amax(dim=0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s)).float()


@torch.no_grad()
def smooth_model(model: nn.Module, stats: dict, alpha: float = 0.5) -> dict:
    """Smooth `model` (a float flashlm Transformer) in place with the channel maxima of `stats` (calibrate's
    result on this model); returns {norm name: s}. The model's output is unchanged up to float rounding."""
    applied = {}
    for i, block in enumerate(model.blocks):
        for norm_name, linear_names in SMOOTH_GROUPS:
            linears = [(f"blocks.{i}.{n}", _submodule(block, n)) for n in linear_names]
            linears = [(n, m) for n, m in linears if m is not None]
            if not linears:
                continue
            norm = getattr(block, norm_name)
            for name, m in linears:
                if type(m) is not nn.Linear:
                    raise ValueError(f"model: {name} is {type(m).__name__}; SmoothQuant needs the float model")
                if name not in stats:
                    raise ValueError(f"stats: no calibration statistics for {name}")
            first: LayerStats = stats[linears[0][0]]
            s = smooth_factors(first.channel_absmax, [m.weight for _, m in linears], alpha)
            s = s.to(norm.weight.device)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            for _, m in linears:
                m.weight.mul_(s.to(m.weight.dtype))
            applied[f"blocks.{i}.{norm_name}"] = s
    return applied


def _submodule(block: nn.Module, dotted: str):
    try:
        return block.get_submodule(dotted)
    except AttributeError:
        return None
