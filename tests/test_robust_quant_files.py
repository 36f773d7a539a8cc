"""Quantization inputs from a hostile source: importance matrices in llama.cpp's two formats
(flashlm.quant.imatrix.read_imatrix, and flashlm.io.quantize_file with one) and calibration text
(flashlm.quant.calibrate.token_batches, flashlm.train.prune.calibration_batches). Each case is a valid input with
one field changed, run in a forked child under a memory cap and a timeout (tests/robust.py): counts and lengths
that lie, truncation, NaN and negative values, names or widths of another model must raise an error naming the
field (or the byte offset), never allocate what the file does not hold.
"""

import os
import struct

import numpy as np

import gguf_bytes as gb
import robust
import robust_models as rm
from robust import Case, value_case

WIDTHS = {"attn_q": rm.D, "attn_k": rm.D, "attn_v": rm.D, "attn_output": rm.D, "ffn_gate": rm.D, "ffn_up": rm.D,
          "ffn_down": rm.FF}  # the input width of each block weight of the tiny llama
NAMES = [f"blk.{i}.{n}.weight" for i in range(rm.LAYERS) for n in WIDTHS]
Q0 = "blk.0.attn_q.weight"


def warm():
    import flashlm.io.quantize_file  # noqa: F401
    import flashlm.quant.imatrix  # noqa: F401
    import flashlm.train.prune  # noqa: F401

    rm.bpe_tokenizer_json()


def write(data, name: str) -> str:
    path = os.path.join(robust.scratch(), name)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def width(name: str) -> int:
    return WIDTHS[name.split(".")[2]] if name in NAMES else rm.D


# -- the legacy .dat format -------------------------------------------------------------------------------------

def dat_entry(name, ncall=1, nval=None, values=None, name_length=None) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    # a count that lies is followed by at most 64 values
    values = np.full(width(name) if nval is None else min(nval, 64), 2.0, np.float32) if values is None else values
    nval = len(values) if nval is None else nval
    return (struct.pack("<i", len(raw) if name_length is None else name_length) + raw + struct.pack("<ii", ncall, nval)
            + np.asarray(values, "<f4").tobytes())


def dat(entries=None, n_entries=None, trailer=b"") -> bytes:
    """A legacy imatrix: the valid entries (one per block weight) or those given, their count, then `trailer`
    (the optional chunk count and dataset name)."""
    entries = [dat_entry(n) for n in NAMES] if entries is None else entries
    return struct.pack("<i", len(entries) if n_entries is None else n_entries) + b"".join(entries) + trailer


def dat_with(name, **kw) -> bytes:
    return dat([dat_entry(name, **kw)] + [dat_entry(n) for n in NAMES if n != name])


# -- the GGUF format --------------------------------------------------------------------------------------------

def gguf_imatrix(entries=None, meta=None, extra=None) -> bytes:
    """A GGUF imatrix: per entry name -> (sums dims, sums values, counts dims, counts values), F32, then `extra`
    tensors (name -> (dims, type, bytes)); metadata general.type = imatrix and `meta` on top."""
    if entries is None:
        entries = {n: ((width(n), 1), np.full(width(n), 8.0), (1, 1), [4.0]) for n in NAMES}
    kvs = {"general.type": (gb.STRING, "imatrix"), "imatrix.chunk_count": (gb.UINT32, 4),
           "imatrix.chunk_size": (gb.UINT32, 16), "imatrix.datasets": (gb.ARRAY, (gb.STRING, ["calib.txt"]))}
    kvs.update(meta or {})
    tensors = {}
    for name, (sum_dims, sums, count_dims, counts) in entries.items():
        tensors[name + ".in_sum2"] = (sum_dims, gb.F32, np.asarray(sums, "<f4").tobytes())
        tensors[name + ".counts"] = (count_dims, gb.F32, np.asarray(counts, "<f4").tobytes())
    tensors.update(extra or {})
    infos, data = [], b""
    for name, (dims, ggml_type, raw) in tensors.items():
        data += bytes(gb.pad_to(len(data), 32) - len(data))
        infos.append(gb.tensor_info(name, dims, ggml_type, len(data)))
        data += raw
    return gb.gguf([gb.kv(k, t, v) for k, (t, v) in kvs.items()], infos, data)


def gguf_with(name, entry) -> bytes:
    good = {n: ((width(n), 1), np.full(width(n), 8.0), (1, 1), [4.0]) for n in NAMES}
    return gguf_imatrix({**good, name: entry})


# -- calls ------------------------------------------------------------------------------------------------------

def read(data_fn, name="i.dat"):
    def call():
        from flashlm.quant.imatrix import read_imatrix

        return read_imatrix(write(data_fn(), name))
    return call


