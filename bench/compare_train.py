#!/usr/bin/env python3
"""compare_train: training throughput of flashlm's stack against plain torch, on the same model and weights.

One training step (forward, backward, clip by global norm, optimizer step, zero_grad) of
  flashlm    flashlm.models.Transformer(cfg, attn_impl="flashlm") + flashlm.train.optim.AdamW (fused kernel):
             flashlm's attention, RMSNorm, GELU(tanh), SwiGLU and rope kernels, forward and backward
  torch      the same weights with attn_impl="sdpa" (F.scaled_dot_product_attention, torch's norms,
             activations and rope) + torch.optim.AdamW in its default implementation for the device (printed:
             on the CPU torch 2.13 picks its for-loop implementation, on CUDA foreach); --torch-optim
             foreach|fused picks another,
  attn-only  (--attn-only) the flashlm side with its norm, activation and rope kernels switched off
             (train_kernels=False) and the logits' loss: flashlm's attention and AdamW, torch's other layers,
             as the flashlm side was before those kernels; the same run shows what they gain,
(--fused-loss: the flashlm sides' loss through the vocabulary-chunked cross-entropy kernel, Transformer.fused_loss,
instead of the lm head's logits and F.cross_entropy) taking turns step by step (the order swaps every round) so that background load hits both, median over --reps
steps after --warmup. Rows: float32 and bf16 autocast on the CPU (bf16 only when asked for on a CPU without
native bf16 matmuls, where torch's bf16 matmul is some 50 times slower than its float32 one); fp16 (with a
GradScaler) and bf16 autocast on CUDA. Each step is split into forward+backward, clip and optimizer (step +
zero_grad) by timers between the phases (with torch.cuda.synchronize on CUDA), so the table shows where the
two sides differ.

Before timing, both sides run one float32 step on the same batch and must give the same loss and gradient
norm (relative 1e-4): the comparison is of the same work.

MFU = model.flops_per_token(T) * tokens/s / peak, the peak being a torch matmul (--peak-n, the fastest of 5)
measured in the same run in the row's dtype (float32 for f32 rows, bf16 for bf16 rows, fp16 for fp16 rows;
for CPU bf16 rows the faster of the bf16 and float32 peaks: without native bf16 matmuls torch's bf16 matmul is no
ceiling). --clock cpu times the peak by CPU time too (FLOP per CPU-second).
On an oversubscribed machine torch's OpenMP workers, which spin after each parallel op (OMP_WAIT_POLICY unset),
stall every op's barrier (a chain of small torch ops 15 times slower at load 9 on 2 vCPUs, on both sides);
OMP_WAIT_POLICY=PASSIVE or --threads 1 give steadier figures there. The policy in force is printed.

--profile prints, per side, the step's time in attention forward and backward, matmuls, the rest of
forward+backward, clip and optimizer (torch.profiler, after the timed steps, the sides again taking turns).

Run (from the repository root, with flashlm installed):
  python bench/compare_train.py                        # gpt2 d256 L4 T256 and llama d256 L4 GQA 8/2, B 2
  python bench/compare_train.py --models llama --dtypes f32 --batch 8
  python bench/compare_train.py --profile --reps 5     # and where each step's time goes
  python bench/compare_train.py --profile --profile-top 15  # and each side's top operators by self CPU time
  python bench/compare_train.py --threads 1            # one thread on each side
  OMP_WAIT_POLICY=PASSIVE python bench/compare_train.py  # torch's OpenMP workers sleep instead of spinning
  python bench/compare_train.py --attn-only --seq-len 1024  # also the side without the norm/activation/rope kernels
  python bench/compare_train.py --without LayerNorm     # also the flashlm side on torch's LayerNorm
  python bench/compare_train.py --fused-loss-side      # also the flashlm side with the fused loss
  python bench/compare_train.py --clock cpu            # steps timed in process CPU-seconds (a busy machine)
  python bench/compare_train.py --quick                # well under a minute: CI smoke
"""

import argparse
import os
import statistics
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import flashlm.ops as ops
from bench_util import SETTLE_S, fmt, hardware_line, print_table
from flashlm.models import ModelConfig, Transformer
from flashlm.train.optim import AdamW

