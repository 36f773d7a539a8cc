"""flashlm's attention entry points called as a hostile user would: flash_attn_func (forward and backward),
the varlen (packed and paged) and packed variants of flashlm.flash_attn_interface, and the raw backward op
(flash_attn_with_kvcache is in test_robust_kvcache.py).

Each case runs in a forked child (tests/robust.py). Results are compared with the float64 reference of
tests/reference.py, NaN exactly where it has NaN: a NaN in q, K or V reaches exactly the outputs (and
gradients) whose softmax row sees it, a NaN in a masked-out key (causal, outside a sequence, past the cache's
length) reaches none. (A NaN in V at a masked position is left out: the reference multiplies it by a zero
probability, and a kernel that skips the masked block rightly does not.)
"""

import math

import torch

import robust
from flashlm import flash_attn_interface as fa
from flashlm import ops
from reference import attention, attention_with_grads
from robust_args import (WRAP, Entry, Mutation, apply, attention_options, dtype_mutations, edit, float_mutations,
                         int_mutations, layout_mutations, nan_at, poke, seeded, t64, tensor_mutations, type_mutations,
                         valid_call, wrapped)

B, SQ, SK, H, HKV, D = 2, 5, 7, 4, 2, 32
RTOL = 2e-5  # float32 attention against float64, relative to the output's largest value


# -- flash_attn_func: forward ---------------------------------------------------------------------------------

def make_flash():
    g = seeded(20)
    return dict(q=torch.randn(B, SQ, H, D, generator=g), k=torch.randn(B, SK, HKV, D, generator=g),
                v=torch.randn(B, SK, HKV, D, generator=g), dropout_p=0.0, softmax_scale=None, causal=True,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, version=2)


def call_flash(a):
    out, lse, _ = fa.flash_attn_func(a["q"], a["k"], a["v"], a["dropout_p"], a["softmax_scale"], a["causal"],
                                     a["window_size"], a["softcap"], a["alibi_slopes"], return_attn_probs=True,
                                     version=a["version"])
    return out, lse


def flash_reference(a):
    return attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), **attention_options(a))


FLASH = Entry("flash_attn_func", make_flash, call_flash, flash_reference, rtol_of_max=RTOL)


