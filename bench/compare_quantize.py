#!/usr/bin/env python3
"""compare_quantize: flashlm's GGUF quantizer against gguf-py's, one table per run.

For each type: a float32 weight matrix (4096 x 4096 normal values by default) is quantized by
  flashlm   flashlm.quant.quantize_gguf (native, rows split over flashlm's thread pool),
  gguf-py   gguf.quants.quantize (llama.cpp's Python package: numpy, one thread), for the types it has
            (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; the K-quants are timed for flashlm alone).
Before timing, the two outputs are compared byte for byte (the script stops if they differ). Each
measurement warms up, then takes the median of --reps runs, the two taking turns (bench_util).
"M elem/s" is millions of input elements per second; "x gguf-py" is gguf-py's median time over flashlm's.
The ceiling here is compute, not memory: a quantizer reads 4 bytes and writes ~0.5-1 byte per element,
far below the memory bandwidth even at gguf-py's speed.

Run (from the repository root, with flashlm installed):
  python bench/compare_quantize.py                        # Q4_0, Q8_0, Q4_K, Q6_K on 4096 x 4096
  python bench/compare_quantize.py --types Q4_0,Q5_1 --rows 1024
  python bench/compare_quantize.py --quick                # a few seconds: CI smoke
"""

import argparse
import importlib.metadata
import platform
import sys

import numpy as np
import torch

import flashlm
import flashlm.ops
import gguf
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.quant import GGUF_QUANT_TYPES, quantize_gguf

GGUF_PY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096, help="a multiple of 256")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K", help="comma-separated GGML types")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement; the median is reported")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a small matrix and few runs: a smoke test in seconds")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.cols, args.reps, args.warmup = 64, 1024, 3, 1
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in GGUF_QUANT_TYPES]
    if unknown:
        ap.error(f"--types: unknown {', '.join(unknown)} (known: {', '.join(GGUF_QUANT_TYPES)})")
    if args.cols % 256 or args.rows < 1 or args.reps < 1:
        ap.error("--cols must be a multiple of 256, --rows and --reps >= 1")

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    n = x.size
    rows = []
    for name in types:
        fns = {"flashlm": (lambda name=name: quantize_gguf(x, name), "cpu")}
        if name in GGUF_PY_TYPES:
            qtype = gguf.GGMLQuantizationType[name]
            ref = gguf.quants.quantize(x, qtype)
            ours = quantize_gguf(x, name)
            if not np.array_equal(ours, ref):
                sys.exit(f"compare_quantize: {name}: flashlm's bytes differ from gguf-py's in "
                         f"{int((ours != ref).sum())} places. Not timing a wrong quantizer.")
            fns["gguf-py"] = (lambda qtype=qtype: gguf.quants.quantize(x, qtype), "cpu")
        medians = median_seconds(fns, args.reps, args.warmup)
        t_ours, t_ref = medians["flashlm"], medians.get("gguf-py")
        rows.append([name, "yes" if t_ref else "n/a", f"{t_ours * 1e3:.1f}", f"{n / t_ours / 1e6:.0f}",
                     fmt(t_ref and t_ref * 1e3, ".1f"), fmt(t_ref and n / t_ref / 1e6, ".1f"),
                     fmt(t_ref and t_ref / t_ours, ".1f")])

    print(hardware_line("cpu", flashlm.ops, f"gguf-py/numpy 1 thread, torch {torch.get_num_threads()} threads"))
    print(f"flashlm {flashlm.__version__}, gguf-py {importlib.metadata.version('gguf')}, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print(f"float32 [{args.rows}, {args.cols}] ({n * 4 / 2**20:.3g} MiB) normal values; median of {args.reps} "
          f"interleaved runs after {args.warmup} warm-up")
    print()
    print_table(["type", "bytes = gguf-py", "flashlm ms", "flashlm M elem/s", "gguf-py ms", "gguf-py M elem/s",
                 "x gguf-py"], rows)


if __name__ == "__main__":
    main()
