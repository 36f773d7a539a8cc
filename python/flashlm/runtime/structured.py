"""Structured output: a request's tokens constrained to a JSON schema, or to any JSON object.

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))

The grammar library is llguidance (Microsoft's guidance engine, in Rust; pip install llguidance, in the
`serve` extra). Chosen over xgrammar and outlines-core because it depends on nothing (xgrammar pulls in
torch's triton and transformers, and its torch pin would move ours), ships one abi3 wheel for every CPython
from 3.9 on x86-64 and ARM, computes a token mask in tens of microseconds without precompiling per schema
(outlines-core builds a whole index per regex up front), supports the JSON Schema keywords servers see
(vLLM's and llama.cpp's backends use it), and reports a schema it cannot compile as an error rather than
accepting a looser grammar.

Per sampled sequence the engine keeps one matcher (its grammar state). Each step, GrammarBatch writes the
constrained rows' allowed tokens into a bitmask (one bit per token, int32 words, llguidance's layout) that the
sampler applies; once a token is kept the engine advances the matcher with it (advance()), exactly once per
output token, so a recompute after preemption does not advance it again. Once the grammar is complete, only
the end-of-text token is allowed; when the matcher says nothing more can follow, the sequence finishes with
"stop".
"""

import json
from dataclasses import dataclass
from typing import Optional, Union

import torch

from flashlm.runtime.checks import as_bool

# Compact JSON, with json.dumps' separators: no free whitespace, so a model cannot wander in it forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[dict, str]] = None  # a JSON schema (a dict, or its JSON text)
    json_object: bool = False  # any JSON object

    def __post_init__(self):
        self.json_object = as_bool(self.json_object, "structured_outputs: json_object")
        if (self.json is None) == (not self.json_object):
            raise ValueError("structured_outputs: give exactly one of json (a JSON schema) and json_object=True")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs: json is not valid JSON text: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise TypeError(f"structured_outputs: json must be a JSON schema (a dict or its JSON text), got "
                            f"{type(self.json).__name__}")

    @property
    def schema(self):
        return {"type": "object"} if self.json_object else self.json


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured_outputs: needs the llguidance package (pip install 'flashlm[serve]')") from None
    return llguidance


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers over one model's vocabulary. The vocabulary is handed to
    llguidance once, on first use (a second or so for 150k tokens)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer = None

    def _vocabulary(self):
        if self._lltokenizer is None:
            from flashlm.runtime.token_bytes import token_bytes

            llg = _llguidance()
            if not hasattr(self.tokenizer, "backend"):
                raise ValueError("structured_outputs: needs a flashlm tokenizer (flashlm.io.Tokenizer), got "
                                 f"{type(self.tokenizer).__name__}")
            eos = list(getattr(self.tokenizer, "eos_token_ids", ()) or ())
            if not eos:
                raise ValueError("structured_outputs: the tokenizer has no end-of-text token to end the output with")
            wrapper = _Vocabulary(token_bytes(self.tokenizer, self.vocab_size), eos[0], self.tokenizer)
            self._lltokenizer = llg.LLTokenizer(llg.TokenizerWrapper(wrapper), n_vocab=self.vocab_size, eos_token=eos)
        return self._lltokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher for params; ValueError naming structured_outputs for a schema llguidance cannot
        compile."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(params.schema, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs: {e}") from None
        vocab = self._vocabulary()
        error = llg.LLMatcher.validate_grammar(grammar, vocab)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"structured_outputs: the schema cannot be compiled: {error}")
        matcher = llg.LLMatcher(vocab, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs: the schema cannot be compiled: {matcher.get_error()}")
        return matcher


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: the tokens as bytes, EOS/BOS, and an encoder of bytes."""

    def __init__(self, tokens, eos_token_id, tokenizer):
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self._tokenizer = tokenizer
        self._ids = {}  # bytes -> the first id spelling them, for greedy()
        for i, t in enumerate(tokens):
            if t and not t.startswith(b"\xff"):
                self._ids.setdefault(t, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, data) -> list:
        """Token ids that spell exactly `data`: the tokenizer's own, unless they spell something else (a
        SentencePiece tokenizer prepends a space), then greedy()."""
        data = data if isinstance(data, bytes) else data.encode("utf-8")
        # text the grammar spells out: a special token's text is spelled, not replaced by that token
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False,
                                     parse_special=False)
        return ids if b"".join(self.tokens[i] for i in ids) == data else self.greedy(data)

    def greedy(self, data: bytes) -> list:
        """The longest token at each position. Every byte is a token of a byte-level or byte-fallback
        vocabulary; a byte that is not ends the tokenization there."""
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._ids.get(data[i:i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                break
        return out


def token_bitmask(matchers, vocab_size: int) -> Optional[torch.Tensor]:
    """int32 [len(matchers), ceil(vocab_size / 32)]: bit t of row r set when row r may take token t (every bit
    of rows without a matcher); None when no row has one."""
    if all(m is None for m in matchers):
        return None
    mask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for row, m in zip(mask, matchers):
        if m is not None:
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    return mask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens bitmask [B, ceil(V / 32)] forbids at -inf."""
    B, V = logits.shape
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device)[:, :, None] >> bits) & 1).reshape(B, -1)[:, :V].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def advance(matcher, token: int) -> bool:
    """Feeds a kept token to the matcher; whether the sequence must end now (the grammar is complete and allows
    nothing more, or the token broke it)."""
    return not matcher.consume_token(token) or matcher.is_stopped()
