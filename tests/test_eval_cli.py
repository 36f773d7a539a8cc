"""`flashlm eval MODEL --tasks ...` on a small GGUF file exported here and benchmark files written here: the
table, RESULTS.json (every item, equal to the API's scores), the PNG, and bad arguments as one-line errors."""

import json

import pytest

from eval_data import gsm8k_file, hellaswag_file, mmlu_folder, small_gguf
from flashlm.cli import main as cli_main
from flashlm.eval.formats import mmlu_items
from flashlm.eval.tasks import evaluate_multiple_choice
from flashlm.runtime.engine import LLM


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    text = ["The following are multiple choice questions (with answers) about algebra. Answer: A B C D " * 10,
            "Question: what is one plus two? Answer: three #### 3 " * 10]
    return small_gguf(tmp_path_factory.mktemp("evalcli") / "m.gguf", text)


def test_eval_tasks_writes_table_json_and_png(gguf_path, tmp_path, capsys):
    mmlu = mmlu_folder(tmp_path / "mmlu")
    tasks = f"mmlu:{mmlu},hellaswag:{hellaswag_file(tmp_path / 'h.jsonl')},gsm8k:{gsm8k_file(tmp_path / 'g.jsonl')}"
    out = tmp_path / "RESULTS.json"
    assert cli_main(["eval", gguf_path, "--tasks", tasks, "--shots", "1", "--limit", "2", "--max-tokens", "8",
                     "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mmlu | all (micro) | 4 |" in printed and "| mmlu | abstract_algebra | 2 |" in printed
    assert "| hellaswag | all (micro) | 2 |" in printed and "| gsm8k | all (micro) | 2 |" in printed
    data = json.loads(out.read_text())
    assert data["config"]["shots"] == 1 and set(data["results"]) == {"mmlu", "hellaswag", "gsm8k"}
    assert (tmp_path / "RESULTS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The file's items are the API's, number for number.
    items, dev = mmlu_items(mmlu)
    api = evaluate_multiple_choice(LLM(gguf_path), "mmlu", items, dev, shots=1, limit=2)
    got = data["results"]["mmlu"]
    assert got["metrics"] == api.metrics and len(got["items"]) == 4
    for g, a in zip(got["items"], api.items):
        assert [c["loglikelihood"] for c in g["choices"]] == pytest.approx([c["loglikelihood"] for c in a["choices"]],
                                                                           abs=1e-5)
        assert [c["tokens"] for c in g["choices"]] == [c["tokens"] for c in a["choices"]]
        assert g["prediction"] == a["prediction"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc:x"], "--tasks: unknown task 'arc'"),
    (["--tasks", "mmlu:/nowhere"], "--tasks: '/nowhere' does not exist"),
    (["--tasks", "mmlu:.", "--shots", "-1"], "--shots: must be at least 0"),
    (["--tasks", "mmlu:.", "--limit", "0"], "--limit: must be at least 1"),
    ([], "eval: give one of --tasks"),
])
def test_bad_arguments_are_one_line_errors(gguf_path, capsys, argv, message):
    assert cli_main(["eval", gguf_path, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flashlm: error: {message}") and err.count("\n") == 1


def test_a_malformed_file_names_its_line(tmp_path, capsys):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d\n")
    # Read before the model: the model path is never opened.
    assert cli_main(["eval", str(tmp_path / "no-model.gguf"), "--tasks", f"mmlu:{tmp_path}"]) == 2
    assert "x_test.csv:2: expected 6 columns" in capsys.readouterr().err
