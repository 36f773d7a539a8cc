"""The `flashlm` command line: `flashlm info`, `flashlm gguf inspect FILE`, `flashlm quantize IN OUT --type T`,
`flashlm export RUN --gguf OUT.gguf --hf DIR --peft DIR --lora-gguf A.gguf`, `flashlm convert HF_DIR OUT`,
`flashlm generate|chat|bench-decode --model PATH`, `flashlm demo`, `flashlm train`, `flashlm finetune`, `flashlm distill`,
`flashlm prune MODEL --heads-keep F --ffn-keep F --drop-layers I,J --score S --out OUT`,
`flashlm eval MODEL --perplexity FILE`, `flashlm eval MODEL --tasks mmlu:DIR,... --shots K`,
`flashlm eval CKPT --data FILE`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from flashlm import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = " ".join(value) or "-"
        print(f"{key:<{width}}  {value}")
    return 0


def _printable(text: str) -> str:
    """Text from a file, safe to print: control characters (newlines, terminal escapes) are escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _short(value, max_items: int) -> str:
    if isinstance(value, list):
        head = [_short(v, max_items) for v in value[:max_items]]
        more = [f"... ({len(value)} items)"] if len(value) > max_items else []
        return f"[{', '.join(head + more)}]"
    if isinstance(value, str):
        text = value if len(value) <= 80 else value[:77] + "..."
        return _printable(json.dumps(text, ensure_ascii=False))
    return repr(value)


