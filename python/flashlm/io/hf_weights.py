"""The *.safetensors weights of an HF model directory, renamed to flashlm.models.Transformer's state dict.

    state = read_hf_state_dict("model/", cfg)   # {"blocks.0.attn.q.weight": tensor, ...}

Files are opened with safetensors' safe_open (memory-mapped; never pickle: a directory with only
pytorch_model.bin raises). A sharded model is read through its model.safetensors.index.json. Every tensor
the config implies must be present with the shape the config implies, and nothing else may be (apart from
buffers HF keeps beside the weights: rotary inv_freq, GPT-2's attention-mask bias); otherwise ValueError
names the tensor. Gemma's norm weights w act as (1 + w): flashlm's RMSNorm holds the sum, computed in
float32 as Gemma does. GPT-2's Conv1D weights are [in, out] (x @ W) and its c_attn is q|k|v fused along the
output: they are split and transposed into nn.Linear's [out, in]. Phi-3's qkv_proj (rows q|k|v) and
gate_up_proj (rows gate|up) are split by rows into flashlm's separate linears. The experts of Mixtral and
Qwen-MoE, one tensor per expert and matrix in HF (`block_sparse_moe.experts.3.w1`, `mlp.experts.3.gate_proj`),
are stacked into flashlm's [n_expert, rows, cols] experts_gate / experts_up / experts_down, every expert
checked present with its shape.
"""

from __future__ import annotations

import json
import os
import re

import torch

from flashlm.models import ModelConfig
from flashlm.models.config import MOE_BASE
from flashlm.models.shapes import check_block_count, check_tensor_shapes

_LLAMA_TOP = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LLAMA_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
                "self_attn.q_proj.weight": "attn.q.weight", "self_attn.k_proj.weight": "attn.k.weight",
                "self_attn.v_proj.weight": "attn.v.weight", "self_attn.o_proj.weight": "attn.o.weight",
                "self_attn.q_proj.bias": "attn.q.bias", "self_attn.k_proj.bias": "attn.k.bias",
                "self_attn.v_proj.bias": "attn.v.bias", "self_attn.q_norm.weight": "attn.q_norm.weight",
                "self_attn.k_norm.weight": "attn.k_norm.weight",
                "mlp.gate_proj.weight": "mlp.gate.weight", "mlp.up_proj.weight": "mlp.up.weight",
                "mlp.down_proj.weight": "mlp.down.weight"}
# Gemma 2: post_attention_layernorm is the attention output's norm, pre_feedforward_layernorm the MLP's input's
_GEMMA_LAYER = _LLAMA_LAYER | {"post_attention_layernorm.weight": "post_attn_norm.weight",
                               "pre_feedforward_layernorm.weight": "mlp_norm.weight",
                               "post_feedforward_layernorm.weight": "post_mlp_norm.weight"}
# Phi-3: llama's names, with q|k|v and gate|up each one fused tensor (split below)
_PHI3_LAYER = {k: v for k, v in _LLAMA_LAYER.items() if "norm" in k or "o_proj" in k or "down_proj" in k} | {
    "self_attn.qkv_proj.weight": "attn.qkv.weight", "mlp.gate_up_proj.weight": "mlp.gate_up.weight"}
_LLAMA_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")
# Mixture of experts: the router, and each expert's matrices ("experts_gate.{e}" until they are stacked)
_ATTENTION_LAYER = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}
_MIXTRAL_LAYER = _ATTENTION_LAYER | {"block_sparse_moe.gate.weight": "mlp.router.weight"}
_QWEN_MOE_LAYER = _ATTENTION_LAYER | {
    "mlp.gate.weight": "mlp.router.weight", "mlp.shared_expert.gate_proj.weight": "mlp.shared.gate.weight",
    "mlp.shared_expert.up_proj.weight": "mlp.shared.up.weight",
    "mlp.shared_expert.down_proj.weight": "mlp.shared.down.weight",
    "mlp.shared_expert_gate.weight": "mlp.shared_gate.weight"}
