"""`flashlm generate`, `flashlm chat` and `flashlm bench-decode` on a small GGUF file exported here."""

import io

import pytest
import torch

from flashlm.cli import main as cli_main
from flashlm.models import ModelConfig, Transformer
from flashlm.runtime.simple_generate import generate
from flashlm.train.export import export_gguf
from flashlm.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    text = ["the quick brown fox jumps over the lazy dog " * 20, "hello world, hello flashlm " * 20]
    tok = train_tokenizer(text, vocab_size=300)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      seq_len=96)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "m.gguf"
    export_gguf(Transformer(cfg), cfg, tok.to_str(), str(path), type="Q8_0")
    return str(path)


def test_generate_greedy_is_deterministic(gguf_path, capsys):
    args = ["generate", "--model", gguf_path, "--prompt", "hello", "--max-tokens", "12", "--temperature", "0",
            "--ignore-eos"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_generate_several_prompts_and_chat(gguf_path, capsys, monkeypatch):
    assert cli_main(["generate", "--model", gguf_path, "--prompt", "the", "--prompt", "fox", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "--- 'the'" in out and "--- 'fox'" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\nand again\n\n"))
    assert cli_main(["chat", "--model", gguf_path, "--max-tokens", "4", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("> ") == 3 and "no chat template" in captured.err


def test_bench_decode_reports(gguf_path, capsys):
    assert cli_main(["bench-decode", "--model", gguf_path, "--prompt-tokens", "8", "--gen-tokens", "4",
                     "--concurrency", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for what in ("prefill", "decode (batch 1", "concurrent requests", "host overhead"):
        assert what in out


def test_bad_model_path_is_an_error(tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_generate_from_a_training_checkpoint(tmp_path, capsys):
    """What `flashlm train` writes runs in the runtime: a checkpoint file, or the run's folder (its latest)."""
    from flashlm.io import load_model
    from flashlm.runtime.engine import LLM
    from flashlm.runtime.sampling_params import SamplingParams
    from flashlm.train.checkpoint import CheckpointManager

    tok = train_tokenizer(["to be or not to be, that is the question " * 30], vocab_size=280)
    cfg = ModelConfig(arch="gpt2", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, seq_len=64)
    torch.manual_seed(1)
    model = Transformer(cfg)
    state = {"format": "flashlm-checkpoint-1", "model_config": cfg.to_dict(), "model": model.state_dict(),
             "tokenizer": tok.to_str(), "eos_token_id": 0, "step": 3}
    CheckpointManager(tmp_path / "run", keep=2).save(state, 3)
    loaded = load_model(tmp_path / "run", max_model_len=48)
    assert loaded.config.seq_len == 48 and loaded.tokenizer.eos_token_ids == [0]
    prompt = tok.encode("to be").ids
    want = generate(model.eval(), torch.tensor([prompt]), 10, temperature=0, eos_token_id=0)[0, len(prompt):].tolist()
    got = LLM(str(tmp_path / "run")).generate(prompt, SamplingParams(temperature=0, max_tokens=10))[0]
    assert got.outputs[0].token_ids == want
    path = str(next((tmp_path / "run").glob("ckpt-*.pt")))
    assert cli_main(["generate", "--model", path, "--prompt", "to be", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() != ""
