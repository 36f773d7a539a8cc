"""The native CPU decoder stack (flashlm.ops.NativeDecoder, built by flashlm.runtime.native_decoder), which the
model runner uses for llama/qwen2 models whose block linears are GGUF blocks: every serving step's logits
against the module-by-module path (Transformer.forward_paged) on the same weights and caches (mixed prefill
chunks and decodes, GQA and MQA, q/k/v biases, mixed block types), greedy generation through the engine, which
models it takes, and bad input."""

import gc

import pytest
import torch

import flashlm.ops as ops
from flashlm.models import ModelConfig, Transformer
from flashlm.ops import NativeDecoder
from flashlm.quant import GGUFEmbedding, GGUFLinear
from flashlm.runtime.engine import LLM
from flashlm.runtime.model_runner import ModelRunner
from flashlm.runtime.native_decoder import build_native_decoder
from flashlm.runtime.sampling_params import SamplingParams

VOCAB = 64
ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]


class ByteTokenizer:
    eos_token_ids = (0,)

    def encode(self, text, add_special_tokens=True):
        return [1 + (ord(c) % (VOCAB - 1)) for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i % 26) for i in ids)


def quantized_model(arch="llama", types=("Q4_0",), n_kv_head=2, d_model=256, n_head=4, seed=0, seq_len=128,
                    ends=None, sliding_window=None, vocab=VOCAB):
    """A random model whose block linears are GGUFLinear, cycling through `types`; with ends (a type name) the
    embedding table and the head are GGML blocks too (as a loaded GGUF file has them). The tokenizer's ids stay
    below VOCAB whatever `vocab` is."""
    cfg = ModelConfig(arch=arch, vocab_size=vocab, n_layer=3, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model,
                      d_ff=2 * d_model, seq_len=seq_len, tie_embeddings=False, sliding_window=sliding_window)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    quantize_blocks(model, types)
    if ends is not None:
        table = torch.nn.Linear(d_model, vocab, bias=False)
        table.weight.data.copy_(model.tok_emb.weight)
        model.tok_emb = GGUFEmbedding(GGUFLinear.from_float(table, ends).raw, ends, (vocab, d_model))
        model.lm_head = GGUFLinear.from_float(model.lm_head, ends)
    return model


def quantize_blocks(model, types):
    """Every block linear (attention's four, the MLP's three) as a GGUFLinear, cycling through `types`."""
    i = 0
    for block in model.blocks:
        for parent, names in ((block.attn, ("q", "k", "v", "o")), (block.mlp, ("gate", "up", "down"))):
            for name in names:
                setattr(parent, name, GGUFLinear.from_float(getattr(parent, name), types[i % len(types)]))
                i += 1


PROMPTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog. " * 2, "abc abc abc abc",
           "what is this?", "x" * 40]


