#!/usr/bin/env python3
"""compare_int_gemm: flashlm's quantized GEMMs against torch's float (or int) matmul, one table per run.

Each case is y = x @ W.T for x [M, K], W [N, K] with random data, timed as
  flashlm   the quantized op (int8_linear: per-token quantization of x + W8A8 GEMM; int8_linear_static: x
            quantized with one calibrated scale + the same GEMM; int4_linear: W4A16),
  peer      torch on the same device: f32 matmul on the CPU, f16 matmul on CUDA, torch._int_mm for W8A8 on
            CUDA (int8 x int8 -> int32, without quantizing x or applying scales),
and a plain copy on the same device (torch `dst.copy_(src)` of 256 MiB of float32) that gives the memory
bandwidth the GEMV cases are bound by; on CUDA also a bf16 torch matmul (8192^3), the tensor-core rate the
GEMM cases are set against. Each measurement warms up, then takes the median of --reps runs;
the functions take turns run by run (bench_util.median_seconds). CUDA runs are timed with CUDA events.

Columns: "x peer" is the peer's median time over flashlm's. GEMV rows (M <= 8) report the bandwidth of
the weight bytes each reads (int4: packed nibbles + f32 scales; f32/f16: the float matrix) and flashlm's
as a share of the copy's ("% copy"). GEMM rows report GFLOP/s (2 M N K); on CUDA "% ceiling" is the copy's
share for GEMV rows and the bf16 matmul's for GEMM rows (int8 tensor cores can pass 100% of it).

The case list (CASES) is shared with other quantized formats: a case is a name, a device, its shapes and
a function that builds (flashlm_fn, peer_fn, flashlm_weight_bytes, peer_weight_bytes).

Run (from the repository root, with flashlm installed):
  python bench/compare_int_gemm.py                 # CPU cases
  python bench/compare_int_gemm.py --device cuda   # needs flashlm's CUDA kernels and a GPU
  python bench/compare_int_gemm.py --quick         # a few seconds: CI smoke
"""

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import flashlm.ops as ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.ops.int_linear import _int8_gemm
from flashlm.quant import quantize_int4, quantize_int8_per_channel


@dataclass
class Case:
    name: str
    device: str
    m: int
    n: int
    k: int
    peer: str
    build: Callable  # (case) -> (flashlm_fn, peer_fn, flashlm_weight_bytes, peer_weight_bytes)


def int8_linear_vs_float(c: Case):
    x = torch.randn(c.m, c.k)
    w = torch.randn(c.n, c.k)
    w_q, w_s = quantize_int8_per_channel(w)
    return (lambda: ops.int8_linear(x, w_q, w_s)), (lambda: x @ w.T), w_q.numel() + 4 * c.n, 4 * w.numel()


def int8_static_vs_float(c: Case):
    x = torch.randn(c.m, c.k)
    w = torch.randn(c.n, c.k)
    w_q, w_s = quantize_int8_per_channel(w)
    scale = x.abs().max() / 127
    return (lambda: ops.int8_linear_static(x, scale, w_q, w_s)), (lambda: x @ w.T), w_q.numel() + 4 * c.n, 4 * w.numel()


def int8_gemm_vs_int_mm(c: Case):
    x_q = torch.randint(-127, 128, (c.m, c.k), dtype=torch.int8, device="cuda")
    x_s = torch.rand(c.m, device="cuda")
    w_q, w_s = quantize_int8_per_channel(torch.randn(c.n, c.k, device="cuda"))
    w_t = w_q.T  # _int_mm takes [K, N]; a transposed view of the [N, K] weights, as a linear layer holds them
    return ((lambda: _int8_gemm(x_q, x_s, w_q, w_s, None, torch.float16)), (lambda: torch._int_mm(x_q, w_t)),
            w_q.numel(), w_q.numel())


def int4_vs_float(c: Case, group=128):
    dtype = torch.float32 if c.device == "cpu" else torch.float16
    x = torch.randn(c.m, c.k, dtype=dtype, device=c.device)
    w = torch.randn(c.n, c.k, device=c.device)
    packed, scales, _ = quantize_int4(w, group)
    w = w.to(dtype)
    return ((lambda: ops.int4_linear(x, packed, scales, None, group)), (lambda: x @ w.T),
            packed.numel() + 4 * scales.numel(), w.numel() * w.element_size())


