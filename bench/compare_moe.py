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
llama.cpp's MUL_MAT_ID is not measured here: llama-cpp-python exposes the model API, not ggml's graph API, so
one expert-indexed product cannot be run alone; bench/compare_decode.py compares whole-model decoding.
Before timing, flashlm's output is checked against torch's (relative Frobenius error below 2% for Q4_0, whose x
and intermediate are quantized to 8 bits, as test_moe_kernels.py bounds; 1e-4 for f32): the script stops if off.

GMAC/s: T * k * 3 * D * F multiply-adds (the routed experts' work) per second. The runs take turns
(bench_util.median_seconds), so background load on a shared machine falls on both alike.

Run (from the repository root, with flashlm installed):
  python bench/compare_moe.py                         # T = 1, 16, 256; Q4_0 and f32; D 2048, F 5632
  python bench/compare_moe.py --f 1408 --tokens 1,16  # smaller experts, decode sizes only
  python bench/compare_moe.py --quick                 # seconds: CI smoke
"""

import argparse
import sys

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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
