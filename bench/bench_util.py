"""Timing and reporting shared by the bench/compare_*.py scripts (run as scripts, so they import this by name)."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# Pause after each timed run: torch's OpenMP workers keep spinning for a few ms after a parallel op and
# then take a core from flashlm's own pool (2 cores: flashlm's Q4_K dequantization 12.5 ms right after a
# torch copy, 8.1 ms on its own or 10 ms later).
SETTLE_S = 0.01


def median_seconds(fns, reps, warmup, burst=1, clock=time.perf_counter):
    """{label: (fn, device)} -> {label: median seconds}. The functions take turns, one run each per round,
    so that on a shared machine every one of them sees the same background load (and their ratios hold).
    CUDA runs are timed with CUDA events.

    burst > 1 runs each function that many times in a row per round and times all but the first, the
    steady state of back-to-back calls (a model's decode loop). Use it for calls of a few ms: after the
    pause between turns, the first call pays for waking the thread pools (on a 2-vCPU VM the second vCPU
    sometimes takes over 1 ms to come out of idle, and torch's OpenMP barrier waits for it).

    clock: what CPU runs are timed with; time.thread_time gives the calling thread's CPU time, what a
    single-threaded run costs whatever else the machine is doing."""
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in fns}
    events = None
    for _ in range(reps):
        for label, (fn, device) in fns.items():
            for i in range(burst):
                if device == "cuda":
                    if events is None:
                        torch.cuda.synchronize()
                        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start, stop = events
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    elapsed = start.elapsed_time(stop) * 1e-3
                else:
                    t0 = clock()
                    fn()
                    elapsed = clock() - t0
                if burst == 1 or i > 0:
                    times[label].append(elapsed)
            time.sleep(SETTLE_S)
    return {label: statistics.median(t) for label, t in times.items()}


def row_sizes_args(doc, d, quick_d, quick_rows):
    """The command line of a comparison on [rows, --d] tensors at decode (one row) and prefill (--prefill-rows)
    sizes, parsed; --quick sets d = quick_d, quick_rows prefill rows and few runs: a smoke run of seconds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=d)
    ap.add_argument("--prefill-rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inner", type=int, default=200, help="back-to-back calls per timed run at decode size")
    ap.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.d, args.prefill_rows, args.reps, args.warmup, args.inner = quick_d, quick_rows, 3, 1, 20
    return args


def repeat(fn, n):
    """A function that calls fn n times: decode-sized calls timed n at a time, above the timer's resolution."""
    def run():
        for _ in range(n):
            fn()
    return run


def medians(runs):
    """[{key: number}, ...] (one dict per run, e.g. per process) -> {key: median over the runs}."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def run_ranks(script, args, worker):
    """A multi-process comparison's main: runs `script` as args.nprocs processes of one thread each, with this
    command line and `--worker "RANK STORE"` (a FileStore where they meet); exits if a rank fails. Returns the
    JSON of rank 0's line "SUMMARY {...}". In such a process (args.worker set) it calls
    worker(rank, nprocs, store, args) instead and returns None."""
    if args.worker:
        rank, store = args.worker.split(" ", 1)
        worker(int(rank), args.nprocs, store, args)
        return None
    nprocs, quick = args.nprocs, args.quick
    name = os.path.splitext(os.path.basename(script))[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        argv = [a for a in sys.argv[1:] if a != "--quick"] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *argv, "--worker", f"{r} {store}"],
                                  stdout=subprocess.PIPE, text=True, env=env) for r in range(nprocs)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit(f"{name}: a rank failed with {nprocs} processes")
    return json.loads(next(line for line in outs[0].splitlines() if line.startswith("SUMMARY "))[8:])


def ranks_line(nprocs):
    """The machine and versions of a multi-process comparison (its processes run one thread each)."""
    import flashlm

    return (f"CPU: {cpu_model()}, {os.cpu_count()} hardware threads; flashlm {flashlm.__version__}, torch "
            f"{torch.__version__}; {nprocs} processes, one thread each")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_line(device, flashlm_ops, peers):
    """The machine, and the threads flashlm and its peers (a string such as "torch 2 threads") use."""
    cpu = (f"CPU: {cpu_model()}, {os.cpu_count()} hardware threads; flashlm {flashlm_ops.num_threads()} threads "
           f"(ISA {flashlm_ops.cpu_isa()}), {peers}")
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}\n{cpu}"
    return cpu


def fmt(x, spec, missing="n/a"):
    return missing if x is None else format(x, spec)


def print_table(header, rows):
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")


def rtn_int4(model, calib, group_size, symmetric):
    """Every block linear of a flashlm Transformer to an RTN Int4Linear, in place (calib unused: the signature
    of gptq_quantize and awq_quantize)."""
    from torch import nn

    from flashlm.quant import Int4Linear

    for block in model.blocks:
        for name, m in list(block.named_modules()):
            if isinstance(m, nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, Int4Linear.from_float(m, group_size, symmetric))
    return model
