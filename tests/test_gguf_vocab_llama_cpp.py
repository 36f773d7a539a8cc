"""GGUF tokenizers against llama.cpp's own tokenizer tests and its tokenizer.

Every ggml-vocab-*.gguf in llama.cpp's models/ folder (from the llama-cpp-python sdist, found as
tests/llama_cpp_ref.py finds it; skipped, naming FLASHLM_LLAMA_CPP_SRC, when absent) either loads and
tokenizes every string of its .inp file into the ids of its .out file (with no special tokens added and
special-token text read as text, as llama.cpp's test-tokenizer-0 runs them), or is refused with an error
naming what is not supported. Then random strings, drawn from an alphabet that mixes the cases the
pre-tokenizers treat differently, are tokenized by flashlm and by llama.cpp itself (llama_cpp, vocab_only)
with parse_special on and off, with and without the model's own special tokens. A vocabulary without
.inp/.out files (nomic-bert-moe's t5 Unigram, aquila, baichuan, gpt-neox) gets every string of the other
vocabularies' .inp files compared with llama.cpp's tokens instead.
"""

import glob
import os
import random
from functools import lru_cache

import pytest

import llama_cpp_ref
from flashlm.io.gguf import GGUFFile
from flashlm.io.gguf_vocab import tokenizer_from_gguf

# vocabularies llama.cpp tokenizes with a model flashlm does not build: the model it names (none at present)
UNSUPPORTED = {}
N_RANDOM = 60  # random strings per vocabulary and setting


def _vocab_paths():
    d = llama_cpp_ref.vocab_dir()
    if d is None:
        reason = f"llama.cpp's tokenizer test data absent: set {llama_cpp_ref.ENV_VAR} to a llama-cpp-python sdist"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    paths = sorted(glob.glob(os.path.join(d, "ggml-vocab-*.gguf")))
    return [pytest.param(p, id=os.path.basename(p)[len("ggml-vocab-"):-len(".gguf")]) for p in paths]


VOCABS = _vocab_paths()


def _name(path):
    return os.path.basename(path)[len("ggml-vocab-"):-len(".gguf")]


@lru_cache(maxsize=2)
def _flashlm(path):
    return tokenizer_from_gguf(GGUFFile(path).metadata)


def _cases(path):
    """(text, ids) pairs, read as llama.cpp's test-tokenizer-0 reads them."""
    with open(path + ".inp", encoding="utf-8", newline="") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(path + ".out", encoding="utf-8", newline="") as f:
        outs = f.read().split("\n")
    assert len(outs) >= len(texts), path
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


@pytest.mark.parametrize("path", VOCABS)
def test_llama_cpp_tokenizer_data(path):
    name = _name(path)
    if name in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[name]):
            tokenizer_from_gguf(GGUFFile(path).metadata)
        return
    tok = _flashlm(path)
    assert tok is not None
    if not os.path.exists(path + ".inp"):
        pytest.skip(f"{name}: no .inp/.out strings (the random comparison covers it)")
    cases = _cases(path)
    assert len(cases) > 20
    bad = [(text, got, want) for text, want in cases
           if (got := tok.encode(text, add_special_tokens=False, parse_special=False)) != want]
    assert not bad, f"{name}: {len(bad)} of {len(cases)} strings differ, first {bad[0]!r}"


def _all_test_strings():
    texts = []
    for inp in sorted(glob.glob(os.path.join(llama_cpp_ref.vocab_dir(), "ggml-vocab-*.gguf.inp"))):
        texts += [text for text, _ in _cases(inp[:-len(".inp")])]
    return texts


