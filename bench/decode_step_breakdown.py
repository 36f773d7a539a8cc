#!/usr/bin/env python3
"""decode_step_breakdown: where a continuous-batching step's time goes, batch 1 against batch --concurrency.

The llama model of compare_decode.py (default ~90M parameters, Q4_0 with llama.cpp's Q6_K head) is exported and
loaded by flashlm.LLM. Then:
  steps  the engine runs one request alone and --concurrency at once (--reps times, taking turns); every step is
         timed (compare_decode.StepClock) and filed as decode (one new token per sequence) or prefill (prompt
         tokens in it): of the run of median total time, the prefill seconds and the decode step's median, split
         into the forward (the native decoder stack: embedding, layers, final norm, head) and the engine's host
         work (scheduler, sampler, Python); the prefill and the decode steps each as tokens, seconds and GMAC/s
         of the linears (the layers' and the head's multiply-adds; attention's are not counted);
  bound  Amdahl's bound on the end-to-end ratio (--concurrency at once against one at a time): the prompts'
         prefill is the same arithmetic either way, so the ratio is at most a request's whole time over its
         prefill, even if the batched decode cost nothing; and what the prefill, or the batched decode steps,
         would have to take for --goal (4x) at the other's measured time;
  parts  the stack's kernels alone at a decode step's shapes, M = 1 and M = --concurrency rows: the 12 layers'
         GEMMs (regrouped weights, activation quantization included) by kind, the head, and the paged attention
         over the sequences' bf16 contexts (--prompt-tokens + 1 to --prompt-tokens + --gen-tokens tokens, spread);
         and the GEMMs at a prefill chunk's rows (the decoder takes a prefill 64 rows at a time), in GMAC/s: the
         figure to set next to bench/int8_peak.cpp's "vnni + GEMV rounding" ceiling, run in the same minute.

  python bench/decode_step_breakdown.py --threads 1 --clock cpu
  g++ -O3 -std=c++17 -pthread bench/int8_peak.cpp -o build/int8_peak && build/int8_peak 1   # the ceiling
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


# The rows of x the decoder's GEMMs take at a time in a prefill (csrc/runtime/decoder.cpp's kChunkRows).
PREFILL_CHUNK = 64


def linears(model):
    """(kind, linear) of the blocks' linears and the head, kind as the parts table names it."""
    out = [("q k v o" if name in "qkvo" else "gate up down", getattr(b.attn if name in "qkvo" else b.mlp, name))
           for b in model.blocks for name in ("q", "k", "v", "o", "gate", "up", "down")]
    if model.lm_head is not None:
        out.append(("head", model.lm_head))
    return [(f"{kind} ({lin.ggml_type})", lin) for kind, lin in out]


def token_macs(model):
    """(multiply-adds per token of the blocks' linears, of the head)."""
    layers = sum(lin.out_features * lin.in_features for kind, lin in linears(model) if not kind.startswith("head"))
    cfg = model.cfg
    return layers, cfg.vocab_size * cfg.d_model


def gemm_parts(model, m, clock, reps):
    """{kind: seconds} of the blocks' linears (summed over layers) and the head at m rows."""
    out = {}
    for key, lin in linears(model):
        n, k = lin.out_features, lin.in_features
        if not _C.gguf_repack_supported(lin.ggml_type, n, k):
            raise ValueError(f"{key}: {lin.ggml_type} {n} x {k} has no regrouped layout")
        packed = torch.empty_like(lin.raw.reshape(-1))
        _C.gguf_repack(lin.raw.reshape(-1), packed, lin.ggml_type, n, k, True)
        x, y = torch.randn(m, k), torch.empty(m, n)
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


def print_split(model, args, med):
    """Each run's prefill and decode steps as tokens, seconds and GMAC/s of the linears."""
    layers, head = token_macs(model)
    print(f"{'batch':>6} {'prefill tokens':>14} {'s':>7} {'GMAC/s':>7} {'decode tokens':>13} {'steps':>5} {'s':>7} "
          f"{'tok/s':>7} {'GMAC/s':>7}")
    for m, (_, prefill, _, _, decode, steps) in med.items():
        pt, dt = m * args.prompt_tokens, m * steps  # (only each prompt's last row goes through the head)
        pg = (pt * layers + m * head) / prefill / 1e9
        dg = dt * (layers + head) / decode / 1e9
        print(f"{m:6d} {pt:14d} {prefill:7.3f} {pg:7.1f} {dt:13d} {steps:5.0f} {decode:7.3f} {dt / decode:7.1f} "
              f"{dg:7.1f}")


