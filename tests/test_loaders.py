"""flashlm.io's loaders: HF directories and GGUF files as flashlm Transformers, and their tokenizers.

References: transformers' own models (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel)
for logits; for GGUF, files written with gguf-py in llama.cpp's layout (tests/hf_to_gguf.py) and the same HF
model holding the file's dequantized weights; the tokenizers library, transformers' apply_chat_template and
sentencepiece for tokenization; llama.cpp itself (logits and tokenization) where llama_cpp imports, e.g.
    PYTHONPATH=python /path/to/venv-with-llama-cpp-python/bin/python -m pytest tests/test_loaders.py -k llama_cpp
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from compare import assert_close  # noqa: E402
from hf_to_gguf import dequantized_state, write_gguf  # noqa: E402
from tokenizer_sources import CHAT_TEMPLATE, SAMPLES, bpe_gguf_metadata, train_bpe  # noqa: E402

from flashlm.io import load_gguf, load_hf, load_model  # noqa: E402
from flashlm.io.random_model import write_random_llama_gguf  # noqa: E402
from flashlm.quant import GGUFEmbedding, GGUFLinear, Int4Linear, Int8Linear  # noqa: E402
from flashlm.quant.rtn import dequantize_int4  # noqa: E402
from flashlm.runtime.simple_generate import generate  # noqa: E402

V = 320  # vocabulary of the logit tests' models


def _rope_llama3():
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def make_hf(kind: str, vocab: int = V):
    """A tiny random transformers model (eval mode) and its GGUF architecture name."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed({"llama": 1, "llama_tied": 2, "qwen2": 3, "gpt2": 4, "mistral": 5, "qwen3": 6, "gemma2": 7,
                       "gemma3": 8, "phi3": 9, "phi3_tied": 10, "mistral_swa": 11}[kind])
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  max_position_embeddings=128)
    if kind == "llama":  # GQA 4:2, untied, Llama 3 rope scaling
        m = LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         rope_scaling=_rope_llama3(), rope_theta=500000.0, tie_word_embeddings=False))
    elif kind == "llama_tied":  # MHA, tied
        m = LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=2, tie_word_embeddings=True))
    elif kind == "qwen2":  # GQA 4:1, tied, q/k/v biases
        m = Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1,
                                         tie_word_embeddings=True))
        with torch.no_grad():  # HF initialises biases to zero: make them count
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    elif kind == "qwen3":  # GQA 4:2, untied, head_dim 24 (q is 96 wide, not 64), q/k norms
        m = Qwen3ForCausalLM(Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         tie_word_embeddings=False))
        with torch.no_grad():  # HF initialises norm weights to one: make them count
            for layer in m.model.layers:
                for p in (layer.self_attn.q_norm, layer.self_attn.k_norm, layer.input_layernorm):
                    p.weight.copy_(1.0 + 0.3 * torch.randn_like(p.weight))
    elif kind == "gemma2":  # GQA 4:2, tied, head_dim 24, a window of 5 on layers 0 and 2, caps that bite
        from transformers import Gemma2Config, Gemma2ForCausalLM

        m = Gemma2ForCausalLM(Gemma2Config(**dict(common, num_hidden_layers=3), num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                                           sliding_window=5, attn_logit_softcapping=0.05,
                                           final_logit_softcapping=0.5))
        with torch.no_grad():  # HF initialises Gemma's norm weights (w of 1 + w) to zero: make them count
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
    elif kind == "gemma3":  # 7 layers (6 local: window 5, rope base 100; layer 5 global), q/k norms, head_dim 24
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
        m = Gemma3ForCausalLM(Gemma3TextConfig(**dict(common, num_hidden_layers=7), num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
                                               sliding_window=5, rope_parameters=rope))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
    elif kind in ("phi3", "phi3_tied"):  # fused qkv_proj and gate_up_proj. phi3: GQA 4:2, untied, every layer's
        from transformers import Phi3Config, Phi3ForCausalLM  # window 5; phi3_tied: MHA, tied, no window

        shape = dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5) if kind == "phi3" else \
            dict(num_attention_heads=2, tie_word_embeddings=True)
        m = Phi3ForCausalLM(Phi3Config(**common, **shape, pad_token_id=0, bos_token_id=0, eos_token_id=0))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=None))
    elif kind == "mistral_swa":  # GQA 4:2, a window of 5 on every layer (shorter than the 19-token prompts)
        m = MistralForCausalLM(MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=5))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=0, eos_token_id=0))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    m.eval()
    return m, {"llama_tied": "llama", "mistral": "llama", "mistral_swa": "llama", "phi3_tied": "phi3"}.get(kind, kind)


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)[0] if not hasattr(model, "generation_config") else model(idx).logits


