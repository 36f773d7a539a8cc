"""What a GGUF model file flashlm loads must hold: its ModelConfig, read from the metadata, and every tensor's
name and shape, checked against the file's tensors before anything is built.

    cfg = gguf_model_config(f.metadata, {t.name: t.shape for t in f.tensors}, max_model_len=4096)

load_gguf checks a file with it, and the GGUF writers (`flashlm quantize`, `convert`, `export`) check what they
are about to write with it, so that flashlm never writes a file its own loader refuses. Every error is a
ValueError naming the metadata key or the tensor.
"""

from __future__ import annotations

from typing import Mapping, Optional

from flashlm.io.loaded import context_length
from flashlm.models import ModelConfig
from flashlm.models.config import LIMITS, check_heads, check_size
from flashlm.models.shapes import check_block_count, check_tensor_shapes

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "qwen2moe", "qwen3moe")
# flashlm's MoE architectures under llama.cpp's names (Mixtral is llama.cpp's llama with experts)
_GGUF_MOE_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# Whether llama.cpp divides the kept routing weights by their sum (its build_moe_ffn's norm_w, fixed per arch)
_LLAMA_CPP_NORM_TOPK = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}
_NO_LIMIT = 1 << 64  # GGUF integers are at most 64 bits


class Meta:
    """Typed access to GGUF metadata, naming the key in every error."""

    def __init__(self, metadata: Mapping):
        self.m = metadata

    def int(self, key: str, default=None, limit: int = _NO_LIMIT) -> int:
        v = self.m.get(key, default)
        if v is None:
            raise ValueError(f"metadata: missing {key!r}")
        return check_size(v, f"metadata: {key}", limit)

    def float(self, key: str, default=None) -> float:
        v = self.m.get(key, default)
        if v is None:
            raise ValueError(f"metadata: missing {key!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ValueError(f"metadata: {key} must be a positive number, got {v!r}")
        return float(v)

    def str(self, key: str, default=None) -> Optional[str]:
        v = self.m.get(key, default)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"metadata: {key} must be a string, got {type(v).__name__}")
        return v


