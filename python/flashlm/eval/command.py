"""`flashlm eval MODEL ...`: the arguments and the runs (flashlm.cli wires and prints them).

    flashlm eval model.gguf --perplexity wiki.test.raw --ctx-size 512              # llama.cpp's method
    flashlm eval hf_dir --perplexity wiki.test.raw --method stride --ctx-size 1023 --stride 512
    flashlm eval model.gguf --tasks mmlu:data/,gsm8k:test.jsonl --shots 5 --limit 50 --output RESULTS.json
    flashlm eval runs/gpt --data val.txt                                           # a checkpoint, the trainer's recipe

--tasks prints a table; with --output it writes RESULTS.json (every item's scores) and RESULTS.png (a bar per
subject).
"""

import os
import sys

from flashlm.eval.perplexity import DEFAULT_CTX_SIZE, METHODS
from flashlm.runtime.checks import as_count


def add_arguments(p) -> None:
    p.add_argument("model", help="a GGUF file, an HF model directory, or a training checkpoint or run folder")
    p.add_argument("--perplexity", metavar="FILE", help="a UTF-8 text file: its perplexity under the model")
    p.add_argument("--ctx-size", type=int, default=None,
                   help=f"tokens per window (default {DEFAULT_CTX_SIZE}, or less where the model's context is)")
    p.add_argument("--method", choices=METHODS, default="llama.cpp",
                   help="llama.cpp: llama-perplexity's disjoint windows, their second half scored (default); "
                        "stride: HF's sliding windows")
    p.add_argument("--stride", type=int, default=None, help="the stride method's step (default ctx-size / 2)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="windows run in one batch (default 16)")
    p.add_argument("--data", metavar="FILE", help="a training checkpoint's loss and perplexity on a text file, its "
                                                   "documents cut and tokenized as in training")
    p.add_argument("--batch-size", type=int, default=8, help="with --data: windows per forward (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_task_arguments(p)


def read_text(path: str, flag: str) -> str:
    """A text file as llama-perplexity reads it (no newline translation); not UTF-8: an error naming the flag."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {path!r} is not UTF-8 text (byte {e.start})") from None


def perplexity_of_file(args):
    """(PerplexityResult, ctx_size, stride or None) of args.model on the text file args.perplexity."""
    from flashlm.eval.perplexity import perplexity
    from flashlm.runtime.checks import as_count, as_optional_count
    from flashlm.runtime.engine import LLM

    ctx = as_optional_count(args.ctx_size, "--ctx-size", 2)
    if args.stride is not None and args.method != "stride":
        raise ValueError("--stride: only --method stride takes it")
    stride = as_optional_count(args.stride, "--stride", 1)
    max_num_seqs = as_count(args.max_num_seqs, "--max-num-seqs")
    text = read_text(args.perplexity, "--perplexity")
    llm = LLM(args.model, max_model_len=(ctx or DEFAULT_CTX_SIZE) + 1, device=args.device, max_num_seqs=max_num_seqs)
    if ctx is None:
        ctx = min(DEFAULT_CTX_SIZE, llm.max_model_len - 1)
    if ctx >= llm.max_model_len:
        raise ValueError(f"--ctx-size: the model's context is {llm.model.cfg.seq_len} tokens, so a window holds at "
                         f"most {llm.max_model_len - 1}, got {ctx}")
    if args.method == "stride":
        stride = ctx // 2 if stride is None else stride
        if stride > ctx:
            raise ValueError(f"--stride: must be at most --ctx-size {ctx}, got {stride}")
    r = perplexity(llm, text, ctx_size=ctx, method=args.method, stride=stride, progress=not args.quiet)
    return r, ctx, stride


def add_task_arguments(p) -> None:
    p.add_argument("--tasks", default=None, metavar="TASK:PATH,...",
                   help="benchmarks from local files: mmlu:DIR, ceval:DIR, gpqa:FILE.csv, hellaswag:FILE.jsonl, "
                        "jsonl:FILE.jsonl (question, choices, answer), gsm8k:FILE.jsonl")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question (default 0)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each subject")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--output", default=None, metavar="RESULTS.json",
                   help="write every item's scores here, and a bar chart beside it (.png)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per answer (default 256)")


def cmd_eval_tasks(args) -> int:
    from flashlm.eval.report import format_table, plot_subjects, write_results
    from flashlm.eval.run import read_tasks, run_tasks
    from flashlm.eval.tasks import parse_task_specs
    from flashlm.runtime.engine import LLM

    # Every argument and file is checked before the model loads.
    specs = parse_task_specs(args.tasks)
    shots = as_count(args.shots, "--shots", 0)
    limit = None if args.limit is None else as_count(args.limit, "--limit")
    max_tokens = as_count(args.max_tokens, "--max-tokens")
    for _, path in specs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--tasks: {path!r} does not exist")
    data = read_tasks(specs)
    llm = LLM(args.model, max_model_len=args.max_model_len, device=args.device)
    results = run_tasks(llm, data, shots, limit, args.chat, max_tokens, progress=sys.stderr.isatty())
    print(format_table(results))
    if args.output:
        config = {"model": args.model, "tasks": args.tasks, "shots": shots, "limit": limit, "chat": args.chat,
                  "max_model_len": llm.max_model_len}
        write_results(args.output, results, config)
        png = os.path.splitext(args.output)[0] + ".png"
        plot_subjects(png, results)
        print(f"wrote {args.output} and {png}")
    return 0
