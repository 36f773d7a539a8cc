#!/usr/bin/env python3
"""compare_data_parallel: a training step of flashlm's DataParallel (ZeRO stage 0 to 3) against torch's
DistributedDataParallel (gloo) and DDP with torch's ZeroRedundancyOptimizer, N processes on one host (CPU).

Every configuration trains its own copy of the same Llama-style flashlm Transformer on the same batches
(--batch sequences of --seq tokens per rank and micro-step, --micro accumulation micro-steps, gradient
clipping at 1.0) with flashlm's AdamW, so the figures differ only in how gradients and optimizer state move:
  DDP              torch.nn.parallel.DistributedDataParallel (gloo allreduce, buckets during backward)
  DDP+ZeRO-1       the same with torch.distributed.optim.ZeroRedundancyOptimizer (state sharded)
  flashlm 0        DataParallel stage 0: GradientSync (flashlm's shared-memory ring, during backward)
  flashlm 1        stage 1: reduce-scatter after backward, shard update, all-gather of the parameters
  flashlm 2        stage 2: reduce-scatter bucket by bucket during backward, gradients dropped
  flashlm 3        stage 3: parameters sharded too, all-gathered block by block (prefetched) before use in
                   forward and backward, gradients reduce-scattered block by block during backward
The configurations take turns step by step (background load on a shared machine falls on all alike); each
step starts at a gloo barrier, a step's time is the slowest rank's, the figure the median over --steps
steps after --warmup. "finish" is the wait after the last backward (communication not hidden behind it;
DDP waits inside backward). Memory is per rank at the optimizer step: the bytes of gradient storage
(.grad of the parameters and of the shards) and of optimizer state; "params" is the most parameter bytes a
rank held at once in the step (stage 3: its shards plus the gathered units at their peak). Before timing, the parameters of every
configuration after the warm-up steps are compared with DDP's (they match to float32 rounding).

Run (from the repository root, with flashlm installed):
  python bench/compare_data_parallel.py                 # 2 processes, d_model 256, 4 layers
  python bench/compare_data_parallel.py --nprocs 3 --d-model 384
  python bench/compare_data_parallel.py --quick         # a few seconds: CI smoke
"""

import argparse
import contextlib
import json
import statistics
import time

import torch

from bench_util import print_table, ranks_line, run_ranks

from flashlm.train.optim import AdamW  # noqa: E402  (after bench_util, as the other scripts)

CONFIGS = ("DDP", "DDP+ZeRO-1", "flashlm 0", "flashlm 1", "flashlm 2", "flashlm 3")
OPTIMIZER_ARGS = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def make_model(args):
    from flashlm.models import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(arch="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.d_model // 64,
                                   d_model=args.d_model, seq_len=args.seq))


def make_optimizer(groups):
    return AdamW(groups, **OPTIMIZER_ARGS)


class Trainer:
    """One configuration: step() runs the micro-steps and the optimizer step, returning phase times."""

    def __init__(self, name, args):
        import torch.distributed as tdist
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        from flashlm.train.parallel import DataParallel

        self.name, self.args = name, args
        self.model = make_model(args)
        groups = self.model.param_groups(0.1)
        self.dp = self.ddp = None
        if name.startswith("flashlm"):
            self.dp = DataParallel(self.model, make_optimizer, zero_stage=int(name[-1]), bucket_mb=args.bucket_mb,
                                   param_groups=groups)
        else:
            # Gradients as views of DDP's buckets: no second copy of them (DDP's leanest setting).
            self.ddp = DistributedDataParallel(self.model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
            if name == "DDP":
                self.optimizer = make_optimizer(groups)
            else:
                self.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=AdamW, **OPTIMIZER_ARGS)
        self.rank = tdist.get_rank()

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(1000 * step + 10 * micro + self.rank)
        a = self.args
        idx = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step(self, step):
        times = {}
        runner = self.dp if self.dp is not None else self.ddp
        module = self.ddp if self.ddp is not None else self.model
        if self.dp is not None:
            self.dp.reset_peak_materialized_bytes()  # the peak of this step alone
        t0 = time.perf_counter()
        for micro in range(self.args.micro):
            x, y = self.batch(step, micro)
            last = micro == self.args.micro - 1
            with contextlib.nullcontext() if last else runner.no_sync():
                t_last = time.perf_counter()
                (module(x, y)[1] / self.args.micro).backward()
        t1 = time.perf_counter()
        times["backward"] = t1 - t_last
        if self.dp is not None:
            self.dp.finish_gradients()
            t2 = time.perf_counter()
            self.dp.clip_grad_norm_(1.0)
            self.memory = self.measure_memory()
            self.dp.step()
            self.dp.zero_grad()
        else:
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.memory = self.measure_memory()
            self.optimizer.step()
            self.optimizer.zero_grad()
        t3 = time.perf_counter()
        times.update(finish=t2 - t1, optimizer=t3 - t2, total=t3 - t0)
        return times

    def measure_memory(self):
        tensors = list(self.model.parameters())
        if self.dp is not None:
            tensors += [t for g in self.dp.param_groups for t in g["params"]]
        grads = {}
        for t in tensors:
            if t.grad is not None:
                s = t.grad.untyped_storage()
                grads[s.data_ptr()] = s.nbytes()
        opt = self.dp.optimizer if self.dp is not None else getattr(self.optimizer, "optim", self.optimizer)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.dp is not None and self.dp.zero_stage == 3:
            params = self.dp.peak_materialized_bytes + sum(t.numel() * t.element_size()
                                                           for g in self.dp.param_groups for t in g["params"])
        return sum(grads.values()), state, params

    def parameters(self):
        """Copies of the parameters (gathered under ZeRO-3: collective)."""
        with self.dp.full_parameters() if self.dp is not None else contextlib.nullcontext():
            return [p.detach().clone() for p in self.model.parameters()]


