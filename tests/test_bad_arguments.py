"""Every public function of flashlm.ops (and of flash_attn_interface) given an argument of the wrong kind or
range: None, a list, a numpy array, a 0-dim tensor, a meta tensor beside CPU ones or a wrong dtype where a
tensor goes; None, a string, a float or an integer past int64 (past int32 for 32-bit counts) where an integer
goes. Each call must raise TypeError, ValueError or NotImplementedError whose message names the argument (or
the tensor a packed argument is split into), never an AttributeError, IndexError, nanobind's list of
signatures, or a result computed from something else. Then the values that used to wrap silently: int64 index
tensors narrowed to int32, dimensions of 2**32 + something seen by the kernels, and meta tensors mixed with
CPU ones reaching a fake implementation.
"""

import re

import numpy as np
import pytest
import torch

from flashlm import _C, ops
from flashlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

BIG = 2**63  # past int64
BIG32 = 2**31  # past int32


def f32(*shape):
    return torch.randn(*shape)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def cache():
    return f32(4, 4, 2, 16)  # [num_blocks, block_size, kv_heads, head_dim]


# name: (function, good arguments, kind of each argument checked, other names the message may use)
# Kinds: "tensor", "optional" (a tensor or None), "int", "int32" (a 32-bit count), "float", "str".
CASES = {
    "rms_norm": (ops.rms_norm, lambda: dict(x=f32(3, 8), weight=f32(8), eps=1e-6, residual=f32(3, 8)),
                 dict(x="tensor", weight="tensor", eps="float", residual="optional"), {}),
    "silu_mul": (ops.silu_mul, lambda: dict(gate=f32(3, 8), up=f32(3, 8)), dict(gate="tensor", up="tensor"), {}),
    "flash_attn_func": (
        flash_attn_func, lambda: dict(q=f32(1, 4, 2, 16), k=f32(1, 4, 2, 16), v=f32(1, 4, 2, 16), softmax_scale=0.25,
                                      window_size=(-1, -1), softcap=0.0),
        dict(q="tensor", k="tensor", v="tensor", softmax_scale="float", softcap="float"), {}),
    "flash_attn_qkvpacked_func": (ops.flash_attn_qkvpacked_func, lambda: dict(qkv=f32(1, 4, 3, 2, 16)),
                                  dict(qkv="tensor"), dict(qkv=("q", "k", "v"))),
    "flash_attn_kvpacked_func": (ops.flash_attn_kvpacked_func, lambda: dict(q=f32(1, 4, 2, 16), kv=f32(1, 4, 2, 2, 16)),
                                 dict(q="tensor", kv="tensor"), dict(kv=("k", "v"))),
    "flash_attn_varlen_func": (
        flash_attn_varlen_func, lambda: dict(q=f32(6, 2, 16), k=f32(6, 2, 16), v=f32(6, 2, 16),
                                             cu_seqlens_q=i32([0, 2, 6]), cu_seqlens_k=i32([0, 2, 6]), max_seqlen_q=4,
                                             max_seqlen_k=4),
        dict(q="tensor", k="tensor", v="tensor", cu_seqlens_q="tensor", cu_seqlens_k="tensor", max_seqlen_q="int",
             max_seqlen_k="int"), {}),
    "flash_attn_varlen_func(block_table)": (
        flash_attn_varlen_func, lambda: dict(q=f32(6, 2, 16), k=cache(), v=cache(), cu_seqlens_q=i32([0, 2, 6]),
                                             cu_seqlens_k=i32([0, 3, 8]), max_seqlen_q=4, max_seqlen_k=5,
                                             block_table=i32([[0, 1], [2, 3]])),
        dict(q="tensor", k="tensor", v="tensor", cu_seqlens_q="tensor", cu_seqlens_k="tensor", max_seqlen_q="int",
             max_seqlen_k="int", block_table="optional"), dict(k=("k_cache",), v=("v_cache",))),
    "flash_attn_varlen_qkvpacked_func": (
        ops.flash_attn_varlen_qkvpacked_func,
        lambda: dict(qkv=f32(6, 3, 2, 16), cu_seqlens=i32([0, 2, 6]), max_seqlen=4),
        dict(qkv="tensor", cu_seqlens="tensor", max_seqlen="int"),
        dict(qkv=("q", "k", "v"), cu_seqlens=("cu_seqlens_q", "cu_seqlens_k"))),
    "flash_attn_varlen_kvpacked_func": (
        ops.flash_attn_varlen_kvpacked_func,
        lambda: dict(q=f32(6, 2, 16), kv=f32(6, 2, 2, 16), cu_seqlens_q=i32([0, 2, 6]), cu_seqlens_k=i32([0, 2, 6]),
                     max_seqlen_q=4, max_seqlen_k=4),
        dict(q="tensor", kv="tensor", cu_seqlens_q="tensor", cu_seqlens_k="tensor", max_seqlen_q="int",
             max_seqlen_k="int"), dict(kv=("k", "v"))),
    "flash_attn_with_kvcache": (
        flash_attn_with_kvcache, lambda: dict(q=f32(2, 1, 2, 16), k_cache=f32(2, 8, 2, 16), v_cache=f32(2, 8, 2, 16),
                                              k=f32(2, 1, 2, 16), v=f32(2, 1, 2, 16), rotary_cos=f32(16, 8),
                                              rotary_sin=f32(16, 8), cache_seqlens=i32([2, 3]),
                                              cache_batch_idx=i32([1, 0]), num_splits=0),
        dict(q="tensor", k_cache="tensor", v_cache="tensor", k="optional", v="optional", rotary_cos="optional",
             rotary_sin="optional", cache_seqlens="tensor", cache_batch_idx="optional", num_splits="int32"),
        dict(k=("key", "v"), v=("value", "k"), rotary_cos=("rotary_sin",), rotary_sin=("rotary_cos",),
             cache_seqlens=("k", "v"))),
    "flash_attn_with_kvcache(block_table)": (
        flash_attn_with_kvcache, lambda: dict(q=f32(2, 2, 2, 16), k_cache=cache(), v_cache=cache(), k=f32(2, 1, 2, 16),
                                              v=f32(2, 1, 2, 16), cache_seqlens=i32([2, 3]),
                                              block_table=i32([[0, 1], [2, 3]])),
        dict(q="tensor", k_cache="tensor", v_cache="tensor", cache_seqlens="tensor", block_table="optional"), {}),
    "paged_attention": (
        ops.paged_attention, lambda: dict(q=f32(3, 2, 16), k_cache=cache(), v_cache=cache(),
                                          block_table=i32([[0, 1], [2, 3]]), seq_lens=i32([3, 5]),
                                          cu_seqlens_q=i32([0, 1, 3]), max_seqlen_q=2, softmax_scale=0.25,
                                          window_size=(-1, -1), softcap=0.0, num_splits=0),
        dict(q="tensor", k_cache="tensor", v_cache="tensor", block_table="tensor", seq_lens="tensor",
             cu_seqlens_q="optional", max_seqlen_q="int", softmax_scale="float", softcap="float", num_splits="int32"),
        {}),
    "paged_attention_num_splits": (
        ops.paged_attention_num_splits, lambda: dict(device_type="cpu", num_seqs=2, kv_heads=2, max_seq_len=100,
                                                     block_size=16),
        dict(device_type="str", num_seqs="int32", kv_heads="int32", max_seq_len="int", block_size="int32"), {}),
    "write_kv_cache": (
        ops.write_kv_cache, lambda: dict(key=f32(2, 2, 16), value=f32(2, 2, 16), k_cache=cache(), v_cache=cache(),
                                         slot_mapping=torch.tensor([0, 5])),
        dict(key="tensor", value="tensor", k_cache="tensor", v_cache="tensor", slot_mapping="tensor"), {}),
    "dequantize": (
        ops.dequantize, lambda: dict(raw=torch.zeros(68, dtype=torch.uint8), ggml_type="Q8_0", shape=(64,),
                                     out=torch.empty(64)),
        dict(raw="tensor", out="optional"), {}),
    "dequantize_supported": (ops.dequantize_supported, lambda: dict(ggml_type="Q8_0"), dict(ggml_type="str"), {}),
    "gguf_linear": (
        ops.gguf_linear, lambda: dict(x=f32(2, 32), raw=torch.zeros(3 * 34, dtype=torch.uint8), ggml_type="Q8_0",
                                      shape=(3, 32), bias=f32(3)),
        dict(x="tensor", raw="tensor", ggml_type="str", bias="optional"), {}),
    "gguf_quantize": (
        ops.gguf_quantize,
        lambda: dict(data=np.zeros((2, 32), np.float32), ggml_type="Q4_0", out=np.zeros(36, np.uint8),
                     importance=np.ones(32, np.float32)),
        dict(data="array", ggml_type="str", out="array", importance="array"), {}),
    "quantize_supported": (ops.quantize_supported, lambda: dict(ggml_type="Q8_0"), dict(ggml_type="str"), {}),
    "quantize_per_token": (ops.quantize_per_token, lambda: dict(x=f32(3, 8)), dict(x="tensor"), {}),
    "int8_linear": (
        ops.int8_linear,
        lambda: dict(x=f32(3, 8), w_int8=torch.ones(4, 8, dtype=torch.int8), w_scales=f32(4), bias=f32(4)),
        dict(x="tensor", w_int8="tensor", w_scales="tensor", bias="optional"), {}),
    "int8_linear_static": (
        ops.int8_linear_static,
        lambda: dict(x=f32(3, 8), act_scale=torch.tensor(0.1), w_int8=torch.ones(4, 8, dtype=torch.int8),
                     w_scales=f32(4), bias=f32(4)),
        dict(x="tensor", act_scale="tensor", w_int8="tensor", w_scales="tensor", bias="optional"), {}),
    "int4_linear": (
        ops.int4_linear, lambda: dict(x=f32(3, 64), w_packed=torch.zeros(4, 32, dtype=torch.uint8), scales=f32(4, 2),
                                      zeros=f32(4, 2), group_size=32, bias=f32(4)),
        dict(x="tensor", w_packed="tensor", scales="tensor", zeros="optional", bias="optional"), {}),
    "adamw_step_": (
        ops.adamw_step_, lambda: dict(params=[f32(4)], grads=[f32(4)], exp_avgs=[f32(4)], exp_avg_sqs=[f32(4)], step=1,
                                      lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0),
        dict(params="list", grads="list", exp_avgs="list", exp_avg_sqs="list", step="int", lr="float", beta1="float",
             beta2="float", eps="float", weight_decay="float"),
        dict(params=("param",), grads=("grad",), exp_avgs=("exp_avg",), exp_avg_sqs=("exp_avg_sq",))),  # the kernel's
    "set_num_threads": (ops.set_num_threads, lambda: dict(n=ops.num_threads()), dict(n="int32"),
                        dict(n=("num_threads",))),
    "set_cpu_isa": (ops.set_cpu_isa, lambda: dict(isa=ops.cpu_isa()), dict(isa="str"), {}),
    "cpu_isa_supported": (ops.cpu_isa_supported, lambda: dict(isa="avx2"), dict(isa="str"), {}),
}

