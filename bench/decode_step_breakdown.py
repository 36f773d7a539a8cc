#!/usr/bin/env python3
"""decode_step_breakdown: where a continuous-batching step's time goes, batch 1 against batch --concurrency.

The llama model of compare_decode.py (default ~90M parameters, Q4_0) is exported and loaded by flashlm.LLM; the
engine then runs --concurrency requests at once and one alone, and every forward call (the native decoder stack:
embedding, layers, final norm, head) is timed and sorted by its tokens: the pure decode steps (one token per
sequence) apart from the steps that carry prompt tokens (prefill). The rest of a step (scheduler, sampler, the
engine's Python) is the step's time less its forward. Then the stack's parts are timed alone at the decode
step's shapes (M = 1 and M = --concurrency rows): the layers' GEMMs (with their activation quantization), the
paged attention over the sequences' contexts, and the head.

  python bench/decode_step_breakdown.py --threads 1 --clock cpu
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import compare_decode
from flashlm import ops
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams


def timed_forward(llm, clock, log):
    """Wraps the runner's forward to append (tokens, sequences, seconds) per call to log."""
    runner = llm.runner
    inner = runner.forward

    def forward(tokens, paged):
        t = clock()
        out = inner(tokens, paged)
        log.append((tokens.numel(), int(paged.seq_lens.numel()), clock() - t))
        return out

    runner.forward = forward
    return runner


def median_ms(values):
    return 1e3 * statistics.median(values) if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="Q4_0")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    args.n_expert = args.n_expert_used = 0
    args.moe_d_ff = None
    with tempfile.TemporaryDirectory() as folder:
        path, n_params = compare_decode.make_gguf(folder, args, args.type, "llama")
        llm = LLM(path, max_num_seqs=args.concurrency, enable_prefix_caching=False)
        log = []
        timed_forward(llm, clock, log)
        g = torch.Generator().manual_seed(2)
        vocab = llm.model.cfg.vocab_size
        prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.concurrency)]
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        llm.generate(prompts[0], params)  # warm-up
        rows = []
        for label, batch in (("batch 1", prompts[:1]), (f"batch {args.concurrency}", prompts)):
            log.clear()
            t = clock()
            llm.generate(batch, params)
            total = clock() - t
            decode = [s for n, seqs, s in log if n == seqs]
            prefill = [s for n, seqs, s in log if n != seqs]
            rows.append((label, len(log), len(prefill), sum(prefill), len(decode), sum(decode), total,
                         median_ms(decode)))
        print(f"llama {args.type}: {n_params / 1e6:.0f}M params, {args.threads} thread(s), clock {args.clock}, "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"{'run':>10} {'steps':>6} {'prefill steps':>13} {'prefill s':>9} {'decode steps':>12} "
              f"{'decode s':>8} {'total s':>7} {'decode step ms':>14}")
        for r in rows:
            print(f"{r[0]:>10} {r[1]:6d} {r[2]:13d} {r[3]:9.3f} {r[4]:12d} {r[5]:8.3f} {r[6]:7.3f} {r[7]:14.2f}")
        (_, _, _, p1, _, d1, t1, s1), (_, _, _, pn, _, dn, tn, sn) = rows
        n = args.concurrency
        print(f"decode step: batch {n} {sn:.2f} ms vs batch 1 {s1:.2f} ms: {sn / s1:.1f}x the time for {n}x the "
              f"tokens; decode-only throughput ratio {n * s1 / sn:.2f}x")
        print(f"end to end ({n} requests of {args.prompt_tokens} prompt + {args.gen_tokens} tokens, prefill included,"
              f" as compare_decode's batching figure): {n * t1 / tn:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
