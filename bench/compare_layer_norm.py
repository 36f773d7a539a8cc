#!/usr/bin/env python3
"""compare_layer_norm: flashlm's LayerNorm kernels (flashlm.ops.layer_norm, forward and backward) against
torch's F.layer_norm at training sizes.

For x [rows, d] (512 x 256: gpt2 d256 at B=2 T=256; 2048 x 768: GPT-2 small at B=2 T=1024; float32 and
bfloat16, weight and bias in x's dtype):
  forward           layer_norm(x, w, b, eps)                  vs F.layer_norm
  forward+backward  the same with autograd, out.backward(dout)  vs F.layer_norm's autograd
taking turns run by run (bench_util.median_seconds, bursts of 3, the first untimed), median over --reps runs.
GB/s counts the bytes a forward must move (x read, out written) over its time; the ceiling next to it is
torch's copy_ of a tensor as large as x in the same run.

Run (from the repository root, with flashlm installed):
  python bench/compare_layer_norm.py
  python bench/compare_layer_norm.py --quick    # a second or two: CI smoke
"""

import argparse

import torch
import torch.nn.functional as F

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.ops.layer_norm import layer_norm

EPS = 1e-5
SIZES = ((512, 256), (2048, 768))


def run_case(device, dtype, rows, d, args):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(dtype).to(device)
    w = (1 + torch.randn(d, generator=gen) * 0.1).to(dtype).to(device)
    b = torch.randn(d, generator=gen).to(dtype).to(device)
    dout = torch.randn(rows, d, generator=gen).to(dtype).to(device)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    dst = torch.empty_like(x)

    def train(fn):
        def step():
            fn(xg, wg, bg).backward(dout)
            xg.grad = wg.grad = bg.grad = None
        return step

    fns = {
        "flashlm fwd": lambda: layer_norm(x, w, b, EPS),
        "torch fwd": lambda: F.layer_norm(x, (d,), w, b, EPS),
        "flashlm fwd+bwd": train(lambda x_, w_, b_: layer_norm(x_, w_, b_, EPS)),
        "torch fwd+bwd": train(lambda x_, w_, b_: F.layer_norm(x_, (d,), w_, b_, EPS)),
        "copy": lambda: dst.copy_(x),
    }
    times = median_seconds({k: (fn, device) for k, fn in fns.items()}, args.reps, args.warmup, burst=3)
    nbytes = 2 * x.numel() * x.element_size()
    copy_gbs = nbytes / times["copy"] / 1e9
    rows_out = []
    for what in ("fwd", "fwd+bwd"):
        for side in ("flashlm", "torch"):
            t = times[f"{side} {what}"]
            gbs = nbytes / t / 1e9
            bandwidth = [fmt(gbs, ".2f"), fmt(gbs / copy_gbs * 100, ".0f")] if what == "fwd" else ["", ""]
            rows_out.append([f"{side} {what}", fmt(t * 1e6, ".1f"), fmt(times[f"torch {what}"] / t, ".2f"), *bandwidth])
    name = str(dtype).replace("torch.", "")
    print(f"\n{device} {name} x [{rows}, {d}]: copy_ of x {times['copy'] * 1e6:.1f} us, {copy_gbs:.2f} GB/s")
    print_table(["implementation", "us / call", "x torch", "GB/s", "% copy"], rows_out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small size, few runs: a smoke run")
    args = ap.parse_args()
    sizes = ((64, 256),) if args.quick else SIZES
    if args.quick:
        args.reps, args.warmup = 3, 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(hardware_line(devices[-1], ops, f"torch {torch.get_num_threads()} threads"))
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            for rows, d in sizes:
                run_case(device, dtype, rows, d, args)


if __name__ == "__main__":
    main()
