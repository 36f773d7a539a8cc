"""Runs the processes of a multi-process test (ranks, pipeline stages) and fails the test, with each one's
stderr, when one fails or they do not all finish in time (they are killed then)."""

import os
import subprocess
import sys

import pytest

# One thread per process: the tests start several on a machine of few cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}


def run_processes(script: str, args_per_process: list, timeout: float, what: str = "rank") -> list:
    """Starts `python script *args` for each args list at once; returns each one's stdout."""
    env = {**os.environ, **ONE_THREAD}
    procs = [subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in args_per_process]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"not finished within {timeout} s\n" +
                    "\n".join(f"--- {what} {i} ---\n{p.communicate()[1][-3000:]}" for i, p in enumerate(procs)))
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"{what} {i} failed (exit {p.returncode}):\n{err[-5000:]}"
    return [out for out, _ in outputs]
