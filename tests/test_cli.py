"""The `flashlm` command line: `info`, `gguf inspect` (text and JSON) and its errors.

Exit codes, stdout and stderr are checked through `python -m flashlm` in subprocesses, all started at once
(each spends a second or two importing torch); the details of the output in-process through
flashlm.cli.main.
"""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

import flashlm
import gguf_bytes as gb
from flashlm import cli
from flashlm.gguf import GGUFFile


def start_flashlm(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flashlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def reject(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tïny ✓")
    w.add_bool("flag", True)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20)])
    w.add_key_value("scores", [1.5, float("nan"), float("-inf")], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_float64("inf", float("inf"))
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_bad") / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # absurd tensor and metadata counts
    return path


@pytest.fixture(scope="module")
def runs(model, bad_file, tmp_path_factory):
    """The subprocess runs of this file, started together the first time a test asks for one."""
    big = tmp_path_factory.mktemp("cli_big") / "big.gguf"  # its listing is much larger than a pipe's buffer
    big.write_bytes(gb.gguf([gb.kv(f"key.{i:05d}", gb.STRING, "x" * 60) for i in range(3000)]))
    procs = {
        "info --json": start_flashlm("info", "--json"),
        "inspect --json": start_flashlm("gguf", "inspect", model, "--json"),
        "inspect bad": start_flashlm("gguf", "inspect", bad_file),
        "inspect big": start_flashlm("gguf", "inspect", big),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["version", flashlm.__version__]
    for key in ("compiler", "cpu_isa", "threads", "cuda_status"):
        assert key in out


def test_info_json(runs):
    out = finish(runs["info --json"])
    assert out.returncode == 0, out.stderr
    info = strict_json(out.stdout)
    assert info["version"] == flashlm.__version__ and info["threads"] >= 1 and isinstance(info["cpu_features"], list)


def test_inspect_json_matches_the_reader(model, runs):
    out = finish(runs["inspect --json"])
    assert out.returncode == 0, out.stderr
    doc = strict_json(out.stdout)
    with GGUFFile(model) as f:
        assert (doc["version"], doc["alignment"], doc["data_offset"]) == (f.version, f.alignment, f.data_offset)
        assert list(doc["metadata"]) == list(f.metadata)
        for key, value in f.metadata.items():
            assert doc["metadata"][key]["type"] == f.metadata_types[key]
            if key not in ("scores", "inf"):
                assert doc["metadata"][key]["value"] == value, key
        assert doc["tensors"] == [{"name": t.name, "type": t.ggml_type, "shape": list(t.shape), "offset": t.offset,
                                   "nbytes": t.nbytes} for t in f.tensors]
    # Non-finite floats become strings, so that any JSON parser reads the output.
    assert doc["metadata"]["scores"]["value"] == [1.5, "NaN", "-Infinity"]
    assert doc["metadata"]["inf"]["value"] == "Infinity"
    assert doc["metadata"]["general.name"]["value"] == "tïny ✓"


def test_inspect_text(model, capsys):
    assert cli.main(["gguf", "inspect", str(model), "--max-items", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{model}: GGUF v3, 8 metadata keys, 2 tensors, alignment 32")
    for key in ("general.architecture", "llama.block_count", "general.name", "tokenizer.ggml.tokens", "scores"):
        assert key in out
    assert '"tïny ✓"' in out and "ARRAY[STRING]" in out
    assert '["tok0", "tok1", "tok2", ... (20 items)]' in out
    assert "[1.5, nan, -inf]" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("name"))
    for name, shape in [("token_embd.weight", "[4, 8]"), ("blk.0.attn_q.weight", "[2, 32]")]:
        line = next(line for line in lines if line.strip().startswith(name))
        assert shape in line
        # Columns line up with the header.
        assert line.index(" F32 " if "embd" in name else " Q8_0 ") == header.index(" type ")


def test_inspect_max_items(model, capsys):
    assert cli.main(["gguf", "inspect", str(model), "--max-items", "0"]) == 0
    assert "[... (20 items)]" in capsys.readouterr().out
    assert cli.main(["gguf", "inspect", str(model), "--max-items", "-1"]) == 2
    assert capsys.readouterr().err == "flashlm: error: --max-items: must be >= 0, got -1\n"


def test_inspect_text_short_names_align(tmp_path, capsys):
    path = tmp_path / "short.gguf"
    path.write_bytes(gb.with_tensors([("a", (4,), gb.F32)]))
    assert cli.main(["gguf", "inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].index("type") == lines[-1].index("F32")


def test_inspect_escapes_control_characters(tmp_path, capsys):
    # Names and strings from the file must not reach the terminal as escape sequences or line breaks.
    path = tmp_path / "ctl.gguf"
    path.write_bytes(gb.with_tensors([("w\x1b[2J", (4,), gb.F32)],
                                     [gb.kv("k\ney", gb.STRING, "v\x1b]0;title\x07\x9b"), gb.kv("z", gb.UINT8, 1)]))
    assert cli.main(["gguf", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "k\\ney" in out and "w\\x1b[2J" in out
    assert cli.main(["gguf", "inspect", str(path), "--json"]) == 0
    doc = strict_json(capsys.readouterr().out)
    assert doc["metadata"]["k\ney"]["value"] == "v\x1b]0;title\x07\x9b"


def test_malformed_file_is_a_one_line_error(runs, bad_file):
    out = finish(runs["inspect bad"])
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"flashlm: error: {bad_file}: ") and "cannot fit" in lines[0], out.stderr


@pytest.mark.parametrize("data,match", [
    (b"not a gguf file at all", "not a GGUF file"), (b"", "too small"),
    (gb.gguf([gb.kv("a\nb", gb.UINT8, 1)] * 2), "duplicate metadata key 'a\\x0ab'"),
], ids=["bad-magic", "empty", "duplicate-key"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_malformed_file_in_process(tmp_path, capsys, data, match, json_flag):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    assert cli.main(["gguf", "inspect", str(path)] + json_flag) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"flashlm: error: {path}: ") and captured.err.count("\n") == 1
    assert match in captured.err


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_unreadable_path_is_an_error(tmp_path, capsys, which):
    path = tmp_path / "missing.gguf" if which == "missing" else tmp_path
    assert cli.main(["gguf", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error: ") and err.count("\n") == 1 and str(path) in err


def test_closed_pipe_is_not_an_error(runs):
    # `flashlm gguf inspect big.gguf | head -1`: the reader goes away after the first line.
    proc = runs["inspect big"]
    assert "GGUF v3" in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err
