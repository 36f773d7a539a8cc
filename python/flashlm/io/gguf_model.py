"""load_gguf: a GGUF file (llama.cpp's llama, qwen2, qwen3, gemma2, gemma3, phi3, gpt2, qwen2moe and qwen3moe architectures) as a flashlm Transformer in eval mode.

    loaded = load_gguf("model-Q4_K_M.gguf", max_model_len=4096)

Weights stay in the file: a quantized matrix becomes a GGUFLinear over a zero-copy view of the memory-mapped
file, so a Q4_0 model takes about its file size in memory; a quantized token_embd becomes a GGUFEmbedding
(lookups dequantize only their rows) and, when there is no output.weight, the lm head is a GGUFLinear over
the same bytes. F32/F16/BF16 tensors (norms, biases, small models) become float32 parameters; quantized types
that GGUFLinear does not multiply (Q2_K, Q3_K, IQ*) are dequantized to float32.

The llama architecture's attn_q/attn_k rows are in ggml's rope order (convert_hf_to_gguf.py's
LlamaModel.permute interleaves the two halves of each head); flashlm's rope is HF's rotate-half, so the rows
are put back (a copy of those two tensors' bytes). qwen2 and qwen3 files are written without that permutation
(convert_hf_to_gguf.py's Qwen2Model, Qwen3Model and Gemma2Model do not permute; llama.cpp runs them with NEOX
rope, which is rotate-half). gemma2's norm weights are stored as Gemma's (1 + w), the weight flashlm's RMSNorm
multiplies by. GPT-2's and phi3's attn_qkv are split into q, k and v by rows (views), as is phi3's ffn_up
(gate|up).

Every metadata value, tensor name, shape and type is checked, names and shapes before anything is built
(flashlm.io.gguf_layout, which the GGUF writers share): ValueError names what is wrong.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from flashlm import ops
from flashlm.io.gguf import GGUFFile
from flashlm.io.gguf_layout import LONGROPE_TENSORS, gguf_model_config, longrope_scaling
from flashlm.io.gguf_rope import llama3_scaling_from_factors
from flashlm.io.loaded import LoadedModel, empty_model, finish, set_module
from flashlm.models import ModelConfig
from flashlm.models.transformer import rope_inv_freq
from flashlm.quant.gguf_embedding import GGUFEmbedding
from flashlm.quant.gguf_experts import GGUFExperts
from flashlm.quant.gguf_linear import GGUFLinear

_FLOAT_TYPES = ("F32", "F16", "BF16")


def _tensor_shape(f: GGUFFile, name: str, shape: tuple):
    try:
        info = f.tensor(name)
    except KeyError:
        raise ValueError(f"tensor {name!r}: missing from the file") from None
    if info.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: shape {info.shape}, the metadata implies {tuple(shape)}")
    return info


def model_config_from_gguf(f: GGUFFile, max_model_len: Optional[int] = None) -> tuple[ModelConfig, Optional[torch.Tensor]]:
    """(ModelConfig, rope factors from rope_freqs.weight or None) from a GGUF's metadata and tensor shapes,
    every tensor checked (flashlm.io.gguf_layout)."""
    shapes = {t.name: t.shape for t in f.tensors}
    cfg = gguf_model_config(f.metadata, shapes, max_model_len)
    factors = None
    if cfg.arch == "phi3" and all(name in shapes for name in LONGROPE_TENSORS):
        short, long = (f.load(name, dtype=torch.float32).tolist() for name in LONGROPE_TENSORS)
        scaling = longrope_scaling(f.metadata, "phi3", short, long, int(f.metadata["phi3.context_length"]))
        cfg = ModelConfig(**{**cfg.to_dict(), "rope_scaling": scaling})
    if "rope_freqs.weight" in shapes:  # (only a rotary model's file may have it)
        factors = f.load("rope_freqs.weight", dtype=torch.float32)
        scaling = llama3_scaling_from_factors(factors, rope_inv_freq(cfg))
        if scaling is not None:
            cfg = ModelConfig(**{**cfg.to_dict(), "rope_scaling": scaling})
    return cfg, factors


class _Builder:
    """Turns the file's tensors into the modules and parameters of a Transformer."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig):
        self.f, self.cfg = f, cfg
        self.used = set()

    def info(self, name: str, shape: tuple):
        self.used.add(name)
        return _tensor_shape(self.f, name, shape)

    def floats(self, name: str, shape: tuple) -> torch.Tensor:
        info = self.info(name, shape)
        if not ops.dequantize_supported(info.ggml_type):
            raise ValueError(f"tensor {name!r}: type {info.ggml_type} is not supported")
        return self.f.load(name, dtype=torch.float32)

    def param(self, name: str, shape: tuple) -> nn.Parameter:
        return nn.Parameter(self.floats(name, shape), requires_grad=False)

    def linear(self, name: str, shape: tuple, bias: Optional[str] = None, rows: Optional[slice] = None,
               row_order: Optional[torch.Tensor] = None) -> nn.Module:
        """The matrix `name` (torch shape `shape`), optionally only `rows` of it or its rows reordered, as a
        GGUFLinear (quantized) or an nn.Linear (float), with the bias tensor `bias` (same rows)."""
        info = self.info(name, shape)
        out_rows = range(shape[0])[rows] if rows is not None else range(shape[0])
        n, k = len(out_rows), shape[1]
        b = None
        if bias is not None:
            b = self.floats(bias, (shape[0],))
            b = b[rows] if rows is not None else b
            b = b[row_order] if row_order is not None else b
            b = b.contiguous()
        if info.ggml_type in ops.GGUF_LINEAR_TYPES:
            raw = self.f.raw(name).reshape(shape[0], -1)
            raw = raw[rows] if rows is not None else raw   # a view: rows are contiguous bytes
            if row_order is not None:
                raw = raw[row_order]                      # a copy, in flashlm's row order
            try:
                return GGUFLinear(raw, info.ggml_type, (n, k), b)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from e
        if not ops.dequantize_supported(info.ggml_type):
            raise ValueError(f"tensor {name!r}: type {info.ggml_type} is not supported")
        w = self.f.load(name, dtype=torch.float32)
        w = w[rows] if rows is not None else w
        w = w[row_order] if row_order is not None else w
        linear = nn.Linear(k, n, bias=b is not None, device="meta")
        linear.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        if b is not None:
            linear.bias = nn.Parameter(b, requires_grad=False)
        return linear

    def experts(self, name: str, shape: tuple):
        """The stacked expert matrices `name` [E, N, K]: GGUFExperts over the file's bytes where the MoE kernels
        multiply its type in blocks, float32 otherwise."""
        info = self.info(name, shape)
        if info.ggml_type not in ops.GGUF_LINEAR_TYPES:
            return self.floats(name, shape)
        try:
            return GGUFExperts(self.f.raw(name).reshape(shape[0], shape[1], -1), info.ggml_type, shape)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from e

    def embedding(self, name: str, shape: tuple) -> nn.Module:
        info = self.info(name, shape)
        if info.ggml_type in _FLOAT_TYPES or not ops.dequantize_supported(info.ggml_type):
            emb = nn.Embedding(shape[0], shape[1], device="meta")
            emb.weight = self.param(name, shape)
            return emb
        try:
            return GGUFEmbedding(self.f.raw(name), info.ggml_type, shape)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from e

    def norm(self, module: nn.Module, prefix: str, with_bias: bool, dim: Optional[int] = None) -> None:
        d = self.cfg.d_model if dim is None else dim
        module.weight = self.param(f"{prefix}.weight", (d,))
        if with_bias:
            module.bias = self.param(f"{prefix}.bias", (d,))


