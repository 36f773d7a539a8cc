#!/usr/bin/env python3
"""compare_attention: flashlm's flash attention against torch's scaled_dot_product_attention, one table per run.

For each (seqlen, head_dim, causal) at --batch 1 and --heads 16 (S = Sq = Sk; --kv-heads: grouped K/V heads, as
Llama's GQA), random q, k, v go through
  flashlm   flashlm.flash_attn_interface.flash_attn_func, layout [B, S, H, D], v2 tiling (and v1, forward only;
            and, where the CPU has AVX-512F, once more with the kernels' AVX-512 build switched off: "AVX2 ms"),
  torch     torch.nn.functional.scaled_dot_product_attention, layout [B, H, S, D] (its own; on CUDA forced to
            its flash backend),
forward alone and forward + backward. Each side gets its native layout, prepared before timing. Before
timing, flashlm's output is checked against torch's (the script stops if they differ beyond the dtype's
tolerance). Medians of --reps interleaved runs after warm-up (bench_util.median_seconds).

FLOPs count the matmuls: forward 4 * B * H * D * (visible query-key pairs), forward + backward 3.5 times that
(the backward's five matmuls against the forward's two); causal pairs are S (S + 1) / 2. "x torch" is torch's
median time over flashlm's. --cpu-time times with the process's CPU time (all threads) instead of the wall
clock, for a loaded machine: the ratios then compare CPU-seconds. The ceiling is a large torch matmul in the same dtype on the same device
(CPU: float32, torch's MKL/oneDNN on its threads; CUDA: bf16 on the tensor cores).

Run (from the repository root, with flashlm installed):
  python bench/compare_attention.py                            # CPU float32, S 512/2048/4096, D 64/128
  python bench/compare_attention.py --seqlens 2048 --dtype bf16
  python bench/compare_attention.py --device cuda --dtype bf16  # needs flashlm's CUDA kernels and a GPU
  python bench/compare_attention.py --quick                    # a few seconds: CI smoke
  python bench/compare_attention.py --seqlens 1024 --causal yes --batch 2 --heads 8 --cpu-time  # training shapes
  python bench/compare_attention.py --seqlens 256 --head-dims 32 --causal yes --batch 2 --heads 8 --kv-heads 2 \
      --cpu-time --dtype bf16          # compare_train's llama layer (gpt2's: --head-dims 64 --heads 4)
"""

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F

import flashlm
import flashlm.ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm import _C
from flashlm.flash_attn_interface import flash_attn_func

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max |flashlm - torch|


