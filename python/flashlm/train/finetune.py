"""`flashlm finetune`: supervised fine-tuning of an existing model on the trainer's loop (progress bar, metrics,
loss curve, checkpoints, exact resume).

    cfg = FinetuneConfig(model="runs/flashlm", data="train.jsonl", method="lora", max_steps=200)
    FineTuner(cfg).train()

Methods: lora (LoRA on the block linears named by target), qlora (LoRA on the base loaded quantized: a GGUF
file's blocks as they are, an HF directory or a run folder quantized to int4), prompt and prefix (virtual tokens),
full (every weight of a float base; with qat, quantization-aware: flashlm.quant.qat). Only the trainable
parameters get optimiser state (fused AdamW).

A checkpoint holds the trainable tensors ("adapter"), the optimiser, the data position and the base's path;
resuming loads the base again and puts them back. For lora and full on a `flashlm train` run it also holds the
merged weights as "model" with the tokenizer, so `flashlm generate --model RUN` runs the tuned model. The run folder's
adapter/ holds the adapter in HF PEFT's format where that format can express it (Llama-family LoRA, prompt and
prefix tuning).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from flashlm.train.config import TrainConfig, check_qat_lsq
from flashlm.train.trainer import Trainer, rng_state, set_rng_state

METHODS = ("lora", "qlora", "prompt", "prefix", "full")
# Learning rates that move a small model in a few hundred steps (virtual tokens need larger ones, as in PEFT's
# examples; full fine-tuning smaller ones).
DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "prompt": 1e-2, "prefix": 1e-2, "full": 1e-4}
DEFAULT_BASE = TrainConfig().out_dir  # where `flashlm train` writes by default
VAL_FRACTION = 0.05


@dataclass
class FinetuneConfig:
    model: str = DEFAULT_BASE              # GGUF file, HF model directory, or a training run folder / checkpoint
    data: Optional[str] = None             # JSONL; None: a chat set generated from the base run's corpus
    val_data: Optional[str] = None         # JSONL; None: VAL_FRACTION of data's records held out
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target: str = "q,k,v,o"
    num_virtual_tokens: int = 16
    qat: Optional[str] = None              # method full only: quantization-aware (TrainConfig.qat)
    qat_group_size: Optional[int] = None
    qat_lsq: bool = False                  # with qat int8 or int4: learned steps (TrainConfig.qat_lsq)
    seq_len: Optional[int] = None          # tokens per record (at most the model's context); None: the model's
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None             # None: DEFAULT_LR of the method
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 50
    eval_batches: int = 8
    ckpt_interval: int = 50
    keep_checkpoints: int = 3
    seed: int = 1337
    device: str = "auto"
    out_dir: str = "runs/finetune"
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len <= 1):
            raise ValueError(f"seq_len: must be an integer > 1, got {self.seq_len!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr!r}")
        if self.qat is not None and self.method != "full":  # an adapter over quantized weights exports inexactly
            raise ValueError(f"qat: only with method full (every weight trained), got method {self.method!r}")
        check_qat_lsq(self.qat, self.qat_lsq)

    def train_config(self) -> TrainConfig:
        """The loop's settings (TrainConfig checks them)."""
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.method]
        return TrainConfig(seq_len=self.seq_len or 1, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_steps=self.max_steps, lr=lr, min_lr=lr / 10, warmup=self.warmup,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, precision=self.precision,
                           seed=self.seed, device=self.device, eval_interval=self.eval_interval,
                           eval_batches=self.eval_batches, ckpt_interval=self.ckpt_interval,
                           keep_checkpoints=self.keep_checkpoints, out_dir=self.out_dir, sample_tokens=0,
                           progress=self.progress, qat=self.qat, qat_group_size=self.qat_group_size,
                           qat_lsq=self.qat_lsq)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"finetune config: unknown keys {unknown}")
        return cls(**d)


