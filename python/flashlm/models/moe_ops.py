"""Mixture-of-experts routing and expert FFNs in plain torch: the reference the native MoE kernels are checked
against, and what the MoE models run until those replace it (flashlm.models.moe imports these two names only).

    weights, experts = route(router_logits, top_k)          # [T, k] float32, [T, k] int32
    out = expert_ffn(x, weights, experts, gate, up, down)   # [T, D]

Every dtype torch takes works (float64 for a reference). The expert weights may be float tensors [E, F, D] /
[E, D, F] or GGUF expert tensors (an object with raw uint8 [E, N, row_bytes], ggml_type and shape (E, N, K)),
read only for the experts some token uses: through the GGUF matmul, which rounds activations as ggml does (so
a file's experts compute what llama.cpp computes), where it takes the type and x's dtype; otherwise one
expert dequantized at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashlm.ops.dequant import dequantize
from flashlm.ops.gguf_linear import GGUF_LINEAR_TYPES, gguf_linear

ACTIVATIONS = ("silu",)


def route(router_logits: torch.Tensor, top_k: int, *, softmax_first: bool = True, renormalize: bool = True):
    """(weights float32 [T, k] (float64 for float64 logits), experts int32 [T, k]) of router_logits [T, E].

    softmax_first: softmax over all E experts, keep the k largest, and with renormalize divide them by their sum
    (Mixtral; Qwen-MoE's norm_topk_prob). Otherwise the k largest logits, softmaxed among themselves. Ties go to
    the lower expert index. The weights are differentiable in the logits."""
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits: must be a float [tokens, experts] tensor, got {router_logits.dtype} "
                         f"{tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: must be an integer in [1, {E}] (the expert count), got {top_k!r}")
    logits = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    # A stable sort keeps equal values in index order: ties go to the lower expert, as the kernels do.
    if softmax_first:
        probs = torch.softmax(logits, dim=-1)
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
        weights = probs.gather(1, order)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
        weights = torch.softmax(logits.gather(1, order), dim=-1)
    return weights.to(torch.float32) if weights.dtype != torch.float64 else weights, order.to(torch.int32)


def _expert_matmul(h: torch.Tensor, w, e: int) -> torch.Tensor:
    """h [T, K] @ expert e's matrix [N, K].T, w a float [E, N, K] tensor or GGUF expert blocks."""
    if isinstance(w, torch.Tensor):
        return h @ (w[e] if w.dtype == h.dtype else w[e].to(h.dtype)).t()
    if w.ggml_type in GGUF_LINEAR_TYPES and h.dtype in (torch.float32, torch.bfloat16):
        return gguf_linear(h, w.raw[e], w.ggml_type, tuple(w.shape[1:]))
    return h @ dequantize(w.raw[e], w.ggml_type, tuple(w.shape[1:])).to(h.dtype).t()


def _expert_shape(w, name: str) -> tuple:
    shape = tuple(w.shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: must be 3-D [experts, rows, cols], got shape {shape}")
    return shape


def expert_ffn(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate, up, down,
               activation: str = "silu") -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t), e = experts[t, j].

    x [T, D]; weights [T, k] float; experts [T, k] integer in [0, E); gate, up [E, F, D]; down [E, D, F].
    A loop over the experts some token uses (tokens gathered with index_select, results summed back with
    index_add_), differentiable in x, the weights and float expert tensors. The result has x's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x: must be [tokens, d_model], got shape {tuple(x.shape)}")
    T, D = x.shape
    if weights.dim() != 2 or weights.shape[0] != T or not weights.is_floating_point():
        raise ValueError(f"weights: must be a float [{T}, k] tensor, got {weights.dtype} {tuple(weights.shape)}")
    if tuple(experts.shape) != tuple(weights.shape) or experts.is_floating_point():
        raise ValueError(f"experts: must be an integer tensor of weights' shape {tuple(weights.shape)}, got "
                         f"{experts.dtype} {tuple(experts.shape)}")
    E, Fdim, Dg = _expert_shape(gate, "gate")
    if _expert_shape(up, "up") != (E, Fdim, Dg) or Dg != D:
        raise ValueError(f"gate, up: must both be [E, F, {D}], got {tuple(gate.shape)} and {tuple(up.shape)}")
    if _expert_shape(down, "down") != (E, D, Fdim):
        raise ValueError(f"down: must be [{E}, {D}, {Fdim}], got {tuple(down.shape)}")
    flat = experts.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= E):
        raise ValueError(f"experts: indices must be in [0, {E}), got [{int(flat.min())}, {int(flat.max())}]")
    k = weights.shape[1]
    out = torch.zeros_like(x)
    token_of = torch.arange(T, device=x.device).repeat_interleave(k)  # row of each (token, slot) pair
    flat_weights = weights.reshape(-1)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        tokens = token_of[pairs]
        h = x.index_select(0, tokens)
        h = F.silu(_expert_matmul(h, gate, e)) * _expert_matmul(h, up, e)
        h = _expert_matmul(h, down, e)
        out = out.index_add(0, tokens, h * flat_weights[pairs].to(x.dtype)[:, None])
    return out
