"""SamplingParams: how one request's tokens are chosen and when it stops, with vLLM's names and defaults.

    SamplingParams(temperature=0)                          # greedy
    SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=64, stop=["\\n\\n"])

    SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=5)  # score a prompt (OpenAI's echo)
    SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=12)  # score tokens 12.. of a prompt
    SamplingParams(logprobs=3, structured_outputs=StructuredOutputsParams(json={"type": "object"}))

logprobs and prompt_logprobs ask for each sampled (or prompt) token's log-probability and the top N (N <= 20).
prompt_logprobs_start skips the prompt tokens before it (their entries are None), so the positions before the
one that predicts it may come from the prefix cache: how many continuations of one context are scored.
Penalties follow vLLM: repetition_penalty (HF's multiplicative rule) counts prompt and output tokens;
presence_penalty and frequency_penalty (OpenAI's additive rules) count output tokens only.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

from flashlm.runtime.checks import as_bool, as_count, as_float, as_optional_count, as_seed, as_token_ids
from flashlm.runtime.structured import StructuredOutputsParams

# Below this temperature a request is greedy (vLLM's threshold): dividing logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5
# The most top log-probabilities a request may ask for per token (vLLM's default cap and OpenAI's).
MAX_LOGPROBS = 20
# Completions per prompt: each is a sequence of its own from the start (OpenAI's API allows 128).
MAX_N = 1 << 16


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1: all)
    top_k: int = 0  # keep the k most likely tokens (0 or -1: all)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or the output
    presence_penalty: float = 0.0  # subtracted once from tokens seen in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    max_tokens: Optional[int] = 16  # None: until the model's context is full; 0: end after the prefill
    stop: Optional[Union[str, list]] = None  # strings that end the output (not included in it)
    stop_token_ids: list = field(default_factory=list)  # tokens that end the output (included in token_ids)
    ignore_eos: bool = False
    seed: Optional[int] = None  # a request with a seed samples the same tokens whatever it is batched with
    logprobs: Optional[int] = None  # 0..20: each output token's logprob and the top N (flashlm.runtime.outputs)
    prompt_logprobs: Optional[int] = None  # 0..20: each prompt token's logprob and the top N
    prompt_logprobs_start: int = 1  # the first prompt token given a logprob (token 0 has none)
    structured_outputs: Optional[StructuredOutputsParams] = None  # a JSON schema the output must follow

    def __post_init__(self):
        self.n = as_count(self.n, "n", 1, MAX_N)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, as_float(getattr(self, name), name))
        # Each range reads "not inside", so NaN (which compares false) is refused too.
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        self.top_k = as_count(self.top_k, "top_k", -1)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}: must be in [-2, 2], got {getattr(self, name)}")
        self.max_tokens = as_optional_count(self.max_tokens, "max_tokens", 0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = as_token_ids([] if self.stop_token_ids is None else self.stop_token_ids,
                                           "stop_token_ids")
        self.ignore_eos = as_bool(self.ignore_eos, "ignore_eos")
        self.seed = None if self.seed is None else as_seed(self.seed)
        self.logprobs = as_optional_count(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        self.prompt_logprobs = as_optional_count(self.prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
        self.prompt_logprobs_start = as_count(self.prompt_logprobs_start, "prompt_logprobs_start", 1)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"structured_outputs: expected a StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def can_speculate(self) -> bool:
        """Whether speculative decoding may run this request: not with penalties (they would depend on the drafts),
        logprobs (taken from plain steps' distributions) or a grammar (its mask would depend on the drafts)."""
        return not self.has_penalties and self.logprobs is None and self.structured_outputs is None

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
