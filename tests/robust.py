"""The harness of the robustness suite (tests/test_robust_*.py): flashlm called as a hostile user would call it.

A case is one call of a public entry point with one argument mutated (a dtype, a device, a shape, a view, a
value, a type, a file field). It runs in a child process under a memory cap (RLIMIT_AS) and a wall-clock
timeout, and passes when the child
  - neither dies by a signal (a crash) nor outlives the timeout (a hang), and
  - returns a result that the case's reference check accepts, or raises ValueError, TypeError,
    NotImplementedError or GGUFError (a ValueError) whose message names the argument: one of the case's
    `names` as a whole word (nanobind's "incompatible function arguments", which lists every parameter,
    names none of them; no `names` leaves the wording unchecked).
`expect` says which of the two a case allows: "raise" (no correct result exists), "correct" (a correct
result is the only pass: NaN inputs, valid views) or "either"; a case's `judge` replaces these rules where
a result is not a tensor (value_case) or an outcome is a command's exit status and output.

Speed: one server process per test module imports torch and flashlm once (and runs the module's warm(),
which builds what its cases share), then forks a child per case, PARALLEL at a time, sets the limits in the
child and runs the case there (a fork costs ~3 ms; a fresh interpreter ~1.5 s). The server never runs a
kernel or an OpenMP region itself, so each child starts from a clean state (flashlm's thread pool rebuilds
itself after a fork). Files a case writes go to scratch(), inside a folder the server removes. A module's
collected cases run the first time one of its tests asks (tests_of gives each module its fixture and test),
and each case is one pytest test whose failure names the entry point, the mutation and what happened.

    python tests/robust.py test_robust_ops < /dev/null   # runs a module's cases, prints their verdicts (JSON lines)
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

MEMORY_CAP = 4 << 30   # RLIMIT_AS of every child
TIMEOUT = 6.0          # seconds of wall-clock time per case (a case takes milliseconds; the machine is shared)
PARALLEL = 2           # children at a time (the machines that run the suite have 2 cores or more)
ACCEPTED = ("ValueError", "TypeError", "NotImplementedError", "GGUFError")
EXPECTS = ("raise", "correct", "either")
_TESTS = os.path.dirname(os.path.abspath(__file__))


class HarnessError(Exception):
    """A case that could not even be set up: a fault of the suite, reported as such."""


@dataclass
class Case:
    """One hostile call. `call()` runs in the child; `check(result)` (in the child too) raises AssertionError
    when a returned result is wrong. `names`: what an error message must name (the argument, a file's field
    or "at byte")."""

    entry: str                        # the public entry point, e.g. "flashlm.ops.rms_norm"
    mutation: str                     # what differs from a valid call, e.g. "x: dtype torch.float64"
    call: Callable[[], Any]
    names: tuple = ()
    expect: str = "raise"
    check: Optional[Callable[[Any], None]] = None
    accept: tuple = ()                # exception types accepted besides ACCEPTED (e.g. FileNotFoundError)
    timeout: float = TIMEOUT
    judge: Optional[Callable[[Any], Optional[str]]] = None  # replaces the rules above: None (pass) or a failure

    def __post_init__(self):
        assert self.expect in EXPECTS, self.expect
        assert self.expect == "raise" or self.check is not None or self.judge is not None, self.id
        if isinstance(self.names, str):
            self.names = (self.names,)

    @property
    def id(self) -> str:
        return f"{self.entry} | {self.mutation}"


# -- verdicts (in the child) ----------------------------------------------------------------------------------

def names_one_of(message: str, names) -> bool:
    """Whether the message names one of `names` as a whole word (so "k" is not found in "k_cache")."""
    if "incompatible function arguments" in message:  # nanobind's signature dump names every parameter
        return False
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names)


def short(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def describe(value) -> str:
    """A result, briefly: tensors by shape, dtype and device."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return f"tensor{list(value.shape)} {value.dtype} on {value.device}"
    except ImportError:
        pass
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "") + ")"
    return short(repr(value), 120)


def exception_failure(e: BaseException, names, expect: str = "either", accept: tuple = ()) -> Optional[str]:
    """None if raising `e` passes (an accepted type, a message naming one of `names`), else what is wrong."""
    kind = type(e).__name__
    message = str(e)
    allowed = any(c.__name__ in ACCEPTED for c in type(e).__mro__) or isinstance(e, accept)
    if not allowed:
        return f"raised {kind} (not ValueError/TypeError/NotImplementedError/GGUFError): {short(message)}"
    if expect == "correct":
        return f"raised {kind} where a correct result exists: {short(message)}"
    if names and not names_one_of(message, names):
        return f"raised {kind} whose message names none of {list(names)}: {short(message)}"
    return None


