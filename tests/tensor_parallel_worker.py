"""One rank of the multi-process tests of flashlm.parallel (tests/test_parallel_tensor.py starts N).

    python tensor_parallel_worker.py RANK WORLD_SIZE OUT_DIR DP TP [dead]     # e.g. 0 4 /tmp/x 2 2

Ranks meet through a FileStore in OUT_DIR and make a Mesh(dp=DP, tp=TP). The rank computes the
vocabulary-parallel cross-entropy of its slice of fixed logits, then trains each config of CONFIGS with
tensor parallelism, with and without sequence parallelism (and data parallelism over the dp group), and
saves what the test compares (the gathered full parameters, clip norms, the shard -> gather round trip, the
mesh's errors) to OUT_DIR/rank{RANK}.pt. With "dead", the last rank of the tp group leaves after the mesh is
made and the others record the error of their next collective.
The test process imports this file for the models, the data and the one-process reference loop.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_parallel_worker import LR, MAX_NORM, MICRO_STEPS, make_optimizer  # noqa: E402,F401

STEPS = 3
GLOBAL_BATCH = 4  # sequences per micro-step, split over the dp ranks
VOCAB = 64
CONFIGS = {
    # tied embeddings, biases everywhere (q/k/v column-parallel with theirs, o/proj's added after the sum)
    "gpt2": dict(arch="gpt2", vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, seq_len=16),
    # GQA, K/V heads split over 2 ranks, checkpointed blocks
    "llama_gqa": dict(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=16),
    # one K/V head, replicated on every rank; an untied lm head
    "llama_mqa": dict(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=1, d_model=32, seq_len=16,
                      tie_embeddings=False),
}
# Each run: (config, sequence parallel)
RUNS = {name: (name, False) for name in CONFIGS} | {f"{name}_sp": (name, True) for name in CONFIGS}
CE_ROWS = 24
DEAD_TIMEOUT = 3.0  # seconds the mesh's rings wait for a peer in the dead-peer run


def make_model(name: str):
    from flashlm.models import ModelConfig, Transformer

    torch.manual_seed(100)
    model = Transformer(ModelConfig(**CONFIGS[name]))
    model.checkpointing = name == "llama_gqa"
    return model


def global_batch(step: int, micro: int):
    """(idx, targets) int64 [GLOBAL_BATCH, 16] of one micro-step."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, 16), generator=g), torch.randint(0, VOCAB, (GLOBAL_BATCH, 16), generator=g)


def ce_inputs():
    """Logits float32 [CE_ROWS, VOCAB] (some large, so the max matters) and targets with ignored rows."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(CE_ROWS, VOCAB, generator=g) * 4
    logits[3, 10] = 60.0
    targets = torch.randint(0, VOCAB, (CE_ROWS,), generator=g)
    targets[::5] = -100
    return logits, targets


def train_reference(model, steps):
    """One process, plain torch clipping, the global batch."""
    optimizer = make_optimizer(model.param_groups(0.1))
    norms = []
    for step in range(steps):
        for micro in range(MICRO_STEPS):
            idx, targets = global_batch(step, micro)
            (model(idx, targets)[1] / MICRO_STEPS).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def train_parallel(model, mesh, steps):
    """This rank's part of model: its dp rank's rows of each global batch, gradients averaged over dp."""
    optimizer = make_optimizer(model.param_groups(0.1))
    rows = GLOBAL_BATCH // mesh.dp.size
    mine = slice(mesh.dp.rank * rows, (mesh.dp.rank + 1) * rows)
    norms = []
    for step in range(steps):
        for micro in range(MICRO_STEPS):
            idx, targets = global_batch(step, micro)
            (model(idx[mine], targets[mine])[1] / MICRO_STEPS).backward()
        for p in model.parameters():
            mesh.dp.all_reduce(p.grad, "avg")
        norms.append(model.clip_grad_norm_(MAX_NORM))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def run_ce(mesh):
    from flashlm.parallel import vocab_parallel_cross_entropy

    logits, targets = ce_inputs()
    cols = VOCAB // mesh.tp.size
    shard = logits[:, mesh.tp.rank * cols:(mesh.tp.rank + 1) * cols].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, mesh.tp)
    loss.backward()
    summed = shard.detach().clone().requires_grad_()  # reduction="sum": context parallelism's shares
    total = vocab_parallel_cross_entropy(summed, targets, mesh.tp, reduction="sum")
    total.backward()
    return {"loss": loss.detach(), "grad": shard.grad, "sum": total.detach(), "sum_grad": summed.grad}


def mesh_errors(world):
    """The messages of meshes whose sizes do not fit the world (nothing is connected)."""
    from flashlm.parallel import Mesh

    out = {}
    for sizes in (dict(tp=world + 1), dict(dp=world, tp=2), dict(tp=0), dict(cp=1.5)):
        try:
            Mesh(**sizes)
            out[str(sizes)] = None
        except ValueError as e:
            out[str(sizes)] = str(e)
    return out


def dead_peer(rank, mesh, out_dir):
    """The last rank of the tp group leaves; the others' collective must fail within the mesh's timeout."""
    import time

    if mesh.tp.rank == mesh.tp.size - 1:
        os._exit(0)
    start = time.monotonic()
    try:
        mesh.tp.all_reduce(torch.ones(1024))
        error = None
    except RuntimeError as e:
        error = str(e)
    torch.save({"error": error, "seconds": time.monotonic() - start}, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the ring's peer is gone: leave without tearing anything down


def main(rank, world, out_dir, dp, tp, mode="train"):
    import torch.distributed as tdist

    import flashlm.dist as fd
    from flashlm.parallel import Mesh, gather_state_dict, shard_model

    tdist.init_process_group("gloo", store=tdist.FileStore(os.path.join(out_dir, "store"), world), rank=rank,
                             world_size=world)
    fd.init(timeout=30)
    if mode == "dead":
        dead_peer(rank, Mesh(dp=dp, tp=tp, timeout=DEAD_TIMEOUT), out_dir)
    out = {"mesh_errors": mesh_errors(world)}
    mesh = Mesh(dp=dp, tp=tp, timeout=30)
    out["coords"] = dict(mesh.coords)
    out["groups"] = {dim: g.ranks for dim, g in mesh.groups.items()}
    out["ce"] = run_ce(mesh)
    for name, (config, sequence_parallel) in RUNS.items():
        full = make_model(config)
        model = shard_model(full, mesh.tp, sequence_parallel)
        round_trip = gather_state_dict(model)
        out[name] = {"round_trip_exact": round_trip.keys() == full.state_dict().keys() and all(
            torch.equal(round_trip[k], v) for k, v in full.state_dict().items())}
        del full
        out[name]["norms"] = train_parallel(model, mesh, STEPS)
        out[name]["params_end"] = gather_state_dict(model)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    fd.destroy()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:])
