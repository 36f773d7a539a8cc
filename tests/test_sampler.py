"""The runtime's sampler against per-row references written with plain loops: penalties, top-k/top-p/min-p
filtering, greedy rows, the sampled distribution (many draws on a small vocabulary) and seeded requests."""

import math

import pytest
import torch

from flashlm.runtime.sampler import Sampler, SamplingInput, apply_penalties, filter_logits
from flashlm.runtime.sampling_params import SamplingParams


def reference_penalties(logits, params, prompt, output):
    out = logits.clone()
    for t in range(len(out)):
        count = sum(1 for o in output if o == t)
        if count or t in prompt:
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
        out[t] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return out


def reference_keep(logits, top_k, top_p, min_p):
    """The set of token ids each rule keeps, applied in vLLM's order."""
    V = len(logits)
    order = sorted(range(V), key=lambda t: -logits[t].item())
    k = V if top_k <= 0 else min(top_k, V)
    kept = order[:k]
    z = sum(math.exp(logits[t].item() - logits[order[0]].item()) for t in kept)
    probs = {t: math.exp(logits[t].item() - logits[order[0]].item()) / z for t in kept}
    mass, nucleus = 0.0, []
    for t in kept:
        if nucleus and mass >= top_p:
            break
        nucleus.append(t)
        mass += probs[t]
    top = probs[order[0]]
    return {t for t in nucleus if t == order[0] or probs[t] >= min_p * top}


def test_penalties_match_reference():
    torch.manual_seed(0)
    V = 23
    cases = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.7),
             SamplingParams(frequency_penalty=-0.4), SamplingParams(repetition_penalty=0.8, presence_penalty=0.2,
                                                                    frequency_penalty=0.5), SamplingParams()]
    inputs = [SamplingInput(p, prompt_ids=torch.randint(0, V, (5,)).tolist(), output_ids=torch.randint(0, V, (7,)).tolist())
              for p in cases]
    inputs.append(SamplingInput(SamplingParams(frequency_penalty=1.0)))  # no history at all
    logits = torch.randn(len(inputs), V) * 3
    got = apply_penalties(logits, inputs)
    for i, s in enumerate(inputs):
        ref = reference_penalties(logits[i], s.params, list(s.prompt_ids), list(s.output_ids))
        assert torch.allclose(got[i], ref, atol=1e-6), f"row {i}: max error {(got[i] - ref).abs().max()}"


@pytest.mark.parametrize("seed", range(5))
def test_filter_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, V = 12, 37
    logits = torch.randn(B, V, generator=g) * 2
    top_k = torch.randint(-1, 12, (B,), generator=g)
    top_p = torch.rand(B, generator=g) * 0.9 + 0.1
    top_p[::4] = 1.0
    min_p = torch.rand(B, generator=g) * 0.3
    min_p[1::3] = 0.0
    out = filter_logits(logits, top_k, top_p, min_p)
    for i in range(B):
        kept = {t for t in range(V) if torch.isfinite(out[i, t])}
        assert kept == reference_keep(logits[i], top_k[i].item(), top_p[i].item(), min_p[i].item()), f"row {i}"
        assert torch.equal(out[i, list(kept)], logits[i, list(kept)])


