"""flashlm.eval.formats and prompts: each benchmark layout parses from small files written here; malformed rows
are FormatErrors naming file and line; prompts equal lm-evaluation-harness's own templates rendered from its task
files (jinja2, as lm-eval renders them) and its HellaSwag clean-up; lm-eval's context/continuation split."""

import os

import pytest

from eval_data import (GPQA_HEADER, ByteTokenizer, ceval_folder, gpqa_file, gsm8k_file, hellaswag_file, jsonl_file,
                       mmlu_folder, write_csv, write_jsonl)
from flashlm.eval.formats import (FormatError, ceval_items, gpqa_items, gsm8k_items, hellaswag_items, jsonl_items,
                                  mmlu_items)
from flashlm.eval.prompts import encode_pair, multiple_choice_prompt


def test_each_layout_parses(tmp_path):
    test, dev = mmlu_items(mmlu_folder(tmp_path / "mmlu"))
    assert len(test) == 6 and len(dev) == 10
    assert test[1].subject == "abstract_algebra" and test[1].choices == ["one 1", "two 1", "three 1", "four 1"]
    assert test[1].answer == 1 and test[1].source.endswith("abstract_algebra_test.csv:2")
    test, dev = ceval_items(ceval_folder(tmp_path / "ceval"))
    assert [i.answer for i in test] == [0, 1, 2] and len(dev) == 5 and test[0].question == "问题 0"
    items, dev = gpqa_items(gpqa_file(tmp_path / "gpqa.csv"))
    assert dev == [] and {i.subject for i in items} == {"Physics", "Chemistry"}
    assert all(i.choices[i.answer] == str(2 * n) for n, i in enumerate(items))
    assert "0 . x" in items[0].choices  # lm-eval's clean-up: " [title]" and double spaces
    items, _ = hellaswag_items(hellaswag_file(tmp_path / "hs.jsonl"))
    assert items[2].question == "A man mixes flour 2. Then he" and items[2].answer == 2
    items, _ = jsonl_items(jsonl_file(tmp_path / "g.jsonl"))
    assert [i.answer for i in items] == [0, 1, 0, 1] and items[3].subject == "numbers"
    gen = gsm8k_items(gsm8k_file(tmp_path / "gsm8k.jsonl"))
    assert gen[3].target == "6" and gen[3].source.endswith(":4")


def test_answers_as_letters_indices_or_text(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "choices": ["x", "y", "z"], "answer": a}
                                       for a in ("B", 2, "2", "z", "c")])
    assert [i.answer for i in jsonl_items(tmp_path / "a.jsonl")[0]] == [1, 2, 2, 2, 2]


def _mmlu_with(tmp_path, rows):
    write_csv(str(tmp_path / "m" / "test" / "x_test.csv"), rows)
    return tmp_path / "m"