# Models sized for a 2-core CPU (B=2: 512 tokens, about 18 GFLOP a step); --quick shrinks them.
MODELS = {
    "gpt2": dict(arch="gpt2", vocab_size=8192, n_layer=4, n_head=4, d_model=256, seq_len=256),
    "llama": dict(arch="llama", vocab_size=8192, n_layer=4, n_head=8, n_kv_head=2, d_model=256, seq_len=256),
}
QUICK = dict(vocab_size=512, n_layer=2, d_model=64, seq_len=64)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIDES = ("flashlm", "torch")  # and "attn-only" with --attn-only
PHASES = ("fwd+bwd", "clip", "optim")
OPTIM = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
CLIP = 1.0
CHECK_RTOL = 1e-4  # float32 loss and gradient norm, flashlm against torch
# --clock: wall time, or the process's CPU time (all its threads: torch's OpenMP workers, flashlm's pool), which a
# busy machine's other jobs do not inflate: a step's cost in CPU-seconds (tokens per CPU-second).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n, reps=5):
    """FLOP/s (by --clock: per CPU-second with cpu) of an n x n x n torch matmul in dtype, the fastest of reps runs (on a shared machine the others
    are the machine's load): the ceiling for MFU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        sync(device)
        t0 = clock()
        torch.mm(a, b)
        sync(device)
        if i:
            best = min(best, clock() - t0)
    return 2 * n**3 / best


def torch_optimizer(params, kind):
    kw = {} if kind == "default" else {kind: True}
    return torch.optim.AdamW(params, weight_decay=WEIGHT_DECAY, **OPTIM, **kw)


def torch_optimizer_name(model, kind, device):
    if kind != "default":
        return kind
    from torch.optim.optimizer import _default_to_fused_or_foreach
    fused, foreach = _default_to_fused_or_foreach(list(model.to(device).parameters()), False, False)
    return "default = " + ("fused" if fused else "foreach" if foreach else "for-loop")


class Side:
    """One model + optimizer (+ GradScaler for fp16) and its timed training step."""

    def __init__(self, model, make_optimizer, device, dtype):
        self.model = model.to(device).train()
        self.opt = make_optimizer(model.param_groups(WEIGHT_DECAY))
        self.device = device
        self.autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, x, y):
        """One training step; returns (loss, grad norm, {phase: seconds}). The phases are also named for
        torch.profiler (--profile)."""
        sync(self.device)
        t0 = clock()
        with record_function("fwd+bwd"):
            with self.autocast:
                _, loss = self.model(x, y)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            sync(self.device)
        t1 = clock()
        with record_function("clip"):
            if self.scaler:
                self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            sync(self.device)
        t2 = clock()
        with record_function("optim"):
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            sync(self.device)
        t3 = clock()
        return loss, norm, dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)))


def without_train_kernels(model, classes=None):
    """model with flashlm's norm, activation and rope kernels switched off (its attention stays flashlm's);
    classes: only in modules of these class names (e.g. LayerNorm, GeluMLP)."""
    for module in model.modules():
        if hasattr(module, "train_kernels") and (classes is None or type(module).__name__ in classes):
            module.train_kernels = False
    return model


def make_sides(cfg, device, dtype, torch_optim, attn_only=False, fused_loss=False, without=(), fused_side=False):
    flash = Transformer(cfg, attn_impl="flashlm")
    flash.fused_loss = fused_loss
    base = Transformer(cfg, attn_impl="sdpa")
    base.load_state_dict(flash.state_dict())
    flash_optim = lambda g: AdamW(g, weight_decay=WEIGHT_DECAY, **OPTIM)  # noqa: E731
    sides = {"flashlm": Side(flash, flash_optim, device, dtype),
             "torch": Side(base, lambda g: torch_optimizer(g, torch_optim), device, dtype)}
    if attn_only:
        before = without_train_kernels(Transformer(cfg, attn_impl="flashlm"))
        before.load_state_dict(flash.state_dict())  # and the logits' loss, whatever --fused-loss says
        sides["attn-only"] = Side(before, flash_optim, device, dtype)
    for name in without:  # the flashlm side less one module's kernels: what they gain, in the same run
        less = without_train_kernels(Transformer(cfg, attn_impl="flashlm"), (name,))
        less.load_state_dict(flash.state_dict())
        less.fused_loss = fused_loss
        sides[f"flashlm -{name}"] = Side(less, flash_optim, device, dtype)
    if fused_side:
        other = Transformer(cfg, attn_impl="flashlm")
        other.load_state_dict(flash.state_dict())
        other.fused_loss = not fused_loss
        sides["flashlm " + ("-" if fused_loss else "+") + "fused-loss"] = Side(other, flash_optim, device, dtype)
    return sides


def batch(cfg, args, device):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (args.batch, cfg.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def check_same_work(cfg, args, device):
    """One float32 step on each side from the same weights and batch: losses and gradient norms must agree.
    On CUDA flashlm's kernels take fp16/bf16, so there the check runs on the CPU (the same model code)."""
    where = "cpu" if device == "cuda" else device
    sides = make_sides(cfg, where, torch.float32, args.torch_optim, fused_loss=args.fused_loss)
    x, y = batch(cfg, args, where)
    (lf, nf, _), (lt, nt, _) = (sides[s].step(x, y) for s in SIDES)  # attn-only is torch's layers: as torch
    lf, lt, nf, nt = (float(t.detach()) for t in (lf, lt, nf, nt))
    for what, a, b in (("loss", lf, lt), ("grad norm", nf, nt)):
        if abs(a - b) > CHECK_RTOL * abs(b):
            raise SystemExit(f"{cfg.arch}: first-step {what} differs: flashlm {a:.8g} vs torch {b:.8g} "
                             f"(relative {abs(a - b) / abs(b):.2e} > {CHECK_RTOL:g})")
    return lf, lt


