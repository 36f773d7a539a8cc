"""A flashlm training checkpoint (a ckpt-*.pt file, or a run's folder: its latest) as a LoadedModel, so the
runtime runs what the trainer wrote: `flashlm generate --model runs/flashlm`.

A checkpoint is a file from elsewhere: its model_config is checked against the weights it holds (the layer
count against the blocks first, then every name and shape) before a model is built, and its tokenizer and
end-of-text id against the model's vocabulary; ValueError names the checkpoint and what is wrong.
"""

from __future__ import annotations

from typing import Optional

import torch

from flashlm.io.quantized_checkpoint import put_quantized_layers, split_quantized_state
from flashlm.io.loaded import LoadedModel, context_length, empty_model, finish
from flashlm.io.tokenizer import check_fits_model
from flashlm.models import ModelConfig
from flashlm.models.shapes import check_block_count, check_tensor_shapes


def load_checkpoint_model(path, max_model_len: Optional[int] = None) -> LoadedModel:
    from flashlm.io.checkpoint import find_checkpoint, read_checkpoint

    path = find_checkpoint(path)
    return model_from_checkpoint(read_checkpoint(path), path, max_model_len)


def checkpoint_config(ckpt: dict, where: str) -> ModelConfig:
    """The checkpoint's ModelConfig, checked against its weights (ckpt["model"])."""
    raw, state = ckpt["model_config"], ckpt["model"]
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: model_config is a {type(raw).__name__}, expected a dict")
    if not isinstance(state, dict):
        raise ValueError(f"{where}: model is a {type(state).__name__}, expected a state dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{where}: weight {name!r} is not a floating-point tensor")
    check_block_count(raw.get("n_layer"), state, "blocks.", f"{where}: model_config n_layer")
    try:
        cfg = ModelConfig.from_dict(dict(raw))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model_config: {e}") from None
    check_tensor_shapes(cfg.state_shapes(), {k: tuple(t.shape) for k, t in state.items()}, where)
    return cfg


def checkpoint_tokenizer(ckpt: dict, cfg: ModelConfig, where: str):
    """(the flashlm Tokenizer or None, the end-of-text ids), checked against the model's vocabulary. The
    checkpoint holds its to_str() text: a tokenizer.json, or a t5 GGUF vocabulary in flashlm's form."""
    from flashlm.io.gguf_vocab import tokenizer_from_json

    eos = ckpt.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < cfg.vocab_size):
        raise ValueError(f"{where}: eos_token_id {eos!r} is outside the vocabulary [0, {cfg.vocab_size})")
    text = ckpt.get("tokenizer")
    if not text:
        return None, [] if eos is None else [eos]
    if not isinstance(text, str):
        raise ValueError(f"{where}: tokenizer is a {type(text).__name__}, expected the tokenizer's JSON text")
    try:
        tok = tokenizer_from_json(text, eos)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    check_fits_model(tok, cfg.vocab_size, where)
    return tok, tok.eos_token_ids


def model_from_checkpoint(ckpt: dict, path, max_model_len: Optional[int] = None) -> LoadedModel:
    """A read checkpoint (flashlm.io.checkpoint.read_checkpoint) as a LoadedModel on the CPU, in eval mode."""
    where = f"checkpoint {path}"
    # int4/int8 layers (`flashlm quantize --method`): checked, set aside
    state, int4, int8 = split_quantized_state(ckpt, where)
    # A run trained with --qat-lsq holds its learned steps too: loaded as a model, it is the float one (as every
    # QAT run loads); `flashlm quantize RUN OUT --method qat` reads the steps (flashlm.io.qat_export).
    if isinstance(state, dict):  # anything else is refused by checkpoint_config, naming it
        state = {k: v for k, v in state.items() if not isinstance(k, str) or not k.endswith(".weight_step")}
    cfg = checkpoint_config({**ckpt, "model": state}, where)
    tokenizer, eos = checkpoint_tokenizer(ckpt, cfg, where)
    seq_len = context_length(cfg.seq_len, max_model_len, f"{where}: model_config seq_len")
    if seq_len != cfg.seq_len:  # gpt2's position table is cut to the context actually used
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "seq_len": seq_len})
        if cfg.arch == "gpt2":
            state["pos_emb.weight"] = state["pos_emb.weight"][:seq_len]
    model = empty_model(cfg)
    put_quantized_layers(model, state, int4, int8)
    model.load_state_dict(state, assign=True)
    finish(model)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos, source=f"checkpoint:{path}")
