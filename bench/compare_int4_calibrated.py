"""Int4 with calibration against RTN: held-out perplexity of a trained model, float vs RTN vs GPTQ vs AWQ (same
group size), and the time GPTQ/AWQ take.

    python bench/compare_int4_calibrated.py --model runs/flashlm --text data.txt [--group-size 128]
    python bench/compare_int4_calibrated.py --speed [--d-model 768 --n-layer 12]   # a random llama: time only

Calibration rows come from the start of the text, the held-out windows (disjoint, the model's context) from its
last --held-out fraction, as a training run splits its validation data. Perplexity is exp of the mean token
loss of Transformer.forward over those windows; the KL divergence from the float model's next-token
distribution, per token, is the finer measure where int4 moves perplexity little.
"""

import argparse
import copy
import math
import time

import torch

from bench_util import rtn_int4
from flashlm.io import load_model
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import awq_quantize, gptq_quantize


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None):
    """(perplexity, mean KL(reference || model) per token, or None) over the windows; reference: the float
    model's log-probabilities, as this returns them third."""
    total, count, kl, logps = 0.0, 0, 0.0, []
    for i, r in enumerate(range(0, windows.shape[0], 8)):
        w = windows[r:r + 8]
        logits, loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * w[:, 1:].numel()
        count += w[:, 1:].numel()
        logp = torch.log_softmax(logits.float(), dim=-1)
        logps.append(logp)
        if reference is not None:
            ref = reference[i]
            kl += (ref.exp() * (ref - logp)).sum().item()
    return math.exp(total / count), None if reference is None else kl / count, logps


def held_out_windows(ids: list, split: int, ctx: int) -> torch.Tensor:
    """The tokens from `split` on as disjoint windows of `ctx` tokens (the tail that fills no window dropped)."""
    held = ids[split:]
    return torch.tensor(held[:len(held) // ctx * ctx]).reshape(-1, ctx)


def quality(args):
    loaded = load_model(args.model)
    text = open(args.text, encoding="utf-8").read()
    ids = loaded.tokenizer.encode(text)
    split = int(len(ids) * (1 - args.held_out))
    seq = min(args.calib_seq, loaded.config.seq_len)
    n = min(args.calib_rows, split // seq)
    calib = torch.tensor(ids[:n * seq]).reshape(n, seq)
    windows = held_out_windows(ids, split, loaded.config.seq_len + 1)  # inputs and their next tokens
    print(f"model {args.model}: {loaded.config.arch}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M "
          f"params; calibration {n} x {seq} tokens; held-out {windows.numel()} tokens in {windows.shape[0]} windows")
    print(f"| method | g{args.group_size} {'sym' if not args.asym else 'asym'} PPL | vs float | KL to float "
          "(nats/token) | seconds |")
    print("| --- | --- | --- | --- | --- |")
    base, _, reference = evaluate(loaded.model, windows)
    print(f"| float | {base:.3f} | | | |")
    methods = {"RTN": rtn_int4, "GPTQ": gptq_quantize,
               "GPTQ act-order": lambda m, c, g, s: gptq_quantize(m, c, g, s, act_order=True),
               "AWQ": awq_quantize}
    for label, fn in methods.items():
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        fn(model, calib, args.group_size, not args.asym)
        seconds = time.perf_counter() - start
        ppl, kl, _ = evaluate(model, windows, reference)
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {kl:.5f} | {seconds:.1f} |", flush=True)


def speed(args):
    cfg = ModelConfig(arch="llama", vocab_size=32000, n_layer=args.n_layer, n_head=args.d_model // 64,
                      d_model=args.d_model, seq_len=args.calib_seq)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    calib = torch.randint(0, cfg.vocab_size, (args.calib_rows, args.calib_seq))
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks.parameters())
    print(f"random llama d_model {cfg.d_model}, {cfg.n_layer} layers, d_ff {cfg.d_ff}: {params / 1e6:.1f}M params "
          f"({block_params / 1e6:.1f}M in blocks); calibration {args.calib_rows} x {args.calib_seq} tokens; "
          f"{torch.get_num_threads()} threads")
    start = time.perf_counter()
    gptq_quantize(model, calib, args.group_size,
                  progress=lambda i, n: print(f"  block {i}/{n}: {time.perf_counter() - start:.1f} s", flush=True))
    print(f"GPTQ: {time.perf_counter() - start:.1f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a flashlm checkpoint, run folder or HF directory")
    p.add_argument("--text", help="UTF-8 text: calibration from its start, held-out windows from its end")
    p.add_argument("--held-out", type=float, default=0.05)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--calib-rows", type=int, default=128)
    p.add_argument("--calib-seq", type=int, default=512)
    p.add_argument("--speed", action="store_true", help="time GPTQ on a random llama instead")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=12)
    args = p.parse_args()
    speed(args) if args.speed else quality(args)


if __name__ == "__main__":
    main()