def step_logits_both_ways(model, **engine_kw):
    """Drives the engine's scheduler; every step runs the runner's forward (the native stack), then the module
    path on the same caches (which it rewrites), and returns the number of steps. Their logits must be equal:
    both paths run the same kernels and round alike (rope as torch's addcmul, SiLU through flashlm's silu_mul).
    Equality matters beyond neatness: the GGUF matmul quantizes its input to 8 bits, so an ulp apart upstream
    can land on either side of a rounding step and move a logit by a whole quantization step."""
    llm = LLM(model, ByteTokenizer(), **engine_kw)
    assert llm.runner.native_decoder() is not None
    tok = ByteTokenizer()
    for p in PROMPTS:
        llm.add_request(tok.encode(p), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    steps = 0
    while llm.scheduler.has_work():
        batch = llm.scheduler.schedule()
        llm.runner.copy_blocks(batch.block_copies)
        tokens, paged = llm.runner.prepare(batch, llm.block_manager)
        native = llm.runner.forward(tokens, paged)
        modules = model.forward_paged(tokens, paged, llm.runner.kv_caches)
        assert native.shape == modules.shape
        assert torch.equal(native, modules), f"step {steps}: {(native - modules).abs().max().item()}"
        steps += 1
        llm.scheduler.update(batch, modules.argmax(-1).tolist())
    return steps


@pytest.mark.parametrize("arch,types,n_kv_head,ends", [
    ("llama", ("Q4_0",), 2, "Q4_0"),
    ("llama", ("Q8_0", "Q4_1", "Q5_0", "Q5_1"), 1, None),
    ("qwen2", ("Q4_K", "Q6_K", "Q5_K", "Q8_0"), 2, "Q6_K"),
    ("qwen2", ("Q4_0",), 4, None),
    ("phi3", ("Q8_0", "Q4_0"), 2, "Q4_0"),
], ids=["llama-q4_0-gqa-ends", "llama-mixed-mqa", "qwen2-kquants-ends", "qwen2-mha", "phi3-gqa-ends"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["f32-kv", "bf16-kv"])
def test_native_steps_match_the_module_path(arch, types, n_kv_head, ends, chunked, kv_dtype):
    model = quantized_model(arch, types, n_kv_head, ends=ends)
    native = build_native_decoder(model)
    # the whole step in one call: with GGUF ends the head too; with float ends, the embedding and norm only
    assert native.has_ends and native.has_head == (ends is not None)
    kw = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=16) if chunked else dict(block_size=16)
    kw["kv_cache_dtype"] = kv_dtype
    assert step_logits_both_ways(model, **kw) >= 8  # a prefill (several, chunked) and 7 decode steps at least


@pytest.mark.parametrize("isa", ISAS)
def test_native_head_dim_off_the_vector_width(isa, restore_isa):
    """head_dim 20: rope's pairs (10 per head) end in a ragged tail; on the scalar ISA every kernel is scalar."""
    ops.set_cpu_isa(isa)
    model = quantized_model("llama", ("Q8_0", "Q4_0"), n_kv_head=2, d_model=160, n_head=8, ends="Q8_0")
    assert model.cfg.head_dim == 20
    assert step_logits_both_ways(model, block_size=4, max_num_seqs=3, max_num_batched_tokens=16) >= 8


@pytest.mark.parametrize("threads", [3, 5])
def test_native_regrouped_weights_at_ragged_thread_ranges(threads):
    """Q4_0/Q8_0 decode multiplies read only a copy regrouped by 4 rows; with 3 or 5 threads the pool splits the
    320 q/k/v rows into 6 or 10 ranges, which must still fall on whole groups: every output must be the plain
    GEMV's."""
    saved = ops.num_threads()
    ops.set_num_threads(threads)
    try:
        model = quantized_model("llama", ("Q4_0", "Q8_0"), n_kv_head=2, d_model=192, n_head=6, ends="Q4_0")
        assert step_logits_both_ways(model, block_size=4, max_num_seqs=3, max_num_batched_tokens=16) >= 8
    finally:
        ops.set_num_threads(saved)


@pytest.mark.parametrize("isa", ISAS)
def test_native_regrouped_head_with_tail_rows(isa, restore_isa):
    """A vocabulary of 66: the regrouped Q4_0 head holds 16 groups of 4 rows and 2 rows after them, which the
    decoder reads from the same copy; every step's logits are still the module path's."""
    ops.set_cpu_isa(isa)
    model = quantized_model("llama", ("Q8_0", "Q4_0"), ends="Q4_0", vocab=VOCAB + 2)
    assert step_logits_both_ways(model, block_size=4, max_num_seqs=3, max_num_batched_tokens=16) >= 8


def generate_both_ways(model):
    """Greedy tokens for PROMPTS through the engine with the native stack and without; both must be equal."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 30, 5, 20, 25, 8)]
    outs = {}
    for native in (True, False):
        llm = LLM(model, ByteTokenizer(), block_size=4, max_num_seqs=3, max_num_batched_tokens=24,
                  native_decoder=native)
        assert (llm.runner.native_decoder() is not None) == native
        outs[native] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert outs[True] == outs[False]
    assert [len(t) for t in outs[True]] == [12, 30, 5, 20, 25, 8]


def test_native_greedy_generation_equals_the_module_path():
    generate_both_ways(quantized_model("llama", ("Q4_0", "Q8_0"), ends="Q8_0"))


def test_native_speculative_decoding_equals_target_greedy():
    """A GGUF target and draft both on the native path: the draft mirrors the target's tokens with no logits
    wanted (logits_rows empty) and the target scores k + 1 positions per sequence; greedy output must be the
    target's own."""
    target = quantized_model("llama", ("Q4_0", "Q8_0"), ends="Q8_0")
    draft = quantized_model("llama", ("Q8_0",), seed=1, ends="Q4_0")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 20, 7)]
    plain = LLM(target, ByteTokenizer(), block_size=4, max_num_seqs=3)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS[:3], params)]
    spec = LLM(target, ByteTokenizer(), block_size=4, max_num_seqs=3, draft_model=draft, num_speculative_tokens=3)
    got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS[:3], params)]
    assert got == want
    assert spec.runner.native_decoder() is not None and spec.spec.draft.native_decoder() is not None


