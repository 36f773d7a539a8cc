"""`flashlm distill`: knowledge distillation of a smaller student from any model flashlm loads, on the trainer's
loop (progress bar, metrics, loss curve, checkpoints, exact resume, data parallel).

    cfg = DistillConfig(teacher="big.gguf", student_layers=4, student_dim=256, temperature=2.0, alpha=0.5)
    Distiller(cfg).train()

The teacher (a GGUF file, an HF directory or a run folder) is loaded as the runtime loads it (a GGUF file's
blocks stay quantized and go through flashlm's GGUF matmuls), frozen and run without gradients. The student is a
new model (the teacher's config with --student-* sizes, or a TOML of ModelConfig fields), initialised randomly or
from the teacher (every k-th layer, each weight truncated where the student is narrower), or an existing float
model (--student PATH). Both must share one vocabulary.

The loss per token is alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the labels, from
the fused vocabulary-chunked kernel (train/losses.py): reverse KL and a top-k teacher (renormalised over its k
tokens) are options. --hidden-layers adds FitNets' hint loss: the MSE between chosen student and teacher hidden
states, the student's through a learned linear projection where the widths differ (trained with the student,
not exported). The validation loss is the student's cross-entropy on held-out text (its perplexity).

Offline (train/teacher_logits.py): save_teacher_logits writes the teacher's top k for the training tokens once,
and a run with teacher_logits trains from that file without loading the teacher.

A checkpoint is a normal run's ("model" is the student with the teacher's tokenizer, so export, generate and
eval take the run folder) plus the projections and this configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.io.gguf_vocab import tokenizer_from_json
from flashlm.train.config import TrainConfig
from flashlm.train.student import STUDENT_SIZES, check_same_vocabulary, init_from_teacher, student_config
from flashlm.train.trainer import Trainer, rng_state

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class DistillConfig:
    teacher: Optional[str] = None           # GGUF file, HF directory or run folder (not needed with teacher_logits)
    data: Optional[list] = None             # text files or folders; None: the Python standard library's sources
    teacher_logits: Optional[str] = None    # an offline file (save_teacher_logits) to train from instead
    student: Optional[str] = None           # an existing float model to train as the student
    student_config: Optional[str] = None    # a TOML of ModelConfig fields over the teacher's config
    student_layers: Optional[int] = None
    student_dim: Optional[int] = None
    student_heads: Optional[int] = None
    student_kv_heads: Optional[int] = None
    student_ff: Optional[int] = None
    init_from_teacher: bool = False
    temperature: float = 2.0
    alpha: float = 0.5
    kl: str = "forward"
    top_k: int = 0                          # 0: the teacher's whole distribution
    hidden_layers: str = ""                 # "2:4,4:8": student:teacher hidden states (after that many blocks)
    hidden_weight: float = 1.0
    seq_len: int = 128
    max_steps: int = 500
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    keep_checkpoints: int = 3
    seed: int = 1337
    device: str = "auto"
    data_cache: str = "flashlm-data"
    max_bytes: Optional[int] = 8 << 20
    out_dir: str = "runs/distill"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if (self.teacher is None) == (self.teacher_logits is None) and not (self.teacher and self.init_from_teacher):
            raise ValueError("teacher: give --teacher MODEL or --teacher-logits FILE (both only with "
                             "--init-from-teacher)")
        if self.init_from_teacher and self.teacher is None:
            raise ValueError("init_from_teacher: needs --teacher (its weights)")
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"kl: must be one of {', '.join(KL_DIRECTIONS)}, got {self.kl!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature: must be finite and > 0, got {self.temperature!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0 (0: the whole distribution), got {self.top_k!r}")
        if self.kl == "reverse" and (self.top_k or self.teacher_logits):
            raise ValueError("kl: reverse KL needs the teacher's whole distribution (no --top-k, no --teacher-logits)")
        if not (isinstance(self.hidden_weight, (int, float)) and self.hidden_weight >= 0):
            raise ValueError(f"hidden_weight: must be >= 0, got {self.hidden_weight!r}")
        if self.hidden_layers and self.teacher_logits:
            raise ValueError("hidden_layers: hidden-state distillation runs the teacher (not with --teacher-logits)")
        parse_layer_pairs(self.hidden_layers)
        if self.student is not None and (self.student_config or self.init_from_teacher
                                         or any(getattr(self, k) is not None for k in STUDENT_SIZES)):
            raise ValueError("student: an existing model takes no --student-config, --student-* sizes or "
                             "--init-from-teacher")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len: must be a positive integer, got {self.seq_len!r}")

    def train_config(self) -> TrainConfig:
        """The loop's settings (TrainConfig checks them)."""
        return TrainConfig(seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_steps=self.max_steps, lr=self.lr, min_lr=self.lr / 10, warmup=self.warmup,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, precision=self.precision,
                           seed=self.seed, device=self.device, eval_interval=self.eval_interval,
                           eval_batches=self.eval_batches, ckpt_interval=self.ckpt_interval,
                           keep_checkpoints=self.keep_checkpoints, out_dir=self.out_dir, sample_tokens=0,
                           progress=self.progress, data=self.data, data_cache=self.data_cache,
                           max_bytes=self.max_bytes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"distill config: unknown keys {unknown}")
        return cls(**d)


