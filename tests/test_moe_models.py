"""The mixture-of-experts models: mixtral, qwen2_moe and qwen3_moe.

References: transformers' MixtralForCausalLM, Qwen2MoeForCausalLM and Qwen3MoeForCausalLM (random weights) for
logits after a prefill and after paged decode steps, with one and two experts per token; for the routing and expert ops
(flashlm.ops.moe, which the models run), the float64 loop over tokens and their experts of tests/reference.py; transformers' load_balancing_loss_func and a hand computation
for the auxiliary losses; llama.cpp (llama-cpp-python) for GGUF files `flashlm convert` writes (F32, Q8_0, Q4_K).
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compare import assert_close  # noqa: E402
from test_runtime_parity import _NoText, engine_trace  # noqa: E402

from flashlm.io import load_hf  # noqa: E402
from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.ops.moe import expert_ffn, route  # noqa: E402
from flashlm.runtime.engine import LLM  # noqa: E402
from flashlm.runtime.sampling_params import SamplingParams  # noqa: E402
from reference import moe_expert_ffn, moe_route  # noqa: E402

V = 320  # (above the 300 tokens of the byte-level BPE the GGUF tests write)
KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def make_moe_hf(kind: str, top_k: int, n_expert: int = 4, wide: bool = False):
    """A tiny random transformers MoE model (eval mode): GQA 4:2, two layers, untied. The routers' inputs are
    dominated by the token embeddings (scaled up), which every runtime reads alike, so that the rounding of the
    attention's matmuls (Q8_0 in llama.cpp and flashlm, each in its own order) rarely flips a top-k choice.
    wide: Mixtral with d_model and experts 256 wide, rows that hold whole K-quant blocks."""
    torch.manual_seed({"mixtral": 21, "qwen2_moe": 22, "qwen3_moe": 23}[kind] + 10 * top_k)
    common = dict(vocab_size=V, hidden_size=256 if wide else 64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=top_k,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        m = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, intermediate_size=256 if wide else 64,
                                                                       num_local_experts=n_expert))
    elif kind == "qwen2_moe":  # a shared expert; norm_topk_prob False (Qwen1.5-MoE's, and llama.cpp's qwen2moe)
        m = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=96,
            num_experts=n_expert, norm_topk_prob=False))
    else:  # a head_dim of its own (q is 96 wide); norm_topk_prob True (Qwen3-MoE's)
        m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, intermediate_size=80, moe_intermediate_size=32, num_experts=n_expert, head_dim=24,
            norm_topk_prob=True))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):  # HF initialises norms to one: make them count
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("self_attn.q_proj.bias") or name.endswith("k_proj.bias") or name.endswith("v_proj.bias"):
                p.normal_(0, 0.3)
            elif "experts" in name or "shared_expert" in name:
                p.normal_(0, 0.1)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)
        m.model.embed_tokens.weight.mul_(8.0)
        m.lm_head.weight.mul_(4.0)  # sharper distributions: greedy choices with clear margins
    m.eval()
    return m


def _prompt(seed: int, n: int = 19):
    return [int(t) for t in np.random.default_rng(seed).integers(0, V, n)]


# ------------------------------------------------------------------------------------------------ routing ops


@pytest.mark.parametrize("softmax_first, renormalize", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("E, k", [(4, 1), (8, 2), (64, 6)])
def test_route_matches_a_per_token_reference(E, k, softmax_first, renormalize):
    logits = torch.randn(37, E, generator=torch.Generator().manual_seed(E + k))
    logits[3, :] = 0.5  # a row of ties: the lower expert index first
    logits[5, 1] = logits[5, 2] = 4.0
    weights, experts = route(logits, k, softmax_first=softmax_first, renormalize=renormalize)
    ref_w, ref_e = moe_route(logits, k, softmax_first, renormalize)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int32
    assert torch.equal(experts.long(), ref_e)
    assert_close(weights, ref_w.float(), atol=1e-6, name="routing weights")
    with pytest.raises(ValueError, match="router_logits: torch.float64"):  # the kernels take float32 and bfloat16
        route(logits.double(), k, softmax_first=softmax_first, renormalize=renormalize)


@pytest.mark.parametrize("E, k, T", [(4, 2, 1), (8, 2, 5), (16, 1, 40), (64, 4, 9)])
def test_expert_ffn_matches_a_per_token_loop(E, k, T):
    g = torch.Generator().manual_seed(E * T + k)
    D, Fd = 24, 40
    x = torch.randn(T, D, generator=g)
    gate, up = torch.randn(E, Fd, D, generator=g), torch.randn(E, Fd, D, generator=g)
    down = torch.randn(E, D, Fd, generator=g)
    weights, experts = route(torch.randn(T, E, generator=g), k)
    ref = moe_expert_ffn(x, weights, experts, gate, up, down)
    out = expert_ffn(x, weights, experts, gate, up, down)
    assert out.dtype == torch.float32
    assert_close(out, ref, atol=1e-3, rtol=1e-4, name="float32 expert ffn vs float64")


def test_expert_ffn_is_differentiable_in_x_and_the_weights():
    """The gradients of route + expert_ffn (float32, the models' training path) in x, the router logits and
    every expert matrix against float64 autograd through the reference loop, for the same expert choice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    logits = torch.randn(6, 4, generator=g)
    gate, up, down = torch.randn(4, 12, 8, generator=g), torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 12,
                                                                                                       generator=g)
    dout = torch.randn(6, 8, generator=g)
    ins = [t.clone().requires_grad_() for t in (x, logits, gate, up, down)]
    w, e = route(ins[1], 2)
    (expert_ffn(ins[0], w, e, *ins[2:]) * dout).sum().backward()
    ref = [t.double().requires_grad_() for t in (x, logits, gate, up, down)]
    ref_w = torch.softmax(ref[1].gather(1, e.long()), -1)  # softmax then top 2, renormalised: a softmax of the two
    (moe_expert_ffn(ref[0], ref_w, e, *ref[2:]) * dout.double()).sum().backward()
    for name, a, b in zip(("x", "router_logits", "gate", "up", "down"), ins, ref):
        assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("call, match", [
    (lambda: route(torch.zeros(3, 4), 5), "top_k"),
    (lambda: route(torch.zeros(3, 4), 0), "top_k"),
    (lambda: route(torch.zeros(4), 1), "router_logits"),
    (lambda: expert_ffn(torch.zeros(2, 8), torch.ones(2, 1), torch.tensor([[0], [4]]), torch.zeros(4, 6, 8),
                        torch.zeros(4, 6, 8), torch.zeros(4, 8, 6)), "experts"),
    (lambda: expert_ffn(torch.zeros(2, 8, dtype=torch.float64), torch.ones(2, 1), torch.tensor([[0], [1]]),
                        torch.zeros(4, 6, 8), torch.zeros(4, 6, 8), torch.zeros(4, 8, 6)), "x: torch.float64"),
    (lambda: expert_ffn(torch.zeros(2, 8), torch.ones(2, 1), torch.tensor([[0], [1]]), torch.zeros(4, 6, 8),
                        torch.zeros(4, 6, 8), torch.zeros(4, 6, 8)), "down"),
    (lambda: expert_ffn(torch.zeros(2, 8), torch.ones(2, 1), torch.tensor([[0], [1]]), torch.zeros(4, 6, 8),
                        torch.zeros(4, 6, 8), torch.zeros(4, 8, 6), activation="gelu"), "activation"),
])
def test_moe_ops_bad_input_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------ HF parity


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_logits_match_transformers(tmp_path, kind, top_k):
    hf = make_moe_hf(kind, top_k)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path)
    cfg = loaded.config
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used) == (kind, 4, top_k)
    for T in (1, 19):
        idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ref, out = hf(idx).logits, loaded.model(idx)[0]
        assert_close(out, ref, atol=1e-4, name=f"{kind} k={top_k} T={T}: logits")


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_paged_decode_matches_transformers(tmp_path, kind, top_k):
    """Prefill in chunks across blocks of 4, then 8 greedy paged decode steps: every step's logits are HF's."""
    hf = make_moe_hf(kind, top_k)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), tokenizer=_NoText(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    prompt = _prompt(3)
    tokens, logits = engine_trace(llm, prompt, 8)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    assert_close(logits, ref, atol=1e-4, name=f"{kind} k={top_k}: logits of {len(tokens)} paged steps")


# ------------------------------------------------------------------------------------------------ GGUF


def _convert(folder, path, qtype):
    from flashlm.cli import main as cli_main
    from tokenizer_sources import train_bpe

    train_bpe("gpt-2", vocab_size=300).save(str(folder / "tokenizer.json"))
    assert cli_main(["convert", str(folder), str(path), "--type", qtype, "--quiet"]) == 0


def _llama_cpp_logits(llama_cpp, path, prompt, tokens):
    """llama.cpp's logits for each of `tokens` decoded after `prompt` (float32 KV cache)."""
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, verbose=False, n_threads=2, type_k=0,
                          type_v=0, logits_all=True)
    ref.eval(prompt)
    out = []
    for token in tokens:
        out.append(np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32))
        ref.eval([token])
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("kind, top_k, qtype, tol", [
    ("mixtral", 2, "F32", 1e-3), ("mixtral", 1, "Q8_0", 0.05), ("qwen2_moe", 2, "F32", 1e-3),
    ("qwen2_moe", 2, "Q8_0", 0.05), ("qwen3_moe", 2, "F32", 1e-3), ("qwen3_moe", 1, "Q8_0", 0.05),
    ("mixtral_wide", 2, "Q4_K_S", 0.05)])
