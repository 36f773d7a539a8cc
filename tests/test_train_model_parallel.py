"""`flashlm train --dp/--tp/--pp/--cp` (flashlm.train.parallel_step) against one process.

Each layout is `flashlm train` started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), one process per rank, on a tiny gpt2 (tied embeddings, biases) or llama GQA config: 4 AdamW steps
of 2 accumulation micro-steps, clipped (every step's norm is above --grad-clip), a global batch of 4 sequences
split over the dp replicas. The one-process run of the same global batch is the reference for the losses,
clip norms, validation losses, final parameters and optimizer moments (the checkpoint holds full tensors).
Checkpoints then move between layouts (TP 2 -> 1, PP 2 -> DP 2, TP 2 x PP 2 -> DP 4, ZeRO-3 -> ZeRO-0 and -> TP 2) and
resume exactly at the same layout; a rank killed mid-step makes its peer fail with a timeout naming it; bad
sizes are refused before any process group is made.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import assert_close  # noqa: E402
from test_train_loop import child_env, data_cache, one_thread, read_metrics, text_file  # noqa: E402,F401
# The bounds of the data-parallel tests, for the same reason: the layouts differ from one process only in the
# order of float32 sums (row-parallel partial products and the vocabulary shards' sums over tp, micro-batches
# over pp, the sequence's shares over cp, replicas over dp, the clip norm per shard), so a parameter differs by
# a few roundings amplified by Adam: within MAX_TOL x lr x steps each, RMS_TOL x lr x steps over all; moments
# within STATE_RTOL of their largest; losses and clip norms within NORM_RTOL. Measured here (max parameter
# error, 3-step runs of these configs): 7e-7 (TP 2), 2e-6 (PP 2), 3e-6 (TP 2 x PP 2) against the bound 1.2e-4; a
# missing reduction moves parameters by O(lr) and fails: PP 2 without the tied embedding's gradient summed
# between the stages ends 7e-3 away after 3 steps (measured), its clip norms 6% off.
from test_train_parallel import MAX_TOL, NORM_RTOL, RMS_TOL, STATE_RTOL, assert_close_to_scale  # noqa: E402

from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from flashlm.train.config import TrainConfig  # noqa: E402
from flashlm.train.trainer import Trainer  # noqa: E402

STEPS = 4
BATCH = 4  # sequences per micro-step over all replicas
MODELS = {"gpt2": dict(arch="gpt2"),  # the tiny preset: 2 layers, 2 heads, d_model 64, tied embeddings
          "llama": dict(arch="llama", n_head=4, n_kv_head=2)}  # GQA: K/V heads split over tp 2
# name: (config, sizes, more flags)
RUNS = {
    "tp2": ("gpt2", dict(tp=2), []),
    "pp2_gpipe": ("gpt2", dict(pp=2), ["--micro-batches", 2, "--pp-schedule", "gpipe"]),
    "pp2_1f1b": ("llama", dict(pp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b"]),
    "cp2": ("llama", dict(cp=2), []),
    "dp2_tp2_sp": ("llama", dict(dp=2, tp=2), ["--sequence-parallel"]),
    "tp2_pp2": ("llama", dict(tp=2, pp=2), ["--micro-batches", 2]),
    "dp2_tp2_pp2": ("gpt2", dict(dp=2, tp=2, pp=2), ["--micro-batches", 2, "--pp-schedule", "gpipe"]),
}


def world(sizes: dict) -> int:
    return int(np.prod([sizes.get(d, 1) for d in ("dp", "tp", "pp", "cp")]))


def settings(text_file, data_cache, out, model: str, dp: int = 1, **overrides) -> dict:
    """The TrainConfig values of every run here; batch_size is per replica."""
    values = dict(data=[str(text_file)], data_cache=str(data_cache), out_dir=str(out), progress=False,
                  sample_tokens=0, max_steps=STEPS, batch_size=BATCH // dp, grad_accum=2, seq_len=32, eval_interval=2,
                  ckpt_interval=2, grad_clip=0.3, **MODELS[model])
    return dict(values, **overrides)


def flags(values: dict) -> list:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, *v] if isinstance(v, list) else [flag, v]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(world_size: int, args: list, ranks=None) -> list:
    """`flashlm train *args` on world_size ranks (or those of `ranks`), as torchrun starts them."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "flashlm", "train", "--preset", "tiny", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(child_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in (range(world_size) if ranks is None else ranks)]


