"""Test helper: small tokenizers to load, and their GGUF tokenizer metadata written the way llama.cpp's
convert_hf_to_gguf.py writes it (gguf-py's keys and token types), independently of flashlm's exporter.

- byte-level BPEs trained with the `tokenizers` library: GPT-2's pre-tokenizer (flashlm.train.tokenizer),
  Llama 3's and Qwen2's split regexes (llama.cpp's "llama-bpe" and "qwen2");
- a SentencePiece BPE model (byte fallback, identity normalization, dummy prefix: Llama 2's settings) trained
  with the sentencepiece library, whose own encoder is the reference llama.cpp's SPM tokenizer reproduces;
- a SentencePiece Unigram model (T5's settings: NFKC rules in a precompiled charsmap, whitespace collapsed,
  a dummy prefix, user-defined symbols), written as llama.cpp's "t5" tokenizer.
"""

from __future__ import annotations

import io
import random

from gguf import GGUFValueType, TokenType

WORDS = ("the quick brown fox jumps over lazy dog hello world token model weight layer attention cache "
         "Über café naïve 東京 数据 😀 12345 3.14 don't we'll I'M it's").split()
SAMPLES = ["Hello world", "the  quick\n\nbrown fox", " leading space", "trailing space ", "",
           "don't stop, we'll see; I'M here", "Über café naïve", "東京 数据 😀 ☃ ✓", "12345678 3.14159",
           "tabs\tand\r\nnewlines\n", "lazy<|endoftext|>dog", "    indented code()", "x" * 40]
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

_STR, _ARR, _U32, _BOOL = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.BOOL


# A chat template in the shape of real ones (roles checked, BOS/EOS around turns), for loaders to carry.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
                 "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}<|{{ m['role'] }}|>\n"
                 "{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        sep = rng.choice([" ", " ", " ", "  ", "\n", ", "])
        docs.append(sep.join(words))
    return docs


