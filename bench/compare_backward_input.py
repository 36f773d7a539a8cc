#!/usr/bin/env python3
"""compare_backward_input: the input gradient through frozen quantized weights, dx = dy @ W, against a plain
copy (M = 1) and against torch's dequantize-then-matmul (M = 64, 128).

For each weight kind (GGML block types, int8 per channel, int4 per group of 128) and shape N x K (torch order:
W is [N, K], dx = dy @ W), random weights are multiplied with M rows of dy by
  flashlm   flashlm.ops.gguf_linear_backward_input / int8_ / int4_linear_backward_input: the weights are
            read in their stored form (AVX2 on flashlm's thread pool: for M <= 2 and Q4_0, Q8_0, Q4_K, Q6_K,
            int8, int4 multiplied straight from the quants; for M >= 8 a GEMM over panels of W decoded once;
            in between, a few weight rows decoded at a time and added into every row of dx),
  torch     the same W dequantized to float32 on each call (flashlm.ops.dequantize for GGUF, torch ops for
            int8/int4), then torch.matmul: what a training step does without a native backward,
  dense     torch.matmul with W already dequantized to float32 (4-8x the memory; a ceiling for torch),
  flashlm-avx2  where the CPU has AVX-512F and BW: flashlm with its AVX-512 kernels switched off
            (flashlm._C.set_backward_input_avx512(False)), the AVX2 kernels,
  flashlm-rows  for M >= 3: flashlm with its GEMM switched off (flashlm._C.set_backward_input_gemm(False)),
            the path that decodes 4 weight rows at a time and adds them into every row of dx (what M < 8 runs),
and set against a plain copy (`dst.copy_(src)` of 64 MiB), the memory-bandwidth ceiling. Before timing,
flashlm's dx is checked against float64 dy @ W (relative error < 1e-5); the script stops if it is off.

Weights are cold, as in a backward pass over a model (every layer's weights are read once): each timed call
uses the next of several copies of W, together larger than the last-level cache (--rotate-mib, default 256).

GB/s: the stored weight bytes read per second; the copy counts its read plus its write. "% copy" is
flashlm's GB/s as a share of the copy's (the goal for M = 1: >= 70%). GFLOP/s: 2 M N K over the time.
--clock cpu times each call in CPU
seconds of the process (time.process_time, all threads) instead of wall-clock seconds: on a loaded machine
the rates per CPU second, where the wall clock measures the scheduler. "x torch" is the dequantize+matmul
time over flashlm's. The runs take turns (bench_util.median_seconds), so background load falls on all alike.

Run (from the repository root, with flashlm installed):
  python bench/compare_backward_input.py                   # Q4_0 Q8_0 Q4_K Q6_K int8 int4 at 4096x4096
  python bench/compare_backward_input.py --kinds Q5_K,int4 --shapes 11008x4096 --m 1,64
  python bench/compare_backward_input.py --quick           # seconds: CI smoke
  FLASHLM_NUM_THREADS=1 OMP_NUM_THREADS=1 python bench/compare_backward_input.py --m 1 --clock cpu
  python bench/compare_backward_input.py --kinds Q4_K,Q6_K,Q4_0,Q8_0,int8,int4 --shapes 2816x1024,1024x2816 \
      --m 128 --clock cpu                                 # a fine-tuning step's backward (batch 1 x 128)
"""

import argparse
import platform
import sys
import time

import numpy as np
import torch

import flashlm
import flashlm.ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.io.random_blocks import random_blocks

INT_KINDS = ("int8", "int4")
GROUP = 128


