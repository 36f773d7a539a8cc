"""flashlm.ops' GGUF block functions called as a hostile user would, one argument mutated at a time:
gguf_linear, dequantize and gguf_quantize, against gguf-py (llama.cpp's own Python package) as the reference
for the blocks' bytes and values. Each case runs in a forked child (tests/robust.py).
"""

import math

import gguf
import numpy as np
import torch

import robust
from flashlm import ops
from robust_args import (WRAP, Entry, Mutation, apply, dtype_mutations, poke, seeded, special_value_mutations,
                         tensor_mutations, type_mutations, valid_call, wrapped)


# -- GGUF blocks: gguf_linear, dequantize, gguf_quantize ------------------------------------------------------

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16_NAN = b"\x00\x7e"  # a float16 NaN, little-endian: a block scale


def q8_0_blocks(rows, cols, seed):
    w = torch.randn(rows, cols, generator=seeded(seed)).numpy()
    return torch.from_numpy(gguf.quants.quantize(w, Q8_0).reshape(-1).copy())


def dequantized(raw, shape):
    """gguf-py's float32 reading of Q8_0 bytes."""
    raw = torch.as_tensor(raw).contiguous().view(torch.uint8).numpy()
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(shape[0], -1), Q8_0).copy()).reshape(shape)


def nan_scale(raw):
    """The blocks with the scale of the first block of row 1 set to NaN (row 1 of the weight becomes NaN)."""
    raw = raw.clone()
    at = 68  # one row of 64 Q8_0 elements: two blocks of 34 bytes
    raw[at:at + 2] = torch.frombuffer(bytearray(F16_NAN), dtype=torch.uint8)
    return raw


def make_gguf_linear():
    return dict(x=torch.randn(3, 64, generator=seeded(8)), raw=q8_0_blocks(8, 64, 9), ggml_type="Q8_0", shape=(8, 64),
                bias=None)


def gguf_linear_reference(a):
    n, k = (int(s) for s in a["shape"])
    w = dequantized(a["raw"], (n, k)).double()
    y = torch.as_tensor(a["x"]).double() @ w.T
    return y if a["bias"] is None else y + torch.as_tensor(a["bias"]).double()


# The CPU path rounds x to 8-bit blocks as ggml does: a relative step of 1/254 of each block's maximum.
GGUF_LINEAR = Entry("flashlm.ops.gguf_linear", make_gguf_linear,
                    lambda a: ops.gguf_linear(a["x"], a["raw"], a["ggml_type"], a["shape"], a["bias"]),
                    gguf_linear_reference, rtol_of_max=2e-2)


def make_dequantize():
    return dict(raw=q8_0_blocks(8, 64, 10), ggml_type="Q8_0", shape=(8, 64), out_dtype=torch.float32, out=None)


def dequantize_reference(a):
    shape = tuple(int(s) for s in a["shape"])
    return dequantized(a["raw"], (8, 64)).reshape(shape)


def call_dequantize(a):
    return ops.dequantize(a["raw"], a["ggml_type"], a["shape"], a["out_dtype"], out=a["out"])


DEQUANTIZE = Entry("flashlm.ops.dequantize", make_dequantize, call_dequantize, dequantize_reference, rtol_of_max=0.0)


def make_quantize():
    data = torch.randn(4, 64, generator=seeded(11)).numpy()
    return dict(data=data, ggml_type="Q8_0", out=np.zeros((4, 68), np.uint8))


def quantize_reference(a):
    return torch.from_numpy(gguf.quants.quantize(np.asarray(torch.as_tensor(a["data"]).float()), Q8_0))


GGUF_QUANTIZE = Entry("flashlm.ops.gguf_quantize", make_quantize,
                      lambda a: ops.gguf_quantize(a["data"], a["ggml_type"], a["out"]), quantize_reference,
                      rtol_of_max=0.0)


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


