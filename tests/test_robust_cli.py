"""Every `flashlm` command given what a hostile user types: missing and malformed files, sizes past int32,
zero and negative counts, NaN. An error must exit with status 2 and a stderr that starts with
`flashlm: error:`, without a traceback; a valid command exits 0 (each command is also run once valid, so a
failure is the mutation's).

Each command runs in a child forked from the case server (tests/robust.py) as the interpreter runs the
console script: flashlm.cli.main(argv) with stdout and stderr on files, an uncaught exception printed as a
traceback with status 1, SystemExit's code as the status. A few run as real `python -m flashlm` processes too,
to check the entry point itself. Only values argparse accepts are tried: what it refuses, it reports itself.
"""

import os
import subprocess
import sys
import traceback


import robust
import robust_models as rm
from robust import Case

EXIT_ERROR = 2  # the status of a command that refuses its input
PROCESS_TIMEOUT = 30.0  # a real process imports torch first
TRAIN_TIMEOUT = 20.0  # one training step: a tokenizer trained, a model built, a matmul timed, a checkpoint saved


def warm():
    import flashlm.cli  # noqa: F401
    import flashlm.io.gguf_model  # noqa: F401
    import flashlm.runtime.engine  # noqa: F401
    import flashlm.train.evaluate  # noqa: F401
    import flashlm.train.export  # noqa: F401
    import tokenizers  # noqa: F401

    rm.bpe_tokenizer_json()
    rm.checkpoint_state()


