"""The calibration pass (flashlm.quant.calibrate) and the static activation thresholds (flashlm.quant.ranges).

References: the statistics against direct computations on the same activations (torch, float64); the
histogram against exact counts of |x| below each bin edge; the percentile against numpy's quantile (within
the histogram's bin width, the method's resolution); KL against a plain float64 transcription of TensorRT's
entropy calibration, and on a histogram whose best threshold is known (KL 0 at exactly one candidate).
"""

import math
import sys

import numpy as np
import pytest
import torch

from eval_data import ByteTokenizer, byte_model
from flashlm.quant import Int4Linear, Int8Linear
from flashlm.quant.calibrate import HIST_BINS, LayerStats, calibrate, linear_layers, token_batches
from flashlm.quant.ranges import act_scale, kl_divergences, kl_threshold, percentile_threshold, threshold


def stats_of(*batches):
    s = LayerStats(batches[0].shape[-1])
    for b in batches:
        s.update(b)
    return s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_stats_against_direct(seed):
    g = torch.Generator().manual_seed(seed)
    k = 24
    # the max grows from batch to batch (the histogram widens twice, then by 8x), and a zero-only batch first
    batches = [torch.zeros(3, k)] + [torch.randn(5, 7, k, generator=g) * scale for scale in (0.5, 1.0, 3.0, 40.0)]
    batches[2][..., 5] *= 20  # an outlier channel
    s = stats_of(*batches)
    x = torch.cat([b.reshape(-1, k) for b in batches]).double()
    assert s.tokens == x.shape[0]
    assert s.min == float(x.min()) and s.max == float(x.max())
    assert s.absmax == float(x.abs().max())
    assert torch.equal(s.channel_absmax, x.abs().amax(dim=0).float())
    # float32 squares summed in float64: each term, and so the sum of these positive terms, within 2^-24
    torch.testing.assert_close(s.channel_sq_sum, x.square().sum(dim=0), rtol=2.0**-24, atol=0)
    # The histogram: every count in, the range within twice the max, and below each edge e the count of
    # |x| < e, up to values within float rounding of e (histc's bin arithmetic is float32).
    a = x.abs().flatten().numpy()
    assert s.hist.sum() == a.size
    assert a.max() <= s.hist_max < 2 * a.max()
    edges = np.arange(1, HIST_BINS + 1) * (s.hist_max / HIST_BINS)
    below = np.searchsorted(np.sort(a), edges, side="left")
    near = np.array([np.sum(np.abs(a - e) <= 1e-6 * s.hist_max) for e in edges])
    cdf = np.cumsum(s.hist.numpy())
    bad = np.nonzero(np.abs(cdf - below) > near)[0]
    assert bad.size == 0, f"histogram cdf at bin {bad[0]}: {cdf[bad[0]]} vs {below[bad[0]]} values below its edge"


def test_histogram_of_zeros_then_values():
    s = stats_of(torch.zeros(4, 8), torch.full((1, 8), 2.0))
    assert s.hist_max == 2.0 and s.hist[0] == 32 and s.hist[-1] == 8 and s.hist.sum() == 40


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p", [50.0, 99.0, 99.99, 100.0])
def test_percentile_against_numpy(seed, p):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 16, generator=g)
    x[::97, 3] *= 30  # rare large values
    s = stats_of(x[:1000], x[1000:] * 2)
    a = torch.cat((x[:1000], x[1000:] * 2)).abs().flatten().double().numpy()
    exact = np.quantile(a, p / 100, method="inverted_cdf")  # the smallest value with p% at or below it
    t = percentile_threshold(s, p)
    width = s.hist_max / HIST_BINS
    # the upper edge of the bin holding the quantile (edges up to float32 rounding of histc)
    assert t - width - 1e-6 * s.hist_max <= exact <= t + 1e-6 * s.hist_max, (t, exact, width)


def test_minmax_threshold():
    x = torch.randn(100, 8)
    x[3, 2] = -17.0
    s = stats_of(x)
    assert threshold(s, "minmax") == 17.0 and act_scale(s, "minmax") == 17.0 / 127


