"""The native CPU decoder stack (flashlm.ops.NativeDecoder) on the architectures past llama's block: the
mixture-of-experts layers of mixtral, qwen2_moe (its shared expert and sigmoid gate) and qwen3_moe, qwen3's
per-head q/k norms, and mistral's sliding window. Every serving step's logits against the module-by-module path
(Transformer.forward_paged) on the same weights and caches, as tests/test_native_decoder.py checks llama's:
models built in memory (GGML-block experts and float ones, float and GGUF routers) and GGUF files written by
export_gguf and read back by load_gguf; one sequence and several, whole and chunked prefills, then decodes."""

import pytest
import torch
from test_native_decoder import generate_both_ways, step_logits_both_ways

import flashlm.ops as ops
from flashlm.models import ModelConfig, Transformer
from flashlm.models.moe import MoEMLP
from flashlm.ops import NativeDecoder
from flashlm.quant import GGUFEmbedding, GGUFLinear
from flashlm.quant.gguf_experts import GGUFExperts
from flashlm.runtime.native_decoder import build_native_decoder

VOCAB = 64
ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EXTRA = {"qwen2_moe": dict(norm_topk_prob=False), "qwen3_moe": dict(head_dim=48), "qwen3": dict(head_dim=48)}


def make_model(arch, types=("Q8_0", "Q4_0"), expert_type="Q4_0", n_expert=4, top_k=2, sliding_window=None,
               gguf_router=None, seed=0, seq_len=128, wide=False, vocab=VOCAB):
    """A random model with GGUFLinear block linears (cycling through `types`), GGML-block ends, and for the MoE
    architectures experts in `expert_type` blocks (None: float32 tensors) and a float32 router (as a GGUF file's
    F32 ffn_gate_inp loads) or one in `gguf_router` blocks. wide: every width 256 or more, whole K-quant
    blocks."""
    moe = arch in ("mixtral", "qwen2_moe", "qwen3_moe")
    d = 256 if wide else 128
    # mixtral's experts are d_ff wide (llama.cpp's layout)
    extra = dict(n_expert=n_expert, n_expert_used=top_k, moe_d_ff=None if arch == "mixtral" else 256 if wide else 64)
    extra = extra if moe else {}
    if arch == "qwen2_moe":
        extra["shared_expert_d_ff"] = 256 if wide else 96
    cfg = ModelConfig(arch=arch, vocab_size=vocab, n_layer=3, n_head=4, n_kv_head=2, d_model=d, d_ff=2 * d,
                      seq_len=seq_len, tie_embeddings=False, sliding_window=sliding_window,
                      **extra, **EXTRA.get(arch, {}))
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "experts" in name or "shared" in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.mul_(4.0)
    i = 0
    for block in model.blocks:
        mlp = block.mlp
        dense = mlp.shared if isinstance(mlp, MoEMLP) else mlp
        for parent, names in ((block.attn, ("q", "k", "v", "o")), (dense, ("gate", "up", "down"))):
            for name in names if parent is not None else ():
                setattr(parent, name, GGUFLinear.from_float(getattr(parent, name), types[i % len(types)]))
                i += 1
        if isinstance(mlp, MoEMLP):
            if expert_type is not None:
                mlp.set_experts(*(GGUFExperts.from_float(w.detach(), expert_type)
                                  for w in (mlp.experts_gate, mlp.experts_up, mlp.experts_down)))
            if gguf_router is not None:
                mlp.router = GGUFLinear.from_float(mlp.router, gguf_router)
    table = torch.nn.Linear(cfg.d_model, vocab, bias=False)
    table.weight.data.copy_(model.tok_emb.weight)
    model.tok_emb = GGUFEmbedding(GGUFLinear.from_float(table, "Q8_0").raw, "Q8_0", (vocab, cfg.d_model))
    model.lm_head = GGUFLinear.from_float(model.lm_head, "Q8_0")
    return model


ENGINES = {"batched": dict(block_size=16), "chunked": dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=16),
           "one-seq": dict(block_size=4, max_num_seqs=1)}


