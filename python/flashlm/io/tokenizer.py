"""Tokenizer: what the runtime needs of a model's tokenizer, over a `tokenizers.Tokenizer`.

    tok = Tokenizer(hf_tokenizer, eos_token_ids=[2], bos_token_id=1, chat_template=template)
    ids = tok.encode("Hello")                       # with the tokenizer's own special tokens (BOS, ...)
    text = tok.decode(ids)                          # special tokens dropped
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

The chat template is rendered as transformers renders it: jinja2 in a sandbox, blocks trimmed, with
raise_exception, strftime_now and a non-ASCII-escaping tojson, and bos_token/eos_token (the tokens'
strings) in scope. The loaders beside it build it from an HF directory or from GGUF metadata.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Iterable, Optional, Sequence


def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def check_fits_model(backend, vocab_size: int, where: str) -> None:
    """ValueError unless every id the tokenizer (a tokenizers.Tokenizer, or a flashlm Tokenizer) can produce has
    a row in the model's embedding of vocab_size rows: an id past it would read outside the table."""
    n = backend.vocab_size if isinstance(backend, Tokenizer) else backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")


class Tokenizer:
    def __init__(self, tokenizer, eos_token_ids: Iterable[int] = (), bos_token_id: Optional[int] = None,
                 chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, silent_ids: Iterable[int] = (), rebuild=None,
                 vocab_size: Optional[int] = None, serialize=None):
        """tokenizer: a tokenizers.Tokenizer (its post-processor adds BOS/EOS where the model wants them).
        eos_token_ids: every id that ends generation. bos_token/eos_token: the strings templates see; by
        default the tokens of bos_token_id and the first eos id. silent_ids: ids that decode to no text
        (a GGUF vocabulary's UNUSED padding tokens, as llama.cpp prints them). rebuild: a function returning a
        new copy of `tokenizer`, for one whose custom (Python) parts tokenizers cannot serialize. vocab_size:
        how many ids it has, where tokenizers' count of distinct token strings is not that. serialize: a
        function returning the JSON text to_str() gives, for one tokenizers cannot serialize."""
        self._tok = tokenizer
        self._rebuild = rebuild
        self._serialize = serialize
        self._vocab_size = vocab_size
        self._silent = frozenset(int(i) for i in silent_ids)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.chat_template = chat_template
        n = self.vocab_size
        for name, ids in (("eos_token_ids", self.eos_token_ids), ("bos_token_id", [self.bos_token_id])):
            bad = [i for i in ids if i is not None and not 0 <= i < n]
            if bad:
                raise ValueError(f"{name}: {bad} outside the vocabulary [0, {n})")
        self.bos_token = bos_token if bos_token is not None else self._token(self.bos_token_id)
        self.eos_token = eos_token if eos_token is not None else \
            self._token(self.eos_token_ids[0] if self.eos_token_ids else None)

    def _token(self, i: Optional[int]) -> Optional[str]:
        return None if i is None else self._tok.id_to_token(i)

    @property
    def backend(self):
        """The underlying tokenizers.Tokenizer."""
        return self._tok

    def to_str(self) -> str:
        """The JSON text a checkpoint, a run or an export stores: tokenizers' tokenizer.json, or for a t5 GGUF
        vocabulary (whose normalizer tokenizers cannot serialize) flashlm's form of its metadata
        (flashlm.io.gguf_vocab_json); tokenizer_from_json reads either."""
        return self._serialize() if self._serialize is not None else self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is not None:
            return self._vocab_size
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens: add the model's own (BOS, ...) around it.
        parse_special: special tokens' text (`<|im_start|>`) becomes those tokens; with False it is
        tokenized as ordinary text, as llama.cpp's parse_special=false does (for text a user wrote)."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        tok = self._tok if parse_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    @cached_property
    def _plain(self):
        """A copy of the tokenizer that reads special tokens' text as text (its own setting, so that encodes
        on other threads are unaffected)."""
        plain = self._rebuild() if self._rebuild is not None else type(self._tok).from_str(self._tok.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`. Ids past the tokenizer's vocabulary decode to nothing, as in transformers: a
        model's embedding is often padded beyond its tokenizer (Qwen2: 151936 rows, 151665 tokens) and
        sampling can pick a padding row."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"ids: negative token ids {[i for i in ids if i < 0][:4]}")
        n = self.vocab_size
        ids = [i for i in ids if i < n and i not in self._silent]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    @cached_property
    def _compiled_template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); extra keyword arguments
        (tools, documents, ...) are passed to the template. Encode the result with add_special_tokens=False
        when the template writes the BOS token itself."""
        if not self.chat_template:
            raise ValueError("chat template: this tokenizer has none")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        variables = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        variables.update(kwargs)
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **variables)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids})")
