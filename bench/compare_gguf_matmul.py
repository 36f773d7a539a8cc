#!/usr/bin/env python3
"""compare_gguf_matmul: flashlm.ops.gguf_linear GEMV (M = 1) against torch's dense GEMV and a plain copy.

For each GGML type and weight shape N x K (torch order: W is [N, K], y = x @ W.T), random blocks with finite
scales (flashlm.io.random_blocks) are multiplied with one row of x by
  flashlm   flashlm.ops.gguf_linear (CPU: x quantized to 8-bit blocks, integer block dot products, AVX2 on
            flashlm's thread pool; CUDA: the GEMV kernel), the weights never leave their blocks,
  torch     torch.nn.functional.linear with the same W dequantized to float32 (CPU) or float16 (CUDA),
and set against a plain copy (`dst.copy_(src)` of 64 MiB on the same device), the memory-bandwidth ceiling.
Before timing, flashlm's result is checked against float64 x @ W.T (relative error < 2%: the CPU path
quantizes x to 8 bits, ~0.6% typical; see tests/test_gguf_matmul.py); the script stops if it is off.

Weights are cold, as in decoding a model (every layer's weights are read once per token): each timed call
uses the next of several copies of W, together larger than the last-level cache (--rotate-mib, default 256).

GB/s: the weight bytes read per second (x and y are negligible); the copy counts its read plus its write.
"x torch" is torch's median time over flashlm's; "% copy" is flashlm's GB/s as a share of the copy's. The
runs take turns (bench_util.median_seconds), so background load on a shared machine falls on all alike;
each turn is a burst of back-to-back calls (--burst, the first untimed), as a decode loop makes them.

Run (from the repository root, with flashlm installed):
  python bench/compare_gguf_matmul.py                      # CPU: Q4_0, Q8_0, Q4_K at 4096x4096, 4096x11008
  python bench/compare_gguf_matmul.py --types Q6_K --shapes 11008x4096 --reps 50
  python bench/compare_gguf_matmul.py --device cuda        # needs flashlm's CUDA kernels and a GPU
  python bench/compare_gguf_matmul.py --quick              # seconds: CI smoke
  python bench/compare_gguf_matmul.py --batch 16 --types Q4_0,Q8_0,Q4_K,Q6_K --shapes 2048x768,768x2048

--batch M (CPU, M > 1) times a batched product instead, x [M, K] (a decode step of M sequences), in GMAC/s
(M * N * K multiply-adds per second): flashlm's gguf_matmul on the plain blocks with VNNI kept off (AVX2) and
allowed ("plain vnni": AVX-VNNI's plain kernels, or, from M = 16 where the CPU has AVX-512 VNNI, the x4 VNNI kernels
on panels regrouped on the fly), the regrouped (x4) layout the native decoder
keeps Q4_0/Q8_0/Q4_K/Q6_K weights in (_C.gguf_repack, _C.gguf_matmul_repacked) with its AVX2 kernel and, where the CPU
has AVX-512 VNNI, its VNNI kernel, and torch's float32 GEMM. Weights are hot (M rows share each weight read);
each result is first checked bit-equal to the plain kernels' row by row. The int8 ceiling to set these
against is bench/int8_peak.cpp's.
"""

import argparse
import platform
import sys
import time

import numpy as np
import torch

