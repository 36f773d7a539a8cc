#!/usr/bin/env python3
"""compare_decode: flashlm's runtime against llama.cpp (llama-cpp-python) decoding the same GGUF files.

Random-weight models of each --arch (default ~90M parameters for llama: d 768, 12 layers, GQA 12/4, vocab 4096,
with a byte-level BPE tokenizer trained here) are exported by flashlm to GGUF (F32 / Q8_0 / Q4_0: llama.cpp's
tensor names, rope permutation and reference quantization bytes):
  llama      the dense Llama model;
  mixtral    the same attention with a mixture-of-experts MLP: --n-expert experts (8) of --moe-d-ff (d_ff),
             --n-expert-used (2) per token (the llama shape with 8 experts: ~480M parameters); its experts stay
             in their GGUF blocks and run the MoE kernels (flashlm.ops.moe);
  mixtral-1b a ~1.1B-parameter Mixtral whatever the shape options say: d 1024, 16 layers, 16/4 heads, 8
             experts of width 2816, top-2 (~300M parameters read per token); --quick shrinks it as the others;
  gemma2     the llama shape as Gemma 2: GeGLU, pre- and post-norms, soft-capped attention and logits,
             alternating sliding-window (--prompt-tokens / 2) and global layers, tied embeddings;
  gemma3     the same block with q/k norms, five local layers (their own rope base) to one global, no soft-caps.
--module-path adds a row per model for flashlm with the native decoder stack switched off (every step module by
module, as gemma ran before the stack took it), timed in turn with the others.
The files are cached under build/bench_models/ (keyed by the model's config and type: the random weights come
from a fixed seed), so a rerun skips the export of a large model (remove the folder after changing the
exporter). Each file is loaded by both runtimes:
  flashlm    flashlm.LLM(path): weights stay in their GGUF blocks (GGUFLinear), paged KV cache (bf16 by default:
             llama.cpp's default f16 cache is as many bytes per token), the engine's scheduler and sampler;
             greedy, batch 1;
  llama.cpp  llama_cpp.Llama(path, n_threads=T): eval() of the prompt, then one eval() per greedy token.
Both run with the same thread count (--threads, default: torch's). Before timing, the first 8 greedy tokens
of both are compared (they match unless two logits nearly tie; a mismatch is printed, not hidden).
--clock cpu times the process's CPU time instead of the wall clock (with --threads 1, what a machine shared
with other jobs cannot inflate), the batching figure's too.

Per model: prefill tokens/s (a --prompt-tokens prompt), decode tokens/s (--gen-tokens after it), the ratio
flashlm / llama.cpp, and the weight bandwidth each decode achieves (model bytes x tokens/s) next to a measured
copy bandwidth (the ceiling; a MoE model's bytes count every expert, of which a token reads
--n-expert-used). Then the engine's continuous batching: --concurrency requests at once against
the same requests one after another (tokens/s): decode only (the steps after the prompts', which make every
token but a request's first) and end to end (the prompts' prefill included: with --prompt-tokens 128 and
--gen-tokens 64 it is most of the work, and the same work either way, so this ratio says little about
batching). The same --concurrency requests also go through llama.cpp at once (one context with a KV sequence
per request: each prompt prefilled, then one llama_decode of all sequences' tokens per step), and the table
sets the two decode rates side by side. Medians of --reps runs; the two runtimes take turns.

Run (from the repository root, with flashlm and llama-cpp-python installed):
  python bench/compare_decode.py                   # Q4_0 and Q8_0
  python bench/compare_decode.py --types Q4_0 F32 --layers 24 --d-model 1024
  python bench/compare_decode.py --arch mixtral gemma2 --types Q4_0 --threads 1 --clock cpu
  python bench/compare_decode.py --arch mixtral-1b --types Q4_0 --threads 1 --clock cpu
  python bench/compare_decode.py --arch llama gemma2 gemma3 --types Q4_0 --threads 1 --clock cpu --module-path
  python bench/compare_decode.py --quick           # seconds: CI smoke (flashlm only without llama_cpp)
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import torch

import bench_util
from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.commands import copy_bandwidth, model_bytes
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.train.export import export_gguf
from flashlm.train.tokenizer import train_tokenizer


# mixtral-1b's shape (ModelConfig fields), unless --quick: 16 x (8 x 3 x 1024 x 2816 expert weights + attention)
# + embeddings = 1.12B parameters.
MOE_1B = dict(d_model=1024, n_layer=16, n_head=16, n_kv_head=4, d_ff=2816, moe_d_ff=2816, n_expert=8,
              n_expert_used=2)
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "build", "bench_models")


def arch_fields(arch, args):
    """The ModelConfig fields that make the llama shape `arch`."""
    if arch == "mixtral-1b":
        fields = arch_fields("mixtral", args)
        return fields if args.quick else {**fields, **MOE_1B}
    if arch == "mixtral":  # (llama.cpp's Mixtral reads the experts' width as feed_forward_length: d_ff)
        return dict(n_expert=args.n_expert, n_expert_used=args.n_expert_used, d_ff=args.moe_d_ff,
                    moe_d_ff=args.moe_d_ff, norm_topk_prob=True)
    if arch == "gemma2":  # llama.cpp's gemma2 ties its head and always soft-caps
        return dict(tie_embeddings=True, attn_softcap=50.0, final_softcap=30.0,
                    sliding_window=max(args.prompt_tokens // 2, 1))
    if arch == "gemma3":  # llama.cpp's gemma3 ties its head and has no attention soft-cap
        return dict(tie_embeddings=True, sliding_window=max(args.prompt_tokens // 2, 1), rope_local_theta=10000.0)
    return {}


def make_gguf(folder, args, ggml_type, arch="llama"):
    """(path, parameters) of the `arch` model's GGUF file of `ggml_type`, exported once into `folder` (None: CACHE,
    kept between runs)."""
    folder = CACHE if folder is None else folder
    shape = dict(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads,
                 d_model=args.d_model, seq_len=args.prompt_tokens + args.gen_tokens + 8, tie_embeddings=False)
    cfg = ModelConfig(arch="mixtral" if arch == "mixtral-1b" else arch, **{**shape, **arch_fields(arch, args)})
    key = hashlib.sha256(json.dumps([cfg.to_dict(), ggml_type], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(folder, f"{arch}-{ggml_type}-{key}.gguf")
    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            return path, json.load(f)["params"]
    torch.manual_seed(0)
    model = Transformer(cfg)
    text = [" ".join(f"word{i % 97} w{i % 13}{i % 7}" for i in range(j, j + 200)) for j in range(200)]
    tok = train_tokenizer(text, vocab_size=args.vocab)
    if tok.get_vocab_size() != args.vocab:  # a small corpus may not fill the vocabulary: pad the model instead
        cfg = ModelConfig(**{**cfg.to_dict(), "vocab_size": tok.get_vocab_size()})
        torch.manual_seed(0)
        model = Transformer(cfg)
    os.makedirs(folder, exist_ok=True)
    export_gguf(model, cfg, tok.to_str(), path + ".tmp", type=ggml_type)
    os.replace(path + ".tmp", path)  # (an interrupted export leaves no file that looks whole)
    with open(path + ".json", "w") as f:
        json.dump({"params": model.num_params()}, f)
    return path, model.num_params()


def flashlm_runs(path, args, native=True):
    """(llm, prompt, run(clock) -> (greedy token ids, prefill seconds, seconds per decoded token)); native: False
    switches the native decoder stack off (the module path)."""
    # No prefix caching: every repetition runs the same prompt, and a cached prefix would time a lookup, not a
    # prefill (the batching figure likewise reruns the sequential requests).
    llm = LLM(path, max_num_seqs=max(args.concurrency, 1), enable_prefix_caching=False,
              kv_cache_dtype=getattr(torch, args.kv_dtype), native_decoder=native)
    g = torch.Generator().manual_seed(1)
    vocab = llm.model.cfg.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)

    def run(clock):
        t = clock()
        first = out = None
        for out in llm.stream(prompt, params):  # one output per step: the first after the prefill
            if first is None:
                first = clock() - t
                t = clock()
        return out.outputs[0].token_ids, first, (clock() - t) / max(args.gen_tokens - 1, 1)

    return llm, prompt, run


class StepClock:
    """Times an engine's steps by `clock` (the step's host work included) and its forward calls, each step filed
    as decode (one new token per sequence) or prefill (prompt tokens in it, decodes mixed in or not)."""

    def __init__(self, llm, clock):
        self.steps = []  # (decode, sequences, step seconds, forward seconds)
        self._forward = None
        runner, step, forward = llm.runner, llm._step, llm.runner.forward

        def timed_forward(tokens, paged):
            t = clock()
            out = forward(tokens, paged)
            n = int(paged.seq_lens.numel())
            self._forward = (tokens.numel() == n, n, clock() - t)
            return out

        def timed_step(*a, **k):
            self._forward = None
            t = clock()
            out = step(*a, **k)
            if self._forward is not None:  # (a step may schedule nothing)
                decode, n, f = self._forward
                self.steps.append((decode, n, clock() - t, f))
            return out

        runner.forward, llm._step = timed_forward, timed_step

    def seconds(self, decode):
        """The steps' total time, decode steps or prefill steps."""
        return sum(s for d, _, s, _ in self.steps if d == decode)