# ------------------------------------------------------------------------------------------------ HF


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi3_tied",
                                  "gpt2", "mistral", "mistral_swa"])
def test_hf_logits_match_transformers(tmp_path, kind):
    hf, _ = make_hf(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path)
    assert not loaded.model.training and loaded.source == f"hf:{tmp_path}"
    for T in (1, 19):
        idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
        ref, out = _logits(hf, idx), _logits(loaded.model, idx)
        assert_close(out, ref, atol=1e-4, name=f"{kind} T={T}: logits")


def test_hf_sharded_and_max_model_len(tmp_path):
    hf, _ = make_hf("gpt2")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded = load_hf(tmp_path, max_model_len=24)
    assert loaded.config.seq_len == 24 and loaded.model.pos_emb.weight.shape == (24, 64)
    idx = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))
    assert_close(_logits(loaded.model, idx), _logits(hf, idx), atol=1e-4, name="logits")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_hf_quantized_load(tmp_path, quantize):
    hf, _ = make_hf("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path, quantize=quantize)
    cls = Int8Linear if quantize == "int8" else Int4Linear
    assert isinstance(loaded.model.blocks[1].mlp.down, cls) and isinstance(loaded.model.blocks[0].attn.q, cls)
    # reference: the float model with the quantized weights dequantized back
    ref_model = load_hf(tmp_path).model
    for block, qblock in zip(ref_model.blocks, loaded.model.blocks):
        for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
            q = qblock.get_submodule(name)
            if quantize == "int8":
                w = q.weight.float() * q.weight_scales[:, None]
            else:
                w = dequantize_int4(q.weight, q.scales, q.zeros, q.group_size)
            block.get_submodule(name).weight.data = w.float()
    idx = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    out, ref, orig = _logits(loaded.model, idx), _logits(ref_model, idx), _logits(hf, idx)
    # Errors relative to the largest logit. int4 (W4A16): the same weights, float activations -> float rounding
    # only. int8 (W8A8): activations are rounded per token to 8 bits (relative step 1/127 of the row's max) at
    # each of 7 linears per block.
    tol = 1e-4 if quantize == "int4" else 3e-2
    assert_close(out, ref, rtol_of_max=tol, name=f"{quantize}: logits vs the dequantized-weight model")
    # and against the original float weights: int8 is about 1%, int4 (group 32..128, 4 bits) a few %
    assert_close(out, orig, rtol_of_max=5e-2 if quantize == "int8" else 0.25, name=f"{quantize}: logits vs float")


def test_hf_bfloat16(tmp_path):
    hf, _ = make_hf("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    idx = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    # bf16 keeps 8 bits of mantissa: errors relative to the largest logit
    assert_close(_logits(loaded.model, idx).float(), _logits(hf, idx), rtol_of_max=5e-2, name="bf16 logits")


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _set_uint32(path: str, key: str, value: int) -> None:
    """Overwrites the UINT32 metadata value `key` of the GGUF file at path in place."""
    data = bytearray(open(path, "rb").read())
    at = data.index(key.encode()) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # GGUF type UINT32
    data[at + 4:at + 8] = value.to_bytes(4, "little")
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("case, match", [
    ("missing", "model.layers.1.mlp.up_proj.weight|blocks.1.mlp.up.weight"),
    ("shape", "model.layers.0.self_attn.k_proj.weight"),
    ("extra", "model.layers.0.self_attn.extra_proj.weight"),
    ("int", "model.norm.weight"),
])
def test_hf_bad_tensors_raise_naming_them(tmp_path, case, match):
    hf, _ = make_hf("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True)

    def edit(t):
        if case == "missing":
            del t["model.layers.1.mlp.up_proj.weight"]
        elif case == "shape":
            t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
        elif case == "extra":
            t["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4)
        else:
            t["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    _rewrite_safetensors(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_hf_known_buffers_are_skipped(tmp_path):
    hf, _ = make_hf("gpt2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _rewrite_safetensors(tmp_path, lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8),
                                                       "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}))
    idx = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(3))
    assert_close(_logits(load_hf(tmp_path).model, idx), _logits(hf, idx), atol=1e-4, name="logits")


@pytest.mark.parametrize("kind, edit, match", [
    ("llama_tied", {"architectures": ["FalconForCausalLM"]}, "architectures"),
    ("llama_tied", {"head_dim": 16}, "weights: tensor 'model.layers.0.self_attn.q_proj.weight' has shape"),
    ("llama_tied", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama_tied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ("llama_tied", {"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"head_dim": 0}, "head_dim"),
    ("qwen3", {"head_dim": 2048}, "head_dim"),
    ("qwen3", {"head_dim": 24.5}, "head_dim"),
    ("qwen3", {"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads"),
    ("qwen3", {"head_dim": 16}, "weights: tensor 'model.layers.0.self_attn.q_proj.weight' has shape"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ("gemma2", {"sliding_window": 0}, "sliding_window"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
    ("gemma2", {"head_dim": 0}, "head_dim"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "full_attention"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 7}, "layer_types"),
    ("phi3", {"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 7,
                                  "long_factor": [2.0] * 8}}, "longrope's short_factor must be 8"),
    ("phi3", {"sliding_window": 0}, "sliding_window"),
    ("phi3", {"attention_bias": True}, "attention_bias"),
    ("phi3", {"head_dim": 8}, "head_dim"),
    ("phi3", {"intermediate_size": 80}, "'model.layers.0.mlp.gate_up_proj.weight' has shape"),
    ("phi3", {"num_key_value_heads": 4}, "'model.layers.0.self_attn.qkv_proj.weight' has shape"),
])
def test_hf_bad_config_raises(tmp_path, kind, edit, match):
    hf, _ = make_hf(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_hf_qwen3_head_dim_defaults_as_transformers(tmp_path):
    """A Qwen3 config.json without head_dim means transformers' default (128), not hidden_size / heads."""
    hf, _ = make_hf("qwen3")
    cfg = hf.config.to_dict()
    del cfg["head_dim"]
    want = type(hf.config).from_dict(cfg).head_dim
    from flashlm.io.hf_config import model_config_from_hf
    assert model_config_from_hf(dict(cfg, architectures=["Qwen3ForCausalLM"])).head_dim == want == 128


def test_gguf_qwen3_head_dim_checked(tmp_path):
    hf, arch = make_hf("qwen3")
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "F32")
    from flashlm.io.gguf import GGUFFile
    from flashlm.io.gguf_layout import gguf_model_config
    f = GGUFFile(path)
    try:
        metadata, shapes = dict(f.metadata), {t.name: t.shape for t in f.tensors}
    finally:
        f.close()
    assert gguf_model_config(metadata, shapes).head_dim == 24
    for key, value, match in (("qwen3.attention.key_length", 16, "dimension_count 24 != head_dim 16"),
                              ("qwen3.attention.key_length", 0, "key_length"),
                              ("qwen3.attention.value_length", 16, "value_length 16 != the head dimension 24")):
        with pytest.raises(ValueError, match=match):
            gguf_model_config({**metadata, key: value}, shapes)
    del metadata["qwen3.attention.key_length"]
    with pytest.raises(ValueError, match="key_length"):
        gguf_model_config(metadata, shapes)


def test_hf_pickle_only_directory_raises(tmp_path):
    cfg = make_hf("llama_tied")[0].config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_hf(tmp_path)



def test_hf_tokenizer_and_chat_template(tmp_path):
    tok = train_bpe("gpt-2")
    hf, _ = make_hf("gpt2", vocab=tok.get_vocab_size())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5], "bos_token_id": 0}))
    loaded = load_model(tmp_path)
    t = loaded.tokenizer
    assert loaded.eos_token_ids == [0, 5] and loaded.bos_token_id == 0 and loaded.chat_template == CHAT_TEMPLATE
    for text in SAMPLES:
        assert t.encode(text) == tok.encode(text).ids, text
        assert t.decode(t.encode(text)) == text.replace("<|endoftext|>", "")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Über 東京?"},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Why"}]
    for gen in (True, False):
        assert t.apply_chat_template(messages, add_generation_prompt=gen) == \
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(ValueError, match="unknown role tool"):
        t.apply_chat_template([{"role": "tool", "content": "x"}])
    prompt = t.apply_chat_template(messages)
    assert t.encode(prompt, add_special_tokens=False) == ref(prompt, add_special_tokens=False)["input_ids"]
    assert t.decode(t.encode("hello") + [t.vocab_size + 3]) == "hello"  # a padded embedding row: no text
    with pytest.raises(ValueError, match="ids"):
        t.decode([0, -1])


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3", "phi3", "phi3_tied", "gpt2"])
def test_gguf_logits(tmp_path, kind, qtype):
    hf, arch = make_hf(kind)
    path = str(tmp_path / "m.gguf")
    held = write_gguf(hf, arch, path, qtype)
    loaded = load_gguf(path)
    model = loaded.model
    assert loaded.config.arch == arch and not model.training
    if qtype.startswith("Q"):
        assert isinstance(model.blocks[0].attn.k, GGUFLinear) and isinstance(model.tok_emb, GGUFEmbedding)
        assert isinstance(model.lm_head, GGUFLinear)  # tied: over token_embd's bytes (untied: output.weight)
    # reference: transformers' model holding exactly the file's (dequantized) weights
    ref_model = type(hf)(hf.config).eval()
    ref_model.load_state_dict(dequantized_state(hf, arch, held))
    idx = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(7))
    out, ref = _logits(model, idx), _logits(ref_model, idx)
    # float files: exact up to float32 rounding. Quantized: GGUFLinear rounds activations to 8-bit blocks of
    # 32 (as ggml does), a relative step of 1/254 of each block's max, at every linear: measured 0.4-0.8% of the
    # largest logit.
    if qtype in ("F32", "F16", "BF16"):
        assert_close(out, ref, atol=1e-4, name=f"{kind} {qtype}: logits")
    else:
        assert_close(out, ref, rtol_of_max=2e-2, name=f"{kind} {qtype}: logits")


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_gguf_model_to_bfloat16(tmp_path, kind):
    hf, arch = make_hf(kind)
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "Q8_0")
    model = load_gguf(path).model
    idx = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(9))
    ref = _logits(model, idx)
    out = _logits(model.to(torch.bfloat16), idx)
    assert out.dtype == torch.bfloat16 and model.tok_emb(idx).dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: errors relative to the largest logit
    assert_close(out.float(), ref, rtol_of_max=5e-2, name=f"{kind}: bf16 logits")