def rope_row_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row indices that undo convert_hf_to_gguf's LlamaModel.permute: flashlm row h*hd + j*hd/2 + i is the
    file's row h*hd + 2i + j."""
    return torch.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _build(model, b: _Builder, cfg: ModelConfig) -> None:
    d, hd, V = cfg.d_model, cfg.head_dim, cfg.vocab_size
    q_rows, kv_rows = cfg.n_head * hd, cfg.n_kv_head * hd
    gpt2 = cfg.arch == "gpt2"
    model.tok_emb = b.embedding("token_embd.weight", (V, d))
    if gpt2:
        ctx = b.f.metadata.get("gpt2.context_length")
        pos = b.param("position_embd.weight", (ctx, d))
        model.pos_emb = nn.Embedding(cfg.seq_len, d, device="meta")
        model.pos_emb.weight = nn.Parameter(pos[:cfg.seq_len].contiguous(), requires_grad=False)
    b.norm(model.final_norm, "output_norm", gpt2)
    if not cfg.tie_embeddings:
        model.lm_head = b.linear("output.weight", (V, d))
    elif isinstance(model.tok_emb, GGUFEmbedding):
        emb = model.tok_emb
        if emb.ggml_type in ops.GGUF_LINEAR_TYPES:
            model.lm_head = GGUFLinear(emb.raw, emb.ggml_type, (V, d))  # the same bytes
        else:
            model.lm_head = b.linear("token_embd.weight", (V, d))
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        b.norm(block.attn_norm, p + "attn_norm", gpt2)
        b.norm(block.mlp_norm, p + "ffn_norm", gpt2)
        if gpt2:
            qkv = (3 * d, d)
            for j, n in enumerate("qkv"):
                set_module(block, f"attn.{n}", b.linear(p + "attn_qkv.weight", qkv, p + "attn_qkv.bias",
                                                        rows=slice(j * d, (j + 1) * d)))
            block.attn.o = b.linear(p + "attn_output.weight", (d, d), p + "attn_output.bias")
            block.mlp.fc = b.linear(p + "ffn_up.weight", (cfg.d_ff, d), p + "ffn_up.bias")
            block.mlp.proj = b.linear(p + "ffn_down.weight", (d, cfg.d_ff), p + "ffn_down.bias")
            continue
        if cfg.arch == "phi3":
            _build_phi3_block(block, b, cfg, p)
            continue
        qkv_bias = cfg.qkv_bias
        permute = cfg.base_arch == "llama"  # (Mixtral is llama.cpp's llama)
        for n, heads in (("q", cfg.n_head), ("k", cfg.n_kv_head)):
            order = rope_row_order(heads, hd) if permute else None
            set_module(block, f"attn.{n}", b.linear(p + f"attn_{n}.weight", (heads * hd, d),
                                                    p + f"attn_{n}.bias" if qkv_bias else None, row_order=order))
        block.attn.v = b.linear(p + "attn_v.weight", (kv_rows, d), p + "attn_v.bias" if qkv_bias else None)
        block.attn.o = b.linear(p + "attn_output.weight", (d, q_rows))
        if cfg.gemma:
            b.norm(block.post_attn_norm, p + "post_attention_norm", False)
            b.norm(block.post_mlp_norm, p + "post_ffw_norm", False)
        if cfg.qk_norm:
            b.norm(block.attn.q_norm, p + "attn_q_norm", False, hd)
            b.norm(block.attn.k_norm, p + "attn_k_norm", False, hd)
        if cfg.moe:
            _build_moe(block.mlp, b, cfg, p)
            continue
        block.mlp.gate = b.linear(p + "ffn_gate.weight", (cfg.d_ff, d))
        block.mlp.up = b.linear(p + "ffn_up.weight", (cfg.d_ff, d))
        block.mlp.down = b.linear(p + "ffn_down.weight", (d, cfg.d_ff))