@pytest.mark.parametrize("path", VOCABS)
def test_every_test_string_matches_llama_cpp(path):
    """The vocabularies without expectations of their own: every string of the test data, tokenized by
    llama.cpp and by flashlm (special-token text as text, with and without the model's special tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    name = _name(path)
    if os.path.exists(path + ".inp"):
        pytest.skip(f"{name}: has its own .inp/.out (test_llama_cpp_tokenizer_data)")
    tok = _flashlm(path)
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    texts = _all_test_strings()
    assert len(texts) > 300
    try:
        for add_special in (False, True):
            bad = [(text, got, want) for text in texts
                   if (want := ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)) !=
                   (got := tok.encode(text, add_special_tokens=add_special, parse_special=False))]
            assert not bad, f"{name}: {len(bad)} of {len(texts)} strings differ, first {bad[0]!r}"
    finally:
        ref.close()


# pieces the pre-tokenizers split differently: letters of several scripts and cases, digits in runs,
# contractions, punctuation and symbols (ASCII and not), whitespace kinds and runs, CJK, marks, emoji
_PIECES = [
    "a", "b", "Z", "Hello", "WORLD", "camelCase", "é", "É", "ß", "ǅ", "Ω", "ω", "Ж", "ж", "ع", "א", "क्", "ก", "中",
    "文", "の", "カ", "한", "🦙", "👍🏽", "\u0301", "0", "1", "7", "42", "1234567", "٣", "½", "'s", "'T", "'ll", "'RE",
    "!", "?", ".", ",", "-", "_", "$", "+", "<", "=", ">", "^", "~", "|", "`", "(", ")", "[", "]", "{", "}", "/", "\\",
    "@", "#", "%", "&", "*", ":", ";", '"', "«", "»", "“", "”", "…", "—", "·", "€", "©", "！", "，", "。", "、", "　",
    " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u2009", "\u200b", "\x0b", "\x0c", "\x85",
    "\u2028", "\x1c", "\x00", "\x7f", "\ufffd", "\u00ad", "\ufeff", "\n" * 40, " " * 20, "1" * 20, "▁", "Ġ", "##",
    "<0x41>"]


def _strings(tok, seed, n):
    """n random strings; some include the vocabulary's special tokens' text."""
    rng = random.Random(seed)
    specials = [t for t in tok.backend.get_added_tokens_decoder().values() if t.special][:8]
    pieces = _PIECES + [t.content for t in specials]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def _known_difference(name, parse_special, text, specials):
    """Why flashlm's tokens for `text` are known to differ from llama.cpp's, or None.
    - bert: "▁" inside a word starts a new word piece in llama.cpp (its vocabulary spells word starts
      "▁word"); a WordPiece model sees it as an ordinary character.
    - phi-3 strips the whitespace after its special tokens: llama.cpp only ASCII whitespace (C isspace),
      tokenizers' rstrip every Unicode whitespace."""
    if name == "bert-bge" and "\u2581" in text:
        return "U+2581 in a BERT word"
    if name == "phi-3" and parse_special and any(
            text[i + len(s):i + len(s) + 1].isspace() and not text[i + len(s)].isascii()
            for s in specials for i in range(len(text)) if text.startswith(s, i)):
        return "non-ASCII whitespace after a phi-3 special token"
    return None


@pytest.mark.parametrize("path", VOCABS)
def test_random_strings_match_llama_cpp(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    name = _name(path)
    if name in UNSUPPORTED:
        pytest.skip(f"{name}: not supported (test_llama_cpp_tokenizer_data checks the refusal)")
    tok = _flashlm(path)
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values()]
    compared = 0
    try:
        for seed, (add_special, parse_special) in enumerate(((False, False), (False, True), (True, False))):
            for text in _strings(tok, seed, N_RANDOM):
                if _known_difference(name, parse_special, text, specials):
                    continue
                want = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
                got = tok.encode(text, add_special_tokens=add_special, parse_special=parse_special)
                assert got == want, (name, add_special, parse_special, text)
                compared += 1
    finally:
        ref.close()
    assert compared >= 2 * N_RANDOM, f"{name}: only {compared} of {3 * N_RANDOM} strings compared"


@lru_cache(maxsize=1)
def _small_bpe():
    from tokenizer_sources import train_bpe

    return train_bpe("qwen2")


def _byte_level_names():
    from flashlm.io.gguf_pretok import PRE_TOKENIZERS

    return sorted(name for name, pre in PRE_TOKENIZERS.items() if pre.byte_level)


@pytest.mark.parametrize("pre", _byte_level_names())
def test_every_pre_tokenizer_matches_llama_cpp(tmp_path, pre):
    """Each tokenizer.ggml.pre flashlm accepts, on a small byte-level vocabulary written under that name:
    llama.cpp's tokens for random strings (its split regexes, ignore_merges and add_bos for the name)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizer_sources import bpe_gguf_metadata, write_vocab_gguf

    path = str(tmp_path / "vocab.gguf")
    write_vocab_gguf(path, bpe_gguf_metadata(_small_bpe(), pre, add_bos=None))
    tok = tokenizer_from_gguf(GGUFFile(path).metadata)
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        for seed, (add_special, parse_special) in enumerate(((False, False), (True, True))):
            for text in _strings(tok, seed, N_RANDOM):
                want = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
                got = tok.encode(text, add_special_tokens=add_special, parse_special=parse_special)
                assert got == want, (pre, add_special, parse_special, text)
    finally:
        ref.close()


@pytest.mark.parametrize("pre", ["kimi-k2", "afmoe", "youtu", "no-such-pre"])
def test_unsupported_pre_tokenizer_is_named(pre):
    from tokenizer_sources import bpe_gguf_metadata

    meta = {key: value for key, value, *_ in bpe_gguf_metadata(_small_bpe(), pre)}
    with pytest.raises(ValueError, match=rf"tokenizer\.ggml\.pre '{pre}' is not supported \(supported: .*qwen35"):
        tokenizer_from_gguf(meta)


def test_parse_special_spells_special_tokens_as_text():
    """parse_special=False: a special token's text becomes the tokens that spell it, and decodes back to it."""
    from tokenizer_sources import bpe_gguf_metadata

    tok = tokenizer_from_gguf({key: value for key, value, *_ in bpe_gguf_metadata(_small_bpe(), "qwen2")})
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.encode("a<|endoftext|>b") == [tok.token_to_id("a"), eot, tok.token_to_id("b")]
    plain = tok.encode("a<|endoftext|>b", parse_special=False)
    assert eot not in plain and tok.decode(plain) == "a<|endoftext|>b"
    assert tok.encode("a<|endoftext|>b") == [tok.token_to_id("a"), eot, tok.token_to_id("b")]  # unchanged
