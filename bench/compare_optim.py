#!/usr/bin/env python3
"""compare_optim: one AdamW step with flashlm's fused kernel against torch.optim.AdamW.

The parameters (float32, --numel elements split into --tensors tensors of near-equal size) are updated by
  flashlm         flashlm.train.optim.AdamW.step() (the fused kernel, on flashlm's thread pool)
  torch foreach   torch.optim.AdamW(foreach=True)
  torch fused     torch.optim.AdamW(fused=True), where this torch has it for the device
taking turns run by run (bench_util.median_seconds), median over --reps runs after a warm-up. Each step
reads param, grad and both moments and writes param and both moments: 28 bytes an f32 element; GB/s is
those bytes over the time. The ceiling is memcpy bandwidth measured in the same run (torch copy_ of a
buffer as large as the parameters, read + written bytes over time), with the same threads.

Run (from the repository root, with flashlm installed):
  python bench/compare_optim.py                  # 10M parameters in 1 tensor, CPU (and CUDA where present)
  python bench/compare_optim.py --tensors 100    # the same in 100 tensors
  python bench/compare_optim.py --quick          # a second or two: CI smoke
"""

import argparse

import torch

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.train.optim import AdamW

BYTES_PER_ELEMENT = 28  # f32: p, g, m, v read; p, m, v written


def make_params(numel, tensors, device):
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    gen = torch.Generator().manual_seed(0)
    params = []
    for n in sizes:
        p = torch.randn(n, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(n, generator=gen).to(device)
        params.append(p)
    return params


def optimizers(params_of, device):
    """{label: optimizer} over separate copies of the same parameters."""
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opts = {"flashlm": AdamW(params_of(), **kw), "torch foreach": torch.optim.AdamW(params_of(), foreach=True, **kw)}
    try:
        fused = torch.optim.AdamW(params_of(), fused=True, **kw)
        fused.step()
        opts["torch fused"] = fused
    except (RuntimeError, ValueError):
        pass  # no fused AdamW for this device in this torch
    return opts


def run_device(device, args):
    opts = optimizers(lambda: make_params(args.numel, args.tensors, device), device)
    src = torch.empty(args.numel, device=device).uniform_()
    dst = torch.empty_like(src)
    fns = {label: (opt.step, device) for label, opt in opts.items()}
    fns["memcpy"] = (lambda: dst.copy_(src), device)
    times = median_seconds(fns, args.reps, args.warmup)
    ceiling = 2 * src.numel() * 4 / times["memcpy"] / 1e9
    rows = []
    for label in opts:
        t = times[label]
        gbs = BYTES_PER_ELEMENT * args.numel / t / 1e9
        rows.append([label, fmt(t * 1e3, ".2f"), fmt(t / times["flashlm"], ".2f"), fmt(gbs, ".1f"),
                     fmt(gbs / ceiling * 100, ".0f")])
    print(f"\n{device}: {args.numel:,} f32 parameters in {args.tensors} tensor(s); memcpy {ceiling:.1f} GB/s")
    print_table(["optimizer", "step ms", "time / flashlm's", "GB/s", "% memcpy"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.numel, args.reps, args.warmup = 1_000_003, 3, 1
    if args.tensors < 1 or args.numel < args.tensors:
        ap.error("--tensors must be in [1, --numel]")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(hardware_line(devices[-1], ops, f"torch {torch.get_num_threads()} threads"))
    for device in devices:
        run_device(device, args)


if __name__ == "__main__":
    main()
