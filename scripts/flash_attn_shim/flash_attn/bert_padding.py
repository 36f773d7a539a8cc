"""flash_attn.bert_padding's two helpers that the suite uses, in plain torch (indexing is differentiable, so the
gradients flow back to the padded tensors as with flash-attn's own)."""

import torch
import torch.nn.functional as F


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states [batch, seqlen, ...], attention_mask [batch, seqlen] (True = a token; unused_mask marks tokens
    that are selected but not counted as used). Returns (tokens [total, ...], indices into the flattened
    [batch * seqlen], cu_seqlens int32 [batch + 1], max_seqlen, seqused int32 [batch])."""
    selected = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens = selected.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(selected.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(seqlens.max().item()), seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of unpad_input: tokens [total, ...] back to [batch, seqlen, ...], zeros where no token was."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
