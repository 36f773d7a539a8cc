"""The training commands given what a hostile user types: `flashlm finetune`, `distill` and `export` of a
fine-tuning run, with malformed files (JSONL, teacher logits, checkpoints) and arguments out of range (zero,
negative, past int32, NaN, infinite). An error must exit with status 2 and a stderr that ends with a `flashlm:
error:` line, without a traceback; each command is also run once valid, so a failure is the mutation's. Commands
run in a forked child as tests/test_robust_cli.py runs them (its helpers); a training command takes one step of the tiny llama of tests/robust_models.py.
tests/test_robust_cli_tools.py holds prune's, calibrated quantize's and imatrix's cases.
"""

import json
import os

import robust
import robust_models as rm
from test_robust_cli import (TRAIN_TIMEOUT, command, garbage, missing, model_file, out, run_cli, succeeded,
                             succeeded_or_refused, text_file, write)

# a case that makes a run or a teacher-logits file first runs two commands
TWO_COMMANDS_TIMEOUT = 2 * TRAIN_TIMEOUT
TEXT = "\n\n".join(f"part {i}: {rm.TEXT}" for i in range(4))


def warm():
    import flashlm.cli  # noqa: F401
    import flashlm.io.gguf_model  # noqa: F401
    import flashlm.train.distill  # noqa: F401
    import flashlm.train.finetune  # noqa: F401
    import tokenizers  # noqa: F401

    rm.bpe_tokenizer_json()


def chat_jsonl(n=6) -> str:
    records = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
               for i in range(n)]
    return write("".join(json.dumps(r) + "\n" for r in records), "train.jsonl")


# -- finetune ---------------------------------------------------------------------------------------------------

def finetune(*more, model=None, data=None, run=None):
    return ["finetune", "--model", model or model_file(), "--data", data or chat_jsonl(), "--max-steps", 1,
            "--batch-size", 2, "--seq-len", 64, "--out-dir", run or out("run"), "--no-progress", *more]


def finetune_cases():
    name = "finetune"
    cases = [command(name, "a valid call (LoRA, one step)", finetune, succeeded, timeout=TRAIN_TIMEOUT)]
    files = (("--model missing", lambda: finetune(model=missing())),
             ("--model malformed", lambda: finetune(model=garbage())),
             ("--data missing", lambda: finetune(data=missing())),
             ("--data empty", lambda: finetune(data=write("", "e.jsonl"))),
             ("--data not JSON", lambda: finetune(data=write("{messages\n", "b.jsonl"))),
             ("--data with a role robot", lambda: finetune(data=write(json.dumps({"messages": [
                 {"role": "robot", "content": "x"}]}) + "\n", "r.jsonl"))),
             ("--data invalid UTF-8", lambda: finetune(data=write(b"\xff\xfe\n", "u.jsonl"))),
             ("--data a folder", lambda: finetune(data=robust.scratch())),
             ("--val-data empty", lambda: finetune("--val-data", write("", "v.jsonl"))),
             ("--out-dir a file", lambda: finetune(run=write("x", "f.txt"))))
    for what, argv in files:
        cases.append(command(name, what, argv, timeout=TRAIN_TIMEOUT))
    for flag, value in (("--lora-r", 0), ("--lora-r", -1), ("--lora-r", 1 << 31), ("--lora-alpha", "nan"),
                        ("--lora-alpha", "inf"), ("--lora-alpha", 0), ("--lora-dropout", 1), ("--lora-dropout", "nan"),
                        ("--target", "qq"), ("--target", ""), ("--seq-len", 1),
                        ("--batch-size", 0), ("--grad-accum", 0), ("--max-steps", -1), ("--lr", "nan"), ("--lr", "inf"),
                        ("--warmup", -1), ("--eval-interval", 0), ("--device", "tpu"), ("--qat-group-size", 0)):
        cases.append(command(name, f"{flag} {value}", lambda flag=flag, value=value: finetune(flag, value),
                             timeout=TRAIN_TIMEOUT))
    # the window is cut to the model's context
    cases.append(command(name, "--seq-len 2**31", lambda: finetune("--seq-len", 1 << 31), succeeded_or_refused,
                         timeout=TRAIN_TIMEOUT))
    for method, flag, value in (("prompt", "--num-virtual-tokens", 0), ("prompt", "--num-virtual-tokens", 1 << 31),
                                ("prefix", "--num-virtual-tokens", -1), ("full", "--qat", "int3"),
                                ("lora", "--qat", "int4")):
        cases.append(command(name, f"--method {method} {flag} {value}", lambda m=method, f=flag, v=value: finetune(
            "--method", m, f, v), timeout=TRAIN_TIMEOUT))
    return cases


