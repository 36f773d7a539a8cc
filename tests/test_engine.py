"""The serving engine (LLM) on random-weight models: its paged forward against the model's own full-sequence
forward, greedy generation against one-at-a-time recomputation, continuous batching, chunked prefill,
preemption under a tiny KV budget, prefix caching, seeds, stop rules, streaming and metrics."""

import pytest
import torch

from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.engine import LLM
from flashlm.runtime.model_runner import parse_bytes
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.simple_generate import generate

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"


class CharTokenizer:
    """One token per character; id 0 is the end of text."""
    eos_token_ids = (0,)

    def encode(self, text, add_special_tokens=True):
        return [1 + ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))


VOCAB = len(ALPHABET) + 1


def make_model(arch="llama", seed=0, seq_len=96):
    kw = dict(n_kv_head=2) if arch != "gpt2" else {}
    cfg = ModelConfig(arch=arch, vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, seq_len=seq_len, **kw)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the initialisation: sharper, more varied next-token choices
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    return model


def greedy_reference(model, prompt_ids, max_tokens, eos=0):
    out = generate(model, torch.tensor([prompt_ids]), max_tokens, temperature=0, eos_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


PROMPTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog. " * 2, "abc abc abc abc",
           "what is this?", "x" * 40, "no.", "some text, with punctuation!"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_paged_logits_match_full_forward(arch):
    model = make_model(arch)
    llm = LLM(model, CharTokenizer(), block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    tok = CharTokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    checked = 0
    while llm.scheduler.has_work():
        batch = llm.scheduler.schedule()
        llm.runner.copy_blocks(batch.block_copies)
        tokens, paged = llm.runner.prepare(batch, llm.block_manager)
        logits = model.forward_paged(tokens, paged, llm.runner.kv_caches)
        sampling = [seq for seq, s in zip(batch.seqs, batch.sampling) if s]
        for row, seq in zip(logits, sampling):
            full, _ = model(torch.tensor([seq.token_ids]))
            err = (row - full[0, -1]).abs().max().item()
            assert err < 1e-4 * max(1.0, full.abs().max().item()), f"seq {seq.seq_id} at {seq.num_tokens}: {err}"
            checked += 1
        llm.scheduler.update(batch, logits.argmax(-1).tolist())
    assert checked == 4 * 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", [
    dict(max_num_seqs=16, max_num_batched_tokens=512),                      # everything at once
    dict(max_num_seqs=3, max_num_batched_tokens=16, block_size=4),          # chunked prefill, few slots
    dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=2, kv_cache_memory=None),  # tiny KV: preemption
], ids=["roomy", "chunked", "tiny-kv"])
def test_batched_greedy_equals_one_at_a_time(arch, kw):
    model = make_model(arch)
    tok = CharTokenizer()
    kw = dict(kw)
    if "kv_cache_memory" in kw:  # enough for two full-length sequences only
        from flashlm.runtime.model_runner import kv_bytes_per_block
        kw["kv_cache_memory"] = 2 * (96 // 2) * kv_bytes_per_block(model, 2, torch.float32)
    llm = LLM(model, tok, **kw)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 30, 5, 20, 25, 8, 30, 17)]
    outs = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        want = greedy_reference(model, tok.encode(prompt), p.max_tokens)
        assert out.outputs[0].token_ids == want, f"prompt {prompt!r}"
        assert out.outputs[0].text == tok.decode(want)
        assert out.finished and out.metrics.time_to_first_token >= 0
    if "kv_cache_memory" in kw:
        assert llm.scheduler.num_preemptions > 0
    assert llm.block_manager.seq_ids() == []