def worker(rank, world, store_file, args):
    import torch.distributed as tdist

    import flashlm.dist as fd

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", store=tdist.FileStore(store_file, world), rank=rank, world_size=world)
    fd.init(timeout=300)
    trainers = [Trainer(name, args) for name in CONFIGS]
    for step in range(args.warmup):
        for t in trainers:
            t.step(step)
    reference = trainers[0].parameters()
    agree = {t.name: max(float((p - q).abs().max()) for p, q in zip(t.parameters(), reference)) for t in trainers}
    times = {t.name: [] for t in trainers}
    for step in range(args.warmup, args.warmup + args.steps):
        for t in trainers:
            tdist.barrier()
            times[t.name].append(t.step(step))
    gathered = [None] * world
    tdist.all_gather_object(gathered, {"times": times, "memory": {t.name: t.memory for t in trainers}})
    if rank == 0:
        summary = {}
        for name in CONFIGS:
            phases = {}
            for phase in ("total", "backward", "finish", "optimizer"):
                phases[phase] = statistics.median(max(g["times"][name][i][phase] for g in gathered)
                                                  for i in range(args.steps))
            summary[name] = {**phases, "memory": gathered[0]["memory"][name], "agree": agree[name]}
        print("SUMMARY " + json.dumps(summary), flush=True)
    for t in trainers:
        if t.dp is not None:
            t.dp.close()
    fd.destroy()
    tdist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps: CI smoke")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # "RANK STORE"
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.vocab, args.seq, args.batch, args.steps, args.warmup = 64, 2, 256, 32, 2, 2, 1
        args.bucket_mb = 0.05
    summary = run_ranks(__file__, args, worker)
    if summary is None:
        return
    n_params = sum(p.numel() for p in make_model(args).parameters())
    print(ranks_line(args.nprocs))
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, {n_params / 1e6:.2f}M "
          f"parameters ({n_params * 4 / 2**20:.1f} MiB f32); {args.batch} x {args.seq} tokens per rank and micro-step, "
          f"{args.micro} micro-steps; buckets {args.bucket_mb:g} MB; median of {args.steps} steps\n")
    ddp = summary["DDP"]["total"]
    rows = []
    for name in CONFIGS:
        s = summary[name]
        grad, state, params = s["memory"]
        rows.append([name, f"{s['total'] * 1e3:.1f}", f"{ddp / s['total']:.2f}x", f"{s['backward'] * 1e3:.1f}",
                     f"{s['finish'] * 1e3:.1f}", f"{s['optimizer'] * 1e3:.1f}", f"{grad / 2**20:.2f}",
                     f"{state / 2**20:.2f}", f"{params / 2**20:.2f}", f"{s['agree']:.1e}"])
    print_table(["config", "step ms", "x DDP", "last backward ms", "finish ms", "clip+step ms", "grad MiB/rank",
                 "state MiB/rank", "params MiB/rank", "max diff vs DDP"], rows)


if __name__ == "__main__":
    main()
