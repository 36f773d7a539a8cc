#!/usr/bin/env python3
"""compare_model_parallel: a training step (forward + backward of one batch) of flashlm's tensor parallelism
(parallel/tensor.py, Megatron) and pipeline parallelism (parallel/pipeline.py, GPipe and 1F1B) on 2 processes,
side by side with torch's own torch.distributed.tensor.parallel and torch.distributed.pipelining (gloo) on
the same Llama-style flashlm Transformer, split the same way.

  flashlm TP         shard_model over a Mesh(tp=n): q/k/v, gate/up column-parallel, o/down row-parallel,
                     vocabulary-parallel embedding, head and cross-entropy (flashlm's shared-memory ring)
  torch TP           parallelize_module on the same blocks (ColwiseParallel / RowwiseParallel), the embedding
                     RowwiseParallel, the head ColwiseParallel under loss_parallel (gloo, DTensor)
  flashlm PP gpipe   Pipeline over n stages (PipelineStage, Ring.sendrecv between neighbours), m micro-batches
  flashlm PP 1f1b    the same, one forward one backward
  torch PP gpipe     torch.distributed.pipelining's ScheduleGPipe on the same PipelineStage modules (gloo p2p)
  torch PP 1f1b      its Schedule1F1B
  flashlm DP after   ModelParallel over a Mesh(dp=n): forward, backward, then the gradients' all-reduce over dp in
                     finish_gradients (overlap=False)
  flashlm DP overlapped  the same with the buckets' all-reduces launched from the gradient hooks during backward
                     (the trainer's default; buckets of --bucket-mb)
  torch DP overlapped    DistributedDataParallel (gloo) on the same model, buckets of --bucket-mb

Figures, per rank unless said otherwise:
  step ms       the slowest rank's time of a step (each starts at a gloo barrier), median of --steps steps
                after --warmup; the configurations take turns step by step, so background load falls on all
  sent MiB      bytes this rank sent per step, counted at the transport boundary: every call the scheme makes
                on flashlm's comm.Ring (the mesh group's ring, the pipeline's links) is wrapped by a counter
                (comm.Ring has none) that adds the bytes a ring algorithm sends per rank for it: all-reduce
                2(n-1)/n of the tensor, all-gather and reduce-scatter (n-1)/n, sendrecv the tensor sent.
                torch's gloo traffic is not counted (n/a).
  formula MiB   the analytic volume. TP: per layer 2 all-reduces of B*T*d in forward and 2 in backward, plus
                the ends (the embedding's all-reduce in forward, the head input's in backward) and the
                vocabulary-parallel cross-entropy (an all-gather of the B*T row maxima, an all-reduce of 2*B*T
                floats); each all-reduce 2(n-1)/n of its bytes. PP: activations [B/m, T, d] per micro-batch
                per stage boundary forward, and their gradients back: B*T*d elements sent per rank on 2 stages.
                DP: one all-reduce of every gradient, 2(n-1)/n of the parameters' bytes.
  bubble        the pipeline's measured idle fraction (Pipeline.stats: outside forward/backward compute) of
                the slowest stage, against (p-1)/(m+p-1)
  act MiB       peak bytes of tensors saved for backward (saved_tensors_hooks; storages counted once, the
                parameters left out) during the step: activation memory, measured alike for every scheme
                and device. On CUDA also torch.cuda.max_memory_allocated (peak MiB).
  param MiB     the parameters this rank holds

Run (from the repository root, with flashlm installed):
  python bench/compare_model_parallel.py                # 2 processes, d_model 256, 4 layers, 4 micro-batches
  python bench/compare_model_parallel.py --micro 8 --d-model 384
  python bench/compare_model_parallel.py --quick        # a tiny model, 2 steps: CI smoke
  python bench/compare_model_parallel.py --only DP --bucket-mb 2   # data parallelism alone: overlapped or not
  python bench/compare_model_parallel.py --device cuda  # one GPU per rank: torch's configurations (NCCL); flashlm's
                                                        # are listed as not run, with why (CPU rings only so far)
A configuration that fails to build or to run its warm-up steps is listed with its error and the others go on
(--verbose prints the traceback).
"""

import argparse
import json
import os
import statistics
import time
import traceback
import weakref

import torch
import torch.nn.functional as F

from bench_util import print_table, ranks_line, run_ranks

import flashlm.dist as fd  # noqa: E402  (after bench_util, as the other scripts)

