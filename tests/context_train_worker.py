"""One rank of the context-parallel training test (tests/test_parallel_context_train.py starts CP of these).

    python context_train_worker.py RANK CP OUT_DIR

Ranks meet through a FileStore in OUT_DIR and make a Mesh(cp=CP); each trains every run of RUNS with its part
of each sequence (ContextParallelTransformer over mesh.cp.ring) and saves the first micro-step's loss, the
clip norms and the final parameters to OUT_DIR/rank{RANK}.pt. The test process imports this file for the runs,
the data and the one-process reference (train with cp=None).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tensor_parallel_worker import MAX_NORM, MICRO_STEPS, STEPS, global_batch, make_model, make_optimizer  # noqa: E402

# name: (tensor_parallel_worker's config: gpt2, or llama with GQA and checkpointed blocks; seq_len; zig-zag).
# 15 tokens over 2 ranks: chunks of 4, 4, 4 and 3, so rank 0 holds 4 + 3 tokens and
# rank 1 4 + 4 (zig-zag), or 8 and 7 (contiguous).
RUNS = {
    "gpt2": ("gpt2", 16, True),
    "gpt2_uneven": ("gpt2", 15, True),
    "llama_gqa": ("llama_gqa", 16, True),
    "llama_gqa_uneven": ("llama_gqa", 15, True),
    "llama_gqa_uneven_contiguous": ("llama_gqa", 15, False),
}


def batch(step: int, micro: int, seq_len: int):
    """(idx, targets) [4, seq_len]; each row's first 3 targets ignored: all in rank 0's first chunk, so the
    ranks hold different counts of targets (a loss normalised by its own rank's count is wrong)."""
    idx, targets = (t[:, :seq_len].clone() for t in global_batch(step, micro))
    targets[:, :3] = -100
    return idx, targets


def train(run: str, cp=None):
    """(model, first micro-step's loss, clip norms) after STEPS AdamW steps on the run's batches: in one process
    (cp None) or as rank cp.ring.rank of a context-parallel run (cp: a ContextParallelTransformer's factory)."""
    from flashlm.parallel.context import SequenceLayout, shard_sequence

    config, seq_len, zigzag = RUNS[run]
    model = make_model(config)
    parallel = None if cp is None else cp(model)
    optimizer = make_optimizer(model.param_groups(0.1))
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(MICRO_STEPS):
            idx, targets = batch(step, micro, seq_len)
            if parallel is None:
                loss = model(idx, targets)[1]
            else:
                layout = SequenceLayout(seq_len, parallel.ring.world_size, zigzag)
                rank = parallel.ring.rank
                loss = parallel(shard_sequence(idx, layout, rank), shard_sequence(targets, layout, rank), layout)[1]
            losses.append(float(loss.detach()))
            (loss / MICRO_STEPS).backward()
        if parallel is not None:
            parallel.all_reduce_gradients()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
    return model, losses[0], norms


def main(rank, cp, out_dir):
    import torch.distributed as tdist

    import flashlm.dist as fd
    from flashlm.parallel import Mesh
    from flashlm.parallel.context_model import ContextParallelTransformer

    tdist.init_process_group("gloo", store=tdist.FileStore(os.path.join(out_dir, "store"), cp), rank=rank,
                             world_size=cp)
    fd.init(timeout=30)
    mesh = Mesh(cp=cp, timeout=30)
    out = {}
    for run in RUNS:
        model, loss, norms = train(run, lambda m: ContextParallelTransformer(m, mesh.cp.ring))
        out[run] = {"loss": loss, "norms": norms,
                    "params_end": {n: p.detach().clone() for n, p in model.named_parameters()}}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    fd.destroy()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
