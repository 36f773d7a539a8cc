"""Prompt- and prefix-tuning adapters in the runtime (`LLM(base, lora=PEFT_DIR)`): PEFT's prompt embeddings, or
its per-layer keys and values, put before every request's prompt. Reference: HF `peft` on the same random HF
base (llama with GQA, gpt2) and adapter, one prompt at a time; flashlm runs several prompts of different
lengths in one batch, with native_decoder on and off (on an HF base the module path runs either way: the
native stack takes GGUF blocks; the GGUF case is test_prefix_on_gguf_base_runs_native). Greedy tokens must
be equal and each sampled token's log-probability close to PEFT's. The reference is PeftModel's forward over
the whole sequence at each step (the model the adapter is trained as). Its generate
(peft 0.21, transformers 5.25) disagrees with that forward after the first token for prefix tuning (with and
without its KV cache) and for prompt tuning with its cache; prompt tuning's generate(use_cache=False) is
checked to give the same tokens too.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from compare import assert_close  # noqa: E402

from flashlm.runtime.engine import LLM  # noqa: E402
from flashlm.runtime.sampling_params import SamplingParams  # noqa: E402

V, P, STEPS = 320, 5, 12  # V: room for test_export's tokenizer (300) in the GGUF base
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


@pytest.fixture(scope="module", params=[("llama", "prompt"), ("gpt2", "prompt"), ("llama", "prefix"),
                                        ("gpt2", "prefix")], ids="-".join)
def base_and_adapter(request, tmp_path_factory):
    """(HF base dir, PEFT prompt- or prefix-tuning adapter dir, the PeftModel) with a random table."""
    arch, kind = request.param
    root = tmp_path_factory.mktemp(arch + kind)
    hf = _hf_model(arch)
    hf.save_pretrained(root / "base", safe_serialization=True)
    config = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():  # the scale of the model's own embeddings, so the prompt really moves the logits
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", pm


@torch.no_grad()
def _peft_greedy(pm, prompt):
    """PEFT's greedy tokens after prompt (its forward over the whole sequence each step), and the
    log-probability of each."""
    seq, logprobs = list(prompt), []
    for _ in range(STEPS):
        logits = pm(input_ids=torch.tensor([seq])).logits[0, -1].float()
        seq.append(int(logits.argmax()))
        logprobs.append(torch.log_softmax(logits, -1)[seq[-1]].item())
    if pm.peft_config["default"].peft_type == peft.PeftType.PROMPT_TUNING:
        out = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=STEPS, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0)
        assert out[0, -STEPS:].tolist() == seq[len(prompt):], "PEFT's generate vs its forward"
    return seq[len(prompt):], logprobs


@pytest.mark.parametrize("native", [True, False])
def test_virtual_tokens_match_peft(base_and_adapter, native):
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


def test_prefix_on_gguf_base_runs_native(base_and_adapter, tmp_path):
    """llama's prefix tuning on the base as a Q8_0 GGUF (blocks the native decoder stack runs): the native stack
    reads the prefix's K/V from the cache and gives the module path's tokens and logprobs."""
    base, adapter, pm = base_and_adapter
    if pm.peft_config["default"].peft_type != peft.PeftType.PREFIX_TUNING or pm.config.model_type != "llama":
        pytest.skip("llama prefix tuning: the native stack runs llama, and prompt tuning's table steps it aside")
    from flashlm.io import load_hf
    from flashlm.train.export import export_gguf
    from test_export import tokenizer as make_tokenizer

    loaded = load_hf(base).model
    export_gguf(loaded, loaded.cfg, make_tokenizer.__wrapped__().to_str(), tmp_path / "base.gguf", type="Q8_0")
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    runs = []
    for native in (True, False):
        llm = LLM(str(tmp_path / "base.gguf"), lora=str(adapter), native_decoder=native)
        runs.append([o.outputs[0] for o in llm.generate(PROMPTS, params)])
        assert (llm.runner.native_decoder() is not None) == native
    plain = LLM(str(tmp_path / "base.gguf")).generate(PROMPTS, params)
    for got, want, base_out in zip(*runs, plain):
        assert got.token_ids == want.token_ids and got.token_ids != base_out.outputs[0].token_ids
        assert_close(torch.tensor([e[t].logprob for e, t in zip(got.logprobs, got.token_ids)]),
                     torch.tensor([e[t].logprob for e, t in zip(want.logprobs, want.token_ids)]), atol=1e-4,
                     name="native vs module logprobs")


def test_chunked_prefill_splits_the_virtual_tokens(base_and_adapter):
    """A token budget of 3 a step: steps of placeholders alone, and chunks that end or start inside them."""
    base, adapter, pm = base_and_adapter
    llm = LLM(str(base), lora=str(adapter), max_num_seqs=2, max_num_batched_tokens=3)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _peft_greedy(pm, prompt)[0]


def _edited_adapter(adapter, dst, config=None, table=None):
    """A copy of the PEFT adapter dir at dst with config fields and/or the table replaced."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if table is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file({k: table(v) for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst


def test_bad_virtual_token_adapters(base_and_adapter, tmp_path):
    base, adapter, _ = base_and_adapter
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        LLM(str(base), lora=str(_edited_adapter(adapter, tmp_path / "a", table=lambda t: t[:, :-1].contiguous())))
    with pytest.raises(ValueError, match="num_virtual_tokens: must be a positive integer"):
        LLM(str(base), lora=str(_edited_adapter(adapter, tmp_path / "b", {"num_virtual_tokens": 0})))
    with pytest.raises(NotImplementedError, match="prefix_projection"):
        LLM(str(base), lora=str(_edited_adapter(adapter, tmp_path / "c", {"prefix_projection": True})))
    with pytest.raises(ValueError, match="num_layers=7"):
        LLM(str(base), lora=str(_edited_adapter(adapter, tmp_path / "d", {"num_layers": 7})))
    with pytest.raises(NotImplementedError, match="draft_model: speculative decoding"):
        LLM(str(base), lora=str(adapter), draft_model=str(base))
