"""Malformed GGUF files: each must raise flashlm.gguf.GGUFError naming what is wrong and the byte offset,
and never crash, hang, read out of bounds or allocate what a count claims.

Files are built byte by byte with tests/gguf_bytes.py. Set FLASHLM_GGUF_CORPUS=DIR to also save every input
parsed here into DIR, e.g. to replay them under AddressSanitizer with tests/fuzz/gguf_fuzz.cpp.
"""

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_bytes as gb
from flashlm import ops
from flashlm.gguf import GGUFError, GGUFFile

_CORPUS = os.environ.get("FLASHLM_GGUF_CORPUS")


def read_all(path) -> dict:
    """Open the file and touch everything the API hands out, as a user would; return what was read."""
    with GGUFFile(path) as f:
        out = {"metadata": f.metadata, "types": f.metadata_types, "alignment": f.alignment, "tensors": f.tensors}
        for t in f.tensors:
            assert t.nbytes == f.raw(t.name).numel()
            if t.ggml_type in ("I8", "I16", "I32", "I64", "F64") or ops.dequantize_supported(t.ggml_type):
                assert f.load(t.name).shape == t.shape
        return out


def parse(tmp_path, data: bytes, name="f.gguf"):
    if _CORPUS:
        os.makedirs(_CORPUS, exist_ok=True)
        with open(os.path.join(_CORPUS, hashlib.sha1(data).hexdigest()), "wb") as out:
            out.write(data)
    path = tmp_path / name
    path.write_bytes(data)
    return read_all(path)


def expect_error(tmp_path, data: bytes, match: str = None, at: int = None) -> str:
    with pytest.raises(GGUFError, match=match) as err:
        parse(tmp_path, data)
    message = str(err.value)
    assert "\n" not in message and "at byte" in message, message
    if at is not None:
        assert f"at byte {at} of {len(data)}" in message, message
    return message


# -- a small valid file, with the byte offset where each of its sections ends -----------------------------

def reference_sections():
    """[(section name, bytes)] of a valid file whose last byte is the last byte of tensor data."""
    s = [("magic", b"GGUF"), ("version", gb.u32(3)), ("tensor count", gb.u64(2)), ("kv count", gb.u64(4))]
    kvs = [("general.alignment", gb.UINT32, 64), ("name", gb.STRING, "tëst"), ("flag", gb.BOOL, True),
           ("list", gb.ARRAY, (gb.STRING, ["a", "bc"]))]
    for key, vtype, v in kvs:
        s += [(f"key {key}", gb.string(key)), (f"type of {key}", gb.u32(vtype))]
        if vtype == gb.ARRAY:
            elem_type, items = v
            s += [(f"element type of {key}", gb.u32(elem_type)), (f"length of {key}", gb.u64(len(items)))]
            s += [(f"item {i} of {key}", gb.value(elem_type, item)) for i, item in enumerate(items)]
        else:
            s.append((f"value of {key}", gb.value(vtype, v)))
    for name, dims, ggml_type, offset in [("w", (32, 2), gb.Q8_0, 0), ("b", (3,), gb.F32, 128)]:
        s += [(f"name of {name}", gb.string(name)), (f"n_dims of {name}", gb.u32(len(dims)))]
        s += [(f"dim {i} of {name}", gb.u64(d)) for i, d in enumerate(dims)]
        s += [(f"type of {name}", gb.u32(ggml_type)), (f"offset of {name}", gb.u64(offset))]
    head = sum(len(b) for _, b in s)
    s.append(("padding", bytes(gb.pad_to(head, 64) - head)))
    s.append(("data of w", bytes(range(68)) + bytes(60)))
    s.append(("data of b", struct.pack("<3f", 1.0, 2.0, 3.0)))
    return s


SECTIONS = reference_sections()
VALID = b"".join(b for _, b in SECTIONS)
BOUNDARIES = [(name, sum(len(b) for _, b in SECTIONS[: i + 1])) for i, (name, _) in enumerate(SECTIONS[:-1])]


