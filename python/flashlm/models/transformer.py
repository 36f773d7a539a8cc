"""Transformer: a decoder-only language model (GPT-2, Llama, Qwen2, Qwen3 or Gemma 2 family) whose attention is flashlm's flash
attention, forward and backward (it is an autograd op), as are its RMSNorms, LayerNorms, GELU(tanh), SwiGLU products
and rotary embeddings (flashlm.ops.norm.rms_norm_train, flashlm.ops.layer_norm, flashlm.ops.activation,
flashlm.ops.rope: native kernels with native backward passes) on the training path; the matmuls and token
embeddings are torch's.

    model = Transformer(ModelConfig(arch="llama", n_layer=4, n_head=8, n_kv_head=2, d_model=256))
    logits, loss = model(idx, targets)      # idx, targets: int64 [B, T]; logits [B, T, vocab]

attn_impl="sdpa" swaps in torch's scaled_dot_product_attention and torch's formulas for the norms and
activations: the plain torch model the trainer is compared with, and an independent reference in the tests. Parameter names: tok_emb, pos_emb (gpt2), blocks.{i}.{attn_norm,
attn.{q,k,v,o,q_norm,k_norm (qwen3)}, post_attn_norm (gemma2), mlp_norm, post_mlp_norm (gemma2), mlp.{fc,proj} (gpt2) | mlp.{gate,up,down} (llama)}, final_norm, lm_head (untied only);
the exporters map them to HF and GGUF names.

Serving uses forward_paged: the new tokens of many sequences packed into one row, K/V written into the
paged cache and attention read back from it (PagedBatch says where), so one call mixes prefill chunks and
decodes, module by module. (The runtime may run the same step in flashlm's native decoder stack instead:
flashlm.runtime.native_decoder.)
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.models.config import ModelConfig
from flashlm.models.moe import MoEMLP
from flashlm.ops.activation import gelu_tanh, silu_mul
from flashlm.ops.flash_attn_interface import flash_attn_func
from flashlm.ops.kvcache import paged_attention, write_kv_cache
from flashlm.ops.layer_norm import layer_norm
from flashlm.ops.loss import fused_linear_cross_entropy
from flashlm.ops.norm import rms_norm, rms_norm_train
from flashlm.ops.rope import rope as rope_rotate

ATTN_IMPLS = ("flashlm", "sdpa")

# The dtypes flashlm's attention kernels take on each device; others are cast for the call and back.
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}
_FALLBACK_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# The dtypes flashlm's RMSNorm and silu_mul take (all inputs alike); others run the torch formula.
_NORM_DTYPES_CPU = (torch.float32, torch.bfloat16)
_NORM_DTYPES_CUDA = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_takes(*tensors) -> bool:
    """Whether flashlm's norm and activation kernels take these tensors: one dtype that they take on the first
    tensor's device."""
    x = tensors[0]
    dtypes = _NORM_DTYPES_CUDA if x.is_cuda else _NORM_DTYPES_CPU if x.is_cpu else ()
    return x.dtype in dtypes and all(t.dtype == x.dtype for t in tensors)


