"""Export a flashlm Transformer (or its state dict, or a training checkpoint) for other runtimes.

    export_hf(model, cfg, tokenizer_json, "out/")          # transformers (GPT-2, Llama, Qwen2/3, Gemma, Phi-3, MoE)
    export_gguf(model, cfg, tokenizer_json, "m.gguf", type="Q8_0")   # llama.cpp
    export_checkpoint("ckpt.pt", gguf_path="m.gguf", hf_dir="out/")  # what `flashlm export` runs (or a run folder)

HF: config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json, with HF's names
and layouts: GPT-2's Conv1D weights are [in, out] and its q/k/v one fused c_attn (rows q|k|v, so its
columns after the transpose); llama's, qwen2's and qwen3's weights are nn.Linear's [out, in] as flashlm stores
them, and their RoPE (Llama 3's scaling included) is the same rotate-half convention, so nothing is
permuted; gemma2's and gemma3's norm weights are written as Gemma's w of (1 + w); phi3's q|k|v and gate|up
are fused by rows into qkv_proj and gate_up_proj (GGUF: attn_qkv and a [2 d_ff] ffn_up, as llama.cpp's phi3);
the experts of mixtral, qwen2_moe and qwen3_moe are written one tensor per expert (HF) or stacked (GGUF's
ffn_*_exps), Mixtral as llama.cpp's llama with experts.
HF's GPT-2 has no output projection apart from the embedding: exporting an untied gpt2 raises ValueError. The config is a ModelConfig (or its dict), checked by ModelConfig itself, and the state dict's
keys and shapes are checked against ModelConfig.state_shapes().

GGUF: llama.cpp's architecture names, metadata keys and tensor names (as convert_hf_to_gguf.py writes
them); llama's q/k rows are permuted from the rotate-half layout into ggml's interleaved-pair rope layout
(qwen2's and qwen3's rope in ggml rotates halves: not permuted), and Llama 3's rope scaling becomes the rope_freqs
tensor; GPT-2 attention is one attn_qkv tensor (llama.cpp's gpt2 also reads an untied output, so GGUF
takes it; llama.cpp's gemma2/gemma3 do not, so an untied gemma raises, as does one whose query_pre_attn_scalar
or soft-caps llama.cpp cannot compute). The tensors go through `flashlm quantize`'s writer: `type` is one
of its mixes (F32, F16, BF16, Q8_0, Q4_0, ..., Q4_K_M), each tensor gets the type llama.cpp's rules give
it, norms and biases stay F32, and the quantized bytes are flashlm's quantizers' (ggml's reference
bytes). The tokenizer is written by flashlm.io.gguf_tokenizer (byte-level BPE only).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from flashlm.io.checkpoint import find_checkpoint, read_checkpoint
from flashlm.io.checkpoint_model import checkpoint_config, checkpoint_tokenizer
from flashlm.io.gguf_layout import (check_llama_cpp_gemma, check_llama_cpp_head_dim, check_llama_cpp_moe, gguf_arch,
                                    longrope_tensors, moe_metadata, window_metadata)
from flashlm.io.gguf_tokenizer import EOS_NAMES, tokenizer_metadata
from flashlm.io.gguf_vocab_json import vocab_from_json
from flashlm.io.hf_source import llama3_rope_factors, permute_rope_rows
from flashlm.io.quantize_file import write_quantized
from flashlm.models import ModelConfig
from flashlm.models.shapes import check_block_count, check_tensor_shapes
from flashlm.quant.mix import MIXES

_REQUIRED = ("arch", "vocab_size", "n_layer", "n_head", "d_model", "seq_len")


def _config_dict(model_config) -> dict:
    if hasattr(model_config, "to_dict"):
        return dict(model_config.to_dict())
    if isinstance(model_config, dict):
        return dict(model_config)
    raise ValueError(f"model_config: expected a ModelConfig or its dict, got {type(model_config).__name__}")


def _state_dict(model_or_state) -> dict:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    if not isinstance(state, dict):
        raise ValueError(f"model_or_state: expected a Transformer or its state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"model_or_state: {key} is not a floating-point tensor")
        out[key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def resolve(model_or_state, model_config) -> tuple[ModelConfig, dict]:
    """(the config, float32 CPU state dict), with every key and shape checked against the config."""
    cfg = _config_dict(model_config)
    state = _state_dict(model_or_state)
    # Sizes that no default may stand in for (a llama's seq_len, say, shows in no tensor's shape).
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"model_config: missing {missing}")
    check_block_count(cfg["n_layer"], state, "blocks.", "model_config: n_layer")
    try:
        s = ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model_config: {e}") from None
    if s.tie_embeddings and "lm_head.weight" in state and "tok_emb.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["tok_emb.weight"]):
            raise ValueError("model_or_state: tie_embeddings is set but lm_head.weight differs from tok_emb.weight")
        del state["lm_head.weight"]
    check_tensor_shapes(s.state_shapes(), {k: tuple(v.shape) for k, v in state.items()}, "model_or_state")
    return s, state


def _eos_id(tokenizer_json, eos_token_id) -> int | None:
    if eos_token_id is not None or tokenizer_json is None:
        return eos_token_id
    spec = json.loads(tokenizer_json) if isinstance(tokenizer_json, (str, bytes)) else tokenizer_json
    vocab = {a["content"]: a["id"] for a in spec.get("added_tokens") or []} | (spec.get("model") or {}).get("vocab", {})
    return next((int(vocab[n]) for n in EOS_NAMES if n in vocab), None)


# --------------------------------------------------------------------------------------------------- HF


def hf_tensors(s: ModelConfig, state: dict) -> dict:
    """The state dict under HF's names and layouts (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM)."""
    out = {}
    if s.arch == "gpt2":
        if not s.tie_embeddings:
            raise ValueError("model_config: HF's GPT-2 ties its output projection to the embedding "
                             "(tie_embeddings is False); export arch llama, or GGUF")
        out |= {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
                "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
        for i in range(s.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for kind in ("weight", "bias"):
                out[h + f"ln_1.{kind}"] = state[p + f"attn_norm.{kind}"]
                out[h + f"ln_2.{kind}"] = state[p + f"mlp_norm.{kind}"]
            # Conv1D computes x @ W + b with W [in, out]: the nn.Linear weights transposed
            out[h + "attn.c_attn.weight"] = torch.cat([state[p + f"attn.{n}.weight"] for n in "qkv"]).T
            out[h + "attn.c_attn.bias"] = torch.cat([state[p + f"attn.{n}.bias"] for n in "qkv"])
            out[h + "attn.c_proj.weight"] = state[p + "attn.o.weight"].T
            out[h + "attn.c_proj.bias"] = state[p + "attn.o.bias"]
            out[h + "mlp.c_fc.weight"] = state[p + "mlp.fc.weight"].T
            out[h + "mlp.c_fc.bias"] = state[p + "mlp.fc.bias"]
            out[h + "mlp.c_proj.weight"] = state[p + "mlp.proj.weight"].T
            out[h + "mlp.c_proj.bias"] = state[p + "mlp.proj.bias"]
    else:
        # Gemma's norms multiply by (1 + w): its w is flashlm's weight less one
        norm = (lambda name: state[name] - 1.0) if s.gemma else state.__getitem__  # noqa: E731
        out |= {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": norm("final_norm.weight")}
        for i in range(s.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            if s.gemma:
                out |= {h + "input_layernorm.weight": norm(p + "attn_norm.weight"),
                        h + "post_attention_layernorm.weight": norm(p + "post_attn_norm.weight"),
                        h + "pre_feedforward_layernorm.weight": norm(p + "mlp_norm.weight"),
                        h + "post_feedforward_layernorm.weight": norm(p + "post_mlp_norm.weight")}
            else:
                out |= {h + "input_layernorm.weight": state[p + "attn_norm.weight"],
                        h + "post_attention_layernorm.weight": state[p + "mlp_norm.weight"]}
            out[h + "self_attn.o_proj.weight"] = state[p + "attn.o.weight"]
            out |= _hf_moe_tensors(s, state, p, h) if s.moe else {h + "mlp.down_proj.weight": state[p + "mlp.down.weight"]}
            if s.arch == "phi3":  # Phi-3 fuses q|k|v and gate|up by rows
                out[h + "self_attn.qkv_proj.weight"] = torch.cat([state[p + f"attn.{n}.weight"] for n in "qkv"])
                out[h + "mlp.gate_up_proj.weight"] = torch.cat([state[p + f"mlp.{n}.weight"] for n in ("gate", "up")])
                continue
            if not s.moe:
                out |= {h + "mlp.gate_proj.weight": state[p + "mlp.gate.weight"],
                        h + "mlp.up_proj.weight": state[p + "mlp.up.weight"]}
            for n in "qkv":
                out[h + f"self_attn.{n}_proj.weight"] = state[p + f"attn.{n}.weight"]
            if s.qkv_bias:
                for n in "qkv":
                    out[h + f"self_attn.{n}_proj.bias"] = state[p + f"attn.{n}.bias"]
            if s.qk_norm:
                for n in "qk":
                    out[h + f"self_attn.{n}_norm.weight"] = norm(p + f"attn.{n}_norm.weight")
        if not s.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
    # safetensors stores each tensor alone: no views sharing storage
    return {k: v.contiguous().clone() for k, v in out.items()}


def _hf_moe_tensors(s: ModelConfig, state: dict, p: str, h: str) -> dict:
    """A MoE block's router, experts (one tensor per expert and matrix) and qwen2_moe's shared expert, under
    HF's names (Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2, Qwen-MoE's mlp.experts.{e}.*_proj)."""
    m = "block_sparse_moe." if s.arch == "mixtral" else "mlp."
    names = ("w1", "w3", "w2") if s.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = {h + m + "gate.weight": state[p + "mlp.router.weight"]}
    for kind, name in zip(("gate", "up", "down"), names):
        for e, w in enumerate(state[p + f"mlp.experts_{kind}"]):
            out[h + m + f"experts.{e}.{name}.weight"] = w
    if s.shared_expert_d_ff is not None:
        out |= {h + f"mlp.shared_expert.{n}_proj.weight": state[p + f"mlp.shared.{n}.weight"]
                for n in ("gate", "up", "down")}
        out[h + "mlp.shared_expert_gate.weight"] = state[p + "mlp.shared_gate.weight"]
    return out


def _hf_moe_config(s: ModelConfig, config: dict) -> dict:
    """config.json of MixtralForCausalLM, Qwen2MoeForCausalLM or Qwen3MoeForCausalLM (experts on every layer)."""
    experts = {"num_experts_per_tok": s.n_expert_used, "output_router_logits": False}
    if s.arch == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **config,
                "intermediate_size": s.moe_d_ff, "num_local_experts": s.n_expert, "sliding_window": s.sliding_window,
                "router_jitter_noise": 0.0, **experts}
    experts |= {"num_experts": s.n_expert, "moe_intermediate_size": s.moe_d_ff, "norm_topk_prob": s.norm_topk_prob,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
                "max_window_layers": s.n_layer}
    if s.arch == "qwen2_moe":
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": True, **config,
                "shared_expert_intermediate_size": s.shared_expert_d_ff, **experts}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False, **config,
            **experts}


def hf_config(s: ModelConfig, eos_token_id: int | None) -> dict:
    special = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    if s.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": s.vocab_size,
                "n_positions": s.seq_len, "n_ctx": s.seq_len, "n_embd": s.d_model, "n_layer": s.n_layer,
                "n_head": s.n_head, "n_inner": s.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": s.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "tie_word_embeddings": True, "torch_dtype": "float32", **special}
    # rope: the older top-level rope_theta / rope_scaling keys and transformers 5's rope_parameters
    rope = {"rope_type": "default"} if s.rope_scaling is None else dict(s.rope_scaling)
    config = {"vocab_size": s.vocab_size, "hidden_size": s.d_model, "intermediate_size": s.d_ff,
              "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head, "num_key_value_heads": s.n_kv_head,
              "head_dim": s.head_dim, "max_position_embeddings": s.seq_len, "rms_norm_eps": s.norm_eps,
              "rope_theta": s.rope_theta, "rope_scaling": s.rope_scaling and dict(s.rope_scaling),
              "rope_parameters": rope | {"rope_theta": s.rope_theta}, "hidden_act": "silu",
              "tie_word_embeddings": s.tie_embeddings, "torch_dtype": "float32", **special}
    if s.moe:
        return _hf_moe_config(s, config)
    if s.arch == "qwen2":  # q/k/v biases are part of Qwen2's definition
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                "max_window_layers": s.n_layer, **config}
    if s.gemma:
        del config["hidden_act"]
        gemma = {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh",
                 "query_pre_attn_scalar": s.query_pre_attn_scalar or s.head_dim,
                 "sliding_window": s.sliding_window or s.seq_len, "attn_logit_softcapping": s.attn_softcap,
                 "final_logit_softcapping": s.final_softcap,
                 "layer_types": ["sliding_attention" if s.local_layer(i) else "full_attention" for i in range(s.n_layer)]}
        if s.arch == "gemma2":
            return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **gemma, **config}
        # transformers 5 reads each layer type's rope; older ones rope_theta and rope_local_base_freq
        local = s.rope_local_theta or s.rope_theta
        full = {"rope_type": "default"} if s.rope_scaling is None else dict(s.rope_scaling)  # linear, global only
        rope = {"full_attention": full | {"rope_theta": s.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **gemma, **config,
                "rope_parameters": rope, "rope_local_base_freq": local}
    if s.arch == "phi3":  # (its pad_token_id default, 32000, would be outside a smaller vocabulary)
        # transformers takes LongRoPE's original length from this top-level key where there is one
        original = s.seq_len if s.rope_scaling is None else s.rope_scaling["original_max_position_embeddings"]
        return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "sliding_window": s.sliding_window,
                "original_max_position_embeddings": original, "pad_token_id": eos_token_id, **config}
    if s.arch == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "use_sliding_window": False, "max_window_layers": s.n_layer, **config}
    if s.sliding_window is not None:  # a window on every layer: Mistral
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": s.sliding_window,
                **config}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
            **config}


