#!/usr/bin/env python3
"""compare_moe: flashlm.ops.moe.expert_ffn (one mixture-of-experts feed-forward) against a torch loop over experts.

One MoE layer of E experts (default 8, top-2, Mixtral's shape D = 2048 hidden, F = 5632 per expert): gate and
up [E, F, D], down [E, D, F]; the tokens are routed by flashlm.ops.moe.route from random logits. Measured at
decode (T = 1, 16 tokens) and prefill (T = 256) sizes, for weights in Q4_0 blocks and in float32:
  flashlm   expert_ffn: the (token, expert) rows counting-sorted by expert once, each expert's rows through its
            weights as one GEMM (Q4_0: the GGUF matmul's integer block dot products, x quantized to 8-bit
            blocks once per row; f32: AVX2 row kernels), scattered back with the routing weights; one native
            call, flashlm's thread pool,
  torch     the loop of HF transformers' Mixtral block: for each expert present, its tokens gathered,
            silu(x G.T) * (x U.T) @ D.T with torch's GEMM, index_add_ back, on the same weights in float32
            (Q4_0: dequantized).
llama.cpp's MUL_MAT_ID is not measured alone: llama-cpp-python exposes the model API, not ggml's graph API, so
one expert-indexed product cannot be run by itself. --decode compares whole-model decoding instead: a random
Mixtral (bench/compare_decode.py's, exported to one GGUF file; its shape from --d, --f, --experts, --top-k,
--layers) decoded greedily at batch 1 by
  native    flashlm.LLM with the native decoder stack (every layer, experts included, in one C++ call a step),
  modules   flashlm.LLM module by module (native_decoder off: the Python loop over layers and kernels),
  llama.cpp llama_cpp.Llama on the same file,
each with --threads threads (default 1) and timed by --clock (default cpu: the process's CPU time, which a
shared machine cannot inflate); the three take turns, --reps times, and the medians are reported.
Before timing, flashlm's output is checked against torch's (relative Frobenius error below 2% for Q4_0, whose x
and intermediate are quantized to 8 bits, as test_moe_kernels.py bounds; 1e-4 for f32): the script stops if off.

GMAC/s: T * k * 3 * D * F multiply-adds (the routed experts' work) per second. The runs take turns
(bench_util.median_seconds), so background load on a shared machine falls on both alike.

Run (from the repository root, with flashlm installed):
  python bench/compare_moe.py                         # T = 1, 16, 256; Q4_0 and f32; D 2048, F 5632
  python bench/compare_moe.py --f 1408 --tokens 1,16  # smaller experts, decode sizes only
  python bench/compare_moe.py --quick                 # seconds: CI smoke
  python bench/compare_moe.py --decode --types Q4_0 --d 1024 --f 2816 --layers 8   # whole-model decode
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import flashlm.ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.ops import moe
from flashlm.quant.gguf_experts import GGUFExperts


def torch_ffn(x, weights, experts, gate, up, down):
    """HF Mixtral's loop: each expert present runs on its tokens with torch's GEMM."""
    out = torch.zeros_like(x)
    t, k = experts.shape
    flat, token = experts.reshape(-1), torch.arange(t).repeat_interleave(k)
    wflat = weights.reshape(-1)
    for e in flat.unique().tolist():
        sel = (flat == e).nonzero().squeeze(1)
        rows = token[sel]
        xe = x[rows]
        h = torch.nn.functional.silu(xe @ gate[e].T) * (xe @ up[e].T)
        out.index_add_(0, rows, (h @ down[e].T) * wflat[sel, None])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d", type=int, default=2048, help="hidden size D")
    ap.add_argument("--f", type=int, default=5632, help="each expert's intermediate size F")
    ap.add_argument("--tokens", default="1,16,256", help="comma-separated T")
    ap.add_argument("--types", default="Q4_0,F32", help="comma-separated weight types: F32 and GGUF types")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per measurement; the median is reported")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--burst", type=int, default=3, help="back-to-back calls per turn, the first untimed")
    ap.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke test in seconds")
    ap.add_argument("--decode", action="store_true", help="whole-model decode: native stack, modules, llama.cpp")
    ap.add_argument("--layers", type=int, default=8, help="--decode: layers of the model")
    ap.add_argument("--threads", type=int, default=1, help="--decode: threads of each runtime")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="--decode: what is timed")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="--decode: prompt length")
    ap.add_argument("--gen-tokens", type=int, default=32, help="--decode: tokens decoded per run")
    args = ap.parse_args()
    if args.decode:
        return decode(args)
    if args.quick:
        args.d, args.f, args.tokens, args.reps, args.warmup, args.burst = 256, 512, "1,16", 2, 1, 2
    try:
        tokens = [int(v) for v in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens: expected integers, got {args.tokens!r}")
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    bad = [t for t in types if t != "F32" and t not in flashlm.ops.GGUF_LINEAR_TYPES]
    if bad:
        ap.error(f"--types: {', '.join(bad)} not supported (F32, {', '.join(flashlm.ops.GGUF_LINEAR_TYPES)})")
    if not 1 <= args.top_k <= args.experts:
        ap.error("--top-k: must be in [1, --experts]")
    e, d, f, k = args.experts, args.d, args.f, args.top_k
    print(hardware_line("cpu", flashlm.ops, f"torch {torch.get_num_threads()} threads"))
    print(f"E={e}, top-{k}, D={d}, F={f}: {3 * e * d * f / 1e6:.0f} M expert weights\n")

    gen = torch.Generator().manual_seed(0)
    floats = [torch.randn(e, f, d, generator=gen) * 0.02, torch.randn(e, f, d, generator=gen) * 0.02,
              torch.randn(e, d, f, generator=gen) * 0.02]
    rows = []
    for ggml_type in types:
        if ggml_type == "F32":
            ours, theirs = floats, floats
        else:
            ours = [GGUFExperts.from_float(w, ggml_type) for w in floats]
            theirs = [w.dequantize() for w in ours]
        for t in tokens:
            x = torch.randn(t, d, generator=gen)
            weights, experts = moe.route(torch.randn(t, e, generator=gen), k)
            got = moe.expert_ffn(x, weights, experts, *ours)
            want = torch_ffn(x, weights, experts, *theirs)
            rel = ((got - want).norm() / want.norm()).item()
            limit = 1e-4 if ggml_type == "F32" else 2e-2
            if not rel < limit:
                sys.exit(f"compare_moe: {ggml_type} T={t}: flashlm is off by {rel:.2e} (relative), limit {limit}")
            times = median_seconds({
                "flashlm": (lambda: moe.expert_ffn(x, weights, experts, *ours), "cpu"),
                "torch": (lambda: torch_ffn(x, weights, experts, *theirs), "cpu"),
            }, args.reps, args.warmup, args.burst)
            macs = t * k * 3 * d * f
            ours_s, theirs_s = times["flashlm"], times["torch"]
            rows.append([ggml_type, str(t), fmt(ours_s * 1e3, ".2f"), fmt(macs / ours_s / 1e9, ".1f"),
                         fmt(theirs_s * 1e3, ".2f"), fmt(macs / theirs_s / 1e9, ".1f"),
                         fmt(theirs_s / ours_s, ".2f")])
    print_table(["weights", "T", "flashlm ms", "flashlm GMAC/s", "torch ms", "torch GMAC/s", "x torch"], rows)


def decode(args):
    """Whole-model decode tokens/s of one Mixtral GGUF file: the native stack, the module path and llama.cpp."""
    import compare_decode

    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if args.quick:
        args.layers, args.prompt_tokens, args.gen_tokens, args.reps = 2, 16, 8, 2
    torch.set_num_threads(args.threads)
    flashlm.ops.set_num_threads(args.threads)
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    shape = argparse.Namespace(vocab=4096, layers=args.layers, heads=args.d // 64, kv_heads=max(args.d // 256, 1),
                               d_model=args.d, n_expert=args.experts, n_expert_used=args.top_k, moe_d_ff=args.f,
                               prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, concurrency=1,
                               threads=args.threads, kv_dtype="bfloat16")
    print(hardware_line("cpu", flashlm.ops, f"{args.threads} thread(s) each, clock {args.clock}"))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ggml_type in types:
            path, n_params = compare_decode.make_gguf(folder, shape, ggml_type, "mixtral")
            runs = {}
            for name in ("native", "modules"):
                llm, prompt, run = compare_decode.flashlm_runs(path, shape)
                llm.runner.use_native_decoder = name == "native"
                if name == "native" and llm.runner.native_decoder() is None:  # F32 files: no float linears
                    print(f"note: {ggml_type}: the native decoder stack does not take this file; no native row")
                    continue
                runs[name] = run
            if have_llama_cpp:
                runs["llama.cpp"] = compare_decode.llama_cpp_runs(path, prompt, shape)
            first = {name: run(clock)[0][:8] for name, run in runs.items()}  # also the warm-up
            if len({tuple(t) for t in first.values()}) > 1:
                print(f"note: first greedy tokens differ: {first}")
            per_token = {name: [] for name in runs}
            for _ in range(args.reps):
                for name, run in runs.items():
                    per_token[name].append(run(clock)[2])
            rate = {name: 1.0 / statistics.median(v) for name, v in per_token.items()}
            ref = rate.get("llama.cpp")
            rows.append([ggml_type, f"{n_params / 1e6:.0f}M"] +
                        [fmt(rate[n], ".1f") if n in rate else "-" for n in ("native", "modules", "llama.cpp")] +
                        [fmt(rate["native"] / rate["modules"], ".2f") if "native" in rate else "-",
                         fmt(rate["native"] / ref, ".2f") if ref and "native" in rate else "-",
                         fmt(rate["modules"] / ref, ".2f") if ref else "-"])
    print(f"mixtral: {args.layers} layers, d {args.d}, {args.experts} experts of {args.f}, top-{args.top_k}; "
          f"prompt {args.prompt_tokens}, {args.gen_tokens} tokens decoded; median of {args.reps}\n")
    print_table(["weights", "params", "native tok/s", "modules tok/s", "llama.cpp tok/s", "native/modules",
                 "native/llama.cpp", "modules/llama.cpp"], rows)
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
