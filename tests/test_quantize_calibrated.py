"""`flashlm quantize IN OUT --method gptq|awq|w8a8|smoothquant --calib-data FILE` and the quantized checkpoint
it writes (flashlm.io.quantize_calibrated, flashlm.io.quantized_checkpoint with its int4 and int8 entries): the
file loads back (load_model) as the model the method produced in process, tensor for tensor, logits bit for
bit; bad flags and tampered files give errors naming what is wrong."""

import copy
import re

import pytest
import torch

from compare import assert_equal
from flashlm.cli import main
from flashlm.io import load_model
from flashlm.io.quantize_calibrated import CALIB_BATCH, calibration_rows
from flashlm.models import ModelConfig, Transformer
from flashlm.quant import Int4Linear, Int8Linear, awq_quantize, gptq_quantize
from flashlm.quant.calibrate import calibrate
from flashlm.quant.smoothquant import smooth_model
from flashlm.quant.w8a8 import quantize_w8a8
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


@pytest.mark.parametrize("method,asym,calib_dtype", [("gptq", False, None), ("gptq", False, "f32"),
                                                    ("gptq", False, "bf16"), ("awq", True, None)])
def test_quantize_command_writes_what_the_method_computes(float_checkpoint, method, asym, calib_dtype):
    root, path, calib = float_checkpoint
    out = root / f"{method}.pt"
    argv = ["quantize", str(path), str(out), "--method", method, "--calib-data", str(calib), "--group-size", "32",
            "--calib-rows", "6", "--calib-seq", "32", "--quiet"] + (["--asym"] if asym else [])
    argv += ["--calib-dtype", calib_dtype] if calib_dtype else []
    assert main(argv) == 0
    loaded = load_model(out)
    source = load_model(path)
    rows = calibration_rows(source.tokenizer.encode(TEXT), 6, 32)
    want = copy.deepcopy(source.model)
    if method == "gptq":  # --calib-dtype f32 is calib_dtype=torch.float32; without it, gptq_quantize's default
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, None: None}[calib_dtype]
        gptq_quantize(want, rows, 32, symmetric=not asym, calib_dtype=dtype)
    else:
        awq_quantize(want, rows, 32, symmetric=not asym)
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
        (["--method", "awq", "--calib-data", str(calib), "--calib-dtype", "f32"], "--calib-dtype: only --method gptq"),
        (["--method", "gptq", "--calib-data", str(calib), "--type", "Q4_0"], "--type: not with --method"),
        (["--method", "gptq", "--calib-data", str(calib), "--calib-rows", "0"], "--calib-rows: must be a positive"),
        (["--method", "gptq", "--calib-data", str(calib), "--act-calib", "kl"], "--act-calib: not with --method gptq"),
        (["--method", "w8a8", "--calib-data", str(calib), "--group-size", "32"],
         "--group-size: not with --method w8a8"),
        (["--method", "smoothquant", "--calib-data", str(calib), "--asym"], "--asym: not with --method smoothquant"),
        (["--method", "w8a8", "--calib-data", str(calib), "--act-order"], "--act-order: only --method gptq"),
        (["--method", "w8a8", "--calib-data", str(calib), "--alpha", "0.5"], "--alpha: only --method smoothquant"),
        (["--method", "smoothquant", "--calib-data", str(calib), "--alpha", "1.5"], r"--alpha: must lie in \[0, 1\]"),
        (["--method", "smoothquant", "--calib-data", str(calib), "--alpha", "nan"], r"--alpha: must lie in \[0, 1\]"),
        (["--method", "w8a8", "--calib-data", str(short)], "--calib-data: .* fewer than one row"),
        ([], "quantize: give --type TYPE"),
    ]
    for flags, message in cases:
        assert main(["quantize", str(path), out] + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("flashlm: error: ") and re.search(message, err), err
    nowhere = str(root / "missing" / "out.pt")  # refused before the calibration runs
    assert main(["quantize", str(path), nowhere, "--method", "w8a8", "--calib-data", str(calib)]) == 2
    assert re.search("flashlm: error: output: the folder .* does not exist", capsys.readouterr().err)


def assert_tampered_files_refused(good: dict, edits: list, path) -> None:
    """Each (change, message) of edits applied to a copy of the checkpoint `good`, written to path: load_model
    raises a ValueError matching message."""
    for change, message in edits:
        ckpt = copy.deepcopy(good)
        change(ckpt)
        torch.save(ckpt, path)
        with pytest.raises(ValueError, match=message):
            load_model(path)


def test_tampered_int4_checkpoint(float_checkpoint):
    root, path, calib = float_checkpoint
    out = root / "tamper.pt"
    assert main(["quantize", str(path), str(out), "--method", "gptq", "--calib-data", str(calib), "--group-size",
                 "32", "--calib-rows", "2", "--calib-seq", "32", "--quiet"]) == 0
    good = torch.load(out, weights_only=True)
    q = "blocks.0.attn.q"
    edits = [
        (lambda c: c["int4"].update(group_size=48), "int4 group_size must be one of"),
        (lambda c: c["int4"].update(symmetric="yes"), "int4 symmetric must be a bool"),
        (lambda c: c["int4"].update(layers=["tok_emb"]), "int4 layers must be a list of block linear names"),
        (lambda c: c["int4"].update(layers=[q, q]), "lists a layer twice"),
        (lambda c: c["model"].update({f"{q}.scales": torch.zeros(3, 3)}), f"layer {q}: scales must be a float32"),
        (lambda c: c["model"][f"{q}.scales"].view(-1)[0].fill_(float("nan")), f"layer {q}: scales must be finite"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 16, dtype=torch.uint8)}),
         rf"layer {q}: scales must be a float32 \(64, 1\)"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(32, 32, dtype=torch.uint8),
                                      f"{q}.scales": torch.zeros(32, 2)}),
         rf"tensor '{q}.weight' has shape \(32, 64\), the config implies \(64, 64\)"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 32)}), f"layer {q}: weight must be a uint8"),
        (lambda c: c["int4"]["layers"].remove(q), f"weight '{q}.weight' is not a floating-point tensor"),
    ]
    assert_tampered_files_refused(good, edits, root / "tampered.pt")


