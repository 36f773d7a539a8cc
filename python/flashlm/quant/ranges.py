"""Clipping thresholds for static int8 activations, from a calibration pass's statistics (LayerStats).

A threshold T gives the per-tensor activation scale T / 127 (Int8Linear's act_scale): x is quantized as
clamp(round(x / scale), -127, 127), so values beyond T are clipped.
- "minmax": T = max |x| seen; nothing clipped, the coarsest steps.
- "percentile": T = the p-th percentile of |x| (default 99.99), read off the histogram: the upper edge of the
  bin where the cumulative count reaches p% (so T is within one bin width above the exact quantile).
- "kl": TensorRT's entropy calibration. For each candidate threshold i bins (128 .. 2048): P is the
  histogram's first i bins with the clipped tail added to its last bin; Q is the first i bins (no tail)
  merged into 128 levels, each level's count spread evenly over its non-empty bins. T = the edge of the
  candidate with the least KL(P || Q) (the largest such candidate on a tie, as TensorRT).
"""

import numpy as np

from flashlm.quant.calibrate import LayerStats

ACT_CALIBRATIONS = ("minmax", "percentile", "kl")
INT8_LEVELS = 128  # |x| maps to 0..127


def minmax_threshold(stats: LayerStats) -> float:
    return stats.absmax


def _hist(stats: LayerStats) -> tuple[np.ndarray, float]:
    hist = stats.hist.numpy().astype(np.float64)
    if hist.ndim != 1 or hist.size == 0 or not np.all(hist >= 0):
        raise ValueError("stats: the histogram must be a non-empty 1-D array of counts")
    return hist, stats.hist_max / hist.size


def percentile_threshold(stats: LayerStats, percentile: float = 99.99) -> float:
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile: must lie in (0, 100], got {percentile}")
    hist, width = _hist(stats)
    total = hist.sum()
    if total == 0 or stats.hist_max == 0:
        return 0.0
    cdf = np.cumsum(hist)
    i = int(np.searchsorted(cdf, percentile / 100.0 * total))  # the first bin whose cdf reaches p%
    return min(i + 1, hist.size) * width


def kl_divergences(hist: np.ndarray, levels: int = INT8_LEVELS, start: int = INT8_LEVELS) -> np.ndarray:
    """KL(P || Q) of each candidate i = start .. len(hist) (the module docstring), as float64 [len - start + 1];
    inf where Q misses mass P has. Candidates are computed CHUNK at a time as rows of [CHUNK, len] arrays
    (a Python loop over candidates took 0.2 s a layer)."""
    n = hist.size
    if start < levels or start > n:
        raise ValueError(f"start: must lie in [{levels}, {n}], got {start}")
    cumulative = np.concatenate(([0.0], np.cumsum(hist)))
    nonzero = np.concatenate(([0], np.cumsum(hist > 0)))
    bins = np.arange(n)
    out = []
    for first in range(start, n + 1, _CHUNK):
        i = np.arange(first, min(first + _CHUNK, n + 1))[:, None]  # [C, 1] candidates
        inside = bins[None, :] < i  # [C, n]
        p = np.where(inside, hist[None, :], 0.0)
        p[np.arange(len(i)), i[:, 0] - 1] += cumulative[n] - cumulative[i[:, 0]]  # the tail into the last bin
        # level of bin b: floor(b * levels / i); level k's bins start at ceil(k * i / levels)
        edges = -(-np.arange(levels + 1)[None, :] * i // levels)  # [C, levels + 1]
        sums = cumulative[edges[:, 1:]] - cumulative[edges[:, :-1]]
        counts = nonzero[edges[:, 1:]] - nonzero[edges[:, :-1]]
        density = np.divide(sums, counts, out=np.zeros(sums.shape), where=counts > 0)
        level = np.minimum(bins[None, :] * levels // i, levels - 1)
        q = np.where(inside & (hist[None, :] > 0), np.take_along_axis(density, level, axis=1), 0.0)
        out.append(_kl_rows(p, q))
    return np.concatenate(out)


_CHUNK = 128


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL of each row's normalized p against its normalized q: inf where q is 0 and p is not."""
    ps, qs = p.sum(axis=1, keepdims=True), q.sum(axis=1, keepdims=True)
    pn = p / np.where(ps > 0, ps, 1.0)
    qn = q / np.where(qs > 0, qs, 1.0)
    m = pn > 0
    ratio = np.divide(pn, qn, out=np.ones_like(pn), where=m & (qn > 0))
    kl = np.sum(np.where(m, pn * np.log(ratio), 0.0), axis=1)
    return np.where(np.any(m & (qn == 0), axis=1), np.inf, kl)


def kl_threshold(stats: LayerStats, levels: int = INT8_LEVELS) -> float:
    hist, width = _hist(stats)
    if hist.sum() == 0 or stats.hist_max == 0:
        return 0.0
    if hist.size < levels:
        raise ValueError(f"stats: the histogram has {hist.size} bins, fewer than the {levels} levels")
    kl = kl_divergences(hist, levels, levels)
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))  # the last of equal minima
    return (best + levels) * width


def threshold(stats: LayerStats, method: str, percentile: float = 99.99) -> float:
    """The clipping threshold of one layer's input under `method` (ACT_CALIBRATIONS)."""
    if method == "minmax":
        return minmax_threshold(stats)
    if method == "percentile":
        return percentile_threshold(stats, percentile)
    if method == "kl":
        return kl_threshold(stats)
    raise ValueError(f"act_calib: must be one of {ACT_CALIBRATIONS}, got {method!r}")


def act_scale(stats: LayerStats, method: str, percentile: float = 99.99) -> float:
    """The static int8 activation scale threshold / 127. An input that was zero throughout gets 1.0: any
    scale quantizes zeros to zero."""
    t = threshold(stats, method, percentile)
    return t / 127.0 if t > 0 else 1.0
