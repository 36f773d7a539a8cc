"""One stage of the multi-process tests of flashlm.parallel.pipeline (tests/test_parallel_pipeline.py starts p).

    python pipeline_worker.py STAGE STAGES OUT_DIR

Stages meet through a FileStore in OUT_DIR (rank 0 names each pipeline's rings there). For each case of
CASES[STAGES] the stage trains its part of a tiny Transformer for STEPS steps (ACCUM batches each, AdamW,
clipping by the norm over all stages) and saves what the test compares to OUT_DIR/stage{STAGE}.pt. The test
process imports this file for the models, the data and the one-process reference, so both train the same thing.
"""

import os
import sys

import torch
import torch.distributed as tdist

from flashlm.models import ModelConfig, Transformer

LR = 1e-2
STEPS = 3
ACCUM = 2  # batches per optimizer step
BATCH = 4  # sequences per batch
MICRO_BATCHES = 4  # micro-batches per batch: more than 2 or 3 stages, so GPipe keeps more than 1F1B
SEQ = 16
MAX_NORM = 0.3  # below the gradient norms of the first steps, so clipping scales them
VOCAB = 61
# (arch, schedule) per pipeline size: 2 stages run everything; 3 add a middle stage (and tied embeddings two
# stages apart for gpt2).
CASES = {2: [("gpt2", "gpipe"), ("gpt2", "1f1b"), ("llama", "gpipe"), ("llama", "1f1b")],
         3: [("gpt2", "1f1b"), ("llama", "gpipe")]}


def make_model(arch: str) -> Transformer:
    """gpt2: 3 layers (2 stages split them 1 + 2), tied embeddings, learned positions, LayerNorm, biases.
    llama: 4 layers, GQA (4 heads, 2 K/V heads), an untied head, checkpointed blocks."""
    torch.manual_seed(7)
    if arch == "gpt2":
        return Transformer(ModelConfig(arch="gpt2", vocab_size=VOCAB, n_layer=3, n_head=4, d_model=32, seq_len=SEQ))
    model = Transformer(ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, d_model=32,
                                    seq_len=SEQ, tie_embeddings=False))
    model.checkpointing = True
    return model


def make_optimizer(params):
    from flashlm.train.optim import AdamW

    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)


def batch(step: int, accum: int):
    g = torch.Generator().manual_seed(1000 * step + accum)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def train_reference(arch: str):
    """One process on the same batches: the loss of each whole batch, torch's clip_grad_norm_."""
    model = make_model(arch)
    optimizer = make_optimizer(model.parameters())
    norms, losses = [], []
    for step in range(STEPS):
        for a in range(ACCUM):
            loss = model(*batch(step, a))[1]
            (loss / ACCUM).backward()
            losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "norms": norms, "losses": losses}


def train_stage(store, stage: int, stages: int, arch: str, schedule: str):
    from flashlm.parallel.pipeline import Pipeline, PipelinePlan, PipelineStage, shm_stage_links

    model = make_model(arch)
    plan = PipelinePlan(model.cfg.n_layer, stages, BATCH, MICRO_BATCHES, SEQ, schedule)
    key = f"job/{arch}/{schedule}"
    if stage == 0:
        store.set(key, f"pp-{os.getpid()}-{arch}-{schedule}")
    # 512-byte slices: an activation (2 KiB) is 4 slices, more than the 2 a ring edge holds, so a stage that sent
    # one waits until its neighbour takes it, and the schedules must order their messages to never both wait.
    links = shm_stage_links(store.get(key).decode(), stage, plan, model.cfg.tie_embeddings, timeout=30,
                            slice_bytes=512)
    part = PipelineStage(model, stage, plan)
    pipe = Pipeline(part, links, plan)
    optimizer = make_optimizer(part.parameters())
    norms, losses, stats = [], [], []
    for step in range(STEPS):
        for a in range(ACCUM):
            idx, targets = batch(step, a)
            losses.append(pipe.forward_backward(idx if part.first else None, targets if part.last else None,
                                                loss_scale=1.0 / ACCUM))
            stats.append(pipe.stats)
        pipe.finish_gradients()
        norms.append(pipe.clip_grad_norm_(MAX_NORM))
        optimizer.step()
        optimizer.zero_grad()
    mine = {id(p) for p in part.parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in mine}
    return {"params": params, "norms": norms, "losses": losses, "stats": stats}


def main(stage: int, stages: int, out_dir: str):
    store = tdist.FileStore(os.path.join(out_dir, "store"), stages)
    results = {case: train_stage(store, stage, stages, *case) for case in CASES[stages]}
    torch.save(results, os.path.join(out_dir, f"stage{stage}.pt"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
