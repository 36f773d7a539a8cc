"""Mixed precision: `flashlm quantize --keep-float` (tensors left float in a quantized GGUF) and the
sensitivity scan (flashlm.quant.sensitivity) that ranks which weights lose the most when quantized.

Checked: --keep-float leaves exactly the named tensors float (as stored) and every other tensor as the mix
alone types and quantizes it (test_quantize_file's hand-worked types, quantize_gguf's bytes); flashlm and
llama.cpp load the file; the scan's perplexities against an independent computation (gguf-py's dequantizer,
torch's cross entropy), and its ranking on a model with one layer made fragile on purpose; bad names and
arguments are refused with errors that name them.
"""

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT

from flashlm.cli import main as cli_main
from flashlm.io.quantize_file import quantize_file
from flashlm.quant import quantize_gguf
from flashlm.quant.mix import keeps_float, parse_keep_float
from flashlm.quant.sensitivity import sensitivity_scan
from test_quantize_file import N_LAYER, expected_types, model_tensors, read_back, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tensors = model_tensors(np.random.default_rng(11))
    path = tmp_path_factory.mktemp("model") / "tiny-f32.gguf"
    write_model(path, tensors, stored={"blk.2.ffn_down.weight": "F16"})
    return path, tensors


@pytest.mark.parametrize("mix, keep, kept", [
    ("Q4_K_M", "attn_v,ffn_down", lambda n: n.endswith(("attn_v.weight", "ffn_down.weight"))),
    ("Q3_K_M", ["blk.0", "output"], lambda n: n == "output.weight" or (n.startswith("blk.0.") and "norm" not in n)),
    ("Q4_0", "blk.5.attn_q, token_embd", lambda n: n in ("blk.5.attn_q.weight", "token_embd.weight")),
])
def test_keep_float_leaves_exactly_those_tensors_float(model, tmp_path, mix, keep, kept):
    src, tensors = model
    out = tmp_path / "mixed.gguf"
    quantize_file(str(src), str(out), mix, progress=False, keep_float=keep)
    reader, back = read_back(out)
    want = expected_types(mix)  # the types of the mix alone (counters and fallbacks as if nothing were kept)
    for name, x in tensors.items():
        t, _, data = back[name]
        stored = "F16" if name == "blk.2.ffn_down.weight" else "F32"
        x = x.astype(np.float16 if stored == "F16" else np.float32)
        if kept(name):
            assert t == stored, (name, t)
            assert np.array_equal(data.reshape(x.shape), x)
            continue
        assert t == want[name], (name, t, want[name])
        if t != "F32":
            rows = x.reshape(-1, x.shape[-1])
            assert np.array_equal(data.reshape(rows.shape[0], -1).view(np.uint8), quantize_gguf(rows, t)), name
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[f"MOSTLY_{mix}"])