# (case, argument, bad value) that are valid input: they must run.
VALID = {
    ("flash_attn_qkvpacked_func", "qkv", "meta"),  # all of q, k, v on meta: the shapes of the result, on meta
    ("flash_attn_func", "softmax_scale", "None"), ("paged_attention", "softmax_scale", "None"),  # 1 / sqrt(head_dim)
    ("paged_attention", "max_seqlen_q", "None"),  # read from cu_seqlens_q
    ("gguf_quantize", "importance", "None"),  # no importance matrix
    # Float tensors that the wrappers convert (rotary tables to float32 math; scales, zero points, biases to
    # the dtype the kernels take).
    ("flash_attn_with_kvcache", "rotary_cos", "dtype"), ("flash_attn_with_kvcache", "rotary_sin", "dtype"),
    ("int8_linear", "w_scales", "dtype"), ("int8_linear", "bias", "dtype"), ("int4_linear", "scales", "dtype"),
    ("int8_linear_static", "w_scales", "dtype"), ("int8_linear_static", "bias", "dtype"),
    ("int8_linear_static", "act_scale", "dtype"), ("int8_linear_static", "act_scale", "0-dim"),  # a positive scale
    ("int4_linear", "zeros", "dtype"), ("int4_linear", "bias", "dtype"), ("gguf_linear", "bias", "dtype"),
}


