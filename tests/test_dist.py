"""flashlm.dist and the ring collectives: multi-process tests (2, 3 and 4 ranks on this host, each run
bounded in time), the reduction kernel against its scalar oracle and torch, and argument checks.

The ranks are separate Python processes (tests/dist_worker.py) meeting through a FileStore, or through
torchrun's environment variables and a TCPStore on 127.0.0.1. Multi-GPU check, where two GPUs exist:
    python -m pytest -q tests/test_dist.py -k cuda
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import flashlm
from flashlm.ops import comm

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


def run_ranks(scenario, world, arg, timeout=120, env=None):
    """Runs `world` ranks of a scenario; returns the RESULT records of each rank. Fails (after killing
    them) when a rank fails or they do not finish within `timeout` seconds."""
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(world), str(arg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- rank {r} ---\n{p.communicate()[1][-3000:]}" for r, p in enumerate(procs))
        pytest.fail(f"{scenario} with {world} ranks did not finish within {timeout} s\n{logs}")
    for r, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"{scenario}: rank {r} of {world} failed (exit {p.returncode}):\n{err[-5000:]}"
    return [[json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")] for out, _ in outputs]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_segments():
    return set(glob.glob("/dev/shm/flashlm-*"))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_collectives(world, tmp_path):
    before = shm_segments()
    run_ranks("collectives", world, tmp_path / "store")
    assert shm_segments() - before == set(), "shared-memory segments left behind"


def test_killed_peer_raises_within_timeout(tmp_path):
    before = shm_segments()
    results = run_ranks("killed_peer", 3, tmp_path / "store", timeout=60)
    for rank, records in enumerate(results[:2]):
        failure, again = records
        assert failure["seconds"] < 3.0 + 2.0, f"rank {rank} took {failure['seconds']:.1f} s to fail"
        assert "did not" in failure["message"] or "aborted" in failure["message"] or "exited" in failure["message"], failure
        assert "aborted" in again["again"], again
    # rank 0 waits on the dead rank 2 directly, and names it
    assert "rank 2" in results[0][0]["message"], results[0][0]
    assert shm_segments() - before == set()


def test_mismatched_calls_raise(tmp_path):
    results = run_ranks("mismatch", 2, tmp_path / "store", timeout=60)
    messages = [records[0]["message"] for records in results]
    assert any("same collectives" in m for m in messages), messages


@pytest.mark.parametrize("world", [2, 3])
def test_sendrecv(world, tmp_path):
    before = shm_segments()
    results = run_ranks("sendrecv", world, tmp_path / "store")
    assert all(records == [{"rank": r, "ok": True}] for r, records in enumerate(results)), results
    assert shm_segments() - before == set(), "shared-memory segments left behind"


def test_sendrecv_mismatch_raises(tmp_path):
    results = run_ranks("sendrecv_mismatch", 2, tmp_path / "store", timeout=60)
    by_case = {(r["rank"], r["case"]): r["message"] for records in results for r in records}
    assert "rank 0 sent 400 bytes of F32 where rank 1 expected 200 bytes of F32" in by_case[1, "size"], by_case
    assert "rank 0 sent 400 bytes of F32 where rank 1 expected 400 bytes of I32" in by_case[1, "dtype"], by_case
    assert "aborted after a failure on rank 1" in by_case[0, "size"], by_case


def test_sendrecv_dead_peer_raises_within_timeout(tmp_path):
    results = run_ranks("sendrecv_dead_peer", 2, tmp_path / "store", timeout=60)
    (failure,) = results[0]
    assert failure["seconds"] < 3.0 + 2.0, failure
    assert "rank 1" in failure["message"] and ("exited" in failure["message"] or "within 3 s" in failure["message"]), failure


def test_sendrecv_arguments():
    ring = comm.shm_ring(f"single-sr-{os.getpid()}", 0, 1, timeout=1.0)
    with pytest.raises(ValueError, match="^sendrecv: a ring of 1 rank has no neighbour"):
        ring.sendrecv(torch.ones(2), torch.empty(2))
    with pytest.raises(ValueError, match="^send: expected a torch.Tensor"):
        ring.sendrecv([1.0])
    with pytest.raises(ValueError, match="^recv: must be contiguous"):
        ring.sendrecv(recv=torch.empty(4, 4).t())
    t = torch.ones(8)
    with pytest.raises(ValueError, match="^recv: must not overlap send"):
        ring.sendrecv(t[:5], t[3:])


def test_gradient_sync_matches_manual_average(tmp_path):
    run_ranks("grad_sync", 3, tmp_path / "store")


def test_init_from_torchrun_environment():
    run_ranks("env_init", 2, free_port(), timeout=90)


# ---- In one process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divisor", [1.0, 3.0])
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_reduce_add_matches_torch(dtype, divisor, isa):
    if not flashlm.ops.cpu_isa_supported(isa):
        pytest.skip(f"no {isa} on this CPU")
    g = torch.Generator().manual_seed(0)
    n = 4099  # whole vectors and a ragged tail
    a, b = (torch.randn(n, generator=g) * 100).to(dtype), (torch.randn(n, generator=g) * 100).to(dtype)
    a[:4] = torch.tensor([float("inf"), float("nan"), -0.0, 65504.0 if dtype == torch.float16 else 1e30])
    want = ((a.float() + b.float()) / divisor).to(dtype)
    previous = flashlm.ops.cpu_isa()
    flashlm.ops.set_cpu_isa(isa)
    try:
        got = comm.reduce_add(a.clone(), b, divisor)
    finally:
        flashlm.ops.set_cpu_isa(previous)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_single_rank_shm_ring_is_identity(tmp_path):
    ring = comm.shm_ring(f"single-{os.getpid()}", 0, 1, timeout=1.0)
    t = torch.arange(10.0)
    ring.allreduce(t, "avg")
    ring.broadcast(t, 0)
    assert torch.equal(t, torch.arange(10.0)) and ring.rank == 0 and ring.world_size == 1


def test_bad_ring_arguments():
    with pytest.raises(ValueError, match="^job"):
        comm.shm_ring("bad/name", 0, 2)
    with pytest.raises(ValueError, match="^rank"):
        comm.shm_ring("ok", 2, 2)
    with pytest.raises(ValueError, match="^world_size"):
        comm.shm_ring("ok", 0, 0)
    with pytest.raises(ValueError, match="^timeout"):
        comm.shm_ring("ok", 0, 1, timeout=0)
    with pytest.raises(ValueError, match="^op"):
        comm.check_op("max")
    with pytest.raises(ValueError, match="^dst"):
        comm.reduce_add(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="^reduce_add: src has"):
        comm.reduce_add(torch.ones(3), torch.ones(4))


def test_connect_times_out_without_peers():
    with pytest.raises(RuntimeError, match="rank 1 did not create its ring segment within 0.3 s"):
        comm.shm_ring(f"lonely-{os.getpid()}", 0, 2, timeout=0.3)
    assert not glob.glob(f"/dev/shm/flashlm-lonely-{os.getpid()}-*")


def test_dist_requires_init():
    import flashlm.dist as fd

    if not fd.is_initialized():
        with pytest.raises(RuntimeError, match="init"):
            fd.all_reduce(torch.ones(2))


def test_build_reports_nccl():
    info = flashlm.build_info()
    assert info["nccl"] == (info["cuda"] and info["nccl"])  # the NCCL transport needs the CUDA build
    status = comm.nccl_status()
    assert status.startswith("NCCL ") or "libnccl" in status or "without" in status, status
    if not info["nccl"]:
        with pytest.raises(NotImplementedError, match="NCCL"):
            comm.nccl_unique_id()
    elif not status.startswith("NCCL "):
        with pytest.raises(RuntimeError, match="libnccl.so.2"):  # missing NCCL: said when asked for
            comm.nccl_unique_id()


FAKE_NCCL = r"""
/* Just enough of libnccl.so.2 for flashlm's loader: a version, a unique id, and (NEW) the calls of NCCL >= 2.14. */
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetVersion(int* v) { *v = VERSION; return 0; }
int ncclGetUniqueId(ncclUniqueId* id) { for (int i = 0; i < 128; ++i) id->internal[i] = (char)i; return 0; }
int ncclCommDestroy(void* c) { (void)c; return 0; }
int ncclCommAbort(void* c) { (void)c; return 0; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
int ncclSend(void) { return 0; }
int ncclRecv(void) { return 0; }
const char* ncclGetErrorString(int r) { (void)r; return "fake"; }
#ifdef NEW
int ncclCommInitRankConfig(void) { return 3; }
int ncclCommGetAsyncError(void* c, int* state) { (void)c; *state = 0; return 0; }
#endif
"""


@pytest.mark.parametrize("version, new", [(21703, False), (22703, True)])
def test_nccl_loader_with_a_fake_library(tmp_path, version, new):
    """The dlopen table: NCCL's version, the optional calls of newer NCCL, and a clear refusal of an old one."""
    if not flashlm.build_info()["nccl"]:
        pytest.skip("built without the NCCL transport")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "fake.c").write_text(FAKE_NCCL)
    lib = tmp_path / "libnccl.so.2"
    subprocess.run([cc, "-shared", "-fPIC", f"-DVERSION={version}", *(["-DNEW"] if new else []), str(tmp_path / "fake.c"),
                    "-o", str(lib)], check=True)
    probe = ("from flashlm.ops import comm\nprint(comm.nccl_status())\n"
             "try:\n    print(comm.nccl_unique_id() == bytes(range(128)))\nexcept RuntimeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "FLASHLM_NCCL_LIBRARY": str(lib)}).stdout.splitlines()
    if new:
        assert out == ["NCCL 2.27.3", "True"], out
    else:
        assert "NCCL (2.17.3) is too old" in out[0] and "NCCL >= 2.18" in out[0], out
        assert "too old" in out[1], out


def test_nccl_ring_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    info = flashlm.build_info()
    # Without the NCCL transport in the build, or without a GPU, creating a ring fails before any NCCL call.
    with pytest.raises(NotImplementedError if not info["nccl"] else ValueError,
                       match="without the NCCL transport" if not info["nccl"] else "^device: no CUDA device 0"):
        comm.nccl_ring(bytes(128), 0, 1, 0, timeout=1.0)
    if info["nccl"]:
        with pytest.raises(ValueError, match="^unique_id: must be 128 bytes"):
            comm.nccl_ring(b"short", 0, 1, 0)


# ---- CUDA --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divisor", [1.0, 3.0])
@pytest.mark.parametrize("offset", [0, 1])
def test_reduce_add_cuda_matches_cpu(dtype, divisor, offset):
    g = torch.Generator().manual_seed(1)
    n = 1_000_003
    a, b = (torch.randn(n + 1, generator=g) * 100).to(dtype), (torch.randn(n + 1, generator=g) * 100).to(dtype)
    a, b = a[offset:offset + n], b[offset:offset + n]  # offset 1: the unaligned path
    want = comm.reduce_add(a.clone(), b, divisor)
    got = comm.reduce_add(a.cuda(), b.cuda(), divisor)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_single_rank_nccl_ring(tmp_path):
    status = comm.nccl_status()
    if not status.startswith("NCCL "):
        pytest.skip(status)
    ring = comm.nccl_ring(comm.nccl_unique_id(), 0, 1, 0)
    t = torch.arange(10.0, device="cuda")
    ring.allreduce(t, "avg")
    ring.broadcast(t, 0)
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(10.0))


@pytest.mark.cuda
def test_nccl_ring_matches_nccl_allreduce(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run_ranks("cuda_allreduce", torch.cuda.device_count(), tmp_path / "store", timeout=300)
