"""flashlm.gguf.GGUFFile on well-formed files, checked against what was written and against gguf-py's reader
(gguf.GGUFReader) and dequantizer (gguf.quants.dequantize)."""

import gc
import math

import gguf
import numpy as np
import pytest
import torch

import gguf_bytes as gb
from flashlm.gguf import GGUFError, GGUFFile

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

# (key, GGUF type, value): every scalar type at its extremes, and strings beyond ASCII.
SCALARS = [
    ("t.u8", VT.UINT8, 255), ("t.i8", VT.INT8, -128), ("t.u16", VT.UINT16, 65535), ("t.i16", VT.INT16, -32768),
    ("t.u32", VT.UINT32, 2**32 - 1), ("t.i32", VT.INT32, -(2**31)), ("t.f32", VT.FLOAT32, 0.1),
    ("t.bool_true", VT.BOOL, True), ("t.bool_false", VT.BOOL, False),
    ("t.str", VT.STRING, "héllo wörld ✓ 日本語 𝄞"), ("t.str_nul", VT.STRING, "a\x00b"),
    ("t.u64", VT.UINT64, 2**64 - 1), ("t.i64", VT.INT64, -(2**63)), ("t.f64", VT.FLOAT64, math.pi * 1e300),
    ("t.f32_inf", VT.FLOAT32, float("-inf")), ("t.f64_tiny", VT.FLOAT64, 5e-324),
]
ARRAYS = [
    ("a.u8", VT.UINT8, [0, 1, 255]), ("a.i8", VT.INT8, [-128, 0, 127]), ("a.u16", VT.UINT16, [0, 65535]),
    ("a.i16", VT.INT16, [-32768, 32767]), ("a.u32", VT.UINT32, [2**32 - 1, 7]), ("a.i32", VT.INT32, [-(2**31), 2**31 - 1]),
    ("a.f32", VT.FLOAT32, [1.5, -0.1, 3e38]), ("a.bool", VT.BOOL, [True, False, True]),
    ("a.str", VT.STRING, ["", "ascii", "ünïcödé", "🦙" * 3]), ("a.u64", VT.UINT64, [2**64 - 1, 0]),
    ("a.i64", VT.INT64, [-(2**63), 2**63 - 1]), ("a.f64", VT.FLOAT64, [math.e, -1e-300]),
]
NESTED = [[1, 2, 3], ["x", "yz"], [[1.5], [2.5, 3.5]]]  # ARRAY of ARRAY of INT32, STRING, ARRAY[FLOAT32]


def as_float32(x: float) -> float:
    return float(np.float32(x))


def expected_scalar(vtype, v):
    return as_float32(v) if vtype == VT.FLOAT32 else v


def expected_nested(v):
    return [expected_nested(x) for x in v] if isinstance(v, list) else (as_float32(v) if isinstance(v, float) else v)


