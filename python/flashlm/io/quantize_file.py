"""`flashlm quantize IN OUT.gguf --type Q4_K_M`: a model to a quantized GGUF file.

IN is a GGUF file or an HF safetensors model directory (flashlm.io.hf_source). Every tensor gets the
type the mix assigns it (flashlm.quant.mix, llama.cpp's rules); F32/F16/BF16 tensors are quantized with
flashlm's quantizers (the bytes of ggml's reference quantizers); tensors already stored in a quantized type
are decoded to float32 with flashlm's dequantizer and quantized again (each round loses accuracy: a
warning says how many), unless their type is already the target, when their bytes are copied. Metadata
is copied, with general.file_type and general.quantization_version set. The file is written tensor by
tensor, so memory holds one tensor at a time. A GGUF input is read with flashlm's own reader, and the model
is checked as flashlm's loader checks a file before anything is written.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter

from flashlm import ops
from flashlm.io.gguf import GGUFFile
from flashlm.io.gguf_layout import gguf_model_config
from flashlm.io.hf_source import HFSource
from flashlm.models import ModelConfig
from flashlm.quant.gguf_quantize import GGUF_QUANT_TYPES, quantize_gguf
from flashlm.quant.imatrix import IMatrix, quantize_experts, read_imatrix
from flashlm.quant.mix import MIXES, UNSUPPORTED_MIXES, MixPlanner, ModelInfo

_FLOAT_TYPES = ("F32", "F16", "BF16")
_NUMPY_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 as its bits
# Keys the writer sets itself (general.alignment through add_custom_alignment, so that the padding it
# writes is the one the key announces).
_SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


class GGUFSource:
    """A GGUF file's metadata and tensors, read with flashlm's reader (which checks every count, offset and
    size: a malformed file is a GGUFError naming the byte offset)."""

    def __init__(self, path: str):
        self.file = GGUFFile(path)
        metadata, types = self.file.metadata, self.file.metadata_types
        self.arch = metadata.get("general.architecture")
        if not isinstance(self.arch, str):
            raise ValueError(f"{path}: no general.architecture key")
        self.metadata = [(key, value, *_value_type(types[key])) for key, value in metadata.items()
                         if key not in _SKIP_KEYS]
        self.tensors = [(t.name, t.shape, t.ggml_type) for t in self.file.tensors]
        self.alignment = self.file.alignment if "general.alignment" in metadata else None

    def load(self, index: int) -> np.ndarray:
        """The tensor's data: floats in torch order (BF16 as uint16 bits), or its blocks as uint8 bytes."""
        name, shape, type_name = self.tensors[index]
        raw = self.file.raw(name).numpy()  # a view of the mapping
        if type_name in _NUMPY_FLOATS:
            return raw.view(_NUMPY_FLOATS[type_name]).reshape(shape)
        return raw

    def close(self) -> None:
        self.file.close()  # arrays load() returned keep the mapping alive


def _value_type(type_name: str) -> tuple:
    """(GGUFValueType, item type or None) of a type as flashlm's reader names it: "UINT32", "ARRAY[STRING]"."""
    outer, _, item = type_name.partition("[")
    return GGUFValueType[outer], GGUFValueType[item.rstrip("]")] if item else None


def open_source(path: str):
    if os.path.isdir(path):
        return HFSource(path)
    if not os.path.isfile(path):
        raise ValueError(f"input: {path} is neither a GGUF file nor a model directory")
    return GGUFSource(path)


def _as_rows(data: np.ndarray, type_name: str, shape: tuple[int, ...]):
    """A [rows, ncols] float view of a tensor for the quantizer (bf16 as a torch tensor)."""
    ncols = shape[-1] if shape else 1
    if type_name == "BF16":
        # a copy: torch will not wrap a read-only (memory-mapped) array
        return torch.from_numpy(np.array(data, dtype=np.uint16).reshape(-1, ncols)).view(torch.bfloat16)
    if type_name in ("F32", "F16"):
        return np.ascontiguousarray(data).reshape(-1, ncols)
    # a quantized type: decode with flashlm's dequantizer
    raw = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(-1))
    return ops.dequantize(raw, type_name, (int(np.prod(shape[:-1], dtype=np.int64)), ncols)).numpy()