def return_freed_blocks() -> None:
    """Makes glibc's malloc give every freed block over 128 KiB back to the system, for the rest of the process.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB): from then on,
    blocks of activation size come from the heap and stay in the process when freed, and a training step's
    peak RSS grows with the tokens far beyond its live tensors. Measured on a LoRA step over a 4-layer,
    d_model 1024 Q4_K_M base: peak growth 84 / 114 MiB at 32 / 64 tokens by default, 69 / 78 MiB with the
    threshold fixed. The cost is an mmap and fresh pages per large tensor, small next to a step's arithmetic.
    Elsewhere (musl, macOS, Windows) this does nothing."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # malloc.h's M_MMAP_THRESHOLD; setting it also stops the threshold's growth
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(128 << 10))


def load_base(path: str, method: str):
    """The base as a LoadedModel: quantized for qlora (a GGUF file as it is; otherwise int4 on load)."""
    import os

    from flashlm.io import load_model
    from flashlm.io.loaded import quantize_block_linears

    if not os.path.exists(path):
        hint = " (run `flashlm train` first, or pass --model)" if path == DEFAULT_BASE else ""
        raise ValueError(f"model: {path!r} does not exist{hint}")
    is_hf = os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
    if method == "qlora" and is_hf:
        return load_model(path, quantize="int4")
    loaded = load_model(path)
    if method == "qlora" and not loaded.source.startswith("gguf:"):
        quantize_block_linears(loaded.model, "int4")  # a run folder's float blocks
    return loaded


def is_float_model(model: nn.Module) -> bool:
    return all(t.is_floating_point() for t in list(model.parameters()) + list(model.buffers())
               if t.dim() >= 2) and not any(type(m).__name__ in ("GGUFLinear", "GGUFEmbedding", "Int4Linear",
                                                                "Int8Linear") for m in model.modules())


class SFTModel(nn.Module):
    """The tuned model as the trainer's loop sees it: forward(x, y), the trainable parameters' groups, FLOPs."""

    def __init__(self, base: nn.Module, tuned: nn.Module):
        super().__init__()
        self.tuned = tuned
        self.cfg = base.cfg
        self._base = [base]  # not a submodule: its parameters are tuned's

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def forward(self, idx, targets=None):
        return self.tuned(idx, targets)

    def trainable(self) -> dict:
        return {name: p for name, p in self.tuned.named_parameters() if p.requires_grad}

    def param_groups(self, weight_decay: float) -> list:
        from flashlm.models.transformer import takes_weight_decay

        params = self.trainable().items()
        groups = [{"params": [p for n, p in params if takes_weight_decay(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in params if not takes_weight_decay(n, p)], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def flops_per_token(self) -> float:
        """6 per weight of every matrix multiply (float or quantized, adapters not counted) plus attention's."""
        from flashlm.train.peft import LoRALinear

        weights = sum(m.in_features * m.out_features for m in self.base.modules()
                      if isinstance(getattr(m, "in_features", None), int) and not isinstance(m, LoRALinear))
        cfg = self.cfg
        return 6.0 * weights + 12.0 * cfg.n_layer * cfg.d_model * cfg.seq_len


def attach_method(base: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The module to train around `base` (frozen except for the method's parameters)."""
    from flashlm.train.peft import PrefixTuning, PromptTuning, apply_lora

    if cfg.method in ("lora", "qlora"):
        apply_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.target)
        return base
    if cfg.method == "prompt":
        return PromptTuning(base, cfg.num_virtual_tokens)
    if cfg.method == "prefix":
        return PrefixTuning(base, cfg.num_virtual_tokens)
    if not is_float_model(base):
        raise ValueError("method: full fine-tuning needs a float base (this one is quantized); use lora or qlora")
    base.requires_grad_(True)
    return base


def merged_state_dict(base: nn.Module) -> dict:
    """The base's weights with every LoRA adapter folded in, under the plain Transformer's names (float32; a GGUF
    base's blocks dequantized)."""
    from flashlm import ops
    from flashlm.quant import GGUFEmbedding, GGUFLinear
    from flashlm.train.peft import lora_layers

    layers = lora_layers(base)
    blocks = {n: m for n, m in base.named_modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    state = {}
    for name, t in base.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in blocks and leaf == "raw":
            m = blocks[module]
            shape = (m.out_features, m.in_features) if isinstance(m, GGUFLinear) else (m.num_embeddings,
                                                                                        m.embedding_dim)
            name, t = f"{module}.weight", ops.dequantize(t.contiguous(), m.ggml_type, shape)
        owner = next((n for n in layers if name.startswith(n + ".")), None)
        if owner is None:
            state[name] = t.detach().float().cpu()
            continue
        rest = name[len(owner) + 1:]
        if rest.startswith("base."):
            state[f"{owner}.{rest[5:]}"] = t.detach().float().cpu()
    for name, m in layers.items():
        state[f"{name}.weight"] = state[f"{name}.weight"] + m.delta_weight().cpu()
    return state


def load_adapter(model: SFTModel, adapter: dict) -> None:
    """Copies a checkpoint's "adapter" tensors into model's trainable parameters, every name, shape and value
    checked (a NaN would flow into every output of its layer and into an exported adapter)."""
    mine = model.trainable()
    if not isinstance(adapter, dict) or set(adapter) != set(mine):
        raise ValueError("checkpoint: its trainable tensors differ from this run's")
    with torch.no_grad():
        for name, p in mine.items():
            if not isinstance(adapter[name], torch.Tensor) or adapter[name].shape != p.shape:
                got = tuple(adapter[name].shape) if isinstance(adapter[name], torch.Tensor) else type(adapter[name])
                raise ValueError(f"checkpoint: {name} is {got}, expected {tuple(p.shape)}")
            if not adapter[name].is_floating_point() or not bool(torch.isfinite(adapter[name]).all()):
                raise ValueError(f"checkpoint: {name} must hold finite floating-point values")
            p.copy_(adapter[name])


def split_records(records: list, seed: int) -> tuple:
    """(train, val): VAL_FRACTION of the records (at least one) held out, chosen with `seed`."""
    if len(records) < 2:
        raise ValueError("data: one record cannot be split into training and validation; give more, or "
                         "--val-data")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * VAL_FRACTION))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


