"""`flashlm export RUN` of a fine-tuning run (flashlm.train.export_run): a LoRA run on a tiny F32 GGUF llama base
exported as a PEFT directory, a llama.cpp GGUF adapter and merged GGUF / HF models.

References: the tuned model as `flashlm finetune` trained it (its FineTuner's model, base + unmerged adapter);
llama.cpp (llama-cpp-python, skipped where it is not installed) applying the GGUF adapter to the unchanged base
file and loading the merged file; flashlm's loaders reading the merged files and load_peft the PEFT directory.
"""

import numpy as np
import pytest
import torch

from compare import assert_close
from flashlm.cli import main as cli_main
from flashlm.io import load_model
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.simple_generate import generate
from flashlm.train.peft import load_peft
from test_export import llama_cpp_greedy
from test_sft import backend, base_run, data_files, gguf_bases, tuner  # noqa: F401 (fixtures)

X = [5, 9, 12, 3, 40, 41, 7]


@pytest.fixture(scope="module")
def lora_run(gguf_bases, data_files, tmp_path_factory):
    """A LoRA run on the F32 GGUF base, trained hard enough (lr 0.05) that the adapter moves the logits."""
    out = tmp_path_factory.mktemp("lora") / "run"
    t = tuner(gguf_bases["F32"], data_files, out, "lora", max_steps=4, eval_interval=4, ckpt_interval=4, lr=0.05,
              target="q,k,v,o,gate,up,down")
    t.train()
    with torch.no_grad():
        tuned = t.model.eval()(torch.tensor([X]))[0][0]
    return out, t.model.tuned.eval(), tuned


def logits(model, ids=X):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def test_exports_match_the_tuned_model(lora_run, gguf_bases, tmp_path):
    run, tuned_model, want = lora_run
    base = load_model(gguf_bases["F32"]).model
    assert (logits(base) - want).abs().max() > 0.1  # the adapter matters
    out = tmp_path / "out"
    assert cli_main(["export", str(run), "--peft", str(out / "peft"), "--lora-gguf", str(out / "a.gguf"),
                     "--gguf", str(out / "merged.gguf"), "--hf", str(out / "hf"), "--quiet"]) == 0
    assert_close(logits(load_peft(base, out / "peft")), want, atol=1e-5, name="PEFT directory on the base")
    assert_close(logits(load_model(out / "merged.gguf").model), want, atol=1e-4, name="merged GGUF in flashlm")
    llm = LLM(str(out / "merged.gguf"), max_num_seqs=2)  # the runtime (native decoder stack) on the merged file
    greedy = generate(tuned_model, torch.tensor([X]), 16, temperature=0)[0].tolist()[len(X):]
    got = llm.generate([X], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids
    assert list(got) == greedy
    assert_close(logits(load_model(out / "hf").model), want, atol=1e-4, name="merged HF in flashlm")


def llama_cpp(path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=48, n_batch=48, n_threads=2, logits_all=True, type_k=0,
                           type_v=0, verbose=False, **kwargs)


def test_llama_cpp_runs_the_adapter_and_the_merged_file(lora_run, gguf_bases, tmp_path):
    run, tuned_model, _ = lora_run
    assert cli_main(["export", str(run), "--lora-gguf", str(tmp_path / "a.gguf"), "--gguf",
                     str(tmp_path / "merged.gguf"), "--quiet"]) == 0
    want = generate(tuned_model, torch.tensor([X]), 32, temperature=0)[0].tolist()
    want_logits = logits(tuned_model, want[:-1]).numpy()
    for what, llm in (("base + GGUF adapter", llama_cpp(gguf_bases["F32"], lora_path=str(tmp_path / "a.gguf"))),
                      ("merged GGUF", llama_cpp(tmp_path / "merged.gguf"))):
        got, got_logits = llama_cpp_greedy(llm, X, want)
        assert_close(got_logits, want_logits, atol=3e-5, name=f"llama.cpp {what} vs flashlm")
        assert got == want, what


def test_merged_export_requantizes(lora_run, tmp_path):
    run, _, want = lora_run
    assert cli_main(["export", str(run), "--gguf", str(tmp_path / "m.gguf"), "--type", "Q8_0", "--quiet"]) == 0
    loaded = load_model(tmp_path / "m.gguf")
    assert type(loaded.model.blocks[0].attn.q).__name__ == "GGUFLinear"
    # Q8_0's rounding of logits of this size: the export tests' Q8_0 bound
    assert_close(logits(loaded.model), want, atol=0.15, name="merged Q8_0 GGUF")


def test_bad_requests_are_one_line_errors(lora_run, base_run, gguf_bases, data_files, tmp_path, capsys):
    run, _, _ = lora_run
    assert cli_main(["export", str(base_run), "--peft", str(tmp_path / "p")]) == 2
    assert "training run's, with no adapter" in capsys.readouterr().err
    assert cli_main(["export", str(run)]) == 2
    assert "a PEFT directory or a GGUF adapter path" in capsys.readouterr().err
    prompt = tuner(base_run, data_files, tmp_path / "prompt", "prompt", max_steps=1, ckpt_interval=1, eval_interval=1)
    prompt.train()
    assert cli_main(["export", str(tmp_path / "prompt"), "--lora-gguf", str(tmp_path / "a.gguf")]) == 2
    assert "method is prompt" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "prompt"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "a prompt run has no merged form" in capsys.readouterr().err
    q = tuner(base_run, data_files, tmp_path / "q", "qlora", max_steps=1, ckpt_interval=1, eval_interval=1)
    q.train()
    assert cli_main(["export", str(tmp_path / "q"), "--hf", str(tmp_path / "hf")]) == 2
    assert "quantized to int4/int8 on load (blocks.0.attn.q" in capsys.readouterr().err


def test_merged_export_of_a_quantized_gguf_base_keeps_its_mix(gguf_bases, data_files, tmp_path):
    """LoRA on a Q8_0 GGUF base: the blocks dequantized, the adapter added, Q8_0 again by default."""
    from gguf import GGUFReader

    t = tuner(gguf_bases["Q8_0"], data_files, tmp_path / "run", "lora", max_steps=4, eval_interval=4,
              ckpt_interval=4, lr=0.05)
    t.train()
    want = logits(t.model.eval())
    assert (logits(load_model(gguf_bases["Q8_0"]).model) - want).abs().max() > 0.1
    assert cli_main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]) == 0
    types = {r.name: r.tensor_type.name for r in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    # the merged weights rounded to Q8_0 once more: the export tests' Q8_0 bound
    assert_close(logits(load_model(tmp_path / "m.gguf").model), want, atol=0.15, name="merged Q8_0 base")
