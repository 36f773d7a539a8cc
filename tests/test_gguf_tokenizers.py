"""GGUF tokenizers as flashlm.io reads them (tokenizer_from_gguf through load_gguf), against the tokenizers
library and sentencepiece models they were written from, and against llama.cpp's own tokenizer where llama_cpp
imports. llama.cpp's full vocabulary test data: tests/test_gguf_vocab_llama_cpp.py."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_to_gguf import write_gguf  # noqa: E402
from tokenizer_sources import (CHAT_TEMPLATE, SAMPLES, bpe_gguf_metadata, spm_gguf_metadata,  # noqa: E402
                               train_bpe, train_spm)

from flashlm.io import load_gguf  # noqa: E402


def _tiny_llama_with_vocab(n: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                        num_attention_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_gguf_bpe_tokenizer_matches_source(tmp_path, pre):
    tok = train_bpe(pre)
    path = str(tmp_path / "m.gguf")
    write_gguf(_tiny_llama_with_vocab(tok.get_vocab_size()), "llama", path, "F32",
               tokenizer_meta=bpe_gguf_metadata(tok, pre, chat_template=CHAT_TEMPLATE))
    loaded = load_gguf(path)
    t = loaded.tokenizer
    assert loaded.eos_token_ids == [0] and loaded.chat_template == CHAT_TEMPLATE
    for text in SAMPLES:
        assert t.encode(text) == tok.encode(text).ids, (pre, text)
        assert t.decode(t.encode(text)) == text.replace("<|endoftext|>", "")
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|endoftext|><|user|>\nhi")


def test_gguf_spm_tokenizer_matches_sentencepiece(tmp_path):
    sp = train_spm()
    n = sp.get_piece_size()
    path = str(tmp_path / "m.gguf")
    write_gguf(_tiny_llama_with_vocab(n + 3), "llama", path, "F32", tokenizer_meta=spm_gguf_metadata(sp, n + 3))
    t = load_gguf(path).tokenizer
    assert t.bos_token_id == 1 and t.eos_token_ids == [2]
    assert t.decode(t.encode("hello") + [n + 1]) == "hello"  # an UNUSED [PAD] row decodes to nothing
    for text in SAMPLES:
        want = [sp.bos_id()] + sp.encode(text)
        got = t.encode(text)
        assert got == want, (text, [sp.id_to_piece(i) for i in want], [t.id_to_token(i) for i in got])
        assert t.decode(got) == sp.decode(want), text
        assert t.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.parametrize("edit, match", [
    ({"tokenizer.ggml.merges": ["a zz"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.unknown_token_id"),
    ({"tokenizer.ggml.pre": "kimi-k2"}, "tokenizer.ggml.pre 'kimi-k2' is not supported"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.tokens": ["a", 3]}, "tokenizer.ggml.tokens"),
])
def test_gguf_tokenizer_metadata_errors(edit, match):
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    meta = {key: value for key, value, *_ in bpe_gguf_metadata(train_bpe("gpt-2", vocab_size=300), "gpt-2")}
    with pytest.raises(ValueError, match=match):
        tokenizer_from_gguf({**meta, **edit})


def test_gguf_unknown_pre_tokenizer_raises(tmp_path):
    tok = train_bpe("gpt-2")
    path = str(tmp_path / "m.gguf")
    write_gguf(_tiny_llama_with_vocab(tok.get_vocab_size()), "llama", path, "F32",
               tokenizer_meta=bpe_gguf_metadata(tok, "mystery-bpe"))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery-bpe'"):
        load_gguf(path)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "spm"])
def test_gguf_tokenizer_matches_llama_cpp(tmp_path, pre):
    llama_cpp = pytest.importorskip("llama_cpp")
    if pre == "spm":
        sp = train_spm()
        n = sp.get_piece_size() + 3
        meta = spm_gguf_metadata(sp, n)
    else:
        bpe = train_bpe(pre)
        n = bpe.get_vocab_size()
        meta = bpe_gguf_metadata(bpe, pre, add_bos=None)  # llama.cpp's default: BOS for llama-bpe only
    path = str(tmp_path / "m.gguf")
    write_gguf(_tiny_llama_with_vocab(n), "llama", path, "F32", tokenizer_meta=meta)
    t = load_gguf(path).tokenizer
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    for text in SAMPLES + ["<|endoftext|>hello</s>world<s>", "  multiple   spaces  ", "\n\n\n", "a"]:
        for special in (True, False):
            # add_bos=True: llama.cpp adds BOS when the vocabulary says so, as add_special_tokens does
            want = vocab.tokenize(text.encode(), add_bos=special, special=True)
            assert t.encode(text, add_special_tokens=special) == want, (pre, text, special)