def f16_scales(rng, n):
    return rng.uniform(-0.05, 0.05, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_q4_k(rng, rows, cols):
    """Q4_K blocks of random bytes whose two f16 scales (d, dmin) are small finite numbers."""
    n_blocks = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    blocks[:, 0:2] = f16_scales(rng, n_blocks)
    blocks[:, 2:4] = f16_scales(rng, n_blocks)
    return blocks.reshape(rows, cols // 256 * 144)


def make_tensors(seed=0):
    """{name: (numpy array to write, raw_dtype or None)} covering plain and block types."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    bf16 = (normal(4, 16).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(4, 32)
    return {
        "f32.1d": (normal(7), None),
        "f32.4d": (normal(2, 3, 4, 5), None),
        "f16": (normal(3, 33).astype(np.float16), None),
        "bf16": (bf16, QT.BF16),
        "f64": (rng.standard_normal(5), None),
        "i8": (rng.integers(-128, 128, size=(2, 3), dtype=np.int8), None),
        "i16": (rng.integers(-(2**15), 2**15, size=(3, 2), dtype=np.int16), None),
        "i32": (rng.integers(-(2**31), 2**31, size=(2, 2, 3), dtype=np.int32), None),
        "i64": (rng.integers(-(2**62), 2**62, size=(4,), dtype=np.int64), None),
        "blk.0.q8_0": (gguf.quants.quantize(normal(4, 64), QT.Q8_0), QT.Q8_0),
        "blk.0.q4_0": (gguf.quants.quantize(normal(3, 96), QT.Q4_0), QT.Q4_0),
        "blk.1.q4_k": (random_q4_k(rng, 2, 512), QT.Q4_K),
        "empty": (np.zeros((0, 8), np.float32), None),
        "scalar": (np.array(2.5, np.float32), None),
    }


def write_model(path, alignment=None, tensors=None, metadata=True):
    w = gguf.GGUFWriter(path, "test")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if metadata:
        for key, vtype, v in SCALARS:
            w.add_key_value(key, v, vtype)
        for key, vtype, v in ARRAYS:
            w.add_key_value(key, v, VT.ARRAY, sub_type=vtype)
        w.add_key_value("a.nested", NESTED, VT.ARRAY)
    for name, (array, raw_dtype) in (make_tensors() if tensors is None else tensors).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("gguf") / "model.gguf")


def test_metadata_values_and_types(model):
    with GGUFFile(model) as f:
        md, types = f.metadata, f.metadata_types
        assert f.version == 3 and f.alignment == 32
        assert list(md)[0] == "general.architecture" and md["general.architecture"] == "test"
        for key, vtype, v in SCALARS:
            assert md[key] == expected_scalar(vtype, v), key
            assert type(md[key]) is type(v), key
            assert types[key] == vtype.name, key
        for key, vtype, v in ARRAYS:
            assert md[key] == [expected_scalar(vtype, x) for x in v], key
            assert all(type(x) is type(y) for x, y in zip(md[key], v)), key
            assert types[key] == f"ARRAY[{vtype.name}]", key
        assert md["a.nested"] == expected_nested(NESTED)
        assert types["a.nested"] == "ARRAY[ARRAY]"


def test_metadata_matches_gguf_py(model):
    ref = gguf.GGUFReader(model)
    with GGUFFile(model) as f:
        md = f.metadata
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(md) == keys
        for key in keys:
            field = ref.fields[key]
            if field.types[-1] == VT.ARRAY or field.types[:2] == [VT.ARRAY, VT.ARRAY]:
                continue  # gguf-py flattens nested arrays
            assert md[key] == field.contents(), key
            assert f.metadata_types[key].split("[")[0] == field.types[0].name, key


def test_tensor_infos_match_gguf_py(model):
    written = make_tensors()
    ref = {t.name: t for t in gguf.GGUFReader(model).tensors}
    with GGUFFile(model) as f:
        assert [t.name for t in f.tensors] == list(written)
        for t in f.tensors:
            r = ref[t.name]
            assert t.ggml_type == r.tensor_type.name and t.ggml_type_id == int(r.tensor_type)
            assert t.gguf_shape == tuple(int(d) for d in r.shape), t.name
            assert t.shape == tuple(reversed(t.gguf_shape))
            assert t.nbytes == r.n_bytes and t.offset == r.data_offset, t.name
            assert t.offset % f.alignment == 0 and (t.offset - f.data_offset) % f.alignment == 0
            array, raw_dtype = written[t.name]
            if raw_dtype is None:
                assert t.shape == array.shape, t.name
            assert f.tensor(t.name) is t
        with pytest.raises(KeyError, match="nope"):
            f.tensor("nope")


def test_raw_bytes_match_what_was_written(model):
    with GGUFFile(model) as f:
        for name, (array, _) in make_tensors().items():
            raw = f.raw(name)
            assert raw.dtype == torch.uint8 and raw.dim() == 1
            assert raw.numpy().tobytes() == array.tobytes(), name
        # The view points into the file's mapping: the bytes sit at the tensor's offset on disk.
        disk = model.read_bytes()
        t = f.tensor("blk.1.q4_k")
        assert disk[t.offset:t.offset + t.nbytes] == f.raw(t.name).numpy().tobytes()


@pytest.mark.parametrize("name", ["f32.1d", "f32.4d", "f16", "bf16", "blk.0.q8_0", "blk.0.q4_0", "blk.1.q4_k", "empty", "scalar"])
def test_load_equals_gguf_py_dequantize(model, name):
    with GGUFFile(model) as f:
        info = f.tensor(name)
        raw = f.raw(name).numpy()
        qtype = QT(info.ggml_type_id)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = info.shape[:-1] + (info.shape[-1] // block * size,) if info.shape else raw.shape
        ref = gguf.quants.dequantize(raw.reshape(byte_shape), qtype)
        ref = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(info.shape)
        out = f.load(name)
        assert out.dtype == torch.float32 and out.shape == info.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for dtype in (torch.float16, torch.bfloat16):
            torch.testing.assert_close(f.load(name, dtype=dtype), ref.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["f64", "i8", "i16", "i32", "i64"])
def test_load_plain_types(model, name):
    array = make_tensors()[name][0]
    with GGUFFile(model) as f:
        out = f.load(name, dtype=torch.float64)
        assert out.shape == array.shape
        assert torch.equal(out, torch.from_numpy(array.astype(np.float64)))
        assert torch.equal(f.load(name), torch.from_numpy(array).to(torch.float32))


@pytest.mark.parametrize("alignment", [1, 8, 64, 256, 4096])
def test_custom_alignment(tmp_path, alignment):
    path = write_model(tmp_path / "a.gguf", alignment=alignment)
    written = make_tensors()
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with GGUFFile(path) as f:
        assert f.alignment == alignment and f.metadata["general.alignment"] == alignment
        assert f.metadata_types["general.alignment"] == "UINT32"
        assert f.data_offset % alignment == 0
        for t in f.tensors:
            assert (t.offset - f.data_offset) % alignment == 0 and t.offset == ref[t.name].data_offset
            assert f.raw(t.name).numpy().tobytes() == written[t.name][0].tobytes()
        # Plain types at offsets that need not suit their element size still load.
        assert torch.equal(f.load("i32", dtype=torch.float64), torch.from_numpy(written["i32"][0].astype(np.float64)))
        assert torch.equal(f.load("f32.4d"), torch.from_numpy(written["f32.4d"][0]))


def test_version_2(tmp_path, model):
    data = bytearray(model.read_bytes())
    assert data[4:8] == (3).to_bytes(4, "little")
    data[4:8] = (2).to_bytes(4, "little")
    path = tmp_path / "v2.gguf"
    path.write_bytes(bytes(data))
    with GGUFFile(model) as f3, GGUFFile(path) as f2:
        assert f2.version == 2 and f3.version == 3
        assert f2.metadata == f3.metadata and f2.metadata_types == f3.metadata_types
        assert f2.tensors == f3.tensors
        for t in f2.tensors:
            assert torch.equal(f2.raw(t.name), f3.raw(t.name))


def test_raw_view_outlives_close(model):
    f = GGUFFile(model)
    raw = f.raw("blk.0.q8_0")
    expected = make_tensors()["blk.0.q8_0"][0].tobytes()
    f.close()
    assert f.closed
    del f
    gc.collect()
    assert raw.numpy().tobytes() == expected
    assert raw.clone().sum().item() == sum(expected)


def test_closed_file_raises(model):
    f = GGUFFile(model)
    f.close()
    f.close()  # closing twice is fine
    assert "closed" in repr(f)
    with pytest.raises(ValueError, match="closed"):
        f.raw("f16")
    with pytest.raises(ValueError, match="closed"):
        f.metadata


def test_writing_into_a_raw_view_leaves_the_file_alone(tmp_path):
    path = write_model(tmp_path / "w.gguf", metadata=False)
    before = path.read_bytes()
    with GGUFFile(path) as f:
        raw = f.raw("f32.4d")
        raw.fill_(0xAB)
        assert bool((f.raw("f32.4d") == 0xAB).all())  # one mapping per open file: the view is shared
    assert path.read_bytes() == before
    with GGUFFile(path) as f:
        assert f.raw("f32.4d").numpy().tobytes() == make_tensors()["f32.4d"][0].tobytes()


def test_zero_tensors(tmp_path):
    path = write_model(tmp_path / "z.gguf", tensors={})
    with GGUFFile(path) as f:
        assert f.tensors == [] and len(f.metadata) == 1 + len(SCALARS) + len(ARRAYS) + 1
        with pytest.raises(KeyError):
            f.raw("f32.1d")


def test_zero_metadata_keys(tmp_path):
    path = tmp_path / "nokv.gguf"
    path.write_bytes(gb.with_tensors([("w", (32, 2), gb.Q8_0), ("b", (4,), gb.F32)]))
    with GGUFFile(path) as f:
        assert f.metadata == {} and f.metadata_types == {} and f.alignment == 32
        assert [t.name for t in f.tensors] == ["w", "b"] and f.tensor("w").shape == (2, 32)
        assert f.load("w").shape == (2, 32)
    path.write_bytes(gb.gguf())
    with GGUFFile(path) as f:
        assert f.metadata == {} and f.tensors == [] and f.data_offset == 32


def test_empty_arrays_and_deep_nesting(tmp_path):
    kvs = [gb.kv(f"empty.{t}", gb.ARRAY, (t, [])) for t in range(13)]
    deep = (gb.INT8, [-1])
    for _ in range(7):  # 8 levels of arrays: the deepest the reader accepts
        deep = (gb.ARRAY, [deep])
    kvs.append(gb.kv("deep", gb.ARRAY, deep))
    kvs.append(gb.kv("empty.nested", gb.ARRAY, (gb.ARRAY, [(gb.STRING, []), (gb.UINT64, [])])))
    kvs.append(gb.kv("", gb.STRING, ""))  # an empty key and an empty string are well-formed
    path = tmp_path / "e.gguf"
    path.write_bytes(gb.gguf(kvs))
    with GGUFFile(path) as f:
        md = f.metadata
        for t in range(13):
            assert md[f"empty.{t}"] == [] and f.metadata_types[f"empty.{t}"] == f"ARRAY[{VT(t).name}]"
        assert md["deep"] == [[[[[[[[-1]]]]]]]]
        assert md["empty.nested"] == [[], []]
        assert md[""] == ""


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def test_a_directory_is_not_a_gguf_file(tmp_path):
    with pytest.raises(GGUFError, match="regular file"):
        GGUFFile(tmp_path)


def test_error_type():
    assert issubclass(GGUFError, ValueError)


def test_empty_tensors_load(tmp_path):
    # Zero-element tensors of any shape: torch may give [4, 0] strides [1, 1], which is still contiguous.
    path = tmp_path / "empty.gguf"
    path.write_bytes(gb.with_tensors([("a", (0, 4), gb.F32), ("b", (256, 0), gb.Q4_K), ("c", (0,), gb.Q8_0),
                                      ("d", (32, 0, 3), gb.F16)]))
    with GGUFFile(path) as f:
        for name, shape in [("a", (4, 0)), ("b", (0, 256)), ("c", (0,)), ("d", (3, 0, 32))]:
            assert f.tensor(name).shape == shape and f.tensor(name).nbytes == 0
            out = f.load(name, dtype=torch.bfloat16)
            assert out.shape == shape and out.dtype == torch.bfloat16
