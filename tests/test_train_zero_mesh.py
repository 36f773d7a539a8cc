"""ZeRO over the dp group of a mesh: `flashlm train --zero-stage 1|2|3` with --tp/--pp/--cp against one process.

The runs are those of test_train_model_parallel (4 AdamW steps of 2 accumulation micro-steps, clipped, a global
batch of 4 sequences split over the dp replicas) with the optimizer state (ZeRO-1), also the gradients (ZeRO-2)
or also the parameters (ZeRO-3) of each rank's part sharded over its dp group. ZeRO changes only where the dp
sum of each gradient element is made (a reduce-scatter instead of an all-reduce: the same two addends) and how
the clip norm's squares are grouped (per dp slice, then summed over dp), so the bounds are the model-parallel
tests': float32 summation order, amplified by Adam. A missing reduction fails: the tied embedding's gradient
slices not summed between the pipeline stages fail the losses and clip norms (checked on the DP 2 x PP 2 run),
and the clip norm's squares left unsummed over dp would give each rank about 1/sqrt(2) of the norm. The
checkpoint (full tensors, the one-process optimizer format) then moves from ZeRO-3 x TP 2 x PP 2 to DP 4
without ZeRO and continues as the one-process run does, and ZeRO-3 x PP 2 resumes exactly at its own layout.
Under fp16 with the loss scaler, an overflow injected into one rank's gradient slices skips the step on every
rank of the mesh.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_loop import child_env, data_cache, read_metrics, text_file  # noqa: E402,F401
from test_train_model_parallel import (BATCH, STEPS, assert_matches, assert_resumes_exactly,  # noqa: E402
                                       copy_checkpoint, free_port, launch, layout_runs, references,  # noqa: F401
                                       settings, world)
from train_fp16_mesh_worker import inject_overflow  # noqa: E402

from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from flashlm.train.config import TrainConfig  # noqa: E402
from flashlm.train.trainer import Trainer  # noqa: E402


def run_workers(script: str, args: list, n: int, timeout: float = 400) -> None:
    """tests/`script` *args on n ranks, as torchrun starts them; fails the test unless every rank succeeds."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    env = dict(child_env(), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, path, *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(n)]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-5000:]}"


# name: (config, sizes, more flags)
RUNS = {
    "zero1_dp2_tp2": ("gpt2", dict(dp=2, tp=2), ["--zero-stage", 1]),
    "zero3_dp2_tp2": ("llama", dict(dp=2, tp=2), ["--zero-stage", 3]),
    "zero3_dp2_pp2_1f1b": ("gpt2", dict(dp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b",
                                                      "--zero-stage", 3]),
    "zero3_dp2_tp2_pp2": ("gpt2", dict(dp=2, tp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b",
                                                           "--zero-stage", 3]),
    "zero2_dp2_pp2_gpipe": ("llama", dict(dp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "gpipe",
                                                        "--zero-stage", 2]),
    "zero3_dp2_cp2": ("llama", dict(dp=2, cp=2), ["--zero-stage", 3]),
    # every parallelism at once: 16 processes
    "zero3_dp2_tp2_pp2_cp2": ("gpt2", dict(dp=2, tp=2, pp=2, cp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b",
                                                                     "--zero-stage", 3]),
}


@pytest.fixture(scope="module")
def runs(text_file, data_cache, tmp_path_factory):
    """Each layout's run, started when a test first asks for it: (out_dir, logs)."""
    return layout_runs(RUNS, text_file, data_cache, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_zero_on_a_mesh_matches_one_process(runs, references, name):
    out, _ = runs(name)
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == STEPS
    assert_matches(read_metrics(out), state, references[RUNS[name][0]], name)


@pytest.mark.slow
def test_checkpoint_moves_from_zero3_tp2_pp2_to_dp4(runs, references, tmp_path):
    """The ZeRO-3 x TP 2 x PP 2 run's step-2 checkpoint resumed by 4 data-parallel replicas without ZeRO."""
    out, _ = runs("zero3_dp2_tp2_pp2")
    folder = copy_checkpoint(out, 2, tmp_path / "dp4")
    launch(4, ["--out-dir", folder, "--resume", "--batch-size", BATCH // 4, "--zero-stage", 0])
    assert_matches(read_metrics(folder)[2:], load_checkpoint(latest_checkpoint(folder)), references["gpt2"],
                   "zero3 tp2 pp2 -> dp 4", first_step=3)


@pytest.mark.slow
def test_zero3_resume_at_the_same_layout_is_exact(runs, tmp_path):
    """ZeRO-3 x DP 2 x PP 2 from its step-2 checkpoint: the same losses and clip norms, bit for bit, and the same
    parameters (the shards are cut again from the checkpoint's full tensors, the optimizer state too)."""
    out, _ = runs("zero3_dp2_pp2_1f1b")
    assert_resumes_exactly(out, RUNS["zero3_dp2_pp2_1f1b"], tmp_path / "again")


# name: (config, sizes, more settings); the overflow is injected on the last rank at step 2
FP16_RUNS = {
    "zero1_dp2_tp2": ("llama", dict(dp=2, tp=2), dict(zero_stage=1)),
    "zero2_dp2_pp2": ("gpt2", dict(dp=2, pp=2), dict(zero_stage=2, micro_batches=2, pp_schedule="1f1b")),
    "zero3_dp2_pp2": ("llama", dict(dp=2, pp=2), dict(zero_stage=3, micro_batches=2, pp_schedule="gpipe")),
}
OVERFLOW_STEP = 2


def fp16_reference(text_file, data_cache, out, model: str) -> list:
    """The one-process fp16 run with the same overflow injected: its metrics."""
    cfg = TrainConfig.from_sources("tiny", overrides=settings(text_file, data_cache, out, model, precision="fp16"))
    trainer = Trainer(cfg)
    trainer.peak_flops = 1.0
    inject_overflow(trainer, OVERFLOW_STEP, lambda t: next(p.grad for p in t.model.parameters() if p.grad is not None))
    trainer.train()
    trainer.dp.close()
    return trainer.metrics


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FP16_RUNS))
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(text_file, data_cache, tmp_path, name):
    """fp16 with the dynamic loss scaler and ZeRO over the dp group of a mesh: an inf put into the last rank's
    gradient slices after finish_gradients (no collective follows before found_inf: a flag reduced over the dp
    group alone, or over tp or pp alone, would leave other ranks stepping, and the next gather would mix steps)
    makes every rank skip that step and halve its scale; the run then goes on as the one-process fp16 run with
    the same overflow does, within the fp16 bound of test_mixed_precision_with_the_loss_scaler (one unit
    roundoff 2^-11)."""
    model, sizes, more = FP16_RUNS[name]
    n = world(sizes)
    values = dict(settings(text_file, data_cache, tmp_path / "mesh", model, sizes.get("dp", 1), precision="fp16",
                           **more), **sizes)
    run_workers("train_fp16_mesh_worker.py", [json.dumps(values), n - 1, OVERFLOW_STEP], n)
    want = fp16_reference(text_file, data_cache, tmp_path / "one", model)
    skipped = [step == OVERFLOW_STEP for step in range(1, STEPS + 1)]
    assert [m["skipped"] for m in want] == skipped
    scales = [m["loss_scale"] for m in want]
    assert scales == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 15]
    for r in range(n):
        got = json.loads((tmp_path / "mesh" / f"rank{r}.json").read_text())
        assert [m["skipped"] for m in got] == skipped, f"rank {r}"
        assert [m["loss_scale"] for m in got] == scales, f"rank {r}"
        assert [m["grad_norm"] is None for m in got] == skipped, f"rank {r}"
    got = read_metrics(tmp_path / "mesh")
    for key in ("loss", "grad_norm", "val_loss"):
        a = [m[key] for m in got if m.get(key) is not None]
        b = [m[key] for m in want if m.get(key) is not None]
        assert len(a) == len(b), key
        np.testing.assert_allclose(a, b, rtol=2.0 ** -11, err_msg=f"{name}: {key}")


