"""Rope scaling the newer architectures declare, against HF transformers:
- Gemma 3's linear scaling ({"rope_type": "linear", "factor": 8}) on its global layers only (the local layers
  keep their own unscaled base): logits after a chunked prefill and after several paged decode steps, read from
  transformers 5's rope_parameters and from transformers 4's rope_scaling;
- Phi-3's LongRoPE (short factors within the original context, long ones beyond it), from HF and GGUF;
- bad scaling settings are refused by name.
"""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_loaders import V  # noqa: E402
from test_runtime_parity import _NoText, _hf_logits, engine_trace  # noqa: E402

from flashlm.io.hf_config import model_config_from_hf  # noqa: E402
from flashlm.models.config import ModelConfig  # noqa: E402
from flashlm.runtime.engine import LLM  # noqa: E402


def make_gemma3(factor):
    """A random 7-layer gemma3 (6 local layers: window 5, rope base 100; layer 5 global, base 1e4) with the
    global layers' rope scaled linearly by `factor` (None: unscaled)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(20)
    full = {"rope_type": "default", "rope_theta": 1e4} if factor is None else \
        {"rope_type": "linear", "factor": factor, "rope_theta": 1e4}
    rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    m = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=64, num_hidden_layers=7, intermediate_size=96,
                                           max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=24, query_pre_attn_scalar=24, sliding_window=5,
                                           rope_parameters=rope))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return m.eval()


def _trace(folder, prompt):
    # block size 4 and an 8-token budget: the 19-token prompt is prefilled in three chunks across blocks
    llm = LLM(str(folder), tokenizer=_NoText(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    return llm, engine_trace(llm, prompt, 8)


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_gemma3_linear_scaling_matches_transformers(tmp_path, spelling):
    hf = make_gemma3(8.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    if spelling == "rope_scaling":  # transformers 4's keys for the same model
        path = tmp_path / "config.json"
        cfg = json.loads(path.read_text())
        del cfg["rope_parameters"]
        cfg.update(rope_theta=1e4, rope_local_base_freq=100.0, rope_scaling={"type": "linear", "factor": 8.0})
        path.write_text(json.dumps(cfg))
    prompt = [int(t) for t in np.random.default_rng(20).integers(0, V, 19)]
    llm, (tokens, logits) = _trace(tmp_path, prompt)
    assert llm.model.cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    ref = _hf_logits(hf, prompt, tokens)
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"
    # the scaling changes the logits well beyond the tolerance: the comparison sees it
    unscaled = make_gemma3(None)
    unscaled.load_state_dict(hf.state_dict())
    assert (_hf_logits(unscaled, prompt, tokens) - ref).abs().max().item() > 1e-2


def _gemma3_hf_config(**rope):
    return dict(architectures=["Gemma3ForCausalLM"], vocab_size=V, hidden_size=64, num_hidden_layers=7,
                intermediate_size=96, max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=2,
                head_dim=24, sliding_window=5, **rope)


@pytest.mark.parametrize("rope, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "factor"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "8"}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": float("inf")}), "factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope_scaling"),
    (dict(rope_scaling=[8.0]), "rope_scaling"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 0}}), "factor"),
    (dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}), "full_attention"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}), "sliding_attention"),
    (dict(rope_parameters={"full_attention": "linear"}), "full_attention"),
])
def test_gemma3_bad_rope_scaling_is_named(rope, match):
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(_gemma3_hf_config(**rope))


def test_linear_scaling_only_on_gemma3():
    for arch in ("llama", "gemma2", "phi3"):
        with pytest.raises(ValueError, match="rope_scaling"):
            ModelConfig(arch=arch, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        model_config_from_hf(dict(_gemma3_hf_config(), architectures=["Gemma2ForCausalLM"],
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}))


def test_gemma3_linear_scaling_converts_to_gguf_as_llama_cpp_reads_it(tmp_path):
    """`flashlm convert` writes the scaling as convert_hf_to_gguf does (gemma3.rope.scaling.type/factor); the file
    loads with it and gives HF's logits, and llama.cpp (where it imports) decodes it alike."""
    from tokenizer_sources import train_bpe

    from flashlm.cli import main as cli_main
    from flashlm.gguf import GGUFFile
    from flashlm.io.gguf_layout import gguf_model_config

    hf = make_gemma3(8.0)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    train_bpe("gpt-2", vocab_size=300).save(str(tmp_path / "hf" / "tokenizer.json"))
    path = str(tmp_path / "m.gguf")
    assert cli_main(["convert", str(tmp_path / "hf"), path, "--type", "F32", "--quiet"]) == 0
    with GGUFFile(path) as f:
        metadata, shapes = dict(f.metadata), {t.name: t.shape for t in f.tensors}
    assert metadata["gemma3.rope.scaling.type"] == "linear" and metadata["gemma3.rope.scaling.factor"] == 8.0
    # bad scaling metadata is named
    for key, value, match in (("gemma3.rope.scaling.factor", 0.0, "scaling.factor"),
                              ("gemma3.rope.scaling.factor", -8.0, "scaling.factor"),
                              ("gemma3.rope.scaling.factor", "8", "scaling.factor"),
                              ("gemma3.rope.scaling.factor", None, "scaling.factor"),
                              ("gemma3.rope.scaling.type", "yarn", "scaling.type 'yarn'")):
        bad = {k: v for k, v in {**metadata, key: value}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            gguf_model_config(bad, shapes)
    llm = LLM(path, block_size=4, max_num_seqs=1)
    assert llm.model.cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    prompt = [int(t) for t in np.random.default_rng(21).integers(0, V, 11)]
    tokens, logits = engine_trace(llm, prompt, 16)
    err = (logits - _hf_logits(hf, prompt, tokens)).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, verbose=False, n_threads=2, type_k=0, type_v=0,
                          logits_all=True)
    ref.eval(prompt)
    ref_logits = []
    for token in tokens:  # llama.cpp decodes flashlm's tokens: every step's logits are compared
        ref_logits.append(np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32))
        ref.eval([token])
    ref_logits = torch.from_numpy(np.stack(ref_logits))
    # F32: float32 summation order only (the tolerance of the other converted-file comparisons)
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 1e-3 * scale


