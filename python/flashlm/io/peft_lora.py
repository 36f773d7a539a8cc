"""LoRA adapters in HF PEFT's format (adapter_config.json + adapter_model.safetensors) read onto a flashlm model:
the config's fields checked (what PEFT can express but flashlm does not compute is refused by name), every
tensor's name and shape checked before the model is touched, then the model's layers wrapped in LoRALinear.
flashlm.train.peft.peft_format writes the format and reads prompt and prefix tuning with these helpers.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from flashlm.models.lora import apply_lora, check_lora_arguments, lora_layers, positive_int, target_modules

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODULE = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
              "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
              "mlp.down": "mlp.down_proj"}
LORA_NAME_RE = re.compile(r"blocks\.(\d+)\.(.+)$")
# LoRA config fields that change what PEFT computes, with the value flashlm computes: the long-standing ones are
# written (older PEFT versions refuse fields they do not know), the newer ones only checked on load
LORA_WRITTEN = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                 "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
_LORA_DEFAULTS = {**LORA_WRITTEN, "lora_bias": False, "exclude_modules": None, "trainable_token_indices": None,
                  "alora_invocation_tokens": None, "use_qalora": False, "layer_replication": None, "target_parameters": None, "use_bdlora": None,
                  "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None}
# Inits that change the base's weights too (PiSSA, OLoRA, LoftQ, ...): the adapter alone is not the model
_LORA_INITS = (True, False, "gaussian")


def hf_lora_prefix(name: str) -> str:
    """PEFT's key stem of flashlm's LoRA module "blocks.{i}.attn.q": "base_model.model.model.layers.{i}.
    self_attn.q_proj"."""
    m = LORA_NAME_RE.match(name)
    return f"base_model.model.model.layers.{m.group(1)}.{HF_MODULE[m.group(2)]}"


def check_llama_family(model: nn.Module) -> None:
    arch = model.cfg.arch
    if arch == "gpt2":  # HF's GPT-2 fuses q, k, v into one Conv1D: no PEFT key matches flashlm's split layers
        raise NotImplementedError("model: PEFT-format LoRA is written for Llama-family models, not gpt2")


def read_tensors(file: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise ValueError(f"{file}: missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read ({e})") from e


def load_peft_lora(model: nn.Module, config: dict, tensors: dict, where: str) -> nn.Module:
    """Wraps model's layers (a flashlm Transformer of a Llama-family base) in place with the LoRA adapter of PEFT
    config (adapter_config.json's dict, `where` names it) and tensors; returns model."""
    check_llama_family(model)
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
        stem = hf_lora_prefix(name)
        expected[f"{stem}.lora_A.weight"] = (r, m.in_features)
        expected[f"{stem}.lora_B.weight"] = (m.out_features, r)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ValueError(f"adapter: does not match the model: tensors {unknown[:3]} are not the model's, "
                         f"{missing[:3]} are missing")
    for key, shape in expected.items():
        check_tensor(tensors[key], shape, key)
    apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            stem = hf_lora_prefix(name)
            m.lora_A.copy_(tensors[f"{stem}.lora_A.weight"])
            m.lora_B.copy_(tensors[f"{stem}.lora_B.weight"])
    return model


def virtual_token_layout(peft_type: str, cfg) -> dict:
    """The sizes PEFT writes in the config of prompt tuning (a virtual token is an embedding, d_model wide) or prefix
    tuning (a virtual token is every layer's key and value, PEFT sizing them for GQA by the K/V heads) on a model
    of ModelConfig cfg."""
    if peft_type == "PROMPT_TUNING":
        return {"token_dim": cfg.d_model, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer}
    return {"token_dim": cfg.n_kv_head * cfg.head_dim, "num_attention_heads": cfg.n_kv_head, "num_layers": cfg.n_layer}


def read_virtual_tokens(cfg, config: dict, tensors: dict, where: str) -> torch.Tensor:
    """A prompt- or prefix-tuning adapter's table prompt_embeddings [P, width] (prompt tuning: d_model; prefix
    tuning: n_layer * 2 * n_kv_head * head_dim), its config checked against the model of ModelConfig cfg: the sizes
    must be the model's (a prefix's width alone could match another layout of heads) and leave room for a prompt."""
    if config.get("num_transformer_submodules", 1) != 1:
        raise NotImplementedError(f"{where}: num_transformer_submodules must be 1 (a decoder-only model)")
    if config.get("prefix_projection", False):
        raise NotImplementedError(f"{where}: prefix_projection=true is not supported")
    P = positive_int(config.get("num_virtual_tokens"), f"{where}: num_virtual_tokens")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"adapter: expected the one tensor prompt_embeddings, got {sorted(tensors)[:3]}")
    for key, value in virtual_token_layout(config["peft_type"], cfg).items():
        if config.get(key, value) != value:
            raise ValueError(f"adapter: {key}={config.get(key)!r} does not match the model's {value}")
    prompt = config["peft_type"] == "PROMPT_TUNING"
    width = cfg.d_model if prompt else cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim
    check_tensor(tensors["prompt_embeddings"], (P, width), "prompt_embeddings")
    if P >= cfg.seq_len:
        raise ValueError(f"{where}: num_virtual_tokens {P} leaves no room for a prompt within the model's context "
                         f"{cfg.seq_len}")
    return tensors["prompt_embeddings"].float()


def check_tensor(value: torch.Tensor, shape: tuple, key: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"adapter: {key} has shape {tuple(value.shape)}, the model needs {tuple(shape)}")
    if not value.is_floating_point():
        raise ValueError(f"adapter: {key} must be floating point, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):  # one NaN would make every output of its layer NaN
        raise ValueError(f"adapter: {key} holds values that are not finite")
