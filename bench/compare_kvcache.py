#!/usr/bin/env python3
"""compare_kvcache: flashlm's paged-attention decode against torch's scaled_dot_product_attention over
contiguous K/V, one table per run.

For each (batch, context) every sequence has `context` cached tokens and one new query per head:
  flashlm   flashlm.ops.paged_attention: q [B, H, D], K/V caches [num_blocks, block_size, Hkv, D] whose
            blocks are shuffled (as a serving engine leaves them), block_table int32 [B, context / block_size],
  torch     torch.nn.functional.scaled_dot_product_attention with enable_gqa, q [B, H, 1, D] and contiguous
            K/V [B, Hkv, context, D] (its own layout; nothing paged),
checked against each other before timing (the script stops if they differ beyond the dtype's tolerance).
Medians of --reps interleaved runs after warm-up (bench_util.median_seconds).

Decode reads every cached K and V element once and does little arithmetic per byte, so memory bandwidth
bounds it: "KV GB/s" is the bytes of K and V read over the time. The ceiling is memcpy bandwidth (bytes
copied per second) of a torch copy of the same caches, timed in the same interleaved rounds so that it sees
the same background load; "of copy" is flashlm's KV GB/s over it. "x torch" is torch's median time over
flashlm's.

Run (from the repository root, with flashlm installed):
  python bench/compare_kvcache.py                        # CPU float32, B 1/8/32 x context 512/2048/8192
  python bench/compare_kvcache.py --dtype bf16 --batches 8 --contexts 2048
  python bench/compare_kvcache.py --device cuda --dtype bf16   # needs flashlm's CUDA kernels and a GPU
  python bench/compare_kvcache.py --quick                # a few seconds: CI smoke
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import flashlm
import flashlm.ops
from bench_util import fmt, hardware_line, median_seconds, print_table
from flashlm.ops.kvcache import paged_attention

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max |flashlm - torch|


def run_case(args, batch, context, dtype):
    """Times one configuration; returns ({label: seconds}, KV bytes read)."""
    h, hkv, d, bs, device = args.heads, args.kv_heads, args.head_dim, args.block_size, args.device
    g = torch.Generator().manual_seed(batch * 100000 + context)
    blocks_per_seq = (context + bs - 1) // bs
    k = torch.randn(batch, hkv, context, d, generator=g).to(device=device, dtype=dtype)  # torch's layout
    v = torch.randn(batch, hkv, context, d, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(batch, h, d, generator=g).to(device=device, dtype=dtype)
    # The same K/V in shuffled blocks of the paged cache.
    table = torch.randperm(batch * blocks_per_seq, generator=g).to(torch.int32).view(batch, blocks_per_seq)
    shape = (batch * blocks_per_seq, bs, hkv, d)
    k_cache = torch.zeros(shape, device=device, dtype=dtype)
    v_cache = torch.zeros(shape, device=device, dtype=dtype)
    pad = blocks_per_seq * bs - context
    for cache, src in ((k_cache, k), (v_cache, v)):
        blocks = F.pad(src.transpose(1, 2), (0, 0, 0, 0, 0, pad)).reshape(batch, blocks_per_seq, bs, hkv, d)
        cache[table.long().to(device)] = blocks
    table = table.to(device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q4 = q.unsqueeze(2)

    def ours():
        return paged_attention(q, k_cache, v_cache, table, seq_lens, num_splits=args.splits)

    def theirs():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    err = (ours().float() - theirs().squeeze(2).float()).abs().max().item()
    if err > TOLERANCE[dtype]:
        sys.exit(f"compare_kvcache: B={batch} context={context}: flashlm differs from torch by {err:.3g} "
                 f"(> {TOLERANCE[dtype]}). Not timing a wrong kernel.")
    k_copy, v_copy = torch.empty_like(k_cache), torch.empty_like(v_cache)

    def copy():
        k_copy.copy_(k_cache)
        v_copy.copy_(v_cache)

    times = median_seconds({"flashlm": (ours, device), "torch": (theirs, device), "copy": (copy, device)},
                           args.reps, 2)
    return times, 2 * k.numel() * k.element_size()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: f32 on CPU, bf16 on CUDA")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--splits", type=int, default=0, help="flashlm's num_splits (0: its heuristic)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="one small case, few reps (CI smoke)")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.contexts, args.reps, args.heads, args.kv_heads = "2", "256", 3, 8, 2
    dtype = DTYPES[args.dtype or ("f32" if args.device == "cpu" else "bf16")]
    if args.device == "cuda" and dtype == torch.float32:
        sys.exit("compare_kvcache: flashlm's CUDA kernels take f16 or bf16")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_kvcache: --device cuda, but torch sees no CUDA device")

    print(f"flashlm {flashlm.__version__}, torch {torch.__version__}; "
          f"{hardware_line(args.device, flashlm.ops, f'torch {torch.get_num_threads()} threads')}")
    print(f"paged decode: H={args.heads} Hkv={args.kv_heads} D={args.head_dim} block_size={args.block_size} "
          f"{str(dtype).replace('torch.', '')}\n")
    rows = []
    for batch in (int(x) for x in args.batches.split(",")):
        for context in (int(x) for x in args.contexts.split(",")):
            times, nbytes = run_case(args, batch, context, dtype)
            ours, theirs = times["flashlm"], times["torch"]
            splits = flashlm.ops.paged_attention_num_splits(args.device, batch, args.kv_heads, context,
                                                            args.block_size) if args.splits == 0 else args.splits
            rows.append([f"B={batch} ctx={context}", f"{ours * 1e3:.3f}", f"{theirs * 1e3:.3f}",
                         f"{theirs / ours:.2f}", f"{nbytes / ours / 1e9:.1f}", f"{nbytes / theirs / 1e9:.1f}",
                         f"{nbytes / times['copy'] / 1e9:.1f}", f"{100 * times['copy'] / ours:.0f}%",
                         fmt(splits, "d")])
    print_table(["case", "flashlm ms", "torch ms", "x torch", "flashlm KV GB/s", "torch KV GB/s",
                 "memcpy GB/s", "of copy", "splits"], rows)


if __name__ == "__main__":
    main()
