"""Reading training checkpoints: the file format, finding a run's latest, loading with checks.

    path = latest_checkpoint("runs/x")        # None when there is none
    state = load_checkpoint(path)
    ckpt = read_checkpoint("runs/x")          # a file or a run's folder, with the model it must hold

A file is one torch.save of a dict (format FORMAT, keys in the trainer's docs), read back with
weights_only=True so that a file from elsewhere cannot run code. A run's folder holds ckpt-<step>.pt files
and a `latest` pointer naming the newest; temporary files (`.ckpt-*.tmp*`, left by a save killed half way)
are never read. flashlm.train.checkpoint writes them.
"""

import re
from pathlib import Path

import torch

FORMAT = "flashlm-checkpoint-1"
POINTER = "latest"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def load_checkpoint(path, mmap: bool = False) -> dict:
    """Reads a checkpoint on the CPU; ValueError for a file that is missing, truncated, not a checkpoint or
    of another format. mmap: the tensors map the file and are read as they are touched (a model-parallel rank
    copies out its slices without reading the whole model into its memory)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def read_checkpoint(path) -> dict:
    """A training checkpoint (a file, or a run's folder: its latest), with the model it must hold."""
    path = find_checkpoint(path)
    ckpt = load_checkpoint(path)
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path}: no {key}")
    return ckpt
