"""LoadedModel (what the loaders return) and the pieces the HF and GGUF loaders share: building a
Transformer without allocating weights that are about to be replaced, and swapping its block linears for
quantized ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from flashlm.io.tokenizer import Tokenizer
from flashlm.models import ModelConfig, Transformer
from flashlm.models.transformer import rope_tables
from flashlm.quant.rtn import int4_group_size
from flashlm.quant.w8a8 import BLOCK_LINEARS

# The longest context loaded without an explicit max_model_len: the rope tables (or GPT-2's position table)
# have a row per position, and a file's context length is untrusted.
MAX_DEFAULT_CONTEXT = 1 << 20


def context_length(declared: int, max_model_len, where: str) -> int:
    """min(declared, max_model_len), checked."""
    if max_model_len is not None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len <= 0:
            raise ValueError(f"max_model_len: must be a positive integer, got {max_model_len!r}")
        return min(declared, max_model_len)
    if declared > MAX_DEFAULT_CONTEXT:
        raise ValueError(f"{where}: context of {declared} positions; pass max_model_len (at most "
                         f"{MAX_DEFAULT_CONTEXT} without it)")
    return declared


@dataclass
class LoadedModel:
    model: Transformer                   # eval mode, on the CPU
    config: ModelConfig
    tokenizer: Optional[Tokenizer]       # None when the source has none
    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None
    chat_template: Optional[str] = None
    source: str = ""                     # "hf:<dir>" or "gguf:<file>"


class _LightMetaConstruction(TorchFunctionMode):
    """Used inside torch.device("meta") while a Transformer is built: random initialisation of meta tensors
    (normal_) is skipped, and torch.arange without a device runs on the CPU (the rope tables are real
    buffers). Both would otherwise reach torch's Python implementations for meta tensors, whose first use
    imports its compiler stack: measured 3.2 s and ~70 MB, to initialise weights that hold no data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, nn.init.normal_):
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        if func is torch.arange and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def empty_model(cfg: ModelConfig, attn_impl: str = "flashlm") -> Transformer:
    """A Transformer whose parameters are on the meta device (no memory) and whose rope tables are real: the
    loader assigns every parameter afterwards (load_state_dict(assign=True) or module replacement)."""
    with torch.device("meta"), _LightMetaConstruction():
        model = Transformer(cfg, attn_impl=attn_impl)
    if cfg.rotary and model.rope_cos.is_meta:
        model.rope_cos, model.rope_sin = rope_tables(cfg)
    if cfg.rope_local_theta is not None and model.rope_local_cos.is_meta:
        model.rope_local_cos, model.rope_local_sin = rope_tables(cfg, theta=cfg.rope_local_theta)
    return model


def finish(model: nn.Module) -> None:
    """Checks that every tensor was loaded; eval mode, no gradients (the model is for inference)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"weights: {name} was not loaded")
    model.eval()
    model.requires_grad_(False)


def set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_block_linears(model: Transformer, quantize: Optional[str]) -> None:
    """Replaces every block's nn.Linear by flashlm.quant's Int8Linear (W8A8, per-channel) or Int4Linear (W4A16,
    symmetric, the largest group of 128/64/32 dividing in_features). Embeddings, norms and the lm head stay."""
    from flashlm.quant import Int4Linear, Int8Linear

    if quantize is None:
        return
    if quantize not in ("int8", "int4"):
        raise ValueError(f"quantize: must be None, 'int8' or 'int4', got {quantize!r}")
    for block in model.blocks:
        for dotted in BLOCK_LINEARS:
            try:
                linear = block.get_submodule(dotted)
            except AttributeError:
                continue
            if quantize == "int8":
                q = Int8Linear.from_float(linear)
            else:
                q = Int4Linear.from_float(linear, group_size=int4_group_size(linear.in_features))
            set_module(block, dotted, q)