def judge_exception(case: Case, e: BaseException) -> Optional[str]:
    return exception_failure(e, case.names, case.expect, case.accept)


def value_case(entry: str, mutation: str, call, names, check, **kw) -> Case:
    """A case whose result is judged by `check(result)` -> None (accepted) or what is wrong; raising an
    accepted exception naming one of `names` passes as for any case."""
    def judge(outcome):
        if isinstance(outcome, BaseException):
            return exception_failure(outcome, names, accept=kw.get("accept", ()))
        return check(outcome)
    return Case(entry, mutation, call, names, "either", judge=judge, **kw)


def evaluate(case: Case) -> Optional[str]:
    """Runs the case (in the child): None if it passes, else what went wrong."""
    try:
        result = case.call()
    except HarnessError as e:
        return f"harness error: {e}"
    except BaseException as e:  # noqa: BLE001 - judged, never swallowed silently
        if case.judge is not None:
            return case.judge(e)
        return judge_exception(case, e)
    if case.judge is not None:
        return case.judge(result)
    if case.expect == "raise":
        return f"returned {describe(result)} instead of raising"
    try:
        case.check(result)
    except AssertionError as e:
        return f"returned a wrong result: {short(e, 900)}"
    except Exception as e:  # noqa: BLE001 - a reference that cannot be computed: no correct result exists
        return f"returned {describe(result)} where no correct result exists ({type(e).__name__}: {short(e)})"
    return None


# -- the server: one process per module, a fork per case ------------------------------------------------------

_SCRATCH = "FLASHLM_ROBUST_SCRATCH"


def scratch() -> str:
    """A fresh directory for a case's files, inside the server's temporary directory (removed with it)."""
    return tempfile.mkdtemp(dir=os.environ.get(_SCRATCH))


def _child(case: Case, write_fd: int, log_path: str) -> None:
    import resource

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)  # the server's stdout carries verdicts: the case's own output goes to its log
    os.dup2(log, 2)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
        verdict = {"ok": True} if (failure := evaluate(case)) is None else {"ok": False, "detail": failure}
    except BaseException:  # noqa: BLE001 - a fault of the harness or the case itself, reported as such
        verdict = {"ok": False, "detail": "harness error: " + short(traceback.format_exc(), 1500)}
    data = json.dumps(verdict).encode()
    while data:
        data = data[os.write(write_fd, data):]
    os._exit(0)


def _log_tail(path: str, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return f"; its output ended with: {short(text, limit)}" if text.strip() else ""


class _Child:
    """A case running in a forked child: its pipe, its deadline and what it has answered so far."""

    def __init__(self, case_id: str, case: Case, log_path: str):
        self.case_id, self.case, self.log_path = case_id, case, log_path
        self.read_fd, write_fd = os.pipe()
        self.start = time.monotonic()
        self.deadline = self.start + case.timeout
        self.chunks = []
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.read_fd)
            _child(case, write_fd, log_path)
        os.close(write_fd)

    def read(self) -> bool:
        """Reads what the child wrote; True once it closed its end (answered, or died)."""
        data = os.read(self.read_fd, 1 << 16)
        self.chunks.append(data)
        return not data

    def verdict(self, hung: bool = False) -> dict:
        """Reaps the child (killed first if hung); its verdict: {"ok": bool, "detail": str, "seconds": float}."""
        if hung:
            os.kill(self.pid, signal.SIGKILL)
        os.close(self.read_fd)
        _, status = os.waitpid(self.pid, 0)
        seconds = time.monotonic() - self.start
        tail = _log_tail(self.log_path)
        if hung:
            return {"ok": False, "detail": f"hang: no answer within {self.case.timeout:.0f} s{tail}", "seconds": seconds}
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            return {"ok": False, "detail": f"crash: killed by {sig}{tail}", "seconds": seconds}
        try:
            verdict = json.loads(b"".join(self.chunks))
        except ValueError:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
            return {"ok": False, "detail": f"crash: the child exited with status {code} before answering{tail}",
                    "seconds": seconds}
        return dict(verdict, seconds=seconds)


