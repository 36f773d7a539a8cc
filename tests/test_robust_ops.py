"""flashlm.ops called as a hostile user would: every public function with one argument mutated at a time.

Each case runs in a forked child under a memory cap and a timeout (tests/robust.py) and must neither crash
nor hang, and either return what an independent reference computes (float64 torch; gguf-py for GGML blocks)
or raise ValueError/TypeError/NotImplementedError naming the argument. The attention entry points are in
test_robust_attention.py, the native decoder in test_robust_decoder.py.
"""

import math

import gguf
import numpy as np
import torch

import robust
from flashlm import ops
from reference import paged_attention as paged_attention_reference
from robust import Case
from robust_args import (WRAP, Entry, Mutation, apply, close, dtype_mutations, edit, float_mutations, int_mutations,
                         layout_mutations, poke, special_value_mutations, tensor_mutations, type_mutations,
                         valid_call, wrapped)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- rms_norm, silu_mul ---------------------------------------------------------------------------------------

def norm_reference(x, weight, eps):
    x = torch.as_tensor(x).double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps)) * torch.as_tensor(weight).double()


def make_norm():
    g = gen(1)
    return dict(x=torch.randn(3, 64, generator=g), weight=torch.randn(64, generator=g), eps=1e-5)


RMS_NORM = Entry("flashlm.ops.rms_norm", make_norm, lambda a: ops.rms_norm(a["x"], a["weight"], a["eps"]),
                 lambda a: norm_reference(a["x"], a["weight"], a["eps"]), rtol_of_max=1e-5)


def make_norm_residual():
    return dict(make_norm(), residual=torch.randn(3, 64, generator=gen(2)))


def norm_residual_reference(a):
    if a["residual"] is None:
        return norm_reference(a["x"], a["weight"], a["eps"]), None
    total = torch.as_tensor(a["residual"]).double() + torch.as_tensor(a["x"]).double()
    return norm_reference(total, a["weight"], a["eps"]), total


def call_norm_residual(a):
    out = ops.rms_norm(a["x"], a["weight"], a["eps"], residual=a["residual"])
    return out, a["residual"]  # the residual is updated in place


RMS_NORM_RESIDUAL = Entry("flashlm.ops.rms_norm(residual=)", make_norm_residual, call_norm_residual,
                          norm_residual_reference, rtol_of_max=1e-5)


def make_silu():
    g = gen(3)
    return dict(gate=torch.randn(3, 64, generator=g), up=torch.randn(3, 64, generator=g))


def silu_reference(a):
    g, u = torch.as_tensor(a["gate"]).double(), torch.as_tensor(a["up"]).double()
    return g * torch.sigmoid(g) * u


SILU_MUL = Entry("flashlm.ops.silu_mul", make_silu, lambda a: ops.silu_mul(a["gate"], a["up"]), silu_reference,
                 rtol_of_max=1e-5)


def norm_cases():
    cat = lambda t: torch.cat([t, t[..., :1]], dim=-1)  # noqa: E731 - one column more
    cases = RMS_NORM.cases(
        valid_call(),
        *tensor_mutations("x", dims=(0, 1)),
        Mutation("x", "an extra leading dimension [1, 3, 64]", apply("x", lambda t: t[None]), "correct"),
        Mutation("x", "no rows [0, 64]", apply("x", lambda t: t[:0]), "correct"),
        Mutation("x", "65 columns (weight has 64)", apply("x", cat), names=("x", "weight")),
        *tensor_mutations("weight", dims=(0,), dtypes=(torch.float64, torch.float16, torch.bfloat16, torch.int32),
                           matrix=False),
        Mutation("weight", "shape [63]", apply("weight", lambda t: t[:63]), names=("weight", "x")),
        Mutation("weight", "shape [1] (broadcastable)", apply("weight", lambda t: t[:1])),
        Mutation("weight", "shape [3, 64]", apply("weight", lambda t: t.expand(3, 64).clone())),
        *float_mutations("eps"),
    )
    cases += RMS_NORM_RESIDUAL.cases(
        valid_call(),
        *tensor_mutations("residual", dims=(0, 1), optional=True),
        Mutation("residual", "shape [3, 63]", apply("residual", lambda t: t[:, :63].clone()), names=("residual", "x")),
        Mutation("residual", "shape [1, 64] (broadcastable)", apply("residual", lambda t: t[:1].clone())),
        Mutation("residual", "the same tensor as x", edit(lambda a: a.update(residual=a["x"])), "either"),
    )
    cases += SILU_MUL.cases(
        valid_call(),
        *tensor_mutations("gate", dims=(0, 1)),
        *tensor_mutations("up", dims=(1,)),
        Mutation("up", "shape [3, 63]", apply("up", lambda t: t[:, :63].clone()), names=("up", "gate")),
        Mutation("up", "shape [64] (broadcastable)", apply("up", lambda t: t[0].clone())),
        Mutation("gate", "shape [0, 64] with up [0, 64]", edit(lambda a: a.update(gate=a["gate"][:0], up=a["up"][:0])),
                 "correct"),
    )
    # silu(-inf): its limit (0) and x * sigmoid(x) (NaN) differ; the float64 reference is no arbiter there.
    return [c for c in cases if c.mutation != "gate: element 0 = -inf"]


