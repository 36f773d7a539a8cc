"""Small benchmark files in each layout flashlm.eval reads, a byte-level tokenizer and a random model for it:
what the eval tests run on (nothing downloaded)."""

import csv
import json
import os

import torch

from flashlm.models import ModelConfig, Transformer

BYTE_VOCAB = 258  # 256 bytes, then BOS and EOS


class ByteTokenizer:
    """One token per UTF-8 byte; a chat template of plain markers."""
    bos_token_id, eos_token_ids = 256, (257,)

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def byte_model(seed=0, seq_len=1024):
    cfg = ModelConfig(arch="llama", vocab_size=BYTE_VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      seq_len=seq_len)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    return model


def write_csv(path, rows, header=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def mmlu_folder(root, subjects=("abstract_algebra", "world_religions"), n=3):
    for s in subjects:
        for split, count in (("test", n), ("dev", 5)):
            rows = [[f"{split} question {i} of {s}? ", f"one {i}", f"two {i}", f"three {i}", f"four {i}", "ABCD"[i % 4]]
                    for i in range(count)]
            write_csv(os.path.join(root, split, f"{s}_{split}.csv"), rows)
    return root


def ceval_folder(root, subjects=("computer_network",), n=3):
    for s in subjects:
        write_csv(os.path.join(root, "val", f"{s}_val.csv"),
                  [[i, f"问题 {i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4]] for i in range(n)],
                  ["id", "question", "A", "B", "C", "D", "answer"])
        write_csv(os.path.join(root, "dev", f"{s}_dev.csv"),
                  [[i, f"例题 {i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4], "解释"] for i in range(5)],
                  ["id", "question", "A", "B", "C", "D", "answer", "explanation"])
    return root


GPQA_HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "High-level domain"]


def gpqa_file(path, n=4):
    write_csv(path, [["old", f"What is {i} plus {i}?", f"{2 * i}", f"{2 * i + 1}", f"{2 * i + 2}", f"{i}  [title] x",
                      "Physics" if i % 2 else "Chemistry"] for i in range(n)], GPQA_HEADER)
    return path


def hellaswag_file(path, n=4):
    write_jsonl(path, [{"ind": i, "activity_label": "Baking cookies", "ctx_a": f"A man mixes flour {i}.",
                        "ctx_b": "then he", "ctx": f"A man mixes flour {i}. then he",
                        "endings": [f"bakes [step] them {i}.", "sings.", "runs  away.", "sleeps."], "label": i % 4}
                       for i in range(n)])
    return path


def jsonl_file(path, n=4):
    write_jsonl(path, [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2,
                        "subject": "parity" if i < 2 else "numbers"} for i in range(n)])
    return path


def gsm8k_file(path, n=4):
    write_jsonl(path, [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}.\n#### {2 * i}"}
                       for i in range(n)])
    return path
