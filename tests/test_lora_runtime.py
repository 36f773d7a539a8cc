"""A base plus a LoRA adapter, unmerged, in flashlm's runtime (flashlm.io.lora_adapter): `LLM(base, lora=PATH)`
and `flashlm generate --model BASE --lora PATH`, PATH a fine-tuning run folder, the PEFT directory and the GGUF
adapter exported from it.

Reference: the tuned model as `flashlm finetune` trained it (test_export_run's LoRA run on a tiny F32 GGUF llama
base), its greedy tokens from simple_generate, module by module. Mismatches (another model's adapter, a file
that is not an adapter, a missing pair) must be errors naming the tensor and both shapes.
"""

import gguf
import pytest
import torch

from flashlm.cli import main as cli_main
from flashlm.io import load_model
from flashlm.io.lora_adapter import load_lora
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.simple_generate import generate
from test_export_run import X, lora_run, logits  # noqa: F401 (fixture)
from test_sft import backend, base_run, data_files, gguf_bases, tuner  # noqa: F401 (fixtures)

STEPS = 32


@pytest.fixture(scope="module")
def adapters(lora_run, tmp_path_factory):
    run = lora_run[0]
    out = tmp_path_factory.mktemp("adapters")
    assert cli_main(["export", str(run), "--peft", str(out / "peft"), "--lora-gguf", str(out / "a.gguf"),
                     "--quiet"]) == 0
    return {"run folder": str(run), "PEFT directory": str(out / "peft"), "GGUF adapter": str(out / "a.gguf")}


@pytest.mark.parametrize("kind", ["run folder", "PEFT directory", "GGUF adapter"])
def test_llm_runs_base_plus_adapter(kind, lora_run, adapters, gguf_bases):
    _, tuned, want_logits = lora_run
    want = generate(tuned, torch.tensor([X]), STEPS, temperature=0)[0].tolist()[len(X):]
    llm = LLM(gguf_bases["F32"], lora=adapters[kind], max_num_seqs=2)
    out = llm.generate([X], SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))[0]
    assert list(out.outputs[0].token_ids) == want, kind
    torch.testing.assert_close(logits(llm.model), want_logits, rtol=0, atol=1e-5)
    plain = LLM(gguf_bases["F32"], max_num_seqs=2)
    base_out = plain.generate([X], SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))[0]
    assert list(base_out.outputs[0].token_ids) != want  # the adapter changes what is generated


def test_generate_command_takes_lora(adapters, gguf_bases, capsys):
    args = ["generate", "--model", gguf_bases["F32"], "--prompt", "red", "--max-tokens", "12", "--temperature", "0",
            "--ignore-eos"]
    outputs = []
    for extra in ([], ["--lora", adapters["run folder"]], ["--lora", adapters["GGUF adapter"]]):
        assert cli_main(args + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[1] == outputs[2] != outputs[0]
    assert cli_main(args + ["--lora", "/nonexistent/adapter"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_command_takes_lora(adapters, gguf_bases, monkeypatch):
    """`flashlm serve --lora`: the served engine's model has the adapter (uvicorn.run replaced: no server)."""
    uvicorn = pytest.importorskip("uvicorn")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    assert cli_main(["serve", gguf_bases["F32"], "--lora", adapters["GGUF adapter"], "--port", "0"]) == 0
    assert type(served["app"].state.server.llm.model.blocks[0].attn.q).__name__ == "LoRALinear"


def other_model_adapter(tmp_path, **overrides):
    """A GGUF adapter file written with gguf-py for a llama of other sizes (or other keys)."""
    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), overrides.pop("arch", "llama"))
    w.add_type(overrides.pop("type", "adapter"))
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for name, shape in overrides.pop("tensors", {"blk.0.attn_q.weight.lora_a": (4, 32),
                                                  "blk.0.attn_q.weight.lora_b": (64, 4)}).items():
        w.add_tensor(name, torch.zeros(shape).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "other.gguf"


@pytest.mark.parametrize("overrides,match", [
    ({}, r"blk.0.attn_q.weight.lora_a has shape \(4, 32\), the model's blocks.0.attn.q needs \(4, 64\)"),
    ({"tensors": {"blk.0.attn_q.weight.lora_a": (4, 64), "blk.0.attn_q.weight.lora_b": (32, 4)}},
     r"blk.0.attn_q.weight.lora_b has shape \(32, 4\), the model's blocks.0.attn.q needs \(64, 4\)"),
    ({"arch": "qwen2"}, "general.architecture is 'qwen2', expected 'llama'"),
    ({"type": "model"}, "general.type is 'model', expected 'adapter'"),
    ({"tensors": {"blk.9.attn_q.weight.lora_a": (4, 64)}}, "names no block linear of this model"),
    ({"tensors": {"blk.0.attn_q.weight.lora_a": (4, 64)}}, "lora_a without its pair"),
    ({"tensors": {"blk.0.attn_q.weight.lora_a": (4, 64), "blk.0.attn_q.weight.lora_b": (64, 3)}},
     r"lora_b has shape \(64, 3\), the model's blocks.0.attn.q needs \(64, 4\)"),
])
def test_mismatched_adapters_are_named(overrides, match, gguf_bases, tmp_path):
    model = load_model(gguf_bases["F32"]).model
    with pytest.raises(ValueError, match=match):
        load_lora(model, other_model_adapter(tmp_path, **overrides))
    assert not any(".lora_" in k for k in model.state_dict())  # nothing was wrapped


def test_other_sources_are_refused(gguf_bases, base_run, lora_run, tmp_path):
    model = load_model(gguf_bases["F32"]).model
    with pytest.raises(ValueError, match="general.type is None, expected 'adapter'"):
        load_lora(model, gguf_bases["F32"])  # a model file, not an adapter
    with pytest.raises(ValueError, match="neither a PEFT adapter directory"):
        load_lora(model, base_run)  # a training run: no adapter/
    with pytest.raises(TypeError, match="lora: expected a path"):
        LLM(gguf_bases["F32"], lora=3)


def test_llm_runs_an_adapter_on_gguf_blocks(gguf_bases, data_files, tmp_path):
    """A LoRA run on the Q8_0 GGUF base: the adapter on the unchanged blocks, as run folder and GGUF adapter."""
    t = tuner(gguf_bases["Q8_0"], data_files, tmp_path / "run", "lora", max_steps=4, eval_interval=4,
              ckpt_interval=4, lr=0.05)
    t.train()
    tuned = t.model.tuned.eval()
    want = generate(tuned, torch.tensor([X]), STEPS, temperature=0)[0].tolist()[len(X):]
    assert cli_main(["export", str(tmp_path / "run"), "--lora-gguf", str(tmp_path / "a.gguf"), "--quiet"]) == 0
    for lora in (tmp_path / "run", tmp_path / "a.gguf"):
        llm = LLM(gguf_bases["Q8_0"], lora=str(lora), max_num_seqs=2)
        assert type(llm.model.blocks[0].attn.q.base).__name__ == "GGUFLinear"
        out = llm.generate([X], SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))[0]
        assert list(out.outputs[0].token_ids) == want, lora
