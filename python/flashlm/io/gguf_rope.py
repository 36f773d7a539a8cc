"""Llama 3's rope scaling as a GGUF stores it: not as metadata but as the tensor rope_freqs.weight, one factor per
rotary frequency (convert_hf_to_gguf.py divides each frequency theta^(-2i/hd) by it). flashlm's ModelConfig
describes the scaling by HF's parameters (factor, low/high_freq_factor, original_max_position_embeddings), so
they are recovered from the factors here.

The parameters are not unique: the factors only depend on factor and on the line
    smooth(wavelength) = old / wavelength / (high - low) - low / (high - low)
that the blended frequencies lie on, so low_freq_factor is fixed to 1 and the rest solved for; where fewer
than two frequencies are blended, the cut-offs are put between the neighbouring frequencies. The result is
checked by recomputing every factor, and anything that is not Llama 3's scaling raises ValueError.
"""

from __future__ import annotations

import math

import torch

_REL_TOL = 1e-5  # the factors are stored as float32


def _factors(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """convert_hf_to_gguf's rope factors for HF's llama3 parameters (float64)."""
    wavelen = 2 * math.pi / inv_freq
    old, low, high, factor = (rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"],
                              rs["factor"])
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    return 1.0 / ((1 - smooth) / factor + smooth)


def llama3_scaling_from_factors(factors: torch.Tensor, inv_freq: torch.Tensor) -> dict | None:
    """HF's rope_scaling dict reproducing `factors` [hd/2] for the unscaled frequencies `inv_freq` [hd/2]
    (float64), or None when every factor is 1."""
    f = factors.double()
    if not bool(torch.isfinite(f).all()) or float(f.min()) < 1 - _REL_TOL:
        raise ValueError("rope_freqs.weight: factors must be finite and >= 1 (Llama 3's rope scaling)")
    factor = float(f.max())
    if factor <= 1 + _REL_TOL:
        return None
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    kept = f <= 1 + _REL_TOL
    scaled = f >= factor * (1 - _REL_TOL)
    blended = ~(kept | scaled)
    # smooth = (1/f - 1/factor) / (1 - 1/factor) for the blended frequencies; smooth = a x + b
    s = (1 / f - 1 / factor) / (1 - 1 / factor)
    if int(blended.sum()) >= 2:
        xs, ss = x[blended], s[blended]
        a = float(((xs - xs.mean()) * (ss - ss.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        b = float(ss.mean() - a * xs.mean())
    else:
        # no line to fit: put smooth's 0 and 1 between the scaled and the kept frequencies
        x_hi = float(x[kept].min()) if bool(kept.any()) else float(x.max()) * 2  # s >= 1 from here up
        x_lo = float(x[scaled].max()) if bool(scaled.any()) else float(x.min()) / 2  # s <= 0 from here down
        if bool(blended.any()):  # one blended point: the line through it, 0 at x_lo's side
            xb, sb = float(x[blended][0]), float(s[blended][0])
            x0 = (x_lo + xb) / 2
            a = sb / (xb - x0)
        else:
            x0 = (x_lo + x_hi) / 2
            a = 2 / (x_hi - x_lo)
        b = -a * x0
    if not (a > 0 and b < 0):
        raise ValueError("rope_freqs.weight: the factors are not Llama 3's rope scaling")
    # with low = 1: b = -1 / (high - 1), a = old / (high - 1)
    high = 1 - 1 / b
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
          "original_max_position_embeddings": -a / b}
    # the round numbers a real config has (8192, 4.0) when they give the same factors
    rounded = dict(rs, factor=round(factor, 4), high_freq_factor=round(high, 4),
                   original_max_position_embeddings=round(-a / b))
    for candidate in (rounded, rs):
        err = float(((_factors(inv_freq, candidate) - f).abs() / f).max())
        if err <= _REL_TOL:
            return candidate
    raise ValueError(f"rope_freqs.weight: the factors are not Llama 3's rope scaling (best fit is off by "
                     f"{err:.2e} relative)")