def _bad_values(kind, good):
    """(label, value) of the wrong kind for an argument of `kind` whose good value is `good`."""
    if kind in ("tensor", "optional"):
        wrong = torch.float64 if good.is_floating_point() else torch.float32
        values = [("list", good.tolist()), ("numpy", good.numpy()), ("0-dim", torch.tensor(1, dtype=good.dtype)),
                  ("meta", good.to("meta")), ("dtype", good.to(wrong))]
        return values + ([("None", None)] if kind == "tensor" else [])
    if kind == "list":  # a list of tensors: the list itself, and its element
        element = [(f"[{label}]", [v]) for label, v in _bad_values("tensor", good[0])]
        return [("None", None), ("tensor", good[0])] + element
    if kind in ("int", "int32"):
        return [("None", None), ("str", "3"), ("float", 1.5), ("past int64", BIG), ("below int64", -BIG - 1)] + \
            ([("past int32", BIG32)] if kind == "int32" else [])
    if kind == "float":
        return [("None", None), ("str", "0.5"), ("list", [0.5])]
    if kind == "array":  # a numpy array (or, for data, a CPU tensor)
        return [("None", None), ("list", good.tolist()), ("meta", torch.from_numpy(good).to("meta"))]
    assert kind == "str"
    return [("None", None), ("list", ["Q8_0"]), ("float", 3.5)]


