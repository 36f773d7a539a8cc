"""Training inputs from a hostile source: offline distillation's teacher-logits files
(flashlm.train.teacher_logits.open_teacher_logits and the batches read from them) and supervised fine-tuning's
JSONL (flashlm.train.sft_data.read_sft_jsonl). Each case is a valid file with one field changed, run in a
forked child under a memory cap and a timeout (tests/robust.py): a truncated file, a header whose vocab, k or
sizes lie, an index outside the vocabulary, a malformed line must raise an error naming the field, the position
or the line, never read past the file or allocate what it does not hold.
"""

import json
import math
import os
import struct

import numpy as np
import torch

import robust
from robust import Case, value_case

VOCAB, K, SEQ = 50, 4, 8
HEADER = struct.Struct("<4sIIIIQQQ20x")  # the file's header, as the format documents it


def warm():
    import flashlm.train.sft_data  # noqa: F401
    import flashlm.train.teacher_logits  # noqa: F401
    import tqdm  # noqa: F401


def write(data, name: str) -> str:
    path = os.path.join(robust.scratch(), name)
    with open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return path


# -- teacher logits ---------------------------------------------------------------------------------------------

def kd_file() -> str:
    """A valid file: 3 windows of SEQ positions, a seeded random teacher, 5 validation tokens."""
    from flashlm.train.teacher_logits import write_teacher_logits

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (3 * SEQ + 1,), generator=g).numpy().astype(np.int32)
    path = os.path.join(robust.scratch(), "t.kd")
    write_teacher_logits(path, lambda x: torch.randn(*x.shape, VOCAB, generator=g), tokens, tokens[:5], vocab=VOCAB,
                         k=K, seq_len=SEQ, meta={"teacher": "tiny"})
    return path


def kd_bytes() -> bytearray:
    with open(kd_file(), "rb") as f:
        return bytearray(f.read())


def kd_header(**fields) -> bytes:
    """The valid file with header fields replaced (magic, version, vocab, k, seq_len, positions, n_val, meta)."""
    data = kd_bytes()
    names = ("magic", "version", "vocab", "k", "seq_len", "positions", "n_val", "meta")
    values = dict(zip(names, HEADER.unpack_from(data)))
    values.update(fields)
    data[:HEADER.size] = HEADER.pack(*(values[n] for n in names))
    return bytes(data)


def offsets():
    """(tokens, val_tokens, indices, values) byte offsets of the valid file."""
    from flashlm.train.teacher_logits import _layout

    with open(kd_file(), "rb") as f:
        head = HEADER.unpack(f.read(HEADER.size))
    return _layout(VOCAB, K, head[5], head[6], head[7])


def kd_poke(array: str, index: int, raw: bytes) -> bytes:
    """The valid file with `raw` written at element `index` of `array` (int32 or float16 elements)."""
    data = kd_bytes()
    at = offsets()[array] + index * len(raw)
    data[at:at + len(raw)] = raw
    return bytes(data)


def open_kd(data_fn):
    def call():
        from flashlm.train.teacher_logits import open_teacher_logits

        data = data_fn()
        return open_teacher_logits(data if isinstance(data, str) else write(data, "t.kd"))
    return call


def batches_of(data_fn):
    """Every batch of the file (TopKBatches, one epoch): the check of each batch's indices and values."""
    def call():
        from flashlm.train.teacher_logits import TopKBatches, open_teacher_logits

        b = TopKBatches(open_teacher_logits(write(data_fn(), "t.kd")), batch_size=1, seed=0)
        return [b.batch(0, i) for i in range(3)]
    return call


def opens(positions):
    def judge(f):
        return None if f.positions == positions and f.indices.shape == (positions, K) else \
            f"opened {f.positions} positions, the file has {positions}"
    return judge


