"""Log-likelihoods of continuations given contexts, through the serving engine: lm-evaluation-harness's
`loglikelihood` primitive, which multiple-choice benchmarks reduce to.

    from flashlm.eval.loglikelihood import loglikelihoods
    llm = LLM("model.gguf")
    ctx = llm.tokenizer.encode("Question: 2 + 2 =")
    scores = loglikelihoods(llm, [(ctx, llm.tokenizer.encode(" 4", add_special_tokens=False)), (ctx, ...)])
    scores[0]  # (sum of the continuation tokens' log-probabilities, whether greedy decoding gives exactly them)

Each (context, continuation) pair becomes one request for context + continuation with max_tokens=0 and prompt
logprobs from the continuation's first token on (SamplingParams.prompt_logprobs_start), so the engine batches
them all and the context's whole KV blocks come from the prefix cache for every continuation after the first:
a question is computed once for its four answers. The cache only holds what a finished step computed, so the
requests go in waves (_waves): the first one alone (what every context shares, such as a few-shot prefix, is
then cached), then one per context, then the other continuations of those contexts, a bounded number of
contexts at a time so that their blocks are still cached when their continuations come. The results come back
in the order given.

A pair longer than the engine's max_model_len - 1 tokens loses context tokens from the left (as lm-eval
truncates to its max_length); the continuation itself must fit.
"""

from typing import Sequence

from flashlm.runtime.checks import as_token_ids
from flashlm.runtime.sampling_params import SamplingParams


def _check_requests(requests, vocab_size: int) -> list:
    """[(context, continuation)] as lists of token ids, each checked; errors name the request."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise TypeError(f"requests: expected a list of (context_ids, continuation_ids) pairs, got "
                        f"{type(requests).__name__}")
    out = []
    for i, pair in enumerate(requests):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"requests[{i}]: expected a (context_ids, continuation_ids) pair, got {pair!r:.80}")
        context = as_token_ids(pair[0], f"requests[{i}] context", vocab_size)
        continuation = as_token_ids(pair[1], f"requests[{i}] continuation", vocab_size)
        if not context:
            raise ValueError(f"requests[{i}] context: is empty (start it with the BOS token, as lm-eval does)")
        if not continuation:
            raise ValueError(f"requests[{i}] continuation: is empty")
        out.append((context, continuation))
    return out


def _truncated(context: list, continuation: list, max_tokens: int, index: int) -> tuple:
    """(prompt ids, first continuation position): context tokens dropped from the left so that the prompt has at
    most max_tokens tokens, at least one of them context."""
    if len(continuation) > max_tokens - 1:
        raise ValueError(f"requests[{index}] continuation: {len(continuation)} tokens do not fit max_model_len with "
                         f"a context token (at most {max_tokens - 1})")
    keep = min(len(context), max_tokens - len(continuation))
    return context[len(context) - keep:] + continuation, keep


def _waves(contexts: list, contexts_per_wave: int) -> list:
    """Positions of `contexts` (sorted, equal ones adjacent) in submission waves: [0] alone, then for each run of
    up to contexts_per_wave distinct contexts, the first position of each, then the rest of them."""
    starts = [j for j in range(len(contexts)) if j == 0 or contexts[j] != contexts[j - 1]] + [len(contexts)]
    waves = [[0]]
    for g in range(0, len(starts) - 1, contexts_per_wave):
        group = range(g, min(g + contexts_per_wave, len(starts) - 1))
        firsts = [starts[k] for k in group if starts[k] != 0]
        rest = [j for k in group for j in range(starts[k] + 1, starts[k + 1])]
        waves += [w for w in (firsts, rest) if w]
    return waves


def loglikelihoods(llm, requests, progress: bool = False) -> list:
    """[(logprob, is_greedy)] per (context_ids, continuation_ids) request, in order: the sum of the continuation
    tokens' log-probabilities given the context (float32 log-softmax of the model's logits), and whether each
    continuation token is the most likely one at its position (greedy decoding would produce the continuation)."""
    pairs = _check_requests(requests, llm.model.cfg.vocab_size)
    max_tokens = llm.max_model_len - 1  # the engine computes every prompt token, leaving room for one more
    prompts, params = [], []
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], i))  # one context's requests together
    for i in order:
        ids, start = _truncated(*pairs[i], max_tokens, i)
        prompts.append(ids)
        params.append(SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=start))
    if not prompts:
        return []
    outs = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="scoring", unit="req")
    for wave in _waves([pairs[i][0] for i in order], llm.scheduler.max_num_seqs):
        for j, out in zip(wave, llm.generate([prompts[j] for j in wave], [params[j] for j in wave])):
            outs[j] = out
        if bar is not None:
            bar.update(len(wave))
    if bar is not None:
        bar.close()
    results = [None] * len(pairs)
    for i, ids, p, out in zip(order, prompts, params, outs):
        entries = [out.prompt_logprobs[j][ids[j]] for j in range(p.prompt_logprobs_start, len(ids))]
        results[i] = (sum(e.logprob for e in entries), all(e.rank == 1 for e in entries))
    return results
