"""`flashlm demo`: flashlm's GGUF path end to end, with nothing to download.

Writes a GGUF file holding one tensor per supported block type (quantized by gguf-py where it can
quantize, random blocks with finite scales elsewhere), reads it back with flashlm, dequantizes every
tensor and checks it bit for bit against gguf-py (llama.cpp's own Python package), and times both.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

import flashlm
from flashlm.gguf import GGUFFile
from flashlm.io.random_blocks import random_blocks

_QUANTIZED_BY_GGUF_PY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The types gguf-py cannot quantize get random blocks with finite scales.
_RANDOM_BLOCK_TYPES = ("IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
# Each tensor is rows x cols: at most 2^28 elements (1 GiB of float32 per dequantized copy).
_MAX_ELEMENTS = 1 << 28


def _make_tensor(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if name in _QUANTIZED_BY_GGUF_PY:
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    return random_blocks(name, rows * cols, rng).reshape(rows, -1)


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_demo(device: str = "cpu", rows: int = 1024, cols: int = 4096, reps: int = 5) -> int:
    device = flashlm.ops.check_device(device)
    for name, value in (("rows", rows), ("cols", cols), ("reps", reps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if cols % 256:
        raise ValueError(f"cols: must be a multiple of 256 (the K-quants' block), got {cols}")
    if rows * cols > _MAX_ELEMENTS:
        raise ValueError(f"rows x cols: at most {_MAX_ELEMENTS} elements per tensor, got {rows} x {cols}")
    info = flashlm.build_info()
    print(f"flashlm {flashlm.__version__}: {info['cpu_isa']} CPU kernels on {info['threads']} threads, "
          f"CUDA {'built' if info['cuda'] else 'not built'} ({info['cuda_status']})")
    rng = np.random.default_rng(0)
    types = list(_QUANTIZED_BY_GGUF_PY) + list(_RANDOM_BLOCK_TYPES)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.gguf"
        writer = gguf.GGUFWriter(str(path), "flashlm-demo")
        writer.add_string("general.name", "flashlm dequantization demo")
        for name in tqdm(types, desc="writing tensors", leave=False):
            writer.add_tensor(f"{name.lower()}.weight", _make_tensor(name, rows, cols, rng),
                              raw_dtype=gguf.GGMLQuantizationType[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        print(f"wrote {path.stat().st_size / 2**20:.1f} MiB: {len(types)} tensors of {rows} x {cols}\n")

        header = f"{'type':<7} {'elements':>10} {'flashlm ms':>11} {'gguf-py ms':>11} {'speedup':>8} {'GB/s':>7}  bit-exact"
        print(header)
        print("-" * len(header))
        failures = 0
        with GGUFFile(path) as f:
            for t in f.tensors:
                raw = f.raw(t.name)
                ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[t.ggml_type]).reshape(t.shape)
                out = f.load(t.name, device=device)
                exact = np.array_equal(out.cpu().numpy().view(np.uint32), ref.view(np.uint32))
                failures += not exact
                raw_dev = raw.to(device)
                out_dev = torch.empty(t.shape, device=device)

                def run():
                    flashlm.ops.dequantize(raw_dev, t.ggml_type, t.shape, out=out_dev)
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                ours = _median_seconds(run, reps)
                theirs = _median_seconds(lambda: gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[t.ggml_type]), reps)
                gbs = (t.nbytes + t.numel * 4) / ours / 1e9
                print(f"{t.ggml_type:<7} {t.numel:>10} {ours * 1e3:>11.2f} {theirs * 1e3:>11.2f} "
                      f"{theirs / ours:>7.1f}x {gbs:>7.1f}  {'yes' if exact else 'NO'}")
    print("\nGB/s counts blocks read plus float32 written. `python bench/compare_dequant.py` puts these next to "
          "a memcpy of the same size.")
    return 1 if failures else 0
