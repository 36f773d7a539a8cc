"""llama.cpp's BPE pre-tokenizers (tokenizer.ggml.pre) as `tokenizers` pre-tokenizers.

    split = pre_tokenizer_for("deepseek-llm")   # PreTok(regexes, ignore_merges, add_bos, byte_level)

llama.cpp (llama-vocab.cpp, llm_tokenizer_bpe) splits text with a list of regexes, each applied to every
piece the previous ones left, keeping both the matches and the text between them as pieces: that is a
Sequence of tokenizers' Split(regex, "isolated"). The regexes here are llama.cpp's own, in the adapted forms
it runs (case-insensitive contractions spelled out as '[sS]', tekken's and gpt-4o's upper/lower-case
classes as lookaheads), because those forms, not the tokenizer.json originals, decide its splits: its
regex engine sees every non-ASCII codepoint as just its category (letter, number, ...), so the lookahead
forms treat a non-ASCII lowercase letter as both cases, and Oniguruma does the same with them.

Names llama.cpp tokenizes with code of its own rather than a regex (kimi-k2's Han handling, afmoe's and
tiny_aya's digit grouping), with a regex of empty matches (superbpe), with upper/lowercase letter classes
its regex engine reads as any letter (youtu), with raw UTF-8 BPE other than gemma4's (sarvam-moe) or with
their own session (hybriddna, whitespace) are refused, as a guess would split text differently.
"""

from __future__ import annotations

from typing import NamedTuple


class PreTok(NamedTuple):
    regexes: tuple          # applied in order; None: GPT-2's own ByteLevel regex
    ignore_merges: bool     # a piece that is a token is taken whole (llama.cpp's ignore_merges)
    add_bos: bool           # llama.cpp's add_bos when the file does not say
    byte_level: bool = True  # GPT-2's byte-to-unicode mapping (False: raw UTF-8, ▁ for spaces)


_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                           r"\s+(?!\S)|\s+")
_UPPER = r"((?=[\p{L}])([^a-z]))"   # a letter that is not a-z (llama.cpp's stand-in for \p{Lu}...)
_LOWER = r"((?=[\p{L}])([^A-Z]))"   # a letter that is not A-Z (for \p{Ll}...)
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|"
          rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?|\p{{N}}{{1,3}}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_BAILING = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]|\s+(?!\S)|\s+")
_EXAONE_MOE = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|"
                               r"\s*[\r\n]|\s+(?!\S)|\s+")
# llama.cpp's character classes, written with escapes: their codepoints are exact (an editor normalizing
# text to NFC would turn U+1F7D into U+03CE and U+212A into K). llama.cpp replaces non-ASCII whitespace by
# \v before matching them, so a class never matches whitespace (U+3000 in U+0800-U+4E00): "&&\S" says so.
_CJK = "[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&\\S]+"
_JAIS2 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                          + "|".join(rf"\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
                          + r"|\s{1,2}(?!\S)|\s{1}")
_UPPER_M = r"((?=[\p{L}\p{M}])([^a-z]))"   # _UPPER and _LOWER with marks counted as letters
_LOWER_M = r"((?=[\p{L}\p{M}])([^A-Z]))"
_GRANITE_EMB = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_M}*{_LOWER_M}+{_CONTRACTIONS}?|"
                rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER_M}+{_LOWER_M}*{_CONTRACTIONS}?|"
                r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_MINICPM5 = (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                                           r"\s+(?!\S)|\s+")
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEEPSEEK3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
              r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102"
    "\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]&&\\S]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_SPARK = (r"\p{N}{1,3}", _DEEPSEEK3[1],
          r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|"
          r"[\r\n]|\s+(?!\S)|\s+", r"\p{N}")
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CHAMELEON = (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\t\n]|    |  )", r"\p{N}",
              r"[\p{P}!-/:-@\[-`{-~]", _GPT2)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> PreTok, as llama-vocab.cpp maps each name to a pre-tokenizer type and flags
PRE_TOKENIZERS = {}
for _names, _pre in [
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
      "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"), PreTok((None,), False, False)),
    (("default",), PreTok(_DEFAULT, False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
     PreTok((_LLAMA3,), True, True)),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), PreTok((_LLAMA3,), False, False)),
    (("glm4", "glm5"), PreTok((_LLAMA3,), True, False)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez", "hunyuan", "solar-open", "grok-2"),
     PreTok((_QWEN2,), False, False)),
    (("qwen35",), PreTok((_QWEN35,), False, False)),
    (("laguna",), PreTok(("[^\n]+|[\n]+", _QWEN2), False, False)),
    (("deepseek-llm",), PreTok(_DEEPSEEK_LLM, False, False)),
    (("deepseek-coder",), PreTok(_DEEPSEEK_CODER, False, False)),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), PreTok(_DEEPSEEK3, False, False)),
    (("falcon",), PreTok(_FALCON, False, False)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
     PreTok(_DIGITS_THEN_GPT2, False, False)),
    (("tekken",), PreTok((_TEKKEN,), True, True)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), PreTok((_GPT4O,), False, False)),
    (("seed-coder",), PreTok((_SEED_CODER,), False, False)),
    (("bailingmoe", "bailingmoe2", "llada-moe"), PreTok((_BAILING,), False, False)),
    (("exaone-moe",), PreTok((_EXAONE_MOE,), False, False)),
    (("jais-2",), PreTok((_JAIS2,), False, False)),
    (("granite-embed-multi-97m",), PreTok((_GRANITE_EMB,), True, False)),
    (("minicpm5",), PreTok(_MINICPM5, True, False)),
    (("ufakzeka",), PreTok((_UFAKZEKA,), False, False)),
    (("spark2_5",), PreTok(_SPARK, False, False)),
    (("bloom", "poro-chat", "gpt3-finnish"), PreTok((_BLOOM,), False, False)),
    (("viking",), PreTok((_BLOOM, r"\p{N}"), False, False)),
    (("chameleon",), PreTok(_CHAMELEON, False, True)),
    (("gemma4", "granite-embed-multi-311m"), PreTok(("[^\n]+|[\n]+",), False, True, byte_level=False)),
]:
    for _name in _names:
        PRE_TOKENIZERS[_name] = _pre


def pre_tokenizer_for(name: str) -> PreTok:
    """The PreTok for a tokenizer.ggml.pre name; ValueError naming it and the supported ones otherwise."""
    if name not in PRE_TOKENIZERS:
        raise ValueError(f"metadata: tokenizer.ggml.pre {name!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    return PRE_TOKENIZERS[name]


def build_pre_tokenizer(pre: PreTok):
    """The tokenizers pre-tokenizer: the splits in order, then GPT-2's byte mapping for byte-level vocabularies."""
    from tokenizers import Regex, pre_tokenizers

    if pre.regexes == (None,):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
    if pre.byte_level:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)
