#!/usr/bin/env python3
"""compare_comm: flashlm's shared-memory ring allreduce against torch.distributed's gloo, one host.

Launches N processes (ranks) that meet through a FileStore; each has a gloo process group and flashlm.dist
(its shared-memory ring). For each size, float32 tensors are summed over the ranks by
  flashlm   flashlm.dist.all_reduce (the ring over POSIX shared memory, AVX2 reduction),
  gloo      torch.distributed.all_reduce on the gloo backend (TCP over loopback),
taking turns run by run (so background load on a shared machine falls on both alike), each run started
by a gloo barrier and timed on every rank; a run's time is the slowest rank's, the figure the median over
--reps runs after a warm-up. "x gloo" is the median over runs of gloo's time over flashlm's in the same
round (the steadier figure on a shared machine). flashlm's result is checked exactly first (integer values).

algbw = bytes / time; busbw = algbw * 2(N-1)/N, as nccl-tests defines it (the bytes each rank sends and
receives over the ring, independent of N). The ceiling is one thread's memcpy bandwidth (torch copy_ of
64 MiB with torch.set_num_threads(1), bytes copied per second, median of runs) measured in the same run:
every byte a ring rank sends is copied once into shared memory and then read once by its neighbour's
reduction, so busbw near memcpy bandwidth means the ring adds little beyond the copies it needs. With more
ranks than cores the ranks share the cores, and the figure falls accordingly.

Run (from the repository root, with flashlm installed):
  python bench/compare_comm.py                         # 2 processes, 1 KiB ... 256 MiB
  python bench/compare_comm.py --nprocs 2,3,4 --max-size 64M
  python bench/compare_comm.py --quick                 # a few seconds: CI smoke
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench_util import cpu_model, fmt, print_table


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def size_label(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def memcpy_gbps(nbytes=64 << 20, reps=15):
    torch.set_num_threads(1)
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[2:]) / 1e9


def reps_for(nbytes, reps):
    # Enough runs for a stable median at small sizes, fewer where one gloo run takes most of a second.
    if nbytes >= 64 << 20:
        return max(3, reps // 4)
    return reps


# --- one rank --------------------------------------------------------------------------------------------

def worker(rank, world, store_file, sizes, reps, warmup):
    import torch.distributed as tdist

    import flashlm.dist as fd

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", store=tdist.FileStore(store_file, world), rank=rank, world_size=world)
    fd.init(timeout=120)
    results = {}
    for nbytes in sizes:
        n = max(1, nbytes // 4)
        x = torch.full((n,), float(rank + 1))
        fd.all_reduce(x)
        if not torch.equal(x, torch.full((n,), float(world * (world + 1) // 2))):
            sys.exit(f"compare_comm: flashlm's allreduce of {n} floats is wrong on rank {rank}; not timing it")
        fns = {"flashlm": lambda: fd.all_reduce(x), "gloo": lambda: tdist.all_reduce(x)}
        times = {k: [] for k in fns}
        count = reps_for(nbytes, reps)
        for i in range(warmup + count):
            for label, fn in fns.items():
                tdist.barrier()
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                if i >= warmup:
                    times[label].append(elapsed)
        results[nbytes] = times
    gathered = [None] * world
    tdist.all_gather_object(gathered, results)
    if rank == 0:
        medians = {}
        for nbytes in sizes:
            runs = {label: [max(g[nbytes][label][i] for g in gathered) for i in range(len(gathered[0][nbytes][label]))]
                    for label in ("flashlm", "gloo")}
            medians[nbytes] = {label: statistics.median(t) for label, t in runs.items()}
            medians[nbytes]["ratio"] = statistics.median(g / f for f, g in zip(runs["flashlm"], runs["gloo"]))
        print("MEDIANS " + json.dumps({str(k): v for k, v in medians.items()}), flush=True)
    fd.destroy()
    tdist.destroy_process_group()


# --- driver ----------------------------------------------------------------------------------------------

def run(world, sizes, reps, warmup):
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--world", str(world), "--store", store,
               "--sizes", ",".join(map(str, sizes)), "--reps", str(reps), "--warmup", str(warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
                 for r in range(world)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit(f"compare_comm: a rank failed with {world} processes")
    line = next(l for l in outs[0].splitlines() if l.startswith("MEDIANS "))
    return {int(k): v for k, v in json.loads(line[8:]).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", default="2", help="comma-separated process counts, e.g. 2,3,4")
    ap.add_argument("--min-size", default="1K")
    ap.add_argument("--max-size", default="256M")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 processes, 1 KiB and 1 MiB, 3 runs: CI smoke")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.rank, args.world, args.store, [int(s) for s in args.sizes.split(",")], args.reps, args.warmup)
        return

    if args.quick:
        nprocs, sizes, args.reps, args.warmup = [2], [1 << 10, 1 << 20], 3, 1
    else:
        nprocs = [int(n) for n in args.nprocs.split(",")]
        sizes, s = [], parse_size(args.min_size)
        while s <= parse_size(args.max_size):
            sizes.append(s)
            s *= 4
    ceiling = memcpy_gbps()
    import flashlm

    print(f"CPU: {cpu_model()}, {os.cpu_count()} hardware threads; flashlm {flashlm.__version__} "
          f"(ISA {flashlm.ops.cpu_isa()}), torch {torch.__version__} (gloo); one thread per rank")
    print(f"memcpy ceiling (1 thread, 64 MiB): {ceiling:.2f} GB/s\n")
    for world in nprocs:
        medians = run(world, sizes, args.reps, args.warmup)
        factor = 2 * (world - 1) / world
        rows = []
        for nbytes in sizes:
            m = medians[nbytes]
            f_alg, g_alg = nbytes / m["flashlm"] / 1e9, nbytes / m["gloo"] / 1e9
            rows.append([size_label(nbytes), f"{m['flashlm'] * 1e3:.3f}", f"{f_alg:.2f}", f"{f_alg * factor:.2f}",
                         f"{m['gloo'] * 1e3:.3f}", f"{g_alg:.2f}", f"{g_alg * factor:.2f}",
                         f"{m['ratio']:.1f}x", fmt(100 * f_alg * factor / ceiling, ".0f") + "%"])
        print(f"{world} processes, float32 sum (median of {args.reps} runs; {max(3, args.reps // 4)} from 64 MiB)\n")
        print_table(["size", "flashlm ms", "algbw GB/s", "busbw GB/s", "gloo ms", "gloo algbw", "gloo busbw",
                     "x gloo", "busbw/memcpy"], rows)
        print()


if __name__ == "__main__":
    main()
