"""The GPU check's own logic, which runs where there is no GPU: scripts/gpu_sanitize.py's calls (made on the CPU
kernels) and its reading of sanitizer output, and scripts/gpu_summary.py's reading of pytest and bench output."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_sanitize  # noqa: E402
import gpu_summary  # noqa: E402


def test_sanitizer_driver_calls_every_kernel_on_the_cpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_sanitize.py"), "run", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ended = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith(gpu_sanitize.END)]
    assert ended == list(gpu_sanitize.KERNELS), proc.stdout


def test_sanitizer_reports_are_laid_at_the_running_kernel():
    out = "\n".join([
        "========= COMPUTE-SANITIZER",
        "gpu_sanitize: begin setup", "gpu_sanitize: end setup 0.10s",
        "gpu_sanitize: begin a", "gpu_sanitize: end a 0.01s",
        "gpu_sanitize: begin b",
        "========= Invalid __global__ read of size 4 bytes",
        "=========     at flashlm::kernel+0x10",
        "gpu_sanitize: end b 0.01s",
        "gpu_sanitize: begin c",
        "gpu_sanitize: c raised RuntimeError: bad",
        "gpu_sanitize: begin d",
        "========= ERROR SUMMARY: 1 error",
    ])
    got = gpu_sanitize.verdicts(out, ["a", "b", "c", "d", "e"])
    assert got["a"] == "clean" and got["b"].startswith("1 reports (first: Invalid __global__ read"), got
    assert got["c"] == "raised RuntimeError: bad" and got["d"] == "died (no end marker)", got
    assert got["e"] == "not reached" and "setup" not in got, got
    cut = gpu_sanitize.verdicts(out, ["d", "e"], timed_out=True)
    assert (cut["d"], cut["e"]) == ("timed out", "not run (time)"), cut


def test_summary_reads_tests_sanitizer_and_benches(tmp_path, monkeypatch):
    ids = ["tests/test_norm.py::test_against_float64[cuda-x]", "tests/test_norm.py::test_opcheck[cuda]",
           "tests/test_int_gemm.py::test_int4_gemm[cuda-y]", "tests/test_adamw.py::test_narrow_params_against_float64"]
    (tmp_path / "collected.txt").write_text("\n".join(ids) + "\n\n4/9 tests collected\n")
    (tmp_path / "tests.log").write_text(
        f"{ids[0]} PASSED [ 25%]\n[gw1] [ 50%] FAILED {ids[1]}\n[gw0] [ 75%] PASSED {ids[2]}\n")
    (tmp_path / "phases.tsv").write_text("build\tok\t61\ntests\ttimed out\t240\nbench_int_gemm\tok\t20\n")
    (tmp_path / "sanitizer.json").write_text(json.dumps(
        {"memcheck": {"rms_norm": "clean", "int4_gemm": "clean"}, "racecheck": {"rms_norm": "2 reports (first: x)"}}))
    (tmp_path / "bench.log").write_text("\n".join([
        "### bench int_gemm: --reps 10", "memory bandwidth: 3000 GB/s",
        "| case | x peer | % ceiling |", "|---|---:|---:|",
        "| int4 GEMV | 1.50 | 80 |", "| int4 GEMM | 0.50 | 40 |", "| int8 GEMM | 2.00 | 120 |",
        "### end int_gemm: exit 0"]))
    out = tmp_path / "summary.md"
    monkeypatch.setattr(sys, "argv", [
        "gpu_summary.py", "--phases", str(tmp_path / "phases.tsv"), "--collected", str(tmp_path / "collected.txt"),
        "--tests-log", str(tmp_path / "tests.log"), "--sanitizer", str(tmp_path / "sanitizer.json"),
        "--bench", str(tmp_path / "bench.log"), "--out", str(out)])
    gpu_summary.main()
    text = out.read_text()
    table = text[text.index("| kernel | tests"):].split("\n\n")[0].splitlines()[2:]  # the first table's rows
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in table)}
    assert rows["RMSNorm"][:2] == ["1 passed / 1 failed of 2", "memcheck clean, racecheck 2 reports (first: x)"], rows
    assert rows["int4 GEMM"][0] == "1 passed / 0 failed of 1", rows
    assert rows["int4 GEMM"][2:4] == ["1.00 median (0.50-1.50, 2 cases) x peer",
                                      "60% median (40-80%, 2 cases) (% ceiling)"], rows
    assert rows["AdamW"][0] == "0 passed / 0 failed of 1 (1 not run: timed out)", rows
    assert rows["AdamW"][1:3] == ["not run (no verdict)", "no bench in the check"], rows
    assert "`tests/test_norm.py::test_opcheck[cuda]`" in text


FAKE_SANITIZER = """#!/usr/bin/env bash
# compute-sanitizer's stand-in: runs the driver on the CPU kernels, reports an invalid read inside int8_gemm,
# and dies inside rms_norm the first time.
while [[ "$1" == --* ]]; do shift 2; done
"$@" --device cpu | while IFS= read -r line; do
  echo "$line"
  [[ $line == "gpu_sanitize: begin int8_gemm" ]] && echo "========= Invalid __global__ read of size 4 bytes"
  if [[ $line == "gpu_sanitize: begin rms_norm" && ! -e $FAKE_DIED ]]; then touch "$FAKE_DIED"; exit 1; fi
done
echo "========= ERROR SUMMARY: 1 error"
"""


def test_sanitizer_check_goes_on_after_a_kernel_that_broke_the_run(tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_DIED=str(tmp_path / "died"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_sanitize.py"), "check", "--budget", "250",
                           "--json", str(tmp_path / "v.json"), "--log", str(tmp_path / "log")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["memcheck"]["rms_norm"] == "died (no end marker)", got
    assert got["memcheck"]["int8_gemm"].startswith("1 reports (first: Invalid __global__ read"), got
    # The kernels after rms_norm ran in a second memcheck run; racecheck took the shared-memory ones only.
    assert [got["memcheck"][n] for n in ("silu_mul", "adamw", "reduce_add")] == ["clean"] * 3, got
    assert set(got["racecheck"]) == {n for n, (_, shared) in gpu_sanitize.KERNELS.items() if shared}, got
    assert (tmp_path / "log").read_text().count("$ compute-sanitizer --tool memcheck") == 2