def test_prefix_caching_changes_nothing_but_hits():
    model = make_model("llama", seed=1)
    tok = CharTokenizer()
    shared = "the same long system prompt, shared by all. "
    prompts = [shared + q for q in ("one?", "two!", "three.", "four")]
    params = SamplingParams(temperature=0, max_tokens=10)
    results = []
    for caching in (True, False):
        llm = LLM(model, tok, block_size=4, enable_prefix_caching=caching, max_num_seqs=1)
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        if caching:
            assert llm.block_manager.stats.hit_tokens >= 3 * (len(shared) // 4 * 4 - 4)
    assert results[0] == results[1]


def test_seeded_sampling_is_reproducible_in_any_batch():
    model = make_model("llama", seed=2)
    tok = CharTokenizer()
    params = SamplingParams(temperature=1.0, top_k=10, max_tokens=15, seed=123, ignore_eos=True)
    alone = LLM(model, tok).generate("seeded", params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=20)] * 3
    crowd = LLM(model, tok, seed=9).generate(["abc", "seeded", "xyz", "q"], [others[0], params, others[1], others[2]])
    assert crowd[1].outputs[0].token_ids == alone
    two = LLM(model, tok).generate("seeded", SamplingParams(temperature=1.0, max_tokens=15, seed=5, n=2,
                                                             ignore_eos=True))[0]
    assert len(two.outputs) == 2 and two.outputs[0].token_ids != two.outputs[1].token_ids


def test_stop_rules_and_metrics():
    model = make_model("llama", seed=3)
    tok = CharTokenizer()
    llm = LLM(model, tok)
    free = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop = text[5:7]
    cut = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].text == text[:text.find(stop)] and cut.outputs[0].finish_reason == "stop"
    by_id = llm.generate("stop here", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop_token_ids=[free.token_ids[3]]))[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[3]) + 1]
    m = cut.metrics
    assert m.time_to_first_token >= 0 and m.finished_time >= m.first_token_time
    assert free.token_ids and llm.generate("stop here", SamplingParams(temperature=0, max_tokens=30,
                                                                      ignore_eos=True))[0].metrics.time_per_output_token > 0


def test_stream_grows_to_the_generate_result():
    model = make_model("gpt2", seed=4)
    tok = CharTokenizer()
    llm = LLM(model, tok)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    chunks = list(llm.stream("streaming", params))
    assert [len(c.outputs[0].token_ids) for c in chunks] == list(range(1, 13))
    assert chunks[-1].finished and not chunks[0].finished
    assert chunks[-1].outputs[0].token_ids == llm.generate("streaming", params)[0].outputs[0].token_ids


def test_abort_frees_blocks_and_leaves_the_others_exact():
    model = make_model("llama", seed=5)
    tok = CharTokenizer()
    llm = LLM(model, tok, block_size=4, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    running, kept, waiting = (llm.add_request(p, params) for p in ("abort me", "keep going", "never run"))
    for _ in range(3):
        llm.step()
    assert len(llm.block_manager.seq_ids()) == 2 and len(llm.scheduler.waiting) == 1  # two decoding, one waits
    assert llm.abort_request(running) and llm.abort_request(waiting)
    assert not llm.abort_request(running) and not llm.abort_request(10**6)
    assert running not in llm._requests and len(llm.block_manager.seq_ids()) == 1  # only "keep going" holds blocks
    outs = {}
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o) for o in llm.step())
    assert outs[kept].outputs[0].token_ids == greedy_reference(model, tok.encode("keep going"), 20)
    assert llm.block_manager.seq_ids() == [] and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    with pytest.raises(TypeError, match="request_id"):
        llm.abort_request("0")


def test_bad_requests():
    model = make_model("llama", seq_len=32)
    llm = LLM(model, CharTokenizer())
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("x" * 32)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[1, 2, VOCAB]])
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(model, CharTokenizer(), kv_cache_memory=1000)
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model)
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes(10) == 10
    for prompts, name in ((None, "prompts"), ({"a": 1}, "prompts"), ([[1, 1.5]], r"prompt\[1\]"),
                          ([[1, True]], r"prompt\[1\]"), (["ab", 3], "prompt"), (3, "prompts")):
        with pytest.raises(TypeError, match=f"^{name}"):
            llm.generate(prompts)
    with pytest.raises(TypeError, match="^sampling_params"):
        llm.generate("ab", {"temperature": 0})
    assert llm.generate([]) == []