def gguf_model_config(metadata: Mapping, shapes: Mapping[str, tuple],
                      max_model_len: Optional[int] = None) -> ModelConfig:
    """The ModelConfig of a GGUF model file (metadata: key -> value; shapes: tensor name -> shape in torch
    order), with every tensor checked against it; seq_len is min(the context, max_model_len). Llama 3's rope
    scaling and LongRoPE, which live in tensors' values (rope_freqs.weight, LONGROPE_TENSORS), are the
    loader's to read."""
    meta = Meta(metadata)
    arch = meta.str("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"metadata: general.architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    moe = _moe_settings(meta, arch)
    flashlm_arch = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, "mixtral" if moe else arch)
    # First the counts that size what is built, against what the file holds.
    n_layer = meta.int(f"{arch}.block_count")
    check_block_count(n_layer, shapes, "blk.", f"metadata: {arch}.block_count")
    emb = shapes.get("token_embd.weight")
    if emb is None:
        raise ValueError("GGUF file: tensor 'token_embd.weight' is missing")
    d = meta.int(f"{arch}.embedding_length", limit=LIMITS["d_model"])
    if len(emb) != 2 or emb[1] != d or emb[0] <= 0:
        raise ValueError(f"GGUF file: tensor 'token_embd.weight' has shape {tuple(emb)}, expected [vocab, {d}] "
                         f"({arch}.embedding_length)")
    vocab = emb[0]
    if f"{arch}.vocab_size" in metadata and meta.int(f"{arch}.vocab_size") != vocab:
        raise ValueError(f"metadata: {arch}.vocab_size {metadata[f'{arch}.vocab_size']} != token_embd.weight's "
                         f"{vocab} rows")
    n_head = meta.int(f"{arch}.attention.head_count", limit=LIMITS["n_head"])
    n_kv = meta.int(f"{arch}.attention.head_count_kv", n_head, limit=n_head)
    head_dim = None
    names = (f"{arch}.embedding_length", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv")
    # A head_dim of its own (key_length; llama's and qwen2's where given): the heads need not split embedding_length
    key_length = f"{arch}.attention.key_length"
    if arch in ("qwen3", "qwen3moe", "gemma2", "gemma3") or (arch != "gpt2" and key_length in meta.m):
        head_dim = meta.int(key_length, limit=LIMITS["head_dim"])
        check_heads(n_head * head_dim, n_head, n_kv, names, "metadata: ")
    else:
        check_heads(d, n_head, n_kv, names, "metadata: ")
    declared = meta.int(f"{arch}.context_length")
    ctx = context_length(declared, max_model_len, f"metadata: {arch}.context_length")
    common = dict(arch=flashlm_arch, vocab_size=vocab, n_layer=meta.int(f"{arch}.block_count", limit=LIMITS["n_layer"]),
                  n_head=n_head, n_kv_head=n_kv, d_model=d,
                  d_ff=meta.int(f"{arch}.feed_forward_length", limit=LIMITS["d_ff"]), seq_len=ctx,
                  tie_embeddings="output.weight" not in shapes)
    if arch == "gpt2":
        cfg = ModelConfig(**common, norm_eps=meta.float("gpt2.attention.layer_norm_epsilon", 1e-5))
    else:
        head_dim = head_dim or d // n_head
        extra = _gemma_settings(meta, arch, common) if arch in ("gemma2", "gemma3") else \
            _phi3_settings(meta, shapes) if arch == "phi3" else {}
        cfg = ModelConfig(**common, head_dim=head_dim, **_rotary_settings(meta, arch, head_dim, ctx), **extra, **moe)
    check_tensor_shapes(gguf_tensor_shapes(cfg, declared, "rope_freqs.weight" in shapes,
                                           arch == "phi3" and all(name in shapes for name in LONGROPE_TENSORS)),
                        shapes, "GGUF file")
    return cfg


def _moe_settings(meta: Meta, arch: str) -> dict:
    """The expert settings of a llama (Mixtral), qwen2moe or qwen3moe file, as llama.cpp reads them: expert_count
    and expert_used_count; the experts' width expert_feed_forward_length (llama: feed_forward_length); qwen2moe's
    shared expert, expert_shared_feed_forward_length wide (default feed_forward_length); the routing weights
    renormalised as llama.cpp does for the architecture. Nothing for a dense model."""
    count = f"{arch}.expert_count"
    if arch not in ("llama", "qwen2moe", "qwen3moe") or (arch == "llama" and meta.m.get(count, 0) == 0):
        return {}
    n_expert = meta.int(count, limit=LIMITS["n_expert"])
    used = meta.int(f"{arch}.expert_used_count", limit=LIMITS["n_expert"])
    if used > n_expert:
        raise ValueError(f"metadata: {arch}.expert_used_count {used} is more than {count} {n_expert}")
    scale = meta.m.get(f"{arch}.expert_weights_scale", 0.0)
    if scale not in (0.0, 1.0):
        raise ValueError(f"metadata: {arch}.expert_weights_scale {scale!r} is not supported (0 or 1: no scaling)")
    flashlm_arch = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}[arch]
    settings = dict(n_expert=n_expert, n_expert_used=used, norm_topk_prob=_LLAMA_CPP_NORM_TOPK[flashlm_arch])
    d_ff = meta.int(f"{arch}.feed_forward_length", limit=LIMITS["d_ff"])
    if arch != "llama":
        settings["moe_d_ff"] = meta.int(f"{arch}.expert_feed_forward_length", max(d_ff // used, 1),
                                        limit=LIMITS["d_ff"])
    if arch == "qwen2moe":
        settings["shared_expert_d_ff"] = meta.int(f"{arch}.expert_shared_feed_forward_length", d_ff,
                                                  limit=LIMITS["d_ff"])
    return settings


def gguf_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture name of a flashlm config (Mixtral: llama; Qwen-MoE: qwen2moe, qwen3moe)."""
    return _GGUF_MOE_ARCH.get(cfg.arch, cfg.arch)


def moe_metadata(s: ModelConfig) -> list:
    """[(key, value, GGUFValueType)] of a MoE config's expert settings, as convert_hf_to_gguf writes them
    (nothing for a dense model). Mixtral's expert width is its feed_forward_length."""
    from gguf import GGUFValueType

    if not s.moe:
        return []
    u32, a = GGUFValueType.UINT32, gguf_arch(s)
    meta = [(f"{a}.expert_count", s.n_expert, u32), (f"{a}.expert_used_count", s.n_expert_used, u32)]
    if s.arch != "mixtral":
        meta.append((f"{a}.expert_feed_forward_length", s.moe_d_ff, u32))
    if s.shared_expert_d_ff is not None:
        meta.append((f"{a}.expert_shared_feed_forward_length", s.shared_expert_d_ff, u32))
    return meta


def check_llama_cpp_moe(s: ModelConfig) -> None:
    """ValueError unless llama.cpp computes what a MoE config describes: it renormalises the kept routing
    weights for llama (Mixtral) and qwen3moe and never for qwen2moe, whose output matrix must be its own;
    Mixtral's experts are feed_forward_length wide."""
    if not s.moe:
        return
    want = _LLAMA_CPP_NORM_TOPK[s.arch]
    if s.norm_topk_prob != want:
        raise ValueError(f"model_config: llama.cpp's {gguf_arch(s)} runs norm_topk_prob={want}, the model has "
                         f"{s.norm_topk_prob}")
    if s.arch == "qwen2_moe" and s.tie_embeddings:
        raise ValueError("model_config: llama.cpp's qwen2moe needs an output matrix of its own (tie_embeddings)")
    if s.arch == "mixtral" and s.moe_d_ff != s.d_ff:
        raise ValueError(f"model_config: llama.cpp's Mixtral (llama) has experts of feed_forward_length: moe_d_ff "
                         f"{s.moe_d_ff} != d_ff {s.d_ff}")


def _rotary_settings(meta: Meta, arch: str, head_dim: int, ctx: int) -> dict:
    rope_dims = meta.int(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"metadata: {arch}.rope.dimension_count {rope_dims} != head_dim {head_dim} "
                         "(partial rotary embeddings are not supported)")
    for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        if key in meta.m and meta.int(key) != head_dim:
            raise ValueError(f"metadata: {key} {meta.m[key]} != the head dimension {head_dim}")
    scaling_type = meta.str(f"{arch}.rope.scaling.type", "none")
    settings = dict(rope_theta=meta.float(f"{arch}.rope.freq_base", 10000.0),
                    norm_eps=meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    if arch == "gemma3" and scaling_type == "linear":
        # Gemma 3's global layers: llama.cpp divides their frequencies by rope.scaling.factor (ModelConfig checks it)
        settings["rope_scaling"] = {"rope_type": "linear", "factor": meta.float(f"{arch}.rope.scaling.factor")}
    elif scaling_type != "none":
        raise ValueError(f"metadata: {arch}.rope.scaling.type {scaling_type!r} is not supported (Llama 3's "
                         "scaling, stored as rope_freqs.weight, and gemma3's 'linear' are)")
    else:  # llama.cpp divides the frequencies by such a factor whatever the type says: refused, not ignored
        for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
            if key in meta.m and meta.m[key] not in (0, 1):  # (0: unset, 1: no scaling, as llama.cpp reads them)
                raise ValueError(f"metadata: {key} {meta.m[key]!r} scales the rotary frequencies, which is not "
                                 f"supported for {arch} (rope.scaling.type {scaling_type!r})")
    if f"{arch}.attention.sliding_window" in meta.m and arch not in ("gemma2", "gemma3", "phi3"):  # theirs are theirs
        window = meta.int(f"{arch}.attention.sliding_window", limit=LIMITS["seq_len"])
        if window < ctx and arch != "llama":
            raise ValueError(f"metadata: {arch}.attention.sliding_window {window} is shorter than the context {ctx} "
                             f"(no sliding-window attention for {arch}: pass max_model_len <= the window)")
        if window < ctx:  # Mistral's, on every layer; one as long as the context changes nothing
            settings["sliding_window"] = window
    return settings


LONGROPE_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def longrope_scaling(meta: Mapping, arch: str, short, long, n_ctx_train: int) -> dict:
    """ModelConfig's LongRoPE rope_scaling from a file's factors (lists) and metadata, as llama.cpp reads them:
    the original context {arch}.rope.scaling.original_context_length (default: the context_length it was
    trained with), the cos/sin scale {arch}.rope.scaling.attn_factor (default 1)."""
    m = Meta(meta)
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": m.int(f"{arch}.rope.scaling.original_context_length", n_ctx_train,
                                                      limit=LIMITS["seq_len"]),
            "attention_factor": m.float(f"{arch}.rope.scaling.attn_factor", 1.0)}


