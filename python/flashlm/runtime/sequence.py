"""Sequence: one request's tokens and where it stands (waiting, running, finished).

token_ids is the prompt followed by the output so far. num_computed counts the leading tokens whose K and V
are in the paged cache; the tokens after it are computed by the next step that schedules the sequence. With a
prompt-tuning adapter the prompt starts with num_virtual placeholder ids (runtime.virtual_tokens): they take
cache slots and count towards the length, while prompt_ids (what the sampler and the outputs see) leaves them out.
"""

import enum
import itertools
from typing import Optional

from flashlm.runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


class Sequence:
    def __init__(self, seq_id: int, prompt_ids, params: Optional[SamplingParams] = None, num_virtual: int = 0):
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError(f"prompt_ids of sequence {seq_id}: must not be empty")
        self.seq_id = seq_id
        self.token_ids = prompt_ids
        self.num_prompt_tokens = len(prompt_ids)
        self.num_virtual = num_virtual
        self.params = params if params is not None else SamplingParams()
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_cached_prompt_tokens = 0  # found in the prefix cache at the last admission
        self.num_preemptions = 0
        self.finish_reason: Optional[str] = None  # "stop" or "length", as OpenAI's API says
        self.arrival = next(_arrivals)  # the order of priority: earlier arrivals are scheduled first
        # runtime.logprobs.TokenLogprobs: per output token when params.logprobs is set; per prompt token after
        # the first (None) when the engine asks this sequence for prompt_logprobs.
        self.logprobs: Optional[list] = None if self.params.logprobs is None else []
        self.prompt_logprobs: Optional[list] = None
        self.matcher = None  # the grammar state of a request with structured_outputs (runtime.structured)
        self.sampling_input = None  # the runner's SamplingInput for it, made on its first sampled step

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Whether prompt logprobs are wanted and some are not computed yet (its prefill must compute the
        positions that give them, not take them from the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def max_cached_prompt_tokens(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last (its logits are sampled),
        and with prompt logprobs pending, those before the position that predicts the next one wanted."""
        if self.prompt_logprobs_pending:
            return len(self.prompt_logprobs) - 1
        return self.num_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_ids(self) -> list:
        return self.token_ids[self.num_virtual:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self):
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed})")
