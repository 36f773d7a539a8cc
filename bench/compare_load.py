#!/usr/bin/env python3
"""compare_load: loading a GGUF model, flashlm.io.load_gguf against llama.cpp (llama-cpp-python), time and memory.

Writes a random Q4_0 llama model (default 91 MiB: d_model 1024, 8 layers, vocab 32000, untied output;
flashlm's quantizer, a byte-level vocabulary with one merge). Each loader, in a fresh process, first loads
and runs a tiny model (its one-time costs: imports, thread pools), then loads the model and runs one forward
pass over 16 tokens; reported: the load time, that pass's time (medians of --reps processes), and the
process's resident memory growth over both, next to the file size: the floor for a loader that keeps the
weights in the file's mapping. llama.cpp is skipped where llama_cpp does not import.

Run (from the repository root, with flashlm installed; llama-cpp-python for the peer):
  python bench/compare_load.py [--d-model 1024 --layers 8 --reps 3]
  python bench/compare_load.py --quick      # a 2-layer d_model 256 model, one process: CI smoke
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import flashlm.ops as ops
from bench_util import fmt, hardware_line, medians, print_table
from flashlm.io.random_model import write_random_llama_gguf

_CHILD = r"""
import json, sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
which, tiny, path = sys.argv[1:4]
ids = list(range(1, 17))
if which == "flashlm":
    import torch
    from flashlm.io import load_gguf
    def load(p):
        return load_gguf(p).model
    def forward(m):
        with torch.no_grad():
            m(torch.tensor([ids]))
else:
    import llama_cpp
    def load(p):
        return llama_cpp.Llama(model_path=p, n_ctx=64, n_batch=16, verbose=False)
    def forward(m):
        m.eval(ids)
start = rss()
forward(load(tiny))  # the library's one-time costs (imports, thread pools), reported apart
before = rss()
t0 = time.perf_counter()
model = load(path)
t1 = time.perf_counter()
forward(model)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "forward_s": t2 - t1, "rss_grew": rss() - before, "warmup_rss": before - start}))
"""


def run(which, tiny, path, reps):
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", _CHILD, which, tiny, path], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{which}: the process exited with status {out.returncode}: {out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return medians(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a 2-layer d_model 256 model, one process")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.d_ff, args.layers, args.vocab, args.reps = 256, 512, 2, 1024, 1
    with tempfile.TemporaryDirectory() as tmp:
        path, tiny = os.path.join(tmp, "bench-Q4_0.gguf"), os.path.join(tmp, "tiny-Q4_0.gguf")
        write_random_llama_gguf(path, args.d_model, args.d_ff, args.layers, args.vocab, max(1, args.d_model // 64))
        write_random_llama_gguf(tiny, 64, 64, 1, 512, n_head=1)
        size = os.path.getsize(path)
        results = {"flashlm": run("flashlm", tiny, path, args.reps)}
        try:
            import llama_cpp
            results["llama.cpp"] = run("llama.cpp", tiny, path, args.reps)
            peer = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        except ImportError:
            peer = "llama.cpp: llama_cpp does not import here, skipped"
    print(hardware_line("cpu", ops, peer))
    print(f"model: Q4_0 llama, d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, file "
          f"{size / 2**20:.1f} MiB (the memory floor); medians of {args.reps} processes\n")
    rows = [[name, fmt(r["load_s"] * 1e3, ".1f"), fmt(r["forward_s"] * 1e3, ".1f"),
             fmt(r["rss_grew"] / 2**20, ".1f"), fmt(r["rss_grew"] / size, ".2f"), fmt(r["warmup_rss"] / 2**20, ".0f")]
            for name, r in results.items()]
    print_table(["loader", "load ms", "first 16-token forward ms", "RSS growth MiB", "x the file",
                 "one-time RSS MiB (before)"], rows)


if __name__ == "__main__":
    main()