def quantize(data_fn, name="i.dat"):
    """quantize_file of the tiny llama to Q4_0 with the imatrix data_fn() writes."""
    def call():
        from flashlm.io.quantize_file import quantize_file

        folder = robust.scratch()
        model = write(rm.gguf_model(), "model.gguf")
        return quantize_file(model, os.path.join(folder, "q.gguf"), "Q4_0", progress=False,
                             imatrix=write(data_fn(), name))
    return call


def reads_entries(n):
    def judge(m):
        return None if len(m.entries) == n else f"read {len(m.entries)} entries, the file has {n}"
    return judge


def quantized(report):
    return None if len(report) == len(rm.gguf_tensors()) else f"wrote {len(report)} tensors"


def legacy_cases():
    entry = "flashlm.quant.imatrix.read_imatrix (.dat)"
    ok = dat()
    cases = [
        value_case(entry, "a valid file", read(dat), (), reads_entries(len(NAMES))),
        value_case(entry, "a valid file with its chunk count and dataset", read(
            lambda: dat(trailer=struct.pack("<ii", 3, 4) + b"data")), (), reads_entries(len(NAMES))),
        Case(entry, "empty", read(lambda: b""), ("entry count",)),
        Case(entry, "truncated in the entry count", read(lambda: ok[:2]), ("entry count",)),
        Case(entry, "truncated in the values", read(lambda: ok[:-7]), ("at byte",)),
        Case(entry, "truncated in a name", read(lambda: ok[:10]), ("at byte",)),
        Case(entry, "entry count 0", read(lambda: dat(n_entries=0)), ("entry count",)),
        Case(entry, "entry count -1", read(lambda: dat(n_entries=-1)), ("entry count",)),
        Case(entry, "entry count 2**31 - 1", read(lambda: dat(n_entries=(1 << 31) - 1)), ("entry count",)),
        Case(entry, "entry count one more than the entries", read(lambda: dat(n_entries=len(NAMES) + 1)), ("at byte",)),
        Case(entry, "name length 2**31 - 1", read(lambda: dat([dat_entry(Q0, name_length=(1 << 31) - 1)])),
             ("name length",)),
        Case(entry, "name length -5", read(lambda: dat([dat_entry(Q0, name_length=-5)])), ("name length",)),
        Case(entry, "name length 0", read(lambda: dat([dat_entry(b"", nval=4)])), ("name length",)),
        Case(entry, "a name of invalid UTF-8", read(lambda: dat([dat_entry(b"\xff\xfe", nval=4)])), ("name",)),
        Case(entry, "value count 2**31 - 1", read(lambda: dat_with(Q0, nval=(1 << 31) - 1)), ("value count", "values")),
        Case(entry, "value count 0", read(lambda: dat_with(Q0, nval=0, values=[])), ("value count",)),
        Case(entry, "value count -1", read(lambda: dat_with(Q0, nval=-1, values=[])), ("value count",)),
        Case(entry, "a NaN value", read(lambda: dat_with(Q0, values=[np.nan] + [1.0] * (rm.D - 1))), (repr(Q0),)),
        Case(entry, "an infinite value", read(lambda: dat_with(Q0, values=[np.inf] * rm.D)), (repr(Q0),)),
        Case(entry, "a negative value (a sum of squares)", read(lambda: dat_with(Q0, values=[-1.0] * rm.D)),
             (repr(Q0),)),
        Case(entry, "ncall -3", read(lambda: dat_with(Q0, ncall=-3)), ("ncall",)),
        Case(entry, "an entry twice", read(lambda: dat([dat_entry(Q0), dat_entry(Q0)])), ("twice",)),
        Case(entry, "dataset name length 2**31 - 1", read(lambda: dat(trailer=struct.pack("<ii", 3, (1 << 31) - 1))),
             ("dataset name length",)),
        Case(entry, "dataset name length -1", read(lambda: dat(trailer=struct.pack("<ii", 3, -1))),
             ("dataset name length",)),
        Case(entry, "a chunk count without the dataset name length", read(lambda: dat(trailer=struct.pack("<i", 3))),
             ("dataset name length",)),
        Case(entry, "bytes after the dataset name", read(lambda: dat(trailer=struct.pack("<ii", 3, 1) + b"ab")),
             ("dataset name",)),
        Case(entry, "not a file (a folder)", lambda: __import__("flashlm.quant.imatrix").quant.imatrix.read_imatrix(
            robust.scratch()), ("imatrix",)),
    ]
    return cases


