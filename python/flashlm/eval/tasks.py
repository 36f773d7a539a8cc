"""Benchmark tasks scored by log-likelihood: each item's choices as continuations of its prompt, `acc` and
`acc_norm` as lm-evaluation-harness defines them, per subject and averaged.

    specs = parse_task_specs("mmlu:data/,hellaswag:hellaswag_val.jsonl")
    result = evaluate_multiple_choice(llm, "mmlu", *read_task("mmlu", "data/"), shots=5, limit=20)
    result.metrics   # {"acc", "acc_norm" (where the task defines it), "count", "acc_macro", "acc_norm_macro"}

acc: the choice with the highest summed log-likelihood is the right one. acc_norm: the same with each sum divided
by its choice's length in characters (lm-eval's rule; the choice as written, without the delimiter). Ties go to
the first choice, as numpy's argmax does. Few-shot examples: the first K of the subject's dev split (lm-eval's
first_n sampler for MMLU and C-Eval); for tasks without a dev split, K other items of the same file drawn with
random.Random(1234 + the item's index), so a run's shots do not depend on --limit. --limit keeps the first N items
of each subject (lm-eval limits each MMLU subject). The averages: micro over all items, macro over subjects.
"""

import math
import random
from dataclasses import dataclass, field

from flashlm.eval.formats import ceval_items, gpqa_items, gsm8k_items, hellaswag_items, jsonl_items, mmlu_items
from flashlm.eval.loglikelihood import loglikelihoods
from flashlm.eval.prompts import choice_texts, encode_pair, multiple_choice_prompt

MULTIPLE_CHOICE = {"mmlu": mmlu_items, "ceval": ceval_items, "gpqa": gpqa_items, "hellaswag": hellaswag_items,
                   "jsonl": jsonl_items}
GENERATION = {"gsm8k": gsm8k_items}
NO_ACC_NORM = {"mmlu"}  # lm-eval reports acc alone for MMLU (one-letter choices: acc_norm would equal acc)
FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed


@dataclass
class TaskResult:
    name: str
    metrics: dict  # acc, acc_norm, count, macro averages (or a generation task's exact_match, ...)
    subjects: dict  # subject -> the same metrics over its items
    items: list = field(default_factory=list)  # one dict per item: its scores and prediction


def parse_task_specs(spec: str) -> list:
    """[(task, path)] from "mmlu:DIR,gsm8k:FILE"; a bad entry is an error naming --tasks."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--tasks: expected TASK:PATH[,TASK:PATH...], got an empty value")
    out = []
    for entry in spec.split(","):
        task, sep, path = entry.strip().partition(":")
        if not sep or not path:
            raise ValueError(f"--tasks: {entry!r} is not TASK:PATH")
        if task not in MULTIPLE_CHOICE and task not in GENERATION:
            known = ", ".join(sorted({*MULTIPLE_CHOICE, *GENERATION}))
            raise ValueError(f"--tasks: unknown task {task!r} (known: {known})")
        out.append((task, path))
    return out


def read_task(task: str, path) -> tuple:
    """(items, dev items) of a multiple-choice task's files."""
    return MULTIPLE_CHOICE[task](path)


def limit_per_subject(items: list, limit) -> list:
    if limit is None:
        return items
    seen, out = {}, []
    for item in items:
        if seen.get(item.subject, 0) < limit:
            seen[item.subject] = seen.get(item.subject, 0) + 1
            out.append(item)
    return out


def select_shots(items: list, index: int, dev_by_subject: dict, k: int) -> list:
    """The few-shot examples of items[index]: the first k of its subject's dev split, or k others of items."""
    if k == 0:
        return []
    item = items[index]
    if dev_by_subject:
        shots = dev_by_subject.get(item.subject, [])
        if len(shots) < k:
            raise ValueError(f"--shots: {k} examples asked, but the dev split of {item.subject!r} has {len(shots)}")
        return shots[:k]
    if len(items) <= k:
        raise ValueError(f"--shots: {k} examples asked, but the file has {len(items)} items ({item.source})")
    drawn = random.Random(FEWSHOT_SEED + index).sample(range(len(items)), k + 1)
    return [items[i] for i in drawn if i != index][:k]


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_item(item, lls: list, greedy: list, token_counts: list, choices: list) -> dict:
    """One item's record: each choice's summed log-likelihood, token count, mean and greedy flag; the predictions."""
    lengths = [max(len(c), 1) for c in choices]
    pred, pred_norm = _argmax(lls), _argmax([ll / n for ll, n in zip(lls, lengths)])
    return {"source": item.source, "subject": item.subject, "answer": item.answer,
            "prediction": pred, "prediction_norm": pred_norm,
            "acc": float(pred == item.answer), "acc_norm": float(pred_norm == item.answer),
            "choices": [{"text": c, "loglikelihood": ll, "tokens": n, "mean_loglikelihood": ll / n, "greedy": g}
                        for c, ll, n, g in zip(choices, lls, token_counts, greedy)]}


def summarize(records: list, metrics: tuple) -> tuple:
    """(overall metrics, per-subject metrics): each metric's mean over items (micro) and over subjects (macro)."""
    subjects = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    per_subject = {s: {**{m: sum(r[m] for r in rs) / len(rs) for m in metrics}, "count": len(rs)}
                   for s, rs in sorted(subjects.items())}
    overall = {"count": len(records)}
    for m in metrics:
        overall[m] = sum(r[m] for r in records) / len(records) if records else math.nan
        macro = [s[m] for s in per_subject.values()]
        overall[f"{m}_macro"] = sum(macro) / len(macro) if macro else math.nan
    return overall, per_subject


def evaluate_multiple_choice(llm, task: str, items: list, dev: list = (), shots: int = 0, limit=None,
                             chat: bool = False, progress: bool = False) -> TaskResult:
    """Scores every choice of every item in one batched loglikelihoods call (each prompt's blocks shared by its
    choices through the prefix cache)."""
    items = limit_per_subject(list(items), limit)
    dev_by_subject = {}
    for d in dev:
        dev_by_subject.setdefault(d.subject, []).append(d)
    tok = llm.tokenizer
    template = tok.apply_chat_template if chat else None
    requests, spans, all_choices = [], [], []
    for i, item in enumerate(items):
        context, continuations = multiple_choice_prompt(task, item, select_shots(items, i, dev_by_subject, shots),
                                                        template)
        spans.append((len(requests), len(continuations)))
        requests += [encode_pair(tok, context, c) for c in continuations]
        all_choices.append(choice_texts(task, item))
    scores = loglikelihoods(llm, requests, progress=progress)
    records = []
    for item, (start, n), choices in zip(items, spans, all_choices):
        lls = [s[0] for s in scores[start:start + n]]
        greedy = [s[1] for s in scores[start:start + n]]
        counts = [len(requests[j][1]) for j in range(start, start + n)]
        records.append(score_item(item, lls, greedy, counts, choices))
    metrics = ("acc",) if task in NO_ACC_NORM else ("acc", "acc_norm")
    overall, per_subject = summarize(records, metrics)
    return TaskResult(task, overall, per_subject, records)
