"""One rank of the multi-process tests of flashlm.train.parallel (tests/test_train_parallel.py starts N).

    python train_parallel_worker.py RANK WORLD_SIZE OUT_DIR STAGES [mlp|dead]     # e.g. 0 2 /tmp/x 0123

Ranks meet through a FileStore in OUT_DIR. For each ZeRO stage in STAGES the rank trains the small MLP
below, then (unless "mlp" is given) a tiny flashlm Transformer, with DataParallel and saves what the test compares (parameters, clip norms, state_dicts, memory) to
OUT_DIR/rank{RANK}.pt. The test process imports this file for the model, the data and the one-process
reference loop, so both sides train the same thing.
"""

import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

LR = 1e-2
MICRO_STEPS = 2  # gradient accumulation micro-steps per optimizer step
BATCH = 4  # samples per rank per micro-step
MAX_NORM = 0.3  # below the gradient norms of the first steps, so clipping scales them
BUCKET_MB = 0.001  # about 1 KB: the model's gradients span several buckets
TRANSFORMER_STEPS = 3


def make_model(seed: int) -> torch.nn.Module:
    """An MLP with a LayerNorm: 868 decayed and 89 other parameters (padding in ZeRO with 2 or 3 ranks)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 20), torch.nn.LayerNorm(20),
                               torch.nn.Tanh(), torch.nn.Linear(20, 5))


def make_transformer(seed: int, arch: str = "llama", n_layer: int = 2) -> torch.nn.Module:
    """A tiny Llama (GQA, tied embeddings, 20 parameter tensors at 2 layers) with gradient checkpointing, or a
    tiny GPT-2 (learned positions, LayerNorms with biases) without."""
    from flashlm.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    kv = dict(n_kv_head=2) if arch == "llama" else {}
    model = Transformer(ModelConfig(arch=arch, vocab_size=61, n_layer=n_layer, n_head=4, d_model=32, seq_len=16, **kv))
    model.checkpointing = arch == "llama"
    return model


def param_groups(model: torch.nn.Module) -> list:
    """Weight decay on the matrices only, as model.param_groups(wd) does."""
    if hasattr(model, "param_groups"):
        return model.param_groups(0.1)
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(groups):
    from flashlm.train.optim import AdamW

    return AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def batch(step: int, micro: int, rank: int, task: str = "mlp"):
    """(inputs, targets) of one rank's micro-step; task "mlp" or "transformer" (2 sequences of 16 tokens)."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    if task == "transformer":
        return torch.randint(0, 61, (2, 16), generator=g), torch.randint(0, 61, (2, 16), generator=g)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def global_batch(step: int, micro: int, world: int, task: str = "mlp"):
    xs, ys = zip(*(batch(step, micro, r, task) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def loss_of(model, x, y):
    return model(x, y)[1] if x.dtype == torch.int64 else F.cross_entropy(model(x), y)


def train_dp(dp, model, steps, rank, max_norm=MAX_NORM, task="mlp"):
    """Steps `steps` (a range) with DataParallel; returns the clip norm of each step."""
    norms = []
    for step in steps:
        for micro in range(MICRO_STEPS):
            x, y = batch(step, micro, rank, task)
            with dp.no_sync() if micro < MICRO_STEPS - 1 else contextlib.nullcontext():
                (loss_of(model, x, y) / MICRO_STEPS).backward()
        dp.finish_gradients()
        norms.append(dp.clip_grad_norm_(max_norm))
        assert not dp.found_inf()
        dp.step()
        dp.zero_grad()
    return norms


def train_reference(model, optimizer, steps, world, max_norm=MAX_NORM, task="mlp"):
    """The same steps in one process on the global batch (every rank's samples), plain torch."""
    norms = []
    for step in steps:
        for micro in range(MICRO_STEPS):
            x, y = global_batch(step, micro, world, task)
            (loss_of(model, x, y) / MICRO_STEPS).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm > 0
                           else torch.nn.utils.get_total_norm(grads)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def snapshot(model, dp=None):
    """Copies of the parameters (gathered first when dp is ZeRO-3)."""
    with dp.full_parameters() if dp is not None else contextlib.nullcontext():
        return [p.detach().clone() for p in model.parameters()]


def restore(model, params):
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)


def states_equal(a: dict, b: dict) -> bool:
    """Bitwise equality of two optimizer state_dicts."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        if sa.keys() != sb.keys():
            return False
        for k in sa:
            if torch.is_tensor(sa[k]) != torch.is_tensor(sb[k]):
                return False
            if torch.is_tensor(sa[k]) and not (sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])):
                return False
            if not torch.is_tensor(sa[k]) and sa[k] != sb[k]:
                return False
    return True


def gradient_bytes(dp, model):
    """Bytes of gradient storage this rank holds at the step: the model's .grad tensors (distinct storages)
    and, for ZeRO, the shards' gradients."""
    storages = {}
    for p in list(model.parameters()) + [t for g in dp.param_groups for t in g["params"]]:
        if p.grad is not None:
            s = p.grad.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def state_bytes(dp):
    return sum(v.numel() * v.element_size() for s in dp.optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def run_stage(stage, rank, world):
    import flashlm.train.parallel as par

    model = make_model(100 + rank)  # rank 0's parameters must reach every rank
    dp = par.DataParallel(model, make_optimizer, zero_stage=stage, bucket_mb=BUCKET_MB, param_groups=param_groups(model))
    out = {"norms": train_dp(dp, model, range(4), rank)}
    out["params_mid"] = snapshot(model, dp)
    out["state_mid"] = dp.state_dict()
    out["state_mid_again"] = dp.state_dict()  # taking the state changes nothing
    out["norms"] += train_dp(dp, model, range(4, 6), rank)
    out["params_end"] = snapshot(model, dp)

    # Memory at the step: one more accumulation step, measured after finish_gradients.
    for micro in range(MICRO_STEPS):
        x, y = batch(6, micro, rank)
        with dp.no_sync() if micro < MICRO_STEPS - 1 else contextlib.nullcontext():
            F.cross_entropy(model(x), y).backward()
    dp.finish_gradients()
    out["grad_bytes"], out["state_bytes"] = gradient_bytes(dp, model), state_bytes(dp)
    # found_inf: an inf in rank 1's gradients only (unscaled by inf there) is seen by every rank.
    out["found_inf_clean"] = dp.found_inf()
    dp.unscale_(float("inf") if rank == 1 else 1.0)
    out["found_inf_one_rank"] = dp.found_inf()
    dp.zero_grad()
    dp.close()

    # Resume: a fresh model and DataParallel from the mid-run parameters and state continue identically.
    model2 = make_model(7)
    restore(model2, out["params_mid"])
    dp2 = par.DataParallel(model2, make_optimizer, zero_stage=stage, bucket_mb=BUCKET_MB, param_groups=param_groups(model2))
    dp2.load_state_dict(out["state_mid"])
    out["loaded_equal"] = states_equal(dp2.state_dict(), out["state_mid"])
    out["norms_resumed"] = train_dp(dp2, model2, range(4, 6), rank)
    out["params_resumed"] = snapshot(model2, dp2)
    dp2.close()
    return out


def cross_resume(results, rank, src, dst):
    """Stage src's mid-run parameters and state continued under stage dst: its clip norms and parameters."""
    import flashlm.train.parallel as par

    model = make_model(7)
    restore(model, results[src]["params_mid"])
    dp = par.DataParallel(model, make_optimizer, zero_stage=dst, bucket_mb=BUCKET_MB, param_groups=param_groups(model))
    dp.load_state_dict(results[src]["state_mid"])
    out = {"norms": train_dp(dp, model, range(4, 6), rank), "params_end": snapshot(model, dp)}
    dp.close()
    return out


def cross_load(results, rank, world):
    """The state of each stage loads into every other stage and reads back unchanged."""
    import flashlm.train.parallel as par

    ok = {}
    for src, res in results.items():
        for dst in results:
            model = make_model(7)
            dp = par.DataParallel(model, make_optimizer, zero_stage=dst, bucket_mb=BUCKET_MB, param_groups=param_groups(model))
            dp.load_state_dict(res["state_mid"])
            ok[f"{src}->{dst}"] = states_equal(dp.state_dict(), res["state_mid"])
            dp.close()
    return ok


def run_transformer(stage, rank, world, steps, arch="llama"):
    """The tiny Llama (or GPT-2) trained with DataParallel (buckets of ~4 KB): its parameters and clip norms."""
    import flashlm.train.parallel as par

    model = make_transformer(100 + rank, arch)
    dp = par.DataParallel(model, make_optimizer, zero_stage=stage, bucket_mb=0.004, param_groups=param_groups(model))
    norms = train_dp(dp, model, range(steps), rank, task="transformer")
    out = {"norms": norms, "params_end": snapshot(model, dp)}
    dp.close()
    return out


def zero3_memory(rank, world):
    """A 4-layer Llama under ZeRO-3: the parameter bytes materialised while block 2 runs and at the peak of a
    step, those between steps, and the shards' bytes."""
    import flashlm.train.parallel as par

    model = make_transformer(100 + rank, n_layer=4)
    sizes = {"total": sum(p.numel() * 4 for p in model.parameters()),
             "block": max(sum(p.numel() * 4 for p in b.parameters()) for b in model.blocks)}
    sizes["outer"] = sizes["total"] - sum(p.numel() * 4 for p in model.blocks.parameters())
    dp = par.DataParallel(model, make_optimizer, zero_stage=3, param_groups=param_groups(model))
    during = []
    hook = model.blocks[2].register_forward_pre_hook(lambda m, a: during.append(dp.materialized_bytes))
    train_dp(dp, model, range(2), rank, task="transformer")
    hook.remove()
    out = dict(sizes, during=during, peak=dp.peak_materialized_bytes, between=dp.materialized_bytes,
               shards=sum(t.numel() * 4 for g in dp.param_groups for t in g["params"]))
    dp.close()
    return out


def dead_peer(rank, world, out_dir):
    """ZeRO-3 on the tiny Llama: the last rank leaves after one step; the others' next step must raise the
    ring's timeout error (saved to OUT_DIR/rank{RANK}.pt), not hang."""
    import flashlm.train.parallel as par

    model = make_transformer(100)
    dp = par.DataParallel(model, make_optimizer, zero_stage=3, param_groups=param_groups(model))
    train_dp(dp, model, range(1), rank, task="transformer")
    if rank == world - 1:
        torch.save({"dead": True}, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(0)  # no goodbye: as a crashed process
    start, error = time.perf_counter(), None
    try:
        train_dp(dp, model, range(1, 2), rank, task="transformer")
    except RuntimeError as e:
        error = str(e)
    torch.save({"error": error, "seconds": time.perf_counter() - start}, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the background thread may still wait on the ring


def main(rank, world, out_dir, stages, with_transformer=True):
    import torch.distributed as tdist

    import flashlm.dist as fd

    tdist.init_process_group("gloo", store=tdist.FileStore(os.path.join(out_dir, "store"), world), rank=rank,
                             world_size=world)
    if with_transformer == "dead":
        fd.init(timeout=3)
        dead_peer(rank, world, out_dir)
    fd.init(timeout=30)
    results = {stage: run_stage(stage, rank, world) for stage in stages}
    results["cross_load"] = cross_load({s: results[s] for s in stages}, rank, world)
    if 0 in stages and 3 in stages:
        results["cross_resume"] = {(src, dst): cross_resume(results, rank, src, dst) for src, dst in ((3, 0), (0, 3))}
    if with_transformer:
        results["transformer"] = {stage: run_transformer(stage, rank, world, TRANSFORMER_STEPS) for stage in stages}
    if 3 in stages:
        results["gpt2"] = run_transformer(3, rank, world, TRANSFORMER_STEPS, arch="gpt2")
        results["memory"] = zero3_memory(rank, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    fd.destroy()
    tdist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[5] if len(sys.argv) > 5 else None  # "mlp": the MLP alone; "dead": the dead-peer scenario
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], [int(c) for c in sys.argv[4]],
         "dead" if mode == "dead" else mode != "mlp")
