"""flashlm.eval.loglikelihood against the model's own full forward: each continuation's summed log-probability
(float64 log-softmax of one full-sequence forward, 1e-4) and whether it is the greedy one; the same numbers with
the context shared through the prefix cache, batched, or scored one request at a time without a cache; context
truncated from the left past max_model_len; bad requests named."""

import pytest
import torch

from compare import assert_close
from flashlm.eval.loglikelihood import loglikelihoods
from flashlm.runtime.engine import LLM
from test_engine import VOCAB, CharTokenizer, make_model

TOK = CharTokenizer()
ATOL = 1e-4


def reference(model, context, continuation):
    """(sum of the continuation's log-probabilities, greedy?) from one full forward in float64 log-softmax."""
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0].double()
    logprobs = logits[len(context) - 1:len(ids) - 1].log_softmax(dim=-1)
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(dim=-1) == target).all())


def greedy_continuation(model, context, n):
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(context):]


def multiple_choice_requests(model, seed=0):
    """Questions of several lengths with four answers each (one of them the model's greedy continuation),
    the same question repeated so that a context is shared by many requests."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for n in (5, 23, 41, 1):
        context = TOK.encode("question, ") + torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        answers = [torch.randint(1, VOCAB, (int(k),), generator=gen).tolist() for k in (1, 3, 7)]
        answers.append(greedy_continuation(model, context, 4))
        requests += [(context, a) for a in answers]
    return requests


def check_against_reference(model, requests, got):
    assert len(got) == len(requests)
    want = [reference(model, c, a) for c, a in requests]
    assert_close(torch.tensor([g[0] for g in got], dtype=torch.float64), torch.tensor([w[0] for w in want]),
                 atol=ATOL, name="continuation log-likelihoods")
    assert [g[1] for g in got] == [w[1] for w in want]
    assert sum(g[1] for g in got) >= 4  # the greedy continuations are recognised


@pytest.mark.parametrize("kw", [
    dict(max_num_seqs=16, max_num_batched_tokens=512),  # all in one batch
    dict(max_num_seqs=3, max_num_batched_tokens=16),  # a few at a time, chunked prefill
], ids=["batched", "chunked"])
def test_loglikelihoods_equal_the_full_forward(kw):
    model = make_model("llama", seed=21)
    llm = LLM(model, TOK, block_size=4, **kw)
    requests = multiple_choice_requests(model)
    got = loglikelihoods(llm, requests)
    check_against_reference(model, requests, got)
    assert llm.block_manager.stats.hit_tokens > 0  # each question's blocks were computed once, then reused
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_prefix_sharing_and_batching_change_nothing():
    model = make_model("qwen2", seed=22)
    requests = multiple_choice_requests(model, seed=1)
    shared = loglikelihoods(LLM(model, TOK, block_size=4), requests)
    alone_llm = LLM(model, TOK, block_size=4, max_num_seqs=1, enable_prefix_caching=False)
    alone = [loglikelihoods(alone_llm, [r])[0] for r in requests]
    assert_close(torch.tensor([s[0] for s in shared]), torch.tensor([a[0] for a in alone]), atol=ATOL,
                 name="shared against alone")
    assert [s[1] for s in shared] == [a[1] for a in alone]
    check_against_reference(model, requests, shared)


def test_a_long_context_loses_tokens_from_the_left():
    model = make_model("llama", seed=23, seq_len=96)
    llm = LLM(model, TOK, block_size=4, max_model_len=32)
    context, continuation = TOK.encode("a context far longer than the model may take at once, "), TOK.encode("ok")
    (logprob, greedy), = loglikelihoods(llm, [(context, continuation)])
    kept = context[-(31 - len(continuation)):]  # the prompt holds max_model_len - 1 tokens
    want, want_greedy = reference(model, kept, continuation)
    assert logprob == pytest.approx(want, abs=ATOL) and greedy == want_greedy
    assert loglikelihoods(llm, []) == []


@pytest.mark.parametrize("requests, error, match", [
    ("abc", TypeError, r"^requests: "),
    ([([1, 2], [3], [4])], TypeError, r"^requests\[0\]: "),
    ([([1], [2]), ([], [3])], ValueError, r"^requests\[1\] context: is empty"),
    ([([1], [])], ValueError, r"^requests\[0\] continuation: is empty"),
    ([([1], [VOCAB])], ValueError, r"^requests\[0\] continuation"),
    ([([1.5], [2])], TypeError, r"^requests\[0\] context"),
    ([([1], [2] * 40)], ValueError, r"^requests\[0\] continuation: 40 tokens"),
])
def test_bad_requests_are_named(requests, error, match):
    llm = LLM(make_model("llama", seed=24), TOK, block_size=4, max_model_len=32)
    with pytest.raises(error, match=match):
        loglikelihoods(llm, requests)


def test_waves_submit_every_request_once_shared_prefix_first():
    from flashlm.eval.loglikelihood import _waves

    contexts = [[1], [1], [1], [2], [2], [3], [4], [4]]
    waves = _waves(contexts, 2)
    assert waves[0] == [0] and sorted(j for w in waves for j in w) == list(range(len(contexts)))
    assert waves[1:] == [[3], [1, 2, 4], [5, 6], [7]]  # per two contexts: their first requests, then the rest
    assert _waves([[5]], 8) == [[0]]
