"""flashlm.ops.NativeDecoder called as a hostile user would: its construction, set_ends and a serving step's
logits with one argument mutated at a time (tests/robust.py runs each case in a forked child).

The model is a small random llama whose block linears, embedding and head are Q8_0 blocks (what a loaded GGUF
file gives). A step's reference is the module-by-module path, Transformer.forward_paged, on fresh caches
(tests/test_native_decoder.py holds the two equal bit for bit); a NaN the step reads must reach the logits of
the sequences that read it, and a NaN it does not read (a block no table names) must reach none.
"""

import functools
import math

import torch

import robust
from flashlm.models import ModelConfig, Transformer
from flashlm.models.transformer import PagedBatch
from flashlm.ops import NativeDecoder
from flashlm.quant import GGUFEmbedding, GGUFLinear
from flashlm.runtime.native_decoder import build_native_decoder
from robust import Case, value_case
from robust_args import (WRAP, Entry, Mutation, apply, dtype_mutations, edit, int_mutations, poke, type_mutations,
                         valid_call, wrapped)

VOCAB, D, HEADS, KV_HEADS, FF, LAYERS, CONTEXT = 64, 64, 4, 2, 128, 2, 32
HEAD_DIM = D // HEADS
BLOCKS, BLOCK = 6, 4


@functools.lru_cache(maxsize=1)
def model():
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_kv_head=KV_HEADS, d_model=D,
                      d_ff=FF, seq_len=CONTEXT, tie_embeddings=False)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    for block in m.blocks:
        for parent, names in ((block.attn, "qkvo"), (block.mlp, ("gate", "up", "down"))):
            for name in names:
                setattr(parent, name, GGUFLinear.from_float(getattr(parent, name), "Q8_0"))
    table = torch.nn.Linear(D, VOCAB, bias=False)
    table.weight.data.copy_(m.tok_emb.weight)
    m.tok_emb = GGUFEmbedding(GGUFLinear.from_float(table, "Q8_0").raw, "Q8_0", (VOCAB, D))
    m.lm_head = GGUFLinear.from_float(m.lm_head, "Q8_0")
    return m


def warm():
    model()