def launch(world_size: int, args: list, timeout: float = 400) -> list:
    """Runs the ranks to the end; returns each one's output (fails the test if any fails)."""
    procs = start(world_size, args)
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("\n".join(f"--- rank {r} ---\n{p.communicate()[0].decode()[-3000:]}" for r, p in enumerate(procs)))
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-5000:]}"
    return logs


def one_process(text_file, data_cache, out, model: str, resume=False, **overrides):
    """The one-process run (or its resumption); returns its trainer after training."""
    cfg = TrainConfig.from_sources("tiny", overrides=settings(text_file, data_cache, out, model, **overrides))
    trainer = Trainer(cfg, resume=resume)
    trainer.peak_flops = 1.0  # MFU is not compared: skip measuring the machine
    trainer.train()
    trainer.dp.close()
    return trainer


@pytest.fixture(scope="module")
def references(text_file, data_cache, tmp_path_factory):
    """Each config trained in one process on the global batch: metrics, parameters, optimizer state."""
    out = {}
    for model in MODELS:
        trainer = one_process(text_file, data_cache, tmp_path_factory.mktemp(f"ref_{model}"), model)
        out[model] = {"metrics": trainer.metrics, "model": trainer.model.state_dict(),
                      "optimizer": trainer.dp.state_dict()}
    return out


def layout_runs(table: dict, text_file, data_cache, tmp_path_factory):
    """get(name): the run of table[name] (config, sizes, more flags), started when first asked for: (out_dir, logs)."""
    done = {}

    def get(name):
        if name not in done:
            model, sizes, more = table[name]
            out = tmp_path_factory.mktemp(name)
            values = settings(text_file, data_cache, out, model, sizes.get("dp", 1))
            logs = launch(world(sizes), flags(values) + flags(sizes) + list(more))
            done[name] = out, logs
        return done[name]
    return get


@pytest.fixture(scope="module")
def runs(text_file, data_cache, tmp_path_factory):
    """Each layout's run, started when a test first asks for it: (out_dir, logs)."""
    return layout_runs(RUNS, text_file, data_cache, tmp_path_factory)


def assert_matches(metrics, state, want, what, first_step=1):
    """metrics (from first_step on) and a checkpoint's state against the one-process run's."""
    ref = want["metrics"][first_step - 1:]
    assert [m["step"] for m in metrics] == [m["step"] for m in ref], what
    for key in ("loss", "grad_norm", "val_loss"):
        got = [m[key] for m in metrics if key in m]
        expected = [m[key] for m in ref if key in m]
        assert len(got) == len(expected), f"{what}: {key}"
        np.testing.assert_allclose(got, expected, rtol=NORM_RTOL, err_msg=f"{what}: {key}")
    assert all(m["grad_norm"] > 0.3 for m in ref), "the steps compared clip"
    names = list(want["model"])
    assert list(state["model"]) == names, what
    unit = TrainConfig.from_sources("tiny").lr * STEPS  # AdamW moves an element by at most about lr a step
    for n in names:
        assert_close(state["model"][n], want["model"][n], atol=MAX_TOL * unit, name=f"{what}: {n}")
    diff = torch.cat([(state["model"][n].double() - want["model"][n].double()).reshape(-1) for n in names])
    assert float(diff.square().mean().sqrt()) <= RMS_TOL * unit, f"{what}: RMS parameter error"
    got_opt, want_opt = state["optimizer"], want["optimizer"]
    assert sorted(got_opt["state"]) == sorted(want_opt["state"]), what
    assert [g["params"] for g in got_opt["param_groups"]] == [g["params"] for g in want_opt["param_groups"]], what
    for key in ("exp_avg", "exp_avg_sq"):
        ids = sorted(want_opt["state"])
        assert_close_to_scale([got_opt["state"][i][key] for i in ids], [want_opt["state"][i][key] for i in ids],
                              STATE_RTOL, f"{what}: {key}")
    assert all(float(got_opt["state"][i]["step"]) == STEPS for i in got_opt["state"]), what


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_layout_matches_one_process(runs, references, name):
    out, logs = runs(name)
    model, sizes, _ = RUNS[name]
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == STEPS
    assert_matches(read_metrics(out), state, references[model], name)
    # Rank 0 alone reports: the others print nothing of the run
    assert "flashlm train:" in logs[0] and "val loss" in logs[0]
    for r, log in enumerate(logs[1:], 1):
        assert "flashlm train:" not in log and "val loss" not in log, f"rank {r} printed:\n{log}"
    assert f"{BATCH * 32 * 2} tokens/step, {world(sizes)} rank(s)" in logs[0]


