"""`flashlm prune`, `quantize --method` (calibrated) and `imatrix` given what a hostile user types: missing,
empty, undecodable and too-short calibration text, malformed models, fractions and counts out of range (zero,
negative, NaN, infinite, past int32). An error must exit with status 2 and a stderr that ends with a `flashlm:
error:` line, without a traceback; each command is also run once valid, so a failure is the mutation's. Commands
run in a forked child as tests/test_robust_cli.py runs them (its helpers), on the tiny llama of
tests/robust_models.py. The training commands' cases are in tests/test_robust_cli_train.py.
"""

import os

import robust
import robust_models as rm
from test_robust_cli import (command, garbage, missing, model_file, out, succeeded, succeeded_or_refused, text_file,
                             write)


def warm():
    import flashlm.cli  # noqa: F401
    import flashlm.io.gguf_model  # noqa: F401
    import flashlm.io.quantize_calibrated  # noqa: F401
    import flashlm.train.prune  # noqa: F401
    import tokenizers  # noqa: F401

    rm.bpe_tokenizer_json()


# -- prune and calibrated quantize ------------------------------------------------------------------------------

def prune(*more, model=None):
    return ["prune", model or model_file(), "--out", out("p.gguf"), "--heads-keep", 0.5, *more]


def prune_cases():
    name = "prune"
    calib = lambda: ["--score", "activation", "--calib-data", text_file(), "--calib-samples", 2,  # noqa: E731
                     "--calib-seq-len", 16]
    cases = [command(name, "a valid call", prune, succeeded),
             command(name, "a valid call (activation scores)", lambda: prune(*calib()), succeeded),
             command(name, "--calib-data shorter than one window", lambda: prune(*calib()[:2], "--calib-data",
                                                                                 text_file("the fox")),
                     succeeded_or_refused)]
    for what, argv in (("--model missing", lambda: prune(model=missing())),
                       ("--model malformed", lambda: prune(model=garbage())),
                       ("--out in a missing folder", lambda: ["prune", model_file(), "--out",
                                                              os.path.join(missing(), "p.gguf"), "--heads-keep", 0.5]),
                       ("--score activation without --calib-data", lambda: prune("--score", "activation")),
                       ("--calib-data empty", lambda: prune(*calib()[:2], "--calib-data", write("", "e.txt"))),
                       ("--calib-data one character", lambda: prune(*calib()[:2], "--calib-data", write("a", "a.txt"))),
                       ("--calib-data missing", lambda: prune(*calib()[:2], "--calib-data", missing()))):
        cases.append(command(name, what, argv))
    # undecodable bytes are read as U+FFFD
    cases.append(command(name, "--calib-data invalid UTF-8", lambda: prune(*calib()[:2], "--calib-data", write(
        b"\xff\xfe" * 40, "b.txt")), succeeded_or_refused))
    for flag, value in (("--heads-keep", 0), ("--heads-keep", -1), ("--heads-keep", "nan"), ("--heads-keep", 2),
                        ("--ffn-keep", 0), ("--ffn-keep", "inf"), ("--drop-layers", "0,1"), ("--drop-layers", "5"),
                        ("--drop-layers", "-1"), ("--drop-layers", "x"), ("--drop-layers", "0,0"),
                        ("--calib-samples", 0), ("--calib-seq-len", -1)):
        more = (lambda: calib()) if flag.startswith("--calib") else (lambda: [])
        cases.append(command(name, f"{flag} {value}", lambda flag=flag, value=value, more=more: prune(
            *more(), flag, value)))
    return cases


def quantize_cases():
    name = "quantize --method"

    def gptq(*more, data=None):
        return lambda: ["quantize", model_file(), out("q"), "--method", "gptq", "--group-size", 32, "--calib-data",
                        data() if data else text_file(), "--calib-rows", 2, "--calib-seq", 16, "--quiet", *more]
    cases = [command(name, "gptq, a valid call", gptq(), succeeded),
             command(name, "gptq, --calib-seq 2**31 (cut to the context)", gptq("--calib-seq", 1 << 31),
                     succeeded_or_refused)]
    for what, argv in (("gptq without --calib-data", lambda: ["quantize", model_file(), out("q"), "--method", "gptq"]),
                       ("gptq, --calib-data empty", gptq(data=lambda: write("", "e.txt"))),
                       ("gptq, --calib-data one character", gptq(data=lambda: write("a", "a.txt"))),
                       ("gptq, --calib-data missing", gptq(data=missing)),
                       ("gptq, --calib-data invalid UTF-8", gptq(data=lambda: write(b"\xff\xfe" * 3, "b.txt"))),
                       ("gptq, --calib-rows 0", gptq("--calib-rows", 0)),
                       ("gptq, --calib-seq -1", gptq("--calib-seq", -1)),
                       ("smoothquant, --alpha nan", lambda: gptq()()[:5] + ["smoothquant", "--calib-data", text_file(),
                                                                            "--alpha", "nan"]),
                       ("gptq of a malformed model", lambda: ["quantize", garbage(), out("q"), "--method", "gptq",
                                                              "--calib-data", text_file()])):
        cases.append(command(name, what, argv))
    def imatrix(*more, text=None):
        return ["imatrix", model_file(), "--calib-data", text or text_file(), "-o", out("i.gguf"), "--chunk-size", 16,
                "--quiet", *more]

    cases += [command("imatrix", "--calib-data shorter than two chunks", lambda: imatrix(text=text_file("the fox"))),
              command("imatrix", "--calib-data one character", lambda: imatrix(text=write("a", "a.txt"))),
              command("imatrix", "--chunk-size past the model's context", lambda: imatrix("--chunk-size", 4096))]
    return cases


def lora_cases():
    """`generate --lora` with the adapters of tests/test_robust_adapters.py."""
    import math

    import gguf_bytes as gb
    from test_robust_adapters import gguf_adapter, peft_dir, prompt_dir

    def generate(adapter_fn):
        return lambda: ["generate", "--model", model_file(), "--prompt", "t", "--max-tokens", 2, "--temperature", 0,
                        "--lora", adapter_fn()]
    gguf = lambda **kw: lambda: write(gguf_adapter(**kw), "a.gguf")  # noqa: E731
    cases = [command("generate --lora", "a valid GGUF adapter", generate(gguf()), succeeded),
             command("generate --lora", "a valid PEFT folder", generate(peft_dir), succeeded),
             command("generate --lora", "a valid prompt-tuning folder", generate(prompt_dir), succeeded)]
    for what, adapter_fn in (("a missing path", missing), ("a model file", model_file), ("a malformed GGUF", garbage),
                             ("a GGUF adapter whose alpha is NaN", gguf(meta={"adapter.lora.alpha": (gb.FLOAT32, math.nan)})),
                             ("a GGUF adapter for qwen2", gguf(meta={"general.architecture": (gb.STRING, "qwen2")})),
                             ("a PEFT folder whose r is not its tensors'", lambda: peft_dir({"r": 8})),
                             ("a folder without adapter_config.json", robust.scratch),
                             ("a prompt-tuning folder of the whole context", lambda: prompt_dir(
                                 config={"num_virtual_tokens": rm.CONTEXT}))):
        cases.append(command("generate --lora", what, generate(adapter_fn)))
    return cases


CASES = prune_cases() + quantize_cases() + lora_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
