"""Reading GGUF files.

The parsing happens in libflashlm (csrc/gguf/reader.cpp), which treats the file as untrusted: any
malformed header, count, string, offset or size raises `GGUFError` (a ValueError). Tensor data is never
copied: `raw()` returns a uint8 tensor viewing the file's memory mapping, and `load()` dequantizes from it.

    with GGUFFile("model.gguf") as f:
        print(f.metadata["general.architecture"])
        for t in f.tensors:
            print(t.name, t.ggml_type, t.shape)
        w = f.load("blk.0.attn_q.weight", dtype=torch.bfloat16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Union

import torch

from flashlm import ops

GGUFError = ops.GGUFError

# GGML types stored as plain numbers: load() views and converts them instead of dequantizing.
_PLAIN_DTYPES = {
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str                # "Q4_K", "F16", ...
    ggml_type_id: int
    gguf_shape: tuple[int, ...]   # GGUF order: innermost (contiguous) dimension first
    shape: tuple[int, ...]        # torch order: gguf_shape reversed
    offset: int                   # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A GGUF file (version 2 or 3), memory-mapped. Use as a context manager or call close()."""

    def __init__(self, path: Union[str, os.PathLike]):
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no such file: '{self.path}'")
        self._reader = ops.GGUFReader(self.path)
        self.tensors: list[TensorInfo] = [
            TensorInfo(name, type_name, type_id, tuple(dims), tuple(reversed(dims)), offset, nbytes)
            for name, type_id, type_name, dims, offset, nbytes in self._reader.tensors()
        ]
        self._index = {t.name: i for i, t in enumerate(self.tensors)}

    # -- header ------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._reader.version

    @property
    def alignment(self) -> int:
        return self._reader.alignment

    @property
    def data_offset(self) -> int:
        """Where the tensor data section starts."""
        return self._reader.data_offset

    @cached_property
    def _metadata(self) -> list[tuple[str, str, Any]]:
        return self._reader.metadata()

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key-value pair, as Python values (arrays as lists), in file order."""
        return {key: value for key, _, value in self._metadata}

    @property
    def metadata_types(self) -> dict[str, str]:
        """The GGUF type of every value: "UINT32", "STRING", "ARRAY[FLOAT32]", ..."""
        return {key: type_name for key, type_name, _ in self._metadata}

    # -- tensors -----------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        if not isinstance(name, str):
            raise TypeError(f"name: expected a tensor name (a str), got {type(name).__name__}")
        try:
            return self.tensors[self._index[name]]
        except KeyError:
            raise KeyError(f"no tensor named '{name}' in {self.path}") from None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 CPU tensor viewing the mapping (no copy; valid after close())."""
        self.tensor(name)
        return torch.from_numpy(self._reader.raw(self._index[name]))

    def load(self, name: str, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """The tensor dequantized to `dtype` (float32, float16 or bfloat16) in torch order, on `device`."""
        device = ops.check_device(device)
        info = self.tensor(name)
        raw = self.raw(name)
        if info.ggml_type in _PLAIN_DTYPES:
            return raw.view(_PLAIN_DTYPES[info.ggml_type]).reshape(info.shape).to(device=device, dtype=dtype)
        if not ops.dequantize_supported(info.ggml_type):
            raise ValueError(f"tensor '{name}': dequantizing {info.ggml_type} is not supported")
        raw = raw.to(device)  # dequantize where the result lives: moving blocks is cheaper than floats
        return ops.dequantize(raw, info.ggml_type, info.shape, out_dtype=dtype)

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        self._reader.close()

    @property
    def closed(self) -> bool:
        return self._reader.closed

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"v{self.version}, {len(self.tensors)} tensors"
        return f"GGUFFile('{self.path}', {state})"