def copy_checkpoint(src, step: int, dst):
    dst.mkdir()
    shutil.copy(src / f"ckpt-{step:08d}.pt", dst)
    return dst


@pytest.mark.slow
def test_resume_at_the_same_layout_is_exact(runs, text_file, data_cache, tmp_path):
    """TP 2 x PP 2 from its step-2 checkpoint: the same losses, bit for bit, and the same parameters."""
    out, _ = runs("tp2_pp2")
    assert_resumes_exactly(out, RUNS["tp2_pp2"], tmp_path / "again")


def assert_resumes_exactly(out, run, again):
    """The run (config, sizes, more flags) whose folder is `out` resumed from its step-2 checkpoint in `again` at
    the same layout: the same losses and clip norms, bit for bit, and the same final parameters."""
    _, sizes, more = run
    copy_checkpoint(out, 2, again)
    launch(world(sizes), ["--out-dir", again, "--resume", *flags(sizes), *more])
    whole, resumed = read_metrics(out), read_metrics(again)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in whole]
    a, b = load_checkpoint(latest_checkpoint(out)), load_checkpoint(latest_checkpoint(again))
    for n, t in a["model"].items():
        assert torch.equal(b["model"][n], t), n


@pytest.mark.slow
def test_checkpoint_moves_from_tp2_to_one_process(runs, references, text_file, data_cache, tmp_path):
    out, _ = runs("tp2")
    folder = copy_checkpoint(out, 2, tmp_path / "one")
    trainer = one_process(text_file, data_cache, folder, "gpt2", resume=True)
    state = load_checkpoint(latest_checkpoint(folder))
    assert_matches(trainer.metrics[2:], state, references["gpt2"], "tp2 -> 1", first_step=3)


