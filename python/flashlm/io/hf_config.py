"""An HF model directory's config.json as a flashlm ModelConfig.

    cfg = model_config_from_hf(json.load(open("model/config.json")), max_model_len=4096)

Architectures: LlamaForCausalLM, MistralForCausalLM (its sliding window on every layer), Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text; linear rope scaling on its global layers),
Phi3ForCausalLM (its sliding window kept; no partial rotary factor, no long-rope scaling), GPT2LMHeadModel, and
the mixtures of experts MixtralForCausalLM,
Qwen2MoeForCausalLM and Qwen3MoeForCausalLM (experts on every layer: a decoder_sparse_step other than 1 or
mlp_only_layers are refused). Both spellings of the rotary settings are read:
`rope_theta` and `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5). Anything flashlm's
Transformer would compute differently (another activation, biases it does not have, rope scaling other than
Llama 3's and Gemma 3's linear) raises ValueError naming the key. A head_dim other than hidden / heads is read for every rotary
architecture but phi3.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from flashlm.io.loaded import context_length
from flashlm.models import ModelConfig
from flashlm.models.config import LIMITS, MOE_BASE, check_heads, check_size

# HF architecture -> flashlm arch
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
                    "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3", "GPT2LMHeadModel": "gpt2",
                    "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                    "Qwen3MoeForCausalLM": "qwen3_moe"}
# transformers' defaults for what a config.json may leave out
_QWEN3_HEAD_DIM = 128
_GEMMA_DEFAULTS = {"gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
                   "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                              "attn_logit_softcapping": None, "final_logit_softcapping": None}}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation under HF's names


def read_json(path: str, required: bool = False) -> Optional[dict]:
    """A JSON object file of a model directory (None when it is missing and not required), checked."""
    if not os.path.isfile(path):
        if required:
            raise ValueError(f"{path}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _get(cfg: dict, key: str, kind=int, default=None, limit: Optional[str] = None):
    """cfg[key] (or default) as a positive int (at most LIMITS[limit]) or a positive float."""
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"config.json: missing {key!r}")
    if kind is int:
        check_size(value, f"config.json: {key}", LIMITS[limit] if limit else 1 << 64)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config.json: {key} must be a positive number, got {value!r}")
        value = float(value)
    return value


def hf_arch(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in HF_ARCHITECTURES:
        raise ValueError(f"config.json: architectures {archs!r} is not supported "
                         f"(supported: {', '.join(HF_ARCHITECTURES)})")
    return HF_ARCHITECTURES[archs[0]]


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from rope_parameters (transformers 5) or rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
        theta = _get(params, "rope_theta", float, 10000.0)
        # a partial_rotary_factor of 1 is no scaling (phi3's configs carry one; _check_full_rotary checks others)
        scaling = {k: v for k, v in params.items() if k != "rope_theta" and (k, v) != ("partial_rotary_factor", 1.0)}
    else:
        theta = _get(cfg, "rope_theta", float, 10000.0)
        scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            return theta, None
        if kind in ("longrope", "su"):  # "su": Phi-3's first name for it
            return theta, _longrope(cfg, scaling)
        if kind != "llama3":
            raise ValueError(f"config.json: rope scaling {kind!r} is not supported (only 'llama3', and "
                             "'longrope' on phi3)")
        scaling = dict(scaling, rope_type="llama3")
    return theta, scaling or None


def _longrope(cfg: dict, scaling: dict) -> dict:
    """Phi-3's LongRoPE as ModelConfig's rope_scaling, as transformers' _compute_longrope_parameters reads it:
    original_max_position_embeddings from the scaling or the config's top level; attention_factor as given, or
    sqrt(1 + ln(s) / ln(original)) for s = factor (as given, or max_position_embeddings / original) when s > 1."""
    orig = _get(scaling, "original_max_position_embeddings", int, cfg.get("original_max_position_embeddings"))
    factor = scaling.get("factor")
    factor = _get(scaling, "factor", float) if factor is not None else _get(cfg, "max_position_embeddings") / orig
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 and orig > 1 else 1.0
    return {"rope_type": "longrope", "short_factor": scaling.get("short_factor"),
            "long_factor": scaling.get("long_factor"), "original_max_position_embeddings": orig,
            "attention_factor": _get({"attention_factor": attention}, "attention_factor", float)}


def _seq_len(max_positions: int, max_model_len: Optional[int]) -> int:
    return context_length(max_positions, max_model_len, "config.json")


def _gpt2_config(cfg: dict, max_model_len: Optional[int]) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise ValueError(f"config.json: activation_function {act!r} is not supported (GELU tanh: {_GELU_TANH})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if cfg.get(key, want) != want:
            raise ValueError(f"config.json: {key}={cfg[key]!r} is not supported (flashlm's GPT-2 has {want})")
    d, heads = _get(cfg, "n_embd", limit="d_model"), _get(cfg, "n_head", limit="n_head")
    check_heads(d, heads, heads, ("n_embd", "n_head", "n_head"), "config.json: ")
    n_inner = cfg.get("n_inner")
    return ModelConfig(arch="gpt2", vocab_size=_get(cfg, "vocab_size", limit="vocab_size"),
                       n_layer=_get(cfg, "n_layer", limit="n_layer"), n_head=heads,
                       d_model=d, d_ff=4 * d if n_inner is None else _get(cfg, "n_inner", limit="d_ff"),
                       seq_len=_seq_len(_get(cfg, "n_positions"), max_model_len),
                       norm_eps=_get(cfg, "layer_norm_epsilon", float, 1e-5),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _moe_settings(arch: str, cfg: dict) -> dict:
    """The expert settings of a Mixtral / Qwen-MoE config.json, as transformers reads them (its defaults for
    norm_topk_prob, decoder_sparse_step and mlp_only_layers)."""
    if arch == "mixtral":
        n_expert, ff, norm = _get(cfg, "num_local_experts", limit="n_expert"), None, True
    else:
        key = "num_experts" if "num_experts" in cfg else "num_local_experts"  # (transformers 5 writes the latter)
        n_expert = _get(cfg, key, limit="n_expert")
        ff = _get(cfg, "moe_intermediate_size", limit="d_ff")
        norm = cfg.get("norm_topk_prob", False)
        if not isinstance(norm, bool):
            raise ValueError(f"config.json: norm_topk_prob must be true or false, got {norm!r}")
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise ValueError(f"config.json: decoder_sparse_step {cfg.get('decoder_sparse_step')!r} / mlp_only_layers "
                             f"{cfg.get('mlp_only_layers')!r} are not supported (experts on every layer only)")
    used = _get(cfg, "num_experts_per_tok", limit="n_expert")
    if used > n_expert:
        raise ValueError(f"config.json: num_experts_per_tok {used} is more than the {n_expert} experts")
    settings = dict(n_expert=n_expert, n_expert_used=used, moe_d_ff=ff, norm_topk_prob=norm)
    if arch == "qwen2_moe":
        settings["shared_expert_d_ff"] = _get(cfg, "shared_expert_intermediate_size", limit="d_ff")
        if cfg.get("qkv_bias", True) is not True:
            raise ValueError("config.json: qkv_bias=false is not supported for qwen2_moe")
    return settings


def _rotary_config(arch: str, cfg: dict, max_model_len: Optional[int]) -> ModelConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (SiLU only)")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    moe = _moe_settings(arch, cfg) if arch in MOE_BASE else {}
    arch, moe_arch = MOE_BASE.get(arch, arch), arch  # the attention is the dense architecture's
    if arch in ("llama", "qwen3", "phi3") and cfg.get("attention_bias"):
        raise ValueError(f"config.json: attention_bias=true is not supported for {moe_arch}")
    d, heads = _get(cfg, "hidden_size", limit="d_model"), _get(cfg, "num_attention_heads", limit="n_head")
    kv_heads = _get(cfg, "num_key_value_heads", int, heads, limit="n_head")
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads")
    if moe_arch == "qwen3":  # its own head_dim: the heads need not split hidden_size
        head_dim = _get(cfg, "head_dim", int, _QWEN3_HEAD_DIM, limit="head_dim")
        check_heads(heads * head_dim, heads, kv_heads, names, "config.json: ")
    elif cfg.get("head_dim") is not None:  # llama and qwen2 may set one too (a model with heads pruned away)
        head_dim = _get(cfg, "head_dim", int, limit="head_dim")
        check_heads(heads * head_dim, heads, kv_heads, names, "config.json: ")
    else:
        check_heads(d, heads, kv_heads, names, "config.json: ")
        head_dim = None
    seq_len = _seq_len(_get(cfg, "max_position_embeddings"), max_model_len)
    window = cfg.get("sliding_window")
    uses_window = True
    if arch in ("qwen2", "qwen3"):  # Qwen configs carry a window they do not use unless asked (or a layer says so)
        layer_types = cfg.get("layer_types") or []
        uses_window = bool(cfg.get("use_sliding_window", False)) or any(t != "full_attention" for t in layer_types)
    if arch == "llama":  # Mistral's (and Mixtral's) window is on every layer; transformers' Llama has none
        uses_window = cfg.get("architectures") in (["MistralForCausalLM"], ["MixtralForCausalLM"])
    if arch == "phi3":  # every layer attends to its window
        _check_full_rotary(cfg)
    if window is not None and uses_window:
        window = _get(cfg, "sliding_window", limit="seq_len")
    if window is not None and uses_window and window < seq_len and arch not in ("llama", "phi3"):
        raise ValueError(f"config.json: sliding_window {window} is shorter than the context {seq_len}; flashlm has "
                         f"no sliding-window attention for {moe_arch} (pass max_model_len <= {window})")
    # A window on every layer: phi3's as its config has it; Mistral's, left out when as long as the context
    if arch == "llama":
        window = window if uses_window and window is not None and window < seq_len else None
    elif arch != "phi3":
        window = None
    theta, scaling = _rope(cfg)
    return ModelConfig(arch=moe_arch, vocab_size=_get(cfg, "vocab_size", limit="vocab_size"),
                       n_layer=_get(cfg, "num_hidden_layers", limit="n_layer"), n_head=heads,
                       n_kv_head=kv_heads, d_model=d,
                       d_ff=_get(cfg, "intermediate_size", limit="d_ff"), seq_len=seq_len, rope_theta=theta,
                       rope_scaling=scaling, norm_eps=_get(cfg, "rms_norm_eps", float, 1e-6),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=head_dim,
                       sliding_window=window, **moe)


def _check_full_rotary(cfg: dict) -> None:
    """ValueError for a partial_rotary_factor other than 1 (top level, or in rope_parameters in transformers 5):
    flashlm rotates the whole head."""
    params = cfg.get("rope_parameters")
    for where, d in (("", cfg), ("rope_parameters.", params if isinstance(params, dict) else {})):
        factor = d.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"config.json: {where}partial_rotary_factor {factor!r} is not supported (the rotary "
                             "embedding covers the whole head)")


def _linear_scaling(where: str, p: dict) -> Optional[dict]:
    """None for default rope, {"rope_type": "linear", "factor"} for linear scaling (ModelConfig checks the
    factor); ValueError naming `where` for any other kind."""
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    if kind != "linear":
        raise ValueError(f"config.json: {where} {p!r} is not supported (default or linear rope only)")
    return {"rope_type": "linear", "factor": p.get("factor")}


def _gemma_rope(arch: str, cfg: dict) -> dict:
    """rope_theta (and gemma3's rope_local_theta and rope_scaling) from rope_parameters, per layer type in
    transformers 5, or rope_theta / rope_local_base_freq / rope_scaling. Gemma 3 scales only its global layers'
    rope, and only linearly; gemma2 has no scaling."""
    params = cfg.get("rope_parameters")
    if arch == "gemma3" and isinstance(params, dict) and "full_attention" in params:
        full, local = params.get("full_attention"), params.get("sliding_attention", {"rope_theta": 10000.0})
        for kind, p in (("full_attention", full), ("sliding_attention", local)):
            if not isinstance(p, dict):
                raise ValueError(f"config.json: rope_parameters.{kind} must be an object, got {p!r}")
        if _linear_scaling("rope_parameters.sliding_attention", local) is not None:
            raise ValueError(f"config.json: rope_parameters.sliding_attention {local!r} is not supported (Gemma 3's "
                             "local layers use default rope)")
        return dict(rope_theta=_get(full, "rope_theta", float, 10000.0),
                    rope_local_theta=_get(local, "rope_theta", float, 10000.0),
                    rope_scaling=_linear_scaling("rope_parameters.full_attention", full))
    if arch == "gemma3" and params is None and cfg.get("rope_scaling") is not None:
        scaling = cfg["rope_scaling"]
        if not isinstance(scaling, dict):
            raise ValueError(f"config.json: rope_scaling must be an object, got {scaling!r}")
        return dict(rope_theta=_get(cfg, "rope_theta", float, 10000.0),
                    rope_local_theta=_get(cfg, "rope_local_base_freq", float, 10000.0),
                    rope_scaling=_linear_scaling("rope_scaling", scaling))
    theta, scaling = _rope(cfg)
    if scaling is not None:
        raise ValueError(f"config.json: rope scaling is not supported for {arch}")
    if arch == "gemma3":
        return dict(rope_theta=theta, rope_local_theta=_get(cfg, "rope_local_base_freq", float, 10000.0))
    return dict(rope_theta=theta)


def _gemma_config(arch: str, cfg: dict, max_model_len: Optional[int]) -> ModelConfig:
    defaults = _GEMMA_DEFAULTS[arch]
    act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in _GELU_TANH:
        raise ValueError(f"config.json: hidden_activation {act!r} is not supported (GELU tanh: {_GELU_TANH})")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise ValueError(f"config.json: {key}=true is not supported for {arch}")
    d, heads = _get(cfg, "hidden_size", limit="d_model"), _get(cfg, "num_attention_heads", limit="n_head")
    kv_heads = _get(cfg, "num_key_value_heads", int, heads, limit="n_head")
    head_dim = _get(cfg, "head_dim", int, defaults["head_dim"], limit="head_dim")
    check_heads(heads * head_dim, heads, kv_heads, ("hidden_size", "num_attention_heads", "num_key_value_heads"),
                "config.json: ")
    n_layer = _get(cfg, "num_hidden_layers", limit="n_layer")
    window = cfg.get("sliding_window", defaults["sliding_window"])
    window = None if window is None else _get(cfg, "sliding_window", limit="seq_len")
    rope = _gemma_rope(arch, cfg)
    # the layer pattern flashlm runs (ModelConfig.local_layer) is the one the file must declare
    probe = ModelConfig(arch=arch, d_model=d, n_head=heads, n_layer=n_layer, head_dim=head_dim)
    expected = ["sliding_attention" if probe.local_layer(i) else "full_attention" for i in range(n_layer)]
    layer_types = cfg.get("layer_types")
    if layer_types is not None and layer_types != expected:
        raise ValueError(f"config.json: layer_types must be {arch}'s pattern of sliding and full attention "
                         f"({expected[:6]}...), got {str(layer_types)[:200]}")
    caps = {}
    for key, name in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        value = cfg.get(key, defaults[key])
        caps[name] = None if value is None else _get({key: value}, key, float)
    return ModelConfig(arch=arch, vocab_size=_get(cfg, "vocab_size", limit="vocab_size"), n_layer=n_layer,
                       n_head=heads, n_kv_head=kv_heads, d_model=d, d_ff=_get(cfg, "intermediate_size", limit="d_ff"),
                       seq_len=_seq_len(_get(cfg, "max_position_embeddings"), max_model_len),
                       norm_eps=_get(cfg, "rms_norm_eps", float, 1e-6),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), head_dim=head_dim,
                       sliding_window=window, query_pre_attn_scalar=_get(cfg, "query_pre_attn_scalar", float,
                                                                         defaults["query_pre_attn_scalar"]),
                       **caps, **rope)


def model_config_from_hf(cfg: dict, max_model_len: Optional[int] = None) -> ModelConfig:
    """The ModelConfig of an HF config.json (a dict); seq_len is min(max positions, max_model_len)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json: expected an object, got {type(cfg).__name__}")
    arch = hf_arch(cfg)
    try:
        if arch == "gpt2":
            return _gpt2_config(cfg, max_model_len)
        if arch in ("gemma2", "gemma3"):
            return _gemma_config(arch, cfg, max_model_len)
        return _rotary_config(arch, cfg, max_model_len)
    except TypeError as e:  # a value of the wrong JSON type in a comparison
        raise ValueError(f"config.json: malformed value ({e})") from e