def default_chat_set(base_path: str, out_dir: Path, n_train: int = 512, n_val: int = 32) -> tuple:
    """A small chat set from the base run's corpus (no downloads): the user gives a line, the assistant answers
    with the line after it. Written to out_dir/sft-train.jsonl and sft-val.jsonl (the format to copy); returns
    their paths."""
    from flashlm.io.checkpoint import find_checkpoint, load_checkpoint
    from flashlm.train.corpus import load_corpus

    saved = load_checkpoint(find_checkpoint(base_path)).get("train_config") or {}
    sources = saved.get("data") if isinstance(saved, dict) else None
    docs, _ = load_corpus(sources, max_bytes=1 << 20)
    pairs = []
    for doc in docs:
        lines = [line.strip() for line in doc.splitlines() if 8 <= len(line.strip()) <= 80]
        pairs += zip(lines, lines[1:])
        if len(pairs) >= 4 * (n_train + n_val):
            break
    random.Random(0).shuffle(pairs)
    if len(pairs) < n_train + n_val:
        raise ValueError(f"data: the base's corpus gives {len(pairs)} line pairs, fewer than {n_train + n_val}; "
                         f"pass --data")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chunk in (("sft-train.jsonl", pairs[:n_train]), ("sft-val.jsonl", pairs[n_train:n_train + n_val])):
        path = out_dir / name
        with open(path, "w", encoding="utf-8") as f:
            for a, b in chunk:
                f.write(json.dumps({"messages": [{"role": "user", "content": a},
                                                 {"role": "assistant", "content": b}]}) + "\n")
        paths.append(str(path))
    return tuple(paths)