_EXPERT_RE = {"mixtral": re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$"),
              "qwen": re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")}
_EXPERT_MATRIX = {"w1": "experts_gate", "w3": "experts_up", "w2": "experts_down", "gate_proj": "experts_gate",
                  "up_proj": "experts_up", "down_proj": "experts_down"}
_GPT2_TOP = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.weight",
             "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}
# c_attn is split into q/k/v below; Conv1D weights ([in, out]) are transposed
_GPT2_LAYER = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "ln_2.weight": "mlp_norm.weight",
               "ln_2.bias": "mlp_norm.bias", "attn.c_attn.weight": "attn.qkv.weight", "attn.c_attn.bias": "attn.qkv.bias",
               "attn.c_proj.weight": "attn.o.weight", "attn.c_proj.bias": "attn.o.bias",
               "mlp.c_fc.weight": "mlp.fc.weight", "mlp.c_fc.bias": "mlp.fc.bias",
               "mlp.c_proj.weight": "mlp.proj.weight", "mlp.c_proj.bias": "mlp.proj.bias"}
_GPT2_LAYER_RE = re.compile(r"h\.(\d+)\.(.+)$")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved


def flashlm_name(arch: str, hf_name: str) -> str | None:
    """flashlm's name for an HF tensor (GPT-2's fused "blocks.{i}.attn.qkv.*" before the split), None for a
    known buffer to skip; ValueError for a tensor the architecture does not have."""
    if arch == "gpt2":
        name = hf_name.removeprefix("transformer.")
        if name.endswith(_GPT2_BUFFERS):
            return None
        top, layer_re, layer = _GPT2_TOP, _GPT2_LAYER_RE, _GPT2_LAYER
    else:
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        layer = {"gemma2": _GEMMA_LAYER, "gemma3": _GEMMA_LAYER, "phi3": _PHI3_LAYER, "mixtral": _MIXTRAL_LAYER,
                 "qwen2_moe": _QWEN_MOE_LAYER, "qwen3_moe": _QWEN_MOE_LAYER}.get(arch, _LLAMA_LAYER)
        name, top, layer_re = hf_name, _LLAMA_TOP, _LLAMA_LAYER_RE
    if name in top:
        return top[name]
    m = layer_re.match(name)
    if m and m.group(2) in layer:
        return f"blocks.{int(m.group(1))}.{layer[m.group(2)]}"
    expert = _EXPERT_RE["mixtral" if arch == "mixtral" else "qwen"].match(m.group(2)) if m and arch in MOE_BASE \
        else None
    if expert:
        return f"blocks.{int(m.group(1))}.mlp.{_EXPERT_MATRIX[expert.group(2)]}.{int(expert.group(1))}"
    raise ValueError(f"weights: unexpected tensor {hf_name!r} for a {arch} model")


