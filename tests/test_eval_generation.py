"""flashlm.eval.generation: answer extraction and exact match against lm-evaluation-harness's own RegexFilter and
exact_match (GSM8K's settings), SQuAD F1 on known cases, and GSM8K end to end: each generated answer equal to the
model's greedy continuation (one-at-a-time recomputation) cut at the first stop string."""

import pytest
import torch

from eval_data import ByteTokenizer, byte_model, gsm8k_file
from flashlm.eval.formats import gsm8k_items
from flashlm.eval.generation import (GSM8K_FLEXIBLE, GSM8K_IGNORE, GSM8K_STOP, GSM8K_STRICT, evaluate_gsm8k,
                                     exact_match, extract, f1_score, gsm8k_prompt)
from flashlm.eval.tasks import select_shots
from flashlm.runtime.engine import LLM
from flashlm.runtime.simple_generate import generate

ANSWERS = ["so 3 + 4 = 7.\n#### 7", "The total is $1,200.", "#### -12.5 and then #### 3", "no number here",
           "It costs 18 dollars. #### 18.", "42"]
REFERENCE = "Janet has 3 + 4 = 7 eggs.\n#### 7"


def test_extraction_and_exact_match_equal_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=GSM8K_STRICT.pattern)
    flexible = RegexFilter(regex_pattern=GSM8K_FLEXIBLE.pattern, group_select=-1)
    want_strict = strict.apply([[a] for a in ANSWERS], [{}] * len(ANSWERS))
    want_flexible = flexible.apply([[a] for a in ANSWERS], [{}] * len(ANSWERS))
    for a, ws, wf in zip(ANSWERS, want_strict, want_flexible):
        assert extract(GSM8K_STRICT, a) == ws[0]
        assert extract(GSM8K_FLEXIBLE, a, -1) == wf[0]
        for pred in (ws[0], wf[0]):
            want = exact_match_hf_evaluate([pred], [REFERENCE], regexes_to_ignore=GSM8K_IGNORE, ignore_case=True)
            assert float(exact_match(pred, REFERENCE, regexes_to_ignore=GSM8K_IGNORE)) == want["exact_match"]


def test_f1():
    assert f1_score("The cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0 and f1_score("dog", "cat") == 0.0


def test_gsm8k_generates_greedy_answers_cut_at_the_stop_strings(tmp_path):
    model, tok = byte_model(seed=41), ByteTokenizer()
    llm = LLM(model, tok, block_size=16, max_num_batched_tokens=1024)
    items = gsm8k_items(gsm8k_file(tmp_path / "g.jsonl", n=5))
    result = evaluate_gsm8k(llm, items, shots=1, max_tokens=24)
    assert result.metrics["count"] == 5
    for i, (item, record) in enumerate(zip(items, result.items)):
        prompt = tok.encode(gsm8k_prompt(item, select_shots(items, i, {}, 1)), add_special_tokens=False)
        ids = generate(model, torch.tensor([prompt]), 24, temperature=0, eos_token_id=tok.eos_token_ids[0])
        text = tok.decode(ids[0, len(prompt):].tolist())
        cuts = [text.find(s) for s in GSM8K_STOP if s in text]
        want = text[:min(cuts)] if cuts else text
        assert record["generated"] == want, f"item {i}"
        assert record["exact_match_strict"] == float(exact_match(extract(GSM8K_STRICT, want), item.answer,
                                                                 regexes_to_ignore=GSM8K_IGNORE))
    assert 0 <= result.metrics["f1"] <= 1
