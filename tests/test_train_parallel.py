"""flashlm.train.parallel.DataParallel: 2 ranks with ZeRO stage 0, 1, 2 and 3 against one process on the
global batch (a small MLP and tiny flashlm Transformers, AdamW, clipping, 2 accumulation micro-steps), the
state_dicts of the stages against each other, resume (within a stage and across stages 0 and 3), found_inf
and clipping across ranks, ZeRO-3's materialised parameter bytes and a dead peer, the one-process path
against the plain optimizer, and argument checks.

The ranks are processes (tests/train_parallel_worker.py) meeting through a FileStore; one run of 2 ranks
trains everything and the tests below read its results.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_parallel_worker as w  # noqa: E402

from compare import assert_close  # noqa: E402
from processes import run_processes  # noqa: E402
from flashlm.train.parallel import DataParallel  # noqa: E402

STAGES = (0, 1, 2, 3)
SHARDED = (1, 2, 3)
WORLD = 2
STEPS = 6

# Parameters of 2 ranks against 1 process. AdamW moves an element by at most about lr per step
# (|m/sqrt(v)| <~ 1), so differences are measured in units of lr * steps. The runs differ only in the
# order of float32 sums (per-rank batch means averaged over ranks against one mean over the global batch;
# the clip norm summed per shard), so a gradient element differs by a few roundings of its sum, ~1e-7 of
# the sum of its |terms|. Adam divides by sqrt(v) ~ |g|: most elements' moves change by ~1e-7..1e-6 of lr,
# but an element whose gradient nearly cancels (|g| << sum of |terms|) changes more; in the tiny Transformer
# a handful of MLP weights move up to 1e-3 lr per step differently. Bounds: every element within
# 1e-2 lr * steps, the RMS over all elements within 1e-4 lr * steps. Measured (max / RMS): MLP 1.2e-7 /
# 9e-9 against 6e-4 / 6e-6; Transformer 1.0e-5 / 1.3e-7 against 3e-4 / 3e-6. A real fault moves by O(lr):
# training on rank 0's samples only ends 0.06..0.1 away (RMS 0.02).
MAX_TOL, RMS_TOL = 1e-2, 1e-4  # times lr * steps
# Optimizer moments (they follow the gradients' ~1e-7 relative rounding), relative to the largest of them.
STATE_RTOL = 1e-5
# The clip norm: the same gradients up to that rounding, summed in another order (~1e-6 for 957 terms).
NORM_RTOL = 1e-5


def assert_params_close(got, want, steps, what):
    """Parameters after `steps` AdamW steps, within the bounds above."""
    assert [g.shape for g in got] == [r.shape for r in want], what
    unit = w.LR * steps
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, atol=MAX_TOL * unit, name=f"{what}: parameter {i} (bound {MAX_TOL} x lr x steps)")
    diff = torch.cat([(g.double() - r.double()).reshape(-1) for g, r in zip(got, want)])
    rms = float(diff.square().mean().sqrt())
    assert rms <= RMS_TOL * unit, f"{what}: RMS error {rms:.3g} > {RMS_TOL} x lr x steps"


def assert_close_to_scale(got, want, rtol, what):
    """Each tensor within rtol of the largest magnitude among `want`'s tensors."""
    assert len(got) == len(want), what
    scale = max(float(r.abs().max()) for r in want if r.numel())
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, atol=rtol * scale, name=f"{what}: tensor {i} (bound {rtol} x scale {scale:.3g})")


