"""`flashlm eval MODEL --perplexity FILE`: the arguments and the run (flashlm.cli wires and prints them).

    flashlm eval model.gguf --perplexity wiki.test.raw --ctx-size 512              # llama.cpp's method
    flashlm eval hf_dir --perplexity wiki.test.raw --method stride --ctx-size 1023 --stride 512
    flashlm eval runs/gpt --data val.txt                                           # a checkpoint, the trainer's recipe
"""

from flashlm.eval.perplexity import DEFAULT_CTX_SIZE, METHODS


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
