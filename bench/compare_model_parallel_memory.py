#!/usr/bin/env python3
"""compare_model_parallel_memory: peak resident memory per rank of a model-parallel start-up and of one training
step, with the full model built on every rank first (the start-up flashlm had: Transformer(cfg), then each
rank's part copied out of it) against the model built on the meta device with only each rank's part made
(flashlm.parallel.materialize: the trainer's start-up now).

Each layout and start-up runs in fresh processes (peak RSS only grows within a process), one thread each, met
through flashlm.dist as torchrun would start them. Per rank:
  base MiB     resident memory after the imports and the process group, before any model (VmRSS)
  start MiB    the peak (ru_maxrss) once ModelParallel / DataParallel is built: what start-up needed
  step MiB     the peak after one step (forward, backward, the gradients' reduction, AdamW)
  held MiB     the parameters this rank holds after start-up (ZeRO-3: its shards)
The difference between the two start-ups is the model the old one built on every rank (the peaks also hold
what the allocator kept of the freed model).

Run (from the repository root, with flashlm importable):
  python bench/compare_model_parallel_memory.py            # llama d_model 512, 8 layers, vocab 8192
  python bench/compare_model_parallel_memory.py --quick    # a tiny model: CI smoke
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys

LAYOUTS = {  # name: (sizes, zero stage)
    "TP 2": (dict(dp=1, tp=2, pp=1, cp=1), 0),
    "PP 2": (dict(dp=1, tp=1, pp=2, cp=1), 0),
    "ZeRO-3 DP 2": (dict(dp=2, tp=1, pp=1, cp=1), 3),
}
MIB = 2 ** 20


def rss_now() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024 / MIB


def rss_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: kilobytes


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
    base = rss_now()
    torch.manual_seed(0)
    meta = args.startup == "meta"
    if meta:
        model, init = deferred_init(lambda: Transformer(mcfg))
    else:
        model, init = Transformer(mcfg), None
    if sizes["tp"] * sizes["pp"] * sizes["cp"] > 1:
        dp = ModelParallel(model, cfg, sizes, make_optimizer, timeout=300.0, init=init)
        step = lambda x, y: dp.forward_backward(x, y, 1.0)  # noqa: E731
    else:
        if meta:
            model.make_buffers()  # (ModelParallel makes those of the part it keeps; the trainer does this here)
        dp = DataParallel(model, make_optimizer, zero_stage=zero, param_groups=model.param_groups(0.1), init=init)

        def step(x, y):
            _, loss = model(x, y)
            loss.backward()
    # what the optimizer steps: the parameters this rank holds (ZeRO-3: its shards of them)
    held = sum(p.numel() * p.element_size() for g in dp.param_groups for p in g["params"])
    start = rss_peak()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    step(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    dp.finish_gradients()
    dp.step()
    print("RESULT " + json.dumps({"rank": fd.get_rank(), "base": base, "start": start, "step": rss_peak(),
                                  "held": held / MIB}), flush=True)
    dp.close()
    fd.destroy()


def launch(args, layout: str, startup: str) -> list:
    sizes, _ = LAYOUTS[layout]
    n = sizes["dp"] * sizes["tp"] * sizes["pp"] * sizes["cp"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1", "WORLD_SIZE": str(n),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--layout", layout, "--startup", startup,
            "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--seq", str(args.seq), "--batch", str(args.batch)]
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
    ap.add_argument("--only", choices=list(LAYOUTS), help="this layout alone")
    ap.add_argument("--quick", action="store_true", help="a tiny model: CI smoke")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    ap.add_argument("--startup", choices=("full", "meta"), help=argparse.SUPPRESS)
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
    print(ranks_line(2).replace("2 processes", "2 processes per layout"))
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, untied head, "
          f"{n / 1e6:.2f}M parameters ({n * 4 / MIB:.1f} MiB float32); batch {args.batch} x {args.seq} tokens; "
          f"one AdamW step")
    rows = []
    for layout in [args.only] if args.only else LAYOUTS:
        for startup, said in (("full", "full model first"), ("meta", "meta, own part")):
            res = launch(args, layout, startup)
            rows.append([f"{layout}, {said}", *(" / ".join(f"{r[k]:.1f}" for r in res)
                                                 for k in ("base", "start", "step", "held"))])
    print_table(["layout, start-up", "base MiB/rank", "start MiB/rank", "step MiB/rank", "held MiB/rank"], rows)


if __name__ == "__main__":
    main()
