"""Speculative decoding: the rejection sampler's output distribution equals the target's (many draws on a
small vocabulary), greedy speculation reproduces target-only greedy tokens through the engine, and sampled
speculation through the engine matches the target model's own next-token probabilities."""

import math

import pytest
import torch

from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.engine import LLM
from flashlm.runtime.sampler import Sampler, SamplingInput
from flashlm.runtime.sampling_params import SamplingParams
from flashlm.runtime.speculative import rejection_sample

from test_engine import PROMPTS, CharTokenizer, VOCAB, greedy_reference, make_model


def within(freq, p, n, what):
    bound = 5 * math.sqrt(p * (1 - p) / n) + 1e-12  # 5 standard errors: a false failure is ~1e-6 per cell
    assert abs(freq - p) <= bound, f"{what}: frequency {freq:.4f}, expected {p:.4f} +- {bound:.4f}"


def test_rejection_sampler_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, k, N = 5, 2, 40000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, dim=-1)
    q[1, 3] = 0.0  # a token the draft never proposes
    q[1] /= q[1].sum()
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], dim=1)
    sampler = Sampler(V, torch.Generator().manual_seed(1))
    inputs = [SamplingInput(SamplingParams(temperature=1.0))] * N
    num_acc, final = rejection_sample(sampler, p.expand(N, k + 1, V), q.expand(N, k, V), drafts, inputs)
    first = torch.where(num_acc >= 1, drafts[:, 0], final)
    for t in range(V):
        within((first == t).double().mean().item(), p[0, t].item(), N, f"first token {t}")
    within((num_acc >= 1).double().mean().item(), torch.minimum(p[0], q[0]).sum().item(), N, "acceptance")
    # Given the first draft was kept, the second token follows p[1] (here independent of the first).
    kept = num_acc >= 1
    second = torch.where(num_acc[kept] >= 2, drafts[kept, 1], final[kept])
    for t in range(V):
        within((second == t).double().mean().item(), p[1, t].item(), int(kept.sum()), f"second token {t}")


def test_rejection_sampler_greedy_is_the_argmax():
    g = torch.Generator().manual_seed(2)
    B, k, V = 64, 3, 7
    logits_p = torch.randn(B, k + 1, V, generator=g)
    p = torch.zeros_like(logits_p).scatter_(-1, logits_p.argmax(-1, keepdim=True), 1.0)
    drafts = torch.where(torch.rand(B, k, generator=g) < 0.6, logits_p[:, :k].argmax(-1), torch.randint(0, V, (B, k), generator=g))
    q = torch.zeros(B, k, V).scatter_(-1, drafts[..., None], 1.0)
    num_acc, final = rejection_sample(Sampler(V), p, q, drafts, [SamplingInput(SamplingParams(temperature=0))] * B)
    target = logits_p.argmax(-1)
    for i in range(B):
        a = int(num_acc[i])
        assert drafts[i, :a].tolist() == target[i, :a].tolist()
        assert a == k or drafts[i, a] != target[i, a]
        assert final[i] == target[i, a]


@pytest.mark.parametrize("draft_seed, k, kw", [
    (0, 3, {}),                                              # the target itself as draft: every draft accepted
    (7, 4, {}),                                              # an unrelated draft: mostly rejected
    (0, 3, dict(max_num_seqs=3, block_size=2)),              # small blocks: accepted drafts cross into scratch
], ids=["self-draft", "other-draft", "small-blocks"])
def test_greedy_speculation_equals_target_greedy(draft_seed, k, kw):
    target = make_model("llama", seed=0)
    draft = make_model("llama", seed=draft_seed) if draft_seed else target
    tok = CharTokenizer()
    llm = LLM(target, tok, draft_model=draft, num_speculative_tokens=k, **kw)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 30, 5, 20, 25, 8, 30, 17)]
    outs = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        assert out.outputs[0].token_ids == greedy_reference(target, tok.encode(prompt), p.max_tokens), prompt
    assert llm.spec.num_proposed > 0
    if draft is target:
        assert llm.spec.acceptance_rate == 1.0
    assert llm.block_manager.seq_ids() == []


