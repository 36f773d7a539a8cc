#!/usr/bin/env python3
"""compare_dequant: flashlm.ops.dequantize against its peer and its ceiling, one table per run.

For each GGML type: random blocks with finite scales (16M elements by default, beyond the caches) are
decoded to float32 by
  flashlm   flashlm.ops.dequantize (on --device cpu or cuda), its thread pool as configured,
  gguf-py   gguf.quants.dequantize (llama.cpp's Python package, numpy, one thread, always on the CPU),
and set against a plain copy of the same output size, torch `dst.copy_(src)` of float32 tensors on the
same device. Before timing, flashlm's output is checked bit for bit against gguf-py's (the script stops
with a message if they differ). Each measurement warms up, then takes the median of --reps runs; the
three take turns run by run, so that background load on a shared machine falls on all of them alike, with
a 10 ms pause after each (see bench_util.SETTLE_S). CUDA runs are timed with CUDA events.

GB/s: flashlm and gguf-py count the blocks read plus the float32 output written; the copy counts its
read plus its write. "x gguf-py" is gguf-py's median time over flashlm's; "% copy" is flashlm's GB/s as a
share of the copy's.

flashlm writes into one preallocated output (`out=`): a fresh 64 MiB CPU allocation per call costs more
page faults than the decoding itself, and an engine keeps its buffers. The kernel alone, without Python,
is measured by bench/bench_dequant.cpp.

Run (from the repository root, with flashlm installed):
  python bench/compare_dequant.py                          # CPU, all types, 16M elements
  python bench/compare_dequant.py --types Q4_K,Q6_K --reps 50
  python bench/compare_dequant.py --device cuda            # needs flashlm's CUDA kernels and a GPU
  python bench/compare_dequant.py --quick                  # a few seconds: CI smoke
"""

import argparse
import importlib.metadata
import platform
import sys

import numpy as np
import torch

import flashlm
import flashlm.ops
import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from flashlm.io.random_blocks import TYPES, random_blocks
from bench_util import fmt, hardware_line, median_seconds, print_table

ALL_TYPES = TYPES  # every type flashlm.io.random_blocks can make


# --- inputs ----------------------------------------------------------------------------------------------

def reference(raw_2d, name):
    """gguf-py's float32 decoding; None where gguf-py has none (Q8_K)."""
    try:
        return gguf.quants.dequantize(raw_2d, GGMLQuantizationType[name])
    except NotImplementedError:
        return None


def q8_k_reference(raw_2d):
    """Q8_K as ggml decodes it, d * q, for the check only (gguf-py has no Q8_K): d f32, qs[256] int8, bsums."""
    blocks = raw_2d.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    return (d * blocks[:, 4:260].view(np.int8).astype(np.float32)).reshape(raw_2d.shape[0], -1)


def check_bit_exact(name, got, want):
    got_bits, want_bits = got.view(np.uint32).ravel(), want.view(np.uint32).ravel()
    if got.shape != want.shape:
        sys.exit(f"compare_dequant: {name}: flashlm's output has shape {got.shape}, the reference's {want.shape}")
    bad = np.flatnonzero(got_bits != want_bits)
    if bad.size:
        i = int(bad[0])
        sys.exit(f"compare_dequant: {name}: flashlm differs from the reference in {bad.size} of {got_bits.size} "
                 f"elements; first at flat index {i} (block {i // GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]}):"
                 f" flashlm {float(got.ravel()[i])!r} (0x{got_bits[i]:08x}) vs reference {float(want.ravel()[i])!r}"
                 f" (0x{want_bits[i]:08x}). Not timing a wrong kernel.")


# --- report ----------------------------------------------------------------------------------------------