def test_greedy_rows_take_the_argmax():
    torch.manual_seed(1)
    V = 50
    logits = torch.randn(4, V + 3)  # padded vocabulary columns are never chosen
    logits[:, V:] = 100.0
    inputs = [SamplingInput(SamplingParams(temperature=0)), SamplingInput(SamplingParams(temperature=0.9)),
              SamplingInput(SamplingParams(temperature=0, repetition_penalty=2.0), output_ids=[int(logits[2, :V].argmax())]),
              SamplingInput(SamplingParams(temperature=0))]
    tokens = Sampler(V)(logits, inputs)
    assert tokens[0] == logits[0, :V].argmax() and tokens[3] == logits[3, :V].argmax()
    assert tokens[2] == apply_penalties(logits[2:3, :V], inputs[2:3])[0].argmax()
    assert 0 <= tokens[1] < V


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(temperature=1.5, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=2.0, min_p=0.2),
], ids=["t1", "t0.5", "topk3", "topp0.7", "minp0.2"])
def test_sampled_distribution(params):
    """20,000 draws on 6 tokens: each frequency within 5 standard errors of the reference probability (a
    false failure has probability ~1e-6 per token), and filtered tokens never drawn."""
    torch.manual_seed(2)
    base = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.5])
    N = 20000
    tokens = Sampler(6, torch.Generator().manual_seed(3))(base.expand(N, 6), [SamplingInput(params)] * N)
    kept = reference_keep(base / params.temperature, params.top_k, params.top_p, params.min_p)
    scaled = base / params.temperature
    z = sum(math.exp(scaled[t].item()) for t in kept)
    freq = torch.bincount(tokens, minlength=6).double() / N
    for t in range(6):
        p = math.exp(scaled[t].item()) / z if t in kept else 0.0
        bound = 5 * math.sqrt(p * (1 - p) / N) + 1e-12
        assert abs(freq[t].item() - p) <= bound, f"token {t}: frequency {freq[t]:.4f}, expected {p:.4f} +- {bound:.4f}"


def test_seeded_request_ignores_its_batch():
    V = 40
    params = SamplingParams(temperature=1.0, seed=7)
    row = torch.randn(V)

    def draw(batch_logits, position):
        gens = [torch.Generator().manual_seed(7) if i == position else None for i in range(len(batch_logits))]
        inputs = [SamplingInput(params if i == position else SamplingParams(), generator=gens[i])
                  for i in range(len(batch_logits))]
        sampler = Sampler(V)
        out = []
        for _ in range(20):
            out.append(int(sampler(batch_logits, inputs)[position]))
        return out

    alone = draw(row[None], 0)
    crowded = draw(torch.cat((torch.randn(3, V), row[None], torch.randn(2, V))), 3)
    assert alone == crowded
    assert len(set(alone)) > 1  # it does sample


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(max_tokens=-1), "max_tokens"), (dict(n=0), "n"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(seed=2**64), "seed"),
    (dict(temperature=math.nan), "temperature"), (dict(n=2**31), "n"), (dict(top_k=2**63), "top_k"),
])
def test_bad_params_name_the_field(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw, name", [
    (dict(seed="x"), "seed"), (dict(temperature="hot"), "temperature"), (dict(n="2"), "n"), (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=1.5), "max_tokens"), (dict(ignore_eos="no"), "ignore_eos"), (dict(stop_token_ids="abc"),
                                                                                  "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
])
def test_params_of_the_wrong_type_name_the_field(kw, name):
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        SamplingParams(**kw)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="logits"):
        Sampler(10)(torch.zeros(2, 9), [SamplingInput(SamplingParams())] * 2)
    assert SamplingParams(stop="x").stop == ["x"]


def test_batch_params_follow_the_rows_requests():
    """The batch's parameter tensors are kept while its rows hold the same requests and rebuilt when one
    changes: a sampler that draws from the same batch, then a changed one, answers each as a fresh one would."""
    V = 40
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)
    logged = SamplingParams(temperature=0, logprobs=2)
    sampler = Sampler(V, torch.Generator().manual_seed(5))
    batches = [[greedy, greedy, greedy], [greedy, greedy, greedy], [greedy, hot, logged], [logged, greedy, hot]]
    kept = []
    for params in batches:
        inputs = [SamplingInput(p) for p in params]
        tokens, logprobs = sampler.sample(logits, inputs)
        kept.append(sampler.batch_params(inputs, logits.device))
        fresh_tokens, fresh_logprobs = Sampler(V, torch.Generator().manual_seed(5)).sample(logits, inputs)
        assert torch.equal(tokens, fresh_tokens)  # top_k=1 makes the hot row's draw its argmax too
        assert torch.equal(tokens, logits.argmax(dim=-1))
        assert (logprobs is None) == (fresh_logprobs is None)
        if logprobs is not None:
            assert [e is None for e in logprobs] == [p.logprobs is None for p in params]
            assert [e.logprob for e in logprobs if e] == [e.logprob for e in fresh_logprobs if e]
    assert kept[0] is kept[1] and kept[1] is not kept[2] and kept[2] is not kept[3]
