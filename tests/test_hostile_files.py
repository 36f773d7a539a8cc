"""Files and arguments from elsewhere: every count a file declares is checked against what the file holds
before a model is built, sizes are bounded, the KV cache is checked against the memory there is, and every
command ends bad input with one `flashlm: error: ...` line and exit status 2.

Before these checks, such input hung (2^31 transformer blocks built before any tensor was looked up, a Python
object per block of a 2^40-block cache) or allocated without bound, so every case that could hang runs in a
child process with a timeout and a 2 GiB limit on its data (a regression fails, rather than filling the
machine's memory). The children are started together when a test first asks for one (each spends a few
seconds importing torch).
"""

import json
import resource
import subprocess
import sys

import pytest
import torch

from flashlm.models import ModelConfig, Transformer
from flashlm.train.export import export_gguf, export_hf
from flashlm.train.tokenizer import train_tokenizer

BIG = 2**31
TIMEOUT = 60  # seconds a child may take; a check takes well under one once torch is imported
CHILD_DATA_BYTES = 2 << 30  # what a child may allocate: torch and a tiny model take a few hundred MiB


def patch_uint32(path, key: str, value: int) -> None:
    """Sets the UINT32 metadata value of `key` in a GGUF file (the key's bytes, its type 4, then the value)."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4, "not a UINT32"
    data[at + 4:at + 8] = value.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small GPT-2 checkpoint, a llama GGUF file and an HF directory, each with hostile variants."""
    root = tmp_path_factory.mktemp("hostile")
    tok = train_tokenizer(["to be or not to be, that is the question " * 30], vocab_size=280)
    torch.manual_seed(0)
    gpt2 = ModelConfig(arch="gpt2", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, seq_len=64)
    good = {"format": "flashlm-checkpoint-1", "model_config": gpt2.to_dict(), "model": Transformer(gpt2).state_dict(),
            "tokenizer": tok.to_str(), "eos_token_id": 0, "step": 3}
    variants = {"good": good, "no_config": {k: v for k, v in good.items() if k != "model_config"},
                "layers": {**good, "model_config": {**gpt2.to_dict(), "n_layer": BIG}},
                "shape": {**good, "model_config": {**gpt2.to_dict(), "d_model": 64}},
                "tokenizer": {**good, "tokenizer": "{ not json"},
                "eos": {**good, "eos_token_id": 99999}}
    paths = {}
    for name, state in variants.items():
        paths[f"ckpt_{name}"] = root / f"{name}.pt"
        torch.save(state, paths[f"ckpt_{name}"])
    llama = ModelConfig(arch="llama", vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                        seq_len=96)
    model = Transformer(llama)
    paths["gguf"] = root / "m.gguf"
    export_gguf(model, llama, tok.to_str(), str(paths["gguf"]), type="Q8_0")
    paths["gguf_layers"] = root / "layers.gguf"
    paths["gguf_layers"].write_bytes(paths["gguf"].read_bytes())
    patch_uint32(paths["gguf_layers"], "llama.block_count", BIG)
    for name, layers in (("hf_layers", BIG), ("hf_three", 3)):
        paths[name] = root / name
        export_hf(model, llama, tok.to_str(), paths[name])
        config = json.loads((paths[name] / "config.json").read_text())
        (paths[name] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    paths["data"] = root / "data.txt"
    paths["data"].write_text("to be or not to be\n\nthat is the question\n")
    paths["bad_gguf"] = root / "bad.gguf"
    paths["bad_gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # absurd counts
    return paths


# Each line of the child's output: the error a load raised (or that it did not).
LOADS = """
import sys
from flashlm.io import load_model
for path in sys.argv[1:]:
    try:
        load_model(path)
        print("loaded", path)
    except ValueError as e:
        print(e)
"""
BLOCKS = """
import time
from flashlm.runtime.block_manager import BlockManager
try:
    BlockManager(2**40, 4)
except ValueError as e:
    print(e)
t = time.perf_counter()
bm = BlockManager(2**31 - 1, 16)
bm.allocate(0, list(range(40)))
table = bm.block_table(0)
bm.free(0)
print(bm.num_free_blocks, table, time.perf_counter() - t < 1.0)
"""

# The cases that could hang: name -> a python child's code and arguments, or a `flashlm` command; the files
# fixture's paths are formatted into the arguments.
CHILDREN = {
    "loads": ("python", LOADS, ["{gguf_layers}", "{ckpt_layers}", "{hf_layers}"]),
    "block manager": ("python", BLOCKS, []),
    "eval 2^31 blocks": ("flashlm", "", ["eval", "{ckpt_layers}", "--data", "{data}"]),
    "generate 2^31 blocks": ("flashlm", "", ["generate", "--model", "{gguf_layers}", "--prompt", "x"]),
    "generate 1000 TiB cache": ("flashlm", "", ["generate", "--model", "{gguf}", "--kv-cache-memory", "1000TiB",
                                                "--prompt", "x"]),
    "export 2^31 blocks": ("flashlm", "", ["export", "{ckpt_layers}", "--gguf", "{ckpt_layers}.gguf"]),
}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (CHILD_DATA_BYTES, CHILD_DATA_BYTES))


@pytest.fixture(scope="module")
def runs(files):
    procs = {}
    paths = {k: str(v) for k, v in files.items()}
    for name, (kind, code, args) in CHILDREN.items():
        args = [a.format(**paths) for a in args]
        argv = [sys.executable, "-c", code, *args] if kind == "python" else [sys.executable, "-m", "flashlm", *args]
        procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       preexec_fn=_limit_memory)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(runs, name) -> subprocess.CompletedProcess:
    proc = runs[name]
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{name}: still running after {TIMEOUT} s (a count from the file was trusted?)\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_error_line(returncode: int, stderr: str, want: str) -> None:
    assert returncode == 2 and "Traceback" not in stderr, (returncode, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if not line.startswith("flashlm: the model has no chat")]
    assert len(lines) == 1 and lines[0].startswith("flashlm: error: ") and want in lines[0], stderr[-3000:]