class FineTuner(Trainer):
    def __init__(self, ft: FinetuneConfig, *, resume=False, log=print):
        self.ft = ft
        super().__init__(ft.train_config(), resume=resume, log=log)

    def setup_data(self):
        from flashlm.train.sft_data import SFTBatches, encode_records, read_sft_jsonl

        ft = self.ft
        if self.world_size > 1:  # the records are not sharded over ranks: every rank would take the same ones
            raise NotImplementedError("finetune: runs in one process (no torchrun)")
        return_freed_blocks()  # training follows: freed activation blocks go back to the system from now on
        self.loaded = load_base(ft.model, ft.method)
        if self.loaded.tokenizer is None:
            raise ValueError(f"model: {ft.model} has no tokenizer to encode the data with")
        data, val_data = ft.data, ft.val_data
        if data is None:
            if not self.loaded.source.startswith("checkpoint:"):
                raise ValueError("data: needed for this base (the built-in chat set comes from a `flashlm "
                                 "train` run's corpus)")
            if val_data is not None:
                raise ValueError("val_data: give --data with it")
            data, val_data = default_chat_set(ft.model, self.out_dir)
            self.log(f"flashlm finetune: a chat set from the base's corpus in {data} and {val_data}")
        records = read_sft_jsonl(data)
        if val_data is None:
            records, val_records = split_records(records, ft.seed)
        else:
            val_records = read_sft_jsonl(val_data)
        virtual = ft.num_virtual_tokens if ft.method in ("prompt", "prefix") else 0
        context = self.loaded.config.seq_len - virtual
        window = min(ft.seq_len or context, context)
        if window < 2:
            raise ValueError(f"num_virtual_tokens: leaves {window} of the model's {self.loaded.config.seq_len} "
                             f"positions for the data")
        tok = self.loaded.tokenizer
        train, dropped = encode_records(records, tok, window, name=str(data))
        val, val_dropped = encode_records(val_records, tok, window, name=str(val_data or data))
        if dropped or val_dropped:
            self.log(f"flashlm finetune: {dropped + val_dropped} record(s) dropped: no answer token in their "
                     f"first {window + 1} tokens")
        self.train_batches = SFTBatches(train, ft.batch_size, seed=ft.seed)
        self.val_batches = SFTBatches(val, ft.batch_size, shuffle=False)
        self.cfg.seq_len = window  # tokens_per_step counts full windows (padding included)

    def setup_model(self):
        base = self.loaded.model.to(self.device)
        base.train()
        base.checkpointing = False
        self.model_config = self.loaded.config
        tuned = attach_method(base, self.ft)
        self.setup_qat(base)
        self.model = SFTModel(base, tuned)

    # -- state: the trainable tensors and the base's path, not the base --------------------------------------

    def state_dict(self) -> dict:
        state = {"model_config": self.model_config.to_dict(), "finetune": self.ft.to_dict(),
                 "base_source": self.loaded.source, "step": self.step, "train_config": None,
                 "adapter": {k: v.detach().float().cpu() for k, v in self.model.trainable().items()},
                 "optimizer": self.dp.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": rng_state(), "data": self.train_batches.state_dict(), "metrics": list(self.metrics)}
        base = self.model.base
        # A training run's base is small and has no other way into the runtime yet; a GGUF or HF base's
        # merged copy would be its full size in every checkpoint.
        if self.ft.method in ("lora", "full") and self.loaded.source.startswith("checkpoint:") \
                and is_float_model(base):
            tok = self.loaded.tokenizer
            state.update(model=merged_state_dict(base), tokenizer=tok.to_str(),
                         eos_token_id=tok.eos_token_id)
        return state

    def load_state_dict(self, state: dict):
        if state.get("model_config") != self.model_config.to_dict():
            raise ValueError("checkpoint: its base model differs from --model's")
        saved = state.get("finetune") or {}
        for key in ("method", "lora_r", "lora_alpha", "target", "num_virtual_tokens", "qat", "qat_group_size",
                    "qat_lsq"):
            if saved.get(key, False if key == "qat_lsq" else None) != getattr(self.ft, key):  # older runs: none
                raise ValueError(f"checkpoint: {key} is {saved.get(key)!r}, this run's is {getattr(self.ft, key)!r}")
        load_adapter(self.model, state["adapter"])
        self.dp.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.train_batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.metrics = list(state["metrics"])

    def save_checkpoint(self):
        super().save_checkpoint()
        self.save_adapter()

    def save_adapter(self):
        """out_dir/adapter in PEFT's format, where it can express this method on this model."""
        from flashlm.train.peft import save_peft

        if self.ft.method == "full":
            return
        try:
            save_peft(self.model.tuned, self.out_dir / "adapter", base_model_name_or_path=self.ft.model)
        except NotImplementedError as e:
            if not getattr(self, "_peft_warned", False):
                self.log(f"flashlm finetune: no PEFT-format adapter ({e}); the checkpoints hold it")
                self._peft_warned = True


def resume_finetune_config(out_dir, overrides: dict) -> FinetuneConfig:
    """The configuration saved in out_dir's latest checkpoint with `overrides` (None values ignored) on top."""
    from flashlm.train.trainer import saved_job_config

    return FinetuneConfig.from_dict(saved_job_config(out_dir, "finetune", "fine-tuning", overrides))


def run_finetune(ft: FinetuneConfig, resume=False) -> list:
    """`flashlm finetune`: train, then say where the results are."""
    tuner = FineTuner(ft, resume=resume)
    try:
        metrics = tuner.train()
    finally:
        tuner.dp.close()
    tuner.save_adapter()
    print(f"flashlm finetune: {ft.method} on {ft.model}: {tuner.model.num_params()} trainable parameters; "
          f"checkpoints and metrics in {ft.out_dir}")
    return metrics
