"""`flashlm quantize IN OUT --method gptq|awq --calib-data FILE` and the int4 checkpoint it writes
(flashlm.io.quantize_calibrated, flashlm.io.int4_checkpoint): the file loads back (load_model) as the model the
method produced in process, tensor for tensor; bad flags and tampered files give errors naming what is wrong."""

import copy
import re

import pytest
import torch

from compare import assert_equal
from flashlm.cli import main
from flashlm.io import load_model
from flashlm.io.quantize_calibrated import calibration_rows
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear, awq_quantize, gptq_quantize
from flashlm.train.checkpoint import save_checkpoint
from flashlm.train.tokenizer import train_tokenizer

TEXT = "".join(f"The {w} sat on the mat number {i}, and then it ran away.\n"
               for i, w in enumerate(["cat", "dog", "bird", "fox", "cow"] * 40))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    tok = train_tokenizer([TEXT], vocab_size=300)
    cfg = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, d_model=64, seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    path = root / "float.pt"
    save_checkpoint(path, {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_str(),
                           "eos_token_id": 0})
    calib = root / "calib.txt"
    calib.write_text(TEXT, encoding="utf-8")
    return root, path, calib


@pytest.mark.parametrize("method,asym", [("gptq", False), ("awq", True)])
def test_quantize_command_writes_what_the_method_computes(float_checkpoint, method, asym):
    root, path, calib = float_checkpoint
    out = root / f"{method}.pt"
    argv = ["quantize", str(path), str(out), "--method", method, "--calib-data", str(calib), "--group-size", "32",
            "--calib-rows", "6", "--calib-seq", "32", "--quiet"] + (["--asym"] if asym else [])
    assert main(argv) == 0
    loaded = load_model(out)
    source = load_model(path)
    rows = calibration_rows(source.tokenizer.encode(TEXT), 6, 32)
    want = copy.deepcopy(source.model)
    (gptq_quantize if method == "gptq" else awq_quantize)(want, rows, 32, symmetric=not asym)
    got_state, want_state = loaded.model.state_dict(), want.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, t in want_state.items():
        assert_equal(got_state[name], t, name=name)
    layers = [m for m in loaded.model.blocks.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 7 and all(m.symmetric != asym and m.group_size == 32 for m in layers)
    idx = rows[:2]
    with torch.no_grad():
        assert_equal(loaded.model(idx)[0], want(idx)[0], name="logits")


def test_quantize_command_bad_input(float_checkpoint, capsys):
    root, path, calib = float_checkpoint
    out = str(root / "bad.pt")
    short = root / "short.txt"
    short.write_text("too short", encoding="utf-8")
    cases = [
        (["--method", "gptq"], "--calib-data: --method needs calibration text"),
        (["--method", "gptq", "--calib-data", str(short)], "--calib-data: .* fewer than one row"),
        (["--method", "gptq", "--calib-data", str(root / "missing.txt")], "--calib-data: cannot read"),
        (["--method", "awq", "--calib-data", str(calib), "--act-order"], "--act-order: only --method gptq"),
        (["--method", "gptq", "--calib-data", str(calib), "--type", "Q4_0"], "--type: not with --method"),
        (["--method", "gptq", "--calib-data", str(calib), "--calib-rows", "0"], "--calib-rows: must be a positive"),
        ([], "quantize: give --type TYPE"),
    ]
    for flags, message in cases:
        assert main(["quantize", str(path), out] + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("flashlm: error: ") and re.search(message, err), err


def test_tampered_int4_checkpoint(float_checkpoint):
    root, path, calib = float_checkpoint
    out = root / "tamper.pt"
    assert main(["quantize", str(path), str(out), "--method", "gptq", "--calib-data", str(calib), "--group-size",
                 "32", "--calib-rows", "2", "--calib-seq", "32", "--quiet"]) == 0
    good = torch.load(out, weights_only=True)

    def load_changed(change):
        ckpt = copy.deepcopy(good)
        change(ckpt)
        bad = root / "tampered.pt"
        torch.save(ckpt, bad)
        return load_model(bad)

    q = "blocks.0.attn.q"
    edits = [
        (lambda c: c["int4"].update(group_size=48), "int4 group_size must be one of"),
        (lambda c: c["int4"].update(symmetric="yes"), "int4 symmetric must be a bool"),
        (lambda c: c["int4"].update(layers=["tok_emb"]), "int4 layers must be a list of block linear names"),
        (lambda c: c["int4"].update(layers=[q, q]), "lists a layer twice"),
        (lambda c: c["model"].update({f"{q}.scales": torch.zeros(3, 3)}), f"layer {q}: scales must be a float32"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 16, dtype=torch.uint8)}),
         rf"layer {q}: scales must be a float32 \(64, 1\)"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(32, 32, dtype=torch.uint8),
                                      f"{q}.scales": torch.zeros(32, 2)}),
         rf"tensor '{q}.weight' has shape \(32, 64\), the config implies \(64, 64\)"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 32)}), f"layer {q}: weight must be a uint8"),
        (lambda c: c["int4"]["layers"].remove(q), f"weight '{q}.weight' is not a floating-point tensor"),
    ]
    for change, message in edits:
        with pytest.raises(ValueError, match=message):
            load_changed(change)
