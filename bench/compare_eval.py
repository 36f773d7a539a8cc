#!/usr/bin/env python3
"""compare_eval: perplexity through flashlm.eval against its peers on the same model and text, in one run.

A random-weight Llama-style model (default ~25M parameters: d 512, 8 layers, GQA 8/4, vocab 4096) with a
byte-level BPE tokenizer trained here is written as a GGUF file (--type, default F32) and as an HF directory;
a text of --tokens tokens is scored by:
  flashlm    perplexity(LLM(gguf), text, ctx_size, "llama.cpp"): windows as prompts with prompt logprobs,
             --max-num-seqs of them per engine step;
  llama.cpp  llama-cpp-python on the GGUF file (logits_all=True): eval() of each chunk (BOS first where the
             vocabulary adds one), llama-perplexity's scoring of the second half in numpy;
  lm-eval    lm_eval's HFLM ("hf" backend, the HF directory, float32, --hf-batch-size) loglikelihood_rolling
             of the text with max_length = ctx, against flashlm's rolling_loglikelihood on the same windows.
Each pair reports tokens scored per second (medians of --reps runs, taking turns), the ratio, and the two
perplexities, which agree (flashlm and llama.cpp in float32 to ~1e-4; lm-eval's sums to ~1e-5).

Multiple choice: --mc-items MMLU-format questions (random words, four choices, --shots examples of one dev
set before each, lm-eval's MMLU prompt) scored by flashlm.eval.loglikelihood.loglikelihoods (the engine, the
question's KV blocks shared by its four continuations through the prefix cache) and by lm-eval's hf backend
(`loglikelihood`), items per second, tokenization included on both sides; the value column is the accuracy
of the argmax choice against the random answers (both the same unless two choices nearly tie). Each run
scores a fresh set of items and shots, so no run finds the one before it in the prefix cache.

Run (from the repository root, with flashlm, llama-cpp-python and lm-eval installed):
  python bench/compare_eval.py
  python bench/compare_eval.py --type Q8_0 --layers 12 --d-model 768 --ctx 512 --tokens 16384
  python bench/compare_eval.py --quick        # seconds: CI smoke (peers that are not installed are skipped)
"""

import argparse
import math
import os
import tempfile

import numpy as np
import torch

import bench_util
from flashlm.eval.perplexity import perplexity, rolling_loglikelihood
from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.engine import LLM
from flashlm.train.export import export_gguf, export_hf
from flashlm.train.tokenizer import train_tokenizer


def make_model(folder, args):
    """(GGUF path, HF directory, text) of a random model whose tokenizer was trained on words like the text's."""
    words = [f"word{i % 97} w{i % 13}{i % 7}" for i in range(4000)]
    tok = train_tokenizer([" ".join(words[j:j + 200]) for j in range(0, 4000, 20)], vocab_size=args.vocab)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=args.layers, n_head=args.heads,
                      n_kv_head=args.kv_heads, d_model=args.d_model, seq_len=max(args.ctx + 2, args.mc_context),
                      tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    gguf = os.path.join(folder, f"model-{args.type}.gguf")
    export_gguf(model, cfg, tok.to_str(), gguf, type=args.type)
    hf_dir = export_hf(model, cfg, tok.to_str(), os.path.join(folder, "hf"))
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=args.tokens))  # more words than tokens: cut to --tokens below
    ids = tok.encode(text).ids[:args.tokens]
    return gguf, hf_dir, tok.decode(ids), model.num_params(), words


