#!/usr/bin/env python3
"""compare_loss: the vocabulary-chunked losses (flashlm.ops.loss) against torch eager, forward + backward.

For h [T, d], a projection W [V, d] and targets [T] (float32):
  cross-entropy  flashlm  fused_linear_cross_entropy(h, W, targets)
                 torch    F.cross_entropy(F.linear(h, W), targets)
  KL (T = 2)     flashlm  fused_linear_kl_div(h, W, teacher, temperature=2)
                 torch    F.kl_div(F.log_softmax(F.linear(h, W) / 2), F.log_softmax(teacher / 2), log_target=True,
                          reduction="batchmean") * 4
  distillation   flashlm  fused_linear_distill_loss(h, W, targets, teacher, alpha=0.5, temperature=2): both in one pass
  (alpha 0.5)    torch    0.5 * (the KL above) + 0.5 * F.cross_entropy(the same logits, targets)
each followed by .backward() into h and W (the teacher logits [T, V] are an input of both, made beforehand).
Time: the calls take turns (bench_util.median_seconds), the median over --reps runs. Peak extra memory: each
call once in a fresh process, the peak resident memory (VmHWM) above what the process held just before the
call (its inputs made and touched); the gradients of h and W ([T, d] + [V, d] f32, the same for both) are part
of it, and the last column is what each holds beyond them (flashlm / torch). GFLOP/s counts the
GEMMs both need (3 x 2 T V d: the logits, dh and dW; flashlm's forward makes the gradients a block of rows at a
time, so it does the same three). "3 GEMMs ms" times those three torch.mm calls alone, taking turns with the
two losses: no loss that does them can be faster, so torch ms / 3 GEMMs ms bounds the speedup. --clock cpu times
the runs by the process's CPU time (time.process_time, all threads) instead of the wall clock: on a loaded machine
the wall clock mostly measures the other jobs.

Run (from the repository root, with flashlm installed):
  python bench/compare_loss.py             # vocab 32000 and 151936, T 512 and 2048, d 512 and 1024
  python bench/compare_loss.py --case 151936,512,512 --loss ce,kl,distill --clock cpu
  python bench/compare_loss.py --quick     # seconds: CI smoke
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.ops.loss import fused_linear_cross_entropy, fused_linear_distill_loss, fused_linear_kl_div

CASES = [(32000, 512, 512), (32000, 2048, 1024), (151936, 512, 512), (151936, 2048, 1024)]
QUICK = [(3000, 64, 64)]
TEMPERATURE = 2.0
ALPHA = 0.5  # the distillation loss's weight on the soft (KL) term
LOSSES = {"ce": "cross-entropy", "kl": "KL T=2", "distill": "distill a=0.5 T=2"}
HEADER = ["case (f32, fwd+bwd)", "flashlm ms", "torch ms", "speedup", "3 GEMMs ms", "torch GFLOP/s", "flashlm MiB",
          "torch MiB", "memory ratio", "beyond grads"]


def inputs(vocab, tokens, d):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, d, generator=g)).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * d ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    teacher = torch.randn(tokens, vocab, generator=g) * 2
    return h, w, targets, teacher


def loss_value(impl, loss, h, w, targets, teacher):
    """The scalar loss, from flashlm's fused kernel or torch eager on the full [T, V] logits."""
    if impl == "flashlm":
        if loss == "ce":
            return fused_linear_cross_entropy(h, w, targets)
        if loss == "kl":
            return fused_linear_kl_div(h, w, teacher, temperature=TEMPERATURE)
        return fused_linear_distill_loss(h, w, targets, teacher, alpha=ALPHA, temperature=TEMPERATURE)
    logits = F.linear(h, w)
    if loss == "ce":
        return F.cross_entropy(logits, targets)
    s = F.log_softmax(logits / TEMPERATURE, -1)
    t = F.log_softmax(teacher / TEMPERATURE, -1)
    soft = F.kl_div(s, t, log_target=True, reduction="batchmean") * TEMPERATURE ** 2
    return soft if loss == "kl" else ALPHA * soft + (1 - ALPHA) * F.cross_entropy(logits, targets)