def _inference_kernel_applies(*tensors) -> bool:
    """Whether an inference-only flashlm kernel may compute a call on these tensors: no gradient wanted, and
    tensors the kernel takes."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return _kernel_takes(*tensors)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in x's dtype (as HF's LlamaRMSNorm).

    Where no gradient is wanted (inference) flashlm's kernel computes it: one call instead of 5-8 torch ops
    (~28 us a call at decode size). Training runs the kernel with its native backward (rms_norm_train) where
    train_kernels is set and x and the weight share a dtype the kernel takes; else the torch formula."""

    def __init__(self, dim: int, eps: float, train_kernels: bool = False):
        super().__init__()
        self.eps = eps
        self.train_kernels = train_kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def _native(self, x, w, *others) -> bool:
        """Whether flashlm's kernel computes this call (w: self.weight, fetched once by the caller): no gradient
        wanted, and dtypes the kernel takes on x's device whose result is the torch formula's (a bf16 x times
        an f32 weight is f32 in torch). A weight on another device: the kernel says so."""
        return _inference_kernel_applies(x, w, *others)

    def forward(self, x):
        w = self.weight
        if self._native(x, w):
            return rms_norm(x, w, self.eps)
        if self.train_kernels and _kernel_takes(x, w):
            return rms_norm_train(x, w, self.eps)
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)  # the same formula, fewer ops
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def add_forward(self, x, delta):
        """(x + delta, self(x + delta)) in one kernel call where it can (vLLM's fused_add_rms_norm). delta is
        consumed: the fused path writes the sum into it and returns it, so pass a tensor nothing else holds."""
        w = self.weight
        if delta.dtype == x.dtype and delta.shape == x.shape and self._native(x, w, delta):
            return delta, rms_norm(x, w, self.eps, residual=delta)
        x = x + delta
        return x, self(x)


class LayerNorm(nn.LayerNorm):
    """torch's nn.LayerNorm (its parameters and state dict), computed by flashlm's kernel, forward and backward
    (flashlm.ops.layer_norm), where train_kernels is set and x, the weight and the bias share a dtype the kernel
    takes (under bf16 autocast the residual stream and the norm stay float32, as torch keeps them)."""

    def __init__(self, dim: int, eps: float, train_kernels: bool = False):
        super().__init__(dim, eps=eps)
        self.train_kernels = train_kernels

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.train_kernels and _kernel_takes(x, w, *(() if b is None else (b,))):
            return layer_norm(x, w, b, self.eps)
        return super().forward(x)


def rope_inv_freq(cfg: ModelConfig, device=None, theta: Optional[float] = None) -> torch.Tensor:
    """float64 [head_dim / 2]: theta^(-2i/hd), scaled as cfg.rope_scaling asks: Llama 3's long wavelengths
    (beyond original_max / low_freq_factor) slowed down by `factor`, short ones (below original_max /
    high_freq_factor) kept, and a smooth blend in between; or linear scaling, every frequency divided by `factor`;
    or LongRoPE, each frequency divided by its own factor (longrope_factors).
    theta: another base than cfg.rope_theta, for gemma3's local layers, which are never scaled (as in HF's Gemma 3,
    where the scaling belongs to the global layers' rope only)."""
    hd = cfg.head_dim
    rs = cfg.rope_scaling if theta is None else None
    theta = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    if rs is None:
        return inv_freq
    if rs["rope_type"] == "linear":
        return inv_freq / rs["factor"]
    if rs["rope_type"] == "longrope":
        return inv_freq / inv_freq.new_tensor(longrope_factors(cfg))
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv_freq / rs["factor"] + smooth * inv_freq


def longrope_factors(cfg: ModelConfig) -> list:
    """The LongRoPE factors cfg's rotary frequencies are divided by: the long ones when the context (seq_len)
    is longer than original_max_position_embeddings, else the short ones. This is llama.cpp's choice (by its
    n_ctx); transformers picks by the length of the sequence at hand, switching to the long factors once a
    sequence grows past the original length. With a KV cache that would leave the keys already cached rotated
    by the short factors, so one table for the whole context, as llama.cpp has it, is what a cache can hold;
    it equals transformers' whenever every sequence is on the same side of the original length as seq_len."""
    rs = cfg.rope_scaling
    return rs["long_factor"] if cfg.seq_len > rs["original_max_position_embeddings"] else rs["short_factor"]


