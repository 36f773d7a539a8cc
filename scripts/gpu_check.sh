#!/usr/bin/env bash
# gpu_check.sh: every CUDA kernel of flashlm built, tested, sanitized and timed on one GPU, in one command of
# under nine minutes (540 s, the build included), with a summary table in $OUT/gpu_summary.md.
#
# Phases, each with its own time limit and printed elapsed time; a phase that fails or runs out of time never
# stops the later ones, and whatever ran is summarised:
#   env        the GPU, Python, torch, nvcc, compute-sanitizer
#   wheels     what the machine lacks (gguf), from build/gpu-wheels (scripts/gpu_wheels.sh, run here), into a
#              folder on PYTHONPATH
#   build      flashlm for sm_90a only (CMAKE_CUDA_ARCHITECTURES=90a-real), all cores, the image's own torch
#              (--no-build-isolation); the module is copied beside python/flashlm as for a CPU build
#   tests      every CUDA-marked test (pytest -m cuda), no -x, a per-test timeout; junit XML and log to $OUT.
#              Among them tests/test_mesh_cuda.py's CUDA-mesh steps (flashlm train at TP 2, PP 2, DP 2 ZeRO-3,
#              CP 2 against the CPU mesh; DP 2 x TP 2 ZeRO-3), one GPU per rank: on a machine with fewer GPUs
#              than a case's ranks (one GPU: all of them) those cases skip, and the log says so
#   sanitizer  scripts/gpu_sanitize.py: memcheck over every kernel, racecheck over those with shared memory
#              or warp shuffles, one verdict per kernel
#   bench      bench/compare_{attention,int_gemm,gguf_matmul,kvcache,dequant}.py --device cuda, short runs,
#              each with its peer and its ceiling measured in the same run
#   summary    scripts/gpu_summary.py -> $OUT/gpu_summary.md (kernel | tests | sanitizer | vs peer | ceiling)
#
# Usage (from the repository root):
#   bash scripts/gpu_check.sh              # on the GPU machine; results under $OUT
#   bash scripts/gpu_check.sh --dry-run    # here, without a GPU: builds with nvcc, collects the CUDA tests,
#                                          # installs the wheels into a scratch folder, runs the sanitizer
#                                          # driver's calls on the CPU kernels, checks each bench's arguments
#                                          # and imports, and writes a summary marking everything "not run"
# Environment: OUT (default build/gpu-out), GPU_CHECK_SAMPLE=N (run every Nth CUDA test, in collection order:
# a deterministic sample when the full matrix does not fit), GPU_CHECK_JOBS (pytest-xdist workers, default 4).
# $OUT receives eight files and no folders, few enough to bring back from a remote machine: gpu_summary.md,
# gpu_check.log, build.log, gpu_tests.log, gpu_tests.xml, sanitizer.log, sanitizer.json, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

out=${OUT:-$root/build/gpu-out}
work=${GPU_CHECK_WORK:-/tmp/flashlm-gpu-check}
sample=${GPU_CHECK_SAMPLE:-1}
jobs=${GPU_CHECK_JOBS:-4}
mkdir -p "$out" "$work"
rm -f "$work"/phases.tsv \
  "$out"/{gpu_summary.md,build.log,gpu_tests.log,gpu_tests.xml,sanitizer.log,sanitizer.json,bench.log}
exec > >(tee "$out/gpu_check.log") 2>&1
tee_pid=$!