def parse_layer_pairs(text: str) -> list:
    """"2:4,4:8" -> [(2, 4), (4, 8)]: student and teacher hidden states, each after that many blocks."""
    pairs = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        try:
            s, t = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"hidden_layers: expected student:teacher pairs such as 2:4,4:8, got {part!r}") from None
        if s < 1 or t < 1:
            raise ValueError(f"hidden_layers: layers count from 1 (the state after that many blocks), got {part!r}")
        pairs.append((s, t))
    return pairs


# -- models ---------------------------------------------------------------------------------------------------

def load_teacher(path: str):
    """The teacher as a LoadedModel, frozen and in eval mode (a GGUF file's blocks as they are)."""
    from flashlm.io import load_model

    if not os.path.exists(path):
        raise ValueError(f"teacher: {path!r} does not exist")
    loaded = load_model(path)
    loaded.model.eval().requires_grad_(False)
    if loaded.tokenizer is None:
        raise ValueError(f"teacher: {path} has no tokenizer (the student's data is encoded with it)")
    return loaded


def head_of(model: nn.Module):
    """The output projection the fused loss takes: the lm head, or the tied embedding table."""
    return model.lm_head if model.lm_head is not None else model.tok_emb.weight


def run_with_states(model: nn.Module, idx: torch.Tensor, layers) -> tuple:
    """(final-normed hidden states [B, T, d], {layer: the residual stream after that many blocks})."""
    states, hooks = {}, []
    for layer in set(layers):
        hooks.append(model.blocks[layer - 1].register_forward_hook(
            lambda _m, _inp, out, layer=layer: states.__setitem__(layer, out)))
    try:
        return model.hidden_states(idx), states
    finally:
        for h in hooks:
            h.remove()


