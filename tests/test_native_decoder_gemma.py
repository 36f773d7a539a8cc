"""The native CPU decoder stack (flashlm.ops.NativeDecoder) on gemma2 and gemma3: embeddings scaled by
sqrt(d_model), post-norms around attention and the MLP, GeGLU, scores scaled by query_pre_attn_scalar and
soft-capped (gemma2), final logits soft-capped, alternating sliding-window and global layers, and gemma3's q/k
norms and local rope tables. Every serving step's logits against the module-by-module path
(Transformer.forward_paged) on the same weights and caches, as tests/test_native_decoder.py checks llama's:
models built in memory and GGUF files written by export_gguf and read back by load_gguf; one sequence and
several, whole and chunked prefills longer than the window, then decodes."""

import pytest
import torch
from test_native_decoder import ByteTokenizer, generate_both_ways, quantize_blocks, step_logits_both_ways

import flashlm.ops as ops
from flashlm.models import ModelConfig, Transformer
from flashlm.ops import NativeDecoder
from flashlm.quant import GGUFEmbedding, GGUFLinear
from flashlm.runtime.engine import LLM
from flashlm.runtime.native_decoder import build_native_decoder

VOCAB = 64
ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
# gemma2: its own score scale (32^-1/2, not head_dim's), both soft-caps, every other layer local;
# gemma3: q/k norms, five local layers to one global, the local layers' rope base, a final cap only
CONFIGS = {"gemma2": dict(arch="gemma2", n_layer=3, head_dim=32, query_pre_attn_scalar=48, attn_softcap=4.0,
                          final_softcap=5.0),
           "gemma3": dict(arch="gemma3", n_layer=6, head_dim=48, query_pre_attn_scalar=48, rope_local_theta=100.0,
                          final_softcap=5.0)}
ENGINES = {"batched": dict(block_size=16), "chunked": dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=16),
           "one-seq": dict(block_size=4, max_num_seqs=1)}


def gemma_config(arch, window=6, vocab=VOCAB, **kw):
    d = kw.pop("d_model", 128)
    return ModelConfig(vocab_size=vocab, n_head=4, n_kv_head=2, d_model=d, d_ff=2 * d, seq_len=128,
                       sliding_window=window, **{**CONFIGS[arch], **kw})


