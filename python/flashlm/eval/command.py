"""`flashlm eval MODEL --tasks ...`: benchmark tasks on any model flashlm loads (wired in flashlm.cli, beside the
training checkpoint's `--data` perplexity).

    flashlm eval model.gguf --tasks mmlu:data/,gsm8k:test.jsonl --shots 5 --limit 50 --output RESULTS.json

Prints a table; with --output, writes RESULTS.json (every item's scores) and RESULTS.png (a bar per subject).
"""

import os
import sys

from flashlm.runtime.checks import as_count


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
