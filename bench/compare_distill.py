#!/usr/bin/env python3
"""compare_distill: distillation training steps of a small student with its teacher run two ways: a GGUF Q4_0
file through flashlm's inference path (its blocks as they are, GGUF matmuls), and the same weights as a torch
float32 model. Student training tokens/s and peak memory of each.

Cases (the same student, batch, tokens, loss and optimiser on both sides; only the teacher differs):
  gguf-teacher   the teacher loaded from its Q4_0 file as `flashlm distill --teacher FILE` loads it
  float-teacher  the Q4_0 file's weights dequantized to float32 (written once, beforehand, as a torch file) in a
                 flashlm Transformer: the torch float model a user would otherwise run, frozen, no gradients
  no-teacher     fixed logits made before the measurement in place of a teacher: the student's own step, whose
                 memory, taken from each teacher case's, leaves the teacher's own (its weights and its forward)
Each step: the teacher's forward (no gradient), then the student's forward and backward through the fused
distillation loss (alpha 0.5, T 2, full vocabulary) and flashlm's AdamW. Both teachers compute the same logits up
to the Q4_0 kernel's rounding: the first step's loss must agree to 1e-3 (relative), or the report says so.

Each case runs in a fresh Python process, --steps timed steps after --warmup untimed ones, the median step; the
processes take turns case by case for --rounds rounds and the table holds the medians over rounds. Memory: the
process's peak RSS (VmHWM) less its RSS after the imports: teacher weights, student, optimiser state,
activations, allocator caches; the teacher's own memory is a case's less the no-teacher case's (the student's
step and the libraries' first-use buffers are the same in every case).

Goal: the GGUF teacher costs <= 1.2x the float teacher's step time at <= 1/3 of its memory.

The loss half (compare_loss.py's measurement, imported): the distillation loss on a final projection, forward
and backward, flashlm's vocabulary-chunked kernels against torch eager (F.log_softmax + F.kl_div, and
F.cross_entropy for the hard term) on the full [T, V] logits, at vocab 32000 and 151936 (T 512, d 512), the
soft loss alone (KL, T 2) and the whole loss (alpha 0.5). Time: the two take turns, the median of --loss-reps
runs; memory: the peak resident memory one step adds, each side in a fresh process. The two losses must agree
to 1e-4 first.

Goal: the fused loss >= 2x torch eager's speed at <= 1/4 of its peak extra memory at vocab 152k.

The decode half: a pruned model (half its heads, so head_dim * n_head is half of d_model, and half its MLP
channels) against its original, GGUF files of F32 weights (float modules) and Q8_0 (the native decoder stack),
decode tokens/s through the engine.

Run (from the repository root, with flashlm installed):
  python bench/compare_distill.py             # teacher d_model 1024, 8 layers, vocab 8192; student 2 x 256; B 4, T 128
  python bench/compare_distill.py --rounds 3 --steps 5
  python bench/compare_distill.py --part loss --loss-reps 3    # the fused loss only
  python bench/compare_distill.py --part prune --loss-reps 5   # decode speed of a pruned model and its original
  python bench/compare_distill.py --quick     # tiny models, one round: CI smoke, well under a minute
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import compare_loss
from bench_util import cpu_model, fmt, median_seconds, print_table

TEACHER = dict(arch="llama", vocab_size=8192, n_layer=8, n_head=16, d_model=1024, seq_len=256)
STUDENT = dict(n_layer=2, n_head=4, d_model=256)
QUICK_TEACHER = dict(arch="llama", vocab_size=512, n_layer=2, n_head=4, d_model=128, seq_len=64)
QUICK_STUDENT = dict(n_layer=1, n_head=2, d_model=64)
CASES = ("gguf-teacher", "float-teacher", "no-teacher")
LOSS_RTOL = 1e-3
LOSS_CASES = [(32000, 512, 512), (151936, 512, 512)]  # (vocab, tokens, d) of the loss half
PRUNE_MODEL = dict(arch="llama", vocab_size=1024, n_layer=4, n_head=4, d_model=128, d_ff=384, seq_len=256)  # README's


def proc_status_bytes(key: str) -> int:
    """VmRSS or VmHWM of this process (the peak since exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"compare_distill: /proc/self/status has no {key} (Linux only)")