def flash_cases():
    qk = ("q", "k")
    return FLASH.cases(
        valid_call(),
        Mutation("causal", "False", apply("causal", lambda _: False), "correct"),
        Mutation("version", "1 (FlashAttention-1's loop order)", apply("version", lambda _: 1), "correct"),
        nan_at("q", (1, 2, 3, 4), "one query row"),
        nan_at("k", (0, 3, 1, 0), "a key the later queries see"),
        nan_at("k", (0, 6, 1, 0), "a key only the last query sees (causal)"),
        nan_at("v", (1, 0, 0, 5), "a value every query sees"),
        Mutation("q", "more queries than keys (causal: the first rows see no key)",
                 apply("q", lambda t: torch.randn(B, SK + 3, H, D, generator=seeded(21))), "correct"),
        Mutation("q", "no queries", apply("q", lambda t: t[:, :0]), "correct"),
        Mutation("k", "no keys (with v)", edit(lambda a: a.update(k=a["k"][:, :0], v=a["v"][:, :0])), "correct"),
        *tensor_mutations("q", dims=(0, 1, 3), dtypes=(torch.float64, torch.float16, torch.bfloat16, torch.int32),
                          values=False),
        Mutation("q", "3 heads (kv_heads 2)", apply("q", lambda t: t[:, :, :3].clone()), names=qk),
        Mutation("q", "head_dim 31", apply("q", lambda t: t[..., :31].clone()), names=qk),
        Mutation("q", "batch 3", apply("q", lambda t: torch.cat([t, t[:1]])), names=qk),
        Mutation("q", "5-dim", apply("q", lambda t: t[None])),
        Mutation("q", "head_dim 0 (with k and v)", edit(lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0],
                                                                           v=a["v"][..., :0])), "either"),
        Mutation("q", "head_dim 512 (with k and v)", edit(lambda a: a.update(
            q=torch.randn(B, SQ, H, 512, generator=seeded(22)), k=torch.randn(B, SK, HKV, 512, generator=seeded(23)),
            v=torch.randn(B, SK, HKV, 512, generator=seeded(24)))), "either"),
        *dtype_mutations("k", (torch.float64, torch.bfloat16)),
        Mutation("k", "on the meta device", apply("k", lambda t: t.to("meta")), "either"),
        Mutation("k", "dimension 1 + 2**32 (a stride-0 view)", apply("k", lambda t: wrapped(t, 1)), names=("k", "v")),
        Mutation("k", "dimension 3 + 2**32 (a stride-0 view)", apply("k", lambda t: wrapped(t, 3)),
                 names=("k", "q", "v")),
        Mutation("k", "3 kv heads (q has 4)", apply("k", lambda t: torch.cat([t, t[:, :, :1]], 2)), names=("k", "q", "v")),
        Mutation("k", "6 keys (v has 7)", apply("k", lambda t: t[:, :6].clone()), names=("k", "v")),
        *layout_mutations("k"),
        *type_mutations("k"),
        Mutation("v", "head_dim 16 (q and k have 32)", apply("v", lambda t: t[..., :16].clone()), "either",
                 names=("v", "k", "q")),
        *layout_mutations("v"),
        *float_mutations("softmax_scale", none=None),
        Mutation("softmax_scale", "0.0", apply("softmax_scale", lambda _: 0.0), "either"),
        Mutation("window_size", "(2, 0)", apply("window_size", lambda _: (2, 0)), "correct"),
        Mutation("window_size", "(2**32 + 1, 0)", apply("window_size", lambda _: (1 + WRAP, 0)), "either"),
        Mutation("window_size", "(0, 2**32 + 1) without causal",
                 edit(lambda a: a.update(window_size=(0, 1 + WRAP), causal=False)), "either"),
        Mutation("window_size", "(-7, -7)", apply("window_size", lambda _: (-7, -7)), "either"),
        Mutation("window_size", "(1,)", apply("window_size", lambda _: (1,))),
        Mutation("window_size", "None", apply("window_size", lambda _: None)),
        Mutation("window_size", "('a', 0)", apply("window_size", lambda _: ("a", 0))),
        *float_mutations("softcap"),
        Mutation("softcap", "5.0", apply("softcap", lambda _: 5.0), "correct"),
        Mutation("dropout_p", "1.0", apply("dropout_p", lambda _: 1.0)),
        Mutation("dropout_p", "-0.1", apply("dropout_p", lambda _: -0.1)),
        Mutation("dropout_p", "nan", apply("dropout_p", lambda _: math.nan)),
        Mutation("dropout_p", "'0.1'", apply("dropout_p", lambda _: "0.1")),
        Mutation("alibi_slopes", "given", apply("alibi_slopes", lambda _: torch.linspace(0.1, 0.4, H)), "correct"),
        Mutation("alibi_slopes", "[batch, heads]", apply("alibi_slopes", lambda _: torch.rand(B, H, generator=seeded(5))),
                 "correct"),
        Mutation("alibi_slopes", "float64", apply("alibi_slopes", lambda _: torch.ones(H, dtype=torch.float64))),
        Mutation("alibi_slopes", f"{H + 1} slopes", apply("alibi_slopes", lambda _: torch.ones(H + 1))),
        Mutation("alibi_slopes", "a list", apply("alibi_slopes", lambda _: [1.0] * H)),
        Mutation("version", "3", apply("version", lambda _: 3)),
        Mutation("version", "2 + 2**32", apply("version", lambda _: 2 + WRAP)),
        Mutation("version", "'2'", apply("version", lambda _: "2")),
        Mutation("version", "None", apply("version", lambda _: None)),
    )


# -- flash_attn_func: backward, and the raw backward op -------------------------------------------------------

def make_backward():
    return dict(make_flash(), dout=torch.randn(B, SQ, H, D, generator=seeded(25)))