def rope_tables(cfg: ModelConfig, device=None, theta: Optional[float] = None):
    """cos, sin float32 [seq_len, head_dim] for HF's rotate-half convention: angle(t, i) = t * inv_freq[i],
    repeated over the two halves of the head, times LongRoPE's attention_factor where cfg has one. theta:
    another base than cfg.rope_theta (gemma3's local layers, unscaled)."""
    inv_freq = rope_inv_freq(cfg, device, theta)
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    rs = cfg.rope_scaling if theta is None else None
    scale = rs["attention_factor"] if rs is not None and rs["rope_type"] == "longrope" else 1.0
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rope_factors(cos, sin, dtype):
    """(cos, signed sin) [T, 1, hd] in `dtype` for apply_rope, from rope_tables' rows of T positions. The
    rotate-half term, cat(-x2, x1) * sin, equals roll(x, hd/2) * cat(-sin1, sin2): one roll instead of a
    slice, a negation and a cat (9 us instead of 31 us for a decode step's q)."""
    half = cos.shape[-1] // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos[:, None, :].to(dtype), signed[:, None, :].to(dtype)


def apply_rope(x, cos, signed_sin):
    """x [..., T, heads, hd]; cos, signed_sin [T, 1, hd] from rope_factors."""
    if cos.dtype != x.dtype:  # under autocast q and k are in the autocast dtype, the residual stream is not
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def causal_attention(q, k, v, attn_impl: str, scale=None, window=None, softcap=None):
    """q [B, T, H, hd], k/v [B, S, KV, hd] -> [B, T, H, hd], causal aligned bottom-right (S >= T: the first
    S - T keys, a prefix, are seen by every query). scale: the scores' factor (None: hd^-1/2); window: keys a
    query sees, itself included (None: all before it); softcap: scores s become softcap * tanh(s / softcap)."""
    if attn_impl == "sdpa":
        if window is not None or softcap is not None:  # what SDPA cannot express: the formula, spelled out
            return _masked_attention(q, k, v, scale, window, softcap)
        T, S = q.shape[1], k.shape[1]
        # sdpa's is_causal aligns top-left; a prefix needs the bottom-right mask spelled out
        mask = None if S == T else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=k.shape[2] != q.shape[2], scale=scale)
        return y.transpose(1, 2)
    options = dict(softmax_scale=scale, window_size=(-1 if window is None else window - 1, 0),
                   softcap=0.0 if softcap is None else softcap)
    device = q.device.type
    dtype = q.dtype
    if dtype not in _KERNEL_DTYPES.get(device, ()) or k.dtype != dtype or v.dtype != dtype:
        work = _FALLBACK_DTYPE.get(device, torch.float32)
        return flash_attn_func(q.to(work), k.to(work), v.to(work), causal=True, **options).to(dtype)
    return flash_attn_func(q, k, v, causal=True, **options)


