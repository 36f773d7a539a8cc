"""A GGUF file's tokenizer (the tokenizer.ggml.* metadata llama.cpp reads) as a `tokenizers` tokenizer that
tokenizes as llama.cpp does.

    tok = tokenizer_from_gguf(gguf_file.metadata, vocab_size)   # flashlm.runtime.Tokenizer, or None
    tok = tokenizer_from_json(tok.to_str())                       # a saved one read back

tokenizer.ggml.model "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen2): the tokens are the byte-level strings
("Ġthe") and the merges "a b" strings; the split regexes are llama.cpp's for tokenizer.ggml.pre
(gguf_pretok.py; a name it does not list raises, as a guess would split text differently).
tokenizer.ggml.model "gemma4": the same BPE over raw UTF-8, spaces as "▁", <0xXX> tokens for the bytes no
token covers. tokenizer.ggml.model "bert": WordPiece, see _wordpiece. tokenizer.ggml.model "t5": SentencePiece's Unigram,
see gguf_ugm.py.

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
from flashlm.io.gguf_ugm import UnigramVocab
from flashlm.io.gguf_vocab_json import vocab_from_json, vocab_json
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


def _stripping(meta: dict, tokens: list, types: list) -> tuple:
    """(ids whose match also takes the whitespace after it, ids that take the whitespace before it), as
    llama.cpp sets these attributes by model name: phi-3's special tokens (but <unk>, <s>, <|endoftext|>)
    strip on the right, jina-v2's and nomic-bert-moe's <mask> and modern-bert's [MASK] on the left."""
    name = str(meta.get("general.name", "")).lower()
    pre, arch = str(meta.get("tokenizer.ggml.pre", "")), str(meta.get("general.architecture", ""))
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    if any(k in pre for k in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(k in arch for k in ("nomic-bert-moe", "jina-bert-v3")):
        return set(), {ids["<mask>"]} if "<mask>" in ids else set()
    if "phi-3" in name or "phi3" in name:
        right = {i for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)}
        right |= {ids["</s>"]} if "</s>" in ids else set()
        return right - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids}, set()
    if "modern-bert" in name:
        return set(), {ids["[MASK]"]} if "[MASK]" in ids else set()
    return set(), set()


def _added_tokens(meta: dict, tokens: list, types: list):
    from tokenizers import AddedToken

    rstrip, lstrip = _stripping(meta, tokens, types)
    out = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            out.append(AddedToken(t, special=ty != USER_DEFINED, normalized=False, rstrip=i in rstrip,
                                  lstrip=i in lstrip))
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


