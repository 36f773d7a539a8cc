"""Perplexity of a model on a text, through the engine's paged prefill, as llama.cpp and HF compute it.

    llm = LLM("model.gguf", max_model_len=513)
    r = perplexity(llm, open("wiki.test.raw").read(), ctx_size=512)          # llama.cpp's llama-perplexity
    r = perplexity(llm, text, ctx_size=512, method="stride", stride=256)      # HF's sliding-window recipe
    r.ppl, r.nll, r.stderr, r.tokens
    rolling_loglikelihood(llm, token_ids, max_length=512)                     # lm-eval's loglikelihood_rolling

Every method cuts the token ids into windows, runs each window as one prompt with prompt logprobs from its
first scored token on (SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=...): the
model's own log-softmax, logits computed only where a token is scored, many windows batched per step) and
sums the negative log-probabilities of the window's scored tokens:
- "llama.cpp" (examples/perplexity/perplexity.cpp, perplexity()): the text is tokenized with the tokenizer's
  BOS rule and cut into len // ctx_size disjoint chunks (a tail shorter than a chunk is dropped); where the
  tokenizer adds a BOS token, each chunk's first token is replaced by it; only the second half of a chunk
  is scored: the tokens at positions ctx_size // 2 + 1 .. ctx_size - 1, each given the chunk before it.
  The standard error is llama.cpp's: sqrt((mean(nll^2) - mean(nll)^2) / (n - 1)) * ppl.
- "stride" (transformers' docs, "Perplexity of fixed-length models"): windows of ctx_size tokens starting
  every `stride` tokens; each scores the tokens the windows before it did not, never its own first token,
  so with stride < ctx_size every token but the text's first is scored once, with at least
  ctx_size - stride tokens of context once the first window is past. The
  count is exact (the recipe's `num_valid_tokens - batch_size` weighting is off by one per later window).
- rolling: lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window: the first window is
  [prefix] + tokens, later ones predict up to max_length new tokens given the max_length + 1 before their
  last; every token is scored once. The sum of log-probabilities is returned (lm-eval's
  loglikelihood_rolling).

The engine runs a prompt only when it leaves room for one token more, so a window must be shorter than the
LLM's max_model_len (build the LLM with max_model_len=ctx_size + 1, or + 2 for rolling windows).
"""

import math
from dataclasses import dataclass
from typing import Optional

from flashlm.runtime.checks import as_bool, as_count, as_token_ids
from flashlm.runtime.sampling_params import SamplingParams

METHODS = ("llama.cpp", "stride")
DEFAULT_CTX_SIZE = 512  # llama-perplexity's customary -c


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood of the scored tokens, in nats
    stderr: float  # standard error of ppl (llama.cpp's "+/-"); NaN with fewer than two scored tokens
    tokens: int  # tokens scored


@dataclass
class Window:
    """A prompt whose tokens[score_from:] are scored, each given the tokens before it in the window."""
    tokens: list
    score_from: int


class RunningNLL:
    """Sums of nll and nll^2 over scored tokens: the estimate and llama.cpp's standard error at any point."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, nlls) -> None:
        self.count += len(nlls)
        self.total += sum(nlls)
        self.squares += sum(v * v for v in nlls)

    def result(self) -> PerplexityResult:
        nll = self.total / self.count
        ppl = math.exp(nll)
        var = self.squares / self.count - nll * nll
        stderr = math.sqrt(max(var, 0.0) / (self.count - 1)) * ppl if self.count > 1 else math.nan
        return PerplexityResult(ppl, nll, stderr, self.count)


def adds_bos(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer puts before a text (llama.cpp's add_bos), or None where it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer.encode("a")
    return bos if ids[:1] == [bos] and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos] else None


def llama_cpp_windows(ids: list, ctx_size: int, bos: Optional[int]) -> list:
    """llama-perplexity's chunks: disjoint, ctx_size tokens each, the first token replaced by BOS where the
    tokenizer adds one, the second half scored."""
    chunks = len(ids) // ctx_size
    if chunks == 0:
        raise ValueError(f"text_or_ids: {len(ids)} tokens make no window of ctx_size {ctx_size} (llama.cpp's "
                         f"method scores whole windows only)")
    out = []
    for i in range(chunks):
        tokens = ids[i * ctx_size:(i + 1) * ctx_size]
        if bos is not None:
            tokens[0] = bos
        out.append(Window(tokens, ctx_size // 2 + 1))
    return out


def stride_windows(ids: list, ctx_size: int, stride: int) -> list:
    """HF's sliding windows: ctx_size tokens every `stride`, each scoring the tokens after the last one the
    window before it scored (never a window's first token, which has no context)."""
    out, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx_size, len(ids))
        tokens = ids[begin:end]
        out.append(Window(tokens, max(1, prev_end - begin)))
        prev_end = end
        if end == len(ids):
            break
    return out


def rolling_windows(ids: list, prefix_token: int, max_length: int) -> list:
    """lm-eval's get_rolling_token_windows(token_list, prefix_token, max_length, context_len=1) made disjoint
    (make_disjoint_window): each window holds its context and the tokens it predicts, scored from score_from."""
    out, predicted = [], 0
    first = min(max_length, len(ids))
    out.append(Window([prefix_token] + ids[:first], 1))
    predicted = first
    while predicted < len(ids):
        n = min(len(ids) - predicted, max_length)
        end = predicted + n
        start = max(end - max_length - 1, 0)
        out.append(Window(ids[start:end], predicted - start))
        predicted = end
    return out