@pytest.mark.parametrize("keep, match", [
    ("attn_x", "'attn_x' is not a tensor category"),
    ("attn_v,", "'' is not a tensor category"),
    ("blk.x.attn_v", "'blk.x.attn_v' is not a tensor category"),
    ("blk.3.attn_norm", "'blk.3.attn_norm' is not a tensor category"),
    ("blk.8", "'blk.8' names no weight of this model"),
    ("blk.12.ffn_up", "'blk.12.ffn_up' names no weight"),
    ("attn_qkv", "'attn_qkv' names no weight"),
])
def test_bad_keep_float_names(model, tmp_path, capsys, keep, match):
    src, _ = model
    out = tmp_path / "q.gguf"
    assert cli_main(["quantize", str(src), str(out), "--type", "Q4_K_M", "--keep-float", keep, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: keep_float: ") and match in err, err
    assert not out.exists()


def test_keep_float_matching():
    names = [f"blk.{i}.{c}.weight" for i in (1, 10) for c in ("attn_v", "ffn_down", "attn_norm")]
    keep = parse_keep_float("blk.1", names)
    assert [n for n in names if keeps_float(n, keep)] == ["blk.1.attn_v.weight", "blk.1.ffn_down.weight"]
    keep = parse_keep_float(["blk.10.ffn_down", "attn_v"], names)
    assert [n for n in names if keeps_float(n, keep)] == ["blk.1.attn_v.weight", "blk.10.attn_v.weight",
                                                          "blk.10.ffn_down.weight"]
    with pytest.raises(TypeError, match="keep_float: expected names"):
        parse_keep_float([3], names)


def test_keep_float_is_not_for_int4_methods(model, tmp_path, capsys):
    src, _ = model
    assert cli_main(["quantize", str(src), str(tmp_path / "o"), "--method", "gptq", "--calib-data", str(src),
                     "--keep-float", "attn_v"]) == 2
    assert "--keep-float and --sensitivity go with --type" in capsys.readouterr().err


def test_flashlm_and_llama_cpp_load_the_file(tmp_path):
    from flashlm import LLM, SamplingParams
    from flashlm.io.random_model import write_random_llama_gguf

    src, out = tmp_path / "m.gguf", tmp_path / "q.gguf"
    write_random_llama_gguf(str(src), d_model=256, d_ff=512, n_layer=4, vocab_size=300, n_head=4, ggml_type="F32",
                            context_length=64)
    assert cli_main(["quantize", str(src), str(out), "--type", "Q4_K_M", "--keep-float", "attn_v,ffn_down",
                     "--quiet"]) == 0
    _, back = read_back(out)
    assert {n: t for n, (t, _, _) in back.items() if t == "F32" and "norm" not in n} == {
        f"blk.{i}.{c}.weight": "F32" for i in range(4) for c in ("attn_v", "ffn_down")}
    llm = LLM(str(out), max_num_seqs=1)
    prompt = [1, 17, 42, 99, 250, 3, 77, 8]
    result = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))
    assert len(result[0].outputs[0].token_ids) == 4
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, type_k=0,
                          type_v=0, verbose=False)
    ref.eval(prompt)
    theirs = np.array(ref.scores[: len(prompt)])
    from flashlm.io import load_model

    ours = load_model(str(out)).model(torch.tensor([prompt]))[0][0].float().numpy()
    assert np.all(np.isfinite(theirs))
    # llama.cpp's quantized matmuls round activations to 8 bits too: the same model, not the same digits
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert corr > 0.99, corr


# -- the sensitivity scan ---------------------------------------------------------------------------------------

FRAGILE = 2


def fragile_model():
    """A random 4-layer llama whose layer FRAGILE has, in every 32-column block of its MLP's gate and up rows,
    one weight 2500x the others on an input channel its norm zeroes: the float model never sees those weights,
    but a block quantizer's scale follows them and rounds the rest of the block to zero."""
    from flashlm.models import ModelConfig, Transformer

    cfg = ModelConfig(arch="llama", vocab_size=64, n_layer=4, n_head=2, n_kv_head=1, d_model=64, d_ff=128,
                      seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    block = model.blocks[FRAGILE]
    block.mlp_norm.weight[::32] = 0
    block.mlp.gate.weight[:, ::32] = 50.0
    block.mlp.up.weight[:, ::32] = 50.0
    block.mlp.down.weight *= 20  # and the layer's MLP matters to the output
    return model


def reference_perplexity(model, ids, seq):
    rows = ids[: len(ids) // seq * seq].view(-1, seq)
    logits, _ = model(rows)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                             rows[:, 1:].reshape(-1))
    return math.exp(loss.item())


@pytest.mark.parametrize("unit, first", [("layer", f"blk.{FRAGILE}"), ("tensor", None)])
def test_scan_ranks_the_fragile_layer_first(unit, first):
    model = fragile_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (4 * 32 + 5,), generator=torch.Generator().manual_seed(1))
    base, rows = sensitivity_scan(model, ids, "Q4_0", unit=unit, seq_len=32)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored
    assert math.isclose(base, reference_perplexity(model, ids, 32), rel_tol=1e-5)
    if first:
        assert rows[0].unit == first, [(r.unit, r.increase) for r in rows]
    else:
        assert {r.unit for r in rows[:2]} == {f"blk.{FRAGILE}.ffn_gate", f"blk.{FRAGILE}.ffn_up"}, rows[:3]
    assert len(rows) == (4 if unit == "layer" else 28)
    assert [r.increase for r in rows] == sorted((r.increase for r in rows), reverse=True)
    # the top row's perplexity, computed independently: gguf-py's dequantizer of the same blocks
    top = rows[0].unit
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith(f"blocks.{FRAGILE}.") and (
                    unit == "layer" or name.endswith({"ffn_gate": "gate", "ffn_up": "up"}[top.split(".")[2]])):
                w = m.weight.numpy()
                m.weight.copy_(torch.from_numpy(gguf.quants.dequantize(quantize_gguf(w, "Q4_0"), GQT.Q4_0)))
    assert math.isclose(rows[0].perplexity, reference_perplexity(model, ids, 32), rel_tol=1e-5)
    assert rows[0].increase > 10 * max(r.increase for r in rows[2:])


