"""The native CPU decoder stack: all decoder layers of a Llama-family model for one serving step in one call
(see flashlm/runtime/decoder.h). flashlm.models.Transformer.forward_paged uses it where it applies."""

import torch

from flashlm import _C
from flashlm.ops._check import (as_bool, as_float, as_int, as_str, check_optional_tensors, check_tensor, check_tensors,
                                new_output)


class NativeDecoder:
    """Built once from per-layer weights; the tensors are kept referenced by the native object.

    layers: per layer (attn_norm, q, k, v, o, mlp_norm, gate, up, down): the norms float32 [d_model] CPU
    tensors, each linear a tuple (raw uint8 blocks, ggml type name, out_features, in_features, bias or None);
    optionally followed by (q_norm, k_norm, window, moe): qwen3's per-head norms (float32 [head_dim]) or None,
    the sliding window (keys a query sees, 0: all) and a mixture of experts or None: (router, top_k,
    renormalize, gate, up, down, shared_gate), the router a linear tuple or a float32 [E, d_model] tensor, each
    expert family (data, type name, E, N, K) as flashlm.ops.moe reads it, shared_gate qwen2_moe's float32
    [d_model] or None; in such a layer gate, up and down are the shared expert, or None without one; then
    optionally (post_attn_norm, post_mlp_norm, local_rope): gemma's norms of each sublayer's output (float32
    [d_model], or None) and whether the layer rotates by the step's rope_local tables (gemma3's local layers).

    softmax_scale: the scores' factor (None: head_dim^-1/2); attn_softcap: scores s become cap * tanh(s / cap)
    (None: off); embedding_scale: the embedding rows' factor in logits() (None: none); gelu: a GeGLU MLP
    (gelu_tanh(gate) * up) in place of SwiGLU."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, d_ff: int, eps: float, layers,
                 softmax_scale=None, attn_softcap=None, embedding_scale=None, gelu: bool = False):
        sizes = {name: as_int(v, name, 1) for name, v in (("d_model", d_model), ("n_head", n_head),
                                                           ("n_kv_head", n_kv_head), ("head_dim", head_dim),
                                                           ("d_ff", d_ff))}
        if not isinstance(layers, (list, tuple)):
            raise TypeError(f"layers: expected a list of per-layer tuples, got {type(layers).__name__}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (list, tuple)):
                raise TypeError(f"layers[{i}]: expected a tuple (attn_norm, q, k, v, o, mlp_norm, gate, up, down), "
                                f"got {type(layer).__name__}")
        layers = [tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in layer) for layer in layers]
        self._d_model = sizes["d_model"]
        factors = [0.0 if v is None else as_float(v, name) for name, v in (
            ("softmax_scale", softmax_scale), ("attn_softcap", attn_softcap), ("embedding_scale", embedding_scale))]
        self._impl = _C.Decoder(*sizes.values(), as_float(eps, "eps"), layers, *factors, as_bool(gelu, "gelu"))
        self._width = d_model  # columns of logits(): the head's rows, or d_model without a head

    def set_ends(self, embedding: torch.Tensor, embedding_type: str, final_norm: torch.Tensor, head=None):
        """The embedding table (uint8 GGML blocks [vocab, row bytes] of embedding_type, or a float table whose
        dtype embedding_type names: "F32", "F16", "BF16"), the final norm's float32 weight and the head: a linear
        spec as in layers, or None to leave the head to the caller (logits() then returns the normed rows)."""
        if head is not None and not isinstance(head, (list, tuple)):
            raise TypeError(f"head: expected a tuple (raw, ggml_type, n, k, bias) or None, got {type(head).__name__}")
        head = None if head is None else tuple(head)
        check_tensors("embedding final_norm", embedding, final_norm)
        self._impl.set_ends(embedding, as_str(embedding_type, "embedding_type"), final_norm, head)  # or raises
        self._width = int(head[2]) if head is not None else self._d_model

    @property
    def has_ends(self) -> bool:
        return self._impl.has_ends

    @property
    def has_head(self) -> bool:
        return self._impl.has_head

    def logits(self, tokens, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
               cu_seqlens_q, max_seqlen_q: int, logits_rows, rope_local=None) -> torch.Tensor:
        """float32 [len(logits_rows), head rows (or d_model)] for one step from token ids (int64 [T]).
        rope_local: (cos, sin) tables of the layers built with local_rope, or None."""
        _check_step(tokens, positions, rope_cos, rope_sin, slot_mapping, block_table, seq_lens, cu_seqlens_q, "tokens")
        local = _rope_local(rope_local)
        check_tensor(logits_rows, "logits_rows", 1, "[rows]")
        out = new_output((logits_rows.shape[0], self._width), torch.float32, "cpu", "logits_rows")
        self._impl.logits(tokens, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                          seq_lens, cu_seqlens_q, as_int(max_seqlen_q, "max_seqlen_q"), logits_rows, out, *local)
        return out

    @property
    def num_layers(self) -> int:
        return self._impl.num_layers

    def __call__(self, x: torch.Tensor, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table,
                 seq_lens, cu_seqlens_q, max_seqlen_q: int, rope_local=None) -> torch.Tensor:
        """Runs every layer on x (float32 [T, d_model], updated in place and returned)."""
        _check_step(x, positions, rope_cos, rope_sin, slot_mapping, block_table, seq_lens, cu_seqlens_q, "x")
        local = _rope_local(rope_local)
        self._impl.forward(x, positions, rope_cos, rope_sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
                           cu_seqlens_q, as_int(max_seqlen_q, "max_seqlen_q"), *local)
        return x


def _check_step(first, positions, rope_cos, rope_sin, slot_mapping, block_table, seq_lens, cu_seqlens_q,
                first_name: str) -> None:
    """A step's tensors are tensors (the native checks do the rest; given another object, the binding would list
    its whole signature instead of naming it)."""
    check_tensors(f"{first_name} positions rope_cos rope_sin slot_mapping block_table seq_lens", first, positions,
                  rope_cos, rope_sin, slot_mapping, block_table, seq_lens)
    check_optional_tensors("cu_seqlens_q", cu_seqlens_q)


def _rope_local(rope_local) -> tuple:
    """(cos, sin) or (None, None) from a step's rope_local argument."""
    if rope_local is None:
        return None, None
    if not isinstance(rope_local, (list, tuple)) or len(rope_local) != 2:
        raise TypeError(f"rope_local: expected a (cos, sin) pair of tensors or None, got {type(rope_local).__name__}")
    check_tensors("rope_local_cos rope_local_sin", *rope_local)
    return tuple(rope_local)