def longrope_tensors(s: ModelConfig) -> dict:
    """{name: float32 array} of a LongRoPE model's factors, as convert_hf_to_gguf writes them; {} for others."""
    import numpy as np

    rs = s.rope_scaling
    if rs is None or rs["rope_type"] != "longrope":
        return {}
    return {name: np.asarray(rs[key], dtype=np.float32)
            for name, key in zip(LONGROPE_TENSORS, ("short_factor", "long_factor"))}


def longrope_metadata(s: ModelConfig) -> list:
    """[(key, value, GGUFValueType)] of a LongRoPE model's scaling (its factors are the LONGROPE_TENSORS)."""
    from gguf import GGUFValueType

    rs, a = s.rope_scaling, gguf_arch(s)
    return [(f"{a}.rope.scaling.original_context_length", rs["original_max_position_embeddings"],
             GGUFValueType.UINT32), (f"{a}.rope.scaling.attn_factor", rs["attention_factor"], GGUFValueType.FLOAT32)]


def _phi3_settings(meta: Meta, shapes: Mapping[str, tuple]) -> dict:
    """phi3's sliding window (0 or absent: none), applied on every layer as HF's Phi3 does (llama.cpp reads it
    but runs phi3 without a window). Long-rope files (Phi-3 128k) carry both LONGROPE_TENSORS, whose values the
    loader reads."""
    if sum(name in shapes for name in LONGROPE_TENSORS) == 1:
        raise ValueError(f"GGUF file: phi3's long-rope scaling needs both tensors {list(LONGROPE_TENSORS)}, "
                         "the file has one")
    window = meta.m.get("phi3.attention.sliding_window")
    if window in (None, 0):
        return {}
    return {"sliding_window": meta.int("phi3.attention.sliding_window", limit=LIMITS["seq_len"])}


