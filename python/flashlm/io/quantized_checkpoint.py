"""Quantized models on disk: a flashlm checkpoint file (the trainer's format, flashlm.io.checkpoint) whose block
linears are Int4Linear (`flashlm quantize --method gptq|awq`) or Int8Linear (`--method w8a8|smoothquant`);
load_model and every `--model` flag read it.

Beside the trainer's keys (model_config, model, tokenizer, eos_token_id) the file has an "int4" entry
(flashlm.io.int4_checkpoint) and/or an "int8" entry (flashlm.io.int8_checkpoint), each naming its layers and
how they were quantized; the layers' buffers are in the model state under the modules' own names. A file is
untrusted: every field and tensor is checked against the model config before a model is built, and a layer
is listed by at most one entry.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

_LAYER = re.compile(r"^blocks\.\d{1,6}\.(attn\.[qkvo]|mlp\.(fc|proj|gate|up|down))$")


def checked_entry(ckpt: dict, key: str, where: str) -> Optional[dict]:
    """The checkpoint's `key` entry (int4, int8): a dict whose "layers" is a list of distinct block linear
    names; None without one (or when the model state is not a dict, which the checkpoint's own check names)."""
    meta = ckpt.get(key)
    if meta is None or not isinstance(ckpt["model"], dict):
        return None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: {key} is a {type(meta).__name__}, expected a dict")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) and _LAYER.match(n) for n in layers):
        raise ValueError(f"{where}: {key} layers must be a list of block linear names (blocks.<i>.attn.q, ...)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{where}: {key} layers lists a layer twice")
    return meta


def save_quantized_model(loaded, path, method: str) -> None:
    """Writes a LoadedModel whose block linears are Int4Linear and/or Int8Linear as above; `method` is recorded
    in each entry. ValueError when the model has neither."""
    from flashlm.io.checkpoint import FORMAT
    from flashlm.io.int4_checkpoint import INT4_KEY, int4_meta
    from flashlm.io.int8_checkpoint import INT8_KEY, int8_meta

    model = loaded.model
    entries = {key: meta for key, meta in ((INT4_KEY, int4_meta(model, method)), (INT8_KEY, int8_meta(model, method)))
               if meta is not None}
    if not entries:
        raise ValueError("model: no Int4Linear or Int8Linear layers to save")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {"format": FORMAT, "model_config": loaded.config.to_dict(), "model": state, **entries}
    tok = loaded.tokenizer
    if tok is not None and hasattr(tok, "to_str"):
        ckpt["tokenizer"] = tok.to_str()
    if loaded.eos_token_ids:
        ckpt["eos_token_id"] = int(loaded.eos_token_ids[0])
    torch.save(ckpt, path)


def split_quantized_state(ckpt: dict, where: str) -> tuple[dict, dict, dict]:
    """(the model state with each quantized layer's weight replaced by a meta float tensor of its float shape,
    so that the config's shape check applies; int4 layers; int8 layers), the last two for
    put_quantized_layers."""
    from flashlm.io.int4_checkpoint import INT4_KEY, split_int4_state
    from flashlm.io.int8_checkpoint import INT8_KEY, split_int8_state

    four, eight = checked_entry(ckpt, INT4_KEY, where), checked_entry(ckpt, INT8_KEY, where)
    both = sorted(set(four["layers"]) & set(eight["layers"])) if four and eight else []
    if both:
        raise ValueError(f"{where}: layer {both[0]} is listed by both int4 and int8")
    state, int4 = split_int4_state(ckpt, where)
    state, int8 = split_int8_state({**ckpt, "model": state}, where)
    return state, int4, int8


def put_quantized_layers(model, state: dict, int4: dict, int8: dict) -> None:
    """Replaces model's linears named by split_quantized_state by quantized modules on the meta device and puts
    their tensors into state, for model.load_state_dict(state, assign=True)."""
    from flashlm.io.int4_checkpoint import put_int4_layers
    from flashlm.io.int8_checkpoint import put_int8_layers

    put_int4_layers(model, state, int4)
    put_int8_layers(model, state, int8)
