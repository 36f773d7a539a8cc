#!/usr/bin/env python3
"""gpu_summary: the table that scripts/gpu_check.sh ends with, one row per CUDA kernel:

  kernel | tests passed/failed | sanitizer | figure vs peer | share of ceiling

from what the check's phases left: the collected CUDA test ids, pytest's -v log (one outcome line per test;
it survives a run cut short, unlike the junit XML), gpu_sanitize.py's verdicts (JSON) and the benches' tables
(bench.log, one section per script). A phase that did not run or was cut short says so in its cells. Also
writes the rows in bench/RESULTS-GPU.md's form (kernel | last run | device | result | figure).

  python scripts/gpu_summary.py --phases P --collected C --tests-log L --sanitizer S --bench B --out $OUT/gpu_summary.md
"""

import argparse
import datetime
import json
import os
import re
import statistics

# kernel, the CUDA test ids it owns (first match wins), its gpu_sanitize.py names, its bench:
# (script, {column: required value, or prefix*}, ratio column (peer time / flashlm time), ceiling-share column).
KERNELS = [
    ("attention forward (v2, v1)", r"tests/test_attention(_kernels)?\.py::(?!\S*backward)",
     ["attention_fwd", "attention_fwd_v1"], ("attention", {"pass": "fwd"}, "x torch", "% peak")),
    ("attention backward", r"tests/test_attention(_kernels)?\.py::\S*backward",
     ["attention_bwd"], ("attention", {"pass": "fwd+bwd"}, "x torch", "% peak")),
    ("paged KV write", r"tests/test_kvcache\.py::\S*write_kv", ["write_kv_cache"], None),
    ("paged decode", r"tests/test_kvcache\.py::\S*(decode|kvcache|nan_slot|cu_seqlens)", ["paged_decode"],
     ("kvcache", {}, "x torch", "of copy")),
    ("paged prefill", r"tests/test_kvcache\.py::\S*prefill", ["paged_prefill"], None),
    ("int8 GEMM", r"tests/test_int_gemm\.py::\S*(int8|nan_activation)", ["int8_gemm"],
     ("int_gemm", {"case": "int8*"}, "x peer", "% ceiling")),
    ("int4 GEMM", r"tests/test_int_gemm\.py::\S*int4", ["int4_gemm"],
     ("int_gemm", {"case": "int4*"}, "x peer", "% ceiling")),
    ("GGUF matmul", r"tests/test_gguf_matmul\.py::", ["gguf_gemv", "gguf_mma"],
     ("gguf_matmul", {}, "x torch", "% copy")),
    ("dequantize", r"tests/test_dequantize\.py::", ["dequantize"], ("dequant", {}, "x gguf-py", "% copy")),
    ("RMSNorm", r"tests/test_norm\.py::", ["rms_norm"], None),
    ("SiLU-mul", r"tests/test_activation\.py::", ["silu_mul"], None),
    ("AdamW", r"tests/test_adamw\.py::", ["adamw"], None),
    ("ring reduction (reduce_add)", r"tests/test_dist\.py::\S*reduce_add", ["reduce_add"], None),
    ("NCCL transport", r"tests/test_dist\.py::\S*nccl", [], None),
    ("NCCL mesh groups (2+ GPUs)", r"tests/test_mesh_cuda\.py::", [], None),
]
OTHER = "other CUDA tests"
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
# pytest -v: "tests/x.py::t[id] PASSED  [ 5%]"; with pytest-xdist: "[gw0] [ 5%] PASSED tests/x.py::t[id]".
PLAIN = re.compile(r"^(tests/\S+?::.+?) (" + "|".join(OUTCOMES) + r")\b")
XDIST = re.compile(r"\b(" + "|".join(OUTCOMES) + r") (tests/\S+?::\S.*?)\s*$")


def kernel_of(test_id):
    for name, pattern, _, _ in KERNELS:
        if re.match(pattern, test_id):
            return name
    return OTHER


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except (OSError, TypeError):
        return None


def test_outcomes(log):
    """{test id: outcome} from pytest -v output; a test's last line wins (an ERROR in teardown after PASSED)."""
    outcomes = {}
    for line in (log or "").splitlines():
        m = PLAIN.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
            continue
        m = XDIST.search(line)
        if m:
            outcomes[m.group(2)] = m.group(1)
    return outcomes


def bench_tables(text):
    """{script: (exit code or None, [ {column: cell} ], last line of its output)} from bench.log."""
    out, name, lines = {}, None, []
    for line in (text or "").splitlines():
        if line.startswith("### bench "):
            name, lines = line[len("### bench "):].split(":")[0], []
        elif line.startswith("### end ") and name:
            rc = int(line.rsplit("exit", 1)[1])
            table = [l for l in lines if l.startswith("|")]
            rows = []
            if len(table) >= 3:
                header = [c.strip() for c in table[0].strip("|").split("|")]
                rows = [dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in table[2:]]
            last = next((l for l in reversed(lines) if l.strip()), "")
            out[name] = (rc, rows, last)
            name = None
        elif name:
            lines.append(line)
    return out


def number(cell):
    try:
        return float(cell.rstrip("%").strip())
    except (AttributeError, ValueError):
        return None