def time_steps(sides, x, y, args):
    """{side: {phase: median seconds}, with "step" the median of the whole step}. Sides take turns, the order
    swapping each round."""
    for _ in range(args.warmup):
        for side in sides.values():
            side.step(x, y)
    times = {name: {p: [] for p in PHASES + ("step",)} for name in sides}
    order = tuple(sides)
    for r in range(args.reps):
        for name in (order if r % 2 == 0 else order[::-1]):
            _, _, phases = sides[name].step(x, y)
            for p, t in phases.items():
                times[name][p].append(t)
            times[name]["step"].append(sum(phases.values()))
            time.sleep(SETTLE_S)
    return {name: {p: statistics.median(t) for p, t in ts.items()} for name, ts in times.items()}


def profile_sides(sides, x, y, steps):
    """{side: [torch.profiler's per-operator averages of one step]}, one profiled step per side in turn (the
    order swapping each round, as in time_steps) so that the breakdowns see the same background load."""
    averages = {name: [] for name in sides}
    order = tuple(sides)
    for r in range(steps):
        for name in (order if r % 2 == 0 else order[::-1]):
            side = sides[name]
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device == "cuda" else [])
            with profile(activities=activities) as prof:
                side.step(x, y)
            averages[name].append(prof.key_averages())
            time.sleep(SETTLE_S)
    return averages


