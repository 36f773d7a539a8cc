"""Tests for the training loop (flashlm.train.trainer and its parts): the schedule against its closed form,
the fp16 loss scaler, atomic checkpoints, gradient accumulation, bit-exact resume after SIGKILL (also in the
middle of a save) and the `flashlm train` / `flashlm eval` commands. Every run is a tiny model on a slice of
tinyshakespeare (or generated text where the file is absent) on the CPU."""

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from flashlm.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from flashlm.train.checkpoint import CheckpointManager, save_checkpoint
from flashlm.train.config import TrainConfig
from flashlm.train.scaler import LossScaler
from flashlm.train.schedule import learning_rate
from flashlm.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TEXT_BYTES = 200_000


# One thread, in this process and in the children: these models are so small that a second thread only
# waits at the barriers, and on a busy 2-core machine that wait made runs three times slower (measured).
# Children and parent must agree anyway: float32 sums split over other thread counts round differently.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env():
    # The children import the flashlm this process imported (installed, or the editable source tree), not
    # whatever the checkout's python/ folder holds (which has no native module when flashlm is installed).
    import flashlm

    path = os.pathsep.join([str(Path(flashlm.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, **ONE_THREAD)


def find_tinyshakespeare():
    if "FLASHLM_TINYSHAKESPEARE" in os.environ:
        return Path(os.environ["FLASHLM_TINYSHAKESPEARE"])
    for parent in REPO.parents:
        candidate = parent / "shared/data/tinyshakespeare.txt"
        if candidate.is_file():
            return candidate
    return None


def generated_text(n_bytes, seed=0):
    """Paragraphs of sentences from a small grammar: structure a tiny model can learn within seconds."""
    rng = np.random.default_rng(seed)
    subjects = ["the king", "my lord", "the queen", "a servant", "thy brother", "the duke"]
    verbs = ["speaks of", "commands", "loves", "betrays", "awaits", "remembers"]
    objects = ["the crown", "his father", "the war", "her honour", "the night", "our cause"]
    parts, size = [], 0
    while size < n_bytes:
        lines = [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                 for _ in range(rng.integers(2, 6))]
        parts.append("\n".join(lines))
        size += len(parts[-1]) + 2
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    source = find_tinyshakespeare()
    if source is not None and source.is_file():
        path.write_bytes(source.read_bytes()[:TEXT_BYTES])
    else:
        path.write_text(generated_text(TEXT_BYTES))
    return path


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_config(text_file, data_cache, out_dir, **overrides):
    values = dict(data=[str(text_file)], data_cache=str(data_cache), out_dir=str(out_dir), progress=False,
                  sample_tokens=0, max_steps=24, eval_interval=8, ckpt_interval=8)
    values.update(overrides)
    return TrainConfig.from_sources("tiny", overrides=values)


def run_two_ranks(args, timeout=240) -> list:
    """`flashlm ARGS` as 2 processes in torchrun's environment (a free local port); their outputs, rank 0's
    first, once both have exited 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "flashlm", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=dict(child_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# -- schedule ------------------------------------------------------------------------------------------------

def test_schedule_matches_closed_form():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    expected = {0: lr / 10, 4: lr * 5 / 10, 9: lr,  # warmup: lr * (step + 1) / warmup
                10: lr,  # the cosine starts at its peak
                60: min_lr + 0.5 * (lr - min_lr),  # half way: cos(pi/2) = 0
                35: min_lr + 0.5 * (1 + math.cos(math.pi * 0.25)) * (lr - min_lr),
                85: min_lr + 0.5 * (1 + math.cos(math.pi * 0.75)) * (lr - min_lr),
                109: min_lr + 0.5 * (1 + math.cos(math.pi * 0.99)) * (lr - min_lr),
                110: min_lr, 500: min_lr}
    for step, want in expected.items():
        got = learning_rate(step, lr=lr, min_lr=min_lr, warmup=warmup, max_steps=max_steps)
        assert got == pytest.approx(want, rel=1e-12), f"step {step}: got {got}, want {want}"
    values = [learning_rate(s, lr=lr, min_lr=min_lr, warmup=warmup, max_steps=max_steps) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the cosine part must not increase"
    assert learning_rate(0, lr=lr, min_lr=min_lr, warmup=0, max_steps=max_steps) == lr
    with pytest.raises(ValueError, match="min_lr"):
        learning_rate(0, lr=1e-3, min_lr=1e-2, warmup=0, max_steps=10)


# -- loss scaler ---------------------------------------------------------------------------------------------

def tiny_model_and_dp(seed=0):
    from flashlm.models import ModelConfig, Transformer
    from flashlm.train.optim import AdamW
    from flashlm.train.parallel import DataParallel

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=16))
    dp = DataParallel(model, lambda groups: AdamW(groups, lr=1e-2), param_groups=model.param_groups(0.1))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    return model, dp, x


def backward(model, scaler, x):
    _, loss = model(x[:, :-1], x[:, 1:])
    scaler.scale(loss).backward()


def test_scaler_skips_a_step_with_inf_and_halves_the_scale():
    model, dp, x = tiny_model_and_dp()
    scaler = LossScaler(enabled=True)
    assert scaler.loss_scale == 2.0 ** 16
    backward(model, scaler, x)  # one clean step first, so the optimizer has state to (not) change
    assert scaler.step(dp, 1.0) is not None
    dp.zero_grad()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(dp.state_dict())
    backward(model, scaler, x)
    next(model.parameters()).grad.view(-1)[3] = float("inf")
    assert scaler.step(dp, 1.0) is None
    dp.zero_grad()
    assert scaler.loss_scale == 2.0 ** 15 and scaler.skipped_steps == 1 and scaler.clean_steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"{k} changed in a skipped step"
    after = dp.state_dict()
    for p, s in opt_state["state"].items():
        for name, value in s.items():
            assert torch.equal(after["state"][p][name], value), f"optimizer state {p}.{name} changed"
    # A NaN is skipped the same way.
    backward(model, scaler, x)
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    assert scaler.step(dp, 1.0) is None and scaler.loss_scale == 2.0 ** 14


def test_scaler_grows_after_clean_steps_and_round_trips():
    model, dp, x = tiny_model_and_dp()
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 8, growth_interval=3)
    for i in range(1, 7):
        backward(model, scaler, x)
        assert scaler.step(dp, 1.0) is not None
        dp.zero_grad()
        want = 2.0 ** (8 + i // 3)  # doubles after every 3rd clean step in a row
        assert scaler.loss_scale == want, f"after {i} clean steps: scale {scaler.loss_scale}, want {want}"
    restored = LossScaler(enabled=True, growth_interval=3)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="precision"):
        LossScaler(enabled=False).load_state_dict(scaler.state_dict())


def test_scaled_step_equals_unscaled_step_in_float32():
    """Scaling by a power of two and back is exact in float32 (no overflow or underflow here), so the
    update with the scaler on must equal the update with it off, bit for bit."""
    results = []
    for enabled in (True, False):
        model, dp, x = tiny_model_and_dp()
        scaler = LossScaler(enabled=enabled)
        for _ in range(3):
            backward(model, scaler, x)
            scaler.step(dp, 1.0)
            dp.zero_grad()
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), \
            f"{k}: max diff {(results[0][k] - results[1][k]).abs().max().item()}"


# -- checkpoints ---------------------------------------------------------------------------------------------

def test_checkpoint_files_are_checked_and_pruned(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (5, 10, 15):
        manager.save({"model": {"w": torch.full((3,), float(step))}}, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "ckpt-00000015.pt"
    state = load_checkpoint(latest)
    assert state["step"] == 15 and torch.equal(state["model"]["w"], torch.full((3,), 15.0))
    # A temporary file (what a save killed half way leaves) is never taken for a checkpoint.
    (tmp_path / ".ckpt-00000020.pt.tmp999").write_bytes(latest.read_bytes()[:100])
    (tmp_path / "latest").write_text("ckpt-00000020.pt\n")  # a pointer to a file that is not there
    assert latest_checkpoint(tmp_path).name == "ckpt-00000015.pt"
    CheckpointManager(tmp_path, keep=2)  # a new run clears the leftovers
    assert not list(tmp_path.glob(".ckpt-*"))
    # Bad files: clear errors.
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-00000001.pt"
    save_checkpoint(path, {"x": torch.ones(2)})

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(2)})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# -- training ------------------------------------------------------------------------------------------------

def test_short_run_lowers_validation_loss(text_file, data_cache, tmp_path):
    cfg = tiny_config(text_file, data_cache, tmp_path, max_steps=60, eval_interval=30, ckpt_interval=60)
    trainer = Trainer(cfg)
    metrics = trainer.train()
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    # The bar: a model that ignores context can at best reach the unigram cross-entropy of the validation
    # tokens under the training split's token frequencies (4.88 nats on the tinyshakespeare slice, against
    # ln(384) = 5.95 at the start). Measured after 60 steps: 4.69, so the model must beat the unigram by
    # 0.1 nats, i.e. it has learnt to use context. (0.19 measured, about half kept as margin.)
    counts = np.bincount(trainer.data.train, minlength=trainer.data.vocab_size) + 1.0  # add-one: no log(0)
    unigram = float(-np.log(counts / counts.sum())[np.asarray(trainer.data.val, dtype=np.int64)].mean())
    first = metrics[0]["loss"]
    assert abs(first - math.log(trainer.data.vocab_size)) < 0.1, f"initial loss {first}, expected about ln(V)"
    assert val[-1] < unigram - 0.1, f"final validation loss {val[-1]:.4f}, unigram {unigram:.4f}, curve {val}"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_metrics(tmp_path)) == 60


def test_grad_accum_matches_a_larger_batch(text_file, data_cache, tmp_path):
    """grad_accum=2 of batch 4 sees the same 8 sequences per step as batch 8 (PackedBatches serves the same
    order), and the mean of two equal-sized means is the mean: only float32 summation order differs."""
    runs = []
    for accum, batch in ((2, 4), (1, 8)):
        cfg = tiny_config(text_file, data_cache, tmp_path / f"a{accum}", max_steps=4, grad_accum=accum,
                          batch_size=batch, eval_interval=100, ckpt_interval=100)
        trainer = Trainer(cfg)
        metrics = trainer.train()
        runs.append(([m["loss"] for m in metrics], trainer.model.state_dict()))
    (loss_a, params_a), (loss_b, params_b) = runs
    # Tolerance: float32 sums in another order differ by a few ulps per step; after 4 Adam steps of lr
    # ~1e-3 the parameters may differ by about lr * that relative error, so 1e-5 of the parameter scale.
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, err_msg="losses per step")
    for k in params_a:
        err = (params_a[k] - params_b[k]).abs().max().item()
        assert err <= 1e-5 * max(1.0, params_b[k].abs().max().item()), f"{k}: max abs diff {err}"


_CHILD = r"""
import json, os, sys, time
import flashlm.train.checkpoint as ckpt
from flashlm.train.config import TrainConfig
from flashlm.train.trainer import Trainer

cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
mode, at = sys.argv[2], int(sys.argv[3])
marker = os.path.join(cfg.out_dir, "child-waiting")

def wait_to_be_killed():
    open(marker, "w").close()
    time.sleep(600)

if mode == "in-save":  # stop inside the save of checkpoint `at`: the temporary file is written, not renamed
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".ckpt-{at:08d}.pt.tmp"):
            wait_to_be_killed()
    os.fsync = fsync

def callback(trainer, record):
    if mode == "after-step" and record["step"] == at:
        wait_to_be_killed()

Trainer(cfg).train(callback)
"""


def run_and_kill(cfg, mode, at):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg.to_dict()), mode, str(at)],
                             env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = Path(cfg.out_dir) / "child-waiting"
    deadline = time.time() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"the child ended before step {at}:\n{child.stdout.read().decode()}")
        assert time.time() < deadline, "the child did not reach the kill point in 120 s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    marker.unlink()


@pytest.fixture(scope="module")
def reference_run(text_file, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(text_file, data_cache, out)
    Trainer(cfg).train()
    return read_metrics(out)


@pytest.mark.parametrize("mode, at, resumes_from", [("after-step", 12, 8), ("in-save", 16, 8)])
def test_resume_after_sigkill_is_bit_exact(text_file, data_cache, tmp_path, reference_run, mode, at, resumes_from):
    cfg = tiny_config(text_file, data_cache, tmp_path)
    run_and_kill(cfg, mode, at)
    if mode == "in-save":
        leftovers = list(tmp_path.glob(f".ckpt-{at:08d}.pt.tmp*"))
        assert leftovers, "the child was to be killed with its temporary file written"
    assert latest_checkpoint(tmp_path).name == f"ckpt-{resumes_from:08d}.pt"
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg)  # a fresh run would mix its checkpoints with the earlier run's
    trainer = Trainer(cfg, resume=True)
    assert trainer.step == resumes_from
    assert not list(tmp_path.glob(".ckpt-*")), "a resumed run clears a killed save's temporary file"
    trainer.train()
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == list(range(1, cfg.max_steps + 1))
    for want, got in zip(reference_run, resumed):
        for key in ("loss", "val_loss", "grad_norm", "lr"):
            assert got.get(key) == want.get(key), f"step {want['step']} {key}: resumed {got.get(key)!r}, " \
                                                  f"uninterrupted {want.get(key)!r}"


def test_time_limit_stops_with_a_checkpoint(text_file, data_cache, tmp_path):
    cfg = tiny_config(text_file, data_cache, tmp_path, time_limit=1e-6, max_steps=4, eval_interval=100,
                      ckpt_interval=100)
    metrics = Trainer(cfg).train()
    assert [m["step"] for m in metrics] == [1] and "val_loss" in metrics[0]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000001.pt"
    trainer = Trainer(dataclasses.replace(cfg, time_limit=0.0), resume=True)
    assert trainer.step == 1 and len(trainer.train()) == cfg.max_steps


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_match_one_rank_of_twice_the_batch(text_file, data_cache, tmp_path, zero_stage):
    """Rank r of 2 takes sequences r, r+2, r+4, ... of the shuffled order, so 2 ranks of batch 4 see in each
    step the same 8 sequences as 1 rank of batch 8, and the average of the two ranks' mean gradients is the
    mean gradient: the runs differ only in float32 summation order (tolerances as for grad_accum). ZeRO-3
    also samples at the end (rank 0 alone, on parameters every rank helps gather)."""
    out = tmp_path / "two"
    run_two_ranks(["train", "--preset", "tiny", "--data", text_file, "--data-cache", data_cache, "--out-dir", out,
                   "--max-steps", 3, "--batch-size", 4, "--eval-interval", 3, "--ckpt-interval", 3, "--no-progress",
                   "--sample-tokens", 5 if zero_stage else 0, "--zero-stage", zero_stage])
    two = read_metrics(out)
    two_params = load_checkpoint(latest_checkpoint(out))["model"]

    cfg = tiny_config(text_file, data_cache, tmp_path / "one", max_steps=3, batch_size=8, eval_interval=3,
                      ckpt_interval=3)
    trainer = Trainer(cfg)
    one = trainer.train()
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    for k, want in trainer.model.state_dict().items():
        err = (two_params[k] - want).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{k}: max abs diff {err}"


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-6), ("bf16", 1e-4)])
def test_fused_loss_keeps_the_loss_curve(text_file, data_cache, tmp_path, precision, rtol):
    """The trainer's default loss, fused with the lm head (Transformer.fused_loss), against the logits path:
    the same losses step by step, but for rounding (measured: 1.6e-7 relative in float32, sums in another
    order; 1.4e-5 under bf16 autocast, where one path rounds the logits to bf16 and the other does not), and
    in float32 the same weights (3e-6 measured). Under bf16 the weights are not compared: AdamW's first steps
    move a weight by ~lr whatever its gradient's size, so a rounding that flips a tiny gradient shows there."""
    runs = []
    for fused in (True, False):
        cfg = tiny_config(text_file, data_cache, tmp_path / str(fused), max_steps=6, eval_interval=3,
                          ckpt_interval=100, precision=precision, fused_loss=fused)
        trainer = Trainer(cfg)
        assert trainer.model.fused_loss is fused
        metrics = trainer.train()
        runs.append((metrics, trainer.model.state_dict()))
    (fused, fused_params), (logits, logits_params) = runs
    for key, count in (("loss", 6), ("val_loss", 2)):
        want = [m[key] for m in logits if key in m]
        assert len(want) == count
        np.testing.assert_allclose([m[key] for m in fused if key in m], want, rtol=rtol, err_msg=key)
    if precision == "fp32":
        for k, want in logits_params.items():
            err = (fused_params[k] - want).abs().max().item()
            assert err <= 2e-5 * max(1.0, want.abs().max().item()), f"{k}: max abs diff {err}"


@pytest.mark.parametrize("precision, zero_stage", [("fp16", 0), ("bf16", 1), ("fp32", 3)])
def test_resume_is_exact_with_autocast_and_zero(text_file, data_cache, tmp_path, precision, zero_stage):
    """The loss scaler's state and a ZeRO optimizer's state_dict come back exactly too (in process: the
    SIGKILL tests above cover the process boundary)."""
    import shutil

    cfg = tiny_config(text_file, data_cache, tmp_path / "a", max_steps=6, ckpt_interval=3, eval_interval=3,
                      precision=precision, zero_stage=zero_stage)
    whole = Trainer(cfg).train()
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt-00000003.pt", tmp_path / "b")
    resumed = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), resume=True).train()
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    assert [m.get("loss_scale") for m in resumed] == [m.get("loss_scale") for m in whole]


