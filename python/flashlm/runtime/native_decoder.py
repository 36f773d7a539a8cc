"""The native CPU decoder stack (flashlm.ops.NativeDecoder) over a Transformer's weights: a serving step's
layers in one call, no Python between kernels.

    native = build_native_decoder(model)        # None where it does not apply
    logits = forward_paged_native(model, native, tokens, batch, kv_caches)   # model.forward_paged's logits

It applies to a CPU float32 llama/qwen2/phi3 model without a sliding window shorter than its context whose block
linears are all GGUFLinear (a loaded GGUF file), and takes the ends of the step too (the embedding lookup, the
final norm, a GGUF head) where they are what it reads. The model runner decides per step which path runs; both
give the same logits bit for bit
(tests/test_native_decoder.py): the same kernels, rounding alike.
"""

from typing import Optional

import torch
from torch import nn

from flashlm.models.transformer import GatedMLP, PagedBatch, RMSNorm, Transformer
from flashlm.ops import NativeDecoder
from flashlm.quant.gguf_embedding import GGUFEmbedding
from flashlm.quant.gguf_linear import GGUFLinear


def build_native_decoder(model: Transformer) -> Optional[NativeDecoder]:
    """NativeDecoder over the model's blocks (and its ends where they fit), or None when some part is not what
    it runs. It reads the weights' memory as it is now: build it again after replacing or moving modules."""
    cfg = model.cfg
    # phi3 is llama's block once its fused tensors are split (on load); the stack's attention has no sliding window
    # (Mistral's, phi3's): the module path runs those steps
    windowed = cfg.sliding_window is not None and cfg.sliding_window < cfg.seq_len
    if cfg.arch not in ("llama", "qwen2", "phi3") or not cfg.rotary or windowed:
        return None
    if not model.rope_cos.is_cpu:
        return None

    def linear(m):
        if not isinstance(m, GGUFLinear) or not m.raw.is_cpu:  # GGUFLinear's types are all gguf_matmul's
            return None
        if m.bias is not None and (m.bias.dtype != torch.float32 or not m.bias.is_cpu):
            return None
        return (m.raw, m.ggml_type, m.out_features, m.in_features, m.bias)

    def norm(m):
        ok = isinstance(m, RMSNorm) and m.weight.dtype == torch.float32 and m.weight.is_cpu
        return m.weight.detach() if ok else None

    layers = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if not isinstance(mlp, GatedMLP):
            return None
        parts = (norm(block.attn_norm), linear(attn.q), linear(attn.k), linear(attn.v), linear(attn.o),
                 norm(block.mlp_norm), linear(mlp.gate), linear(mlp.up), linear(mlp.down))
        if any(p is None for p in parts):
            return None
        layers.append(parts)
    # The ends too where they are what it reads: the embedding lookup, the final norm and a GGUF head.
    emb, final = model.tok_emb, norm(model.final_norm)
    table, emb_dtype = None, None
    if isinstance(emb, GGUFEmbedding):
        emb_dtype = emb.dtype
        if emb.dtype == torch.float32 and emb.raw.is_cpu:
            table = (emb.raw, emb.ggml_type)
    elif isinstance(emb, nn.Embedding):
        emb_dtype = emb.weight.dtype
        if emb.weight.dtype == torch.float32 and emb.weight.is_cpu:
            table = (emb.weight.detach(), "F32")
    has_ends = table is not None and final is not None and model.pos_emb is None
    if not has_ends and emb_dtype != torch.float32:
        return None  # the layers alone take float32 rows only: the module path runs the whole step
    native = NativeDecoder(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps, layers)
    if has_ends:
        native.set_ends(*table, final, linear(model.lm_head) if model.lm_head is not None else None)
    return native


def native_takes_caches(kv_caches) -> bool:
    """Whether the native stack reads these caches: float32 or bfloat16, every layer's alike."""
    dtype = kv_caches[0][0].dtype if kv_caches else torch.float32
    return dtype in (torch.float32, torch.bfloat16) and all(k.dtype == dtype and v.dtype == dtype
                                                            for k, v in kv_caches)


@torch.no_grad()
def forward_paged_native(model: Transformer, native: NativeDecoder, tokens: torch.Tensor, batch: PagedBatch,
                         kv_caches) -> torch.Tensor:
    """model.forward_paged(tokens, batch, kv_caches) with the layers (and the ends it holds) in the native
    stack built over the model (build_native_decoder); the caches are ones native_takes_caches accepts."""
    if len(kv_caches) != model.cfg.n_layer:
        raise ValueError(f"kv_caches: expected {model.cfg.n_layer} layers, got {len(kv_caches)}")
    step = (batch.positions, model.rope_cos, model.rope_sin, [k for k, _ in kv_caches], [v for _, v in kv_caches],
            batch.slot_mapping, batch.block_table, batch.seq_lens, batch.cu_seqlens_q, batch.max_seqlen_q)
    if native.has_ends:  # the whole step in one call
        x = native.logits(tokens, *step, batch.logits_rows)
        if native.has_head:
            return x
    else:
        x = model.tok_emb(tokens)  # [T, d] float32 (build_native_decoder checked)
        native(x, *step)
        x = model.final_norm(x[batch.logits_rows])
    return model.logits(x).float()
