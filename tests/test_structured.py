"""Structured outputs: the vocabulary handed to the grammar library as bytes (byte-level BPE and SentencePiece
tokenizers, against the texts they encode), the sampler's bitmask against a plain boolean mask, and the engine
on random-weight models with real tokenizers: sampled outputs at temperature 1 (several seeds, n > 1, beside
unconstrained requests, under preemption, with speculative decoding on) parse and validate with `jsonschema`;
bad schemas are refused at add_request."""

import json
import math

import jsonschema
import pytest
import torch

from flashlm.io.gguf_vocab import tokenizer_from_gguf
from flashlm.io.tokenizer import Tokenizer
from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.engine import LLM
from flashlm.runtime.model_runner import kv_bytes_per_block
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.structured import StructuredOutputsParams, apply_token_bitmask, token_bitmask
from flashlm.runtime.token_bytes import token_bytes
from tokenizer_sources import SAMPLES, spm_gguf_metadata, train_bpe, train_spm

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                         "kind": {"enum": ["cat", "dog", None]}}}


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer(train_bpe("gpt-2"), eos_token_ids=[0], bos_token_id=0)


@pytest.fixture(scope="module")
def spm():
    return tokenizer_from_gguf({key: value for key, value, *_ in spm_gguf_metadata(train_spm())})


def make_model(vocab_size, seed=0, seq_len=512):
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      seq_len=seq_len)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_byte_level_vocabulary_spells_what_it_encodes(pre):
    tok = Tokenizer(train_bpe(pre), eos_token_ids=[0])
    pieces = token_bytes(tok, tok.vocab_size + 2)
    assert pieces[0] == b"\xff<|endoftext|>" and pieces[-2:] == [b"", b""]  # special; past the tokenizer
    assert pieces[tok.token_to_id("Ġ")] == b" " and pieces[tok.token_to_id("Ċ")] == b"\n"
    for text in SAMPLES:
        ids = tok.encode(text.replace("<|endoftext|>", ""))
        assert b"".join(pieces[i] for i in ids) == text.replace("<|endoftext|>", "").encode(), text


def test_sentencepiece_vocabulary_spells_what_it_encodes(spm):
    pieces = token_bytes(spm, spm.vocab_size)
    assert pieces[1] == b"\xff<s>" and pieces[2] == b"\xff</s>"
    assert pieces[spm.token_to_id("<0x0A>")] == b"\n" and pieces[spm.token_to_id("<0xFF>")] == b"\xff"
    for text in filter(None, SAMPLES):
        ids = spm.encode(text, add_special_tokens=False)
        # The dummy prefix: SentencePiece starts a text with a space ("▁"), which decode() strips.
        assert b"".join(pieces[i] for i in ids) == (" " + text).encode(), text


def test_bitmask_masks_constrained_rows_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=gen)
    allowed = torch.rand(3, 70, generator=gen) < 0.3
    allowed[1] = True  # an unconstrained row
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    got = apply_token_bitmask(logits, bitmask)
    assert torch.equal(got, logits.masked_fill(~allowed, float("-inf")))
    assert token_bitmask([None, None], 70) is None


def generate_json(llm, params_list, prompts=None):
    outs = llm.generate(prompts or ["json please"] * len(params_list), params_list)
    return [c for o in outs for c in o.outputs]


def test_json_schema_outputs_validate_at_temperature_one(bpe):
    llm = LLM(make_model(bpe.vocab_size), bpe, block_size=8)
    so = StructuredOutputsParams(json=SCHEMA)
    free = SamplingParams(temperature=1.0, seed=99, max_tokens=40, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_outputs=so) for s in range(6)]
    params.append(SamplingParams(temperature=1.0, seed=50, n=3, max_tokens=200, structured_outputs=so))
    params.append(SamplingParams(temperature=0, max_tokens=200, structured_outputs=StructuredOutputsParams(
        json=json.dumps(SCHEMA)), logprobs=2))
    outs = generate_json(llm, params + [free], ["json please"] * len(params) + ["free text"])
    *constrained, unconstrained = outs
    assert len(constrained) == 6 + 3 + 1
    for out in constrained:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({c.text for c in constrained}) > 3  # it does sample
    alone = LLM(make_model(bpe.vocab_size), bpe, block_size=8).generate("free text", free)[0].outputs[0]
    assert unconstrained.token_ids == alone.token_ids  # batch neighbours with grammars leave it untouched
    greedy = constrained[-1]
    assert all(e[t].logprob > float("-inf") for t, e in zip(greedy.token_ids, greedy.logprobs))