# -- quantize_per_token, int8_linear, int4_linear ------------------------------------------------------------

def per_token_reference(a):
    x = torch.as_tensor(a["x"]).double()
    amax = x.abs().amax(-1)
    scales = amax / 127
    q = torch.round(x * 127 / amax[..., None].clamp(min=1e-300)).clamp(-127, 127)
    return q, scales


def per_token_compare(got, want):
    q_want, s_want = want
    assert isinstance(got, tuple) and len(got) == 2, f"expected (q, scales), got {type(got).__name__}"
    q, scales = got
    close(scales, s_want, rtol_of_max=1e-6, name="scales")
    if q_want.is_meta or q.is_meta:
        return close(q, q_want, name="q")
    assert q.dtype == torch.int8 and q.shape == q_want.shape, f"q: {q.dtype} {list(q.shape)}"
    finite = torch.isfinite(s_want)[..., None].expand_as(q_want)
    err = (q.double() - q_want).abs().where(finite, 0.0)
    assert err.max() <= 1, f"q: off by {err.max().item()} at {np.unravel_index(int(err.argmax()), err.shape)}"


QUANTIZE_PER_TOKEN = Entry("flashlm.ops.quantize_per_token", lambda: dict(x=torch.randn(3, 64, generator=gen(4))),
                           lambda a: ops.quantize_per_token(a["x"]), per_token_reference,
                           compare=per_token_compare)


def make_int8():
    g = gen(5)
    return dict(x=torch.randn(3, 64, generator=g), w_int8=torch.randint(-127, 128, (8, 64), generator=g).to(torch.int8),
                w_scales=torch.rand(8, generator=g) * 0.01 + 1e-3, bias=torch.randn(8, generator=g))


def int8_reference(a):
    w = torch.as_tensor(a["w_int8"]).double() * torch.as_tensor(a["w_scales"]).double()[:, None]
    y = torch.as_tensor(a["x"]).double() @ w.T
    return y if a["bias"] is None else y + torch.as_tensor(a["bias"]).double()


# W8A8: the activations are rounded per token to 8 bits (a relative step of 1/254 of the row's maximum).
INT8_LINEAR = Entry("flashlm.ops.int8_linear", make_int8,
                    lambda a: ops.int8_linear(a["x"], a["w_int8"], a["w_scales"], a["bias"]), int8_reference,
                    rtol_of_max=2e-2)


def make_int4():
    g = gen(6)
    return dict(x=torch.randn(3, 128, generator=g), w_packed=torch.randint(0, 256, (8, 64), generator=g).to(torch.uint8),
                scales=torch.rand(8, 4, generator=g) * 0.1 + 0.01, zeros=None, group_size=32, bias=None)


def int4_reference(a):
    """Byte j of a group holds element j (low nibble) and j + group/2 (high nibble); w = (u - z) * s."""
    packed, gs = torch.as_tensor(a["w_packed"]).long(), int(a["group_size"])
    n, half = packed.shape[0], gs // 2
    groups = packed.reshape(n, -1, half)
    u = torch.cat([groups & 0xF, groups >> 4], dim=-1).double()  # [n, groups, gs]
    zeros = 8.0 if a["zeros"] is None else torch.as_tensor(a["zeros"]).double()[..., None]
    w = ((u - zeros) * torch.as_tensor(a["scales"]).double()[..., None]).reshape(n, -1)
    y = torch.as_tensor(a["x"]).double() @ w.T
    return y if a["bias"] is None else y + torch.as_tensor(a["bias"]).double()


INT4_LINEAR = Entry("flashlm.ops.int4_linear", make_int4,
                    lambda a: ops.int4_linear(a["x"], a["w_packed"], a["scales"], a["zeros"], a["group_size"],
                                                 a["bias"]), int4_reference, rtol_of_max=1e-5)


