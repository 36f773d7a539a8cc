"""A GGUF file's tokenizer (the tokenizer.ggml.* metadata llama.cpp reads) as a `tokenizers` tokenizer that
tokenizes as llama.cpp does.

    tok = tokenizer_from_gguf(gguf_file.metadata, vocab_size)   # flashlm.runtime.Tokenizer, or None

tokenizer.ggml.model "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen2): the tokens are the byte-level strings
("Ġthe") and the merges "a b" strings; the split regex is llama.cpp's for tokenizer.ggml.pre (gpt-2,
llama-bpe, qwen2 and the names llama.cpp gives the same regexes; any other raises, as a guess would split
text differently).

tokenizer.ggml.model "llama" (SentencePiece): llama.cpp's llm_tokenizer_spm replaces spaces by "▁", prepends
one (add_space_prefix) to each run of text, then repeatedly merges the adjacent pair whose concatenation is
the highest-scoring token (leftmost first on ties) and spells what is left that is not a token as its
<0xXX> byte tokens. That is SentencePiece's BPE, and HF's converter expresses it as a BPE whose merges are
every (left, right) pair of tokens whose concatenation is a token, ranked by that token's score, with
byte fallback: the same choice at every step. A Unigram model over the scores would instead pick the
segmentation of highest total score (Viterbi), which is SentencePiece's other model type and not what
llama.cpp runs, so the BPE form is used here. One difference remains: two different tokens of equal score
are ranked by id here and by position in llama.cpp; SentencePiece gives each merged piece its own score
(minus its merge rank), so its vocabularies do not have such ties.

Token types: CONTROL and UNKNOWN tokens are special (matched whole in the text, dropped by decode with
skip_special_tokens); USER_DEFINED tokens are matched whole as well but decoded as text; UNUSED tokens (the
[PAD<i>] rows of a padded embedding) decode to nothing, as in llama.cpp.
"""

from __future__ import annotations

from typing import Optional

from flashlm.io.gguf_pretok import build_pre_tokenizer, pre_tokenizer_for
from flashlm.io.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

def _list(meta: dict, key: str, n: Optional[int], kind) -> Optional[list]:
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or (n is not None and len(v) != n) or not all(isinstance(x, kind) for x in v):
        want = f"{n} " if n is not None else ""
        raise ValueError(f"metadata: {key} must be an array of {want}{kind.__name__} values")
    return v


def _opt_id(meta: dict, key: str, n: int) -> Optional[int]:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ValueError(f"metadata: {key} {v!r} is not a token id in [0, {n})")
    return v


def _added_tokens(tokens: list, types: list):
    from tokenizers import AddedToken

    out = []
    for t, ty in zip(tokens, types):
        if ty in (CONTROL, UNKNOWN):
            out.append(AddedToken(t, special=True, normalized=False))
        elif ty == USER_DEFINED:
            out.append(AddedToken(t, special=False, normalized=False))
    return out


def _vocab(tokens: list) -> dict:
    """token -> id; a repeated token keeps its first id, as llama.cpp's token_to_id map does."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _merges(meta: dict, vocab: dict) -> list:
    """tokenizer.ggml.merges as (left, right) pairs, cut at the first space after the first character as
    llama.cpp cuts them (a merge's left part may itself be a space)."""
    merges = []
    for m in _list(meta, "tokenizer.ggml.merges", None, str) or []:
        cut = m.find(" ", 1)
        left, right = (m[:cut], m[cut + 1:]) if cut > 0 else (m, "")
        if left not in vocab or right not in vocab or (left + right) not in vocab:
            raise ValueError(f"metadata: tokenizer.ggml.merges has {m!r}, which is not a merge of two tokens "
                             "into a token")
        merges.append((left, right))
    return merges


def _bpe(meta: dict, tokens: list, types: list, pre_name: str):
    """llama.cpp's BPE: byte-level (gpt2) or, for gemma4-style pre-tokenizers, over raw UTF-8 with spaces as
    ▁ and <0xXX> byte tokens for what no token covers."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pre = pre_tokenizer_for(pre_name)
    vocab = _vocab(tokens)
    merges = _merges(meta, vocab)
    if pre.byte_level:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges,
                                   byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.pre_tokenizer = build_pre_tokenizer(pre)
    return tok, pre.add_bos


def _spm(meta: dict, tokens: list, types: list):
    from tokenizers import Tokenizer, decoders, models, normalizers

    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != n or \
            not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"metadata: tokenizer.ggml.scores must be an array of {n} numbers")
    vocab = _vocab(tokens)
    # every split of a token into two tokens is a merge, ranked by the merged token's score (then by the
    # ids of its parts, as HF's SentencePieceExtractor orders them)
    ranked = []
    for piece, i in vocab.items():
        if types[i] == BYTE:
            continue  # <0xXX> pieces are only ever reached by byte fallback
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = next((tokens[i] for i, ty in enumerate(types) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok, True


def tokenizer_from_gguf(meta: dict, vocab_size: Optional[int] = None) -> Optional[Tokenizer]:
    """The tokenizer described by GGUF metadata, or None when the file has no tokenizer.ggml.tokens."""
    from tokenizers import processors

    model = meta.get("tokenizer.ggml.model")
    tokens = _list(meta, "tokenizer.ggml.tokens", None, str)
    if tokens is None:
        return None
    n = len(tokens)
    if n == 0 or (vocab_size is not None and n != vocab_size):
        raise ValueError(f"metadata: tokenizer.ggml.tokens has {n} tokens, the model's embedding has {vocab_size} rows")
    types = _list(meta, "tokenizer.ggml.token_type", n, int) or [NORMAL] * n
    if model == "gpt2":
        tok, add_bos_default = _bpe(meta, tokens, types, meta.get("tokenizer.ggml.pre") or "default")
    elif model == "gemma4":
        tok, add_bos_default = _bpe(meta, tokens, types, "gemma4")
    elif model == "llama":
        tok, add_bos_default = _spm(meta, tokens, types)
    else:
        raise ValueError(f"metadata: tokenizer.ggml.model {model!r} is not supported (gpt2 or llama)")
    tok.add_tokens(_added_tokens(tokens, types))  # the same ids: they are in the vocabulary already
    bos = _opt_id(meta, "tokenizer.ggml.bos_token_id", n)
    eos = _opt_id(meta, "tokenizer.ggml.eos_token_id", n)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [(tokens[bos], bos)] if add_bos else []
        last = [(tokens[eos], eos)] if add_eos else []
        single = [t for t, _ in first] + ["$A"] + [t for t, _ in last]
        pair = single + ["$B"] + [t for t, _ in last]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=sorted(set(first + last)))
    eos_ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _opt_id(meta, key, n)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(tok, eos_token_ids=eos_ids, bos_token_id=bos,
                     chat_template=template if isinstance(template, str) else None,
                     silent_ids=[i for i, ty in enumerate(types) if ty == UNUSED])