def test_gguf_llama3_rope_scaling_recovered(tmp_path):
    hf, arch = make_hf("llama")
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "F32")
    cfg = load_gguf(path).config
    assert cfg.rope_scaling is not None and cfg.rope_scaling["factor"] == 8.0
    from flashlm.models import ModelConfig
    from flashlm.models.transformer import rope_inv_freq
    want = rope_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": {
        k: v for k, v in _rope_llama3().items() if k != "rope_theta"}}))
    got = rope_inv_freq(cfg)
    assert got.dtype == want.dtype
    assert_close(got, want, rtol=1e-6, name="rope inverse frequencies")


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)])  # Llama 3.1 8B, Llama 3.2 1B
def test_llama3_rope_parameters_from_factors(head_dim, factor):
    from types import SimpleNamespace

    from hf_to_gguf import _rope_factors

    from flashlm.io.gguf_rope import llama3_scaling_from_factors
    from flashlm.models import ModelConfig
    from flashlm.models.transformer import rope_inv_freq

    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    hf_cfg = SimpleNamespace(hidden_size=4 * head_dim, num_attention_heads=4,
                             rope_parameters=dict(rs, rope_theta=500000.0))
    factors = torch.from_numpy(_rope_factors(hf_cfg))
    inv_freq = rope_inv_freq(ModelConfig(arch="llama", d_model=4 * head_dim, n_head=4, rope_theta=500000.0))
    assert llama3_scaling_from_factors(factors, inv_freq) == rs
    assert llama3_scaling_from_factors(torch.ones_like(factors), inv_freq) is None
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        llama3_scaling_from_factors(factors.flip(0), inv_freq)  # long wavelengths kept, short ones slowed