def _w8a8_reference(model, rows, smooth, act_calib, alpha):
    """What `--method w8a8|smoothquant` must compute, through the Python API (the same batches: a histogram's
    range grows batch by batch)."""
    def calibration():
        return calibrate(model, rows.reshape(-1), seq_len=rows.shape[1], batch_size=CALIB_BATCH)

    if smooth:
        smooth_model(model, calibration(), alpha)
    quantize_w8a8(model, calibration() if act_calib else None, act_calib)
    return model


@pytest.mark.parametrize("method,act_calib,alpha", [("w8a8", None, None), ("w8a8", "percentile", None),
                                                     ("smoothquant", "kl", "0.75"), ("smoothquant", None, None)])
def test_w8a8_command_writes_what_the_method_computes(float_checkpoint, method, act_calib, alpha):
    root, path, calib = float_checkpoint
    out = root / f"{method}-{act_calib}.pt"
    argv = ["quantize", str(path), str(out), "--method", method, "--calib-data", str(calib), "--calib-rows", "6",
            "--calib-seq", "32", "--quiet"]
    argv += (["--act-calib", act_calib] if act_calib else []) + (["--alpha", alpha] if alpha else [])
    assert main(argv) == 0
    loaded = load_model(out)
    source = load_model(path)
    rows = calibration_rows(source.tokenizer.encode(TEXT), 6, 32)
    want = _w8a8_reference(copy.deepcopy(source.model), rows, method == "smoothquant", act_calib,
                           float(alpha or 0.5))
    got_state, want_state = loaded.model.state_dict(), want.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, t in want_state.items():
        assert_equal(got_state[name], t, name=name)
    layers = [m for m in loaded.model.blocks.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 7 and all((m.act_scale is not None) == (act_calib is not None) for m in layers)
    if method == "smoothquant":  # the smoothing moved into the norms
        assert not torch.equal(loaded.model.blocks[0].attn_norm.weight, source.model.blocks[0].attn_norm.weight)
    with torch.no_grad():
        assert_equal(loaded.model(rows[:2])[0], want(rows[:2])[0], name="logits")


def test_w8a8_model_saved_from_python_generates(float_checkpoint, capsys):
    """save_quantized_model on an in-memory W8A8 model; `flashlm generate --model` reads the file and greedy
    decoding gives the in-memory model's tokens."""
    from flashlm.io.quantized_checkpoint import save_quantized_model
    from flashlm.runtime.simple_generate import generate

    root, path, calib = float_checkpoint
    loaded = load_model(path)
    rows = calibration_rows(loaded.tokenizer.encode(TEXT), 4, 32)
    _w8a8_reference(loaded.model, rows, True, "minmax", 0.5)
    out = root / "python-w8a8.pt"
    save_quantized_model(loaded, out, "smoothquant")
    back = load_model(out)
    with torch.no_grad():
        assert_equal(back.model(rows)[0], loaded.model(rows)[0], name="logits")
    prompt = rows[:1, :5]
    want = generate(loaded.model, prompt, max_new_tokens=6, temperature=0.0)
    assert_equal(generate(back.model, prompt, max_new_tokens=6, temperature=0.0), want, name="tokens")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "The cat", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()


def test_tampered_int8_checkpoint(float_checkpoint):
    root, path, calib = float_checkpoint
    out = root / "tamper8.pt"
    assert main(["quantize", str(path), str(out), "--method", "w8a8", "--act-calib", "minmax", "--calib-data",
                 str(calib), "--calib-rows", "2", "--calib-seq", "32", "--quiet"]) == 0
    good = torch.load(out, weights_only=True)
    assert load_model(out).model.blocks[0].attn.q.act_scale is not None
    q = "blocks.0.attn.q"
    edits = [
        (lambda c: c.update(int8=[q]), "int8 is a list, expected a dict"),
        (lambda c: c["int8"].update(static=1), "int8 static must be a bool"),
        (lambda c: c["int8"].update(method=None), "int8 method must be a string"),
        (lambda c: c["int8"].update(layers=["lm_head"]), "int8 layers must be a list of block linear names"),
        (lambda c: c["int8"].update(layers=[q, q]), "int8 layers lists a layer twice"),
        (lambda c: c["int8"].update(static=False), f"layer {q}: a layer with per-token activation scales has no"),
        (lambda c: c["model"].pop(f"{q}.act_scale"), rf"layer {q}: act_scale must be a float32 \(\) tensor"),
        (lambda c: c["model"].update({f"{q}.act_scale": torch.tensor(0.0)}), "act_scale must be finite and positive"),
        (lambda c: c["model"].update({f"{q}.act_scale": torch.tensor(float("nan"))}), "finite and positive, got nan"),
        (lambda c: c["model"].update({f"{q}.act_scale": torch.ones(1)}), "act_scale must be a float32"),
        (lambda c: c["model"].update({f"{q}.weight_scales": torch.ones(63)}),
         rf"layer {q}: weight_scales must be a float32 \(64,\)"),
        (lambda c: c["model"].update({f"{q}.weight_scales": torch.ones(64, dtype=torch.float64)}),
         "weight_scales must be a float32"),
        (lambda c: c["model"][f"{q}.weight_scales"].__setitem__(3, float("inf")),
         f"layer {q}: weight_scales must be finite and non-negative"),
        (lambda c: c["model"][f"{q}.weight_scales"].__setitem__(0, -1.0), "weight_scales must be finite and non-neg"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 64)}), f"layer {q}: weight must be an int8"),
        (lambda c: c["model"].update({f"{q}.weight": torch.zeros(64, 32, dtype=torch.int8)}),
         rf"tensor '{q}.weight' has shape \(64, 32\), the config implies \(64, 64\)"),
        (lambda c: c["int8"]["layers"].remove(q), f"weight '{q}.weight' is not a floating-point tensor"),
        (lambda c: c.update(int4={"group_size": 32, "symmetric": True, "method": "gptq", "layers": [q]}),
         f"layer {q} is listed by both int4 and int8"),
    ]
    assert_tampered_files_refused(good, edits, root / "tampered.pt")
