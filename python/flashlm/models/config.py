"""ModelConfig: the shape of a decoder-only transformer, for both families flashlm trains and runs.

    gpt2:  learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere, tied embeddings (GPT-2).
    llama: rotary positions, RMSNorm, SiLU-gated MLP, no biases, optional GQA (Llama 2/3, SmolLM, TinyLlama,
           Mistral); rope_scaling {"rope_type": "llama3", ...} for Llama 3.1+; sliding_window for Mistral's
           window on every layer.
    qwen2: llama with biases on the q, k and v projections.
    qwen3: llama with an RMSNorm over each head of q and of k before the rotary embedding (Qwen3), and a
           head_dim of its own (n_head * head_dim need not be d_model).
    gemma2: rotary, RMSNorm before and after both attention and MLP, a GELU(tanh)-gated MLP, embeddings scaled by
           sqrt(d_model), attention logits soft-capped (attn_softcap * tanh(s / attn_softcap)) and scaled by
           query_pre_attn_scalar^-1/2, final logits soft-capped, even layers attending to a sliding window and odd
           ones globally (Gemma 2). Its norm weights are the effective ones: HF's (1 + w).
    gemma3: gemma2's block with qwen3's q/k norms, five local layers to one global (layer i global where
           i % 6 == 5), the local layers' rotary base rope_local_theta, no soft-caps unless set (Gemma 3 text);
           rope_scaling {"rope_type": "linear", "factor"} on the global layers (Gemma 3 4B and larger).
    phi3:  llama's block (Phi-3: HF and GGUF files fuse q|k|v and gate|up, split on load), every layer attending
           to sliding_window keys when one is set; rope_scaling {"rope_type": "longrope", "short_factor",
           "long_factor", "original_max_position_embeddings", "attention_factor"} for the long-context models.
    mixtral, qwen2_moe, qwen3_moe: llama's, qwen2's and qwen3's attention with a mixture-of-experts MLP on every
           layer (flashlm.models.moe): n_expert experts of moe_d_ff, n_expert_used of them per token, picked by a
           softmax over a router's logits (the kept weights renormalised where norm_topk_prob); qwen2_moe adds a
           shared expert of shared_expert_d_ff gated by a sigmoid (Mixtral, Qwen1.5/Qwen2-MoE, Qwen3-MoE).
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
# Each mixture-of-experts architecture and the dense one whose attention it has.
MOE_BASE = {"mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# The architectures whose head_dim may differ from d_model / n_head (llama and qwen2 as HF's and llama.cpp's
# head_dim / key_length let them: what a model with attention heads pruned away needs; GPT-2 has no such setting).
FREE_HEAD_DIM = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", *MOE_BASE)  # (llama.cpp's phi3 needs d_model / n_head)
GEMMA_ARCHS = ("gemma2", "gemma3")
# Architectures with a sliding_window setting: Gemma's local layers; every layer of phi3 and of llama (Mistral's).
WINDOW_ARCHS = GEMMA_ARCHS + ("phi3", "llama", "mixtral")
# Fields only the Gemma architectures use (sliding_window the WINDOW_ARCHS); None elsewhere, left out of to_dict()
# when None.
GEMMA_FIELDS = ("sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta")
# Fields only the MoE architectures use (shared_expert_d_ff only qwen2_moe); None elsewhere, left out of to_dict().
MOE_FIELDS = ("n_expert", "n_expert_used", "moe_d_ff", "shared_expert_d_ff", "norm_topk_prob")
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LONGROPE_KEYS = ("rope_type", "short_factor", "long_factor", "original_max_position_embeddings", "attention_factor")

# The largest value of each size, far above any published model (Llama 3.1 405B: 126 layers, d_model 16384,
# d_ff 53248, 128 heads of 128; vocabularies reach 262144, contexts 10M tokens). A size read from a file is
# untrusted: these keep a bad one from building billions of modules or tables before anything else fails.
LIMITS = {"vocab_size": 1 << 24, "n_layer": 4096, "n_head": 1024, "d_model": 1 << 17, "d_ff": 1 << 20,
          "seq_len": 1 << 24, "head_dim": 1024, "n_expert": 1024}


def check_size(value, name: str, limit: int) -> int:
    """value, an int in [1, limit]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name}: must be a positive integer of at most {limit}, got {value!r}")
    return value