def test_scan_by_category_and_fallback():
    model = fragile_model()
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(2))
    _, rows = sensitivity_scan(model, ids, "Q4_K", unit="category", seq_len=32)
    assert {r.unit for r in rows} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert {r.ggml_type for r in rows} == {"Q5_0"}  # rows of 64 and 128 columns: Q4_K falls back to Q5_0
    with pytest.raises(ValueError, match="unit: expected one of"):
        sensitivity_scan(model, ids, "Q4_K", unit="block")
    with pytest.raises(ValueError, match="ggml_type: expected one of"):
        sensitivity_scan(model, ids, "Q7_K")
    with pytest.raises(ValueError, match="empty calibration data"):
        sensitivity_scan(model, ids[:10], "Q4_0", seq_len=32)


def test_sensitivity_command(tmp_path, capsys):
    from flashlm.io.random_model import write_random_llama_gguf

    src, out, text = tmp_path / "m.gguf", tmp_path / "q.gguf", tmp_path / "calib.txt"
    write_random_llama_gguf(str(src), d_model=256, d_ff=512, n_layer=2, vocab_size=300, n_head=4, ggml_type="F32",
                            context_length=64)
    text.write_text("the quick brown fox jumps over the lazy dog, " * 20)
    assert cli_main(["quantize", str(src), str(out), "--type", "Q4_K_M", "--sensitivity", "--calib-data", str(text),
                     "--calib-rows", "2", "--sensitivity-unit", "tensor", "--keep-top", "2", "--keep-float", "output",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    units = [line.split()[0] for line in printed[2:16]]
    assert sorted(units) == sorted(f"blk.{i}.{c}" for i in range(2) for c in ("attn_q", "attn_k", "attn_v",
                                   "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert printed[16] == f"kept float: {units[0]},{units[1]} (--keep-top 2)"
    _, back = read_back(out)
    floats = {n for n, (t, _, _) in back.items() if t == "F32" and "norm" not in n}
    assert floats == {"output.weight", f"{units[0]}.weight", f"{units[1]}.weight"}


@pytest.mark.parametrize("argv, match", [
    (["--keep-top", "2"], "--keep-top: goes with --sensitivity"),
    (["--sensitivity"], "--calib-data: --sensitivity needs calibration text"),
    (["--sensitivity", "--calib-data", "CALIB", "--keep-top", "-1"], "--keep-top: must be >= 0"),
    (["--sensitivity", "--calib-data", "MISSING"], "--calib-data: cannot read"),
])
def test_sensitivity_command_refuses(model, tmp_path, capsys, argv, match):
    src, _ = model
    (tmp_path / "calib.txt").write_text("some text")
    argv = [str(tmp_path / "calib.txt") if a == "CALIB" else str(tmp_path / "none.txt") if a == "MISSING" else a
            for a in argv]
    out = tmp_path / "q.gguf"
    assert cli_main(["quantize", str(src), str(out), "--type", "Q4_K_M", "--quiet", *argv]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
