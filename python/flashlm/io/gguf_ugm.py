"""llama.cpp's Unigram tokenizer (tokenizer.ggml.model "t5": T5's and XLM-RoBERTa's SentencePiece unigram
vocabularies) as a `tokenizers` Unigram model behind a normalizer that does what llama.cpp's does.

    vocab = UnigramVocab(meta, tokens, types)
    tok = vocab.tokenizer(add_tokens)   # a tokenizers.Tokenizer; add_tokens(tok) adds the added tokens

Normalization (llm_tokenizer_ugm_session::normalize), on the UTF-8 bytes of each run of text between special
tokens: at each position the longest prefix shared with a USER_DEFINED token is kept as it is; otherwise the
longest prefix the precompiled charsmap (SentencePiece's normalization rules, tokenizer.ggml.precompiled_charsmap)
maps is replaced by its mapping; otherwise one UTF-8 character is kept (a malformed byte becomes U+FFFD). Of
what comes out, every ASCII space becomes "▁"; with remove_extra_whitespaces runs of spaces collapse into the
"▁" that starts each word (trailing ones are dropped), and add_space_prefix puts one before the first word.
tokenizers' own Precompiled normalizer works per grapheme cluster and so differs from this longest-prefix walk
(a letter followed by a combining mark), hence the walk is done here, in a custom normalizer.

Segmentation: the highest total score (Viterbi over the normalized text, as tokenizers' Unigram does it, with
the same tie-breaking and the same unknown-character score, the lowest normal score minus 10); NORMAL, UNUSED
and USER_DEFINED tokens (scored 0) are the pieces, runs of unknown characters become one unknown token. The
other tokens (CONTROL, UNKNOWN, BYTE) are never pieces in llama.cpp: their entries in the Unigram model are
spelled with a trailing ASCII space, which the normalized text never contains. (The added tokens are added
while the model still spells every token as the file does, so that tokenizers gives each its own id; the
backend then counts those tokens twice among its distinct strings, so the flashlm Tokenizer is told the
vocabulary size.) The normalizer is Python code, which tokenizers cannot serialize: a copy of the tokenizer
is built anew (the Tokenizer's rebuild), and the flashlm Tokenizer's to_str() saves the vocabulary as its GGUF
metadata instead (gguf_vocab_json.py), which loads and exports to GGUF as the file does. tokenizers takes the lowest
score of all its entries as the unknown-character baseline, llama.cpp that of the NORMAL tokens alone, so an
UNUSED token scored lower (the [PAD<i>] rows of a padded embedding, scored -10000) must be one that can never
win: its score is below every other way of covering its characters, and it is left out the same way. Byte
fallback: llama.cpp's Unigram has none (an unknown character is the unknown token), and neither does this one.
"""

from __future__ import annotations

import struct

