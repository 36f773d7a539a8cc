"""A t5 (Unigram) GGUF vocabulary saved and read back (flashlm.io.gguf_vocab_json: its metadata in flashlm's
JSON form, since tokenizers' JSON cannot hold llama.cpp's charsmap walk), and exported with a model to GGUF.

Round trip: GGUF -> tokenizer_from_gguf -> to_str() -> tokenizer_from_json tokenizes every string as the
tokenizer loaded from the file (llama.cpp's tokenizer test strings and random ones, special tokens' text
parsed and not, with and without the model's own special tokens), for a sentencepiece Unigram vocabulary
trained here and for llama.cpp's own t5 vocabulary file (nomic-bert-moe's, from the llama-cpp-python sdist;
skipped without it); a checkpoint holding the text loads the same tokenizer. Export: export_gguf writes the
vocabulary's keys, and llama.cpp (llama_cpp) tokenizes with the exported file as flashlm does.
"""

import glob
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")

import llama_cpp_ref  # noqa: E402
from test_gguf_vocab_llama_cpp import _all_test_strings, _strings  # noqa: E402
from tokenizer_sources import SAMPLES, train_ugm, ugm_gguf_metadata, write_vocab_gguf  # noqa: E402

from flashlm.io.checkpoint_model import checkpoint_tokenizer  # noqa: E402
from flashlm.io.gguf import GGUFFile  # noqa: E402
from flashlm.io.gguf_vocab import tokenizer_from_gguf, tokenizer_from_json  # noqa: E402
from flashlm.io.gguf_vocab_json import vocab_from_json, vocab_gguf_metadata  # noqa: E402
from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.train.export import export_gguf, export_hf  # noqa: E402

SETTINGS = ((False, False), (True, True), (True, False))  # (add_special_tokens, parse_special)
EXTRA = ["ab<sep>x@@y", "a</s>b<pad> <unk>", "ａｂ ｈｅｌｌｏ", "e\u0301 ½ ①", "  lots   of   space  "]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """(path of a t5 GGUF vocabulary written as llama.cpp's converter writes it, the tokenizer read from it)."""
    sp, proto = train_ugm()
    path = str(tmp_path_factory.mktemp("ugm") / "ugm.gguf")
    write_vocab_gguf(path, ugm_gguf_metadata(sp, proto))
    return path, tokenizer_from_gguf(GGUFFile(path).metadata)


def _nomic_path():
    d = llama_cpp_ref.vocab_dir()
    paths = glob.glob(os.path.join(d, "ggml-vocab-nomic-bert-moe.gguf")) if d else []
    if not paths:
        pytest.skip(f"llama.cpp's t5 vocabulary absent: set {llama_cpp_ref.ENV_VAR} to a llama-cpp-python sdist")
    return paths[0]


def assert_same_tokens(got, want, texts, name):
    for add_special, parse_special in SETTINGS:
        bad = [text for text in texts if got.encode(text, add_special_tokens=add_special, parse_special=parse_special)
               != want.encode(text, add_special_tokens=add_special, parse_special=parse_special)]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} strings differ ({add_special=}, {parse_special=}), " \
                        f"first {bad[0]!r}"


def assert_same_tokenizer(got, want, texts, name):
    assert got.vocab_size == want.vocab_size and got.eos_token_ids == want.eos_token_ids
    assert got.bos_token_id == want.bos_token_id
    assert_same_tokens(got, want, texts, name)
    ids = want.encode(texts[0] + " " + texts[1])
    assert got.decode(ids) == want.decode(ids)


def test_round_trip_small_vocab(small_vocab):
    _, tok = small_vocab
    text = tok.to_str()
    assert vocab_from_json(text)["tokenizer.ggml.model"] == "t5"
    with pytest.raises(Exception):  # what the to_str() above is for: tokenizers cannot write this one
        tok.backend.to_str()
    back = tokenizer_from_json(text)
    assert back.to_str() == text
    assert_same_tokenizer(back, tok, SAMPLES + EXTRA + _strings(tok, 0, 200), "small t5")