# -- export of a fine-tuning run ----------------------------------------------------------------------------------

def finetune_run(edit=None) -> str:
    """A LoRA run folder of one step (made by the command in this child), its checkpoint edited by edit(state)."""
    import torch

    run = out("run")
    status, _, err = run_cli([str(a) for a in finetune(run=run)])
    if status != 0:
        raise robust.HarnessError(f"finetune failed: {err[-500:]}")
    if edit is not None:
        path = os.path.join(run, "ckpt-00000001.pt")
        state = torch.load(path, weights_only=False)
        edit(state)
        torch.save(state, path)
    return run


def export_cases():
    name = "export"
    gone = lambda s: s["finetune"].update(model=missing())  # noqa: E731
    wide = lambda s: s["adapter"].update({k: v[:, :1] for k, v in s["adapter"].items() if "lora_A" in k})  # noqa: E731
    nan = lambda s: s["adapter"].update({k: v * float("nan") for k, v in s["adapter"].items()})  # noqa: E731
    cases = [command(name, "a fine-tuning run's adapter to --lora-gguf and --peft", lambda: [
        name, finetune_run(), "--lora-gguf", out("a.gguf"), "--peft", out("peft"), "--quiet"], succeeded,
        timeout=TWO_COMMANDS_TIMEOUT)]
    for what, argv in (("--lora-gguf of a training checkpoint", lambda: [name, rm.checkpoint(out("c.pt")),
                                                                        "--lora-gguf", out("a.gguf")]),
                       ("--peft of a training checkpoint", lambda: [name, rm.checkpoint(out("c.pt")), "--peft",
                                                                   out("peft")]),
                       ("a run whose base is gone", lambda: [name, finetune_run(gone), "--peft", out("peft")]),
                       ("a run whose adapter has other shapes", lambda: [name, finetune_run(wide), "--lora-gguf",
                                                                         out("a.gguf")]),
                       ("a run whose adapter holds a NaN", lambda: [name, finetune_run(nan), "--peft", out("peft")])):
        cases.append(command(name, what, argv, timeout=TWO_COMMANDS_TIMEOUT))
    # --resume reads the run's checkpoint back
    run_of = lambda edit: ["finetune", "--out-dir", finetune_run(edit), "--resume", "--max-steps", 2]  # noqa: E731
    for what, edit in (("an adapter of other shapes", wide), ("an adapter holding a NaN", nan),
                       ("a finetune config that is a list", lambda s: s.update(finetune=[1])),
                       ("a finetune config with an unknown key", lambda s: s["finetune"].update(magic=1))):
        cases.append(command("finetune", f"--resume of a run whose checkpoint has {what}",
                             lambda edit=edit: run_of(edit), timeout=TWO_COMMANDS_TIMEOUT))
    return cases


# -- distill ------------------------------------------------------------------------------------------------------

def distill(*more, teacher=None, data=None):
    return ["distill", "--teacher", teacher or model_file(), "--data", data or text_file(TEXT), "--student-layers", 1,
            "--max-steps", 1, "--batch-size", 1, "--seq-len", 16, "--out-dir", out("run"), "--data-cache",
            out("cache"), "--no-progress", *more]


