"""flashlm.parallel.pipeline: 2 and 3 pipeline stages (processes over shared-memory rings), GPipe and 1F1B,
against one process training the whole model on the same batches (gpt2 with tied embeddings, llama with GQA
and an untied head; AdamW, clipping by the norm over all stages, 2 batches accumulated per step); activations
kept in flight per schedule; the bubble; one stage in-process; and the plan's checks.

The stages are processes (tests/pipeline_worker.py); one run per pipeline size trains every case of it.
"""

import glob
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_worker as w  # noqa: E402

from compare import assert_close  # noqa: E402
from processes import run_processes  # noqa: E402
from flashlm.parallel.pipeline import Pipeline, PipelinePlan, PipelineStage, StageLinks  # noqa: E402

# Parameters of the pipeline against one process, in units of lr * steps (AdamW moves an element by about lr
# per step). The runs differ only in the order of float32 sums: each batch's loss is the mean of its
# micro-batches' means instead of one mean, the clip norm is summed per stage, a tied embedding's gradient is
# summed across the first and last stage instead of inside one backward. A gradient element then differs by a
# few roundings of its sum (~1e-7 of the sum of its |terms|), which Adam's division by sqrt(v) ~ |g| magnifies
# where the gradient nearly cancels: the bounds of the data-parallel tests (tests/test_train_parallel.py),
# every element within 1e-2 lr * steps and the RMS within 1e-4. Measured (max / RMS): gpt2 1.4e-4 / 2.1e-6,
# llama 4.3e-4 / 2.9e-6 (2 stages). A real fault moves by O(lr): see test_a_fault_is_caught.
MAX_TOL, RMS_TOL = 1e-2, 1e-4
# The clip norms and losses: the same values summed in another order.
NORM_RTOL = 1e-5


def run_stages(out, stages):
    """Runs the `stages` processes of the worker; returns each stage's results."""
    run_processes(w.__file__, [(s, stages, out) for s in range(stages)], timeout=180, what="stage")
    return [torch.load(out / f"stage{s}.pt", weights_only=False) for s in range(stages)]


@pytest.fixture(scope="module", params=[2, 3])
def pipeline(request, tmp_path_factory):
    before = set(glob.glob("/dev/shm/flashlm-pp-*"))
    results = run_stages(tmp_path_factory.mktemp(f"pp{request.param}"), request.param)
    assert set(glob.glob("/dev/shm/flashlm-pp-*")) - before == set(), "shared-memory segments left behind"
    return request.param, results


@pytest.fixture(scope="module")
def references():
    return {arch: w.train_reference(arch) for arch in ("gpt2", "llama")}


def assert_params_close(got: dict, want: dict, what: str):
    unit = w.LR * w.STEPS
    for name, g in got.items():
        assert_close(g, want[name], atol=MAX_TOL * unit, name=f"{what}: {name} (bound {MAX_TOL} x lr x steps)")
    diff = torch.cat([(g.double() - want[n].double()).reshape(-1) for n, g in got.items()])
    rms = float(diff.square().mean().sqrt())
    assert rms <= RMS_TOL * unit, f"{what}: RMS error {rms:.3g} > {RMS_TOL} x lr x steps"


def test_stages_match_one_process(pipeline, references):
    stages, results = pipeline
    for case in w.CASES[stages]:
        arch, schedule = case
        ref = references[arch]
        what = f"{stages} stages, {arch}, {schedule}"
        held = {}
        for s in range(stages):
            params = results[s][case]["params"]
            assert_params_close(params, ref["params"], f"{what}, stage {s}")
            for name, p in params.items():
                if name in held:  # the tied embedding: the first and the last stage hold the same values
                    assert torch.equal(held[name], p), f"{what}: the copies of {name} differ"
                held[name] = p
            got = torch.tensor(results[s][case]["norms"])
            err = float(((got - torch.tensor(ref["norms"])).abs() / torch.tensor(ref["norms"])).max())
            assert err <= NORM_RTOL, f"{what}, stage {s}: clip norms {got.tolist()} vs {ref['norms']}"
        assert set(held) == set(ref["params"]), f"{what}: parameters not held by any stage"
        assert ref["norms"][0] > w.MAX_NORM  # the steps compared do clip
        losses = torch.tensor(results[-1][case]["losses"])
        err = float(((losses - torch.tensor(ref["losses"])).abs() / torch.tensor(ref["losses"])).max())
        assert err <= NORM_RTOL, f"{what}: losses {losses.tolist()} vs {ref['losses']}"
        assert all(r is None for s in range(stages - 1) for r in results[s][case]["losses"])


