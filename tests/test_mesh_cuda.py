"""CUDA tensors on the mesh (parallel/cuda_mesh.py): an NCCL ring per group and per pipeline link.

Without GPUs (here): the ring-making logic with NCCL replaced by a stand-in in two real ranks (the unique id made
by each ring's first rank and shared through torch.distributed's store, one ring per group and per link, the
device and timeout each ring is made with, a rank 0 without NCCL failing its peer by name instead of leaving it
waiting), and the refusals made before any group: CUDA on a build without NCCL or a machine without
libnccl.so.2, ranks on different kinds of device, two ranks on one GPU, a one-GPU host asked for two ranks.

With two GPUs (scripts/gpu_check.sh collects them; they skip on fewer): `flashlm train` on a CUDA mesh (TP 2,
PP 2, DP 2 with ZeRO-3, CP 2; DP 2 x TP 2 with ZeRO-3 on four) against the same layout on CPU processes, within
the bounds the CPU layouts are held to against one process (the two differ in the order of float32 sums only:
cuBLAS's and the CPU kernels').
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_loop import child_env, data_cache, read_metrics, text_file  # noqa: E402,F401
from test_train_model_parallel import assert_matches, flags, free_port, launch, settings, world  # noqa: E402

import flashlm  # noqa: E402
from flashlm.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from flashlm.parallel import cuda_mesh  # noqa: E402
from flashlm.train.trainer import Trainer  # noqa: E402

# Two ranks of Mesh(tp=2) with NCCL stood in for: every NCCL ring made is recorded as (id, rank, world, device,
# timeout). argv: mode ("rings": the tp group's ring and a 2-stage pipeline's links; "no_nccl": rank 0 cannot
# make a unique id).
WORKER = r"""
import json, os, sys
import torch
import flashlm.dist as fd
from flashlm.ops import comm
from flashlm.parallel import Mesh
from flashlm.parallel.cuda_mesh import nccl_connect
from flashlm.parallel.pipeline import PipelinePlan, stage_links

mode = sys.argv[1]
calls = []

class StandIn:  # a ring's place: collectives are not run here
    pass

def nccl_ring(unique_id, rank, world_size, device, timeout=60.0, slice_bytes=0):
    calls.append([unique_id.hex(), rank, world_size, device, timeout])
    return StandIn()

def no_unique_id():
    raise RuntimeError("NCCL transport: cannot load libnccl.so.2 (stand-in)")

comm.nccl_ring = nccl_ring
comm.nccl_unique_id = (lambda: os.urandom(128)) if mode == "rings" else no_unique_id
fd.init(timeout=20)
rank = fd.get_rank()
mesh = Mesh(tp=2, timeout=7.0)
out = {}
if mode == "rings":
    ring = mesh.tp.ring_on(f"cuda:{rank}")
    out["again"] = mesh.tp.ring_on(torch.device("cuda", rank)) is ring  # made once
    out["cpu"] = mesh.tp._ring_for(torch.zeros(2)) is mesh.tp.ring  # CPU tensors: the shared-memory ring
    out["one_rank"] = mesh.dp.ring_on(f"cuda:{rank}") is None
    for name, device in (("other_gpu", f"cuda:{1 - rank}"), ("meta", "meta")):
        try:
            mesh.tp.ring_on(device)
        except ValueError as e:
            out[name] = str(e)
    plan = PipelinePlan(2, 2, 2, 2, 8, "gpipe")
    links = stage_links(rank, plan, True, nccl_connect(f"{mesh.job}-pipe0", rank, 7.0))
    out["links"] = {k: getattr(links, k) is not None for k in ("prev", "next", "group", "tied")}
else:
    try:
        mesh.tp.ring_on(f"cuda:{rank}")
    except RuntimeError as e:
        out["error"] = str(e)