def write_teachers(cfg_dict: dict, folder: str) -> dict:
    """A random-weight teacher as a Q4_0 GGUF file (no tokenizer: the bench feeds token ids), and the same file's
    weights dequantized to float32 in a torch file, the float teacher's: both teachers compute the same function."""
    import warnings

    from flashlm.io import load_model
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_gguf
    from flashlm.train.finetune import merged_state_dict

    torch.manual_seed(0)
    cfg = ModelConfig(**cfg_dict)
    paths = {"gguf": os.path.join(folder, "teacher-q4_0.gguf"), "float": os.path.join(folder, "teacher-f32.pt"),
             "config": os.path.join(folder, "teacher-config.json")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer": llama.cpp is not the reader here
        export_gguf(Transformer(cfg).state_dict(), cfg, None, paths["gguf"], type="Q4_0")
    loaded = load_model(paths["gguf"], tokenizer=False)
    own = Transformer(loaded.config).state_dict()
    state = {k: v for k, v in merged_state_dict(loaded.model).items() if k in own}  # a tied head is the embedding
    torch.save({"model_config": loaded.config.to_dict(), "model": state}, paths["float"])
    with open(paths["config"], "w") as f:
        json.dump(loaded.config.to_dict(), f)
    return paths


class LogitsOnly(torch.nn.Module):
    """The no-teacher case's stand-in: fixed logits [B, T, V] made before the measurement, what a teacher hands
    the loss, without the teacher (its weights, its forward)."""

    def __init__(self, cfg, batch: int, seq: int):
        super().__init__()
        self.cfg, self.blocks = cfg, []
        self.fixed = torch.randn(batch, seq, cfg.vocab_size, generator=torch.Generator().manual_seed(3))

    def hidden_states(self, x):
        return x

    def logits(self, hidden):
        return self.fixed


def load_teacher(case: str, paths: dict):
    """The GGUF teacher as `flashlm distill` loads it, or the float one memory-mapped into a Transformer (one copy
    of its weights, as a user's float model would have)."""
    if case == "gguf-teacher":
        from flashlm.io import load_model

        return load_model(paths["gguf"], tokenizer=False).model
    from flashlm.io.loaded import empty_model
    from flashlm.models import ModelConfig

    saved = torch.load(paths["float"], mmap=True, weights_only=True)
    model = empty_model(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"], assign=True)
    return model.eval().requires_grad_(False)


def run_case(case: str, paths: dict, student_dict: dict, batch: int, seq: int, steps: int, warmup: int) -> dict:
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.distill import DistillConfig, DistillModel
    from flashlm.train.optim import AdamW

    if case == "no-teacher":
        with open(paths["config"]) as f:
            teacher = LogitsOnly(ModelConfig.from_dict(json.load(f)), batch, seq)
    base_rss = proc_status_bytes("VmRSS")
    if case != "no-teacher":
        teacher = load_teacher(case, paths)
    torch.manual_seed(1)
    student = Transformer(ModelConfig(**dict(teacher.cfg.to_dict(), head_dim=None, n_kv_head=None, d_ff=None,
                                             **student_dict)))
    model = DistillModel(student, teacher, DistillConfig(teacher=paths["gguf"], alpha=0.5, temperature=2.0),
                         teacher.cfg.to_dict()).train()
    opt = AdamW(student.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, teacher.cfg.vocab_size, (batch, seq), generator=gen)
    y = torch.randint(0, teacher.cfg.vocab_size, (batch, seq), generator=gen)
    times, first_loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if first_loss is None:
            first_loss = loss.item()
        if i >= warmup:
            times.append(dt)
    step_s = statistics.median(times)
    return {"step_s": step_s, "tok_s": batch * seq / step_s, "mem": proc_status_bytes("VmHWM") - base_rss,
            "loss0": first_loss}


def spawn(case: str, args, paths: dict, student: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--paths", json.dumps(paths), "--student",
           json.dumps(student), "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"compare_distill: {case} failed: {tail[:300]}")
    return json.loads(lines[-1])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="processes per case, the cases taking turns")
    ap.add_argument("--quick", action="store_true", help="tiny models, one round: a smoke run")
    ap.add_argument("--part", choices=("all", "teacher", "loss", "prune"), default="all",
                    help="the teacher half, the fused-loss half, the pruned model's decode speed, or all (default)")
    ap.add_argument("--loss-reps", type=int, default=3, help="timed runs of each loss per case (and of each decode)")
    ap.add_argument("--out", default=None, help="write the table to this Markdown file (default: none)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seq, args.steps, args.warmup, args.rounds = 32, 2, 1, 1
    for name in ("batch", "seq", "steps", "rounds", "loss_reps"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup: must be >= 0, got {args.warmup}")
    return args


def teacher_half(args):
    """The GGUF teacher against the float one: (lines, header, rows, whether the first-step losses agree)."""
    teacher, student = (QUICK_TEACHER, QUICK_STUDENT) if args.quick else (TEACHER, STUDENT)
    if args.seq > teacher["seq_len"]:
        sys.exit(f"compare_distill: error: --seq {args.seq} exceeds the teacher's seq_len {teacher['seq_len']}")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="compare_distill-") as folder:
        paths = write_teachers(teacher, folder)
        size = os.path.getsize(paths["gguf"])
        runs = {c: [] for c in CASES}
        for rnd in range(args.rounds):
            for case in CASES if rnd % 2 == 0 else CASES[::-1]:  # neither side always runs first
                runs[case].append(spawn(case, args, paths, student))
    load1 = os.getloadavg()[0]
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("step_s", "tok_s", "mem")} for c in CASES}
    loss = {c: runs[c][0]["loss0"] for c in CASES}
    agree = abs(loss["gguf-teacher"] - loss["float-teacher"]) <= LOSS_RTOL * abs(loss["float-teacher"])
    f, g, base = med["float-teacher"], med["gguf-teacher"], med["no-teacher"]
    own = {c: m["mem"] - base["mem"] for c, m in med.items()}  # what the teacher adds: weights and forward
    lines = [f"compare_distill: teacher {teacher['n_layer']} layers, d_model {teacher['d_model']}, vocab "
             f"{teacher['vocab_size']} (Q4_0 file {size / 2**20:.1f} MiB); student {student['n_layer']} x "
             f"{student['d_model']}; B {args.batch}, T {args.seq}; {args.rounds} round(s) x {args.steps} steps",
             f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; load average {load0:.1f} -> {load1:.1f}",
             f"first-step loss: gguf {loss['gguf-teacher']:.6f}, float {loss['float-teacher']:.6f} "
             f"({'agree' if agree else 'DIFFER'} to {LOSS_RTOL:g})",
             f"goal: GGUF teacher <= 1.2x the float teacher's time ({g['step_s'] / f['step_s']:.2f}x) at <= 1/3 of "
             f"its memory (the teacher's own: {own['gguf-teacher'] / own['float-teacher']:.2f}x; the whole "
             f"process's: {g['mem'] / f['mem']:.2f}x)"]
    header = ["teacher", "step ms", "student tok/s", "peak RSS growth MiB", "the teacher's own MiB",
              "vs float: time", "vs float: memory", "vs float: teacher's memory"]
    rows = [[c, fmt(m["step_s"] * 1e3, ".1f"), fmt(m["tok_s"], ".0f"), fmt(m["mem"] / 2**20, ".0f"),
             fmt(own[c] / 2**20, ".0f"), fmt(m["step_s"] / f["step_s"], ".2f") + "x",
             fmt(m["mem"] / f["mem"], ".2f") + "x", fmt(own[c] / own["float-teacher"], ".2f") + "x"]
            for c, m in med.items()]
    return lines, header, rows, agree


def loss_half(args):
    """The fused distillation loss against torch eager (compare_loss's rows): (lines, header, rows)."""
    cases = compare_loss.QUICK if args.quick else LOSS_CASES
    reps, warmup = (1, 0) if args.quick else (args.loss_reps, 1)
    load0 = os.getloadavg()[0]
    rows = [compare_loss.loss_row(loss, case, reps, warmup) for case in cases for loss in ("kl", "distill")]
    load1 = os.getloadavg()[0]
    lines = [f"fused loss vs torch eager (f32, forward + backward): medians of {reps} run(s); CPU: {cpu_model()}, "
             f"{torch.get_num_threads()} threads; load average {load0:.1f} -> {load1:.1f}",
             "goal: the fused loss >= 2x torch eager's speed at <= 1/4 of its peak extra memory at vocab 152k"]
    return lines, compare_loss.HEADER, rows


class _NoTokenizer:
    """Token ids in, no text out: the decode half's models have no tokenizer (random weights)."""
    eos_token_id = None

    def decode(self, ids):
        return ""


def prune_half(args):
    """Decode speed of a pruned model against its original (--heads-keep 0.5 --ffn-keep 0.5: head_dim * n_head
    becomes half of d_model), each as a GGUF file of F32 weights (float modules) and of Q8_0 (the native decoder
    stack), through the engine: one sequence, greedy, the engines taking turns, the median of --loss-reps runs.
    (lines, header, rows)."""
    import warnings

    from flashlm.io import load_model
    from flashlm.models import ModelConfig, Transformer
    from flashlm.runtime.engine import LLM
    from flashlm.runtime.sampling_params import SamplingParams
    from flashlm.train.export import export_gguf
    from flashlm.train.prune import apply_plan, plan_pruning

    torch.manual_seed(0)
    original = Transformer(ModelConfig(**PRUNE_MODEL))
    pruned = apply_plan(original, plan_pruning(original, heads_keep=0.5, ffn_keep=0.5))
    engines, native = {}, {}
    with tempfile.TemporaryDirectory(prefix="compare_distill-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer"
        for name, model in (("original", original), ("pruned", pruned)):
            for kind in ("F32", "Q8_0"):
                path = os.path.join(folder, f"{name}-{kind}.gguf")
                export_gguf(model.state_dict(), model.cfg, None, path, type=kind)
                llm = LLM(load_model(path, tokenizer=False).model, _NoTokenizer(), max_num_seqs=1)
                engines[(name, kind)] = llm
                native[(name, kind)] = llm.runner.native_decoder() is not None
    prompt, gen = [list(range(1, 9))], 64
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    fns = {key: ((lambda llm=llm: llm.generate(prompt, params)), "cpu") for key, llm in engines.items()}
    load0 = os.getloadavg()[0]
    t = median_seconds(fns, args.loss_reps, 1)
    load1 = os.getloadavg()[0]
    cfg = original.cfg
    lines = [f"decode: a random-weight llama ({cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads of "
             f"{cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}) and the same pruned to "
             f"{pruned.cfg.n_head} heads, d_ff {pruned.cfg.d_ff}; {gen} tokens after 8, greedy, one sequence; "
             f"medians of {args.loss_reps} runs; torch {torch.get_num_threads()} threads, FLASHLM_NUM_THREADS="
             f"{os.environ.get('FLASHLM_NUM_THREADS', 'default')}; load average {load0:.1f} -> {load1:.1f}"]
    header = ["model", "GGUF weights", "parameters", "native decoder", "decode tok/s", "vs original"]
    params_of = {"original": sum(p.numel() for p in original.parameters()),
                 "pruned": sum(p.numel() for p in pruned.parameters())}
    rows = [[name, kind, f"{params_of[name]:,}", "yes" if native[(name, kind)] else "no",
             fmt(gen / t[(name, kind)], ".0f"),
             fmt(t[("original", kind)] / t[(name, kind)], ".2f") + "x"] for name, kind in engines]
    return lines, header, rows


def main():
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, json.loads(args.paths), json.loads(args.student), args.batch, args.seq,
                                  args.steps, args.warmup)))
        return
    halves, agree = [], True
    if args.part in ("all", "teacher"):
        lines, header, rows, agree = teacher_half(args)
        halves.append((lines, header, rows))
    if args.part in ("all", "loss"):
        halves.append(loss_half(args))
    if args.part in ("all", "prune"):
        halves.append(prune_half(args))
    for lines, header, rows in halves:
        for line in lines:
            print(line)
        print_table(header, rows)
    if args.out:
        with open(args.out, "w") as out:
            for lines, header, rows in halves:
                out.write("\n\n".join(lines) + "\n\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n")
                out.write("".join("| " + " | ".join(r) + " |\n" for r in rows) + "\n")
    if not agree:
        sys.exit(1)

if __name__ == "__main__":
    main()