def print_bound(args, n, t1, p1, d1, tn, pn, dn):
    """Amdahl's bound on the end-to-end ratio n * t1 / tn, and what --goal would take. Per request one at a
    time: p1 prefill, d1 decode, t1 all (the rest is the engine's work outside the steps); at once: pn, dn, tn for
    all n. The prefill's arithmetic is the same either way, so it is taken as n * p1 in both."""
    goal, rest1, restn = args.goal, t1 - p1 - d1, tn - pn - dn
    print(f"\nbound: one request alone {p1:.3f} s prefill + {d1:.3f} s decode + {rest1:.3f} s other; {n} at once "
          f"{pn:.3f} + {dn:.3f} + {restn:.3f} s")
    print(f"  with the prefill the same either way, the ratio is at most n t1 / (n p1) = {t1 / p1:.2f}x, "
          f"if the batch-{n} decode and the rest took no time")
    # n t1 / (n p + dn + restn) >= goal  <=>  p <= (n (d1 + rest1) - goal (dn + restn)) / (n (goal - 1)), where the
    # prefill p (per request) changes both runs alike.
    p_max = (n * (d1 + rest1) - goal * (dn + restn)) / (n * (goal - 1))
    if p_max <= 0:
        print(f"  {goal:g}x is out of reach at any prefill speed: the batch-{n} decode ({dn:.3f} s) would have to "
              f"be under {n * (d1 + rest1) / goal - restn:.3f} s first (with a prefill that took no time)")
    else:
        print(f"  {goal:g}x at the measured decode needs a prefill of at most {p_max:.3f} s a request: "
              f"{args.prompt_tokens / p_max:.0f} tokens/s against {args.prompt_tokens / p1:.0f} now")
    d_max = n * t1 / goal - pn - restn
    steps = max(args.gen_tokens - 1, 1)
    print(f"  {goal:g}x at the measured prefills needs the batch-{n} decode under {d_max:.3f} s "
          + (f"({1e3 * d_max / steps:.2f} ms a step, now {1e3 * dn / steps:.2f})" if d_max > 0 else
             "(impossible: the prefill alone takes longer)"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="Q4_0")
    compare_decode.shape_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--goal", type=float, default=4.0, help="the end-to-end ratio the bound is worked out for")
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
                                statistics.median(f for _, f in dec), steps.seconds(True), len(dec)))
        print(f"llama {args.type}: {n_params / 1e6:.0f}M params, {args.threads} thread(s), clock {args.clock}, "
              f"{args.prompt_tokens} prompt + {args.gen_tokens} generated tokens per request, the median of "
              f"{args.reps} runs; load {os.getloadavg()[0]:.1f}")
        # Each batch size's run of median total time, whole: its parts add up (medians taken part by part do not).
        med = {m: sorted(runs[m])[(len(runs[m]) - 1) // 2] for m in runs}
        print(f"{'batch':>6} {'total s':>8} {'prefill s':>9} {'decode step ms':>14} {'forward ms':>10} {'host ms':>8}")
        for m, (total, prefill, step, fwd, _, _) in med.items():
            print(f"{m:6d} {total:8.3f} {prefill:9.3f} {1e3 * step:14.2f} {1e3 * fwd:10.2f} {1e3 * (step - fwd):8.2f}")
        (t1, p1, s1, _, d1, _), (tn, pn, sn, _, dn, _) = med[1], med[n]
        print(f"decode only: a batch-{n} step {1e3 * sn:.2f} ms vs batch 1 {1e3 * s1:.2f} ms: {n * s1 / sn:.2f}x the "
              f"tokens/s")
        print(f"prefill: {n} x {args.prompt_tokens} tokens in {pn:.3f} s vs {n} x {p1:.3f} s one at a time")
        print(f"end to end ({n} requests one at a time vs at once, prefill included): {n * t1 / tn:.2f}x")
        print_split(llm.model, args, med)
        print_bound(args, n, t1, p1, d1, tn, pn, dn)

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
        chunk = gemm_parts(llm.model, PREFILL_CHUNK, clock, 5)
        macs = {}
        for key, lin in linears(llm.model):
            macs[key] = macs.get(key, 0) + PREFILL_CHUNK * lin.out_features * lin.in_features
        print(f"\nthe GEMMs at a prefill chunk's {PREFILL_CHUNK} rows (activation quantization included): "
              + ", ".join(f"{key} {macs[key] / chunk[key] / 1e9:.1f}" for key in chunk)
              + f", all {sum(macs.values()) / sum(chunk.values()) / 1e9:.1f} GMAC/s")


if __name__ == "__main__":
    sys.exit(main())
