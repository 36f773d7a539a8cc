"""The runtime's commands: `flashlm generate`, `flashlm chat` and `flashlm bench-decode` (wired in flashlm.cli).

bench-decode reports what gpt-fast and llama-bench report: prefill and decode tokens/s at batch 1, the
bandwidth the decode achieves (model bytes x tokens/s) next to this machine's measured copy bandwidth, and
the throughput of concurrent requests against the same requests one at a time.
"""

import statistics
import sys
import time

import torch

from flashlm.ops._check import INT64_MAX
from flashlm.runtime.checks import as_count
from flashlm.runtime.sampling_params import SamplingParams

# bench-decode makes every request's prompt up front and then runs them all at once.
MAX_CONCURRENCY = 1 << 16


# For models that ship no chat template (flashlm's own trained models): plain "role: content" lines.
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")


def _ensure_chat_template(llm) -> None:
    if not getattr(llm.tokenizer, "chat_template", None):
        print("flashlm: the model has no chat template; using plain 'role: content' lines", file=sys.stderr)
        llm.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


LORA_HELP = ("an adapter run on the base, unmerged: LoRA, prompt or prefix tuning, as a fine-tuning run folder or a "
             "PEFT directory, or a LoRA GGUF adapter")


TENSOR_PARALLEL_HELP = ("split every layer over N processes of this machine (tensor parallelism; N divides the "
                        "model's heads; default 1)")


def add_engine_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a GGUF file or an HF model directory")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--lora", default=None, metavar="PATH", help=LORA_HELP)
    p.add_argument("--draft-model", default=None, help="a smaller model of the same vocabulary (speculative decoding)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16"), default=None,
                   help="KV cache dtype (default: float32 on the CPU; bfloat16 halves what decode reads per token)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 512MiB (default: room for every "
                                                           "sequence at full length, at most 1 GiB)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help=TENSOR_PARALLEL_HELP)


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _engine(args, **kw):
    from flashlm.runtime.engine import LLM

    kv_dtype = getattr(torch, args.kv_cache_dtype) if args.kv_cache_dtype else None
    return LLM(args.model, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
               kv_cache_dtype=kv_dtype, draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
               lora=args.lora, tensor_parallel_size=args.tensor_parallel_size, **kw)


def _params(args, **kw) -> SamplingParams:
    # A command prints what it generates: at least one token (the engine's max_tokens=0 only scores a prompt).
    return SamplingParams(max_tokens=as_count(args.max_tokens, "max_tokens"), temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, **kw)


def _stream(llm, prompt, params) -> str:
    """Prints the completion as it grows; returns its text."""
    shown = ""
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        if text.startswith(shown):  # a multi-byte character may change the text's tail as it completes
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    print()
    return shown


def _with_engine(run, args, **kw) -> int:
    """run(llm, args) on the command's engine, closed after (its tensor-parallel workers end then)."""
    with _engine(args, **kw) as llm:
        return run(llm, args)


def cmd_generate(args) -> int:
    return _with_engine(_generate, args)


def _generate(llm, args) -> int:
    params = _params(args, ignore_eos=args.ignore_eos)
    prompts = args.prompt or [""]
    if len(prompts) == 1:
        if args.chat:
            _ensure_chat_template(llm)
            out = llm.chat([{"role": "user", "content": prompts[0]}], params)
            print(out.outputs[0].text)
        else:
            _stream(llm, prompts[0] or _bos_prompt(llm), params)
        return 0
    outs = llm.generate([p or _bos_prompt(llm) for p in prompts], params, use_tqdm=True)
    for p, out in zip(prompts, outs):
        print(f"--- {p!r}\n{out.outputs[0].text}")
    return 0


def _bos_prompt(llm):
    """An empty prompt starts from the beginning-of-sequence token (or, lacking one, the end-of-text token)."""
    tok = llm.tokenizer
    start = getattr(tok, "bos_token_id", None)
    if start is None:
        start = next(iter(getattr(tok, "eos_token_ids", ()) or ()), 0)
    return [start]


