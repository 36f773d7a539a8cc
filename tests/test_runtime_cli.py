"""`flashlm generate`, `flashlm chat` and `flashlm bench-decode` on a small GGUF file exported here."""

import io

import pytest
import torch

from flashlm.cli import main as cli_main
from flashlm.models import ModelConfig, Transformer
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
    assert cli_main(["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 1
    assert "error" in capsys.readouterr().err
