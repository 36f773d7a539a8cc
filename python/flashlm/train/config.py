"""TrainConfig: everything a training run needs, from a preset, a TOML file and command-line flags.

    cfg = TrainConfig.from_sources(preset="small", toml_path="run.toml", overrides={"lr": 1e-3})

Later sources win: the preset's values, then the TOML file's (flat `key = value` lines whose keys are the
field names below), then the flags. Unknown keys are errors, so a typo never trains the wrong model silently.
"""

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from typing import Optional

PRECISIONS = ("fp32", "bf16", "fp16")
# the mixture-of-experts architectures `flashlm train` builds (qwen2_moe's shared expert is not among its flags)
MOE_TRAIN_ARCHS = ("mixtral", "qwen3_moe")
PP_SCHEDULES = ("gpipe", "1f1b")
OPTIMIZERS = ("adamw", "adamw-torch", "adam", "sgd", "momentum", "nesterov", "adagrad", "rmsprop")


@dataclass
class TrainConfig:
    # model (flashlm.models.ModelConfig); vocab_size is also the size of the BPE trained on the data
    arch: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None
    d_model: int = 128
    d_ff: Optional[int] = None
    seq_len: int = 128
    vocab_size: int = 1024
    # mixture of experts (arch mixtral or qwen3_moe): experts per layer, used per token (defaults 8 and 2), their
    # width (default d_ff); the load-balancing (Switch/Mixtral) and router z-loss (ST-MoE) terms' coefficients
    n_expert: Optional[int] = None
    n_expert_used: Optional[int] = None
    moe_d_ff: Optional[int] = None
    router_aux_coef: float = 0.01
    router_z_coef: float = 0.001
    attn_impl: str = "flashlm"  # or "sdpa", torch's attention
    checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    # the loss fused with the lm head, a vocabulary chunk at a time (Transformer.fused_loss: no [tokens, vocab]
    # logits, their log-softmax nor their zeroed gradient): 1.30-1.46x the logits path's step under bf16 autocast,
    # 0.98-1.16x in float32 (gpt2/llama d256 V8192, T 256 and 1024, CPU; bench/results/train.md); model-parallel
    # layouts keep the logits path
    fused_loss: bool = True
    # data (flashlm.train.data.prepare_data); no data: the Python standard library's sources
    data: Optional[list] = None
    data_cache: str = "flashlm-data"
    tokenizer: Optional[str] = None  # a tokenizer.json to use instead of training one
    # What splits a file into documents ("" or "none": whole files). "auto": blank lines for --data (so a
    # single book still has held-out paragraphs), whole files for the standard library (held-out files).
    doc_separator: Optional[str] = "auto"
    val_fraction: float = 0.05
    max_bytes: Optional[int] = 8 << 20  # cap on the corpus read (the stdlib is ~30 MB)
    # optimisation
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per step; one step sees batch_size * grad_accum * world_size sequences
    max_steps: int = 500
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd-family and rmsprop
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # pruning-aware training: l1 * sum |p| over the trainable parameters matching l1_params (fnmatch
    # patterns, comma-separated) added to the loss; 0 disables it
    l1: float = 0.0
    l1_params: str = "blocks.*.weight"
    # quantization-aware training (flashlm.quant.qat): the block linears' forward is that of int8 (W8A8), int4
    # (symmetric groups), int4-asym or a GGML block type (Q8_0, Q4_0, Q4_K: GGUFLinear's); qat_group_size
    # None: the largest of 128/64/32 dividing every layer
    qat: Optional[str] = None
    qat_group_size: Optional[int] = None
    # with qat int8 or int4: the weights' steps are trained too (LSQ, flashlm.quant.lsq), with no weight decay
    qat_lsq: bool = False
    # masks kept through training (flashlm.train.sparsity): "2:4" semi-structured or a fraction ("0.5") of each
    # matching matrix zeroed by magnitude, chosen once at the start; "" disables it
    sparsity: str = ""
    sparsity_params: str = "blocks.*.weight"
    optimizer: str = "adamw"  # flashlm's fused AdamW; the others are torch's
    precision: str = "fp32"
    zero_stage: int = 0
    # model parallelism (flashlm.train.parallel_step): the mesh's sizes, their product the world size (dp None:
    # the world over tp * pp * cp); pipeline schedule and micro-batches per batch_size; sequence parallelism
    dp: Optional[int] = None
    tp: int = 1
    pp: int = 1
    cp: int = 1
    pp_schedule: str = "1f1b"
    micro_batches: int = 1
    sequence_parallel: bool = False
    comm_timeout: float = 60.0  # seconds a rank waits for a peer before its collective fails
    seed: int = 1337
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when torch sees a GPU, else cpu
    # evaluation, checkpoints, logging
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    keep_checkpoints: int = 3
    out_dir: str = "runs/flashlm"
    time_limit: float = 0.0  # seconds; when reached, save a checkpoint and stop (0: none)
    sample_tokens: int = 200  # printed after training
    progress: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "ckpt_interval",
                     "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        self._check_layout()
        for name in ("warmup", "grad_clip", "weight_decay", "time_limit", "l1", "router_aux_coef", "router_z_coef"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.l1 > 0 and self.zero_stage == 3:  # ZeRO-3's parameters hold values only inside their block's pass
            raise ValueError("l1: not available with zero_stage 3")
        if self.qat is not None or self.qat_group_size is not None:
            from flashlm.quant.qat import check_qat_setting

            check_qat_setting(self.qat, self.qat_group_size)
        check_qat_lsq(self.qat, self.qat_lsq)
        if self.qat is not None and self.zero_stage == 3:  # its layers round the full weights every forward
            raise ValueError("qat: not available with zero_stage 3")
        from flashlm.train.sparsity import parse_sparsity  # here: the module imports torch, this one need not

        if parse_sparsity(self.sparsity) is not None and self.zero_stage == 3:
            raise ValueError("sparsity: not available with zero_stage 3")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas: must be two numbers, got {self.betas}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.arch in MOE_TRAIN_ARCHS or self.n_expert is not None or self.n_expert_used is not None:
            self.model_config()  # the expert settings checked now, not after the data is prepared

    def _check_layout(self):
        """The model-parallel flags on their own (their product against the world: parallel_step.layout_sizes)."""
        for name in ("tp", "pp", "cp", "micro_batches") + (("dp",) if self.dp is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be an int >= 1, got {value!r}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"--pp-schedule: must be one of {PP_SCHEDULES}, got {self.pp_schedule!r}")
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"--sequence-parallel: must be a bool, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("--sequence-parallel: needs --tp > 1")
        if not 0 < self.comm_timeout < float("inf"):
            raise ValueError(f"--comm-timeout: must be > 0 seconds, got {self.comm_timeout!r}")
        if self.tp * self.pp * self.cp > 1:
            for name in ("l1", "qat", "sparsity"):
                if getattr(self, name):
                    raise ValueError(f"{name}: not available with --tp/--pp/--cp (data parallelism alone)")
            if self.arch in MOE_TRAIN_ARCHS:
                raise ValueError(f"arch: {self.arch} (mixture of experts) is not available with --tp/--pp/--cp")

    def document_separator(self) -> Optional[str]:
        """doc_separator as prepare_data takes it."""
        if self.doc_separator == "auto":
            return "\n\n" if self.data else None
        if self.doc_separator in (None, "", "none"):
            return None
        return self.doc_separator.replace("\\n", "\n").replace("\\t", "\t")  # a flag's "\n\n" is two newlines

    def model_config(self):
        from flashlm.models import ModelConfig

        # gemma2 with Gemma 2's soft-caps (llama.cpp's gemma2 always applies them)
        caps = dict(attn_softcap=50.0, final_softcap=30.0) if self.arch == "gemma2" else {}
        experts = dict(n_expert=self.n_expert, n_expert_used=self.n_expert_used, moe_d_ff=self.moe_d_ff)
        if self.arch in MOE_TRAIN_ARCHS:
            experts = dict(experts, n_expert=self.n_expert or 8, n_expert_used=self.n_expert_used or 2)
        return ModelConfig(arch=self.arch, vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                           n_kv_head=self.n_kv_head, d_model=self.d_model, d_ff=self.d_ff, seq_len=self.seq_len,
                           **caps, **{k: v for k, v in experts.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def from_sources(cls, preset: Optional[str] = None, toml_path=None, overrides: Optional[dict] = None):
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: must be one of {sorted(PRESETS)}, got {preset!r}")
        values = dict(PRESETS[preset]) if preset is not None else {}
        if toml_path is not None:
            with open(toml_path, "rb") as f:
                try:
                    values.update(tomllib.load(f))
                except tomllib.TOMLDecodeError as e:
                    raise ValueError(f"config: {toml_path} is not valid TOML ({e})") from e
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values)


# "tiny" trains in seconds (tests, smoke runs). "small" is the default: on a 2-core CPU it trains for a few
# minutes and then writes recognisable text (see the README for measured figures).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, seq_len=64, vocab_size=384, batch_size=8, max_steps=50,
                 lr=3e-3, min_lr=3e-4, warmup=5, eval_interval=25, eval_batches=4, ckpt_interval=25,
                 max_bytes=1 << 20, sample_tokens=60),
    "small": dict(n_layer=4, n_head=4, d_model=128, seq_len=128, vocab_size=1024, batch_size=8, max_steps=500,
                  lr=3e-3, min_lr=3e-4, warmup=50, eval_interval=100, eval_batches=8, ckpt_interval=100),
}


