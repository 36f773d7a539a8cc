"""Logprobs and prompt logprobs of the serving engine (LLM) against the model's own full-sequence forward:
each output token's log-probability under the distribution the sampler drew from (after penalties and
temperature), the top N and ranks against torch.topk, each prompt token's log-probability with chunked prefill,
prefix caching, preemption and batch neighbours that ask for none; max_tokens=0 scoring; speculative decoding
running such requests without speculation."""

import pytest
import torch

from compare import assert_close
from flashlm.runtime.engine import LLM
from flashlm.runtime.model_runner import kv_bytes_per_block
from flashlm.runtime.sampling_params import SamplingParams
from test_engine import VOCAB, CharTokenizer, make_model

TOK = CharTokenizer()
ATOL = 1e-4  # float32 logits of a paged, chunked forward against one full forward: ~1e-5 apart here


def full_logprobs(model, token_ids, temperature=1.0, repetition_penalty=1.0, num_prompt=None):
    """float64 [len(token_ids), V]: position p's next-token log-probabilities from one full forward, logits
    penalised by HF's rule (tokens seen up to p) and divided by the temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]))[0][0].double()
    if repetition_penalty != 1.0:
        for p in range(len(token_ids)):
            seen = torch.zeros(VOCAB, dtype=torch.bool)
            seen[torch.tensor(token_ids[:p + 1])] = True
            row = logits[p]
            logits[p] = torch.where(seen, torch.where(row > 0, row / repetition_penalty, row * repetition_penalty), row)
    return (logits / temperature).log_softmax(dim=-1)


def check_entry(entry, token, ref_row, n, name):
    """entry: {token_id: Logprob} for `token` and the top n of ref_row (float64 [V] log-probabilities)."""
    top = ref_row.topk(n)
    assert list(entry)[0] == token, name
    assert set(entry) == {token, *top.indices.tolist()}, name
    ranks = {t: r for r, t in enumerate(top.indices.tolist(), 1)}
    for t, lp in entry.items():
        assert lp.rank == ranks.get(t, int((ref_row > ref_row[t]).sum()) + 1), f"{name}: rank of token {t}"
        assert lp.decoded_token == TOK.decode([t])
    got = torch.tensor([lp.logprob for lp in entry.values()], dtype=torch.float64)
    assert_close(got, ref_row[list(entry)], atol=ATOL, rtol=1e-5, name=name)


@pytest.mark.parametrize("native", [True, False], ids=["native", "modules"])
def test_output_logprobs_are_those_of_the_sampled_distribution(native):
    model = make_model("llama", seed=7)
    llm = LLM(model, TOK, block_size=4, max_num_batched_tokens=8, max_num_seqs=4, native_decoder=native)
    prompts = ["logprobs please", "none for me", "greedy with a penalty", "three"]
    params = [SamplingParams(temperature=0.7, top_k=5, seed=11, max_tokens=12, logprobs=5, ignore_eos=True),
              SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=9, logprobs=0, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8, logprobs=20, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    assert outs[1].outputs[0].logprobs is None and outs[1].outputs[0].cumulative_logprob is None
    checked = 0
    for prompt, p, out in zip(prompts, params, outs):
        if p.logprobs is None:
            continue
        for sample in out.outputs:
            ids = TOK.encode(prompt) + sample.token_ids
            ref = full_logprobs(model, ids, max(p.temperature, 1.0) if p.greedy else p.temperature,
                                p.repetition_penalty)
            assert len(sample.logprobs) == len(sample.token_ids) == p.max_tokens
            start = len(ids) - len(sample.token_ids)
            for j, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
                check_entry(entry, token, ref[start + j - 1], p.logprobs, f"{prompt!r} token {j}")
                checked += 1
            if p.greedy:
                assert all(e[t].rank == 1 for t, e in zip(sample.token_ids, sample.logprobs))
            if p.top_k:  # sampled inside the top k, though the logprobs are of the whole distribution
                assert all(e[t].rank <= p.top_k for t, e in zip(sample.token_ids, sample.logprobs))
            want = sum(e[t].logprob for t, e in zip(sample.token_ids, sample.logprobs))
            assert sample.cumulative_logprob == pytest.approx(want, abs=1e-9)
    assert checked == 12 + 9 + 2 * 8


def check_prompt_logprobs(model, out, n):
    ids = out.prompt_token_ids
    ref = full_logprobs(model, ids)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        check_entry(out.prompt_logprobs[p], ids[p], ref[p - 1], n, f"prompt position {p}")


@pytest.mark.parametrize("kw", [
    dict(max_num_seqs=4, max_num_batched_tokens=512),  # whole prompts in one step
    dict(max_num_seqs=3, max_num_batched_tokens=8),  # chunked prefill
    dict(max_num_seqs=6, max_num_batched_tokens=64, block_size=2, tiny_kv=True),  # preemption recomputes
], ids=["whole", "chunked", "tiny-kv"])
def test_prompt_logprobs_equal_the_full_forward(kw):
    model = make_model("llama", seed=8)
    kw = dict(kw)
    if kw.pop("tiny_kv", False):  # two full-length sequences only
        kw["kv_cache_memory"] = 2 * (96 // 2) * kv_bytes_per_block(model, 2, torch.float32)
    llm = LLM(model, TOK, block_size=kw.pop("block_size", 4), **kw)
    gen = torch.Generator().manual_seed(0)
    shared = TOK.encode("a shared prefix of many blocks, ")
    # The first prompt fills the prefix cache; the later ones start with the same blocks, so a prompt_logprobs
    # request that took them from the cache would lack those positions.
    prompts = [shared + torch.randint(1, VOCAB, (int(n),), generator=gen).tolist() for n in (3, 20, 9, 30, 1, 14)]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=25, prompt_logprobs=4, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=12, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=0, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=20, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    for p, out in zip(params, outs):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            check_prompt_logprobs(model, out, p.prompt_logprobs)
    assert outs[3].outputs[0].token_ids == [] and outs[3].outputs[0].finish_reason == "length"
    if "kv_cache_memory" in kw:
        assert llm.scheduler.num_preemptions > 0
    else:
        assert llm.block_manager.stats.hit_tokens > 0  # the others did hit the cache
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_prompt_logprobs_of_a_one_token_prompt_and_of_n_samples():
    model = make_model("gpt2", seed=9)
    llm = LLM(model, TOK, block_size=4)
    one, many = llm.generate(["a", "several samples"], [SamplingParams(max_tokens=0, prompt_logprobs=3),
                                                         SamplingParams(n=3, max_tokens=4, prompt_logprobs=3)])
    assert one.prompt_logprobs == [None] and one.outputs[0].token_ids == []
    check_prompt_logprobs(model, many, 3)
    assert len(many.outputs) == 3


def test_speculative_decoding_runs_logprob_requests_without_speculation():
    target, draft = make_model("llama", seed=10), make_model("llama", seed=11)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=1, ignore_eos=True)
    plain = LLM(target, TOK).generate("speculate?", params)[0].outputs[0]
    llm = LLM(target, TOK, draft_model=draft, num_speculative_tokens=3)
    spec = llm.generate("speculate?", params)[0].outputs[0]
    assert llm.spec.num_proposed == 0
    assert spec.token_ids == plain.token_ids and len(spec.logprobs) == 10
    assert [list(e.items())[:2] for e in spec.logprobs] == [list(e.items())[:2] for e in plain.logprobs]
    llm.generate("speculate?", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert llm.spec.num_proposed > 0  # requests without logprobs still speculate


@pytest.mark.parametrize("kw, error", [
    (dict(logprobs=21), ValueError), (dict(logprobs=-1), ValueError), (dict(logprobs="3"), TypeError),
    (dict(prompt_logprobs=21), ValueError), (dict(prompt_logprobs=1.0), TypeError), (dict(logprobs=True), TypeError),
])
def test_bad_logprobs_name_the_field(kw, error):
    with pytest.raises(error, match=f"^{next(iter(kw))}: "):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [
    dict(max_num_batched_tokens=512),  # whole prompts in one step
    dict(max_num_batched_tokens=8),  # chunked prefill
], ids=["whole", "chunked"])
def test_prompt_logprobs_from_a_start_reuse_the_cached_prefix(kw):
    """prompt_logprobs_start=s: entries None before s, the rest equal to the full forward's, and the blocks
    before position s - 1 taken from the prefix cache (the context of several continuations computed once)."""
    model = make_model("llama", seed=12)
    llm = LLM(model, TOK, block_size=4, max_num_seqs=4, **kw)
    context = TOK.encode("a context shared by every continuation, ")
    conts = [TOK.encode(c) for c in (" yes", " no", " maybe so", "!")]
    params = SamplingParams(max_tokens=0, prompt_logprobs=2, prompt_logprobs_start=len(context))
    outs = llm.generate([context + c for c in conts], params)
    for out in outs:
        ids = out.prompt_token_ids
        ref = full_logprobs(model, ids)
        assert len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[:len(context)] == [None] * len(context)
        for p in range(len(context), len(ids)):
            check_entry(out.prompt_logprobs[p], ids[p], ref[p - 1], 2, f"prompt position {p}")
    # Whole prompts: the whole blocks of the context before position len(context) - 1, for every continuation
    # after the first. Chunked: some (hits past a sequence's first chunk are not looked for).
    cacheable = (len(context) - 1) // 4 * 4 if kw["max_num_batched_tokens"] > len(context) + 9 else 1
    assert llm.block_manager.stats.hit_tokens >= (len(conts) - 1) * cacheable > 0
    # A start past the prompt: no entries to compute, all None.
    out = llm.generate([context], SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=100))[0]
    assert out.prompt_logprobs == [None] * len(context)
    with pytest.raises(ValueError, match="^prompt_logprobs_start: "):
        SamplingParams(prompt_logprobs_start=0)