CONFIGS = ("flashlm TP", "torch TP", "flashlm PP gpipe", "torch PP gpipe", "flashlm PP 1f1b", "torch PP 1f1b",
           "flashlm DP after", "flashlm DP overlapped", "torch DP overlapped")
F32 = 4


def make_model(args, device="cpu"):
    from flashlm.models import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.d_model // 64,
                      d_model=args.d_model, seq_len=args.seq, tie_embeddings=False)
    return Transformer(cfg).to(device)


def batch(args, step, device):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    return idx[:, :-1].contiguous().to(device), idx[:, 1:].contiguous().to(device)


# ---- Measuring ---------------------------------------------------------------------------------------------

class CountingRing:
    """A comm.Ring whose calls add the bytes this rank sends to `sent` (the ring algorithms' per-rank volume)."""

    def __init__(self, ring, counter):
        self._ring, self._counter = ring, counter

    def __getattr__(self, name):
        return getattr(self._ring, name)

    def _add(self, tensor, factor):
        self._counter["sent"] += tensor.numel() * tensor.element_size() * factor

    def allreduce(self, tensor, op="sum"):
        n = self._ring.world_size
        self._add(tensor, 2 * (n - 1) / n)
        return self._ring.allreduce(tensor, op)

    def reduce_scatter(self, tensor, op="sum"):
        n = self._ring.world_size
        self._add(tensor, (n - 1) / n)
        return self._ring.reduce_scatter(tensor, op)

    def all_gather(self, tensor):
        n = self._ring.world_size
        self._add(tensor, (n - 1) / n)
        return self._ring.all_gather(tensor)

    def sendrecv(self, send=None, recv=None):
        if send is not None:
            self._add(send, 1)
        return self._ring.sendrecv(send, recv)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def storages(t):
    """[(data_ptr, nbytes)] of the memory behind t: a wrapper subclass's (DTensor, torch's collective results)
    is that of the plain tensors inside it."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return [s for x in inner if isinstance(x, torch.Tensor) for s in storages(x)]
    s = t.untyped_storage()
    return [(s.data_ptr(), s.nbytes())]


class ActivationMeter:
    """The peak bytes of the tensors autograd keeps for backward while active (a context manager): each
    storage counted once while any saved tensor uses it; the parameters' storages are not activations."""

    def __init__(self, params):
        self.skip = {ptr for p in params for ptr, _ in storages(p)}
        self.users, self.bytes, self.peak = {}, 0, 0

    def _pack(self, t):
        held = _Saved(t)
        for ptr, nbytes in storages(t):
            if ptr in self.skip or ptr == 0:
                continue
            if ptr not in self.users:
                self.users[ptr] = 0
                self.bytes += nbytes
                self.peak = max(self.peak, self.bytes)
            self.users[ptr] += 1
            weakref.finalize(held, self._release, ptr, nbytes)
        return held

    def _release(self, ptr, nbytes):
        self.users[ptr] -= 1
        if not self.users[ptr]:
            del self.users[ptr]
            self.bytes -= nbytes

    @staticmethod
    def _unpack(held):
        return held.tensor

    def __enter__(self):
        self.peak = self.bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def local(p):
    """This rank's part of a parameter (a DTensor's local shard)."""
    return p.to_local() if hasattr(p, "to_local") else p


def local_bytes(params):
    return sum(local(p).nbytes for p in params)


# ---- The configurations ------------------------------------------------------------------------------------

