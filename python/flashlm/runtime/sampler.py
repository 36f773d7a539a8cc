"""Sampler: the next token of every running sequence from one batch of logits, in a handful of tensor ops.

    sampler = Sampler(vocab_size)
    tokens = sampler(logits, [SamplingInput(params, prompt_ids, output_ids, generator), ...])

Order (vLLM's): penalties -> grammar mask -> temperature -> top-k and top-p -> min-p -> sample. A grammar's
token bitmask (structured outputs) sets the tokens a row's grammar forbids to -inf. Requests with logprobs get
them from the distribution after penalties, the grammar mask and temperature (temperature 1 for greedy rows),
before the truncation, for their rows only (Sampler.sample): a token the grammar forbids reports -inf.
Greedy rows take the argmax of the penalised, masked logits. Sampling uses the exponential race: token =
argmax(p / E) with E ~ Exponential(1) per vocabulary entry, which draws from p exactly and lets each seeded
request draw its E from its own generator, so a seeded request gets the same tokens whatever it is batched
with. Only seeded rows cost a Python-level call each; the rest share one draw.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from flashlm.runtime.logprobs import token_logprobs
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.structured import apply_token_bitmask


@dataclass
class SamplingInput:
    params: SamplingParams
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    generator: Optional[torch.Generator] = None  # the request's own, when params.seed is set


def _padded(rows, device) -> torch.Tensor:
    """int64 [len(rows), max_len] with -1 padding (at least one column)."""
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
    return out.to(device)


def token_counts(rows, vocab_size: int, device) -> torch.Tensor:
    """float32 [len(rows), vocab_size]: how often each token occurs in each row."""
    ids = _padded(rows, device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, torch.where(ids < 0, vocab_size, ids), torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
    """Penalised copy of logits [B, V] (float32)."""
    B, V = logits.shape
    device = logits.device
    rep = torch.tensor([s.params.repetition_penalty for s in inputs], device=device)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in inputs], device=device)[:, None]
    freq = torch.tensor([s.params.frequency_penalty for s in inputs], device=device)[:, None]
    out_counts = token_counts([s.output_ids for s in inputs], V, device)
    seen = (out_counts > 0) | (token_counts([s.prompt_ids for s in inputs], V, device) > 0)
    # HF's rule: a seen token's positive logit is divided by the penalty, a negative one multiplied.
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * out_counts - pres * (out_counts > 0).float()


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens outside each row's top-k, top-p and min-p sets at -inf. top_k int64 [B]
    (<= 0: all), top_p and min_p float32 [B]. The most likely token always survives."""
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device).expand(B, V)
    k = torch.where(top_k <= 0, V, top_k.clamp(max=V))[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep a token when the probability before it is still short of top_p (so the first always stays).
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    filtered = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, filtered)


class BatchParams:
    """The per-row sampling parameters of one batch as tensors, with the flags that let a step skip what no row
    asks for. Built when the batch's requests change (Sampler keeps the last one), not every step."""

    def __init__(self, params: list, device):
        self.params = params
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.all_greedy = all(p.greedy for p in params)
        self.has_penalties = any(p.has_penalties for p in params)
        # Greedy rows keep temperature 1 (their logprobs are the untempered distribution's).
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)[:, None]
        self.filter = None  # (top_k, top_p, min_p) where a row truncates its distribution
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            self.filter = (torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
                           torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                           torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))
        self.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.logprob_index = torch.tensor(self.logprob_rows, dtype=torch.int64, device=device)


