"""Importance matrices (llama.cpp's imatrix) and quantization with them.

- flashlm's quantizers given an imatrix against llama.cpp's own quantize_<type>(src, dst, nrow, n_per_row,
  imatrix) compiled from the llama-cpp-python sdist (tests/llama_cpp_ref.py), bit for bit, for every type
  that takes one (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS), with and without an imatrix; skipped
  only where the sources are absent (`.ci/run` provides them);
- the AVX2 scale searches under an imatrix against the scalar ones;
- that an imatrix lowers the activation-weighted error on a layer with skewed input channels;
- the file formats: round trips of both, what llama.cpp's own reader (common/imatrix-loader.cpp, built by
  llama_cpp_ref.imatrix_loader) reads from them, and malformed files;
- collection against sums computed directly from the layers' inputs;
- the commands end to end on a tiny random llama: `flashlm imatrix`, then `flashlm quantize --imatrix`, the
  result loaded and run, and its tensors byte-identical to llama.cpp's llama_model_quantize given the same
  imatrix (through llama-cpp-python); an imatrix for another model and unsupported mixes refused.

Mixture-of-experts models (an imatrix per expert) are tested in test_imatrix_moe.py.
"""

import struct

import numpy as np
import pytest
import torch

import gguf_bytes as gb
import llama_cpp_ref
from flashlm import ops
from flashlm.cli import main as cli_main
from flashlm.quant import GGUF_QUANT_TYPES, quantize_gguf
from flashlm.quant.imatrix import (IMatrix, IMatrixEntry, collect_imatrix, gguf_linear_names, read_imatrix,
                                   write_imatrix)
from test_gguf_quantize import make_rows, mismatch, rng_for

IMATRIX_TYPES = list(llama_cpp_ref.IMATRIX_TYPES)
DISTRIBUTIONS = ["normal", "outliers", "zero_blocks", "constant_blocks", "mixed_scales"]