def int_linear_cases():
    cases = QUANTIZE_PER_TOKEN.cases(
        valid_call(),
        *tensor_mutations("x", dims=(0, 1)),
        Mutation("x", "a row of zeros", apply("x", lambda t: poke(t, 1, 0.0)), "correct"),
        Mutation("x", "shape [2, 3, 64]", apply("x", lambda t: torch.cat([t, t]).reshape(2, 3, 64)), "correct"),
    )
    nan_only = dict(values=False)
    cases += INT8_LINEAR.cases(
        valid_call(),
        *tensor_mutations("x", dims=(0, 1), **nan_only),
        *special_value_mutations("x", values=(math.nan,)),
        Mutation("x", "K = 63", apply("x", lambda t: t[:, :63].clone()), names=("x", "w_int8")),
        *dtype_mutations("w_int8", (torch.uint8, torch.int32, torch.float32)),
        Mutation("w_int8", "on the meta device", apply("w_int8", lambda t: t.to("meta")), "either"),
        Mutation("w_int8", "dimension 0 + 2**32 (a stride-0 view)", apply("w_int8", lambda t: wrapped(t, 0)),
                 names=("w_int8", "w_scales")),
        Mutation("w_int8", "dimension 1 + 2**32 (a stride-0 view)", apply("w_int8", lambda t: wrapped(t, 1)),
                 names=("w_int8", "x")),
        Mutation("w_int8", "shape [8, 63]", apply("w_int8", lambda t: t[:, :63].clone()), names=("w_int8", "x")),
        Mutation("w_int8", "shape [8, 64, 1]", apply("w_int8", lambda t: t[..., None])),
        *layout_mutations("w_int8"),
        *type_mutations("w_int8"),
        *tensor_mutations("w_scales", dims=(0,), values=False, matrix=False),
        *special_value_mutations("w_scales", values=(math.nan,)),
        Mutation("w_scales", "shape [7]", apply("w_scales", lambda t: t[:7])),
        *tensor_mutations("bias", dims=(0,), optional=True, matrix=False),
        Mutation("bias", "shape [7]", apply("bias", lambda t: t[:7])),
    )
    cases += INT4_LINEAR.cases(
        valid_call(),
        *tensor_mutations("x", dims=(0, 1), values=False),
        *special_value_mutations("x", values=(math.nan,)),
        Mutation("x", "K = 64", apply("x", lambda t: t[:, :64].clone()), names=("x", "w_packed")),
        *dtype_mutations("w_packed", (torch.int8, torch.int32)),
        Mutation("w_packed", "on the meta device", apply("w_packed", lambda t: t.to("meta")), "either"),
        Mutation("w_packed", "dimension 1 + 2**32 (a stride-0 view)", apply("w_packed", lambda t: wrapped(t, 1))),
        Mutation("w_packed", "shape [8, 63]", apply("w_packed", lambda t: t[:, :63].clone()), names=("w_packed", "x")),
        *layout_mutations("w_packed"),
        *type_mutations("w_packed"),
        *tensor_mutations("scales", dims=(1,), values=False),
        *special_value_mutations("scales", values=(math.nan,)),
        Mutation("scales", "shape [8, 3]", apply("scales", lambda t: t[:, :3].clone())),
        Mutation("zeros", "given [8, 4]", apply("zeros", lambda _: torch.full((8, 4), 7.5)), "correct"),
        Mutation("zeros", "NaN in one group", apply("zeros", lambda _: poke(torch.full((8, 4), 7.0), (2, 1), math.nan)),
                 "correct"),
        Mutation("zeros", "shape [8, 3]", apply("zeros", lambda _: torch.full((8, 3), 8.0)), names=("zeros", "scales")),
        Mutation("zeros", "a string", apply("zeros", lambda _: "zeros")),
        *int_mutations("group_size", 32, zero="raise"),
        Mutation("group_size", "64 (scales have 4 groups of 32)", apply("group_size", lambda _: 64),
                 names=("group_size", "scales")),
        Mutation("group_size", "16", apply("group_size", lambda _: 16), names=("group_size", "scales")),
        Mutation("bias", "given [8]", apply("bias", lambda _: torch.randn(8, generator=gen(7))), "correct"),
        Mutation("bias", "NaN in one element", apply("bias", lambda _: poke(torch.zeros(8), 3, math.nan)), "correct"),
        Mutation("bias", "shape [9]", apply("bias", lambda _: torch.zeros(9))),
    )
    return cases


# -- GGUF blocks: gguf_linear, dequantize, gguf_quantize ------------------------------------------------------

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16_NAN = b"\x00\x7e"  # a float16 NaN, little-endian: a block scale


def q8_0_blocks(rows, cols, seed):
    w = torch.randn(rows, cols, generator=gen(seed)).numpy()
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
    return dict(x=torch.randn(3, 64, generator=gen(8)), raw=q8_0_blocks(8, 64, 9), ggml_type="Q8_0", shape=(8, 64),
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
    data = torch.randn(4, 64, generator=gen(11)).numpy()
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
        Mutation("bias", "given [8]", apply("bias", lambda _: torch.randn(8, generator=gen(12))), "correct"),
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


# -- adamw_step_ ----------------------------------------------------------------------------------------------

def make_adamw():
    g = gen(13)
    shapes = [(5,), (3, 4)]
    return dict(params=[torch.randn(s, generator=g) for s in shapes], grads=[torch.randn(s, generator=g) for s in shapes],
                exp_avgs=[torch.randn(s, generator=g) * 0.1 for s in shapes],
                exp_avg_sqs=[torch.rand(s, generator=g) * 0.1 for s in shapes],
                step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)


def call_adamw(a):
    ops.adamw_step_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["step"], a["lr"], a["beta1"],
                       a["beta2"], a["eps"], a["weight_decay"], a["maximize"])
    return list(a["params"]), list(a["exp_avgs"]), list(a["exp_avg_sqs"])