def cpu_cases(quick):
    if quick:
        return [Case("int8 GEMM", "cpu", 16, 512, 512, "torch f32", int8_linear_vs_float),
                Case("int8 static GEMM", "cpu", 16, 512, 512, "torch f32", int8_static_vs_float),
                Case("int4 GEMV", "cpu", 1, 1024, 1024, "torch f32", int4_vs_float)]
    return [Case("int8 GEMM", "cpu", 128, 4096, 4096, "torch f32", int8_linear_vs_float),
            Case("int8 static GEMM", "cpu", 128, 4096, 4096, "torch f32", int8_static_vs_float),
            Case("int8 static GEMV", "cpu", 1, 4096, 4096, "torch f32", int8_static_vs_float),
            Case("int4 GEMV", "cpu", 1, 4096, 4096, "torch f32", int4_vs_float),
            Case("int4 GEMV", "cpu", 1, 11008, 4096, "torch f32", int4_vs_float),
            Case("int4 GEMV", "cpu", 1, 4096, 11008, "torch f32", int4_vs_float),
            Case("int4 GEMM", "cpu", 16, 4096, 4096, "torch f32", int4_vs_float)]


def cuda_cases(quick):
    batches = [1, 8] if quick else [1, 2, 4, 8, 16, 32]
    cases = [Case("int4 GEMV" if m <= 8 else "int4 GEMM", "cuda", m, 4096, 4096, "torch f16", int4_vs_float)
             for m in batches]
    if not quick:
        cases += [Case("int4 GEMV", "cuda", 1, 11008, 4096, "torch f16", int4_vs_float)]
    cases += [Case("int8 GEMM", "cuda", m, 4096, 4096, "torch._int_mm", int8_gemm_vs_int_mm)
              for m in ([128] if quick else [32, 128, 512, 2048])]
    return cases


def copy_gbps(device, reps, warmup, quick):
    """GB/s of a float32 copy on `device`, its read plus its write: the ceiling of the GEMV cases."""
    n = (16 if quick else 256) << 18  # float32 elements: 16 or 256 MiB
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    t = median_seconds({"copy": (lambda: dst.copy_(src), device)}, reps, warmup)["copy"]
    return 2 * 4 * n / t / 1e9


def bf16_matmul_gflops(reps, warmup, quick):
    """GFLOP/s of a bf16 n^3 torch matmul on CUDA: the tensor-core ceiling of the GEMM cases."""
    n = 1024 if quick else 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = median_seconds({"mm": (lambda: torch.mm(a, b), "cuda")}, reps, warmup)["mm"]
    return 2 * n**3 / t / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes, few runs (CI smoke)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_int_gemm: --device cuda needs a CUDA GPU")
    reps, warmup = (3, 1) if args.quick else (args.reps, 3)
    torch.manual_seed(0)
    print(hardware_line(args.device, ops, f"torch {torch.get_num_threads()} threads"))
    copy = copy_gbps(args.device, reps, warmup, args.quick)
    print(f"memory bandwidth (torch copy, read + write): {copy:.1f} GB/s")
    mm = bf16_matmul_gflops(reps, warmup, args.quick) if args.device == "cuda" else None
    if mm:
        print(f"bf16 matmul (torch): {mm / 1e3:.1f} TFLOP/s")
    rows = []
    for c in cpu_cases(args.quick) if args.device == "cpu" else cuda_cases(args.quick):
        f_fn, p_fn, f_bytes, p_bytes = c.build(c)
        gemv = c.m <= 8
        # GEMVs in turns of 12 back-to-back calls, the first untimed, as a decode loop makes them: after the
        # pause between turns a small VM's second vCPU can take over 1 ms to leave idle (bench_util).
        burst = 12 if gemv and c.device == "cpu" else 1
        t = median_seconds({"flashlm": (f_fn, c.device), "peer": (p_fn, c.device)}, reps, warmup, burst)
        f_rate = f_bytes / t["flashlm"] / 1e9 if gemv else 2 * c.m * c.n * c.k / t["flashlm"] / 1e9
        p_rate = p_bytes / t["peer"] / 1e9 if gemv else 2 * c.m * c.n * c.k / t["peer"] / 1e9
        rows.append([c.name, f"{c.m}x{c.n}x{c.k}", c.peer, f"{t['flashlm'] * 1e3:.3f}", f"{t['peer'] * 1e3:.3f}",
                     f"{t['peer'] / t['flashlm']:.2f}", f"{f_rate:.1f} {'GB/s' if gemv else 'GFLOP/s'}",
                     f"{p_rate:.1f} {'GB/s' if gemv else 'GFLOP/s'}",
                     fmt(100 * f_rate / (copy if gemv else mm) if gemv or mm else None, ".0f", "")])
    print_table(["case", "MxNxK", "peer", "flashlm ms", "peer ms", "x peer", "flashlm", "peer",
                 "% copy" if args.device == "cpu" else "% ceiling"], rows)


if __name__ == "__main__":
    main()
