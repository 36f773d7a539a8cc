"""Prompt-tuning adapters in the runtime (`LLM(base, lora=PEFT_DIR)`): PEFT's prompt embeddings put before every
request's prompt. Reference: HF `peft`'s PeftModel.generate on the same random HF base (llama with GQA, gpt2)
and adapter, one prompt at a time; flashlm runs several prompts of different lengths in one batch, with the
native decoder on and off (the module path runs: the native stack steps aside for the virtual tokens' table).
Greedy tokens must be equal and each sampled token's log-probability close to PEFT's. PEFT's generate runs
without its KV cache (use_cache=False): with it (peft 0.21, transformers 5.25) the tokens after the first
disagree with PeftModel's own forward over the same sequence, which use_cache=False and flashlm both equal.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from compare import assert_close  # noqa: E402

from flashlm.runtime.engine import LLM  # noqa: E402
from flashlm.runtime.sampling_params import SamplingParams  # noqa: E402

V, P, STEPS = 160, 5, 12
PROMPTS = [[5, 17, 33], [90, 4, 4, 61, 150, 2, 77, 8], [120]]


def _hf_model(arch):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False, attn_implementation="eager")
        return transformers.LlamaForCausalLM(cfg).eval()
    # GPT-2's init (std 0.02) gives one token over and over: a wider one makes the greedy tokens vary
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                  eos_token_id=1, initializer_range=0.2, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base_and_adapter(request, tmp_path_factory):
    """(HF base dir, PEFT prompt-tuning adapter dir, the PeftModel) with random prompt embeddings."""
    root = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param)
    hf.save_pretrained(root / "base", safe_serialization=True)
    pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    with torch.no_grad():  # the scale of the model's own embeddings, so the prompt really moves the logits
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", pm


def _peft_greedy(pm, prompt):
    """PEFT's greedy tokens after prompt, and the log-probability of each."""
    out = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=STEPS, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, -STEPS:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("native", [True, False])
def test_prompt_tuning_matches_peft(base_and_adapter, native):
    base, adapter, pm = base_and_adapter
    llm = LLM(str(base), lora=str(adapter), native_decoder=native)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, params)
    plain = LLM(str(base), native_decoder=native).generate(PROMPTS, params)
    for prompt, out, base_out in zip(PROMPTS, outs, plain):
        want, want_logprobs = _peft_greedy(pm, prompt)
        got = out.outputs[0]
        assert out.prompt_token_ids == prompt  # the virtual tokens are not the request's
        assert got.token_ids == want, f"prompt {prompt}: flashlm {got.token_ids} vs PEFT {want}"
        got_logprobs = [entry[t].logprob for entry, t in zip(got.logprobs, got.token_ids)]
        assert_close(torch.tensor(got_logprobs), torch.tensor(want_logprobs), atol=1e-4, name="logprobs")
        assert base_out.outputs[0].token_ids != want  # without the adapter the answer differs: it is applied


def test_virtual_tokens_count_towards_the_context(base_and_adapter):
    base, adapter, _ = base_and_adapter
    llm = LLM(str(base), lora=str(adapter), max_model_len=16)
    with pytest.raises(ValueError, match="prompt: 16 tokens leave no room"):
        llm.generate([list(range(11))], SamplingParams(max_tokens=1))
    out = llm.generate([list(range(10))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"  # 5 + 10 + 1 = 16
    with pytest.raises(NotImplementedError, match="prompt_logprobs"):
        llm.generate([[1, 2]], SamplingParams(prompt_logprobs=1))


def test_server_completions_answer_with_the_adapter(base_and_adapter):
    """`/v1/completions` of a server over LLM(base, lora=adapter): PEFT's greedy tokens for token-id prompts."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_server import MODEL_NAME, RunningServer

    base, adapter, pm = base_and_adapter
    with RunningServer(LLM(str(base), lora=str(adapter))) as server:
        for prompt in PROMPTS[:2]:
            r = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": STEPS, "temperature": 0,
                                 "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["token_ids"] == _peft_greedy(pm, prompt)[0]
            assert r.json()["usage"]["prompt_tokens"] == len(prompt)
