"""flashlm.eval.tasks: multiple-choice scoring end to end on small files against an independent computation:
each choice's log-likelihood from one full forward of the rendered prompt (float64 log-softmax), acc and acc_norm
by lm-eval's definitions (numpy argmax of the sums and of the sums over the choices' character lengths),
per-subject and macro/micro averages; few-shot selection; --tasks parsing."""

import numpy as np
import pytest
import torch

from eval_data import ByteTokenizer, byte_model, gpqa_file, hellaswag_file, jsonl_file, mmlu_folder
from flashlm.eval.formats import gpqa_items, hellaswag_items, jsonl_items, mmlu_items
from flashlm.eval.prompts import choice_texts, encode_pair, multiple_choice_prompt
from flashlm.eval.tasks import evaluate_multiple_choice, parse_task_specs, select_shots
from flashlm.runtime.engine import LLM

TOK = ByteTokenizer()


def reference_lls(model, context, continuations):
    out = []
    for cont in continuations:
        ctx_ids, cont_ids = encode_pair(TOK, context, cont)
        ids = ctx_ids + cont_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0].double()
        lp = logits[len(ctx_ids) - 1:-1].log_softmax(-1).gather(1, torch.tensor(cont_ids)[:, None])
        out.append(lp.sum().item())
    return out


@pytest.mark.parametrize("task, shots, chat", [("mmlu", 2, False), ("hellaswag", 1, False), ("gpqa", 0, True),
                                               ("jsonl", 0, False)])
def test_multiple_choice_equals_an_independent_scoring(tmp_path, task, shots, chat):
    model = byte_model(seed=31)
    llm = LLM(model, TOK, block_size=16, max_num_batched_tokens=1024)
    readers = {"mmlu": lambda: mmlu_items(mmlu_folder(tmp_path / "m")),
               "hellaswag": lambda: hellaswag_items(hellaswag_file(tmp_path / "h.jsonl")),
               "gpqa": lambda: gpqa_items(gpqa_file(tmp_path / "g.csv")),
               "jsonl": lambda: jsonl_items(jsonl_file(tmp_path / "j.jsonl"))}
    items, dev = readers[task]()
    result = evaluate_multiple_choice(llm, task, items, dev, shots=shots, chat=chat)
    assert result.metrics["count"] == len(items) == len(result.items)
    dev_by_subject = {}
    for d in dev:
        dev_by_subject.setdefault(d.subject, []).append(d)
    acc, acc_norm = [], []
    for i, (item, record) in enumerate(zip(items, result.items)):
        shot_items = select_shots(items, i, dev_by_subject, shots)
        context, conts = multiple_choice_prompt(task, item, shot_items, TOK.apply_chat_template if chat else None)
        want = np.array(reference_lls(model, context, conts))
        got = np.array([c["loglikelihood"] for c in record["choices"]])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"item {i}")
        lengths = np.array([float(len(c)) for c in choice_texts(task, item)])
        assert record["prediction"] == int(np.argmax(got))
        acc.append(float(np.argmax(want) == item.answer))
        acc_norm.append(float(np.argmax(want / lengths) == item.answer))
        assert record["acc"] == acc[-1] and record["acc_norm"] == acc_norm[-1]
        assert [c["tokens"] for c in record["choices"]] == [len(encode_pair(TOK, context, c)[1]) for c in conts]
    assert result.metrics["acc"] == pytest.approx(np.mean(acc))
    if task != "mmlu":
        assert result.metrics["acc_norm"] == pytest.approx(np.mean(acc_norm))
    else:
        assert "acc_norm" not in result.metrics
    subjects = {}
    for item, a in zip(items, acc):
        subjects.setdefault(item.subject, []).append(a)
    assert result.subjects.keys() == subjects.keys()
    assert result.metrics["acc_macro"] == pytest.approx(np.mean([np.mean(v) for v in subjects.values()]))


def test_limit_keeps_the_first_items_of_each_subject(tmp_path):
    llm = LLM(byte_model(seed=32), TOK, block_size=16, max_num_batched_tokens=1024)
    items, dev = mmlu_items(mmlu_folder(tmp_path / "m", n=4))
    result = evaluate_multiple_choice(llm, "mmlu", items, dev, limit=2)
    assert result.metrics["count"] == 4 and {s: v["count"] for s, v in result.subjects.items()} == {
        "abstract_algebra": 2, "world_religions": 2}
    assert [r["source"] for r in result.items] == [i.source for i in items if int(i.source.rsplit(":", 1)[1]) <= 2]


def test_shots_come_from_dev_first_or_a_fixed_seed(tmp_path):
    items, dev = mmlu_items(mmlu_folder(tmp_path / "m"))
    by_subject = {}
    for d in dev:
        by_subject.setdefault(d.subject, []).append(d)
    assert select_shots(items, 0, by_subject, 3) == by_subject["abstract_algebra"][:3]
    with pytest.raises(ValueError, match="^--shots: 9 examples asked"):
        select_shots(items, 0, by_subject, 9)
    items, _ = jsonl_items(jsonl_file(tmp_path / "j.jsonl", n=10))
    shots = select_shots(items, 4, {}, 3)
    assert len(shots) == 3 and items[4] not in shots and shots == select_shots(items, 4, {}, 3)


@pytest.mark.parametrize("spec, match", [
    ("", "^--tasks: expected"), ("mmlu", r"^--tasks: 'mmlu' is not TASK:PATH"),
    ("arc:x", r"^--tasks: unknown task 'arc'"),
])
def test_bad_task_specs_name_the_option(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_task_specs(spec)
    assert parse_task_specs("mmlu:a/b, gsm8k:c.jsonl") == [("mmlu", "a/b"), ("gsm8k", "c.jsonl")]
