"""Offline distillation's file: a teacher's top-k logits for every position of a token file, written once and
memory-mapped by every training run after it, so those runs never run the teacher.

    write_teacher_logits("teacher.kd", teacher, train_tokens, val_tokens, k=64, seq_len=128, meta={...})
    f = open_teacher_logits("teacher.kd")        # f.tokens, f.val_tokens, f.indices, f.values, f.meta
    batches = TopKBatches(f, batch_size=8, seed=0)  # (x, y, topk_indices, topk_values) per batch

Layout (little-endian): a 64-byte header (magic "FLKD", version, vocab, k, seq_len, positions, val tokens, meta
bytes), the meta JSON (the teacher's model config, its tokenizer, its end-of-document id), then, each 64-byte
aligned: int32 tokens [positions + 1], int32 val_tokens [val], int32 indices [positions, k] and float16 values
[positions, k]. Position p holds the teacher's logits at p of the window p // seq_len (inputs tokens[w * seq_len:
(w + 1) * seq_len]), so the windows are the training batches' sequences. The file is untrusted on read: every
size is checked against the file's length, every token against the vocabulary, and each batch's indices and
values before they are used.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashlm.train.data import PackedBatches

MAGIC = b"FLKD"
VERSION = 1
_HEADER = struct.Struct("<4sIIIIQQQ20x")  # magic, version, vocab, k, seq_len, positions, val tokens, meta bytes
_ALIGN = 64
MAX_META_BYTES = 64 << 20  # a tokenizer.json of a 256k vocabulary is ~20 MB
MAX_VOCAB = 1 << 24


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(vocab: int, k: int, positions: int, n_val: int, meta_bytes: int) -> dict:
    """Offsets of each array and the file's total size, in Python ints (no overflow)."""
    offsets, at = {}, _aligned(_HEADER.size + meta_bytes)
    for name, size in (("tokens", 4 * (positions + 1)), ("val_tokens", 4 * n_val), ("indices", 4 * positions * k),
                       ("values", 2 * positions * k)):
        offsets[name] = at
        at = _aligned(at + size)
    offsets["size"] = at
    return offsets


