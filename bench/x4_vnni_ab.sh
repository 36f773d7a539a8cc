#!/bin/sh
# bench/x4_vnni_ab.cpp: the regrouped VNNI kernels of a base revision (default HEAD) against the working tree's.
# Usage (from the repository root): bench/x4_vnni_ab.sh [base revision] [turns]
set -eu
base=${1:-HEAD}
turns=${2:-15}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
flags="-O3 -DNDEBUG -std=c++17 -ffp-contract=off -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vnni -w
       -DFLASHLM_HAVE_AVX2_KERNELS -DFLASHLM_HAVE_AVX512VNNI_KERNELS -Icsrc/include"
for side in a b; do
  src=csrc/gemm
  if [ "$side" = a ]; then  # the base revision's folder, its includes resolved as in the tree
    mkdir -p "$dir/base/csrc/gemm"
    ln -s "$PWD/csrc/core" "$PWD/csrc/gguf" "$dir/base/csrc/"
    for f in repack_x4_vnni.cpp repack_x4k_vnni.cpp gguf_matmul_kernels.h kernels_avx2_common.h shared_gguf_matmul.h; do
      git show "$base:csrc/gemm/$f" > "$dir/base/csrc/gemm/$f"
    done
    src=$dir/base/csrc/gemm
  fi
  for f in repack_x4_vnni repack_x4k_vnni; do
    g++ $flags -Dflashlm=flashlm_$side -c "$src/$f.cpp" -o "$dir/$side.$f.o"
  done
  g++ $flags -Dflashlm=flashlm_$side -DX4_AB_SIDE=$side -I"$src" -c bench/x4_vnni_ab.cpp -o "$dir/$side.wrap.o"
done
g++ -O2 -std=c++17 bench/x4_vnni_ab.cpp "$dir"/*.o -o "$dir/x4_vnni_ab"
"$dir/x4_vnni_ab" "$turns"