class Sampler:
    def __init__(self, vocab_size: int, generator: Optional[torch.Generator] = None):
        self.vocab_size = vocab_size
        self.generator = generator  # the draw for requests without a seed (None: torch's default)
        self._batch: Optional[BatchParams] = None  # the last batch's, reused while its requests stay the same

    def batch_params(self, inputs: Sequence[SamplingInput], device) -> BatchParams:
        """The inputs' BatchParams: the last one when the rows hold the same requests' parameters (a comparison
        of object identities in the common case), else new."""
        params = [s.params for s in inputs]
        batch = self._batch
        if batch is None or batch.params != params or batch.greedy.device != torch.device(device):
            batch = self._batch = BatchParams(params, device)
        return batch

    def _check(self, logits: torch.Tensor, inputs):
        """(the first vocab_size columns of logits as float32, penalised; the inputs' BatchParams)."""
        if logits.dim() != 2 or logits.shape[0] != len(inputs) or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits: expected [{len(inputs)}, >= {self.vocab_size}], got {tuple(logits.shape)}")
        logits = logits[:, :self.vocab_size].float()
        batch = self.batch_params(inputs, logits.device)
        if batch.has_penalties:
            logits = apply_penalties(logits, inputs)
        return logits, batch

    @staticmethod
    def _processed(logits: torch.Tensor, batch: BatchParams) -> torch.Tensor:
        """Temperature, then top-k / top-p / min-p."""
        logits = logits / batch.temperature
        if batch.filter is not None:
            logits = filter_logits(logits, *batch.filter)
        return logits

    def probs(self, logits: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
        """float32 [B, vocab]: the distribution each row samples from; one-hot at the argmax for greedy rows."""
        logits, batch = self._check(logits, inputs)
        probs = self._processed(logits, batch).softmax(dim=-1)
        if bool(batch.greedy.any()):
            onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
            probs = torch.where(batch.greedy[:, None], onehot, probs)
        return probs

    def random(self, inputs: Sequence[SamplingInput], shape, kind: str = "exponential", device="cpu") -> torch.Tensor:
        """float32 [B, *shape] of Exponential(1) or Uniform[0, 1) draws on `device` (where the generators live);
        a seeded request's row comes from its own generator."""
        out = torch.empty((len(inputs), *shape), dtype=torch.float32, device=device)
        fill = (lambda t, g: t.exponential_(generator=g)) if kind == "exponential" else (lambda t, g: t.uniform_(generator=g))
        fill(out, self.generator)
        for i in [i for i, s in enumerate(inputs) if s.generator is not None]:
            if not inputs[i].params.greedy:
                fill(out[i], inputs[i].generator)
        if kind == "exponential":
            out.clamp_(min=torch.finfo(torch.float32).tiny)  # a draw of exactly 0 would make p / E = 0 / 0
        return out

    def sample_from(self, probs: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
        """int64 [B]: a draw from each row of probs [B, V] (the exponential race)."""
        return (probs / self.random(inputs, probs.shape[1:], device=probs.device)).argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, inputs: Sequence[SamplingInput]) -> torch.Tensor:
        """int64 [B]: the next token of each row of logits [B, >= vocab_size] (extra padded columns are
        ignored)."""
        return self.sample(logits, inputs)[0]

    def sample(self, logits: torch.Tensor, inputs: Sequence[SamplingInput], token_bitmask=None):
        """(tokens int64 [B], logprobs): the next tokens as __call__, and None when no row asks for logprobs,
        else a list with a TokenLogprobs for each row that does (params.logprobs) and None for the others.
        token_bitmask: None, or int32 [B, ceil(vocab / 32)] with bit t of row r set where row r may take token t
        (structured.token_bitmask)."""
        logits, batch = self._check(logits, inputs)
        allowed = logits if token_bitmask is None else apply_token_bitmask(logits, token_bitmask)
        tokens = allowed.argmax(dim=-1)
        if not batch.all_greedy:
            sampled = self.sample_from(self._processed(allowed, batch).softmax(dim=-1), inputs)
            tokens = torch.where(batch.greedy, tokens, sampled)
        return tokens, self._logprobs(allowed, batch, tokens)

    @staticmethod
    def _logprobs(logits: torch.Tensor, batch: BatchParams, tokens: torch.Tensor):
        if not batch.logprob_rows:
            return None  # the common case costs nothing per row
        index = batch.logprob_index
        logprobs = (logits[index] / batch.temperature[index]).log_softmax(dim=-1)
        out = [None] * len(batch.params)
        num_top = [batch.params[i].logprobs for i in batch.logprob_rows]
        for i, entry in zip(batch.logprob_rows, token_logprobs(logprobs, tokens[index], num_top)):
            out[i] = entry
        return out
