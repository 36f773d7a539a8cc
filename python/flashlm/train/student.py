"""The student of a distillation (train/distill.py): its config from the teacher's, its weights from the teacher's,
and the check that both share one vocabulary.

    cfg = student_config(dc, teacher.config.to_dict())     # the teacher's config with dc's sizes / TOML on top
    taken = init_from_teacher(Transformer(cfg), teacher)    # every k-th teacher layer, truncated widths
    check_same_vocabulary(teacher_tok, student_tok)         # ValueError naming both sizes or the first token
"""

from __future__ import annotations

import tomllib
from dataclasses import fields

import torch
from torch import nn

# DistillConfig's size flags and the ModelConfig fields they set
STUDENT_SIZES = {"student_layers": "n_layer", "student_dim": "d_model", "student_heads": "n_head",
                 "student_kv_heads": "n_kv_head", "student_ff": "d_ff"}


def _pieces(tok) -> list:
    """(token, score) by id: a t5 (Unigram) GGUF vocabulary's pieces and scores from its saved form, whose scores
    decide the segmentation; score None for a tokenizer.json's tokens (tokenizers.Tokenizer, or a flashlm one)."""
    from flashlm.io.gguf_vocab_json import vocab_from_json
    from flashlm.io.tokenizer import Tokenizer

    if isinstance(tok, Tokenizer):
        meta = vocab_from_json(tok.to_str())
        if meta is not None:
            tokens, scores = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.scores") or []
            return [(t, scores[i] if i < len(scores) else None) for i, t in enumerate(tokens)]
        tok = tok.backend
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    return [(by_id.get(i), None) for i in range(max(by_id, default=-1) + 1)]


def check_same_vocabulary(teacher_tok, student_tok, where: str = "student") -> None:
    """ValueError naming both sizes, or the first token that differs, unless the tokenizers' vocabularies (each
    a tokenizers.Tokenizer, with added tokens, or a flashlm Tokenizer) are the same: the same token at every id,
    and for a t5 vocabulary the same score too."""
    a, b = _pieces(teacher_tok), _pieces(student_tok)
    if len(a) != len(b):
        raise ValueError(f"{where}: its vocabulary has {len(b)} tokens, the teacher's {len(a)}")
    if a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        if a[first][0] != b[first][0]:
            raise ValueError(f"{where}: token {first} is {b[first][0]!r}, the teacher's is {a[first][0]!r}")
        raise ValueError(f"{where}: token {first} ({a[first][0]!r}) has score {b[first][1]!r}, "
                         f"the teacher's {a[first][1]!r}")


def student_config(dc, teacher_cfg: dict):
    """The student's ModelConfig: the teacher's (a dict of ModelConfig fields) with the TOML's fields and the
    --student-* sizes on top; vocab_size and seq_len stay the teacher's."""
    from flashlm.models import ModelConfig
    from flashlm.models.config import FREE_HEAD_DIM

    values = dict(teacher_cfg)
    changes = {}
    if dc.student_config is not None:
        with open(dc.student_config, "rb") as f:
            try:
                changes.update(tomllib.load(f))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"student_config: {dc.student_config} is not valid TOML ({e})") from e
    changes.update({field: getattr(dc, flag) for flag, field in STUDENT_SIZES.items() if getattr(dc, flag) is not None})
    unknown = sorted(set(changes) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"student_config: unknown ModelConfig keys {unknown}")
    for key in ("vocab_size",):
        if key in changes and changes[key] != values[key]:
            raise ValueError(f"student_config: {key} {changes[key]} differs from the teacher's {values[key]} (the "
                             f"student shares the teacher's vocabulary)")
    if "n_head" in changes and "n_kv_head" not in changes:
        values["n_kv_head"] = None  # no GQA unless asked for
    if ("d_model" in changes or "n_head" in changes) and "head_dim" not in changes:
        values["head_dim"] = None  # d_model / n_head
    if "d_model" in changes and "d_ff" not in changes:
        values["d_ff"] = None  # the architecture's default for the width
    values.update(changes)
    if values.get("head_dim") is not None and values["arch"] not in FREE_HEAD_DIM:
        values["head_dim"] = None
    cfg = ModelConfig(**values)
    if cfg.final_softcap is not None:
        raise NotImplementedError("student_config: a soft-capped lm head (final_softcap) is not supported by the "
                                  "fused distillation loss; set final_softcap to none")
    return cfg


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list:
    """Copies the teacher's weights into the student: student block i from teacher block i * k (k = teacher
    layers // student layers), every other tensor by name; each truncated to the student's shape. Returns the
    teacher layers taken. A student wider than the teacher anywhere is an error."""
    from flashlm.train.finetune import merged_state_dict

    ls, lt = student.cfg.n_layer, teacher.cfg.n_layer
    if ls > lt:
        raise ValueError(f"init_from_teacher: the student has {ls} layers, more than the teacher's {lt}")
    k = lt // ls
    taken = [i * k for i in range(ls)]
    source = merged_state_dict(teacher)  # float32, a GGUF teacher's blocks dequantized (once, for the init)
    own = student.state_dict()
    with torch.no_grad():
        for name, t in own.items():
            src_name = name
            if name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                src_name = f"blocks.{taken[int(i)]}.{rest}"
            if src_name not in source:
                raise ValueError(f"init_from_teacher: the teacher has no {src_name} for the student's {name}")
            src = source[src_name]
            if src.dim() != t.dim() or any(a > b for a, b in zip(t.shape, src.shape)):
                raise ValueError(f"init_from_teacher: the student's {name} {tuple(t.shape)} is wider than the "
                                 f"teacher's {src_name} {tuple(src.shape)}")
            t.copy_(src[tuple(slice(0, n) for n in t.shape)])
    return taken