def _gemma_settings(meta: Meta, arch: str, common: dict) -> dict:
    """llama.cpp's gemma2/gemma3 hyperparameters, with its defaults: gemma2 has a window of 4096 on even layers
    and soft-caps 50 and 30; gemma3 a window (if any) on five layers of six, its local rope base
    rope.freq_base_swa (10000) and a final soft-cap if set. Scores are scaled by head_dim^-1/2 (by
    (embedding_length / head_count)^-1/2 for the 27B models, 46 and 62 layers)."""
    if f"{arch}.attention.sliding_window_pattern" in meta.m:
        raise ValueError(f"metadata: {arch}.attention.sliding_window_pattern is not supported ({arch}'s own "
                         "pattern of layers is)")
    scalar = meta.int(f"{arch}.attention.key_length")
    if common["n_layer"] == {"gemma2": 46, "gemma3": 62}[arch]:
        scalar = common["d_model"] / common["n_head"]
    if arch == "gemma2":
        return dict(sliding_window=meta.int("gemma2.attention.sliding_window", 4096, limit=LIMITS["seq_len"]),
                    attn_softcap=meta.float("gemma2.attn_logit_softcapping", 50.0),
                    final_softcap=meta.float("gemma2.final_logit_softcapping", 30.0), query_pre_attn_scalar=scalar)
    window = meta.m.get("gemma3.attention.sliding_window")
    final = meta.m.get("gemma3.final_logit_softcapping")
    return dict(sliding_window=None if window in (None, 0) else meta.int("gemma3.attention.sliding_window",
                                                                        limit=LIMITS["seq_len"]),
                final_softcap=None if final in (None, 0) else meta.float("gemma3.final_logit_softcapping"),
                query_pre_attn_scalar=scalar, rope_local_theta=meta.float("gemma3.rope.freq_base_swa", 10000.0))


