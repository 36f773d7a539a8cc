"""Byte-level BPE tokenizers (GPT-2 style) trained and loaded with the `tokenizers` library.

    tok = train_tokenizer(docs, vocab_size=4096)    # <|endoftext|> is id 0
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
    eos = eos_token_id(tok)

Byte-level means every string round-trips: decode(encode(text)) == text for any text, since the base
alphabet is the 256 bytes. There is no normaliser in the tokenizer on purpose: the corpus is cleaned (NFC)
before training, and a normaliser would break the round trip for text that is not.
"""

from pathlib import Path

from flashlm.io.gguf_tokenizer import EOS_NAMES as _EOS_CANDIDATES  # the end-of-document names, tried in order

EOS_TOKEN = _EOS_CANDIDATES[0]  # "<|endoftext|>"


def train_tokenizer(docs, vocab_size=8192, special_tokens=(EOS_TOKEN,), min_frequency=2, progress=False):
    """Train a byte-level BPE on an iterable of strings. Special tokens take the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_size = 256 + len(special_tokens)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = list(docs)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path):
    """Load a tokenizers.Tokenizer from a saved tokenizer: a tokenizer.json (one written by train_tokenizer, or a
    model's) or any text a flashlm Tokenizer's to_str() wrote (a t5 GGUF vocabulary's is flashlm's own form)."""
    from flashlm.io.gguf_vocab import tokenizer_from_json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer: no file at {str(path)!r}")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8")).backend
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer: cannot load {str(path)!r}: {e}") from e


def eos_token_id(tok, eos_token=None) -> int:
    """Id of the end-of-document token: `eos_token` if given, else the first known name the vocab has."""
    names = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ValueError(f"eos_token: the tokenizer has none of {list(names)}")
