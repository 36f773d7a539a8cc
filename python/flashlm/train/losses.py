"""The trainer's losses on a model's final hidden states, through the vocabulary-chunked kernels
(flashlm.ops.loss): the [tokens, vocab] float logits are never made, in the forward or the backward.

    loss = lm_loss(hidden, model.lm_head, targets)                       # next-token cross-entropy
    loss = distillation_loss(hidden, model.lm_head, targets, teacher_logits, alpha=0.5, temperature=2.0)
    penalty, metrics = moe_aux_losses(model, aux_coef=0.01, z_coef=0.001)  # a MoE model's router terms

`head` is the output projection: an nn.Linear (its weight [V, d] and bias) or a weight tensor [V, d] (a tied
embedding). hidden [..., d]; targets hidden's leading shape, ignore_index where a token does not count.
"""

import torch

from flashlm.ops.loss import fused_linear_cross_entropy, fused_linear_distill_loss


def _weight_and_bias(head):
    if isinstance(head, torch.Tensor):
        return head, None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"head: expected an nn.Linear or a weight tensor [vocab, d], got {type(head).__name__}")
    return weight, getattr(head, "bias", None)


def lm_loss(hidden, head, targets, *, ignore_index: int = -100, z_loss: float = 0.0, chunk_size=None):
    """Mean cross-entropy of head(hidden) against targets over the tokens not ignored (plus PaLM's z-loss)."""
    weight, bias = _weight_and_bias(head)
    return fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index, z_loss=z_loss,
                                      chunk_size=chunk_size)


def distillation_loss(hidden, head, targets, teacher_logits=None, *, topk_indices=None, topk_values=None,
                      alpha: float = 0.5, temperature: float = 1.0, reverse: bool = False, ignore_index: int = -100,
                      chunk_size=None):
    """alpha * T^2 KL(teacher || student) + (1 - alpha) * cross-entropy, the mean over the tokens not ignored;
    the teacher as logits [..., V] or its top k (indices and values [..., k]). See fused_linear_distill_loss."""
    weight, bias = _weight_and_bias(head)
    return fused_linear_distill_loss(hidden, weight, targets, teacher_logits, bias, topk_indices=topk_indices,
                                     topk_values=topk_values, alpha=alpha, temperature=temperature, reverse=reverse,
                                     ignore_index=ignore_index, chunk_size=chunk_size)


def load_balancing_loss(router_logits: list, n_expert_used: int) -> torch.Tensor:
    """The Switch / Mixtral load-balancing loss of the routers' logits (one [tokens, E] tensor per MoE layer):
    E * sum_e f_e * P_e, where f_e is the share of tokens that put expert e among their top n_expert_used (summing
    to n_expert_used over e) and P_e the mean router probability of e, both pooled over every layer's tokens, as
    transformers' load_balancing_loss_func computes it. It is 1 * n_expert_used for perfectly even routing and
    grows as tokens crowd onto some experts; gradients flow through P."""
    if not router_logits:
        raise ValueError("router_logits: no MoE layer's logits (did the model run a training forward?)")
    E = router_logits[0].shape[-1]
    counts, prob_sum, rows = 0.0, 0.0, 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        picked = probs.topk(n_expert_used, dim=-1).indices
        counts = counts + torch.zeros(E, device=probs.device).scatter_add_(
            0, picked.reshape(-1), torch.ones(picked.numel(), device=probs.device))
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return E * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over layers and tokens of logsumexp(router logits)^2, which keeps the
    logits small (a softmax whose inputs do not grow without bound)."""
    if not router_logits:
        raise ValueError("router_logits: no MoE layer's logits (did the model run a training forward?)")
    return torch.stack([torch.logsumexp(x.float(), dim=-1).square().mean() for x in router_logits]).mean()


def moe_aux_losses(model, aux_coef: float, z_coef: float):
    """(aux_coef * load_balancing_loss + z_coef * router_z_loss, {"moe_aux": ..., "moe_z": ...}) over the router
    logits the model's MoE layers kept in its last training forward; (None, {}) for a model without experts."""
    from flashlm.models.moe import MoEMLP

    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if not layers:
        return None, {}
    logits = [m.last_router_logits for m in layers if m.last_router_logits is not None]
    aux, z = load_balancing_loss(logits, layers[0].top_k), router_z_loss(logits)
    return aux_coef * aux + z_coef * z, {"moe_aux": aux.detach(), "moe_z": z.detach()}