def runner(model, **kw):
    return ModelRunner(model, num_blocks=8, block_size=4, **kw)


def test_which_models_take_the_native_stack():
    assert build_native_decoder(quantized_model("llama")) is not None
    assert runner(quantized_model("llama")).native_decoder() is not None
    # float weights, gpt2, a switched-off flag, caches it does not read: the module path
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=1, n_head=4, d_model=64)
    assert build_native_decoder(Transformer(cfg)) is None
    gpt2 = Transformer(ModelConfig(arch="gpt2", vocab_size=VOCAB, n_layer=1, n_head=4, d_model=64))
    gpt2.blocks[0].attn.q = GGUFLinear.from_float(gpt2.blocks[0].attn.q, "Q8_0")
    assert build_native_decoder(gpt2) is None
    # phi3, with a sliding window too (the window's steps: test_native_decoder_moe.py)
    assert build_native_decoder(quantized_model("phi3")) is not None
    assert build_native_decoder(quantized_model("phi3", sliding_window=8)) is not None
    m = quantized_model("llama")
    assert runner(m, native_decoder=False).native_decoder() is None
    assert runner(m, kv_dtype=torch.float16).native_decoder() is None
    # a float16 embedding table without GGUF ends: the layers would get float16 rows
    m = quantized_model("llama")
    m.tok_emb.half()
    assert build_native_decoder(m) is None
    # one float linear left: the module path
    m = quantized_model("llama")
    m.blocks[1].mlp.up = torch.nn.Linear(m.cfg.d_model, m.cfg.d_ff, bias=False)
    assert build_native_decoder(m) is None
    # a module replaced after the stack was built: reset_native_decoder builds it again over the model as it is
    m = quantized_model("llama")
    r = runner(m)
    first = r.native_decoder()
    assert first is not None and r.native_decoder() is first
    m.blocks[1].mlp.up = torch.nn.Linear(m.cfg.d_model, m.cfg.d_ff, bias=False)
    r.reset_native_decoder()
    assert r.native_decoder() is None
    m.blocks[1].mlp.up = GGUFLinear.from_float(m.blocks[1].mlp.up, "Q4_0")
    r.reset_native_decoder()
    second = r.native_decoder()
    assert second is not None and second is not first


def _layer_specs(model):
    return [(b.attn_norm.weight.detach(),
             *[(m.raw, m.ggml_type, m.out_features, m.in_features, m.bias)
               for m in (b.attn.q, b.attn.k, b.attn.v, b.attn.o)],
             b.mlp_norm.weight.detach(),
             *[(m.raw, m.ggml_type, m.out_features, m.in_features, m.bias) for m in (b.mlp.gate, b.mlp.up, b.mlp.down)])
            for b in model.blocks]


