"""Importance matrices in llama.cpp's formats (tools/imatrix), read, written and collected.

An imatrix holds, per linear weight (keyed by its GGUF name, `blk.3.attn_q.weight`), the sum over the
calibration tokens of each input channel's squared activation, and how many tokens went into it. The
quantizers weigh each column's rounding error by the mean, `importance(name)` (flashlm.quant.quantize_gguf's
`imatrix`, as llama.cpp's quantize tool uses it).

Two file formats, both read and written:
- GGUF (llama.cpp's default): general.type "imatrix", imatrix.datasets (array of strings),
  imatrix.chunk_count and imatrix.chunk_size (uint32); per weight, in name order, an F32 tensor
  `<name>.in_sum2` [ne0, nmat] of raw sums and an F32 tensor `<name>.counts` [1, nmat] of token counts.
- legacy `.dat`: int32 entry count; per entry int32 name length, the name, int32 ncall, int32 nval and
  nval float32 values, (sum / count) * ncall with ncall the chunks seen (so value / ncall is the mean);
  then, optionally, int32 chunk count, int32 dataset name length and the name.
Every count and size read from a file is checked against the file before use.

Collection (`collect_imatrix`) hooks the linear layers of flashlm Transformer blocks and adds each call's
squared inputs, counting tokens as llama.cpp does (one per input row); the output projection is left out,
as llama.cpp's imatrix tool does by default. A mixture-of-experts MLP (flashlm.models.moe.MoEMLP) gives its
3-D weights ffn_gate_exps / ffn_up_exps / ffn_down_exps one matrix per expert, as llama.cpp's collector does
for its expert matmuls: expert e's sums and count cover the tokens routed to it (its gate/up input is the
token's MLP input, its down input the token's silu(gate) * up under that expert, before the routing weight).
Those activations are recomputed in float32 from the routing the forward made (the kernels' own rounding of
them is not the collector's to see). qwen2_moe's shared expert is not collected.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from flashlm import ops
from flashlm.quant.gguf_quantize import quantize_gguf

GGUF_MAGIC = b"GGUF"
_ALIGNMENT = 32
_SUM_SUFFIX, _COUNT_SUFFIX = ".in_sum2", ".counts"
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32, _GGML_F32 = 8, 9, 4, 0
_MAX_NAME = 1 << 16  # a GGUF tensor name is at most 64 bytes; leave room, refuse nonsense

# flashlm's block linear -> llama.cpp's tensor name (between "blk.N." and ".weight")
GGUF_LINEAR_NAMES = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
                     "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down",
                     "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}


@dataclass
class IMatrixEntry:
    sums: np.ndarray    # float32 [nmat * ne0]: sums of squared inputs (legacy files: mean * ncall)
    counts: np.ndarray  # int64 [nmat]: tokens per matrix (legacy files: [ncall], chunks)


@dataclass
class IMatrix:
    entries: dict[str, IMatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: counts are chunks, sums already scaled by them
    path: str = ""        # the file it was read from

    def importance(self, name: str) -> np.ndarray:
        """The values llama.cpp's quantize tool hands the quantizer for weight `name`: the mean squared
        input per channel (per matrix sums / counts; 1 where a matrix saw no tokens; a legacy entry's values
        over its ncall, or as stored where ncall is 0)."""
        e = self.entries[name]
        if self.legacy:
            ncall = int(e.counts[0]) if len(e.counts) else 0
            return (e.sums / np.float32(ncall)).astype(np.float32) if ncall > 0 else e.sums.copy()
        per = e.sums.reshape(len(e.counts), -1)
        out = np.ones_like(per)
        for j, count in enumerate(e.counts):
            if count > 0:
                out[j] = per[j] / np.float32(count)
        return out.reshape(-1)


def quantize_experts(rows, ggml_type: str, importance: np.ndarray, n_expert: int) -> np.ndarray:
    """A 3-D (expert) weight as float rows [n_expert * rows_per_expert, n] quantized to ggml_type with its
    imatrix entry's values (n_expert * n of them, one run of n per expert): each expert's rows with its own
    run, as llama.cpp's quantize tool hands ggml's quantizer (imatrix + expert * n). Returns uint8
    [n_expert * rows_per_expert, bytes_per_row]."""
    total, n = (int(d) for d in rows.shape)
    if isinstance(n_expert, bool) or not isinstance(n_expert, int) or n_expert < 1 or total % n_expert:
        raise ValueError(f"n_expert: expected a positive int dividing the {total} rows, got {n_expert!r}")
    if len(importance) != n_expert * n:
        raise ValueError(f"imatrix: expected {n_expert * n} values ({n_expert} experts of {n}), got {len(importance)}")
    per = total // n_expert
    return np.concatenate([quantize_gguf(rows[e * per:(e + 1) * per], ggml_type, imatrix=importance[e * n:(e + 1) * n])
                           for e in range(n_expert)])


# -- reading ----------------------------------------------------------------------------------------------

def read_imatrix(path) -> IMatrix:
    """An imatrix file in either format (a GGUF file by its magic, else the legacy layout)."""
    path = _as_path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    m = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    m.path = path
    return m


def _as_path(path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"imatrix: expected a path, got {type(path).__name__}") from None
    if not os.path.isfile(path):
        raise ValueError(f"imatrix: {path!r} is not a file")
    return path


class _Cursor:
    """Little-endian reads from bytes that name the file and offset of anything missing or out of range."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str):
        raise ValueError(f"imatrix: {self.path}: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            self.fail(f"{what}: needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def text(self, n: int, what: str) -> str:
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: not UTF-8")


def _read_legacy(path: str) -> IMatrix:
    with open(path, "rb") as f:
        c = _Cursor(f.read(), path)
    n_entries = c.i32("entry count")
    if n_entries < 1:
        c.fail(f"entry count {n_entries}: must be at least 1")
    if n_entries > len(c.data) // 16:  # each entry takes at least 16 bytes
        c.fail(f"entry count {n_entries}: more than the file can hold")
    m = IMatrix(legacy=True)
    for i in range(n_entries):
        length = c.i32(f"entry {i}: name length")
        if not 0 < length <= _MAX_NAME:
            c.fail(f"entry {i}: name length {length} out of range [1, {_MAX_NAME}]")
        name = c.text(length, f"entry {i}: name")
        ncall, nval = c.i32(f"entry {name!r}: ncall"), c.i32(f"entry {name!r}: value count")
        if ncall < 0:
            c.fail(f"entry {name!r}: ncall {ncall} must be at least 0")
        if nval < 1:
            c.fail(f"entry {name!r}: value count {nval} must be at least 1")
        if name in m.entries:
            c.fail(f"entry {name!r}: appears twice")
        values = np.frombuffer(c.take(4 * nval, f"entry {name!r}: {nval} values"), dtype="<f4").astype(np.float32)
        _check_finite(values, path, name)
        m.entries[name] = IMatrixEntry(values, np.array([ncall], dtype=np.int64))
    if c.pos < len(c.data):  # the chunk count and dataset name are optional
        m.chunk_count = c.i32("chunk count")
        length = c.i32("dataset name length")
        if not 0 <= length <= len(c.data) - c.pos:
            c.fail(f"dataset name length {length} out of range")
        if length:
            m.datasets.append(c.text(length, "dataset name"))
        if c.pos != len(c.data):
            c.fail(f"{len(c.data) - c.pos} bytes after the dataset name")
    return m


def _check_finite(values: np.ndarray, path: str, name: str) -> None:
    """Sums of squares (or their means) are finite and never negative: the quantizers weigh each column's
    rounding error by them, and a negative weight would reward error."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"imatrix: {path}: entry {name!r} holds non-finite values")
    if np.any(values < 0):
        raise ValueError(f"imatrix: {path}: entry {name!r} holds negative values (sums of squares are not)")


def _read_gguf(path: str) -> IMatrix:
    reader = ops.GGUFReader(path)  # checks the header, every count, offset and size (GGUFError)
    try:
        metadata = {key: (type_name, value) for key, type_name, value in reader.metadata()}
        tensors = {name: (i, type_name, tuple(dims)) for i, (name, _, type_name, dims, _, _) in enumerate(reader.tensors())}
        m = IMatrix(datasets=_meta(metadata, "imatrix.datasets", "ARRAY[STRING]", [], path),
                    chunk_count=_meta(metadata, "imatrix.chunk_count", "UINT32", 0, path),
                    chunk_size=_meta(metadata, "imatrix.chunk_size", "UINT32", 0, path))
        kind = _meta(metadata, "general.type", "STRING", None, path)
        if kind not in (None, "imatrix"):
            raise ValueError(f"imatrix: {path}: general.type is {kind!r}, not 'imatrix'")
        names = set()
        for tname in tensors:
            if tname.endswith(_SUM_SUFFIX):
                names.add(tname[:-len(_SUM_SUFFIX)])
            elif tname.endswith(_COUNT_SUFFIX):
                names.add(tname[:-len(_COUNT_SUFFIX)])
            else:
                raise ValueError(f"imatrix: {path}: tensor {tname!r} is neither <name>.in_sum2 nor <name>.counts")
        if not names:
            raise ValueError(f"imatrix: {path}: no entries")
        for name in sorted(names):
            m.entries[name] = _gguf_entry(reader, tensors, name, path)
    finally:
        reader.close()
    return m


def _meta(metadata: dict, key: str, type_name: str, default, path: str):
    if key not in metadata:
        return default
    got, value = metadata[key]
    if got != type_name:
        raise ValueError(f"imatrix: {path}: {key} is {got}, expected {type_name}")
    return list(value) if isinstance(value, (list, tuple)) else value


def _gguf_entry(reader, tensors: dict, name: str, path: str) -> IMatrixEntry:
    parts = []
    for suffix in (_SUM_SUFFIX, _COUNT_SUFFIX):
        if name + suffix not in tensors:
            raise ValueError(f"imatrix: {path}: {name + suffix!r} is missing (sums and counts come in pairs)")
        index, type_name, dims = tensors[name + suffix]
        if type_name != "F32":
            raise ValueError(f"imatrix: {path}: {name + suffix!r} is {type_name}, must be F32")
        parts.append((np.array(reader.raw(index)).view("<f4").astype(np.float32), dims))
    (sums, sum_dims), (counts, count_dims) = parts
    nmat = len(counts)
    # as llama.cpp writes them (trailing dimensions of 1 left out): in_sum2 [ne0, nmat], counts [1, nmat]
    sums_ok = len(sum_dims) <= 2 and tuple(sum_dims[1:]) in ((), (1,), (nmat,)) and (nmat == 1 or len(sum_dims) == 2)
    counts_ok = len(count_dims) <= 2 and (len(count_dims) == 1 or count_dims[0] == 1) and count_dims[-1] == nmat
    if nmat < 1 or len(sums) < 1 or len(sums) % nmat or not sums_ok or not counts_ok:
        raise ValueError(f"imatrix: {path}: {name!r}: {len(sums)} sums do not split into {nmat} matrices "
                         f"(in_sum2 {list(sum_dims)}, counts {list(count_dims)})")
    _check_finite(sums, path, name)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts > 2.0 ** 53):
        raise ValueError(f"imatrix: {path}: {name!r}: counts must be finite and non-negative")
    # llama.cpp reads counts with lround
    return IMatrixEntry(sums, np.floor(counts.astype(np.float64) + 0.5).astype(np.int64))


# -- writing ----------------------------------------------------------------------------------------------

def write_imatrix(m: IMatrix, path, fmt: str | None = None) -> None:
    """Write `m` to `path` as "gguf" or "dat" (legacy); by default "dat" for a .dat path, else GGUF (llama.cpp's
    default)."""
    path = os.fspath(path)
    fmt = fmt or ("dat" if path.lower().endswith(".dat") else "gguf")
    if fmt not in ("gguf", "dat"):
        raise ValueError(f"fmt: expected 'gguf' or 'dat', got {fmt!r}")
    _check_writable(m)
    data = _gguf_bytes(m) if fmt == "gguf" else _legacy_bytes(m)
    with open(path, "wb") as f:
        f.write(data)


def _check_writable(m: IMatrix) -> None:
    """What the formats can hold: int32 counts and lengths, entries whose sums split evenly over their counts."""
    if not m.entries:
        raise ValueError("imatrix: no entries to write")
    for key in ("chunk_count", "chunk_size"):
        value = getattr(m, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**31:
            raise ValueError(f"imatrix: {key} must be an int in [0, 2^31), got {value!r}")
    for name, e in m.entries.items():
        counts, sums = np.asarray(e.counts), np.asarray(e.sums)
        if (not name or counts.ndim != 1 or sums.ndim != 1 or len(counts) < 1 or len(sums) < 1
                or len(sums) % len(counts) or len(sums) >= 2**31):
            raise ValueError(f"imatrix: entry {name!r}: {sums.shape} sums do not split over {counts.shape} counts")
        if np.any(counts < 0) or np.any(counts >= 2**31) or not np.all(np.isfinite(sums)):
            raise ValueError(f"imatrix: entry {name!r}: counts must be in [0, 2^31) and sums finite")


def _legacy_bytes(m: IMatrix) -> bytes:
    """As llama.cpp's save_imatrix_legacy: entries with no tokens at all are left out; values (sum / count) *
    ncall, ncall = ceil(max count / chunk size), and 1 where a matrix saw no tokens."""
    if not m.legacy and m.chunk_size <= 0:
        raise ValueError("imatrix: chunk_size must be positive to write the legacy format")
    out = []
    for name in sorted(m.entries):
        e = m.entries[name]
        if not np.any(e.counts):
            continue
        if m.legacy:
            ncall, values = int(e.counts[0]), e.sums.astype(np.float32)
        else:
            ncall = (int(e.counts.max()) + m.chunk_size - 1) // m.chunk_size
            per = e.sums.reshape(len(e.counts), -1).astype(np.float32)
            values = np.empty_like(per)
            for j, count in enumerate(e.counts):
                values[j] = (per[j] / np.float32(count)) * np.float32(ncall) if count else np.float32(ncall)
            values = values.reshape(-1)
        raw = name.encode("utf-8")
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values)) +
                   values.astype("<f4").tobytes())
    dataset = (m.datasets[-1] if m.datasets else "").encode("utf-8")
    return (struct.pack("<i", len(out)) + b"".join(out) + struct.pack("<ii", m.chunk_count, len(dataset)) + dataset)


def _gguf_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_bytes(m: IMatrix) -> bytes:
    """A GGUF file laid out as llama.cpp's gguf_write_to_file writes save_imatrix's (version 3, alignment 32,
    dimensions up to the last one above 1)."""
    kvs = [_gguf_str("general.type") + struct.pack("<I", _GGUF_STRING) + _gguf_str("imatrix"),
           _gguf_str("imatrix.datasets") + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(m.datasets)) +
           b"".join(_gguf_str(d) for d in m.datasets),
           _gguf_str("imatrix.chunk_count") + struct.pack("<II", _GGUF_UINT32, m.chunk_count),
           _gguf_str("imatrix.chunk_size") + struct.pack("<II", _GGUF_UINT32, m.chunk_size)]
    tensors = []
    for name in sorted(m.entries):
        e = m.entries[name]
        nmat = len(e.counts)
        tensors.append((name + _SUM_SUFFIX, [len(e.sums) // nmat, nmat], e.sums.astype("<f4").tobytes()))
        tensors.append((name + _COUNT_SUFFIX, [1, nmat], e.counts.astype("<f4").tobytes()))
    infos, data = [], b""
    for tname, dims, raw in tensors:
        while len(dims) > 1 and dims[-1] == 1:
            dims = dims[:-1]
        infos.append(_gguf_str(tname) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", _GGML_F32, len(data)))
        data += raw + bytes(-len(raw) % _ALIGNMENT)
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % _ALIGNMENT) + data


# -- collection -------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)$")


def gguf_linear_names(model: torch.nn.Module, fused_qkv: bool = False, fused_gate_up: bool = False) -> dict[str, str]:
    """module name -> GGUF weight name for the linear layers of a flashlm Transformer's blocks
    (`blocks.3.attn.q` -> `blk.3.attn_q.weight`). fused_qkv: the GGUF file stores one attn_qkv weight,
    whose input the q projection's stands for (k and v see the same input); fused_gate_up: one ffn_up weight
    of gate|up rows (phi3), whose input the gate projection's stands for."""
    names = {}
    for module_name, _ in model.named_modules():
        match = _BLOCK_RE.match(module_name)
        if not match or match.group(2) not in GGUF_LINEAR_NAMES:
            continue
        layer, part = match.groups()
        if (fused_qkv and part in ("attn.k", "attn.v")) or (fused_gate_up and part == "mlp.up"):
            continue
        gguf = "attn_qkv" if fused_qkv and part == "attn.q" else "ffn_up" if fused_gate_up and part == "mlp.gate" \
            else GGUF_LINEAR_NAMES[part]
        names[module_name] = f"blk.{layer}.{gguf}.weight"
    return names


def gguf_expert_names(model: torch.nn.Module) -> dict[str, str]:
    """module name -> GGUF name prefix (`blk.3.`) for the mixture-of-experts MLPs of a flashlm Transformer's
    blocks (`blocks.3.mlp`), whose ffn_gate_exps / ffn_up_exps / ffn_down_exps the collector fills."""
    from flashlm.models.moe import MoEMLP

    names = {}
    for module_name, module in model.named_modules():
        match = _BLOCK_RE.match(module_name)
        if match and match.group(2) == "mlp" and isinstance(module, MoEMLP):
            names[module_name] = f"blk.{match.group(1)}."
    return names


def _float_experts(w) -> torch.Tensor:
    """Stacked expert matrices [E, rows, cols] as float32 (GGUFExperts dequantized)."""
    return (w.dequantize() if hasattr(w, "dequantize") else w.detach()).float()


class IMatrixCollector:
    """Forward hooks that add the squared inputs of the named modules per channel (float64) and count their
    rows (tokens); with experts (gguf_expert_names), per expert of each MoE MLP. Use as a context manager
    around forward passes; `imatrix()` gives the result."""

    def __init__(self, model: torch.nn.Module, names: dict[str, str], experts: dict[str, str] | None = None):
        experts = experts or {}
        if not names and not experts:
            raise ValueError("names: no linear layers to collect from")
        modules = dict(model.named_modules())
        missing = [n for n in (*names, *experts) if n not in modules]
        if missing:
            raise ValueError(f"names: the model has no module {missing[0]!r}")
        self._sums: dict[str, torch.Tensor] = {}    # GGUF name -> float64 [matrices, columns]
        self._counts: dict[str, torch.Tensor] = {}  # GGUF name -> int64 [matrices]
        self._handles = [modules[m].register_forward_hook(self._hook(g)) for m, g in names.items()]
        self._handles += [modules[m].register_forward_hook(self._expert_hook(p)) for m, p in experts.items()]

    def _add(self, gguf_name: str, sq: torch.Tensor, counts: torch.Tensor) -> None:
        """Adds sums sq [matrices, columns] and row counts [matrices] to gguf_name's."""
        if gguf_name in self._sums:
            if self._sums[gguf_name].shape != sq.shape:
                raise ValueError(f"{gguf_name}: input width changed from {self._sums[gguf_name].shape[-1]} "
                                 f"to {sq.shape[-1]}")
            self._sums[gguf_name] += sq
            self._counts[gguf_name] += counts
        else:
            self._sums[gguf_name], self._counts[gguf_name] = sq, counts

    def _hook(self, gguf_name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self._add(gguf_name, (x * x).sum(dim=0, keepdim=True).cpu(), torch.tensor([x.shape[0]]))
        return hook

    def _expert_hook(self, prefix: str):
        def hook(module, inputs, output):
            from flashlm.ops.moe import route

            h = inputs[0].detach()
            h = h.reshape(-1, h.shape[-1])
            _, chosen = route(module.router(h), module.top_k, renormalize=module.renormalize)
            gate, up = _float_experts(module.experts_gate), _float_experts(module.experts_up)
            n_expert = gate.shape[0]
            sq_in = torch.zeros(n_expert, h.shape[1], dtype=torch.float64)
            sq_act = torch.zeros(n_expert, gate.shape[1], dtype=torch.float64)
            counts = torch.zeros(n_expert, dtype=torch.int64)
            for e in range(n_expert):
                x = h[(chosen == e).any(dim=1)].float()
                act = torch.nn.functional.silu(x @ gate[e].T) * (x @ up[e].T)
                sq_in[e] = (x.double() ** 2).sum(0).cpu()
                sq_act[e] = (act.double() ** 2).sum(0).cpu()
                counts[e] = x.shape[0]
            self._add(prefix + "ffn_gate_exps.weight", sq_in, counts)
            self._add(prefix + "ffn_up_exps.weight", sq_in.clone(), counts.clone())
            self._add(prefix + "ffn_down_exps.weight", sq_act, counts.clone())
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "IMatrixCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def imatrix(self, chunk_size: int, datasets=()) -> IMatrix:
        entries = {}
        for name, sums in self._sums.items():
            values = sums.reshape(-1).numpy().astype(np.float32)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{name}: non-finite activations")
            entries[name] = IMatrixEntry(values, self._counts[name].numpy().astype(np.int64))
        if not entries:
            raise ValueError("imatrix: no activations were collected")
        chunk_count = max(int(c.max()) for c in self._counts.values()) // chunk_size
        return IMatrix(entries, list(datasets), chunk_count, chunk_size)


@torch.no_grad()
def collect_imatrix(model: torch.nn.Module, tokens, chunk_size: int = 512, bos_token_id: int | None = None,
                    dataset: str | None = None, fused_qkv: bool = False, fused_gate_up: bool = False,
                    progress=None) -> IMatrix:
    """Run `model` (a flashlm Transformer) over `tokens` in chunks of `chunk_size` tokens, as llama.cpp's
    imatrix tool does: the tail that does not fill a chunk is dropped, each chunk's first token is the BOS
    token where bos_token_id is given, and at least two chunks are needed. Returns the imatrix of the blocks'
    linear layers (GGUF names)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < 2 * chunk_size:
        raise ValueError(f"calibration data: {tokens.numel()} tokens; a chunk size of {chunk_size} needs at least "
                         f"{2 * chunk_size}")
    limit = getattr(getattr(model, "cfg", None), "seq_len", None)
    if limit is not None and chunk_size > limit:
        raise ValueError(f"chunk_size: {chunk_size} is longer than the model's context ({limit})")
    n_chunks = tokens.numel() // chunk_size
    chunks = tokens[:n_chunks * chunk_size].view(n_chunks, chunk_size).clone()
    if bos_token_id is not None:
        chunks[:, 0] = bos_token_id
    device = next(model.parameters()).device
    with IMatrixCollector(model, gguf_linear_names(model, fused_qkv, fused_gate_up), gguf_expert_names(model)) \
            as collector:
        for i in range(n_chunks):
            model(chunks[i:i + 1].to(device))
            if progress is not None:
                progress(i + 1, n_chunks)
        return collector.imatrix(chunk_size, [dataset] if dataset else [])