def test_gguf_max_model_len(tmp_path):
    hf, arch = make_hf("gpt2")
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "Q8_0")
    loaded = load_gguf(path, max_model_len=16)
    assert loaded.config.seq_len == 16 and loaded.model.pos_emb.weight.shape == (16, 64)


@pytest.mark.parametrize("case, match", [
    ("missing", "blk.1.ffn_up.weight"),
    ("shape", "blk.0.attn_k.weight"),
    ("extra", "blk.2.attn_norm.weight"),
    ("arch", "general.architecture"),
    ("heads", "head_count"),
    ("type", "blk.0.attn_v.weight"),
    ("context", "context_length"),
])
def test_gguf_malformed_raises_naming_it(tmp_path, case, match):
    hf, arch = make_hf("llama_tied")
    path = str(tmp_path / "m.gguf")
    if case == "missing":
        write_gguf(hf, arch, path, "Q8_0", skip=("blk.1.ffn_up.weight",))
    elif case == "shape":
        write_gguf(hf, arch, path, "Q8_0", replace={"blk.0.attn_k.weight": np.zeros((32, 64), np.float32)})
    elif case == "extra":  # one block more than block_count says
        write_gguf(hf, arch, path, "F32", extra={"blk.2.attn_norm.weight": np.ones(64, np.float32)})
    elif case == "arch":
        write_gguf(hf, "falcon", path, "F32")
    elif case == "context":  # 2^31 positions of rope tables unless max_model_len caps them
        write_gguf(hf, arch, path, "F32", context_length=2**31)
        assert load_gguf(path, max_model_len=32).config.seq_len == 32
    elif case == "type":  # integers where a matrix belongs
        write_gguf(hf, arch, path, "Q8_0", replace={"blk.0.attn_v.weight": (np.zeros((64, 64), np.int32),
                                                                            gguf.GGMLQuantizationType.I32)})
    else:
        write_gguf(hf, arch, path, "F32")
        _set_uint32(path, "llama.attention.head_count", 0)
    with pytest.raises(ValueError, match=match):
        load_gguf(path)