def call_backward(a):
    leaves = [a[n].detach().clone().requires_grad_() for n in ("q", "k", "v")]
    out = fa.flash_attn_func(*leaves, softmax_scale=a["softmax_scale"], causal=a["causal"],
                             window_size=a["window_size"], softcap=a["softcap"])
    out.backward(a["dout"])
    return out.detach(), tuple(x.grad for x in leaves)


def backward_reference(a):
    out, _, grads = attention_with_grads(t64(a["q"]), t64(a["k"]), t64(a["v"]), t64(a["dout"]), **attention_options(a))
    return out, grads


BACKWARD = Entry("flash_attn_func (backward)", make_backward, call_backward, backward_reference, rtol_of_max=1e-4)


def make_raw_backward():
    a = make_backward()
    out, lse = ops.flash_attn_forward(a["q"], a["k"], a["v"], None, None, 0, 0, D ** -0.5, True, -1, -1, 0.0, 2)
    return dict(dout=a["dout"], q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=0, max_seqlen_k=0, softmax_scale=D ** -0.5, causal=True, window_left=-1, window_right=-1,
                softcap=0.0)


RAW_ARGS = ("dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
            "softmax_scale", "causal", "window_left", "window_right", "softcap")


def raw_backward_reference(a):
    return attention_with_grads(t64(a["q"]), t64(a["k"]), t64(a["v"]), t64(a["dout"]), causal=bool(a["causal"]),
                                window=(int(a["window_left"]), int(a["window_right"])), softcap=float(a["softcap"]),
                                scale=float(a["softmax_scale"]))[2]


def make_raw_forward():
    a = make_flash()
    return dict(q=a["q"], k=a["k"], v=a["v"], cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                softmax_scale=D ** -0.5, causal=True, window_left=-1, window_right=-1, softcap=0.0, version=2)


FORWARD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
                "causal", "window_left", "window_right", "softcap", "version")


def raw_forward_reference(a):
    return attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), causal=bool(a["causal"]),
                     window=(int(a["window_left"]), int(a["window_right"])), softcap=float(a["softcap"]),
                     scale=float(a["softmax_scale"]))


RAW_FORWARD = Entry("flashlm.ops.flash_attn_forward", make_raw_forward,
                    lambda a: ops.flash_attn_forward(*(a[n] for n in FORWARD_ARGS)), raw_forward_reference,
                    rtol_of_max=RTOL)

RAW_BACKWARD = Entry("flashlm.ops.flash_attn_backward", make_raw_backward,
                     lambda a: ops.flash_attn_backward(*(a[n] for n in RAW_ARGS)), raw_backward_reference,
                     rtol_of_max=1e-4)