def export_hf(model_or_state, model_config, tokenizer_json, out_dir, eos_token_id: int | None = None) -> str:
    """Write an HF `transformers` model directory; returns its path.

    model_or_state: a flashlm Transformer or its state dict. model_config: its ModelConfig (or dict).
    tokenizer_json: the tokenizer's JSON text (tokenizers' Tokenizer.to_str()), or None for no tokenizer.
    eos_token_id: the end-of-document id; None: the tokenizer's <|endoftext|> (or another known name).
    """
    from safetensors.torch import save_file

    if tokenizer_json is not None and vocab_from_json(tokenizer_json) is not None:
        raise ValueError("tokenizer_json: a t5 (Unigram) GGUF vocabulary has no tokenizer.json form that "
                         "tokenizes as it does (its charsmap walk); export the model to GGUF instead")
    s, state = resolve(model_or_state, model_config)
    tensors = hf_tensors(s, state)
    eos = _eos_id(tokenizer_json, eos_token_id)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(s, eos), f, indent=2)
    if tokenizer_json is not None:
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        text = text if isinstance(text, str) else json.dumps(text)
        spec = json.loads(text)
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        names = {a["id"]: a["content"] for a in spec.get("added_tokens") or []}
        names |= {i: t for t, i in (spec.get("model") or {}).get("vocab", {}).items() if i == eos}
        eos_name = names.get(eos)
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": s.seq_len,
                      "clean_up_tokenization_spaces": False, "eos_token": eos_name, "bos_token": eos_name}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=2)
    return out_dir


