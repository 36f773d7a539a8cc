#!/usr/bin/env python3
"""decode_step_breakdown: where a continuous-batching step's time goes, batch 1 against batch --concurrency.

The llama model of compare_decode.py (default ~90M parameters, Q4_0 with llama.cpp's Q6_K head) is exported and
loaded by flashlm.LLM. Then:
  steps  the engine runs one request alone and --concurrency at once (--reps times, taking turns); every step is
         timed (compare_decode.StepClock) and filed as decode (one new token per sequence) or prefill (prompt
         tokens in it): per run the prefill seconds and the decode step's median, split into the forward (the
         native decoder stack: embedding, layers, final norm, head) and the engine's host work (scheduler,
         sampler, Python);
  parts  the stack's kernels alone at a decode step's shapes, M = 1 and M = --concurrency rows: the 12 layers'
         GEMMs (regrouped weights, activation quantization included) by kind, the head, and the paged attention
         over the sequences' bf16 contexts (--prompt-tokens + 1 to --prompt-tokens + --gen-tokens tokens, spread).

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
from flashlm import _C, ops
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams


def median_time(fn, clock, reps):
    fn()
    times = []
    for _ in range(reps):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def gemm_parts(model, m, clock, reps):
    """{kind: seconds} of the blocks' linears (summed over layers) and the head at m rows."""
    out = {}
    linears = [(name, getattr(b.attn if name in "qkvo" else b.mlp, name)) for b in model.blocks
               for name in ("q", "k", "v", "o", "gate", "up", "down")]
    if model.lm_head is not None:
        linears.append(("head", model.lm_head))
    for name, lin in linears:
        n, k = lin.out_features, lin.in_features
        if not _C.gguf_repack_supported(lin.ggml_type, n, k):
            raise ValueError(f"{name}: {lin.ggml_type} {n} x {k} has no regrouped layout")
        packed = torch.empty_like(lin.raw.reshape(-1))
        _C.gguf_repack(lin.raw.reshape(-1), packed, lin.ggml_type, n, k, True)
        x, y = torch.randn(m, k), torch.empty(m, n)
        kind = "head" if name == "head" else ("q k v o" if name in "qkvo" else "gate up down")
        key = f"{kind} ({lin.ggml_type})"
        out[key] = out.get(key, 0.0) + median_time(
            lambda: _C.gguf_matmul_repacked(x, packed, lin.ggml_type, n, None, y), clock, reps)
    return out


def attention_part(cfg, m, lens, clock, reps, block=16):
    """Seconds of the layers' paged attention (one layer's call times n_layer) for m decode queries."""
    lens = lens[:m]
    per_seq = (max(lens) + block - 1) // block
    hd = cfg.d_model // cfg.n_head
    caches = [torch.randn(m * per_seq, block, cfg.n_kv_head, hd).to(torch.bfloat16) for _ in range(2)]
    table = torch.arange(m * per_seq, dtype=torch.int32).reshape(m, per_seq)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(m, cfg.n_head, hd).to(torch.bfloat16)
    return cfg.n_layer * median_time(lambda: ops.paged_attention(q, *caches, table, seq_lens), clock, reps)


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
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    args.n_expert = args.n_expert_used = 0
    args.moe_d_ff = None
    n = args.concurrency
    with tempfile.TemporaryDirectory() as folder:
        path, n_params = compare_decode.make_gguf(folder, args, args.type, "llama")
        llm = LLM(path, max_num_seqs=n, enable_prefix_caching=False)
        steps = compare_decode.StepClock(llm, clock)
        g = torch.Generator().manual_seed(2)
        vocab = llm.model.cfg.vocab_size
        prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(n)]
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        llm.generate(prompts[0], params)  # warm-up
        runs = {1: [], n: []}
        for _ in range(args.reps):  # the two batch sizes take turns
            for m in (1, n):
                steps.steps.clear()
                t = clock()
                llm.generate(prompts[:m], params)
                total = clock() - t
                dec = [(s, f) for d, _, s, f in steps.steps if d]
                runs[m].append((total, steps.seconds(False), statistics.median(s for s, _ in dec),
                                statistics.median(f for _, f in dec)))
        print(f"llama {args.type}: {n_params / 1e6:.0f}M params, {args.threads} thread(s), clock {args.clock}, "
              f"{args.prompt_tokens} prompt + {args.gen_tokens} generated tokens per request, medians of {args.reps};"
              f" load {os.getloadavg()[0]:.1f}")
        med = {m: [statistics.median(r[i] for r in runs[m]) for i in range(4)] for m in runs}
        print(f"{'batch':>6} {'total s':>8} {'prefill s':>9} {'decode step ms':>14} {'forward ms':>10} {'host ms':>8}")
        for m, (total, prefill, step, fwd) in med.items():
            print(f"{m:6d} {total:8.3f} {prefill:9.3f} {1e3 * step:14.2f} {1e3 * fwd:10.2f} {1e3 * (step - fwd):8.2f}")
        (t1, p1, s1, _), (tn, pn, sn, _) = med[1], med[n]
        print(f"decode only: a batch-{n} step {1e3 * sn:.2f} ms vs batch 1 {1e3 * s1:.2f} ms: {n * s1 / sn:.2f}x the "
              f"tokens/s")
        print(f"prefill: {n} x {args.prompt_tokens} tokens in {pn:.3f} s vs {n} x {p1:.3f} s one at a time")
        print(f"end to end ({n} requests one at a time vs at once, prefill included): {n * t1 / tn:.2f}x")

        cfg = llm.model.cfg
        span = max(args.gen_tokens, 1)
        lens = [args.prompt_tokens + 1 + (i * span) // max(n, 1) for i in range(n)]
        parts = {m: {**gemm_parts(llm.model, m, clock, 5), "paged attention (bf16)": attention_part(
            cfg, m, lens if m > 1 else [lens[n // 2]], clock, 5)} for m in (1, n)}
        print(f"\nthe stack's parts alone at a decode step's shapes (ms per step, {cfg.n_layer} layers):")
        print(f"{'part':>26} {'M=1':>8} {f'M={n}':>8} {'ratio':>6}")
        for key in parts[1]:
            a, b = 1e3 * parts[1][key], 1e3 * parts[n][key]
            print(f"{key:>26} {a:8.2f} {b:8.2f} {b / a:6.1f}")
        a, b = (1e3 * sum(parts[m].values()) for m in (1, n))
        print(f"{'sum':>26} {a:8.2f} {b:8.2f} {b / a:6.1f}")


if __name__ == "__main__":
    sys.exit(main())