# ---- counts from files, checked before anything is built --------------------------------------------------


def test_layer_count_beyond_the_file_is_refused(runs):
    out = finish(runs, "loads")
    assert out.returncode == 0, out.stderr[-2000:]
    gguf, ckpt, hf = out.stdout.splitlines()
    assert "metadata: llama.block_count is 2147483648, but the file holds 2 blocks, blk.0 to blk.1" in gguf
    assert "model_config n_layer is 2147483648, but the file holds 2 blocks, blocks.0 to blocks.1" in ckpt
    assert "config.json: num_hidden_layers: must be a positive integer of at most 4096, got 2147483648" in hf


def test_hf_layer_count_is_checked_against_the_weights(files):
    from flashlm.io import load_hf

    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers is 3, but the file holds 2 blocks"):
        load_hf(files["hf_three"])


@pytest.mark.parametrize("variant, match", [
    ("no_config", "no model_config"),
    ("shape", r"tensor 'tok_emb.weight' has shape \(280, 32\), the config implies \(280, 64\)"),
    ("tokenizer", "tokenizer: not a readable tokenizer"),
    ("eos", r"eos_token_id 99999 is outside the vocabulary \[0, 280\)"),
])
def test_bad_checkpoint_names_what_is_wrong(files, variant, match):
    from flashlm.io import load_model

    path = files[f"ckpt_{variant}"]
    with pytest.raises(ValueError, match=f"checkpoint {path}: .*{match}"):
        load_model(path)


# ---- block bookkeeping and the KV cache ------------------------------------------------------------------


def test_block_manager_costs_nothing_per_block_up_front(runs):
    out = finish(runs, "block manager")
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "num_blocks: must be in [1, 2147483647]" in lines[0], lines
    assert lines[1] == f"{2**31 - 1} [0, 1, 2] True", lines


def test_kv_cache_is_checked_against_available_memory():
    from flashlm.ops.device import available_memory
    from flashlm.runtime.model_runner import kv_bytes_per_block, kv_cache_blocks

    model = Transformer(ModelConfig(arch="llama", vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=32))
    available = available_memory("cpu")
    with open("/proc/meminfo") as f:
        mem_available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < available <= mem_available * 1.5  # (memory moves between the two readings)
    per_block = kv_bytes_per_block(model, 16, torch.float32)
    assert kv_cache_blocks(model, 16, torch.float32, 32, 4, 100 * per_block) == 100
    with pytest.raises(ValueError, match=r"kv_cache_memory: .* but cpu has [\d.]+ GiB available"):
        kv_cache_blocks(model, 16, torch.float32, 32, 4, 2 * available + per_block)
    with pytest.raises(ValueError, match="block_size"):
        kv_cache_blocks(model, 0, torch.float32, 32, 4)