def add_arguments(parser):
    """One --flag per TrainConfig field (--no-flag for booleans); unset flags are None, so they override
    nothing."""
    import argparse

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"(default {default!r})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("B1", "B2"), help=help_text)
        elif f.name == "data":
            parser.add_argument(flag, nargs="+", default=None, metavar="PATH",
                                help="text files or folders (default: the Python standard library's sources)")
        else:
            kind = type(default) if default is not None else (int if f.name in ("n_kv_head", "d_ff", "max_bytes",
                                                                                "qat_group_size", "n_expert",
                                                                                "n_expert_used", "moe_d_ff", "dp")
                                                              else str)
            choices = {"precision": PRECISIONS, "optimizer": OPTIMIZERS,
                       "arch": ("gpt2", "llama", "qwen3", "gemma2", "gemma3", *MOE_TRAIN_ARCHS),
                       "attn_impl": ("flashlm", "sdpa"), "pp_schedule": PP_SCHEDULES}.get(f.name)
            parser.add_argument(flag, type=kind, default=None, choices=choices, help=help_text)


def overrides_from_args(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def check_qat_lsq(qat, qat_lsq) -> None:
    """qat_lsq (learned steps) is a bool, True only with qat int8 or int4 (train's and finetune's check)."""
    from flashlm.quant.qat import check_lsq

    try:
        check_lsq(qat, qat_lsq)
    except ValueError as e:
        raise ValueError(f"qat_lsq: {str(e).removeprefix('lsq: ')}") from None
