"""flashlm.parallel: the mesh and Megatron tensor parallelism.

TP 2 (2 processes) and DP 2 x TP 2 (4 processes) train a gpt2 and two llama configs (K/V heads split, one
K/V head replicated), each with and without sequence parallelism, for a few AdamW steps with clipping by the
global norm and 2 accumulation micro-steps, and reach the parameters of one process on the same global batch;
the vocabulary-parallel cross-entropy against torch's in float64; shard -> gather exact; the mesh's layout
and its errors; a dead peer; argument checks.

The ranks are processes (tests/tensor_parallel_worker.py) meeting through a FileStore; one run per layout
computes everything and the tests below read its results.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tensor_parallel_worker as w  # noqa: E402

from compare import assert_close_to_reference  # noqa: E402
from processes import run_processes  # noqa: E402
from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.parallel import (Group, Mesh, check_sizes, check_tensor_parallel, shard_model,  # noqa: E402
                              vocab_parallel_cross_entropy)
# The bounds of the data-parallel tests hold here for the same reason: the runs differ only in the order of
# float32 sums (row-parallel partial products summed over ranks, the cross-entropy's sums per vocabulary
# shard, the clip norm summed per shard), so a parameter differs by the same few roundings amplified by Adam.
# Measured at TP 2 (max / RMS), with or without sequence parallelism alike: gpt2 8.9e-6 / 1.8e-7, llama GQA
# 3.2e-6 / 3e-8, llama with one replicated K/V head 1.0e-5 / 8e-8, against the bounds 3e-4 / 3e-6
# (lr * steps = 0.03); a missing reduction (the replicated K/V heads', sequence parallelism's norms') fails them.
from test_train_parallel import NORM_RTOL, assert_params_close  # noqa: E402

LAYOUTS = {"tp2": (1, 2), "dp2tp2": (2, 2)}  # (dp, tp)


def run_ranks(out, dp, tp):
    """Runs dp * tp ranks of the worker; returns each rank's results."""
    run_processes(w.__file__, [(r, dp * tp, out, dp, tp) for r in range(dp * tp)], timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(dp * tp)]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    dp, tp = LAYOUTS[request.param]
    return request.param, dp, tp, run_ranks(tmp_path_factory.mktemp(request.param), dp, tp)


@pytest.fixture(scope="module")
def references():
    """Each config trained in one process on the global batch: its parameters and clip norms."""
    out = {}
    for name in w.CONFIGS:
        model = w.make_model(name)
        norms = w.train_reference(model, w.STEPS)
        out[name] = {"norms": norms, "params_end": dict(model.named_parameters())}
    return out


@pytest.mark.parametrize("name", list(w.RUNS))
def test_tensor_parallel_training_matches_one_process(layout, references, name):
    what, _, _, ranks = layout
    want = references[w.RUNS[name][0]]
    assert want["norms"][0] > w.MAX_NORM  # the steps compared do clip
    names = list(want["params_end"])
    for r, res in enumerate(ranks):
        got = res[name]
        assert list(got["params_end"]) == names
        assert_params_close([got["params_end"][n] for n in names], [want["params_end"][n].detach() for n in names],
                            w.STEPS, f"{what} {name} rank {r}")
        err = max(abs(a - b) / b for a, b in zip(got["norms"], want["norms"]))
        assert err <= NORM_RTOL, f"{what} {name} rank {r}: clip norms {got['norms']} vs {want['norms']}"
        # every rank ends with the same model: replicated tensors stay equal, dp replicas too
        for n in names:
            assert torch.equal(got["params_end"][n], ranks[0][name]["params_end"][n]), f"{what} {name}: {n} differs"


@pytest.mark.parametrize("name", list(w.RUNS))
def test_shard_then_gather_is_exact(layout, name):
    for r, res in enumerate(layout[3]):
        assert res[name]["round_trip_exact"], f"{layout[0]} {name} rank {r}"


