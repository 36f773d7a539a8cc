#!/usr/bin/env python3
"""compare_finetune: LoRA and QLoRA training steps of flashlm against torch + HF `peft`, on one random-weight
llama model: tokens/s and peak memory.

Cases (the same batch, sequence length, rank, alpha, target linears, optimiser AdamW and steps on each side):
  flashlm-lora     flashlm Transformer on the float32 base (its HF directory, loaded as `flashlm finetune` does),
                   flashlm.train.peft.apply_lora, flashlm's AdamW
  peft-lora        transformers' LlamaForCausalLM on the same float32 weights, peft.get_peft_model, torch's AdamW
  flashlm-qlora    the base as a Q4_K_M GGUF file, loaded as finetune's qlora does (its blocks as they are)
  peft-dequant     QLoRA's peer: peft on the Q4_K_M file's weights dequantized to a float32 HF model
  bnb-4bit         peft on bitsandbytes' 4-bit (NF4) load of the float base, where bitsandbytes runs on this CPU
                   (the table says why not otherwise)
The loss is on the same T next tokens on both sides (HF's shift_labels), and the first step's loss (the base's:
LoRA's B starts at zero) must agree between flashlm and its peer on the same weights; the report says whether.
Each case runs in a fresh Python process (cases share no allocator state), --steps timed steps after --warmup
untimed ones, the median step; the processes take turns case by case for --rounds rounds and the table holds
the medians over rounds. "CPU ms/step": the process's CPU time of a step (all its threads: torch's OpenMP
workers, flashlm's pool), which other jobs on a busy machine do not inflate. Memory: the process's peak RSS
(VmHWM) less its RSS after the imports, before the model is loaded: weights (a GGUF's bytes), adapters,
optimiser state, activations and allocator caches.

Goals: QLoRA on the Q4_K GGUF at >= 1.0x torch+peft's speed on the float base with <= 40% of its memory.

Run (from the repository root, with flashlm, transformers and peft installed; bitsandbytes optional):
  python bench/compare_finetune.py             # d_model 1024, 8 layers, vocab 8192 (118M), B 1, T 128, r 16
  python bench/compare_finetune.py --rounds 3 --steps 5
  python bench/compare_finetune.py --cases flashlm-qlora,peft-lora --threads 1 --profile-top 25  # busy machine
  python bench/compare_finetune.py --quick     # a tiny model, one round: CI smoke, well under a minute
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from bench_util import cpu_model, fmt, print_table

MODEL = dict(arch="llama", vocab_size=8192, n_layer=8, n_head=16, d_model=1024, seq_len=256)
QUICK = dict(arch="llama", vocab_size=512, n_layer=2, n_head=4, d_model=256, seq_len=64)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
CASES = ("flashlm-lora", "peft-lora", "flashlm-qlora", "peft-dequant", "bnb-4bit")
GGUF_TYPE = "Q4_K_M"
# The first step's loss, flashlm against its peer on the same weights and tokens, relative: float32 on both sides
# for LoRA; for QLoRA flashlm multiplies by the Q4_K/Q6_K blocks in its kernel while peft multiplies by their
# exact dequantization, a different computation (7e-5 apart on the --quick model).
LOSS_RTOL = {"flashlm-lora": 1e-4, "flashlm-qlora": 1e-3}


def proc_status_bytes(key: str) -> int:
    """A size from /proc/self/status: VmRSS (the RSS now) or VmHWM (the peak since exec; not ru_maxrss, which
    Linux carries over from the forked parent: a child of a process holding 400 MiB would report that)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"compare_finetune: /proc/self/status has no {key} (Linux only)")


# ---------------------------------------------------------------------------------------------- the files


def dequantized_state(model) -> dict:
    """A GGUF-loaded Transformer's weights as float32, under the plain Transformer's names."""
    from flashlm import ops
    from flashlm.quant import GGUFLinear
    from flashlm.quant.gguf_embedding import GGUFEmbedding

    state = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner not in quantized:
            state[name] = t.detach().float()
    for name, m in quantized.items():
        n = m.raw.shape[0]
        k = m.in_features if isinstance(m, GGUFLinear) else m.embedding_dim
        state[name + ".weight"] = ops.dequantize(m.raw, m.ggml_type, (n, k))
    return state


