"""Benchmark files read from local paths (nothing is downloaded): the layouts the benchmarks ship in.

    mmlu_items("data/")          # data/test/{subject}_test.csv (+ dev/{subject}_dev.csv): question,A,B,C,D,answer
    ceval_items("ceval-exam/")   # val/{subject}_val.csv (+ dev/): id,question,A,B,C,D,answer[,explanation] with a header
    gpqa_items("gpqa_main.csv")  # Question, Correct Answer, Incorrect Answer 1..3 (choices shuffled with seed 0)
    hellaswag_items("hellaswag_val.jsonl")   # {"ctx_a", "ctx_b" (or "ctx"), "activity_label", "endings", "label"}
    jsonl_items("my.jsonl")      # {"question", "choices", "answer": index, letter or the choice's text[, "subject"]}
    gsm8k_items("test.jsonl")    # {"question", "answer": "...#### 42"}

Multiple-choice readers return (test items, dev items); a dev split exists for MMLU and C-Eval only. A malformed
row (a wrong column count, a missing answer, an answer letter out of range, bad JSON) raises FormatError naming
the file and line.
"""

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Optional

LETTERS = "ABCD"


class FormatError(ValueError):
    """A benchmark file that does not follow its layout: the message starts with `file:line: `."""


@dataclass
class Item:
    """One multiple-choice question: choices are the answer texts, answer the index of the right one."""
    subject: str
    question: str
    choices: list
    answer: int
    source: str  # file:line
    extra: dict = field(default_factory=dict)  # what a prompt may need beyond the question (e.g. HellaSwag's)


@dataclass
class GenerationItem:
    """One question answered by generating: target is what the extracted answer must equal."""
    subject: str
    question: str
    answer: str  # the reference answer as written (GSM8K: the worked solution ending in "#### N")
    target: str
    source: str


def _error(path, line, message) -> FormatError:
    return FormatError(f"{path}:{line}: {message}")


def _answer_index(value, num_choices: int, path, line) -> int:
    """A letter (A, B, ...) or an index into the choices."""
    if isinstance(value, bool) or value is None or value == "":
        raise _error(path, line, f"missing answer (got {value!r})")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        index = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    else:
        raise _error(path, line, f"answer {value!r} is not a letter or an index")
    if not 0 <= index < num_choices:
        raise _error(path, line, f"answer {value!r} is out of range for {num_choices} choices")
    return index


def _csv_rows(path):
    """(line, row) per record of a CSV file (a quoted field may span lines: the record's first line)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            line = 1
            for row in reader:
                if row:
                    yield line, row
                line = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise FormatError(f"{path}: not a readable UTF-8 CSV file ({e})") from None


def _subject_files(folder, split: str) -> dict:
    """{subject: path} of `{subject}_{split}.csv` in folder/split/ or, failing that, folder itself."""
    for where in (os.path.join(folder, split), folder):
        if os.path.isdir(where):
            suffix = f"_{split}.csv"
            found = {name[:-len(suffix)]: os.path.join(where, name) for name in sorted(os.listdir(where))
                     if name.endswith(suffix)}
            if found:
                return found
    return {}


def _split_folder(folder, name: str, split: str, read_file) -> tuple:
    """(items of the scored split, items of the dev split) of a folder of per-subject CSV files."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: {folder!r} is not a folder")
    scored = _subject_files(folder, split)
    if not scored:
        raise FileNotFoundError(f"{name}: no *_{split}.csv files in {folder!r} or its {split}/ folder")
    dev = _subject_files(folder, "dev")
    return ([i for s, p in scored.items() for i in read_file(p, s)],
            [i for s, p in dev.items() for i in read_file(p, s)])


def _csv_records(path, required: list):
    """(line, {column: value}) per row of a CSV file with a header that names the required columns."""
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise FormatError(f"{path}: empty file (expected a header naming {required})")
    columns = [c.strip() for c in first[1]]
    missing = [c for c in required if c not in columns]
    if missing:
        raise _error(path, first[0], f"the header lacks the columns {missing} (has {columns})")
    for line, row in rows:
        if len(row) != len(columns):
            raise _error(path, line, f"expected {len(columns)} columns as the header says, got {len(row)}")
        yield line, dict(zip(columns, row))


