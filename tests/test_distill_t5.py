"""Distillation from a teacher whose tokenizer is a t5 (Unigram) GGUF vocabulary, saved in flashlm's own JSON form
(io/gguf_vocab_json.py): `flashlm distill` tokenizes the corpus with it and trains, the offline logits file
carries it, and a student whose vocabulary differs in a token or in a score is refused by name."""

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

from test_distill import one_thread, paragraphs  # noqa: E402,F401 (one_thread: autouse, 1 torch thread)
from tokenizer_sources import train_ugm, ugm_gguf_metadata, write_vocab_gguf  # noqa: E402

from flashlm.cli import main as cli_main  # noqa: E402
from flashlm.io import load_model  # noqa: E402
from flashlm.io.gguf import GGUFFile  # noqa: E402
from flashlm.io.gguf_vocab import tokenizer_from_gguf, tokenizer_from_json  # noqa: E402
from flashlm.io.gguf_vocab_json import vocab_from_json, vocab_json  # noqa: E402
from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.train.checkpoint import CheckpointManager  # noqa: E402
from flashlm.train.student import check_same_vocabulary  # noqa: E402
from flashlm.train.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """(a folder with corpus.txt, the t5 tokenizer, a run folder "teacher" whose checkpoint holds its saved text)."""
    folder = tmp_path_factory.mktemp("t5distill")
    sp, proto = train_ugm()
    write_vocab_gguf(str(folder / "ugm.gguf"), ugm_gguf_metadata(sp, proto))
    tok = tokenizer_from_gguf(GGUFFile(str(folder / "ugm.gguf")).metadata)
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs(300)))
    save_run(folder / "teacher", tok.to_str(), tok.vocab_size, tok.eos_token_id, n_layer=2)
    return folder, tok


def save_run(path, tokenizer_json, vocab_size, eos_id, n_layer=1):
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, n_layer=n_layer, n_head=2, d_model=32, seq_len=64)
    torch.manual_seed(0)
    CheckpointManager(path, keep=1).save({"format": "flashlm-checkpoint-1", "model_config": cfg.to_dict(),
                                          "model": Transformer(cfg).state_dict(), "tokenizer": tokenizer_json,
                                          "eos_token_id": eos_id, "step": 1}, 1)


def changed(tok, key, i, value):
    """tok's saved text with entry i of a tokenizer.ggml.* list set to value."""
    meta = vocab_from_json(tok.to_str())
    meta[key] = list(meta[key])
    meta[key][i] = value
    return vocab_json(meta)


def distill_args(folder, out, *extra):
    return ["distill", "--teacher", str(folder / "teacher"), "--data", str(folder / "corpus.txt"),
            "--data-cache", str(folder / "cache"), "--seq-len", "32", "--max-steps", "2", "--out-dir", str(out),
            "--no-progress", *extra]


def test_saved_t5_text_loads_for_the_data_pipeline(t5):
    folder, tok = t5
    (folder / "saved.json").write_text(tok.to_str())
    backend = load_tokenizer(folder / "saved.json")
    text = "the red cat sees the dog."
    assert backend.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False)


def test_distill_from_a_t5_teacher(t5, tmp_path):
    folder, tok = t5
    out = tmp_path / "run"
    assert cli_main(distill_args(folder, out, "--student-layers", "1", "--student-dim", "32",
                                 "--student-heads", "2")) == 0
    loaded = load_model(out)
    assert loaded.config.n_layer == 1 and loaded.tokenizer.to_str() == tok.to_str()
    text = "the big dog chases the fish."
    assert loaded.tokenizer.encode(text) == tok.encode(text)


def test_offline_logits_file_carries_the_t5_vocabulary(t5, tmp_path):
    from flashlm.train.teacher_logits import open_teacher_logits

    folder, tok = t5
    kd = tmp_path / "teacher.kd"
    assert cli_main(distill_args(folder, tmp_path / "save", "--student-layers", "1", "--student-dim", "32",
                                 "--student-heads", "2", "--top-k", "8", "--save-teacher-logits", str(kd))) == 0
    assert open_teacher_logits(kd).meta["tokenizer"] == tok.to_str()
    assert cli_main(["distill", "--teacher-logits", str(kd), "--student-layers", "1", "--student-dim", "32",
                     "--student-heads", "2", "--max-steps", "2", "--out-dir", str(tmp_path / "offline"),
                     "--no-progress"]) == 0


def test_t5_vocabularies_match_by_pieces_and_scores(t5, tmp_path, capsys):
    folder, tok = t5
    check_same_vocabulary(tok, tokenizer_from_json(tok.to_str()))
    piece = tok.id_to_token(10)
    other_score = vocab_from_json(tok.to_str())["tokenizer.ggml.scores"][10] - 1.0
    for text, match in ((changed(tok, "tokenizer.ggml.tokens", 10, "zebra"),
                         f"student: token 10 is 'zebra', the teacher's is {piece!r}"),
                        (changed(tok, "tokenizer.ggml.scores", 10, other_score),
                         fr"student: token 10 \({piece!r}\) has score {other_score!r}, the teacher's")):
        with pytest.raises(ValueError, match=match):
            check_same_vocabulary(tok, tokenizer_from_json(text))
    # an existing student with the changed scores: `flashlm distill` refuses it before any training
    save_run(tmp_path / "student", text, tok.vocab_size, tok.eos_token_id)
    capsys.readouterr()
    assert cli_main(distill_args(folder, tmp_path / "out", "--student", str(tmp_path / "student"))) == 2
    assert f"flashlm: error: student: token 10 ({piece!r}) has score" in capsys.readouterr().err