def test_reference_file_is_valid(tmp_path):
    f = parse(tmp_path, VALID)
    assert f["alignment"] == 64 and [t.name for t in f["tensors"]] == ["w", "b"]
    assert f["metadata"] == {"general.alignment": 64, "name": "tëst", "flag": True, "list": ["a", "bc"]}


@pytest.mark.parametrize("section,end", BOUNDARIES, ids=[name for name, _ in BOUNDARIES])
def test_truncated_after_section(tmp_path, section, end):
    expect_error(tmp_path, VALID[:end])


def test_truncated_at_every_byte(tmp_path):
    for end in range(len(VALID)):
        with pytest.raises(GGUFError):
            parse(tmp_path, VALID[:end])


def test_truncation_message_names_what_and_where(tmp_path):
    expect_error(tmp_path, b"", "too small for the GGUF magic", at=0)
    expect_error(tmp_path, b"GGUF\x03\x00", "truncated: version needs 4 bytes, 2 left", at=4)
    end = dict(BOUNDARIES)["type of flag"]
    expect_error(tmp_path, VALID[:end], "truncated: BOOL value needs 1 bytes, 0 left", at=end)


def test_every_byte_flipped(tmp_path):
    """Each byte inverted in turn: the parser either accepts the file or raises GGUFError."""
    for pos in range(len(VALID)):
        data = bytearray(VALID)
        data[pos] ^= 0xFF
        try:
            parse(tmp_path, bytes(data))
        except GGUFError:
            pass


# -- header -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("magic", [b"GGUG", b"\x00\x00\x00\x00", b"FUGG", b"ggml", b"\xff\n\x1b["])
def test_wrong_magic(tmp_path, magic):
    message = expect_error(tmp_path, gb.gguf(magic=magic), "not a GGUF file", at=0)
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize("version,match", [
    (0, "unsupported GGUF version 0"), (1, "version 1 is not supported"), (4, "unsupported GGUF version 4"),
    (2**32 - 1, "unsupported GGUF version"), (0x02000000, "big-endian"), (0x03000000, "big-endian"),
])
def test_unsupported_version(tmp_path, version, match):
    expect_error(tmp_path, gb.gguf(version=version), match, at=4)


@pytest.mark.parametrize("count", [2**63, 2**40, 2**64 - 1, 5])
def test_absurd_tensor_count(tmp_path, count):
    expect_error(tmp_path, gb.gguf(n_tensors=count), f"tensor count {count} cannot fit", at=8)


@pytest.mark.parametrize("count", [2**63, 2**40, 2**64 - 1, 3])
def test_absurd_kv_count(tmp_path, count):
    expect_error(tmp_path, gb.gguf(n_kv=count), f"metadata count {count} cannot fit", at=16)


def test_counts_larger_than_what_follows(tmp_path):
    # Counts small enough to pass the size check, but the items are not there: they parse as garbage.
    expect_error(tmp_path, gb.gguf([gb.kv("a", gb.UINT8, 1)], n_kv=3) + bytes(40))
    expect_error(tmp_path, gb.with_tensors([("w", (4,), gb.F32)], n_tensors=2))


# -- metadata -----------------------------------------------------------------------------------------------

KEY_AT = 24  # the first key starts right after the header


@pytest.mark.parametrize("length", [2**63, 2**40, 2**64 - 1, 1000])
def test_absurd_key_length(tmp_path, length):
    data = gb.header(0, 1) + gb.u64(length) + b"key" + gb.u32(gb.UINT8) + b"\x01"
    expect_error(tmp_path, data, f"metadata key claims {length} bytes", at=KEY_AT)


@pytest.mark.parametrize("length", [2**63, 2**40, 2**64 - 1, 20])
def test_absurd_string_value_length(tmp_path, length):
    data = gb.header(0, 1) + gb.string("k") + gb.u32(gb.STRING) + gb.u64(length) + b"abc"
    expect_error(tmp_path, data, f"string value claims {length} bytes", at=KEY_AT + 9 + 4)