out["calls"] = calls
print("RESULT " + json.dumps(out), flush=True)
fd.destroy()
"""


def run_two_ranks(mode: str, timeout: float = 120) -> list:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(child_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("\n".join(f"--- rank {r} ---\n{p.communicate()[1][-3000:]}" for r, p in enumerate(procs)))
    for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{err[-5000:]}"
    return [json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))) for out, _ in outputs]


def test_each_group_and_link_gets_its_own_nccl_ring_with_its_first_ranks_id():
    ranks = run_two_ranks("rings")
    # Made in the same order on both ranks: the tp group's ring, then the links in stage order (link0, the
    # stages' ring, the tied embedding's ring between the first and last stage).
    calls = [r["calls"] for r in ranks]
    assert [len(c) for c in calls] == [4, 4], calls
    ids = [c[0] for c in calls[0]]
    assert [c[0] for c in calls[1]] == ids, "a ring's ranks must share its first rank's unique id"
    assert len(set(ids)) == 4, "every ring needs an id of its own"
    for r in (0, 1):
        assert [c[1:] for c in calls[r]] == [[r, 2, r, 7.0]] * 4  # this rank of 2, on cuda:LOCAL_RANK, the timeout
        out = ranks[r]
        assert out["again"] and out["cpu"] and out["one_rank"], out  # none for a group of one rank
        assert out["other_gpu"] == f"tensor: the tp group's NCCL ring is on cuda:{r}, got cuda:{1 - r}"
        assert out["meta"] == "tensor: the tp group moves CPU or CUDA tensors, got meta"
    assert ranks[0]["links"] == {"prev": False, "next": True, "group": True, "tied": True}
    assert ranks[1]["links"] == {"prev": True, "next": False, "group": True, "tied": True}


def test_a_first_rank_without_nccl_fails_its_peers_by_name():
    ranks = run_two_ranks("no_nccl")
    assert ranks[0]["error"] == "NCCL transport: cannot load libnccl.so.2 (stand-in)"
    assert ranks[1]["error"] == ("flashlm.dist: the ring's rank 0 could not start NCCL: NCCL transport: cannot load "
                                 "libnccl.so.2 (stand-in)")
    assert ranks[0]["calls"] == ranks[1]["calls"] == []


def test_cuda_on_a_build_without_nccl_is_refused(monkeypatch):
    monkeypatch.setattr(flashlm, "build_info", lambda: {"cuda": True, "nccl": False})
    with pytest.raises(NotImplementedError, match="^--device cuda: this flashlm was built without the NCCL transport"):
        cuda_mesh.check_nccl()


def test_cuda_without_libnccl_is_refused(monkeypatch):
    monkeypatch.setattr(flashlm, "build_info", lambda: {"nccl": True})
    monkeypatch.setattr(cuda_mesh.comm, "nccl_status", lambda: "cannot load libnccl.so.2 (not found)")
    with pytest.raises(RuntimeError, match=r"^--device cuda: the mesh's NCCL rings cannot start: cannot load "
                                           r"libnccl\.so\.2 \(not found\)$"):
        cuda_mesh.check_nccl()
    monkeypatch.setattr(cuda_mesh.comm, "nccl_status", lambda: "NCCL 2.27.3")
    cuda_mesh.check_nccl()


@pytest.mark.parametrize("placements, message", [
    ([("a", "cpu"), ("a", "cuda:0")], r"^--device: every rank of a mesh must train on the same kind of device, got "
                                      r"cpu on rank\(s\) \[0\]; cuda on rank\(s\) \[1\]$"),
    ([("a", "cuda:0"), ("a", "cuda:1"), ("a", "cpu"), ("b", "cpu")],
     r"cpu on rank\(s\) \[2, 3\]; cuda on rank\(s\) \[0, 1\]$"),
    ([("a", "cuda:0"), ("b", "cuda:0"), ("a", "cuda:1"), ("b", "cuda:0")],
     r"^--device: ranks 1 and 3 are both on cuda:0 of one host: a mesh needs a GPU per rank"),
])
def test_mixed_devices_and_a_shared_gpu_are_refused(placements, message):
    with pytest.raises(ValueError, match=message):
        cuda_mesh.check_placements(placements)


@pytest.mark.parametrize("placements, nccl, error, message", [
    ([("h", "cpu"), ("h", "cuda:1")], True, ValueError, "^--device: every rank of a mesh must train on the same kind"),
    ([("h", "cuda:0"), ("h", "cuda:0")], True, ValueError, "^--device: ranks 0 and 1 are both on cuda:0 of one host"),
    ([("h", "cuda:0"), ("h", "cuda:1")], False, NotImplementedError, "^--device cuda: this flashlm was built without"),
])
def test_model_parallel_refuses_misplaced_ranks_before_any_group(monkeypatch, placements, nccl, error, message):
    """No process group exists here: the refusal comes before the Mesh (which would say to call init first)."""
    from flashlm.models import Transformer
    from flashlm.train.config import TrainConfig
    from flashlm.train.parallel_step import ModelParallel

    monkeypatch.setattr(cuda_mesh, "gather_placements", lambda device: placements)
    monkeypatch.setattr(flashlm, "build_info", lambda: {"cuda": True, "nccl": nccl})
    cfg = TrainConfig.from_sources("tiny", overrides=dict(tp=2))
    with pytest.raises(error, match=message):
        ModelParallel(Transformer(cfg.model_config()), cfg, dict(dp=1, tp=2, pp=1, cp=1), lambda groups: None)
    assert not flashlm.dist.is_initialized()


@pytest.mark.parametrize("placements", [
    [("a", "cpu"), ("a", "cpu"), ("b", "cpu")],  # CPU ranks share the host's cores
    [("a", "cuda:0"), ("a", "cuda:1"), ("b", "cuda:0"), ("b", "cuda:1")],
])
def test_placements_a_mesh_runs_on(placements):
    cuda_mesh.check_placements(placements)


def test_placement_names_this_host_and_the_gpu():
    host = flashlm.dist.host_id()
    assert cuda_mesh.placement(torch.device("cpu")) == (host, "cpu")
    assert cuda_mesh.placement(torch.device("cuda", 1)) == (host, "cuda:1")  # no GPU needed for an explicit index


@pytest.mark.parametrize("local_rank, count, message", [
    ("1", 1, r"^LOCAL_RANK: rank 1 of this host has no GPU of its own: the host has 1 GPU\(s\); start at most 1 "
             r"rank\(s\) per host on CUDA, or train with --device cpu$"),
    ("0", 0, r"^LOCAL_RANK: rank 0 of this host has no GPU of its own: the host has 0 GPU"),
    ("x", 2, r"^LOCAL_RANK: expected an integer, got 'x'$"),
    ("-1", 2, r"^LOCAL_RANK: must be >= 0, got -1$"),
])
def test_a_host_with_fewer_gpus_than_ranks_is_refused(local_rank, count, message):
    with pytest.raises(ValueError, match=message):
        cuda_mesh.local_gpu(local_rank, count)


def test_local_gpu_is_local_rank(monkeypatch):
    assert cuda_mesh.local_gpu("1", 2) == 1
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert cuda_mesh.local_gpu(count=4) == 3
    monkeypatch.delenv("LOCAL_RANK")
    assert cuda_mesh.local_gpu(count=1) == 0


def test_the_trainer_refuses_a_second_rank_on_a_one_gpu_host(monkeypatch):
    # --device auto picks cuda:LOCAL_RANK; the check comes before torch is asked to switch to a GPU it lacks.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device reached"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="^LOCAL_RANK: rank 1 of this host has no GPU of its own"):
        Trainer._pick_device(None, "auto")


# ---- On two GPUs: a CUDA mesh's steps against the CPU mesh's -------------------------------------------------


# name: (config, sizes, more flags), as tests/test_train_model_parallel.py's RUNS; one GPU per rank. DP 2 alone is
# data parallelism (flashlm.dist's ring over the world); with TP 2 its ZeRO-3 gathers go over the mesh's dp group.
CUDA_RUNS = {
    "tp2": ("gpt2", dict(tp=2), []),
    "pp2_1f1b": ("llama", dict(pp=2), ["--micro-batches", 2, "--pp-schedule", "1f1b"]),
    "dp2_zero3": ("llama", dict(dp=2), ["--zero-stage", 3]),
    "cp2": ("llama", dict(cp=2), []),
    "dp2_tp2_zero3": ("llama", dict(dp=2, tp=2), ["--zero-stage", 3]),
}


# Two training runs of two ranks each: longer than gpu_check.sh's per-test limit of pytest-timeout.
LONGER = [pytest.mark.timeout(600)] if importlib.util.find_spec("pytest_timeout") else []


def gpus(name: str) -> list:
    n = world(CUDA_RUNS[name][1])
    return [pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs (one rank per GPU)")]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=LONGER + gpus(name)) for name in CUDA_RUNS])
def test_cuda_mesh_matches_the_cpu_mesh(text_file, data_cache, tmp_path, name):
    model, sizes, more = CUDA_RUNS[name]
    runs = {}
    for device in ("cpu", "auto"):  # auto: cuda:LOCAL_RANK on every rank
        out = tmp_path / device
        values = settings(text_file, data_cache, out, model, sizes.get("dp", 1), device=device)
        logs = launch(world(sizes), flags(values) + flags(sizes) + list(more))
        runs[device] = out, logs
    cpu_out, _ = runs["cpu"]
    cpu_state = load_checkpoint(latest_checkpoint(cpu_out))
    want = {"metrics": read_metrics(cpu_out), "model": cpu_state["model"], "optimizer": cpu_state["optimizer"]}
    gpu_out, _ = runs["auto"]
    assert_matches(read_metrics(gpu_out), load_checkpoint(latest_checkpoint(gpu_out)), want, f"{name} on CUDA")