def test_checkpoint_holds_the_vocabulary(small_vocab):
    """A checkpoint's tokenizer text (what runs, fine-tunes and quantized checkpoints save) loads the same
    tokenizer; its eos_token_id, where given, is the end-of-text id."""
    _, tok = small_vocab
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, seq_len=64)
    back, eos = checkpoint_tokenizer({"tokenizer": tok.to_str()}, cfg, "ckpt")
    assert eos == tok.eos_token_ids
    assert_same_tokens(back, tok, SAMPLES + EXTRA, "checkpoint")
    back, eos = checkpoint_tokenizer({"tokenizer": tok.to_str(), "eos_token_id": 0}, cfg, "ckpt")
    assert eos == [0] and back.eos_token_ids == [0]
    small = ModelConfig(arch="llama", vocab_size=tok.vocab_size - 1, n_layer=1, n_head=2, d_model=32, seq_len=64)
    with pytest.raises(ValueError, match="ckpt: the tokenizer has .* more than the model's vocab_size"):
        checkpoint_tokenizer({"tokenizer": tok.to_str()}, small, "ckpt")


def _tiny_model(vocab_size):
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64, seq_len=64,
                      tie_embeddings=False)
    torch.manual_seed(0)
    return Transformer(cfg), cfg


def _export_matches_llama_cpp(tok, tmp_path, texts, name, small):
    """Exports a tiny model with `tok`: llama.cpp tokenizes `texts` with the file as `tok` does (small: it loads
    the weights too, and flashlm reads the file's tokenizer back as `tok`; a 250k vocabulary takes ~30 s to
    build, so a large one is left to the round trip's check)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, cfg = _tiny_model(tok.vocab_size)
    path = str(tmp_path / "t5-vocab.gguf")
    export_gguf(model, cfg, tok.to_str(), path)
    if small:
        assert_same_tokenizer(tokenizer_from_gguf(GGUFFile(path).metadata), tok, texts, f"{name} exported")
    ref = llama_cpp.Llama(model_path=path, vocab_only=not small, verbose=False)
    try:
        for add_special, parse_special in SETTINGS:
            bad = [text for text in texts if ref.tokenize(text.encode(), add_bos=add_special, special=parse_special)
                   != tok.encode(text, add_special_tokens=add_special, parse_special=parse_special)]
            assert not bad, f"{name}: llama.cpp tokenizes {len(bad)} of {len(texts)} strings otherwise " \
                            f"({add_special=}, {parse_special=}), first {bad[0]!r}"
    finally:
        ref.close()


def test_export_gguf_small_vocab(small_vocab, tmp_path):
    """The whole exported model loads in llama.cpp (weights too), and tokenizes as flashlm does."""
    _, tok = small_vocab
    _export_matches_llama_cpp(tok, tmp_path, SAMPLES + EXTRA + _strings(tok, 2, 200), "small t5", True)


def test_llama_cpp_vocab_round_trip_and_export(tmp_path):
    """llama.cpp's own t5 vocabulary (250k tokens: built once per tokenizer, so one test): saved and read back,
    then exported, on every string of llama.cpp's tokenizer test data and random ones."""
    path = _nomic_path()
    tok = tokenizer_from_gguf(GGUFFile(path).metadata)
    texts = _all_test_strings() + _strings(tok, 1, 60)
    assert_same_tokenizer(tokenizer_from_json(tok.to_str()), tok, texts, "nomic-bert-moe")
    _export_matches_llama_cpp(tok, tmp_path, texts, "nomic-bert-moe", False)


def test_bad_input_is_named(small_vocab, tmp_path):
    _, tok = small_vocab
    text = tok.to_str()
    meta = vocab_from_json(text)
    with pytest.raises(ValueError, match="vocab_size: the model has 5 embedding rows"):
        vocab_gguf_metadata(meta, vocab_size=5)
    with pytest.raises(ValueError, match="eos_token_id"):
        vocab_gguf_metadata(meta, eos_token_id=10**6)
    with pytest.raises(ValueError, match="flashlm_gguf_vocab must map tokenizer"):
        tokenizer_from_json('{"flashlm_gguf_vocab": {"model": 1}}')
    with pytest.raises(ValueError, match="tokenizer_json: not valid JSON"):
        tokenizer_from_json('{"flashlm_gguf_vocab": ')
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        tokenizer_from_json(text.replace('"tokenizer.ggml.scores"', '"tokenizer.ggml.scores_"'))
    model, cfg = _tiny_model(tok.vocab_size)
    with pytest.raises(ValueError, match="tokenizer_json: a t5 .* export the model to GGUF"):
        export_hf(model, cfg, text, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
