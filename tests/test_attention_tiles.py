"""Builds and runs tests/cpp/attention_tiles_test.cpp: the CUDA attention kernels' tile arithmetic (which keys
a query tile sees, which query tiles a key tile reaches, masks, clamped cu_seqlens) checked on the host
against the scalar reference's visibility rule."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_attention_tile_arithmetic(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "attention_tiles_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'attention'}",
                    f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "tests" / "cpp" / "attention_tiles_test.cpp"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