def _masked_attention(q, k, v, scale, window, softcap):
    T, S, H, hd = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (hd ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(T, device=q.device)[:, None] + (S - T)  # bottom-right, as causal_attention
    j = torch.arange(S, device=q.device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= i - j < window
    a = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", a, v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        bias = cfg.arch == "gpt2"
        qkv_bias = cfg.qkv_bias
        hd = cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd
        self.attn_impl = attn_impl
        self.q = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=qkv_bias)
        self.o = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=bias)
        # Qwen3: each head of q and k RMS-normed (one weight per head dimension) before the rotary embedding
        self.train_kernels = train_kernels = attn_impl == "flashlm"
        self.q_norm = RMSNorm(hd, cfg.norm_eps, train_kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, train_kernels) if cfg.qk_norm else None
        # gemma2: its own score scale, soft-capped scores, and a sliding window on some layers
        self.scale = cfg.softmax_scale if cfg.query_pre_attn_scalar is not None else None
        self.window, self.softcap = cfg.layer_window(layer), cfg.attn_softcap

    def _rotate(self, q, k, rope):
        """q, k [..., heads, hd] after the per-head norms (qwen3) and the rotary embedding."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is None:
            return q, k
        cos, signed_sin = rope
        if self.train_kernels and torch.is_grad_enabled() and q.requires_grad and cos.dim() == 3 \
                and _kernel_takes(q, k):
            # Training: flashlm's kernel, one pass forward and one backward (its result is apply_rope's)
            cos, signed_sin = (t.squeeze(1).to(q.dtype) for t in rope)
            return rope_rotate(q, cos, signed_sin), rope_rotate(k, cos, signed_sin)
        return apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)

    def forward(self, x, rope, kv_prefix=None, attend=None):
        """kv_prefix: None or (k, v) [B, P, KV, hd]: keys and values before x's (as prefix tuning's), seen by
        every position and taken as they are (no rope). attend: (q, k, v) -> the attention, in place of the
        causal attention over x's positions (context parallelism passes its ring attention)."""
        if kv_prefix is not None and attend is not None:
            raise ValueError("kv_prefix: not with attend")
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = self._rotate(q, k, rope)
        if kv_prefix is not None:
            k = torch.cat((kv_prefix[0].to(k.dtype), k), dim=1)
            v = torch.cat((kv_prefix[1].to(v.dtype), v), dim=1)
        if attend is not None:
            y = attend(q, k, v)
        else:
            y = causal_attention(q, k, v, self.attn_impl, self.scale, self.window, self.softcap)
        return self.o(y.reshape(B, T, self.n_head * self.head_dim))

    def forward_paged(self, x, rope, batch: "PagedBatch", cache):
        T = x.shape[0]
        q = self.q(x).view(T, self.n_head, self.head_dim)
        k = self.k(x).view(T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(T, self.n_kv_head, self.head_dim)
        q, k = self._rotate(q, k, rope)
        k_cache, v_cache = cache
        write_kv_cache(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, batch.slot_mapping)
        y = paged_attention(q.to(k_cache.dtype), k_cache, v_cache, batch.block_table, batch.seq_lens,
                            batch.cu_seqlens_q, batch.max_seqlen_q, softmax_scale=self.scale,
                            window_size=(-1 if self.window is None else self.window - 1, 0),
                            softcap=0.0 if self.softcap is None else self.softcap)
        return self.o(y.reshape(T, self.n_head * self.head_dim).to(x.dtype))


def gelu(x, train_kernels: bool):
    """GELU's tanh form: flashlm's kernel for inference (the one the native decoder stack runs for gemma's GeGLU,
    so both paths round alike) and, where train_kernels is set, for training with its backward."""
    native = _inference_kernel_applies(x) or (train_kernels and _kernel_takes(x))
    return gelu_tanh(x) if native else F.gelu(x, approximate="tanh")


def swiglu(g, u, train_kernels: bool):
    """silu(g) * u: flashlm's kernel for inference (the one the native decoder stack runs, so both paths round
    alike) and, where train_kernels is set, for training with its backward; else torch's formula."""
    native = _inference_kernel_applies(g, u) or (train_kernels and _kernel_takes(g, u))
    return silu_mul(g, u) if native else F.silu(g) * u


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, train_kernels: bool = False):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.train_kernels = train_kernels

    def forward(self, x):
        return self.proj(gelu(self.fc(x), self.train_kernels))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SiLU (SwiGLU), or GELU's tanh form for gemma2 (GeGLU). d_ff: another width
    than cfg.d_ff (qwen2_moe's shared expert)."""

    def __init__(self, cfg: ModelConfig, d_ff: Optional[int] = None, train_kernels: bool = False):
        super().__init__()
        d_ff = cfg.d_ff if d_ff is None else d_ff
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=False)
        self.gelu = cfg.gemma
        self.train_kernels = train_kernels

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        if self.gelu:
            return self.down(gelu(g, self.train_kernels) * u)
        return self.down(swiglu(g, u, self.train_kernels))


def _norm(cfg: ModelConfig, train_kernels: bool = False):
    if cfg.arch == "gpt2":
        return LayerNorm(cfg.d_model, cfg.norm_eps, train_kernels)
    return RMSNorm(cfg.d_model, cfg.norm_eps, train_kernels)