def importance(kind, n, rng):
    """Imatrix values of a named kind: None, skewed (a few channels 100-1000x the rest), with zeros."""
    if kind == "none":
        return None
    values = rng.random(n).astype(np.float32) ** 2
    if kind == "skewed":
        hot = rng.choice(n, max(1, n // 50), replace=False)
        values[hot] *= rng.uniform(100, 1000, len(hot)).astype(np.float32)
    elif kind == "zeros":  # dead channels, and one whole block of them
        values[rng.random(n) < 0.2] = 0
        values[:32] = 0
    return values


@pytest.fixture(scope="module")
def llama_ref():
    src = llama_cpp_ref.find_source()
    if src is None:
        pytest.skip(f"llama.cpp sources absent: set {llama_cpp_ref.ENV_VAR} to a llama-cpp-python sdist")
    return llama_cpp_ref.load()


@pytest.mark.parametrize("kind", ["none", "skewed", "zeros"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_matches_llama_cpp(llama_ref, name, dist, kind):
    block = GGUF_QUANT_TYPES[name][0]
    rng = rng_for("imatrix", name, dist, kind)
    x = make_rows(dist, 5, max(block * 3, 256), block, rng)  # 5 rows: threads split unevenly
    qw = importance(kind, x.shape[1], rng)
    ours = quantize_gguf(x, name, imatrix=qw)
    ref = llama_ref.quantize_imatrix(x, name, qw)
    assert not mismatch(ours, ref), mismatch(ours, ref)


@pytest.mark.skipif(not ops.cpu_isa_supported("avx2"), reason="this CPU has no AVX2")
@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_avx2_matches_scalar(name):
    rng = rng_for("imatrix-avx2", name)
    x = make_rows("outliers", 6, 512, 256, rng)
    qw = importance("skewed", 512, rng)
    before = ops.cpu_isa()
    try:
        ops.set_cpu_isa("scalar")
        scalar = quantize_gguf(x, name, imatrix=qw)
        ops.set_cpu_isa("avx2")
        avx2 = quantize_gguf(x, name, imatrix=qw)
    finally:
        ops.set_cpu_isa(before)
    assert not mismatch(avx2, scalar), mismatch(avx2, scalar)


@pytest.mark.parametrize("name", ["Q8_0", "F16"])
def test_types_without_weights_ignore_the_imatrix(name):
    x = make_rows("normal", 3, 64, 32, rng_for("ignore", name))
    assert np.array_equal(quantize_gguf(x, name, imatrix=np.ones(64, np.float32)), quantize_gguf(x, name))


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS"])
def test_imatrix_lowers_the_weighted_error(name):
    # a layer whose inputs have a few loud channels: the output error sum_j E[x_j^2] (w_ij - q_ij)^2 is
    # what an imatrix (E[x_j^2] per column) lets the quantizer minimise
    import gguf

    rng = rng_for("weighted", name)
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    act = rng.standard_normal((512, 1024)).astype(np.float32)
    act[:, rng.choice(1024, 16, replace=False)] *= 30
    qw = np.mean(act.astype(np.float64) ** 2, axis=0).astype(np.float32)

    def weighted_error(q):
        y = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name]).reshape(w.shape)
        return float(np.sum(qw * (y.astype(np.float64) - w) ** 2))

    plain, weighted = weighted_error(quantize_gguf(w, name)), weighted_error(quantize_gguf(w, name, imatrix=qw))
    assert weighted < 0.8 * plain, f"{name}: weighted error {weighted:.4g} with an imatrix vs {plain:.4g} without"


@pytest.mark.parametrize("imatrix, error, message", [
    (np.ones(63, np.float32), ValueError, "imatrix: expected 64 values"),
    (np.ones((2, 64), np.float32), ValueError, "imatrix: expected 64 values"),
    (np.full(64, np.nan, np.float32), ValueError, "imatrix: values must be finite"),
    (-np.ones(64, np.float32), ValueError, "imatrix: values must be finite and non-negative"),
    ([1.0] * 64, TypeError, "imatrix"),
])
def test_bad_imatrix(imatrix, error, message):
    with pytest.raises(error, match=message):
        quantize_gguf(np.zeros((2, 64), np.float32), "Q4_0", imatrix=imatrix)


@pytest.mark.parametrize("importance_arr, message", [
    (np.ones(63, np.float32), "importance has 63 values, data's rows have 64"),
    (np.ones(64, np.float64), "importance must be F32"),
    (np.ones(128, np.float32)[::2], "importance must be contiguous"),
])
def test_native_checks(importance_arr, message):
    with pytest.raises(ValueError, match=message):
        ops.gguf_quantize(np.zeros((2, 64), np.float32), "Q4_0", np.zeros(72, np.uint8), importance_arr)


# -- files ---------------------------------------------------------------------------------------------------

def sample_imatrix(rng, chunk_size=64) -> IMatrix:
    """Raw sums and token counts as collection leaves them: one entry per weight, one a 3-D (expert) one
    with a matrix that saw no tokens."""
    m = IMatrix(datasets=["calib.txt"], chunk_count=5, chunk_size=chunk_size)
    for name, n in (("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 96), ("blk.1.attn_k.weight", 64)):
        m.entries[name] = IMatrixEntry((rng.random(n) * 300).astype(np.float32), np.array([320], np.int64))
    m.entries["blk.1.ffn_up_exps.weight"] = IMatrixEntry((rng.random(3 * 32) * 50).astype(np.float32),
                                                         np.array([100, 0, 37], np.int64))
    return m


def test_gguf_round_trip(tmp_path):
    m = sample_imatrix(rng_for("gguf-rt"))
    write_imatrix(m, tmp_path / "a.gguf")
    back = read_imatrix(tmp_path / "a.gguf")
    assert not back.legacy and (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 5, 64)
    assert sorted(back.entries) == sorted(m.entries)
    for name, e in m.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums) and np.array_equal(back.entries[name].counts, e.counts)
    write_imatrix(back, tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # the mean per channel; a matrix that saw no tokens gets 1, as llama.cpp's quantize tool gives it
    e = m.entries["blk.1.ffn_up_exps.weight"]
    want = np.concatenate([e.sums[:32] / np.float32(100), np.ones(32, np.float32), e.sums[64:] / np.float32(37)])
    assert np.array_equal(back.importance("blk.1.ffn_up_exps.weight"), want)


def test_dat_round_trip(tmp_path):
    m = sample_imatrix(rng_for("dat-rt"))
    write_imatrix(m, tmp_path / "a.dat")
    back = read_imatrix(tmp_path / "a.dat")
    assert back.legacy and (back.datasets, back.chunk_count) == (["calib.txt"], 5)
    # values (sum / count) * ncall with ncall = ceil(max count / chunk size) = 5 (2 for the experts)
    q = m.entries["blk.0.attn_q.weight"]
    assert back.entries["blk.0.attn_q.weight"].counts.tolist() == [5]
    assert np.array_equal(back.entries["blk.0.attn_q.weight"].sums, (q.sums / np.float32(320)) * np.float32(5))
    for name in m.entries:
        assert np.allclose(back.importance(name), m.importance(name), rtol=1e-6, atol=0), name
    write_imatrix(back, tmp_path / "b.dat")
    assert (tmp_path / "a.dat").read_bytes() == (tmp_path / "b.dat").read_bytes()
    # the layout, by hand: entry count, then the first entry (names sorted)
    raw = (tmp_path / "a.dat").read_bytes()
    name = b"blk.0.attn_q.weight"
    assert raw[:8 + len(name) + 8] == struct.pack("<ii", 4, len(name)) + name + struct.pack("<ii", 5, 64)
    assert raw.endswith(struct.pack("<ii", 5, 9) + b"calib.txt")


def test_formats_convert_both_ways(tmp_path):
    m = sample_imatrix(rng_for("convert"))
    write_imatrix(m, tmp_path / "a.dat")
    write_imatrix(read_imatrix(tmp_path / "a.dat"), tmp_path / "b.gguf")  # legacy -> GGUF: counts are ncall
    back = read_imatrix(tmp_path / "b.gguf")
    for name in m.entries:
        assert np.allclose(back.importance(name), m.importance(name), rtol=1e-6, atol=0), name
    write_imatrix(m, tmp_path / "c.bin", fmt="dat")
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "a.dat").read_bytes()


@pytest.fixture(scope="module")
def llama_loader():
    load = llama_cpp_ref.imatrix_loader()
    if load is None:
        pytest.skip("llama.cpp's sources, llama-cpp-python or a C++ compiler absent")
    return load


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_llama_cpp_reads_our_files(llama_loader, tmp_path, suffix):
    m = sample_imatrix(rng_for("llama-reads", suffix))
    path = str(tmp_path / f"a{suffix}")
    write_imatrix(m, path)
    got = llama_loader(path)
    assert got is not None, "llama.cpp's loader refused the file"
    ours = read_imatrix(path)
    assert got["is_legacy"] == ours.legacy == (suffix == ".dat")
    assert got["has_metadata"] == (suffix == ".gguf")  # llama-quantize refuses a GGUF imatrix without it
    assert (got["chunk_count"], got["datasets"]) == (5, ["calib.txt"])
    assert got["chunk_size"] == (64 if suffix == ".gguf" else 0)
    assert sorted(got["entries"]) == sorted(ours.entries)
    for name, (sums, counts) in got["entries"].items():
        assert np.array_equal(sums, ours.entries[name].sums), name
        assert np.array_equal(counts, ours.entries[name].counts), name


def legacy_file(entries, tail=b""):
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    return out + tail


GOOD = [(b"blk.0.attn_q.weight", 2, [1.0, 2.0])]


@pytest.mark.parametrize("data, match", [
    (b"", "entry count: needs 4 bytes"),
    (struct.pack("<i", 0), "entry count 0"),
    (struct.pack("<i", -3), "entry count -3"),
    (struct.pack("<i", 1 << 30) + bytes(16), "more than the file can hold"),
    (legacy_file(GOOD)[:-3], "2 values: needs 8 bytes, 5 left"),
    (legacy_file(GOOD)[:20], "name: needs 19 bytes, 12 left"),
    (struct.pack("<ii", 1, -1) + bytes(16), "name length -1"),
    (struct.pack("<ii", 1, 1 << 30) + bytes(16), "name length 1073741824 out of range"),
    (legacy_file([(b"x", 1, [])]), "value count 0"),
    (struct.pack("<ii", 1, 1) + b"x" + struct.pack("<ii", 1, 1 << 29), "needs 2147483648 bytes"),
    (legacy_file([(b"\xff", 1, [1.0])]), "not UTF-8"),
    (legacy_file(GOOD + GOOD), "appears twice"),
    (legacy_file([(b"x", 1, [1.0, float("nan")])]), "non-finite"),
    (legacy_file(GOOD, struct.pack("<ii", 3, 50) + b"short"), "dataset name length 50 out of range"),
    (legacy_file(GOOD, struct.pack("<ii", 3, 2) + b"abXYZ"), "3 bytes after the dataset name"),
    (legacy_file(GOOD, b"\x01\x02"), "chunk count: needs 4 bytes"),
])
def test_malformed_dat(tmp_path, data, match):
    path = tmp_path / "bad.dat"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_imatrix(path)


def gguf_imatrix(tensors, kvs=None):
    """A GGUF file of F32 tensors [(name, dims, values)] (or (name, dims, values, ggml type))."""
    infos, data = [], b""
    for t in tensors:
        name, dims, values = t[:3]
        ggml_type = t[3] if len(t) > 3 else gb.F32
        data += bytes(gb.pad_to(len(data), 32) - len(data))
        infos.append(gb.tensor_info(name, dims, ggml_type, len(data)))
        data += np.asarray(values, "<f4" if ggml_type == gb.F32 else "<f2").tobytes()
    if kvs is None:
        kvs = [gb.kv("general.type", gb.STRING, "imatrix")]
    return gb.gguf(kvs, infos, data)


SUMS = ("blk.0.attn_q.weight.in_sum2", [4], [1.0, 2.0, 3.0, 4.0])
COUNTS = ("blk.0.attn_q.weight.counts", [1], [8.0])


@pytest.mark.parametrize("data, match", [
    (gguf_imatrix([SUMS]), "counts' is missing"),
    (gguf_imatrix([COUNTS]), "in_sum2' is missing"),
    (gguf_imatrix([SUMS, COUNTS, ("token_embd.weight", [4], [0.0] * 4)]), "'token_embd.weight' is neither"),
    (gguf_imatrix([]), "no entries"),
    (gguf_imatrix([("blk.0.attn_q.weight.in_sum2", [4], [1.0] * 4, gb.F16), COUNTS]), "is F16, must be F32"),
    (gguf_imatrix([SUMS, ("blk.0.attn_q.weight.counts", [1, 3], [1.0] * 3)]), "4 sums do not split into 3"),
    (gguf_imatrix([SUMS, ("blk.0.attn_q.weight.counts", [1], [-1.0])]), "counts must be finite and non-negative"),
    (gguf_imatrix([("blk.0.attn_q.weight.in_sum2", [4], [1.0, float("inf"), 3.0, 4.0]), COUNTS]), "non-finite"),
    (gguf_imatrix([SUMS, COUNTS], [gb.kv("general.type", gb.STRING, "model")]), "general.type is 'model'"),
    (gguf_imatrix([SUMS, COUNTS], [gb.kv("imatrix.chunk_count", gb.INT32, 3)]), "imatrix.chunk_count is INT32"),
    (gguf_imatrix([SUMS, COUNTS])[:-4], "GGUF|file|size|bytes"),  # the reader's own checks
])
def test_malformed_gguf(tmp_path, data, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_imatrix(path)


def test_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        read_imatrix(tmp_path / "missing.dat")
    with pytest.raises(TypeError, match="imatrix: expected a path"):
        read_imatrix(3.5)
    with pytest.raises(ValueError, match="fmt"):
        write_imatrix(sample_imatrix(rng_for("fmt")), tmp_path / "x", fmt="json")


# -- collection ----------------------------------------------------------------------------------------------

def tiny_transformer(arch="llama"):
    from flashlm.models import ModelConfig, Transformer

    kw = dict(n_kv_head=2) if arch != "gpt2" else {}
    cfg = ModelConfig(arch=arch, vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=64, seq_len=64, **kw)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_collection_sums_the_squared_inputs(arch):
    model = tiny_transformer(arch)
    fused = dict(fused_qkv=arch in ("gpt2", "phi3"), fused_gate_up=arch == "phi3")  # the file's fused weights
    names = gguf_linear_names(model, **fused)
    tokens = torch.randint(0, 50, (3 * 16 + 5,), generator=torch.Generator().manual_seed(1))
    seen = {}  # the inputs each layer saw, captured independently of the collector
    hooks = [dict(model.named_modules())[m].register_forward_hook(
        lambda mod, inp, out, g=g: seen.setdefault(g, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for m, g in names.items()]
    try:
        m = collect_imatrix(model, tokens, chunk_size=16, bos_token_id=7, dataset="d.txt", **fused)
    finally:
        for h in hooks:
            h.remove()
    want = {f"blk.{i}.{p}.weight" for i in range(2) for p in
            {"gpt2": ["attn_qkv"], "phi3": ["attn_qkv"]}.get(arch, ["attn_q", "attn_k", "attn_v", "ffn_gate"]) +
            ["attn_output", "ffn_up", "ffn_down"]}
    assert set(m.entries) == want
    assert (m.chunk_count, m.chunk_size, m.datasets) == (3, 16, ["d.txt"])  # the 5-token tail is dropped
    for name, e in m.entries.items():
        x = torch.cat(seen[name]).double()
        assert e.counts.tolist() == [48], name
        ref = (x * x).sum(0).numpy()
        assert np.allclose(e.sums, ref, rtol=1e-6, atol=0), (name, np.max(np.abs(e.sums - ref) / ref))


def test_collection_replaces_each_chunks_first_token_with_bos():
    model = tiny_transformer()
    fed = []
    h = model.register_forward_pre_hook(lambda mod, args: fed.append(args[0].clone()))
    try:
        collect_imatrix(model, list(range(10, 42)), chunk_size=16, bos_token_id=1)
    finally:
        h.remove()
    assert [f[0].tolist() for f in fed] == [[1] + list(range(11, 26)), [1] + list(range(27, 42))]


@pytest.mark.parametrize("tokens, chunk_size, match", [
    (list(range(31)), 16, "31 tokens; a chunk size of 16 needs at least 32"),
    (list(range(40)), 0, "chunk_size: expected a positive int"),
    (list(range(40)), True, "chunk_size: expected a positive int"),
    (list(range(200)), 65, "longer than the model's context"),
])
def test_collection_refuses(tokens, chunk_size, match):
    with pytest.raises(ValueError, match=match):
        collect_imatrix(tiny_transformer(), tokens, chunk_size=chunk_size)


# -- the commands end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 8-layer llama (F32) with a byte-level vocabulary, calibration text, and its imatrix written by
    `flashlm imatrix` in both formats."""
    from flashlm.io.random_model import write_random_llama_gguf

    d = tmp_path_factory.mktemp("tiny-llama")
    model = d / "m.gguf"
    write_random_llama_gguf(str(model), d_model=256, d_ff=512, n_layer=8, vocab_size=300, n_head=4, ggml_type="F32",
                            context_length=128)
    rng = np.random.default_rng(3)
    words = "the of and to in is was for on that with as by at from it an are were which be this".split()
    (d / "calib.txt").write_text(" ".join(rng.choice(words, 120)))
    for out in ("im.gguf", "im.dat"):
        assert cli_main(["imatrix", str(model), "--calib-data", str(d / "calib.txt"), "-o", str(d / out),
                         "--chunk-size", "64", "--quiet"]) == 0
    return d


def test_imatrix_command(tiny_llama):
    m, legacy = read_imatrix(tiny_llama / "im.gguf"), read_imatrix(tiny_llama / "im.dat")
    assert len(m.entries) == 8 * 7 and m.chunk_size == 64 and m.chunk_count >= 2
    assert m.datasets == [str(tiny_llama / "calib.txt")] == legacy.datasets
    assert "output.weight" not in m.entries and "token_embd.weight" not in m.entries  # as llama.cpp by default
    assert m.entries["blk.3.ffn_down.weight"].sums.shape == (512,)
    assert m.entries["blk.0.attn_q.weight"].counts.tolist() == [64 * m.chunk_count]
    for name in m.entries:
        assert np.allclose(legacy.importance(name), m.importance(name), rtol=1e-6, atol=0), name


def tensors_of(path):
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(str(path)).tensors}


def llama_cpp_quantize(src, dst, mix, m: IMatrix):
    """llama.cpp's llama_model_quantize of src to dst with mix and the values of imatrix m (what llama-quantize
    --imatrix hands it after reading the file)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    names = sorted(m.entries)
    values = [np.ascontiguousarray(m.importance(n), np.float32) for n in names]
    table = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (name, v) in enumerate(zip(names, values)):
        table[i].name, table[i].size = name.encode(), len(v)
        table[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 1
    params.imatrix = ctypes.cast(table, type(params.imatrix))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("mix, fmt", [("Q4_K_M", "gguf"), ("Q4_0", "dat"), ("IQ4_XS", "gguf"), ("Q3_K_M", "dat"),
                                      ("Q2_K", "gguf"), ("Q5_K_S", "gguf")])
def test_quantize_with_imatrix_matches_llama_cpp(tiny_llama, tmp_path, mix, fmt):
    im = tiny_llama / f"im.{fmt}"
    ours = tmp_path / "ours.gguf"
    assert cli_main(["quantize", str(tiny_llama / "m.gguf"), str(ours), "--type", mix, "--imatrix", str(im),
                     "--quiet"]) == 0
    llama_cpp_quantize(tiny_llama / "m.gguf", tmp_path / "ref.gguf", mix, read_imatrix(im))
    got, ref = tensors_of(ours), tensors_of(tmp_path / "ref.gguf")
    assert sorted(got) == sorted(ref)
    differ = [(n, got[n][0], ref[n][0]) for n in ref if got[n] != ref[n]]
    assert not differ, f"tensors that differ from llama.cpp's (name, ours, llama.cpp's): {differ}"
    if mix == "Q4_0":  # llama.cpp's imatrix rule: the first eighth of ffn_down goes to Q4_1
        assert got["blk.0.ffn_down.weight"][0] == "Q4_1" and got["blk.1.ffn_down.weight"][0] == "Q4_0"


def test_quantized_model_loads_and_generates(tiny_llama, tmp_path):
    import gguf

    from flashlm import LLM, SamplingParams

    out = tmp_path / "q.gguf"
    assert cli_main(["quantize", str(tiny_llama / "m.gguf"), str(out), "--type", "Q4_K_M", "--imatrix",
                     str(tiny_llama / "im.gguf"), "--quiet"]) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("quantize.imatrix.entries_count").contents() == 56
    assert reader.get_field("quantize.imatrix.file").contents() == str(tiny_llama / "im.gguf")
    result = LLM(str(out), max_num_seqs=1).generate("the of", SamplingParams(temperature=0, max_tokens=6,
                                                                              ignore_eos=True))
    assert len(result[0].outputs[0].token_ids) == 6


def shrunk_copy(m: IMatrix, name: str) -> IMatrix:
    e = m.entries[name]
    entries = dict(m.entries) | {name: IMatrixEntry(e.sums[:-32], e.counts)}
    return IMatrix(entries, m.datasets, m.chunk_count, m.chunk_size)


@pytest.mark.parametrize("edit, match", [
    (lambda m: IMatrix(m.entries | {"blk.9.attn_q.weight": m.entries["blk.0.attn_q.weight"]}, m.datasets,
                       m.chunk_count, m.chunk_size), "entry 'blk.9.attn_q.weight' is not a tensor of this model"),
    (lambda m: shrunk_copy(m, "blk.2.ffn_down.weight"), "entry 'blk.2.ffn_down.weight' has 480 values, the tensor"),
])
def test_an_imatrix_for_another_model_is_refused(tiny_llama, tmp_path, capsys, edit, match):
    bad = tmp_path / "bad.gguf"
    write_imatrix(edit(read_imatrix(tiny_llama / "im.gguf")), bad)
    out = tmp_path / "q.gguf"
    assert cli_main(["quantize", str(tiny_llama / "m.gguf"), str(out), "--type", "Q4_K_M", "--imatrix",
                     str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: imatrix: ") and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("mix", ["IQ2_XXS", "IQ1_S", "IQ3_XXS"])
def test_mixes_that_need_unsupported_types_are_refused(tiny_llama, tmp_path, capsys, mix):
    assert cli_main(["quantize", str(tiny_llama / "m.gguf"), str(tmp_path / "q.gguf"), "--type", mix,
                     "--imatrix", str(tiny_llama / "im.gguf")]) == 2
    assert f"flashlm: error: type: {mix} is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--calib-data", "missing.txt"], "--calib-data: 'missing.txt' is not a file"),
    (["--calib-data", "{d}/empty.txt"], "holds no text"),
    (["--calib-data", "{d}/calib.txt", "--chunk-size", "4096"], "a chunk size of 4096 needs at least"),
])
def test_imatrix_command_refuses(tiny_llama, tmp_path, capsys, args, match):
    (tiny_llama / "empty.txt").write_text("  \n")
    args = [a.replace("{d}", str(tiny_llama)) for a in args]
    assert cli_main(["imatrix", str(tiny_llama / "m.gguf"), "-o", str(tmp_path / "x.gguf"), *args]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("edit, match", [
    (lambda m: setattr(m, "chunk_count", -1), "chunk_count must be an int"),
    (lambda m: setattr(m, "chunk_size", 2**31), "chunk_size must be an int"),
    (lambda m: m.entries.__setitem__("x", IMatrixEntry(np.ones(5, np.float32), np.array([1, 2]))), "do not split"),
    (lambda m: m.entries.__setitem__("x", IMatrixEntry(np.ones(4, np.float32), np.array([-1]))), "counts must be"),
    (lambda m: m.entries.clear(), "no entries"),
])
def test_unwritable_imatrix(tmp_path, edit, match):
    m = sample_imatrix(rng_for("unwritable"))
    edit(m)
    for name in ("a.gguf", "a.dat"):
        with pytest.raises(ValueError, match=match):
            write_imatrix(m, tmp_path / name)
        assert not (tmp_path / name).exists()
