"""flashlm.ops called as a hostile user would, one argument mutated at a time: rms_norm, silu_mul,
quantize_per_token, int8_linear, int4_linear, adamw_step_ and the settings functions.

Each case runs in a forked child under a memory cap and a timeout (tests/robust.py) and must neither crash
nor hang, and either return what an independent float64 reference computes or raise ValueError/TypeError/
NotImplementedError naming the argument. The GGUF block ops are in test_robust_gguf_ops.py, the paged KV cache
in test_robust_kvcache.py, flash attention in test_robust_attention.py, the native decoder in
test_robust_decoder.py.
"""

import math

import numpy as np
import torch

import robust
from flashlm import ops
from robust import Case, value_case
from robust_args import (WRAP, Entry, Mutation, apply, close, dtype_mutations, edit, float_mutations, int_mutations,
                         layout_mutations, poke, seeded, special_value_mutations, tensor_mutations, type_mutations,
                         valid_call, wrapped)


# -- rms_norm, silu_mul ---------------------------------------------------------------------------------------

def norm_reference(x, weight, eps):
    x = torch.as_tensor(x).double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps)) * torch.as_tensor(weight).double()


def make_norm():
    g = seeded(1)
    return dict(x=torch.randn(3, 64, generator=g), weight=torch.randn(64, generator=g), eps=1e-5)


RMS_NORM = Entry("flashlm.ops.rms_norm", make_norm, lambda a: ops.rms_norm(a["x"], a["weight"], a["eps"]),
                 lambda a: norm_reference(a["x"], a["weight"], a["eps"]), rtol_of_max=1e-5)


def make_norm_residual():
    return dict(make_norm(), residual=torch.randn(3, 64, generator=seeded(2)))


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
    g = seeded(3)
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


QUANTIZE_PER_TOKEN = Entry("flashlm.ops.quantize_per_token", lambda: dict(x=torch.randn(3, 64, generator=seeded(4))),
                           lambda a: ops.quantize_per_token(a["x"]), per_token_reference,
                           compare=per_token_compare)


def make_int8():
    g = seeded(5)
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
    g = seeded(6)
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
        Mutation("bias", "given [8]", apply("bias", lambda _: torch.randn(8, generator=seeded(7))), "correct"),
        Mutation("bias", "NaN in one element", apply("bias", lambda _: poke(torch.zeros(8), 3, math.nan)), "correct"),
        Mutation("bias", "shape [9]", apply("bias", lambda _: torch.zeros(9))),
    )
    return cases


# -- adamw_step_ ----------------------------------------------------------------------------------------------

def make_adamw():
    g = seeded(13)
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


# -- small functions: thread count, ISA, support queries, split heuristics -------------------------------------

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


CASES = norm_cases() + int_linear_cases() + adamw_cases() + small_function_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