def test_converted_gguf_decodes_like_llama_cpp(tmp_path, kind, top_k, qtype, tol):
    """`flashlm convert` writes the file; flashlm's engine decodes 32 greedy tokens from it; llama.cpp, given the
    same tokens, gives every step's logits within the quantization's rounding (F32: summation order only) and,
    at F32, picks the same greedy tokens itself."""
    from flashlm.gguf import GGUFFile

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    hf = make_moe_hf(kind.removesuffix("_wide"), top_k, wide=kind.endswith("_wide"))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / f"m-{qtype}.gguf"
    _convert(tmp_path / "hf", path, qtype)
    with GGUFFile(str(path)) as f:
        types = {t.ggml_type for t in f.tensors if "_exps" in t.name}
    assert types == {qtype.removesuffix("_S")}, f"expert tensors stored as {types}"
    prompt = _prompt(7, 11)
    llm = LLM(str(path), block_size=4, max_num_seqs=1)
    tokens, logits = engine_trace(llm, prompt, 32)
    ref_logits = _llama_cpp_logits(llama_cpp, path, prompt, tokens)
    scale = ref_logits.abs().max().item()
    diff = (logits - ref_logits).abs()
    step = int(diff.amax(-1).argmax())
    assert diff.max().item() <= tol * scale, (f"{kind} {qtype}: max logit difference {diff.max().item():.3g} at "
                                              f"step {step} (logit scale {scale:.3g})")
    if qtype == "F32":
        assert ref_logits.argmax(-1).tolist() == tokens


