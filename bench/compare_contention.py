#!/usr/bin/env python3
"""compare_contention: flashlm's speed on a busy machine, relative to its speed alone.

Two jobs a user runs, each through the `flashlm` command line in its own process:
  train   `flashlm train --preset tiny` for --steps steps (no evaluation, checkpoint or sample inside the
          timed steps); tokens/s over the steps after the first, from the run's metrics.jsonl;
  decode  `flashlm bench-decode` at batch 1 on a small random-weight Q4_0 GGUF model (io/random_model.py);
          its median decode tokens/s.
each run alone, beside one background job and beside three, where a background job is a separate Python
process doing float32 torch matmuls on 2 threads (torch's defaults otherwise: its OpenMP pool spins). On a
machine of C cores a fair share beside k such jobs is about C / (C + 2k) of the speed alone: 0.5 beside one
on 2 cores, 0.25 beside three. Goals: >= 0.45 beside one, >= 0.2 beside three.

The load levels take turns (alone, one, three, alone, ...), the background jobs start fresh for each level
and the jobs run only once they are all busy; figures are medians of --reps rounds. The machine's own load
(other users) moves every figure: compare runs made together, and read the ratios, not the absolute speeds.

Run (from the repository root, with flashlm installed or on PYTHONPATH):
  python bench/compare_contention.py                  # 3 rounds, 40 training steps: 18 runs of 10-60 s each
  python bench/compare_contention.py --loads 0 1      # alone and beside one job only
  python bench/compare_contention.py --env "" --env "OMP_WAIT_POLICY=PASSIVE FLASHLM_SPIN_US=0"
                                                      # settings of the jobs' environment, taking turns
  python bench/compare_contention.py --quick          # one short round: CI smoke
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util

# A background job: float32 matmuls on 2 threads until killed (or orphaned); it prints a line once it is busy.
BACKGROUND = """import os, torch
parent = os.getppid()
torch.set_num_threads(2)
a = torch.randn(512, 512)
b = a @ a
print("busy", flush=True)
while os.getppid() == parent:
    for _ in range(100):
        b = a @ a