py=python3
pyver=$($py -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
start=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$root/python:$work/site${PYTHONPATH:+:$PYTHONPATH}"

# Every phase but the summary ends by $deadline (500 s on the GPU; the summary may take 20 s more, and
# `timeout`'s grace after a signal is 10 s: under 540 s in all; the dry run here builds on 2 cores and has
# longer). Each phase's limit is the smaller of its cap and what is left once the
# later phases' reserve is kept back, so that a slow build or test run never takes the benches' time.
budget=$([ $dry = 1 ] && echo 1500 || echo 500)
deadline=$((start + budget))

# phase NAME CAP_S RESERVE_S CMD...: runs CMD under `timeout`, prints its elapsed time and records
# name/status/seconds for the summary. CMD sees its limit as $PHASE_LIMIT.
phase() {
  local name=$1 cap=$2 reserve=$3 t0 rc status
  shift 3
  t0=$(date +%s)
  PHASE_LIMIT=$((deadline - t0 - reserve))
  [ $PHASE_LIMIT -gt "$cap" ] && PHASE_LIMIT=$cap
  if [ $PHASE_LIMIT -lt 5 ]; then
    printf '%s\t%s\t%s\n' "$name" "not run (no time left)" 0 >> "$work/phases.tsv"
    echo "=== $name: not run (no time left)"
    return 0
  fi
  echo "=== $name (limit ${PHASE_LIMIT}s; $((t0 - start))s into the check)"
  export PHASE_LIMIT
  # timeout signals the whole process group (pytest, pip, the benches); the functions run in a child bash.
  timeout -s INT -k 10 "$PHASE_LIMIT" bash -c '"$@"' _ "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ $dry = 1 ] && [ $rc = 0 ] && status="ok (dry run)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$work/phases.tsv"
  echo "=== $name: $status in $(($(date +%s) - t0))s"
  return 0
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
  $py -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
                                    torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  $py -c 'import nanobind, scikit_build_core as s; print("nanobind", nanobind.__version__, "scikit-build-core", s.__version__)'
  nvcc --version | tail -1
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  nproc
}

build() {
  # Here (dry run) the module stays in build/: the worktree keeps its own CPU build.
  local site=$root/build/gpu-site-py$pyver t0=$(date +%s)
  CMAKE_ARGS="-DFLASHLM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $py -m pip install --no-build-isolation --no-deps --no-index --upgrade -q --target "$site" \
      -Cbuild-dir="build/gpu-py$pyver" . > "$out/build.log" 2>&1
  local rc=$?
  tail -5 "$out/build.log"
  echo "build: exit $rc after $(($(date +%s) - t0))s ($(nproc) cores)"
  [ $rc = 0 ] || return $rc
  if [ $dry = 0 ]; then
    cp -r "$site"/flashlm/_C*.so "$site"/flashlm/lib "$site"/flashlm/include python/flashlm/ || return 1
  fi
  ls "$site"/flashlm/_C*.so
}

wheels() {
  local whl=(build/gpu-wheels/*.whl)
  [ -e "${whl[0]}" ] || { echo "no wheels in build/gpu-wheels: run scripts/gpu_wheels.sh and bring that folder"; return 1; }
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "${whl[@]}" || return 1
  $py -c 'import gguf, numpy, pytest; print("gguf", gguf.__file__)' || return 1
  $py -c 'import pytest_timeout' 2>/dev/null && echo "pytest-timeout: yes" || echo "pytest-timeout: no (no per-test limit)"
  $py -c 'import xdist' 2>/dev/null && echo "pytest-xdist: yes" || echo "pytest-xdist: no (one process)"
}

collect() {
  $py -m pytest -p no:cacheprovider --collect-only -q -m cuda tests > "$work/collected.txt" 2>&1
  local rc=$?
  grep -c '::' "$work/collected.txt" | sed 's/^/CUDA tests collected: /'
  tail -1 "$work/collected.txt"
  return $rc
}

tests() {
  local args=(-p no:cacheprovider -v -m cuda --junitxml="$out/gpu_tests.xml" -o junit_family=xunit1)
  $py -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout 60)
  [ "$jobs" -gt 1 ] && $py -c 'import xdist' 2>/dev/null && args+=(-n "$jobs")
  if [ "$sample" -gt 1 ]; then
    mapfile -t ids < <(grep '::' "$work/collected.txt" | awk -v n="$sample" 'NR % n == 1')
    echo "sample: every ${sample}th of $(grep -c '::' "$work/collected.txt") CUDA tests: ${#ids[@]}"
  else
    ids=(tests)
  fi
  local gpus
  gpus=$($py -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  [ "${gpus:-0}" -lt 2 ] && echo "tests: ${gpus:-0} GPU(s): the multi-GPU cases (tests/test_mesh_cuda.py's CUDA" \
    "mesh, tests/test_dist.py's NCCL ring) skip; they need one GPU per rank"
  # Threads per worker: the workers' CPU references share the cores.
  local threads=$(($(nproc) / jobs > 0 ? $(nproc) / jobs : 1))
  FLASHLM_NUM_THREADS=$threads OMP_NUM_THREADS=$threads $py -m pytest "${args[@]}" "${ids[@]}" > "$out/gpu_tests.log" 2>&1
  local rc=$?
  tail -3 "$out/gpu_tests.log"
  return $rc
}

sanitizer() {
  if [ $dry = 1 ]; then
    $py scripts/gpu_sanitize.py run --device cpu || return 1
    $py scripts/gpu_sanitize.py check --dry-run --json "$out/sanitizer.json"
  else
    $py scripts/gpu_sanitize.py check --budget $((PHASE_LIMIT - 10)) --json "$out/sanitizer.json" \
      --log "$out/sanitizer.log"
  fi
}

# bench_one NAME ARGS...: appends the run to bench.log under a header the summary reads. In a dry run the
# script must stop at its "no CUDA device" check, after parsing its arguments and importing everything.
bench_one() {
  local name=$1 rc
  shift
  echo "### bench $name: $*" >> "$out/bench.log"
  $py "bench/compare_$name.py" --device cuda "$@" > "$work/bench_$name.txt" 2>&1
  rc=$?
  cat "$work/bench_$name.txt" >> "$out/bench.log"
  echo "### end $name: exit $rc" >> "$out/bench.log"
  if [ $dry = 1 ]; then
    local said=$work/bench_$name.txt
    if [ $rc = 1 ] && grep -q -- '--device cuda' "$said" && ! grep -q Traceback "$said"; then
      echo "bench $name: arguments and imports ok (stops at: $(tail -1 "$work/bench_$name.txt"))"
      return 0
    fi
    echo "bench $name: FAILED the argument check:"; cat "$work/bench_$name.txt"; return 1
  fi
  tail -n +1 "$work/bench_$name.txt" | grep -E '^\|' | head -40
  return $rc
}

export -f env_info build wheels collect tests sanitizer bench_one
export dry out work py pyver root sample jobs
[ $dry = 1 ] && echo "gpu_check: dry run (no GPU): nothing below times or checks a CUDA kernel"
# The build: about 60 s expected on 16 cores (sm_90a alone here: 213 s of compile steps, 117 s on 2 idle
# cores; its longest units, gguf_matmul_cuda.cu and paged_prefill_cuda.cu, take 20 s each); the dry run
# builds on 2 shared cores.
build_cap=$([ $dry = 1 ] && echo 900 || echo 180)
#     name               cap reserve (for the phases after it)
phase env                 20 470 env_info
phase wheels              20 450 wheels
phase build     "$build_cap" 290 build
phase collect             40 260 collect
if [ $dry = 0 ]; then
  phase tests            240 160 tests
else
  printf 'tests\tnot run (dry run)\t0\n' >> "$work/phases.tsv"
fi
phase sanitizer          110 100 sanitizer
phase bench_attention     35  70 bench_one attention --dtype bf16 --seqlens 1024,4096 --head-dims 64,128 \
                                                       --reps 10 --warmup 2
phase bench_int_gemm      25  50 bench_one int_gemm --reps 10
phase bench_gguf_matmul   25  30 bench_one gguf_matmul --types Q4_0,Q8_0,Q4_K,Q6_K --shapes 4096x4096,4096x11008 \
                                                         --reps 10 --warmup 2
phase bench_kvcache       25  15 bench_one kvcache --dtype bf16 --batches 1,16 --contexts 2048,8192 --reps 10
phase bench_dequant       30   0 bench_one dequant --elements 4194304 --types Q4_0,Q8_0,Q4_K,Q6_K --reps 5 --warmup 1
summary_args=(--phases "$work/phases.tsv" --collected "$work/collected.txt" --bench "$out/bench.log"
              --sanitizer "$out/sanitizer.json" --out "$out/gpu_summary.md" --sample "$sample")
[ $dry = 1 ] && summary_args+=(--dry-run) || summary_args+=(--tests-log "$out/gpu_tests.log")
phase summary 20 -20 $py scripts/gpu_summary.py "${summary_args[@]}"
echo "gpu_check: $(($(date +%s) - start))s in all; summary: $out/gpu_summary.md"
cat "$out/gpu_summary.md"
# Exit status: 1 when a phase failed, ran out of time or was not run.
failed=$(awk -F'\t' '$2 !~ /^ok/ && $2 != "not run (dry run)"' "$work/phases.tsv" | wc -l)
echo "gpu_check: $failed phases not ok"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null || sleep 1  # gpu_check.log complete before the results are collected
[ "$failed" = 0 ]
