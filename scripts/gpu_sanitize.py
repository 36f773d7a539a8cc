#!/usr/bin/env python3
"""gpu_sanitize: every CUDA kernel of flashlm called once, with odd sizes, under compute-sanitizer.

Two roles:
  run     (what the sanitizer runs) calls the kernels named, one after another, each between the lines
          "gpu_sanitize: begin NAME" and "gpu_sanitize: end NAME" (after a synchronize), so that the
          sanitizer's reports can be laid at the kernel that was running. --device cpu makes the same calls
          on flashlm's CPU kernels: a machine without a GPU checks every call's arguments that way.
  check   runs `compute-sanitizer --tool TOOL python gpu_sanitize.py run ...` for memcheck over every kernel
          and racecheck over those that use shared memory or warp shuffles, starts again after a kernel that
          left the CUDA context broken (the kernels after it were not reached), and prints one verdict line
          per kernel and tool. --json writes the verdicts for scripts/gpu_summary.py.

Sizes are odd on purpose (37 rows, 53 keys, 1001 elements, an unaligned view): the tails of tiles and
vectors are where out-of-bounds accesses hide. The NCCL transport is not sanitized (NCCL's own kernels
and a second process); the tests run it.

Run (from the repository root, with flashlm built for CUDA):
  python scripts/gpu_sanitize.py check --json $OUT/sanitizer.json
  python scripts/gpu_sanitize.py run --device cpu          # the calls on the CPU kernels: an argument check
  python scripts/gpu_sanitize.py list
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch

import flashlm.ops as ops
import flashlm.ops.comm as comm
from flashlm.flash_attn_interface import flash_attn_func
from flashlm.io.random_blocks import random_blocks
from flashlm.ops.int_linear import _int8_gemm
from flashlm.quant import quantize_int4, quantize_int8_per_channel

BEGIN, END = "gpu_sanitize: begin ", "gpu_sanitize: end "


def _rand(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def attention(version=2, backward=False):
    def call(dev, dtype, gen):
        # Batch 2, 37 queries over 53 keys, 4 query heads on 2 K/V heads, d = 72: partial tiles everywhere.
        q = _rand(gen, 2, 37, 4, 72, dtype=dtype, device=dev)
        k = _rand(gen, 2, 53, 2, 72, dtype=dtype, device=dev)
        v = _rand(gen, 2, 53, 2, 72, dtype=dtype, device=dev)
        if backward:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            flash_attn_func(q, k, v, causal=True).backward(torch.ones_like(q))
        else:
            flash_attn_func(q, k, v, causal=True, window_size=(20, 3), version=version)
    return call


def paged_cache(dev, dtype, gen, lens):
    """K/V caches of 16-token blocks holding sequences of `lens` tokens in shuffled blocks, 2 K/V heads, d 64."""
    per_seq = [(n + 15) // 16 for n in lens]
    blocks = sum(per_seq) + 1
    order = torch.randperm(blocks, generator=gen)[:sum(per_seq)].tolist()
    table = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    for i, n in enumerate(per_seq):
        table[i, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = _rand(gen, blocks, 16, 2, 64, dtype=dtype, device=dev)
    v_cache = _rand(gen, blocks, 16, 2, 64, dtype=dtype, device=dev)
    return k_cache, v_cache, table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)


def write_kv(dev, dtype, gen):
    k_cache, v_cache, _, _ = paged_cache(dev, dtype, gen, [37])
    key, value = _rand(gen, 5, 2, 64, dtype=dtype, device=dev), _rand(gen, 5, 2, 64, dtype=dtype, device=dev)
    ops.write_kv_cache(key, value, k_cache, v_cache, torch.tensor([0, 17, -1, 39, 47], device=dev))


def paged_decode(dev, dtype, gen):
    k_cache, v_cache, table, lens = paged_cache(dev, dtype, gen, [1, 37, 301])
    q = _rand(gen, 3, 4, 64, dtype=dtype, device=dev)
    ops.paged_attention(q, k_cache, v_cache, table, lens)
    ops.paged_attention(q, k_cache, v_cache, table, lens, num_splits=3)  # the split kernel and its merge


def paged_prefill(dev, dtype, gen):
    k_cache, v_cache, table, lens = paged_cache(dev, dtype, gen, [3, 37, 50])
    cu = torch.tensor([0, 3, 4, 17], dtype=torch.int32, device=dev)
    q = _rand(gen, 17, 4, 64, dtype=dtype, device=dev)
    ops.paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=13)


def int8_gemm(dev, dtype, gen):
    w_q, w_s = quantize_int8_per_channel(torch.randn(67, 1000, generator=gen))
    for m in (3, 37):  # the dp4a GEMV (M <= 8) and the tensor-core GEMM
        x_q = torch.randint(-127, 128, (m, 1000), dtype=torch.int8, generator=gen)
        out_dtype = torch.float32 if dev == "cpu" else dtype
        _int8_gemm(x_q.to(dev), torch.rand(m, generator=gen).to(dev), w_q.to(dev), w_s.to(dev), None, out_dtype)


def int4_gemm(dev, dtype, gen):
    packed, scales, zeros = quantize_int4(torch.randn(67, 1024, generator=gen), 128, symmetric=False)
    for m in (3, 37):  # the GEMV (M <= 8) and the GEMM
        x = _rand(gen, m, 1024, dtype=dtype, device=dev)
        ops.int4_linear(x, packed.to(dev), scales.to(dev), zeros.to(dev), 128)


def gguf_raw(dev, name, n, k):
    return torch.from_numpy(random_blocks(name, n * k, 0).reshape(n, -1)).to(dev)


def gguf_matmul(m):
    def call(dev, dtype, gen):
        for name in ("Q4_0", "Q8_0", "Q4_K", "Q6_K"):
            x = _rand(gen, m, 512, dtype=dtype, device=dev)
            ops.gguf_linear(x, gguf_raw(dev, name, 33, 512), name, (33, 512))
    return call


def dequantize(dev, dtype, gen):
    for name in ("Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K"):
        ops.dequantize(gguf_raw(dev, name, 3, 768), name, (3, 768))


def rms_norm(dev, dtype, gen):
    x = _rand(gen, 7, 1001, dtype=dtype, device=dev)
    ops.rms_norm(x, _rand(gen, 1001, dtype=dtype, device=dev), 1e-6, residual=torch.zeros_like(x))
    ops.rms_norm(x[:, 1:], _rand(gen, 1000, dtype=dtype, device=dev), 1e-6)  # rows that start unaligned


def silu_mul(dev, dtype, gen):
    x = _rand(gen, 7, 2 * 1001, dtype=dtype, device=dev)
    ops.silu_mul(x[:, :1001], x[:, 1001:])


def adamw(dev, dtype, gen):
    sizes = (1001, 37, 1)
    dtype = torch.float32 if dev == "cpu" else dtype
    params = [_rand(gen, n, dtype=dtype, device=dev) for n in sizes]
    grads = [_rand(gen, n, dtype=dtype, device=dev) for n in sizes]
    moments = [torch.zeros(n, device=dev) for n in sizes], [torch.zeros(n, device=dev) for n in sizes]
    ops.adamw_step_(params, grads, *moments, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01)


def reduce_add(dev, dtype, gen):
    a, b = _rand(gen, 1002, dtype=dtype, device=dev), _rand(gen, 1002, dtype=dtype, device=dev)
    comm.reduce_add(a[1:], b[1:], 3.0)  # offset 1: the unaligned path
    comm.reduce_add(a, b)


# name -> (call(device, dtype, generator), uses shared memory or warp shuffles: also checked by racecheck)
KERNELS = {
    "attention_fwd": (attention(version=2), True),
    "attention_fwd_v1": (attention(version=1), True),
    "attention_bwd": (attention(backward=True), True),
    "write_kv_cache": (write_kv, False),
    "paged_decode": (paged_decode, True),
    "paged_prefill": (paged_prefill, True),
    "int8_gemm": (int8_gemm, True),
    "int4_gemm": (int4_gemm, True),
    "gguf_gemv": (gguf_matmul(3), True),
    "gguf_mma": (gguf_matmul(37), True),
    "dequantize": (dequantize, True),
    "rms_norm": (rms_norm, True),
    "silu_mul": (silu_mul, False),
    "adamw": (adamw, False),
    "reduce_add": (reduce_add, False),
}


def run(args):
    dev = args.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sanitize: --device cuda, but torch sees no CUDA device")
    names = args.kernels.split(",")
    if dev == "cuda":  # torch's CUDA start apart from the first kernel, so that what it reports stays its own
        names = ["setup"] + names
    failed = 0
    for name in names:
        print(BEGIN + name, flush=True)
        t0 = time.monotonic()
        try:
            if name == "setup":
                torch.ones(1, device=dev).add_(1)
            else:
                KERNELS[name][0](dev, dtype, torch.Generator().manual_seed(0))
            if dev == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - the verdict names it; a broken CUDA context ends the run
            print(f"gpu_sanitize: {name} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  flush=True)
            if dev == "cuda" and "CUDA" in str(e):
                sys.exit(3)
            failed += 1
            continue
        print(f"{END}{name} {time.monotonic() - t0:.2f}s", flush=True)
    if failed:
        sys.exit(1)


# A sanitizer report starts with "========= " and a capitalised description ("Invalid __global__ read",
# "Error: Race reported", "Warning: ... hazard", "Program hit cudaError..."); its summary lines ("ERROR SUMMARY",
# "RACECHECK SUMMARY") are not reports.
REPORT = re.compile(r"^========= (Invalid|Error|Warning|Uninitialized|Barrier|Program hit|Out-of-range|Misaligned|"
                    r"Malloc|Leaked|Cuda API error|Unspecified|Hardware)")


def verdicts(output, names, timed_out=False):
    """{name: verdict} from a sanitized run's output: "clean", "N reports (first: ...)", "raised ...", "died
    (no end marker)", "timed out", or "not reached". "setup" (torch's CUDA start) appears only with reports."""
    fresh = lambda: {"begun": False, "ended": False, "reports": [], "raised": None}  # noqa: E731
    found = {name: fresh() for name in names}
    current = None
    for line in output.splitlines():
        if line.startswith(BEGIN):
            current = line[len(BEGIN):].split()[0]
            found.setdefault(current, fresh())["begun"] = True
        elif line.startswith(END):
            found.setdefault(line[len(END):].split()[0], fresh())["ended"] = True
        elif line.startswith("gpu_sanitize: ") and " raised " in line and current:
            found[current]["raised"] = line.split(" raised ", 1)[1]
        elif current and REPORT.match(line):
            found[current]["reports"].append(line.removeprefix("========= ").strip())
    out = {}
    for name, f in found.items():
        if f["reports"]:
            out[name] = f"{len(f['reports'])} reports (first: {f['reports'][0][:120]})"
        elif f["raised"]:
            out[name] = f"raised {f['raised'][:120]}"
        elif f["ended"]:
            out[name] = "clean"
        elif f["begun"]:
            out[name] = "timed out" if timed_out else "died (no end marker)"
        else:
            out[name] = "not run (time)" if timed_out else "not reached"
    if out.get("setup") == "clean":
        del out["setup"]
    return out


