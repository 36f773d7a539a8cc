"""A GGUF file without tokenizer metadata runs from token ids: its outputs carry the tokens and empty text (as
vLLM's skip_tokenizer_init gives them), what needs text is refused by name, and `flashlm bench-decode` (which
makes token-id prompts) runs on it. Reference: transformers' greedy tokens for the same weights."""

import subprocess
import sys

import pytest
import torch

from hf_to_gguf import write_gguf

from flashlm.runtime.engine import LLM
from flashlm.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    with torch.no_grad():  # sharper logits than the default init: greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    path = str(tmp_path_factory.mktemp("notok") / "model.gguf")
    write_gguf(model, "llama", path, "F32")  # no tokenizer_meta: no tokenizer.ggml.* keys
    return model, path


def test_token_id_prompts_generate_the_reference_tokens(model_file):
    hf, path = model_file
    prompt = [5, 17, 42, 7, 99]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):]
    with LLM(path) as llm:
        assert llm.tokenizer is None
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2))[0]
    assert out.outputs[0].token_ids == want.tolist()
    assert out.outputs[0].text == ""
    assert all(lp.decoded_token == "" for step in out.outputs[0].logprobs for lp in step.values())


@pytest.mark.parametrize("prompt, params, name", [
    ("hello", SamplingParams(max_tokens=2), "prompt"),
    ([1, 2], SamplingParams(max_tokens=2, stop=["x"]), "stop"),
])
def test_what_needs_text_is_refused_by_name(model_file, prompt, params, name):
    with LLM(model_file[1]) as llm:
        with pytest.raises(ValueError, match=rf"^{name}: .*no tokenizer|^{name}: .*has none"):
            llm.generate([prompt], params)


def test_bench_decode_runs_without_a_tokenizer(model_file):
    run = subprocess.run([sys.executable, "-m", "flashlm", "bench-decode", "--model", model_file[1],
                          "--prompt-tokens", "8", "--gen-tokens", "4", "--reps", "1", "--concurrency", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "decode (batch 1, 4 tokens)" in run.stdout
