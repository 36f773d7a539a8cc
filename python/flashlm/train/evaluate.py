"""`flashlm eval CKPT --data FILE`: the perplexity of a checkpoint's model on a text file.

The text is split into documents and cleaned as the training corpus was (the run's doc_separator,
corpus.clean_text), tokenized with the checkpoint's own tokenizer, an end-of-document token after each
document as in training, and cut into consecutive windows of seq_len + 1 tokens that overlap by one, so every token after
the first is predicted exactly once, from at most seq_len - 1 tokens of context. The loss is the mean
over all those predictions; the perplexity is its exponential.
"""

import math
from pathlib import Path

import torch


@torch.no_grad()
def evaluate_checkpoint(path, data_file, batch_size: int = 8, device="cpu") -> dict:
    from flashlm import ops
    from flashlm.io.checkpoint import find_checkpoint, read_checkpoint
    from flashlm.io.checkpoint_model import model_from_checkpoint
    from flashlm.train.config import TrainConfig
    from flashlm.train.corpus import clean_text

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    device = ops.check_device(device)
    path = find_checkpoint(path)  # a run's folder: its latest checkpoint
    state = read_checkpoint(path)
    loaded = model_from_checkpoint(state, path)  # the config, weights, tokenizer and eos id checked
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint {path}: holds no tokenizer, so text cannot be encoded")
    tok = loaded.tokenizer.backend
    text = Path(data_file).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    saved = state.get("train_config") or {}
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path}: train_config is a {type(saved).__name__}, expected a dict")
    sep = TrainConfig.from_dict(saved).document_separator() if saved else None
    docs = [d for d in (clean_text(piece) for piece in (text.split(sep) if sep else [text])) if d]
    eos = loaded.eos_token_ids[0] if loaded.eos_token_ids else None
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids + ([eos] if eos is not None else []))
    if len(ids) < 2:
        raise ValueError(f"data: {data_file} makes {len(ids)} tokens, at least 2 are needed")
    model = loaded.model.to(device)
    L = model.cfg.seq_len
    starts = list(range(0, len(ids) - 1, L))  # window i: tokens [s, s + L], predicting s+1 .. s+L
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        rows = [ids[s:s + L + 1] for s in starts[b:b + batch_size]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.int64)
        y = torch.full((len(rows), width), -100, dtype=torch.int64)  # ignored where a last window is short
        for i, r in enumerate(rows):
            x[i, :len(r) - 1] = torch.tensor(r[:-1])
            y[i, :len(r) - 1] = torch.tensor(r[1:])
        _, loss = model(x.to(device), y.to(device))
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "step": state.get("step")}