def teacher_logits_cases():
    entry, batch = "flashlm.train.teacher_logits.open_teacher_logits", "flashlm.train.teacher_logits.TopKBatches"
    where = ("teacher_logits",)
    cases = [
        value_case(entry, "a valid file", open_kd(kd_file), (), opens(3 * SEQ)),
        value_case(batch, "a valid file", batches_of(kd_bytes), (),
                   lambda r: None if r[0][2].shape == (1, SEQ, K) else f"batch {r[0][2].shape}"),
        Case(entry, "empty", open_kd(lambda: b""), where),
        Case(entry, "truncated in the header", open_kd(lambda: kd_bytes()[:30]), where),
        Case(entry, "truncated in the values", open_kd(lambda: kd_bytes()[:-10]), where),
        Case(entry, "a byte more", open_kd(lambda: bytes(kd_bytes()) + b"\0"), where),
        Case(entry, "magic GGUF", open_kd(lambda: kd_header(magic=b"GGUF")), where),
        Case(entry, "version 2", open_kd(lambda: kd_header(version=2)), where),
        Case(entry, "vocab 0", open_kd(lambda: kd_header(vocab=0)), where),
        Case(entry, "vocab 2**32 - 1", open_kd(lambda: kd_header(vocab=(1 << 32) - 1)), where),
        Case(entry, "k 0", open_kd(lambda: kd_header(k=0)), where),
        Case(entry, "k above vocab", open_kd(lambda: kd_header(k=VOCAB + 1)), where),
        Case(entry, "k 2**31 (vocab too)", open_kd(lambda: kd_header(k=1 << 24, vocab=1 << 24)), where),
        Case(entry, "seq_len 0", open_kd(lambda: kd_header(seq_len=0)), where),
        Case(entry, "seq_len 2**32 - 1", open_kd(lambda: kd_header(seq_len=(1 << 32) - 1)), where),
        Case(entry, "positions 2**63", open_kd(lambda: kd_header(positions=1 << 63)), where),
        Case(entry, "positions not whole windows", open_kd(lambda: kd_header(positions=3 * SEQ - 1)), where),
        Case(entry, "validation tokens 2**64 - 1", open_kd(lambda: kd_header(n_val=(1 << 64) - 1)), where),
        Case(entry, "meta of 2**63 bytes", open_kd(lambda: kd_header(meta=1 << 63)), where),
        Case(entry, "meta not JSON", open_kd(lambda: (lambda d: d[:HEADER.size] + b"[" + d[HEADER.size + 1:])(
            kd_bytes())), where),
        Case(entry, "a token outside the vocabulary", open_kd(lambda: kd_poke("tokens", 3, struct.pack("<i", VOCAB))),
             where),
        Case(entry, "a negative validation token", open_kd(lambda: kd_poke("val_tokens", 0, struct.pack("<i", -1))),
             where),
        Case(entry, "a folder", open_kd(robust.scratch), where, accept=(OSError,)),
        Case(entry, "a missing file", open_kd(lambda: os.path.join(robust.scratch(), "missing.kd")),
             ("missing.kd",), accept=(OSError,)),
    ]
    for what, array, index, raw in (("an index equal to vocab", "indices", 5, struct.pack("<i", VOCAB)),
                                    ("an index of -1", "indices", 3 * SEQ * K - 1, struct.pack("<i", -1)),
                                    ("a NaN value", "values", 7, np.float16(math.nan).tobytes()),
                                    ("an infinite value", "values", 0, np.float16(math.inf).tobytes())):
        cases.append(Case(batch, what, batches_of(lambda a=array, i=index, r=raw: kd_poke(a, i, r)),
                          ("teacher_logits", "position")))
    return cases


# -- SFT JSONL --------------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {"prompt": "2 + 2 =", "completion": " 4"}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def read_jsonl(data_fn):
    def call():
        from flashlm.train.sft_data import read_sft_jsonl

        return read_sft_jsonl(write(data_fn(), "train.jsonl"))
    return call