@pytest.mark.parametrize("arch,top_k,expert_type,gguf_router", [
    ("mixtral", 2, "Q4_0", None),
    ("mixtral", 1, "Q8_0", "Q8_0"),
    ("qwen2_moe", 2, "Q4_K", None),
    ("qwen3_moe", 2, "Q8_0", None),
    ("qwen3_moe", 1, None, None),
], ids=["mixtral-top2-q4_0", "mixtral-top1-gguf-router", "qwen2_moe-shared-q4_k", "qwen3_moe-qk-norm",
        "qwen3_moe-float-experts"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_native_moe_steps_match_the_module_path(arch, top_k, expert_type, gguf_router, engine):
    types = ("Q4_K", "Q6_K") if expert_type == "Q4_K" else ("Q8_0", "Q4_0")
    model = make_model(arch, types, expert_type, top_k=top_k, gguf_router=gguf_router, wide=expert_type == "Q4_K")
    assert build_native_decoder(model) is not None
    assert step_logits_both_ways(model, **ENGINES[engine]) >= 8


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["f32-kv", "bf16-kv"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2_moe"])
def test_native_kv_dtypes_match_the_module_path(arch, kv_dtype):
    model = make_model(arch)
    assert step_logits_both_ways(model, kv_cache_dtype=kv_dtype, **ENGINES["chunked"]) >= 8


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral"])
@pytest.mark.parametrize("engine", ["chunked", "one-seq"])
def test_native_sliding_window_matches_the_module_path(arch, engine):
    """A window of 6 keys, shorter than most prompts (up to 90 tokens) and than a chunk: the cache frees blocks
    wholly outside every sequence's window, which the queries never read."""
    model = make_model(arch, sliding_window=6)
    assert model.cfg.kv_window == 6
    assert build_native_decoder(model) is not None
    assert step_logits_both_ways(model, **ENGINES[engine]) >= 8


@pytest.mark.parametrize("isa", ISAS)
def test_native_moe_on_each_isa(isa, restore_isa):
    ops.set_cpu_isa(isa)
    model = make_model("qwen2_moe", ("Q8_0", "Q4_0"), "Q4_0", sliding_window=None)
    assert step_logits_both_ways(model, **ENGINES["chunked"]) >= 8


@pytest.mark.parametrize("arch,qtype,window", [("mixtral", "Q4_0", None), ("qwen2_moe", "Q8_0", None),
                                               ("qwen3_moe", "Q8_0", None), ("llama", "Q4_0", 8)],
                         ids=["mixtral", "qwen2_moe", "qwen3_moe", "mistral"])
def test_native_gguf_files_match_the_module_path(tmp_path, arch, qtype, window):
    """export_gguf's file read back by load_gguf (a float32 router, GGML-block experts and linears, the
    window from the file's metadata): the stack takes it and every step's logits are the module path's."""
    from tokenizer_sources import train_bpe

    from flashlm.io import load_gguf
    from flashlm.train.export import export_gguf

    model = make_model(arch, sliding_window=window, vocab=320)  # the 300 ids of the file's tokenizer
    model = Transformer(model.cfg).eval()  # float weights, re-drawn: export quantizes them itself
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "shared" in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    path = tmp_path / "m.gguf"
    export_gguf(model, model.cfg, train_bpe("gpt-2", vocab_size=300).to_str(), path, type=qtype)
    loaded = load_gguf(path).model
    assert loaded.cfg.arch == arch and loaded.cfg.sliding_window == window
    if arch != "llama":
        assert isinstance(loaded.blocks[0].mlp.experts_gate, GGUFExperts)
        assert type(loaded.blocks[0].mlp.router) is torch.nn.Linear
    assert build_native_decoder(loaded) is not None
    assert step_logits_both_ways(loaded, **ENGINES["chunked"]) >= 8
    assert step_logits_both_ways(loaded, **ENGINES["one-seq"]) >= 8


def test_which_new_models_take_the_native_stack():
    for arch in ("qwen3", "mixtral", "qwen2_moe", "qwen3_moe"):
        assert build_native_decoder(make_model(arch)) is not None, arch
    # gemma's block (post-norms, GeGLU, soft-capped scores, scaled embeddings): the stack's too (its steps:
    # test_native_decoder_gemma.py)
    cfg = ModelConfig(arch="gemma2", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=128, d_ff=256,
                      sliding_window=8, seq_len=64)
    gemma = Transformer(cfg).eval()
    for block in gemma.blocks:
        for parent, names in ((block.attn, ("q", "k", "v", "o")), (block.mlp, ("gate", "up", "down"))):
            for name in names:
                setattr(parent, name, GGUFLinear.from_float(getattr(parent, name), "Q8_0"))
    assert build_native_decoder(gemma) is not None
    # experts or a router the stack does not read: float16 experts, a float16 router, a router with a bias
    m = make_model("mixtral", expert_type=None)
    m.blocks[1].mlp.set_experts(*(w.detach().half() for w in (m.blocks[1].mlp.experts_gate,
                                                              m.blocks[1].mlp.experts_up,
                                                              m.blocks[1].mlp.experts_down)))
    assert build_native_decoder(m) is None
    m = make_model("mixtral")
    m.blocks[0].mlp.router.half()
    assert build_native_decoder(m) is None
    m = make_model("qwen2_moe")
    m.blocks[2].mlp.shared_gate.bias = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    assert build_native_decoder(m) is None
    m = make_model("qwen2_moe")
    m.blocks[2].mlp.shared.up = torch.nn.Linear(m.cfg.d_model, 96, bias=False)
    assert build_native_decoder(m) is None


def _specs(model):
    """The layer specs build_native_decoder passes, as lists to spoil."""
    def lin(m):
        return None if m is None else (m.raw, m.ggml_type, m.out_features, m.in_features, m.bias)

    def experts(w):
        return (w.raw, w.ggml_type, *w.shape)

    out = []
    for b in model.blocks:
        mlp = b.mlp
        shared = mlp.shared
        moe = [mlp.router.weight.detach(), mlp.top_k, bool(mlp.renormalize), experts(mlp.experts_gate),
               experts(mlp.experts_up), experts(mlp.experts_down),
               None if shared is None else mlp.shared_gate.weight.detach().reshape(-1)]
        out.append([b.attn_norm.weight.detach(), lin(b.attn.q), lin(b.attn.k), lin(b.attn.v), lin(b.attn.o),
                    b.mlp_norm.weight.detach(), *(lin(getattr(shared, n)) if shared else None
                                                  for n in ("gate", "up", "down")),
                    b.attn.q_norm.weight.detach() if b.attn.q_norm is not None else None,
                    b.attn.k_norm.weight.detach() if b.attn.k_norm is not None else None, 0, moe])
    return out


def _build(model, specs):
    cfg = model.cfg
    layers = [tuple(tuple(p) if isinstance(p, list) else p for p in s) for s in specs]
    return NativeDecoder(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps, layers)


def test_bad_moe_layers_name_the_tensor():
    model = make_model("qwen2_moe")
    _build(model, _specs(model))  # as the model has them

    def spoilt(layer, item, value, moe_item=None):
        specs = _specs(model)
        if moe_item is None:
            specs[layer][item] = value
        else:
            specs[layer][12][moe_item] = value
        return specs

    cases = [
        (spoilt(1, 12, 0, moe_item=1), ValueError, r"layers\[1\].moe.top_k: must be an integer >= 1"),
        (spoilt(1, 12, 5, moe_item=1), ValueError, r"layer 1 top_k: must be in \[1, 4\]"),
        (spoilt(0, 12, torch.ones(5, 128), moe_item=0), ValueError, r"layer 0 router: expected .* float32 \[4, 128\]"),
        (spoilt(0, 12, "yes", moe_item=2), ValueError, r"layers\[0\].moe.renormalize: must be a bool"),
        (spoilt(2, 12, torch.ones(127), moe_item=6), ValueError, r"layer 2 shared_gate must be a contiguous \[128\]"),
        (spoilt(0, 11, -1), ValueError, r"layer 0 window: must be >= 0"),
        (spoilt(0, 9, torch.ones(48)), ValueError, r"layer 0 q_norm, k_norm: both or neither"),
        (spoilt(0, 6, None), ValueError, r"layer 0 gate: the shared expert must have at least one row"),
        (spoilt(0, 12, (1, 2)), ValueError, r"layers\[0\].moe: expected 7 items"),
    ]
    g = _specs(model)[0][12][3]
    cases.append((spoilt(0, 12, (g[0][:, :-1].contiguous(), *g[1:]), moe_item=3), ValueError, r"layer 0 experts: .*gate has \d+ bytes"))
    cases.append((spoilt(0, 12, (g[0], "Q4_0", 4, 64, 100), moe_item=4), ValueError, r"layer 0 experts: .*up"))
    cases.append((spoilt(0, 12, (g[0], "BOGUS", 4, 64, 128), moe_item=5), ValueError,
                  r"layers\[0\].moe.down: type: unknown type 'BOGUS'"))
    for specs, error, match in cases:
        with pytest.raises(error, match=match):
            _build(model, specs)
    # a MoE layer without a shared expert must have no MLP either
    specs = _specs(model)
    specs[0][12][6] = None
    with pytest.raises(ValueError, match=r"layer 0 gate, up, down: a mixture-of-experts layer without a shared"):
        _build(model, specs)


def test_native_engine_generation_equals_the_module_path():
    """Greedy generation through the engine, native stack on and off: the same tokens."""
    generate_both_ways(make_model("mixtral", sliding_window=10))