def gguf_cases():
    entry = "flashlm.quant.imatrix.read_imatrix (GGUF)"
    read_g = lambda fn: read(fn, "i.gguf")  # noqa: E731
    d = rm.D
    cases = [
        value_case(entry, "a valid file", read_g(gguf_imatrix), (), reads_entries(len(NAMES))),
        value_case(entry, "a valid file of 2 matrices per entry (experts)", read_g(lambda: gguf_with(
            Q0, ((d, 2), np.ones(2 * d), (1, 2), [1.0, 2.0]))), (), reads_entries(len(NAMES))),
        Case(entry, "a model file, not an imatrix", read_g(rm.gguf_model), ("imatrix", "general.type")),
        Case(entry, "general.type model", read_g(lambda: gguf_imatrix(meta={"general.type": (gb.STRING, "model")})),
             ("general.type",)),
        Case(entry, "imatrix.chunk_count a string", read_g(lambda: gguf_imatrix(
            meta={"imatrix.chunk_count": (gb.STRING, "4")})), ("imatrix.chunk_count",)),
        Case(entry, "imatrix.datasets an int", read_g(lambda: gguf_imatrix(
            meta={"imatrix.datasets": (gb.UINT32, 4)})), ("imatrix.datasets",)),
        Case(entry, "truncated", read_g(lambda: gguf_imatrix()[:-40]), ("at byte", "imatrix")),
        Case(entry, "no entries", read_g(lambda: gguf_imatrix({})), ("entries",)),
        Case(entry, "counts missing", read_g(lambda: gguf_imatrix(extra={Q0 + ".in_sum2": (
            (d, 1), gb.F32, np.ones(d, "<f4").tobytes())}, entries={})), (repr(Q0 + ".counts"),)),
        Case(entry, "a tensor of another name", read_g(lambda: gguf_imatrix(extra={"output.weight": (
            (d,), gb.F32, np.ones(d, "<f4").tobytes())})), (repr("output.weight"),)),
        Case(entry, "sums F16", read_g(lambda: gguf_imatrix(extra={Q0 + ".in_sum2": (
            (d, 1), gb.F16, np.ones(d, "<f2").tobytes())})), (repr(Q0 + ".in_sum2"),)),
        Case(entry, "2 counts for sums of 1 matrix of 33", read_g(lambda: gguf_with(
            Q0, ((33, 1), np.ones(33), (1, 2), [1.0, 1.0]))), (repr(Q0),)),
        Case(entry, "sums [16, 2, 2] with counts [1, 2] (not [ne0, nmat])", read_g(lambda: gguf_with(
            Q0, ((16, 2, 2), np.ones(64), (1, 2), [1.0, 1.0]))), (repr(Q0),)),
        Case(entry, "counts [2, 1] (not [1, nmat])", read_g(lambda: gguf_with(
            Q0, ((d, 1), np.ones(d), (2, 1), [1.0, 1.0]))), (repr(Q0),)),
        Case(entry, "a NaN sum", read_g(lambda: gguf_with(Q0, ((d, 1), [np.nan] * d, (1, 1), [1.0]))), (repr(Q0),)),
        Case(entry, "a negative sum", read_g(lambda: gguf_with(Q0, ((d, 1), [-2.0] * d, (1, 1), [1.0]))), (repr(Q0),)),
        Case(entry, "a negative count", read_g(lambda: gguf_with(Q0, ((d, 1), [2.0] * d, (1, 1), [-1.0]))),
             (repr(Q0),)),
        Case(entry, "a NaN count", read_g(lambda: gguf_with(Q0, ((d, 1), [2.0] * d, (1, 1), [np.nan]))), (repr(Q0),)),
        Case(entry, "a count of 1e30", read_g(lambda: gguf_with(Q0, ((d, 1), [2.0] * d, (1, 1), [1e30]))), (repr(Q0),)),
    ]
    return cases


def another_model_cases():
    entry = "flashlm.io.quantize_file (--imatrix)"
    return [
        value_case(entry, "a valid .dat", quantize(dat), (), quantized),
        value_case(entry, "a valid GGUF imatrix", quantize(gguf_imatrix, "i.gguf"), (), quantized),
        value_case(entry, "a .dat of some of the weights", quantize(lambda: dat([dat_entry(Q0)])), (), quantized),
        Case(entry, "an entry the model lacks (blk.7)", quantize(lambda: dat([dat_entry("blk.7.attn_q.weight")])),
             ("blk.7.attn_q.weight",)),
        Case(entry, "an entry of another width (.dat)", quantize(lambda: dat_with(Q0, nval=2 * rm.D)), (Q0,)),
        Case(entry, "an entry of another width (GGUF)", quantize(lambda: gguf_with(
            Q0, ((64, 1), np.ones(64), (1, 1), [1.0])), "i.gguf"), (Q0,)),
        Case(entry, "an entry of 2 matrices for a 2-D weight", quantize(lambda: gguf_with(
            Q0, ((16, 2), np.ones(32), (1, 2), [1.0, 1.0])), "i.gguf"), (Q0,)),
        Case(entry, "an entry for a 1-D weight (output_norm)", quantize(lambda: dat([dat_entry(
            "output_norm.weight")])), ("output_norm.weight",)),
        Case(entry, "the model file as the imatrix", quantize(rm.gguf_model, "i.gguf"), ("imatrix", "general.type")),
    ]


