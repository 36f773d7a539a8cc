"""Adapters in HF PEFT's format: a directory with adapter_config.json and adapter_model.safetensors, which
peft.PeftModel.from_pretrained loads onto the matching HF model, and which flashlm loads onto its own load of
that model.

    save_peft(model, "adapter/", base_model_name_or_path="TinyLlama-1.1B")   # LoRA layers in model
    save_peft(tuned, "adapter/")                                             # a PromptTuning or PrefixTuning
    model = load_peft(load_hf("TinyLlama-1.1B").model, "adapter/")          # LoRA: the same model, wrapped

LoRA tensors are named as PEFT names them on an HF Llama-family model ("base_model.model.model.layers.0.
self_attn.q_proj.lora_A.weight"); prompt and prefix tuning save one tensor, "prompt_embeddings". What PEFT can
express but flashlm does not compute (DoRA, per-module ranks, bias training, ...) is refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from flashlm.io.hf_config import read_json
from flashlm.io.peft_lora import (CONFIG_FILE, HF_MODULE, LORA_NAME_RE, LORA_WRITTEN, WEIGHTS_FILE,
                                  check_llama_family, hf_lora_prefix, load_peft_lora, read_tensors,
                                  read_virtual_tokens, virtual_token_layout)
from flashlm.models.lora import lora_layers
from flashlm.train.peft.prefix_tuning import PrefixTuning
from flashlm.train.peft.prompt_tuning import PromptTuning


def _base_config(peft_type: str, base_model_name_or_path: Optional[str]) -> dict:
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path, "revision": None}


def save_peft(model: nn.Module, path, base_model_name_or_path: Optional[str] = None) -> None:
    """Writes the adapter of `model` (LoRA layers inside it, or a PromptTuning / PrefixTuning) to directory path."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if isinstance(model, (PromptTuning, PrefixTuning)):
        peft_type = "PROMPT_TUNING" if isinstance(model, PromptTuning) else "PREFIX_TUNING"
        config = _prompt_config(peft_type, model.num_virtual_tokens, model.model.cfg)
        tensors = {"prompt_embeddings": model.prompt_embeddings}
    else:
        config, tensors = _lora_config_and_tensors(model)
    config.update(_base_config(config["peft_type"], base_model_name_or_path))
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _lora_config_and_tensors(model: nn.Module):
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no adapter (no LoRA layers, and not a PromptTuning or PrefixTuning)")
    check_llama_family(model)
    first = next(iter(layers.values()))
    for name, m in layers.items():
        if (m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora):
            raise NotImplementedError(f"model: {name} has another rank or alpha than the other LoRA layers")
        if m.merged:
            raise ValueError(f"model: {name} is merged; unmerge it before saving the adapter")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = sorted({HF_MODULE[LORA_NAME_RE.match(n).group(2)].split(".")[1] for n in layers})
    config = {"peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
              "use_rslora": first.rslora, "target_modules": targets, "init_lora_weights": True, **LORA_WRITTEN}
    tensors = {}
    for name, m in layers.items():
        stem = hf_lora_prefix(name)
        tensors[f"{stem}.lora_A.weight"] = m.lora_A
        tensors[f"{stem}.lora_B.weight"] = m.lora_B
    return config, tensors


def _prompt_config(peft_type: str, num_virtual_tokens: int, cfg) -> dict:
    """PEFT's config of prompt or prefix tuning with num_virtual_tokens on a model of ModelConfig cfg."""
    layout = virtual_token_layout(peft_type, cfg)
    if peft_type == "PROMPT_TUNING":
        return {"peft_type": peft_type, "num_virtual_tokens": num_virtual_tokens, **layout,
                "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    return {"peft_type": peft_type, "num_virtual_tokens": num_virtual_tokens, **layout,
            "num_transformer_submodules": 1, "encoder_hidden_size": layout["token_dim"], "prefix_projection": False}


def load_peft(model: nn.Module, path) -> nn.Module:
    """Puts the PEFT adapter in directory path onto model (a flashlm Transformer of the adapter's base model):
    LoRA wraps the model's layers in place and returns the model; prompt and prefix tuning return a
    PromptTuning / PrefixTuning around it. ValueError names what does not match."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory")
    config = read_json(os.path.join(path, CONFIG_FILE), required=True)
    tensors = read_tensors(os.path.join(path, WEIGHTS_FILE))
    peft_type = config.get("peft_type")
    where = os.path.join(path, CONFIG_FILE)
    if peft_type == "LORA":
        return load_peft_lora(model, config, tensors, where)
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return _load_prompt(model, config, tensors, where)
    raise NotImplementedError(f"{where}: peft_type {peft_type!r} is not one flashlm loads (LORA, PROMPT_TUNING, "
                              f"PREFIX_TUNING)")


def _load_prompt(model: nn.Module, config: dict, tensors: dict, where: str) -> nn.Module:
    table = read_virtual_tokens(model.cfg, config, tensors, where)
    tuned = (PromptTuning if config["peft_type"] == "PROMPT_TUNING" else PrefixTuning)(model, table.shape[0])
    with torch.no_grad():
        tuned.prompt_embeddings.copy_(table)
    return tuned