def gguf_cases():
    short = lambda t: t[:-1].clone()  # noqa: E731
    cases = GGUF_LINEAR.cases(
        valid_call(),
        *tensor_mutations("x", dims=(0, 1), values=False),
        *special_value_mutations("x", values=(math.nan,)),
        Mutation("x", "K = 32", apply("x", lambda t: t[:, :32].clone()), names=("x", "shape")),
        Mutation("raw", "a NaN block scale", apply("raw", nan_scale), "correct"),
        Mutation("raw", "as rows [8, 68]", apply("raw", lambda t: t.reshape(8, 68)), "correct"),
        Mutation("raw", "one byte short", apply("raw", short)),
        Mutation("raw", "dimension 0 + 2**32 (a stride-0 view)", apply("raw", lambda t: wrapped(t, 0))),
        *dtype_mutations("raw", (torch.int8, torch.float32)),
        Mutation("raw", "on the meta device", apply("raw", lambda t: t.to("meta")), "either"),
        Mutation("raw", "not contiguous", apply("raw", lambda t: torch.stack([t, t], 1)[:, 0]), "either"),
        *type_mutations("raw"),
        Mutation("ggml_type", "'q8_0'", apply("ggml_type", lambda _: "q8_0"), "either"),
        Mutation("ggml_type", "'Q4_0' (the bytes are Q8_0)", apply("ggml_type", lambda _: "Q4_0"),
                 names=("ggml_type", "raw")),
        Mutation("ggml_type", "'F32'", apply("ggml_type", lambda _: "F32")),
        Mutation("ggml_type", "8 (Q8_0's id)", apply("ggml_type", lambda _: 8), "either"),
        Mutation("ggml_type", "8 + 2**32", apply("ggml_type", lambda _: 8 + WRAP)),
        Mutation("ggml_type", "None", apply("ggml_type", lambda _: None)),
        Mutation("shape", "(8, 64 + 2**32)", apply("shape", lambda _: (8, 64 + WRAP)), names=("shape", "raw", "x")),
        Mutation("shape", "(8 + 2**32, 64)", apply("shape", lambda _: (8 + WRAP, 64)), names=("shape", "raw")),
        Mutation("shape", "(2**63, 64)", apply("shape", lambda _: (1 << 63, 64)), names=("shape", "raw")),
        Mutation("shape", "(-8, 64)", apply("shape", lambda _: (-8, 64))),
        Mutation("shape", "(8,)", apply("shape", lambda _: (8,))),
        Mutation("shape", "(8, 64, 1)", apply("shape", lambda _: (8, 64, 1))),
        Mutation("shape", "(4, 128) (the same bytes)", apply("shape", lambda _: (4, 128)), "either",
                 names=("shape", "x")),
        Mutation("shape", "('8', '64')", apply("shape", lambda _: ("8", "64")), "either"),
        Mutation("shape", "None", apply("shape", lambda _: None)),
        Mutation("bias", "given [8]", apply("bias", lambda _: torch.randn(8, generator=seeded(12))), "correct"),
        Mutation("bias", "NaN in one element", apply("bias", lambda _: poke(torch.zeros(8), 5, math.nan)), "correct"),
        Mutation("bias", "shape [9]", apply("bias", lambda _: torch.zeros(9))),
        Mutation("bias", "float64", apply("bias", lambda _: torch.ones(8, dtype=torch.float64)), "either"),
        Mutation("bias", "on the meta device", apply("bias", lambda _: torch.zeros(8, device="meta")), "either"),
        Mutation("bias", "a list", apply("bias", lambda _: [0.0] * 8), "either"),
    )
    cases += DEQUANTIZE.cases(
        valid_call(),
        Mutation("raw", "a NaN block scale", apply("raw", nan_scale), "correct"),
        Mutation("raw", "one byte short", apply("raw", short), names=("raw", "shape")),
        Mutation("raw", "one byte more", apply("raw", lambda t: torch.cat([t, t[:1]])), names=("raw", "shape")),
        Mutation("raw", "as rows [8, 68]", apply("raw", lambda t: t.reshape(8, 68)), "correct"),
        Mutation("raw", "not contiguous", apply("raw", lambda t: torch.stack([t, t], 1)[:, 0]), "either"),
        Mutation("raw", "dimension 0 + 2**32 (a stride-0 view)", apply("raw", lambda t: wrapped(t, 0))),
        *dtype_mutations("raw", (torch.int8, torch.float32)),
        Mutation("raw", "on the meta device", apply("raw", lambda t: t.to("meta")), "either"),
        *type_mutations("raw"),
        Mutation("ggml_type", "'q8_0'", apply("ggml_type", lambda _: "q8_0"), "either"),
        Mutation("ggml_type", "8 (Q8_0's id)", apply("ggml_type", lambda _: 8), "either"),
        Mutation("ggml_type", "8 + 2**32", apply("ggml_type", lambda _: 8 + WRAP)),
        Mutation("ggml_type", "-1", apply("ggml_type", lambda _: -1)),
        Mutation("ggml_type", "'Q99'", apply("ggml_type", lambda _: "Q99")),
        Mutation("ggml_type", "'Q4_0' (the bytes are Q8_0)", apply("ggml_type", lambda _: "Q4_0"),
                 names=("ggml_type", "raw")),
        Mutation("ggml_type", "None", apply("ggml_type", lambda _: None)),
        Mutation("shape", "(4, 128) (the same bytes)", apply("shape", lambda _: (4, 128)), "either"),
        Mutation("shape", "(512,)", apply("shape", lambda _: (512,)), "either"),
        Mutation("shape", "(8, 64 + 2**32)", apply("shape", lambda _: (8, 64 + WRAP)), names=("shape", "raw")),
        Mutation("shape", "(8 + 2**32, 64)", apply("shape", lambda _: (8 + WRAP, 64)), names=("shape", "raw")),
        Mutation("shape", "(2**62, 2**62)", apply("shape", lambda _: (1 << 62, 1 << 62)), names=("shape", "raw")),
        Mutation("shape", "(8, 63)", apply("shape", lambda _: (8, 63))),
        Mutation("shape", "(-8, -64)", apply("shape", lambda _: (-8, -64))),
        Mutation("shape", "()", apply("shape", lambda _: ())),
        Mutation("shape", "None", apply("shape", lambda _: None)),
        Mutation("shape", "'8x64'", apply("shape", lambda _: "8x64")),
        Mutation("out_dtype", "float64", apply("out_dtype", lambda _: torch.float64), "either"),
        Mutation("out_dtype", "int32", apply("out_dtype", lambda _: torch.int32)),
        Mutation("out_dtype", "'float32' (a string)", apply("out_dtype", lambda _: "float32"), "either"),
        Mutation("out_dtype", "None", apply("out_dtype", lambda _: None)),
        Mutation("out", "given, float32 [8, 64]", apply("out", lambda _: torch.full((8, 64), 7.0)), "correct"),
        Mutation("out", "shape [8, 63]", apply("out", lambda _: torch.zeros(8, 63))),
        Mutation("out", "dtype bfloat16", apply("out", lambda _: torch.zeros(8, 64, dtype=torch.bfloat16))),
        Mutation("out", "not contiguous", apply("out", lambda _: torch.zeros(64, 8).T)),
        Mutation("out", "on the meta device", apply("out", lambda _: torch.zeros(8, 64, device="meta"))),
        Mutation("out", "a numpy array", apply("out", lambda _: np.zeros((8, 64), np.float32))),
        Mutation("out", "a stride-0 view", apply("out", lambda _: torch.zeros(1, 64).expand(8, 64))),
    )
    cases += GGUF_QUANTIZE.cases(
        valid_call(),
        Mutation("data", "a torch tensor", apply("data", torch.from_numpy), "either"),
        Mutation("data", "a bfloat16 tensor", apply("data", lambda d: torch.from_numpy(d).bfloat16()), "either"),
        *[Mutation("data", f"dtype {t}", apply("data", lambda d, t=t: d.astype(t)), "either")
          for t in ("float64", "float16", "int32")],
        Mutation("data", "rows of 63", apply("data", lambda d: d[:, :63].copy()), names=("data", "out")),
        Mutation("data", "not contiguous", apply("data", lambda d: np.asfortranarray(d)), "either"),
        Mutation("data", "columns at stride 2", apply("data", lambda d: np.repeat(d, 2, axis=1)[:, ::2]), "either"),
        Mutation("data", "0-dim", apply("data", lambda d: np.float32(1.0))),
        Mutation("data", "a meta tensor", apply("data", lambda d: torch.from_numpy(d).to("meta"))),
        Mutation("data", "a stride-0 view of 2**32 + 64 columns",
                 apply("data", lambda d: wrapped(torch.from_numpy(d), 1))),
        Mutation("data", "None", apply("data", lambda d: None)),
        Mutation("data", "a nested list", apply("data", lambda d: d.tolist()), "either"),
        Mutation("out", "one byte short", apply("out", lambda o: o.reshape(-1)[:-1].copy())),
        Mutation("out", "one byte more", apply("out", lambda o: np.zeros(o.size + 1, np.uint8))),
        Mutation("out", "dtype int8", apply("out", lambda o: o.view(np.int8)), "either"),
        Mutation("out", "dtype float32 of the same bytes", apply("out", lambda o: o.view(np.float32)), "either"),
        Mutation("out", "read-only", apply("out", read_only)),
        Mutation("out", "not contiguous", apply("out", lambda o: np.zeros((68, 4), np.uint8).T)),
        Mutation("out", "a torch tensor", apply("out", torch.from_numpy), "either"),
        Mutation("out", "None", apply("out", lambda o: None)),
        Mutation("ggml_type", "'q8_0'", apply("ggml_type", lambda _: "q8_0"), "either"),
        Mutation("ggml_type", "'Q99'", apply("ggml_type", lambda _: "Q99")),
        Mutation("ggml_type", "8 (Q8_0's id)", apply("ggml_type", lambda _: 8), "either"),
        Mutation("ggml_type", "None", apply("ggml_type", lambda _: None)),
    )
    return cases


CASES = gguf_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