def step(impl, loss, h, w, targets, teacher):
    """One forward + backward; the gradients are dropped afterwards."""
    loss_value(impl, loss, h, w, targets, teacher).backward()
    h.grad = w.grad = None


def three_gemms(h, w):
    """The GEMMs of the loss's forward and backward alone: the logits, then dh and dW from [T, V] floats."""
    z = torch.mm(h, w.t())
    torch.mm(z, w)
    torch.mm(z.t(), h)


def vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(impl, loss, vocab, tokens, d):
    """Run in a fresh process: the peak resident memory one step adds, in bytes."""
    args = inputs(vocab, tokens, d)
    before = vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    step(impl, loss, *args)
    return (vm_kib("VmHWM") - before) * 1024


def peak_extra(impl, loss, case):
    cmd = [sys.executable, __file__, "--memory-of", json.dumps([impl, loss, *case])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    return int(out.strip().splitlines()[-1])


def loss_row(loss, case, reps, warmup, clock=time.perf_counter):
    """One table row: the median time of each side (taking turns), each side's peak extra memory (fresh
    processes), their ratios. The two sides' loss values must agree to 1e-4 (relative) first."""
    vocab, tokens, d = case
    data = inputs(*case)
    with torch.no_grad():
        value = {impl: loss_value(impl, loss, *data).item() for impl in ("flashlm", "torch")}
    if abs(value["flashlm"] - value["torch"]) > 1e-4 * abs(value["torch"]):
        raise SystemExit(f"compare_loss: {loss} V={vocab}: flashlm's loss {value['flashlm']} differs from "
                         f"torch's {value['torch']}")
    fns = {impl: ((lambda impl=impl: step(impl, loss, *data)), "cpu") for impl in ("flashlm", "torch")}
    h, w = data[0].detach(), data[1].detach()
    fns["gemms"] = (lambda: three_gemms(h, w), "cpu")
    t = median_seconds(fns, reps, warmup, clock=clock)
    del data
    mem = {impl: peak_extra(impl, loss, case) for impl in ("flashlm", "torch")}
    flop = 3 * 2 * tokens * vocab * d
    grads = (tokens + vocab) * d * 4
    return [f"{LOSSES[loss]} V={vocab} T={tokens} d={d}", fmt(t["flashlm"] * 1e3, ".0f"), fmt(t["torch"] * 1e3, ".0f"),
            fmt(t["torch"] / t["flashlm"], ".2f"), fmt(t["gemms"] * 1e3, ".0f"), fmt(flop / t["torch"] / 1e9, ".0f"),
            fmt(mem["flashlm"] / 2**20, ".0f"), fmt(mem["torch"] / 2**20, ".0f"),
            fmt(mem["flashlm"] / mem["torch"], ".2f"), fmt((mem["flashlm"] - grads) / (mem["torch"] - grads), ".3f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--case", action="append", help="V,T,d (repeatable; default: the four cases above)")
    ap.add_argument("--loss", default="ce,kl", help=f"comma-separated, of {', '.join(LOSSES)} (default ce,kl)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time the runs by the wall clock or by the process's CPU time")
    ap.add_argument("--quick", action="store_true", help="one small case, one run: a smoke run")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        impl, loss, *case = json.loads(args.memory_of)
        print(measure_memory(impl, loss, *case))
        return
    cases = QUICK if args.quick else [tuple(int(v) for v in c.split(",")) for c in args.case] if args.case else CASES
    if args.quick:
        args.reps, args.warmup = 1, 0
    losses = [v.strip() for v in args.loss.split(",") if v.strip()]
    bad = [v for v in losses if v not in LOSSES]
    if bad or not losses:
        ap.error(f"--loss: expected some of {', '.join(LOSSES)}, got {args.loss!r}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(hardware_line("cpu", ops, f"torch {torch.get_num_threads()} threads"))
    print(f"clock: {args.clock}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the start")
    rows = [loss_row(loss, case, args.reps, args.warmup, clock) for loss in losses for case in cases]
    print_table(HEADER, rows)
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
