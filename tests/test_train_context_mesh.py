"""`flashlm train --cp` with --tp and --pp (CP 2 x TP 2, CP 2 x PP 2, CP 2 x TP 2 x PP 2) against one process.

The runs and the comparison are test_train_model_parallel's: `flashlm train` started as torchrun would, one
process per rank, a tiny gpt2 (tied embeddings across the pipeline's ends) or llama GQA config, 4 AdamW steps of
2 accumulation micro-steps, clipped, a global batch of 4 sequences; the one-process run on the same batches is the
reference for losses, clip norms, validation losses, final parameters and optimizer moments. One layout uses
sequences of 31 tokens, so that its cp ranks hold 15 and 16 (zig-zag chunks of 8, 8, 8, 7): the loss must be
the mean over all tokens, not the mean of the ranks' means. A CP 2 x TP 2 checkpoint then resumes at DP 4.

The bounds are the data-parallel tests' (test_train_parallel), for the same reason: the layouts differ from one
process only in the order of float32 sums (ring attention's blocks merged by their logsumexp, the vocabulary
shards and row-parallel products summed over tp, micro-batches over pp, the cp ranks' shares of the loss and of
the gradients summed), so a parameter differs by a few roundings amplified by Adam. Measured (max parameter
error after 4 steps, bound 1.2e-4; RMS bound 1.2e-6): 5.2e-6 (CP 2 x TP 2), 1.0e-5 (CP 2 x PP 2, GPipe), 3.3e-6
(CP 2 x PP 2, 1F1B, 31 tokens), 1.3e-5 (CP 2 x TP 2 x PP 2), RMS at most 4.1e-8. Each cp rank taking the mean of
its own tokens (the shares averaged) ends 4.4e-3 away on the 31-token run (RMS 1.7e-4), its clip norms 0.1-0.3%
off: it fails.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel_context_train import FakeRing  # noqa: E402  (a ring no message may reach)
from test_train_loop import data_cache, read_metrics, text_file  # noqa: E402,F401
from test_train_model_parallel import (BATCH, STEPS, assert_matches, copy_checkpoint, flags, launch,  # noqa: E402
                                       one_process, settings, world)

from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402

# name: (config, sizes, more flags, seq_len)
RUNS = {
    "cp2_tp2": ("llama", dict(cp=2, tp=2), [], 32),
    "cp2_pp2_gpipe": ("gpt2", dict(cp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "gpipe"], 32),
    "cp2_pp2_1f1b": ("llama", dict(cp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b"], 31),
    "cp2_tp2_pp2": ("gpt2", dict(cp=2, tp=2, pp=2), ["--micro-batches", 2], 32),
}


@pytest.fixture(scope="module")
def references(text_file, data_cache, tmp_path_factory):
    """(config, seq_len) -> the one-process run's metrics, parameters and optimizer state, made when first asked."""
    done = {}

    def get(model, seq_len):
        if (model, seq_len) not in done:
            out = tmp_path_factory.mktemp(f"ref_{model}_{seq_len}")
            trainer = one_process(text_file, data_cache, out, model, seq_len=seq_len)
            done[model, seq_len] = {"metrics": trainer.metrics, "model": trainer.model.state_dict(),
                                    "optimizer": trainer.dp.state_dict()}
        return done[model, seq_len]
    return get


@pytest.fixture(scope="module")
def runs(text_file, data_cache, tmp_path_factory):
    """Each layout's run, started when a test first asks for it: (out_dir, logs)."""
    done = {}

    def get(name):
        if name not in done:
            model, sizes, more, seq_len = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            values = settings(text_file, data_cache, out, model, seq_len=seq_len)
            logs = launch(world(sizes), flags(values) + flags(sizes) + list(more))
            done[name] = out, logs
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_layout_matches_one_process(runs, references, name):
    out, logs = runs(name)
    model, sizes, _, seq_len = RUNS[name]
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == STEPS
    assert_matches(read_metrics(out), state, references(model, seq_len), name)
    assert f"{BATCH * seq_len * 2} tokens/step, {world(sizes)} rank(s)" in logs[0]
    for r, log in enumerate(logs[1:], 1):
        assert "flashlm train:" not in log and "val loss" not in log, f"rank {r} printed:\n{log}"


