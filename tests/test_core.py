import os
import subprocess
import sys

import pytest
import torch

import flashlm
from flashlm import ops


def test_version_and_build_info():
    assert flashlm.__version__.count(".") == 2
    info = flashlm.build_info()
    for key in ("version", "compiler", "cuda", "cuda_archs", "nccl", "cpu_features", "cpu_isa", "threads",
                "cuda_devices", "cuda_status"):
        assert key in info, key
    assert info["version"] == flashlm.__version__
    assert info["threads"] >= 1
    assert info["cpu_isa"] in ("scalar", "avx2")
    if info["cuda"]:
        assert "80" in info["cuda_archs"] and "90" in info["cuda_archs"]


def test_cuda_build_imports_without_a_driver():
    # Whatever the build, asking for devices never raises; without a GPU it reports zero and why.
    info = flashlm.build_info()
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    if info["cuda_devices"] == 0:
        assert info["cuda_status"]


def test_num_threads_follows_the_environment():
    code = "import flashlm; print(flashlm.build_info()['threads'])"
    env = dict(os.environ, FLASHLM_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "3"
    env["FLASHLM_NUM_THREADS"] = "lots"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FLASHLM_NUM_THREADS" in bad.stderr


def test_spin_time_follows_the_environment():
    """FLASHLM_SPIN_US: how long idle workers poll before sleeping (0: at once); a bad value is refused."""
    code = ("import torch, flashlm.ops as ops; x = torch.randn(300, 4096); w = torch.ones(4096)\n"
            "print(bool(torch.allclose(ops.rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) "
            "+ 1e-6), rtol=1e-5, atol=1e-6)))")
    env = dict(os.environ, FLASHLM_SPIN_US="0", FLASHLM_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
    env["FLASHLM_SPIN_US"] = "-5"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FLASHLM_SPIN_US must be an integer in [0, 1000000], got '-5'" in bad.stderr


def test_set_num_threads_round_trip():
    before = ops.num_threads()
    try:
        ops.set_num_threads(3)
        assert ops.num_threads() == 3
        with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):  # the number too
            ops.set_num_threads(0)
    finally:
        ops.set_num_threads(before)


def test_refused_threads_leave_the_pool_as_it_was():
    # Thread stacks need address space: under a tight RLIMIT_AS the system refuses the new workers. The
    # call raises, the pool keeps its threads, and the kernels still run on them.
    code = """if True:
        import resource, torch, flashlm.ops as ops
        ops.set_num_threads(2)
        x, w = torch.randn(300, 4096), torch.ones(4096)
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        with open("/proc/self/status") as f:
            size = [int(line.split()[1]) for line in f if line.startswith("VmSize")][0] * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))
        try:
            ops.set_num_threads(64)
        except RuntimeError as e:
            print(e)
        print(ops.num_threads(), bool(torch.allclose(ops.rms_norm(x, w, 1e-6), expected, rtol=1e-5, atol=1e-6)))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("num_threads: could not start 64 threads (") and out[0].endswith("the pool is unchanged")
    assert out[1] == "2 True"
    env = dict(os.environ, FLASHLM_NUM_THREADS="5000")
    bad = subprocess.run([sys.executable, "-c", "import flashlm; flashlm.build_info()"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "FLASHLM_NUM_THREADS must be an integer in [1, 1024], got '5000'" in bad.stderr


def test_cpu_isa_switch():
    before = ops.cpu_isa()
    try:
        ops.set_cpu_isa("scalar")
        assert ops.cpu_isa() == "scalar"
        with pytest.raises(ValueError, match="isa"):
            ops.set_cpu_isa("sse9")
    finally:
        ops.set_cpu_isa(before)


def _dequantize_in_child(queue):
    # numpy for everything but the op: torch's own OpenMP pool is not fork-safe, flashlm's must be.
    import numpy as np
    import torch

    from flashlm import ops

    ops.set_num_threads(3)  # joins the pool's workers: they must be the child's own, not the parent's
    blocks = 65536  # 8 MiB of output: many ranges, so the pool's workers take part
    raw = (np.arange(18 * blocks) % 251).astype(np.uint8)
    raw.reshape(blocks, 18)[:, :2] = [0x00, 0x3C]  # d = 1.0 in every block
    out = ops.dequantize(torch.from_numpy(raw), "Q4_0", (blocks * 32,))
    queue.put(float(out.numpy().astype(np.float64).sum()))


def test_thread_pool_works_in_a_forked_child():
    # A forked child inherits the pool's state but not its threads; the pool must start afresh there.
    import multiprocessing

    ops.set_num_threads(2)
    ops.dequantize(torch.zeros(18 * 4096, dtype=torch.uint8), "Q4_0", (4096 * 32,))  # pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_dequantize_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "child failed or hung"
    result = queue.get(timeout=5)
    expected_queue = ctx.Queue()
    _dequantize_in_child(expected_queue)
    assert result == expected_queue.get(timeout=5)


def test_dtype_table_matches_gguf_py():
    # Every GGML type gguf-py knows has the same id, block size and block bytes in flashlm.
    import gguf

    from flashlm import _C

    ours = {name: (ggml_id, block, nbytes) for name, ggml_id, block, nbytes in _C.dtypes() if ggml_id >= 0}
    for qtype, (block, nbytes) in gguf.GGML_QUANT_SIZES.items():
        if qtype.name == "Q8_1":  # gguf-py says 40 bytes; ggml's block_q8_1 (half d, half s, int8 qs[32]) is 36
            assert ours["Q8_1"] == (qtype.value, 32, 36)
            continue
        assert ours.get(qtype.name) == (qtype.value, block, nbytes), qtype.name