@pytest.mark.parametrize("src, dst", [(3, 0), (0, 3)])
def test_checkpoint_moves_between_zero0_and_zero3(text_file, data_cache, tmp_path, src, dst):
    """A checkpoint written at one ZeRO stage resumes at the other and continues with the uninterrupted run's
    losses: equal up to the order of the clip norm's sums (per tensor against per flat shard)."""
    import shutil

    cfg = tiny_config(text_file, data_cache, tmp_path / "a", max_steps=6, ckpt_interval=3, eval_interval=3,
                      zero_stage=src)
    whole = Trainer(cfg).train()
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt-00000003.pt", tmp_path / "b")
    moved = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), zero_stage=dst), resume=True).train()
    assert [m["step"] for m in moved] == [m["step"] for m in whole]
    np.testing.assert_allclose([m["loss"] for m in moved], [m["loss"] for m in whole], rtol=1e-5)


# -- command line --------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flashlm", *map(str, args)], env=child_env(), capture_output=True,
                          text=True, timeout=300)


def test_cli_train_and_eval(text_file, data_cache, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 3\neval_interval = 2\nbetas = [0.9, 0.99]\nsample_tokens = 10\n')
    out = tmp_path / "run"
    r = run_cli("train", "--preset", "tiny", "--config", toml, "--max-steps", 5, "--data", text_file,
                "--data-cache", data_cache, "--out-dir", out, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-- sample --" in r.stdout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # the flag beat the file's max_steps
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 5]  # the file's eval_interval
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == 5 and state["train_config"]["betas"] == [0.9, 0.99]
    assert isinstance(state["tokenizer"], str) and state["model_config"]["n_layer"] == 2

    r = run_cli("eval", latest_checkpoint(out), "--data", text_file)
    assert r.returncode == 0, r.stdout + r.stderr
    ppl = float(r.stdout.split("perplexity")[1].split()[0])
    # The held-out loss after 5 steps and the whole file's should agree to within a few tenths of a nat.
    assert abs(math.log(ppl) - metrics[-1]["val_loss"]) < 0.3, (r.stdout, metrics[-1])



@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3"])
def test_train_new_arch_and_run_its_export(text_file, data_cache, tmp_path, arch):
    """`flashlm train --arch qwen3` (gemma2, gemma3): the run trains every norm too, and its checkpoint exported
    to GGUF and HF loads with the training model's logits."""
    from flashlm.cli import main
    from flashlm.io import load_gguf, load_hf, load_model

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--arch", arch, "--max-steps", "4", "--eval-interval", "4",
                 "--ckpt-interval", "4", "--sample-tokens", "0", "--data", str(text_file), "--data-cache",
                 str(data_cache), "--out-dir", str(out), "--no-progress"]) == 0
    state = load_checkpoint(latest_checkpoint(out))
    assert state["model_config"]["arch"] == arch
    for name, t in state["model"].items():
        if name.endswith("norm.weight"):
            assert not torch.equal(t, torch.ones_like(t)), name  # trained away from its initial ones
    assert main(["export", str(latest_checkpoint(out)), "--gguf", str(tmp_path / "m.gguf"), "--hf",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    trained = load_model(str(latest_checkpoint(out))).model
    idx = torch.randint(0, state["model_config"]["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(idx)[0]
        for loaded in (load_gguf(str(tmp_path / "m.gguf")), load_hf(str(tmp_path / "hf"))):
            assert loaded.config.arch == arch
            assert (loaded.model(idx)[0] - want).abs().max().item() <= 1e-4, loaded.source


def test_eval_predicts_every_token_once(text_file, data_cache, tmp_path):
    """flashlm eval's windows: every token after the first is predicted once, whatever the batching (a short
    last window is padded with ignored targets), and the loss is the mean over those predictions."""
    from tokenizers import Tokenizer

    from flashlm.train.evaluate import evaluate_checkpoint

    cfg = tiny_config(text_file, data_cache, tmp_path / "run", max_steps=2, ckpt_interval=2, eval_interval=2)
    Trainer(cfg).train()
    ckpt = latest_checkpoint(tmp_path / "run")
    sample = tmp_path / "sample.txt"
    sample.write_text(text_file.read_text()[:3000] + "\n\nA last line.\n")
    results = [evaluate_checkpoint(ckpt, sample, batch_size=b) for b in (1, 3, 64)]
    state = load_checkpoint(ckpt)
    tok = Tokenizer.from_str(state["tokenizer"])
    docs = [d.strip() for d in sample.read_text().split("\n\n") if d.strip()]
    n_ids = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs)  # + the EOS after each
    for r in results:
        assert r["tokens"] == n_ids - 1 and r["step"] == 2
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6), [x["loss"] for x in results]
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)


def test_config_sources_and_document_separator(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 1e-3\nmin_lr = 1e-4\nn_layer = 3\ndoc_separator = "\\n\\n\\n"\n')
    cfg = TrainConfig.from_sources("tiny", toml, {"n_layer": 5, "d_model": None})
    assert (cfg.lr, cfg.n_layer, cfg.d_model, cfg.seq_len) == (1e-3, 5, 64, 64)  # flag > file > preset
    assert cfg.document_separator() == "\n\n\n"
    assert TrainConfig().document_separator() is None  # the stdlib: whole files are documents
    assert TrainConfig(data=["a.txt"]).document_separator() == "\n\n"
    assert TrainConfig(data=["a.txt"], doc_separator="none").document_separator() is None
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_sources("huge")
    for name in ("warmup", "grad_clip", "weight_decay", "time_limit"):
        for bad in (-1, math.nan):
            with pytest.raises(ValueError, match=rf"^{name}: must be >= 0, got"):
                TrainConfig(**{name: bad})


def test_cli_rejects_bad_arguments(text_file, tmp_path, capsys):
    from flashlm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--optimizer", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--min-lr", "1.0", "--out-dir", str(tmp_path)]) == 2
    assert "min_lr" in capsys.readouterr().err
    toml = tmp_path / "bad.toml"
    toml.write_text("max_step = 3\n")  # a typo: an error, not a silently ignored key
    assert main(["train", "--config", str(toml), "--out-dir", str(tmp_path)]) == 2
    assert "unknown keys ['max_step']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", str(text_file)]) == 2
    assert "no such file" in capsys.readouterr().err
