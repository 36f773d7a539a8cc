"""The trainer's losses on a model's final hidden states, through the vocabulary-chunked kernels
(flashlm.ops.loss): the [tokens, vocab] float logits are never made, in the forward or the backward.

    loss = lm_loss(hidden, model.lm_head, targets)                       # next-token cross-entropy
    loss = distillation_loss(hidden, model.lm_head, targets, teacher_logits, alpha=0.5, temperature=2.0)

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