def batching(llm, prompts, params, clock):
    """The same requests one at a time and all at once: (end to end, decode only) each a pair of tokens/s
    (sequential, concurrent). End to end times the whole generate() calls, prefill included (as
    flashlm.runtime.commands.batching_speedup); decode only sums the decode steps (host work included), which
    make all tokens but each request's first."""
    steps = StepClock(llm, clock)
    t = clock()
    for p in prompts:
        llm.generate(p, params)
    seq_total, seq_decode = clock() - t, steps.seconds(True)
    steps.steps.clear()
    t = clock()
    llm.generate(prompts, params)
    conc_total, conc_decode = clock() - t, steps.seconds(True)
    def rate(tokens, seconds):
        return tokens / seconds if seconds > 0 else float("nan")  # (no decode steps: one token per request)

    n, gen = len(prompts), params.max_tokens
    return ((rate(n * gen, seq_total), rate(n * gen, conc_total)),
            (rate(n * (gen - 1), seq_decode), rate(n * (gen - 1), conc_decode)))


def llama_cpp_runs(path, prompt, args):
    """run(clock) -> (llama.cpp's greedy token ids, prefill seconds, seconds per decoded token)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(path, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=len(prompt) + args.gen_tokens + 8, n_batch=max(len(prompt), 8), verbose=False)

    n_vocab = llm.n_vocab()

    def last_logits():  # the context's logits of the last evaluated token (no copy)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def run(clock):
        llm.reset()
        t = clock()
        llm.eval(prompt)
        tok = int(np.argmax(last_logits()))
        first = clock() - t
        tokens = [tok]
        t = clock()
        for _ in range(args.gen_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            tokens.append(tok)
        return tokens, first, (clock() - t) / max(args.gen_tokens - 1, 1)

    return run


def llama_cpp_batched(path, prompts, args, clock):
    """llama.cpp running `prompts` at once, greedy, --gen-tokens each: one context with a KV sequence per request,
    each prompt prefilled (its last token's logits kept), then one llama_decode per step of every sequence's next
    token. Returns (end to end tokens/s, decode-only tokens/s) of the median of --reps runs, and the greedy
    tokens of the first request."""
    import llama_cpp as lc
    import numpy as np

    n, longest = len(prompts), max(len(p) for p in prompts)
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_seq_max, cp.n_ctx = n, n * (longest + args.gen_tokens + 8)
    cp.n_batch = cp.n_ubatch = max(longest, n)
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = lc.llama_init_from_model(model, cp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(max(longest, n), 0, 1)

    def decode(entries):  # (token, position, sequence, keep logits) per batch slot
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, keep) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, keep
            batch.seq_id[i][0] = seq
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def greedy(i):  # the argmax of batch slot i's logits
        return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

    def run():
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t = clock()
        tokens = []
        for s, p in enumerate(prompts):
            decode([(tok, j, s, j == len(p) - 1) for j, tok in enumerate(p)])
            tokens.append([greedy(len(p) - 1)])
        prefill = clock() - t
        t = clock()
        for step in range(args.gen_tokens - 1):
            decode([(tokens[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)])
            for s in range(n):
                tokens[s].append(greedy(s))
        steps = clock() - t
        return n * args.gen_tokens / (prefill + steps), n * (args.gen_tokens - 1) / steps, tokens[0]

    try:
        runs = [run() for _ in range(args.reps)]
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


def shape_arguments(p):
    """The model's shape options (the ~90M llama by default), shared by the scripts that build it."""
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=("llama", "mixtral", "mixtral-1b", "gemma2", "gemma3"),
                   default=["llama", "mixtral-1b", "gemma2"])
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0"])
    shape_arguments(p)
    p.add_argument("--n-expert", type=int, default=8, help="mixtral: experts per layer")
    p.add_argument("--n-expert-used", type=int, default=2, help="mixtral: experts per token")
    p.add_argument("--moe-d-ff", type=int, default=None, help="mixtral: each expert's width (default: d_ff)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--kv-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="flashlm's KV cache (llama.cpp keeps f16 by default: bfloat16 reads as many bytes)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few tokens (CI smoke)")
    p.add_argument("--module-path", action="store_true",
                   help="also time flashlm with the native decoder stack off (a row per model)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.d_model, args.heads, args.kv_heads, args.vocab = 2, 128, 4, 2, 512
        args.prompt_tokens, args.gen_tokens, args.concurrency, args.reps = 16, 8, 4, 1
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
        print("llama_cpp is not installed: flashlm only (pip install llama-cpp-python for the comparison)")
    from flashlm import ops

    ops.set_num_threads(args.threads)  # flashlm's pool took torch's count at import
    peer = f"llama.cpp {args.threads} threads" if have_llama_cpp else "no peer"
    print(bench_util.hardware_line("cpu", ops, peer))
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")
    rows = []
    for arch, ggml_type in [(a, t) for a in args.arch for t in args.types]:
        name = f"{arch} {ggml_type}"
        path, n_params = make_gguf(None, args, ggml_type, arch)
        llm, prompt, ours = flashlm_runs(path, args)
        theirs = llama_cpp_runs(path, prompt, args) if have_llama_cpp else None
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        modules = flashlm_runs(path, args, native=False)[2] if args.module_path else None
        a = ours(clock)[0][:8]  # (also the warm-up)
        if modules and modules(clock)[0][:8] != a:
            print(f"{name}: the module path's first greedy tokens differ from the native stack's")
        if theirs:
            b = theirs(clock)[0][:8]
            if a != b:
                print(f"{name}: first greedy tokens differ (flashlm {a}, llama.cpp {b}): near-tied logits?")
        res = {"flashlm": [], "llama.cpp": [], "module path": []}
        for _ in range(args.reps):  # the runtimes take turns
            res["flashlm"].append(ours(clock)[1:])
            if modules:
                res["module path"].append(modules(clock)[1:])
            if theirs:
                res["llama.cpp"].append(theirs(clock)[1:])
        nbytes = model_bytes(llm.model)
        fsize = os.path.getsize(path)

        def rates(runs):
            if not runs:
                return None, None
            return (args.prompt_tokens / statistics.median(r[0] for r in runs),
                    1.0 / statistics.median(r[1] for r in runs))

        (pf, df), (pl, dl) = rates(res["flashlm"]), rates(res["llama.cpp"])
        rows.append([name, f"{n_params / 1e6:.0f}M", f"{fsize / 2**20:.0f} MiB",
                     bench_util.fmt(pf, ".0f"), bench_util.fmt(pl, ".0f"),
                     bench_util.fmt(df, ".1f"), bench_util.fmt(dl, ".1f"),
                     bench_util.fmt(df / dl if dl else None, ".2f"),
                     f"{nbytes * df / 1e9:.2f} ({100 * nbytes * df / bw:.0f}%)",
                     bench_util.fmt(fsize * dl / 1e9 if dl else None, ".2f")])
        # Continuous batching: the same requests at once and one at a time.
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, llm.model.cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.concurrency)]
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        (seq, conc), (dseq, dconc) = batching(llm, prompts, params, clock)
        host = llm.stats_summary()
        print(f"{name}: {args.concurrency} concurrent requests vs one at a time, decode only (the steps after "
              f"the prompts) {dconc:.1f} vs {dseq:.1f} tokens/s ({dconc / dseq:.2f}x); end to end (with the "
              f"prefill of {args.concurrency} x {args.prompt_tokens} prompt tokens) {conc:.1f} vs {seq:.1f} "
              f"tokens/s ({conc / seq:.2f}x); engine host overhead {host['host_ms_per_step']:.2f} ms/step "
              f"({100 * host['host_share']:.0f}% of step time)")
        del llm
        bl = llama_cpp_batched(path, prompts, args, clock)[1] if have_llama_cpp else None
        rows[-1] += [bench_util.fmt(dconc, ".1f"), bench_util.fmt(bl, ".1f"),
                     bench_util.fmt(dconc / bl if bl else None, ".2f")]
        if modules:
            pm, dm = rates(res["module path"])
            rows.append([f"{name} (module path)", "", "", bench_util.fmt(pm, ".0f"), bench_util.fmt(pl, ".0f"),
                         bench_util.fmt(dm, ".1f"), bench_util.fmt(dl, ".1f"),
                         bench_util.fmt(dm / dl if dl else None, ".2f"), f"{nbytes * dm / 1e9:.2f}", "", "", "", ""])
    print(f"clock: {args.clock}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")
    bench_util.print_table(["model", "params", "file", "prefill tok/s flashlm", "llama.cpp", "decode tok/s flashlm",
                            "llama.cpp", "x llama.cpp", "flashlm GB/s (% copy)", "llama.cpp GB/s",
                            f"batch {args.concurrency} decode tok/s flashlm", "llama.cpp", "x llama.cpp"], rows)


if __name__ == "__main__":
    sys.exit(main())