# Operator families for --profile, by substring of the operator name; the first family that matches wins
# (so torch's attention backward, whose name contains its forward's, is tested first). flashlm's forward kernel
# runs inside the autograd node torch names GeneratedBackwardFor_flashlm_flash_attn_forward_default.
FAMILIES = (
    ("attn bwd", ("flashlm::flash_attn_backward", "flash_attn_forward_defaultBackward",
                  "_flash_attention_for_cpu_backward", "attention_backward")),
    ("attn fwd", ("flashlm::flash_attn_forward", "GeneratedBackwardFor_flashlm_flash_attn_forward_default",
                  "_scaled_dot_product_flash_attention", "_flash_attention_forward",
                  "_efficient_attention_forward", "_cudnn_attention_forward")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
)


def profile_row(label, step_averages, device):
    """ms per step: the phases (their wall time on the calling thread, which synchronizes at each phase's
    end) and, inside fwd+bwd, the operator families' self time (on CUDA their kernels' time), the rest being
    norms, activations, embedding, loss and autograd's own work."""
    phase = {p: 0.0 for p in PHASES}
    family = {f: 0.0 for f, _ in FAMILIES}
    steps = len(step_averages)
    for e in (e for averages in step_averages for e in averages):
        if e.key in phase:
            phase[e.key] += e.cpu_time_total / 1e3 / steps
            continue
        for f, names in FAMILIES:
            if any(n in e.key for n in names):
                self_us = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
                family[f] += self_us / 1e3 / steps
                break
    other = phase["fwd+bwd"] - sum(family.values())
    return [label, *(fmt(phase[p], ".1f") for p in PHASES[:1]), *(fmt(v, ".1f") for v in family.values()),
            fmt(other, ".1f"), *(fmt(phase[p], ".1f") for p in PHASES[1:])]


def top_operators(step_averages, n):
    """[(operator, self ms per step)]: the n operators with the most self time (CPU) over the profiled steps,
    the step's phase records left out."""
    total = {}
    for e in (e for averages in step_averages for e in averages):
        if e.key not in PHASES:
            total[e.key] = total.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / len(step_averages)
    return sorted(total.items(), key=lambda kv: -kv[1])[:n]


def print_top_operators(label, step_averages, n):
    ops_ms = top_operators(step_averages, n)
    step = sum(e.self_cpu_time_total for averages in step_averages for e in averages
               if e.key not in PHASES) / 1e3 / len(step_averages)
    print(f"\n{label}: top {n} operators by self CPU time (ms per step; % of the step's self CPU time "
          f"{step:.1f} ms)")
    print_table(["operator", "self ms", "%"], [[k, fmt(v, ".1f"), fmt(100 * v / step, ".1f")] for k, v in ops_ms])


PROFILE_HEADER = ["side (ms/step)", "fwd+bwd", *(f for f, _ in FAMILIES), "other", *PHASES[1:]]


def run_model(name, args, device, peaks):
    spec = dict(MODELS[name])
    if args.quick:
        spec.update(QUICK)
    if args.seq_len:
        spec["seq_len"] = args.seq_len
    cfg = ModelConfig(**spec)
    lf, lt = check_same_work(cfg, args, device)
    flops = Transformer(cfg).flops_per_token()
    gqa = f" GQA {cfg.n_head}/{cfg.n_kv_head}" if cfg.n_kv_head != cfg.n_head else ""
    print(f"\n{device} {name}: d={cfg.d_model} L={cfg.n_layer} H={cfg.n_head}{gqa} hd={cfg.head_dim} "
          f"d_ff={cfg.d_ff} V={cfg.vocab_size} T={cfg.seq_len} B={args.batch}; {flops / 1e6:.1f} MFLOP/token; "
          f"first-step f32 loss flashlm {lf:.6f} torch {lt:.6f}")
    rows, prof_rows, top_tables = [], [], []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        sides = make_sides(cfg, device, dtype, args.torch_optim, args.attn_only, args.fused_loss, args.without,
                           args.fused_loss_side)
        x, y = batch(cfg, args, device)
        t = time_steps(sides, x, y, args)
        tokens = args.batch * cfg.seq_len
        for side in sides:
            tps = tokens / t[side]["step"]
            rows.append([f"{dname} {side}", fmt(tps, ",.0f"), fmt(t["torch"]["step"] / t[side]["step"], ".2f"),
                         *(fmt(t[side][p] * 1e3, ".1f") for p in PHASES), fmt(t[side]["step"] * 1e3, ".1f"),
                         fmt(flops * tps / peaks[dname] * 100, ".1f")])
        if args.profile:
            averages = profile_sides(sides, x, y, args.profile_steps)
            prof_rows += [profile_row(f"{dname} {side}", averages[side], device) for side in sides]
            if args.profile_top:
                top_tables += [(f"{name} {dname} {side}", averages[side]) for side in sides]
    print_table(["dtype side", "tokens/s" if clock is time.perf_counter else "tokens/CPU-s", "x torch", *(f"{p} ms" for p in PHASES), "step ms", "MFU %"], rows)
    if prof_rows:
        print(f"\ntorch.profiler, {args.profile_steps} steps a side: where the time goes (self time of each operator "
              f"family inside fwd+bwd; 'other' is the rest of fwd+bwd)")
        print_table(PROFILE_HEADER, prof_rows)
    for label, averages in top_tables:
        print_top_operators(label, averages, args.profile_top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                    help="default: fp16 bf16 on CUDA; f32 bf16 on the CPU (f32 alone without native bf16 matmuls)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda where present, else cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the model's (256)")
    ap.add_argument("--torch-optim", default="default", choices=("default", "foreach", "fused"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default: CPU 1024, CUDA 8192)")
    ap.add_argument("--profile", action="store_true", help="also profile each side (torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="with --profile: also each side's N operators with the most self CPU time")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's and flashlm's CPU threads (default: torch's own choice, which flashlm follows)")
    ap.add_argument("--fused-loss", action="store_true",
                    help="the flashlm sides' loss through the vocabulary-chunked kernel (Transformer.fused_loss)")
    ap.add_argument("--attn-only", action="store_true",
                    help="also time the flashlm side without its norm, activation and rope kernels")
    ap.add_argument("--without", nargs="+", default=(), metavar="CLASS",
                    help="also a flashlm side with the training kernels of these module classes switched off "
                         "(LayerNorm, RMSNorm, GeluMLP, GatedMLP, Attention): what each gains, in the same run")
    ap.add_argument("--fused-loss-side", action="store_true",
                    help="also a flashlm side with the other loss (the fused one, or with --fused-loss the logits')")
    ap.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                    help="time steps by wall time, or by the process's CPU time (all threads; CPU only): on a "
                         "busy machine, what a step costs whatever else runs")
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        ops.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    slow_bf16 = device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if args.dtypes is None:
        if device == "cuda":
            args.dtypes = ["fp16", "bf16"]
        else:
            args.dtypes = ["f32"] if slow_bf16 and not args.quick else ["f32", "bf16"]
    if device == "cuda" and args.clock == "cpu":
        ap.error("--clock cpu: CPU runs only (a GPU's work is not the process's CPU time)")
    global clock
    clock = CLOCKS[args.clock]
    if device == "cpu" and "fp16" in args.dtypes:
        ap.error("--dtypes fp16: CPU rows are f32 and bf16 (flashlm's CPU kernels take float32 and bfloat16)")
    if device == "cuda" and "f32" in args.dtypes:
        ap.error("--dtypes f32: CUDA rows are fp16 and bf16 (flashlm's CUDA attention would cast f32 to bf16)")
    if args.peak_n is None:
        args.peak_n = 8192 if device == "cuda" else 1024
    if args.quick:
        args.batch, args.reps, args.warmup, args.peak_n, args.profile_steps = 2, 3, 1, 512, 1
    if args.batch < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--batch and --reps must be >= 1, --warmup >= 0")
    print(hardware_line(device, ops, f"torch {torch.get_num_threads()} threads, "
                                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
                                     f"clock {args.clock}"))
    probe = Transformer(ModelConfig(**{**MODELS["gpt2"], **QUICK}))
    print(f"torch.optim.AdamW: {torch_optimizer_name(probe, args.torch_optim, device)}; flashlm AdamW: fused kernel")
    # Without native bf16 (AVX512-BF16/AMX) torch's CPU bf16 matmul runs far below float32 (0.1-0.7 against
    # 30-90 GFLOP/s on a 2-vCPU Zen 3; 23-30 against 70-130 on a 2-vCPU AVX-512 Xeon without AVX512-BF16, where
    # mkldnn still reports bf16 support), below what a bf16 training step's own matmuls reach, which would put
    # MFU over 100%: bf16 rows on the CPU are measured against the faster of the bf16 and float32 peaks.
    cpu_bf16 = device == "cpu" and "bf16" in args.dtypes
    measured = sorted(set(args.dtypes) | ({"f32"} if cpu_bf16 else set()))
    peaks = {d: matmul_peak(device, DTYPES[d], args.peak_n) for d in measured}
    bf16_on_f32 = cpu_bf16 and peaks["f32"] > peaks["bf16"]
    print(f"peak, torch matmul {args.peak_n}^3: " + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items())
          + ("; bf16 rows use the f32 peak" if bf16_on_f32 else ""))
    peaks = {d: peaks["f32" if d == "bf16" and bf16_on_f32 else d] for d in args.dtypes}
    if slow_bf16:
        print("this CPU has no native bf16 matmul: bf16 autocast rows are dominated by torch's slow bf16 matmuls "
              "(on both sides); they run only when asked for (--dtypes f32 bf16, or --quick)")
    for name in args.models:
        run_model(name, args, device, peaks)


if __name__ == "__main__":
    main()