_SPACE = "\u2581".encode()
_UNK_PENALTY = 10.0  # llama.cpp's unknown_token_score_penalty, tokenizers' K_UNK_PENALTY
_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Charsmap:
    """SentencePiece's precompiled charsmap: a little-endian uint32 byte count, that many bytes of a
    XOR-compressed compact double array (a trie over UTF-8 bytes whose leaves index the replacements), then
    NUL-terminated replacement strings."""

    def __init__(self, blob: bytes):
        if len(blob) < 4:
            raise ValueError(f"metadata: {_CHARSMAP} has {len(blob)} bytes, fewer than its 4-byte header")
        (size,) = struct.unpack_from("<I", blob, 0)
        if size + 4 >= len(blob):
            raise ValueError(f"metadata: {_CHARSMAP} says its trie has {size} bytes, more than the "
                             f"{len(blob) - 4} after the header leave room for")
        self._nodes = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self._strings = blob[4 + size:]
        self._check()

    def _check(self) -> None:
        """ValueError unless every walk through the trie stays inside it and every replacement it reaches is
        a NUL-terminated string: tokenizers ignores an exception raised while it normalizes, so longest()
        must never raise. Breadth first over the trie's states, all 255 next bytes at once."""
        import numpy as np

        nodes = np.asarray(self._nodes, dtype=np.int64)
        n = len(nodes)
        if n == 0:
            raise ValueError(f"metadata: {_CHARSMAP} has an empty trie")
        base = (nodes >> 10) << ((nodes & (1 << 9)) >> 6)
        ends = np.flatnonzero(np.frombuffer(self._strings, dtype=np.uint8) == 0)
        chars = np.arange(1, 256, dtype=np.int64)
        seen = np.zeros(n, dtype=bool)
        states = np.array([base[0]], dtype=np.int64)
        while len(states):
            if int((states | 0xFF).max()) >= n:
                raise ValueError(f"metadata: {_CHARSMAP} has a trie index past its {n} nodes")
            seen[states] = True
            child = (states[:, None] ^ chars[None, :]).ravel()
            c = np.tile(chars, len(states))
            hit = child[(nodes[child] & ((1 << 31) | 0xFF)) == c]
            nxt = hit ^ base[hit]
            if int(nxt.max(initial=0)) >= n:
                raise ValueError(f"metadata: {_CHARSMAP} has a trie index past its {n} nodes")
            leaf = nxt[((nodes[hit] >> 8) & 1) == 1]
            offsets = nodes[leaf] & ((1 << 31) - 1)
            # each replacement starts inside the strings and a NUL follows it
            if len(offsets) and (int(offsets.max()) >= len(self._strings) or
                                 int(np.searchsorted(ends, offsets).max()) >= len(ends)):
                raise ValueError(f"metadata: {_CHARSMAP} has a replacement that is outside its strings or "
                                 "not NUL-terminated")
            states = np.unique(nxt[~seen[nxt]])

    def _node(self, i: int) -> int:
        return self._nodes[i]  # in range: _check walked every path

    @staticmethod
    def _base(node: int) -> int:
        return (node >> 10) << ((node & (1 << 9)) >> 6)

    def longest(self, data: bytes, pos: int) -> tuple[int, bytes]:
        """(length, replacement) of the longest prefix of data[pos:] the charsmap maps; (0, b"") for none."""
        best, offset = 0, 0
        i = self._base(self._node(0))
        for j in range(pos, len(data)):
            c = data[j]
            if c == 0:
                break
            i ^= c
            node = self._node(i)
            if node & ((1 << 31) | 0xFF) != c:  # not a child of the previous node
                break
            i ^= self._base(node)
            if (node >> 8) & 1:  # a leaf: its base leads to the replacement's offset
                best, offset = j - pos + 1, self._node(i) & ((1 << 31) - 1)
        if best == 0:
            return 0, b""
        return best, self._strings[offset:self._strings.index(b"\0", offset)]


def _utf8_length(data: bytes, pos: int) -> int:
    """Length of the well-formed UTF-8 character at data[pos], or 0 (llama.cpp's unicode_cpt_from_utf8)."""
    lead = data[pos]
    n = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else \
        4 if lead >> 3 == 0b11110 else 0
    if n == 0 or pos + n > len(data) or any(data[k] >> 6 != 0b10 for k in range(pos + 1, pos + n)):
        return 0
    return n


class UnigramNormalizer:
    """llama.cpp's Unigram normalization (see the module's doc), for tokenizers' Normalizer.custom."""

    def __init__(self, charsmap: Charsmap | None, user_defined: list, add_space_prefix: bool,
                 remove_extra_whitespaces: bool):
        self._charsmap = charsmap
        self._user_prefixes = {t.encode()[:k] for t in user_defined for k in range(1, len(t.encode()) + 1)}
        self.prefix_space = add_space_prefix
        self._merge_spaces = remove_extra_whitespaces

    def _piece(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """(normalized bytes, bytes consumed) at data[pos]."""
        n = 0
        while pos + n < len(data) and data[pos:pos + n + 1] in self._user_prefixes:
            n += 1  # a prefix of a user-defined token, whole or not, as llama.cpp's trie walk matches it
        if n:
            return data[pos:pos + n], n
        if self._charsmap is not None:
            n, replacement = self._charsmap.longest(data, pos)
            if n:
                return replacement, n
        n = _utf8_length(data, pos)
        return (data[pos:pos + n], n) if n else ("\ufffd".encode(), 1)

    def normalize_text(self, text: str) -> str:
        data = text.encode("utf-8")
        out = bytearray()
        in_word = prefixed = False
        pos = 0
        while pos < len(data):
            piece, used = self._piece(data, pos)
            pos += used
            for c in piece:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (self.prefix_space and not prefixed) or self._merge_spaces:
                            out += _SPACE
                            prefixed = True
                    out.append(c)
                else:
                    in_word = False
                    if not self._merge_spaces:
                        out += _SPACE
        # a prefix of a user-defined token can end inside a character; llama.cpp then tokenizes the bytes
        return out.decode("utf-8", errors="replace")

    def normalize(self, normalized) -> None:
        """tokenizers' hook: replace a NormalizedString's text by its normalization."""
        from tokenizers import Regex

        text = normalized.normalized
        if text:
            normalized.replace(Regex(r"\A[\s\S]+\z"), self.normalize_text(text))


def _scores(meta: dict, n: int) -> list:
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != n or \
            not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"metadata: tokenizer.ggml.scores must be an array of {n} numbers")
    return [float(s) for s in scores]