import flashlm
import flashlm.ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.io.random_blocks import random_blocks


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        n, k = (int(v) for v in item.lower().split("x"))
        shapes.append((n, k))
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K", help="comma-separated GGML types")
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated N x K (W is [N, K])")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per measurement; the median is reported")
    ap.add_argument("--warmup", type=int, default=3)
    # 12: after the pause between turns the second vCPU of a small VM can take over 1 ms to leave idle, which
    # is several sub-ms calls at one thread's speed (4096 x 4096 Q4_0: 0.79 ms at burst 4, 0.43 at 12); a
    # decode loop's calls come back to back and never see that.
    ap.add_argument("--burst", type=int, default=12, help="back-to-back calls per turn, the first untimed "
                    "(bench_util.median_seconds); 1: one call per turn, after a pause")
    ap.add_argument("--rotate-mib", type=int, default=256, help="cycle through copies of W totalling this much")
    ap.add_argument("--quick", action="store_true", help="small shapes and few runs: a smoke test in seconds")
    ap.add_argument("--batch", type=int, default=1, help="rows of x; > 1: the batched kernels' GMAC/s (CPU)")
    ap.add_argument("--cpu-time", action="store_true", help="with --batch: one thread each (flashlm and torch), "
                    "timed by the thread's CPU time (a core's rate on a machine busy with other jobs)")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.reps, args.warmup, args.rotate_mib = "256x512", 3, 1, 0
    if args.batch < 1:
        ap.error(f"--batch: must be >= 1, got {args.batch}")
    if args.batch > 1 and args.device != "cpu":
        ap.error("--batch: the batched comparison is for the CPU kernels")
    if args.cpu_time and args.batch == 1:
        ap.error("--cpu-time: only with --batch M > 1")
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    bad = [t for t in types if t not in flashlm.ops.GGUF_LINEAR_TYPES]
    if bad:
        ap.error(f"--types: {', '.join(bad)} not supported (known: {', '.join(flashlm.ops.GGUF_LINEAR_TYPES)})")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError:
        ap.error(f"--shapes: expected NxK[,NxK...], got {args.shapes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_gguf_matmul: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    peer_dtype = torch.float16 if args.device == "cuda" else torch.float32
    x_dtype = torch.float16 if args.device == "cuda" else torch.float32

    if args.batch > 1:
        return batched(args, types, shapes)
    copy_src = torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(1)
    copy_dst = torch.empty_like(copy_src)

    rows = []
    for n, k in shapes:
        for name in types:
            raw_np = random_blocks(name, n * k, 0).reshape(n, -1)
            raw = torch.from_numpy(raw_np).to(device)
            w = flashlm.ops.dequantize(raw, name, (n, k), out_dtype=peer_dtype)
            x = torch.randn(1, k, device=device).to(x_dtype)

            ref = x.double() @ w.double().T
            got = flashlm.ops.gguf_linear(x, raw, name, (n, k)).double()
            rel = ((got - ref).norm() / ref.norm()).item()
            if not rel < 2e-2:
                sys.exit(f"compare_gguf_matmul: {name} {n}x{k}: relative error {rel:.3e} against float64; not timing "
                         "a wrong kernel")

            copies = max(1, -(-(args.rotate_mib << 20) // raw.numel()))
            raws = [raw] + [raw.clone() for _ in range(copies - 1)]
            w_copies = max(1, -(-(args.rotate_mib << 20) // (w.numel() * w.element_size())))
            ws = [w] + [w.clone() for _ in range(w_copies - 1)]
            state = {"i": 0, "j": 0}

            def run_flashlm():
                state["i"] = (state["i"] + 1) % len(raws)
                return flashlm.ops.gguf_linear(x, raws[state["i"]], name, (n, k))

            def run_torch():
                state["j"] = (state["j"] + 1) % len(ws)
                return torch.nn.functional.linear(x.to(peer_dtype), ws[state["j"]])

            med = median_seconds({"flashlm": (run_flashlm, args.device), "torch": (run_torch, args.device),
                                  "copy": (lambda: copy_dst.copy_(copy_src), args.device)}, args.reps, args.warmup,
                               args.burst)
            t_f, t_t, t_c = med["flashlm"], med["torch"], med["copy"]
            gbs_f = raw.numel() / t_f / 1e9
            gbs_c = 2 * copy_src.numel() / t_c / 1e9
            rows.append([name, f"{n}x{k}", f"{raw.numel() / 2**20:.1f}", f"{rel:.1e}", f"{t_f * 1e3:.3f}",
                         fmt(gbs_f, ".1f"), f"{t_t * 1e3:.3f}", fmt(w.numel() * w.element_size() / t_t / 1e9, ".1f"),
                         fmt(t_t / t_f, ".2f"), fmt(gbs_c, ".1f"), fmt(gbs_f / gbs_c * 100, ".0f")])
            del raws, ws

    peer = "torch f16" if args.device == "cuda" else "torch f32"
    header = ["type", "N x K", "W MiB", "rel err", "flashlm ms", "flashlm GB/s", f"{peer} ms", f"{peer} GB/s",
              "x torch", "copy GB/s", "% copy"]
    print(hardware_line(args.device, flashlm.ops, f"torch {torch.get_num_threads()} threads"))
    print(f"flashlm {flashlm.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print(f"GEMV M=1, x {str(x_dtype).replace('torch.', '')}; cold weights (copies cycled, {args.rotate_mib} MiB); "
          f"median of {args.reps} interleaved turns of {args.burst} back-to-back calls after {args.warmup} warm-up")
    print()
    print_table(header, rows)


def batched(args, types, shapes):
    """The --batch table: GMAC/s of x [M, K] @ W.T, plain against regrouped kernels and torch, hot weights."""
    from flashlm import _C

    features = _C.cpu_features()
    vnni = features["avx512f"] and features["avx512bw"] and features["avx512_vnni"]
    m = args.batch
    clock = time.perf_counter
    if args.cpu_time:
        flashlm.ops.set_num_threads(1)  # the pool's one thread is the caller: its CPU time is the kernel's
        torch.set_num_threads(1)
        clock = time.thread_time
    rows = []
    for n, k in shapes:
        for name in types:
            raw = torch.from_numpy(random_blocks(name, n * k, 0)).reshape(-1)
            x = torch.randn(m, k)
            y = torch.empty(m, n)
            fns = {}
            expected = torch.cat([flashlm.ops.gguf_linear(x[i:i + 1], raw, name, (n, k)) for i in range(m)])
            for label, allow in [("plain avx2", False), ("plain vnni", True)][:1 + (features["avx_vnni"] or vnni)]:
                def run_plain(allow=allow):
                    _C.set_gguf_matmul_vnni(allow)
                    _C.gguf_matmul(x, raw, name, n, None, y)
                run_plain()
                if allow and not torch.equal(y, expected):
                    sys.exit(f"compare_gguf_matmul: {name} {n}x{k} {label}: not equal to the plain GEMV's rows")
                fns[label] = (run_plain, "cpu")
            if _C.gguf_repack_supported(name, n, k):
                packed = torch.empty_like(raw)
                _C.gguf_repack(raw, packed, name, n, k, True)
                for label, allow in [("x4 avx2", False), ("x4 vnni", True)][:1 + vnni]:
                    def run(allow=allow, packed=packed):
                        _C.set_gguf_matmul_vnni(allow)
                        _C.gguf_matmul_repacked(x, packed, name, n, None, y)
                    run()
                    if not torch.equal(y, expected):
                        sys.exit(f"compare_gguf_matmul: {name} {n}x{k} {label}: not equal to the plain GEMV's rows")
                    fns[label] = (run, "cpu")
            w = flashlm.ops.dequantize(raw.reshape(n, -1), name, (n, k), out_dtype=torch.float32)
            fns["torch f32"] = (lambda: torch.nn.functional.linear(x, w), "cpu")
            med = median_seconds(fns, args.reps, args.warmup, args.burst, clock)
            _C.set_gguf_matmul_vnni(True)
            rate = {label: m * n * k / t / 1e9 for label, t in med.items()}
            columns = ("plain avx2", "plain vnni", "x4 avx2", "x4 vnni", "torch f32")
            cells = [fmt(rate[c], ".1f") if c in rate else "-" for c in columns]
            best = max(rate[c] for c in columns[:4] if c in rate)
            rows.append([name, f"{n}x{k}", str(m), *cells, fmt(best / rate["plain avx2"], ".2f")])
    print(hardware_line(args.device, flashlm.ops, f"torch {torch.get_num_threads()} threads"))
    print(f"flashlm {flashlm.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    timing = "1 thread, CPU time of the thread" if args.cpu_time else "wall time"
    print(f"M={m}, x float32, hot weights; GMAC/s = M*N*K / median {timing} of {args.reps} interleaved turns of "
          f"{args.burst} back-to-back calls")
    print()
    print_table(["type", "N x K", "M", "plain avx2 GMAC/s", "plain vnni", "x4 avx2", "x4 vnni", "torch f32",
                 "best / plain avx2"], rows)


if __name__ == "__main__":
    main()