def backward_cases():
    cases = BACKWARD.cases(
        valid_call(),
        nan_at("dout", (1, 2, 3, 4), "one output row's gradient"),
        nan_at("q", (0, 1, 2, 3), "one query row"),
        nan_at("k", (0, 6, 1, 0), "a key only the last query sees (causal)"),
        nan_at("v", (1, 0, 0, 5), "a value every query sees"),
        Mutation("q", "more queries than keys (causal: the first rows see no key)", edit(lambda a: a.update(
            q=torch.randn(B, SK + 3, H, D, generator=seeded(26)), dout=torch.randn(B, SK + 3, H, D, generator=seeded(27)))),
            "correct"),
        Mutation("dout", "last dimension at stride 2", apply("dout", lambda t: torch.stack([t, t], -1)[..., 0]),
                 "correct"),
        Mutation("dout", "stored transposed", apply("dout", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
                 "correct"),
        Mutation("dout", "a stride-0 view", apply("dout", lambda t: t[:, :1].expand(B, SQ, H, D)), "correct"),
        Mutation("window_size", "(2, 0)", apply("window_size", lambda _: (2, 0)), "correct"),
        Mutation("softcap", "5.0", apply("softcap", lambda _: 5.0), "correct"),
    )
    cases += RAW_FORWARD.cases(
        valid_call(),
        *int_mutations("version", 2, zero="raise", types=False),
        Mutation("version", "1", apply("version", lambda _: 1), "correct"),
        Mutation("cu_seqlens_q", "given, cu_seqlens_k not", apply("cu_seqlens_q", lambda _: torch.tensor(
            [0, 5, 10], dtype=torch.int32)), names=("cu_seqlens_q", "cu_seqlens_k", "q")),
        *int_mutations("max_seqlen_k", 0, zero=None, negative=False, huge="either", types=False),
        *int_mutations("window_right", -1, zero=None, negative=False, huge="either", types=False),
        *float_mutations("softmax_scale"),
        *float_mutations("softcap"),
    )
    lse_like = ("lse", "out", "q")
    cases += RAW_BACKWARD.cases(
        valid_call(),
        Mutation("lse", "shape [2, 4, 4]", apply("lse", lambda t: t[..., :4].clone()), names=lse_like),
        Mutation("lse", "float64", apply("lse", lambda t: t.double()), "either"),
        Mutation("lse", "dimension 2 + 2**32 (a stride-0 view)", apply("lse", lambda t: wrapped(t, 2)), names=lse_like),
        Mutation("lse", "on the meta device", apply("lse", lambda t: t.to("meta")), "either"),
        *type_mutations("lse"),
        Mutation("out", "shape [2, 5, 4, 16]", apply("out", lambda t: t[..., :16].clone()), names=("out", "q")),
        Mutation("out", "bfloat16", apply("out", lambda t: t.bfloat16()), "either", names=("out", "q")),
        Mutation("out", "dimension 1 + 2**32 (a stride-0 view)", apply("out", lambda t: wrapped(t, 1)),
                 names=("out", "q")),
        Mutation("dout", "shape [2, 4, 4, 32]", apply("dout", lambda t: t[:, :4].clone()), names=("dout", "q")),
        Mutation("dout", "dimension 1 + 2**32 (a stride-0 view)", apply("dout", lambda t: wrapped(t, 1)),
                 names=("dout", "q")),
        *dtype_mutations("dout", (torch.bfloat16, torch.float64)),
        *type_mutations("dout"),
        Mutation("cu_seqlens_q", "given with padded inputs", apply("cu_seqlens_q", lambda _: torch.tensor(
            [0, 5, 10], dtype=torch.int32)), names=("cu_seqlens_q", "cu_seqlens_k", "q")),
        *int_mutations("max_seqlen_q", 0, zero=None, huge="either", negative=False, none=None),
        *int_mutations("window_left", -1, zero=None, negative=False, huge="either", none="raise"),
        # Another scale than out and lse were computed with has no correct gradient: only its types are tried.
        Mutation("softmax_scale", "None", apply("softmax_scale", lambda _: None)),
        Mutation("softmax_scale", "a string", apply("softmax_scale", lambda _: "x")),
    )
    return cases


# -- flash_attn_varlen_func (packed, and over a paged cache) --------------------------------------------------

CU_Q, CU_K = [0, 3, 3, 10], [0, 5, 6, 12]  # three sequences: the second has no query; the third 7 over 6 keys


def make_varlen():
    g = seeded(28)
    return dict(q=torch.randn(10, H, D, generator=g), k=torch.randn(12, HKV, D, generator=g),
                v=torch.randn(12, HKV, D, generator=g), cu_seqlens_q=torch.tensor(CU_Q, dtype=torch.int32),
                cu_seqlens_k=torch.tensor(CU_K, dtype=torch.int32), max_seqlen_q=7, max_seqlen_k=6, dropout_p=0.0,
                softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, block_table=None)


def call_varlen(a):
    out, lse, _ = fa.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                            a["max_seqlen_q"], a["max_seqlen_k"], a["dropout_p"], a["softmax_scale"],
                                            a["causal"], a["window_size"], a["softcap"], return_attn_probs=True,
                                            block_table=a["block_table"])
    return out, lse


def varlen_reference(a):
    return attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), cu_seqlens_q=torch.as_tensor(a["cu_seqlens_q"]),
                     cu_seqlens_k=torch.as_tensor(a["cu_seqlens_k"]), **attention_options(a))


VARLEN = Entry("flash_attn_varlen_func", make_varlen, call_varlen, varlen_reference, rtol_of_max=RTOL)


