"""One rank of test_train_zero_mesh's overlap test: ModelParallel's dp reduction launched from the gradient hooks
during backward against the same reduction after backward, on one mesh layout.

    python mesh_overlap_worker.py OUT_DIR DP TP   # RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment

For ZeRO stages 0, 1 and 2 the rank trains a tiny llama (GQA) twice, with overlap=False then True: 3 AdamW steps of
2 accumulation micro-steps (the first under no_sync()), clipped, in buckets small enough that the model spans
several. It records the clip norms, the full parameters at the end, and for every dp collective whether it was
launched before the step's finish_gradients (from the gradient hooks during backward), to OUT_DIR/rank{RANK}.pt.
"""

import contextlib
import os
import sys
import types

import torch

STEPS, MICRO, BUCKET_MB = 3, 2, 0.002  # 2 KB: the model's gradients span several buckets


def make_optimizer(groups):
    from flashlm.train.optim import AdamW

    return AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def train(sizes: dict, zero_stage: int, overlap: bool) -> dict:
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.parallel_step import ModelParallel

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    seq_len=16))
    cfg = types.SimpleNamespace(dp=sizes["dp"], tp=sizes["tp"], pp=1, cp=1, sequence_parallel=False, seq_len=16,
                                batch_size=2, micro_batches=1, pp_schedule="gpipe", zero_stage=zero_stage,
                                weight_decay=0.1)
    mp = ModelParallel(model, cfg, sizes, make_optimizer, timeout=60.0, overlap=overlap, bucket_mb=BUCKET_MB)
    phase = {"now": "backward"}
    entered = []  # the phase in which each dp collective was launched
    dp = mp.mesh.dp

    # Recorded when the code that runs the collective looks it up (the hook submitting it to the background
    # thread, or finish_gradients), not when the thread enters it: the thread's timing depends on the machine's
    # load, the launch does not.
    class Recorded(type(dp)):
        def __getattribute__(self, name):
            if name in ("all_reduce", "reduce_scatter"):
                entered.append(phase["now"])
            return super().__getattribute__(name)

    dp.__class__ = Recorded
    norms = []
    for step in range(STEPS):
        for micro in range(MICRO):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + mp.mesh.coords["dp"])
            idx = torch.randint(0, 64, (2, 17), generator=g)
            phase["now"] = "backward"
            with contextlib.nullcontext() if micro == MICRO - 1 else mp.no_sync():
                mp.forward_backward(idx[:, :-1].contiguous(), idx[:, 1:].contiguous(), 1.0 / MICRO)
        phase["now"] = "after"
        mp.finish_gradients()
        norms.append(mp.clip_grad_norm_(0.3))
        mp.step()
        mp.zero_grad()
    with mp.full_parameters():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    mp.close()
    return {"norms": norms, "params": params, "entered": entered}


def main():
    import flashlm.dist as fd

    out, dp, tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    fd.init(timeout=60.0)
    sizes = dict(dp=dp, tp=tp, pp=1, cp=1)
    results = {(stage, overlap): train(sizes, stage, overlap) for stage in (0, 1, 2) for overlap in (False, True)}
    torch.save(results, os.path.join(out, f"rank{fd.get_rank()}.pt"))
    fd.destroy()


if __name__ == "__main__":
    main()