class DistillModel(nn.Module):
    """What the trainer's loop trains: the student and the hint projections; the teacher rides along frozen
    (not a submodule, so neither the optimiser nor the checkpoint sees it)."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], dc: DistillConfig, teacher_cfg: dict):
        """teacher: None when its logits come with the batches; teacher_cfg: its ModelConfig fields."""
        super().__init__()
        self.student = student
        self.cfg = student.cfg
        self._teacher = [teacher]
        self.dc = dc
        self.pairs = parse_layer_pairs(dc.hidden_layers)
        self.projections = nn.ModuleDict()
        for s, t in self.pairs:
            if s > student.cfg.n_layer:
                raise ValueError(f"hidden_layers: student layer {s} past its {student.cfg.n_layer} layers")
            if t > teacher_cfg["n_layer"]:
                raise ValueError(f"hidden_layers: teacher layer {t} past its {teacher_cfg['n_layer']} layers")
            ds, dt = student.cfg.d_model, teacher_cfg["d_model"]
            if ds != dt:  # FitNets' regressor; N(0, 0.02) as the student's own weights
                proj = nn.Linear(ds, dt, bias=False)
                nn.init.normal_(proj.weight, std=0.02)
                self.projections[f"{s}_{t}"] = proj

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, x, y, topk_indices=None, topk_values=None):
        """(None, loss). Training: the distillation loss; evaluation: the student's cross-entropy on y."""
        from flashlm.train.losses import distillation_loss, lm_loss

        student, dc = self.student, self.dc
        if not self.training:
            return None, lm_loss(student.hidden_states(x), head_of(student), y)
        hidden, states = run_with_states(student, x, [s for s, _ in self.pairs])
        teacher_logits, t_states = None, {}
        if topk_indices is None:
            with torch.no_grad():
                t_hidden, t_states = run_with_states(self.teacher, x, [t for _, t in self.pairs])
                teacher_logits = self.teacher.logits(t_hidden).float()
            if dc.top_k:
                top = teacher_logits.topk(min(dc.top_k, teacher_logits.shape[-1]), dim=-1)
                topk_indices, topk_values, teacher_logits = top.indices, top.values, None
        loss = distillation_loss(hidden, head_of(student), y, teacher_logits, topk_indices=topk_indices,
                                 topk_values=topk_values, alpha=dc.alpha, temperature=dc.temperature,
                                 reverse=dc.kl == "reverse")
        if self.pairs and dc.hidden_weight > 0:
            loss = loss + dc.hidden_weight * self.hint_loss(states, t_states)
        return None, loss

    def hint_loss(self, states: dict, t_states: dict) -> torch.Tensor:
        """FitNets: the mean over pairs of the MSE between the (projected) student state and the teacher's."""
        total = 0.0
        for s, t in self.pairs:
            h = states[s]
            proj = self.projections[f"{s}_{t}"] if f"{s}_{t}" in self.projections else None
            if proj is not None:
                h = proj(h)
            total = total + F.mse_loss(h.float(), t_states[t].float())
        return total / len(self.pairs)

    def param_groups(self, weight_decay: float) -> list:
        return self.student.param_groups(weight_decay) + [
            {"params": list(self.projections.parameters()), "weight_decay": 0.0}] * bool(len(self.projections))

    def num_params(self) -> int:
        return self.student.num_params()

    def flops_per_token(self) -> float:
        """The student's training FLOPs plus the teacher's forward (2 per weight of its matrix multiplies)."""
        flops = self.student.flops_per_token()
        if self.teacher is not None:
            weights = sum(m.in_features * m.out_features for m in self.teacher.modules()
                          if isinstance(getattr(m, "in_features", None), int))
            flops += 2.0 * weights
        return flops


def tokenize_corpus(cfg: TrainConfig, tokenizer_json: str, eos_token: Optional[str], path, write: bool = True):
    """cfg.data (None: the standard library's sources) tokenized with the teacher's tokenizer, written to path
    for prepare_data, which caches the tokens in cfg.data_cache."""
    from flashlm.train.data import prepare_data

    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tokenizer_json)
    return prepare_data(cfg.data, cfg.data_cache, tokenizer=path, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        doc_separator=cfg.document_separator(), max_bytes=cfg.max_bytes, eos_token=eos_token,
                        progress=cfg.progress and write)


# -- the job --------------------------------------------------------------------------------------------------