def caches():
    return [torch.zeros(BLOCKS, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]


def make_step():
    """A prefill of two sequences (3 and 2 tokens) in blocks 4, 1 and 2; every logits row wanted."""
    m = model()
    return dict(decoder=build_native_decoder(m), tokens=torch.tensor([5, 17, 3, 60, 1]),
                positions=torch.tensor([0, 1, 2, 0, 1]), rope_cos=m.rope_cos, rope_sin=m.rope_sin, k_caches=caches(),
                v_caches=caches(), slot_mapping=torch.tensor([16, 17, 18, 8, 9]),
                block_table=torch.tensor([[4, 0], [2, 0]], dtype=torch.int32),
                seq_lens=torch.tensor([3, 2], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32),
                max_seqlen_q=3, logits_rows=torch.tensor([2, 4]))


STEP_ARGS = ("tokens", "positions", "rope_cos", "rope_sin", "k_caches", "v_caches", "slot_mapping", "block_table",
             "seq_lens", "cu_seqlens_q", "max_seqlen_q", "logits_rows")


def call_step(a):
    return a["decoder"].logits(*(a[n] for n in STEP_ARGS))


def module_logits(a=None):
    """The module path's logits of the valid step, on fresh caches (float64 for the comparison)."""
    a = make_step()
    batch = PagedBatch(a["positions"], a["slot_mapping"], a["block_table"], a["seq_lens"], a["cu_seqlens_q"],
                       a["max_seqlen_q"], a["logits_rows"])
    with torch.no_grad():
        return model().forward_paged(a["tokens"], batch, list(zip(caches(), caches()))).double()


STEP = Entry("NativeDecoder.logits", make_step, call_step, module_logits, rtol_of_max=1e-4)


def nan_rows(rows):
    """A reference: the valid step's logits with the rows of `rows` NaN (their sequence read a NaN)."""
    def reference(a):
        want = module_logits()
        want[list(rows)] = math.nan
        return want
    return reference


def in_cache(which, layer, slot, value=math.nan):
    def change(a):
        caches = list(a[which])
        block, offset = divmod(slot, BLOCK)
        caches[layer] = poke(caches[layer], (block, offset, 0, 0), value)
        a[which] = caches
    return change


def layer_list(which, fn):
    def change(a):
        a[which] = fn(list(a[which]))
    return change


def step_cases():
    cases = STEP.cases(
        valid_call(),
        Mutation("k_caches", "NaN in a block no table names", in_cache("k_caches", 1, 20), "correct"),
        Mutation("v_caches", "NaN in a block no table names", in_cache("v_caches", 0, 0), "correct"),
        Mutation("k_caches", "a stale NaN past the context in the first sequence's block", in_cache("k_caches", 0, 19),
                 "correct"),
        Mutation("k_caches", "NaN at the first sequence's token 1 (this step writes it before reading)",
                 in_cache("k_caches", 0, 17), "correct"),
        *dtype_mutations("tokens", (torch.int32, torch.float32, torch.uint8)),
        Mutation("tokens", f"an id {VOCAB} (the vocabulary has {VOCAB})", apply("tokens", lambda t: poke(t, 1, VOCAB))),
        Mutation("tokens", "an id -1", apply("tokens", lambda t: poke(t, 1, -1))),
        Mutation("tokens", "an id 17 + 2**32", apply("tokens", lambda t: poke(t, 1, 17 + WRAP))),
        Mutation("tokens", "an id -2**63", apply("tokens", lambda t: poke(t, 1, -(1 << 63)))),
        Mutation("tokens", "4 tokens (positions has 5)", apply("tokens", lambda t: t[:4]),
                 names=("tokens", "positions", "x")),
        Mutation("tokens", "2-dim", apply("tokens", lambda t: t[None])),
        Mutation("tokens", "not contiguous", apply("tokens", lambda t: torch.stack([t, t], 1)[:, 0]), "either"),
        Mutation("tokens", "dimension 0 + 2**32 (a stride-0 view)", apply("tokens", lambda t: wrapped(t, 0)),
                 names=("tokens", "positions")),
        Mutation("tokens", "on the meta device", apply("tokens", lambda t: t.to("meta"))),
        *type_mutations("tokens"),
        Mutation("positions", f"{CONTEXT} (the rope tables have {CONTEXT} rows)",
                 apply("positions", lambda t: poke(t, 2, CONTEXT)), names=("positions", "rope_cos")),
        Mutation("positions", "-1", apply("positions", lambda t: poke(t, 2, -1))),
        Mutation("positions", "2 + 2**32", apply("positions", lambda t: poke(t, 2, 2 + WRAP)),
                 names=("positions", "rope_cos")),
        *dtype_mutations("positions", (torch.int32,)),
        Mutation("positions", "4 entries for 5 tokens", apply("positions", lambda t: t[:4]), names=("positions", "tokens")),
        Mutation("rope_cos", "half as many columns", apply("rope_cos", lambda t: t[:, :HEAD_DIM // 2].contiguous()),
                 names=("rope_cos", "head_dim")),
        Mutation("rope_cos", "2 rows (positions reach 2)", apply("rope_cos", lambda t: t[:2].contiguous()),
                 names=("rope_cos", "rope_sin", "positions")),
        *dtype_mutations("rope_cos", (torch.bfloat16, torch.float64)),
        Mutation("rope_cos", "not contiguous", apply("rope_cos", lambda t: t.T.contiguous().T), "either"),
        Mutation("rope_sin", "dimension 0 + 2**32 (a stride-0 view)", apply("rope_sin", lambda t: wrapped(t, 0)),
                 names=("rope_sin", "rope_cos")),
        *type_mutations("rope_sin"),
        Mutation("k_caches", "one layer fewer", layer_list("k_caches", lambda c: c[:1]), names=("k_caches", "v_caches")),
        Mutation("k_caches", "a tensor, not a list", apply("k_caches", lambda c: c[0])),
        Mutation("k_caches", "a tuple", apply("k_caches", tuple), "either"),
        Mutation("k_caches", "None in layer 1", layer_list("k_caches", lambda c: [c[0], None])),
        Mutation("k_caches", "layer 1 bfloat16", layer_list("k_caches", lambda c: [c[0], c[1].bfloat16()]),
                 names=("k_caches", "kv cache", "layer 1")),
        Mutation("k_caches", "layer 1 with head_dim 8", layer_list("k_caches", lambda c: [c[0], c[1][..., :8].clone()]),
                 names=("k_caches", "k_cache", "kv cache", "layer 1")),
        Mutation("k_caches", "layer 0 on the meta device", layer_list("k_caches", lambda c: [c[0].to("meta"), c[1]]),
                 names=("k_caches", "k_cache", "kv cache", "layer 0")),
        Mutation("k_caches", "layer 0 a stride-0 view of 2**32 + 6 blocks",
                 layer_list("k_caches", lambda c: [wrapped(c[0], 0), c[1]]), "either",
                 names=("k_caches", "k_cache", "kv cache", "layer 0")),
        Mutation("v_caches", "3 blocks (k_caches have 6)", layer_list("v_caches", lambda c: [t[:3].clone() for t in c]),
                 names=("v_caches", "v_cache", "k_caches", "kv cache")),
        Mutation("slot_mapping", f"{BLOCKS * BLOCK} (one past the caches)",
                 apply("slot_mapping", lambda t: poke(t, 0, BLOCKS * BLOCK)), names=("slot_mapping",)),
        Mutation("slot_mapping", "-2", apply("slot_mapping", lambda t: poke(t, 0, -2))),
        Mutation("slot_mapping", "16 + 2**32", apply("slot_mapping", lambda t: poke(t, 0, 16 + WRAP))),
        Mutation("slot_mapping", "4 slots for 5 tokens", apply("slot_mapping", lambda t: t[:4]),
                 names=("slot_mapping", "tokens", "key")),
        *dtype_mutations("slot_mapping", (torch.int32, torch.float32)),
        Mutation("block_table", f"an entry {BLOCKS} (one past the caches)",
                 apply("block_table", lambda t: poke(t, (0, 0), BLOCKS))),
        Mutation("block_table", "an entry -1", apply("block_table", lambda t: poke(t, (0, 0), -1))),
        Mutation("block_table", "int64 with an entry 4 + 2**32",
                 apply("block_table", lambda t: poke(t.long(), (0, 0), 4 + WRAP))),
        Mutation("block_table", "int64", apply("block_table", lambda t: t.long()), "either"),
        Mutation("block_table", "1 row for 2 sequences", apply("block_table", lambda t: t[:1]),
                 names=("block_table", "seq_lens")),
        Mutation("seq_lens", "9 (the table holds 8 tokens)", apply("seq_lens", lambda t: poke(t, 0, 9)),
                 names=("seq_lens", "block_table")),
        Mutation("seq_lens", "1 for a sequence of 2 new tokens", apply("seq_lens", lambda t: poke(t, 1, 1)),
                 names=("seq_lens", "cu_seqlens_q")),
        Mutation("seq_lens", "-1", apply("seq_lens", lambda t: poke(t, 1, -1))),
        Mutation("seq_lens", "int64, 3 + 2**32", apply("seq_lens", lambda t: poke(t.long(), 0, 3 + WRAP))),
        Mutation("cu_seqlens_q", "decreasing [0, 3, 2]", apply("cu_seqlens_q", lambda t: poke(t, 2, 2))),
        Mutation("cu_seqlens_q", "ending at 4 of 5 tokens", apply("cu_seqlens_q", lambda t: poke(t, 2, 4)),
                 names=("cu_seqlens_q", "tokens")),
        Mutation("cu_seqlens_q", "ending at 6 of 5 tokens", apply("cu_seqlens_q", lambda t: poke(t, 2, 6))),
        Mutation("cu_seqlens_q", "None (one token per sequence)", apply("cu_seqlens_q", lambda t: None),
                 names=("cu_seqlens_q", "seq_lens", "tokens", "q")),
        Mutation("cu_seqlens_q", "int64, an entry 3 + 2**32", apply("cu_seqlens_q", lambda t: poke(t.long(), 1, 3 + WRAP))),
        Mutation("max_seqlen_q", "2 (the longest has 3)", apply("max_seqlen_q", lambda _: 2), "either"),
        *int_mutations("max_seqlen_q", 3, zero="either", huge="either"),
        Mutation("logits_rows", "5 (a row past the 5 tokens)", apply("logits_rows", lambda t: poke(t, 1, 5))),
        Mutation("logits_rows", "-1", apply("logits_rows", lambda t: poke(t, 1, -1))),
        Mutation("logits_rows", "4 + 2**32", apply("logits_rows", lambda t: poke(t, 1, 4 + WRAP))),
        Mutation("logits_rows", "int32", apply("logits_rows", lambda t: t.int()), "either"),
        Mutation("logits_rows", "a stride-0 view of 2**32 + 2 rows", apply("logits_rows", lambda t: wrapped(t, 0))),
        Mutation("logits_rows", "2-dim", apply("logits_rows", lambda t: t[None])),
    )
    both_nan = Entry("NativeDecoder.logits", make_step, call_step, nan_rows((0, 1)), rtol_of_max=1e-4)
    return cases + both_nan.cases(Mutation("rope_cos", "a NaN at position 1 (both sequences read it)",
                                           apply("rope_cos", lambda t: poke(t, (1, 0), math.nan)), "correct"))


# -- construction and set_ends --------------------------------------------------------------------------------

def layer_parts():
    """Per layer (attn_norm, q, k, v, o, mlp_norm, gate, up, down) of the model, as build_native_decoder passes them."""
    m = model()

    def linear(x):
        return (x.raw, x.ggml_type, x.out_features, x.in_features, x.bias)

    return [[b.attn_norm.weight.detach(), linear(b.attn.q), linear(b.attn.k), linear(b.attn.v), linear(b.attn.o),
             b.mlp_norm.weight.detach(), linear(b.mlp.gate), linear(b.mlp.up), linear(b.mlp.down)] for b in m.blocks]


def make_decoder():
    return dict(d_model=D, n_head=HEADS, n_kv_head=KV_HEADS, head_dim=HEAD_DIM, d_ff=FF, eps=1e-5,
                layers=layer_parts())


CTOR_ARGS = ("d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "eps", "layers")


def built(result):
    return None if isinstance(result, NativeDecoder) and result.num_layers == LAYERS else f"returned {result!r}"


def in_layer(layer, part, fn):
    def change(a):
        layers = [list(x) for x in a["layers"]]
        layers[layer][part] = fn(layers[layer][part])
        a["layers"] = layers
    return change


def linear_field(field, fn):
    return lambda spec: tuple(fn(v) if i == field else v for i, v in enumerate(spec))


def decoder_cases():
    entry = "NativeDecoder()"
    muts = [
        *int_mutations("d_model", D, types=False),
        *int_mutations("n_head", HEADS, types=False),
        Mutation("n_head", "3 (not a multiple of n_kv_head 2)", apply("n_head", lambda _: 3),
                 names=("n_head", "n_kv_head")),
        *int_mutations("n_kv_head", KV_HEADS, types=False),
        *int_mutations("head_dim", HEAD_DIM, types=False),
        Mutation("head_dim", "15 (odd)", apply("head_dim", lambda _: 15)),
        Mutation("head_dim", "8 (d_model / n_head is 16)", apply("head_dim", lambda _: 8),
                 names=("head_dim", "layer 0 q", "layers[0].q", "layer 0")),
        *int_mutations("d_ff", FF, types=False),
        Mutation("eps", "nan", apply("eps", lambda _: math.nan), "either"),
        Mutation("eps", "-1.0", apply("eps", lambda _: -1.0), "either"),
        Mutation("eps", "None", apply("eps", lambda _: None)),
        Mutation("layers", "one layer's 8 parts", edit(lambda a: a.update(layers=[a["layers"][0][:8], a["layers"][1]])),
                 names=("layers", "layers[0]", "layer 0")),
        Mutation("layers", "a tensor for a linear", in_layer(1, 2, lambda spec: spec[0]),
                 names=("layers", "layers[1]", "layers[1].k", "layer 1 k")),
        Mutation("layers", "q's blocks one byte short", in_layer(0, 1, linear_field(0, lambda raw: raw.reshape(-1)[:-1])),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's type 'F32'", in_layer(0, 1, linear_field(1, lambda _: "F32")),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's type 'Q9_9'", in_layer(0, 1, linear_field(1, lambda _: "Q9_9")),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's n 2**32 + 64", in_layer(0, 1, linear_field(2, lambda n: n + WRAP)),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's k 2**32 + 64", in_layer(0, 1, linear_field(3, lambda k: k + WRAP)),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's blocks as int8", in_layer(0, 1, linear_field(0, lambda raw: raw.view(torch.int8))),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "q's blocks not contiguous",
                 in_layer(0, 1, linear_field(0, lambda raw: torch.stack([raw, raw], -1)[..., 0])),
                 names=("layers", "layers[0].q", "layer 0 q")),
        Mutation("layers", "v's bias of 5 values", in_layer(1, 3, linear_field(4, lambda _: torch.zeros(5))),
                 names=("layers", "layers[1].v", "layer 1 v")),
        Mutation("layers", "attn_norm of 63 values", in_layer(0, 0, lambda w: w[:63]),
                 names=("layers", "layers[0].attn_norm", "layer 0 attn_norm")),
        Mutation("layers", "attn_norm on the meta device", in_layer(0, 0, lambda w: w.to("meta")),
                 names=("layers", "layers[0].attn_norm", "layer 0 attn_norm")),
        Mutation("layers", "a string", apply("layers", lambda _: "layers")),
        Mutation("layers", "None", apply("layers", lambda _: None)),
    ]
    cases = []
    for m in muts:
        def call(m=m):
            a = make_decoder()
            m.apply(a)
            return NativeDecoder(*(a[n] for n in CTOR_ARGS))
        # A size the layers' weights disagree with may be reported through the first layer's tensor.
        names = m.names or (m.arg, "layer 0")
        if m.expect == "raise":
            cases.append(Case(entry, m.label, call, names))
        else:  # an accepted value: a decoder of the model's layers
            cases.append(value_case(entry, m.label, call, names, built))
    return cases


def make_ends():
    m = model()
    return dict(decoder=build_native_decoder(m), embedding=m.tok_emb.raw, embedding_type="Q8_0",
                final_norm=m.final_norm.weight.detach(), head=(m.lm_head.raw, "Q8_0", VOCAB, D, None))


def ends_cases():
    def call(m):
        def run():
            a = make_ends()
            m.apply(a)
            a["decoder"].set_ends(a["embedding"], a["embedding_type"], a["final_norm"], a["head"])
            return a["decoder"]
        return run

    muts = [
        Mutation("embedding", "one byte short", apply("embedding", lambda t: t.reshape(-1)[:-1])),
        Mutation("embedding", "no rows", apply("embedding", lambda t: t[:0])),
        Mutation("embedding", "a stride-0 view of 2**32 + 64 rows", apply("embedding", lambda t: wrapped(t, 0))),
        Mutation("embedding", "float32 [64, 63] for type 'F32'", edit(lambda a: a.update(
            embedding=torch.zeros(VOCAB, D - 1), embedding_type="F32"))),
        Mutation("embedding", "on the meta device", apply("embedding", lambda t: t.to("meta"))),
        *type_mutations("embedding")[:1],
        Mutation("embedding_type", "'Q9_9'", apply("embedding_type", lambda _: "Q9_9")),
        Mutation("embedding_type", "'Q4_0' (the bytes are Q8_0)", apply("embedding_type", lambda _: "Q4_0"),
                 names=("embedding_type", "embedding")),
        Mutation("embedding_type", "8 (Q8_0's id)", apply("embedding_type", lambda _: 8)),
        Mutation("embedding_type", "None", apply("embedding_type", lambda _: None)),
        Mutation("final_norm", "63 values", apply("final_norm", lambda t: t[:63])),
        Mutation("final_norm", "bfloat16", apply("final_norm", lambda t: t.bfloat16())),
        Mutation("head", "n 2**32 + 64", apply("head", linear_field(2, lambda n: n + WRAP))),
        Mutation("head", "n 0", apply("head", linear_field(2, lambda n: 0))),
        Mutation("head", "k 32 (d_model 64)", apply("head", linear_field(3, lambda k: 32))),
        Mutation("head", "blocks one byte short", apply("head", linear_field(0, lambda raw: raw.reshape(-1)[:-1]))),
        Mutation("head", "4 fields", apply("head", lambda spec: spec[:4])),
        Mutation("head", "a string", apply("head", lambda _: "head")),
    ]
    return [Case("NativeDecoder.set_ends", m.label, call(m), m.names or (m.arg,)) for m in muts]


CASES = step_cases() + decoder_cases() + ends_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
