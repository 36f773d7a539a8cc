"""MoEMLP: the mixture-of-experts MLP of the mixtral, qwen2_moe and qwen3_moe blocks.

    y = sum_j w_j * expert_{e_j}(x)  [+ sigmoid(shared_gate x) * shared(x)   (qwen2_moe)]

A router (a bias-free linear d_model -> n_expert) scores the experts; a softmax over all of them, the top
n_expert_used kept and, where norm_topk_prob, divided by their sum (what HF's Mixtral / Qwen-MoE and llama.cpp
compute). Each expert is a SwiGLU MLP of moe_d_ff; their matrices are stacked, experts_gate / experts_up
[E, moe_d_ff, d] and experts_down [E, d, moe_d_ff] (float parameters, or flashlm.quant.GGUFExperts a loader put
there), multiplied by the native MoE kernels (flashlm.ops.moe: tokens grouped by expert, no Python loop over
experts when no gradient is wanted).

While training, each forward keeps its router logits (last_router_logits, [tokens, E]) for the trainer's
load-balancing and z-loss terms (flashlm.train.losses.moe_aux_losses).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flashlm.models.config import ModelConfig
from flashlm.ops.moe import expert_ffn, route


class MoEMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shared: Optional[nn.Module] = None):
        super().__init__()
        d, E, ff = cfg.d_model, cfg.n_expert, cfg.moe_d_ff
        self.top_k, self.renormalize = cfg.n_expert_used, cfg.norm_topk_prob
        self.router = nn.Linear(d, E, bias=False)
        self.experts_gate = nn.Parameter(torch.empty(E, ff, d))
        self.experts_up = nn.Parameter(torch.empty(E, ff, d))
        self.experts_down = nn.Parameter(torch.empty(E, d, ff))
        self.shared = shared  # qwen2_moe's shared expert (a GatedMLP of shared_expert_d_ff), or None
        self.shared_gate = nn.Linear(d, 1, bias=False) if shared is not None else None
        self.last_router_logits: Optional[torch.Tensor] = None

    def set_experts(self, gate, up, down) -> None:
        """Puts the stacked expert matrices in place: float tensors (kept as parameters) or GGUFExperts (raw
        [E, rows, row_bytes], ggml_type and shape (E, rows, cols), as a loader builds)."""
        for name, w in (("experts_gate", gate), ("experts_up", up), ("experts_down", down)):
            if name in self._parameters:
                del self._parameters[name]
            setattr(self, name, w if not isinstance(w, torch.Tensor) or isinstance(w, nn.Parameter)
                    else nn.Parameter(w, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = _linear_f64(self.router, h)
        logits = self.router(h) if logits is None else logits.to(h.dtype)
        self.last_router_logits = logits if self.training else None
        weights, experts = route(logits, self.top_k, renormalize=self.renormalize)
        y = expert_ffn(h, weights, experts, self.experts_gate, self.experts_up, self.experts_down)
        if self.shared is not None:
            gate = _linear_f64(self.shared_gate, h)
            gate = torch.sigmoid(self.shared_gate(h)) if gate is None else torch.sigmoid(gate).to(h.dtype)
            y = y + gate * self.shared(h)
        return y.reshape(shape)


def _linear_f64(linear: nn.Module, h: torch.Tensor) -> Optional[torch.Tensor]:
    """linear(h) in float64 where no gradient is wanted and linear is a float32 nn.Linear (the router, the shared
    expert's gate), else None. The router's logits and the shared gate (its sigmoid too) are computed in float64
    and rounded once, as the native decoder stack computes them: float32 sums and exp round differently in
    torch's vectorised and scalar loops and in C++; float64's differences stay far below float32's rounding."""
    if (torch.is_grad_enabled() or type(linear) is not nn.Linear or linear.weight.dtype != torch.float32
            or h.dtype != torch.float32):
        return None
    bias = None if linear.bias is None else linear.bias.double()
    return torch.nn.functional.linear(h.double(), linear.weight.double(), bias)