# ------------------------------------------------------------------------------------------------- GGUF


def gguf_tensors(s: ModelConfig, state: dict) -> list:
    """[(GGUF tensor name, float32 array in torch order)] in llama.cpp's file order."""
    t = {k: v.numpy() for k, v in state.items()}
    out = []
    check_llama_cpp_head_dim(s)
    check_llama_cpp_moe(s)
    if s.gemma:
        check_llama_cpp_gemma(s)
    out += list(longrope_tensors(s).items())
    if s.rope_scaling is not None and s.arch not in ("gemma3", "phi3"):  # gemma3's linear scaling is metadata
        if s.base_arch != "llama":
            raise ValueError(f"model_config: llama.cpp's {gguf_arch(s)} has no Llama 3 rope scaling (rope_scaling)")
        out.append(("rope_freqs.weight", llama3_rope_factors(s.head_dim, s.rope_theta, s.rope_scaling)))
    out.append(("token_embd.weight", t["tok_emb.weight"]))
    if s.arch == "gpt2":
        out.append(("position_embd.weight", t["pos_emb.weight"]))
    for i in range(s.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        if s.arch == "gpt2":
            out += [(b + "attn_norm.weight", t[p + "attn_norm.weight"]), (b + "attn_norm.bias", t[p + "attn_norm.bias"]),
                    (b + "attn_qkv.weight", np.concatenate([t[p + f"attn.{n}.weight"] for n in "qkv"])),
                    (b + "attn_qkv.bias", np.concatenate([t[p + f"attn.{n}.bias"] for n in "qkv"])),
                    (b + "attn_output.weight", t[p + "attn.o.weight"]), (b + "attn_output.bias", t[p + "attn.o.bias"]),
                    (b + "ffn_norm.weight", t[p + "mlp_norm.weight"]), (b + "ffn_norm.bias", t[p + "mlp_norm.bias"]),
                    (b + "ffn_up.weight", t[p + "mlp.fc.weight"]), (b + "ffn_up.bias", t[p + "mlp.fc.bias"]),
                    (b + "ffn_down.weight", t[p + "mlp.proj.weight"]), (b + "ffn_down.bias", t[p + "mlp.proj.bias"])]
        else:
            q, k = t[p + "attn.q.weight"], t[p + "attn.k.weight"]
            if s.base_arch == "llama":
                # ggml's llama rope (LLAMA_ROPE_TYPE_NORM) rotates adjacent pairs, flashlm's (HF's) the two
                # halves of a head: reorder the rows (qwen2's rope in ggml, NEOX, rotates halves as flashlm's)
                q, k = permute_rope_rows(q, s.n_head), permute_rope_rows(k, s.n_kv_head)
            out.append((b + "attn_norm.weight", t[p + "attn_norm.weight"]))
            if s.arch == "phi3":  # llama.cpp's phi3: q|k|v and gate|up fused by rows, NEOX rope (no permutation)
                out += [(b + "attn_qkv.weight", np.concatenate([q, k, t[p + "attn.v.weight"]])),
                        (b + "attn_output.weight", t[p + "attn.o.weight"]),
                        (b + "ffn_norm.weight", t[p + "mlp_norm.weight"]),
                        (b + "ffn_up.weight", np.concatenate([t[p + "mlp.gate.weight"], t[p + "mlp.up.weight"]])),
                        (b + "ffn_down.weight", t[p + "mlp.down.weight"])]
                continue
            out += [(b + "attn_q.weight", q), (b + "attn_k.weight", k), (b + "attn_v.weight", t[p + "attn.v.weight"])]
            if s.qkv_bias:
                out += [(b + f"attn_{n}.bias", t[p + f"attn.{n}.bias"]) for n in "qkv"]
            if s.qk_norm:
                out += [(b + f"attn_{n}_norm.weight", t[p + f"attn.{n}_norm.weight"]) for n in "kq"]
            out += [(b + "attn_output.weight", t[p + "attn.o.weight"])]
            if s.gemma:
                out.append((b + "post_attention_norm.weight", t[p + "post_attn_norm.weight"]))
            out.append((b + "ffn_norm.weight", t[p + "mlp_norm.weight"]))
            if s.moe:
                out += _gguf_moe_tensors(s, t, p, b)
            else:
                out += [(b + "ffn_gate.weight", t[p + "mlp.gate.weight"]), (b + "ffn_up.weight", t[p + "mlp.up.weight"]),
                        (b + "ffn_down.weight", t[p + "mlp.down.weight"])]
            if s.gemma:
                out.append((b + "post_ffw_norm.weight", t[p + "post_mlp_norm.weight"]))
    out.append(("output_norm.weight", t["final_norm.weight"]))
    if s.arch == "gpt2":
        out.append(("output_norm.bias", t["final_norm.bias"]))
    if not s.tie_embeddings:
        out.append(("output.weight", t["lm_head.weight"]))
    return [(name, np.ascontiguousarray(a, dtype=np.float32)) for name, a in out]


def _gguf_moe_tensors(s: ModelConfig, t: dict, p: str, b: str) -> list:
    """A MoE block's router, stacked experts and (qwen2moe) shared expert, its gate a [d] vector."""
    out = [(b + "ffn_gate_inp.weight", t[p + "mlp.router.weight"])]
    out += [(b + f"ffn_{n}_exps.weight", t[p + f"mlp.experts_{n}"]) for n in ("gate", "up", "down")]
    if s.shared_expert_d_ff is not None:
        out += [(b + f"ffn_{n}_shexp.weight", t[p + f"mlp.shared.{n}.weight"]) for n in ("gate", "up", "down")]
        out.append((b + "ffn_gate_inp_shexp.weight", t[p + "mlp.shared_gate.weight"].reshape(-1)))
    return out


def gguf_hparams(s: ModelConfig, name: str) -> list:
    """The {arch}.* metadata llama.cpp reads, as convert_hf_to_gguf.py writes it."""
    from gguf import GGUFValueType

    u32, f32, a = GGUFValueType.UINT32, GGUFValueType.FLOAT32, gguf_arch(s)
    meta = [("general.name", name, GGUFValueType.STRING), (f"{a}.vocab_size", s.vocab_size, u32),
            (f"{a}.context_length", s.seq_len, u32), (f"{a}.embedding_length", s.d_model, u32),
            (f"{a}.block_count", s.n_layer, u32), (f"{a}.feed_forward_length", s.d_ff, u32),
            (f"{a}.attention.head_count", s.n_head, u32), (f"{a}.attention.head_count_kv", s.n_kv_head, u32)]
    if a == "gpt2":
        meta.append((f"{a}.attention.layer_norm_epsilon", s.norm_eps, f32))
    else:
        meta += [(f"{a}.attention.layer_norm_rms_epsilon", s.norm_eps, f32), (f"{a}.rope.freq_base", s.rope_theta, f32),
                 (f"{a}.rope.dimension_count", s.head_dim, u32)]
    if a in ("qwen3", "qwen3moe", "gemma2", "gemma3") or s.head_dim * s.n_head != s.d_model:  # its own head_dim
        meta += [(f"{a}.attention.key_length", s.head_dim, u32), (f"{a}.attention.value_length", s.head_dim, u32)]
    meta += moe_metadata(s) + window_metadata(s, s.seq_len)
    return [(k, v, t, None) for k, v, t in meta]


class ModelSource:
    """A model's GGUF tensors and metadata in the form flashlm.io.quantize_file.write_quantized reads."""

    def __init__(self, s: ModelConfig, tensors: list, metadata: list):
        self.arch, self.metadata = gguf_arch(s), metadata
        self._data = [a for _, a in tensors]
        self.tensors = [(n, tuple(a.shape), "F32") for n, a in tensors]

    def load(self, index: int) -> np.ndarray:
        return self._data[index]


def export_gguf(model_or_state, model_config, tokenizer_json, out_path, type: str = "F32",
                eos_token_id: int | None = None, name: str = "flashlm", progress: bool = False, types=None) -> list:
    """Write a GGUF file llama.cpp loads; returns [(tensor name, "F32", type written)].

    type: a `flashlm quantize` mix: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M,
        Q4_K_S/M, Q5_K_S/M, Q6_K. Other arguments as export_hf's; without a tokenizer the file has none
        (llama.cpp will not load it then).
    types: a function GGUF tensor name -> GGML type, or None for the mix's type (a per-tensor plan).
    """
    if not isinstance(type, str) or type.upper() not in MIXES:
        raise ValueError(f"type: expected one of {', '.join(MIXES)}, got {type!r}")
    s, state = resolve(model_or_state, model_config)
    tensors = gguf_tensors(s, state)
    metadata = gguf_hparams(s, name)
    if tokenizer_json is None:
        warnings.warn("export_gguf: no tokenizer; llama.cpp needs one to load the file", stacklevel=2)
    else:
        metadata += tokenizer_metadata(tokenizer_json, vocab_size=s.vocab_size, eos_token_id=eos_token_id)
    planned = {} if types is None else {n: t for n, _ in tensors if (t := types(n)) is not None}
    return write_quantized(ModelSource(s, tensors, metadata), str(out_path), type, progress, types=planned)


# ------------------------------------------------------------------------------------------- checkpoints


def export_checkpoint(path, gguf_path=None, hf_dir=None, type: str = "F32", progress: bool = False,
                      types=None) -> dict:
    """Export a checkpoint file to a GGUF file and/or an HF directory; returns what was written.
    types: export_gguf's per-tensor plan."""
    if gguf_path is None and hf_dir is None:
        raise ValueError("export: give a GGUF output path, an HF output directory, or both")
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path)
    where = f"checkpoint {path}"
    checkpoint_tokenizer(ckpt, checkpoint_config(ckpt, where), where)  # what the loader checks, named by file
    args = (ckpt["model"], ckpt["model_config"], ckpt.get("tokenizer"))
    written = {}
    if hf_dir is not None:
        written["hf"] = export_hf(*args, hf_dir, eos_token_id=ckpt.get("eos_token_id"))
    if gguf_path is not None:
        written["gguf"] = export_gguf(*args, gguf_path, type=type, eos_token_id=ckpt.get("eos_token_id"),
                                      progress=progress, types=types)
    return written


def export_qat_run(input_path, output_path) -> dict:
    """`flashlm quantize RUN OUT --method qat`: a run trained with a GGML block type (--qat Q8_0|Q4_0|Q4_K) as a
    GGUF file (flashlm.io.qat_export.block_linear_plan: its block linears in that type, quantized as the QAT
    forward quantized them, the rest F32), any other QAT run as flashlm.io.qat_export.export_qat writes it.
    Returns export_qat's dict ("group_size" None for the GGML types)."""
    from flashlm.io.qat_export import block_linear_plan, export_qat, qat_setting
    from flashlm.quant.qat import GGUF_QAT_TYPES

    qat, _ = qat_setting(input_path)
    if qat not in GGUF_QAT_TYPES:
        return export_qat(input_path, output_path)
    plan = block_linear_plan(qat, output_path)
    written = export_checkpoint(input_path, gguf_path=output_path, types=plan)["gguf"]
    return {"qat": qat, "group_size": None, "symmetric": True, "layers": sum(t == qat for _, _, t in written)}