def run_ranks(out, world, stages, *extra):
    """Runs `world` ranks of the worker (training `stages`); returns each rank's results."""
    run_processes(w.__file__, [(r, world, out, "".join(map(str, stages)), *extra) for r in range(world)], timeout=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """2 ranks training stages 0, 1 and 2 (the MLP, then the Transformer)."""
    return run_ranks(tmp_path_factory.mktemp("train_parallel"), WORLD, STAGES)


@pytest.fixture(scope="module")
def reference():
    """One process, plain AdamW and torch's clip_grad_norm_, on every rank's samples."""
    model = w.make_model(100)
    optimizer = w.make_optimizer(w.param_groups(model))
    norms = w.train_reference(model, optimizer, range(4), WORLD)
    mid = w.snapshot(model), copy.deepcopy(optimizer.state_dict())  # torch's holds the live tensors
    norms += w.train_reference(model, optimizer, range(4, STEPS), WORLD)
    return {"norms": norms, "params_mid": mid[0], "state_mid": mid[1], "params_end": w.snapshot(model)}


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_process(ranks, reference, stage):
    for r in range(WORLD):
        assert_params_close(ranks[r][stage]["params_end"], reference["params_end"], STEPS, f"stage {stage} rank {r}")
    for a, b in zip(ranks[0][stage]["params_end"], ranks[1][stage]["params_end"]):
        assert torch.equal(a, b), f"stage {stage}: the ranks' parameters differ"


@pytest.fixture(scope="module")
def transformer_reference():
    model = w.make_transformer(100)
    optimizer = w.make_optimizer(w.param_groups(model))
    norms = w.train_reference(model, optimizer, range(w.TRANSFORMER_STEPS), WORLD, task="transformer")
    return {"norms": norms, "params_end": w.snapshot(model)}


@pytest.mark.parametrize("stage", STAGES)
def test_transformer_two_ranks_match_one_process(ranks, transformer_reference, stage):
    """Tied embeddings, GQA, checkpointed blocks, flashlm attention: the same tolerance as the MLP."""
    for r in range(WORLD):
        got = ranks[r]["transformer"][stage]
        assert_params_close(got["params_end"], transformer_reference["params_end"], w.TRANSFORMER_STEPS,
                            f"stage {stage} rank {r}")
        err = max(abs(a - b) / b for a, b in zip(got["norms"], transformer_reference["norms"]))
        assert err <= NORM_RTOL, f"stage {stage} rank {r}: clip norms {got['norms']} vs {transformer_reference['norms']}"


@pytest.mark.parametrize("stage", STAGES)
def test_clip_norm_matches_one_process(ranks, reference, stage):
    want = torch.tensor(reference["norms"])
    assert float(want[0]) > w.MAX_NORM  # the steps compared do clip
    for r in range(WORLD):
        got = torch.tensor(ranks[r][stage]["norms"])
        err = float(((got - want).abs() / want).max())
        assert err <= NORM_RTOL, f"stage {stage} rank {r}: clip norms {got.tolist()} vs {want.tolist()} (rel {err:.3g})"


@pytest.mark.parametrize("stage", STAGES)
def test_state_dict_is_full_and_the_same_on_every_rank(ranks, reference, stage):
    states = [ranks[r][stage]["state_mid"] for r in range(WORLD)]
    assert w.states_equal(states[0], states[1]), f"stage {stage}: the ranks' state_dicts differ"
    assert w.states_equal(states[0], ranks[0][stage]["state_mid_again"]), "state_dict() changed the state"
    want = reference["state_mid"]
    assert states[0]["param_groups"] == want["param_groups"]
    for key in ("exp_avg", "exp_avg_sq"):
        got = [states[0]["state"][i][key] for i in sorted(want["state"])]
        ref = [want["state"][i][key] for i in sorted(want["state"])]
        # The moments follow the gradients, whose ~1e-7 relative rounding differences they inherit.
        assert_close_to_scale(got, ref, STATE_RTOL, f"stage {stage} {key}")
    assert all(float(states[0]["state"][i]["step"]) == 4.0 for i in want["state"])


@pytest.mark.parametrize("stage", SHARDED)
def test_sharded_state_matches_stage0(ranks, stage):
    s0, s = ranks[0][0]["state_mid"], ranks[0][stage]["state_mid"]
    assert s["param_groups"] == s0["param_groups"] and s["state"].keys() == s0["state"].keys()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        got = [s["state"][i][key] for i in sorted(s0["state"])]
        ref = [s0["state"][i][key] for i in sorted(s0["state"])]
        assert_close_to_scale(got, ref, STATE_RTOL, f"stage {stage} vs stage 0 {key}")


@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_identically(ranks, stage):
    for r in range(WORLD):
        res = ranks[r][stage]
        assert res["loaded_equal"], f"stage {stage} rank {r}: load_state_dict then state_dict changed the state"
        assert res["norms_resumed"] == res["norms"][4:], f"stage {stage} rank {r}: {res['norms_resumed']}"
        for i, (a, b) in enumerate(zip(res["params_resumed"], res["params_end"])):
            assert torch.equal(a, b), f"stage {stage} rank {r}: parameter {i} differs after resume"


def test_three_ranks_zero(tmp_path):
    """Uneven padding (868 and 89 parameters over 3 ranks): stages 1, 2 and 3 against one process on 3 ranks'
    samples, and the state the same on every rank; stage 2's the same as stage 1's, stage 3's as close as the
    summation order allows (it averages each micro-step's gradients, then sums them)."""
    results = run_ranks(tmp_path, 3, SHARDED, "mlp")
    model = w.make_model(100)
    optimizer = w.make_optimizer(w.param_groups(model))
    w.train_reference(model, optimizer, range(STEPS), 3)
    for stage in SHARDED:
        for r in range(3):
            assert_params_close(results[r][stage]["params_end"], w.snapshot(model), STEPS, f"stage {stage} rank {r}")
            assert w.states_equal(results[r][stage]["state_mid"], results[0][stage]["state_mid"]), f"stage {stage} rank {r}"
            assert results[r][stage]["found_inf_one_rank"] is True
    assert w.states_equal(results[0][2]["state_mid"], results[0][1]["state_mid"])
    s1, s3 = results[0][1]["state_mid"], results[0][3]["state_mid"]
    assert s3["param_groups"] == s1["param_groups"] and s3["state"].keys() == s1["state"].keys()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        got, ref = ([s["state"][i][key] for i in sorted(s1["state"])] for s in (s3, s1))
        assert_close_to_scale(got, ref, STATE_RTOL, f"3 ranks, stage 3 vs stage 1 {key}")
    assert all(all(ok.values()) for ok in (res["cross_load"] for res in results))


def test_state_dict_loads_across_stages(ranks):
    for r in range(WORLD):
        failed = [k for k, ok in ranks[r]["cross_load"].items() if not ok]
        assert not failed, f"rank {r}: these loads did not read back unchanged: {failed}"


@pytest.mark.parametrize("stage", STAGES)
def test_found_inf_on_one_rank_is_seen_by_all(ranks, stage):
    for r in range(WORLD):
        assert ranks[r][stage]["found_inf_clean"] is False
        assert ranks[r][stage]["found_inf_one_rank"] is True, f"stage {stage}: rank {r} missed rank 1's inf"


def test_memory_per_stage(ranks):
    """ZeRO-1 shards the optimizer state, ZeRO-2 the gradients as well (padding aside)."""
    full = sum(p.numel() * 4 for p in w.make_model(0).parameters())
    g = {s: ranks[0][s]["grad_bytes"] for s in STAGES}
    st = {s: ranks[0][s]["state_bytes"] for s in STAGES}
    assert g[0] == full and st[0] >= 2 * full, (g, st)
    assert g[1] >= full and st[1] <= 2 * full / WORLD + 64, (g, st)
    assert g[2] <= full / WORLD + 64 and st[2] <= 2 * full / WORLD + 64, (g, st)
    assert g[3] <= full / WORLD + 64 and st[3] <= 2 * full / WORLD + 64, (g, st)


def test_zero3_materializes_about_two_blocks(ranks):
    """ZeRO-3 on a 4-layer Llama: while block 2 runs a rank holds the outer parameters (embedding, final
    norm) and at most blocks 2 and 3 (the prefetch); never more than that in a step; nothing between steps;
    its shards hold 1/world of the parameters (padding aside)."""
    for r in range(WORLD):
        m = ranks[r]["memory"]
        bound = m["outer"] + 2 * m["block"]
        assert bound < m["total"]  # the bound says something: 4 blocks do not fit in it
        # Block 2 runs 8 times: 2 steps of 2 micro-steps, each forward and its recomputation in backward.
        assert len(m["during"]) == 8 and all(m["outer"] + m["block"] <= b <= bound for b in m["during"]), m
        assert m["outer"] + m["block"] <= m["peak"] <= bound, m
        assert m["between"] == 0, m
        assert m["total"] / WORLD <= m["shards"] <= m["total"] / WORLD + 4 * 2 * 5 * (WORLD - 1), m


@pytest.fixture(scope="module")
def gpt2_reference():
    model = w.make_transformer(100, "gpt2")
    optimizer = w.make_optimizer(w.param_groups(model))
    norms = w.train_reference(model, optimizer, range(w.TRANSFORMER_STEPS), WORLD, task="transformer")
    return {"norms": norms, "params_end": w.snapshot(model)}


def test_zero3_gpt2_matches_one_process(ranks, gpt2_reference):
    """GPT-2 (learned positions, LayerNorm biases, no activation checkpointing) under ZeRO-3."""
    for r in range(WORLD):
        got = ranks[r]["gpt2"]
        assert_params_close(got["params_end"], gpt2_reference["params_end"], w.TRANSFORMER_STEPS, f"gpt2 rank {r}")
        err = max(abs(a - b) / b for a, b in zip(got["norms"], gpt2_reference["norms"]))
        assert err <= NORM_RTOL, f"gpt2 rank {r}: clip norms {got['norms']} vs {gpt2_reference['norms']}"


@pytest.mark.parametrize("src, dst", [(3, 0), (0, 3)])
def test_resume_across_zero0_and_zero3(ranks, src, dst):
    """A stage's mid-run parameters and optimizer state continued under the other stage end where the
    uninterrupted run ends (the stages differ in summation order only: the tolerances above)."""
    for r in range(WORLD):
        got, want = ranks[r]["cross_resume"][(src, dst)], ranks[r][src]
        err = max(abs(a - b) / b for a, b in zip(got["norms"], want["norms"][4:]))
        assert err <= NORM_RTOL, f"{src}->{dst} rank {r}: clip norms {got['norms']} vs {want['norms'][4:]}"
        assert_params_close(got["params_end"], want["params_end"], STEPS, f"{src}->{dst} rank {r}")


def test_zero3_dead_peer_raises_the_ring_timeout(tmp_path):
    """The last rank dies after a step: the other ranks' next step raises the ring's timeout error."""
    results = run_ranks(tmp_path, 3, (3,), "dead")[:2]
    for r, res in enumerate(results):
        message = res["error"] or ""
        assert message.startswith("shm ring") and any(s in message for s in ("did not", "exited", "aborted")), \
            f"rank {r}: {message!r}"
        assert res["seconds"] < 3.0 + 2.0, f"rank {r} took {res['seconds']:.1f} s to fail"
    assert "rank 2" in results[0]["error"], results[0]["error"]  # rank 0 waits on the dead rank directly


# ---- One process, no flashlm.dist.init() ---------------------------------------------------------------


def train_both(stage, max_norm, steps=3):
    """DataParallel without init and the plain optimizer, from the same start on the same batches."""
    a, b = w.make_model(3), w.make_model(3)
    dp = DataParallel(a, w.make_optimizer, zero_stage=stage, param_groups=w.param_groups(a))
    assert (dp.rank, dp.world_size) == (0, 1)
    optimizer = w.make_optimizer(w.param_groups(b))
    got = w.train_dp(dp, a, range(steps), 0, max_norm)
    want = w.train_reference(b, optimizer, range(steps), 1, max_norm)
    return dp, optimizer, a, b, got, want


def test_one_process_stage0_is_the_plain_optimizer():
    dp, optimizer, a, b, got, want = train_both(0, w.MAX_NORM)
    assert got == want
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.equal(p, q), f"parameter {i}: max error {float((p - q).abs().max().detach())}"
    assert w.states_equal(dp.state_dict(), optimizer.state_dict())
    assert dp.param_groups is dp.optimizer.param_groups


@pytest.mark.parametrize("stage", SHARDED)
def test_one_process_zero_matches_the_plain_optimizer(stage):
    # Without clipping the arithmetic is the same element by element: equal bits.
    dp, optimizer, a, b, _, _ = train_both(stage, 0.0)
    for i, (p, q) in enumerate(zip(w.snapshot(a, dp), b.parameters())):
        assert torch.equal(p, q), f"stage {stage} parameter {i}: max error {float((p - q).abs().max().detach())}"
    assert w.states_equal(dp.state_dict(), optimizer.state_dict())
    # With clipping the norm is summed over the flat shards instead of per tensor: rounding only.
    dp, optimizer, a, b, got, want = train_both(stage, w.MAX_NORM)
    assert max(abs(x - y) / y for x, y in zip(got, want)) <= NORM_RTOL, (got, want)
    assert_params_close(w.snapshot(a, dp), w.snapshot(b), 3, f"stage {stage} clipped")


def test_one_process_zero3_transformer_with_a_frozen_block():
    """A block without trainable parameters is no unit (its parameters stay whole); the rest trains as the
    plain optimizer does, to the bit (no clipping: the same arithmetic element by element)."""
    a, b = w.make_transformer(3, n_layer=3), w.make_transformer(3, n_layer=3)
    for m in (a, b):
        m.blocks[1].requires_grad_(False)
    dp = DataParallel(a, w.make_optimizer, zero_stage=3, param_groups=w.param_groups(a))
    optimizer = w.make_optimizer(w.param_groups(b))
    w.train_dp(dp, a, range(2), 0, 0.0, task="transformer")
    w.train_reference(b, optimizer, range(2), 1, 0.0, task="transformer")
    assert all(p.numel() for p in a.blocks[1].parameters())
    for i, (p, q) in enumerate(zip(w.snapshot(a, dp), b.parameters())):
        assert torch.equal(p, q), f"parameter {i}: max error {float((p - q).abs().max().detach())}"
    dp.close()


def test_zero3_refuses_a_parameter_shared_between_blocks():
    model = w.make_transformer(0)
    model.blocks[1].attn_norm.weight = model.blocks[0].attn_norm.weight
    with pytest.raises(ValueError, match="^model: a parameter .* shared between blocks"):
        DataParallel(model, w.make_optimizer, zero_stage=3)


def test_one_process_unscale_and_found_inf():
    model = w.make_model(0)
    dp = DataParallel(model, w.make_optimizer)
    x, y = w.batch(0, 0, 0)
    F.cross_entropy(model(x), y).backward()
    dp.finish_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    dp.unscale_(0.25)
    assert all(torch.equal(p.grad, g * 0.25) for p, g in zip(model.parameters(), before))
    assert dp.found_inf() is False
    next(model.parameters()).grad[0, 0] = float("nan")
    assert dp.found_inf() is True


def test_bad_arguments():
    model = w.make_model(0)
    for stage in (4, -1, True, "1", 1.5):
        with pytest.raises(ValueError, match="^zero_stage"):
            DataParallel(model, w.make_optimizer, zero_stage=stage)
    for mb in (0, -1.0, float("nan"), float("inf"), "25"):
        with pytest.raises(ValueError, match="^bucket_mb"):
            DataParallel(model, w.make_optimizer, bucket_mb=mb)
    with pytest.raises(ValueError, match="^model"):
        DataParallel([torch.nn.Parameter(torch.ones(2))], w.make_optimizer)
    with pytest.raises(ValueError, match="^make_optimizer"):
        DataParallel(model, None)
    with pytest.raises(ValueError, match="^param_groups"):
        DataParallel(model, w.make_optimizer, param_groups=[{"params": [torch.nn.Parameter(torch.ones(2))]}])
    with pytest.raises(ValueError, match="^param_groups"):
        DataParallel(model, w.make_optimizer, param_groups=[{"params": list(model.parameters())}] * 2)
    mixed = w.make_model(0)
    mixed[0].weight.data = mixed[0].weight.data.double()
    for stage in SHARDED:
        with pytest.raises(ValueError, match="^model: ZeRO"):
            DataParallel(mixed, w.make_optimizer, zero_stage=stage)
        with pytest.raises(ValueError, match="^param_groups: ZeRO"):
            DataParallel(mixed, w.make_optimizer, zero_stage=stage, param_groups=w.param_groups(mixed))
    DataParallel(mixed, lambda g: torch.optim.SGD(g, lr=0.1), zero_stage=0)  # stage 0 takes any mix
    for stage in STAGES:
        dp = DataParallel(model, w.make_optimizer, zero_stage=stage, param_groups=w.param_groups(model))
        with pytest.raises(ValueError, match="^state_dict"):
            dp.load_state_dict({"state": {}})
        with pytest.raises(ValueError, match="state dict|^state_dict"):  # torch's words for stage 0
            dp.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
        dp.close()


def test_second_backward_without_finish_raises():
    """Stage 2 reduces during backward: a second backward before finish_gradients is a usage error."""
    model = w.make_model(0)
    dp = DataParallel(model, w.make_optimizer, zero_stage=2, bucket_mb=w.BUCKET_MB)
    x, y = w.batch(0, 0, 0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="finish_gradients"):
        F.cross_entropy(model(x), y).backward()
    dp.close()