def cmd_chat(args) -> int:
    return _with_engine(_chat, args)


def _chat(llm, args) -> int:
    _ensure_chat_template(llm)
    params = _params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("flashlm chat: an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        out = llm.chat(messages, params)
        print(out.outputs[0].text)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    return 0


def model_bytes(model) -> int:
    """Bytes of weights a decode step reads: parameters and buffers, without the rotary tables."""
    skip = {"rope_cos", "rope_sin"}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.split(".")[-1] not in skip)


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Measured memory bandwidth (bytes read + written per second) of a large tensor copy: the ceiling."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def batching_speedup(llm, prompts, params, clock=time.perf_counter) -> tuple:
    """(one at a time, all at once): tokens/s of the same requests run sequentially and then together, timed
    by `clock` (time.process_time: the CPU time, which other jobs on the machine do not inflate)."""
    t = clock()
    for p in prompts:
        llm.generate(p, params)
    sequential = len(prompts) * params.max_tokens / (clock() - t)
    t = clock()
    llm.generate(prompts, params)
    return sequential, len(prompts) * params.max_tokens / (clock() - t)


def cmd_bench_decode(args) -> int:
    for flag in ("prompt_tokens", "gen_tokens", "concurrency", "reps"):
        as_count(getattr(args, flag), f"--{flag.replace('_', '-')}", 1,
                 MAX_CONCURRENCY if flag == "concurrency" else INT64_MAX)
    # Without prefix caching: the repetitions rerun one prompt, which the cache would turn into a lookup.
    return _with_engine(_bench_decode, args, max_num_seqs=args.concurrency, enable_prefix_caching=False)


def _bench_decode(llm, args) -> int:
    if args.prompt_tokens >= llm.max_model_len:  # checked before the prompts are made
        raise ValueError(f"--prompt-tokens: {args.prompt_tokens} tokens leave no room to generate within the "
                         f"context of {llm.max_model_len} (--max-model-len)")
    vocab = llm.model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.concurrency)]
    params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
    llm.generate(prompts[0][:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up

    prefill, decode = [], []
    for _ in range(args.reps):
        out = llm.generate(prompts[0], params)[0]
        m = out.metrics
        prefill.append(args.prompt_tokens / m.time_to_first_token)
        decode.append(1.0 / m.time_per_output_token)
    nbytes = model_bytes(llm.model)
    bw = copy_bandwidth()
    sequential, concurrent = batching_speedup(llm, prompts, params)
    dec = statistics.median(decode)
    print(f"model: {args.model}, {nbytes / 2**20:.1f} MiB of weights, {torch.get_num_threads()} threads")
    print(f"prefill ({args.prompt_tokens} tokens): {statistics.median(prefill):8.1f} tokens/s")
    print(f"decode (batch 1, {args.gen_tokens} tokens): {dec:8.1f} tokens/s, {nbytes * dec / 1e9:.2f} GB/s of weights "
          f"read, {100 * nbytes * dec / bw:.0f}% of the measured copy bandwidth ({bw / 1e9:.1f} GB/s)")
    print(f"{len(prompts)} concurrent requests: {concurrent:8.1f} tokens/s vs {sequential:.1f} one at a time "
          f"({concurrent / sequential:.2f}x)")
    host = llm.stats_summary()
    print(f"host overhead: {host['host_ms_per_step']:.2f} ms per step, {100 * host['host_share']:.1f}% of step time")
    return 0


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a model (GGUF file or HF directory)")
    add_engine_arguments(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: start from BOS)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model on the terminal, through its chat template")
    add_engine_arguments(chat)
    chat.add_argument("--system", default=None, help="a system message")
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench-decode", help="prefill/decode tokens/s, bandwidth, batching speed-up")
    add_engine_arguments(bench)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--gen-tokens", type=int, default=64)
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--reps", type=int, default=3)
    bench.set_defaults(func=cmd_bench_decode)
