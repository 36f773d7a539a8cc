"""`flashlm quantize IN OUT --method gptq|awq|w8a8|smoothquant --calib-data FILE`: a float model (an HF
directory, a flashlm checkpoint or run folder) quantized with calibration text to int4 (GPTQ, AWQ) or W8A8
(int8 weights per channel, int8 activations per token or, with `act_calib`, one static scale per layer input;
smoothquant smooths the model first), written as a quantized checkpoint (flashlm.io.quantized_checkpoint)
that load_model and every `--model` flag read.

The calibration text is encoded by the model's tokenizer and cut into rows of `seq` tokens (at most the
model's context), the first `rows` of them used (GPTQ's paper: 128 rows of 2048 tokens)."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

INT4_METHODS = ("gptq", "awq")
INT8_METHODS = ("w8a8", "smoothquant")
METHODS = INT4_METHODS + INT8_METHODS
CALIB_BATCH = 8  # rows a forward of the W8A8 calibration pass (its histograms' ranges grow batch by batch)
CALIB_DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}  # GPTQ's calibration forward (--calib-dtype)


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


def quantize_calibrated(input_path: str, output_path: str, method: str, calib_data: str,
                        group_size: Optional[int] = None, symmetric: bool = True, act_order: bool = False,
                        rows: int = 128, seq: int = 512, progress: bool = True, act_calib: Optional[str] = None,
                        alpha: Optional[float] = None, calib_dtype: Optional[str] = None) -> dict:
    """Quantizes input_path's block linears by `method` and writes output_path; returns what it did.
    group_size (default 128), symmetric and act_order are int4's; act_calib (None: per-token activation
    scales; or one of flashlm.quant.ranges.ACT_CALIBRATIONS) W8A8's; alpha (default 0.5) SmoothQuant's;
    calib_dtype GPTQ's: its blocks' calibration forward in "bf16" or "f32" (default: bf16 on CUDA and on CPUs
    with bf16 matmul instructions, where it is several times faster, else f32; the Hessians are summed in
    float32 either way)."""
    from flashlm.io import load_model
    from flashlm.io.quantized_checkpoint import save_quantized_model

    _check_options(method, rows, seq, group_size, symmetric, act_order, act_calib, alpha, calib_dtype)
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):  # before minutes of calibration, not after
        raise ValueError(f"output: the folder {folder!r} does not exist")
    text = read_calib_text(calib_data)
    loaded = load_model(input_path)
    if loaded.tokenizer is None:
        raise ValueError(f"input: {input_path!r} has no tokenizer to encode --calib-data with")
    tokens = calibration_rows(loaded.tokenizer.encode(text), rows, min(seq, loaded.config.seq_len))

    def report(i, n):
        if progress:
            print(f"\r{method}: block {i}/{n}", end="\n" if i == n else "", flush=True)

    start = time.perf_counter()
    done = {"rows": tokens.shape[0], "seq": tokens.shape[1]}
    if method in INT4_METHODS:
        done.update(group_size=group_size or 128, symmetric=symmetric)
        _quantize_int4(loaded.model, tokens, method, done["group_size"], symmetric, act_order,
                       CALIB_DTYPES.get(calib_dtype), report)
    else:
        done.update(act_calib=act_calib, alpha=alpha)
        _quantize_w8a8(loaded.model, tokens, method == "smoothquant", act_calib, 0.5 if alpha is None else alpha,
                       progress)
    done["seconds"] = time.perf_counter() - start
    save_quantized_model(loaded, output_path, method)
    return done


def _check_options(method, rows, seq, group_size, symmetric, act_order, act_calib, alpha, calib_dtype=None) -> None:
    from flashlm.quant.ranges import ACT_CALIBRATIONS

    if method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    for flag, value in (("--calib-rows", rows), ("--calib-seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {value!r}")
    if act_order and method != "gptq":
        raise ValueError("--act-order: only --method gptq takes it")
    if calib_dtype is not None and method != "gptq":
        raise ValueError("--calib-dtype: only --method gptq takes it")
    if calib_dtype is not None and calib_dtype not in CALIB_DTYPES:
        raise ValueError(f"--calib-dtype: expected one of {', '.join(CALIB_DTYPES)}, got {calib_dtype!r}")
    int4_only = (("--group-size", group_size is not None), ("--asym", not symmetric))
    int8_only = (("--act-calib", act_calib is not None),)
    for flag, given in int4_only if method in INT8_METHODS else int8_only:
        if given:
            raise ValueError(f"{flag}: not with --method {method}")
    if alpha is not None and method != "smoothquant":
        raise ValueError("--alpha: only --method smoothquant takes it")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha: must lie in [0, 1], got {alpha}")
    if act_calib is not None and act_calib not in ACT_CALIBRATIONS:
        raise ValueError(f"--act-calib: expected one of {', '.join(ACT_CALIBRATIONS)}, got {act_calib!r}")


def _quantize_int4(model, tokens, method, group_size, symmetric, act_order, calib_dtype, report) -> None:
    from flashlm.quant.awq import awq_quantize
    from flashlm.quant.gptq import gptq_quantize

    if method == "gptq":
        gptq_quantize(model, tokens, group_size, symmetric, act_order=act_order, progress=report,
                      calib_dtype=calib_dtype)
    else:
        awq_quantize(model, tokens, group_size, symmetric, progress=report)


def _quantize_w8a8(model, tokens, smooth: bool, act_calib, alpha: float, progress: bool) -> None:
    """SmoothQuant (if smooth) from a calibration pass over the float model, then W8A8 with static scales from
    a pass over the (smoothed) model when act_calib is given."""
    from flashlm.quant.calibrate import calibrate
    from flashlm.quant.smoothquant import smooth_model
    from flashlm.quant.w8a8 import quantize_w8a8

    def calibration():
        return calibrate(model, tokens.reshape(-1), seq_len=tokens.shape[1], batch_size=CALIB_BATCH,
                         progress=progress)

    if smooth:
        smooth_model(model, calibration(), alpha)
    quantize_w8a8(model, calibration() if act_calib is not None else None, act_calib)