def spread(values, fmt, unit=""):
    values = [v for v in values if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return f"{values[0]:{fmt}}{unit}"
    return (f"{statistics.median(values):{fmt}}{unit} median ({min(values):{fmt}}-{max(values):{fmt}}{unit}, "
            f"{len(values)} cases)")


def bench_cells(spec, benches, phases, dry):
    if spec is None:
        return "no bench in the check", "-"
    script, where, ratio_col, share_col = spec
    if dry:
        return "not run (dry run)", "not run (dry run)"
    if script not in benches:
        why = phases.get(f"bench_{script}", "not run")
        return f"not run ({why})", "-"
    rc, rows, last = benches[script]
    rows = [r for r in rows if all(r.get(k, "").startswith(v[:-1]) if v.endswith("*") else r.get(k) == v
                                   for k, v in where.items())]
    if rc != 0 or not rows:
        return f"failed (exit {rc}): {last[:100]}", "-"
    ratio = spread([number(r.get(ratio_col)) for r in rows], ".2f")
    share = spread([number(r.get(share_col)) for r in rows], ".0f", "%")
    return f"{ratio} x peer" if ratio else "-", f"{share} ({share_col})" if share else "-"


def sanitizer_cell(names, verdicts, phases, dry):
    if not names:
        return "not sanitized (NCCL)"
    if not verdicts:
        return "not run (dry run)" if dry else f"not run ({phases.get('sanitizer', 'no verdicts')})"
    every = {verdicts.get(tool, {}).get(n) for tool in ("memcheck", "racecheck") for n in names} - {None}
    if not every:
        return "not run (no verdict)"
    if len(every) == 1:
        return every.pop()
    parts = []
    for n in names:
        tools = [f"{tool} {verdicts[tool][n]}" for tool in ("memcheck", "racecheck") if n in verdicts.get(tool, {})]
        parts.append((f"{n}: " if len(names) > 1 else "") + ", ".join(tools))
    return "; ".join(parts)


def tests_cell(name, collected, outcomes, dry, sample, tests_status):
    ids = [t for t in collected if kernel_of(t) == name]
    if not ids:
        return "none collected"
    if dry:
        return f"{len(ids)} collected (not run: dry run)"
    got = [outcomes[t] for t in ids if t in outcomes]
    counts = {o: got.count(o) for o in OUTCOMES if got.count(o)}
    text = f"{counts.get('PASSED', 0)} passed / {counts.get('FAILED', 0) + counts.get('ERROR', 0)} failed"
    extra = [f"{counts[o]} {o.lower()}" for o in ("SKIPPED", "XFAIL", "XPASS") if o in counts]
    text += (", " + ", ".join(extra) if extra else "") + f" of {len(ids)}"
    if len(got) < len(ids):
        text += f" ({len(ids) - len(got)} not run: " + (f"1 in {sample} sampled" if sample > 1 else tests_status) + ")"
    return text


def device_name(dry):
    if dry:
        return "none (dry run)"
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU seen"
    except Exception as e:  # noqa: BLE001 - the summary is written whatever broke
        return f"unknown ({type(e).__name__})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phases", required=True, help="name<TAB>status<TAB>seconds per phase")
    ap.add_argument("--collected", required=True, help="pytest --collect-only -q -m cuda output")
    ap.add_argument("--tests-log", default=None, help="pytest -v output of the CUDA tests")
    ap.add_argument("--sanitizer", default=None, help="gpu_sanitize.py check --json output")
    ap.add_argument("--bench", default=None, help="bench.log of gpu_check.sh")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample", type=int, default=1, help="1 in N CUDA tests ran (GPU_CHECK_SAMPLE)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    phase_rows = [line.split("\t") for line in (read(args.phases) or "").splitlines() if line.count("\t") == 2]
    phases = {name: status for name, status, _ in phase_rows}
    collected = [line.strip() for line in (read(args.collected) or "").splitlines() if "::" in line]
    outcomes = test_outcomes(read(args.tests_log))
    verdicts = json.loads(read(args.sanitizer) or "{}") if args.sanitizer else {}
    benches = bench_tables(read(args.bench))
    tests_status = phases.get("tests", "not run")
    if tests_status == "ok" or tests_status.startswith("failed"):
        tests_status = "not in the log"
    device, date = device_name(args.dry_run), datetime.date.today().isoformat()

    rows, results = [], []
    for name, _, san_names, spec in KERNELS + [(OTHER, None, [], None)]:
        tests = tests_cell(name, collected, outcomes, args.dry_run, args.sample, tests_status)
        if name == OTHER and tests == "none collected":
            continue
        san = sanitizer_cell(san_names, verdicts, phases, args.dry_run) if name != OTHER else "-"
        figure, share = bench_cells(spec, benches, phases, args.dry_run)
        rows.append([name, tests, san, figure, share])
        result = "not run (dry run)" if args.dry_run else f"tests {tests}; sanitizer {san}"
        results.append([name, date, device, result, f"{figure}; {share}" if spec else "-"])

    failed = sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR"))
    lines = [f"# flashlm GPU check, {date}", "",
             f"Device: {device}. " + ("Dry run: nothing ran on a GPU. " if args.dry_run else "") +
             f"CUDA tests collected: {len(collected)}" +
             (f"; run: 1 in {args.sample}, every {args.sample}th in collection order (GPU_CHECK_SAMPLE)"
              if args.sample > 1 else "") + ".", "",
             "| kernel | tests passed/failed | sanitizer | figure vs peer | share of ceiling |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| phase | status | seconds |", "|---|---|---:|"]
    lines += [f"| {n} | {s} | {t} |" for n, s, t in phase_rows]
    lines += ["", f"Total: {sum(int(t) for _, _, t in phase_rows if t.isdigit())} s."]
    if failed:
        lines += ["", f"Failed tests ({len(failed)}):", ""] + [f"- `{t}`" for t in failed[:60]]
        if len(failed) > 60:
            lines.append(f"- ... and {len(failed) - 60} more (gpu_tests.log)")
    lines += ["", "Rows for bench/RESULTS-GPU.md:", "", "| kernel | last run | device | result | figure |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in results]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"gpu_summary: {args.out} ({len(rows)} kernels, {len(collected)} CUDA tests collected, "
          f"{len(outcomes)} outcomes, {len(failed)} failed)")


if __name__ == "__main__":
    main()
