#!/usr/bin/env python3
"""compare_norm: flashlm's RMSNorm (flashlm.ops.rms_norm) against torch at decode and prefill sizes.

For x [rows, d] (decode 1 x 4096, prefill 512 x 4096; float32 and bfloat16, weight in x's dtype):
  flashlm          ops.rms_norm(x, w, eps)
  torch F.rms_norm torch.nn.functional.rms_norm (what the model ran for float32 before)
  torch HF formula HF's LlamaRMSNorm: x.float(), pow, mean, add, rsqrt, mul, .to, mul (what it ran for bf16)
and the fused residual form the model's paged forward uses after attention:
  flashlm fused    ops.rms_norm(x, w, eps, residual=r)  (r += x; out = norm(r))
  torch add+norm   r = r + x, then F.rms_norm (float32) or the HF formula (bf16)
taking turns run by run (bench_util.median_seconds); each run is --inner calls back to back at decode size,
a burst of 3 (the first untimed) at prefill size, and the time is per call, median over --reps runs. GB/s counts the bytes a call must move (x read, out written, plus the
residual read and written; the weight once) over its time. The ceiling next to it is torch's copy_ of a
tensor as large as x in the same run: at decode size both are dominated by per-call overhead.

Run (from the repository root, with flashlm installed):
  python bench/compare_norm.py            # CPU (and CUDA where present)
  python bench/compare_norm.py --quick    # a second or two: CI smoke
"""

import torch
import torch.nn.functional as F

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table, repeat, row_sizes_args

EPS = 1e-6


def hf_formula(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def torch_norm(x, w):
    """What flashlm.models' RMSNorm computed before it had the kernel."""
    return F.rms_norm(x, w.shape, w, EPS) if x.dtype == torch.float32 else hf_formula(x, w)


def run_case(device, dtype, rows, d, args):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(dtype).to(device)
    w = torch.randn(d, generator=gen).to(dtype).to(device)
    r = torch.randn(rows, d, generator=gen).to(dtype).to(device)
    dst = torch.empty_like(x)
    inner = max(1, args.inner * 4096 // (rows * d))  # decode-sized calls in batches: timer resolution
    plain = {
        "flashlm": lambda: ops.rms_norm(x, w, EPS),
        "torch F.rms_norm": lambda: F.rms_norm(x, w.shape, w, EPS),
        "torch HF formula": lambda: hf_formula(x, w),
    }
    fused = {  # r grows with every call; rms_norm is scale-invariant and the values stay finite for these counts
        "flashlm fused": lambda: ops.rms_norm(x, w, EPS, residual=r),
        "torch add+norm": lambda: torch_norm(r + x, w),
    }
    fns = {label: (repeat(fn, inner), device) for label, fn in {**plain, **fused}.items()}
    fns["copy"] = (repeat(lambda: dst.copy_(x), inner), device)
    # Prefill-sized calls one at a time in bursts of 3, the first untimed: after the other turns, torch's
    # OpenMP workers still spin and the first call of a turn waits for a core (bench_util.median_seconds).
    burst = 3 if inner == 1 else 1
    times = {k: v / inner for k, v in median_seconds(fns, args.reps, args.warmup, burst).items()}
    esize = x.element_size()
    copy_gbs = 2 * x.numel() * esize / times["copy"] / 1e9
    rows_out = []
    for group, base, moved in ((plain, "flashlm", 2), (fused, "flashlm fused", 4)):
        for label in group:
            t = times[label]
            gbs = (moved * x.numel() * esize + d * w.element_size()) / t / 1e9
            rows_out.append([label, fmt(t * 1e6, ".2f"), fmt(t / times[base], ".2f"), fmt(gbs, ".2f"),
                             fmt(gbs / copy_gbs * 100, ".0f")])
    name = str(dtype).replace("torch.", "")
    print(f"\n{device} {name} x [{rows}, {d}]: copy_ of x {times['copy'] * 1e6:.2f} us, {copy_gbs:.2f} GB/s")
    print_table(["implementation", "us / call", "time / flashlm's", "GB/s", "% copy"], rows_out)


def main():
    args = row_sizes_args(__doc__, d=4096, quick_d=4096, quick_rows=64)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(hardware_line(devices[-1], ops, f"torch {torch.get_num_threads()} threads"))
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, args.prefill_rows):
                run_case(device, dtype, rows, args.d, args)


if __name__ == "__main__":
    main()