class Distiller(Trainer):
    def __init__(self, dc: DistillConfig, *, resume=False, log=print):
        self.dc = dc
        super().__init__(dc.train_config(), resume=resume, log=log)

    def setup_data(self):
        from flashlm.train.data import PackedBatches

        dc = self.dc
        self.teacher = load_teacher(dc.teacher) if dc.teacher is not None else None
        if dc.teacher_logits is not None:
            from flashlm.train.teacher_logits import TopKBatches

            f = self.open_logits_file()
            self.cfg.seq_len = f.seq_len  # the file's windows are the training sequences
            self.train_batches = TopKBatches(f, self.cfg.batch_size, seed=self.cfg.seed, rank=self.rank,
                                             world_size=self.world_size)
            val = f.val_tokens
        else:
            tok = self.teacher.tokenizer
            self.teacher_cfg, self.tokenizer_json = self.teacher.config.to_dict(), tok.to_str()
            self.eos_id = tok.eos_token_id
            data = self.prepare_tokens()
            self.train_batches = PackedBatches(data.train, self.cfg.seq_len, self.cfg.batch_size, seed=self.cfg.seed,
                                               rank=self.rank, world_size=self.world_size)
            val = data.val
        try:
            self.val_batches = PackedBatches(val, self.cfg.seq_len, self.cfg.batch_size, shuffle=False,
                                             rank=self.rank, world_size=self.world_size)
        except ValueError as e:
            raise ValueError(f"data: the validation split is too small ({e}); give more text") from e

    def open_logits_file(self):
        """The offline file, and the teacher's config, tokenizer and end-of-document id it holds, all checked
        (the file is untrusted)."""
        from flashlm.models import ModelConfig
        from flashlm.train.teacher_logits import open_teacher_logits

        f = open_teacher_logits(self.dc.teacher_logits)
        saved, self.tokenizer_json = f.meta.get("model_config"), f.meta.get("tokenizer")
        self.eos_id = f.meta.get("eos_token_id")
        if not isinstance(saved, dict) or not isinstance(self.tokenizer_json, str):
            raise ValueError(f"teacher_logits: {f.path} holds no teacher model config or tokenizer")
        try:
            self.teacher_cfg = ModelConfig.from_dict(saved).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"teacher_logits: {f.path}: its teacher model config is invalid ({e})") from e
        if self.teacher_cfg["vocab_size"] != f.vocab:
            raise ValueError(f"teacher_logits: {f.path}: vocab {f.vocab} differs from its model config's "
                             f"{self.teacher_cfg['vocab_size']}")
        if self.eos_id is not None and not (isinstance(self.eos_id, int) and 0 <= self.eos_id < f.vocab):
            raise ValueError(f"teacher_logits: {f.path}: eos_token_id {self.eos_id!r} outside the vocabulary")
        saved_tok = tokenizer_from_json(self.tokenizer_json)
        if saved_tok.vocab_size > f.vocab:
            raise ValueError(f"teacher_logits: {f.path}: its tokenizer has more tokens than the vocab {f.vocab}")
        if self.teacher is not None:
            check_same_vocabulary(self.teacher.tokenizer, saved_tok, "teacher_logits")
        return f

    def prepare_tokens(self):
        """The corpus tokenized with the teacher's tokenizer (rank 0 first; the others open its cache)."""
        path = self.out_dir / "teacher-tokenizer.json"
        eos = self.teacher.tokenizer.eos_token
        data = tokenize_corpus(self.cfg, self.tokenizer_json, eos, path) if self.is_main else None
        self._barrier()
        return data if data is not None else tokenize_corpus(self.cfg, self.tokenizer_json, eos, path,
                                                             write=False)

    def setup_model(self):
        from flashlm.models import Transformer

        dc = self.dc
        if dc.student is not None:
            from flashlm.io import load_model
            from flashlm.train.finetune import is_float_model

            loaded = load_model(dc.student)
            if not is_float_model(loaded.model):
                raise ValueError(f"student: {dc.student} is quantized; the student trains in float")
            if loaded.tokenizer is not None:
                check_same_vocabulary(tokenizer_from_json(self.tokenizer_json), loaded.tokenizer)
            student = loaded.model
            self.student_source = loaded.source
        else:
            student = Transformer(student_config(dc, self.teacher_cfg))
            self.student_source = "new"
            if dc.init_from_teacher:
                taken = init_from_teacher(student, self.teacher.model)
                self.log(f"flashlm distill: student initialised from teacher layers {taken}")
        if student.cfg.vocab_size != self.teacher_cfg["vocab_size"]:
            raise ValueError(f"student: vocab_size {student.cfg.vocab_size} differs from the teacher's "
                             f"{self.teacher_cfg['vocab_size']}")
        if self.cfg.seq_len > student.cfg.seq_len:
            raise ValueError(f"seq_len: {self.cfg.seq_len} is longer than the student's context "
                             f"{student.cfg.seq_len}")
        student = student.to(self.device).float().train().requires_grad_(True)
        student.checkpointing = False
        self.model_config = student.cfg
        running = None if dc.teacher_logits is not None else self.teacher.model.to(self.device)
        self.model = DistillModel(student, running, dc, self.teacher_cfg)

    # -- state: a normal run's checkpoint of the student, plus the projections ------------------------------

    def state_dict(self) -> dict:
        return {"model_config": self.model_config.to_dict(),
                "model": {k: v.detach().float().cpu() for k, v in self.model.student.state_dict().items()},
                "projections": {k: v.detach().float().cpu() for k, v in self.model.projections.state_dict().items()},
                "tokenizer": self.tokenizer_json, "eos_token_id": self.eos_id, "step": self.step,
                "train_config": None, "distill": self.dc.to_dict(), "optimizer": self.dp.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "data": self.train_batches.state_dict(),
                "metrics": list(self.metrics)}

    def load_state_dict(self, state: dict):
        if state.get("model_config") != self.model_config.to_dict():
            raise ValueError("checkpoint: its student differs from this run's")
        saved = state.get("distill") or {}
        for key in ("teacher", "teacher_logits", "hidden_layers", "kl", "top_k"):
            if saved.get(key) != getattr(self.dc, key):
                raise ValueError(f"checkpoint: {key} is {saved.get(key)!r}, this run's is {getattr(self.dc, key)!r}")
        self.model.student.load_state_dict(state["model"])
        self.model.projections.load_state_dict(state.get("projections") or {})
        self.load_loop_state(state)