def test_engine_decode_runs_one_native_expert_call_per_layer(tmp_path, monkeypatch):
    """A converted Q8_0 Mixtral keeps its experts in their blocks (GGUFExperts), and each engine step on the module
    path runs every layer's experts as one native call (tokens grouped by expert in C++), never the per-expert
    torch path. (The native decoder stack, the engine's default here, calls the same C++ function from C++.)"""
    from flashlm.ops import moe
    from flashlm.quant.gguf_experts import GGUFExperts

    hf = make_moe_hf("mixtral", 2)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path = tmp_path / "m.gguf"
    _convert(tmp_path / "hf", path, "Q8_0")
    llm = LLM(str(path), block_size=4, max_num_seqs=2, native_decoder=False)
    mlps = [block.mlp for block in llm.model.blocks]
    assert all(isinstance(m.experts_gate, GGUFExperts) and isinstance(m.experts_down, GGUFExperts) for m in mlps)
    calls, native = [], moe._C

    class Counting:  # the extension module, with its expert feed-forward calls counted
        def __getattr__(self, name):
            if name == "moe_expert_ffn":
                calls.append(name)
            return getattr(native, name)

    def composed(*args, **kwargs):
        raise AssertionError("the per-expert torch path ran in an inference step")

    monkeypatch.setattr(moe, "_C", Counting())
    monkeypatch.setattr(moe, "_ffn_composed", composed)
    steps = 4
    llm.generate(_prompt(5, 6), SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    assert len(calls) == steps * len(mlps)  # the prefill, then steps - 1 decode steps: one call per layer each


# ------------------------------------------------------------------------------------------------ training


def test_load_balancing_loss_matches_transformers_and_a_hand_computation():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from flashlm.train.losses import load_balancing_loss, router_z_loss

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(13, 8, generator=g) for _ in range(3)]
    for k in (1, 2):
        ref = load_balancing_loss_func(tuple(layers), 8, k)
        assert_close(load_balancing_loss(layers, k), ref, atol=1e-6, name=f"load balancing k={k}")
    # By hand: two tokens, two experts, probabilities (1/4, 3/4) each: both pick expert 1 (f = 0, 1), the mean
    # probabilities P = (1/4, 3/4): 2 * (0 * 1/4 + 1 * 3/4) = 3/2; logsumexp = ln 4 for both tokens.
    logits = [torch.tensor([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])]
    assert abs(load_balancing_loss(logits, 1).item() - 1.5) < 1e-6
    assert abs(router_z_loss(logits).item() - np.log(4.0) ** 2) < 1e-6
    # Even routing reaches the minimum, k: four tokens, each on its own expert with equal probabilities elsewhere
    even = [torch.eye(4) * 3.0]
    assert abs(load_balancing_loss(even, 1).item() - 1.0) < 1e-6