def _json_safe(value):
    """Strict JSON has no NaN or infinities: write them as the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _cmd_gguf_inspect(args: argparse.Namespace) -> int:
    from flashlm.gguf import GGUFFile

    if args.max_items < 0:  # a negative slice would show all but the last items, not none
        raise ValueError(f"--max-items: must be >= 0, got {args.max_items}")
    with GGUFFile(args.file) as f:
        if args.json:
            out = {
                "version": f.version,
                "alignment": f.alignment,
                "data_offset": f.data_offset,
                "metadata": {k: {"type": f.metadata_types[k], "value": _json_safe(v)} for k, v in f.metadata.items()},
                "tensors": [
                    {"name": t.name, "type": t.ggml_type, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                    for t in f.tensors
                ],
            }
            print(json.dumps(out, indent=2, ensure_ascii=False, allow_nan=False))
            return 0
        metadata, types = f.metadata, f.metadata_types
        print(f"{_printable(args.file)}: GGUF v{f.version}, {len(metadata)} metadata keys, {len(f.tensors)} tensors, "
              f"alignment {f.alignment}, data at byte {f.data_offset}")
        print("\nmetadata:")
        key_width = max((len(_printable(k)) for k in metadata), default=0)
        for key, value in metadata.items():
            print(f"  {_printable(key):<{key_width}}  {types[key]:<14} {_short(value, args.max_items)}")
        print("\ntensors:")
        name_width = max([4] + [len(_printable(t.name)) for t in f.tensors])  # at least as wide as "name"
        print(f"  {'name':<{name_width}}  {'type':<8} {'shape (torch order)':<24} {'offset':>12} {'bytes':>12}")
        for t in f.tensors:
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            print(f"  {_printable(t.name):<{name_width}}  {t.ggml_type:<8} {shape:<24} {t.offset:>12} {t.nbytes:>12}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from flashlm.demo import run_demo

    return run_demo(device=args.device, rows=args.rows, cols=args.cols)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from collections import Counter

    if getattr(args, "method", None) is not None:
        if getattr(args, "imatrix", None) is not None:
            raise ValueError("quantize: --imatrix goes with --type (a GGUF mix), not with --method")
        if getattr(args, "keep_float", None) is not None or getattr(args, "sensitivity", False):
            raise ValueError("quantize: --keep-float and --sensitivity go with --type (a GGUF mix), not with --method")
        return _cmd_quantize_calibrated(args)
    if args.type is None:
        raise ValueError("quantize: give --type TYPE (a GGUF mix) or --method gptq|awq|w8a8|smoothquant "
                         "--calib-data FILE (int4 or W8A8)")

    from flashlm.io.quantize_file import quantize_file

    keep_float = getattr(args, "keep_float", None) or ""
    if getattr(args, "sensitivity", False):
        keep_float = ",".join(filter(None, [keep_float, *_sensitivity_plan(args)]))
    elif getattr(args, "keep_top", 0):
        raise ValueError("--keep-top: goes with --sensitivity")
    report = quantize_file(args.input, args.output, args.type, progress=not args.quiet,
                           imatrix=getattr(args, "imatrix", None), keep_float=keep_float)
    if not args.quiet:
        counts = Counter(out for _, _, out in report)
        size = os.path.getsize(args.output)
        print(f"{_printable(args.output)}: {len(report)} tensors ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}), "
              f"{size / 2**20:.1f} MiB")
    return 0


def _sensitivity_plan(args: argparse.Namespace) -> list[str]:
    """Runs the sensitivity scan of --sensitivity, prints its table, and returns the --keep-top units."""
    from flashlm.io.quantize_sensitivity import format_table, scan_file

    if args.calib_data is None:
        raise ValueError("--calib-data: --sensitivity needs calibration text")
    if args.keep_top < 0:
        raise ValueError(f"--keep-top: must be >= 0, got {args.keep_top}")
    base, rows = scan_file(args.input, args.type, args.calib_data, args.sensitivity_unit, args.calib_rows,
                           args.calib_seq, progress=not args.quiet)
    keep = [r.unit for r in rows[:args.keep_top]]
    print(format_table(base, rows))
    print(f"kept float: {','.join(keep) if keep else 'none'} (--keep-top {args.keep_top})")
    return keep


def _cmd_quantize_calibrated(args: argparse.Namespace) -> int:
    from flashlm.io.quantize_calibrated import quantize_calibrated

    if args.type is not None:
        raise ValueError("--type: not with --method (which writes Int4Linear or Int8Linear layers, not a GGUF mix)")
    if args.method == "qat":
        from flashlm.train.export import export_qat_run

        r = export_qat_run(args.input, args.output)
        if not args.quiet:
            sym = "sym" if r["symmetric"] else "asym"
            kind = r["qat"] if r["group_size"] is None else f"int4 g{r['group_size']} {sym}"
            print(f"{_printable(args.output)}: {kind} as trained with --qat {r['qat']}, "
                  f"{os.path.getsize(args.output) / 2**20:.1f} MiB")
        return 0
    if args.calib_data is None:
        raise ValueError("--calib-data: --method needs calibration text")
    r = quantize_calibrated(args.input, args.output, args.method, args.calib_data, args.group_size,
                            symmetric=not args.asym, act_order=args.act_order, rows=args.calib_rows,
                            seq=args.calib_seq, progress=not args.quiet, act_calib=args.act_calib, alpha=args.alpha,
                            calib_dtype=args.calib_dtype)
    if not args.quiet:
        if "group_size" in r:
            what = f"int4 g{r['group_size']} {'sym' if r['symmetric'] else 'asym'}"
        else:
            what = f"w8a8 ({r['act_calib'] or 'per-token'} activation scales)"
        print(f"{_printable(args.output)}: {what} by {args.method} on {r['rows']} rows of {r['seq']} tokens in "
              f"{r['seconds']:.1f} s, {os.path.getsize(args.output) / 2**20:.1f} MiB")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from flashlm.train.config import TrainConfig, overrides_from_args
    from flashlm.train.trainer import resume_config, run_training

    overrides = overrides_from_args(args)
    if args.resume:
        out_dir = overrides.get("out_dir") or TrainConfig.from_sources(args.preset, args.config).out_dir
        cfg = resume_config(out_dir, args.preset, args.config, overrides)
    else:
        cfg = TrainConfig.from_sources(args.preset, args.config, overrides)
    run_training(cfg, resume=args.resume)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from flashlm.train.finetune import FinetuneConfig, resume_finetune_config, run_finetune

    overrides = {f: getattr(args, f) for f in FINETUNE_FLAGS}
    if args.resume:
        cfg = resume_finetune_config(args.out_dir or FinetuneConfig.out_dir, overrides)
    else:
        cfg = FinetuneConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    run_finetune(cfg, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.tasks, args.perplexity, args.data)) != 1:
        raise ValueError("eval: give one of --tasks TASK:PATH,... or --perplexity FILE (any model), or --data FILE "
                         "(a training checkpoint)")
    if args.tasks is not None:
        from flashlm.eval.command import cmd_eval_tasks

        return cmd_eval_tasks(args)
    if args.perplexity is not None:
        from flashlm.eval.command import perplexity_of_file

        r, ctx, stride = perplexity_of_file(args)
        print(f"{_printable(args.perplexity)}: PPL = {r.ppl:.4f} +/- {r.stderr:.5f} (nll {r.nll:.6f}, {r.tokens} "
              f"tokens scored, {args.method} method, ctx {ctx}{'' if stride is None else f', stride {stride}'})")
        return 0
    from flashlm.train.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(args.model, args.data, batch_size=args.batch_size, device=args.device)
    print(f"{_printable(args.data)}: {r['tokens']} tokens, loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} "
          f"(checkpoint step {r['step']})")
    return 0


def _cmd_imatrix(args: argparse.Namespace) -> int:
    from flashlm.io import load_model
    from flashlm.quant.imatrix import collect_imatrix, write_imatrix

    if not os.path.isfile(args.calib_data):
        raise ValueError(f"--calib-data: {args.calib_data!r} is not a file")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):  # found out now rather than after the whole run
        raise ValueError(f"--output: the folder {folder!r} does not exist")
    with open(args.calib_data, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"--calib-data: {args.calib_data!r} holds no text")
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model: {args.model!r} has no tokenizer to read the calibration text with")
    bos = tok.bos_token_id
    # as llama.cpp: the text starts with BOS where the model adds one, and so does every chunk
    add_bos = bos is not None and tok.encode("a")[:1] == [bos] and tok.encode("a", add_special_tokens=False)[:1] != [bos]
    ids = tok.encode(text, add_special_tokens=add_bos)
    report = None if args.quiet else (lambda i, n: print(f"\rimatrix: chunk {i}/{n}", end="", file=sys.stderr))
    m = collect_imatrix(loaded.model, ids, chunk_size=args.chunk_size, bos_token_id=bos if add_bos else None,
                        dataset=args.calib_data, fused_qkv=loaded.config.arch in ("gpt2", "phi3"),
                        fused_gate_up=loaded.config.arch == "phi3", progress=report)
    if not args.quiet:
        print(file=sys.stderr)  # ends the progress line
    write_imatrix(m, args.output, args.output_format)
    if not args.quiet:
        print(f"{_printable(args.output)}: {len(m.entries)} entries, {m.chunk_count} chunks of {m.chunk_size} tokens")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.input):
        raise ValueError(f"input: {args.input!r} is not an HF model directory (to requantize a GGUF file, use "
                         "`flashlm quantize`)")
    return _cmd_quantize(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from flashlm.train.export_run import export_run

    written = export_run(args.checkpoint, gguf_path=args.gguf, hf_dir=args.hf, type=args.type, peft_dir=args.peft,
                         lora_gguf=args.lora_gguf, progress=not args.quiet)
    if args.quiet:
        return 0
    for key, what in (("peft", "PEFT adapter directory"), ("lora_gguf", "llama.cpp GGUF LoRA adapter"),
                      ("hf", "HF model directory")):
        if key in written:
            print(f"{_printable(str(getattr(args, key)))}: {what}")
    if "gguf" in written:
        types = sorted({t for _, _, t in written["gguf"]})
        print(f"{_printable(args.gguf)}: {len(written['gguf'])} tensors ({', '.join(types)}), "
              f"{os.path.getsize(args.gguf) / 2**20:.1f} MiB")
    return 0


def add_calibrated_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("gptq", "awq", "w8a8", "smoothquant", "qat"), help="quantize with "
                   "calibration instead of to a GGUF mix: int4 by GPTQ or AWQ, or W8A8 (int8 weights and activations), "
                   "smoothquant smoothing first; or qat (a run trained with --qat: its layers as trained); writes a "
                   "flashlm checkpoint that --model and load_model read")
    p.add_argument("--calib-data", metavar="FILE", help="with --method: UTF-8 calibration text")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), help="with --method gptq|awq: int4 group "
                   "(default 128)")
    p.add_argument("--asym", action="store_true", help="with --method gptq|awq: zero points (min-max groups) "
                   "instead of symmetric groups")
    p.add_argument("--act-order", action="store_true", help="with --method gptq: round columns by decreasing "
                   "activation energy")
    p.add_argument("--calib-dtype", choices=("bf16", "f32"), help="with --method gptq: the blocks' calibration "
                   "forward in bfloat16 or float32 (default: bf16 where the CPU has bf16 matmul instructions (AMX, "
                   "AVX512-BF16) or on CUDA, else f32; the Hessians are summed in float32)")
    p.add_argument("--act-calib", choices=("minmax", "percentile", "kl"), help="with --method w8a8|smoothquant: "
                   "one static activation scale per layer from this range (percentile: the 99.99th of |x|; kl: "
                   "TensorRT's entropy calibration); default: per-token scales at run time")
    p.add_argument("--alpha", type=float, help="with --method smoothquant: the migration strength in [0, 1] "
                   "(default 0.5)")
    p.add_argument("--calib-rows", type=int, default=128, help="with --method: rows of calibration text (default 128)")
    p.add_argument("--calib-seq", type=int, default=512, help="with --method: tokens per row, at most the model's "
                   "context (default 512)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashlm", description="flashlm: LLM kernels, runtime and trainer")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="how flashlm was built and what it found on this machine")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    gguf = sub.add_parser("gguf", help="GGUF files")
    gguf_sub = gguf.add_subparsers(dest="gguf_command", required=True)
    inspect = gguf_sub.add_parser("inspect", help="print a GGUF file's header, metadata and tensor table")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON (every value in full)")
    inspect.add_argument("--max-items", type=int, default=8, help="array items to show (default 8)")
    inspect.set_defaults(func=_cmd_gguf_inspect)

    from flashlm.quant.mix import MIXES, UNSUPPORTED_MIXES

    def gguf_writer(name, help, input_help, default_type, func, refused=()):
        p = sub.add_parser(name, help=help)
        p.add_argument("input", help=input_help)
        p.add_argument("output", help="the GGUF file to write")
        # refused: llama.cpp's mixes flashlm does not write, let through to a message that says why
        p.add_argument("--type", default=default_type, type=str.upper,
                       choices=list(MIXES) + list(refused), metavar="TYPE",
                       help=f"the mix{f' (default {default_type})' if default_type else ''}: {', '.join(MIXES)}")
        p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        p.set_defaults(func=func)
        return p

    quantize = gguf_writer("quantize", "quantize a GGUF file or an HF safetensors model directory to a GGUF file, "
                           "with llama.cpp's type mixes; or a float model to int4 or W8A8 with calibration "
                           "(--method)",
                           "a GGUF file, or an HF model directory (llama, mistral, qwen2, qwen3, gpt2); with --method: "
                           "an HF model directory or a flashlm checkpoint", None, _cmd_quantize, UNSUPPORTED_MIXES)
    quantize.add_argument("--imatrix", metavar="FILE", help="an importance matrix (llama.cpp's imatrix file, GGUF or "
                          ".dat; `flashlm imatrix` writes one) to quantize with")
    quantize.add_argument("--keep-float", metavar="NAMES", help="tensors left F16/F32: tensor categories "
                          "(attn_v,ffn_down; any of token_embd, output, attn_q/k/v, attn_output, ffn_gate/up/down), "
                          "layers (blk.3) or one layer's category (blk.3.ffn_down), comma-separated")
    quantize.add_argument("--sensitivity", action="store_true", help="first rank the units of the model (a float "
                          "GGUF or HF model) by the perplexity increase on --calib-data when each alone is quantized "
                          "to the mix's type, and print the ranking")
    quantize.add_argument("--sensitivity-unit", choices=("layer", "category", "tensor"), default="layer",
                          help="with --sensitivity: what is quantized at a time (default layer: blk.N)")
    quantize.add_argument("--keep-top", type=int, default=0, metavar="N", help="with --sensitivity: keep the N most "
                          "sensitive units float (added to --keep-float)")
    add_calibrated_quantize_arguments(quantize)
    imatrix = sub.add_parser("imatrix", help="collect an importance matrix (llama.cpp's imatrix) for `quantize "
                             "--imatrix` or llama-quantize, from a model run over calibration text")
    imatrix.add_argument("model", help="a GGUF file, HF model directory or flashlm checkpoint")
    imatrix.add_argument("--calib-data", required=True, metavar="FILE", help="the calibration text (UTF-8)")
    imatrix.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="the imatrix file: GGUF (llama.cpp's default), or the legacy format for a .dat name")
    imatrix.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                         help="the format whatever the name (default: by the name, as above)")
    imatrix.add_argument("--chunk-size", type=int, default=512, metavar="N",
                         help="tokens per chunk (llama.cpp's -c, default 512); at least 2 chunks of text are needed")
    imatrix.add_argument("--quiet", action="store_true", help="no progress or summary")
    imatrix.set_defaults(func=_cmd_imatrix)
    gguf_writer("convert", "convert an HF safetensors model directory to a GGUF file that llama.cpp loads "
                "(tokenizer included)", "an HF model directory (llama, mistral, qwen2, qwen3, gpt2)", "F16", _cmd_convert)

    export = sub.add_parser("export", help="export a training checkpoint to a GGUF file (llama.cpp) and/or an HF "
                                           "model directory (transformers); a fine-tuning run's adapter too")
    export.add_argument("checkpoint", help="a flashlm training checkpoint (.pt), or a run folder (its latest checkpoint)")
    export.add_argument("--gguf", metavar="OUT.gguf", help="the GGUF file to write (a fine-tuning run's: merged)")
    export.add_argument("--type", default=None, type=str.upper, choices=list(MIXES), metavar="TYPE",
                        help=f"GGUF tensor types, a mix as for quantize (default F32; a fine-tuning run's merged "
                             f"model: its GGUF base's mix): {', '.join(MIXES)}")
    export.add_argument("--hf", metavar="DIR", help="the HF model directory to write (a fine-tuning run's: merged)")
    export.add_argument("--peft", metavar="DIR", help="a fine-tuning run's adapter as an HF PEFT directory")
    export.add_argument("--lora-gguf", metavar="ADAPTER.gguf", help="a LoRA run's adapter as a llama.cpp GGUF "
                        "adapter (llama-cli --lora)")
    export.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    export.set_defaults(func=_cmd_export)

    from flashlm.runtime.commands import add_commands as add_runtime_commands

    add_runtime_commands(sub)

    from flashlm.serve.command import add_commands as add_serve_commands

    add_serve_commands(sub)

    demo = sub.add_parser("demo", help="write a GGUF file of every supported block type, read it back, check "
                                       "and time the dequantization against gguf-py")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--rows", type=int, default=1024, help="rows per tensor (default 1024)")
    demo.add_argument("--cols", type=int, default=4096, help="columns per tensor, a multiple of 256 (default 4096)")
    demo.set_defaults(func=_cmd_demo)

    from flashlm.train.config import PRESETS, add_arguments

    train = sub.add_parser("train", help="train a GPT from text (default: the Python standard library's sources)",
                           description="Every field of flashlm.train.config.TrainConfig is a flag; precedence: "
                                       "flags, then --config, then --preset.")
    train.add_argument("--preset", choices=sorted(PRESETS), default="small", help="starting values (default small)")
    train.add_argument("--config", metavar="FILE.toml", help="a TOML file of TrainConfig fields")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --out-dir with its saved configuration")
    add_arguments(train)
    train.set_defaults(func=_cmd_train)

    add_finetune_parser(sub)
    add_prune_parser(sub)

    from flashlm.train.distill_command import add_distill_parser

    add_distill_parser(sub)

    from flashlm.eval.command import add_arguments as add_eval_arguments

    evaluate = sub.add_parser("eval", help="evaluate a model: benchmark tasks (MMLU, C-Eval, GPQA, HellaSwag, "
                                           "JSONL, GSM8K), perplexity on a text file (llama.cpp's or HF's method), "
                                           "or a training checkpoint's loss by its own recipe (--data)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)
    return parser


FINETUNE_FLAGS = ("model", "data", "val_data", "method", "lora_r", "lora_alpha", "lora_dropout", "target", "qat",
                  "qat_group_size", "qat_lsq",
                  "num_virtual_tokens", "seq_len", "max_steps", "batch_size", "grad_accum", "lr", "warmup",
                  "eval_interval", "ckpt_interval", "seed", "device", "out_dir", "progress")


def add_finetune_parser(sub) -> None:
    from flashlm.train.finetune import DEFAULT_BASE, DEFAULT_LR, METHODS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a model on chat or prompt/completion JSONL (LoRA, QLoRA, "
                                        "prompt or prefix tuning, full)",
                       description="With no --model and --data: the model `flashlm train` wrote to "
                                   f"{DEFAULT_BASE}, on a chat set made from its corpus.")
    p.add_argument("--model", help=f"GGUF file, HF model directory or training run folder (default {DEFAULT_BASE})")
    p.add_argument("--data", metavar="TRAIN.jsonl", help='records {"messages": [...]} or {"prompt", "completion"} '
                                                         "(default: a chat set made from the base's corpus)")
    p.add_argument("--val-data", metavar="VAL.jsonl", help="held-out records (default: 5%% of --data)")
    p.add_argument("--method", choices=METHODS, help=f"(default {d.method})")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, help=f"(default {d.lora_dropout:g})")
    p.add_argument("--target", help=f"modules LoRA wraps, e.g. q,k,v,o,gate,up,down (default {d.target})")
    p.add_argument("--num-virtual-tokens", type=int, help=f"prompt/prefix tuning (default {d.num_virtual_tokens})")
    p.add_argument("--qat", help="with --method full: quantization-aware fine-tuning for int8, int4, int4-asym "
                                 "or a GGML block type Q8_0, Q4_0, Q4_K (default off)")
    p.add_argument("--qat-group-size", type=int, help="with --qat int4: the group (default: the largest "
                                                      "of 128/64/32 dividing every layer)")
    p.add_argument("--qat-lsq", action=argparse.BooleanOptionalAction, default=None,
                   help="with --qat int8 or int4: train the weights' steps too (LSQ; default off)")
    p.add_argument("--seq-len", type=int, help="tokens per record, at most the model's context (default: it)")
    p.add_argument("--max-steps", type=int, help=f"(default {d.max_steps})")
    p.add_argument("--batch-size", type=int, help=f"records per micro-batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"(default {d.grad_accum})")
    p.add_argument("--lr", type=float, help="peak learning rate (default by method: "
                                            + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--warmup", type=int, help=f"(default {d.warmup})")
    p.add_argument("--eval-interval", type=int, help=f"(default {d.eval_interval})")
    p.add_argument("--ckpt-interval", type=int, help=f"(default {d.ckpt_interval})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--device", help=f"(default {d.device})")
    p.add_argument("--out-dir", help=f"the run folder (default {d.out_dir})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="(default on)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out-dir with its saved configuration")
    p.set_defaults(func=_cmd_finetune)


# What bad input (arguments, files) raises: GGUFError and JSON errors are ValueErrors, a missing or unreadable
# file an OSError, torch's loading a RuntimeError, an allocation past what the machine has a MemoryError. Each
# ends the command with one line on stderr and exit status 2 (as argparse's usage errors); anything else is a
# bug in flashlm and keeps its traceback.
INPUT_ERRORS = (ValueError, TypeError, KeyError, OSError, NotImplementedError, RuntimeError, MemoryError)
EXIT_BAD_INPUT = 2


def _cmd_prune(args: argparse.Namespace) -> int:
    from flashlm.train.prune import describe, parse_layers, prune_file

    summary = prune_file(args.model, args.out, heads_keep=args.heads_keep, ffn_keep=args.ffn_keep,
                         drop_layers=parse_layers(args.drop_layers), score=args.score, p=args.norm,
                         calib_data=args.calib_data, calib_samples=args.calib_samples,
                         calib_seq_len=args.calib_seq_len, fmt=args.format, type=args.type)
    print(describe(summary))
    what = {"run": "run folder", "hf": "HF model directory", "gguf": "GGUF file"}[summary["format"]]
    print(f"{_printable(args.out)}: {what}")
    return 0


def add_prune_parser(sub) -> None:
    from flashlm.quant.mix import MIXES

    p = sub.add_parser("prune", help="structured pruning: remove attention heads (whole K/V groups), MLP channels "
                       "and layers, writing a smaller dense model",
                       description="A GGUF model is dequantized to float32 first. OUT: a GGUF file when it ends in "
                                   ".gguf, else a run folder (or --format hf for an HF directory).")
    p.add_argument("model", help="a GGUF file, an HF model directory or a run folder / checkpoint")
    p.add_argument("--out", required=True, help="where the pruned model goes")
    p.add_argument("--format", choices=("run", "hf", "gguf"), default=None, help="OUT's form (default: by its name)")
    p.add_argument("--heads-keep", type=float, default=1.0, metavar="F",
                   help="fraction of K/V groups kept per layer (their query heads go with them; default 1)")
    p.add_argument("--ffn-keep", type=float, default=1.0, metavar="F", help="fraction of MLP channels kept (default 1)")
    p.add_argument("--drop-layers", default="", metavar="I,J", help="layer indices to remove")
    p.add_argument("--score", choices=("magnitude", "activation", "taylor"), default="magnitude",
                   help="how heads and channels are ranked (activation and taylor need --calib-data)")
    p.add_argument("--norm", type=int, choices=(1, 2), default=2, help="the magnitude score's norm (default 2)")
    p.add_argument("--calib-data", metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--type", default="F16", type=str.upper, choices=list(MIXES), metavar="TYPE",
                   help="the GGUF mix for a .gguf OUT (default F16)")
    p.set_defaults(func=_cmd_prune)


def error_message(e: BaseException) -> str:
    """One printable line for an error: KeyError's text without its quotes, the type where there is no text."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if isinstance(e, MemoryError):
        text = f"out of memory{f' ({text})' if text else ''}"
    return _printable(" ".join(text.split()) or type(e).__name__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except INPUT_ERRORS as e:
        if isinstance(e, BrokenPipeError):  # `flashlm gguf inspect x.gguf | head`: the reader left, fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if args.debug:
            raise
        print(f"flashlm: error: {error_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