def kl_reference(hist, levels=128):
    """TensorRT's entropy calibration, transcribed plainly: per candidate i, P = bins[:i] with the tail
    added to bin i - 1; Q = bins[:i] merged into `levels` levels (bin b in level floor(b * levels / i)),
    each level's sum spread over its non-empty bins; KL of the normalized P and Q."""
    out = []
    for i in range(levels, len(hist) + 1):
        p = [float(c) for c in hist[:i]]
        p[-1] += float(sum(hist[i:]))
        level_sum, level_nonzero = [0.0] * levels, [0] * levels
        for b in range(i):
            lv = b * levels // i
            level_sum[lv] += hist[b]
            level_nonzero[lv] += hist[b] > 0
        q = [level_sum[b * levels // i] / level_nonzero[b * levels // i] if hist[b] > 0 else 0.0 for b in range(i)]
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pb, qb in zip(p, q):
            if pb > 0:
                kl = math.inf if qb == 0 else kl + pb / ps * math.log((pb / ps) / (qb / qs))
        out.append(kl)
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_divergences_against_reference(seed):
    rng = np.random.default_rng(seed)
    a = np.abs(rng.standard_normal(20000))
    a[: 40] *= 8  # outliers
    hist, _ = np.histogram(a, bins=300, range=(0, a.max()))
    hist = hist.astype(np.float64)
    hist[rng.integers(0, 300, 20)] = 0  # empty bins inside the range
    got, want = kl_divergences(hist), kl_reference(hist)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-12)


def test_kl_threshold_known_answer():
    # Counts constant within each pair of bins on the first 256 bins, nothing beyond (the range is wider):
    # at 256 bins Q (128 levels of two bins) equals P, KL = 0; every other candidate either clips mass into
    # its last bin or merges unequal bins, KL > 0.
    rng = np.random.default_rng(0)
    s = LayerStats(4)
    pairs = rng.integers(1, 1000, 128).astype(np.float64)
    hist = np.zeros(HIST_BINS)
    hist[:256] = np.repeat(pairs, 2)
    s.hist, s.hist_max, s.tokens = torch.from_numpy(hist), 8.0, 1
    kl = kl_divergences(hist)
    assert kl[256 - 128] == 0.0 and np.all(np.delete(kl, 256 - 128) > 0)
    assert kl_threshold(s) == 256 * 8.0 / HIST_BINS


def test_kl_threshold_clips_outliers():
    # A Gaussian with a few far outliers: KL clips (threshold well below the max), min-max does not.
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    x[:3, 0] = 60.0
    s = stats_of(x)
    t = kl_threshold(s)
    assert 2.0 < t < 10.0 and threshold(s, "minmax") == 60.0


def test_thresholds_of_all_zero_input():
    s = stats_of(torch.zeros(10, 4))
    for method in ("minmax", "percentile", "kl"):
        assert threshold(s, method) == 0.0 and act_scale(s, method) == 1.0


def test_range_arguments():
    s = stats_of(torch.randn(10, 4))
    with pytest.raises(ValueError, match="^percentile"):
        percentile_threshold(s, 0.0)
    with pytest.raises(ValueError, match="^act_calib"):
        threshold(s, "mse")
    with pytest.raises(ValueError, match="^calibration"):
        s.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


# --- the pass over a model -----------------------------------------------------------------------------------

def test_calibrate_model_against_direct():
    model = byte_model(seq_len=64)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, seq_len=64, batch_size=2)
    block_linears = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q", "attn.k", "attn.v", "attn.o",
                                                                   "mlp.gate", "mlp.up", "mlp.down")}
    assert set(stats) == set(linear_layers(model)) and block_linears <= set(stats)
    rows = ids[: 4 * 64].view(4, 64)  # 300 tokens: 4 rows of 64, the tail dropped
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.tok_emb(rows)).reshape(-1, model.cfg.d_model).double()
    s = stats["blocks.0.attn.q"]
    assert s.tokens == 4 * 64
    torch.testing.assert_close(s.channel_absmax.double(), x.abs().amax(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.channel_sq_sum, x.square().sum(dim=0), rtol=1e-5, atol=0)  # x: recomputed
    assert s.hessian is None
    assert all(st.tokens == 4 * 64 for st in stats.values())
    assert stats["blocks.1.mlp.down"].in_features == model.cfg.d_ff
    assert not model.training


def test_calibrate_text_and_quantized_models():
    model = byte_model(seq_len=32)
    for block in model.blocks:
        block.attn.q = Int8Linear.from_float(block.attn.q)
        block.mlp.up = Int4Linear.from_float(block.mlp.up, group_size=32)
    text = "calibration text, long enough for a few rows of thirty-two bytes. " * 3
    stats = calibrate(model, text, tokenizer=ByteTokenizer(), seq_len=32, max_batches=2, progress=True)
    assert stats["blocks.0.attn.q"].tokens == 64 and stats["blocks.1.mlp.up"].tokens == 64
    assert linear_layers(model)["blocks.0.attn.q"] is model.blocks[0].attn.q


def test_empty_and_bad_calibration_data():
    model = byte_model(seq_len=32)
    with pytest.raises(ValueError, match="^data: empty"):
        calibrate(model, [], seq_len=32)
    with pytest.raises(ValueError, match="^data: empty"):
        calibrate(model, torch.arange(10), seq_len=32)
    with pytest.raises(ValueError, match="^tokenizer"):
        calibrate(model, "some text", seq_len=4)
    with pytest.raises(ValueError, match="^data"):
        token_batches([[0.5, 1.5]], 2, 1)
    with pytest.raises(ValueError, match="^seq_len"):
        token_batches([1, 2, 3], 0, 1)
    with pytest.raises(ValueError, match="^data: token id 300"):
        calibrate(model, [1, 2, 300] * 20, seq_len=32)
    with pytest.raises(ValueError, match="^data: token id -1"):
        calibrate(model, np.full(64, -1), seq_len=32)
    assert token_batches(np.arange(8), 4, 1)[1].tolist() == [[4, 5, 6, 7]]
    assert token_batches([np.arange(3), [3, 4, 5]], 2, 3)[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="^layers"):
        calibrate(model, torch.arange(64), seq_len=32, layers=["blocks.0.attn.nope"])


def test_hessian_against_direct():
    model = byte_model(seq_len=32)
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(2))
    stats = calibrate(model, ids, seq_len=32, batch_size=2, hessian=True, layers=["blocks.0.attn.q", "blocks.1.mlp.down"])
    assert set(stats) == {"blocks.0.attn.q", "blocks.1.mlp.down"}
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.tok_emb(ids.view(2, 32))).reshape(-1, model.cfg.d_model).double()
    h = stats["blocks.0.attn.q"].hessian
    torch.testing.assert_close(h, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))
    torch.testing.assert_close(h, h.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.diagonal(), stats["blocks.0.attn.q"].channel_sq_sum, rtol=2.0**-23, atol=0)
    assert stats["blocks.1.mlp.down"].hessian.shape == (model.cfg.d_ff, model.cfg.d_ff)