def adamw_reference(a):
    """torch.optim.AdamW's update in float64."""
    steps = a["step"] if isinstance(a["step"], (list, tuple)) else [a["step"]] * len(a["params"])
    lr, b1, b2, eps, wd = (float(a[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    ps, ms, vs = [], [], []
    for p, g, m, v, step in zip(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], steps):
        p, g, m, v = (torch.as_tensor(t).double() for t in (p, g, m, v))
        g = -g if a["maximize"] else g
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bias1, bias2 = 1 - b1 ** int(step), 1 - b2 ** int(step)
        p = p - lr / bias1 * m / (v.sqrt() / math.sqrt(bias2) + eps)
        ps.append(p), ms.append(m), vs.append(v)
    return ps, ms, vs


ADAMW = Entry("flashlm.ops.adamw_step_", make_adamw, call_adamw, adamw_reference, rtol_of_max=1e-5)


def in_list(name, i, fn):
    """An `apply` that replaces args[name][i] by fn(it)."""
    def change(args):
        items = list(args[name])
        items[i] = fn(items[i])
        args[name] = items
    return change


def adamw_cases():
    cases = ADAMW.cases(valid_call())
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        # The native messages name an element as "params[1].exp_avg": that names the argument too.
        item = (f"{name}[1]", name, f"params[1].{name.removesuffix('s')}")
        cases += ADAMW.cases(
            Mutation(name, "NaN in element 0 of the second tensor", in_list(name, 1, lambda t: poke(t, (0, 0), math.nan)),
                     "correct", names=item),
            Mutation(name, "the second tensor bfloat16", in_list(name, 1, lambda t: t.bfloat16()), "either",
                     names=item),
            Mutation(name, "the second tensor float64", in_list(name, 1, lambda t: t.double()), "either",
                     names=item),
            Mutation(name, "the second tensor on the meta device", in_list(name, 1, lambda t: t.to("meta")),
                     "either", names=item),
            Mutation(name, "the second tensor shape [3, 3]", in_list(name, 1, lambda t: t[:, :3].clone()),
                     names=item),
            Mutation(name, "the second tensor not contiguous", in_list(name, 1, lambda t: t.T.contiguous().T),
                     "either", names=item),
            Mutation(name, "the second tensor a stride-0 view", in_list(name, 1, lambda t: t[:1].expand(3, 4)),
                     names=item),
            Mutation(name, "the second tensor None", in_list(name, 1, lambda t: None), names=item),
            Mutation(name, "one tensor fewer", apply(name, lambda ts: ts[:1])),
            Mutation(name, "a tensor instead of a list", apply(name, lambda ts: ts[0])),
            Mutation(name, "None", apply(name, lambda ts: None)),
        )
    cases += ADAMW.cases(
        Mutation("params", "a tuple", apply("params", tuple), "correct"),
        Mutation("params", "a generator", apply("params", lambda ts: (t for t in ts))),
        Mutation("params", "all empty lists", edit(lambda a: a.update(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[])),
                 "correct"),
        *int_mutations("step", 3, zero="raise", huge="either"),
        Mutation("step", "one per tensor [3, 7]", apply("step", lambda _: [3, 7]), "correct"),
        Mutation("step", "[3, 7 + 2**32]", apply("step", lambda _: [3, 7 + WRAP]), "either"),
        Mutation("step", "[3] for two tensors", apply("step", lambda _: [3])),
        *float_mutations("lr"),
        *float_mutations("beta1", negative="raise"),
        Mutation("beta1", "1.0", apply("beta1", lambda _: 1.0)),
        *float_mutations("beta2", negative="raise"),
        Mutation("beta2", "1.5", apply("beta2", lambda _: 1.5)),
        *float_mutations("eps"),
        *float_mutations("weight_decay"),
        Mutation("maximize", "True", apply("maximize", lambda _: True), "correct"),
        Mutation("maximize", "'no' (a string)", apply("maximize", lambda _: "no")),
    )
    return cases


# -- write_kv_cache, paged_attention --------------------------------------------------------------------------

BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, HEADS = 10, 4, 2, 32, 4


def make_write():
    g = gen(14)
    cache = (BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return dict(key=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g), value=torch.randn(5, KV_HEADS, HEAD_DIM, generator=g),
                k_cache=torch.randn(cache, generator=g), v_cache=torch.randn(cache, generator=g),
                slot_mapping=torch.tensor([3, 0, 17, -1, 22]))


def write_reference(a):
    out = []
    for new, cache in ((a["key"], a["k_cache"]), (a["value"], a["v_cache"])):
        cache = torch.as_tensor(cache).double().clone()
        rows = cache.view(-1, *cache.shape[2:])
        slots = torch.as_tensor(a["slot_mapping"]).long()
        keep = slots >= 0
        rows[slots[keep]] = torch.as_tensor(new).double()[keep]
        out.append(cache)
    return tuple(out)


def call_write(a):
    ops.write_kv_cache(a["key"], a["value"], a["k_cache"], a["v_cache"], a["slot_mapping"])
    return a["k_cache"], a["v_cache"]


WRITE_KV_CACHE = Entry("flashlm.ops.write_kv_cache", make_write, call_write, write_reference, rtol_of_max=0.0)


def make_table(lens, gen_seed=15, width=4, blocks=BLOCKS):
    perm = torch.randperm(blocks, generator=gen(gen_seed)).to(torch.int32)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for s, n in enumerate(lens):
        need = -(-n // BLOCK_SIZE)
        table[s, :need] = perm[used:used + need]
        used += need
    return table


def make_decode(lens=(5, 1, 13), blocks=BLOCKS, width=4, num_splits=0):
    g = gen(16)
    cache = (blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return dict(q=torch.randn(len(lens), HEADS, HEAD_DIM, generator=g), k_cache=torch.randn(cache, generator=g),
                v_cache=torch.randn(cache, generator=g), block_table=make_table(lens, width=width, blocks=blocks),
                seq_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=None, max_seqlen_q=None,
                softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, num_splits=num_splits)


def make_prefill():
    a = make_decode()
    a.update(q=torch.randn(6, HEADS, HEAD_DIM, generator=gen(17)), cu_seqlens_q=torch.tensor([0, 2, 3, 6], dtype=torch.int32),
             max_seqlen_q=3)
    return a


def call_paged(a):
    return ops.paged_attention(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"], a["cu_seqlens_q"],
                                  a["max_seqlen_q"], a["softmax_scale"], a["causal"], a["window_size"], a["softcap"],
                                  a["num_splits"], return_lse=True)


def paged_reference(a):
    q = torch.as_tensor(a["q"]).double()
    scale = q.shape[-1] ** -0.5 if a["softmax_scale"] is None else float(a["softmax_scale"])
    lens = [int(n) for n in torch.as_tensor(a["seq_lens"])]
    cu = None if a["cu_seqlens_q"] is None else [int(c) for c in torch.as_tensor(a["cu_seqlens_q"])]
    window = tuple(int(w) for w in a["window_size"])
    return paged_attention_reference(q, torch.as_tensor(a["k_cache"]).double(), torch.as_tensor(a["v_cache"]).double(),
                           torch.as_tensor(a["block_table"]).long(), lens, cu, causal=bool(a["causal"]), window=window,
                           softcap=float(a["softcap"]), scale=scale)


PAGED_DECODE = Entry("flashlm.ops.paged_attention (decode)", make_decode, call_paged, paged_reference, rtol_of_max=1e-5)
PAGED_SPLITS = Entry("flashlm.ops.paged_attention (decode, 4 splits)",
                     lambda: make_decode((61, 3), blocks=20, width=16, num_splits=4), call_paged, paged_reference,
                     rtol_of_max=1e-5)
PAGED_PREFILL = Entry("flashlm.ops.paged_attention (prefill)", make_prefill, call_paged, paged_reference,
                      rtol_of_max=1e-5)


def at_token(a, seq, token):
    """(block, offset) of token `token` of sequence `seq` in the cache."""
    return int(a["block_table"][seq, token // BLOCK_SIZE]), token % BLOCK_SIZE


def cache_nan(cache, seq, token, what):
    def change(a):
        block, offset = at_token(a, seq, token)
        a[cache] = poke(a[cache], (block, offset, 1, 0), math.nan)
    return Mutation(cache, f"NaN at token {token} of sequence {seq} ({what})", change, "correct")


def unused_block_nan(cache):
    def change(a):
        used = set(a["block_table"].reshape(-1).tolist())
        spare = next(b for b in range(a[cache].shape[0]) if b not in used)
        a[cache] = poke(a[cache], (spare, 0, 0, 0), math.nan)
    return Mutation(cache, "NaN in a block no table names", change, "correct")


def table_entry(value, dtype=torch.int32):
    def change(a):
        table = a["block_table"].to(dtype)
        table[2, 1] = value
        a["block_table"] = table
    return change


def paged_cases():
    cases = WRITE_KV_CACHE.cases(
        valid_call(),
        Mutation("slot_mapping", "3 + 2**32", apply("slot_mapping", lambda s: poke(s, 0, 3 + WRAP))),
        Mutation("slot_mapping", f"{BLOCKS * BLOCK_SIZE} (one past the cache)",
                 apply("slot_mapping", lambda s: poke(s, 0, BLOCKS * BLOCK_SIZE))),
        Mutation("slot_mapping", "-2", apply("slot_mapping", lambda s: poke(s, 0, -2))),
        Mutation("slot_mapping", "-2**63", apply("slot_mapping", lambda s: poke(s, 0, -(1 << 63)))),
        Mutation("slot_mapping", "the same slot twice", apply("slot_mapping", lambda s: poke(s, 1, 3)), "either"),
        *dtype_mutations("slot_mapping", (torch.int32, torch.float32, torch.uint8)),
        Mutation("slot_mapping", "4 slots for 5 tokens", apply("slot_mapping", lambda s: s[:4]), names=("slot_mapping", "key")),
        Mutation("slot_mapping", "shape [5, 1]", apply("slot_mapping", lambda s: s[:, None])),
        Mutation("slot_mapping", "not contiguous", apply("slot_mapping", lambda s: torch.stack([s, s], 1)[:, 0]),
                 "either"),
        Mutation("slot_mapping", "on the meta device", apply("slot_mapping", lambda s: s.to("meta")), "either"),
        Mutation("slot_mapping", "dimension 0 + 2**32 (a stride-0 view)", apply("slot_mapping", lambda s: wrapped(s, 0)),
                 names=("slot_mapping", "key")),
        *type_mutations("slot_mapping"),
        *tensor_mutations("key", dtypes=(torch.bfloat16, torch.float64, torch.int32)),
        Mutation("key", "dimension 0 + 2**32 (a stride-0 view)", apply("key", lambda t: wrapped(t, 0)),
                 names=("key", "value", "slot_mapping")),
        Mutation("key", "dimension 2 + 2**32 (a stride-0 view)", apply("key", lambda t: wrapped(t, 2)),
                 names=("key", "value", "k_cache")),
        Mutation("key", "3 heads", apply("key", lambda t: torch.cat([t, t[:, :1]], 1)), names=("key", "k_cache")),
        Mutation("key", "head_dim 31", apply("key", lambda t: t[..., :31].clone()), names=("key", "k_cache")),
        Mutation("value", "6 tokens", apply("value", lambda t: torch.cat([t, t[:1]])), names=("value", "key")),
        *special_value_mutations("value", values=(math.nan,)),
        *dtype_mutations("k_cache", (torch.bfloat16, torch.float64, torch.int32)),
        Mutation("k_cache", "on the meta device", apply("k_cache", lambda t: t.to("meta")), "either"),
        Mutation("k_cache", "dimension 0 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 0))),
        Mutation("k_cache", "dimension 1 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 1))),
        Mutation("k_cache", "heads at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 2)[:, :, ::2]), "either"),
        Mutation("k_cache", "blocks at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 0)[::2]), "either"),
        Mutation("k_cache", "3-dim [40, 2, 32]", apply("k_cache", lambda t: t.reshape(-1, KV_HEADS, HEAD_DIM))),
        *type_mutations("k_cache"),
        Mutation("v_cache", "5 blocks (k_cache has 10)", apply("v_cache", lambda t: t[:5].clone()),
                 names=("v_cache", "k_cache")),
        Mutation("v_cache", "bfloat16 (k_cache float32)", apply("v_cache", lambda t: t.bfloat16()), "either",
                 names=("v_cache", "k_cache")),
    )
    decode = [
        valid_call(),
        *special_value_mutations("q", values=(math.nan,)),
        cache_nan("k_cache", 2, 6, "inside the context"),
        cache_nan("v_cache", 2, 6, "inside the context"),
        cache_nan("k_cache", 0, 6, "past seq_lens, in the sequence's last block"),
        cache_nan("v_cache", 0, 7, "past seq_lens, in the sequence's last block"),
        unused_block_nan("k_cache"), unused_block_nan("v_cache"),
        *dtype_mutations("q", (torch.bfloat16, torch.float64, torch.float16)),
        Mutation("q", "on the meta device", apply("q", lambda t: t.to("meta")), "either"),
        Mutation("q", "3 heads (kv_heads 2)", apply("q", lambda t: t[:, :3].clone()), names=("q", "k_cache")),
        Mutation("q", "head_dim 31", apply("q", lambda t: t[..., :31].clone()), names=("q", "k_cache")),
        Mutation("q", "2-dim", apply("q", lambda t: t.reshape(3, -1))),
        Mutation("q", "dimension 0 + 2**32 (a stride-0 view)", apply("q", lambda t: wrapped(t, 0)),
                 names=("q", "seq_lens", "block_table")),
        Mutation("q", "dimension 2 + 2**32 (a stride-0 view)", apply("q", lambda t: wrapped(t, 2)),
                 names=("q", "k_cache")),
        *layout_mutations("q"),
        *type_mutations("q"),
        *dtype_mutations("k_cache", (torch.bfloat16, torch.float16)),
        Mutation("k_cache", "on the meta device", apply("k_cache", lambda t: t.to("meta")), "either"),
        Mutation("k_cache", "head_dim 31", apply("k_cache", lambda t: t[..., :31].clone()), names=("k_cache", "q")),
        Mutation("k_cache", "dimension 0 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 0)), "either"),
        Mutation("k_cache", "dimension 1 + 2**32 (a stride-0 view)", apply("k_cache", lambda t: wrapped(t, 1)), "either"),
        Mutation("k_cache", "blocks at stride 2", apply("k_cache", lambda t: torch.cat([t, t], 0)[::2]), "either"),
        Mutation("v_cache", "5 blocks (k_cache has 10)", apply("v_cache", lambda t: t[:5].clone()),
                 names=("v_cache", "k_cache")),
        Mutation("v_cache", "bfloat16 (k_cache float32)", apply("v_cache", lambda t: t.bfloat16()), "either",
                 names=("v_cache", "k_cache")),
        Mutation("block_table", f"an entry {BLOCKS} (one past the cache)", table_entry(BLOCKS)),
        Mutation("block_table", "an entry -1", table_entry(-1)),
        Mutation("block_table", "an entry 2**31 - 1", table_entry((1 << 31) - 1)),
        Mutation("block_table", "int64 with an entry 1 + 2**32", table_entry(1 + WRAP, torch.int64)),
        Mutation("block_table", "int64", apply("block_table", lambda t: t.long()), "either"),
        Mutation("block_table", "float32", apply("block_table", lambda t: t.float())),
        Mutation("block_table", "2 rows for 3 sequences", apply("block_table", lambda t: t[:2]),
                 names=("block_table", "seq_lens", "q")),
        Mutation("block_table", "1 column (sequences need 4)", apply("block_table", lambda t: t[:, :1].clone()),
                 names=("block_table", "seq_lens")),
        Mutation("block_table", "columns at stride 2", apply("block_table", lambda t: torch.cat([t, t], 1)[:, ::2]),
                 "either"),
        Mutation("block_table", "on the meta device", apply("block_table", lambda t: t.to("meta")), "either"),
        Mutation("block_table", "dimension 1 + 2**32 (a stride-0 view)", apply("block_table", lambda t: wrapped(t, 1))),
        *type_mutations("block_table"),
        Mutation("seq_lens", "17 (the table holds 16 tokens)", apply("seq_lens", lambda t: poke(t, 2, 17)),
                 names=("seq_lens", "block_table")),
        Mutation("seq_lens", "-1", apply("seq_lens", lambda t: poke(t, 0, -1))),
        Mutation("seq_lens", "0 (an empty sequence)", apply("seq_lens", lambda t: poke(t, 0, 0)), "either"),
        Mutation("seq_lens", "int64", apply("seq_lens", lambda t: t.long()), "either"),
        Mutation("seq_lens", "int64, 5 + 2**32", apply("seq_lens", lambda t: poke(t.long(), 0, 5 + WRAP))),
        Mutation("seq_lens", "float32", apply("seq_lens", lambda t: t.float())),
        Mutation("seq_lens", "2 lengths for 3 sequences", apply("seq_lens", lambda t: t[:2]),
                 names=("seq_lens", "q", "block_table")),
        Mutation("seq_lens", "dimension 0 + 2**32 (a stride-0 view)", apply("seq_lens", lambda t: wrapped(t, 0)),
                 names=("seq_lens", "q", "block_table")),
        *type_mutations("seq_lens"),
        *int_mutations("num_splits", 4, zero=None, huge="either"),
        Mutation("num_splits", "1000", apply("num_splits", lambda _: 1000), "either"),
        *float_mutations("softmax_scale", none=None),
        Mutation("softmax_scale", "0.0", apply("softmax_scale", lambda _: 0.0), "either"),
        Mutation("window_size", "(2**32 + 1, -1)", apply("window_size", lambda _: (1 + WRAP, -1)), "either"),
        Mutation("window_size", "(2, 0)", apply("window_size", lambda _: (2, 0)), "correct"),
        Mutation("window_size", "(-5, -5)", apply("window_size", lambda _: (-5, -5)), "either"),
        Mutation("window_size", "(1,)", apply("window_size", lambda _: (1,))),
        Mutation("window_size", "None", apply("window_size", lambda _: None)),
        *float_mutations("softcap"),
        Mutation("softcap", "5.0", apply("softcap", lambda _: 5.0), "correct"),
    ]
    cases += PAGED_DECODE.cases(*decode)
    cases += PAGED_SPLITS.cases(
        valid_call(),
        cache_nan("k_cache", 0, 30, "inside the context, in a middle split"),
        cache_nan("v_cache", 0, 45, "inside the context, in a later split"),
        cache_nan("k_cache", 0, 62, "past seq_lens, in the sequence's last block"),
        cache_nan("v_cache", 0, 63, "past seq_lens, in the sequence's last block"),
        *special_value_mutations("q", index=HEADS * HEAD_DIM, values=(math.nan,)),
        Mutation("softmax_scale", "nan", apply("softmax_scale", lambda _: math.nan), "either"),
        *int_mutations("num_splits", 4, zero=None, huge="either", types=False),
        Mutation("num_splits", "64 (more than the context's blocks)", apply("num_splits", lambda _: 64), "correct"),
    )
    cases += PAGED_PREFILL.cases(
        valid_call(),
        *special_value_mutations("q", index=4 * HEADS * HEAD_DIM, values=(math.nan,)),
        cache_nan("k_cache", 2, 12, "seen only by the sequence's last query"),
        cache_nan("k_cache", 2, 5, "seen by every query of the sequence"),
        cache_nan("k_cache", 2, 14, "past seq_lens"),
        Mutation("cu_seqlens_q", "decreasing [0, 3, 2, 6]", apply("cu_seqlens_q", lambda t: poke(t, 1, 3))),
        Mutation("cu_seqlens_q", "ending past q's 6 rows", apply("cu_seqlens_q", lambda t: poke(t, 3, 7))),
        Mutation("cu_seqlens_q", "ending before q's last row", apply("cu_seqlens_q", lambda t: poke(t, 3, 5)), "either"),
        Mutation("cu_seqlens_q", "starting at -1", apply("cu_seqlens_q", lambda t: poke(t, 0, -1))),
        Mutation("cu_seqlens_q", "more queries than tokens ([0, 6, 6, 6])",
                 apply("cu_seqlens_q", lambda t: torch.tensor([0, 6, 6, 6], dtype=torch.int32)),
                 names=("cu_seqlens_q", "seq_lens")),
        Mutation("cu_seqlens_q", "int64", apply("cu_seqlens_q", lambda t: t.long()), "either"),
        Mutation("cu_seqlens_q", "int64, an entry 3 + 2**32", apply("cu_seqlens_q", lambda t: poke(t.long(), 2, 3 + WRAP))),
        Mutation("cu_seqlens_q", "3 entries for 3 sequences", apply("cu_seqlens_q", lambda t: t[:3]),
                 names=("cu_seqlens_q", "seq_lens")),
        Mutation("cu_seqlens_q", "float32", apply("cu_seqlens_q", lambda t: t.float())),
        Mutation("cu_seqlens_q", "on the meta device", apply("cu_seqlens_q", lambda t: t.to("meta")), "either"),
        Mutation("cu_seqlens_q", "a list", apply("cu_seqlens_q", lambda t: t.tolist()), "either"),
        Mutation("max_seqlen_q", "2 (the longest has 3)", apply("max_seqlen_q", lambda _: 2), "either"),
        Mutation("max_seqlen_q", "None (read from cu_seqlens_q)", apply("max_seqlen_q", lambda _: None), "correct"),
        *int_mutations("max_seqlen_q", 3, zero="either", huge="either", none=None),
        Mutation("seq_lens", "1 for a sequence of 3 queries", apply("seq_lens", lambda t: poke(t, 2, 1)),
                 names=("seq_lens", "cu_seqlens_q")),
        Mutation("causal", "False", apply("causal", lambda _: False), "correct"),
        Mutation("window_size", "(1, 0)", apply("window_size", lambda _: (1, 0)), "correct"),
        Mutation("window_size", "(0, 2**32)", apply("window_size", lambda _: (0, WRAP)), "either"),
    )
    return cases


# -- small functions: thread count, ISA, support queries, split heuristics -------------------------------------

def value_case(entry, mutation, call, names, check):
    """A case whose result (a plain value) is judged by `check(result)` -> None or a failure; raising passes as
    for any case."""
    def judge(outcome):
        if isinstance(outcome, BaseException):
            return robust.exception_failure(outcome, names)
        return check(outcome)
    return Case(entry, mutation, call, names, "either", judge=judge)


def is_false(result):
    return None if result is False else f"returned {result!r}, expected False (no such type)"


def threads_are(n):
    def check(_):
        got = ops.num_threads()
        return None if got == n else f"num_threads() is {got} after set_num_threads({n})"
    return check


def splits_ok(result):
    if isinstance(result, int) and not isinstance(result, bool) and 1 <= result <= 1 << 16:
        return None
    return f"returned {result!r}, expected a split count >= 1"


def small_function_cases():
    cases = [value_case("flashlm.ops.set_num_threads", "n: 3 (valid)", lambda: ops.set_num_threads(3), ("n",),
                        threads_are(3))]
    for label, n in (("0", 0), ("-1", -1), ("2**31", 1 << 31), ("2 + 2**32", 2 + WRAP), ("2**64", 1 << 64),
                     ("None", None), ("'2'", "2"), ("2.5", 2.5)):
        cases.append(Case("flashlm.ops.set_num_threads", f"n: {label}", lambda n=n: ops.set_num_threads(n),
                          ("n", "num_threads")))
    cases.append(value_case("flashlm.ops.set_num_threads", "n: 10**6", lambda: ops.set_num_threads(10**6),
                            ("n", "num_threads"), threads_are(10**6)))
    for label, isa in (("'avx512'", "avx512"), ("''", ""), ("None", None), ("1", 1)):
        cases.append(Case("flashlm.ops.set_cpu_isa", f"isa: {label}", lambda isa=isa: ops.set_cpu_isa(isa), ("isa",)))
    for fn in ("dequantize_supported", "quantize_supported", "cpu_isa_supported"):
        for label, value in (("8 + 2**32", 8 + WRAP), ("-1", -1), ("None", None), ("'Q4_0 '", "Q4_0 "), ("[]", [])):
            arg = "isa" if fn == "cpu_isa_supported" else "ggml_type"
            cases.append(value_case(f"flashlm.ops.{fn}", f"{arg}: {label}",
                                    lambda fn=fn, value=value: getattr(ops, fn)(value), (arg,), is_false))
    valid = ("cpu", 3, 2, 100, 16)
    names = ("device_type", "num_seqs", "kv_heads", "max_seq_len", "block_size")
    cases.append(value_case("flashlm.ops.paged_attention_num_splits", "a valid call",
                            lambda: ops.paged_attention_num_splits(*valid), names, splits_ok))
    for i, name in enumerate(names):
        bad = (("'tpu'", "tpu"), ("None", None)) if i == 0 else (
            ("0", 0), ("-1", -1), ("2**31", 1 << 31), ("3 + 2**32", 3 + WRAP), ("2**63", 1 << 63))
        for label, value in bad:
            args = valid[:i] + (value,) + valid[i + 1:]
            expect = "raise" if i == 0 or value in (-1,) or (name in ("kv_heads", "block_size") and value == 0) \
                else "either"
            if expect == "raise":
                cases.append(Case("flashlm.ops.paged_attention_num_splits", f"{name}: {label}",
                                  lambda args=args: ops.paged_attention_num_splits(*args), (name,)))
            else:
                cases.append(value_case("flashlm.ops.paged_attention_num_splits", f"{name}: {label}",
                                        lambda args=args: ops.paged_attention_num_splits(*args), (name,), splits_ok))
    return cases


CASES = norm_cases() + int_linear_cases() + gguf_cases() + adamw_cases() + paged_cases() + small_function_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