def write_bases(cfg_dict: dict, folder: str) -> dict:
    """The float base as an HF directory, its Q4_K_M GGUF and the GGUF's weights dequantized into an HF
    directory; returns their paths and the float base's bytes."""
    from flashlm.io import load_model
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export import export_gguf, export_hf

    cfg = ModelConfig(**cfg_dict)
    torch.manual_seed(0)
    model = Transformer(cfg)
    paths = {"hf": os.path.join(folder, "hf"),
             "gguf": os.path.join(folder, f"{GGUF_TYPE}.gguf"), "hf_dequant": os.path.join(folder, "hf-dequant")}
    export_hf(model, cfg, None, paths["hf"], eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer: the steps need none
        export_gguf(model, cfg, None, paths["gguf"], type=GGUF_TYPE)
    loaded = load_model(paths["gguf"], tokenizer=False)
    export_hf(dequantized_state(loaded.model), loaded.model.cfg, None, paths["hf_dequant"], eos_token_id=0)
    return paths, sum(p.numel() * 4 for p in model.parameters())


# --------------------------------------------------------------------------------------- one case's process


def build_case(case: str, paths: dict, r: int, alpha: float):
    """(model, optimiser, step(x, y) -> loss) of a case; the imports happen before (see run_case)."""
    if case.startswith("flashlm"):
        from flashlm.train.optim import AdamW
        from flashlm.train.peft import apply_lora, trainable_parameters

        from flashlm.train.finetune import load_base
        # What `flashlm finetune` loads: the HF directory peft-lora reads, or the GGUF file as it is.
        source, method = (paths["hf"], "lora") if case == "flashlm-lora" else (paths["gguf"], "qlora")
        model = load_base(source, method).model
        model.requires_grad_(False)
        apply_lora(model, r=r, alpha=alpha, targets=",".join(TARGETS))
        model.train()
        opt = AdamW(trainable_parameters(model), **OPTIM)

        def step(x, y):
            _, loss = model(x, y)
            return loss
        return model, opt, step

    import peft
    import transformers

    kwargs = {"torch_dtype": torch.float32}
    folder = paths["hf_dequant"] if case == "peft-dequant" else paths["hf"]
    if case == "bnb-4bit":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[HF_TARGETS[t] for t in TARGETS],
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **OPTIM)

    def step(x, y):
        return model(input_ids=x, labels=y, shift_labels=y).loss  # y as it is: the loss on the same T targets
    return model, opt, step


def warm_up_torch() -> None:
    """One AdamW step on a scalar: torch imports its optimiser and autograd machinery on first use (some 70 MiB
    of RSS), which is the process's, not the case's."""
    w = torch.zeros(4, requires_grad=True)
    opt = torch.optim.AdamW([w])
    (w * 2).sum().backward()
    opt.step()


PHASES = ("forward", "backward", "optimizer")


