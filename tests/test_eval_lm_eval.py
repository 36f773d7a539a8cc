"""lm-evaluation-harness as the peer: one random-weight HF llama scored by lm_eval's own `hf` backend
(transformers, float32) and by flashlm, on task YAMLs over local JSONL files written here (multiple choice,
rolling log-likelihood, generation). flashlm is reached two ways: its lm_eval model class ("flashlm", the
engine in process) and lm_eval's `local-completions` backend against flashlm's HTTP server (echo + logprobs).
Every item's log-likelihoods agree within 1e-4 (relative for the long rolling sums), is_greedy flags,
generated texts, acc and acc_norm are equal.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval's hf backend

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_setup import GEN_TASK, MC_ITEMS, MC_TASK, ROLLING_TASK, write_hf_model, write_tasks  # noqa: E402

from flashlm import LLM  # noqa: E402

TASKS = [MC_TASK, ROLLING_TASK, GEN_TASK]
# No downloads: the tasks' data are local JSONL files, the model a local directory.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    write_hf_model(root / "model")
    return root / "model", write_tasks(root / "tasks")


def evaluate(setup, model, model_args, tasks=TASKS):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(setup[1])))


@pytest.fixture(scope="module")
def hf_results(setup):
    return evaluate(setup, "hf", {"pretrained": str(setup[0]), "dtype": "float32", "device": "cpu"})


def responses(results, task) -> list:
    """Each item's responses in document order: [(loglikelihood, is_greedy), ...] per choice, a float, or a text."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def assert_same_results(got, want, tasks=TASKS):
    for task in tasks:
        g, w = responses(got, task), responses(want, task)
        assert len(g) == len(w) > 0, task
        for i, (gi, wi) in enumerate(zip(g, w)):
            if task == GEN_TASK:
                assert gi == wi, (task, i, gi, wi)
                continue
            lls = [x[0] if isinstance(x, tuple) else x for x in gi], [x[0] if isinstance(x, tuple) else x for x in wi]
            err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(*lls))
            assert len(lls[0]) == len(lls[1]) and err <= 1e-4, (task, i, lls, err)
            if task == MC_TASK:
                assert [x[1] for x in gi] == [x[1] for x in wi], (task, i)
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in want["results"][task]:
                assert got["results"][task][metric] == want["results"][task][metric], (task, metric)


def test_hf_reference_is_informative(hf_results):
    """The reference itself tells the backends apart: acc and acc_norm differ, and not every choice is wrong."""
    res = hf_results["results"][MC_TASK]
    assert res["acc,none"] != res["acc_norm,none"] and 0 < res["acc,none"] < 1
    assert len(responses(hf_results, MC_TASK)) == len(MC_ITEMS)


def test_local_completions_against_server_matches_hf(setup, hf_results):
    """lm_eval's local-completions backend (prompt token ids, echo, logprobs=1, max_tokens=1) on flashlm's server."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from serve_server import MODEL_NAME, RunningServer

    with RunningServer(LLM(str(setup[0]), max_num_seqs=8)) as server:
        got = evaluate(setup, "local-completions", {
            "base_url": server.url + "/v1/completions", "model": MODEL_NAME, "tokenizer_backend": "huggingface",
            "tokenizer": str(setup[0]), "num_concurrent": 4, "max_retries": 1})
    assert_same_results(got, hf_results)


@pytest.fixture(scope="module")
def flashlm_model(setup):
    from flashlm.eval.lm_eval_model import FlashLM

    return FlashLM(llm=LLM(str(setup[0]), max_num_seqs=8))


def test_flashlm_matches_hf(setup, hf_results, flashlm_model):
    """The engine in process: choices scored with shared question prefixes, rolling windows, greedy generation
    with a stop string, each batched."""
    assert_same_results(evaluate(setup, flashlm_model, None), hf_results)


def test_flashlm_truncates_contexts_as_hf(setup, hf_results):
    """A max_length shorter than the prompts: contexts cut on the left as the hf backend cuts them."""
    from flashlm.eval.lm_eval_model import FlashLM

    want = evaluate(setup, "hf", {"pretrained": str(setup[0]), "dtype": "float32", "device": "cpu",
                                  "max_length": 6}, [MC_TASK])
    got = evaluate(setup, FlashLM(llm=LLM(str(setup[0]), max_num_seqs=8), max_length=6), None, [MC_TASK])
    assert_same_results(got, want, [MC_TASK])
    assert responses(want, MC_TASK) != responses(hf_results, MC_TASK)  # the cut changed the scores: the test sees truncation


def test_flashlm_by_name_on_lm_eval_command_line(setup, hf_results, tmp_path):
    """`python -m flashlm.eval.lm_eval_model` is lm_eval's command line with "flashlm" registered."""
    cmd = [sys.executable, "-m", "flashlm.eval.lm_eval_model", "run", "--model", "flashlm", "--model_args",
           f"model={setup[0]}", "--tasks", MC_TASK, "--include_path", str(setup[1]), "--output_path",
           str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE})
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1
    for metric in ("acc,none", "acc_norm,none"):
        assert results[0]["results"][MC_TASK][metric] == hf_results["results"][MC_TASK][metric]