@pytest.mark.slow
@pytest.mark.parametrize("src, dp", [("pp2_gpipe", 2), ("tp2_pp2", 4)])
def test_checkpoint_moves_to_data_parallelism(runs, references, text_file, data_cache, tmp_path, src, dp):
    """PP 2 -> DP 2 and TP 2 x PP 2 -> DP 4: each replica takes its share of the same global batch."""
    out, _ = runs(src)
    model = RUNS[src][0]
    folder = copy_checkpoint(out, 2, tmp_path / "dp")
    launch(dp, ["--out-dir", folder, "--resume", "--batch-size", BATCH // dp])
    assert_matches(read_metrics(folder)[2:], load_checkpoint(latest_checkpoint(folder)), references[model],
                   f"{src} -> dp {dp}", first_step=3)


@pytest.mark.slow
@pytest.mark.parametrize("dst", ["zero0", "tp2"])
def test_checkpoint_moves_from_zero3(references, text_file, data_cache, tmp_path, dst):
    """ZeRO-3 over 2 ranks to 2 steps, then one process with ZeRO 0 (or TP 2) from its checkpoint."""
    out = tmp_path / "zero3"
    launch(2, flags(settings(text_file, data_cache, out, "gpt2", dp=2, max_steps=2)) + ["--zero-stage", 3])
    if dst == "zero0":
        metrics = one_process(text_file, data_cache, out, "gpt2", resume=True).metrics
    else:
        launch(2, ["--out-dir", out, "--resume", "--max-steps", STEPS, "--batch-size", BATCH, "--zero-stage", 0,
                   "--tp", 2])
        metrics = read_metrics(out)
    assert_matches(metrics[2:], load_checkpoint(latest_checkpoint(out)), references["gpt2"], f"zero3 -> {dst}",
                   first_step=3)


@pytest.mark.slow
def test_zero3_resumes_exactly_and_from_tp2(runs, references, text_file, data_cache, tmp_path):
    """ZeRO-3 over 2 ranks, where no rank holds the model: resumed from its own step-2 checkpoint (each rank copying
    its slices out of the memory-mapped file) with the same losses bit for bit, rank 0 alone sampling after
    training; and TP 2's checkpoint resumed at ZeRO-3 over 2 ranks continues as the one-process run."""
    zero3 = ("gpt2", dict(dp=2), ["--zero-stage", 3])
    out = tmp_path / "zero3"
    launch(2, flags(settings(text_file, data_cache, out, "gpt2", dp=2)) + zero3[2])
    assert_resumes_exactly(out, (*zero3[:2], zero3[2] + ["--sample-tokens", 8]), tmp_path / "again")
    folder = copy_checkpoint(runs("tp2")[0], 2, tmp_path / "from_tp2")
    logs = launch(2, ["--out-dir", folder, "--resume", "--batch-size", BATCH // 2, *flags(zero3[1]), *zero3[2],
                      "--sample-tokens", 8])
    assert "-- sample --" in logs[0] and "-- sample --" not in logs[1]
    assert_matches(read_metrics(folder)[2:], load_checkpoint(latest_checkpoint(folder)), references["gpt2"],
                   "tp2 -> zero3 dp 2", first_step=3)


@pytest.mark.slow
def test_a_rank_killed_mid_step_fails_its_peer_with_a_timeout(text_file, data_cache, tmp_path):
    """Rank 1 of TP 2 is killed while the steps run; rank 0's next collective gives up after --comm-timeout
    seconds with an error naming the peer, instead of hanging."""
    values = settings(text_file, data_cache, tmp_path, "gpt2", max_steps=100000, eval_interval=100000,
                      ckpt_interval=100000, comm_timeout=3.0)
    procs = start(2, flags(values) + ["--tp", 2])
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[0].decode()
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        log = procs[0].communicate(timeout=60)[0].decode()
        seconds = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 2, log
    errors = [line for line in log.splitlines() if line.startswith("flashlm: error:")]
    assert len(errors) == 1 and "rank 1" in errors[0] and "Traceback" not in log, log
    assert seconds < 3.0 + 30, f"rank 0 took {seconds:.1f} s to fail"


@pytest.mark.parametrize("world_size, values, error, message", [
    (2, dict(tp=3), ValueError, r"--tp/--pp/--cp: --tp 3 x --pp 1 x --cp 1 = 3 ranks do not divide the world of 2"),
    (4, dict(dp=2), ValueError, r"--dp/--tp/--pp/--cp: --dp 2 x --tp 1 x --pp 1 x --cp 1 = 2 ranks, but the world "
                                r"has 4"),
    (1, dict(tp=2), ValueError, "= 2 ranks do not divide the world of 1"),
    (2, dict(tp=0), ValueError, "--tp: must be an int >= 1, got 0"),
    (4, dict(tp=4), ValueError, "--tp: n_head 2 does not divide by tp 4"),
    (4, dict(pp=4), ValueError, "--pp: stages: 4 pipeline stages need at least 4 layers, the model has 2"),
    (2, dict(pp=2, micro_batches=3), ValueError, "--pp: micro_batches: 3 micro-batches do not divide the batch of 8"),
    (2, dict(pp_schedule="zigzag"), ValueError, "--pp-schedule: must be one of"),
    (2, dict(sequence_parallel=True), ValueError, "--sequence-parallel: needs --tp > 1"),
    (2, dict(tp=2, seq_len=63, sequence_parallel=True), ValueError, "--sequence-parallel: seq_len 63 does not divide"),
    (4, dict(cp=2, tp=2, sequence_parallel=True), NotImplementedError, "--sequence-parallel: not with --cp"),
    (2, dict(tp=2, zero_stage=4), ValueError, "zero_stage: must be 0, 1, 2 or 3, got 4"),
    (2, dict(cp=2, arch="gemma2"), NotImplementedError, "--cp: context parallelism does not cover gemma2"),
    (2, dict(tp=2, l1=0.1), ValueError, "l1: not available with --tp/--pp/--cp"),
])
def test_bad_layouts_are_refused_before_any_group(monkeypatch, tmp_path, world_size, values, error, message):
    """No process group exists here (a rank-0 process alone): the errors come first or the test would hang
    waiting for the other ranks."""
    import flashlm.dist as fd

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(error, match=message):
        cfg = TrainConfig.from_sources("tiny", overrides=dict(out_dir=str(tmp_path), **values))
        Trainer(cfg)
    assert not fd.is_initialized()


def test_the_command_says_what_is_wrong(tmp_path):
    """`flashlm train` under a launcher of 2 ranks with sizes for 3: an error line and exit 2, no traceback, and
    no wait for the other rank."""
    proc = start(2, ["--tp", 3, "--out-dir", tmp_path], ranks=[0])[0]
    log = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2, log
    assert log.strip().splitlines()[-1] == ("flashlm: error: --tp/--pp/--cp: --tp 3 x --pp 1 x --cp 1 = 3 ranks do "
                                            "not divide the world of 2"), log
    assert "Traceback" not in log


@pytest.mark.slow
def test_mixed_precision_with_the_loss_scaler(text_file, data_cache, tmp_path):
    """TP 2 x PP 2 under fp16 autocast with the dynamic loss scaler against one fp16 process: the same scale
    every step, and the gradients unscaled before the norm (a missed unscale shows as a norm 2^16 times larger).
    The runs round in float16 (unit roundoff u = 2^-11) at different places; a loss or a norm sums many such
    roundings of either sign, so the two differ by less than one u: the bound. Measured: 0.004 u (losses),
    0.09 u (clip norms), 0.01 u (validation)."""
    values = settings(text_file, data_cache, tmp_path / "mp", "llama", precision="fp16")
    launch(4, flags(values) + ["--tp", 2, "--pp", 2, "--micro-batches", 2])
    want = one_process(text_file, data_cache, tmp_path / "one", "llama", precision="fp16").metrics
    got = read_metrics(tmp_path / "mp")
    assert [m["loss_scale"] for m in got] == [m["loss_scale"] for m in want] == [2.0 ** 16] * STEPS
    assert not any(m["skipped"] for m in got)
    for key in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose([m[key] for m in got if key in m], [m[key] for m in want if key in m],
                                   rtol=2.0 ** -11, err_msg=key)


@pytest.mark.slow
def test_export_of_a_model_parallel_run(runs, tmp_path):
    """The TP 2 run's folder exports as any run's: the F32 GGUF file's model is the checkpoint's full model,
    tensor for tensor, and computes the same logits."""
    from flashlm.io import load_model
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.export_run import export_run

    out, _ = runs("tp2")
    export_run(out, gguf_path=tmp_path / "model.gguf")
    state = load_checkpoint(latest_checkpoint(out))
    model = Transformer(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    exported = load_model(tmp_path / "model.gguf").model
    loaded = exported.state_dict()
    for name, tensor in state["model"].items():
        assert torch.equal(loaded[name], tensor), name
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], model.eval()(idx)[0])