def test_aux_losses_reach_the_router_through_the_model():
    from flashlm.train.losses import moe_aux_losses

    cfg = ModelConfig(arch="mixtral", vocab_size=V, n_layer=2, n_head=2, d_model=32, n_expert=4, n_expert_used=2)
    model = Transformer(cfg).train()
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    model(idx)
    penalty, metrics = moe_aux_losses(model, aux_coef=1.0, z_coef=0.0)
    assert set(metrics) == {"moe_aux", "moe_z"} and metrics["moe_aux"].item() >= 2.0 - 1e-5  # (k = 2 at best)
    penalty.backward()
    for block in model.blocks:
        assert block.mlp.router.weight.grad.abs().sum() > 0
    dense = Transformer(ModelConfig(arch="llama", vocab_size=V, n_layer=1, n_head=2, d_model=32))
    assert moe_aux_losses(dense, 1.0, 1.0) == (None, {})
    model.eval()
    model(idx)
    with pytest.raises(ValueError, match="router_logits"):
        moe_aux_losses(model, 1.0, 1.0)


def test_short_mixtral_training_run_lowers_the_loss(tmp_path):
    from test_train_loop import generated_text

    from flashlm.train.config import TrainConfig
    from flashlm.train.trainer import Trainer

    text = tmp_path / "text.txt"
    text.write_text(generated_text(30_000))
    cfg = TrainConfig.from_sources("tiny", overrides=dict(
        arch="mixtral", n_expert=4, n_expert_used=2, data=[str(text)], data_cache=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"), progress=False, sample_tokens=0, max_steps=20, eval_interval=10,
        eval_batches=2, ckpt_interval=20, seq_len=32, batch_size=4, router_aux_coef=0.02))
    trainer = Trainer(cfg)
    assert trainer.model.cfg.moe and trainer.model.cfg.n_expert == 4
    metrics = trainer.train()
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert all("moe_aux" in m and "moe_z" in m for m in metrics)
    assert abs(metrics[0]["loss"] - np.log(trainer.data.vocab_size)) < 0.2
    assert val[-1] < metrics[0]["loss"] - 1.0, f"validation losses {val} from {metrics[0]['loss']}"
    assert all(m["moe_aux"] < 2.5 for m in metrics[-5:]), "routing stayed far from balanced"