_RSS_SCRIPT = r"""
import sys, torch
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
from flashlm.io import load_gguf
def run(path):
    loaded = load_gguf(path, tokenizer=False)
    with torch.no_grad():
        loaded.model(torch.arange(8)[None])
    return loaded
warm = run(sys.argv[1])  # torch's and flashlm's one-time costs (meta-device machinery, thread pool)
before = rss()
loaded = run(sys.argv[2])
print(rss() - before)
"""


def test_gguf_q4_0_memory_is_about_the_file_size(tmp_path):
    """A Q4_0 model (~18 M parameters, 10 MB) loaded and run once: the process grows by about the file size,
    not by the 72 MB its float32 weights would take."""
    d, ff, layers, vocab = 512, 1536, 4, 4096
    small, big = str(tmp_path / "small.gguf"), str(tmp_path / "big.gguf")
    write_random_llama_gguf(small, 64, 64, 1, 300, tied=True)
    write_random_llama_gguf(big, d, ff, layers, vocab, tied=True)
    size = os.path.getsize(big)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    grew = int(subprocess.run([sys.executable, "-c", _RSS_SCRIPT, small, big], capture_output=True, text=True,
                              env=env, check=True).stdout.split()[-1])
    float_size = 4 * (vocab * d + layers * (4 * d * d + 3 * ff * d))
    # the file's pages, the q/k rows copied into rope order (2/7 of a layer's bytes), activations
    assert grew <= 1.5 * size + 8 * 2**20, f"RSS grew {grew / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
    assert grew < float_size / 2