def _view(buf: np.ndarray, offset: int, dtype, shape: tuple) -> np.ndarray:
    """The array of `shape` at byte `offset` of a uint8 memmap."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buf[offset:offset + n].view(dtype).reshape(shape)


@dataclass
class TeacherLogitsFile:
    path: Path
    vocab: int
    k: int
    seq_len: int
    tokens: np.ndarray      # int32 [positions + 1]
    val_tokens: np.ndarray  # int32 [val]
    indices: np.ndarray     # int32 [positions, k]
    values: np.ndarray      # float16 [positions, k]
    meta: dict

    @property
    def positions(self) -> int:
        return self.indices.shape[0]

    def topk(self, start: int, stop: int):
        """(indices int64, values float32) of positions [start, stop), checked: an index outside the vocabulary
        or a value that is not finite is an error naming the file and position."""
        idx = torch.from_numpy(np.asarray(self.indices[start:stop], dtype=np.int64))
        val = torch.from_numpy(np.asarray(self.values[start:stop], dtype=np.float32))
        bad = (idx < 0) | (idx >= self.vocab) | ~torch.isfinite(val)
        if bool(bad.any()):
            row = start + int(bad.any(dim=1).nonzero()[0, 0])
            raise ValueError(f"teacher_logits: {self.path}: position {row} has an index outside [0, {self.vocab}) "
                             f"or a value that is not finite")
        return idx, val


def write_teacher_logits(path, teacher_logits_fn, tokens, val_tokens, *, vocab: int, k: int, seq_len: int,
                         meta: dict, batch_size: int = 8, progress: bool = False) -> int:
    """Writes the file for `tokens` (the training split) cut into windows of seq_len; teacher_logits_fn(x int64
    [B, T]) -> float logits [B, T, vocab]. val_tokens are stored as they are (no logits: validation scores the
    student on the labels). Returns the positions written. Written to a temporary name and renamed."""
    from tqdm import tqdm

    if not 1 <= k <= vocab:
        raise ValueError(f"top_k: must be in [1, vocab_size={vocab}], got {k}")
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"data: {len(tokens)} tokens make no window of seq_len {seq_len} + 1")
    positions = windows * seq_len
    meta_bytes = json.dumps(meta).encode()
    lay = _layout(vocab, k, positions, len(val_tokens), len(meta_bytes))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, vocab, k, seq_len, positions, len(val_tokens), len(meta_bytes)))
        f.write(meta_bytes)
        f.truncate(lay["size"])
    try:
        out = np.memmap(tmp, dtype=np.uint8, mode="r+")
        view = lambda name, dtype, shape: _view(out, lay[name], dtype, shape)
        view("tokens", np.int32, (positions + 1,))[:] = tokens[:positions + 1]
        view("val_tokens", np.int32, (len(val_tokens),))[:] = val_tokens
        indices, values = view("indices", np.int32, (positions, k)), view("values", np.float16, (positions, k))
        with torch.no_grad():
            for w0 in tqdm(range(0, windows, batch_size), desc="teacher logits", disable=not progress):
                w1 = min(windows, w0 + batch_size)
                x = torch.from_numpy(np.asarray(tokens[w0 * seq_len:w1 * seq_len], dtype=np.int64))
                logits = teacher_logits_fn(x.view(w1 - w0, seq_len)).float().reshape(-1, vocab)
                top = logits.topk(k, dim=-1)
                indices[w0 * seq_len:w1 * seq_len] = top.indices.numpy().astype(np.int32)
                values[w0 * seq_len:w1 * seq_len] = top.values.numpy().astype(np.float16)
        out.flush()
        del out, indices, values
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return positions


def open_teacher_logits(path) -> TeacherLogitsFile:
    """The file at path, memory-mapped and checked (sizes, tokens, meta); ValueError naming it otherwise."""
    path = Path(path)
    where = f"teacher_logits: {path}"
    if path.exists() and not path.is_file():
        raise ValueError(f"{where}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise ValueError(f"{where}: {size} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, vocab, k, seq_len, positions, n_val, meta_bytes = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{where}: not a teacher logits file (magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{where}: version {version}, this flashlm reads {VERSION}")
        if not 1 <= vocab <= MAX_VOCAB:
            raise ValueError(f"{where}: vocab {vocab} outside [1, {MAX_VOCAB}]")
        if not 1 <= k <= vocab:
            raise ValueError(f"{where}: k {k} outside [1, vocab={vocab}]")
        if seq_len < 1 or positions < seq_len or positions % seq_len:
            raise ValueError(f"{where}: {positions} positions are not whole windows of seq_len {seq_len}")
        if meta_bytes > MAX_META_BYTES:
            raise ValueError(f"{where}: meta of {meta_bytes} bytes (at most {MAX_META_BYTES})")
        lay = _layout(vocab, k, positions, n_val, meta_bytes)
        if lay["size"] != size:
            raise ValueError(f"{where}: {size} bytes, its header ({positions} positions, k {k}, {n_val} validation "
                             f"tokens) needs {lay['size']}")
        try:
            meta = json.loads(f.read(meta_bytes).decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{where}: unreadable meta ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta is not a JSON object")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    view = lambda name, dtype, shape: _view(raw, lay[name], dtype, shape)
    tokens, val_tokens = view("tokens", np.int32, (positions + 1,)), view("val_tokens", np.int32, (n_val,))
    for name, t in (("tokens", tokens), ("val tokens", val_tokens)):
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{where}: its {name} hold ids outside [0, {vocab})")
    return TeacherLogitsFile(path, vocab, k, seq_len, tokens, val_tokens, view("indices", np.int32, (positions, k)),
                             view("values", np.float16, (positions, k)), meta)


class TopKBatches(PackedBatches):
    """PackedBatches over the file's tokens whose batches also carry the teacher's top k of each position:
    (x, y, topk_indices int64 [B, T, k], topk_values float32 [B, T, k])."""

    def __init__(self, f: TeacherLogitsFile, batch_size: int, *, seed=0, rank=0, world_size=1):
        super().__init__(f.tokens, f.seq_len, batch_size, seed=seed, rank=rank, world_size=world_size)
        self.file = f

    def batch(self, epoch: int, index: int):
        x, y = super().batch(epoch, index)
        seqs = self.shard(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        L = self.seq_len
        parts = [self.file.topk(s * L, s * L + L) for s in seqs]
        return x, y, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