@pytest.mark.parametrize("draft_window", [6, None], ids=["windowed-draft", "global-draft"])
def test_greedy_speculation_with_a_sliding_window(draft_window):
    """A Mistral-style target (a window of 6 on every layer, blocks of 2): the cache releases blocks outside the
    window (not with a draft that attends globally) while drafts run past it; greedy tokens stay the target's."""
    def windowed(window, seed):
        cfg = ModelConfig(arch="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, seq_len=96,
                          sliding_window=window)
        torch.manual_seed(seed)
        model = Transformer(cfg).eval()
        with torch.no_grad():  # sharper next-token choices, as test_engine's models
            for p in model.parameters():
                p.mul_(4.0 if p.dim() == 2 else 1.0)
        return model

    target, draft = windowed(6, 0), windowed(draft_window, 7)
    tok = CharTokenizer()
    llm = LLM(target, tok, draft_model=draft, num_speculative_tokens=3, max_num_seqs=3, block_size=2)
    assert llm.block_manager.window == (6 if draft_window else None)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 30, 5, 20, 25, 8, 30, 17)]
    for prompt, p, out in zip(PROMPTS, params, llm.generate(PROMPTS, params)):
        assert out.outputs[0].token_ids == greedy_reference(target, tok.encode(prompt), p.max_tokens), prompt
    assert llm.spec.num_proposed > 0 and llm.block_manager.seq_ids() == []


def test_sampled_speculation_matches_target_probabilities():
    """4,000 two-token samples from one prompt on an 8-token vocabulary: the joint frequency of every (first,
    second) pair within 5 standard errors of the target model's own probability."""
    V = 8
    cfg = ModelConfig(arch="llama", vocab_size=V, n_layer=1, n_head=2, d_model=32, seq_len=16, tie_embeddings=False)
    models = []
    for scale in (20.0, 5.0):  # the same network, the draft's head flatter: related but different distributions
        torch.manual_seed(5)
        models.append(Transformer(cfg).eval())
        with torch.no_grad():
            models[-1].lm_head.weight.mul_(scale)
    target, draft = models
    prompt = [1, 2, 3]
    N = 4000

    class Ids:
        eos_token_ids = ()

        def decode(self, ids):
            return ""

    llm = LLM(target, Ids(), draft_model=draft, num_speculative_tokens=2, max_num_seqs=64, seed=11)
    outs = llm.generate([prompt] * N, SamplingParams(temperature=1.0, max_tokens=2))
    assert 0.05 < llm.spec.acceptance_rate < 0.95, llm.spec.acceptance_rate  # both branches exercised
    pairs = torch.tensor([o.outputs[0].token_ids for o in outs])
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0][0, -1].double(), -1)
        ctx = torch.tensor([prompt + [t] for t in range(V)])
        p2 = torch.softmax(target(ctx)[0][:, -1].double(), -1)  # [first, second]
    for a in range(V):
        for b in range(V):
            freq = ((pairs[:, 0] == a) & (pairs[:, 1] == b)).double().mean().item()
            within(freq, (p1[a] * p2[a, b]).item(), N, f"pair ({a}, {b})")


def test_bad_draft():
    target = make_model("llama")
    small = Transformer(ModelConfig(arch="llama", vocab_size=VOCAB + 1, n_layer=1, n_head=2, d_model=16, seq_len=96))
    with pytest.raises(ValueError, match="draft_model"):
        LLM(target, CharTokenizer(), draft_model=small)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(target, CharTokenizer(), draft_model=target, num_speculative_tokens=0)
    # No sequence ever has room for max_model_len proposals: refused before their scratch blocks are made.
    with pytest.raises(ValueError, match="^num_speculative_tokens: must be less than max_model_len 96"):
        LLM(target, CharTokenizer(), draft_model=target, num_speculative_tokens=96)
    with pytest.raises(ValueError, match="^num_speculative_tokens: must be less than max_model_len"):
        LLM(target, CharTokenizer(), draft_model=target, num_speculative_tokens=2**31)
    with pytest.raises(TypeError, match="^num_speculative_tokens"):
        LLM(target, CharTokenizer(), draft_model=target, num_speculative_tokens=2.0)
    # Scratch blocks for 2^40 sequences: both caches checked against the memory there is before either is made.
    with pytest.raises(ValueError, match=r"^num_speculative_tokens: the KV caches of the target and draft models .* "
                                         r"needs [\d.]+ GiB, more than the"):
        LLM(target, CharTokenizer(), draft_model=target, max_num_seqs=2**40)