@pytest.mark.slow
def test_dp_reduction_overlapped_with_backward_is_bit_equal(tmp_path):
    """DP 2 x TP 2, ZeRO 0, 1 and 2 (tests/mesh_overlap_worker.py): the dp buckets' all-reduces (reduce-scatters)
    launched from the gradient hooks during backward give the clip norms and parameters of the same reduction
    after backward bit for bit (the same buckets summed: two addends per element), and some of them are launched
    before finish_gradients, on several buckets; with overlap=False none is."""
    n = 4
    run_workers("mesh_overlap_worker.py", [tmp_path, 2, 2], n)
    import torch

    for r in range(n):
        results = torch.load(tmp_path / f"rank{r}.pt")
        for stage in (0, 1, 2):
            after, during = results[stage, False], results[stage, True]
            what = f"rank {r}, ZeRO {stage}"
            assert during["norms"] == after["norms"], what
            for name, t in after["params"].items():
                assert torch.equal(during["params"][name], t), f"{what}: {name}"
            assert "backward" not in after["entered"], what
            early = during["entered"].count("backward")
            assert early >= 3, f"{what}: {early} dp collectives launched during backward in 3 steps"


@pytest.mark.slow
@pytest.mark.parametrize("dp,pp,cp", [(2, 2, 1), (2, 1, 2)])
def test_zero3_checkpoint_gathers_one_tensor_at_a_time(tmp_path, dp, pp, cp):
    """ZeRO-3 x PP 2 and ZeRO-3 x CP 2 (tests/mesh_zero3_state_worker.py): full_state_dict builds each tensor from
    its dp slices in turn, bit for bit what the rank's whole part gathered (full_parameters) holds, and
    load_full_state_dict copies the rank's slices out of the full tensors; neither materialises any of the
    rank's parameters (at tp = pp = 1 with cp, the whole model). The optimizer state, gathered the same way, holds
    every rank's part as Zero3 makes it whole (its moments and steps), bit for bit."""
    n = dp * pp * cp
    run_workers("mesh_zero3_state_worker.py", [tmp_path, dp, pp, cp], n)
    import torch

    first = torch.load(tmp_path / "rank0.pt")
    opt = {name: first["opt"]["state"][i] for i, name in enumerate(first["opt_names"])}
    for r in range(n):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["own_opt"], f"rank {r}: no optimizer state"
        for name, values in got["own_opt"].items():
            assert sorted(values) == sorted(opt[name]), f"rank {r}: {name}"
            for key, v in values.items():
                assert torch.equal(v.float(), opt[name][key]), f"rank {r}: {key} of {name}"
        assert got["save_bytes"] == 0 and got["load_bytes"] == 0, f"rank {r}: {got['save_bytes']}, {got['load_bytes']}"
        for name, t in got["gathered_after_load"].items():
            assert torch.equal(t, got["loaded"][name]), f"rank {r}: {name} after loading"
        if r == 0:
            assert list(got["saved"]) == list(got["gathered"])
            for name, t in got["gathered"].items():
                assert torch.equal(got["saved"][name], t), name
                assert not torch.equal(t, got["loaded"][name]), name  # (the load below changes every tensor)
            assert list(got["saved_after_load"]) == list(got["loaded"])
            for name, t in got["loaded"].items():
                assert torch.equal(got["saved_after_load"][name], t), f"{name} after loading"
        else:
            assert got["saved"] == {} and got["saved_after_load"] == {}
