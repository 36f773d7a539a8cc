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
from test_export import field, llama_cpp_greedy, llama_cpp_model, make_model, read_gguf, tokenizer  # noqa: F401 (fixture)

TARGETS = "q,k,v,o,gate,up,down"


def with_adapter(name, r=4, alpha=8.0, rslora=False, seed=1):
    """make_model's model with LoRA on every block linear; A and B random (B A x about 0.3 of W x)."""
    cfg, model = make_model(name)
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha, targets=TARGETS, rslora=rslora)
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


@pytest.mark.parametrize("name,rslora", [("llama-gqa", False), ("llama-gqa", True), ("qwen2", False)])
def test_llama_cpp_applies_adapter(name, rslora, tokenizer, tmp_path):
    cfg, model = with_adapter(name, rslora=rslora)
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
    # F32 throughout: the export tests' llama F32 tolerance (measured errors there ~4e-6)
    assert_close(got_logits, want_logits, atol=3e-5, name=f"{name}: llama.cpp base+adapter vs flashlm")
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
    _, model = make_model("gpt2")
    apply_lora(model, targets="q")
    with pytest.raises(NotImplementedError, match="llama and qwen2, not gpt2"):
        export_lora_gguf(model, tmp_path / "a.gguf")
    _, plain = make_model("llama-gqa")
    with pytest.raises(ValueError, match="no LoRA layers"):
        export_lora_gguf(plain, tmp_path / "a.gguf")
    _, model = with_adapter("llama-gqa")
    lora_layers(model)["blocks.0.attn.q"].merge()
    with pytest.raises(ValueError, match="blocks.0.attn.q is merged"):
        export_lora_gguf(model, tmp_path / "a.gguf")