def versions_line():
    return (f"flashlm {flashlm.__version__}, gguf-py {importlib.metadata.version('gguf')}, "
            f"numpy {np.__version__}, torch {torch.__version__}, Python {platform.python_version()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--elements", type=int, default=1 << 24, help="elements per tensor (default 16M)")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per measurement; the median is reported")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before each measurement")
    ap.add_argument("--types", default=",".join(ALL_TYPES), help="comma-separated GGML types")
    ap.add_argument("--quick", action="store_true", help="tiny tensors and few runs: a smoke test in seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.elements, args.reps, args.warmup = 1 << 16, 5, 1
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        ap.error(f"--types: unknown {', '.join(unknown)} (known: {', '.join(ALL_TYPES)})")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_dequant: --device cuda, but torch sees no CUDA device")

    # Rows of 4096 elements where the tensor is that large (a weight matrix's shape); whole 256-blocks always.
    n = max(256, (args.elements + 255) // 256 * 256)
    cols = 4096 if n % 4096 == 0 else 256
    shape = (n // cols, cols)
    device = torch.device(args.device)

    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    try:
        from tqdm import tqdm
        progress = tqdm(types, desc="types", unit="type", leave=False, disable=None, file=sys.stderr)
    except ImportError:
        progress = types

    rows, notes = [], []
    for name in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(name)
        raw = random_blocks(name, n, args.seed)
        raw_2d = raw.reshape(shape[0], -1)
        in_bytes, out_bytes = raw.nbytes, n * 4
        raw_t = torch.from_numpy(raw_2d).to(device)
        out_t = torch.empty(shape, dtype=torch.float32, device=device)

        def run_flashlm():
            return flashlm.ops.dequantize(raw_t, name, shape, out=out_t)

        want = reference(raw_2d, name)
        ref_name = "gguf-py"
        if want is None:
            want, ref_name = q8_k_reference(raw_2d), "numpy d*q"
            notes.append(f"{name}: gguf-py {importlib.metadata.version('gguf')} cannot decode it; flashlm was checked "
                         "against d*q in numpy, and the gguf-py columns are empty")
        try:
            got = run_flashlm()
        except Exception as e:  # e.g. a CUDA kernel that has not landed for this type
            got = None
            notes.append(f"{name}: flashlm failed, not timed: {type(e).__name__}: {e}")
        if got is not None:
            check_bit_exact(name, got.cpu().numpy(), want)

        fns = {"copy": (lambda: dst.copy_(src), args.device)}
        if got is not None:
            fns["flashlm"] = (run_flashlm, args.device)
        if ref_name == "gguf-py":
            qtype = GGMLQuantizationType[name]
            fns["gguf-py"] = (lambda: gguf.quants.dequantize(raw_2d, qtype), "cpu")
        medians = median_seconds(fns, args.reps, args.warmup)
        t_flashlm, t_gguf, t_copy = medians.get("flashlm"), medians.get("gguf-py"), medians["copy"]

        gbs = lambda nbytes, t: None if t is None else nbytes / t / 1e9  # noqa: E731
        flashlm_gbs, copy_gbs = gbs(in_bytes + out_bytes, t_flashlm), gbs(2 * out_bytes, t_copy)
        rows.append([
            name, f"{in_bytes * 8 / n:.2f}", "-" if got is None else "yes" if ref_name == "gguf-py" else f"yes ({ref_name})",
            fmt(t_flashlm and t_flashlm * 1e3, ".2f"), fmt(flashlm_gbs, ".1f"),
            fmt(t_gguf and t_gguf * 1e3, ".1f"), fmt(gbs(in_bytes + out_bytes, t_gguf), ".2f"),
            fmt(t_gguf / t_flashlm if t_gguf and t_flashlm else None, ".1f"),
            fmt(copy_gbs, ".1f"), fmt(flashlm_gbs / copy_gbs * 100 if flashlm_gbs else None, ".0f"),
        ])

    gguf_where = " (CPU)" if args.device == "cuda" else ""
    header = ["type", "bits/elem", "bit-exact", f"flashlm {args.device} ms", "flashlm GB/s",
              f"gguf-py{gguf_where} ms", f"gguf-py{gguf_where} GB/s", "x gguf-py", f"copy {args.device} GB/s",
              "% copy"]
    print(hardware_line(args.device, flashlm.ops, f"torch {torch.get_num_threads()} threads, gguf-py/numpy 1 thread"))
    print(versions_line())
    print(f"{n} elements -> float32, shape {list(shape)} ({n * 4 / 2**20:.3g} MiB out); median of {args.reps} "
          f"interleaved runs after {args.warmup} warm-up")
    print()
    print_table(header, rows)
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