@pytest.mark.parametrize("case, match", [
    ("mmlu-columns", r"x_test.csv:2: expected 6 columns .* got 5"),
    ("mmlu-letter", r"x_test.csv:1: answer 'E' is out of range for 4 choices"),
    ("mmlu-missing", r"x_test.csv:1: missing answer"),
    ("ceval-header", r"x_val.csv:1: the header lacks the columns \['answer'\]"),
    ("ceval-columns", r"x_val.csv:3: expected 7 columns as the header says, got 8"),
    ("gpqa-missing", r"g.csv:2: missing answer"),
    ("hellaswag-label", r"h.jsonl:2: answer 4 is out of range for 4 choices"),
    ("hellaswag-json", r"h.jsonl:1: not JSON"),
    ("jsonl-choices", r"j.jsonl:1: 'choices' must be a list of at least two strings"),
    ("jsonl-answer", r"j.jsonl:2: missing answer"),
    ("gsm8k-final", r"s.jsonl:1: the answer has no '#### N' final answer"),
])
def test_malformed_rows_name_file_and_line(tmp_path, case, match):
    good = ["q", "a", "b", "c", "d", "A"]
    if case == "mmlu-columns":
        call = lambda: mmlu_items(_mmlu_with(tmp_path, [good, good[:5]]))  # noqa: E731
    elif case == "mmlu-letter":
        call = lambda: mmlu_items(_mmlu_with(tmp_path, [good[:5] + ["E"]]))  # noqa: E731
    elif case == "mmlu-missing":
        call = lambda: mmlu_items(_mmlu_with(tmp_path, [good[:5] + [""]]))  # noqa: E731
    elif case.startswith("ceval"):
        header = ["id", "question", "A", "B", "C", "D"] + ([] if case == "ceval-header" else ["answer"])
        write_csv(str(tmp_path / "c" / "val" / "x_val.csv"), [[0, *good], [1, *good, "extra"]], header)
        call = lambda: ceval_items(tmp_path / "c")  # noqa: E731
    elif case == "gpqa-missing":
        write_csv(str(tmp_path / "g.csv"), [["o", "q", "", "1", "2", "3", "d"]], GPQA_HEADER)
        call = lambda: gpqa_items(tmp_path / "g.csv")  # noqa: E731
    elif case.startswith("hellaswag"):
        row = {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 0}
        write_jsonl(tmp_path / "h.jsonl", ["{not json"] if case == "hellaswag-json" else [row, {**row, "label": 4}])
        call = lambda: hellaswag_items(tmp_path / "h.jsonl")  # noqa: E731
    elif case.startswith("jsonl"):
        rows = ([{"question": "q", "choices": ["a"], "answer": 0}] if case == "jsonl-choices" else
                [{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q", "choices": ["a", "b"]}])
        write_jsonl(tmp_path / "j.jsonl", rows)
        call = lambda: jsonl_items(tmp_path / "j.jsonl")  # noqa: E731
    else:
        write_jsonl(tmp_path / "s.jsonl", [{"question": "q", "answer": "42"}])
        call = lambda: gsm8k_items(tmp_path / "s.jsonl")  # noqa: E731
    with pytest.raises(FormatError, match=match):
        call()


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="^mmlu: "):
        mmlu_items(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^mmlu: no \*_test.csv"):
        mmlu_items(tmp_path)


# ---- prompts against lm-eval's task files ----------------------------------------------------------------------

def _lm_eval_task_dir():
    lm_eval = pytest.importorskip("lm_eval")
    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


def _render(yaml_path, key, doc):
    import jinja2
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.load(f, Loader=Loader)
    return jinja2.Template(config[key], keep_trailing_newline=True).render(**doc)


def test_prompts_equal_lm_evals_templates(tmp_path):
    tasks = _lm_eval_task_dir()
    test, dev = mmlu_items(mmlu_folder(tmp_path / "mmlu"))
    item = test[0]
    context, conts = multiple_choice_prompt("mmlu", item, shots=dev[:2])
    mmlu_yaml = os.path.join(tasks, "mmlu", "default", "_default_template_yaml")
    text = lambda i: _render(mmlu_yaml, "doc_to_text", {"question": i.question, "choices": i.choices})  # noqa: E731
    import yaml

    with open(os.path.join(tasks, "mmlu", "default", "mmlu_abstract_algebra.yaml"), encoding="utf-8") as f:
        desc = yaml.safe_load(f)["description"]
    shots = "".join(text(s) + " " + "ABCD"[s.answer] + "\n\n" for s in dev[:2])
    assert context == desc + shots + text(item) and conts == [" A", " B", " C", " D"]

    test, _ = ceval_items(ceval_folder(tmp_path / "ceval"))
    ceval_dir = os.path.join(tasks, "ceval")
    with open(os.path.join(ceval_dir, "ceval-valid_computer_network.yaml"), encoding="utf-8") as f:
        desc = yaml.safe_load(f)["description"]
    doc = {"question": test[0].question, **dict(zip("ABCD", test[0].choices))}
    context, conts = multiple_choice_prompt("ceval", test[0])
    assert context == desc + _render(os.path.join(ceval_dir, "_default_ceval_yaml"), "doc_to_text", doc)

    items, _ = gpqa_items(gpqa_file(tmp_path / "gpqa.csv"))
    doc = {"Question": items[3].question, **{f"choice{k + 1}": c for k, c in enumerate(items[3].choices)}}
    context, conts = multiple_choice_prompt("gpqa", items[3])
    assert context == _render(os.path.join(tasks, "gpqa", "zeroshot", "_gpqa_zeroshot_yaml"), "doc_to_text", doc)
    assert conts == [" (A)", " (B)", " (C)", " (D)"]


def test_hellaswag_prompt_equals_lm_evals_processing(tmp_path):
    _lm_eval_task_dir()
    from lm_eval.tasks.hellaswag.utils import preprocess

    items, _ = hellaswag_items(hellaswag_file(tmp_path / "hs.jsonl"))
    context, conts = multiple_choice_prompt("hellaswag", items[1])
    assert context == preprocess("Baking cookies: A man mixes flour 1. Then he")
    assert conts == [" " + preprocess(e) for e in ["bakes [step] them 1.", "sings.", "runs  away.", "sleeps."]]


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole():
    tok = ByteTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    assert ctx == list(b"Answer:") and cont == list(b" B")
    ctx, cont = encode_pair(tok, "Answer:", " B")
    assert ctx == list(b"Answer:") and cont == list(b" B")


def test_chat_wraps_the_context_and_drops_the_delimiter(tmp_path):
    test, _ = mmlu_items(mmlu_folder(tmp_path / "mmlu"))
    tok = ByteTokenizer()
    plain, _ = multiple_choice_prompt("mmlu", test[0])
    context, conts = multiple_choice_prompt("mmlu", test[0], chat_template=tok.apply_chat_template)
    assert context == f"<user>{plain}</user>\n<assistant>" and conts == ["A", "B", "C", "D"]
