"""The calibration pass: run a model over calibration text and record what every linear layer is fed.

    stats = calibrate(model, token_ids, seq_len=256, batch_size=4)         # or text + tokenizer=...
    stats["blocks.0.attn.q"].channel_absmax                               # [in_features]

One pass feeds every calibration method: forward hooks on each linear layer (nn.Linear, Int8Linear,
Int4Linear, GGUFLinear; any module with `in_features`) collect, per layer, over all calibration tokens:
- min and max of x;
- a histogram of |x|: 2048 bins over [0, hist_max]. When a batch's max |x| passes hist_max, the range is
  doubled (as often as needed) and each pair of bins merged into one, as TensorRT's histogram calibrator
  widens its range: the old counts fall exactly into the new bins (no approximation), and hist_max stays
  within twice the true max;
- per input channel: max |x| (SmoothQuant, AWQ) and the sum of x^2 (llama.cpp's importance matrix), with the
  token count;
- with hessian=True, the sum of x^T x [in_features, in_features] in float64 (GPTQ's Hessian, 2 X^T X / n):
  K^2 numbers a layer, so only when asked for.
Static activation ranges come from the histogram (flashlm.quant.ranges).
"""

import math
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

HIST_BINS = 2048
_DOCUMENT_TYPES = (str, list, tuple, torch.Tensor, np.ndarray)  # a list of these is a list of documents


@dataclass
class LayerStats:
    """What one linear layer's input held over the calibration data."""
    in_features: int
    tokens: int = 0
    min: float = math.inf
    max: float = -math.inf
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIST_BINS, dtype=torch.float64))
    hist_max: float = 0.0  # the histogram's range is [0, hist_max]; bin width hist_max / HIST_BINS
    channel_absmax: torch.Tensor = None  # float32 [in_features]
    channel_sq_sum: torch.Tensor = None  # float64 [in_features]
    hessian: Optional[torch.Tensor] = None  # float64 [in_features, in_features]: sum of x^T x, where collected

    def __post_init__(self):
        if self.channel_absmax is None:
            self.channel_absmax = torch.zeros(self.in_features, dtype=torch.float32)
        if self.channel_sq_sum is None:
            self.channel_sq_sum = torch.zeros(self.in_features, dtype=torch.float64)

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.tokens else 0.0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., in_features] (any float dtype, any device)."""
        x = x.detach().reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))  # NaN if any is
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("calibration: a linear layer's input holds inf or NaN; the model or its data is broken")
        self.tokens += x.shape[0]
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        a = x.abs()
        self.channel_absmax = torch.maximum(self.channel_absmax, a.amax(dim=0).cpu())
        # float32 squares (each within 2^-24 of the exact one) summed in float64
        self.channel_sq_sum += a.square().sum(dim=0, dtype=torch.float64).cpu()
        self._add_to_hist(a, max(-lo, hi))
        if self.hessian is not None:
            xd = x.double()
            self.hessian += (xd.T @ xd).cpu()

    def _add_to_hist(self, a: torch.Tensor, top: float) -> None:
        if top > self.hist_max:
            if self.hist_max == 0.0:  # so far nothing but zeros, all in bin 0, which stays bin 0
                self.hist_max = top
            else:
                doublings = max(1, math.ceil(math.log2(top / self.hist_max)))
                while self.hist_max * 2.0 ** doublings < top:  # log2's rounding
                    doublings += 1
                for _ in range(doublings):
                    merged = self.hist.view(HIST_BINS // 2, 2).sum(dim=1)
                    self.hist = torch.cat((merged, torch.zeros(HIST_BINS // 2, dtype=torch.float64)))
                    self.hist_max *= 2.0
        if self.hist_max == 0.0:
            self.hist[0] += a.numel()
            return
        self.hist += torch.histc(a, bins=HIST_BINS, min=0.0, max=self.hist_max).double().cpu()


def linear_layers(model: nn.Module) -> dict:
    """{name: module} of the model's linear layers: modules with in_features and out_features that hold a
    weight (nn.Linear and flashlm's quantized linears); a wrapper's inner base layer is not counted twice."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "in_features", None), int) and hasattr(module, "out_features"):
            if not any(name.startswith(outer + ".") for outer in found):
                found[name] = module
    return found


def token_batches(data, seq_len: int, batch_size: int, tokenizer=None, max_batches: Optional[int] = None) -> list:
    """Calibration data as int64 [batch, seq_len] batches: token ids (a list, a 1-D tensor, or a list of
    such documents, concatenated) or text (a str or a list of str, with `tokenizer`). The ids are cut into
    rows of seq_len; a tail shorter than a row is dropped."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches: must be None or a positive int, got {max_batches!r}")
    ids = _token_ids(data, tokenizer)
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"data: empty calibration data ({ids.numel()} tokens, fewer than one row of seq_len = "
                         f"{seq_len})")
    rows_tensor = ids[: rows * seq_len].view(rows, seq_len)
    batches = list(rows_tensor.split(batch_size))
    return batches if max_batches is None else batches[:max_batches]


def _token_ids(data, tokenizer) -> torch.Tensor:
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (torch.Tensor, np.ndarray)):
        docs = [data]
    elif isinstance(data, (list, tuple)):
        docs = list(data) if data and isinstance(data[0], _DOCUMENT_TYPES) else [data]
    else:
        raise ValueError(f"data: expected token ids or text, got {type(data).__name__}")
    out = []
    for doc in docs:
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError("tokenizer: text calibration data needs the model's tokenizer")
            doc = tokenizer.encode(doc)
        t = torch.as_tensor(doc)
        if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool)):
            raise ValueError(f"data: each document must be a 1-D sequence of token ids, got {t.dtype} "
                             f"{tuple(t.shape)}")
        out.append(t.to(torch.int64))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def calibrate(model: nn.Module, data, *, tokenizer=None, seq_len: int = 512, batch_size: int = 1,
              max_batches: Optional[int] = None, layers: Optional[Sequence[str]] = None,
              hessian: bool = False, progress: bool = False) -> dict:
    """Run `model` (a flashlm Transformer, float or quantized) over `data` (see token_batches) and return
    {layer name: LayerStats} for every linear layer (or those named in `layers`), each with the sum of
    x^T x when `hessian`. seq_len is capped at the model's context (cfg.seq_len). The model runs in eval mode
    on its own device; its training flag is restored afterwards."""
    found = linear_layers(model)
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"layers: {missing[0]!r} is not a linear layer of the model")
        found = {n: found[n] for n in layers}
    cfg = getattr(model, "cfg", None)
    seq_len = min(seq_len, cfg.seq_len) if cfg is not None and isinstance(seq_len, int) else seq_len
    batches = token_batches(data, seq_len, batch_size, tokenizer, max_batches)
    if cfg is not None:
        ids = torch.cat([b.flatten() for b in batches])
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= cfg.vocab_size)][0])
            raise ValueError(f"data: token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
    stats = {name: LayerStats(module.in_features) for name, module in found.items()}
    if hessian:
        for st in stats.values():
            st.hessian = torch.zeros(st.in_features, st.in_features, dtype=torch.float64)
    handles = [module.register_forward_pre_hook(_hook(stats[name])) for name, module in found.items()]
    device = next(model.parameters(), next(model.buffers(), torch.zeros(0))).device
    was_training = model.training
    model.eval()
    try:
        bar = _progress(len(batches), progress)
        for batch in batches:
            model(batch.to(device))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _hook(layer_stats: LayerStats):
    def hook(module, args):
        layer_stats.update(args[0])
    return hook


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", desc="calibrate", file=sys.stderr, disable=None)
