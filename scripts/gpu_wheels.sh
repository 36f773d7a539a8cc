#!/usr/bin/env bash
# gpu_wheels.sh: downloads, here, the Python packages that the CUDA tests and GPU benchmarks need and the lent
# GPU machine lacks, as Python 3.12 manylinux x86-64 wheels, into build/gpu-wheels (git-ignored). The machine
# has no network; scripts/gpu_check.sh installs them there from that folder (carried along with the tree).
#
# What the CUDA-marked tests and bench/compare_*.py import beyond that machine's image (torch, numpy, pytest,
# pytest-timeout, pytest-xdist, tqdm, pyyaml, requests are there): gguf, llama.cpp's Python package (also a
# dependency of flashlm itself), pure Python; its own needs (numpy, pyyaml, requests, tqdm) are in the image.
# The image's build backend (scikit-build-core, nanobind) builds flashlm there; gpu_check.sh prints their
# versions. Should one prove too old, bring it too: bash scripts/gpu_wheels.sh gguf==0.19.0 nanobind==3.1.0
#
#   bash scripts/gpu_wheels.sh            # the pinned list below
#   bash scripts/gpu_wheels.sh NAME==VER  # others instead
set -euo pipefail
cd "$(dirname "$0")/.."
dest=build/gpu-wheels
wheels=("$@")
[ ${#wheels[@]} -gt 0 ] || wheels=(gguf==0.19.0)
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -l "$dest"
du -sh "$dest"
