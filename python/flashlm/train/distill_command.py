"""`flashlm distill`'s arguments and run (train/distill.py does the work)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from flashlm.train.distill import KL_DIRECTIONS, DistillConfig

# flag help beyond the default; every DistillConfig field is a flag
HELP = {
    "teacher": "GGUF file, HF model directory or training run folder (a GGUF teacher runs quantized)",
    "data": "text files or folders (default: the Python standard library's sources)",
    "teacher_logits": "train from a file written by --save-teacher-logits instead of running the teacher",
    "student": "an existing float model to distill into (GGUF, HF directory or run folder)",
    "student_config": "a TOML of ModelConfig fields over the teacher's (n_layer = 4, d_model = 256, ...)",
    "student_layers": "student blocks (default: the teacher's)",
    "student_dim": "student d_model (default: the teacher's)",
    "student_heads": "student attention heads (default: the teacher's)",
    "student_kv_heads": "student K/V heads (default: its heads)",
    "student_ff": "student MLP width (default: the architecture's for its d_model)",
    "init_from_teacher": "copy every k-th teacher layer into the student, weights truncated to its widths",
    "temperature": "softens both distributions; the soft loss is scaled by T^2",
    "alpha": "loss = alpha * soft + (1 - alpha) * cross-entropy on the labels",
    "kl": "forward: KL(teacher || student); reverse: KL(student || teacher)",
    "top_k": "keep the teacher's top k logits, renormalised (0: all)",
    "hidden_layers": "student:teacher hidden states to match (FitNets MSE), e.g. 2:4,4:8",
    "hidden_weight": "weight of the hidden-state loss",
}


def add_distill_parser(sub) -> None:
    d = DistillConfig.__dataclass_fields__
    p = sub.add_parser("distill", help="distill a smaller student from a teacher model (GGUF, HF or run folder)",
                       description="Every DistillConfig field is a flag. Offline: --save-teacher-logits OUT with "
                                   "--teacher and --top-k writes the teacher's top k for --data once; "
                                   "--teacher-logits OUT then trains without the teacher.")
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        default = d[f.name].default
        text = f"{HELP.get(f.name, '')} (default {default!r})".strip()
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "data":
            p.add_argument(flag, nargs="+", default=None, metavar="PATH", help=text)
        else:
            kind = int if f.name.startswith("student_") and f.name != "student_config" or f.name == "max_bytes" \
                else type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=None, help=text,
                           choices=KL_DIRECTIONS if f.name == "kl" else None)
    p.add_argument("--save-teacher-logits", metavar="OUT", help="write the teacher's top-k logits of --data's "
                                                                "training tokens to OUT and stop")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out-dir with its saved configuration")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from flashlm.train.distill import resume_distill_config, run_distill, save_teacher_logits

    overrides = {f.name: getattr(args, f.name) for f in fields(DistillConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.save_teacher_logits is not None:
        if args.resume:
            raise ValueError("save_teacher_logits: cannot be combined with --resume")
        cfg = DistillConfig.from_dict(given)
        n = save_teacher_logits(cfg, args.save_teacher_logits, progress=cfg.progress)
        print(f"flashlm distill: the teacher's top {cfg.top_k} logits of {n} positions in {args.save_teacher_logits}")
        return 0
    if args.resume:
        cfg = resume_distill_config(args.out_dir or DistillConfig.out_dir, overrides)
    else:
        cfg = DistillConfig.from_dict(given)
    run_distill(cfg, resume=args.resume)
    return 0