def train_bpe(pre: str, vocab_size: int = 600):
    """A byte-level BPE with <|endoftext|> as id 0; pre: "gpt-2", "llama-bpe" or "qwen2"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from flashlm.train.tokenizer import train_tokenizer

    if pre == "gpt-2":
        return train_tokenizer(corpus(), vocab_size=vocab_size)
    regex = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[pre]
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def bpe_gguf_metadata(tok, pre: str, chat_template: str | None = None, pad_to: int | None = None,
                      add_bos: bool | None = False) -> list:
    """tokenizer.ggml.* for a byte-level BPE (convert_hf_to_gguf.py's _set_vocab_gpt2); pad_to adds [PAD<i>]
    UNUSED tokens up to that many, as the converter does for a padded embedding; add_bos None leaves
    tokenizer.ggml.add_bos_token out (llama.cpp's default for the pre-tokenizer applies)."""
    import json

    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    types = [int(TokenType.CONTROL if i in special else TokenType.NORMAL) for i in range(len(tokens))]
    for i in range(len(tokens), pad_to or 0):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    eos = vocab["<|endoftext|>"]
    meta = [("tokenizer.ggml.model", "gpt2", _STR, None), ("tokenizer.ggml.pre", pre, _STR, None),
            ("tokenizer.ggml.tokens", tokens, _ARR, _STR), ("tokenizer.ggml.token_type", types, _ARR, GGUFValueType.INT32),
            ("tokenizer.ggml.merges", merges, _ARR, _STR), ("tokenizer.ggml.bos_token_id", eos, _U32, None),
            ("tokenizer.ggml.eos_token_id", eos, _U32, None)]
    if add_bos is not None:
        meta.append(("tokenizer.ggml.add_bos_token", add_bos, _BOOL, None))
    if chat_template is not None:
        meta.append(("tokenizer.chat_template", chat_template, _STR, None))
    return meta


def train_spm(vocab_size: int = 600):
    """A sentencepiece.SentencePieceProcessor: BPE, byte fallback, <unk>=0, <s>=1, </s>=2, Llama 2's
    normalization settings (none, no whitespace collapsing, a dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=0.995,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _sp_pieces(sp, user_defined=()) -> tuple[list, list, list]:
    """(tokens, scores, token types) of a SentencePiece model, typed as convert_hf_to_gguf.py types them."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        t = TokenType.NORMAL
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        elif tokens[-1] in user_defined:
            t = TokenType.USER_DEFINED
        types.append(int(t))
    return tokens, scores, types


def write_vocab_gguf(path: str, meta: list) -> None:
    """A GGUF file holding only the tokenizer metadata `meta` (what llama.cpp's vocab_only loading reads)."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    for key, value, vtype, sub in meta:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def spm_gguf_metadata(sp, pad_to: int | None = None) -> list:
    """tokenizer.ggml.* for a SentencePiece model (convert_hf_to_gguf.py's _create_vocab_sentencepiece);
    pad_to adds [PAD<i>] UNUSED tokens up to that many, as the converter does for a padded embedding."""
    tokens, scores, types = _sp_pieces(sp)
    for i in range(len(tokens), pad_to or 0):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return [("tokenizer.ggml.model", "llama", _STR, None), ("tokenizer.ggml.tokens", tokens, _ARR, _STR),
            ("tokenizer.ggml.scores", scores, _ARR, GGUFValueType.FLOAT32),
            ("tokenizer.ggml.token_type", types, _ARR, GGUFValueType.INT32),
            ("tokenizer.ggml.bos_token_id", sp.bos_id(), _U32, None),
            ("tokenizer.ggml.eos_token_id", sp.eos_id(), _U32, None),
            ("tokenizer.ggml.unknown_token_id", sp.unk_id(), _U32, None),
            ("tokenizer.ggml.add_bos_token", True, _BOOL, None), ("tokenizer.ggml.add_eos_token", False, _BOOL, None)]


UGM_USER_DEFINED = ["<sep>", "@@", "ab"]


def train_ugm(vocab_size: int = 500):
    """(sentencepiece.SentencePieceProcessor, its serialized model): Unigram, nmt_nfkc normalization, extra
    whitespace removed, a dummy prefix, <pad>=0, </s>=1, <unk>=2 (T5's ids), UGM_USER_DEFINED."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   remove_extra_whitespaces=True, add_dummy_prefix=True, character_coverage=0.995,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=UGM_USER_DEFINED,
                                   hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()), buf.getvalue()


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _proto_field(buf: bytes, number: int) -> bytes:
    """The first length-delimited field `number` of a protobuf message (the wire format, without protobuf)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if key >> 3 == number:
                return buf[i:i + n]
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire}")
    return b""


def precompiled_charsmap(model_proto: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3).precompiled_charsmap (field 2), as convert_hf_to_gguf.py copies it."""
    return _proto_field(_proto_field(model_proto, 3), 2)


def ugm_gguf_metadata(sp, model_proto: bytes) -> list:
    """tokenizer.ggml.* for a SentencePiece Unigram model (convert_hf_to_gguf.py's T5 vocabulary)."""
    tokens, scores, types = _sp_pieces(sp, UGM_USER_DEFINED)
    return [("tokenizer.ggml.model", "t5", _STR, None), ("tokenizer.ggml.pre", "default", _STR, None),
            ("tokenizer.ggml.tokens", tokens, _ARR, _STR),
            ("tokenizer.ggml.scores", scores, _ARR, GGUFValueType.FLOAT32),
            ("tokenizer.ggml.token_type", types, _ARR, GGUFValueType.INT32),
            ("tokenizer.ggml.add_space_prefix", True, _BOOL, None),
            ("tokenizer.ggml.remove_extra_whitespaces", True, _BOOL, None),
            ("tokenizer.ggml.precompiled_charsmap", list(precompiled_charsmap(model_proto)), _ARR,
             GGUFValueType.UINT8),
            ("tokenizer.ggml.eos_token_id", sp.eos_id(), _U32, None),
            ("tokenizer.ggml.unknown_token_id", sp.unk_id(), _U32, None),
            ("tokenizer.ggml.padding_token_id", sp.pad_id(), _U32, None),
            ("tokenizer.ggml.add_bos_token", False, _BOOL, None), ("tokenizer.ggml.add_eos_token", True, _BOOL, None)]
