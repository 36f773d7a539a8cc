"""The training loop behind `flashlm train`.

    trainer = Trainer(TrainConfig(...))       # data, model, optimizer; resume=True continues from out_dir
    trainer.train()                           # to max_steps (or time_limit); returns the metrics

Each step takes grad_accum micro-batches of batch_size sequences on every rank (only the last backward
synchronises gradients), runs under autocast for bf16/fp16 (fp16 with a dynamic loss scaler), clips the
global gradient norm and steps the optimizer at the learning rate of the schedule (with l1 > 0 the gradient
is that of the loss plus l1 * sum |p| over the l1_params, flashlm.train.sparsity; the loss logged is the data's
alone; with qat set the block linears compute their forward quantized, flashlm.quant.qat; a mixture-of-experts
model adds router_aux_coef times its load-balancing loss and router_z_coef times its router z-loss, logged as
moe_aux and moe_z, flashlm.train.losses). Every eval_interval
steps it measures the validation loss on the first eval_batches batches of the held-out split; every ckpt_interval
steps it saves a checkpoint holding everything the next step depends on (weights, optimizer, scaler, RNG
states, data position, metrics), so a resumed run on the CPU reproduces the uninterrupted one's losses bit for
bit. Rank 0 alone prints and writes: metrics.jsonl (one JSON object per step), loss.png and the checkpoints,
all in out_dir.
"""

