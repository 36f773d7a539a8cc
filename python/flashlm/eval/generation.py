"""Generation tasks: prompt -> generate (greedy by default) -> an answer extracted and compared, batched through
the engine. GSM8K as lm-evaluation-harness scores it:

    result = evaluate_gsm8k(llm, gsm8k_items("test.jsonl"), shots=5, limit=100)
    result.metrics   # exact_match_strict (`#### N`), exact_match_flexible (the last number), f1, count

The prompt is `Question: {question}\\nAnswer:` after K solved examples (`... Answer: {worked solution}` and a
blank line), generation stops at `Question:`, `</s>` or `<|im_end|>` (or max_tokens), and exact match ignores
case, commas, dollar signs, a trailing period and everything up to `#### ` on both sides (lm-eval's settings).
f1 is SQuAD's token-overlap F1 of the whole generated answer against the reference solution.
"""

import re
import string
from collections import Counter

from flashlm.eval.tasks import TaskResult, limit_per_subject, select_shots, summarize
from flashlm.runtime.sampling_params import SamplingParams

GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]
INVALID = "[invalid]"  # what an answer with no match becomes (lm-eval's fallback)


def extract(pattern: re.Pattern, text: str, group_select: int = 0) -> str:
    """The group_select-th match of pattern in text (a match with several groups: its first non-empty one),
    stripped; INVALID when there is none."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    return match.strip()


def exact_match(prediction: str, reference: str, ignore_case: bool = True, ignore_punctuation: bool = False,
                regexes_to_ignore=()) -> bool:
    """Whether two strings are equal once each regex in regexes_to_ignore is removed (and case and punctuation
    when asked), as HF evaluate's exact_match that lm-eval calls."""
    def clean(s):
        for r in regexes_to_ignore:
            s = re.sub(r, "", s)
        if ignore_case:
            s = s.lower()
        if ignore_punctuation:
            s = s.translate(str.maketrans("", "", string.punctuation))
        return s
    return clean(prediction) == clean(reference)


def _f1_tokens(text: str) -> list:
    """SQuAD's normalisation: lower case, no punctuation, no articles, whitespace-split."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1_score(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 (1 when both are empty)."""
    pred, ref = _f1_tokens(prediction), _f1_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generate_texts(llm, prompts: list, max_tokens: int = 256, stop=(), temperature: float = 0.0, seed=None,
                   progress: bool = False) -> list:
    """The generated text of each prompt (a string, encoded without special tokens as lm-eval does; left-truncated
    so that max_tokens fit the engine's max_model_len), cut at the first stop string."""
    keep = max(1, llm.max_model_len - 1 - max_tokens)
    ids = [list(llm.tokenizer.encode(p, add_special_tokens=False))[-keep:] for p in prompts]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=list(stop) or None, seed=seed)
    return [out.outputs[0].text for out in llm.generate(ids, params, use_tqdm=progress)]


def gsm8k_prompt(item, shots=(), chat_template=None) -> str:
    context = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    context += f"Question: {item.question}\nAnswer:"
    if chat_template is not None:
        context = chat_template([{"role": "user", "content": context}])
    return context


def evaluate_gsm8k(llm, items: list, shots: int = 0, limit=None, chat: bool = False, max_tokens: int = 256,
                   progress: bool = False) -> TaskResult:
    items = limit_per_subject(list(items), limit)
    template = llm.tokenizer.apply_chat_template if chat else None
    prompts = [gsm8k_prompt(item, select_shots(items, i, {}, shots), template) for i, item in enumerate(items)]
    texts = generate_texts(llm, prompts, max_tokens, GSM8K_STOP, progress=progress)
    records = []
    for item, text in zip(items, texts):
        strict, flexible = extract(GSM8K_STRICT, text), extract(GSM8K_FLEXIBLE, text, -1)
        records.append({"source": item.source, "subject": item.subject, "target": item.target, "generated": text,
                        "extracted_strict": strict, "extracted_flexible": flexible,
                        "exact_match_strict": float(exact_match(strict, item.answer, regexes_to_ignore=GSM8K_IGNORE)),
                        "exact_match_flexible": float(exact_match(flexible, item.answer,
                                                                  regexes_to_ignore=GSM8K_IGNORE)),
                        "f1": f1_score(text, item.answer)})
    overall, per_subject = summarize(records, ("exact_match_strict", "exact_match_flexible", "f1"))
    return TaskResult("gsm8k", overall, per_subject, records)