def _mmlu_file(path, subject: str) -> list:
    items = []
    for line, row in _csv_rows(path):
        if len(row) != 6:
            raise _error(path, line, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        answer = _answer_index(row[5], 4, path, line)
        items.append(Item(subject, row[0], row[1:5], answer, f"{path}:{line}"))
    return items


def mmlu_items(folder) -> tuple:
    """MMLU's CSV layout: per subject `{subject}_test.csv` and `{subject}_dev.csv` (no header)."""
    return _split_folder(folder, "mmlu", "test", _mmlu_file)


def _ceval_file(path, subject: str) -> list:
    items = []
    for line, r in _csv_records(path, ["question", "A", "B", "C", "D", "answer"]):
        answer = _answer_index(r["answer"].strip(), 4, path, line)
        items.append(Item(subject, r["question"], [r[c] for c in LETTERS], answer, f"{path}:{line}"))
    return items


def ceval_items(folder) -> tuple:
    """C-Eval's CSV layout: per subject `val/{subject}_val.csv` (scored: the test split has no answers) and
    `dev/{subject}_dev.csv` (the few-shot examples), each with a header id,question,A,B,C,D,answer[,explanation]."""
    return _split_folder(folder, "ceval", "val", _ceval_file)


def _gpqa_text(text: Optional[str]) -> str:
    """lm-eval's GPQA clean-up of a question's choices."""
    return " " if text is None else text.strip().replace(" [title]", ". ").replace("  ", " ")


def gpqa_items(path) -> tuple:
    """GPQA's CSV (a header naming Question, Correct Answer and Incorrect Answer 1..3 among others). The four
    choices are shuffled as lm-eval does, here from a fixed seed (0) so that runs agree."""
    wanted = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    rnd, items = random.Random(0), []
    for line, r in _csv_records(os.fspath(path), wanted):
        if not r["Correct Answer"].strip():
            raise _error(path, line, "missing answer (the Correct Answer column is empty)")
        choices = [_gpqa_text(r[c]) for c in wanted[2:]] + [_gpqa_text(r["Correct Answer"])]
        rnd.shuffle(choices)
        answer = choices.index(_gpqa_text(r["Correct Answer"]))
        subject = r.get("High-level domain", "").strip() or "gpqa"
        items.append(Item(subject, r["Question"], choices, answer, f"{path}:{line}"))
    return items, []


def _jsonl_rows(path):
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise _error(path, line, f"not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise _error(path, line, f"expected a JSON object, got {type(row).__name__}")
                yield line, row
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 ({e})") from None


def _field(row, name, kind, path, line):
    value = row.get(name)
    if value is None:
        raise _error(path, line, f"missing {name!r}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _error(path, line, f"{name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _text_list(row, name, path, line) -> list:
    values = _field(row, name, list, path, line)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise _error(path, line, f"{name!r} must be a list of at least two strings")
    return values


def hellaswag_items(path) -> tuple:
    """HellaSwag's JSONL: a context (ctx_a and ctx_b, or ctx), four endings and the label of the right one."""
    items = []
    for line, row in _jsonl_rows(path):
        endings = _text_list(row, "endings", path, line)
        if "ctx_a" in row:
            ctx = _field(row, "ctx_a", str, path, line) + " " + _field(row, "ctx_b", str, path, line).capitalize()
        else:
            ctx = _field(row, "ctx", str, path, line)
        answer = _answer_index(row.get("label"), len(endings), path, line)
        extra = {"activity_label": row.get("activity_label", "")}
        items.append(Item("hellaswag", ctx, endings, answer, f"{path}:{line}", extra))
    return items, []


def jsonl_items(path) -> tuple:
    """A generic JSONL: {"question", "choices", "answer"} (an index, a letter or the right choice's text), and
    an optional "subject"."""
    items = []
    for line, row in _jsonl_rows(path):
        question = _field(row, "question", str, path, line)
        choices = _text_list(row, "choices", path, line)
        answer = row.get("answer")
        if isinstance(answer, str) and answer in choices:  # the text of a choice before a letter
            answer = choices.index(answer)
        answer = _answer_index(answer, len(choices), path, line)
        subject = row.get("subject", "jsonl")
        items.append(Item(str(subject), question, choices, answer, f"{path}:{line}"))
    return items, []


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval's strict-match pattern


def gsm8k_items(path) -> list:
    """GSM8K's JSONL: {"question", "answer"}, the answer ending in `#### N`."""
    items = []
    for line, row in _jsonl_rows(path):
        question = _field(row, "question", str, path, line)
        answer = _field(row, "answer", str, path, line)
        m = GSM8K_ANSWER.search(answer)
        if m is None:
            raise _error(path, line, "the answer has no '#### N' final answer")
        items.append(GenerationItem("gsm8k", question, answer, m.group(1), f"{path}:{line}"))
    return items