def test_bad_layers_name_the_tensor():
    model = quantized_model("llama")
    cfg = model.cfg
    args = (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps)
    specs = _layer_specs(model)
    NativeDecoder(*args, specs)  # as built by the model
    bad = [list(s) for s in specs]
    bad[1][3] = (bad[1][3][0], "Q4_0", cfg.n_kv_head * cfg.head_dim + 32, cfg.d_model, None)
    with pytest.raises(ValueError, match=r"layer 1 v: expected 128 x 256, got 160 x 256"):
        NativeDecoder(*args, bad)
    bad = [list(s) for s in specs]
    bad[0][2] = (bad[0][2][0][:-1], "Q4_0", cfg.n_kv_head * cfg.head_dim, cfg.d_model, None)
    with pytest.raises(ValueError, match=r"layer 0 k: weight has \d+ bytes"):
        NativeDecoder(*args, bad)
    bad = [list(s) for s in specs]
    bad[2][5] = torch.ones(cfg.d_model + 1)
    with pytest.raises(ValueError, match=r"layer 2 mlp_norm must be a contiguous \[256\]"):
        NativeDecoder(*args, bad)
    bad = [list(s) for s in specs]
    bad[0][1] = (bad[0][1][0], "F16", cfg.d_model, cfg.d_model, None)
    with pytest.raises(ValueError, match=r"layer 0 q: weight type F16"):
        NativeDecoder(*args, bad)
    bad = [list(s) for s in specs]
    bad[0][0] = None
    with pytest.raises(TypeError, match=r"layers\[0\].attn_norm: expected a tensor, got NoneType"):
        NativeDecoder(*args, bad)
    bad = [list(s) for s in specs]
    bad[0][6] = (bad[0][6][0], "Q4_0", "many", cfg.d_model, None)
    with pytest.raises(ValueError, match=r"layers\[0\].gate: n and k must be integers"):
        NativeDecoder(*args, bad)
    with pytest.raises(ValueError, match=r"n_head \(4\) must be a multiple of n_kv_head \(3\)"):
        NativeDecoder(cfg.d_model, cfg.n_head, 3, cfg.head_dim, cfg.d_ff, cfg.norm_eps, specs)
    with pytest.raises(TypeError, match="d_ff: expected an integer, got str"):
        NativeDecoder(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, "512", cfg.norm_eps, specs)
    with pytest.raises(ValueError, match="d_model: must be in"):
        NativeDecoder(2**63, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps, specs)
    with pytest.raises(TypeError, match="eps: expected a number, got NoneType"):
        NativeDecoder(*args[:5], None, specs)
    with pytest.raises(TypeError, match=r"layers\[1\]: expected a tuple"):
        NativeDecoder(*args, [specs[0], None])