def profile_step(model_step, opt, x, y, top: int) -> dict:
    """One more step under torch.profiler: each phase's time on the calling thread, the time in no operator
    (Python, autograd's own work), and the `top` operators by self CPU time, in ms."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("forward"):
            loss = model_step(x, y)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    averages = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e3 for e in averages if e.key in PHASES}
    ops_ms = sorted(((e.key, e.self_cpu_time_total / 1e3) for e in averages if e.key not in PHASES),
                    key=lambda kv: -kv[1])
    return {"phases": phases, "outside_ops": sum(phases.values()) - sum(v for _, v in ops_ms), "top": ops_ms[:top]}


def run_case(case: str, paths: dict, batch: int, seq: int, r: int, alpha: float, steps: int, warmup: int,
             vocab: int, profile_top: int = 0) -> dict:
    import flashlm  # noqa: F401  (the case's imports come before the baseline: their memory is not the case's)
    if not case.startswith("flashlm"):
        import peft  # noqa: F401
        import transformers  # noqa: F401
    if case == "bnb-4bit":
        import bitsandbytes  # noqa: F401
    warm_up_torch()
    base_rss = proc_status_bytes("VmRSS")
    torch.manual_seed(1)
    data = torch.randint(0, vocab, (steps + warmup + 1, batch, seq + 1))
    model, opt, step = build_case(case, paths, r, alpha)
    times, cpu_times, first_loss = [], [], None
    for i in range(steps + warmup):  # the last batch is the profiled step's
        x, y = data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise RuntimeError(f"{case}: loss {loss.item()} at step {i}")
        first_loss = loss.item() if first_loss is None else first_loss
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    step_s = statistics.median(times)
    res = {"step_s": step_s, "tok_s": batch * seq / step_s, "cpu_s": statistics.median(cpu_times),
           "mem": proc_status_bytes("VmHWM") - base_rss, "loss0": first_loss}
    if profile_top:  # after the memory figure: the profiler's own records are not the case's
        res["profile"] = profile_step(step, opt, data[-1, :, :-1].contiguous(), data[-1, :, 1:].contiguous(), profile_top)
    return res


def spawn(case: str, args, paths: dict, vocab: int) -> dict:
    """One case in a fresh interpreter; {"error": text} when it cannot run (bitsandbytes on a CPU)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--paths", json.dumps(paths),
           "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r), "--alpha", str(args.alpha),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--vocab", str(vocab),
           "--profile-top", str(args.profile_top)]
    env = dict(os.environ)
    if case.startswith("flashlm"):
        # As `flashlm finetune` runs (flashlm/__init__.py): torch's OpenMP workers sleep between torch's ops
        # instead of polling the cores flashlm's pool needs next (idle machine, 2 threads: 861 ms a QLoRA step
        # with the polling, 500 without). The peers keep torch's default; an OMP_WAIT_POLICY set by the caller
        # holds for every case.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:  # torch's OpenMP pool and flashlm's pool alike
        env.update(OMP_NUM_THREADS=str(args.threads), FLASHLM_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------- main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="processes per case, the cases taking turns")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round: a smoke run")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of each case's process (torch and flashlm); 0: torch's default. 1 on a busy "
                         "machine: CPU time free of the threads' waits for each other")
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="profile one more step per process (torch.profiler): its phases and N top operators")
    ap.add_argument("--out", default=None, help="write the table to this Markdown file (default: none)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seq, args.steps, args.warmup, args.rounds = 32, 2, 1, 1
    if args.threads < 0:
        ap.error(f"--threads: must be >= 0, got {args.threads}")
    for name in ("batch", "seq", "r", "steps", "rounds"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name}: must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup: must be >= 0, got {args.warmup}")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        ap.error(f"--cases: expected names from {', '.join(CASES)}, got {args.cases!r}")
    args.cases = cases
    return args


def mib(n):
    return None if n is None else n / 2**20


def main():
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, json.loads(args.paths), args.batch, args.seq, args.r, args.alpha,
                                  args.steps, args.warmup, args.vocab, args.profile_top)))
        return
    cfg = dict(QUICK if args.quick else MODEL)
    if args.seq > cfg["seq_len"]:
        sys.exit(f"compare_finetune: error: --seq {args.seq} exceeds the model's seq_len {cfg['seq_len']}")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="compare_finetune-") as folder:
        paths, float_bytes = write_bases(cfg, folder)
        sizes = {"float": float_bytes, "gguf": os.path.getsize(paths["gguf"])}
        runs = {c: [] for c in args.cases}
        errors = {}
        for rnd in range(args.rounds):
            order = args.cases if rnd % 2 == 0 else args.cases[::-1]  # neither side always runs first
            for case in order:
                if case in errors:
                    continue
                res = spawn(case, args, paths, cfg["vocab_size"])
                if "error" in res:
                    errors[case] = res["error"]
                else:
                    runs[case].append(res)
    load1 = os.getloadavg()[0]
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "profile"} for c, rs in runs.items() if rs}
    for c, m in med.items():  # tokens/s of the median step (the median of two runs' tokens/s is another mean)
        m["tok_s"] = args.batch * args.seq / m["step_s"]
        m["runs"] = " ".join(f"{r['step_s'] * 1e3:.0f}" for r in runs[c])
    same = report(args, cfg, sizes, med, errors, (load0, load1))
    if args.profile_top:
        print_profiles(runs, args.profile_top)
    if not same:
        sys.exit(1)  # not the same work: the figures compare nothing