def test_activations_in_flight(pipeline):
    """GPipe keeps all m micro-batches' activations on every stage; 1F1B at most p - s on stage s."""
    stages, results = pipeline
    m = w.MICRO_BATCHES
    for arch, schedule in w.CASES[stages]:
        for s in range(stages):
            peaks = {st["peak_in_flight"] for st in results[s][arch, schedule]["stats"]}
            want = m if schedule == "gpipe" else min(stages - s, m)
            assert peaks == {want}, f"{stages} stages, {arch}, {schedule}, stage {s}: {peaks} micro-batches kept"


def test_bubble_is_measured(pipeline):
    stages, results = pipeline
    for case in w.CASES[stages]:
        bubbles = [torch.tensor([st["bubble"] for st in results[s][case]["stats"]]).median().item()
                   for s in range(stages)]
        formula = results[0][case]["stats"][0]["bubble_formula"]
        assert formula == pytest.approx((stages - 1) / (w.MICRO_BATCHES + stages - 1))
        assert all(0.0 <= b < 1.0 for b in bubbles), bubbles
        print(f"{stages} stages {case}: bubble per stage {[round(b, 3) for b in bubbles]}, formula {formula:.3f}")


def test_a_fault_is_caught(references):
    """The bounds catch a real fault: dropping the second batch of each step moves parameters well past them."""
    model = w.make_model("llama")
    optimizer = w.make_optimizer(model.parameters())
    for step in range(w.STEPS):
        (model(*w.batch(step, 0))[1] / w.ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
    with pytest.raises(AssertionError):
        assert_params_close(dict(model.named_parameters()), references["llama"]["params"], "one batch of two")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_stage_is_the_model(schedule):
    """One stage (no rings) with 4 micro-batches: the model's loss and gradients on the whole batch."""
    model = w.make_model("gpt2")
    plan = PipelinePlan(3, 1, w.BATCH, 4, w.SEQ, schedule)
    pipe = Pipeline(PipelineStage(model, 0, plan), StageLinks(0, 1), plan)
    idx, targets = w.batch(0, 0)
    loss = pipe.forward_backward(idx, targets)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want_loss = model(idx, targets)[1]
    want_loss.backward()
    assert loss == pytest.approx(float(want_loss.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        assert_close(got[n], p.grad, atol=1e-6 * float(p.grad.abs().max()), name=n)
    assert pipe.stats["peak_in_flight"] == (4 if schedule == "gpipe" else 1) and pipe.stats["bubble_formula"] == 0.0


def test_plan_checks_before_any_ring():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="^stages: 3 pipeline stages need at least 3 layers, the model has 2"):
        PipelinePlan(2, 3, 4, 2, 16)
    with pytest.raises(ValueError, match="^micro_batches: 3 micro-batches do not divide the batch of 4"):
        PipelinePlan(4, 2, 4, 3, 16)
    with pytest.raises(ValueError, match="^schedule"):
        PipelinePlan(4, 2, 4, 2, 16, "zb")
    with pytest.raises(ValueError, match="^micro_batches: must be in"):
        PipelinePlan(4, 2, 4, 0, 16)
    with pytest.raises(TypeError, match="^stages: expected an integer"):
        PipelinePlan(4, 2.0, 4, 2, 16)
    assert time.monotonic() - t0 < 1.0  # refused at once, nothing waited for a peer
    plan = PipelinePlan(4, 2, 4, 2, 16)
    assert [plan.layers(s) for s in range(2)] == [range(0, 2), range(2, 4)]
    assert [PipelinePlan(5, 3, 1, 1, 1).layers(s) for s in range(3)] == [range(0, 1), range(1, 3), range(3, 5)]
    with pytest.raises(ValueError, match="^stage: must be in"):
        plan.layers(2)


def test_stage_and_batch_checks():
    model = w.make_model("llama")
    plan = PipelinePlan(4, 1, w.BATCH, 2, w.SEQ)
    with pytest.raises(ValueError, match="^model: has 4 layers, the plan 3"):
        PipelineStage(model, 0, PipelinePlan(3, 1, 4, 2, 16))
    with pytest.raises(ValueError, match="^seq_len: 32 is longer than the model's 16"):
        PipelineStage(model, 0, PipelinePlan(4, 1, 4, 2, 32))
    with pytest.raises(ValueError, match=r"^links: stage 1 needs the rings \['prev', 'group'\]"):
        two = PipelinePlan(4, 2, 4, 2, 16)
        Pipeline(PipelineStage(model, 1, two), StageLinks(1, 2), two)
    pipe = Pipeline(PipelineStage(model, 0, plan), StageLinks(0, 1), plan)
    with pytest.raises(ValueError, match=r"^idx: stage 0 needs int64 \[4, 16\], got torch.int64 \(4, 8\)"):
        pipe.forward_backward(torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="^targets: stage 0 needs int64"):
        pipe.forward_backward(torch.zeros(4, 16, dtype=torch.int64), None)