def make_weight(kind, n, k):
    """(stored tensors, flashlm's dx(dy), torch's dequantize(), stored bytes)."""
    g = torch.Generator().manual_seed(0)
    if kind == "int8":
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g) * 0.01
        return ((w, s), lambda dy, t: flashlm.ops.int8_linear_backward_input(dy, *t),
                lambda t: t[0].float() * t[1][:, None], w.numel() + 4 * n)
    if kind == "int4":
        w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        s = torch.rand(n, k // GROUP, generator=g) * 0.01

        def deq(t):
            b = t[0].reshape(n, k // GROUP, GROUP // 2)
            u = torch.cat([b & 15, b >> 4], dim=-1).float()
            return ((u - 8) * t[1][..., None]).reshape(n, k)
        return ((w, s), lambda dy, t: flashlm.ops.int4_linear_backward_input(dy, t[0], t[1], None, GROUP), deq,
                w.numel() + 4 * s.numel())
    raw = torch.from_numpy(random_blocks(kind, n * k, 0).reshape(n, -1))
    return ((raw,), lambda dy, t: flashlm.ops.gguf_linear_backward_input(dy, t[0], kind, (n, k)),
            lambda t: flashlm.ops.dequantize(t[0], kind, (n, k)), raw.numel())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--kinds", default="Q4_0,Q8_0,Q4_K,Q6_K,int8,int4",
                    help="comma-separated GGML types, int8, int4 (group 128)")
    ap.add_argument("--shapes", default="4096x4096", help="comma-separated N x K (W is [N, K])")
    ap.add_argument("--m", default="1,64", help="comma-separated rows of dy")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per measurement; the median is reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--burst", type=int, default=4, help="back-to-back calls per turn, the first untimed")
    ap.add_argument("--rotate-mib", type=int, default=256, help="cycle through copies of W totalling this much")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time calls by the wall clock or by the process's CPU time")
    ap.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke test in seconds")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.reps, args.warmup, args.rotate_mib, args.burst = "256x512", 3, 1, 0, 2
    kinds = [t.strip() for t in args.kinds.split(",") if t.strip()]
    kinds = [t if t in INT_KINDS else t.upper() for t in kinds]
    bad = [t for t in kinds if t not in INT_KINDS and t not in flashlm.ops.GGUF_BACKWARD_TYPES]
    if bad:
        ap.error(f"--kinds: {', '.join(bad)} not supported (known: {', '.join(flashlm.ops.GGUF_BACKWARD_TYPES)}, "
                 "int8, int4)")
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
        ms = [int(v) for v in args.m.split(",")]
        if any(len(s) != 2 or min(s) <= 0 for s in shapes) or min(ms) <= 0:
            raise ValueError
    except ValueError:
        ap.error(f"--shapes / --m: expected NxK[,NxK...] and positive row counts, got {args.shapes!r}, {args.m!r}")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    features = flashlm._C.cpu_features()
    avx512 = features["avx512f"] and features["avx512bw"] and flashlm.ops.cpu_isa() == "avx2"
    copy_src = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    copy_dst = torch.empty_like(copy_src)
    rows_column = max(ms) >= 3  # the GEMM's "before"
    rows = []
    for n, k in shapes:
        for kind in kinds:
            stored, flashlm_dx, dequant, nbytes = make_weight(kind, n, k)
            w = dequant(stored)
            copies = max(1, -(-(args.rotate_mib << 20) // nbytes))
            stores = [stored] + [tuple(t.clone() for t in stored) for _ in range(copies - 1)]
            for m in ms:
                dy = torch.randn(m, n)
                ref = dy.double() @ w.double()
                rel = ((flashlm_dx(dy, stored).double() - ref).norm() / ref.norm()).item()
                if not rel < 1e-5:
                    sys.exit(f"compare_backward_input: {kind} {n}x{k} M={m}: relative error {rel:.3e} against "
                             "float64; not timing a wrong kernel")
                state = {"i": 0, "j": 0}

                def run_flashlm(switch=None):
                    """The next copy of W; `switch` (a flashlm._C.set_backward_input_* function) off for the call."""
                    state["i"] = (state["i"] + 1) % len(stores)
                    saved = switch(False) if switch else None
                    try:
                        return flashlm_dx(dy, stores[state["i"]])
                    finally:
                        if switch:
                            switch(saved)

                def run_torch():
                    state["j"] = (state["j"] + 1) % len(stores)
                    return dy @ dequant(stores[state["j"]])

                fns = {"flashlm": (run_flashlm, "cpu"), "torch": (run_torch, "cpu"),
                       "dense": (lambda: dy @ w, "cpu"), "copy": (lambda: copy_dst.copy_(copy_src), "cpu")}
                if avx512:
                    fns["flashlm-avx2"] = (lambda: run_flashlm(flashlm._C.set_backward_input_avx512), "cpu")
                if m >= 3:
                    fns["flashlm-rows"] = (lambda: run_flashlm(flashlm._C.set_backward_input_gemm), "cpu")
                med = median_seconds(fns, args.reps, args.warmup, args.burst, clock=clock)
                t_f, t_t, t_d, t_c = med["flashlm"], med["torch"], med["dense"], med["copy"]
                gbs_f, gbs_c = nbytes / t_f / 1e9, 2 * copy_src.numel() / t_c / 1e9
                row = [kind, f"{n}x{k}", str(m), f"{nbytes / 2**20:.1f}", f"{rel:.1e}", f"{t_f * 1e3:.3f}",
                       fmt(2 * m * n * k / t_f / 1e9, ".1f"), fmt(gbs_f, ".1f"), fmt(gbs_c, ".1f"),
                       fmt(gbs_f / gbs_c * 100, ".0f")]
                if avx512:
                    t_a = med["flashlm-avx2"]
                    row += [f"{t_a * 1e3:.3f}", fmt(nbytes / t_a / 1e9 / gbs_c * 100, ".0f")]
                if rows_column:
                    row.append(f"{med['flashlm-rows'] * 1e3:.3f}" if m >= 3 else "-")
                rows.append(row + [f"{t_t * 1e3:.3f}", fmt(t_t / t_f, ".2f"), f"{t_d * 1e3:.3f}"])
            del stores

    header = ["kind", "N x K", "M", "W MiB", "rel err", "flashlm ms", "GFLOP/s", "flashlm GB/s", "copy GB/s",
              "% copy"]
    if avx512:
        header += ["AVX2 ms", "AVX2 % copy"]
    if rows_column:
        header += ["rows ms"]
    header += ["torch deq+mm ms", "x torch", "dense f32 mm ms"]
    print(hardware_line("cpu", flashlm.ops, f"torch {torch.get_num_threads()} threads"))
    print(f"flashlm {flashlm.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print(f"dx = dy @ W, dy float32; cold weights (copies cycled, {args.rotate_mib} MiB); median of {args.reps} "
          f"interleaved turns of {args.burst} back-to-back calls after {args.warmup} warm-up; "
          f"{'CPU' if args.clock == 'cpu' else 'wall-clock'} seconds")
    print()
    print_table(header, rows)


if __name__ == "__main__":
    main()