def run_sanitizer(cmd, timeout):
    """(output, timed out?) of cmd, its whole process group killed at the timeout (the sanitizer's child too)."""
    # Without torch's caching allocator every tensor is its own cudaMalloc, whose exact end memcheck knows; in a
    # cached segment an access past a tensor lands in the segment and goes unseen.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    try:
        return proc.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0], True
    except KeyboardInterrupt:  # the phase's own timeout: leave nothing running on the GPU
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def sanitize(tool, names, deadline, log):
    """Runs `tool` over `names`, starting again after a kernel that broke the run; returns {name: verdict}."""
    todo, result = list(names), {}
    while todo:
        left = deadline - time.monotonic()
        if left < 5:
            result.update({name: "not run (time)" for name in todo})
            break
        cmd = ["compute-sanitizer", "--tool", tool, "--print-limit", "20", sys.executable, os.path.abspath(__file__),
               "run", "--kernels", ",".join(todo)]
        log.write(f"$ {' '.join(cmd)}\n")
        text, timed_out = run_sanitizer(cmd, left)
        log.write(text + ("\ngpu_sanitize: timed out\n" if timed_out else ""))
        log.flush()
        got = verdicts(text, todo, timed_out)
        result.update({n: v for n, v in got.items() if v != "not reached"})
        rest = [n for n in todo if got[n] == "not reached"]
        if len(rest) == len(todo):  # nothing ran: the same again would not help
            result.update({n: "not reached (the run did not start; see the log)" for n in rest})
            break
        todo = rest
    return result