def _build_moe(mlp, b: _Builder, cfg: ModelConfig, p: str) -> None:
    """A MoE block's router, experts and (qwen2moe) shared expert with its sigmoid gate (a [d] vector in the
    file, the [1, d] linear here)."""
    d, E, ff = cfg.d_model, cfg.n_expert, cfg.moe_d_ff
    mlp.router = b.linear(p + "ffn_gate_inp.weight", (E, d))
    mlp.set_experts(b.experts(p + "ffn_gate_exps.weight", (E, ff, d)), b.experts(p + "ffn_up_exps.weight", (E, ff, d)),
                    b.experts(p + "ffn_down_exps.weight", (E, d, ff)))
    if mlp.shared is not None:
        sff = cfg.shared_expert_d_ff
        mlp.shared.gate = b.linear(p + "ffn_gate_shexp.weight", (sff, d))
        mlp.shared.up = b.linear(p + "ffn_up_shexp.weight", (sff, d))
        mlp.shared.down = b.linear(p + "ffn_down_shexp.weight", (d, sff))
        gate = nn.Linear(d, 1, bias=False, device="meta")
        gate.weight = nn.Parameter(b.floats(p + "ffn_gate_inp_shexp.weight", (d,)).reshape(1, d), requires_grad=False)
        mlp.shared_gate = gate


