"""Build examples/cpp against the installed package with CMake (find_package(flashlm)) and run it."""

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import flashlm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"


@pytest.fixture(scope="module")
def gguf_dump(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("example-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(EXAMPLE), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={flashlm.cmake_prefix_path()}"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    return build / "gguf_dump"


def test_example_prints_metadata_tensors_and_values(gguf_dump, tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 96)).astype(np.float32)
    q4k = rng.integers(0, 256, size=(2, 144), dtype=np.uint8)
    q4k[:, 0:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # finite d, dmin
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 7)
    w.add_string("general.name", "tiny-test")
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0])
    w.add_tensor("tok_embd.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn.weight", q4k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = subprocess.run([str(gguf_dump), str(path), "blk.0.ffn.weight"], check=True, capture_output=True, text=True).stdout
    assert "GGUF v3" in out and "2 tensors" in out
    assert "llama.block_count" in out and " 7" in out and '"tiny-test"' in out
    assert "tok_embd.weight" in out and "Q8_0" in out and "[3 x 96]" in out
    assert "blk.0.ffn.weight" in out and "Q4_K" in out and "[2 x 256]" in out

    printed = out.strip().splitlines()[-1]
    assert printed.startswith("blk.0.ffn.weight as f32:")
    values = np.array([float(v) for v in printed.split(":", 1)[1].split()], dtype=np.float32)
    expected = gguf.quants.dequantize(q4k, gguf.GGMLQuantizationType.Q4_K).ravel()[:8]
    np.testing.assert_array_equal(values, expected)


def test_example_reports_a_malformed_file(gguf_dump, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    result = subprocess.run([str(gguf_dump), str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "count" in result.stderr