def check_heads(d_model: int, n_head: int, n_kv_head: int, names: tuple, where: str = "") -> None:
    """ValueError unless the heads split the model width and the K/V heads divide the heads. names: how the
    file that declared them calls the three sizes (a loader's message names the file's own keys)."""
    d_name, head_name, kv_name = names
    if d_model % n_head:
        raise ValueError(f"{where}{d_name} {d_model} is not a multiple of {head_name} {n_head}")
    if n_head % n_kv_head:
        raise ValueError(f"{where}{kv_name} {n_kv_head} does not divide {head_name} {n_head}")


@dataclass
class ModelConfig:
    arch: str = "gpt2"
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (no GQA)
    d_model: int = 256
    d_ff: Optional[int] = None  # None: 4 * d_model (gpt2), 8/3 * d_model rounded up to 64 (llama)
    seq_len: int = 256  # the longest sequence; gpt2's position table has this many rows
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None, Llama 3's {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    # or, for gemma3's global layers, {"rope_type": "linear", "factor"}
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: Optional[int] = None  # None: d_model / n_head; another value for the FREE_HEAD_DIM archs only
    # keys a local layer's query sees, itself included (gemma: the local layers; phi3 and llama: every layer)
    sliding_window: Optional[int] = None
    attn_softcap: Optional[float] = None  # gemma2: attention logits capped to (-cap, cap) by a tanh
    final_softcap: Optional[float] = None  # gemma2: the same on the output logits
    query_pre_attn_scalar: Optional[float] = None  # gemma2: scores scaled by its -1/2 power (None: head_dim's)
    rope_local_theta: Optional[float] = None  # gemma3: the local layers' rotary base (None: rope_theta)
    n_expert: Optional[int] = None  # MoE: experts per layer
    n_expert_used: Optional[int] = None  # MoE: experts each token goes through (top k)
    moe_d_ff: Optional[int] = None  # MoE: each expert's hidden width (None: d_ff)
    shared_expert_d_ff: Optional[int] = None  # qwen2_moe: the shared expert's hidden width
    norm_topk_prob: Optional[bool] = None  # MoE: the kept routing weights divided by their sum (None: True)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "seq_len"):
            check_size(getattr(self, name), name, LIMITS[name])
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0 \
                or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head: must be a positive divisor of n_head={self.n_head}, got {self.n_kv_head!r}")
        self._check_head_dim()
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"n_kv_head: gpt2 has no grouped-query attention (n_kv_head must equal n_head "
                             f"{self.n_head}), got {self.n_kv_head}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.arch != "gpt2" and self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.arch == "gpt2" else -(-8 * self.d_model // 3 // 64) * 64
        check_size(self.d_ff, "d_ff", LIMITS["d_ff"])
        self._check_gemma_fields()
        self._check_moe_fields()
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name}: must be a positive finite number, got {value!r}")

    def _check_head_dim(self):
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model: must be a multiple of n_head={self.n_head}, got {self.d_model}")
            self.head_dim = self.d_model // self.n_head
        else:
            check_size(self.head_dim, "head_dim", LIMITS["head_dim"])
            if self.arch not in FREE_HEAD_DIM and self.head_dim * self.n_head != self.d_model:
                raise ValueError(f"head_dim: {self.arch} needs head_dim = d_model / n_head = {self.d_model} / "
                                 f"{self.n_head}, got {self.head_dim} (only {FREE_HEAD_DIM} may differ)")
        if self.head_dim > LIMITS["head_dim"]:
            raise ValueError(f"d_model: head_dim d_model / n_head = {self.d_model} / {self.n_head} is more than "
                             f"{LIMITS['head_dim']}")

    def _check_gemma_fields(self):
        for name in GEMMA_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            allowed = WINDOW_ARCHS if name == "sliding_window" else ("gemma3",) if name == "rope_local_theta" \
                else GEMMA_ARCHS
            if self.arch not in allowed:
                raise ValueError(f"{name}: {self.arch} has no such setting, got {value!r}")
            if name == "sliding_window":
                check_size(value, name, LIMITS["seq_len"])
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name}: must be a positive finite number, got {value!r}")

    def _check_moe_fields(self):
        if not self.moe:
            for name in MOE_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: {self.arch} has no experts (only {tuple(MOE_BASE)} do), got "
                                     f"{getattr(self, name)!r}")
            return
        if self.n_expert is None or self.n_expert_used is None:
            raise ValueError(f"n_expert, n_expert_used: {self.arch} needs both, got {self.n_expert!r} and "
                             f"{self.n_expert_used!r}")
        check_size(self.n_expert, "n_expert", LIMITS["n_expert"])
        check_size(self.n_expert_used, "n_expert_used", self.n_expert)
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        check_size(self.moe_d_ff, "moe_d_ff", LIMITS["d_ff"])
        if self.shared_expert_d_ff is not None:
            if self.arch != "qwen2_moe":
                raise ValueError(f"shared_expert_d_ff: only qwen2_moe has a shared expert, got "
                                 f"{self.shared_expert_d_ff!r} for {self.arch}")
            check_size(self.shared_expert_d_ff, "shared_expert_d_ff", LIMITS["d_ff"])
        if self.norm_topk_prob is None:
            self.norm_topk_prob = True
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob: must be a bool, got {self.norm_topk_prob!r}")
        if self.arch == "mixtral" and not self.norm_topk_prob:
            raise ValueError("norm_topk_prob: Mixtral always renormalises its kept routing weights (True), got False")
        if self.arch == "qwen2_moe" and self.shared_expert_d_ff is None:
            raise ValueError("shared_expert_d_ff: qwen2_moe has a shared expert (its width is needed), got None")

    def _check_rope_scaling(self):
        rs = self.rope_scaling
        kind = rs.get("rope_type") if isinstance(rs, dict) else None
        if self.arch == "gemma3" and kind == "linear":
            # Gemma 3 (4B and larger): its global layers' frequencies divided by factor
            factor = rs.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0 \
                    or not math.isfinite(factor):
                raise ValueError(f"rope_scaling: linear scaling needs a finite factor > 0, got {factor!r}")
            self.rope_scaling = {"rope_type": "linear", "factor": float(factor)}
            return
        if self.arch == "phi3" and kind == "longrope":
            self._check_longrope()
            return
        if self.arch == "gpt2" or kind != "llama3":
            raise ValueError(f"rope_scaling: only Llama 3's {{'rope_type': 'llama3', ...}} on a rotary model, or "
                             f"{{'rope_type': 'linear', 'factor': ...}} on gemma3, is supported, got {rs!r}")
        missing = [k for k in ROPE_SCALING_KEYS if k not in rs]
        if missing:
            raise ValueError(f"rope_scaling: missing {missing}")
        if not (rs["factor"] >= 1 and rs["high_freq_factor"] > rs["low_freq_factor"] > 0
                and rs["original_max_position_embeddings"] > 0):
            raise ValueError(f"rope_scaling: needs factor >= 1, high_freq_factor > low_freq_factor > 0 and "
                             f"original_max_position_embeddings > 0, got {rs!r}")
        self.rope_scaling = {k: rs[k] for k in ROPE_SCALING_KEYS}

    def _check_longrope(self):
        """Phi-3's LongRoPE: one factor per rotary frequency for contexts up to the original length (short) and
        beyond it (long), and the cos/sin scale (attention_factor)."""
        rs = self.rope_scaling
        missing = [k for k in LONGROPE_KEYS if k not in rs]
        if missing:
            raise ValueError(f"rope_scaling: longrope is missing {missing}")
        out = {"rope_type": "longrope"}
        for name in ("short_factor", "long_factor"):
            f = rs[name]
            if not isinstance(f, (list, tuple)) or len(f) != self.head_dim // 2 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in f):
                raise ValueError(f"rope_scaling: longrope's {name} must be {self.head_dim // 2} finite numbers > 0 (one per "
                                 f"rotary frequency of head_dim {self.head_dim})")
            out[name] = [float(x) for x in f]
        orig, attn = rs["original_max_position_embeddings"], rs["attention_factor"]
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise ValueError(f"rope_scaling: original_max_position_embeddings must be an int > 0, got {orig!r}")
        if isinstance(attn, bool) or not isinstance(attn, (int, float)) or not math.isfinite(attn) or attn <= 0:
            raise ValueError(f"rope_scaling: attention_factor must be a finite number > 0, got {attn!r}")
        out.update(original_max_position_embeddings=orig, attention_factor=float(attn))
        self.rope_scaling = out

    @property
    def moe(self) -> bool:
        """Whether every block's MLP is a mixture of experts (flashlm.models.moe.MoEMLP)."""
        return self.arch in MOE_BASE

    @property
    def base_arch(self) -> str:
        """The dense architecture whose attention this one has (itself where it has no experts)."""
        return MOE_BASE.get(self.arch, self.arch)

    @property
    def qkv_bias(self) -> bool:
        return self.base_arch in ("gpt2", "qwen2")

    @property
    def gemma(self) -> bool:
        """Gemma's block: post-norms, a GELU(tanh)-gated MLP, embeddings scaled by sqrt(d_model)."""
        return self.arch in GEMMA_ARCHS

    def local_layer(self, layer: int) -> bool:
        """Whether block `layer` is a local one (gemma2: even layers; gemma3: all but every sixth; phi3 and llama:
        every layer when there is a sliding window)."""
        return (self.arch == "gemma2" and layer % 2 == 0) or (self.arch == "gemma3" and layer % 6 != 5) \
            or (self.base_arch in ("phi3", "llama") and self.sliding_window is not None)

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of block `layer`, None where it attends globally."""
        return self.sliding_window if self.local_layer(layer) else None

    @property
    def kv_window(self) -> Optional[int]:
        """The window every layer attends within (Mistral's), or None where some layer attends globally: the
        KV cache may drop a sequence's keys more than this many positions back only when it is set."""
        return self.sliding_window if self.base_arch in ("phi3", "llama") else None

    @property
    def softmax_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def qk_norm(self) -> bool:
        """Whether each head of q and k is RMS-normed before the rotary embedding (attn.q_norm, attn.k_norm)."""
        return self.base_arch in ("qwen3", "gemma3")

    def state_shapes(self) -> dict:
        """Transformer state-dict name -> shape, for every parameter this config implies (what loaders and
        exporters check a state dict against; tests/test_models.py checks it against a built model)."""
        d, V = self.d_model, self.vocab_size
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        gpt2 = self.arch == "gpt2"
        shapes = {"tok_emb.weight": (V, d), "final_norm.weight": (d,)}
        if gpt2:
            shapes |= {"pos_emb.weight": (self.seq_len, d), "final_norm.bias": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (V, d)
        for i in range(self.n_layer):
            p = f"blocks.{i}."
            shapes |= {p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,), p + "attn.q.weight": (q, d),
                       p + "attn.k.weight": (kv, d), p + "attn.v.weight": (kv, d), p + "attn.o.weight": (d, q)}
            if self.qkv_bias:
                shapes |= {p + "attn.q.bias": (q,), p + "attn.k.bias": (kv,), p + "attn.v.bias": (kv,)}
            if self.qk_norm:
                shapes |= {p + "attn.q_norm.weight": (self.head_dim,), p + "attn.k_norm.weight": (self.head_dim,)}
            if self.gemma:
                shapes |= {p + "post_attn_norm.weight": (d,), p + "post_mlp_norm.weight": (d,)}
            if gpt2:
                shapes |= {p + "attn_norm.bias": (d,), p + "mlp_norm.bias": (d,), p + "attn.o.bias": (d,),
                           p + "mlp.fc.weight": (self.d_ff, d), p + "mlp.fc.bias": (self.d_ff,),
                           p + "mlp.proj.weight": (d, self.d_ff), p + "mlp.proj.bias": (d,)}
            elif self.moe:
                shapes |= self._moe_shapes(p + "mlp.")
            else:
                shapes |= {p + "mlp.gate.weight": (self.d_ff, d), p + "mlp.up.weight": (self.d_ff, d),
                           p + "mlp.down.weight": (d, self.d_ff)}
        return shapes

    def _moe_shapes(self, p: str) -> dict:
        d, E, ff = self.d_model, self.n_expert, self.moe_d_ff
        shapes = {p + "router.weight": (E, d), p + "experts_gate": (E, ff, d), p + "experts_up": (E, ff, d),
                  p + "experts_down": (E, d, ff)}
        if self.shared_expert_d_ff is not None:
            sff = self.shared_expert_d_ff
            shapes |= {p + "shared.gate.weight": (sff, d), p + "shared.up.weight": (sff, d),
                       p + "shared.down.weight": (d, sff), p + "shared_gate.weight": (1, d)}
        return shapes

    @property
    def rotary(self) -> bool:
        return self.arch != "gpt2"

    def to_dict(self) -> dict:
        """The config's fields; head_dim only where it is not d_model / n_head and gemma2's fields only where
        set, so that the dicts of configs without them (checkpoints written before they existed) stay what
        they were."""
        d = asdict(self)
        if self.head_dim * self.n_head == self.d_model:
            del d["head_dim"]
        for name in GEMMA_FIELDS + MOE_FIELDS:
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)