def test_gemma3_linear_scaling_exports(tmp_path):
    """The trainer's export keeps the scaling: the HF directory (transformers' Gemma 3) and the GGUF file (read
    back by flashlm's loader) give the training model's logits."""
    from tokenizer_sources import train_bpe

    from flashlm.models import Transformer
    from flashlm.train.export import export_gguf, export_hf

    tok = train_bpe("gpt-2", vocab_size=300).to_str()
    cfg = ModelConfig(arch="gemma3", vocab_size=V, n_layer=6, n_head=4, n_kv_head=2, d_model=64, head_dim=24,
                      seq_len=64, sliding_window=8, rope_local_theta=100.0, query_pre_attn_scalar=24,
                      rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.manual_seed(22)
    model = Transformer(cfg).eval()
    export_hf(model, cfg, tok, tmp_path / "hf")
    export_gguf(model, cfg, tok, tmp_path / "m.gguf", type="F32")
    idx = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(22))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    llm = LLM(str(tmp_path / "m.gguf"), block_size=4, max_num_seqs=1)
    assert llm.model.cfg.rope_scaling == cfg.rope_scaling
    with torch.no_grad():
        want = model(idx)[0][0]
        assert (hf(idx).logits[0] - want).abs().max().item() <= 1e-4
        assert (llm.model(idx)[0][0] - want).abs().max().item() <= 1e-4
        # the scaling changes the logits well beyond the tolerance: the comparisons see it
        unscaled = Transformer(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None})).eval()
        unscaled.load_state_dict(model.state_dict())
        assert (unscaled(idx)[0][0] - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("key", ["rope.scaling.factor", "rope.scale_linear"])
@pytest.mark.parametrize("value, refused", [(4.0, True), (0.5, True), ("4", True), (1.0, False), (0.0, False)])
def test_a_frequency_factor_without_a_scaling_type_is_refused_not_ignored(key, value, refused):
    """llama.cpp divides any architecture's rotary frequencies by rope.scaling.factor (or the older
    rope.scale_linear) whatever rope.scaling.type says; flashlm has no such scaling for llama, so it refuses."""
    from flashlm.io.gguf_layout import Meta, _rotary_settings

    meta = Meta({"llama.rope.freq_base": 10000.0, f"llama.{key}": value})
    if refused:
        with pytest.raises(ValueError, match=rf"llama\.{key.replace('.', '[.]')} .*not supported for llama"):
            _rotary_settings(meta, "llama", 8, 64)
    else:
        assert _rotary_settings(meta, "llama", 8, 64)["rope_theta"] == 10000.0


# Phi-3's LongRoPE on a random tiny model: head_dim 8 (4 rotary frequencies), original context 16, 64 positions
SHORT, LONG = [1.0, 1.3, 2.1, 3.7], [1.9, 4.2, 9.5, 23.0]


def make_phi3_longrope(original=16, positions=64, **rope):
    """A random 2-layer phi3 with LongRoPE, `original` positions extended to `positions` (rope: changes to its
    rope_scaling)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(23)
    scaling = {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, **rope}
    cfg = Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=positions, original_max_position_embeddings=original,
                     rope_scaling=scaling, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    return Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("context, prompt_len", [(16, 7), (64, 19)], ids=["short", "long"])
@pytest.mark.parametrize("runner_forward", [False, True], ids=["model", "runner"])
def test_phi3_longrope_matches_transformers(tmp_path, context, prompt_len, runner_forward):
    """Within the original 16 positions (a 16-token context: the short factors) and beyond them (64: the long
    ones, with a 19-token prompt, so transformers uses the long factors for the whole sequence too): HF's
    logits after a chunked prefill and 8 paged decode steps, through the model and through the runner (the
    native decoder where it runs), with cos/sin scaled by sqrt(1 + ln 4 / ln 16)."""
    import math

    hf = make_phi3_longrope()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), tokenizer=_NoText(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2,
              max_model_len=context)
    rs = llm.model.cfg.rope_scaling
    assert rs["rope_type"] == "longrope" and rs["original_max_position_embeddings"] == 16
    assert rs["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    prompt = [int(t) for t in np.random.default_rng(23).integers(0, V, prompt_len)]
    tokens, logits = engine_trace(llm, prompt, 8, runner_forward=runner_forward)
    ref = _hf_logits(hf, prompt, tokens)
    err = (logits - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"
    # the other factors change the logits well beyond the tolerance: the comparison sees which are used
    other = make_phi3_longrope(short_factor=LONG, long_factor=SHORT)
    other.load_state_dict(hf.state_dict())
    assert (_hf_logits(other, prompt, tokens) - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("rope, match", [
    (dict(short_factor=SHORT[:3]), "short_factor"),
    (dict(long_factor=[1.0, 2.0, 0.0, 3.0]), "long_factor"),
    (dict(long_factor=[1.0, 2.0, float("nan"), 3.0]), "long_factor"),
    (dict(short_factor="1 2 3 4"), "short_factor"),
    (dict(long_factor=None), "long_factor"),
    (dict(attention_factor=-1.0), "attention_factor"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
])
def test_phi3_bad_longrope_is_named(rope, match):
    cfg = dict(architectures=["Phi3ForCausalLM"], vocab_size=V, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               original_max_position_embeddings=16,
               rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG, **rope})
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(cfg)


def test_longrope_only_on_phi3():
    rs = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16,
          "attention_factor": 1.0}
    assert ModelConfig(arch="phi3", n_head=4, d_model=32, rope_scaling=rs).rope_scaling == rs
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(arch="llama", n_head=4, d_model=32, rope_scaling=rs)


def _llama_cpp_logits(path, n_ctx, prompt, tokens):
    """llama.cpp's logits before each of `tokens` after `prompt` (F32 KV cache), decoding flashlm's tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, verbose=False, n_threads=2, type_k=0, type_v=0,
                          logits_all=True)
    try:
        ref.eval(prompt)
        out = []
        for token in tokens:
            out.append(np.array(ref.scores[ref.n_tokens - 1], dtype=np.float32))
            ref.eval([token])
    finally:
        ref.close()
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("context, prompt_len", [(256, 9), (1024, 300)], ids=["short", "long"])
def test_phi3_longrope_converts_to_gguf_as_llama_cpp_reads_it(tmp_path, context, prompt_len):
    """`flashlm convert` writes LongRoPE as convert_hf_to_gguf does (rope_factors_short/long tensors, the original
    context and the attention factor as metadata); the file, run with a context within the original 256
    positions and beyond them, gives HF's logits, and llama.cpp's (which picks the factors by its n_ctx, as
    flashlm does by the context)."""
    import math

    from tokenizer_sources import train_bpe

    from flashlm.cli import main as cli_main
    from flashlm.gguf import GGUFFile

    hf = make_phi3_longrope(original=256, positions=1024)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    train_bpe("gpt-2", vocab_size=300).save(str(tmp_path / "hf" / "tokenizer.json"))
    path = str(tmp_path / "m.gguf")
    assert cli_main(["convert", str(tmp_path / "hf"), path, "--type", "F32", "--quiet"]) == 0
    with GGUFFile(path) as f:
        metadata = dict(f.metadata)
        short, long = (f.load(f"rope_factors_{k}.weight", dtype=torch.float32).tolist() for k in ("short", "long"))
    assert metadata["phi3.rope.scaling.original_context_length"] == 256
    assert metadata["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    assert short == pytest.approx(SHORT, rel=1e-7) and long == pytest.approx(LONG, rel=1e-7)  # float32
    llm = LLM(path, block_size=16, max_num_seqs=1, max_model_len=context)
    assert llm.model.cfg.rope_scaling["short_factor"] == short
    prompt = [int(t) for t in np.random.default_rng(24).integers(0, V, prompt_len)]
    tokens, logits = engine_trace(llm, prompt, 8)
    err = (logits - _hf_logits(hf, prompt, tokens)).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err} over {len(tokens)} steps"
    ref = _llama_cpp_logits(path, context, prompt, tokens)
    assert (logits - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("length", [40, 100])
def test_phi3_longrope_exports(tmp_path, length):
    """The trainer's export keeps LongRoPE: the HF directory (transformers' Phi3) and the GGUF file (read back
    by flashlm's loader) give the training model's logits, within the original 64 positions and beyond."""
    from tokenizer_sources import train_bpe

    from flashlm.models import Transformer
    from flashlm.train.export import export_gguf, export_hf

    tok = train_bpe("gpt-2", vocab_size=300).to_str()
    rs = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 64,
          "attention_factor": 1.2}
    cfg = ModelConfig(arch="phi3", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=length,
                      rope_scaling=rs)
    torch.manual_seed(25)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights large enough that the rotary angles show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    export_hf(model, cfg, tok, tmp_path / "hf")
    export_gguf(model, cfg, tok, tmp_path / "m.gguf", type="F32")
    idx = torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(25))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    llm = LLM(str(tmp_path / "m.gguf"), block_size=4, max_num_seqs=1)
    got = llm.model.cfg.rope_scaling
    assert got["rope_type"] == "longrope" and got["original_max_position_embeddings"] == 64
    for key in ("short_factor", "long_factor", "attention_factor"):  # as float32 in the file
        assert got[key] == pytest.approx(rs[key], rel=1e-7), key
    with torch.no_grad():
        want = model(idx)[0][0]
        assert (hf(idx).logits[0] - want).abs().max().item() <= 1e-4
        assert (llm.model(idx)[0][0] - want).abs().max().item() <= 1e-4
        # the other factors change the logits well beyond the tolerance: the comparisons see which are used
        swapped = dict(rs, short_factor=LONG, long_factor=SHORT)
        other = Transformer(ModelConfig(**{**cfg.to_dict(), "rope_scaling": swapped})).eval()
        other.load_state_dict(model.state_dict())
        assert (other(idx)[0][0] - want).abs().max().item() > 1e-2
