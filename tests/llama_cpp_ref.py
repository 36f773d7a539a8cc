"""llama.cpp's own reference quantizers, compiled from its C sources for byte-for-byte comparison.

The sources come from the llama-cpp-python sdist on PyPI (vendor/llama.cpp/ggml/...): `.ci/run` downloads
it (download only, nothing is built with pip) and points FLASHLM_LLAMA_CPP_SRC at the .tar.gz or at an
unpacked tree; without the variable, ~/.cache/flashlm is searched for an sdist. `load()` unpacks what is
needed, compiles ggml-quants.c with a few stubs for the functions it calls from ggml.c (none on the paths
used here) into a shared library with -ffp-contract=off (as ggml's reference is meant to round), caches
it, and returns a `Reference`, or None when no source can be found. `vocab_dir()` unpacks the same
source's tokenizer test data (vendor/llama.cpp/models/ggml-vocab-*).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tarfile

import numpy as np

ENV_VAR = "FLASHLM_LLAMA_CPP_SRC"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "flashlm")

# name -> (elements per block, bytes per block) of the reference row quantizers compared here.
TYPES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}

# name -> (elements per block, bytes per block) of the types whose quantize_<type>(src, dst, nrow, n_per_row,
# imatrix) is compared here: what llama.cpp's quantize tool calls, with or without an imatrix.
IMATRIX_TYPES = {name: TYPES[name] for name in TYPES if name != "Q8_0"} | {"IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}

# ggml-quants.c calls these from ggml.c: ggml_row_size from the quantize_<type> functions (for the types
# of IMATRIX_TYPES, by ggml's type numbers), the rest only outside the quantizers compared here.
_STUBS = r"""
#include <stdlib.h>
#include "ggml.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    switch (type) {
        case GGML_TYPE_Q4_0: return ne / 32 * 18;
        case GGML_TYPE_Q4_1: return ne / 32 * 20;
        case GGML_TYPE_Q5_0: return ne / 32 * 22;
        case GGML_TYPE_Q5_1: return ne / 32 * 24;
        case GGML_TYPE_Q2_K: return ne / 256 * 84;
        case GGML_TYPE_Q3_K: return ne / 256 * 110;
        case GGML_TYPE_Q4_K: return ne / 256 * 144;
        case GGML_TYPE_Q5_K: return ne / 256 * 176;
        case GGML_TYPE_Q6_K: return ne / 256 * 210;
        case GGML_TYPE_IQ4_NL: return ne / 32 * 18;
        case GGML_TYPE_IQ4_XS: return ne / 256 * 136;
        default: abort();
    }
}
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void)type; abort(); }
"""


def find_source() -> str | None:
    """The sdist (.tar.gz) or unpacked llama-cpp-python tree to use, or None."""
    path = os.environ.get(ENV_VAR)
    if path:
        return path if os.path.exists(path) else None
    found = sorted(glob.glob(os.path.join(CACHE_DIR, "llama_cpp_python-*.tar.gz")))
    return found[-1] if found else None


def _unpack(src: str, dest: str) -> str:
    """The ggml directory of the source, unpacked under dest when src is an sdist."""
    if os.path.isdir(src):
        hits = glob.glob(os.path.join(src, "**", "ggml", "src", "ggml-quants.c"), recursive=True)
        if not hits:
            raise FileNotFoundError(f"{ENV_VAR}={src}: no ggml/src/ggml-quants.c below it")
        return os.path.dirname(os.path.dirname(hits[0]))
    with tarfile.open(src) as tar:
        wanted = [m for m in tar.getmembers() if m.isfile() and "/vendor/llama.cpp/ggml/" in m.name and
                  (m.name.endswith(".h") and ("/ggml/include/" in m.name or m.name.count("/src/") == 1)
                   or m.name.endswith("/ggml/src/ggml-quants.c"))]
        if not any(m.name.endswith("ggml-quants.c") for m in wanted):
            raise FileNotFoundError(f"{src}: no vendor/llama.cpp/ggml/src/ggml-quants.c in the sdist")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.12 and backports
        tar.extractall(dest, members=wanted, **safe)
    quants = next(os.path.join(dest, m.name) for m in wanted if m.name.endswith("ggml-quants.c"))
    return os.path.dirname(os.path.dirname(quants))


def _compile(src: str) -> str:
    """Path of the compiled reference library, built once per source file and cached."""
    digest = hashlib.sha256((os.path.abspath(src) + str(os.path.getmtime(src)) + _STUBS).encode()).hexdigest()[:16]
    build = os.path.join(CACHE_DIR, f"ggml-ref-{digest}")
    lib = os.path.join(build, "libggmlref.so")
    if os.path.exists(lib):
        return lib
    tmp = build + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ggml = _unpack(src, tmp)
    with open(os.path.join(tmp, "stubs.c"), "w") as f:
        f.write(_STUBS)
    inc = [f"-I{ggml}/include", f"-I{ggml}/src", f"-I{ggml}/src/ggml-cpu"]
    cmd = [os.environ.get("CC", "cc"), "-O2", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-DNDEBUG",
           *inc, f"{ggml}/src/ggml-quants.c", os.path.join(tmp, "stubs.c"), "-o", os.path.join(tmp, "libggmlref.so"),
           "-lm"]
    subprocess.run(cmd, check=True, capture_output=True)
    os.makedirs(build, exist_ok=True)
    os.replace(os.path.join(tmp, "libggmlref.so"), lib)
    shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _c_name(name: str) -> str:
    return name.lower().replace("_k", "_K")


class Reference:
    """ggml's quantize_row_<type>_ref for each name in TYPES, and its quantize_<type> (what llama.cpp's
    quantize tool calls, taking an imatrix) for each name in IMATRIX_TYPES."""

    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        self._fns, self._chunk_fns = {}, {}
        for name in TYPES:
            fn = getattr(self.lib, f"quantize_row_{_c_name(name)}_ref")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            self._fns[name] = fn
        for name in IMATRIX_TYPES:
            fn = getattr(self.lib, f"quantize_{_c_name(name)}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            fn.restype = ctypes.c_size_t
            self._chunk_fns[name] = fn

    def quantize_imatrix(self, x: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
        """Rows of a 2-D float32 array to a uint8 array [rows, bytes_per_row] by one quantize_<type> call,
        with the importance values `imatrix` (one per column) or None."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        block, block_bytes = IMATRIX_TYPES[name]
        rows, n = x.shape
        out = np.zeros((rows, n // block * block_bytes), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert qw.shape == (n,)
        written = self._chunk_fns[name](x.ctypes.data, out.ctypes.data, rows, n, None if qw is None else qw.ctypes.data)
        assert written == out.size, (written, out.size)
        return out

    def quantize(self, x: np.ndarray, name: str) -> np.ndarray:
        """Rows of a 2-D float32 array to a uint8 array [rows, bytes_per_row], one reference call per row."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        block, block_bytes = TYPES[name]
        rows, n = x.shape
        out = np.zeros((rows, n // block * block_bytes), dtype=np.uint8)
        for r in range(rows):
            self._fns[name](x[r].ctypes.data, out[r].ctypes.data, n)
        return out


# llama.cpp's imatrix reader (common/imatrix-loader.cpp, what llama-quantize --imatrix calls), built against
# the installed llama-cpp-python's libggml-base with two small stand-ins for the common/ headers it uses, and
# a C entry point that dumps what it read as text (floats in hex, so exactly).
_LOADER_SHIMS = {
    "common.h": r"""
#pragma once
#include <string>
inline bool string_remove_suffix(std::string & s, const std::string & suffix) {
    if (s.size() < suffix.size() || s.compare(s.size() - suffix.size(), suffix.size(), suffix) != 0) return false;
    s.resize(s.size() - suffix.size());
    return true;
}
""",
    "log.h": "#pragma once\n#include <cstdio>\n#define LOG_ERR(...) fprintf(stderr, __VA_ARGS__)\n",
    "dump.cpp": r"""
#include <cstdio>
#include "imatrix-loader.h"
extern "C" int imatrix_dump(const char * fname, const char * out) {
    common_imatrix m;
    if (!common_imatrix_load(fname, m)) return 1;
    FILE * f = fopen(out, "w");
    if (!f) return 2;
    fprintf(f, "%d %d %d %d %zu %zu\n", (int) m.is_legacy, (int) m.has_metadata, m.chunk_count, m.chunk_size,
            m.datasets.size(), m.entries.size());
    for (const auto & d : m.datasets) fprintf(f, "%s\n", d.c_str());
    for (const auto & [name, e] : m.entries) {
        fprintf(f, "%s\n%zu", name.c_str(), e.sums.size());
        for (float v : e.sums) fprintf(f, " %a", (double) v);
        fprintf(f, "\n%zu", e.counts.size());
        for (long long c : e.counts) fprintf(f, " %lld", c);
        fprintf(f, "\n");
    }
    return fclose(f) == 0 ? 0 : 3;
}
""",
}


def imatrix_loader():
    """A function path -> dict (is_legacy, has_metadata, chunk_count, chunk_size, datasets, entries {name:
    (sums, counts)}) that reads an imatrix file with llama.cpp's own loader, or None (no sources, no
    llama-cpp-python, no C++ compiler). A file the loader refuses gives None from the function."""
    src = find_source()
    try:
        import llama_cpp
    except ImportError:
        return None
    if src is None or os.path.isdir(src) or shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    key = os.path.abspath(src) + str(os.path.getmtime(src)) + libdir + repr(sorted(_LOADER_SHIMS.items()))
    build = os.path.join(CACHE_DIR, "imatrix-loader-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    lib = os.path.join(build, "libimatrixloader.so")
    if not os.path.exists(lib):
        tmp = build + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                if m.isfile() and (m.name.endswith(("/common/imatrix-loader.cpp", "/common/imatrix-loader.h")) or
                                   "/vendor/llama.cpp/ggml/include/" in m.name):
                    with tar.extractfile(m) as f, open(os.path.join(tmp, os.path.basename(m.name)), "wb") as out:
                        shutil.copyfileobj(f, out)
        for name, text in _LOADER_SHIMS.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        cmd = [os.environ.get("CXX", "c++"), "-O1", "-std=c++17", "-fPIC", "-shared", f"-I{tmp}",
               os.path.join(tmp, "imatrix-loader.cpp"), os.path.join(tmp, "dump.cpp"), f"-L{libdir}", "-lggml-base",
               f"-Wl,-rpath,{libdir}", "-o", os.path.join(tmp, "libimatrixloader.so")]
        subprocess.run(cmd, check=True, capture_output=True)
        os.makedirs(build, exist_ok=True)
        os.replace(os.path.join(tmp, "libimatrixloader.so"), lib)
        shutil.rmtree(tmp, ignore_errors=True)
    dump = ctypes.CDLL(lib).imatrix_dump
    dump.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

    def load(path: str):
        out = path + ".dump"
        if dump(os.fsencode(path), os.fsencode(out)) != 0:
            return None
        with open(out) as f:
            lines = f.read().split("\n")
        os.remove(out)
        legacy, has_meta, chunk_count, chunk_size, n_datasets, n_entries = map(int, lines[0].split())
        datasets, entries, i = lines[1:1 + n_datasets], {}, 1 + n_datasets
        for _ in range(n_entries):
            sums = [float.fromhex(v) for v in lines[i + 1].split()[1:]]
            counts = [int(v) for v in lines[i + 2].split()[1:]]
            entries[lines[i]] = (np.array(sums, np.float32), np.array(counts, np.int64))
            i += 3
        return dict(is_legacy=bool(legacy), has_metadata=bool(has_meta), chunk_count=chunk_count,
                    chunk_size=chunk_size, datasets=datasets, entries=entries)

    return load


def vocab_dir() -> str | None:
    """A directory holding llama.cpp's tokenizer test data (models/ggml-vocab-*.gguf with their .inp/.out
    strings), unpacked once from the source into the cache; None when no source can be found."""
    src = find_source()
    if src is None:
        return None
    if os.path.isdir(src):
        hits = glob.glob(os.path.join(src, "**", "models", "ggml-vocab-*.gguf"), recursive=True)
        if not hits:
            raise FileNotFoundError(f"{ENV_VAR}={src}: no models/ggml-vocab-*.gguf below it")
        return os.path.dirname(hits[0])
    digest = hashlib.sha256((os.path.abspath(src) + str(os.path.getmtime(src))).encode()).hexdigest()[:16]
    dest = os.path.join(CACHE_DIR, f"ggml-vocabs-{digest}")
    if not os.path.isdir(dest):
        tmp = dest + f".tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                name = os.path.basename(m.name)
                if m.isfile() and "/vendor/llama.cpp/models/" in m.name and name.startswith("ggml-vocab-"):
                    with tar.extractfile(m) as f, open(os.path.join(tmp, name), "wb") as out:
                        shutil.copyfileobj(f, out)
        if not glob.glob(os.path.join(tmp, "ggml-vocab-*.gguf")):
            raise FileNotFoundError(f"{src}: no vendor/llama.cpp/models/ggml-vocab-*.gguf in the sdist")
        if os.path.isdir(dest):  # unpacked meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    return dest


def load() -> Reference | None:
    src = find_source()
    if src is None:
        return None
    return Reference(_compile(src))