def _names_argument(message, names):
    return any(re.search(rf"(^|[^\w]){re.escape(name)}([^\w]|$)", message) for name in names)


@pytest.mark.parametrize("case,arg", [(case, arg) for case, (_, _, kinds, _) in CASES.items() for arg in kinds])
def test_bad_argument_raises_naming_it(case, arg):
    fn, good, kinds, aliases = CASES[case]
    names = (arg, *aliases.get(arg, ()))
    fn(**good())  # the good arguments are good
    failures = []
    for label, bad in _bad_values(kinds[arg], good()[arg]):
        args = good()
        args[arg] = bad
        try:
            fn(**args)
        except (TypeError, ValueError, NotImplementedError) as e:
            if (case, arg, label) in VALID:
                failures.append(f"{label}: valid input raised {type(e).__name__}: {e}")
            elif "incompatible function arguments" in str(e) or not _names_argument(str(e), names):
                failures.append(f"{label}: {type(e).__name__} does not name {arg}: {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001 - any other kind is the failure being looked for
            failures.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
        else:
            if (case, arg, label) not in VALID:
                failures.append(f"{label}: no error")
    assert not failures, f"{case}({arg}=...):\n  " + "\n  ".join(failures)


# --- int64 index tensors: out of int32 range is an error, never a wrapped value -------------------------------

def _kvcache_args(batch=2):
    return dict(q=f32(batch, 1, 2, 16), k_cache=f32(2, 8, 2, 16), v_cache=f32(2, 8, 2, 16))


@pytest.mark.parametrize("lens,at", [([2**32 + 3, 5], 0), ([3, -2**32 + 5], 1), ([2**31, 1], 0)])
def test_cache_seqlens_out_of_int32_raise(lens, at):
    # [2**32 + 3, 5] used to attend as [3, 5].
    with pytest.raises(ValueError, match=rf"cache_seqlens\[{at}\]: {lens[at]} is outside \[-2147483648, 2147483647\]"):
        flash_attn_with_kvcache(**_kvcache_args(), cache_seqlens=torch.tensor(lens))
    with pytest.raises(ValueError, match="cache_seqlens: must be in"):
        flash_attn_with_kvcache(**_kvcache_args(), cache_seqlens=lens[at])


def test_cache_seqlens_int64_in_range_equal_int32():
    args = _kvcache_args()
    expected = flash_attn_with_kvcache(**args, cache_seqlens=i32([3, 5]))
    assert torch.equal(flash_attn_with_kvcache(**args, cache_seqlens=torch.tensor([3, 5])), expected)


@pytest.mark.parametrize("rows", [[1, 2**32], [1, 2], [-1, 0], [2**32 + 1, 0]])
def test_cache_batch_idx_outside_the_cache_raise(rows):
    # 2**32 used to wrap to row 0; a row past the cache's 2 rows was reported as a block table entry.
    with pytest.raises(ValueError, match=r"cache_batch_idx\[\d\]: -?\d+ is outside \[0, 1\]"):
        flash_attn_with_kvcache(**_kvcache_args(), cache_seqlens=3, cache_batch_idx=torch.tensor(rows))


@pytest.mark.parametrize("cu_k,match", [
    ([0, 5, 2**32 + 10], r"cu_seqlens_k\[2\]: 4294967306 is outside \[0, 2147483647\]"),
    ([0, 5, -1], r"cu_seqlens_k\[2\]: -1 is outside"),
    ([0, 5, 3], r"cu_seqlens_k: must be non-decreasing, got \[0, 5, 3\]"),
])
def test_paged_varlen_cu_seqlens_k_raise(cu_k, match):
    # With a block table, the context lengths are cu_seqlens_k's differences: [0, 5, 2**32 + 10] used to
    # attend as [0, 5, 10].
    q, k, v = f32(2, 2, 16), cache(), cache()
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(q, k, v, i32([0, 1, 2]), torch.tensor(cu_k), 1, 16,
                               block_table=i32([[0, 1], [2, 3]]))


# --- dimensions of 2**31 or more: refused where the kernels hold them in 32 bits ------------------------------

def _paged(k_cache, q=None):
    q = f32(2, 2, 16) if q is None else q
    return ops.paged_attention(q, k_cache, k_cache, i32([[0, 1], [2, 3]]), i32([3, 5]))


def test_paged_block_size_past_int32_raises():
    # A stride-0 view: 2**32 + 4 tokens a block without the memory. It used to run with block_size 4.
    big = f32(4, 1, 2, 16).expand(4, 2**32 + 4, 2, 16)
    with pytest.raises(ValueError, match=r"k_cache: block_size = 4294967300 is outside the kernels' range"):
        _paged(big)
    with pytest.raises(ValueError, match=r"k_cache: block_size = 4294967300"):
        ops.write_kv_cache(f32(1, 2, 16), f32(1, 2, 16), big, big, torch.tensor([-1]))


def test_paged_kv_heads_past_int32_raises():
    big = f32(4, 4, 1, 16).expand(4, 4, 2**32 + 2, 16)  # used to be accepted as 2 heads
    with pytest.raises(ValueError, match=r"k_cache: kv_heads = 4294967298 is outside the kernels' range"):
        _paged(big)


def test_attention_heads_past_int32_raise():
    # The native entry point, with out and lse as stride-0 views too (the wrapper would allocate them).
    q = f32(1, 2, 1, 16).expand(1, 2, 2**32 + 2, 16)
    k = f32(1, 2, 2, 16)
    lse = torch.empty(1, 1, 2).expand(1, 2**32 + 2, 2)
    with pytest.raises(ValueError, match=r"q: heads = 4294967298 is outside the kernels' range"):
        _C.flash_attention_forward(q, k, k, q, lse, None, None, 0, 0, 0.25, False, -1, -1, 0.0, 2)


# --- meta tensors mixed with CPU tensors: an error, not the fake's empty tensors ---------------------------

def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_flash_attn_forward_mixed_meta_raises(which):
    args = dict(q=f32(1, 4, 2, 16), k=f32(1, 4, 2, 16), v=f32(1, 4, 2, 16))
    args[which] = _meta(args[which])
    with pytest.raises(ValueError, match=rf"{which}: on meta, q on cpu|k: on cpu, q on meta"):
        flash_attn_func(**args)


def test_flash_attn_varlen_mixed_meta_raises():
    q, k = f32(6, 2, 16), f32(6, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_k: on meta, q on cpu"):
        flash_attn_varlen_func(q, k, k, i32([0, 2, 6]), _meta(i32([0, 2, 6])), 4, 4)


@pytest.mark.parametrize("which", ["dout", "q", "lse"])
def test_flash_attn_backward_mixed_meta_raises(which):
    q = f32(1, 4, 2, 16)
    args = dict(dout=f32(1, 4, 2, 16), q=q, k=f32(1, 4, 2, 16), v=f32(1, 4, 2, 16), out=f32(1, 4, 2, 16),
                lse=f32(1, 2, 4))
    args[which] = _meta(args[which])
    with pytest.raises(ValueError, match="on meta|q on meta"):
        ops.flash_attn_backward(*args.values(), None, None, 0, 0, 0.25, False, -1, -1, 0.0)


def test_flash_attn_ops_check_their_arguments():
    # The public ops check what the dispatcher's schema would refuse with its own error (or what nanobind
    # would list its signature for), naming the argument.
    q = f32(1, 4, 2, 16)
    forward = [q, q, q, None, None, 0, 0, 0.25, False, -1, -1, 0.0, 2]
    out, lse = ops.flash_attn_forward(*forward)
    for at, value, error, name in [(7, None, TypeError, "softmax_scale"), (11, "x", TypeError, "softcap"),
                                   (12, 2**31, ValueError, "version"), (6, 2**63, ValueError, "max_seqlen_k"),
                                   (10, 1.5, TypeError, "window_right"), (2, [1.0], TypeError, "v")]:
        with pytest.raises(error, match=f"^{name}: "):
            ops.flash_attn_forward(*forward[:at], value, *forward[at + 1:])
    backward = [q, q, q, q, out, lse, None, None, 0, 0, 0.25, False, -1, -1, 0.0]
    for at, value, error, name in [(0, None, TypeError, "dout"), (5, np.zeros((1, 2, 4)), TypeError, "lse"),
                                   (8, "1", TypeError, "max_seqlen_q"), (12, None, TypeError, "window_left"),
                                   (5, lse[..., :1].expand(1, 2, 4 + 2**32), ValueError, "lse")]:
        with pytest.raises(error, match=f"^{name}: "):
            ops.flash_attn_backward(*backward[:at], value, *backward[at + 1:])


def test_flash_attn_all_meta_gives_meta_shapes():
    out, lse = ops.flash_attn_forward(*(_meta(f32(1, 4, 2, 16)) for _ in range(3)), None, None, 0, 0, 0.25, False, -1,
                                      -1, 0.0, 2)
    assert out.device.type == "meta" and out.shape == (1, 4, 2, 16) and lse.shape == (1, 2, 4)


# The registered ops, called through the dispatcher (a mixed call reaches the fake implementation).
FAKE_CASES = {
    "rms_norm": (lambda: (f32(3, 8), f32(8), 1e-6), 1),
    "silu_mul": (lambda: (f32(3, 8), f32(3, 8)), 1),
    "gguf_linear": (lambda: (f32(2, 32), torch.zeros(3 * 34, dtype=torch.uint8), "Q8_0", 3, f32(3)), 4),
    "int8_gemm": (lambda: (torch.ones(3, 8, dtype=torch.int8), f32(3), torch.ones(4, 8, dtype=torch.int8), f32(4),
                           None, torch.float32), 2),
    "int4_gemm": (lambda: (f32(3, 64), torch.zeros(4, 32, dtype=torch.uint8), f32(4, 2), None, None, 32), 2),
    "write_kv_cache": (lambda: (f32(2, 2, 16), f32(2, 2, 16), cache(), cache(), torch.tensor([0, 5])), 4),
    "paged_attention": (lambda: (f32(2, 2, 16), cache(), cache(), i32([[0, 1], [2, 3]]), i32([3, 5]), None, 1, 0.25,
                                 True, -1, -1, 0.0, 0), 3),
}


@pytest.mark.parametrize("name", FAKE_CASES)
def test_registered_op_mixed_meta_raises(name):
    make, which = FAKE_CASES[name]
    args = list(make())
    getattr(torch.ops.flashlm, name)(*args)  # all on the CPU: runs
    args[which] = _meta(args[which])
    with pytest.raises(ValueError, match="on meta"):
        getattr(torch.ops.flashlm, name)(*args)


# --- the rest of what used to leak Python or C++ internals ----------------------------------------------------

def test_head_dim_zero_raises():
    q = f32(1, 4, 2, 0)
    with pytest.raises(ValueError, match="q: head_dim"):
        flash_attn_func(q, q, q)
    with pytest.raises(ValueError, match="q: head_dim"):
        ops.paged_attention(f32(2, 2, 0), f32(4, 4, 2, 0), f32(4, 4, 2, 0), i32([[0, 1], [2, 3]]), i32([3, 5]))
    with pytest.raises(ValueError, match="head_dim must be >= 1"):  # the backward, given a scale
        ops.flash_attn_backward(q, q, q, q, q, f32(1, 2, 4), None, None, 0, 0, 1.0, False, -1, -1, 0.0)


def test_thread_count_is_capped():
    before = ops.num_threads()
    try:
        with pytest.raises(ValueError, match=f"num_threads must be at most {_C.MAX_THREADS}, got 5000"):
            ops.set_num_threads(5000)
        assert ops.num_threads() == before  # unchanged
        with pytest.raises(ValueError, match="n: must be in"):
            ops.set_num_threads(2**40)
    finally:
        ops.set_num_threads(before)