import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flashlm import ops
from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint
from flashlm.train.checkpoint import CheckpointManager
from flashlm.train.config import TrainConfig
from flashlm.train.losses import moe_aux_losses
from flashlm.train.scaler import LossScaler
from flashlm.train.schedule import learning_rate
from flashlm.train.sparsity import SparsityMasks, l1_penalty, matching_parameters, parse_sparsity

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer over `groups` (each group's own weight_decay is kept)."""
    from flashlm.train.optim import AdamW

    lr = cfg.lr  # replaced every step by the schedule
    name = cfg.optimizer
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adamw-torch":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else cfg.momentum
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov",
                               weight_decay=cfg.weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}")


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square torch matmul on `device` (best of a few): the ceiling MFU is measured against.
    It is measured rather than looked up because the CPU's depends on its cores, clocks and BLAS."""
    # 2048 on the CPU: 10% above 1024 and within 4% of 3072 on 2 Zen 3 cores (84 / 77 / 87 GFLOP/s measured).
    n = 2048 if device.type == "cpu" else 4096
    gen = torch.Generator().manual_seed(0)  # its own generator: the training RNG stream is left untouched
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    best = math.inf
    for _ in range(4):  # the best: other work on the machine only ever makes a run slower
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def rng_state() -> dict:
    """Every random generator the loop may touch, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_losses(metrics: list, path):
    """Training loss per step and validation loss at each evaluation, to a PNG (written atomically). Without
    matplotlib (the `train` extra) it says so once and the run goes on: metrics.jsonl has the same numbers."""
    try:
        import matplotlib
    except ImportError:
        if not getattr(plot_losses, "warned", False):
            warnings.warn("matplotlib is not installed (pip install 'flashlm[train]'): no loss.png; the losses "
                          "are in metrics.jsonl")
            plot_losses.warned = True
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class Trainer:
    # The initialisation record of a model built on the meta device (setup_model; a subclass that loads its
    # model leaves it None): each rank replays it for the parameters it holds.
    model_init = None

    def __init__(self, cfg: TrainConfig, *, resume=False, log=print):
        """resume: False, True (the latest checkpoint in out_dir; none there is fine: a fresh start) or a
        checkpoint path."""
        import flashlm.dist as fd
        from flashlm.train.parallel import DataParallel
        from flashlm.train.parallel_step import ModelParallel, check_layout, is_model_parallel, layout_sizes

        self.cfg = cfg
        world = fd.get_world_size() if fd.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.layout = layout_sizes(cfg, world)  # the mesh's sizes, checked before any process group is made
        self.model_parallel = is_model_parallel(self.layout)
        if self.model_parallel:
            check_layout(cfg, cfg.model_config(), self.layout)
        if world > 1 and not fd.is_initialized():
            fd.init(timeout=cfg.comm_timeout)
        self.distributed = fd.is_initialized()
        self.rank = fd.get_rank() if self.distributed else 0
        self.world_size = fd.get_world_size() if self.distributed else 1
        # The data is split over the dp replicas (dp outermost in the mesh); the ranks of one replica share it.
        self.data_world = self.layout["dp"]
        self.data_rank = self.rank // (self.world_size // self.data_world)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.device = self._pick_device(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        if resume is False and latest_checkpoint(self.out_dir) is not None:
            # Pruning keeps the highest steps, so a fresh run here would lose its own checkpoints to old ones.
            raise ValueError(f"out_dir: {self.out_dir} holds checkpoints of an earlier run; continue it with "
                             f"--resume, or choose another --out-dir")

        self.setup_data()
        self.eval_batches = min(cfg.eval_batches, len(self.val_batches))

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.setup_model()
        # Counted before ZeRO-3 shards the parameters (then they hold values only inside forward and backward).
        self.num_params, self.flops_per_token = self.model.num_params(), self.model.flops_per_token()
        self.l1_params = self._l1_params()
        # Chosen from the weights as they start (a fine-tune's: the loaded ones), kept for the whole run.
        self.masks = (SparsityMasks.from_spec(self.model, cfg.sparsity, cfg.sparsity_params)
                      if parse_sparsity(cfg.sparsity) is not None else None)
        if self.model_parallel:  # each rank its part of the model (self.model: the full one, on the meta device)
            self.dp = ModelParallel(self.model, cfg, self.layout, lambda groups: build_optimizer(groups, cfg),
                                    cfg.comm_timeout, init=self.model_init, device=self.device)
        else:
            self.dp = DataParallel(self.model, lambda groups: build_optimizer(groups, cfg),
                                   zero_stage=cfg.zero_stage, param_groups=self.model.param_groups(cfg.weight_decay),
                                   init=self.model_init, device=self.device)
        self.scaler = LossScaler(enabled=cfg.precision == "fp16")
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.data_world
        self.step = 0
        self.metrics = []
        self.peak_flops = None
        self.checkpoints = CheckpointManager(self.out_dir, cfg.keep_checkpoints) if self.is_main else None
        path = latest_checkpoint(self.out_dir) if resume is True else (resume or None)
        if path is not None:
            # A rank that holds a part of the model maps the file and reads the slices it takes.
            self.load_state_dict(load_checkpoint(path, mmap=self.model_init is not None))
            self.log(f"flashlm train: resumed from {path} at step {self.step}")
        if self.is_main:
            self._rewrite_metrics()  # after a resume: drop lines logged past the checkpoint

    def setup_data(self):
        """self.train_batches and self.val_batches (and self.data): the corpus, tokenized (subclasses: other data)."""
        from flashlm.train.data import PackedBatches, prepare_data

        cfg = self.cfg
        # Data: rank 0 tokenizes first so the others open its cache instead of repeating the work.
        data_args = dict(tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                         seed=cfg.seed, doc_separator=cfg.document_separator(), max_bytes=cfg.max_bytes)
        if self.is_main:
            self.data = prepare_data(cfg.data, cfg.data_cache, progress=cfg.progress, **data_args)
        self._barrier()
        if not self.is_main:
            self.data = prepare_data(cfg.data, cfg.data_cache, progress=False, **data_args)
        self.train_batches = PackedBatches(self.data.train, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                                           rank=self.data_rank, world_size=self.data_world)
        try:
            self.val_batches = PackedBatches(self.data.val, cfg.seq_len, cfg.batch_size, shuffle=False,
                                             rank=self.data_rank, world_size=self.data_world)
        except ValueError as e:
            raise ValueError(f"val_fraction: the validation split is too small ({e}); raise val_fraction or "
                             f"give more text") from e

    def setup_model(self):
        """self.model and self.model_config: a fresh Transformer (subclasses: a loaded model, adapters). Under
        model parallelism it is built on the meta device (no rank holds it) and self.model_init records its
        initialisation, which each rank replays for the parameters it holds (flashlm.parallel.materialize); so
        under ZeRO-3 over several ranks, each making its shards."""
        from flashlm.models import Transformer
        from flashlm.parallel.materialize import deferred_init

        cfg = self.cfg
        self.model_config = cfg.model_config()
        self.model_config.vocab_size = self.data.vocab_size  # a given tokenizer.json decides the vocabulary
        # ZeRO-3 over data parallelism shards the parameters too (not with QAT's or sparsity's module changes).
        zero3 = cfg.zero_stage == 3 and self.world_size > 1 and cfg.qat is None and not cfg.sparsity
        if self.model_parallel or zero3:
            self.model, self.model_init = deferred_init(lambda: Transformer(self.model_config, attn_impl=cfg.attn_impl))
            if not self.model_parallel:  # (ModelParallel makes the tables of the part it keeps)
                self.model.make_buffers(self.device)
        else:
            self.model = Transformer(self.model_config, attn_impl=cfg.attn_impl).to(self.device)
        self.model.checkpointing = cfg.checkpointing
        # (the model-parallel parts compute their loss from their own layers: the vocabulary-sharded head's)
        self.model.fused_loss = cfg.fused_loss and not self.model_parallel
        self.setup_qat(self.model)

    def setup_qat(self, model):
        """With cfg.qat: model's block linears train quantization-aware (flashlm.quant.qat)."""
        from flashlm.quant.qat import apply_qat

        if self.cfg.qat is not None:
            layers = apply_qat(model, self.cfg.qat, self.cfg.qat_group_size, lsq=self.cfg.qat_lsq)
            steps = " and learned steps" if self.cfg.qat_lsq else ""
            self.log(f"qat: {len(layers)} block linears train with their {self.cfg.qat} forward{steps}")

    def _l1_params(self) -> list:
        """The trainable parameters the L1 penalty covers (none when cfg.l1 is 0)."""
        if not self.cfg.l1:
            return []
        found = matching_parameters(self.model, self.cfg.l1_params)
        params = [p for p in found.values() if p.requires_grad]
        if not params:
            raise ValueError(f"l1_params: {self.cfg.l1_params!r} matches no trainable parameter")
        return params

    def _pick_device(self, name: str) -> torch.device:
        if name != "auto":
            return ops.check_device(name)
        if torch.cuda.is_available():
            from flashlm.parallel.cuda_mesh import local_gpu

            index = local_gpu()  # one GPU per rank of the host, refused by name when there are fewer
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def _barrier(self):
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _average(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks."""
        if self.distributed:
            import flashlm.dist as fd

            value = value.detach().float().reshape(1).clone()
            fd.all_reduce(value, op="avg")
        return float(value)

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST[self.cfg.precision])

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The checkpoint (collective: the parameters and dp.state_dict()'s optimizer state are gathered; where no
        rank holds the model, tensor by tensor onto rank 0 alone, whose checkpoint is the one saved)."""
        tok = self.data.tokenizer()
        model = self.full_state_dict()
        # (ModelParallel's state_dict gives rank 0 alone the state already)
        optimizer = self.dp.state_dict() if self.model_parallel else \
            self.dp.state_dict(rank0_only=self.model_init is not None)
        return {"model_config": self.model_config.to_dict(), "model": model,
                "tokenizer": tok.to_str(), "eos_token_id": self.data.eos_id, "step": self.step,
                "train_config": self.cfg.to_dict(), "optimizer": optimizer,
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "data": self.train_batches.state_dict(),
                "metrics": list(self.metrics),
                "sparsity_masks": self.masks.state_dict(self.model) if self.masks is not None else None}

    def load_state_dict(self, state: dict):
        saved = state["model_config"]
        if saved != self.model_config.to_dict():
            raise ValueError(f"checkpoint: its model {saved} differs from this run's {self.model_config.to_dict()}")
        if self.model_init is not None:  # every rank copies its part (its tp slices, its ZeRO-3 shards) out
            self.dp.load_full_state_dict(state["model"])
        else:
            with self.dp.full_parameters():  # ZeRO-3 (QAT's model): every rank then keeps its slice
                self.model.load_state_dict(state["model"])
        self.load_loop_state(state)

    def full_state_dict(self) -> dict:
        """The model's full tensors, float32 on the CPU (collective). Where no rank holds the model (model
        parallelism, ZeRO-3 started on the meta device) they are gathered one at a time and rank 0 alone holds
        them (the other ranks get {})."""
        if self.model_init is not None:
            return self.dp.full_state_dict()
        # ZeRO-3 of QAT's model: gathered from the shards (a checkpoint holds full tensors), copied before freed.
        with self.dp.full_parameters():
            return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self.model.state_dict().items()}

    def full_model(self):
        """The full model with its current values (collective): self.model, or where no rank holds it (model
        parallelism, ZeRO-3 started on the meta device) a Transformer built on rank 0 from the tensors gathered
        one at a time; None on the other ranks."""
        from flashlm.models import Transformer

        if self.model_init is None:
            return self.model  # (ZeRO-3 of QAT's model: inside dp.full_parameters())
        state = self.dp.full_state_dict()
        if not self.is_main:
            return None
        with torch.device("meta"):
            model = Transformer(self.model_config, attn_impl=self.cfg.attn_impl)
        model.load_state_dict(state, assign=True)
        model.make_buffers()
        return model.to(self.device)

    def load_loop_state(self, state: dict):
        """What the loop itself saved: optimizer, scaler, RNG states, data position, step and metrics."""
        self.dp.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        # Every rank stands at the same place of its shard; the saved position is rank 0's.
        self.train_batches.load_state_dict(carried_position(state["data"], self.train_batches))
        self.step = int(state["step"])
        self.metrics = list(state["metrics"])
        if self.masks is not None:
            self.masks.load_state_dict(self.model, state.get("sparsity_masks"))

    def save_checkpoint(self):
        state = self.state_dict()
        if self.is_main:
            self.checkpoints.save(state, self.step)

    # -- the loop ------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        cfg = self.cfg
        lr = learning_rate(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, max_steps=cfg.max_steps)
        for group in self.dp.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        router_sums = {}  # a MoE model's load-balancing and z-loss terms, summed over the micro-batches
        for micro in range(cfg.grad_accum):
            # (x, y), or more tensors for a model that takes them (distillation's stored teacher logits)
            batch = [t.to(self.device, non_blocking=True) for t in next(self.train_batches)]
            sync = micro == cfg.grad_accum - 1  # only the last backward averages gradients over ranks
            router = {}
            if self.model_parallel:  # (no MoE: TrainConfig refuses experts with --tp/--pp/--cp)
                with contextlib.nullcontext() if sync else self.dp.no_sync():
                    loss = self.dp.forward_backward(*batch, self.scaler.loss_scale / cfg.grad_accum, self._autocast)
            else:
                with contextlib.nullcontext() if sync else self.dp.no_sync():
                    with self._autocast():
                        _, loss = self.model(*batch)
                    objective = loss + l1_penalty(self.l1_params, cfg.l1) if self.l1_params else loss
                    penalty, router = moe_aux_losses(self.model, cfg.router_aux_coef, cfg.router_z_coef)
                    objective = objective + penalty if penalty is not None else objective
                    self.scaler.scale(objective / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for name, value in router.items():
                router_sums[name] = router_sums.get(name, 0.0) + value
        self.dp.finish_gradients()
        grad_norm = self.scaler.step(self.dp, cfg.grad_clip)
        if self.masks is not None:
            self.masks.apply()  # the step moved masked weights off zero (AdamW's momentum, weight decay)
        self.dp.zero_grad()
        self.step += 1
        record = {"step": self.step, "loss": self._average(loss_sum / cfg.grad_accum), "lr": lr,
                  "grad_norm": grad_norm}
        record |= {name: self._average(total / cfg.grad_accum) for name, total in router_sums.items()}
        if self.scaler.enabled:
            record["loss_scale"] = self.scaler.loss_scale
            record["skipped"] = grad_norm is None
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first eval_batches batches of the held-out split (every rank its
        shard, averaged)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.eval_batches):
            x, y = self.val_batches.batch(0, i)
            if self.model_parallel:
                loss = self.dp.evaluate_loss(x.to(self.device), y.to(self.device), self._autocast)
            else:
                with self._autocast():
                    _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.float()
        self.model.train()
        return self._average(total / self.eval_batches)

    def _append_metrics(self, record: dict):
        self.metrics.append(record)
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _rewrite_metrics(self):
        from flashlm.train.checkpoint import atomic_write

        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(m) + "\n" for m in self.metrics)
        atomic_write(self.out_dir / "metrics.jsonl", lambda f: f.write(text.encode()))

    def _out_of_time(self, start: float) -> bool:
        """Whether time_limit has passed, as rank 0 sees it, so that every rank stops at the same step."""
        if self.cfg.time_limit <= 0:
            return False
        flag = torch.tensor([float(time.time() - start >= self.cfg.time_limit)])
        if self.distributed:
            import flashlm.dist as fd

            fd.broadcast(flag, src=0)
        return bool(flag.item())

    def train(self, callback=None) -> list:
        """Trains to max_steps (or until time_limit) and returns the metrics. callback(trainer, record) runs
        after every step."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.peak_flops is None:
            # MFU's ceiling: a float32 matmul on the CPU, a matmul in the autocast dtype on a GPU.
            dtype = _AUTOCAST.get(cfg.precision, torch.float32) if self.device.type == "cuda" else torch.float32
            self.peak_flops = measure_peak_flops(self.device, dtype)
            self.log(f"flashlm train: {self.num_params / 1e6:.2f}M parameters, "
                     f"{self.flops_per_token / 1e6:.1f} MFLOP/token, {self.tokens_per_step} tokens/step, "
                     f"{self.world_size} rank(s) on {self.device}; peak {self.peak_flops / 1e9:.1f} GFLOP/s "
                     f"measured with a {str(dtype).replace('torch.', '')} matmul (MFU's denominator)")
        flops_per_token = self.flops_per_token
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.is_main and cfg.progress),
                   desc="train", dynamic_ncols=True)
        start = time.time()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            record["tokens_per_s"] = self.tokens_per_step / dt
            record["mfu"] = flops_per_token * record["tokens_per_s"] / (self.peak_flops * self.world_size)
            last = self.step == cfg.max_steps
            stop = self._out_of_time(start)
            if self.step % cfg.eval_interval == 0 or last or stop:
                record["val_loss"] = self.evaluate()
                record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
            self._append_metrics(record)
            if self.is_main and "val_loss" in record:
                plot_losses(self.metrics, self.out_dir / "loss.png")
                bar.write(f"step {self.step}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.2f}")
            if self.step % cfg.ckpt_interval == 0 or last or stop:
                self.save_checkpoint()
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{100 * record['mfu']:.1f}%")
            bar.update(1)
            if callback is not None:
                callback(self, record)
            if stop:
                self.log(f"flashlm train: time limit of {cfg.time_limit:g} s reached at step {self.step}")
                break
        bar.close()
        return self.metrics

    @torch.no_grad()
    def sample(self, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40, model=None) -> str:
        """Text generated from the end-of-document token (a fresh document), with a fixed generator, by
        `model` (default: self.model)."""
        from flashlm.runtime.simple_generate import generate

        tok = self.data.tokenizer()
        idx = torch.tensor([[self.data.eos_id]], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        model = self.model if model is None else model
        model.eval()
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
        model.train()
        # The tokenizer drops the end-of-document token; show it as the blank line that separated documents.
        ids, pieces, current = out[0, 1:].tolist(), [], []
        for i in ids + [self.data.eos_id]:
            if i == self.data.eos_id:
                pieces.append(tok.decode(current))
                current = []
            else:
                current.append(i)
        return "\n\n".join(pieces)


def carried_position(saved: dict, batches) -> dict:
    """The saved data position for `batches` on this rank: a position carries across layouts (the dp size
    and the batch per replica) that keep the global batch, since rank r of n takes sequences r, r + n, ... of
    the same shuffled order."""
    mine = dict(saved, rank=batches.rank)
    if saved.get("batch_size", 0) * saved.get("world_size", 0) == batches.batch_size * batches.world_size:
        mine.update(batch_size=batches.batch_size, world_size=batches.world_size)
    return mine


def run_training(cfg: TrainConfig, resume=False) -> list:
    """`flashlm train`: train, then print a sample from rank 0."""
    import flashlm.dist as fd

    trainer = Trainer(cfg, resume=resume)
    try:
        metrics = trainer.train()
        if cfg.sample_tokens > 0:
            # Every rank joins the gather (full_model's tensor by tensor, or ZeRO-3's of QAT's model); rank 0 alone
            # samples.
            gather = contextlib.nullcontext() if trainer.model_init is not None else trainer.dp.full_parameters()
            with gather:
                model = trainer.full_model()
                if trainer.is_main:
                    print("-- sample --")
                    print(trainer.sample(cfg.sample_tokens, model=model))
    finally:
        trainer.dp.close()
        if fd.is_initialized():
            fd.destroy()
    return metrics


def saved_job_config(out_dir, key: str, what: str, overrides: dict) -> dict:
    """The job configuration a subclass's checkpoints save under `key` (fine-tuning, distillation), from
    out_dir's latest checkpoint (none: empty), with `overrides` (None values ignored) on top. what: the job's
    name in the error for a checkpoint of another kind."""
    path = latest_checkpoint(out_dir)
    values = {}
    if path is not None:
        values = load_checkpoint(path).get(key)
        if not isinstance(values, dict):
            raise ValueError(f"checkpoint: {path} is not a {what} run's")
    return dict(values, **{k: v for k, v in overrides.items() if v is not None})


def resume_config(out_dir, preset=None, toml_path=None, overrides=None) -> TrainConfig:
    """The configuration of the run saved in out_dir's latest checkpoint, with `overrides` (and a TOML file)
    applied on top: `flashlm train --out-dir X --resume` needs no other flag to continue."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return TrainConfig.from_sources(preset, toml_path, dict(overrides or {}, out_dir=str(out_dir)))
    saved = load_checkpoint(path).get("train_config")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint: {path} holds no train_config")
    # The layout is the launch's, not the run's: a checkpoint holds full tensors and resumes at any other.
    values = {k: v for k, v in saved.items() if k not in ("dp", "tp", "pp", "cp", "sequence_parallel")}
    if toml_path is not None:
        import tomllib

        with open(toml_path, "rb") as f:
            values.update(tomllib.load(f))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(values)
