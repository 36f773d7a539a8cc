"""The native CPU decoder stack: all decoder layers of a Llama-family model for one serving step in one call
(see flashlm/runtime/decoder.h). flashlm.models.Transformer.forward_paged uses it where it applies."""

import torch

from flashlm import _C


class NativeDecoder:
    """Built once from per-layer weights; the tensors are kept referenced by the native object.

    layers: per layer (attn_norm, q, k, v, o, mlp_norm, gate, up, down): the norms float32 [d_model] CPU
    tensors, each linear a tuple (raw uint8 blocks, ggml type name, out_features, in_features, bias or None)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, d_ff: int, eps: float, layers):
        layers = [tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in layer) for layer in layers]
        self._d_model = d_model
        self._impl = _C.Decoder(d_model, n_head, n_kv_head, head_dim, d_ff, float(eps), layers)
        self._width = d_model  # columns of logits(): the head's rows, or d_model without a head

    def set_ends(self, embedding: torch.Tensor, embedding_type: str, final_norm: torch.Tensor, head=None):
        """The embedding table (uint8 GGML blocks [vocab, row bytes] of embedding_type, or a float table whose
        dtype embedding_type names: "F32", "F16", "BF16"), the final norm's float32 weight and the head: a linear
        spec as in layers, or None to leave the head to the caller (logits() then returns the normed rows)."""
        self._impl.set_ends(embedding, embedding_type, final_norm, None if head is None else tuple(head))  # or raises
        self._width = int(head[2]) if head is not None else self._d_model

    @property
    def has_ends(self) -> bool:
        return self._impl.has_ends

    @property
    def has_head(self) -> bool:
        return self._impl.has_head

    def logits(self, tokens, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
               cu_seqlens_q, max_seqlen_q: int, logits_rows) -> torch.Tensor:
        """float32 [len(logits_rows), head rows (or d_model)] for one step from token ids (int64 [T])."""
        out = torch.empty((logits_rows.shape[0], self._width), dtype=torch.float32)
        self._impl.logits(tokens, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                          seq_lens, cu_seqlens_q, int(max_seqlen_q), logits_rows, out)
        return out

    @property
    def num_layers(self) -> int:
        return self._impl.num_layers

    def __call__(self, x: torch.Tensor, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                 seq_lens, cu_seqlens_q, max_seqlen_q: int) -> torch.Tensor:
        """Runs every layer on x (float32 [T, d_model], updated in place and returned)."""
        self._impl.forward(x, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
                           cu_seqlens_q, int(max_seqlen_q))
        return x