def score_windows(llm, windows: list, on_window=None) -> list:
    """The negative log-likelihoods of each window's scored tokens, in window order: all windows queued as
    prompts at once (the scheduler batches them), each read when its prefill is done. on_window(i, nlls) is
    called as window i finishes."""
    for i, w in enumerate(windows):
        if len(w.tokens) >= llm.max_model_len:
            raise ValueError(f"ctx_size: a window of {len(w.tokens)} tokens needs max_model_len > {len(w.tokens)}, "
                             f"the LLM has {llm.max_model_len}")
    params = {}  # score_from -> SamplingParams: logits rows only for the scored positions
    index, out = {}, [None] * len(windows)
    try:
        for i, w in enumerate(windows):
            if w.score_from not in params:
                params[w.score_from] = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=0,
                                                      prompt_logprobs_start=w.score_from)
            index[llm.add_request(w.tokens, params[w.score_from])] = i
        while index:
            for result in llm.step():
                if not result.finished or result.request_id not in index:
                    continue
                i = index.pop(result.request_id)
                w = windows[i]
                rows = result.prompt_logprobs
                out[i] = [-rows[p][w.tokens[p]].logprob for p in range(w.score_from, len(w.tokens))]
                if on_window is not None:
                    on_window(i, out[i])
    finally:  # interrupted (Ctrl-C, an error): the engine keeps no window queued
        for request_id in index:
            llm.abort_request(request_id)
    return out


def _token_ids(llm, text_or_ids) -> list:
    if isinstance(text_or_ids, str):
        return list(llm.tokenizer.encode(text_or_ids))
    return as_token_ids(text_or_ids, "text_or_ids", llm.model.cfg.vocab_size)


def perplexity(llm, text_or_ids, ctx_size: Optional[int] = None, method: str = "llama.cpp",
               stride: Optional[int] = None, progress: bool = True) -> PerplexityResult:
    """The perplexity of llm (a flashlm LLM) on a text (tokenized by the LLM's tokenizer, its special tokens
    added) or on token ids, by `method` (module docstring). ctx_size: the window (default 512, or the LLM's
    max_model_len - 1 where that is less); stride: the "stride" method's step (default ctx_size // 2)."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    progress = as_bool(progress, "progress")
    if ctx_size is None:
        ctx_size = min(DEFAULT_CTX_SIZE, llm.max_model_len - 1)
    ctx_size = as_count(ctx_size, "ctx_size", 2)
    if ctx_size >= llm.max_model_len:
        raise ValueError(f"ctx_size: must be less than the LLM's max_model_len {llm.max_model_len} (a prompt "
                         f"leaves room for one token more), got {ctx_size}")
    if method == "llama.cpp" and stride is not None:
        raise ValueError("stride: only the stride method takes it")
    ids = _token_ids(llm, text_or_ids)
    if method == "llama.cpp":
        windows = llama_cpp_windows(ids, ctx_size, adds_bos(llm.tokenizer))
    else:
        stride = as_count(ctx_size // 2 if stride is None else stride, "stride", 1, ctx_size)
        if len(ids) < 2:
            raise ValueError(f"text_or_ids: {len(ids)} tokens, at least 2 are needed")
        windows = stride_windows(ids, ctx_size, stride)
    running = RunningNLL()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w.tokens) - w.score_from for w in windows), desc="perplexity", unit="tok")

    def on_window(i, nlls):
        running.add(nlls)
        if bar is not None:
            r = running.result()
            bar.set_postfix_str(f"ppl {r.ppl:.4f} +/- {r.stderr:.4f}", refresh=False)
            bar.update(len(nlls))

    try:
        nlls = score_windows(llm, windows, on_window)
    finally:
        if bar is not None:
            bar.close()
    total = RunningNLL()  # summed again in window order: the result does not depend on which finished first
    for values in nlls:
        total.add(values)
    return total.result()


def rolling_loglikelihood(llm, token_ids, max_length: int, prefix_token: Optional[int] = None) -> float:
    """lm-eval's loglikelihood_rolling of token_ids: the sum of every token's log-probability, in disjoint
    windows of at most max_length predicted tokens (module docstring). prefix_token: the token the first
    window starts from (default: the tokenizer's BOS, else its EOS, as lm-eval's HF model does)."""
    ids = as_token_ids(token_ids, "token_ids", llm.model.cfg.vocab_size)
    max_length = as_count(max_length, "max_length", 1)
    if max_length + 1 >= llm.max_model_len:
        raise ValueError(f"max_length: windows of max_length + 1 tokens need max_model_len > {max_length + 1}, "
                         f"the LLM has {llm.max_model_len}")
    if prefix_token is None:
        tok = llm.tokenizer
        prefix_token = tok.bos_token_id if tok.bos_token_id is not None else getattr(tok, "eos_token_id", None)
        if prefix_token is None:
            raise ValueError("prefix_token: the tokenizer has no BOS or EOS token, so one must be given")
    prefix_token = as_token_ids([prefix_token], "prefix_token", llm.model.cfg.vocab_size)[0]
    if not ids:
        return 0.0
    return -sum(sum(nlls) for nlls in score_windows(llm, rolling_windows(ids, prefix_token, max_length)))
