"""What the engine returns, shaped like vLLM's: RequestOutput with one CompletionOutput per sample (n)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: Optional[str] = None  # "stop" (EOS, a stop token or string), "length", or None while running


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
