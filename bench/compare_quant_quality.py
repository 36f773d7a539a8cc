#!/usr/bin/env python3
"""compare_quant_quality: perplexity of one small trained model under each quantization method, side by side.

A byte-level llama (vocabulary 256) is trained here, in a few minutes on a CPU, on the text of this
repository's Markdown documents; the last tenth of that text is held out. Each method quantizes a copy of the
float model and its perplexity is measured on the held-out text (disjoint windows of --seq tokens, every
token after a window's first scored). Calibration data is the start of the training text (the default of
`--calib-data`: part of the training corpus), --calib-tokens tokens, one calibration pass per model
(flashlm.quant.calibrate).

The table is METHODS: name -> a function (float model, calibration token ids) -> quantized model. Add a row
for a new method there. Rows today:
  float                       the trained model
  w8a8 rtn dynamic            every block linear Int8Linear: per-channel int8 weights, per-token activations
  w8a8 rtn static <calib>     the same with one static activation scale per layer input, from min-max,
                              the 99.99th percentile or KL (TensorRT's entropy calibration) of the pass
  smoothquant dynamic|<calib> SmoothQuant (alpha --alpha) first, then as above (static ranges from a second
                              pass over the smoothed model)
  int4 g<G> rtn|gptq|awq      every block linear Int4Linear (symmetric groups of --group-size): round to
                              nearest, GPTQ, AWQ (calibration rows of --seq tokens)
  gguf <mix> [imatrix]        the model written to a GGUF file and quantized with `flashlm quantize --type
                              <mix>` (--gguf-mixes), with and without an importance matrix collected from the
                              calibration text; perplexity by flashlm (the loaded GGUF file) and by llama.cpp
                              (llama-cpp-python, the same windows and tokens) in its own column
The reference is the float row; goal: every calibrated method at or below its RTN counterpart's perplexity.
The K-quants and IQ4_XS need rows of a multiple of 256 (d_model and d_ff): a smaller model gets llama.cpp's
fallback types for those tensors.
Timings: the calibration pass against a plain forward over the same batches (the hooks' cost).

Run (from the repository root, with flashlm installed or PYTHONPATH=python):
  python bench/compare_quant_quality.py             # d_model 256, d_ff 768, 4 layers, 300 steps
  python bench/compare_quant_quality.py --quick     # a tiny model, 60 steps: CI smoke, under a minute
  python bench/compare_quant_quality.py --steps 0 --layers 2 --calib-tokens 8192   # random weights: minutes
"""

import argparse
import copy
import datetime
import glob
import math
import os
import sys
import tempfile
import time

import torch