def _mlp(cfg: ModelConfig, train_kernels: bool) -> nn.Module:
    if cfg.arch == "gpt2":
        return GeluMLP(cfg, train_kernels)
    if cfg.moe:
        shared = (GatedMLP(cfg, cfg.shared_expert_d_ff, train_kernels) if cfg.shared_expert_d_ff is not None
                  else None)
        return MoEMLP(cfg, shared)
    return GatedMLP(cfg, train_kernels=train_kernels)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); gemma2 norms each branch's output too
    (post_attn_norm, post_mlp_norm) before adding it."""

    def __init__(self, cfg: ModelConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        native = attn_impl == "flashlm"  # flashlm's training kernels; "sdpa" is the plain torch model
        self.attn_norm = _norm(cfg, native)
        self.attn = Attention(cfg, attn_impl, layer)
        self.mlp_norm = _norm(cfg, native)
        self.mlp = _mlp(cfg, native)
        self.post_attn_norm = _norm(cfg, native) if cfg.gemma else None
        self.post_mlp_norm = _norm(cfg, native) if cfg.gemma else None

    def forward(self, x, rope, kv_prefix=None, attend=None):
        if self.post_attn_norm is not None:
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), rope, kv_prefix, attend))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), rope, kv_prefix, attend)
        return x + self.mlp(self.mlp_norm(x))

    def forward_paged(self, x, rope, batch, cache):
        a = self.attn.forward_paged(self.attn_norm(x), rope, batch, cache)  # a fresh tensor: add_forward may take it
        if self.post_attn_norm is not None:
            x = x + self.post_attn_norm(a)
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        if isinstance(self.mlp_norm, RMSNorm):
            x, h = self.mlp_norm.add_forward(x, a)
        else:
            x = x + a
            h = self.mlp_norm(x)
        return x + self.mlp(h)


@dataclass
class PagedBatch:
    """Where the packed tokens of one serving step belong. T tokens from S sequences, sequence s owning rows
    [cu_seqlens_q[s], cu_seqlens_q[s + 1]) (without cu_seqlens_q: one token each, a pure decode step)."""
    positions: torch.Tensor  # int64 [T]: each token's position in its sequence
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset) its K and V go to
    block_table: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]: each sequence's length including this step's tokens
    cu_seqlens_q: Optional[torch.Tensor]  # int32 [S + 1], or None when every sequence has one token
    max_seqlen_q: int
    logits_rows: torch.Tensor  # int64 [R]: the rows whose next-token logits are wanted


def takes_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Whether parameter `name` gets weight decay: matrices do; norms, biases and a QAT layer's learned steps
    (weight_step, 2-D for int4 groups: decay would shrink them toward a step of zero) do not."""
    return p.dim() >= 2 and not name.endswith("weight_step")