def safetensors_files(path: str) -> list[str]:
    """The weight files of a model directory: the index's shards, or every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: malformed index ({e})") from e
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise ValueError(f"{index}: shard name {shard!r} is not a .safetensors file in the directory")
            if not os.path.isfile(os.path.join(path, shard)):
                raise ValueError(f"{index}: shard {shard!r} is missing")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ValueError(f"{path}: only pickle checkpoints (.bin/.pt), which are never loaded since unpickling "
                         "runs code from the file; convert them to safetensors")
    raise ValueError(f"{path}: no *.safetensors weights")


def _split_gpt2_qkv(state: dict, cfg: ModelConfig) -> None:
    """blocks.{i}.attn.qkv.{weight [d, 3d] (Conv1D), bias [3d]} -> q/k/v [d, d] nn.Linear weights and biases."""
    d = cfg.d_model
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.attn."
        for kind, shape in (("weight", (d, 3 * d)), ("bias", (3 * d,))):
            fused = state.pop(p + f"qkv.{kind}", None)
            if fused is None:
                continue  # reported as missing q/k/v below
            if tuple(fused.shape) != shape:
                raise ValueError(f"weights: h.{i}.attn.c_attn.{kind} has shape {tuple(fused.shape)}, expected {shape}")
            for j, n in enumerate("qkv"):
                part = fused[..., j * d:(j + 1) * d]
                state[p + f"{n}.{kind}"] = part.t().contiguous() if kind == "weight" else part.contiguous()


def _split_phi3(state: dict, sources: dict, cfg: ModelConfig) -> None:
    """blocks.{i}.attn.qkv.weight [q + 2 kv, d] -> q/k/v, blocks.{i}.mlp.gate_up.weight [2 d_ff, d] -> gate/up
    (row slices, as HF's Phi3 splits the fused outputs)."""
    d, q, kv, ff = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for fused, parts in (("attn.qkv", (("attn.q", q), ("attn.k", kv), ("attn.v", kv))),
                             ("mlp.gate_up", (("mlp.gate", ff), ("mlp.up", ff)))):
            w = state.pop(p + fused + ".weight", None)
            if w is None:
                continue  # reported as missing parts below
            source = sources.pop(p + fused + ".weight")
            shape = (sum(n for _, n in parts), d)
            if tuple(w.shape) != shape:
                raise ValueError(f"weights: tensor {source!r} has shape {tuple(w.shape)}, expected {shape}")
            for name, rows in zip((n for n, _ in parts), w.split([n for _, n in parts])):
                state[p + name + ".weight"] = rows.contiguous()
                sources[p + name + ".weight"] = source


def _stack_experts(state: dict, sources: dict, cfg: ModelConfig) -> None:
    """blocks.{i}.mlp.experts_gate.{e} (one [rows, cols] tensor per expert) -> blocks.{i}.mlp.experts_gate
    [n_expert, rows, cols], and the same for up and down; each expert of each layer must be there once, with
    its shape, and no other."""
    shapes = cfg.state_shapes()
    for i in range(cfg.n_layer):
        for matrix in ("experts_gate", "experts_up", "experts_down"):
            stem = f"blocks.{i}.mlp.{matrix}"
            want = shapes[stem][1:]
            parts = []
            for e in range(cfg.n_expert):
                t = state.pop(f"{stem}.{e}", None)
                if t is None:
                    raise ValueError(f"weights: expert {e} of layer {i} ({matrix}) is missing (config.json has "
                                     f"{cfg.n_expert} experts)")
                source = sources.pop(f"{stem}.{e}")
                if tuple(t.shape) != want:
                    raise ValueError(f"weights: tensor {source!r} has shape {tuple(t.shape)}, expected {want}")
                parts.append(t)
            state[stem] = torch.stack(parts)
            sources[stem] = f"model.layers.{i}.(experts).{matrix}"
    extra = sorted(n for n in state if re.search(r"\.mlp\.experts_(gate|up|down)\.\d+$", n))
    if extra:
        raise ValueError(f"weights: unexpected tensor {sources[extra[0]]!r}: config.json has {cfg.n_expert} experts "
                         f"and {cfg.n_layer} layers")


def _check(state: dict, cfg: ModelConfig, sources: dict) -> None:
    if cfg.tie_embeddings and "lm_head.weight" in state:
        # a tied model saved with its (identical) output matrix as well
        if not torch.equal(state["lm_head.weight"], state.get("tok_emb.weight", torch.empty(0))):
            raise ValueError("weights: lm_head.weight differs from the embedding but tie_word_embeddings is set")
        del state["lm_head.weight"]
    layers = "n_layer" if cfg.arch == "gpt2" else "num_hidden_layers"
    hf_name = lambda name: sources.get(name, name)  # noqa: E731
    check_block_count(cfg.n_layer, state, "blocks.", f"config.json: {layers}", shown=hf_name)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    check_tensor_shapes(cfg.state_shapes(), shapes, "weights", shown=hf_name)


def read_hf_state_dict(path: str, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """flashlm's state dict (in `dtype`) from a model directory's safetensors files, checked against cfg."""
    from safetensors import safe_open

    state, sources = {}, {}
    for file in safetensors_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types on a malformed header
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            for hf_name in f.keys():
                name = flashlm_name(cfg.arch, hf_name)
                if name is None:
                    continue
                if name in state:
                    raise ValueError(f"weights: tensor {hf_name!r} appears twice")
                if name == "pos_emb.weight":
                    # the position table may be longer than the context we run with: keep the first rows
                    sl = f.get_slice(hf_name)
                    shape = sl.get_shape()
                    tensor = sl[:cfg.seq_len] if len(shape) == 2 and shape[0] > cfg.seq_len else f.get_tensor(hf_name)
                else:
                    tensor = f.get_tensor(hf_name)
                if not tensor.is_floating_point():
                    raise ValueError(f"weights: {hf_name!r} has dtype {tensor.dtype}, expected a float tensor")
                if cfg.arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) \
                        and "qkv" not in name:
                    if tensor.dim() != 2:
                        raise ValueError(f"weights: {hf_name!r} has shape {tuple(tensor.shape)}, expected 2-D")
                    tensor = tensor.t()
                if cfg.gemma and name.endswith("norm.weight"):
                    tensor = 1.0 + tensor.float()  # Gemma's norms scale by (1 + w): flashlm keeps the sum
                state[name] = tensor.to(dtype).contiguous()
                sources[name] = hf_name
    if cfg.arch == "gpt2":
        _split_gpt2_qkv(state, cfg)
    if cfg.arch == "phi3":
        _split_phi3(state, sources, cfg)
    if cfg.moe:
        _stack_experts(state, sources, cfg)
    _check(state, cfg, sources)
    return state