def test_flashlm_registered_for_lm_eval(setup):
    import flashlm.eval.lm_eval_model as mod
    from lm_eval.api.registry import get_model

    assert get_model("flashlm") is mod.FlashLM
    lm = mod.FlashLM.create_from_arg_string(f"model={setup[0]},max_length=100,max_gen_toks=16",
                                            {"batch_size": 4, "device": None})
    assert (lm.max_length, lm.max_gen_toks, lm.llm.runner.device.type) == (100, 16, "cpu")


def test_flashlm_bad_arguments(setup, flashlm_model):
    from lm_eval.api.instance import Instance

    from flashlm.eval.lm_eval_model import FlashLM

    llm = flashlm_model.llm
    with pytest.raises(ValueError, match="^model: give either"):
        FlashLM()
    with pytest.raises(ValueError, match="^model: give either"):
        FlashLM(model=str(setup[0]), llm=llm)
    with pytest.raises(TypeError, match="^llm: expected a flashlm LLM"):
        FlashLM(llm="model.gguf")
    with pytest.raises(ValueError, match="^max_length: must be in"):
        FlashLM(llm=llm, max_length=llm.max_model_len)
    with pytest.raises(TypeError, match="^max_gen_toks"):
        FlashLM(llm=llm, max_gen_toks="8")
    with pytest.raises(ValueError, match="^prefix_token_id"):
        FlashLM(llm=llm, prefix_token_id=llm.model.cfg.vocab_size)
    with pytest.raises(ValueError, match="^continuation: is empty"):
        flashlm_model._loglikelihood_tokens([(("a", ""), [5], [])], disable_tqdm=True)
    with pytest.raises(ValueError, match="^continuation: .* do not fit max_length"):
        flashlm_model._loglikelihood_tokens([(("a", "b"), [5], [6] * (flashlm_model.max_length + 1))])

    def generate(gen_kwargs):
        req = Instance("generate_until", {}, ("hello", gen_kwargs), 0)
        return flashlm_model.generate_until([req], disable_tqdm=True)

    assert generate({"until": ["\n"], "max_gen_toks": 4}) == responses_of(flashlm_model, "hello", 4)
    with pytest.raises(ValueError, match=r"^gen_kwargs: \['num_beams'\] not supported"):
        generate({"until": ["\n"], "num_beams": 4})
    with pytest.raises(ValueError, match="^max_gen_toks: .* leaves no room"):
        generate({"max_gen_toks": flashlm_model.max_length})
    with pytest.raises(TypeError, match="^gen_kwargs: expected a dict"):
        generate("until")
    with pytest.raises(ValueError, match="^top_p"):
        generate({"do_sample": True, "temperature": 1.0, "top_p": 2.0})


def responses_of(lm, context, n) -> list:
    """The engine's own greedy text for context, cut at a newline: what generate_until must return."""
    from flashlm import SamplingParams

    text = lm.llm.generate(context, SamplingParams(temperature=0, max_tokens=n))[0].outputs[0].text
    return [text.split("\n")[0]]
