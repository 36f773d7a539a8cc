"""W8A8: a float model's block linears replaced by Int8Linear, with per-token activation scales or static
per-tensor scales from a calibration pass.

    quantize_w8a8(model)                                    # dynamic: activations quantized per token
    stats = calibrate(model, token_ids, seq_len=256)
    quantize_w8a8(model, stats, act_calib="percentile")     # static: one scale per layer input

Embeddings, norms and the lm head stay float, as flashlm's int8 loading (flashlm.io.loaded) keeps them.
"""

from typing import Optional

from torch import nn

from flashlm.quant.linear import Int8Linear
from flashlm.quant.ranges import ACT_CALIBRATIONS, act_scale

BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj", "mlp.gate", "mlp.up", "mlp.down")


def quantize_w8a8(model: nn.Module, stats: Optional[dict] = None, act_calib: Optional[str] = None,
                  percentile: float = 99.99) -> dict:
    """Replace every block's nn.Linear of `model` in place; returns {layer name: static scale or None}.

    act_calib: None (per-token scales at run time) or one of ACT_CALIBRATIONS, which needs `stats`
    (calibrate's result on this model, taken after any smoothing)."""
    if act_calib is not None and act_calib not in ACT_CALIBRATIONS:
        raise ValueError(f"act_calib: must be None or one of {ACT_CALIBRATIONS}, got {act_calib!r}")
    if act_calib is not None and stats is None:
        raise ValueError("stats: static activation scales need a calibration pass's statistics")
    scales = {}
    for i, block in enumerate(model.blocks):
        for dotted in BLOCK_LINEARS:
            parent_name, _, leaf = dotted.rpartition(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, leaf, None)
            if linear is None:
                continue
            name = f"blocks.{i}.{dotted}"
            if type(linear) is not nn.Linear:
                raise ValueError(f"model: {name} is {type(linear).__name__}, not a float nn.Linear")
            scale = None
            if act_calib is not None:
                if name not in stats:
                    raise ValueError(f"stats: no calibration statistics for {name}")
                scale = act_scale(stats[name], act_calib, percentile)
            setattr(parent, leaf, Int8Linear.from_float(linear, act_scale=scale))
            scales[name] = scale
    return scales
