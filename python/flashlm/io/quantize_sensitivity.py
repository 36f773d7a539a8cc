"""`flashlm quantize IN OUT --type T --sensitivity --calib-data FILE [--keep-top N]`: rank which weights of
a model lose the most under the mix's type (flashlm.quant.sensitivity), print the ranking, and quantize with
the N most sensitive units kept float (flashlm.io.quantize_file's keep_float).

The calibration text is encoded by the model's tokenizer, cut into at most --calib-rows rows of --calib-seq
tokens (at most the model's context), and the perplexity over those rows is the scan's measure.
"""

from __future__ import annotations

import sys

from flashlm.io.quantize_calibrated import calibration_rows, read_calib_text
from flashlm.quant.mix import MIXES
from flashlm.quant.sensitivity import UNITS, Sensitivity, sensitivity_scan


def scan_file(input_path: str, mix: str, calib_data: str, unit: str = "layer", rows: int = 128, seq: int = 512,
              progress: bool = True) -> tuple[float, list[Sensitivity]]:
    """(the float perplexity, the ranked units) of the model at input_path under mix's default type."""
    from flashlm.io import load_model

    if not isinstance(mix, str) or mix.upper() not in MIXES:
        raise ValueError(f"type: expected one of {', '.join(MIXES)}, got {mix!r}")
    if unit not in UNITS:
        raise ValueError(f"--sensitivity-unit: expected one of {', '.join(UNITS)}, got {unit!r}")
    for flag, value in (("--calib-rows", rows), ("--calib-seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {value!r}")
    ggml_type = MIXES[mix.upper()][0]
    if ggml_type in ("F32", "F16", "BF16"):
        raise ValueError(f"type: {mix} is a float type; the scan measures a quantized type (Q4_K_M, Q4_0, ...)")
    text = read_calib_text(calib_data)
    loaded = load_model(input_path)
    if loaded.tokenizer is None:
        raise ValueError(f"input: {input_path!r} has no tokenizer to encode --calib-data with")
    seq = min(seq, loaded.config.seq_len)
    ids = calibration_rows(loaded.tokenizer.encode(text), rows, seq).reshape(-1)

    def report(i, n):
        if progress:
            print(f"\rsensitivity: {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)

    return sensitivity_scan(loaded.model, ids, ggml_type, unit, seq_len=seq, progress=report)


def format_table(base: float, rows: list[Sensitivity]) -> str:
    lines = [f"float perplexity {base:.4f}", f"{'unit':<20} {'type':<10} {'perplexity':>12} {'increase':>10}"]
    lines += [f"{r.unit:<20} {r.ggml_type:<10} {r.perplexity:>12.4f} {100 * r.increase:>+9.3f}%" for r in rows]
    return "\n".join(lines)
