"""The bytes each token id stands for, as a grammar engine needs the vocabulary (flashlm.runtime.structured).

    pieces = token_bytes(tokenizer, vocab_size)   # list[bytes], one per model row; b"" past the tokenizer

flashlm's tokenizers (flashlm.io.Tokenizer) wrap a `tokenizers.Tokenizer`, from an HF tokenizer.json or built
from a GGUF vocabulary, whose pieces spell bytes one of two ways:
  - byte-level BPE (GPT-2, Llama 3, Qwen2; a ByteLevel decoder): each byte is one printable character of
    GPT-2's bytes_to_unicode table ("Ġ" is the space, "Ċ" the newline);
  - SentencePiece style (Llama 2, Mistral; byte fallback): "▁" is the space, "<0xNN>" is the byte NN, the
    rest is UTF-8.
Added tokens (the ones the tokenizer matches as whole strings) are plain text; special ones (BOS, EOS, chat
markers) get llguidance's convention, a 0xFF byte before their text, so no grammar ever spells them.
"""

import json
import re

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict:
    """GPT-2's table: the printable Latin-1 bytes stand for themselves, the others for chr(256 + i)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_types(spec) -> set:
    """The types of a tokenizer.json decoder and of the decoders of a Sequence."""
    if not isinstance(spec, dict):
        return set()
    out = {spec.get("type")}
    for sub in spec.get("decoders") or ():
        out |= _decoder_types(sub)
    return out


def is_byte_level(backend) -> bool:
    """Whether a tokenizers.Tokenizer spells bytes as GPT-2's byte-level characters."""
    # the decoder alone: a tokenizer with a Python normalizer (GGUF t5 vocabularies) cannot be serialized whole
    decoder = backend.decoder
    return decoder is not None and "ByteLevel" in _decoder_types(json.loads(decoder.__getstate__()))


def token_bytes(tokenizer, vocab_size: int) -> list:
    """bytes per id in [0, vocab_size) of a flashlm Tokenizer (anything with .backend, a tokenizers.Tokenizer).
    Ids the tokenizer lacks (an embedding padded past it) are b"": no grammar allows them."""
    backend = tokenizer.backend
    byte_level = is_byte_level(backend)
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    out = []
    for i in range(vocab_size):
        piece = backend.id_to_token(i)
        if piece is None:
            out.append(b"")
        elif i in added:
            out.append((b"\xff" if added[i].special else b"") + added[i].content.encode("utf-8"))
        elif byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            out.append(bytes(_UNICODE_TO_BYTE[c] for c in piece))
        else:
            m = _BYTE_PIECE.fullmatch(piece)
            out.append(bytes([int(m.group(1), 16)]) if m and not byte_level else piece.replace("▁", " ").encode())
    return out