def _charsmap(meta: dict) -> Charsmap | None:
    blob = meta.get(_CHARSMAP)
    if blob is None or (isinstance(blob, list) and not blob):
        return None
    if isinstance(blob, list) and all(isinstance(b, int) and not isinstance(b, bool) and -128 <= b < 256
                                      for b in blob):
        blob = bytes(b & 0xFF for b in blob)  # gguf stores it as int8 or uint8
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"metadata: {_CHARSMAP} must be an array of bytes")
    return Charsmap(bytes(blob))


def _never_wins(token: str, score: float, best_single: dict, unk_score: float) -> bool:
    """Whether a piece scored `score` loses to covering its characters one by one (each by its best
    one-character piece, or as an unknown character): then no highest-scoring segmentation contains it."""
    return score < sum(best_single.get(ch, unk_score) for ch in token)


class UnigramVocab:
    """A t5 GGUF vocabulary as tokenizers parts: the Unigram pieces and llama.cpp's normalizer."""

    def __init__(self, meta: dict, tokens: list, types: list):
        n = len(tokens)
        scores = _scores(meta, n)
        unk = meta.get("tokenizer.ggml.unknown_token_id", 2)  # llama.cpp's default for t5
        if isinstance(unk, bool) or not isinstance(unk, int) or not 0 <= unk < n:
            raise ValueError(f"metadata: tokenizer.ggml.unknown_token_id {unk!r} is not a token id in [0, {n})")
        normal = [scores[i] for i in range(n) if types[i] == NORMAL]
        if not normal:
            raise ValueError("metadata: a t5 tokenizer needs NORMAL tokens (tokenizer.ggml.token_type)")
        self.unk, self.tokens, self.n = unk, tokens, n
        self.pieces = _pieces(tokens, types, scores, min(normal))
        self.normalizer = unigram_normalizer(meta, tokens, types)

    def tokenizer(self, add_tokens):
        """A tokenizers.Tokenizer: `add_tokens(tok)` adds the added tokens to one whose model spells every
        token as the file does (so that each gets its id), then the model becomes the pieces'. Its decoder
        spells "▁" as a space and drops the prefix space."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        tok = Tokenizer(models.Unigram([(t, 0.0) for t in self.tokens], self.unk, False))
        add_tokens(tok)
        tok.model = models.Unigram(self.pieces, self.unk, False)
        tok.normalizer = normalizers.Normalizer.custom(self.normalizer)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.normalizer.prefix_space:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        return tok


def _pieces(tokens: list, types: list, scores: list, low: float) -> list:
    """(text, score) per id for tokenizers' Unigram: the pieces llama.cpp matches, the rest unmatchable."""
    unk_score = low - _UNK_PENALTY
    best_single = {}  # character -> best score of a one-character piece
    for i, t in enumerate(tokens):
        if types[i] in (NORMAL, UNUSED, USER_DEFINED) and len(t) == 1:
            s = 0.0 if types[i] == USER_DEFINED else scores[i]
            best_single[t] = max(best_single.get(t, s), s)
    # a repeated token is matched as its last id, as llama.cpp's trie keeps it
    last = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, UNUSED, USER_DEFINED)}
    taken = set(tokens)
    out = []
    for i, t in enumerate(tokens):
        piece = last.get(t) == i and t != ""
        score = 0.0 if types[i] == USER_DEFINED else scores[i]
        if piece and score < low:
            if types[i] != UNUSED or not _never_wins(t, score, best_single, unk_score):
                raise ValueError(f"metadata: token {i} ({t!r}) scores {score}, below the lowest NORMAL score "
                                 f"{low}, and could be chosen: not supported (tokenizer.ggml.scores)")
            piece = False
        if not piece:
            t, score = t + " ", low  # never in the normalized text, which spells spaces "▁"
            while t in taken:
                t += " "
            taken.add(t)
        out.append((t, score))
    return out


def unigram_normalizer(meta: dict, tokens: list, types: list) -> UnigramNormalizer:
    """The normalizer a t5 GGUF vocabulary's metadata describes (llama.cpp's defaults: no prefix space, no
    whitespace collapsing)."""
    flags = {}
    for key in ("add_space_prefix", "remove_extra_whitespaces"):
        v = meta.get(f"tokenizer.ggml.{key}", False)
        if not isinstance(v, bool):
            raise ValueError(f"metadata: tokenizer.ggml.{key} must be a bool, got {v!r}")
        flags[key] = v
    user_defined = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t]
    return UnigramNormalizer(_charsmap(meta), user_defined, **flags)
