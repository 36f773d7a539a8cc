"""The library's thread pool (csrc/core/thread_pool.cpp): tests/cpp/thread_pool_test.cpp checks its semantics
(every index once, nested and concurrent calls, exceptions, a stuck thread's share taken by the others) at
1 to 64 threads, built from the sources with the library's own error type; run as it is, with polling off
(FLASHLM_SPIN_US=0: workers and caller sleep at once) and on one core (threads descheduled all the time: the
pool's contended mode)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashlm import ops

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool_test(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("pool") / "thread_pool_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "cpp" / "thread_pool_test.cpp"), str(ROOT / "csrc" / "core" / "thread_pool.cpp"),
                    str(ROOT / "csrc" / "core" / "pool_profile.cpp"), str(ROOT / "csrc" / "core" / "error.cpp"), "-o",
                    str(exe), "-ldl"], check=True)
    return exe


@pytest.mark.parametrize("mode", ["default", "no polling", "one core"])
def test_pool_semantics(pool_test, mode):
    cmd, env = [str(pool_test)], dict(os.environ)
    if mode == "no polling":
        env["FLASHLM_SPIN_US"] = "0"
    if mode == "one core":
        if not hasattr(os, "sched_setaffinity"):
            pytest.skip("no CPU affinity on this system")
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd] if shutil.which("taskset") else None
        if cmd is None:
            pytest.skip("no taskset")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("threads", [2, 7])
def test_kernels_match_on_more_threads_than_cores(threads):
    # Through the library: a kernel split over more threads than the machine has gives the one-thread result.
    before = ops.num_threads()
    x, w = torch.randn(1000, 300, dtype=torch.float64).float(), torch.rand(300) + 0.5
    try:
        ops.set_num_threads(1)
        expected = ops.rms_norm(x, w, 1e-6)
        ops.set_num_threads(threads)
        for _ in range(20):
            torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), expected, rtol=0, atol=0)
    finally:
        ops.set_num_threads(before)


@pytest.mark.parametrize("argv0, preset, expected", [
    ("flashlm", None, "PASSIVE"),          # the console script
    ("/usr/bin/flashlm", "ACTIVE", "ACTIVE"),  # the user's setting wins
    ("script.py", None, None),             # a program that imports flashlm keeps OpenMP's default
])
def test_the_command_sets_openmp_passive(argv0, preset, expected):
    # OMP_WAIT_POLICY must be in the environment before torch loads libgomp: set by flashlm's import, for the
    # `flashlm` command alone.
    code = (f"import sys; sys.argv = [{argv0!r}]\nimport flashlm, os, torch\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(expected)]


@pytest.mark.parametrize("orig_argv, argv0, expected", [
    (["python", "-m", "flashlm", "train"], "-m", True),
    (["python3", "-X", "importtime", "-m", "flashlm", "info"], "-m", True),
    (["/usr/bin/flashlm", "train"], "/usr/bin/flashlm", True),
    (["python", "-m", "pytest", "tests"], "-m", False),
    (["python", "train.py"], "train.py", False),
])
def test_which_processes_are_the_command(monkeypatch, orig_argv, argv0, expected):
    import flashlm

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert flashlm._is_the_command() is expected


def test_pool_profile_counts_each_call_sites_jobs(tmp_path):
    # FLASHLM_POOL_PROFILE=<file>: at exit, one row per call site and job size with the number of jobs.
    out = tmp_path / "profile.txt"
    code = ("import torch\nfrom flashlm import ops\nops.set_num_threads(2)\nx, w = torch.randn(64, 4096), torch.ones(4096)\n"
            "for _ in range(7):\n    ops.rms_norm(x, w, 1e-6)\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLASHLM_POOL_PROFILE": str(out)}, check=True,
                   timeout=300)
    rows = [line.split() for line in out.read_text().splitlines() if not line.startswith(("#", "jobs"))]
    assert [r[:2] for r in rows if "rms_norm" in r[-1]] == [["7", "64"]], out.read_text()