# ------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3", "phi3_tied", "gpt2"])
def test_gguf_logits_match_llama_cpp(tmp_path, kind, qtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    hf, arch = make_hf(kind)
    tok = train_bpe("gpt-2", vocab_size=300)
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, qtype, tokenizer_meta=bpe_gguf_metadata(tok, "gpt-2", pad_to=V))
    # float32 KV cache (type 0): llama.cpp's default f16 cache alone differs by ~1e-4
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, V, 21)]
    llm.eval(ids)
    ref = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    out = _logits(load_gguf(path).model, torch.tensor([ids]))[0]
    # Relative to the largest logit. F32: float32 rounding in a different order (measured ~3e-7; gpt2 5e-5: ggml's
    # GELU is a float16 table). Q8_0/Q4_0: both round activations to 8-bit blocks, in different kernels (measured
    # 0.3-0.9%)
    assert_close(out, ref, rtol_of_max=1e-4 if qtype == "F32" else 2e-2, name=f"{kind} {qtype}: logits vs llama.cpp")


def test_gguf_embedding_checks_ids(tmp_path):
    hf, arch = make_hf("llama_tied")
    path = str(tmp_path / "m.gguf")
    write_gguf(hf, arch, path, "Q8_0")
    model = load_gguf(path).model
    with pytest.raises(ValueError, match="idx"):
        model(torch.tensor([[0, V]]))


@pytest.mark.parametrize("kind, source", [("llama", "gguf-Q8_0"), ("qwen2", "hf"), ("gpt2", "gguf-F32"),
                                          ("qwen3", "hf"), ("qwen3", "gguf-Q8_0"), ("gemma2", "hf"),
                                          ("gemma3", "hf"), ("phi3", "gguf-Q8_0"), ("phi3_tied", "gguf-Q8_0")])
def test_engine_runs_loaded_models(tmp_path, kind, source):
    """The serving engine given a path: its greedy tokens are the loaded model's own greedy tokens."""
    engine = pytest.importorskip("flashlm.runtime.engine")
    from flashlm.runtime.sampling_params import SamplingParams

    tok = train_bpe("gpt-2", vocab_size=300)
    hf, arch = make_hf(kind)
    if source == "hf":
        hf.save_pretrained(tmp_path, safe_serialization=True)
        tok.save(str(tmp_path / "tokenizer.json"))
        path = str(tmp_path)
    else:
        path = str(tmp_path / "m.gguf")
        write_gguf(hf, arch, path, source[5:], tokenizer_meta=bpe_gguf_metadata(tok, "gpt-2", pad_to=V))
    llm = engine.LLM(path, max_model_len=64, kv_cache_memory="8MiB")
    out = llm.generate(["the quick brown", "hello"], SamplingParams(temperature=0, max_tokens=6))
    ids = torch.tensor([tok.encode("the quick brown").ids])
    want = generate(load_model(path).model, ids, 6, temperature=0)[0, ids.shape[1]:].tolist()
    assert out[0].outputs[0].token_ids == want


def test_load_model_dispatch(tmp_path):
    with pytest.raises(ValueError, match="is not a GGUF file, model directory or training checkpoint"):
        load_model(tmp_path / "nothing")