def check_llama_cpp_gemma(s: ModelConfig) -> None:
    """ValueError unless llama.cpp's gemma2/gemma3 computes what the config describes: tied embeddings, gemma2's
    two soft-caps (it has no off switch) or gemma3's none on attention, scores scaled as it assumes."""
    if not s.tie_embeddings:
        raise ValueError(f"model_config: llama.cpp's {s.arch} ties its output to the embedding (tie_embeddings "
                         "is False)")
    if s.arch == "gemma2" and (s.attn_softcap is None or s.final_softcap is None):
        raise ValueError("model_config: llama.cpp's gemma2 always soft-caps (attn_softcap and final_softcap needed)")
    if s.arch == "gemma3" and s.attn_softcap is not None:
        raise ValueError("model_config: llama.cpp's gemma3 has no attention soft-cap (attn_softcap)")
    assumed = s.d_model / s.n_head if s.n_layer == {"gemma2": 46, "gemma3": 62}[s.arch] else s.head_dim
    if (s.query_pre_attn_scalar or s.head_dim) != assumed:
        raise ValueError(f"model_config: llama.cpp's {s.arch} scales scores by {assumed}^-1/2; "
                         f"query_pre_attn_scalar is {s.query_pre_attn_scalar}")


def check_llama_cpp_head_dim(s: ModelConfig) -> None:
    """ValueError for a qwen2 whose heads do not fill the model width: llama.cpp's qwen2 builds attn_q and attn_output
    as [n_embd, n_embd] (its llama, qwen3 and gemma read key_length)."""
    if s.base_arch == "qwen2" and s.n_head * s.head_dim != s.d_model:
        raise ValueError(f"model_config: llama.cpp's {gguf_arch(s)} needs n_head * head_dim = d_model, got {s.n_head} * "
                         f"{s.head_dim} != {s.d_model} (heads pruned away: write an HF directory or a run folder)")


def window_metadata(s: ModelConfig, context: int) -> list:
    """[(key, value, GGUFValueType)] of the attention settings beyond llama's: a window on every layer (Mistral's,
    as a llama's {arch}.attention.sliding_window, which the reader takes back; phi3's, 0 for none as
    convert_hf_to_gguf writes it), and the gemma2/gemma3 settings llama.cpp reads (its defaults stand for none of
    them): the window (the whole context when there is none), the soft-caps, gemma3's local rope base and its
    global layers' linear rope scaling; phi3's LongRoPE settings."""
    from gguf import GGUFValueType

    u32, f32, a = GGUFValueType.UINT32, GGUFValueType.FLOAT32, gguf_arch(s)
    if a == "phi3":
        window = [("phi3.attention.sliding_window", s.sliding_window or 0, u32)]
        return window + (longrope_metadata(s) if s.rope_scaling is not None else [])
    if s.kv_window is not None:
        return [(f"{a}.attention.sliding_window", s.kv_window, u32)]
    if not s.gemma:
        return []
    meta = [(f"{a}.attention.sliding_window", s.sliding_window or context, u32)]
    meta += [(f"{a}.{key}_logit_softcapping", cap, f32) for key, cap in
             (("attn", s.attn_softcap), ("final", s.final_softcap)) if cap is not None]
    if a == "gemma3":
        meta.append((f"{a}.rope.freq_base_swa", s.rope_local_theta or s.rope_theta, f32))
        if s.rope_scaling is not None:  # linear, on the global layers (as convert_hf_to_gguf writes it)
            meta += [(f"{a}.rope.scaling.type", "linear", GGUFValueType.STRING),
                     (f"{a}.rope.scaling.factor", s.rope_scaling["factor"], f32)]
    return meta