@pytest.mark.parametrize("elem_type", [gb.UINT8, gb.UINT16, gb.FLOAT32, gb.BOOL, gb.UINT64, gb.STRING, gb.ARRAY])
@pytest.mark.parametrize("length", [2**63, 2**40, 2**64 - 1, 2**61 + 1])
def test_absurd_array_length(tmp_path, elem_type, length):
    data = gb.header(0, 1) + gb.string("k") + gb.u32(gb.ARRAY) + gb.u32(elem_type) + gb.u64(length) + bytes(64)
    expect_error(tmp_path, data, f"count {length} cannot fit", at=KEY_AT + 9 + 4 + 4)


def test_string_in_array_longer_than_file(tmp_path):
    data = gb.header(0, 1) + gb.string("k") + gb.u32(gb.ARRAY) + gb.u32(gb.STRING) + gb.u64(2) + gb.string("ok")
    data += gb.u64(2**62) + bytes(16)
    expect_error(tmp_path, data, "string in array claims", at=len(data) - 24)


@pytest.mark.parametrize("vtype", [13, 14, 255, 2**31, 2**32 - 1])
def test_unknown_value_type(tmp_path, vtype):
    data = gb.header(0, 1) + gb.string("k") + gb.u32(vtype) + bytes(16)
    expect_error(tmp_path, data, f"unknown metadata value type {vtype}", at=KEY_AT + 9)


@pytest.mark.parametrize("elem_type", [13, 100, 2**32 - 1])
def test_unknown_array_element_type(tmp_path, elem_type):
    data = gb.header(0, 1) + gb.string("k") + gb.u32(gb.ARRAY) + gb.u32(elem_type) + gb.u64(1) + bytes(16)
    expect_error(tmp_path, data, f"unknown array element type {elem_type}", at=KEY_AT + 13)


@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
def test_bool_neither_0_nor_1(tmp_path, byte):
    value = gb.string("k") + gb.u32(gb.BOOL) + bytes([byte])
    expect_error(tmp_path, gb.gguf([value]), f"BOOL value {byte} is neither 0 nor 1", at=KEY_AT + 13)
    items = gb.string("k") + gb.u32(gb.ARRAY) + gb.u32(gb.BOOL) + gb.u64(3) + bytes([1, 0, byte])
    expect_error(tmp_path, gb.gguf([items]), "BOOL array element", at=KEY_AT + 13 + 12 + 2)


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe6\x97", b"ok\x80", b"\xf8\x88\x80\x80\x80"]


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_in_key(tmp_path, bad):
    expect_error(tmp_path, gb.gguf([gb.kv(b"key." + bad, gb.UINT8, 1)]), "metadata key is not valid UTF-8", at=KEY_AT)


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_in_value(tmp_path, bad):
    expect_error(tmp_path, gb.gguf([gb.kv("k", gb.STRING, b"v" + bad)]), "string value is not valid UTF-8",
                 at=KEY_AT + 13)
    expect_error(tmp_path, gb.gguf([gb.kv("k", gb.ARRAY, (gb.STRING, ["fine", bad]))]),
                 "string in array is not valid UTF-8", at=KEY_AT + 13 + 12 + 12)


@pytest.mark.parametrize("bad", BAD_UTF8[:3])
def test_invalid_utf8_in_tensor_name(tmp_path, bad):
    data = gb.with_tensors([(b"w" + bad, (4,), gb.F32)])
    expect_error(tmp_path, data, "tensor name is not valid UTF-8", at=24)


def test_duplicate_key(tmp_path):
    kvs = [gb.kv("a", gb.UINT8, 1), gb.kv("b", gb.UINT8, 1), gb.kv("a", gb.STRING, "x")]
    expect_error(tmp_path, gb.gguf(kvs), "duplicate metadata key 'a'", at=KEY_AT + 2 * 14)