def sft_cases():
    entry = "flashlm.train.sft_data.read_sft_jsonl"
    records = lambda n: lambda r: None if len(r) == n else f"read {len(r)} records, the file has {n}"  # noqa: E731
    line2 = ("line 2",)
    def with_msg(**m):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **m}]}

    cases = [
        value_case(entry, "a valid file (chat, pair, a blank line)", read_jsonl(lambda: jsonl(CHAT, "", PAIR)), (),
                   records(2)),
        Case(entry, "an empty file", read_jsonl(lambda: ""), ("data",)),
        Case(entry, "blank lines only", read_jsonl(lambda: "\n \n\t\n"), ("data",)),
        Case(entry, "line 2 not JSON", read_jsonl(lambda: jsonl(CHAT, "{messages: 1}")), line2),
        Case(entry, "line 2 cut short", read_jsonl(lambda: jsonl(CHAT, json.dumps(CHAT)[:20])), line2),
        Case(entry, "line 2 not UTF-8", read_jsonl(lambda: jsonl(CHAT).encode() + b'{"prompt": "\xff"}\n'), line2),
        Case(entry, "line 2 a JSON list", read_jsonl(lambda: jsonl(CHAT, [CHAT])), line2),
        Case(entry, "line 2 NaN", read_jsonl(lambda: jsonl(CHAT, "NaN")), line2),
        Case(entry, "line 2 nested 100000 deep", read_jsonl(lambda: jsonl(CHAT, "[" * 100000 + "]" * 100000)), line2),
        Case(entry, "messages empty", read_jsonl(lambda: jsonl(CHAT, {"messages": []})), line2),
        Case(entry, "messages a string", read_jsonl(lambda: jsonl(CHAT, {"messages": "hi"})), line2),
        Case(entry, "a message a list", read_jsonl(lambda: jsonl(CHAT, {"messages": [["user", "hi"]]})), line2),
        Case(entry, "role robot", read_jsonl(lambda: jsonl(CHAT, with_msg(role="robot"))), ("messages[1].role",)),
        Case(entry, "role missing", read_jsonl(lambda: jsonl(CHAT, {"messages": [{"content": "a"}]})),
             ("messages[0].role",)),
        Case(entry, "role a list", read_jsonl(lambda: jsonl(CHAT, with_msg(role=["assistant"]))),
             ("messages[1].role",)),
        Case(entry, "content a number", read_jsonl(lambda: jsonl(CHAT, with_msg(content=4))), ("messages[1].content",)),
        Case(entry, "content null", read_jsonl(lambda: jsonl(CHAT, with_msg(content=None))), ("messages[1].content",)),
        Case(entry, "no assistant message", read_jsonl(lambda: jsonl(CHAT, {"messages": [
            {"role": "user", "content": "q"}]})), line2),
        Case(entry, "prompt without completion", read_jsonl(lambda: jsonl(CHAT, {"prompt": "q"})), ("completion",)),
        Case(entry, "completion a number", read_jsonl(lambda: jsonl(CHAT, {"prompt": "q", "completion": 4})),
             ("completion",)),
        Case(entry, "completion empty", read_jsonl(lambda: jsonl(CHAT, {"prompt": "q", "completion": ""})),
             ("completion",)),
        Case(entry, "messages and prompt", read_jsonl(lambda: jsonl(CHAT, {**CHAT, **PAIR})), line2),
        Case(entry, "neither messages nor prompt", read_jsonl(lambda: jsonl(CHAT, {"text": "hi"})), line2),
        Case(entry, "a line of 17 MiB", read_jsonl(lambda: jsonl(CHAT, {"prompt": "x" * (17 << 20),
                                                                      "completion": "y"})), line2),
        Case(entry, "a 17 MiB file without a newline", read_jsonl(lambda: "x" * (17 << 20)), ("line 1",)),
    ]
    return cases


CASES = teacher_logits_cases() + sft_cases()
verdicts, test_hostile_case = robust.tests_of(CASES)
