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
import re
from typing import Optional

import torch
from torch import nn

from flashlm.io.hf_config import read_json
from flashlm.train.peft.common import positive_int
from flashlm.train.peft.lora import apply_lora, check_lora_arguments, lora_layers, target_modules
from flashlm.train.peft.prefix_tuning import PrefixTuning, prefix_width
from flashlm.train.peft.prompt_tuning import PromptTuning

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_HF_MODULE = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
              "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
              "mlp.down": "mlp.down_proj"}
_LORA_NAME_RE = re.compile(r"blocks\.(\d+)\.(.+)$")
# LoRA config fields that change what PEFT computes, with the value flashlm computes: the long-standing ones are
# written (older PEFT versions refuse fields they do not know), the newer ones only checked on load
_LORA_WRITTEN = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                 "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
_LORA_DEFAULTS = {**_LORA_WRITTEN, "lora_bias": False, "exclude_modules": None, "trainable_token_indices": None,
                  "alora_invocation_tokens": None, "use_qalora": False, "layer_replication": None, "target_parameters": None, "use_bdlora": None,
                  "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None}
# Inits that change the base's weights too (PiSSA, OLoRA, LoftQ, ...): the adapter alone is not the model
_LORA_INITS = (True, False, "gaussian")


def _hf_lora_prefix(name: str) -> str:
    """PEFT's key stem of flashlm's LoRA module "blocks.{i}.attn.q": "base_model.model.model.layers.{i}.
    self_attn.q_proj"."""
    m = _LORA_NAME_RE.match(name)
    return f"base_model.model.model.layers.{m.group(1)}.{_HF_MODULE[m.group(2)]}"


def _check_llama_family(model: nn.Module) -> None:
    arch = model.cfg.arch
    if arch == "gpt2":  # HF's GPT-2 fuses q, k, v into one Conv1D: no PEFT key matches flashlm's split layers
        raise NotImplementedError("model: PEFT-format LoRA is written for Llama-family models, not gpt2")


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
    _check_llama_family(model)
    first = next(iter(layers.values()))
    for name, m in layers.items():
        if (m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora):
            raise NotImplementedError(f"model: {name} has another rank or alpha than the other LoRA layers")
        if m.merged:
            raise ValueError(f"model: {name} is merged; unmerge it before saving the adapter")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = sorted({_HF_MODULE[_LORA_NAME_RE.match(n).group(2)].split(".")[1] for n in layers})
    config = {"peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
              "use_rslora": first.rslora, "target_modules": targets, "init_lora_weights": True, **_LORA_WRITTEN}
    tensors = {}
    for name, m in layers.items():
        stem = _hf_lora_prefix(name)
        tensors[f"{stem}.lora_A.weight"] = m.lora_A
        tensors[f"{stem}.lora_B.weight"] = m.lora_B
    return config, tensors


def _prompt_config(peft_type: str, num_virtual_tokens: int, cfg) -> dict:
    """PEFT's config of prompt or prefix tuning with num_virtual_tokens on a model of ModelConfig cfg."""
    if peft_type == "PROMPT_TUNING":
        return {"peft_type": peft_type, "num_virtual_tokens": num_virtual_tokens, "token_dim": cfg.d_model,
                "num_transformer_submodules": 1, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
                "prompt_tuning_init": "RANDOM"}
    token_dim = cfg.n_kv_head * cfg.head_dim  # PEFT's width of one layer's keys (as it sizes them for GQA)
    return {"peft_type": peft_type, "num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.n_kv_head, "num_layers": cfg.n_layer,
            "encoder_hidden_size": token_dim, "prefix_projection": False}


def load_peft(model: nn.Module, path) -> nn.Module:
    """Puts the PEFT adapter in directory path onto model (a flashlm Transformer of the adapter's base model):
    LoRA wraps the model's layers in place and returns the model; prompt and prefix tuning return a
    PromptTuning / PrefixTuning around it. ValueError names what does not match."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory")
    config = read_json(os.path.join(path, CONFIG_FILE), required=True)
    tensors = _read_tensors(os.path.join(path, WEIGHTS_FILE))
    peft_type = config.get("peft_type")
    where = os.path.join(path, CONFIG_FILE)
    if peft_type == "LORA":
        return _load_lora(model, config, tensors, where)
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return _load_prompt(model, config, tensors, where)
    raise NotImplementedError(f"{where}: peft_type {peft_type!r} is not one flashlm loads (LORA, PROMPT_TUNING, "
                              f"PREFIX_TUNING)")


def _read_tensors(file: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise ValueError(f"{file}: missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read ({e})") from e


def _load_lora(model: nn.Module, config: dict, tensors: dict, where: str) -> nn.Module:
    _check_llama_family(model)
    for key, value in _LORA_DEFAULTS.items():
        if config.get(key, value) not in (value, None):
            raise NotImplementedError(f"{where}: {key}={config[key]!r} is not supported (only {value!r})")
    if config.get("init_lora_weights", True) not in _LORA_INITS:
        raise NotImplementedError(f"{where}: init_lora_weights={config['init_lora_weights']!r} changes the base "
                                  f"model's weights; only {_LORA_INITS} are supported")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise NotImplementedError(f"{where}: target_modules must be a list of module names, got {targets!r}")
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    dropout = config.get("lora_dropout", 0.0)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    try:
        check_lora_arguments(r, alpha, dropout)
        found = target_modules(model, targets)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    # every tensor checked before the model is touched
    expected = {}
    for name, m in found:
        stem = _hf_lora_prefix(name)
        expected[f"{stem}.lora_A.weight"] = (r, m.in_features)
        expected[f"{stem}.lora_B.weight"] = (m.out_features, r)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ValueError(f"adapter: does not match the model: tensors {unknown[:3]} are not the model's, "
                         f"{missing[:3]} are missing")
    for key, shape in expected.items():
        _check_tensor(tensors[key], shape, key)
    apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            stem = _hf_lora_prefix(name)
            m.lora_A.copy_(tensors[f"{stem}.lora_A.weight"])
            m.lora_B.copy_(tensors[f"{stem}.lora_B.weight"])
    return model


def _check_tensor(value: torch.Tensor, shape: tuple, key: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"adapter: {key} has shape {tuple(value.shape)}, the model needs {tuple(shape)}")
    if not value.is_floating_point():
        raise ValueError(f"adapter: {key} must be floating point, got {value.dtype}")


def _load_prompt(model: nn.Module, config: dict, tensors: dict, where: str) -> nn.Module:
    if config.get("num_transformer_submodules", 1) != 1:
        raise NotImplementedError(f"{where}: num_transformer_submodules must be 1 (a decoder-only model)")
    if config.get("prefix_projection", False):
        raise NotImplementedError(f"{where}: prefix_projection=true is not supported")
    P = positive_int(config.get("num_virtual_tokens"), f"{where}: num_virtual_tokens")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"adapter: expected the one tensor prompt_embeddings, got {sorted(tensors)[:3]}")
    # the model's sizes must be the adapter's (a prefix's width alone could match another layout)
    for key, value in _prompt_config(config["peft_type"], P, model.cfg).items():
        if key in ("token_dim", "num_layers", "num_attention_heads") and config.get(key, value) != value:
            raise ValueError(f"adapter: {key}={config.get(key)!r} does not match the model's {value}")
    width = model.cfg.d_model if config["peft_type"] == "PROMPT_TUNING" else prefix_width(model.cfg)
    _check_tensor(tensors["prompt_embeddings"], (P, width), "prompt_embeddings")
    tuned = (PromptTuning if config["peft_type"] == "PROMPT_TUNING" else PrefixTuning)(model, P)
    with torch.no_grad():
        tuned.prompt_embeddings.copy_(tensors["prompt_embeddings"])
    return tuned
