"""A GGUF vocabulary that tokenizers' JSON cannot carry, saved in flashlm's own JSON form.

    text = vocab_json(meta)           # a t5 (Unigram) GGUF vocabulary's metadata -> JSON text
    meta = vocab_from_json(text)      # the metadata back (None for any other JSON, a tokenizer.json)
    keys = vocab_gguf_metadata(meta)  # [(key, value, GGUFValueType, item type)] for a GGUF writer

A t5 vocabulary tokenizes through llama.cpp's longest-prefix walk of the precompiled charsmap, which flashlm
runs as a Python normalizer (gguf_ugm.py); tokenizers' Precompiled normalizer works per grapheme cluster
instead, so a tokenizer.json cannot say what llama.cpp does. The saved form is the file's own metadata:

    {"flashlm_gguf_vocab": {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": [...], ...}}

every tokenizer.* key (tokens, token types, scores, the charsmap's bytes as numbers, the flags, the special
ids) and general.name / general.architecture (which decide a few tokens' whitespace stripping), so that
loading it is loading the GGUF vocabulary (gguf_vocab.tokenizer_from_gguf), and exporting it to GGUF writes
the same tokenizer keys back, with the types llama.cpp's converter gives them.
"""

from __future__ import annotations

import json

from gguf import GGUFValueType

KEY = "flashlm_gguf_vocab"
_KEPT_GENERAL = ("general.name", "general.architecture")
_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
# Array keys whose items are not what their Python type suggests (ints are INT32 otherwise, floats FLOAT32).
_ARRAY_ITEMS = {_CHARSMAP: GGUFValueType.UINT8}


def _kept(key: str) -> bool:
    return key.startswith("tokenizer.") or key in _KEPT_GENERAL


def _plain(key: str, value):
    """value as JSON can hold it: bytes (the charsmap, as gguf-py may read it) become a list of numbers."""
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    if hasattr(value, "tolist"):  # a numpy array or scalar
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(key, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"metadata: {key} holds a {type(value).__name__}, which the vocabulary's JSON form cannot")


def vocab_json(meta: dict) -> str:
    """The JSON text of a GGUF vocabulary's metadata (its tokenizer.* keys and the general.* keys above)."""
    return json.dumps({KEY: {k: _plain(k, v) for k, v in meta.items() if _kept(k)}}, ensure_ascii=False)


def vocab_from_json(tokenizer_json) -> dict | None:
    """The metadata a vocab_json text (or its parsed dict) holds; None for any other JSON (a tokenizer.json).
    ValueError for one whose body is not metadata."""
    if isinstance(tokenizer_json, (str, bytes)):
        if KEY.encode() not in (tokenizer_json.encode() if isinstance(tokenizer_json, str) else tokenizer_json):
            return None  # (a tokenizer.json is not parsed twice)
        try:
            tokenizer_json = json.loads(tokenizer_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer_json: not valid JSON ({e})") from None
    if not isinstance(tokenizer_json, dict) or KEY not in tokenizer_json:
        return None
    meta = tokenizer_json[KEY]
    if not isinstance(meta, dict) or not all(isinstance(k, str) and _kept(k) for k in meta):
        raise ValueError(f"tokenizer_json: {KEY} must map tokenizer.* metadata keys to their values")
    return dict(meta)


def _value_type(key: str, value) -> tuple:
    """(GGUFValueType, item type or None) of a metadata value."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if key.endswith("_id") or key.endswith("_count") else GGUFValueType.INT32), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, list):
        if key in _ARRAY_ITEMS:
            return GGUFValueType.ARRAY, _ARRAY_ITEMS[key]
        if all(isinstance(v, str) for v in value):
            return GGUFValueType.ARRAY, GGUFValueType.STRING
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return GGUFValueType.ARRAY, GGUFValueType.INT32
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return GGUFValueType.ARRAY, GGUFValueType.FLOAT32
    raise ValueError(f"tokenizer_json: {key} holds {str(value)[:60]!r}, which has no GGUF type here")


def vocab_gguf_metadata(meta: dict, vocab_size: int | None = None, eos_token_id: int | None = None) -> list:
    """[(key, value, GGUFValueType, item type or None)] of the tokenizer keys, as export_gguf writes them.
    vocab_size: the model's embedding rows, which must be the vocabulary's size; eos_token_id: replaces the
    vocabulary's own."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("tokenizer_json: the vocabulary has no tokenizer.ggml.tokens")
    if vocab_size is not None and vocab_size != len(tokens):
        raise ValueError(f"vocab_size: the model has {vocab_size} embedding rows, the "
                         f"{meta.get('tokenizer.ggml.model')} vocabulary {len(tokens)} tokens (it is written as it "
                         "is, so they must be equal)")
    meta = dict(meta)
    if eos_token_id is not None:
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < len(tokens):
            raise ValueError(f"eos_token_id: {eos_token_id!r} is outside the vocabulary [0, {len(tokens)})")
        meta["tokenizer.ggml.eos_token_id"] = eos_token_id
    return [(k, v, *_value_type(k, v)) for k, v in meta.items() if k.startswith("tokenizer.")]
