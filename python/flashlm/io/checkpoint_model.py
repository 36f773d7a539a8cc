"""A flashlm training checkpoint (a ckpt-*.pt file, or a run's folder: its latest) as a LoadedModel, so the
runtime runs what the trainer wrote: `flashlm generate --model runs/flashlm`."""

from __future__ import annotations

from typing import Optional

from flashlm.io.loaded import LoadedModel, context_length, empty_model, finish
from flashlm.models import ModelConfig


def load_checkpoint_model(path, max_model_len: Optional[int] = None) -> LoadedModel:
    from tokenizers import Tokenizer as Backend

    from flashlm.io.checkpoint import read_checkpoint
    from flashlm.io.tokenizer import Tokenizer

    ckpt = read_checkpoint(path)
    cfg = ModelConfig.from_dict(dict(ckpt["model_config"]))
    seq_len = context_length(cfg.seq_len, max_model_len, "model_config")
    if seq_len != cfg.seq_len:  # gpt2's position table is cut to the context actually used
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "seq_len": seq_len})
    state = dict(ckpt["model"])
    if cfg.arch == "gpt2" and "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][:seq_len]
    model = empty_model(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # names the missing, unexpected or mis-shaped tensors
        raise ValueError(f"checkpoint: its weights do not fit its model_config: {e}") from e
    finish(model)
    tokenizer = None
    eos = [int(ckpt["eos_token_id"])] if ckpt.get("eos_token_id") is not None else []
    if ckpt.get("tokenizer"):
        tokenizer = Tokenizer(Backend.from_str(ckpt["tokenizer"]), eos_token_ids=eos)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos, source=f"checkpoint:{path}")