def test_vocab_parallel_cross_entropy_matches_torch(layout):
    """The loss (its mean, and its sum: reduction="sum") and the logits' gradient of every shard against
    torch's cross_entropy in float64; the bound is twice torch's own float32 error plus the float32 floor
    (ignored rows included)."""
    what, dp, tp, ranks = layout
    logits, targets = w.ce_inputs()
    for reduction, loss_key, grad_key in (("mean", "loss", "grad"), ("sum", "sum", "sum_grad")):
        ref = logits.double().requires_grad_()
        F.cross_entropy(ref, targets, reduction=reduction).backward()
        base = logits.clone().requires_grad_()
        F.cross_entropy(base, targets, reduction=reduction).backward()
        ref_loss, base_loss = (F.cross_entropy(t, targets, reduction=reduction) for t in (ref.detach(), logits))
        for d in range(dp):
            tp_ranks = ranks[d * tp:(d + 1) * tp]
            for r, res in enumerate(tp_ranks):
                assert_close_to_reference(res["ce"][loss_key], ref_loss, base_loss,
                                          name=f"{what} {reduction} loss rank {r}")
            grad = torch.cat([res["ce"][grad_key] for res in tp_ranks], dim=1)
            assert_close_to_reference(grad, ref.grad, base.grad, name=f"{what} {reduction}: logits' gradient, dp {d}")
        assert bool((grad[targets == -100] == 0).all())


def test_a_dead_peer_fails_the_group_with_a_timeout(tmp_path):
    run_processes(w.__file__, [(r, 2, tmp_path, 1, 2, "dead") for r in range(2)], timeout=60)
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert result["error"] is not None, "the all-reduce with a dead peer returned"
    assert "rank 1" in result["error"], result["error"]
    assert result["seconds"] < w.DEAD_TIMEOUT + 10, result


def test_mesh_layout(layout):
    """rank = ((dp_i * pp + pp_i) * cp + cp_i) * tp + tp_i; each group the ranks that differ in its coordinate."""
    what, dp, tp, ranks = layout
    for rank, res in enumerate(ranks):
        c = res["coords"]
        assert (c["dp"] * tp + c["tp"], c["pp"], c["cp"]) == (rank, 0, 0), f"{what} rank {rank}: {c}"
        assert res["groups"]["tp"] == tuple(c["dp"] * tp + i for i in range(tp))
        assert res["groups"]["dp"] == tuple(i * tp + c["tp"] for i in range(dp))
        assert res["groups"]["pp"] == res["groups"]["cp"] == (rank,)


def test_mesh_sizes_must_fill_the_world(layout):
    what, dp, tp, ranks = layout
    world = dp * tp
    errors = ranks[0]["mesh_errors"]
    assert errors[str(dict(tp=world + 1))].startswith("--dp/--tp/--pp/--cp: ")
    assert f"= {world + 1} ranks, but the world has {world}" in errors[str(dict(tp=world + 1))]
    assert f"but the world has {world}" in errors[str(dict(dp=world, tp=2))]
    assert errors[str(dict(tp=0))] == "--tp: must be an int >= 1, got 0"
    assert errors[str(dict(cp=1.5))] == "--cp: must be an int >= 1, got 1.5"