def cap_logits(logits: torch.Tensor, cap) -> torch.Tensor:
    """cap * tanh(logits / cap) (gemma2's final soft-cap); the logits themselves when cap is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def embedding_scale(cfg: ModelConfig) -> Optional[float]:
    """Gemma's factor on the embedded rows, sqrt(d_model); None for the others (rows as looked up)."""
    return cfg.d_model ** 0.5 if cfg.gemma else None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_impl: str = "flashlm"):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"cfg: must be a ModelConfig, got {type(cfg).__name__}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.cfg = cfg
        self.checkpointing = False  # recompute each block in backward instead of keeping its activations
        # forward(idx, targets) returns (None, loss) with the loss from the vocabulary-chunked kernel
        # (flashlm.ops.loss): no [B, T, vocab] logits, forward or backward (not with gemma2's soft cap)
        self.fused_loss = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, attn_impl, i) for i in range(cfg.n_layer))
        self.final_norm = _norm(cfg, attn_impl == "flashlm")
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.make_buffers()
        self.reset_parameters()

    def make_buffers(self, device=None):
        """The rotary tables (non-persistent buffers), computed from the config; again after a build on the
        meta device (flashlm.parallel.materialize), where they were made without values."""
        cfg = self.cfg
        if cfg.rotary:
            cos, sin = rope_tables(cfg, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.rope_local_theta is not None:  # gemma3's local layers rotate by another base
            cos, sin = rope_tables(cfg, device, theta=cfg.rope_local_theta)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def reset_parameters(self):
        """GPT-2's initialisation: N(0, 0.02) weights, the residual projections scaled by 1/sqrt(2 n_layer)
        so the residual stream's variance does not grow with depth; zero biases, unit norm weights."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o.weight, mean=0.0, std=residual_std)
            if isinstance(block.mlp, MoEMLP):
                nn.init.normal_(block.mlp.experts_gate, mean=0.0, std=0.02)
                nn.init.normal_(block.mlp.experts_up, mean=0.0, std=0.02)
                nn.init.normal_(block.mlp.experts_down, mean=0.0, std=residual_std)
                if block.mlp.shared is not None:
                    nn.init.normal_(block.mlp.shared.down.weight, mean=0.0, std=residual_std)
                continue
            out = block.mlp.proj if isinstance(block.mlp, GeluMLP) else block.mlp.down
            nn.init.normal_(out.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, prompt=None, kv_prefix=None):
        """logits [B, T, vocab] of idx's positions, and the loss when targets are given.

        The PEFT methods feed virtual tokens: prompt [B, P, d], embeddings placed before idx's (prompt tuning),
        or kv_prefix, per layer (k, v) [B, P, n_kv_head, head_dim] that every position attends to (prefix
        tuning). Either way idx's tokens sit at positions P.. P + T - 1, as in HF's models under PEFT."""
        hidden = self.hidden_states(idx, prompt=prompt, kv_prefix=kv_prefix)  # checks idx first
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets: must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        # (a head that is not a plain nn.Linear, an adapter's or a quantized layer's, keeps the logits path)
        plain_head = self.lm_head is None or type(self.lm_head) is nn.Linear
        if targets is not None and self.fused_loss and plain_head and self.cfg.final_softcap is None:
            head = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
            return None, fused_linear_cross_entropy(hidden, head, targets, ignore_index=-100)
        logits = self.logits(hidden)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, prompt=None, kv_prefix=None) -> torch.Tensor:
        """The final-normed hidden states [B, T, d] of idx's positions (forward's logits are self.logits of
        them): what a loss fused with the lm head takes instead of the logits."""
        if idx.dtype != torch.int64 or idx.dim() != 2:
            raise ValueError(f"idx: must be int64 [batch, seq], got {idx.dtype} {tuple(idx.shape)}")
        B, T = idx.shape
        P = self._virtual_tokens(B, prompt, kv_prefix)
        if not 0 < T <= self.cfg.seq_len - P:
            room = f"seq_len={self.cfg.seq_len}" + (f" less {P} virtual tokens" if P else "")
            raise ValueError(f"idx: sequence length must be in [1, {room}], got {T}")
        x = self.tok_emb(idx)  # [B, T, d]
        first = P  # the position of idx's first token
        if prompt is not None:
            x = torch.cat((prompt.to(x.dtype).expand(B, -1, -1), x), dim=1)
            first = 0
        x = self._scale_embeddings(x)  # prompt tuning's virtual tokens too, as HF's models scale inputs_embeds
        positions = torch.arange(first, first + x.shape[1], device=idx.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        ropes = self._ropes(positions, x.dtype)
        prefixes = kv_prefix if kv_prefix is not None else [None] * len(self.blocks)
        for block, rope, prefix in zip(self.blocks, ropes, prefixes):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, prefix, use_reentrant=False)
            else:
                x = block(x, rope, prefix)
        if prompt is not None:
            x = x[:, P:]
        return self.final_norm(x)

    def _virtual_tokens(self, B: int, prompt, kv_prefix) -> int:
        """P, the virtual tokens forward's prompt or kv_prefix put before idx's (0 for neither), checked."""
        if prompt is not None and kv_prefix is not None:
            raise ValueError("prompt: cannot be combined with kv_prefix")
        if prompt is not None:
            if prompt.dim() != 3 or prompt.shape[0] not in (1, B) or prompt.shape[2] != self.cfg.d_model:
                raise ValueError(f"prompt: must be [1 or {B}, P, {self.cfg.d_model}], got {tuple(prompt.shape)}")
            return prompt.shape[1]
        if kv_prefix is None:
            return 0
        if len(kv_prefix) != self.cfg.n_layer:
            raise ValueError(f"kv_prefix: expected {self.cfg.n_layer} layers, got {len(kv_prefix)}")
        P = kv_prefix[0][0].shape[1]
        want = (B, P, self.cfg.n_kv_head, self.cfg.head_dim)
        for i, (k, v) in enumerate(kv_prefix):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"kv_prefix: layer {i} must be two {want} tensors, got {tuple(k.shape)}, "
                                 f"{tuple(v.shape)}")
        return P
    def _ropes(self, positions: torch.Tensor, dtype) -> list:
        """Each block's rope factors at `positions` (None without rotary embeddings): gemma3's local layers
        take the local tables."""
        if not self.cfg.rotary:
            return [None] * self.cfg.n_layer
        rope = rope_factors(self.rope_cos[positions], self.rope_sin[positions], dtype)
        if self.cfg.rope_local_theta is None:
            return [rope] * self.cfg.n_layer
        local = rope_factors(self.rope_local_cos[positions], self.rope_local_sin[positions], dtype)
        return [local if self.cfg.local_layer(i) else rope for i in range(self.cfg.n_layer)]

    @property
    def embedding_scale(self) -> Optional[float]:
        return embedding_scale(self.cfg)

    def _scale_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        # Through the module function, not the property: a pipeline stage runs this method as its own.
        scale = embedding_scale(self.cfg)
        if scale is not None:  # rounded to the embedding's dtype, as Gemma does
            x = x * torch.tensor(scale, dtype=x.dtype)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next-token logits [..., vocab] of final-normed rows x [..., d]: the lm head, or the tied
        embedding table; soft-capped where the config says so (gemma2)."""
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
        # Through the module function, not self.soft_cap: a pipeline stage runs this method as its own.
        return cap_logits(logits, self.cfg.final_softcap)

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """cap * tanh(logits / cap) with the config's final cap (gemma2); the logits themselves without one."""
        return cap_logits(logits, self.cfg.final_softcap)

    @torch.no_grad()
    def forward_paged(self, tokens: torch.Tensor, batch: PagedBatch, kv_caches) -> torch.Tensor:
        """Logits float32 [len(batch.logits_rows), vocab] for a serving step. tokens: int64 [T];
        kv_caches: per layer (k_cache, v_cache), each [num_blocks, block_size, n_kv_head, head_dim]."""
        if len(kv_caches) != self.cfg.n_layer:
            raise ValueError(f"kv_caches: expected {self.cfg.n_layer} layers, got {len(kv_caches)}")
        x = self._scale_embeddings(self.tok_emb(tokens))  # [T, d]
        if self.pos_emb is not None:
            x = x + self.pos_emb(batch.positions)
        ropes = self._ropes(batch.positions, x.dtype)
        for block, rope, cache in zip(self.blocks, ropes, kv_caches):
            x = block.forward_paged(x, rope, batch, cache)
        return self.logits(self.final_norm(x[batch.logits_rows])).float()

    def param_groups(self, weight_decay: float) -> list:
        """Weight decay on matrices (linear weights and embeddings), none on norms, biases and learned steps."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if takes_weight_decay(name, p) else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward, PaLM's accounting): 6 per weight of every matrix
        multiply (the blocks and the lm head; of a MoE layer, the experts a token uses) plus 12 * n_layer *
        d_model * T for the attention scores."""
        cfg = self.cfg
        T = cfg.seq_len if seq_len is None else seq_len
        weights = self.num_params(non_embedding=True)
        if cfg.moe:  # a token goes through n_expert_used of the n_expert experts
            weights -= cfg.n_layer * 3 * (cfg.n_expert - cfg.n_expert_used) * cfg.moe_d_ff * cfg.d_model
        return 6.0 * (weights + cfg.vocab_size * cfg.d_model) \
            + 12.0 * cfg.n_layer * cfg.d_model * T
