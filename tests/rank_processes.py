"""Starts the ranks of a multi-process test as processes and waits for them (one thread each)."""

import os
import subprocess
import sys

import pytest


def run_processes(script: str, world: int, args, timeout: float = 150) -> list:
    """Runs `python script RANK *args` for each of `world` ranks; returns their stdout. Fails (after killing
    them, with each rank's stderr) when a rank fails or they do not finish within `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHLM_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, str(r), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("\n".join(f"--- rank {r} ---\n{p.communicate()[1][-3000:]}" for r, p in enumerate(procs)))
    for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{err[-5000:]}"
    return [out for out, _ in outputs]
