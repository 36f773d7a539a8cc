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
        self._impl = _C.Decoder(d_model, n_head, n_kv_head, head_dim, d_ff, float(eps), layers)

    @property
    def num_layers(self) -> int:
        return self._impl.num_layers

    def __call__(self, x: torch.Tensor, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                 seq_lens, cu_seqlens_q, max_seqlen_q: int) -> torch.Tensor:
        """Runs every layer on x (float32 [T, d_model], updated in place and returned)."""
        self._impl.forward(x, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
                           cu_seqlens_q, int(max_seqlen_q))
        return x