def llama_cpp_perplexity(path, text, ctx, threads):
    import llama_cpp

    ref = llama_cpp.Llama(path, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)
    tokens = ref.tokenize(text.encode(), add_bos=True)
    bos = ref.token_bos() if ref.tokenize(b"a", add_bos=True)[0] == ref.token_bos() else None

    def run():
        nll, count = 0.0, 0
        for i in range(len(tokens) // ctx):
            chunk = tokens[i * ctx:(i + 1) * ctx]
            if bos is not None:
                chunk[0] = bos
            ref.reset()
            ref.eval(chunk)
            logits = np.asarray(ref.scores[ctx // 2:ctx - 1], dtype=np.float64)
            top = logits.max(axis=1)
            lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
            nll += float((lse - logits[np.arange(len(logits)), chunk[ctx // 2 + 1:]]).sum())
            count += len(logits)
        return math.exp(nll / count), count

    return run


def lm_eval_rolling(hf_dir, text, ctx, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=batch_size, max_length=ctx, device="cpu")
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    count = len(lm.tok_encode(text))
    return lambda: (lm.loglikelihood_rolling([request], disable_tqdm=True)[0], count)


def mc_sets(count, items, shots, words):
    """count sets of lm-eval MMLU prompts [(context, [continuation x 4], answer)], each with its own dev shots."""
    import random

    from flashlm.eval.formats import Item
    from flashlm.eval.prompts import multiple_choice_prompt

    rng = random.Random(0)

    def item(i):
        return Item("college_physics", " ".join(rng.choices(words, k=10)),
                    [" ".join(rng.choices(words, k=3)) for _ in range(4)], rng.randrange(4), f"bench:{i}")

    sets = []
    for _ in range(count):
        dev = [item(-1) for _ in range(shots)]
        sets.append([(*multiple_choice_prompt("mmlu", it, dev), it.answer) for it in map(item, range(items))])
    return sets


def accuracy(scores, prompts) -> float:
    right = 0
    for k, (_, _, answer) in enumerate(prompts):
        row = scores[4 * k:4 * k + 4]
        right += max(range(4), key=lambda c: row[c]) == answer
    return right / len(prompts)


def flashlm_mc(llm, sets):
    from flashlm.eval.loglikelihood import loglikelihoods
    from flashlm.eval.prompts import encode_pair

    pending = iter(sets)

    def run():
        prompts = next(pending)
        requests = [encode_pair(llm.tokenizer, ctx, c) for ctx, conts, _ in prompts for c in conts]
        scores = [lp for lp, _ in loglikelihoods(llm, requests)]
        return accuracy(scores, prompts), len(prompts)

    return run


def lm_eval_mc(hf_dir, sets, max_length, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=batch_size, max_length=max_length, device="cpu")
    pending = iter(sets)

    def run():
        prompts = next(pending)
        requests = [Instance("loglikelihood", {}, (ctx, c), i)
                    for i, (ctx, c) in enumerate((ctx, c) for ctx, conts, _ in prompts for c in conts)]
        scores = [lp for lp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        return accuracy(scores, prompts), len(prompts)

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="F32", help="GGUF tensor types (a mix, as flashlm quantize takes)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=256, help="tokens per window (--ctx-size)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text")
    p.add_argument("--max-num-seqs", type=int, default=8, help="flashlm: windows per engine step")
    p.add_argument("--hf-batch-size", type=int, default=8, help="lm-eval hf backend's batch size")
    p.add_argument("--mc-items", type=int, default=64, help="multiple-choice questions per run")
    p.add_argument("--shots", type=int, default=5, help="examples before each question")
    p.add_argument("--mc-context", type=int, default=1024, help="the model's context for multiple choice")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="a tiny model and text (CI smoke)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.d_model, args.heads, args.kv_heads, args.vocab = 2, 128, 4, 2, 512
        args.ctx, args.tokens, args.reps, args.mc_items, args.shots = 64, 512, 1, 8, 2
    torch.set_num_threads(args.threads)
    from flashlm import ops

    print(bench_util.hardware_line("cpu", ops, f"llama.cpp and torch (lm-eval hf) {args.threads} threads"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        gguf, hf_dir, text, params, words = make_model(folder, args)
        print(f"model: {params / 1e6:.1f}M parameters, {args.type}; text: {args.tokens} tokens; ctx {args.ctx}")
        # No prefix caching: every run scores the same windows, and a cached first half would time a lookup.
        llm = LLM(gguf, max_model_len=args.ctx + 2, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=max(2048, args.ctx + 2), enable_prefix_caching=False)

        def flashlm_ppl():
            r = perplexity(llm, text, ctx_size=args.ctx, progress=False)
            return r.ppl, r.tokens

        ids = llm.tokenizer.encode(text)
        prefix = llm.tokenizer.eos_token_id  # lm-eval's prefix token where there is no BOS: EOS

        def flashlm_rolling():
            return rolling_loglikelihood(llm, ids, args.ctx, prefix_token=prefix), len(ids)

        pairs = [("perplexity, llama.cpp method", "llama.cpp", flashlm_ppl,
                  lambda: llama_cpp_perplexity(gguf, text, args.ctx, args.threads)),
                 ("loglikelihood_rolling", "lm-eval hf", flashlm_rolling,
                  lambda: lm_eval_rolling(hf_dir, text, args.ctx, args.hf_batch_size))]
        sets = mc_sets(args.reps + 1, args.mc_items, args.shots, words)
        mc_llm = LLM(gguf, max_model_len=args.mc_context, max_num_seqs=4 * args.max_num_seqs,
                     max_num_batched_tokens=max(2048, args.mc_context))
        pairs.append((f"multiple choice, {args.shots}-shot (items)", "lm-eval hf", flashlm_mc(mc_llm, sets),
                      lambda: lm_eval_mc(hf_dir, sets, args.mc_context, args.hf_batch_size)))
        for what, peer_name, ours, make_peer in pairs:
            try:
                peer = make_peer()
            except ImportError as e:
                print(f"{peer_name}: not installed ({e}); flashlm only")
                peer = None
            fns = {"flashlm": (ours, "cpu")} | ({peer_name: (peer, "cpu")} if peer else {})
            values = {label: fn() for label, (fn, _) in fns.items()}  # also the warm-up
            secs = bench_util.median_seconds(fns, args.reps, warmup=0)
            tps = {label: values[label][1] / secs[label] for label in fns}
            ratio = tps["flashlm"] / tps[peer_name] if peer else None
            rows.append([what, peer_name, f"{values['flashlm'][1]}", bench_util.fmt(tps["flashlm"], ".0f"),
                         bench_util.fmt(tps.get(peer_name), ".0f"), bench_util.fmt(ratio, ".2f"),
                         f"{values['flashlm'][0]:.6g}", bench_util.fmt(values[peer_name][0] if peer else None, ".6g")])
    bench_util.print_table(["scoring", "peer", "tokens/items", "flashlm /s", "peer /s", "ratio", "flashlm value",
                            "peer value"], rows)


if __name__ == "__main__":
    main()
