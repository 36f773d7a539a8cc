"""Data for supervised fine-tuning: JSONL records rendered with the model's chat template, the loss on the
answers alone.

    records = read_sft_jsonl("train.jsonl")                  # each line checked; errors name the line and field
    examples = encode_records(records, tokenizer, seq_len)   # (ids, labels) per record, labels -100 on prompts
    batches = SFTBatches(examples, batch_size=8, seed=0)     # x, y [B, T] padded per batch

A line is either {"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]} (OpenAI's chat
format, at least one assistant message) or {"prompt": "...", "completion": "..."}. Chat records are rendered
with the model's chat template; a model without one (a `flashlm train` run) gets DEFAULT_CHAT_TEMPLATE, a plain
"<|role|>" header per message, and an end-of-text token after each assistant message so that generation learns
to stop. A completion is followed by the end-of-text token too.

Masking: the template is rendered turn by turn (the messages before an assistant message with the generation
prompt, then with that message), so the text each assistant message adds is known exactly; its tokens keep their
labels, every other token (system, user, template headers, the prompt) gets -100, which the model's
cross-entropy ignores. Each piece of text is tokenized on its own, so no token straddles a prompt and an answer.

Length: a record longer than seq_len + 1 tokens keeps its first seq_len + 1 (the inputs are the first seq_len,
the targets the last seq_len); a record left with no answer token inside that window is dropped, and the number
dropped is reported. Batches are padded to their longest record (pad id 0 in the inputs, -100 in the targets),
never packed: records never see each other's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from flashlm.train.data import EpochBatches

IGNORE = -100  # the label cross_entropy skips
# A record is cut to seq_len + 1 tokens; 16 MiB of text is ~4M tokens, 30 times a 128k context. A longer line
# (or a file without newlines) is refused before it is read whole, parsed and tokenized.
MAX_LINE_BYTES = 16 << 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class SFTExample:
    ids: list           # token ids of the rendered record, at most seq_len + 1
    labels: list        # ids where the loss applies, IGNORE elsewhere (same length)


def _field_error(where: str, field: str, message: str) -> ValueError:
    return ValueError(f"{where}: {field}: {message}")


def check_record(record, where: str) -> dict:
    """A record as {"messages": [...]} or {"prompt": str, "completion": str}, checked; ValueError naming
    `where` (the file and line) and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        extra = sorted(set(record) & {"prompt", "completion"})
        if extra:
            raise _field_error(where, extra[0], "cannot be combined with messages")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _field_error(where, "messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            field = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _field_error(where, field, f"expected an object, got {type(m).__name__}")
            if m.get("role") not in CHAT_ROLES:
                raise _field_error(where, f"{field}.role", f"must be one of {', '.join(CHAT_ROLES)}, got "
                                                           f"{str(m.get('role'))[:40]!r}")
            if not isinstance(m.get("content"), str):
                raise _field_error(where, f"{field}.content", f"must be a string, got "
                                                              f"{type(m.get('content')).__name__}")
        if not any(m["role"] == "assistant" for m in messages):
            raise _field_error(where, "messages", "has no assistant message: nothing to learn")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for field in ("prompt", "completion"):
        if field not in record:
            raise _field_error(where, field, "missing (a record holds messages, or prompt and completion)")
        if not isinstance(record[field], str):
            raise _field_error(where, field, f"must be a string, got {type(record[field]).__name__}")
    if not record["completion"]:
        raise _field_error(where, "completion", "is empty: nothing to learn")
    return {"prompt": record["prompt"], "completion": record["completion"]}


def read_sft_jsonl(path) -> list:
    """The checked records of a JSONL file (blank lines skipped); ValueError naming the line of a bad one."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{path}: line {number}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise ValueError(f"{where}: longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply") from None
            records.append(check_record(record, where))
    if not records:
        raise ValueError(f"data: {path} holds no records")
    return records


def chat_tokenizer(tokenizer):
    """tokenizer itself when it has a chat template, else a copy rendering with DEFAULT_CHAT_TEMPLATE."""
    if tokenizer.chat_template:
        return tokenizer
    from flashlm.io.tokenizer import Tokenizer

    return Tokenizer(tokenizer.backend, eos_token_ids=tokenizer.eos_token_ids, bos_token_id=tokenizer.bos_token_id,
                     chat_template=DEFAULT_CHAT_TEMPLATE)


def chat_segments(tokenizer, messages: list, where: str = "record") -> list:
    """[(text, is_answer), ...] whose texts join to the rendered conversation; tokenizer has a chat template."""

    def render(upto, generation):
        try:
            return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation)
        except Exception as e:  # the template's raise_exception, or a template failing on these messages
            raise _field_error(where, "messages", f"the chat template refused them: {e}") from None

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise _field_error(where, f"messages[{i}]", "the chat template does not render the conversation "
                                                        "turn by turn as a prefix of the whole, so the "
                                                        "assistant's text cannot be found for the loss mask")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(len(messages), False)
    if not rest.startswith(done):
        raise _field_error(where, "messages", "the chat template renders the whole conversation differently "
                                              "from its turns")
    segments.append((rest[len(done):], False))
    return segments


def encode_record(record: dict, tokenizer, seq_len: int, where: str = "record") -> Optional[SFTExample]:
    """The record's ids and labels, cut to seq_len + 1 tokens; None when no answer token is left in them.
    tokenizer: flashlm.io.tokenizer.Tokenizer (chat records: with a chat template, see chat_tokenizer)."""
    eos = tokenizer.eos_token_id
    own_template = tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE
    if "messages" in record:
        segments = chat_segments(tokenizer, record["messages"], where)
    else:
        segments = [(record["prompt"], False), (record["completion"], True)]
        own_template = False
    ids, labels = [], []
    for k, (text, answer) in enumerate(segments):
        # A model's own template writes its BOS and end-of-turn tokens; otherwise the tokenizer adds its
        # special tokens to the first piece, and an end-of-text token closes each answer.
        piece = tokenizer.encode(text, add_special_tokens=k == 0 and not own_template) if text else []
        if answer and not own_template and eos is not None:
            piece = piece + [eos]
        ids += piece
        labels += piece if answer else [IGNORE] * len(piece)
    ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
    if len(ids) < 2 or all(t == IGNORE for t in labels[1:]):
        return None
    return SFTExample(ids, labels)


def encode_records(records: list, tokenizer, seq_len: int, name: str = "data") -> tuple:
    """(examples, dropped): every record encoded; `dropped` counts those with no answer token in the first
    seq_len + 1. ValueError if none is left."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    if any("messages" in r for r in records):
        tokenizer = chat_tokenizer(tokenizer)
    examples = [encode_record(r, tokenizer, seq_len, f"{name}: record {i + 1}") for i, r in enumerate(records)]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise ValueError(f"{name}: no record has an answer token within seq_len={seq_len}")
    return kept, len(examples) - len(kept)


def collate(examples: list) -> tuple:
    """x, y int64 [B, T]: inputs padded with 0, targets (labels shifted by one) padded with IGNORE, T the
    longest record's length less one."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.zeros(len(examples), T, dtype=torch.int64)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        x[row, :n] = torch.tensor(e.ids[:-1])
        y[row, :n] = torch.tensor(e.labels[1:])
    return x, y


class SFTBatches(EpochBatches):
    """Batches (x, y) of `examples`, padded per batch, as PackedBatches serves them: an endless iterator over
    epochs reshuffled from (seed, epoch), batch(epoch, index) at any position, state_dict for exact resume.
    The last partial batch of an epoch is dropped (batch_size is capped at the number of examples)."""

    def __init__(self, examples: list, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("examples: none")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        self.examples = examples
        self.batch_size = min(batch_size, len(examples))
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = len(examples) // self.batch_size
        self.epoch, self.index = 0, 0

    def batch(self, epoch: int, index: int):
        if not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"index: must be in [0, {self.batches_per_epoch}), got {index}")
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        picked = order[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.examples[i] for i in picked])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict):
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                           ("num_examples", len(self.examples))):
            if state.get(name) != mine:
                raise ValueError(f"state_dict: {name} is {state.get(name)}, this loader has {mine}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"state_dict: position (epoch {epoch}, index {index}) is out of range")
        self.epoch, self.index = epoch, index
