"""LoRA adapters exported for llama.cpp (flashlm.train.lora_gguf): a random adapter on tiny random llama
(GQA, so q and k are permuted with different head counts) and qwen2 models, written as a GGUF adapter and
applied by llama.cpp itself (llama-cpp-python, skipped where it is not installed) to the base exported as an
F32 GGUF. Reference: flashlm's own base + adapter (unmerged LoRA layers); greedy tokens over 32 steps must be
equal and the logits along them close. gguf-py's reader checks the file's keys, names and ggml shapes.
gpt2's adapters (fused attn_qkv, also with a dense B) are read back by flashlm's runtime (`LLM(base, lora=...)`)
and compared with the original LoRA model and with llama.cpp.
"""

import math

import gguf
import numpy as np
import pytest
import torch

from compare import assert_close
from flashlm.io.lora_adapter import load_lora
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams
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


def gpt2_run(llm, prompt, steps):
    """flashlm runtime's greedy tokens after prompt (LLM with an adapter)."""
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    return list(prompt) + list(out.outputs[0].token_ids)


@pytest.mark.parametrize("rslora,targets", [(False, GPT2_TARGETS), (True, "k,v,fc")])
def test_gpt2_adapter_read_back(rslora, targets, tokenizer, tmp_path):
    """gpt2's exported adapter (fused attn_qkv) on the GGUF base in flashlm's runtime: the tokens and logits of
    flashlm's model with the original LoRA, and of llama.cpp with the same two files."""
    cfg, model = with_adapter("gpt2", rslora=rslora, targets=targets)
    export_gguf(model_state_without_lora(model), cfg, tokenizer.to_str(), tmp_path / "base.gguf")
    export_lora_gguf(model, tmp_path / "a.gguf")
    prompt = tokenizer.encode("The quick").ids
    want = generate(model, torch.tensor([prompt]), 32, temperature=0)[0].tolist()
    llm = LLM(str(tmp_path / "base.gguf"), lora=str(tmp_path / "a.gguf"), max_num_seqs=2)
    assert gpt2_run(llm, prompt, 32) == want
    # the block-diagonal B read back at rank r per projection, only where the original has LoRA
    wrapped = lora_layers(llm.model)
    assert sorted(wrapped) == sorted(lora_layers(model)) and all(m.r == 4 for m in wrapped.values())
    with torch.no_grad():
        got_logits = llm.model(torch.tensor([want[:-1]]))[0][0].numpy()
        want_logits = model(torch.tensor([want[:-1]]))[0][0].numpy()
    assert_close(got_logits, want_logits, atol=1e-4, name="flashlm runtime adapter vs original LoRA")
    ref_tokens, ref_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "base.gguf",
                                                              lora_path=str(tmp_path / "a.gguf")), prompt, want)
    assert_close(got_logits, ref_logits, atol=LOGIT_TOL["gpt2", "F32"], name="flashlm runtime vs llama.cpp")
    assert ref_tokens == want


def write_adapter(path, arch, alpha, tensors):
    """A GGUF LoRA adapter file written with gguf-py: tensors {name: array in torch order}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name, data in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gpt2_dense_qkv_adapter_matches_llama_cpp(tokenizer, tmp_path):
    """An attn_qkv adapter whose B is dense (as llama.cpp's converter writes from a fused PEFT LoRA), rank 5 and
    alpha 7: flashlm's runtime applies it as llama.cpp does (alpha / 5 on all of B A)."""
    cfg, model = make_model("gpt2")
    export_gguf(model.state_dict(), cfg, tokenizer.to_str(), tmp_path / "base.gguf")
    rng = np.random.default_rng(3)
    d, R = cfg.d_model, 5
    tensors = {}
    for i in range(cfg.n_layer):
        tensors[f"blk.{i}.attn_qkv.weight.lora_a"] = rng.normal(0, 1 / math.sqrt(d), (R, d))
        tensors[f"blk.{i}.attn_qkv.weight.lora_b"] = rng.normal(0, 0.3 / math.sqrt(R) * R / 7, (3 * d, R))
    write_adapter(tmp_path / "a.gguf", "gpt2", 7.0, tensors)
    prompt = tokenizer.encode("The quick").ids
    llm = LLM(str(tmp_path / "base.gguf"), lora=str(tmp_path / "a.gguf"), max_num_seqs=2)
    got = gpt2_run(llm, prompt, 32)
    ref = llama_cpp_model(tmp_path / "base.gguf", lora_path=str(tmp_path / "a.gguf"))
    ref_tokens, ref_logits = llama_cpp_greedy(ref, prompt, got)
    with torch.no_grad():
        got_logits = llm.model(torch.tensor([got[:-1]]))[0][0].numpy()
        base_logits = model(torch.tensor([got[:-1]]))[0][0].numpy()
    assert np.abs(base_logits - ref_logits).max() > 0.1  # the adapter really changes the output
    assert_close(got_logits, ref_logits, atol=LOGIT_TOL["gpt2", "F32"], name="dense attn_qkv: flashlm vs llama.cpp")
    assert ref_tokens == got


@pytest.mark.parametrize("tensors,match", [
    ({"blk.0.attn_qkv.weight.lora_a": (4, 64), "blk.0.attn_qkv.weight.lora_b": (128, 4)},
     r"blk.0.attn_qkv.weight.lora_b has shape \(128, 4\), the model's blocks.0.attn.q \+ blocks.0.attn.k \+ "
     r"blocks.0.attn.v needs \(192, 4\)"),
    ({"blk.0.attn_qkv.weight.lora_a": (4, 32), "blk.0.attn_qkv.weight.lora_b": (192, 4)},
     r"blk.0.attn_qkv.weight.lora_a has shape \(4, 32\)"),
    ({"blk.0.attn_qkv.weight.lora_a": (4, 64), "blk.0.attn_qkv.weight.lora_b": (192, 3)},
     r"blk.0.attn_qkv.weight.lora_b has shape \(192, 3\)"),
    ({"blk.0.attn_qkv.weight.lora_a": (4, 64)}, "blk.0.attn_qkv has lora_a without its pair"),
    ({"blk.0.attn_q.weight.lora_a": (4, 64), "blk.0.attn_q.weight.lora_b": (64, 4)}, "names no block linear"),
    ({"blk.0.ffn_gate.weight.lora_a": (4, 64), "blk.0.ffn_gate.weight.lora_b": (64, 4)}, "names no block linear"),
])
def test_gpt2_bad_adapters_are_named(tensors, match, tmp_path):
    cfg, model = make_model("gpt2")
    assert cfg.d_model == 64
    path = write_adapter(tmp_path / "a.gguf", "gpt2", 8.0, {k: np.zeros(s) for k, s in tensors.items()})
    with pytest.raises(ValueError, match=match):
        load_lora(model, path)
    assert not lora_layers(model)  # nothing was wrapped