def test_duplicate_tensor_name(tmp_path):
    data = gb.with_tensors([("w", (4,), gb.F32), ("v", (4,), gb.F32), ("w", (8,), gb.F32)])
    info = len(gb.tensor_info("w", (4,), gb.F32, 0))
    expect_error(tmp_path, data, "duplicate tensor name 'w'", at=24 + 2 * info)


def nested(depth):
    """A metadata pair whose value is `depth` arrays, each holding the next, the innermost [7]."""
    return gb.string("k") + gb.u32(gb.ARRAY) + (gb.u32(gb.ARRAY) + gb.u64(1)) * (depth - 1) + gb.value(gb.ARRAY, (gb.UINT8, [7]))


def test_arrays_nested_too_deep(tmp_path):
    assert parse(tmp_path, gb.gguf([nested(8)]))["metadata"]["k"] == [[[[[[[[7]]]]]]]]
    expect_error(tmp_path, gb.gguf([nested(9)]), "nested deeper than 8", at=KEY_AT + 13 + 8 * 12)
    expect_error(tmp_path, gb.gguf([nested(100_000)]), "nested deeper than 8", at=KEY_AT + 13 + 8 * 12)


def test_too_many_nested_arrays(tmp_path):
    # An empty array of UINT8 is 12 zero bytes: 2**20 + 1 of them fit in the file but exceed the limit.
    n = 2**20 + 1
    data = gb.header(0, 1) + gb.string("k") + gb.u32(gb.ARRAY) + gb.u32(gb.ARRAY) + gb.u64(n) + bytes(12 * n)
    expect_error(tmp_path, data, "more than 1048576 nested arrays", at=KEY_AT + 17)


@pytest.mark.parametrize("alignment,match", [
    ((gb.UINT32, 0), "not a power of two"), ((gb.UINT32, 3), "not a power of two"),
    ((gb.UINT32, 48), "not a power of two"), ((gb.UINT32, 2**32 - 1), "not a power of two"),
    ((gb.UINT64, 32), "must be UINT32, got UINT64"), ((gb.INT32, 32), "must be UINT32, got INT32"),
    ((gb.STRING, "32"), "must be UINT32, got STRING"), ((gb.ARRAY, (gb.UINT32, [32])), "must be UINT32, got ARRAY"),
])
def test_bad_alignment(tmp_path, alignment, match):
    expect_error(tmp_path, gb.gguf([gb.kv("general.alignment", *alignment)]), match, at=KEY_AT)


# -- tensor infos -------------------------------------------------------------------------------------------

def one_tensor(dims, ggml_type, offset=0, data=b"", alignment=32, kvs=()):
    return gb.gguf(list(kvs), [gb.tensor_info("t", dims, ggml_type, offset)], data, alignment=alignment)


def offset_field_at(dims, kvs=()):
    """Where one_tensor() puts the tensor's offset."""
    return 24 + sum(map(len, kvs)) + 9 + 4 + 8 * len(dims) + 4


DIMS_AT = 24 + 9  # where one_tensor() puts the dimension count


@pytest.mark.parametrize("offset,alignment", [(1, 32), (16, 32), (32, 64), (96, 64), (2**64 - 1, 32)])
def test_misaligned_offset(tmp_path, offset, alignment):
    kvs = [gb.kv("general.alignment", gb.UINT32, alignment)]
    data = one_tensor((4,), gb.F32, offset, bytes(256), alignment, kvs)
    expect_error(tmp_path, data, "is not a multiple of the alignment", at=offset_field_at((4,), kvs))


