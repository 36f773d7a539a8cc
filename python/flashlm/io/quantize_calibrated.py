"""`flashlm quantize IN OUT --method gptq|awq --calib-data FILE`: a float model (an HF directory, a flashlm
checkpoint or run folder) quantized to int4 with calibration text, written as
an int4 checkpoint (flashlm.io.int4_checkpoint) that load_model and every `--model` flag read.

The calibration text is encoded by the model's tokenizer and cut into rows of `seq` tokens (at most the
model's context), the first `rows` of them used (GPTQ's paper: 128 rows of 2048 tokens)."""

from __future__ import annotations

import time

import torch

METHODS = ("gptq", "awq")


def read_calib_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"--calib-data: cannot read {path!r} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--calib-data: {path!r} is not UTF-8 text (byte {e.start})") from None


def calibration_rows(ids: list, rows: int, seq: int) -> torch.Tensor:
    """The first `rows` whole rows of `seq` tokens of ids, int64 [rows', seq]; ValueError when not one fits."""
    n = min(rows, len(ids) // seq)
    if n == 0:
        raise ValueError(f"--calib-data: {len(ids)} tokens, fewer than one row of {seq}: give more text")
    return torch.tensor(ids[:n * seq], dtype=torch.int64).reshape(n, seq)


def quantize_calibrated(input_path: str, output_path: str, method: str, calib_data: str, group_size: int = 128,
                        symmetric: bool = True, act_order: bool = False, rows: int = 128, seq: int = 512,
                        progress: bool = True) -> dict:
    """Quantizes input_path's block linears by `method` and writes output_path; returns what it did."""
    from flashlm.io import load_model
    from flashlm.io.int4_checkpoint import save_int4_model
    from flashlm.quant.awq import awq_quantize
    from flashlm.quant.gptq import gptq_quantize

    if method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    for flag, value in (("--calib-rows", rows), ("--calib-seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {value!r}")
    if act_order and method != "gptq":
        raise ValueError("--act-order: only --method gptq takes it")
    text = read_calib_text(calib_data)
    loaded = load_model(input_path)
    if loaded.tokenizer is None:
        raise ValueError(f"input: {input_path!r} has no tokenizer to encode --calib-data with")
    tokens = calibration_rows(loaded.tokenizer.encode(text), rows, min(seq, loaded.config.seq_len))

    def report(i, n):
        if progress:
            print(f"\r{method}: block {i}/{n}", end="\n" if i == n else "", flush=True)

    start = time.perf_counter()
    if method == "gptq":
        gptq_quantize(loaded.model, tokens, group_size, symmetric, act_order=act_order, progress=report)
    else:
        awq_quantize(loaded.model, tokens, group_size, symmetric, progress=report)
    seconds = time.perf_counter() - start
    save_int4_model(loaded, output_path, method)
    return {"rows": tokens.shape[0], "seq": tokens.shape[1], "seconds": seconds, "group_size": group_size,
            "symmetric": symmetric}
