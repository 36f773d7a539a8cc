"""Writing checkpoint files: atomically, the last K kept (flashlm.io.checkpoint defines the format and reads them).

    manager = CheckpointManager("runs/x", keep=3)
    manager.save(state, step)                 # runs/x/ckpt-00001000.pt, then the pointer runs/x/latest

Writing goes to a temporary file in the same folder (named `.ckpt-*.tmp*`, which nothing ever reads), is
flushed and fsync'ed, renamed over the final name with os.replace (atomic on POSIX) and the folder fsync'ed,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of one. The
`latest` pointer is written the same way.
"""

import os
from pathlib import Path

import torch

from flashlm.io.checkpoint import FORMAT, POINTER, checkpoint_name, list_checkpoints


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
