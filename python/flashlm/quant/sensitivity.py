"""Which weights lose the most when quantized: a scan that quantizes one unit of a model at a time.

Each unit (a layer `blk.3`, a category `ffn_down` across layers, or one layer's category `blk.3.ffn_down`)
has its block linears' weights replaced by their GGUF round trip (quantize_gguf, then flashlm's dequantizer,
the values a GGUF file of that type holds), the rest of the model left float; the perplexity of the model
on calibration text is measured, and the unit's weights are restored. Units are ranked by the perplexity
increase over the float model. The most sensitive units are the ones to keep float (`flashlm quantize
--keep-float`, whose names these are) or to give more bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashlm import ops
from flashlm.quant.calibrate import token_batches
from flashlm.quant.gguf_quantize import GGUF_QUANT_TYPES, quantize_gguf
from flashlm.quant.imatrix import gguf_linear_names
from flashlm.quant.mix import category, fallback_type

UNITS = ("layer", "category", "tensor")


@dataclass
class Sensitivity:
    unit: str          # the keep-float name: "blk.3", "ffn_down" or "blk.3.ffn_down"
    ggml_type: str     # the type its weights were quantized to (the requested one, or its fallback)
    perplexity: float  # of the model with this unit quantized
    increase: float    # perplexity / float perplexity - 1


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids, seq_len: int, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over disjoint rows of seq_len tokens of `ids` (every token after a
    row's first scored)."""
    nll, count = 0.0, 0
    for x in token_batches(ids, seq_len, batch_size):
        logits, _ = model(x)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    if count == 0:
        raise ValueError(f"ids: rows of seq_len = {seq_len} leave no token to score")
    return math.exp(nll / count)


def gguf_round_trip(weight: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """weight [rows, n] as a GGUF file of ggml_type would hold it, as float32."""
    blocks = torch.from_numpy(quantize_gguf(weight.detach().float().cpu().contiguous(), ggml_type))
    return ops.dequantize(blocks.reshape(-1), ggml_type, tuple(weight.shape))


def unit_of(gguf_name: str, unit: str) -> str:
    """The name of the unit (of kind `unit`) that the weight `blk.N.cat.weight` belongs to."""
    layer = gguf_name.split(".")[1]
    return {"layer": f"blk.{layer}", "category": category(gguf_name),
            "tensor": f"blk.{layer}.{category(gguf_name)}"}[unit]


def sensitivity_scan(model: torch.nn.Module, ids, ggml_type: str = "Q4_K", unit: str = "layer",
                     seq_len: int = 128, batch_size: int = 8, progress=None) -> tuple[float, list[Sensitivity]]:
    """(the float model's perplexity on `ids`, one Sensitivity per unit, most sensitive first).

    model: a flashlm Transformer whose block linears are nn.Linear (float weights); left as it was.
    ids: token ids (a list or 1-D tensor), at least one row of seq_len.
    ggml_type: a GGUF type quantize_gguf writes; a weight whose rows it does not divide into blocks gets
        the type `flashlm quantize` would fall back to.
    unit: "layer", "category" or "tensor".
    progress: optional callable(i, n) after each unit.
    """
    if not isinstance(ggml_type, str) or ggml_type.upper() not in GGUF_QUANT_TYPES:
        raise ValueError(f"ggml_type: expected one of {', '.join(GGUF_QUANT_TYPES)}, got {ggml_type!r}")
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {', '.join(UNITS)}, got {unit!r}")
    ggml_type = ggml_type.upper()
    linears = {}  # unit -> [(module, gguf name)]
    for module_name, gguf_name in gguf_linear_names(model).items():
        module = model.get_submodule(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"model: {module_name} is {type(module).__name__}, not a float nn.Linear (scan a "
                             "float model)")
        linears.setdefault(unit_of(gguf_name, unit), []).append((module, gguf_name))
    if not linears:
        raise ValueError("model: no block linear layers to scan (not a flashlm Transformer?)")

    base = perplexity(model, ids, seq_len, batch_size)
    rows = []
    for i, (name, members) in enumerate(linears.items()):
        saved = [m.weight.detach().clone() for m, _ in members]
        types = set()
        try:
            with torch.no_grad():
                for m, _ in members:
                    t = fallback_type(m.weight.shape[-1], ggml_type)
                    types.add(t)
                    m.weight.copy_(gguf_round_trip(m.weight, t).to(m.weight.dtype))
            ppl = perplexity(model, ids, seq_len, batch_size)
        finally:
            with torch.no_grad():
                for (m, _), w in zip(members, saved):
                    m.weight.copy_(w)
        rows.append(Sensitivity(name, "/".join(sorted(types)), ppl, ppl / base - 1))
        if progress is not None:
            progress(i + 1, len(linears))
    rows.sort(key=lambda r: r.increase, reverse=True)
    return base, rows
