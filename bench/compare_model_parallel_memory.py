#!/usr/bin/env python3
"""compare_model_parallel_memory: peak resident memory per rank of a model-parallel start-up, one training step, a
checkpoint's save and its resume, with the full model built on every rank first (the start-up flashlm had:
Transformer(cfg), then each rank's part copied out of it) against the model built on the meta device with only
each rank's part made (flashlm.parallel.materialize: the trainer's start-up now).

Where the tree's own earlier meta path differs, a "before" row runs it beside the current one:
  TP 2 x PP 2  the tensor-parallel part was built with storage (1 / tp of every layer, its constructor's init run),
               the stage's values copied in and the other stages' layers freed: peak 1 / tp of the model
  ZeRO-3 DP 2  the checkpoint was taken and loaded through full_parameters() (every rank gathering the whole model)
               and the optimizer state made whole on every rank
Each layout and start-up runs in fresh processes, one thread each, met through flashlm.dist as torchrun would
start them. Per rank:
  base MiB     resident memory after the imports and the process group, before any model (VmRSS)
  start MiB    the peak while ModelParallel / DataParallel is built (VmHWM, reset before each phase through
               /proc/self/clear_refs): what start-up needed
  step MiB     the peak over one step (forward, backward, the gradients' reduction, AdamW)
  save MiB     the peak while the checkpoint (full model and optimizer state, rank 0 writing it) is made and written
  resume MiB   in fresh processes started the same way: the peak while every rank loads that checkpoint from the
               memory-mapped file (its pages a rank reads count as resident memory too)
  held MiB     the parameters this rank holds after start-up (ZeRO-3: its shards)
The peaks also hold what the allocator kept of tensors freed earlier in the process.

Run (from the repository root, with flashlm importable):
  python bench/compare_model_parallel_memory.py            # llama d_model 512, 8 layers, vocab 8192
  python bench/compare_model_parallel_memory.py --only "TP 2 x PP 2" --only "ZeRO-3 DP 2"
  python bench/compare_model_parallel_memory.py --quick    # a tiny model: CI smoke
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

LAYOUTS = {  # name: (sizes, zero stage)
    "TP 2": (dict(dp=1, tp=2, pp=1, cp=1), 0),
    "PP 2": (dict(dp=1, tp=1, pp=2, cp=1), 0),
    "TP 2 x PP 2": (dict(dp=1, tp=2, pp=2, cp=1), 0),
    "ZeRO-3 DP 2": (dict(dp=2, tp=1, pp=1, cp=1), 3),
}
BEFORE = ("TP 2 x PP 2", "ZeRO-3 DP 2")  # the layouts whose meta path changed: a "before" row each
MIB = 2 ** 20


def rss_now() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024 / MIB


def rss_peak() -> float:
    """The peak resident memory since the last reset_peak() (VmHWM)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / MIB


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) back to the current resident memory (Linux 4.0 on)


def tp_part_whole_first():
    """The tree's earlier meta start-up under tp > 1, in place of the current one (the "before" row): the part
    built with storage for 1 / tp of every layer (written as its constructor's init wrote it), the stage's values
    copied in as they are replayed, the other stages' layers then freed."""
    import torch

    import flashlm.train.parallel_step as parallel_step
    from flashlm.parallel.materialize import materialize, start_part

    def start(model, tp, sequence_parallel, device):
        part, init = start_part(model, tp, sequence_parallel, device)
        if tp.size > 1:
            materialize(part, {n: torch.empty(p.shape).fill_(0.5) for n, p in part.named_parameters()})
        return part, init

    def values(part, init, names, part_init=None, device=None):
        params, dims, tp = dict(part.named_parameters()), part.tp_dims, part.tp

        def take(name, value):
            if name in names:
                dim = dims[name]
                if dim is not None:
                    n = value.shape[dim] // tp.size
                    value = value.narrow(dim, tp.rank * n, n)
                params[name].detach().copy_(value)

        init.replay(take)
        if part_init is not None:
            part_init.replay()
        for name, p in params.items():
            if name not in names:
                torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(p.shape, device="meta"),
                                                               requires_grad=p.requires_grad))

    parallel_step.start_part, parallel_step.materialize_part = start, values


