"""Builds and runs the host-only C++ checks of the CUDA kernels' index arithmetic: tests/cpp/attention_tiles_test.cpp
(the attention kernels' tiles: which keys a query tile sees, which query tiles a key tile reaches, masks,
clamped cu_seqlens, against the scalar reference's visibility rule) and tests/cpp/paged_tiles_test.cpp (the
paged KV-cache kernels: clamped sequence lengths, block-table slots and slot mappings, the decode
split/warp/tile schedule and its masks)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["attention_tiles_test", "paged_tiles_test"])
def test_tile_arithmetic(tmp_path, name):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / name
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'attention'}",
                    f"-I{ROOT / 'csrc' / 'kvcache'}", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "cpp" / f"{name}.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