def make_varlen_backward():
    return dict(make_varlen(), dout=torch.randn(10, H, D, generator=seeded(29)))


def call_varlen_backward(a):
    leaves = [a[n].detach().clone().requires_grad_() for n in ("q", "k", "v")]
    out = fa.flash_attn_varlen_func(*leaves, a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                                    a["max_seqlen_k"], causal=a["causal"])
    out.backward(a["dout"])
    return out.detach(), tuple(x.grad for x in leaves)


def varlen_backward_reference(a):
    out, _, grads = attention_with_grads(t64(a["q"]), t64(a["k"]), t64(a["v"]), t64(a["dout"]),
                                         cu_seqlens_q=torch.as_tensor(a["cu_seqlens_q"]),
                                         cu_seqlens_k=torch.as_tensor(a["cu_seqlens_k"]), **attention_options(a))
    return out, grads


VARLEN_BACKWARD = Entry("flash_attn_varlen_func (backward)", make_varlen_backward, call_varlen_backward,
                        varlen_backward_reference, rtol_of_max=1e-4)

PAGE, PAGES = 4, 8  # block size and blocks of the paged variant


def make_varlen_paged():
    """q packed as make_varlen's but for the third sequence's last 6 tokens (queries are a context's last
    tokens), K/V in paged caches holding the same keys: block_table int32 [3, 2]."""
    a = make_varlen()
    a.update(q=a["q"][:9].clone(), cu_seqlens_q=torch.tensor([0, 3, 3, 9], dtype=torch.int32), max_seqlen_q=6)
    table = torch.tensor([[6, 2], [5, 0], [7, 3]], dtype=torch.int32)
    caches = []
    for t in (a["k"], a["v"]):
        cache = torch.randn(PAGES, PAGE, HKV, D, generator=seeded(30))
        for s in range(3):
            keys = t[CU_K[s]:CU_K[s + 1]]
            for j in range(len(keys)):
                cache[table[s, j // PAGE], j % PAGE] = keys[j]
        caches.append(cache)
    return dict(a, k=caches[0], v=caches[1], block_table=table)


def varlen_paged_reference(a):
    from reference import paged_attention

    cu_k = [int(c) for c in torch.as_tensor(a["cu_seqlens_k"])]
    lens = [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
    return paged_attention(t64(a["q"]), t64(a["k"]), t64(a["v"]), torch.as_tensor(a["block_table"]).long(), lens,
                           [int(c) for c in torch.as_tensor(a["cu_seqlens_q"])], **attention_options(a))


VARLEN_PAGED = Entry("flash_attn_varlen_func (block_table)", make_varlen_paged, call_varlen, varlen_paged_reference,
                     rtol_of_max=RTOL)


def cu(arg, values, dtype=torch.int32):
    return apply(arg, lambda _: torch.tensor(values, dtype=dtype))


def varlen_cases():
    cu_names = ("cu_seqlens_q", "cu_seqlens_k")
    cases = VARLEN.cases(
        valid_call(),
        Mutation("causal", "False", apply("causal", lambda _: False), "correct"),
        nan_at("q", (5, 1, 0), "one query row of the third sequence"),
        nan_at("k", (2, 0, 0), "a key of the first sequence (no other sequence sees it)"),
        nan_at("k", (11, 1, 0), "the last key of the third sequence (only its last query sees it)"),
        nan_at("v", (0, 1, 7), "a value every query of the first sequence sees"),
        Mutation("k", "NaN in rows past cu_seqlens_k[-1] (v too)", edit(lambda a: a.update(
            k=torch.cat([a["k"], torch.full((2, HKV, D), math.nan)]),
            v=torch.cat([a["v"], torch.full((2, HKV, D), math.nan)]))), "correct"),
        Mutation("q", "rows past cu_seqlens_q[-1]", apply("q", lambda t: torch.cat([t, t[:2]])), "correct"),
        Mutation("cu_seqlens_q", "decreasing [0, 3, 2, 10]", cu("cu_seqlens_q", [0, 3, 2, 10])),
        Mutation("cu_seqlens_q", "ending past q's 10 rows", cu("cu_seqlens_q", [0, 3, 3, 11])),
        Mutation("cu_seqlens_q", "starting at -1", cu("cu_seqlens_q", [-1, 3, 3, 10])),
        Mutation("cu_seqlens_q", "starting at 1 (row 0 in no sequence)", cu("cu_seqlens_q", [1, 3, 3, 10]), "either"),
        Mutation("cu_seqlens_q", "int64", cu("cu_seqlens_q", CU_Q, torch.int64), "either"),
        Mutation("cu_seqlens_q", "int64, an entry 3 + 2**32", cu("cu_seqlens_q", [0, 3 + WRAP, 3, 10], torch.int64)),
        Mutation("cu_seqlens_q", "float32", cu("cu_seqlens_q", CU_Q, torch.float32)),
        Mutation("cu_seqlens_q", "3 entries (cu_seqlens_k has 4)", cu("cu_seqlens_q", CU_Q[:3]), names=cu_names),
        Mutation("cu_seqlens_q", "2-dim", apply("cu_seqlens_q", lambda t: t[None])),
        Mutation("cu_seqlens_q", "on the meta device", apply("cu_seqlens_q", lambda t: t.to("meta")), "either"),
        Mutation("cu_seqlens_q", "a list", apply("cu_seqlens_q", lambda t: t.tolist())),
        Mutation("cu_seqlens_q", "None", apply("cu_seqlens_q", lambda t: None)),
        Mutation("cu_seqlens_k", "decreasing [0, 5, 4, 12]", cu("cu_seqlens_k", [0, 5, 4, 12])),
        Mutation("cu_seqlens_k", "ending past k's 12 rows", cu("cu_seqlens_k", [0, 5, 6, 13])),
        Mutation("cu_seqlens_k", "int64, an entry 6 + 2**32", cu("cu_seqlens_k", [0, 5, 6 + WRAP, 12], torch.int64)),
        Mutation("cu_seqlens_k", "a stride-0 view of 2**32 + 4 entries",
                 apply("cu_seqlens_k", lambda t: wrapped(t, 0)), names=cu_names),
        Mutation("max_seqlen_q", "6 (the longest has 7)", apply("max_seqlen_q", lambda _: 6), "either"),
        Mutation("max_seqlen_k", "5 (the longest has 6)", apply("max_seqlen_k", lambda _: 5), "either"),
        *int_mutations("max_seqlen_q", 7, zero="either", huge="either"),
        *int_mutations("max_seqlen_k", 6, zero="either", huge="either", types=False),
        Mutation("q", "3 heads (kv_heads 2)", apply("q", lambda t: t[:, :3].clone()), names=("q", "k")),
        Mutation("q", "4-dim (padded)", apply("q", lambda t: t[None])),
        *dtype_mutations("q", (torch.bfloat16, torch.float64)),
        *layout_mutations("q"),
        Mutation("q", "dimension 0 + 2**32 (a stride-0 view)", apply("q", lambda t: wrapped(t, 0)),
                 names=("q", "cu_seqlens_q")),
        Mutation("k", "dimension 0 + 2**32 (a stride-0 view)", apply("k", lambda t: wrapped(t, 0)),
                 names=("k", "v", "cu_seqlens_k")),
    )
    cases += VARLEN_BACKWARD.cases(
        valid_call(),
        nan_at("dout", (8, 2, 3), "one output row's gradient"),
        nan_at("k", (2, 0, 0), "a key of the first sequence"),
        Mutation("cu_seqlens_q", "decreasing [0, 3, 2, 10]", cu("cu_seqlens_q", [0, 3, 2, 10])),
        Mutation("cu_seqlens_k", "ending past k's 12 rows", cu("cu_seqlens_k", [0, 5, 6, 13])),
    )
    cases += VARLEN_PAGED.cases(
        valid_call(),
        nan_at("k", (3, 2, 1, 0), "a cached key past the third sequence's 6"),
        nan_at("k", (1, 0, 0, 0), "a block no table names"),
        nan_at("k", (2, 0, 0, 0), "a key of the first sequence"),
        Mutation("block_table", f"an entry {PAGES} (one past the cache)",
                 apply("block_table", lambda t: poke(t, (2, 1), PAGES))),
        Mutation("block_table", "an entry -1", apply("block_table", lambda t: poke(t, (2, 1), -1))),
        Mutation("block_table", "int64 with an entry 3 + 2**32",
                 apply("block_table", lambda t: poke(t.long(), (2, 1), 3 + WRAP))),
        Mutation("block_table", "1 column (the first sequence needs 2)",
                 apply("block_table", lambda t: t[:, :1].clone()), names=("block_table", "cu_seqlens_k")),
        Mutation("cu_seqlens_k", "a context longer than the table holds", cu("cu_seqlens_k", [0, 5, 6, 15]),
                 names=("cu_seqlens_k", "block_table", "seq_lens")),
        Mutation("cu_seqlens_k", "decreasing [0, 5, 4, 12]", cu("cu_seqlens_k", [0, 5, 4, 12]),
                 names=("cu_seqlens_k", "seq_lens")),
        Mutation("cu_seqlens_k", "int64, an entry 6 + 2**32", cu("cu_seqlens_k", [0, 5, 6 + WRAP, 12], torch.int64),
                 names=("cu_seqlens_k", "seq_lens")),
        *int_mutations("max_seqlen_q", 6, zero="either", huge="either", types=False),
    )
    return cases


# -- the packed variants --------------------------------------------------------------------------------------

def make_qkvpacked():
    return dict(qkv=torch.randn(B, SQ, 3, H, D, generator=seeded(34)))


def qkvpacked_reference(a):
    qkv = t64(a["qkv"])
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, scale=D ** -0.5)


QKVPACKED = Entry("flash_attn_qkvpacked_func", make_qkvpacked,
                  lambda a: fa.flash_attn_qkvpacked_func(a["qkv"], causal=True, return_attn_probs=True)[:2],
                  qkvpacked_reference, rtol_of_max=RTOL)


def make_kvpacked():
    g = seeded(35)
    return dict(q=torch.randn(B, SQ, H, D, generator=g), kv=torch.randn(B, SK, 2, HKV, D, generator=g))


def kvpacked_reference(a):
    kv = t64(a["kv"])
    return attention(t64(a["q"]), kv[:, :, 0], kv[:, :, 1], causal=True, scale=D ** -0.5)


KVPACKED = Entry("flash_attn_kvpacked_func", make_kvpacked,
                 lambda a: fa.flash_attn_kvpacked_func(a["q"], a["kv"], causal=True, return_attn_probs=True)[:2],
                 kvpacked_reference, rtol_of_max=RTOL)


def make_varlen_qkvpacked():
    return dict(qkv=torch.randn(10, 3, H, D, generator=seeded(36)), cu_seqlens=torch.tensor(CU_Q, dtype=torch.int32),
                max_seqlen=7)


def varlen_qkvpacked_reference(a):
    qkv, cu_seqlens = t64(a["qkv"]), torch.as_tensor(a["cu_seqlens"])
    return attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, causal=True,
                     scale=D ** -0.5)


VARLEN_QKVPACKED = Entry("flash_attn_varlen_qkvpacked_func", make_varlen_qkvpacked,
                         lambda a: fa.flash_attn_varlen_qkvpacked_func(a["qkv"], a["cu_seqlens"], a["max_seqlen"],
                                                                       causal=True, return_attn_probs=True)[:2],
                         varlen_qkvpacked_reference, rtol_of_max=RTOL)


def make_varlen_kvpacked():
    a = make_varlen()
    return dict(q=a["q"], kv=torch.stack([a["k"], a["v"]], 1), cu_seqlens_q=a["cu_seqlens_q"],
                cu_seqlens_k=a["cu_seqlens_k"], max_seqlen_q=7, max_seqlen_k=6)


def varlen_kvpacked_reference(a):
    kv = t64(a["kv"])
    return attention(t64(a["q"]), kv[:, 0], kv[:, 1], cu_seqlens_q=torch.as_tensor(a["cu_seqlens_q"]),
                     cu_seqlens_k=torch.as_tensor(a["cu_seqlens_k"]), causal=True, scale=D ** -0.5)


VARLEN_KVPACKED = Entry("flash_attn_varlen_kvpacked_func", make_varlen_kvpacked,
                        lambda a: fa.flash_attn_varlen_kvpacked_func(a["q"], a["kv"], a["cu_seqlens_q"],
                                                                     a["cu_seqlens_k"], a["max_seqlen_q"],
                                                                     a["max_seqlen_k"], causal=True,
                                                                     return_attn_probs=True)[:2],
                        varlen_kvpacked_reference, rtol_of_max=RTOL)

# A packed argument's error may name it or the part it splits into.
PACKED_NAMES = {"qkv": ("qkv", "q", "k", "v"), "kv": ("kv", "k", "v")}


def packed_cases():
    qkv, kv = PACKED_NAMES["qkv"], PACKED_NAMES["kv"]
    cases = QKVPACKED.cases(
        valid_call(),
        nan_at("qkv", (0, 4, 1, 2, 0), "a key only the last query sees"),
        Mutation("qkv", "2 at dimension 2 (not 3)", apply("qkv", lambda t: t[:, :, :2].clone()), names=qkv),
        Mutation("qkv", "4 at dimension 2", apply("qkv", lambda t: torch.cat([t, t[:, :, :1]], 2)), names=qkv),
        Mutation("qkv", "4-dim", apply("qkv", lambda t: t[:, :, 0].clone()), names=qkv),
        Mutation("qkv", "interleaved [B, S, H, 3, D] viewed as [B, S, 3, H, D]",
                 apply("qkv", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)), "correct"),
        Mutation("qkv", "dimension 1 + 2**32 (a stride-0 view)", apply("qkv", lambda t: wrapped(t, 1)), names=qkv),
        Mutation("qkv", "on the meta device", apply("qkv", lambda t: t.to("meta")), "either", names=qkv),
        *type_mutations("qkv"),
    )
    cases += KVPACKED.cases(
        valid_call(),
        nan_at("kv", (1, 0, 1, 0, 0), "a value every query sees"),
        Mutation("kv", "3 at dimension 2 (not 2)", apply("kv", lambda t: torch.cat([t, t[:, :, :1]], 2)), names=kv),
        Mutation("kv", "1 at dimension 2", apply("kv", lambda t: t[:, :, :1].clone()), names=kv),
        Mutation("kv", "4-dim", apply("kv", lambda t: t[:, :, 0].clone()), names=kv),
        Mutation("kv", "batch 3 (q has 2)", apply("kv", lambda t: torch.cat([t, t[:1]])), names=kv + ("q",)),
        *type_mutations("kv"),
    )
    seqlen = ("max_seqlen", "max_seqlen_q", "max_seqlen_k")
    cases += VARLEN_QKVPACKED.cases(
        valid_call(),
        nan_at("qkv", (2, 1, 0, 0), "a key of the first sequence"),
        Mutation("qkv", "2 at dimension 1", apply("qkv", lambda t: t[:, :2].clone()), names=qkv),
        Mutation("cu_seqlens", "ending past qkv's 10 rows", cu("cu_seqlens", [0, 3, 3, 11]),
                 names=("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k")),
        Mutation("cu_seqlens", "decreasing", cu("cu_seqlens", [0, 3, 2, 10]),
                 names=("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k")),
        *[Mutation(m.arg, m.what, m.apply, m.expect, names=seqlen)
          for m in int_mutations("max_seqlen", 7, zero="either", huge="either", types=False)],
    )
    cases += VARLEN_KVPACKED.cases(
        valid_call(),
        Mutation("kv", "3 at dimension 1", apply("kv", lambda t: torch.cat([t, t[:, :1]], 1)), names=kv),
        Mutation("kv", "rows past cu_seqlens_k[-1] holding NaN", apply("kv", lambda t: torch.cat(
            [t, torch.full((2, 2, HKV, D), math.nan)])), "correct"),
    )
    return cases


CASES = flash_cases() + backward_cases() + varlen_cases() + packed_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