def _byte_shape(shape: tuple[int, ...], block: int, block_bytes: int) -> tuple[int, ...]:
    """The shape GGUFWriter takes for raw bytes: torch order, the last dimension in bytes."""
    return (*shape[:-1], shape[-1] // block * block_bytes)


def check_model(source) -> ModelConfig:
    """The model `source` describes, checked as load_gguf checks a file (flashlm.io.gguf_layout): a writer
    refuses what the loader would refuse, before it writes anything."""
    metadata = {key: value for key, value, _, _ in source.metadata} | {"general.architecture": source.arch}
    shapes = {}
    for name, shape, _ in source.tensors:
        if name in shapes:
            raise ValueError(f"tensor {name!r}: appears twice")
        shapes[name] = tuple(shape)
    # The context the loader builds is its caller's max_model_len: the checks of the rest hold for any.
    return gguf_model_config(metadata, shapes, max_model_len=1)


def plan(source, cfg: ModelConfig, mix: str, has_imatrix: bool = False, keep_float=(), types=None) -> list[str]:
    """The GGML type of every tensor of `source` (a cfg model) under `mix`, in file order, the tensors that
    `keep_float` names (flashlm.quant.mix.parse_keep_float) left float, those in `types` ({name: type}) in
    their own type."""
    names = [name for name, _, _ in source.tensors]
    planner = MixPlanner(mix, ModelInfo(cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_kv_head), names, has_imatrix,
                         keep_float, types)
    return [planner.type_for(name, shape, current) for name, shape, current in source.tensors]


def quantize_file(src_path: str, dst_path: str, mix: str, progress: bool = True,
                  imatrix: str | None = None, keep_float=()) -> list[tuple[str, str, str]]:
    """Write `src_path` (GGUF file or HF model directory) to `dst_path` quantized with `mix` ("Q4_K_M", ...),
    with the importance matrix file `imatrix` (GGUF or legacy .dat) where given, the tensors `keep_float`
    names ("attn_v,ffn_down", "blk.0.ffn_down": flashlm.quant.mix.parse_keep_float) left float.

    Returns [(tensor name, type in, type out)] in file order.
    """
    if os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise ValueError("output: must not be the input file")
    _check_mix(mix)
    m = None if imatrix is None else read_imatrix(imatrix)
    source = open_source(src_path)
    try:
        return write_quantized(source, dst_path, mix, progress, imatrix=m, keep_float=keep_float)
    finally:
        if hasattr(source, "close"):
            source.close()


def _check_mix(mix: str) -> str:
    if isinstance(mix, str) and mix.upper() in UNSUPPORTED_MIXES:
        raise NotImplementedError(f"type: {mix.upper()} is not supported (its types, which llama.cpp writes only "
                                  f"with an importance matrix or not at all, have no flashlm quantizer); "
                                  f"supported: {', '.join(MIXES)}")
    if not isinstance(mix, str) or mix.upper() not in MIXES:
        raise ValueError(f"type: expected one of {', '.join(MIXES)}, got {mix!r}")
    return mix.upper()


def write_quantized(source, dst_path: str, mix: str, progress: bool = True,
                    imatrix: IMatrix | None = None, keep_float=(), types=None) -> list[tuple[str, str, str]]:
    """Write the tensors and metadata of `source` to the GGUF file `dst_path`, each tensor in the type `mix`
    gives it (float for those `keep_float` names, its own for those in `types`: {name: GGML type}), quantized
    with its entry of `imatrix` where it has one.

    source: an object with `arch` (GGUF architecture), `metadata` [(key, value, GGUFValueType, item type)],
        `tensors` [(GGUF name, shape in torch order, stored type name)] in file order and `load(index)` ->
        the tensor's data as GGUFSource.load gives it; optionally `alignment`. GGUFSource, HFSource and
        flashlm.train.export's model source are such. The model is checked first (check_model).
    """
    mix = _check_mix(mix)
    if imatrix is not None:
        check_imatrix(imatrix, source)
    targets = plan(source, check_model(source), mix, has_imatrix=imatrix is not None, keep_float=keep_float,
                   types=types)
    for (name, _, current), target in zip(source.tensors, targets):
        if target != current and current not in _FLOAT_TYPES and current not in GGUF_QUANT_TYPES:
            raise ValueError(f"{name}: stored as {current}, which flashlm cannot decode to quantize to {target}")
    requantized = [n for (n, _, c), t in zip(source.tensors, targets) if c != t and c not in _FLOAT_TYPES]
    if requantized:
        warnings.warn(f"{len(requantized)} tensors are already quantized and are decoded and quantized again, "
                      f"which adds error (first: {requantized[0]}); quantize from F32/F16/BF16 weights where possible",
                      stacklevel=2)

    writer = GGUFWriter(dst_path, source.arch)
    try:
        return _write(writer, source, mix, targets, progress, imatrix)
    except BaseException:
        if writer.fout is not None:  # a half-written file is no GGUF file: leave none behind
            writer.close()
            os.remove(dst_path)
        raise


def check_imatrix(imatrix: IMatrix, source) -> None:
    """Every entry of `imatrix` must name a 2-D or 3-D weight of `source` and hold one value per column of
    each of its matrices: anything else is an imatrix for another model."""
    shapes = {name: tuple(shape) for name, shape, _ in source.tensors}
    for name in imatrix.entries:
        if name not in shapes:
            raise ValueError(f"imatrix: entry {name!r} is not a tensor of this model (an imatrix for another model?)")
        shape = shapes[name]
        matrices = shape[0] if len(shape) == 3 else 1
        want = shape[-1] * matrices
        got = len(imatrix.importance(name))
        if len(shape) < 2 or got != want:
            raise ValueError(f"imatrix: entry {name!r} has {got} values, the tensor {list(shape)} needs {want} "
                             f"(an imatrix for another model?)")
        counted = len(imatrix.entries[name].counts)
        if not imatrix.legacy and counted != matrices:  # a legacy entry holds one ncall, whatever its matrices
            raise ValueError(f"imatrix: entry {name!r} has {counted} matrices of {got // counted} values, the tensor "
                             f"{list(shape)} is {matrices} of {shape[-1]} (an imatrix for another model?)")


def _imatrix_metadata(writer, imatrix: IMatrix) -> None:
    """The keys llama.cpp's quantize tool writes about the imatrix it used."""
    writer.add_string("quantize.imatrix.file", imatrix.path[:127])
    if imatrix.datasets:
        writer.add_string("quantize.imatrix.dataset", imatrix.datasets[0][:127])
    writer.add_uint32("quantize.imatrix.entries_count", len(imatrix.entries))
    if imatrix.chunk_count > 0:
        writer.add_uint32("quantize.imatrix.chunks_count", imatrix.chunk_count)


def _write(writer, source, mix: str, targets: list, progress: bool, imatrix: IMatrix | None) -> list[tuple[str, str, str]]:
    if getattr(source, "alignment", None):
        writer.add_custom_alignment(source.alignment)
    for key, value, vtype, sub in source.metadata:
        if imatrix is not None and key.startswith("quantize.imatrix."):
            continue  # replaced by this imatrix's
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(int(MIXES[mix][1]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    if imatrix is not None:
        _imatrix_metadata(writer, imatrix)
    for (name, shape, _), target in zip(source.tensors, targets):
        qtype = GGMLQuantizationType[target]
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, _byte_shape(shape, block, block_bytes), np.dtype(np.uint8),
                               int(np.prod(shape, dtype=np.int64)) // block * block_bytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    bar = _progress(sum(int(np.prod(s, dtype=np.int64)) for _, s, _ in source.tensors), progress)
    report = []
    for index, ((name, shape, current), target) in enumerate(zip(source.tensors, targets)):
        if bar is not None:
            bar.set_postfix_str(f"{name} -> {target}", refresh=False)
        data = source.load(index)
        if target == current:  # kept as stored
            out = np.ascontiguousarray(data).view(np.uint8)
        else:
            weights = imatrix.importance(name) if imatrix is not None and name in imatrix.entries else None
            if weights is not None and len(shape) == 3:  # experts: one run of the values per expert
                out = quantize_experts(_as_rows(data, current, shape), target, weights, int(shape[0]))
            else:
                out = quantize_gguf(_as_rows(data, current, shape), target, imatrix=weights)
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[target]]
        out = out.reshape(_byte_shape(shape, block, block_bytes))
        writer.write_tensor_data(out)
        report.append((name, current, target))
        if bar is not None:
            bar.update(int(np.prod(shape, dtype=np.int64)))
    if bar is not None:
        bar.close()
    writer.close()
    return report


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="el", unit_scale=True, desc="quantize", file=sys.stderr, disable=None)
