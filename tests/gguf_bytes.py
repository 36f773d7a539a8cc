"""A tiny GGUF writer for tests that must control every byte (malformed files, empty arrays, no metadata).

Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 kv count, the key-value pairs, the tensor
infos, zero padding to the alignment, the tensor data. Values are written with `value(type, v)`; an ARRAY
value is `(element_type, items)`, and the items of an array of ARRAY are `(element_type, items)` again.
"""

from __future__ import annotations

import struct

# GGUF value types, numbered as in the file format.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

_SCALAR_FORMATS = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<B",
    UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}

# ggml type ids and their (elements per block, bytes per block).
F32, F16, Q4_0, Q8_0, Q4_K, I32, BF16 = 0, 1, 2, 8, 12, 26, 30
BLOCKS = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34), Q4_K: (256, 144), I32: (1, 4), BF16: (1, 2)}


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def string(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return u64(len(data)) + data


def value(vtype: int, v) -> bytes:
    """The bytes of a value of type `vtype` (without the type itself)."""
    if vtype in _SCALAR_FORMATS:
        return struct.pack(_SCALAR_FORMATS[vtype], v)
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        elem_type, items = v
        return u32(elem_type) + u64(len(items)) + b"".join(value(elem_type, item) for item in items)
    raise ValueError(f"unknown value type {vtype}")


def kv(key: str | bytes, vtype: int, v) -> bytes:
    return string(key) + u32(vtype) + value(vtype, v)


def tensor_info(name: str | bytes, dims, ggml_type: int, offset: int) -> bytes:
    """dims in GGUF order (innermost first); offset relative to the start of the data section."""
    return string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def nbytes(dims, ggml_type: int) -> int:
    block, size = BLOCKS[ggml_type]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + u32(version) + u64(n_tensors) + u64(n_kv)


def pad_to(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def gguf(kvs=(), infos=(), data: bytes = b"", *, version: int = 3, alignment: int = 32, n_tensors=None, n_kv=None,
         magic: bytes = b"GGUF") -> bytes:
    """A whole file: the counts default to len(infos) and len(kvs); the data section starts at the next
    multiple of `alignment` after the tensor infos (pass the alignment used in a general.alignment kv)."""
    head = header(len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv, version, magic)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(pad_to(len(head), alignment) - len(head)) + data


def with_tensors(tensors, kvs=(), *, alignment: int = 32, **kw) -> bytes:
    """A file holding `tensors` = [(name, dims, ggml_type)], each filled with a byte pattern, laid out one
    after the other at aligned offsets (the last one unpadded, so the file ends where its data ends)."""
    infos, data = [], b""
    for name, dims, ggml_type in tensors:
        data += bytes(pad_to(len(data), alignment) - len(data))
        infos.append(tensor_info(name, dims, ggml_type, len(data)))
        data += bytes((len(data) + i) % 251 for i in range(nbytes(dims, ggml_type)))
    return gguf(kvs, infos, data, alignment=alignment, **kw)