def run_all(cases: dict, ids, folder: str, parallel: int = PARALLEL):
    """Yields (id, verdict) of each case, `parallel` children at a time (so a hang holds up one slot for its
    timeout, not every case behind it)."""
    pending, running = list(ids), {}
    while pending or running:
        while pending and len(running) < parallel:
            case_id = pending.pop(0)
            child = _Child(case_id, cases[case_id], os.path.join(folder, f"case{len(pending)}.log"))
            running[child.read_fd] = child
        timeout = max(0.0, min(c.deadline for c in running.values()) - time.monotonic())
        ready, _, _ = select.select(list(running), [], [], timeout)
        for fd in ready:
            if running[fd].read():
                child = running.pop(fd)
                yield child.case_id, child.verdict()
        now = time.monotonic()
        for fd in [fd for fd, c in running.items() if c.deadline <= now]:
            child = running.pop(fd)
            yield child.case_id, child.verdict(hung=True)


def serve(module_name: str, ids=None) -> None:
    """The server's loop: the module's CASES (those in `ids`, else all), one verdict per line on stdout."""
    sys.path.insert(0, _TESTS)
    import importlib

    import torch

    # The children run torch's own ops on one thread (flashlm's pool has FLASHLM_NUM_THREADS), and the server
    # starts no OpenMP team before forking. torch.library's custom ops import torch._dynamo on their first
    # call (~2 s): done once here rather than in every child.
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")
    module = importlib.import_module(module_name)
    getattr(module, "warm", lambda: None)()  # what every case shares, built once (a model, a file)
    cases = {c.id: c for c in module.CASES}
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="flashlm-robust-") as tmp:
        os.environ[_SCRATCH] = tmp  # the children's files (scratch()) go here and go with it
        for case_id, verdict in run_all(cases, ids if ids is not None else list(cases), tmp):
            out.write(json.dumps({"id": case_id, **verdict}) + "\n")
            out.flush()


# -- the pytest side ------------------------------------------------------------------------------------------

def check_unique(cases) -> list:
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate case ids: {dupes}"
    return cases


class Verdicts:
    """The verdicts of some of one module's cases, run together in one server."""

    def __init__(self, module_name: str, cases, ids):
        self.module_name, self.cases, self.ids = module_name, {c.id: c for c in cases}, list(ids)
        self._verdicts = self._run()

    def _run(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, env.get("PYTHONPATH")) if p)
        env.setdefault("FLASHLM_NUM_THREADS", "2")  # the children's pool, whatever the server's torch says
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), self.module_name],
                                  input="\n".join(self.ids), stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                  timeout=sum(self.cases[i].timeout for i in self.ids) + 120)
            err.seek(0)
            stderr = err.read()
        verdicts = {}
        for line in proc.stdout.splitlines():
            v = json.loads(line)
            verdicts[v.pop("id")] = v
        if proc.returncode != 0 or len(verdicts) < len(self.ids):
            raise RuntimeError(f"the case server of {self.module_name} stopped (status {proc.returncode}): "
                               f"{stderr[-3000:]}")
        return verdicts

    def check(self, case_id: str) -> None:
        """Fails the calling test with the case's entry point, mutation and outcome."""
        import pytest

        verdict = self._verdicts[case_id]
        if not verdict["ok"]:
            pytest.fail(f"{case_id}: {verdict['detail']}", pytrace=False)


def verdicts_fixture(cases):
    """A module-scoped fixture: the verdicts of the module's collected cases (those -k and the like leave),
    run in one server the first time a test asks."""
    import pytest

    cases = check_unique(list(cases))

    @pytest.fixture(scope="module")
    def verdicts(request):
        ids = [item.callspec.params["case_id"] for item in request.session.items
               if item.module is request.module and "case_id" in getattr(getattr(item, "callspec", None), "params", ())]
        return Verdicts(request.module.__name__, cases, ids)

    return verdicts


def params(cases):
    """pytest parameters: one per case, its id the case's."""
    import pytest

    return [pytest.param(c.id, id=c.id) for c in cases]


def tests_of(cases):
    """A test module's fixture and test, one pytest test per case:

        verdicts, test_hostile_case = robust.tests_of(CASES)
    """
    import pytest

    fixture = verdicts_fixture(cases)

    @pytest.mark.parametrize("case_id", params(cases))
    def test_hostile_case(verdicts, case_id):
        verdicts.check(case_id)

    return fixture, test_hostile_case


if __name__ == "__main__":
    # python tests/robust.py MODULE [ID ...]: those cases (without IDs: the ids on stdin, one per line; none: all)
    ids = sys.argv[2:] or ([line for line in sys.stdin.read().splitlines() if line] if not sys.stdin.isatty() else None)
    serve(sys.argv[1], ids or None)