# ------------------------------------------------------------------------------------------------ export


def _random_moe(kind: str) -> Transformer:
    extra = {"qwen2_moe": dict(shared_expert_d_ff=64, norm_topk_prob=False), "qwen3_moe": dict(head_dim=24)}
    cfg = ModelConfig(arch=kind, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=64, seq_len=64,
                      n_expert=4, n_expert_used=2, moe_d_ff=32 if kind != "mixtral" else None,
                      tie_embeddings=False, **extra.get(kind, {}))
    torch.manual_seed(5)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "shared" in name or name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("router.weight"):
                p.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_export_hf_and_gguf_round_trip(tmp_path, kind):
    """export_hf's directory runs in transformers, and export_gguf's F32 file loads in flashlm, with the logits
    of the model exported."""
    from flashlm.io import load_gguf
    from flashlm.train.export import export_gguf, export_hf
    from tokenizer_sources import train_bpe

    model = _random_moe(kind)
    tok = train_bpe("gpt-2", vocab_size=300).to_str()
    idx = torch.randint(0, V, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(idx)[0]
    export_hf(model, model.cfg, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(hf(idx).logits, want, atol=1e-4, name=f"{kind}: transformers on the exported directory")
    export_gguf(model, model.cfg, tok, tmp_path / "m.gguf")
    loaded = load_gguf(tmp_path / "m.gguf")
    expert_fields = ("arch", "n_expert", "n_expert_used", "moe_d_ff", "shared_expert_d_ff", "norm_topk_prob")
    assert [getattr(loaded.config, f) for f in expert_fields] == [getattr(model.cfg, f) for f in expert_fields]
    with torch.no_grad():
        assert_close(loaded.model(idx)[0], want, atol=1e-4, name=f"{kind}: the exported GGUF file")


# ------------------------------------------------------------------------------------------------ bad input


def _hf_dir(tmp_path, kind="mixtral"):
    hf = make_moe_hf(kind, 2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def _edit_json(path, **changes):
    import json

    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case, match", [
    ("used > count", "num_experts_per_tok 5 is more than the 4 experts"),
    ("missing expert", r"expert 3 of layer 1 \(experts_up\) is missing"),
    ("expert shape", r"model\.layers\.0\.block_sparse_moe\.experts\.2\.w2\.weight.*shape"),
    ("extra expert", r"model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight"),
    ("sparse step", "decoder_sparse_step"),
])
def test_hf_bad_moe_input_named(tmp_path, case, match):
    from safetensors.torch import load_file, save_file

    kind = "qwen2_moe" if case == "sparse step" else "mixtral"
    folder = _hf_dir(tmp_path, kind)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    if case == "used > count":
        _edit_json(folder / "config.json", num_experts_per_tok=5)
    elif case == "missing expert":
        del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    elif case == "expert shape":
        tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(64, 32)
    elif case == "extra expert":
        tensors["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(64, 64)
    else:
        _edit_json(folder / "config.json", decoder_sparse_step=2)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        load_hf(folder)
    if case in ("missing expert", "extra expert"):  # `flashlm convert` reads the same directory
        from flashlm.io.hf_source import HFSource

        with pytest.raises(ValueError, match=r"expert 3 of blk\.1\.ffn_up_exps|expert 4 beyond the 4"):
            HFSource(str(folder))


def test_gguf_bad_moe_input_named(tmp_path):
    from test_loaders import _set_uint32

    from flashlm.gguf import GGUFFile
    from flashlm.io import load_gguf
    from flashlm.io.gguf_layout import gguf_model_config

    path = tmp_path / "m.gguf"
    _convert(_hf_dir(tmp_path / "hf", "qwen2_moe"), path, "Q8_0")
    with GGUFFile(str(path)) as f:
        metadata, shapes = dict(f.metadata), {t.name: t.shape for t in f.tensors}
    assert gguf_model_config(metadata, shapes).arch == "qwen2_moe"
    missing = {k: v for k, v in shapes.items() if k != "blk.1.ffn_up_exps.weight"}
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up_exps\.weight' is missing"):
        gguf_model_config(metadata, missing)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        gguf_model_config(metadata, shapes | {"blk.0.ffn_gate_exps.weight": (4, 32, 32)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_inp_shexp\.weight"):
        gguf_model_config(metadata, {k: v for k, v in shapes.items() if "ffn_gate_inp_shexp" not in k})
    with pytest.raises(ValueError, match="expert_weights_scale"):
        gguf_model_config(metadata | {"qwen2moe.expert_weights_scale": 2.5}, shapes)
    _set_uint32(str(path), "qwen2moe.expert_used_count", 9)
    with pytest.raises(ValueError, match="qwen2moe.expert_used_count 9 is more than qwen2moe.expert_count 4"):
        load_gguf(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="mixtral", n_expert=4, n_expert_used=5), "n_expert_used"),
    (dict(arch="mixtral", n_expert=4), "n_expert_used"),
    (dict(arch="mixtral", n_expert=0, n_expert_used=1), "n_expert"),
    (dict(arch="llama", n_expert=4, n_expert_used=2), "n_expert: llama has no experts"),
    (dict(arch="mixtral", n_expert=4, n_expert_used=2, norm_topk_prob=False), "norm_topk_prob"),
    (dict(arch="qwen2_moe", n_expert=4, n_expert_used=2), "shared_expert_d_ff"),
    (dict(arch="qwen3_moe", n_expert=4, n_expert_used=2, shared_expert_d_ff=32), "shared_expert_d_ff"),
    (dict(arch="qwen3_moe", n_expert=4, n_expert_used=2, norm_topk_prob=1), "norm_topk_prob"),
])
def test_model_config_checks_expert_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(d_model=32, n_head=2, **kwargs)


def test_llama_cpp_layouts_refused_before_writing(tmp_path):
    """What llama.cpp's qwen2moe would compute differently (renormalised weights) is refused by the exporter."""
    from flashlm.train.export import export_gguf

    model = _random_moe("qwen2_moe")
    cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "norm_topk_prob": True})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        export_gguf(model, cfg, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("args, match", [
    (["--arch", "llama", "--n-expert", "4"], "n_expert: llama has no experts"),
    (["--arch", "mixtral", "--n-expert", "4", "--n-expert-used", "6"], "n_expert_used"),
    (["--arch", "mixtral", "--router-z-coef", "-1"], "router_z_coef"),
])
def test_train_command_checks_expert_options_first(tmp_path, capsys, args, match):
    from flashlm.cli import main as cli_main

    assert cli_main(["train", "--out-dir", str(tmp_path / "run"), *args]) != 0
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: ") and match in err, err
    assert not (tmp_path / "run").exists()


def test_flops_per_token_count_the_experts_a_token_uses():
    """Mixtral with one expert of four per token costs a llama of the same widths plus the routers."""
    dims = dict(vocab_size=V, n_layer=2, n_head=2, d_model=32, d_ff=64, tie_embeddings=False)
    moe = Transformer(ModelConfig(arch="mixtral", n_expert=4, n_expert_used=1, **dims))
    dense = Transformer(ModelConfig(arch="llama", **dims))
    assert moe.flops_per_token(16) == dense.flops_per_token(16) + 6.0 * 2 * 4 * 32


def test_aux_losses_under_activation_checkpointing_give_the_same_gradients():
    from flashlm.train.losses import moe_aux_losses

    cfg = ModelConfig(arch="qwen3_moe", vocab_size=V, n_layer=2, n_head=2, d_model=32, n_expert=4, n_expert_used=2)
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        model.checkpointing = checkpointing
        _, loss = model(idx, idx)
        penalty, _ = moe_aux_losses(model, 0.5, 0.1)
        (loss + penalty).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