def gguf_tensor_shapes(cfg: ModelConfig, context: int, rope_freqs: bool = False, longrope: bool = False) -> dict:
    """GGUF tensor name -> shape (torch order) of every tensor of a cfg model, as llama.cpp names them.
    context: the file's context length (GPT-2's position table has a row per position); rope_freqs: whether
    the file carries Llama 3's rope factors; longrope: whether it carries LongRoPE's (LONGROPE_TENSORS)."""
    d, V, ff, hd = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    gpt2 = cfg.arch == "gpt2"
    shapes = {"token_embd.weight": (V, d), "output_norm.weight": (d,)}
    if gpt2:
        shapes |= {"position_embd.weight": (context, d), "output_norm.bias": (d,)}
    elif rope_freqs:
        shapes["rope_freqs.weight"] = (hd // 2,)
    if longrope:
        shapes |= {name: (hd // 2,) for name in LONGROPE_TENSORS}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, d)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
        shapes |= _moe_tensor_shapes(cfg, p) if cfg.moe else {p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff)}
        if gpt2:
            shapes |= {p + "attn_norm.bias": (d,), p + "ffn_norm.bias": (d,), p + "attn_qkv.weight": (3 * d, d),
                       p + "attn_qkv.bias": (3 * d,), p + "attn_output.weight": (d, d), p + "attn_output.bias": (d,),
                       p + "ffn_up.bias": (ff,), p + "ffn_down.bias": (d,)}
            continue
        if cfg.arch == "phi3":  # q|k|v and gate|up fused by rows
            shapes |= {p + "attn_qkv.weight": (q + 2 * kv, d), p + "attn_output.weight": (d, q),
                       p + "ffn_up.weight": (2 * ff, d)}
            continue
        shapes |= {p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d),
                   p + "attn_output.weight": (d, q)}
        if not cfg.moe:
            shapes[p + "ffn_gate.weight"] = (ff, d)
        if cfg.qkv_bias:
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
        if cfg.qk_norm:
            shapes |= {p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)}
        if cfg.gemma:
            shapes |= {p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)}
    return shapes


def _moe_tensor_shapes(cfg: ModelConfig, p: str) -> dict:
    """A MoE block's router (ffn_gate_inp), stacked experts (ffn_*_exps, torch order [experts, rows, cols]) and
    qwen2moe's shared expert (ffn_*_shexp, its sigmoid gate ffn_gate_inp_shexp a vector)."""
    d, E, ff = cfg.d_model, cfg.n_expert, cfg.moe_d_ff
    shapes = {p + "ffn_gate_inp.weight": (E, d), p + "ffn_gate_exps.weight": (E, ff, d),
              p + "ffn_up_exps.weight": (E, ff, d), p + "ffn_down_exps.weight": (E, d, ff)}
    if cfg.shared_expert_d_ff is not None:
        sff = cfg.shared_expert_d_ff
        shapes |= {p + "ffn_gate_shexp.weight": (sff, d), p + "ffn_up_shexp.weight": (sff, d),
                   p + "ffn_down_shexp.weight": (d, sff), p + "ffn_gate_inp_shexp.weight": (d,)}
    return shapes
