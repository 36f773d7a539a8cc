"""Wall time of calibration + GPTQ int4 on a random llama of TinyLlama's shapes (1.1B parameters: d_model 2048,
d_ff 5632, 22 layers, 32 query / 4 KV heads, vocab 32000), with the time of each stage.

    python bench/compare_gptq_time.py                          # the 1.1B model, 128 x 512 calibration tokens
    python bench/compare_gptq_time.py --n-layer 2 --calib-rows 16   # two blocks, extrapolated to 22 (labelled)
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

from compare_int4_calibrated import evaluate, held_out_windows
from flashlm.io import load_model
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear, gptq

FULL_LAYERS = 22  # TinyLlama's
STAGES = {"calibration forward (hooked)": "calib_forward", "quantized forward (the next block's inputs)":
          "quant_forward", "Hessian products": "HessianAccumulator.add",
          "Cholesky factors": "_inverse_cholesky", "column loop + block updates": "gptq_quantize_weight",
          "embedding pass": "first_block_inputs"}


def timed(seconds: dict, cpu: dict, key: str, fn):
    """fn, adding its wall seconds to seconds[key] and the process's CPU seconds (all threads) to cpu[key]."""
    def wrapper(*args, **kwargs):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
            cpu[key] += time.process_time() - start_cpu
    return wrapper


def quality(args):
    loaded = load_model(args.model)
    ids = loaded.tokenizer.encode(open(args.text, encoding="utf-8").read())
    split = int(len(ids) * 0.95)
    seq = min(args.calib_seq, loaded.config.seq_len)
    n = min(args.calib_rows, split // seq // 2)
    calib = torch.tensor(ids[:n * seq]).reshape(n, seq)
    other = torch.tensor(ids[n * seq:2 * n * seq]).reshape(n, seq)  # the noise: another sample of the text
    windows = held_out_windows(ids, split, loaded.config.seq_len + 1)
    print(f"model {args.model}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M params; calibration "
          f"{n} x {seq} tokens; held-out {windows.numel()} tokens; g{args.group_size}")
    base, _, reference = evaluate(loaded.model, windows)
    print(f"| calibration forward | PPL | vs float | KL to float (nats/token) | seconds |\n|---|---|---|---|---|\n"
          f"| (float model) | {base:.3f} | | | |")
    codes = {}
    for label, dtype, rows in (("float32", torch.float32, calib), ("bfloat16", torch.bfloat16, calib),
                               ("float32, the next rows of the text", torch.float32, other)):
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        gptq.gptq_quantize(model, rows, args.group_size, calib_dtype=dtype)
        seconds = time.perf_counter() - start
        ppl, kl, _ = evaluate(model, windows, reference)
        codes[label] = [m.weight for m in model.blocks.modules() if isinstance(m, Int4Linear)]
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {kl:.5f} | {seconds:.1f} |", flush=True)
    for label in ("bfloat16", "float32, the next rows of the text"):
        same = total = 0
        for a, b in zip(codes["float32"], codes[label]):  # packed bytes: compare the nibbles
            for shift in (0, 4):
                same += int(((a >> shift) & 15).eq((b >> shift) & 15).sum())
                total += a.numel()
        print(f"int4 codes alike, float32 and {label}: {100 * same / total:.2f}% of {total}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="with --text: a trained flashlm checkpoint for the precision check")
    p.add_argument("--text", help="UTF-8 text: calibration from its start, held-out windows from its last 5%%")
    p.add_argument("--n-layer", type=int, default=FULL_LAYERS)
    p.add_argument("--calib-rows", type=int, default=128, help="the CLI's default")
    p.add_argument("--calib-seq", type=int, default=512, help="the CLI's default")
    p.add_argument("--calib-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: gptq.default_calib_dtype (float32 on CPUs without bf16 matmul instructions)")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    if args.model:
        return quality(args)
    cfg = ModelConfig(arch="llama", vocab_size=32000, n_layer=args.n_layer, n_head=32, n_kv_head=4, d_model=2048,
                      d_ff=5632, seq_len=max(2048, args.calib_seq))
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    calib = torch.randint(0, cfg.vocab_size, (args.calib_rows, args.calib_seq))
    calib_dtype = None if args.calib_dtype == "auto" else getattr(torch, args.calib_dtype)
    args.calib_dtype = str(calib_dtype or gptq.default_calib_dtype("cpu")).replace("torch.", "")
    print(f"random llama: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {cfg.n_layer} layers; "
          f"calibration {args.calib_rows} x {args.calib_seq} tokens in {args.calib_dtype}; g{args.group_size}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}", flush=True)

    seconds, cpu = defaultdict(float), defaultdict(float)
    originals = {"run_block": gptq.run_block, "first_block_inputs": gptq.first_block_inputs,
                 "_inverse_cholesky": gptq._inverse_cholesky, "gptq_quantize_weight": gptq.gptq_quantize_weight}
    add = gptq.HessianAccumulator.add
    for name, fn in originals.items():
        setattr(gptq, name, timed(seconds, cpu, name, fn))
    calls = [0]

    def run_block(*a):  # each block: the hooked pass, then (but for the last block) the quantized one
        calls[0] += 1
        key = "calib_forward" if calls[0] % 2 else "quant_forward"
        return timed(seconds, cpu, key, originals["run_block"])(*a)
    gptq.run_block = run_block
    gptq.HessianAccumulator.add = timed(seconds, cpu, "HessianAccumulator.add", add)
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        gptq.gptq_quantize(model, calib, args.group_size, calib_dtype=calib_dtype,
                           progress=lambda i, n: print(f"  block {i}/{n}: {time.perf_counter() - start:.1f} s, "
                                                       f"load average {os.getloadavg()[0]:.1f}", flush=True))
    finally:
        for name, fn in originals.items():
            setattr(gptq, name, fn)
        gptq.HessianAccumulator.add = add
    seconds["total"], cpu["total"] = time.perf_counter() - start, time.process_time() - start_cpu
    for d in (seconds, cpu):
        d["calib_forward"] -= d["HessianAccumulator.add"]  # the hooks' products run inside the forward
        d["other"] = d["total"] - sum(d[k] for k in STAGES.values())
    # CPU seconds: what the process computed, all threads together; on a loaded host the wall time is longer
    # by the share of the cores other work took.
    n = cfg.n_layer
    print(f"\n| stage | wall s per block | CPU s per block | wall s, {n} blocks | CPU s, {n} blocks |\n"
          "|---|---|---|---|---|")
    for label, key in list(STAGES.items()) + [("other (block copies, packing)", "other"), ("total", "total")]:
        print(f"| {label} | {seconds[key] / n:.2f} | {cpu[key] / n:.2f} | {seconds[key]:.1f} | {cpu[key]:.1f} |")
    if n < FULL_LAYERS:  # the embedding pass runs once; every block costs the same at these shapes
        for label, d in (("wall", seconds), ("CPU", cpu)):
            per_block, embed = (d["total"] - d["first_block_inputs"]) / n, d["first_block_inputs"]
            print(f"extrapolated to {FULL_LAYERS} blocks ({label}): {FULL_LAYERS} x {per_block:.1f} s + embedding "
                  f"pass {embed:.1f} s = {(FULL_LAYERS * per_block + embed) / 60:.1f} min")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