"""


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 3], help="background jobs per level")
    ap.add_argument("--reps", type=int, default=3, help="rounds over the load levels")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--gen-tokens", type=int, default=32, help="decoded tokens per repetition")
    ap.add_argument("--d-model", type=int, default=512, help="the decode model's width (4 x wider MLP)")
    ap.add_argument("--layers", type=int, default=8, help="the decode model's layers")
    ap.add_argument("--timeout", type=float, default=180, help="seconds a run may take before it is abandoned")
    ap.add_argument("--env", action="append", default=None, metavar="'K=V ...'",
                    help="a setting of the jobs' environment (repeat to compare several; default: as inherited)")
    ap.add_argument("--quick", action="store_true", help="one round, few steps, a smaller model: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.loads, args.reps, args.steps, args.gen_tokens, args.d_model, args.layers = [0, 1], 1, 6, 8, 128, 2
        args.timeout = 120
    args.env = [""] if args.env is None else args.env
    for setting in args.env:
        if any("=" not in kv for kv in setting.split()):
            ap.error(f"--env: give K=V pairs separated by spaces, got {setting!r}")
    if min(args.loads) < 0 or args.reps < 1 or args.steps < 2 or args.gen_tokens < 1:
        ap.error("--loads must be >= 0, --reps and --gen-tokens >= 1, --steps >= 2")
    return args


def flashlm_command():
    return [sys.executable, "-m", "flashlm"]


def start_background(n):
    """n busy background jobs (each has printed its first line)."""
    procs = [subprocess.Popen([sys.executable, "-c", BACKGROUND], stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "busy":
            stop_background(procs)
            sys.exit("compare_contention: a background job failed to start")
    return procs


def stop_background(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_child(cmd, args):
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=args.child_env,
                             cwd=args.workdir)  # what the jobs write (the corpus's cache) stays out of the way
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"compare_contention: {' '.join(cmd[2:])} failed:\n{out.stderr[-2000:]}")
    return out.stdout, time.perf_counter() - t


def train_speed(folder, args):
    """Tokens/s of steps 2..N of the tiny preset (the first step pays for warm-up)."""
    out_dir = tempfile.mkdtemp(prefix="train-", dir=folder)  # a fresh run each time, nothing to resume
    cmd = flashlm_command() + ["train", "--preset", "tiny", "--out-dir", out_dir, "--max-steps", str(args.steps),
                               "--eval-interval", "100000", "--ckpt-interval", "100000", "--sample-tokens", "0",
                               "--no-progress"]
    stdout, _ = run_child(cmd, args)
    if stdout is None:
        return None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["tokens_per_s"] for line in f][1:]
    return len(rates) / sum(1.0 / r for r in rates)  # total tokens over total time


def decode_speed(model, args):
    cmd = flashlm_command() + ["bench-decode", "--model", model, "--prompt-tokens", "16", "--gen-tokens",
                               str(args.gen_tokens), "--concurrency", "1", "--reps", "3"]
    stdout, _ = run_child(cmd, args)
    if stdout is None:
        return None
    m = re.search(r"decode \(batch 1, \d+ tokens\):\s+([0-9.]+) tokens/s", stdout)
    if m is None:
        sys.exit(f"compare_contention: no decode figure in bench-decode's output:\n{stdout}")
    return float(m.group(1))


def main():
    args = parse_args()
    from flashlm import ops
    from flashlm.io.random_model import write_random_llama_gguf

    jobs = {"train": train_speed, "decode": decode_speed}
    keys = [(job, setting, load) for job in jobs for setting in args.env for load in args.loads]
    speeds = {key: [] for key in keys}
    t_start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "model-q4_0.gguf")
        write_random_llama_gguf(model, d_model=args.d_model, d_ff=4 * args.d_model, n_layer=args.layers,
                                vocab_size=2048, ggml_type="Q4_0", context_length=256)
        inputs = {"train": folder, "decode": model}
        args.workdir = folder
        for rep in range(args.reps):
            loads = args.loads if rep % 2 == 0 else args.loads[::-1]  # each level runs early and late
            for load in loads:
                procs = start_background(load)
                try:
                    for job, fn in jobs.items():
                        for setting in args.env:
                            args.child_env = {**os.environ, **dict(kv.split("=", 1) for kv in setting.split())}
                            speeds[job, setting, load].append(fn(inputs[job], args))
                            print(f"  {job} beside {load}, {setting or 'inherited'}: {speeds[job, setting, load][-1]}",
                                  file=sys.stderr, flush=True)  # progress: a full run takes minutes
                finally:
                    stop_background(procs)

    print(bench_util.hardware_line("cpu", ops, "background jobs: torch float32 512^2 matmuls on 2 threads each"))
    print(f"load average before: {' '.join(f'{x:.1f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.reps} rounds, {time.perf_counter() - t_start:.0f} s")
    print(f"train: tiny preset, {args.steps} steps; decode: Q4_0 d {args.d_model} x {args.layers} layers, batch 1, "
          f"{args.gen_tokens} tokens")
    cores = os.cpu_count()
    header = ["job", "setting", "background jobs", "tokens/s (median)", "x alone", "fair share", "runs"]
    rows = []
    median = {}
    for key in keys:
        done = [s for s in speeds[key] if s is not None]
        median[key] = statistics.median(done) if done else None
    for job, setting, load in keys:
        med, base = median[job, setting, load], median.get((job, setting, 0))
        ratio = med / base if med is not None and base else None
        runs = " ".join(f"{s:.0f}" if s is not None else f"(over {args.timeout:.0f} s)" for s in speeds[job, setting, load])
        rows.append([job, setting or "inherited", str(load), bench_util.fmt(med, ".0f", "timeout"),
                     bench_util.fmt(ratio, ".2f"), f"{cores / (cores + 2 * load):.2f}", runs])
    bench_util.print_table(header, rows)


if __name__ == "__main__":
    main()