def _build_phi3_block(block, b: _Builder, cfg: ModelConfig, p: str) -> None:
    """phi3's attn_qkv (rows q|k|v) and ffn_up (rows gate|up, llama.cpp's fused SwiGLU) split by rows: views of
    the file's bytes, so the runtime runs phi3's blocks as llama's (NEOX rope: no row permutation)."""
    d, ff = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for n, start, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
        fused = b.linear(p + "attn_qkv.weight", (q + 2 * kv, d), rows=slice(start, start + rows))
        set_module(block, f"attn.{n}", fused)
    block.attn.o = b.linear(p + "attn_output.weight", (d, q))
    block.mlp.gate = b.linear(p + "ffn_up.weight", (2 * ff, d), rows=slice(0, ff))
    block.mlp.up = b.linear(p + "ffn_up.weight", (2 * ff, d), rows=slice(ff, 2 * ff))
    block.mlp.down = b.linear(p + "ffn_down.weight", (d, ff))


def load_gguf(path, max_model_len: Optional[int] = None, attn_impl: str = "flashlm",
              tokenizer: bool = True) -> LoadedModel:
    """Loads a GGUF model file; the tokenizer comes from its tokenizer.ggml.* metadata (tokenizer=False skips
    it, and a file without one gives tokenizer None)."""
    from flashlm.io.gguf_vocab import tokenizer_from_gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file")
    f = GGUFFile(path)
    try:
        cfg, factors = model_config_from_gguf(f, max_model_len)
        model = empty_model(cfg, attn_impl)
        b = _Builder(f, cfg)
        _build(model, b, cfg)
        if factors is not None:
            b.used.add("rope_freqs.weight")
            if cfg.rope_scaling is not None:
                # the file's own factors, exactly as llama.cpp applies them
                inv_freq = rope_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None})) / factors.double()
                angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float64), inv_freq)
                angles = torch.cat((angles, angles), dim=-1)
                model.rope_cos, model.rope_sin = angles.cos().float(), angles.sin().float()
        if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope":
            b.used.update(LONGROPE_TENSORS)  # in the rope tables
        extra = sorted({t.name for t in f.tensors} - b.used)
        if extra:
            raise ValueError(f"tensor {extra[0]!r}: not part of a {cfg.arch} model")
        finish(model)
        tok = tokenizer_from_gguf(f.metadata, cfg.vocab_size) if tokenizer else None
    finally:
        f.close()  # the tensors' views keep the mapping alive
    return LoadedModel(model=model, config=cfg, tokenizer=tok, eos_token_ids=list(tok.eos_token_ids) if tok else [],
                       bos_token_id=tok.bos_token_id if tok else None,
                       chat_template=tok.chat_template if tok else None, source=f"gguf:{path}")
