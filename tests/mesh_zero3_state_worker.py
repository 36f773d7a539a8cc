"""One rank of test_train_zero_mesh's ZeRO-3 checkpoint test: ModelParallel's full_state_dict and
load_full_state_dict under ZeRO-3 on a mesh against the rank's whole part gathered (full_parameters).

    python mesh_zero3_state_worker.py OUT_DIR DP PP CP   # RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment

The rank trains a tiny gpt2 (tied embeddings: across the stages under pp) for 2 AdamW steps, so that the shards
differ from the initial values, then records to OUT_DIR/rank{RANK}.pt: the full state dict (rank 0's), the full
parameters as full_parameters() gathers them, the optimizer state (rank 0's) and the rank's part of it made whole
at once by Zero3, the bytes of parameters ZeRO-3 materialised while saving and while
loading, and after loading a random full state dict (the same on every rank) the full state dict and parameters
again.
"""

import os
import sys
import types

import torch

STEPS = 2


def make_optimizer(groups):
    from flashlm.train.optim import AdamW

    return AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def full_parameters(mp, model) -> dict:
    with mp.full_parameters():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def materialised(mp, call):
    """call()'s result and the peak bytes of parameters ZeRO-3 materialised during it."""
    mp.zero.peak_materialized_bytes = mp.zero.materialized_bytes
    result = call()
    return result, mp.zero.peak_materialized_bytes


def run(sizes: dict) -> dict:
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.parallel_step import ModelParallel

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=64, n_layer=2, n_head=4, d_model=32, seq_len=16))
    shapes = {n: p.shape for n, p in model.named_parameters()}  # (ZeRO-3 empties the parameters)
    cfg = types.SimpleNamespace(**sizes, sequence_parallel=False, seq_len=16, batch_size=2,
                                micro_batches=2 if sizes["pp"] > 1 else 1, pp_schedule="gpipe", zero_stage=3,
                                weight_decay=0.1)
    mp = ModelParallel(model, cfg, sizes, make_optimizer, timeout=60.0)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + mp.mesh.coords["dp"])
        idx = torch.randint(0, 64, (2, 17), generator=g)
        mp.forward_backward(idx[:, :-1].contiguous(), idx[:, 1:].contiguous(), 1.0)
        mp.finish_gradients()
        mp.clip_grad_norm_(0.3)
        mp.step()
        mp.zero_grad()
    out = {}
    out["saved"], out["save_bytes"] = materialised(mp, mp.full_state_dict)
    out["opt"] = mp.state_dict()
    out["opt_names"] = [n for names in mp._full_group_names for n in names]
    own = mp.zero.state_dict()  # this rank's part's optimizer state made whole at once (every dp rank)
    names = [mp._names[id(p)] for g in mp.groups for p in g["params"]]
    out["own_opt"] = {names[i]: values for i, values in own["state"].items()}
    out["gathered"] = full_parameters(mp, model)
    g = torch.Generator().manual_seed(7)
    new = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    _, out["load_bytes"] = materialised(mp, lambda: mp.load_full_state_dict(new))
    out["loaded"] = new
    out["saved_after_load"] = mp.full_state_dict()
    out["gathered_after_load"] = full_parameters(mp, model)
    mp.close()
    return out


def main():
    import flashlm.dist as fd

    out, dp, pp, cp = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    fd.init(timeout=60.0)
    torch.save(run(dict(dp=dp, tp=1, pp=pp, cp=cp)), os.path.join(out, f"rank{fd.get_rank()}.pt"))
    fd.destroy()


if __name__ == "__main__":
    main()