def test_bad_step_names_the_argument():
    model = quantized_model("llama")
    cfg = model.cfg
    dec = build_native_decoder(model)
    caches = [torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    k, v = caches[:cfg.n_layer], caches[cfg.n_layer:]
    T = 3

    def step(x=None, positions=None, k=k, v=v, slots=None, seq_lens=None):
        x = torch.randn(T, cfg.d_model) if x is None else x
        positions = torch.arange(T) if positions is None else positions
        slots = torch.arange(T) if slots is None else slots
        seq_lens = torch.tensor([T], dtype=torch.int32) if seq_lens is None else seq_lens
        dec(x, positions, model.rope_cos, model.rope_sin, k, v, slots, torch.tensor([[0, 1]], dtype=torch.int32),
            seq_lens, torch.tensor([0, T], dtype=torch.int32), T)

    step()  # well-formed
    with pytest.raises(ValueError, match="x: expected d_model = 256 columns, got 255"):
        step(x=torch.randn(T, cfg.d_model - 1))
    with pytest.raises(ValueError, match=r"x must be a contiguous float32"):
        step(x=torch.randn(T, cfg.d_model, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"positions\[2\] = 128 is outside the rope tables' 128 rows"):
        step(positions=torch.tensor([0, 1, 128]))
    with pytest.raises(ValueError, match="positions must be a contiguous int64"):
        step(positions=torch.arange(T, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_caches and v_caches: expected 3 layers, got 2 and 3"):
        step(k=k[:2])
    with pytest.raises(ValueError, match="kv cache of layer 0 must be float32 or bfloat16, as every layer's, got F16"):
        step(k=[c.half() for c in k], v=[c.half() for c in v])
    with pytest.raises(ValueError, match="kv cache of layer 1 must be float32 or bfloat16, as every layer's, got BF16"):
        step(k=[k[0]] + [c.bfloat16() for c in k[1:]])
    with pytest.raises(ValueError, match="slot"):  # the cache kernels' own checks
        step(slots=torch.tensor([0, 1, 99]))
    with pytest.raises(ValueError, match="seq_lens"):
        step(seq_lens=torch.tensor([T + 20], dtype=torch.int32))
    # Not tensors, or not lists of them: a TypeError naming the argument (the cache lists by their element).
    with pytest.raises(TypeError, match=r"k_caches\[1\]: expected a tensor, got NoneType"):
        step(k=[k[0], None, k[2]])
    with pytest.raises(TypeError, match=r"v_caches: expected a list of tensors, got torch.Tensor"):
        step(v=v[0])
    with pytest.raises(TypeError, match="positions: expected a torch.Tensor, got list"):
        step(positions=[0, 1, 2])
    with pytest.raises(TypeError, match="positions: expected a torch.Tensor, got NoneType"):
        dec(torch.randn(T, cfg.d_model), None, model.rope_cos, model.rope_sin, k, v, torch.arange(T),
            torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([T], dtype=torch.int32),
            torch.tensor([0, T], dtype=torch.int32), T)
    with pytest.raises(ValueError, match="x: only CPU and CUDA tensors are supported, got a torch.Tensor on meta"):
        step(x=torch.randn(T, cfg.d_model, device="meta"))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        dec(torch.randn(T, cfg.d_model), torch.arange(T), model.rope_cos, model.rope_sin, k, v, torch.arange(T),
            torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([T], dtype=torch.int32),
            torch.tensor([0, T], dtype=torch.int32), 2**63)


def test_bad_ends_and_step_tokens_name_the_argument():
    model = quantized_model("llama", ends="Q4_0")
    cfg = model.cfg
    dec = build_native_decoder(model)
    head = (model.lm_head.raw, "Q4_0", VOCAB, cfg.d_model, None)
    with pytest.raises(ValueError, match=r"embedding: 64 rows of 256 Q4_0 values take 9216 bytes, the table has 9152"):
        dec.set_ends(model.tok_emb.raw[:, :-1].contiguous(), "Q4_0", model.final_norm.weight.detach(), head)
    with pytest.raises(ValueError, match="final_norm must be a contiguous \\[256\\]"):
        dec.set_ends(model.tok_emb.raw, "Q4_0", torch.ones(3), head)
    with pytest.raises(ValueError, match="embedding_type: unknown type 'Q9_9'"):
        dec.set_ends(model.tok_emb.raw, "Q9_9", model.final_norm.weight.detach(), head)
    with pytest.raises(ValueError, match=r"embedding: expected F32 \[64, 256\], got F32 \[64, 255\]"):
        dec.set_ends(torch.zeros(VOCAB, cfg.d_model - 1), "F32", model.final_norm.weight.detach(), None)
    caches = [torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    k, v = caches[:cfg.n_layer], caches[cfg.n_layer:]

    def step(tokens, rows):
        T = tokens.shape[0]
        return dec.logits(tokens, torch.arange(T), model.rope_cos, model.rope_sin, k, v, torch.arange(T),
                          torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([T], dtype=torch.int32),
                          torch.tensor([0, T], dtype=torch.int32), T, rows)

    assert step(torch.tensor([1, 2, 3]), torch.tensor([2])).shape == (1, VOCAB)
    with pytest.raises(ValueError, match=r"tokens\[1\] = 64 is outside the vocabulary \[0, 64\)"):
        step(torch.tensor([1, 64, 3]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"logits_rows\[0\] = 3 is not a row of the 3 tokens"):
        step(torch.tensor([1, 2, 3]), torch.tensor([3]))
    with pytest.raises(ValueError, match="tokens must be a contiguous int64"):
        step(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([2]))
    with pytest.raises(TypeError, match="embedding: expected a torch.Tensor, got NoneType"):
        dec.set_ends(None, "Q4_0", model.final_norm.weight.detach(), head)

    def three_tokens(tokens=torch.tensor([1, 2, 3]), cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)):
        return dec.logits(tokens, torch.arange(3), model.rope_cos, model.rope_sin, k, v, torch.arange(3),
                          torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                          cu_seqlens_q, 3, torch.tensor([1]))

    with pytest.raises(TypeError, match="tokens: expected a torch.Tensor, got NoneType"):
        three_tokens(tokens=None)
    # Every token is a query of some sequence: one left out would be attended as if it saw no key.
    with pytest.raises(ValueError, match="cu_seqlens_q: must run from 0 to the 3 tokens, got 0 to 2"):
        three_tokens(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32))


def test_set_ends_again_replaces_the_ends():
    # A second set_ends takes over from the first: its tables are kept alive by the decoder (the caller's
    # references dropped here), the previous ones let go, and the logits are the same for the same values.
    model = quantized_model("llama", ends="Q4_0")
    cfg = model.cfg
    dec = build_native_decoder(model)
    caches = [torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    tokens = torch.tensor([5, 17, 3])

    def step():
        for c in caches:
            c.zero_()
        return dec.logits(tokens, torch.arange(3), model.rope_cos, model.rope_sin, caches[:cfg.n_layer],
                          caches[cfg.n_layer:], torch.arange(3), torch.tensor([[0, 1]], dtype=torch.int32),
                          torch.tensor([3], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 3,
                          torch.tensor([0, 2]))

    before = step()
    emb, norm, raw = model.tok_emb.raw.clone(), model.final_norm.weight.detach().clone(), model.lm_head.raw.clone()
    dec.set_ends(emb, "Q4_0", norm, (raw, "Q4_0", VOCAB, cfg.d_model, None))
    del emb, norm, raw
    gc.collect()
    assert torch.equal(step(), before)
    dec.set_ends(model.tok_emb.raw, "Q4_0", model.final_norm.weight.detach(), None)  # no head: the normed rows
    normed = step()
    assert normed.shape == (2, cfg.d_model) and not dec.has_head
    assert torch.equal(model.lm_head(normed), before)  # the same GGUF head kernel, in the module


@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_the_cache_reaches_only_the_queries_that_read_it(isa, restore_isa):
    # Slots a step does not read (past seq_lens, blocks it does not own) may hold anything, NaN included: the
    # logits are those of a zeroed cache. A NaN in the context a query reads makes its logits NaN, as softmax
    # attention does (csrc/attention/shared_softmax.h).
    ops.set_cpu_isa(isa)
    model = quantized_model("llama", ends="Q4_0")
    cfg = model.cfg
    dec = build_native_decoder(model)

    def step(caches, tokens, start):
        T = tokens.shape[0]
        return dec.logits(tokens, torch.arange(start, start + T), model.rope_cos, model.rope_sin, caches[:cfg.n_layer],
                          caches[cfg.n_layer:], torch.arange(start, start + T), torch.tensor([[0, 1]], dtype=torch.int32),
                          torch.tensor([start + T], dtype=torch.int32), torch.tensor([0, T], dtype=torch.int32), T,
                          torch.arange(T))

    zeroed = [torch.zeros(2, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    poisoned = [torch.full_like(c, float("nan")) for c in zeroed]
    prompt = torch.tensor([5, 17, 3])
    clean = step(zeroed, prompt, 0)
    assert torch.isfinite(clean).all()
    assert torch.equal(step(poisoned, prompt, 0), clean), "slots 3 .. 7 are never read"
    # A decode step at position 3 reads slots 0 .. 3 (the prompt's, written above); with a NaN in the key of slot 1
    # of layer 0 its logits are NaN.
    decode = step(zeroed, torch.tensor([9]), 3)
    assert torch.isfinite(decode).all()
    zeroed[0][0, 1, 0, 0] = float("nan")
    assert torch.isnan(step(zeroed, torch.tensor([9]), 3)).all()