class Config:
    """One configuration on this rank; step() runs one batch's forward and backward, returns its figures."""

    def __init__(self, name, args, store, device):
        self.name, self.args, self.device = name, args, device
        self.counter = {"sent": 0}
        self.bubble = None
        kind = name.split()[1]
        getattr(self, f"_make_{name.split()[0]}_{kind.lower()}")(store)
        self.params = list(self.module.parameters())
        self.param_bytes = local_bytes(self.params)

    def _make_flashlm_tp(self, store):
        from flashlm.parallel import Mesh, shard_model

        mesh = Mesh(tp=self.args.nprocs)
        mesh.tp.ring = CountingRing(mesh.tp.ring, self.counter)
        self.module = shard_model(make_model(self.args), mesh.tp)
        def run(x, y):
            loss = self.module(x, y)[1]
            loss.backward()
            return float(loss.detach())

        self.run = run

    def _make_flashlm_dp(self, store):
        from types import SimpleNamespace

        from flashlm.train.parallel_step import ModelParallel

        a = self.args
        sizes = dict(dp=a.nprocs, tp=1, pp=1, cp=1)
        cfg = SimpleNamespace(**sizes, sequence_parallel=False, seq_len=a.seq, batch_size=a.batch, micro_batches=1,
                              pp_schedule="gpipe", zero_stage=0, weight_decay=0.0)
        model = make_model(a)
        mp = ModelParallel(model, cfg, sizes, lambda groups: torch.optim.SGD(groups, lr=0.0), timeout=300,
                           overlap=self.name.endswith("overlapped"), bucket_mb=a.bucket_mb)
        mp.mesh.dp.ring = CountingRing(mp.mesh.dp.ring, self.counter)

        def run(x, y):
            loss = mp.forward_backward(x, y, 1.0)
            mp.finish_gradients()
            return float(loss)

        self.module, self.run = model, run

    def _make_torch_dp(self, store):
        from torch.nn.parallel import DistributedDataParallel

        model = make_model(self.args, self.device)
        ddp = DistributedDataParallel(model, bucket_cap_mb=self.args.bucket_mb)

        def run(x, y):
            loss = ddp(x, y)[1]
            loss.backward()
            return float(loss.detach())

        self.module, self.run = model, run

    def _make_torch_tp(self, store):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                       parallelize_module)

        n = self.args.nprocs
        mesh = init_device_mesh(self.device, (n,))
        model = make_model(self.args, self.device)
        for block in model.blocks:
            block.attn.n_head //= n  # each rank's q/k/v columns are its heads
            block.attn.n_kv_head //= n
            parallelize_module(block, mesh, {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
                                             "attn.v": ColwiseParallel(), "attn.o": RowwiseParallel(),
                                             "mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
                                             "mlp.down": RowwiseParallel()})
        parallelize_module(model, mesh, {
            "tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})

        def run(x, y):
            with loss_parallel():
                logits = model.logits(model.final_norm(self._blocks(model, x)))
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                loss.backward()
            return float(loss.detach().full_tensor())

        self.module, self.run = model, run

    @staticmethod
    def _blocks(model, idx):
        """Transformer.forward up to the final norm (its logits and loss are taken by the caller)."""
        x = model.tok_emb(idx)
        ropes = model._ropes(torch.arange(idx.shape[1], device=idx.device), x.dtype)
        for block, rope in zip(model.blocks, ropes):
            x = block(x, rope)
        return x

    def _pipeline_parts(self):
        from flashlm.parallel.pipeline import PipelinePlan, PipelineStage

        a = self.args
        plan = PipelinePlan(a.layers, a.nprocs, a.batch, a.micro, a.seq, self.name.split()[-1])
        return plan, PipelineStage(make_model(a, self.device), tdist_rank(), plan)

    def _make_flashlm_pp(self, store):
        from flashlm.parallel.pipeline import Pipeline, shm_stage_links

        plan, part = self._pipeline_parts()
        key = f"job/{self.name}"
        if part.first:
            store.set(key, f"mpbench-{os.getpid()}-{self.name.split()[-1]}")
        links = shm_stage_links(store.get(key).decode(), part.stage, plan, tied=False, timeout=300)
        for name in ("prev", "next", "group", "tied"):
            if getattr(links, name) is not None:
                setattr(links, name, CountingRing(getattr(links, name), self.counter))
        pipe = Pipeline(part, links, plan)

        def run(x, y):
            loss = pipe.forward_backward(x if part.first else None, y if part.last else None)
            self.bubble = (pipe.stats["bubble"], pipe.stats["bubble_formula"])
            return loss

        self.module, self.run = part, run

    def _make_torch_pp(self, store):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        plan, part = self._pipeline_parts()
        stage = PipelineStage(part, part.stage, plan.stages, torch.device(self.device))
        loss = lambda logits, y: F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # noqa: E731
        schedule = (ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B)(stage, plan.micro_batches, loss)

        def run(x, y):
            losses = []
            if part.first:
                schedule.step(x)
            elif part.last:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
            return float(torch.stack(losses).detach().mean()) if losses else None  # the micro-batches' mean

        self.module, self.run = part, run

    def step(self, step):
        x, y = batch(self.args, step, self.device)
        sent = self.counter["sent"]
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with ActivationMeter(self.params) as meter:
            loss = self.run(x, y)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        for p in self.params:
            p.grad = None
        return {"seconds": seconds, "loss": loss, "sent": self.counter["sent"] - sent, "act": meter.peak,
                "peak": torch.cuda.max_memory_allocated() if cuda else None, "bubble": self.bubble}


def tdist_rank():
    import torch.distributed as tdist

    return tdist.get_rank()


def flashlm_reason(device):
    """Why flashlm's configurations cannot run on `device` (None: they can)."""
    if device != "cpu":
        return ("flashlm's mesh groups and pipeline links are shared-memory rings of CPU tensors (no NCCL ring "
                "per group yet)")
    return None


def selected(args) -> list:
    """The configurations that --only names (all without it)."""
    return [n for n in CONFIGS if args.only is None or args.only in n.split()]


def worker(rank, world, store_file, args):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    backend = "gloo" if args.device == "cpu" else "cpu:gloo,cuda:nccl"
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = tdist.FileStore(store_file, world)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world)
    fd.init(timeout=300)
    configs, skipped = [], {}
    for name in selected(args):
        reason = flashlm_reason(args.device) if name.startswith("flashlm") else None
        if reason is None:
            try:
                configs.append(Config(name, args, store, args.device))
                for step in range(args.warmup):  # every rank fails alike (same code, same shapes) or none
                    tdist.barrier()
                    configs[-1].step(step)
                continue
            except Exception as e:  # torch's peers may not run on this device or torch version: say why
                if configs and configs[-1].name == name:
                    configs.pop()
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if args.verbose:
                    traceback.print_exc()
        skipped[name] = reason
    figures = {c.name: [] for c in configs}
    for step in range(args.warmup, args.warmup + args.steps):
        for c in configs:
            tdist.barrier()
            figures[c.name].append(c.step(step))
    mine = {"figures": figures, "params": {c.name: c.param_bytes for c in configs}}
    gathered = [None] * world
    tdist.all_gather_object(gathered, mine)
    if rank == 0:
        print("SUMMARY " + json.dumps({"ranks": gathered, "skipped": skipped}), flush=True)
    tdist.barrier()
    fd.destroy()
    tdist.destroy_process_group()


# ---- The formulas and the table ----------------------------------------------------------------------------

def tp_formula(args):
    """Bytes each of n ranks sends per step in flashlm's Megatron layout (module docstring), by part."""
    n, tokens, d = args.nprocs, args.batch * args.seq, args.d_model
    allreduce = 2 * (n - 1) / n
    layers = 4 * args.layers * tokens * d * F32 * allreduce
    ends = 2 * tokens * d * F32 * allreduce  # embedding forward, head input backward
    cross_entropy = (n - 1) / n * n * tokens * F32 + 2 * tokens * F32 * allreduce
    return {"layers": layers, "ends": ends, "cross-entropy": cross_entropy}


def pp_formula(args):
    """Bytes each stage sends per step: the first B*T*d activations, the last B*T*d gradients, a stage between
    them both."""
    p, message = args.nprocs, args.batch * args.seq * args.d_model * F32
    return [message * ((s < p - 1) + (s > 0)) for s in range(p)]


def dp_formula(args):
    """Bytes each rank sends per step: a ring all-reduce of every gradient (float32)."""
    n_params = sum(p.numel() for p in make_model(args).parameters())
    return [2 * (args.nprocs - 1) / args.nprocs * n_params * F32] * args.nprocs


def summarize(summary, args):
    ranks = summary["ranks"]
    by_name = {}
    for name in CONFIGS:
        if name not in ranks[0]["figures"]:
            continue
        steps = range(args.steps)
        per_rank = [r["figures"][name] for r in ranks]
        f = {"step": statistics.median(max(fig[i]["seconds"] for fig in per_rank) for i in steps),
             "sent": [statistics.median(fig[i]["sent"] for i in steps) for fig in per_rank],
             "act": [max(fig[i]["act"] for i in steps) for fig in per_rank],
             "params": [r["params"][name] for r in ranks],
             "loss": next(fig[-1]["loss"] for fig in per_rank if fig[-1]["loss"] is not None)}
        if per_rank[0][0]["peak"] is not None:
            f["peak"] = [max(fig[i]["peak"] for i in steps) for fig in per_rank]
        if per_rank[0][0]["bubble"] is not None:
            f["bubble"] = statistics.median(max(fig[i]["bubble"][0] for fig in per_rank) for i in steps)
            f["bubble_formula"] = per_rank[0][0]["bubble"][1]
        by_name[name] = f
    return by_name


def mib_list(values):
    return " / ".join(f"{v / 2**20:.2f}" for v in values)


def print_report(by_name, skipped, args):
    tp_parts = tp_formula(args)
    tp, pp, dp = [sum(tp_parts.values())] * args.nprocs, pp_formula(args), dp_formula(args)
    rows = []
    for name, f in by_name.items():
        scheme, family = name.split()[1], name.split()[0]
        peer = by_name.get(("torch " if family == "flashlm" else "flashlm ") + name.split(" ", 1)[1])
        vs_torch = f"{peer['step'] / f['step']:.2f}x" if family == "flashlm" and peer else ""
        formula = {"TP": tp, "PP": pp, "DP": dp}[scheme]
        counted = family == "flashlm"
        sent = mib_list(f["sent"]) if counted else "n/a"
        ratio = " / ".join(f"{s / v:.3f}" for s, v in zip(f["sent"], formula)) if counted else "n/a"
        bubble = f"{f['bubble']:.3f} / {f['bubble_formula']:.3f}" if "bubble" in f else "n/a"
        rows.append([name, f"{f['step'] * 1e3:.1f}", vs_torch, sent, mib_list(formula), ratio, bubble,
                     mib_list(f["act"]), mib_list(f["params"]), f"{f['loss']:.6f}"]
                    + ([mib_list(f["peak"])] if "peak" in f else []))
    header = ["config", "step ms", "x torch", "sent MiB/rank", "formula MiB/rank", "sent/formula",
              "bubble / formula", "act MiB/rank", "param MiB/rank", "last loss"]
    if any("peak" in f for f in by_name.values()):
        header.append("CUDA peak MiB/rank")
        rows = [r + ["n/a"] * (len(header) - len(r)) for r in rows]
    print_table(header, rows)
    parts = ", ".join(f"{name} {v / 2**20:.3f}" for name, v in tp_parts.items())
    print(f"\nTP formula by part, MiB: {parts} (layers: the 4 x {args.layers} all-reduces of B*T*d)")
    g, o = by_name.get("flashlm PP gpipe"), by_name.get("flashlm PP 1f1b")
    if g and o:
        ratios = " / ".join(f"{b / a:.2f}" for a, b in zip(g["act"], o["act"]))
        print(f"\n1F1B / GPipe peak activation memory per stage: {ratios} (goal <= p/m = "
              f"{args.nprocs / args.micro:.2f} on stage 0)")
    for name, reason in skipped.items():
        print(f"{name}: not run: {reason}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=2, help="ranks: the TP degree and the pipeline's stages")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (the whole batch, on every TP rank)")
    ap.add_argument("--micro", type=int, default=4, help="the pipeline's micro-batches")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="the DP configurations' gradient buckets")
    ap.add_argument("--only", choices=("TP", "PP", "DP"), help="run only this scheme's configurations")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a configuration that fails")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps: CI smoke")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # "RANK STORE"
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.vocab, args.seq, args.batch, args.steps, args.warmup = 128, 2, 256, 32, 4, 2, 1
    for name in ("nprocs", "d_model", "layers", "vocab", "seq", "batch", "micro", "steps", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not args.bucket_mb > 0:
        ap.error(f"--bucket-mb: must be > 0, got {args.bucket_mb}")
    if args.d_model % 64 or (args.d_model // 64) % args.nprocs or args.vocab % args.nprocs:
        ap.error(f"--d-model: heads of 64 (d_model / 64) and --vocab must divide by --nprocs {args.nprocs}")
    if args.batch % args.micro or args.layers < args.nprocs:
        ap.error("--micro must divide --batch, and --layers be at least --nprocs (one per stage)")
    summary = run_ranks(__file__, args, worker)
    if summary is None:
        return
    n_params = sum(p.numel() for p in make_model(args).parameters())
    print(f"{ranks_line(args.nprocs)}; device {args.device}")
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, {args.d_model // 64} heads, vocab "
          f"{args.vocab}, untied head, {n_params / 1e6:.2f}M parameters; batch {args.batch} x {args.seq} tokens; "
          f"TP {args.nprocs}; PP {args.nprocs} stages, {args.micro} micro-batches; median of {args.steps} steps\n")
    print_report(summarize(summary, args), summary["skipped"], args)


if __name__ == "__main__":
    main()