def run_cli(argv, stdin: bytes = b""):
    """(status, stdout, stderr) of `flashlm *argv` run in this (forked) process as the interpreter would run it."""
    from flashlm import cli

    folder = robust.scratch()
    paths = [os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")]
    with open(paths[0], "wb") as f:
        f.write(stdin)
    sys.stdout.flush(), sys.stderr.flush()
    for fd, path, mode in ((0, paths[0], os.O_RDONLY), (1, paths[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, paths[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, mode, 0o600), fd)
    sys.stdin = open(0, closefd=False)
    sys.argv = ["flashlm", *argv]
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        status = 1
    sys.stdout.flush(), sys.stderr.flush()
    with open(paths[1], errors="replace") as out, open(paths[2], errors="replace") as err:
        return status, out.read(), err.read()


def run_process(argv):
    """(status, stdout, stderr) of a real `python -m flashlm *argv` process."""
    p = subprocess.run([sys.executable, "-m", "flashlm", *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=PROCESS_TIMEOUT - 5)
    return p.returncode, p.stdout, p.stderr


def refused(outcome):
    """A judge: the command exited with EXIT_ERROR, no traceback, and its error as a `flashlm: error:` line
    after any notes and progress it printed before it (the last line of stderr)."""
    if isinstance(outcome, BaseException):
        return f"harness error: {type(outcome).__name__}: {robust.short(outcome)}"
    status, _, err = outcome
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    problems = []
    if status != EXIT_ERROR:
        problems.append(f"exit status {status} (expected {EXIT_ERROR})")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    if not lines or not lines[-1].startswith("flashlm: error:"):
        problems.append("stderr does not end with a 'flashlm: error:' line")
    if problems:
        return f"{', '.join(problems)}; stderr: {robust.short(err[-700:], 700) or '(empty)'}"
    return None


def succeeded(outcome):
    """A judge: the command exited 0 without a traceback."""
    if isinstance(outcome, BaseException):
        return f"harness error: {type(outcome).__name__}: {robust.short(outcome)}"
    status, _, err = outcome
    if status != 0 or "Traceback" in err:
        return f"exit status {status} on a valid command; stderr: {robust.short(err[-700:], 700)}"
    return None


def succeeded_or_refused(outcome):
    """A judge for a value a command may honour or refuse."""
    return succeeded(outcome) and refused(outcome)


def command(name, what, argv_fn, judge=refused, stdin=b"", real=False, timeout=None):
    """A case running `flashlm` with the arguments argv_fn() returns (built in the child, so files it writes
    land in the case's scratch folder)."""
    def call():
        argv = [str(a) for a in argv_fn()]
        return run_process(argv) if real else run_cli(argv, stdin)
    return Case(f"flashlm {name}", what, call, (), "either", judge=judge,
                timeout=timeout or (PROCESS_TIMEOUT if real else robust.TIMEOUT))


# -- the files the commands are given --------------------------------------------------------------------------

def write(data, name):
    path = os.path.join(robust.scratch(), name)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def model_file(**kw):
    return write(rm.gguf_model(**kw), "model.gguf")


def garbage():
    return write(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "bad.gguf")


def missing():
    return os.path.join(robust.scratch(), "missing.gguf")


def hf_folder(**kw):
    return rm.hf_dir(os.path.join(robust.scratch(), "hf"), **kw)


def ckpt(edit=None):
    return rm.checkpoint(os.path.join(robust.scratch(), "ckpt.pt"), edit)


def text_file(text=rm.TEXT):
    return write(text, "data.txt")


def out(name):
    return os.path.join(robust.scratch(), name)


BLOCK_COUNT_2_31 = {"llama.block_count": (rm.gb.UINT32, 1 << 31)}


# -- the commands ----------------------------------------------------------------------------------------------

def gguf_commands():
    inspect = "gguf inspect"
    return [
        command("info", "a valid call (--json)", lambda: ["info", "--json"], succeeded),
        command(inspect, "a valid file", lambda: ["gguf", "inspect", model_file()], succeeded),
        command(inspect, "a missing file", lambda: ["gguf", "inspect", missing()]),
        command(inspect, "a directory", lambda: ["gguf", "inspect", robust.scratch()]),
        command(inspect, "absurd counts", lambda: ["gguf", "inspect", garbage()]),
        command(inspect, "absurd counts (a real process)", lambda: ["gguf", "inspect", garbage()], real=True),
        command(inspect, "--max-items -1", lambda: ["gguf", "inspect", model_file(), "--max-items", -1]),
        command(inspect, "--max-items 2**63", lambda: ["gguf", "inspect", model_file(), "--max-items", 1 << 63],
                succeeded_or_refused),
        command("quantize", "a valid GGUF file to Q8_0", lambda: ["quantize", model_file(), out("q.gguf"), "--type",
                                                                   "Q8_0", "--quiet"], succeeded),
        command("quantize", "a missing input", lambda: ["quantize", missing(), out("q.gguf"), "--type", "Q8_0"]),
        command("quantize", "--keep-float of an unknown name", lambda: [
            "quantize", model_file(), out("q.gguf"), "--type", "Q8_0", "--keep-float", "blk.99999999999999999999"]),
        command("quantize", "--sensitivity with a malformed input", lambda: [
            "quantize", garbage(), out("q.gguf"), "--type", "Q4_0", "--sensitivity", "--calib-data", garbage()]),
        command("quantize", "a malformed input", lambda: ["quantize", garbage(), out("q.gguf"), "--type", "Q8_0"]),
        command("quantize", "an output in a missing folder", lambda: [
            "quantize", model_file(), os.path.join(missing(), "q.gguf"), "--type", "Q8_0", "--quiet"]),
        command("quantize", "the output is the input", lambda: (lambda p: ["quantize", p, p, "--type", "Q8_0", "--quiet"])(
            model_file())),
        command("quantize", "an HF folder whose num_hidden_layers is 2**31", lambda: [
            "quantize", hf_folder(config={"num_hidden_layers": 1 << 31}), out("q.gguf"), "--type", "Q8_0", "--quiet"]),
        command("convert", "a valid HF folder", lambda: ["convert", hf_folder(), out("c.gguf"), "--quiet"], succeeded),
        command("convert", "a file, not a folder", lambda: ["convert", model_file(), out("c.gguf")]),
        command("convert", "a folder without config.json", lambda: ["convert", robust.scratch(), out("c.gguf")]),
        command("convert", "num_attention_heads = 0", lambda: [
            "convert", hf_folder(config={"num_attention_heads": 0}), out("c.gguf"), "--quiet"]),
        command("convert", "a weight missing", lambda: [
            "convert", hf_folder(drop=("model.norm.weight",)), out("c.gguf"), "--quiet"]),
    ]


def export_commands():
    return [
        command("export", "a valid checkpoint to GGUF", lambda: ["export", ckpt(), "--gguf", out("e.gguf"), "--quiet"],
                succeeded),
        command("export", "neither --gguf nor --hf", lambda: ["export", ckpt()]),
        command("export", "a missing checkpoint", lambda: ["export", missing(), "--gguf", out("e.gguf")]),
        command("export", "a malformed checkpoint", lambda: ["export", write(b"PK\x03\x04 not a zip", "c.pt"),
                                                             "--gguf", out("e.gguf")]),
        command("export", "n_layer = 2**31", lambda: ["export", ckpt(lambda s: s["model_config"].update(n_layer=1 << 31)),
                                                      "--gguf", out("e.gguf"), "--quiet"]),
        command("export", "--gguf in a missing folder", lambda: ["export", ckpt(), "--gguf",
                                                                 os.path.join(missing(), "e.gguf"), "--quiet"]),
    ]


def runtime_commands():
    gen = "generate"
    base = lambda: ["generate", "--model", model_file(), "--prompt", "t", "--max-tokens", 2]  # noqa: E731
    cases = [
        command(gen, "a valid call", lambda: base() + ["--temperature", 0], succeeded),
        command(gen, "a valid call (a real process)", lambda: base() + ["--temperature", 0], succeeded, real=True),
        command(gen, "--model missing", lambda: ["generate", "--model", missing(), "--prompt", "t"]),
        command(gen, "--model missing (a real process)", lambda: ["generate", "--model", missing(), "--prompt", "t"],
                real=True),
        command(gen, "--model malformed", lambda: ["generate", "--model", garbage(), "--prompt", "t"]),
        command(gen, "--model whose block_count is 2**31", lambda: [
            "generate", "--model", model_file(meta=BLOCK_COUNT_2_31), "--prompt", "t"]),
        command(gen, "--model an HF folder whose num_hidden_layers is 2**31", lambda: [
            "generate", "--model", hf_folder(config={"num_hidden_layers": 1 << 31}), "--prompt", "t"]),
        command(gen, "--model a checkpoint whose n_layer is 2**31", lambda: [
            "generate", "--model", ckpt(lambda s: s["model_config"].update(n_layer=1 << 31)), "--prompt", "t"]),
        command(gen, "--draft-model missing", lambda: base() + ["--draft-model", missing()]),
        command(gen, "--max-model-len 2**31", lambda: base() + ["--max-model-len", 1 << 31], succeeded_or_refused),
        command(gen, "--max-tokens 2**63 (the context bounds it)", lambda: base() + ["--max-tokens", 1 << 63,
                                                                                    "--ignore-eos"], succeeded_or_refused),
    ]
    for flag, value in (("--max-tokens", 0), ("--max-tokens", -1), ("--temperature", "nan"),
                        ("--temperature", -1), ("--top-p", 2), ("--top-p", "nan"), ("--top-k", -5),
                        ("--min-p", "nan"), ("--repetition-penalty", 0), ("--seed", 1 << 64), ("--max-model-len", 0),
                        ("--max-model-len", -1), ("--kv-cache-memory", "abc"), ("--kv-cache-memory", "1e30GiB"),
                        ("--kv-cache-memory", "0"), ("--kv-cache-memory", "1KiB"), ("--num-speculative-tokens", -1)):
        def argv(flag=flag, value=value):
            extra = ["--draft-model", model_file()] if flag == "--num-speculative-tokens" else []
            return base() + [flag, value] + extra
        cases.append(command(gen, f"{flag} {value}", argv))
    chat = lambda: ["chat", "--model", model_file(), "--max-tokens", 2]  # noqa: E731
    cases += [
        command("chat", "a valid call", lambda: chat() + ["--temperature", 0], succeeded, stdin=b"hi\n\n"),
        command("chat", "--model missing", lambda: ["chat", "--model", missing()], stdin=b"hi\n"),
        command("chat", "--max-tokens 0", lambda: chat() + ["--max-tokens", 0], stdin=b"hi\n"),
        command("chat", "a line of invalid UTF-8", chat, stdin=b"\xff\xfe\n\n"),
    ]
    bench = lambda: ["bench-decode", "--model", model_file(), "--prompt-tokens", 4, "--gen-tokens", 2,  # noqa: E731
                     "--concurrency", 2, "--reps", 1]
    cases.append(command("bench-decode", "a valid call", bench, succeeded))
    for flag, value in (("--prompt-tokens", 0), ("--prompt-tokens", -1), ("--prompt-tokens", 1 << 31),
                        ("--gen-tokens", 0), ("--gen-tokens", -1), ("--concurrency", 0), ("--concurrency", -1),
                        ("--concurrency", 1 << 31), ("--reps", 0), ("--reps", -1)):
        cases.append(command("bench-decode", f"{flag} {value}", lambda flag=flag, value=value: bench() + [flag, value]))
    return cases


def other_commands():
    demo = lambda: ["demo", "--rows", 4, "--cols", 256]  # noqa: E731
    cases = [command("demo", "a valid call (4 x 256)", demo, succeeded)]
    for flag, value in (("--rows", 0), ("--rows", -1), ("--rows", 1 << 31), ("--cols", 100), ("--cols", 0),
                        ("--cols", 1 << 40), ("--device", "cuda"), ("--device", "tpu")):
        cases.append(command("demo", f"{flag} {value}", lambda flag=flag, value=value: demo() + [flag, value]))
    # One step of the tiny preset on a dozen paragraphs, its data cache and run folder in the case's folder.
    text = "\n\n".join(f"part {i}: {rm.TEXT}" for i in range(12))
    train = lambda: ["train", "--data", text_file(text), "--out-dir", out("run"), "--data-cache", out("cache"),  # noqa: E731
                     "--max-steps", 1, "--no-progress", "--preset", "tiny", "--batch-size", 1, "--sample-tokens", 4,
                     "--vocab-size", 300]
    cases.append(command("train", "a valid call (one step)", train, succeeded, timeout=TRAIN_TIMEOUT))
    for flag, value in (("--max-steps", -1), ("--batch-size", 0), ("--lr", "nan"), ("--n-layer", 1 << 31),
                        ("--seq-len", 1 << 31), ("--vocab-size", 0), ("--d-model", 1 << 40), ("--grad-accum", 0),
                        ("--zero-stage", 7), ("--eval-interval", 0), ("--keep-checkpoints", -1), ("--device", "tpu"),
                        ("--data", "/nonexistent/data.txt"), ("--config", "/nonexistent/c.toml"),
                        ("--time-limit", "nan"), ("--warmup", -1), ("--val-fraction", 2)):
        cases.append(command("train", f"{flag} {value}", lambda flag=flag, value=value: train() + [flag, value],
                             timeout=TRAIN_TIMEOUT))
    cases += [
        command("train", "--config not TOML", lambda: train() + ["--config", write("[[[ not toml", "c.toml")],
                timeout=TRAIN_TIMEOUT),
        command("train", "--config with an unknown key", lambda: train() + ["--config", write("n_layerz = 2\n", "c.toml")],
                timeout=TRAIN_TIMEOUT),
        command("train", "--resume with no checkpoint", lambda: train() + ["--resume"], succeeded_or_refused,
                timeout=TRAIN_TIMEOUT),
        command("train", "--out-dir a file", lambda: train() + ["--out-dir", write("x", "file.txt")],
                timeout=TRAIN_TIMEOUT),
    ]
    evaluate = lambda: ["eval", ckpt(), "--data", text_file()]  # noqa: E731
    cases.append(command("eval", "a valid call", evaluate, succeeded))
    for what, argv in (("a missing checkpoint", lambda: ["eval", missing(), "--data", text_file()]),
                       ("--data missing", lambda: ["eval", ckpt(), "--data", missing()]),
                       ("--data empty", lambda: ["eval", ckpt(), "--data", write("", "empty.txt")]),
                       ("--batch-size 0", lambda: evaluate() + ["--batch-size", 0]),
                       ("--batch-size -1", lambda: evaluate() + ["--batch-size", -1]),
                       ("--device cuda", lambda: evaluate() + ["--device", "cuda"]),
                       ("--device tpu", lambda: evaluate() + ["--device", "tpu"]),
                       ("a checkpoint whose eos_token_id is out of the vocabulary",
                        lambda: ["eval", ckpt(lambda s: s.update(eos_token_id=1 << 40)), "--data", text_file()])):
        cases.append(command("eval", what, argv))
    cases.append(command("eval", "--data invalid UTF-8", lambda: ["eval", ckpt(), "--data", write(
        b"\xff\xfe\xfd" * 10, "b.txt")], succeeded_or_refused))
    cases.append(command("eval", "--batch-size 2**31", lambda: evaluate() + ["--batch-size", 1 << 31],
                         succeeded_or_refused))
    ppl = lambda: ["eval", model_file(), "--perplexity", text_file(rm.TEXT * 8), "--ctx-size", 8, "--quiet"]  # noqa: E731
    cases.append(command("eval", "--perplexity, a valid call", ppl, succeeded))
    for what, argv in (("--perplexity missing", lambda: ["eval", model_file(), "--perplexity", missing()]),
                       ("--perplexity empty", lambda: ["eval", model_file(), "--perplexity", write("", "e.txt")]),
                       ("--perplexity invalid UTF-8", lambda: ["eval", model_file(), "--perplexity",
                                                               write(b"\xff\xfe" * 10, "b.txt")]),
                       ("--perplexity of a garbage model", lambda: ["eval", garbage(), "--perplexity", text_file()]),
                       ("--ctx-size 2**31", lambda: ppl() + ["--ctx-size", 1 << 31]),
                       ("--ctx-size -1", lambda: ppl() + ["--ctx-size", -1]),
                       ("--stride 2**40", lambda: ppl() + ["--method", "stride", "--stride", 1 << 40]),
                       ("--max-num-seqs 0", lambda: ppl() + ["--max-num-seqs", 0]),
                       ("neither --perplexity nor --data", lambda: ["eval", model_file()])):
        cases.append(command("eval", what, argv))
    cases.append(command("eval", "--max-num-seqs 2**31", lambda: ppl() + ["--max-num-seqs", 1 << 31],
                         succeeded_or_refused))
    return cases


def legacy_imatrix(name=b"blk.0.attn_q.weight", n_entries=1, nval=32):
    """A legacy imatrix file: n_entries claimed, one entry named `name` that claims nval values (holding at most
    64 of them, ones)."""
    import struct

    entry = struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, nval) + b"\0\0\x80\x3f" * min(nval, 64)
    return write(struct.pack("<i", n_entries) + entry, "i.dat")


def imatrix_commands():
    name = "imatrix"

    def collect(*more):
        return lambda: [name, model_file(), "--calib-data", text_file(), "-o", out("i.gguf"), "--chunk-size", 16,
                        "--quiet", *more]

    def quantize_with(imatrix_fn):
        return lambda: ["quantize", model_file(), out("q.gguf"), "--type", "Q4_0", "--imatrix", imatrix_fn(), "--quiet"]

    cases = [command(name, "a valid call", collect(), succeeded),
             command("quantize", "--imatrix, a valid call", quantize_with(legacy_imatrix), succeeded)]
    for what, argv in (("a missing model", lambda: [name, missing(), "--calib-data", text_file(), "-o", out("i.dat")]),
                       ("a malformed model", lambda: [name, garbage(), "--calib-data", text_file(), "-o", out("i.dat")]),
                       ("--calib-data missing", lambda: [name, model_file(), "--calib-data", missing(), "-o", out("i")]),
                       ("--calib-data empty", lambda: [name, model_file(), "--calib-data", write("", "e.txt"), "-o",
                                                       out("i.gguf")]),
                       ("--calib-data invalid UTF-8", lambda: [name, model_file(), "--calib-data",
                                                               write(b"\xff\xfe" * 10, "b.txt"), "-o", out("i.gguf")]),
                       ("--chunk-size 0", collect("--chunk-size", 0)),
                       ("--chunk-size -1", collect("--chunk-size", -1)),
                       ("--chunk-size 2**31", collect("--chunk-size", 1 << 31)),
                       ("-o in a missing folder", lambda: [name, model_file(), "--calib-data", text_file(), "-o",
                                                           os.path.join(missing(), "i.gguf"), "--chunk-size", 16])):
        cases.append(command(name, what, argv))
    for what, imatrix_fn in (("a missing file", missing), ("a malformed GGUF", garbage),
                             ("2**31 - 1 entries", lambda: legacy_imatrix(n_entries=(1 << 31) - 1)),
                             ("a value count of 2**31 - 1", lambda: legacy_imatrix(nval=(1 << 31) - 1)),
                             ("an entry the model lacks", lambda: legacy_imatrix(name=b"blk.7.attn_q.weight")),
                             ("an entry of another width", lambda: legacy_imatrix(nval=64))):
        cases.append(command("quantize", f"--imatrix: {what}", quantize_with(imatrix_fn)))
    return cases


CASES = gguf_commands() + export_commands() + runtime_commands() + other_commands() + imatrix_commands()
verdicts, test_hostile_case = robust.tests_of(CASES)