def _wordpiece(meta: dict, tokens: list, types: list):
    """llama.cpp's WPM (BERT): text lowercased and accent-stripped (NFD, marks dropped) unless the file's
    tokenizer.ggml.normalizer.* keys say otherwise, control characters dropped, split at whitespace and
    around punctuation, ASCII symbols and CJK characters, then each word greedily into the longest tokens
    ("▁word" for a word's first piece, "piece" for the rest: the GGUF spelling of BERT's "word", "##piece"),
    the whole word one [UNK] when any part is not a token. As a tokenizers WordPiece: "▁x" is x, and a
    continuation "x" is ##x."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {}
    for i, t in enumerate(tokens):
        if t.startswith("\u2581"):
            vocab.setdefault(t[1:], i)
        elif types[i] in (CONTROL, UNKNOWN) or (t.startswith("[") and t.endswith("]")):
            vocab.setdefault(t, i)  # [CLS], [unused0]: kept as BERT spells them
        else:
            vocab.setdefault("##" + t, i)
    unk = _opt_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
    if unk is None:
        raise ValueError("metadata: tokenizer.ggml.unknown_token_id is required for a bert tokenizer")
    lowercase = bool(meta.get("tokenizer.ggml.normalizer.lowercase", True))
    strip_accents = bool(meta.get("tokenizer.ggml.normalizer.strip_accents", lowercase))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=tokens[unk], continuing_subword_prefix="##",
                                     max_input_chars_per_word=1 << 30))
    # the control characters that are also whitespace separate words in llama.cpp; BertNormalizer drops them
    steps = [normalizers.Replace(Regex("[\x0b\x0c\x85]"), " ")]
    if strip_accents:
        # llama.cpp's NFD keeps one codepoint per character, the first of its decomposition: for a Hangul
        # syllable its leading consonant (588 syllables per consonant from U+AC00), which NFD alone would
        # follow with the vowel and final jamo
        for k in range(19):
            first = 0xAC00 + 588 * k
            steps.append(normalizers.Replace(Regex(f"[{chr(first)}-{chr(first + 587)}]"), chr(0x1100 + k)))
        steps += [normalizers.NFD(), normalizers.Replace(Regex(r"\p{M}"), "")]
    steps.append(normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                            lowercase=lowercase))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, True


def _post_processor(meta: dict, tokens: list, bos, eos, add_bos_default: bool, force_bos: bool, add_sep_default: bool,
                    add_eos_default: bool = False):
    """What llama.cpp adds with add_special: BOS first, EOS then SEP last, each where the file (or the
    model's default) asks for it; gemma4 always gets BOS (llama.cpp overrides a file saying otherwise), t5
    gets EOS unless the file says otherwise."""
    from tokenizers import processors

    n = len(tokens)
    sep = _opt_id(meta, "tokenizer.ggml.seperator_token_id", n)
    add_bos = (bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) or force_bos) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", add_eos_default)) and eos is not None
    add_sep = bool(meta.get("tokenizer.ggml.add_sep_token", add_sep_default)) and sep is not None
    first = [bos] if add_bos else []
    last = ([eos] if add_eos else []) + ([sep] if add_sep else [])
    if not first and not last:
        return None
    single = [tokens[i] for i in first] + ["$A"] + [tokens[i] for i in last]
    pair = single + ["$B"] + [tokens[i] for i in last]
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=sorted({(tokens[i], i) for i in first + last}))


def tokenizer_from_gguf(meta: dict, vocab_size: Optional[int] = None) -> Optional[Tokenizer]:
    """The tokenizer described by GGUF metadata, or None when the file has no tokenizer.ggml.tokens."""
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
    elif model == "bert":
        tok, add_bos_default = _wordpiece(meta, tokens, types)
    elif model == "t5":
        ugm = UnigramVocab(meta, tokens, types)
        tok, add_bos_default = None, False
    else:
        raise ValueError(f"metadata: tokenizer.ggml.model {model!r} is not supported "
                         "(gpt2, gemma4, llama, bert, t5)")
    bos = _opt_id(meta, "tokenizer.ggml.bos_token_id", n)
    if bos is None and model == "bert":
        bos = _opt_id(meta, "tokenizer.ggml.cls_token_id", n)  # BERT's [CLS] is what llama.cpp puts first
    eos = _opt_id(meta, "tokenizer.ggml.eos_token_id", n)
    post = _post_processor(meta, tokens, bos, eos, add_bos_default, model == "gemma4", model == "bert",
                           add_eos_default=model == "t5")

    def finish(tok):
        tok.add_tokens(_added_tokens(meta, tokens, types))  # the same ids: they are in the vocabulary already
        if post is not None:
            tok.post_processor = post

    rebuild = serialize = None
    if model == "t5":
        # its normalizer is Python code, which tokenizers cannot serialize: copies are built anew, and it is
        # saved as its metadata
        tok = ugm.tokenizer(finish)
        rebuild = lambda: ugm.tokenizer(finish)  # noqa: E731
        serialize = lambda: vocab_json(meta)  # noqa: E731
    else:
        finish(tok)
    eos_ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _opt_id(meta, key, n)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(tok, eos_token_ids=eos_ids, bos_token_id=bos,
                     chat_template=template if isinstance(template, str) else None,
                     silent_ids=[i for i, ty in enumerate(types) if ty == UNUSED], rebuild=rebuild,
                     vocab_size=n if model == "t5" else None, serialize=serialize)


def tokenizer_from_json(text, eos_token_id: Optional[int] = None) -> Tokenizer:
    """The tokenizer a to_str() text describes: a tokenizer.json (tokenizers' form) or flashlm's form of a GGUF
    vocabulary (gguf_vocab_json). eos_token_id: its end-of-text id (a GGUF vocabulary's own where None).
    ValueError if unreadable."""
    meta = vocab_from_json(text)
    if meta is not None:
        if eos_token_id is not None:
            meta["tokenizer.ggml.eos_token_id"] = eos_token_id
        return tokenizer_from_gguf(meta)
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer: not a readable tokenizer ({str(e)[:200]})") from None
    return Tokenizer(backend, eos_token_ids=[] if eos_token_id is None else [eos_token_id])