def worker(args):
    import types

    import torch

    import flashlm.dist as fd
    from flashlm.models import ModelConfig, Transformer
    from flashlm.parallel.materialize import deferred_init
    from flashlm.train.parallel import DataParallel
    from flashlm.train.parallel_step import ModelParallel

    torch.set_num_threads(1)
    fd.init(timeout=300.0)
    sizes, zero = LAYOUTS[args.layout]
    mcfg = ModelConfig(arch="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.d_model // 64,
                       d_model=args.d_model, seq_len=args.seq, tie_embeddings=False)
    cfg = types.SimpleNamespace(**sizes, sequence_parallel=False, seq_len=args.seq, batch_size=args.batch,
                                micro_batches=2, pp_schedule="1f1b", zero_stage=zero, weight_decay=0.1)
    make_optimizer = lambda groups: torch.optim.AdamW(groups, lr=1e-4)  # noqa: E731
    before = args.startup == "before"
    if before and sizes["tp"] > 1:
        tp_part_whole_first()
    base = rss_now()
    reset_peak()
    torch.manual_seed(0)
    meta = args.startup != "full"
    if meta:
        model, init = deferred_init(lambda: Transformer(mcfg))
    else:
        model, init = Transformer(mcfg), None
    if sizes["tp"] * sizes["pp"] * sizes["cp"] > 1:
        dp = ModelParallel(model, cfg, sizes, make_optimizer, timeout=300.0, init=init)
        step = lambda x, y: dp.forward_backward(x, y, 1.0)  # noqa: E731
        save = lambda: {"model": dp.full_state_dict(), "optimizer": dp.state_dict()}  # noqa: E731

        def load(state):
            dp.load_full_state_dict(state["model"])
            dp.load_state_dict(state["optimizer"])
    else:
        if meta:
            model.make_buffers()  # (ModelParallel makes those of the part it keeps; the trainer does this here)
        dp = DataParallel(model, make_optimizer, zero_stage=zero, param_groups=model.param_groups(0.1), init=init)

        def step(x, y):
            _, loss = model(x, y)
            loss.backward()

        def save():
            if meta and not before:  # tensor by tensor onto rank 0
                return {"model": dp.full_state_dict(), "optimizer": dp.state_dict(rank0_only=True)}
            with dp.full_parameters():  # every rank gathering the whole model
                weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
            return {"model": weights, "optimizer": dp.state_dict()}

        def load(state):
            if meta and not before:  # each rank its slices
                dp.load_full_state_dict(state["model"])
            else:
                with dp.full_parameters():
                    model.load_state_dict(state["model"])
            dp.load_state_dict(state["optimizer"])
    # what the optimizer steps: the parameters this rank holds (ZeRO-3: its shards of them)
    held = sum(p.numel() * p.element_size() for g in dp.param_groups for p in g["params"])
    start = rss_peak()
    path = os.path.join(args.ckpt_dir, "checkpoint.pt")
    if args.resume:  # a fresh start-up loading the checkpoint the first processes saved, as a resumed run does
        reset_peak()
        load(torch.load(path, mmap=True))
        result = {"resume": rss_peak()}
    else:
        reset_peak()
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        step(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        dp.finish_gradients()
        dp.step()
        dp.zero_grad()
        stepped = rss_peak()
        reset_peak()
        state = save()
        if fd.get_rank() == 0:
            torch.save(state, path)
        del state
        fd.all_reduce(torch.zeros(1))  # the file is written
        result = {"base": base, "start": start, "step": stepped, "save": rss_peak(), "held": held / MIB}
    print("RESULT " + json.dumps({"rank": fd.get_rank(), **result}), flush=True)
    dp.close()
    fd.destroy()


def launch(args, layout: str, startup: str) -> list:
    """Each rank's figures: start-up, step and save in fresh processes, then the resume in fresh ones again."""
    ckpt_dir = tempfile.mkdtemp(prefix="flashlm-mp-memory-")
    try:
        first = run_ranks(args, layout, startup, ["--ckpt-dir", ckpt_dir])
        resumed = run_ranks(args, layout, startup, ["--ckpt-dir", ckpt_dir, "--resume"])
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return [{**a, **b} for a, b in zip(first, resumed)]


def run_ranks(args, layout: str, startup: str, more: list) -> list:
    sizes, _ = LAYOUTS[layout]
    n = sizes["dp"] * sizes["tp"] * sizes["pp"] * sizes["cp"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1", "WORLD_SIZE": str(n),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--layout", layout, "--startup", startup,
            "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--seq", str(args.seq), "--batch", str(args.batch), *more]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(n)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"{layout} ({startup}): a rank failed:\n" + "\n".join(o[-3000:] for o in outs))
    return [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:]) for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", choices=list(LAYOUTS), action="append", help="this layout alone (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a tiny model: CI smoke")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    ap.add_argument("--startup", choices=("full", "before", "meta"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.d_model, args.layers, args.vocab, args.seq, args.batch = 128, 2, 256, 16, 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_util import print_table, ranks_line

    import torch

    from flashlm.models import ModelConfig, Transformer

    with torch.device("meta"):
        n = Transformer(ModelConfig(arch="llama", vocab_size=args.vocab, n_layer=args.layers,
                                    n_head=args.d_model // 64, d_model=args.d_model, seq_len=args.seq,
                                    tie_embeddings=False)).num_params()
    print(ranks_line(2).replace("2 processes", "2 or 4 processes per layout"))
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, untied head, "
          f"{n / 1e6:.2f}M parameters ({n * 4 / MIB:.1f} MiB float32); batch {args.batch} x {args.seq} tokens; "
          f"one AdamW step")
    rows = []
    keys = ("base", "start", "step", "save", "resume", "held")
    for layout in args.only or LAYOUTS:
        startups = [("full", "full model first")] + ([("before", "meta, before")] if layout in BEFORE else [])
        for startup, said in startups + [("meta", "meta, own part")]:
            res = launch(args, layout, startup)
            rows.append([f"{layout}, {said}", *(" / ".join(f"{r[k]:.1f}" for r in res) for k in keys)])
    print_table(["layout, start-up"] + [f"{k} MiB/rank" for k in keys], rows)


if __name__ == "__main__":
    main()