def check(args):
    names = list(KERNELS)
    start = time.monotonic()
    deadline = start + args.budget
    verdict = {"memcheck": {}, "racecheck": {}}
    if args.dry_run or not shutil.which("compute-sanitizer"):
        why = "not run (dry run)" if args.dry_run else "not run (no compute-sanitizer)"
        verdict = {tool: {n: why for n in names if tool == "memcheck" or KERNELS[n][1]} for tool in verdict}
    else:
        with open(args.log, "w") as log:
            verdict["memcheck"] = sanitize("memcheck", names, start + args.budget * 0.55, log)
            verdict["racecheck"] = sanitize("racecheck", [n for n in names if KERNELS[n][1]], deadline, log)
    for name in [n for n in verdict["memcheck"] if n not in names] + names:
        race = verdict["racecheck"].get(name, "-")
        print(f"sanitizer {name:<17} memcheck: {verdict['memcheck'].get(name, '-')}; racecheck: {race}")
    print(f"sanitizer: {time.monotonic() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(verdict, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    r = sub.add_parser("run", help="call the kernels (what the sanitizer runs)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    r.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated, of: " + ", ".join(KERNELS))
    c = sub.add_parser("check", help="run the sanitizers over the kernels and print a verdict per kernel")
    c.add_argument("--budget", type=float, default=150, help="seconds for both tools together")
    c.add_argument("--log", default=os.path.join(os.environ.get("OUT", "."), "sanitizer.log"))
    c.add_argument("--json", default=None, help="write {tool: {kernel: verdict}} here")
    c.add_argument("--dry-run", action="store_true", help="verdicts 'not run (dry run)', no sanitizer")
    sub.add_parser("list", help="the kernels, and which racecheck checks")
    args = ap.parse_args()
    if args.role == "list":
        for name, (_, shared) in KERNELS.items():
            print(name, "memcheck+racecheck" if shared else "memcheck")
    elif args.role == "run":
        unknown = [n for n in args.kernels.split(",") if n not in KERNELS]
        if unknown:
            ap.error(f"--kernels: unknown {', '.join(unknown)} (known: {', '.join(KERNELS)})")
        run(args)
    else:
        check(args)


if __name__ == "__main__":
    main()