def save_teacher_logits(dc: DistillConfig, out_path: str, progress: bool = True) -> int:
    """`flashlm distill --save-teacher-logits OUT`: the teacher's top_k logits for the training tokens of
    dc.data (tokenized as a run would), windows of dc.seq_len. Returns the positions written."""
    from flashlm.train.teacher_logits import write_teacher_logits

    if dc.teacher is None or dc.teacher_logits is not None:
        raise ValueError("save_teacher_logits: needs --teacher (and no --teacher-logits)")
    if dc.top_k < 1:
        raise ValueError("top_k: --save-teacher-logits stores the teacher's top k; give --top-k K")
    teacher = load_teacher(dc.teacher)
    if dc.seq_len > teacher.config.seq_len:
        raise ValueError(f"seq_len: {dc.seq_len} is longer than the teacher's context {teacher.config.seq_len}")
    tokenizer_json = teacher.tokenizer.to_str()
    data = tokenize_corpus(dc.train_config(), tokenizer_json, teacher.tokenizer.eos_token,
                           Path(out_path).resolve().parent / "teacher-tokenizer.json")
    model = teacher.model
    meta = {"model_config": teacher.config.to_dict(), "tokenizer": tokenizer_json,
            "eos_token_id": teacher.tokenizer.eos_token_id, "teacher": dc.teacher}
    return write_teacher_logits(out_path, lambda x: model.logits(model.hidden_states(x)), data.train, data.val,
                                vocab=teacher.config.vocab_size, k=dc.top_k, seq_len=dc.seq_len, meta=meta,
                                batch_size=dc.batch_size, progress=progress)


def resume_distill_config(out_dir, overrides: dict) -> DistillConfig:
    """The configuration saved in out_dir's latest checkpoint with `overrides` (None values ignored) on top."""
    from flashlm.train.trainer import saved_job_config

    return DistillConfig.from_dict(saved_job_config(out_dir, "distill", "distillation", overrides))


def run_distill(dc: DistillConfig, resume=False) -> list:
    """`flashlm distill`: train, then say where the student is."""
    distiller = Distiller(dc, resume=resume)
    try:
        metrics = distiller.train()
    finally:
        distiller.dp.close()
    student = distiller.model.student
    print(f"flashlm distill: a {student.num_params() / 1e6:.2f}M-parameter student ({student.cfg.n_layer} layers, "
          f"d_model {student.cfg.d_model}) in {dc.out_dir}; `flashlm export {dc.out_dir} --gguf OUT.gguf` writes it")
    return metrics