def randomize(model):
    """Weights large enough that the soft-caps bite and the norms' weights matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.mul_(4.0)


def make_model(arch, types=("Q8_0", "Q4_0"), seed=0, **kw):
    """A random gemma with GGUFLinear block linears (cycling through `types`) and GGML-block ends (Q8_0)."""
    cfg = gemma_config(arch, tie_embeddings=False, **kw)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomize(model)
    quantize_blocks(model, types)
    table = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    table.weight.data.copy_(model.tok_emb.weight)
    model.tok_emb = GGUFEmbedding(GGUFLinear.from_float(table, "Q8_0").raw, "Q8_0", (cfg.vocab_size, cfg.d_model))
    model.lm_head = GGUFLinear.from_float(model.lm_head, "Q8_0")
    return model


def test_the_models_are_gemma_shaped():
    """What the steps below exercise is there: local and global layers, both scales, both rope tables."""
    g2, g3 = make_model("gemma2"), make_model("gemma3")
    assert [b.attn.window for b in g2.blocks] == [6, None, 6]
    assert [b.attn.window for b in g3.blocks] == [6] * 5 + [None]
    assert g2.blocks[0].attn.scale == 48 ** -0.5 != g2.cfg.head_dim ** -0.5 and g2.blocks[0].attn.softcap == 4.0
    assert g3.blocks[0].attn.q_norm is not None and g3.blocks[0].attn.softcap is None
    assert not torch.equal(g3.rope_local_cos, g3.rope_cos)
    for model in (g2, g3):
        assert model.blocks[0].post_attn_norm is not None and model.blocks[0].mlp.gelu
        native = build_native_decoder(model)
        assert native is not None and native.has_ends and native.has_head


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_native_gemma_steps_match_the_module_path(arch, engine):
    """A window of 6 keys, shorter than most prompts (up to 90 tokens) and than a chunk."""
    assert step_logits_both_ways(make_model(arch), **ENGINES[engine]) >= 8


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["f32-kv", "bf16-kv"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_native_gemma_kv_dtypes_match_the_module_path(arch, kv_dtype):
    model = make_model(arch, ("Q4_0", "Q8_0"))
    assert step_logits_both_ways(model, kv_cache_dtype=kv_dtype, **ENGINES["chunked"]) >= 8


@pytest.mark.parametrize("isa", ISAS)
def test_native_gemma_on_each_isa(isa, restore_isa):
    """On the scalar ISA every kernel is scalar, the gelu one included."""
    ops.set_cpu_isa(isa)
    assert step_logits_both_ways(make_model("gemma3"), **ENGINES["chunked"]) >= 8
    assert step_logits_both_ways(make_model("gemma2", ("Q4_K", "Q6_K"), d_model=256, head_dim=64), **ENGINES["batched"]) >= 8


def test_native_gemma_without_caps_or_window():
    """gemma3 as Gemma 3 ships it (no caps at all) and a gemma2 whose window covers every prompt."""
    assert step_logits_both_ways(make_model("gemma3", final_softcap=None), **ENGINES["batched"]) >= 8
    assert step_logits_both_ways(make_model("gemma2", window=None), **ENGINES["chunked"]) >= 8


def test_native_gemma_layers_without_ends():
    """A float32 embedding table and head: the stack runs the layers, Python the scaled lookup and the capped
    head (as the module path)."""
    model = make_model("gemma2")
    cfg = model.cfg
    emb = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
    emb.weight.data.copy_(model.tok_emb(torch.arange(cfg.vocab_size)))
    model.tok_emb = emb
    model.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    native = build_native_decoder(model)
    assert native is not None and native.has_ends and not native.has_head
    assert step_logits_both_ways(model, **ENGINES["chunked"]) >= 8


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_native_gemma_generation_equals_the_module_path(arch):
    generate_both_ways(make_model(arch))


def exported(tmp_path, arch, qtype):
    """export_gguf's file of a random float gemma (tied, as llama.cpp's gemma), read back by load_gguf."""
    from tokenizer_sources import train_bpe

    from flashlm.io import load_gguf
    from flashlm.train.export import export_gguf

    # the 300 ids of the file's tokenizer; scores scaled by head_dim^-1/2, as llama.cpp's small gemmas
    cfg = gemma_config(arch, vocab=320, tie_embeddings=True, query_pre_attn_scalar=CONFIGS[arch]["head_dim"],
                       **({"final_softcap": None} if arch == "gemma3" else {}))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize(model)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    export_gguf(model, cfg, train_bpe("gpt-2", vocab_size=300).to_str(), path, type=qtype)
    return load_gguf(path).model


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_native_gemma_gguf_files_match_the_module_path(tmp_path, arch, qtype):
    """The file's (1 + w) norm weights, tied head over the embedding's blocks and the window from its metadata:
    the stack takes the whole step and every step's logits are the module path's."""
    loaded = exported(tmp_path, arch, qtype)
    assert loaded.cfg.arch == arch and loaded.cfg.sliding_window == 6
    native = build_native_decoder(loaded)
    assert native is not None and native.has_head
    assert step_logits_both_ways(loaded, **ENGINES["chunked"]) >= 8
    assert step_logits_both_ways(loaded, **ENGINES["one-seq"]) >= 8


def test_f32_gemma_files_stay_on_the_module_path(tmp_path):
    """An F32 file's linears load as float nn.Linear, which the stack does not read (as for llama): the runner
    runs those models module by module."""
    loaded = exported(tmp_path, "gemma2", "F32")
    assert build_native_decoder(loaded) is None
    assert LLM(loaded, ByteTokenizer(), block_size=4).runner.native_decoder() is None


def test_which_gemma_models_take_the_native_stack():
    # float weights: the module path
    assert build_native_decoder(Transformer(gemma_config("gemma2")).eval()) is None
    # one float linear left, or a post-norm the stack does not read (float16)
    m = make_model("gemma3")
    m.blocks[5].mlp.down = torch.nn.Linear(m.cfg.d_ff, m.cfg.d_model, bias=False)
    assert build_native_decoder(m) is None
    m = make_model("gemma2")
    m.blocks[1].post_mlp_norm.half()
    assert build_native_decoder(m) is None
    # a layer with another score cap than the others' (the stack's is the model's)
    m = make_model("gemma2")
    m.blocks[2].attn.softcap = 7.0
    assert build_native_decoder(m) is None


def _specs(model):
    """The layer specs build_native_decoder passes, as lists to spoil."""
    def lin(m):
        return (m.raw, m.ggml_type, m.out_features, m.in_features, m.bias)

    cfg = model.cfg
    out = []
    for i, b in enumerate(model.blocks):
        qk = [b.attn.q_norm.weight.detach(), b.attn.k_norm.weight.detach()] if b.attn.q_norm is not None else [None] * 2
        out.append([b.attn_norm.weight.detach(), *(lin(getattr(b.attn, n)) for n in "qkvo"),
                    b.mlp_norm.weight.detach(), *(lin(getattr(b.mlp, n)) for n in ("gate", "up", "down")), *qk,
                    b.attn.window or 0, None, b.post_attn_norm.weight.detach(), b.post_mlp_norm.weight.detach(),
                    cfg.rope_local_theta is not None and cfg.local_layer(i)])
    return out


def _build(model, specs, **kw):
    cfg = model.cfg
    layers = [tuple(s) for s in specs]
    args = dict(softmax_scale=cfg.softmax_scale, attn_softcap=cfg.attn_softcap, embedding_scale=cfg.d_model ** 0.5,
                gelu=True)
    return NativeDecoder(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps, layers,
                         **{**args, **kw})


def test_bad_gemma_layers_name_the_tensor():
    model = make_model("gemma3")
    _build(model, _specs(model))  # as the model has them

    def spoilt(layer, item, value):
        specs = _specs(model)
        specs[layer][item] = value
        return specs

    cases = [
        (spoilt(1, 13, torch.ones(127)), ValueError, r"layer 1 post_attn_norm must be a contiguous \[128\]"),
        (spoilt(2, 14, torch.ones(128, dtype=torch.float64)), ValueError, r"layer 2 post_mlp_norm must be float32"),
        (spoilt(0, 14, None), ValueError, r"layer 0 post_attn_norm, post_mlp_norm: both or neither"),
        (spoilt(3, 15, 1), ValueError, r"layers\[3\].local_rope: must be a bool"),
        (spoilt(0, 13, "norm"), TypeError, r"layers\[0\].post_attn_norm"),
    ]
    for specs, error, match in cases:
        with pytest.raises(error, match=match):
            _build(model, specs)
    specs = _specs(model)
    specs[0] = specs[0][:14]
    with pytest.raises(ValueError, match=r"layers\[0\]: expected 9 items .* or 16 .* got 14"):
        _build(model, specs)
    for name, value, error, match in [
            ("softmax_scale", -1.0, ValueError, "decoder config: softmax_scale must be finite and >= 0"),
            ("attn_softcap", float("nan"), ValueError, "decoder config: attn_softcap must be finite and >= 0"),
            ("embedding_scale", float("inf"), ValueError, "decoder config: embedding_scale must be finite"),
            ("embedding_scale", "11.3", TypeError, "embedding_scale: expected a number, got str"),
            ("gelu", 1, TypeError, "gelu: expected a bool, got int")]:
        with pytest.raises(error, match=match):
            _build(model, _specs(model), **{name: value})


def test_bad_gemma_step_names_the_argument():
    """A stack with local layers needs the local tables, of the global tables' rows at least."""
    model = make_model("gemma3")
    cfg = model.cfg
    dec = build_native_decoder(model)
    caches = [torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]

    def step(rope_local):
        return dec.logits(torch.tensor([1, 2, 3]), torch.arange(3), model.rope_cos, model.rope_sin,
                          caches[:cfg.n_layer], caches[cfg.n_layer:], torch.arange(3),
                          torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                          torch.tensor([0, 3], dtype=torch.int32), 3, torch.tensor([2]), rope_local=rope_local)

    local = (model.rope_local_cos, model.rope_local_sin)
    assert step(local).shape == (1, VOCAB)
    with pytest.raises(ValueError, match=r"rope_local_cos must be a contiguous float32 \[positions, head_dim = 48\]"):
        step(None)
    with pytest.raises(ValueError, match="rope_local_sin must have rope_local_cos's rows"):
        step((local[0], local[1][:-1]))
    with pytest.raises(ValueError, match="rope_local_cos: expected at least rope_cos's 128 rows, got 64"):
        step((local[0][:64], local[1][:64]))
    with pytest.raises(ValueError, match=r"rope_local_cos must be a contiguous float32"):
        step((local[0][:, :24].contiguous(), local[1][:, :24].contiguous()))
    with pytest.raises(TypeError, match="rope_local: expected a \\(cos, sin\\) pair"):
        step(local[0])
    with pytest.raises(TypeError, match="rope_local_sin: expected a torch.Tensor, got NoneType"):
        step((local[0], None))
