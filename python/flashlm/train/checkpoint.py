"""Checkpoint files: written atomically, loaded with checks, the last K kept.

    manager = CheckpointManager("runs/x", keep=3)
    manager.save(state, step)                 # runs/x/ckpt-00001000.pt, then the pointer runs/x/latest
    path = latest_checkpoint("runs/x")        # None when there is none
    state = load_checkpoint(path)

A file is one torch.save of a dict (format FORMAT, keys in the trainer's docs), read back with
weights_only=True so that a file from elsewhere cannot run code. Writing goes to a temporary file in the
same folder (named `.ckpt-*.tmp*`, which nothing here ever reads), is flushed and fsync'ed, renamed over the
final name with os.replace (atomic on POSIX) and the folder fsync'ed, so a crash at any moment leaves either
the previous checkpoint or the new one, never half of one. The `latest` pointer is written the same way.
"""

import os
import re
from pathlib import Path

import torch

FORMAT = "flashlm-checkpoint-1"
POINTER = "latest"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Calls write(file) on a temporary file beside `path`, then moves it to `path` durably."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path, state: dict):
    """Writes `state` (format FORMAT is added) to `path` atomically."""
    state = dict(state, format=FORMAT)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """Reads a checkpoint on the CPU; ValueError for a file that is missing, truncated, not a checkpoint or
    of another format."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, pickled code: all the same to the caller
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: {first_line})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint: {path} has format {found!r}, expected {FORMAT!r}")
    return state


def list_checkpoints(folder) -> list:
    """(step, path) of the complete checkpoint files in `folder`, by step. Temporary files never match."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(folder):
    """The checkpoint the `latest` pointer names, or, without a valid pointer, the one of highest step."""
    folder = Path(folder)
    try:
        name = (folder / POINTER).read_text().strip()
        if _NAME.match(name) and (folder / name).is_file():
            return folder / name
    except OSError:
        pass
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def find_checkpoint(path) -> Path:
    """A checkpoint file as given, or a run's folder resolved to its latest checkpoint; ValueError if none."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"checkpoint: no checkpoint in {path}")
        return found
    return path


class CheckpointManager:
    """Saves numbered checkpoints into `folder`, points `latest` at the newest and keeps the `keep` newest."""

    def __init__(self, folder, keep: int = 3):
        if keep <= 0:
            raise ValueError(f"keep: must be positive, got {keep}")
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)
        for pattern in (".ckpt-*.tmp*", f".{POINTER}.tmp*"):  # left by a process killed while saving
            for stale in self.folder.glob(pattern):
                stale.unlink(missing_ok=True)

    def save(self, state: dict, step: int) -> Path:
        path = self.folder / checkpoint_name(step)
        save_checkpoint(path, dict(state, step=step))
        atomic_write(self.folder / POINTER, lambda f: f.write(path.name.encode() + b"\n"))
        for _, old in list_checkpoints(self.folder)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path
