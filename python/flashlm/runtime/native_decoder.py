"""The native CPU decoder stack (flashlm.ops.NativeDecoder) over a Transformer's weights: a serving step's
layers in one call, no Python between kernels.

    native = build_native_decoder(model)        # None where it does not apply
    logits = forward_paged_native(model, native, tokens, batch, kv_caches)   # model.forward_paged's logits

It applies to a CPU float32 llama (mistral's sliding window too), qwen2, qwen3, phi3, gemma2, gemma3, mixtral,
qwen2_moe or qwen3_moe model whose block linears (routers included) are all GGUFLinear (a loaded GGUF file) and
whose experts are GGUFExperts or float tensors on the CPU, and takes the ends of the step too (the embedding
lookup, the final norm, a GGUF head) where they are what it reads. Gemma's parts are the stack's options: its
post-norms, GeGLU, score scale and soft cap, scaled embeddings and gemma3's local rope tables; the final logits'
soft cap is applied here, as the module path applies it. The model runner decides per step which path runs;
both give the same logits bit for bit (tests/test_native_decoder.py, test_native_decoder_gemma.py): the same
kernels, rounding alike.
"""

from typing import Optional

import torch
from torch import nn

from flashlm.models.moe import MoEMLP
from flashlm.models.transformer import GatedMLP, PagedBatch, RMSNorm, Transformer
from flashlm.ops import NativeDecoder
from flashlm.ops.moe import is_gguf_experts
from flashlm.quant.gguf_embedding import GGUFEmbedding
from flashlm.quant.gguf_linear import GGUFLinear


def build_native_decoder(model: Transformer) -> Optional[NativeDecoder]:
    """NativeDecoder over the model's blocks (and its ends where they fit), or None when some part is not what
    it runs. It reads the weights' memory as it is now: build it again after replacing or moving modules."""
    cfg = model.cfg
    # phi3 is llama's block once its fused tensors are split (on load); the MoE architectures are their dense
    # base's attention with experts
    if cfg.base_arch not in ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3") or not cfg.rotary:
        return None
    local_rope = cfg.rope_local_theta is not None  # gemma3's local layers rotate by their own tables
    if not model.rope_cos.is_cpu or (local_rope and not model.rope_local_cos.is_cpu):
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
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if (attn.scale, attn.softcap) != (model.blocks[0].attn.scale, model.blocks[0].attn.softcap):
            return None  # the stack's score scale and cap are the model's, every layer's alike
        dense = mlp.shared if isinstance(mlp, MoEMLP) else mlp
        parts = [norm(block.attn_norm), linear(attn.q), linear(attn.k), linear(attn.v), linear(attn.o),
                 norm(block.mlp_norm)]
        if dense is None:
            parts += [False, False, False]  # a MoE layer without a shared expert: no MLP (None below)
        elif isinstance(dense, GatedMLP) and dense.gelu == cfg.gemma:
            parts += [linear(dense.gate), linear(dense.up), linear(dense.down)]
        else:
            return None
        qk = (norm(attn.q_norm), norm(attn.k_norm)) if attn.q_norm is not None else (False, False)
        experts = _moe(mlp, linear) if isinstance(mlp, MoEMLP) else False
        post = ((norm(block.post_attn_norm), norm(block.post_mlp_norm)) if block.post_attn_norm is not None
                else (False, False))  # gemma's norms of each sublayer's output
        parts += [*qk, experts, *post]
        if any(p is None for p in parts):
            return None
        parts = [None if p is False else p for p in parts]
        layers.append((*parts[:11], attn.window or 0, *parts[11:], local_rope and cfg.local_layer(i)))
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
    attn = model.blocks[0].attn if model.blocks else None
    native = NativeDecoder(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.norm_eps, layers,
                           softmax_scale=None if attn is None else attn.scale,
                           attn_softcap=None if attn is None else attn.softcap,
                           embedding_scale=model.embedding_scale, gelu=cfg.gemma)
    if has_ends:
        native.set_ends(*table, final, linear(model.lm_head) if model.lm_head is not None else None)
    return native


def _moe(mlp: MoEMLP, linear):
    """The stack's spec of a MoE MLP (router, top_k, renormalize, gate, up, down, shared_gate or None), or None
    where some part is not what it reads."""
    def float_vectors(m):  # a float32 nn.Linear's weight: its dot products summed in f64 by both paths
        ok = type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32 and m.weight.is_cpu
        return m.weight.detach().contiguous() if ok else None

    router = linear(mlp.router) if isinstance(mlp.router, GGUFLinear) else float_vectors(mlp.router)

    def experts(w):
        if is_gguf_experts(w):
            return (w.raw, w.ggml_type, *w.shape) if w.raw.is_cpu else None
        ok = isinstance(w, torch.Tensor) and w.dim() == 3 and w.is_cpu and w.dtype in _EXPERT_DTYPES
        return (w.detach().contiguous(), _EXPERT_DTYPES[w.dtype], *w.shape) if ok else None

    gate, up, down = experts(mlp.experts_gate), experts(mlp.experts_up), experts(mlp.experts_down)
    shared_gate = None
    if mlp.shared is not None:
        shared_gate = float_vectors(mlp.shared_gate)
        if shared_gate is None or shared_gate.shape[0] != 1:
            return None
        shared_gate = shared_gate.reshape(-1)
    if any(p is None for p in (router, gate, up, down)):
        return None
    return (router, mlp.top_k, bool(mlp.renormalize), gate, up, down, shared_gate)


_EXPERT_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


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
    local = (model.rope_local_cos, model.rope_local_sin) if model.cfg.rope_local_theta is not None else None
    if native.has_ends:  # the whole step in one call
        x = native.logits(tokens, *step, batch.logits_rows, rope_local=local)
        if native.has_head:
            return model.soft_cap(x).float()
    else:
        x = model._scale_embeddings(model.tok_emb(tokens))  # [T, d] float32 (build_native_decoder checked)
        native(x, *step, rope_local=local)
        x = model.final_norm(x[batch.logits_rows])
    return model.logits(x).float()
