"""flashlm.train.parallel.DataParallel: 2 ranks with ZeRO stage 0, 1 and 2 against one process on the global
batch, the state_dicts of the stages against each other, resume, found_inf and clipping across ranks, the
one-process path against the plain optimizer, and argument checks.

The ranks are processes (tests/train_parallel_worker.py) meeting through a FileStore; one run of 2 ranks
trains all three stages and the tests below read its results.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_parallel_worker as w  # noqa: E402

from flashlm.train.parallel import DataParallel  # noqa: E402

STAGES = (0, 1, 2)
WORLD = 2
STEPS = 6

# Tolerance of 2 ranks against 1 process, relative to the largest |parameter| (~1 here). The two runs do
# the same arithmetic in another order: per-rank batch means averaged over ranks against one mean over the
# global batch, the clip norm summed per rank. A gradient element then differs by a few float32 roundings
# of its sum (~1e-7 relative). AdamW's first step is lr * sign(g), blind to that; later steps divide by
# sqrt(v) of the history, so m/sqrt(v) differs by ~1e-7..1e-6 relative and a parameter moves by at most
# ~lr * 1e-6 = 1e-8 differently per step, plus one rounding of the parameter (|p| * 6e-8). Six steps stay
# below ~1e-6 of the scale; 1e-5 leaves a margin and is still 100x below the O(lr) = 1e-2 moves of a real
# fault (a rank stepping on its own samples only, a missing micro-step). Measured: 1.2e-7 of the scale for
# each stage; training on rank 0's samples only ends 0.097 away.
PARAM_RTOL = 1e-5
# The clip norm: the same gradients up to that ~1e-7 rounding, summed in another order (~1e-6 for 957 terms).
NORM_RTOL = 1e-5


def max_error(got, want):
    """(max |got - want| over the tensors, which tensor, the scale max |want|)."""
    errors = [float((g.double() - r.double()).abs().max()) if g.numel() else 0.0 for g, r in zip(got, want)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    return errors[worst], worst, max(float(r.abs().max()) for r in want if r.numel())


def assert_close_to_scale(got, want, rtol, what):
    assert len(got) == len(want), what
    for g, r in zip(got, want):
        assert g.shape == r.shape, f"{what}: shape {tuple(g.shape)} != {tuple(r.shape)}"
    err, where, scale = max_error(got, want)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} in tensor {where} > {rtol} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs 2 ranks training stages 0, 1 and 2; returns each rank's results."""
    out = tmp_path_factory.mktemp("train_parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, w.__file__, str(r), str(WORLD), str(out), "".join(map(str, STAGES))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(WORLD)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("\n".join(f"--- rank {r} ---\n{p.communicate()[1][-3000:]}" for r, p in enumerate(procs)))
    for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{err[-5000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


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
        assert_close_to_scale(ranks[r][stage]["params_end"], reference["params_end"], PARAM_RTOL,
                              f"stage {stage} rank {r} after {STEPS} steps")
    for a, b in zip(ranks[0][stage]["params_end"], ranks[1][stage]["params_end"]):
        assert torch.equal(a, b), f"stage {stage}: the ranks' parameters differ"


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
        assert_close_to_scale(got, ref, PARAM_RTOL, f"stage {stage} {key}")
    assert all(float(states[0]["state"][i]["step"]) == 4.0 for i in want["state"])


@pytest.mark.parametrize("stage", (1, 2))
def test_sharded_state_matches_stage0(ranks, stage):
    s0, s = ranks[0][0]["state_mid"], ranks[0][stage]["state_mid"]
    assert s["param_groups"] == s0["param_groups"] and s["state"].keys() == s0["state"].keys()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        got = [s["state"][i][key] for i in sorted(s0["state"])]
        ref = [s0["state"][i][key] for i in sorted(s0["state"])]
        assert_close_to_scale(got, ref, PARAM_RTOL, f"stage {stage} vs stage 0 {key}")


@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_identically(ranks, stage):
    for r in range(WORLD):
        res = ranks[r][stage]
        assert res["loaded_equal"], f"stage {stage} rank {r}: load_state_dict then state_dict changed the state"
        assert res["norms_resumed"] == res["norms"][4:], f"stage {stage} rank {r}: {res['norms_resumed']}"
        for i, (a, b) in enumerate(zip(res["params_resumed"], res["params_end"])):
            assert torch.equal(a, b), f"stage {stage} rank {r}: parameter {i} differs after resume"


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


@pytest.mark.parametrize("stage", (1, 2))
def test_one_process_zero_matches_the_plain_optimizer(stage):
    # Without clipping the arithmetic is the same element by element: equal bits.
    dp, optimizer, a, b, _, _ = train_both(stage, 0.0)
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert torch.equal(p, q), f"stage {stage} parameter {i}: max error {float((p - q).abs().max().detach())}"
    assert w.states_equal(dp.state_dict(), optimizer.state_dict())
    # With clipping the norm is summed over the flat shards instead of per tensor: rounding only.
    dp, optimizer, a, b, got, want = train_both(stage, w.MAX_NORM)
    assert max(abs(x - y) / y for x, y in zip(got, want)) <= NORM_RTOL, (got, want)
    assert_close_to_scale(w.snapshot(a), w.snapshot(b), PARAM_RTOL, f"stage {stage} clipped")


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
    for stage in (3, -1, True, "1", 1.5):
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
    for stage in (1, 2):
        with pytest.raises(ValueError, match="^model: ZeRO"):
            DataParallel(mixed, w.make_optimizer, zero_stage=stage)
        with pytest.raises(ValueError, match="^param_groups: ZeRO"):
            DataParallel(mixed, w.make_optimizer, zero_stage=stage, param_groups=w.param_groups(mixed))
    DataParallel(mixed, lambda g: torch.optim.SGD(g, lr=0.1), zero_stage=0)  # stage 0 takes any mix
    dp = DataParallel(model, w.make_optimizer)
    with pytest.raises(ValueError, match="^state_dict"):
        dp.load_state_dict({"state": {}})
    dp.close()