def test_logprobs_of_a_constrained_request_are_those_of_the_masked_distribution(bpe):
    # The first token of an object with required properties must open it: a handful of tokens. Their
    # probabilities, renormalised by the mask, sum to 1; every other token reports -inf.
    llm = LLM(make_model(bpe.vocab_size), bpe, block_size=8)
    so = StructuredOutputsParams(json=SCHEMA)
    out = llm.generate("json please", SamplingParams(temperature=0, max_tokens=200, structured_outputs=so,
                                                     logprobs=20))[0].outputs[0]
    first = out.logprobs[0]
    finite = [e.logprob for e in first.values() if e.logprob > float("-inf")]
    assert 0 < len(finite) < len(first) - 1
    assert abs(sum(math.exp(lp) for lp in finite) - 1) < 1e-4
    assert all(bpe.decode([t]).startswith("{") for t, e in first.items() if e.logprob > float("-inf"))
    for token, entries in zip(out.token_ids, out.logprobs):  # greedy: the sampled token is the most likely
        assert entries[token].rank == 1


def test_json_object_outputs_are_objects(spm):
    llm = LLM(make_model(spm.vocab_size, seed=1), spm)
    so = StructuredOutputsParams(json_object=True)
    outs = generate_json(llm, [SamplingParams(temperature=1.0, seed=s, max_tokens=400, structured_outputs=so)
                               for s in range(4)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def test_preemption_does_not_advance_a_grammar_twice(bpe):
    model = make_model(bpe.vocab_size, seed=2, seq_len=96)
    tiny = dict(block_size=4, kv_cache_memory=24 * kv_bytes_per_block(model, 4, torch.float32), max_num_seqs=6)
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=150, structured_outputs=so) for s in range(6)]
    llm = LLM(model, bpe, **tiny)
    outs = generate_json(llm, params)
    assert llm.scheduler.num_preemptions > 0  # one sequence's worth of cache for six
    roomy = generate_json(LLM(model, bpe), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_speculative_decoding_leaves_constrained_requests_to_plain_steps(bpe):
    target, draft = make_model(bpe.vocab_size, seed=3), make_model(bpe.vocab_size, seed=4)
    llm = LLM(target, bpe, draft_model=draft, num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=200, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    out = generate_json(llm, [params])[0]
    assert llm.spec.num_proposed == 0
    assert out.token_ids == generate_json(LLM(target, bpe), [params])[0].token_ids
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"type": "string", "pattern": "(("},
                                    {"type": "integer", "minimum": 5, "maximum": 1}, {"$ref": "#/missing"}])
def test_a_schema_that_cannot_compile_is_refused_at_add_request(bpe, schema):
    llm = LLM(make_model(bpe.vocab_size, seq_len=64), bpe)
    with pytest.raises(ValueError, match="^structured_outputs: "):
        llm.add_request("x", SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)))
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize("kw, error", [
    (dict(), ValueError), (dict(json={"type": "object"}, json_object=True), ValueError),
    (dict(json="{not json"), ValueError), (dict(json=3), TypeError), (dict(json_object="yes"), TypeError),
])
def test_bad_structured_outputs_params_name_the_field(kw, error):
    with pytest.raises(error, match="^structured_outputs: "):
        StructuredOutputsParams(**kw)


def test_structured_outputs_must_be_the_params_class():
    with pytest.raises(TypeError, match="^structured_outputs: "):
        SamplingParams(structured_outputs={"json": {"type": "object"}})
    import flashlm.runtime

    assert flashlm.runtime.StructuredOutputsParams is StructuredOutputsParams
