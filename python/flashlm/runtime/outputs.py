"""What the engine returns, shaped like vLLM's: RequestOutput with one CompletionOutput per sample (n)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """A token's log-probability in one position's distribution, and its rank there (1: the most likely)."""
    logprob: float
    rank: int
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: Optional[str] = None  # "stop" (EOS, a stop token or string), "length", or None while running
    # With SamplingParams.logprobs: per output token, {token_id: Logprob} holding the sampled token and the top N.
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None  # the sum of the sampled tokens' logprobs


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of a request's life."""
    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_output_tokens: int = 0

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> Optional[float]:
        """Mean time between output tokens after the first (None with fewer than two)."""
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list = field(default_factory=list)  # CompletionOutput, one per sample
    finished: bool = False
    metrics: Optional[RequestMetrics] = None
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first, then {token_id: Logprob} holding
    # the prompt's token and the top N.
    prompt_logprobs: Optional[list] = None