from bench_util import cpu_model, print_table, rtn_int4
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import awq_quantize, gptq_quantize
from flashlm.quant.calibrate import calibrate, token_batches
from flashlm.quant.sensitivity import perplexity
from flashlm.quant.smoothquant import smooth_model
from flashlm.quant.w8a8 import quantize_w8a8
from quant_quality_gguf import VOCAB, gguf_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus() -> torch.Tensor:
    """The bytes of the repository's Markdown files as int64 token ids, in a fixed order."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md"))
                   + glob.glob(os.path.join(ROOT, "bench", "*.md")))
    data = b"\n\n".join(open(p, "rb").read() for p in paths)
    return torch.tensor(list(data), dtype=torch.int64)


def train(cfg: ModelConfig, ids: torch.Tensor, steps: int, batch: int, lr: float) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s: s + cfg.seq_len] for s in starts])
        y = torch.stack([ids[s + 1: s + cfg.seq_len + 1] for s in starts])
        for group in opt.param_groups:  # linear warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return model.eval().requires_grad_(False)


def w8a8(act_calib, smooth, alpha, seq):
    def build(model, calib_ids):
        model = copy.deepcopy(model)
        if smooth:
            smooth_model(model, calibrate(model, calib_ids, seq_len=seq, batch_size=8), alpha)
        stats = calibrate(model, calib_ids, seq_len=seq, batch_size=8) if act_calib else None
        quantize_w8a8(model, stats, act_calib)
        return model
    return build


def int4(quantize, group_size, seq):
    def build(model, calib_ids):
        model = copy.deepcopy(model)
        quantize(model, calib_ids[: calib_ids.numel() // seq * seq].view(-1, seq), group_size, True)
        return model
    return build


def methods(alpha: float, seq: int, group_size: int, calibs, smooth_calibs) -> dict:
    table = {"float": lambda model, calib_ids: model}
    for smooth, prefix in ((False, "w8a8 rtn"), (True, "smoothquant")):
        table[f"{prefix} dynamic"] = w8a8(None, smooth, alpha, seq)
        for calib in smooth_calibs if smooth else calibs:
            table[f"{prefix} static {calib}"] = w8a8(calib, smooth, alpha, seq)
    for name, quantize in (("rtn", rtn_int4), ("gptq", gptq_quantize), ("awq", awq_quantize)):
        table[f"int4 g{group_size} {name}"] = int4(quantize, group_size, seq)
    return table


def calibration_cost(model, calib_ids, seq) -> tuple[float, float]:
    """(seconds of a plain forward over the calibration batches, seconds of the calibration pass)."""
    batches = token_batches(calib_ids, seq, 8)
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in batches:
            model(b)
        plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate(model, calib_ids, seq_len=seq, batch_size=8)
    return plain, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=None, help="default 3 x d_model (rows of 256 for the K-quants)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--group-size", type=int, default=128, help="the int4 rows' group")
    ap.add_argument("--gguf-mixes", default="Q4_0,Q4_K_M,Q3_K_M,IQ4_XS", help="the GGUF rows' mixes")
    ap.add_argument("--quick", action="store_true", help="a tiny model, few steps: a smoke run")
    args = ap.parse_args()
    calibs = smooth_calibs = ("minmax", "percentile", "kl")
    if args.quick:  # what fits the minute: one static calibration (without smoothing), int4 g32, two GGUF mixes
        args.d_model, args.layers, args.steps, args.calib_tokens = 64, 2, 60, 1024
        args.group_size, args.gguf_mixes, calibs, smooth_calibs = 32, "Q4_0,Q4_K_M", ("kl",), ()
    d_ff = args.d_ff or 3 * args.d_model
    ids = corpus()
    split = ids.numel() * 9 // 10
    train_ids, held_out = ids[:split], ids[split:]
    if args.quick:  # every row is scored on it: a fifth of the held-out text keeps the run in the minute
        held_out = held_out[: held_out.numel() // 5]
    calib_ids = train_ids[: args.calib_tokens]
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=args.layers, n_head=max(2, args.d_model // 64),
                      n_kv_head=max(1, args.d_model // 128), d_model=args.d_model, d_ff=d_ff, seq_len=args.seq)
    print(f"training {cfg.arch} d{args.d_model} L{args.layers} on {train_ids.numel()} bytes, {args.steps} steps",
          file=sys.stderr)
    model = train(cfg, train_ids, args.steps, args.batch, args.lr)

    rows = []
    for name, build in methods(args.alpha, args.seq, args.group_size, calibs, smooth_calibs).items():
        t0 = time.perf_counter()
        quantized = build(model, calib_ids)
        seconds = time.perf_counter() - t0
        ppl = perplexity(quantized, held_out, args.seq)
        rows.append((name, ppl, None, seconds))
        print(f"  {name}: {ppl:.4f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        rows += gguf_rows(model, cfg, calib_ids, held_out, args.seq, args.gguf_mixes.split(","), folder)
    base = rows[0][1]
    plain, calib = calibration_cost(model, calib_ids, args.seq)

    print(f"\n{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"`python bench/compare_quant_quality.py{''.join(' ' + a for a in sys.argv[1:])}`")
    print(f"model: byte-level llama d{args.d_model} ff{d_ff} L{args.layers} T{args.seq}, {args.steps} steps on "
          f"{train_ids.numel()} bytes; held out {held_out.numel()} bytes; calibration {calib_ids.numel()} tokens\n")
    print_table(["method", "perplexity", "vs float", "llama.cpp perplexity", "quantize s"],
                [(n, f"{p:.4f}", f"{100 * (p / base - 1):+.2f}%", "" if q is None else f"{q:.4f}", f"{s:.1f}")
                 for n, p, q, s in rows])
    print(f"\ncalibration pass: {calib:.2f} s against {plain:.2f} s for a plain forward over the same "
          f"{calib_ids.numel() // args.seq} rows")


if __name__ == "__main__":
    main()
