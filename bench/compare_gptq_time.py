"""Wall time of calibration + GPTQ int4 on a random llama of TinyLlama's shapes (1.1B parameters: d_model 2048,
d_ff 5632, 22 layers, 32 query / 4 KV heads, vocab 32000), with the time of each stage.

    python bench/compare_gptq_time.py                          # the 1.1B model, 128 x 512 calibration tokens
    python bench/compare_gptq_time.py --n-layer 1 --calib-rows 8 --calib-dtype float32   # one block
    python bench/compare_gptq_time.py --model CKPT --text FILE   # quality: bfloat16 vs float32 calibration

The stages are timed by wrapping flashlm.quant.gptq's functions for the run: the block forward passes (the
hooked one that feeds the Hessians and the one that feeds the next block), the Hessian products, the damped
inverse's Cholesky factors and GPTQ's column loop with its block updates. The calibration rows are random token
ids (a random model's activations do not depend on the text).

With --model and --text: the precision check of the bfloat16 calibration forward on a trained model, as
compare_int4_calibrated.py measures (calibration rows from the text's start, held-out windows from its end):
held-out perplexity and KL to the float model of GPTQ with calib_dtype float32 and bfloat16, and the share of
int4 codes the two give alike.
"""

import argparse
import copy
import os
import time
from collections import defaultdict

import torch

from compare_int4_calibrated import evaluate
from flashlm.io import load_model
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear, gptq

STAGES = {"forward (hooked + quantized)": "run_block", "Hessian products": "HessianAccumulator.add",
          "Cholesky factors": "_inverse_cholesky", "column loop + block updates": "gptq_quantize_weight",
          "embedding pass": "first_block_inputs"}


def timed(seconds: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return wrapper


def quality(args):
    loaded = load_model(args.model)
    ids = loaded.tokenizer.encode(open(args.text, encoding="utf-8").read())
    split = int(len(ids) * 0.95)
    seq = min(args.calib_seq, loaded.config.seq_len)
    n = min(args.calib_rows, split // seq)
    calib = torch.tensor(ids[:n * seq]).reshape(n, seq)
    ctx = loaded.config.seq_len + 1
    held = ids[split:]
    windows = torch.tensor(held[:len(held) // ctx * ctx]).reshape(-1, ctx)
    print(f"model {args.model}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M params; calibration "
          f"{n} x {seq} tokens; held-out {windows.numel()} tokens; g{args.group_size}")
    base, _, reference = evaluate(loaded.model, windows)
    print(f"| calibration forward | PPL | vs float | KL to float (nats/token) | seconds |\n|---|---|---|---|---|\n"
          f"| (float model) | {base:.3f} | | | |")
    codes = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        gptq.gptq_quantize(model, calib, args.group_size, calib_dtype=dtype)
        seconds = time.perf_counter() - start
        ppl, kl, _ = evaluate(model, windows, reference)
        codes[dtype] = [m.weight for m in model.blocks.modules() if isinstance(m, Int4Linear)]
        print(f"| {str(dtype)[6:]} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {kl:.5f} | {seconds:.1f} |")
    same = total = 0
    for a, b in zip(codes[torch.float32], codes[torch.bfloat16]):  # packed bytes: compare the nibbles
        for shift in (0, 4):
            same += int(((a >> shift) & 15).eq((b >> shift) & 15).sum())
            total += a.numel()
    print(f"int4 codes alike in both: {100 * same / total:.2f}% of {total}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="with --text: a trained flashlm checkpoint for the precision check")
    p.add_argument("--text", help="UTF-8 text: calibration from its start, held-out windows from its last 5%%")
    p.add_argument("--n-layer", type=int, default=22)
    p.add_argument("--calib-rows", type=int, default=128, help="the CLI's default")
    p.add_argument("--calib-seq", type=int, default=512, help="the CLI's default")
    p.add_argument("--calib-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    if args.model:
        return quality(args)
    cfg = ModelConfig(arch="llama", vocab_size=32000, n_layer=args.n_layer, n_head=32, n_kv_head=4, d_model=2048,
                      d_ff=5632, seq_len=max(2048, args.calib_seq))
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    calib = torch.randint(0, cfg.vocab_size, (args.calib_rows, args.calib_seq))
    print(f"random llama: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {cfg.n_layer} layers; "
          f"calibration {args.calib_rows} x {args.calib_seq} tokens in {args.calib_dtype}; g{args.group_size}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}", flush=True)

    seconds = defaultdict(float)
    originals = {"run_block": gptq.run_block, "first_block_inputs": gptq.first_block_inputs,
                 "_inverse_cholesky": gptq._inverse_cholesky, "gptq_quantize_weight": gptq.gptq_quantize_weight}
    add = gptq.HessianAccumulator.add
    for name, fn in originals.items():
        setattr(gptq, name, timed(seconds, name, fn))
    gptq.HessianAccumulator.add = timed(seconds, "HessianAccumulator.add", add)
    start = time.perf_counter()
    try:
        gptq.gptq_quantize(model, calib, args.group_size, calib_dtype=getattr(torch, args.calib_dtype),
                           progress=lambda i, n: print(f"  block {i}/{n}: {time.perf_counter() - start:.1f} s, "
                                                       f"load average {os.getloadavg()[0]:.1f}", flush=True))
    finally:
        for name, fn in originals.items():
            setattr(gptq, name, fn)
        gptq.HessianAccumulator.add = add
    total = time.perf_counter() - start
    seconds["run_block"] -= seconds["HessianAccumulator.add"]  # the hooks' products run inside the forward
    n = cfg.n_layer
    print(f"\n| stage | seconds per block (mean of {n}) | seconds, all blocks |\n|---|---|---|")
    for label, key in STAGES.items():
        print(f"| {label} | {seconds[key] / n:.2f} | {seconds[key]:.1f} |")
    rest = total - sum(seconds[k] for k in STAGES.values())
    print(f"| other (copies, packing) | {rest / n:.2f} | {rest:.1f} |")
    print(f"| **total** | **{total / n:.2f}** | **{total:.1f}** |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
