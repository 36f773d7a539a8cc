#!/usr/bin/env python3
"""compare_host: the engine's host work per step (scheduling, batch preparation, sampling, stop checks: the
step's time outside the model's forward) at growing batch sizes, greedy and temperature 0.8.

A tiny random Q4_0 llama (2 layers, d 128, vocab 512) keeps the forward short, so the host work is most of a
step. Each case runs --batch requests of --prompt-tokens random tokens to --gen-tokens tokens (ignore_eos) with
all of them in one batch (max_num_seqs = batch) and reports EngineStats' host milliseconds per step (one thread;
by default timed in the thread's CPU time, --clock wall for the wall clock). The figure should stay flat as the
batch grows: the per-sequence Python work is what it measures.

--against DIR runs every case also with the flashlm found in DIR (a checkout's python/ folder), in a process of
its own, the two taking turns per repetition so that both see the same load; the table then has both columns.

Run (from the repository root):
  python bench/compare_host.py                                    # batch 1 4 16 64, medians of 5
  python bench/compare_host.py --against /path/to/other/python    # before / after, interleaved
  python bench/compare_host.py --quick                            # CI smoke
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

def make_model(folder):
    import torch

    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_gguf
    from flashlm.train.tokenizer import train_tokenizer

    text = [" ".join(f"word{i % 97} w{i % 13}{i % 7}" for i in range(j, j + 200)) for j in range(50)]
    tok = train_tokenizer(text, vocab_size=512)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=128,
                      seq_len=512, tie_embeddings=False)
    torch.manual_seed(0)
    path = os.path.join(folder, "tiny-Q4_0.gguf")
    export_gguf(Transformer(cfg), cfg, tok.to_str(), path, type="Q4_0")
    return path


def host_ms(path, batch, temperature, prompt_tokens, gen_tokens) -> float:
    """Host milliseconds per step of one generate() of `batch` requests, all in one batch."""
    import torch

    from flashlm.runtime.engine import LLM, EngineStats
    from flashlm.runtime.sampling_params import SamplingParams

    llm = LLM(path, max_num_seqs=batch, enable_prefix_caching=False)
    g = torch.Generator().manual_seed(batch)
    vocab = llm.model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=temperature, max_tokens=gen_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    llm.stats, llm.runner.forward_seconds = EngineStats(), 0.0
    llm.generate(prompts, params)
    return llm.stats_summary()["host_ms_per_step"]


def worker(args) -> None:
    """One repetition of every case in this process; prints {case: ms} as JSON."""
    import time

    import torch

    from flashlm import ops

    # One thread: the host work is single-threaded, and so the whole step is the calling thread's CPU time.
    torch.set_num_threads(1)
    ops.set_num_threads(1)
    if args.clock == "cpu":  # the engine's step and forward timers read this thread's CPU time instead
        time.perf_counter = time.thread_time
    out = {f"{b} {t}": host_ms(args.model, b, t, args.prompt_tokens, args.gen_tokens)
           for b in args.batch for t in args.temperature}
    print(json.dumps(out))


def run_once(pythonpath, args) -> dict:
    """One worker run with flashlm from `pythonpath` (None: the environment's own, the installed package)."""
    env = dict(os.environ) if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--clock", args.clock, "--batch", *map(str, args.batch), "--temperature", *map(str, args.temperature)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"flashlm: error: the run with PYTHONPATH={pythonpath} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                   help="cpu (default): the thread's CPU time, which other jobs on the machine do not inflate")
    p.add_argument("--against", default=None, help="another flashlm's python/ folder, run in turn with this one")
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, few tokens, one repetition (CI smoke)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for b in args.batch:
        if not 1 <= b <= 1024:
            p.error(f"--batch: each must be in [1, 1024], got {b}")
    if args.quick:
        args.batch, args.gen_tokens, args.reps = [1, 4], 8, 1
    if args.worker:
        return worker(args)
    # "this" is the flashlm this interpreter imports (PYTHONPATH as set, else the installed package): a
    # checkout's python/ folder lacks the native module unless it was installed editable.
    trees = {"this": None}
    if args.against:
        trees = {"against": os.path.abspath(args.against), **trees}
    with tempfile.TemporaryDirectory() as folder:
        args.model = make_model(folder)
        runs = {label: [] for label in trees}
        for _ in range(args.reps):  # the trees take turns
            for label, tree in trees.items():
                runs[label].append(run_once(tree, args))
    where = {k: v or os.environ.get("PYTHONPATH") or "installed" for k, v in trees.items()}
    print(f"host ms per step (median of {args.reps}; prompt {args.prompt_tokens}, {args.gen_tokens} tokens; "
          f"clock {args.clock}; {', '.join(f'{k}: {v}' for k, v in where.items())})")
    print("| batch | temperature | " + " | ".join(trees) + (" | ratio |" if args.against else ""))
    print("|---|---|" + "---|" * (len(trees) + (1 if args.against else 0)))
    for b in args.batch:
        for t in args.temperature:
            meds = [statistics.median(r[f"{b} {t}"] for r in runs[label]) for label in trees]
            ratio = f" {meds[0] / meds[1]:.2f}x |" if args.against else ""
            print(f"| {b} | {t} | " + " | ".join(f"{m:.3f}" for m in meds) + " |" + ratio)


if __name__ == "__main__":
    sys.exit(main())
