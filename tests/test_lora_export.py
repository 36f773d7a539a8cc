"""LoRA adapters exported for llama.cpp (flashlm.train.lora_gguf): a random adapter on tiny random llama
(GQA, so q and k are permuted with different head counts) and qwen2 models, written as a GGUF adapter and
applied by llama.cpp itself (llama-cpp-python, skipped where it is not installed) to the base exported as an
F32 GGUF. Reference: flashlm's own base + adapter (unmerged LoRA layers); greedy tokens over 32 steps must be
equal and the logits along them close. gguf-py's reader checks the file's keys, names and ggml shapes.
"""

import math

import numpy as np
import pytest
import torch

from compare import assert_close
from flashlm.runtime.simple_generate import generate
from flashlm.train.export import export_gguf
from flashlm.train.lora_gguf import export_lora_gguf
from flashlm.train.peft import apply_lora, lora_layers
from test_export import LOGIT_TOL, field, llama_cpp_greedy, llama_cpp_model, make_model, read_gguf, tokenizer  # noqa: F401 (fixture)

TARGETS = "q,k,v,o,gate,up,down"
GPT2_TARGETS = "q,k,v,o,fc,proj"


def with_adapter(name, r=4, alpha=8.0, rslora=False, seed=1, targets=TARGETS):
    """make_model's model with LoRA on the block linears targets names; A and B random (B A x about 0.3 of W x)."""
    cfg, model = make_model(name)
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha, targets=targets, rslora=rslora)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.normal_(0.0, 1.0 / math.sqrt(m.in_features))
            m.lora_B.normal_(0.0, 0.3 / math.sqrt(r) / m.scaling)
    return cfg, model.eval()


def test_file_layout(tokenizer, tmp_path):
    cfg, model = with_adapter("llama-gqa")
    export_lora_gguf(model, tmp_path / "a.gguf")
    reader, tensors = read_gguf(tmp_path / "a.gguf")
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(8.0)
    assert len(tensors) == 2 * 7 * cfg.n_layer
    kv = cfg.n_kv_head * cfg.head_dim
    # shapes in torch order (read_gguf reverses ggml's ne): A [r, in], B [out, r]
    assert tensors["blk.1.attn_k.weight.lora_a"][:2] == ("F32", (4, cfg.d_model))
    assert tensors["blk.1.attn_k.weight.lora_b"][:2] == ("F32", (kv, 4))
    assert tensors["blk.0.ffn_down.weight.lora_a"][:2] == ("F32", (4, cfg.d_ff))
    # B of k: its rows permuted as the base's k rows (half-rotation pairs -> adjacent pairs per head)
    b = lora_layers(model)["blocks.1.attn.k"].lora_B.detach().numpy()
    got = tensors["blk.1.attn_k.weight.lora_b"][2].reshape(kv, 4)
    hd = cfg.head_dim
    for h in range(cfg.n_kv_head):
        for i in range(hd // 2):
            np.testing.assert_array_equal(got[h * hd + 2 * i], b[h * hd + i])
            np.testing.assert_array_equal(got[h * hd + 2 * i + 1], b[h * hd + hd // 2 + i])


def test_gpt2_fused_qkv_layout(tmp_path):
    """gpt2's q and v pairs (k has none) as one attn_qkv pair: A stacked, B block-diagonal with B times 3."""
    cfg, model = with_adapter("gpt2", targets="q,v,proj")
    export_lora_gguf(model, tmp_path / "a.gguf")
    reader, tensors = read_gguf(tmp_path / "a.gguf")
    assert field(reader, "general.architecture") == "gpt2"
    assert sorted(tensors) == sorted(f"blk.{i}.{t}.weight.lora_{ab}" for i in range(cfg.n_layer)
                                     for t in ("attn_qkv", "ffn_down") for ab in "ab")
    d, r = cfg.d_model, 4
    a = tensors["blk.1.attn_qkv.weight.lora_a"][2].reshape(3 * r, d)
    b = tensors["blk.1.attn_qkv.weight.lora_b"][2].reshape(3 * d, 3 * r)
    layers = lora_layers(model)
    want_a = np.zeros((3 * r, d), np.float32)
    want_b = np.zeros((3 * d, 3 * r), np.float32)
    for i, m in ((0, "q"), (2, "v")):
        want_a[i * r:(i + 1) * r] = layers[f"blocks.1.attn.{m}"].lora_A.detach().numpy()
        want_b[i * d:(i + 1) * d, i * r:(i + 1) * r] = 3 * layers[f"blocks.1.attn.{m}"].lora_B.detach().numpy()
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)
    # ffn_down keeps rank r and its own B
    assert tensors["blk.0.ffn_down.weight.lora_a"][:2] == ("F32", (r, cfg.d_ff))


@pytest.mark.parametrize("name,rslora,targets", [("llama-gqa", False, TARGETS), ("llama-gqa", True, TARGETS),
                                                 ("qwen2", False, TARGETS), ("gpt2", False, GPT2_TARGETS),
                                                 ("gpt2", True, "k,v,fc")])
def test_llama_cpp_applies_adapter(name, rslora, targets, tokenizer, tmp_path):
    cfg, model = with_adapter(name, rslora=rslora, targets=targets)
    export_gguf(model_state_without_lora(model), cfg, tokenizer.to_str(), tmp_path / "base.gguf")
    export_lora_gguf(model, tmp_path / "a.gguf")
    llm = llama_cpp_model(tmp_path / "base.gguf", lora_path=str(tmp_path / "a.gguf"))
    prompt = tokenizer.encode("The quick").ids  # 7 tokens: with 32 more, within SEQ = 48
    want = generate(model, torch.tensor([prompt]), 32, temperature=0)[0].tolist()
    got, got_logits = llama_cpp_greedy(llm, prompt, want)
    with torch.no_grad():
        want_logits = model(torch.tensor([want[:-1]]))[0][0].numpy()
    # the base alone is off by far more: the adapter is really applied
    base_logits = llama_cpp_model(tmp_path / "base.gguf")
    base_logits.eval(want[:-1])
    assert np.abs(np.array(base_logits.scores[: len(want) - 1]) - want_logits).max() > 0.1
    # F32 throughout: the export tests' F32 tolerance (llama ~4e-6 measured; gpt2 ~1e-3, ggml's GELU table is f16)
    assert_close(got_logits, want_logits, atol=LOGIT_TOL[cfg.arch, "F32"],
                 name=f"{name}: llama.cpp base+adapter vs flashlm")
    assert got == want, f"{name}: llama.cpp greedy {got[len(prompt):]} vs flashlm {want[len(prompt):]}"


def model_state_without_lora(model):
    """The plain Transformer's state dict of the base under the LoRA layers."""
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base.", ".")] = value
    return state


def test_bad_input(tmp_path):
    _, model = make_model("qwen3")
    apply_lora(model, targets="q")
    with pytest.raises(NotImplementedError, match="llama, qwen2 and gpt2, not qwen3"):
        export_lora_gguf(model, tmp_path / "a.gguf")
    _, plain = make_model("llama-gqa")
    with pytest.raises(ValueError, match="no LoRA layers"):
        export_lora_gguf(plain, tmp_path / "a.gguf")
    _, model = with_adapter("llama-gqa")
    lora_layers(model)["blocks.0.attn.q"].merge()
    with pytest.raises(ValueError, match="blocks.0.attn.q is merged"):
        export_lora_gguf(model, tmp_path / "a.gguf")