def report(args, cfg, sizes, med, errors, loads):
    n_params = sizes["float"] // 4
    lines = [f"llama d_model {cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab_size']} "
             f"({n_params / 1e6:.0f}M parameters, float32 {mib(sizes['float']):.0f} MiB; {GGUF_TYPE} file "
             f"{mib(sizes['gguf']):.0f} MiB); batch {args.batch}, seq {args.seq}, LoRA r {args.r} alpha "
             f"{args.alpha:g} on {','.join(TARGETS)}, AdamW lr {OPTIM['lr']}; median of {args.steps} steps after "
             f"{args.warmup} warm-up, median over {args.rounds} process(es) per case, cases interleaved",
             f"CPU: {cpu_model()}, {os.cpu_count()} hardware threads, torch {torch.__version__} "
             f"{args.threads or torch.get_num_threads()} threads a process; load average {loads[0]:.1f} before, {loads[1]:.1f} after",
             f"OMP_WAIT_POLICY: flashlm's cases {os.environ.get('OMP_WAIT_POLICY', 'PASSIVE (as the flashlm command sets it)')}, "
             f"the peers' {os.environ.get('OMP_WAIT_POLICY', '(unset: torch default)')}"]
    ref = med.get("peft-lora")
    header = ["case", "ms/step", "each process", "tokens/s", "x peft-lora speed", "CPU ms/step", "x peft-lora per CPU-s",
              "peak RSS growth MiB", "% of peft-lora memory"]
    rows = []
    for case in args.cases:
        if case in errors:
            rows.append([case, "-", "-", "-", "-", "-", "-", "-", f"did not run: {errors[case]}"])
            continue
        m = med[case]
        rows.append([case, f"{m['step_s'] * 1e3:.0f}", m["runs"], f"{m['tok_s']:.0f}",
                     fmt(ref and m["tok_s"] / ref["tok_s"], ".2f"), f"{m['cpu_s'] * 1e3:.0f}",
                     fmt(ref and ref["cpu_s"] / m["cpu_s"], ".2f"), f"{mib(m['mem']):.0f}",
                     fmt(ref and 100 * m["mem"] / ref["mem"], ".0f")])
    # The same work on both sides: the first step's loss (B is zero, so the base's) must agree.
    same = True
    for a, b in (("flashlm-lora", "peft-lora"), ("flashlm-qlora", "peft-dequant")):
        if a in med and b in med:
            la, lb = med[a]["loss0"], med[b]["loss0"]
            agree = abs(la - lb) <= LOSS_RTOL[a] * abs(lb)
            same = same and agree
            lines.append(f"first-step loss {a} {la:.5f}, {b} {lb:.5f}: "
                         + ("agree" if agree else "DIFFER") + f" (relative {LOSS_RTOL[a]:g})")
    for line in lines:
        print(line)
    print()
    print_table(header, rows)
    q, dq = med.get("flashlm-qlora"), med.get("peft-dequant")
    goal = None
    if q and ref:
        goal = (f"Goal (QLoRA on the {GGUF_TYPE} GGUF against torch+peft on the float base): speed "
                f"{q['tok_s'] / ref['tok_s']:.2f}x (goal >= 1.0x; per CPU-second {ref['cpu_s'] / q['cpu_s']:.2f}x), memory {100 * q['mem'] / ref['mem']:.0f}% "
                f"(goal <= 40%)")
        if dq:
            goal += (f"; against peft on the dequantized base: {q['tok_s'] / dq['tok_s']:.2f}x, "
                     f"{100 * q['mem'] / dq['mem']:.0f}%")
        print(goal)
    if args.out:
        write_markdown(args, lines, header, rows, goal)
    return same


def print_profiles(runs, top):
    """Each case's profiled steps: the phases and the top operators by self CPU time, ms (median over the
    case's processes; an operator missing from a process's top list counts 0 there)."""
    for case, rs in runs.items():
        profs = [r["profile"] for r in rs if "profile" in r]
        if not profs:
            continue
        phases = {p: statistics.median(pr["phases"].get(p, 0.0) for pr in profs) for p in PHASES}
        outside = statistics.median(pr["outside_ops"] for pr in profs)
        print(f"\n{case}, torch.profiler, one step per process (ms on the calling thread, median of {len(profs)}): "
              + ", ".join(f"{p} {v:.0f}" for p, v in phases.items()) + f"; in no operator {outside:.0f}")
        names = {name for pr in profs for name, _ in pr["top"]}
        ops_ms = {n: statistics.median(dict(pr["top"]).get(n, 0.0) for pr in profs) for n in names}
        total = sum(phases.values())
        print_table(["operator", "self ms", "% of step"],
                    [[n, f"{v:.1f}", f"{100 * v / total:.1f}"] for n, v in sorted(ops_ms.items(), key=lambda kv: -kv[1])[:top]])


def write_markdown(args, lines, header, rows, goal):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(header, rows)
    cmd = "python bench/compare_finetune.py " + " ".join(a for a in sys.argv[1:])
    text = (f"# LoRA and QLoRA steps: flashlm against torch + peft (bench/compare_finetune.py)\n\n"
            f"{datetime.date.today().isoformat()}, `{cmd.strip()}`\n\n" + "\n".join(f"{ln}  " for ln in lines)
            + "\n\n" + buf.getvalue() + ("\n" + goal + "\n" if goal else ""))
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
