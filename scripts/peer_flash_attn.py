#!/usr/bin/env python3
"""peer_flash_attn: flash-attn's own test suite (its tests/test_flash_attn.py, which the user supplies) run against
flashlm's drop-in interface on the CPU, and a table of what passed, by test function.

    PYTHONPATH=python python scripts/peer_flash_attn.py --tests PATH/test_flash_attn.py --sample 1200 --seed 0

The suite is written for a CUDA GPU, so it is changed before it runs, and every change is printed with the result:
its device strings point at the CPU, float16 is read as bfloat16 (flashlm's CPU kernels take float32/bfloat16, and
the suite's torch baseline then runs in the same dtype), its GPU capability and memory queries get fixed answers,
and `import flash_attn` finds scripts/flash_attn_shim (flashlm's functions under flash-attn's names, plus plain
torch versions of the padding and rotary helpers the suite uses as references). Sequence lengths, shapes,
tolerances and assertions are unchanged. The suite has ~100,000 parametrizations, so a deterministic sample of
them runs (each test function gets at least a few), and each case is stopped after --timeout seconds.
--features alibi,dropout,leftpad samples only cases where one of those is on. Needs pytest and einops.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn_shim")

# The cases each --features name selects, by the suite's parameter names.
FEATURES = {
    "alibi": lambda params: params.get("alibi") is True,
    "dropout": lambda params: params.get("dropout_p", 0.0) > 0.0,
    "leftpad": lambda params: params.get("has_leftpad") is True,
}

# Every test function gets at least this many cases (or all it has), so that the small ones are not lost among
# test_flash_attn_output's ~60,000.
MIN_PER_FUNCTION = 4


def suite_patches(host_memory):
    """(what it does, regex, replacement), applied in order to the suite's source."""
    gib = host_memory / 2**30
    return [
        ("GPU capability queries answer (8, 0), an A100: the suite's sm8x head-dim rules follow A100's",
         r'torch\.cuda\.get_device_capability\("cuda"\)', "(8, 0)"),
        (f"GPU memory queries answer this host's memory ({gib:.0f} GiB): the suite skips its largest references "
         "on 16 GiB cards", r'torch\.cuda\.get_device_properties\("cuda"\)\.total_memory', str(host_memory)),
        ('device "cuda" -> "cpu"', r'(["\'])cuda\1', '"cpu"'),
        ("dtype lists [float16, bfloat16] -> [bfloat16] (float16 is read as bfloat16, so they would be the same "
         "cases)", r"\[torch\.float16, torch\.bfloat16\]", "[torch.bfloat16]"),
        ("torch.float16 -> torch.bfloat16 everywhere else", r"torch\.float16\b", "torch.bfloat16"),
    ]


def patch_suite(source, patches):
    """The patched source and, per patch, how many places it changed."""
    counts = []
    for _, pattern, replacement in patches:
        source, n = re.subn(pattern, replacement, source)
        counts.append(n)
    return source, counts


def function_of(nodeid):
    """'path::test_x[a-b]' -> 'test_x'."""
    return nodeid.split("::")[-1].split("[")[0]


