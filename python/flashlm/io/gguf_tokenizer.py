"""A `tokenizers` tokenizer.json as GGUF tokenizer metadata (the tokenizer.ggml.* keys llama.cpp reads).

    meta = tokenizer_metadata(json_text, vocab_size=50304, eos_token_id=0)
    for key, value, vtype, sub in meta: writer.add_key_value(key, value, vtype, sub_type=sub)

Byte-level BPE tokenizers (GPT-2 style: the ones flashlm.train.tokenizer trains, and GPT-2's, Llama 3's,
Qwen2's) become llama.cpp's "gpt2" tokenizer model: the vocabulary as its byte-level strings ("Ġthe"),
a type per token (special added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the
merges as "a b" strings, and tokenizer.ggml.pre naming llama.cpp's pre-tokenizer whose split regex is the
tokenizer's own:
- a ByteLevel pre-tokenizer with its built-in regex (GPT-2's) -> "gpt-2", whose regex in llama.cpp is
  GPT-2's (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2; the trailing `\\s+` alternative HF's version adds
  only ever matches what `\\s+(?!\\S)` left, which llama.cpp's hand-written GPT-2 splitter also handles);
- a Split with Llama 3's regex followed by ByteLevel without regex -> "llama-bpe"; with Qwen2's -> "qwen2".
Ids the tokenizer does not use, up to the model's vocab_size (a vocabulary padded to a multiple of 64),
become "[PAD<id>]" tokens of type UNUSED, as convert_hf_to_gguf.py writes them: llama.cpp requires one
token per embedding row.

A t5 (Unigram) GGUF vocabulary that flashlm loaded and saved in its own form (gguf_vocab_json: the file's
tokenizer metadata) is written back as those keys.

Other tokenizers (SentencePiece/Unigram, WordPiece, BPE with byte fallback, normalizers, a prefix
space, unknown regexes) raise ValueError: llama.cpp would tokenize them differently.
"""

from __future__ import annotations

import json

from gguf import GGUFValueType, TokenType

from flashlm.io.gguf_vocab_json import vocab_from_json, vocab_gguf_metadata

# tokenizers' split regex (as in tokenizer.json) -> (llama.cpp's tokenizer.ggml.pre, whether llama.cpp
# ignores merges for it, as llama-vocab.cpp sets ignore_merges)
_BYTE_LEVEL_REGEX = "gpt-2"
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("llama-bpe", True),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("qwen2", False),
}
# Names of the end-of-document token, tried in order when no eos id is given.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")

_STR, _U32, _BOOL, _ARR = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL, GGUFValueType.ARRAY