@pytest.mark.parametrize("kw, error, name", [
    (dict(max_num_seqs="4"), TypeError, "max_num_seqs"), (dict(max_num_seqs=2.5), TypeError, "max_num_seqs"),
    (dict(max_num_batched_tokens=0), ValueError, "max_num_batched_tokens"),
    (dict(block_size="16"), TypeError, "block_size"), (dict(max_model_len=0), ValueError, "max_model_len"),
    (dict(kv_cache_dtype=torch.int8), ValueError, "kv_cache_dtype"),
    (dict(kv_cache_dtype=torch.float64), ValueError, "kv_cache_dtype"),
    (dict(kv_cache_dtype="float32"), TypeError, "kv_cache_dtype"),
    (dict(seed=2**64), ValueError, "seed"), (dict(seed=-1), ValueError, "seed"), (dict(seed="x"), TypeError, "seed"),
    (dict(enable_prefix_caching="no"), TypeError, "enable_prefix_caching"),
    (dict(native_decoder=1), TypeError, "native_decoder"),
    (dict(draft_model=3), TypeError, "draft_model"),
])
def test_bad_engine_arguments_name_the_argument(kw, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        LLM(make_model("llama", seq_len=32), CharTokenizer(), **kw)


@pytest.mark.parametrize("model", [None, 3])
def test_model_must_be_a_path_or_a_transformer(model):
    with pytest.raises(TypeError, match="^model: "):
        LLM(model)


def test_bfloat16_kv_cache_generates():
    model = make_model("llama", seq_len=32)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = LLM(model, CharTokenizer(), kv_cache_dtype=torch.bfloat16).generate("hello", params)[0].outputs[0]
    assert len(out.token_ids) == 4 and all(0 <= t < VOCAB for t in out.token_ids)


def test_largest_seed_wraps_per_sample():
    """Sample i of a seeded request draws from seed + i mod 2^64: from the largest seed, sample 1 draws as seed 0."""
    llm = LLM(make_model("llama", seq_len=32), CharTokenizer())
    params = dict(temperature=1.0, max_tokens=6, ignore_eos=True)
    pair = llm.generate("ab", SamplingParams(n=2, seed=2**64 - 1, **params))[0].outputs
    assert pair[1].token_ids == llm.generate("ab", SamplingParams(seed=0, **params))[0].outputs[0].token_ids
    assert pair[0].token_ids == llm.generate("ab", SamplingParams(seed=2**64 - 1, **params))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_bytes("lots")


def test_max_tokens_zero_ends_after_the_prefill():
    model = make_model("llama", seed=6)
    llm = LLM(model, CharTokenizer(), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    zero, one = llm.generate(["score this prompt", "and this"], [SamplingParams(max_tokens=0),
                                                                 SamplingParams(temperature=0, max_tokens=1)])
    assert zero.finished and zero.outputs[0].token_ids == [] and zero.outputs[0].text == ""
    assert zero.outputs[0].finish_reason == "length" and zero.metrics.num_output_tokens == 0
    assert one.outputs[0].token_ids == greedy_reference(model, CharTokenizer().encode("and this"), 1)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_prompt_that_cannot_fit_the_kv_cache_is_refused_at_add_request():
    model = make_model("llama", seq_len=32)
    from flashlm.runtime.model_runner import kv_bytes_per_block
    llm = LLM(model, CharTokenizer(), block_size=4, kv_cache_memory=8 * kv_bytes_per_block(model, 4, torch.float32))
    llm.max_model_len = 64  # as if the context were longer than the cache: the cache's own bound must hold
    with pytest.raises(ValueError, match=r"^prompt: 32 tokens and one more do not fit the whole KV cache \(8 blocks"):
        llm.add_request([1] * 32, SamplingParams(max_tokens=1))
    assert llm.add_request([1] * 31, SamplingParams(max_tokens=1)) == 0 and not llm._requests[0].finished
