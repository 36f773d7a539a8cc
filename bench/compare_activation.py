#!/usr/bin/env python3
"""compare_activation: flashlm's SwiGLU gate (flashlm.ops.silu_mul) against torch at decode and prefill sizes.

For gate, up [rows, d_ff] (decode 1 x 11008, prefill 512 x 11008; float32 and bfloat16):
  flashlm   ops.silu_mul(gate, up): one pass, out = silu(gate) * up
  torch     F.silu(gate) * up: what the model's MLP runs without the kernel (two ops, a temporary)
first checked against silu(g) * u in float64 (the script stops on a mismatch: float32 within 1e-6, bfloat16
within its two roundings, relative), then timed taking turns run by run (bench_util.median_seconds); each run
is --inner calls back to back at decode size, a burst of 3 (the first untimed) at prefill size, and the time is
per call, median over --reps runs. GB/s counts the bytes a call must move (gate and up read, out written) over
its time; the ceiling next to it is torch's copy_ of a tensor as large as gate and up together (bytes read and
written), in the same run. At decode size both are dominated by per-call overhead.

Run (from the repository root, with flashlm installed):
  python bench/compare_activation.py            # CPU (and CUDA where present)
  python bench/compare_activation.py --quick    # a second or two: CI smoke
"""

import sys

import torch
import torch.nn.functional as F

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table, repeat, row_sizes_args


def check(gate, up):
    """flashlm's output against float64; exits with the worst element on a mismatch."""
    want = F.silu(gate.double()) * up.double()
    got = ops.silu_mul(gate, up).double()
    # float32: an exp within 2 ulp, a sum, a division and a product; 16-bit: silu rounded, then the product.
    u = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[gate.dtype]
    rtol = 1e-6 if u == 0 else 2 * u + u * u + 1e-6
    excess = (got - want).abs() - rtol * want.abs()
    if excess.max() > 0:
        i = int(excess.argmax())
        sys.exit(f"compare_activation: {gate.dtype} {tuple(gate.shape)}: flashlm differs from float64 beyond "
                 f"{rtol:.3g} relative at flat index {i}: {got.flatten()[i].item()!r} vs {want.flatten()[i].item()!r}")


def run_case(device, dtype, rows, d, args):
    gen = torch.Generator().manual_seed(0)
    gate = (4 * torch.randn(rows, d, generator=gen)).to(dtype).to(device)
    up = torch.randn(rows, d, generator=gen).to(dtype).to(device)
    check(gate, up)
    src = torch.cat([gate, up])
    dst = torch.empty_like(src)
    inner = max(1, args.inner * 4096 // (rows * d))  # decode-sized calls in batches: timer resolution
    fns = {
        "flashlm": (repeat(lambda: ops.silu_mul(gate, up), inner), device),
        "torch F.silu(g) * u": (repeat(lambda: F.silu(gate) * up, inner), device),
        "copy": (repeat(lambda: dst.copy_(src), inner), device),
    }
    # Prefill-sized calls one at a time in bursts of 3, the first untimed: after the other turns, torch's
    # OpenMP workers still spin and the first call of a turn waits for a core (bench_util.median_seconds).
    burst = 3 if inner == 1 else 1
    times = {k: v / inner for k, v in median_seconds(fns, args.reps, args.warmup, burst).items()}
    moved = 3 * gate.numel() * gate.element_size()
    copy_gbs = 2 * src.numel() * src.element_size() / times["copy"] / 1e9  # read + written
    rows_out = []
    for label in ("flashlm", "torch F.silu(g) * u"):
        t = times[label]
        gbs = moved / t / 1e9
        rows_out.append([label, fmt(t * 1e6, ".2f"), fmt(t / times["flashlm"], ".2f"), fmt(gbs, ".2f"),
                         fmt(gbs / copy_gbs * 100, ".0f")])
    name = str(dtype).replace("torch.", "")
    print(f"\n{device} {name} gate, up [{rows}, {d}]: copy_ of both {times['copy'] * 1e6:.2f} us, "
          f"{copy_gbs:.2f} GB/s read + written")
    print_table(["implementation", "us / call", "time / flashlm's", "GB/s", "% copy"], rows_out)


def main():
    args = row_sizes_args(__doc__, d=11008, quick_d=1024, quick_rows=16)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(hardware_line(devices[-1], ops, f"torch {torch.get_num_threads()} threads"))
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16, torch.bfloat16):
            for rows in (1, args.prefill_rows):
                run_case(device, dtype, rows, args.d, args)


if __name__ == "__main__":
    main()