def sample_cases(nodeids, n, seed, min_per_function=MIN_PER_FUNCTION):
    """A deterministic sample of n of the ids (all of them if n >= len), in their given order: each function
    first gets min(min_per_function, its count) (fewer if n cannot give every function that many), then the
    rest are drawn uniformly from what is left. Depends only on (nodeids, n, seed)."""
    if n >= len(nodeids):
        return list(nodeids)
    rng = random.Random(seed)
    by_function = {}
    for i, nodeid in enumerate(nodeids):
        by_function.setdefault(function_of(nodeid), []).append(i)
    floor = min(min_per_function, n // max(len(by_function), 1))
    chosen = set()
    for name in sorted(by_function):
        indices = by_function[name]
        chosen.update(rng.sample(indices, min(floor, len(indices))))
    rest = [i for i in range(len(nodeids)) if i not in chosen]
    chosen.update(rng.sample(rest, n - len(chosen)))
    return [nodeids[i] for i in sorted(chosen)]


def parse_features(text):
    names = [name for name in text.split(",") if name] if text else []
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise ValueError(f"--features: unknown {unknown}; choose from {sorted(FEATURES)}")
    return names


def wants(params, features):
    """Whether a case with these parameters is one --features asks for (every case when none are named)."""
    return not features or any(FEATURES[name](params) for name in features)


def first_line(text, limit=160):
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def failure_key(error_type, message):
    """Failures group by exception type and first message line, with numbers elided (they vary per case)."""
    return f"{error_type}: {re.sub(r'-?[0-9][0-9.e+-]*', '#', message)}"


class CaseTimeout(Exception):
    """A case ran past --timeout (checked when Python code runs again, so a native call finishes first)."""


class Recorder:
    """A pytest plugin: selects the sample, bounds each case's time, records each case's outcome."""

    def __init__(self, sample, seed, features, timeout):
        self.sample, self.seed, self.features, self.timeout = sample, seed, features, timeout
        self.collected = 0
        self.results = {}  # nodeid -> {"function", "outcome", "error"?, "message"?, "reason"?}

    def pytest_collection_modifyitems(self, session, config, items):
        self.collected = len(items)
        wanted = [item for item in items
                  if wants(getattr(getattr(item, "callspec", None), "params", {}), self.features)]
        keep = set(sample_cases([item.nodeid for item in wanted], self.sample, self.seed))
        deselected = [item for item in items if item.nodeid not in keep]
        items[:] = [item for item in items if item.nodeid in keep]
        config.hook.pytest_deselected(items=deselected)
        for item in items:
            self.results[item.nodeid] = {"function": function_of(item.nodeid), "outcome": "not run"}

    def _expire(self, signum, frame):
        raise CaseTimeout(f"the case ran past {self.timeout} s")

    def pytest_runtest_call(self, item):
        signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def pytest_runtest_teardown(self, item):
        signal.setitimer(signal.ITIMER_REAL, 0)

    def pytest_runtest_makereport(self, item, call):
        record = self.results.get(item.nodeid)
        if record is None or call.excinfo is None or record["outcome"] in ("failed", "skipped"):
            return
        excinfo = call.excinfo
        if excinfo.typename == "Skipped":
            record.update(outcome="skipped", reason=first_line(excinfo.value.msg) or "(no reason given)")
        else:
            record.update(outcome="failed", error=excinfo.typename, message=first_line(excinfo.value))

    def pytest_runtest_logreport(self, report):
        record = self.results.get(report.nodeid)
        if record is not None and report.when == "call" and report.passed and record["outcome"] == "not run":
            record["outcome"] = "passed"


def table(results):
    """Markdown: one row per test function (ran, passed, failed, skipped), then failures and skips grouped."""
    rows = {}
    for record in results.values():
        row = rows.setdefault(record["function"], {"ran": 0, "passed": 0, "failed": 0, "skipped": 0, "not run": 0})
        row[record["outcome"]] += 1
        if record["outcome"] != "not run":
            row["ran"] += 1
    total = {key: sum(row[key] for row in rows.values()) for key in ("ran", "passed", "failed", "skipped", "not run")}
    lines = ["| test function | ran | passed | failed | skipped |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in list(rows.items()) + [("**total**", total)]:
        lines.append(f"| {name} | {row['ran']} | {row['passed']} | {row['failed']} | {row['skipped']} |")
    if total["not run"]:
        lines.append(f"\n{total['not run']} sampled cases did not run (the run stopped early).")
    for title, outcome, key in (("Failures", "failed", lambda r: failure_key(r["error"], r["message"])),
                                ("Skips", "skipped", lambda r: r["reason"])):
        groups = {}
        for record in results.values():
            if record["outcome"] == outcome:
                group = groups.setdefault(key(record), {})
                group[record["function"]] = group.get(record["function"], 0) + 1
        if groups:
            lines.append(f"\n{title}, by {'exception and first message line' if outcome == 'failed' else 'reason'}:")
            for text, functions in sorted(groups.items(), key=lambda kv: -sum(kv[1].values())):
                where = ", ".join(f"{name} {count}" for name, count in sorted(functions.items()))
                lines.append(f"- {sum(functions.values())} x `{text}` ({where})")
    return "\n".join(lines)


def host_memory():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", required=True, help="flash-attn's tests/test_flash_attn.py")
    parser.add_argument("--sample", type=int, default=1200, help="how many parametrizations to run (default 1200)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--features", default="", help=f"only cases with one of these on: {','.join(FEATURES)}")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one case may run (default 300)")
    parser.add_argument("--json", help="also write each case's outcome here")
    parser.add_argument("--workdir", help="keep the patched suite here (default: a temporary folder, removed)")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -x, --tb=short)")
    args = parser.parse_args(argv)
    try:
        if args.sample < 1:
            raise ValueError(f"--sample: must be at least 1, got {args.sample}")
        if not args.timeout > 0:
            raise ValueError(f"--timeout: must be positive, got {args.timeout}")
        features = parse_features(args.features)
        with open(args.tests, encoding="utf-8") as f:
            source = f.read()
        import einops  # noqa: F401  (the suite imports it; say so before pytest reports a collection error)
        import pytest
    except (OSError, ValueError, ImportError) as e:
        print(f"peer_flash_attn: error: {e}", file=sys.stderr)
        return 2

    patches = suite_patches(host_memory())
    source, counts = patch_suite(source, patches)
    workdir = args.workdir or tempfile.mkdtemp(prefix="peer_flash_attn_")
    os.makedirs(workdir, exist_ok=True)
    suite = os.path.join(workdir, "test_flash_attn.py")
    with open(suite, "w", encoding="utf-8") as f:
        f.write(source)
    ini = os.path.join(workdir, "pytest.ini")  # keeps the caller's pytest configuration out of the run
    with open(ini, "w", encoding="utf-8") as f:
        f.write("[pytest]\n")

    sys.path.insert(0, SHIM)
    import flash_attn
    import flashlm
    recorder = Recorder(args.sample, args.seed, features, args.timeout)
    try:
        code = pytest.main([suite, "-q", "-c", ini, "--rootdir", workdir, "-p", "no:cacheprovider", "--tb=no",
                     "-o", "addopts=", *args.pytest_args], plugins=[recorder])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    if not recorder.results:
        print(f"peer_flash_attn: error: pytest ran no case (exit code {int(code)})", file=sys.stderr)
        return 2
    print("\nflash-attn's suite as run here (changes to it, and how many places each changed):")
    for (what, _, _), n in zip(patches, counts):
        print(f"- {what}: {n}")
    print(f"- `flash_attn` is {os.path.dirname(flash_attn.__file__)}: flashlm's functions "
          f"({os.path.dirname(flashlm.__file__)}) under flash-attn's names; bert_padding's pad_input/unpad_input "
          "and layers.rotary's apply_rotary_emb (the suite's references) in plain torch; flash-attn's private "
          "entry points (_flash_attn_varlen_forward, flash_attn_gpu) absent")
    print(f"- cases: {len(recorder.results)} of {recorder.collected} parametrizations "
          f"(--sample {args.sample} --seed {args.seed}{' --features ' + args.features if features else ''}; "
          f"at least {MIN_PER_FUNCTION} per function), each stopped after {args.timeout:g} s\n")
    print(table(recorder.results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(recorder.results, f, indent=1)
    return 1 if any(r["outcome"] != "passed" and r["outcome"] != "skipped" for r in recorder.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
