"""GGUF tokenizers as flashlm.io reads them (tokenizer_from_gguf through load_gguf), against the tokenizers
library and sentencepiece models they were written from, and against llama.cpp's own tokenizer where llama_cpp
imports. llama.cpp's full vocabulary test data: tests/test_gguf_vocab_llama_cpp.py."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_to_gguf import write_gguf  # noqa: E402
from tokenizer_sources import (CHAT_TEMPLATE, SAMPLES, UGM_USER_DEFINED, bpe_gguf_metadata,  # noqa: E402
                               spm_gguf_metadata, train_bpe, train_spm, train_ugm, ugm_gguf_metadata,
                               write_vocab_gguf)

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
    ({"tokenizer.ggml.model": "rwkv"}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.scores"),
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


def _ugm_meta():
    sp, proto = train_ugm()
    return sp, {key: value for key, value, *_ in ugm_gguf_metadata(sp, proto)}


def test_gguf_unigram_tokenizer_matches_sentencepiece():
    """A t5 (Unigram) vocabulary with NFKC rules in its precompiled charsmap and whitespace collapsing: the
    ids sentencepiece gives, then </s>, for text without user-defined symbols (llama.cpp splits those off
    first, as special tokens, where sentencepiece matches them inside its segmentation)."""
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    sp, meta = _ugm_meta()
    t = tokenizer_from_gguf(meta)
    assert t.eos_token_ids == [sp.eos_id()] and t.vocab_size == sp.get_piece_size()
    texts = SAMPLES + ["ｈｅｌｌｏ  ＷＯＲＬＤ", "cafe\u0301 ½ ① ﬁ", "  lots   of   space  ", "\u3000x\u00a0y"]
    for text in texts:
        if any(u in text for u in UGM_USER_DEFINED):
            continue
        ids = sp.encode(text)
        assert t.encode(text) == ids + [sp.eos_id()], text
        if sp.unk_id() not in ids:  # sentencepiece spells an unknown piece " ⁇ ", decode drops it
            assert t.decode(t.encode(text)) == sp.decode(ids), text


def test_gguf_unigram_tokenizer_matches_llama_cpp(tmp_path):
    """The same vocabulary through llama.cpp: random strings (charsmap rules, user-defined symbols and their
    prefixes, special tokens' text), parse_special on and off, with and without </s>."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_gguf_vocab_llama_cpp import _strings

    from flashlm.io.gguf import GGUFFile
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    sp, proto = train_ugm()
    path = str(tmp_path / "ugm.gguf")
    write_vocab_gguf(path, ugm_gguf_metadata(sp, proto))
    t = tokenizer_from_gguf(GGUFFile(path).metadata)
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    extra = ["ab<sep>x@@y", "a</s>b<pad> <unk>", "ａｂ ｈｅｌｌｏ", "e\u0301 ½ ①", "  lots   of   space  "]
    try:
        for seed, (add_special, parse_special) in enumerate(((False, False), (True, True), (True, False))):
            for text in SAMPLES + extra + _strings(t, seed, 200):
                want = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
                got = t.encode(text, add_special_tokens=add_special, parse_special=parse_special)
                assert got == want, (add_special, parse_special, text)
    finally:
        ref.close()


def _one_rule_charsmap(strings: bytes, offset: int = 0) -> bytes:
    """A precompiled charsmap mapping "a" to the string at `offset` of `strings`: 512 trie nodes, the root's
    base 256, the leaf for "a" at 256 ^ 0x61 leading to the node at 300 that holds the offset."""
    import struct

    nodes = [0] * 512
    nodes[0] = 256 << 10
    nodes[256 ^ 0x61] = ((256 ^ 0x61 ^ 300) << 10) | (1 << 8) | 0x61
    nodes[300] = offset
    return struct.pack("<I", 4 * len(nodes)) + struct.pack(f"<{len(nodes)}I", *nodes) + strings


def test_unigram_charsmap_walk():
    from flashlm.io.gguf_ugm import Charsmap

    cm = Charsmap(_one_rule_charsmap(b"xyz\0"))
    assert cm.longest(b"ab", 0) == (1, b"xyz") and cm.longest(b"ba", 0) == (0, b"")
    assert cm.longest(b"ba", 1) == (1, b"xyz")


@pytest.mark.parametrize("charsmap, match", [
    ([1, 0], "fewer than its 4-byte header"),
    ([8, 0, 0, 0, 0, 0, 0, 0], "more than the"),
    ([4, 0, 0, 0, 0x61, 0x62, 0x63, 0x64, 0], "trie index"),
    (list(_one_rule_charsmap(b"x")), "not NUL-terminated"),
    (list(_one_rule_charsmap(b"x\0", offset=2)), "outside its strings"),
])
def test_gguf_unigram_bad_charsmap_raises(charsmap, match):
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    _, meta = _ugm_meta()
    with pytest.raises(ValueError, match=f"precompiled_charsmap.*{match}"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.precompiled_charsmap": charsmap})


def test_gguf_unigram_low_scored_tokens():
    """An UNUSED token scored below every NORMAL one is left out when it can never be chosen; one that could
    be (a single character nothing else covers) is refused rather than segmented differently."""
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    sp, meta = _ugm_meta()
    tokens, types, scores = (list(meta[f"tokenizer.ggml.{k}"]) for k in ("tokens", "token_type", "scores"))
    plain = tokenizer_from_gguf(meta)
    tokens += ["helloworld", "\u2603"]
    types += [5, 5]
    scores += [-10000.0, -10000.0]
    edit = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores}
    with pytest.raises(ValueError, match="'\u2603'.*could be chosen"):
        tokenizer_from_gguf({**meta, **edit})
    tokens[-1], types[-1] = "\u2604\u2604", 5
    padded = tokenizer_from_gguf({**meta, **edit})
    for text in ("helloworld", "hello world \u2604\u2604"):
        assert padded.encode(text) == plain.encode(text), text


def test_gguf_unigram_token_bytes_and_plain_copy():
    """A t5 tokenizer (its normalizer is Python code, which tokenizers cannot serialize) still gives the bytes
    of each token for structured outputs, and reads special-token text as text from a copy built anew."""
    from flashlm.io.gguf_vocab import tokenizer_from_gguf
    from flashlm.runtime.token_bytes import token_bytes

    sp, meta = _ugm_meta()
    t = tokenizer_from_gguf(meta)
    pieces = token_bytes(t, t.vocab_size)
    assert pieces[sp.eos_id()] == b"\xff</s>" and pieces[t.token_to_id("@@")] == b"@@"
    assert pieces[t.token_to_id("\u2581")] == b" "
    plain = t.encode("a</s>", parse_special=False)
    assert sp.eos_id() not in plain[:-1] and plain == sp.encode("a</s>") + [sp.eos_id()]