@pytest.mark.parametrize("offset,dims", [(64, (4,)), (0, (64,)), (2**64 - 32, (4,)), (2**63, (4,)), (0, (2**40,)),
                                         (2**64 - 2**10, (2**61 // 4,))])
def test_data_outside_the_file(tmp_path, offset, dims):
    data = one_tensor(dims, gb.F32, offset, bytes(48))
    expect_error(tmp_path, data, "lies outside the file", at=offset_field_at(dims))


def test_empty_tensor_offset_outside_the_file(tmp_path):
    data = one_tensor((0, 4), gb.F32, 64, bytes(32))
    expect_error(tmp_path, data, "lies outside the file", at=offset_field_at((0, 4)))
    parse(tmp_path, one_tensor((0, 4), gb.F32, 32, bytes(32)))  # at the very end: fine


def two_tensors(offset_b, offset_a=0, dims_b=(4,)):
    """Tensors a (16 f32, 64 bytes) and b (dims_b f32) at the given offsets, in that order; and where b's offset
    field is."""
    infos = [gb.tensor_info("a", (16,), gb.F32, offset_a), gb.tensor_info("b", dims_b, gb.F32, offset_b)]
    return gb.gguf([], infos, bytes(256)), 24 + len(infos[0]) + len(infos[1]) - 8


@pytest.mark.parametrize("offset_b,offset_a,dims_b", [(32, 0, (4,)), (0, 0, (4,)), (0, 64, (4,)), (32, 0, (0,)),
                                                      (0, 32, (8,))])
def test_overlapping_or_out_of_order_tensor_data(tmp_path, offset_b, offset_a, dims_b):
    # ggml lays tensor data out in the order of the infos, one after the other; data that starts before the
    # previous tensor's end would alias its bytes (here: b inside a, b at a's offset, b before a).
    data, at = two_tensors(offset_b, offset_a, dims_b)
    message = expect_error(tmp_path, data, "starts before the end of tensor 'a'", at=at)
    assert f"tensor 'b' data [{offset_b}, +{4 * dims_b[0]})" in message, message
    assert f"tensor 'a' data [{offset_a}, +64)" in message, message


@pytest.mark.parametrize("offset_b,dims_b", [(64, (4,)), (96, (4,)), (64, (0,))])
def test_adjacent_or_spaced_tensor_data_loads(tmp_path, offset_b, dims_b):
    data, _ = two_tensors(offset_b, 0, dims_b)
    tensors = parse(tmp_path, data)["tensors"]
    assert [(t.name, t.offset - tensors[0].offset) for t in tensors] == [("a", 0), ("b", offset_b)]


@pytest.mark.parametrize("ggml_type", [4, 5, 31, 32, 33, 36, 1000, 2**31, 2**32 - 1])  # 4, 5, 31-33, 36: removed
def test_unknown_tensor_type(tmp_path, ggml_type):
    data = one_tensor((32,), ggml_type, 0, bytes(256))
    expect_error(tmp_path, data, f"unknown ggml type {ggml_type}", at=DIMS_AT + 4 + 8)


@pytest.mark.parametrize("n_dims", [5, 8, 2**31, 2**32 - 1])
def test_too_many_dims(tmp_path, n_dims):
    data = gb.header(1, 0) + gb.string("t") + gb.u32(n_dims) + gb.u64(1) * 8 + gb.u32(gb.F32) + gb.u64(0) + bytes(64)
    expect_error(tmp_path, data, f"has {n_dims} dimensions; GGUF allows at most 4", at=DIMS_AT)


@pytest.mark.parametrize("dims,match,dim", [
    ((2**32, 2**32), "more elements than int64", 1), ((2**62, 2), "more elements than int64", 1),
    ((3, 5, 7, 2**61), "more elements than int64", 3), ((2**63,), "beyond int64", 0),
    ((1, 2**64 - 1), "beyond int64", 1),
    # No elements, but strides (a zero dimension counting as 1) would overflow: nothing could view it.
    ((0, 2**62, 4), "more elements than int64", 2), ((2**40, 0, 2**40), "more elements than int64", 2),
])
def test_dimension_overflow(tmp_path, dims, match, dim):
    expect_error(tmp_path, one_tensor(dims, gb.F32, 0, bytes(64)), match, at=DIMS_AT + 4 + 8 * dim)


@pytest.mark.parametrize("dims", [(0, 2**61, 2), (2**62, 0), (0, 0, 0, 2**63 - 1)])
def test_large_empty_tensors_load(tmp_path, dims):
    f = parse(tmp_path, one_tensor(dims, gb.F32, 0, b""))  # parse() loads every tensor
    assert f["tensors"][0].nbytes == 0 and f["tensors"][0].shape == tuple(reversed(dims))


def test_byte_size_overflow(tmp_path):
    # 2**62 float32 elements count in int64, their 2**64 bytes do not.
    expect_error(tmp_path, one_tensor((2**62,), gb.F32, 0, bytes(64)), "byte size overflows int64", at=DIMS_AT)


@pytest.mark.parametrize("dims,ggml_type", [((33,), gb.Q4_0), ((16, 2), gb.Q8_0), ((32, 8), gb.Q4_K), ((), gb.Q8_0),
                                            ((0,), gb.Q4_K)])
def test_inner_dim_not_a_multiple_of_the_block(tmp_path, dims, ggml_type):
    if dims == (0,):  # zero elements: a whole number (zero) of blocks
        parse(tmp_path, one_tensor(dims, ggml_type, 0, b""))
        return
    expect_error(tmp_path, one_tensor(dims, ggml_type, 0, bytes(4096)), "not a multiple of its block size",
                 at=DIMS_AT)


def test_error_names_the_file(tmp_path):
    message = expect_error(tmp_path, b"nope")
    assert str(tmp_path / "f.gguf") in message


def test_names_in_messages_are_escaped(tmp_path):
    # A key or tensor name with control characters must not break the one-line message or reach a terminal.
    kvs = [gb.kv("a\nb\x1b[31m\x9b1m'ü", gb.UINT8, 1)] * 2
    expect_error(tmp_path, gb.gguf(kvs), r"duplicate metadata key 'a\\x0ab\\x1b\[31m\\u009b1m\\x27ü' \(at byte")
    data = gb.with_tensors([("t\r\n", (4,), gb.F32)] * 2)
    expect_error(tmp_path, data, r"duplicate tensor name 't\\x0d\\x0a'")
    # Long names are cut, between characters.
    kvs = [gb.kv("é" * 1000, gb.UINT8, 1)] * 2
    expect_error(tmp_path, gb.gguf(kvs), "duplicate metadata key '" + "é" * 40 + "'\\.\\.\\. \\(at byte")


# -- random mutations ---------------------------------------------------------------------------------------

def rich_file():
    """A valid file using every section kind: all value types, nested arrays, several tensor types."""
    kvs = [gb.kv("general.alignment", gb.UINT32, 32), gb.kv("s", gb.STRING, "ü"), gb.kv("b", gb.BOOL, False),
           gb.kv("i8", gb.INT8, -1), gb.kv("u16", gb.UINT16, 2), gb.kv("f32", gb.FLOAT32, 1.5),
           gb.kv("u64", gb.UINT64, 2**40), gb.kv("f64", gb.FLOAT64, -2.0),
           gb.kv("arr", gb.ARRAY, (gb.INT32, [1, -2])), gb.kv("strs", gb.ARRAY, (gb.STRING, ["x", ""])),
           gb.kv("nest", gb.ARRAY, (gb.ARRAY, [(gb.BOOL, [True]), (gb.STRING, ["y"])]))]
    return gb.with_tensors([("q", (256,), gb.Q4_K), ("h", (2, 2), gb.F16), ("i", (3,), gb.I32), ("z", (32,), gb.Q8_0)],
                           kvs)


RICH = rich_file()
INTERESTING = [0, 1, 2, 4, 9, 12, 31, 32, 33, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
               2**63, 2**64 - 1]


@st.composite
def mutations(draw):
    data = bytearray(RICH)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "word", "insert", "delete", "truncate"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "word":
            width = draw(st.sampled_from([4, 8]))
            word = draw(st.sampled_from(INTERESTING)) % 2 ** (8 * width)
            data[pos:pos + width] = word.to_bytes(width, "little")
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("mutations")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutations())
def test_random_mutations_accept_or_raise_ggufferror(scratch, data):
    try:
        parse(scratch, data)
    except GGUFError as e:
        assert "\n" not in str(e)