@pytest.mark.parametrize("sizes, message", [
    (dict(dp=2, tp=2, pp=1, cp=1), "--dp 2 x --tp 2 x --pp 1 x --cp 1 = 4 ranks, but the world has 8"),
    (dict(dp=1, tp=True, pp=1, cp=1), "--tp: must be an int >= 1, got True"),
    (dict(dp=1, tp=1, pp=-2, cp=1), "--pp: must be an int >= 1, got -2"),
    (dict(dp="2", tp=1, pp=1, cp=1), "--dp: must be an int >= 1, got '2'"),
    (dict(dp=1, tp=1, pp=1), "--cp: missing"),
])
def test_check_sizes(sizes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_sizes(8, **sizes)


def test_mesh_checks_sizes_before_anything_else():
    with pytest.raises(ValueError, match="--pp: must be an int >= 1"):
        Mesh(pp=0)  # no flashlm.dist.init(): the sizes fail first


@pytest.mark.parametrize("fields, tp, message", [
    (dict(n_head=4, d_model=32), 3, "--tp: n_head 4 does not divide by tp 3"),
    (dict(n_head=6, d_model=48, d_ff=100), 3, "--tp: d_ff 100 does not divide by tp 3"),
    (dict(n_head=4, d_model=32, vocab_size=65), 2, "--tp: vocab_size 65 does not divide by tp 2"),
    (dict(n_head=12, n_kv_head=3, d_model=48), 2, "--tp: n_kv_head 3 must divide by tp 2 or divide it"),
    (dict(n_head=4, d_model=32), 0, "--tp: must be an int >= 1, got 0"),
])
def test_check_tensor_parallel(fields, tp, message):
    cfg = ModelConfig(**{"arch": "llama", "vocab_size": 64, **fields})
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(cfg, tp)


def test_check_tensor_parallel_refuses_other_families():
    with pytest.raises(NotImplementedError, match="cfg.arch: tensor parallelism covers"):
        check_tensor_parallel(ModelConfig(arch="qwen3", vocab_size=64, n_head=4, d_model=32), 2)


def _one_rank() -> Group:
    return Group("tp", (0,), 0, None)


@pytest.mark.parametrize("name", list(w.CONFIGS))
def test_one_rank_shard_is_the_model(name):
    """A tp group of one: the shard is the model, its logits and loss torch's, its gradients the model's."""
    model = w.make_model(name)
    part = shard_model(model, _one_rank())
    idx, targets = w.global_batch(0, 0)
    logits, loss = model(idx, targets)
    part_logits, part_loss = part(idx, targets)
    assert torch.equal(part_logits, logits)
    assert_close_to_reference(part_loss, F.cross_entropy(logits.double().view(-1, w.VOCAB), targets.view(-1)),
                              loss, name="loss")
    loss.backward()
    part_loss.backward()
    params = dict(model.named_parameters())
    for n, p in part.named_parameters():
        # the cross-entropy's float32 rounding differs from torch's: the gradients agree to a few ulps of the sum
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-5, atol=1e-7, msg=n)


def test_vocab_parallel_cross_entropy_checks_its_arguments():
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"targets: must be in \[0, 8\) or ignore_index -100, got 8"):
        vocab_parallel_cross_entropy(logits, torch.tensor([0, 8, 1]), _one_rank())
    with pytest.raises(ValueError, match="targets: must be int64"):
        vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 1], dtype=torch.int32), _one_rank())
    with pytest.raises(ValueError, match="logits: must be"):
        vocab_parallel_cross_entropy(torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64), _one_rank())
    with pytest.raises(ValueError, match="reduction: must be 'mean' or 'sum', got 'none'"):
        vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 1]), _one_rank(), reduction="none")


def test_shard_model_refuses_other_models():
    with pytest.raises(ValueError, match="model: must be a flashlm Transformer"):
        shard_model(torch.nn.Linear(2, 2), _one_rank())
    model = Transformer(ModelConfig(**w.CONFIGS["gpt2"]))
    part = shard_model(model, _one_rank())
    with pytest.raises(ValueError, match="model: must be a flashlm Transformer"):
        shard_model(part, _one_rank())


def test_sequence_parallel_needs_whole_shares_of_the_sequence():
    part = shard_model(w.make_model("llama_gqa"), Group("tp", (0, 1), 0, None), sequence_parallel=True)
    with pytest.raises(ValueError, match="idx: with sequence parallelism the sequence length must divide by tp 2, "
                                         "got 15"):
        part(torch.zeros(1, 15, dtype=torch.int64))  # refused before any collective
    with pytest.raises(ValueError, match="sequence_parallel: must be a bool"):
        shard_model(w.make_model("llama_gqa"), _one_rank(), sequence_parallel=1)


def test_token_ids_out_of_the_vocabulary_are_refused():
    part = shard_model(w.make_model("gpt2"), _one_rank())
    with pytest.raises(ValueError, match=r"idx: token ids must be in \[0, 64\), got 0..64"):
        part(torch.tensor([[0, 64]]))