# -- importance values far out of scale --------------------------------------------------------------------------

IMATRIX_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def scale_cases():
    """A block's importance values matter relative to each other: the quantizers' weighted fits give the same
    bytes for the values times a power of two. Values far past any activation's (a file's 1e38) must neither
    overflow the fits into NaN scales nor change the result."""
    entry = "flashlm.quant.quantize_gguf (imatrix)"

    def call(ggml_type, power):
        def run():
            from flashlm.quant.gguf_quantize import quantize_gguf

            rng = np.random.default_rng(7)
            w = (rng.standard_normal((4, 512)) * rng.uniform(0.01, 3, (1, 512))).astype(np.float32)
            importance = (rng.standard_normal(512) ** 2 * rng.uniform(0.1, 10, 512)).astype(np.float32)
            scaled = importance * np.float32(2.0 ** power)
            scaled[:256] = importance[:256]  # one block as given, the others scaled
            return quantize_gguf(w, ggml_type, imatrix=importance), quantize_gguf(w, ggml_type, imatrix=scaled)
        return run

    def same(pair):
        differ = int((pair[0] != pair[1]).sum())
        return None if differ == 0 else f"{differ} bytes differ from the quantization with the values as given"
    return [value_case(entry, f"{t}: values times 2**{p}", call(t, p), ("imatrix",), same)
            for t in IMATRIX_TYPES for p in (24, 120)]


# -- calibration text -------------------------------------------------------------------------------------------

def calibration_cases():
    def prune_batches(text_fn, **kw):
        def call():
            from flashlm.io.tokenizer import Tokenizer
            from flashlm.train.prune import calibration_batches
            from tokenizers import Tokenizer as Backend

            tok = Tokenizer(Backend.from_str(rm.bpe_tokenizer_json()))
            return calibration_batches(tok, write(text_fn(), "calib.txt"), **kw)
        return call

    def token_batches(data, **kw):
        def call():
            from flashlm.quant.calibrate import token_batches as batches

            return batches(data, **kw)
        return call

    entry, prune = "flashlm.quant.calibrate.token_batches", "flashlm.train.prune.calibration_batches"
    rows_of = lambda n: lambda r: None if len(r) and sum(len(b) for b in r) == n else f"{len(r)} batches"  # noqa: E731
    return [
        value_case(entry, "a valid call (3 rows)", token_batches(list(range(30)), seq_len=10, batch_size=2), (),
                   rows_of(3)),
        Case(entry, "no tokens", token_batches([], seq_len=8, batch_size=1), ("data",)),
        Case(entry, "fewer tokens than one window", token_batches(list(range(7)), seq_len=8, batch_size=1), ("data",)),
        Case(entry, "seq_len 0", token_batches(list(range(7)), seq_len=0, batch_size=1), ("seq_len",)),
        Case(entry, "float ids", token_batches([0.5, 1.5], seq_len=1, batch_size=1), ("data",)),
        Case(entry, "text without a tokenizer", token_batches("some text", seq_len=1, batch_size=1), ("tokenizer",)),
        value_case(prune, "a valid file", prune_batches(lambda: rm.TEXT, n_samples=2, seq_len=8), (), rows_of(2)),
        Case(prune, "an empty file", prune_batches(lambda: ""), ("calib_data",)),
        Case(prune, "one character", prune_batches(lambda: "a"), ("calib_data",)),
        value_case(prune, "text shorter than one window (one shorter window)", prune_batches(
            lambda: "the fox", seq_len=100), ("calib_data",), rows_of(1)),
        Case(prune, "calib_samples 0", prune_batches(lambda: rm.TEXT, n_samples=0), ("calib_samples",)),
        Case(prune, "calib_seq_len -1", prune_batches(lambda: rm.TEXT, seq_len=-1), ("calib_seq_len",)),
        Case(prune, "a missing file", lambda: __import__("flashlm.train.prune").train.prune.calibration_batches(
            None, os.path.join(robust.scratch(), "missing.txt")), ("calib_data",)),
    ]


CASES = legacy_cases() + gguf_cases() + another_model_cases() + scale_cases() + calibration_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