def matmul_peak(device, dtype, clock, n=4096, reps=5):
    """FLOP/s of an n x n x n torch matmul: the ceiling attention's matmuls work against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_seconds({"mm": (lambda: torch.mm(a, b), device)}, reps, 2, clock=clock)["mm"]
    return 2 * n**3 / t


def visible_pairs(s, causal):
    return s * (s + 1) // 2 if causal else s * s


def torch_sdpa_context(device):
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    import contextlib
    return contextlib.nullcontext()


def run_case(args, s, d, causal, dtype):
    """Times one configuration; returns {label: seconds}."""
    b, h, kvh, device = args.batch, args.heads, args.kv_heads, args.device
    g = torch.Generator().manual_seed(s * 1000 + d)
    q, k, v, dout = (torch.randn(b, s, n, d, generator=g).to(device=device, dtype=dtype) for n in (h, kvh, kvh, h))
    gqa = dict(enable_gqa=True) if kvh != h else {}
    # torch's own layout, [B, H, S, D], contiguous.
    qt, kt, vt, doutt = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    qtl, ktl, vtl = (t.clone().requires_grad_() for t in (qt, kt, vt))

    with torch_sdpa_context(device):
        ours = flash_attn_func(q, k, v, causal=causal)
        theirs = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa).transpose(1, 2)
        err = (ours.float() - theirs.float()).abs().max().item()
        if err > TOLERANCE[dtype]:
            sys.exit(f"compare_attention: S={s} D={d} causal={causal}: flashlm differs from torch by {err:.3g} "
                     f"(> {TOLERANCE[dtype]}). Not timing a wrong kernel.")

        def with_avx512(allowed, fn):
            def run():
                _C.set_attention_avx512(allowed)
                fn()
            return run

        def fwd_bwd_flashlm():
            for t in (ql, kl, vl):
                t.grad = None
            flash_attn_func(ql, kl, vl, causal=causal).backward(dout)

        def fwd_bwd_torch():
            for t in (qtl, ktl, vtl):
                t.grad = None
            F.scaled_dot_product_attention(qtl, ktl, vtl, is_causal=causal, **gqa).backward(doutt)

        fwd_flashlm = lambda: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
        fns = {
            "flashlm fwd": (with_avx512(True, fwd_flashlm), device),
            "torch fwd": (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa), device),
            "flashlm fwd+bwd": (with_avx512(True, fwd_bwd_flashlm), device),
            "torch fwd+bwd": (fwd_bwd_torch, device),
        }
        if args.v1:
            fns["flashlm v1 fwd"] = (lambda: flash_attn_func(q, k, v, causal=causal, version=1), device)
        if args.avx2:
            fns["flashlm avx2 fwd"] = (with_avx512(False, fwd_flashlm), device)
            fns["flashlm avx2 fwd+bwd"] = (with_avx512(False, fwd_bwd_flashlm), device)
        try:
            with torch.no_grad():
                fwd = median_seconds({k_: v_ for k_, v_ in fns.items() if "bwd" not in k_}, args.reps, args.warmup,
                                     clock=args.clock)
            both = median_seconds({k_: v_ for k_, v_ in fns.items() if "bwd" in k_}, args.reps, args.warmup,
                                  clock=args.clock)
        finally:
            _C.set_attention_avx512(True)
    return {**fwd, **both}, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: f32 on the CPU, bf16 on CUDA")
    ap.add_argument("--seqlens", default="512,2048,4096")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: --heads); must divide --heads")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--no-v1", dest="v1", action="store_false", help="skip the v1 (FlashAttention-1 order) forward")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default: 5 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few runs: a smoke test in seconds")
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (a loaded machine)")
    args = ap.parse_args()
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    # The AVX2 column: the CPU kernels once more without their AVX-512 build, where the CPU would use it.
    args.avx2 = args.device == "cpu" and flashlm.ops.cpu_isa() == "avx2" and _C.cpu_features()["avx512f"]
    dtype = DTYPES[args.dtype or ("f32" if args.device == "cpu" else "bf16")]
    if args.device == "cpu" and dtype == torch.float16:
        ap.error("--dtype f16: flashlm's CPU kernels take f32 and bf16")
    if args.device == "cuda" and dtype == torch.float32:
        ap.error("--dtype f32: flashlm's CUDA kernels take f16 and bf16")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_attention: --device cuda, but torch sees no CUDA device")
    args.reps = args.reps or (5 if args.device == "cpu" else 20)
    seqlens = [int(x) for x in args.seqlens.split(",")]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if args.quick:
        seqlens, head_dims, args.reps, args.warmup, args.heads = [128], [64], 3, 1, 2
    if args.reps < 1 or args.warmup < 0 or args.batch < 1 or args.heads < 1:
        ap.error("--reps, --batch and --heads must be >= 1 and --warmup >= 0")
    args.kv_heads = args.heads if args.kv_heads is None or args.quick else args.kv_heads
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        ap.error(f"--kv-heads: must divide --heads ({args.heads}), got {args.kv_heads}")

    peak = matmul_peak(args.device, dtype, args.clock, n=512 if args.quick else 4096)
    unit, scale = ("TFLOP/s", 1e12) if args.device == "cuda" else ("GFLOP/s", 1e9)
    cases = [(s, d, c) for s in seqlens for d in head_dims for c in causals]
    try:
        from tqdm import tqdm
        cases = tqdm(cases, desc="configs", leave=False, disable=None, file=sys.stderr)
    except ImportError:
        pass
    rows = []
    for s, d, causal in cases:
        t, err = run_case(args, s, d, causal, dtype)
        flops = 4 * args.batch * args.heads * d * visible_pairs(s, causal)
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            ours, theirs = t[f"flashlm {mode}"], t[f"torch {mode}"]
            v1, avx2 = t.get(f"flashlm v1 {mode}"), t.get(f"flashlm avx2 {mode}")
            rows.append([
                f"{s}", f"{d}", "yes" if causal else "no", mode,
                f"{ours * 1e3:.2f}", f"{flops * mult / ours / scale:.1f}",
                f"{theirs * 1e3:.2f}", f"{flops * mult / theirs / scale:.1f}", f"{theirs / ours:.2f}",
                f"{flops * mult / ours / peak * 100:.0f}", fmt(v1 and v1 * 1e3, ".2f", "-"),
                fmt(avx2 and avx2 * 1e3, ".2f", "-"), fmt(avx2 and theirs / avx2, ".2f", "-"), f"{err:.1e}",
            ])
    print(hardware_line(args.device, flashlm.ops, f"torch {torch.get_num_threads()} threads"))
    print(f"flashlm {flashlm.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    clock = "CPU time (all threads)" if args.cpu_time else "wall clock"
    print(f"B={args.batch}, H={args.heads}, KV heads {args.kv_heads}, Sq=Sk=S, {str(dtype).replace('torch.', '')}; median of {args.reps} "
          f"interleaved runs after {args.warmup} warm-up, {clock}; ceiling: torch matmul {peak / scale:.1f} {unit}")
    print()
    print_table(["S", "D", "causal", "pass", "flashlm ms", f"flashlm {unit}", "torch ms", f"torch {unit}",
                 "x torch", "% peak", "v1 ms", "AVX2 ms", "AVX2 x torch", "max |diff|"], rows)


if __name__ == "__main__":
    main()