# ---- every command: one line, exit status 2 -----------------------------------------------------------------


@pytest.mark.parametrize("name, want", [
    ("eval 2^31 blocks", "model_config n_layer is 2147483648, but the file holds 2 blocks"),
    ("generate 2^31 blocks", "llama.block_count is 2147483648"),
    ("generate 1000 TiB cache", "kv_cache_memory: 1000TiB asks for"),
    ("export 2^31 blocks", "model_config n_layer is 2147483648"),
])
def test_commands_on_hostile_files_end_with_one_line(runs, name, want):
    out = finish(runs, name)
    assert_one_error_line(out.returncode, out.stderr, want)


@pytest.mark.parametrize("args, want", [
    (["eval", "{ckpt_no_config}", "--data", "{data}"], ": no model_config"),
    (["eval", "{ckpt_shape}", "--data", "{data}"], "has shape (280, 32), the config implies (280, 64)"),
    (["eval", "{ckpt_tokenizer}", "--data", "{data}"], "tokenizer: not a readable tokenizer"),
    (["eval", "{ckpt_eos}", "--data", "{data}"], "eos_token_id 99999 is outside the vocabulary [0, 280)"),
    (["eval", "{ckpt_good}", "--data", "{data}", "--device", "cuda:7"], "device: 'cuda:7'"),
    (["eval", "{ckpt_good}", "--data", "{data}.missing"], "No such file"),
    (["chat", "--model", "{bad_gguf}"], "cannot fit"),
    (["generate", "--model", "{ckpt_eos}"], "eos_token_id 99999"),
    (["bench-decode", "--model", "{gguf}", "--reps", "0"], "--reps: must be at least 1"),
    (["bench-decode", "--model", "{gguf}", "--concurrency", "2147483648"], "--concurrency: must be in [1, 65536]"),
    (["bench-decode", "--model", "{gguf}", "--prompt-tokens", "2147483648"],
     "--prompt-tokens: 2147483648 tokens leave no room to generate"),
    (["quantize", "{bad_gguf}", "{bad_gguf}.out", "--type", "Q4_0"], "(at byte 16 of 24)"),
    (["convert", "{gguf}", "{gguf}.out"], "is not an HF model directory"),
    (["export", "{ckpt_shape}", "--hf", "{ckpt_shape}.hf"], "has shape (280, 32)"),
    (["gguf", "inspect", "{bad_gguf}"], "cannot fit"),
    (["demo", "--device", "cuda"], "device: 'cuda'"),
    (["demo", "--cols", "100"], "cols: must be a multiple of 256"),
    (["train", "--preset", "tiny", "--data", "{data}.missing", "--out-dir", "{data}.run"],
     ".missing' is neither a file nor a directory"),
    (["train", "--preset", "tiny", "--device", "cuda:7", "--out-dir", "{data}.run"], "device: 'cuda:7'"),
], ids=["eval-no-config", "eval-shapes", "eval-tokenizer", "eval-eos", "eval-cuda", "eval-no-data", "chat-bad-file",
        "generate-eos", "bench-decode-reps", "bench-decode-concurrency", "bench-decode-prompt-tokens",
        "quantize-bad-file", "convert-a-file", "export-shapes", "inspect-bad-file",
        "demo-cuda", "demo-cols", "train-no-data", "train-cuda"])
def test_commands_end_bad_input_with_one_line(files, capsys, args, want):
    from flashlm import cli

    paths = {k: str(v) for k, v in files.items()}
    code = cli.main([a.format(**paths) for a in args])
    assert_one_error_line(code, capsys.readouterr().err, want)


def test_debug_shows_the_traceback(files):
    from flashlm import cli

    with pytest.raises(ValueError, match="no model_config"):
        cli.main(["--debug", "eval", str(files["ckpt_no_config"]), "--data", str(files["data"])])


def test_error_message_of_a_key_error_has_no_quotes(capsys, monkeypatch):
    from flashlm import cli

    def fail(args):
        raise KeyError("no tensor named 'x'")
    monkeypatch.setattr(cli, "_cmd_info", fail)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "flashlm: error: no tensor named 'x'\n"
