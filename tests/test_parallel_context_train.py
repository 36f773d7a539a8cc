"""Context-parallel training (flashlm.parallel.context_model): CP 2 against one process.

Two processes (tests/context_train_worker.py) make a Mesh(cp=2) and train a gpt2 and a llama GQA config
(checkpointed blocks) with the sequence split over the ranks (zig-zag; 16 tokens and an uneven 15; one
contiguous run) for 3 AdamW steps with clipping and 2 accumulation micro-steps, the first 3 targets of each row ignored;
the test compares them with one process on the same batches. Argument checks run in this process.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import context_train_worker as w  # noqa: E402

from processes import run_processes  # noqa: E402
from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.parallel.context import SequenceLayout  # noqa: E402
from flashlm.parallel.context_model import ContextParallelTransformer  # noqa: E402
# The data-parallel tests' bounds hold for the same reason: the runs differ only in the order of float32 sums
# (attention's partial results merged by their logsumexp, each rank's token losses and the gradients summed
# over the ranks), so a parameter differs by a few roundings amplified by Adam. NORM_RTOL bounds the clip
# norms and, for the same reason, the first loss (the ranks' shares added up against the one-process mean).
# Measured (max / RMS): 5.7e-6..1.7e-5 / 8e-8..1.6e-7 against the bounds 3e-4 / 3e-6 (lr * steps = 0.03); losses
# and norms within 2e-7. Each rank normalising by its own count of targets ends 0.05 away (RMS 0.01), its loss
# 2e-3 off.
from test_train_parallel import NORM_RTOL, assert_params_close  # noqa: E402

CP = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("context_train")
    run_processes(w.__file__, [(r, CP, out) for r in range(CP)], timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(CP)]


@pytest.mark.parametrize("run", list(w.RUNS))
def test_context_parallel_training_matches_one_process(ranks, run):
    model, loss, norms = w.train(run)
    assert norms[0] > w.MAX_NORM  # the steps compared do clip
    want = dict(model.named_parameters())
    names = list(want)
    got_loss = sum(res[run]["loss"] for res in ranks)
    assert abs(got_loss - loss) <= NORM_RTOL * abs(loss), f"{run}: the ranks' losses add to {got_loss}, not {loss}"
    for r, res in enumerate(ranks):
        got = res[run]
        assert list(got["params_end"]) == names
        assert_params_close([got["params_end"][n] for n in names], [want[n].detach() for n in names], w.STEPS,
                            f"{run} rank {r}")
        err = max(abs(a - b) / b for a, b in zip(got["norms"], norms))
        assert err <= NORM_RTOL, f"{run} rank {r}: clip norms {got['norms']} vs {norms}"
        for n in names:  # every rank takes the same step
            assert torch.equal(got["params_end"][n], ranks[0][run]["params_end"][n]), f"{run}: {n} differs"


class FakeRing:
    """A ring that no check should reach: the errors below come before any message."""

    rank, world_size = 0, 2

    def sendrecv(self, send, recv):
        raise AssertionError("a message was sent")

    allreduce = sendrecv


class SendOnlyRing:
    rank, world_size = 0, 2

    def sendrecv(self, send, recv):
        raise AssertionError("a message was sent")


def tiny(**kwargs):
    return Transformer(ModelConfig(**{**dict(arch="llama", vocab_size=32, n_layer=1, n_head=2, d_model=16,
                                             seq_len=16), **kwargs}))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        ContextParallelTransformer(torch.nn.Linear(2, 2), FakeRing())
    with pytest.raises(NotImplementedError, match="model: .*gemma2"):
        ContextParallelTransformer(tiny(arch="gemma2", sliding_window=4, head_dim=8), FakeRing())
    with pytest.raises(NotImplementedError, match="model: .*phi3"):
        ContextParallelTransformer(tiny(arch="phi3", sliding_window=4), FakeRing())
    with pytest.raises(TypeError, match="ring: .*allreduce"):  # ring attention's transport is not enough
        ContextParallelTransformer(tiny(), SendOnlyRing())
    model = ContextParallelTransformer(tiny(), FakeRing())
    layout = SequenceLayout(15, 2)  # rank 0 holds chunks 0 and 3: 4 + 3 tokens
    idx = torch.zeros(1, 7, dtype=torch.int64)
    with pytest.raises(TypeError, match="layout"):
        model(idx, None, (15, 2))
    with pytest.raises(ValueError, match="layout: seq_len 20"):
        model(idx, None, SequenceLayout(20, 2))
    with pytest.raises(ValueError, match="ring: 2 ranks"):
        model(idx, None, SequenceLayout(15, 3))
    with pytest.raises(ValueError, match="idx: rank 0 holds 7"):
        model(torch.zeros(1, 8, dtype=torch.int64), None, layout)
    with pytest.raises(ValueError, match="idx: .*int64"):
        model(idx.int(), None, layout)
    with pytest.raises(ValueError, match="targets: must be int64"):
        model(idx, idx[:, :4], layout)
    with pytest.raises(ValueError, match=r"idx: token ids must be in \[0, 32\)"):
        model(idx - 1, None, layout)
    with pytest.raises(ValueError, match="targets: must be in"):
        model(idx, idx + 32, layout)
    with pytest.raises(ValueError, match="targets: must be int64"):
        model(idx, idx.float(), layout)