def _parse(tokenizer_json) -> dict:
    if isinstance(tokenizer_json, dict):
        return tokenizer_json
    if isinstance(tokenizer_json, (bytes, str)):
        try:
            spec = json.loads(tokenizer_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer_json: not valid JSON ({e})") from e
        if isinstance(spec, dict):
            return spec
    raise ValueError(f"tokenizer_json: expected a tokenizer.json string or dict, got {type(tokenizer_json).__name__}")


def _pre_tokenizer_name(spec: dict) -> tuple[str, bool]:
    """(llama.cpp's pre-tokenizer name, whether it ignores merges) for a byte-level BPE's pre_tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        if steps[0].get("add_prefix_space"):
            raise ValueError("tokenizer_json: ByteLevel with add_prefix_space=true (llama.cpp's BPE adds no prefix space)")
        if steps[0].get("use_regex", True):
            return _BYTE_LEVEL_REGEX, False
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEXES and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return _SPLIT_REGEXES[regex]
        raise ValueError(f"tokenizer_json: the split regex {regex!r} is none that llama.cpp knows by name "
                         f"(known: GPT-2's ByteLevel regex, {', '.join(n for n, _ in _SPLIT_REGEXES.values())})")
    raise ValueError(f"tokenizer_json: pre-tokenizer {kinds or None} is not a byte-level one llama.cpp supports "
                     "(expected ByteLevel, or Split(regex) + ByteLevel(use_regex=false))")


def _check_byte_level_bpe(spec: dict) -> dict:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer_json: model type {model.get('type')!r} is not supported (byte-level BPE only)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        raise ValueError("tokenizer_json: BPE with byte_fallback, subword prefixes/suffixes or dropout is not "
                         "byte-level BPE (SentencePiece-style tokenizers are not supported)")
    if spec.get("normalizer"):
        raise ValueError(f"tokenizer_json: normalizer {spec['normalizer'].get('type')!r} is not supported "
                         "(llama.cpp's BPE applies none)")
    return model


def _merge_strings(merges) -> list[str]:
    """Merges as llama.cpp reads them, "left right" (tokenizer.json has that form or [left, right] pairs)."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(p, str) for p in m):
            if " " in m[0] or " " in m[1]:
                raise ValueError(f"tokenizer_json: merge {m!r} has a space, which the GGUF form cannot hold")
            out.append(f"{m[0]} {m[1]}")
        else:
            raise ValueError(f"tokenizer_json: malformed merge {m!r}")
    return out


def _bos_from_post_processor(spec: dict, ids: dict) -> int | None:
    """The id a TemplateProcessing post-processor puts first (Llama 3's <|begin_of_text|>), or None."""
    post = spec.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first and first["SpecialToken"].get("id") in ids:
                return ids[first["SpecialToken"]["id"]]
    return None


def tokenizer_metadata(tokenizer_json, vocab_size: int | None = None, eos_token_id: int | None = None) -> list:
    """GGUF metadata [(key, value, GGUFValueType, array item type or None)] for a byte-level BPE tokenizer, or
    for a GGUF vocabulary in flashlm's form (the to_str() of a t5 one).

    tokenizer_json: the tokenizer.json text (or its parsed dict), or that form.
    vocab_size: the model's vocabulary (embedding rows), at least the tokenizer's; None: the tokenizer's.
    eos_token_id: the end-of-document id; None: the first of EOS_NAMES the tokenizer has.
    """
    spec = _parse(tokenizer_json)
    vocab = vocab_from_json(spec)
    if vocab is not None:  # a GGUF vocabulary flashlm saved in its own form (a t5 one): written back as it is
        return vocab_gguf_metadata(vocab, vocab_size, eos_token_id)
    model = _check_byte_level_bpe(spec)
    pre, ignore_merges = _pre_tokenizer_name(spec)
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise ValueError(f"tokenizer_json: ignore_merges={model.get('ignore_merges', False)} but llama.cpp's "
                         f"{pre!r} pre-tokenizer uses ignore_merges={ignore_merges}")
    ids = {}  # token string -> id
    for token, i in (model.get("vocab") or {}).items():
        ids[token] = int(i)
    types = {}  # id -> TokenType for added tokens
    for added in spec.get("added_tokens") or []:
        ids[added["content"]] = int(added["id"])
        types[int(added["id"])] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if not ids:
        raise ValueError("tokenizer_json: the vocabulary is empty")
    n_used = max(ids.values()) + 1
    if min(ids.values()) < 0 or len(set(ids.values())) != len(ids):
        raise ValueError("tokenizer_json: token ids are negative or repeated")
    if vocab_size is None:
        vocab_size = n_used
    if vocab_size < n_used:
        raise ValueError(f"vocab_size: the model has {vocab_size} embedding rows but the tokenizer uses ids up to "
                         f"{n_used - 1}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    token_types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        token_types[i] = int(types.get(i, TokenType.NORMAL))

    if eos_token_id is None:
        eos_token_id = next((ids[n] for n in EOS_NAMES if n in ids), None)
        if eos_token_id is None:
            raise ValueError(f"eos_token_id: not given and the tokenizer has none of {list(EOS_NAMES)}")
    if not 0 <= int(eos_token_id) < vocab_size:
        raise ValueError(f"eos_token_id: {eos_token_id} is outside the vocabulary [0, {vocab_size})")
    bos = _bos_from_post_processor(spec, ids)

    meta = [("tokenizer.ggml.model", "gpt2", _STR, None), ("tokenizer.ggml.pre", pre, _STR, None),
            ("tokenizer.ggml.tokens", tokens, _ARR, _STR),
            ("tokenizer.ggml.token_type", token_types, _ARR, GGUFValueType.INT32),
            ("tokenizer.ggml.merges", _merge_strings(model.get("merges") or []), _ARR, _STR),
            ("tokenizer.ggml.eos_token_id", int(eos_token_id), _U32, None),
            # GPT-2's convention: begin-of-text is the end-of-text token; nothing is prepended unless the
            # tokenizer's post-processor prepends it
            ("tokenizer.ggml.bos_token_id", int(eos_token_id if bos is None else bos), _U32, None),
            ("tokenizer.ggml.add_bos_token", bos is not None, _BOOL, None),
            ("tokenizer.ggml.add_eos_token", False, _BOOL, None)]
    return meta