@pytest.mark.slow
def test_checkpoint_moves_from_cp2_tp2_to_dp4(runs, references, tmp_path):
    """The CP 2 x TP 2 run's step-2 checkpoint resumed at DP 4 (each replica one sequence of the same global
    batch): steps 3 and 4 as the one-process run's."""
    out, _ = runs("cp2_tp2")
    model, _, _, seq_len = RUNS["cp2_tp2"]
    folder = copy_checkpoint(out, 2, tmp_path / "dp")
    launch(4, ["--out-dir", folder, "--resume", "--batch-size", BATCH // 4])
    assert_matches(read_metrics(folder)[2:], load_checkpoint(latest_checkpoint(folder)),
                   references(model, seq_len), "cp2 x tp2 -> dp 4", first_step=3)


def test_bad_context_shards_are_refused():
    from flashlm.models import ModelConfig, Transformer
    from flashlm.parallel.context import SequenceLayout
    from flashlm.parallel.context_model import ContextShard
    from flashlm.parallel.pipeline import PipelinePlan, PipelineStage

    layout = SequenceLayout(31, 2)  # rank 0 holds chunks 0 and 3: 8 + 7 tokens
    with pytest.raises(TypeError, match="ring: object has no `rank`"):
        ContextShard(object(), layout)
    with pytest.raises(TypeError, match="layout: expected a SequenceLayout"):
        ContextShard(FakeRing(), (31, 2))
    with pytest.raises(ValueError, match="ring: 2 ranks, the layout is for cp=3"):
        ContextShard(FakeRing(), SequenceLayout(31, 3))
    shard = ContextShard(FakeRing(), layout)
    assert shard.local_len == 15
    model = Transformer(ModelConfig(arch="llama", vocab_size=32, n_layer=2, n_head=2, d_model=16, seq_len=32))
    with pytest.raises(ValueError, match="context: the plan's seq_len 31 must be the cp slice's 15"):
        PipelineStage(model, 0, PipelinePlan(2, 2, 2, 2, 31), context=shard)
    stage = PipelineStage(model, 0, PipelinePlan(2, 2, 2, 2, 15), context=shard)
    assert stage.context is shard


class OneRankRing:
    """The cp ring of one rank: ring attention sends nothing, the count's all-reduce is the count."""

    rank, world_size = 0, 1

    def sendrecv(self, send, recv):
        raise AssertionError("a message was sent")

    def allreduce(self, tensor, op="sum"):
        return tensor


@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero3_under_context_parallelism_gathers_block_by_block(checkpointing):
    """ZeRO-3 on a ContextParallelTransformer makes each block a unit of its own (gathered around its forward and
    backward through the hooks on the block modules that ContextShard.block calls): the peak of materialised
    parameters is the outer unit and two blocks, not the whole model; the loss and gradients are the plain
    wrapper's, bit for bit (one rank: the same values, nothing summed)."""
    import torch

    from flashlm.models import ModelConfig, Transformer
    from flashlm.parallel.context import SequenceLayout
    from flashlm.parallel.context_model import ContextParallelTransformer
    from flashlm.parallel.zero3 import WorldGroup, Zero3

    def model():
        torch.manual_seed(0)
        m = Transformer(ModelConfig(arch="llama", vocab_size=32, n_layer=4, n_head=2, n_kv_head=1, d_model=16,
                                    seq_len=16))
        m.checkpointing = checkpointing
        return m

    layout = SequenceLayout(16, 1)
    gen = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 32, (2, 16), generator=gen) for _ in range(2))
    plain = model()
    _, want = ContextParallelTransformer(plain, OneRankRing())(idx, targets, layout)
    want.backward()

    sharded = model()
    wrapper = ContextParallelTransformer(sharded, OneRankRing())
    zero = Zero3(wrapper, sharded.param_groups(0.1), lambda groups: torch.optim.SGD(groups, lr=0.1), WorldGroup())
    try:
        assert [u.module for u in zero.blocks] == list(sharded.blocks)
        unit_bytes = [u.numel * 4 for u in zero.blocks]
        _, loss = wrapper(idx, targets, layout)
        loss.backward()
        zero.finish_gradients()
        assert torch.equal(loss, want)
        assert zero.peak_materialized_bytes == zero.outer.numel * 4 + 2 * max(unit_bytes) < \
            zero.outer.numel * 4 + sum(unit_bytes), f"peak {zero.peak_materialized_bytes} bytes"
        names = {id(p): n for n, p in sharded.named_parameters()}
        plain_grads = dict((n, p.grad) for n, p in plain.named_parameters())
        for p, g in zero.owned_grads():
            n = names[id(p)]
            assert torch.equal(g, plain_grads[n].reshape(-1)), n
        assert sum(g.numel() for _, g in zero.owned_grads()) == sum(p.numel() for p in plain.parameters())
    finally:
        zero.close()