def teacher_logits_file(edit=None) -> str:
    """A teacher-logits file of the tiny llama (--save-teacher-logits, run in this child), its bytes edited."""
    path = out("t.kd")
    status, _, err = run_cli([str(a) for a in distill("--top-k", 4, "--save-teacher-logits", path)])
    if status != 0:
        raise robust.HarnessError(f"--save-teacher-logits failed: {err[-500:]}")
    if edit is not None:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        with open(path, "wb") as f:
            f.write(edit(data))
    return path


def poke_indices(data: bytearray, raw: bytes) -> bytearray:
    """A teacher-logits file's bytes with every top-k index set to `raw` (int32)."""
    from flashlm.train.teacher_logits import _HEADER, _layout

    _, _, vocab, k, _, positions, n_val, meta = _HEADER.unpack_from(data)
    at = _layout(vocab, k, positions, n_val, meta)["indices"]
    data[at:at + 4 * positions * k] = raw * (positions * k)
    return data


def from_logits(*more, edit=None):
    return ["distill", "--teacher-logits", teacher_logits_file(edit), "--student-layers", 1, "--max-steps", 1,
            "--batch-size", 1, "--seq-len", 16, "--out-dir", out("run2"), "--no-progress", *more]


def distill_cases():
    name = "distill"
    cases = [command(name, "a valid call (one step)", distill, succeeded, timeout=TRAIN_TIMEOUT),
             command(name, "a valid call from teacher logits", from_logits, succeeded, timeout=TWO_COMMANDS_TIMEOUT)]
    for what, argv in (("--teacher missing", lambda: distill(teacher=missing())),
                       ("--teacher malformed", lambda: distill(teacher=garbage())),
                       ("--data empty", lambda: distill(data=write("", "e.txt"))),
                       ("--data missing", lambda: distill(data=missing())),
                       ("--teacher-logits malformed", lambda: ["distill", "--teacher-logits", garbage(), "--out-dir",
                                                               out("r")]),
                       ("--teacher-logits truncated", lambda: from_logits(edit=lambda d: d[:-9])),
                       ("--teacher-logits with indices past the vocabulary", lambda: from_logits(
                           edit=lambda d: poke_indices(d, b"\xff\xff\xff\x7f"))),
                       ("--save-teacher-logits without --top-k", lambda: distill("--save-teacher-logits", out("t.kd"))),
                       ("--student-config not TOML", lambda: distill("--student-config", write("[[[", "s.toml"))),
                       ("--student-config with an unknown key", lambda: distill("--student-config",
                                                                                write("n_layerz = 1\n", "s.toml"))),
                       ):
        cases.append(command(name, what, argv, timeout=TWO_COMMANDS_TIMEOUT if "--teacher-logits" in what
                             else TRAIN_TIMEOUT))
    # a top k past the vocabulary keeps all of it
    cases.append(command(name, "--top-k 2**31", lambda: distill("--top-k", 1 << 31), succeeded_or_refused,
                         timeout=TRAIN_TIMEOUT))
    for flag, value in (("--top-k", -1), ("--temperature", 0), ("--temperature", "nan"),
                        ("--alpha", 2), ("--alpha", "nan"), ("--student-layers", 0), ("--student-layers", 1 << 31),
                        ("--student-dim", 1 << 40), ("--student-heads", 3), ("--student-kv-heads", 3),
                        ("--student-ff", -1), ("--hidden-layers", "x:y"), ("--hidden-layers", "9:1"),
                        ("--hidden-weight", "nan"), ("--seq-len", 0), ("--seq-len", 1 << 31), ("--max-bytes", -1),
                        ("--lr", "inf"), ("--grad-clip", "nan")):
        cases.append(command(name, f"{flag} {value}", lambda flag=flag, value=value: distill(flag, value),
                             timeout=TRAIN_TIMEOUT))
    cases.append(command(name, "--kl reverse with --top-k 4", lambda: distill("--kl", "reverse", "--top-k", 4),
                         timeout=TRAIN_TIMEOUT))
    return cases


CASES = finetune_cases() + export_cases() + distill_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
