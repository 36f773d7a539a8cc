"""GGUFEmbedding: an nn.Embedding whose table stays in GGML blocks; a lookup dequantizes only the rows it reads.

    emb = GGUFEmbedding(file.raw("token_embd.weight"), "Q4_K", (vocab, d_model))
    x = emb(idx)        # idx int64 [...] -> float32 [..., d_model]

A row of the table is a whole number of blocks (GGUF rows are), so gathering the rows' bytes and
dequantizing them with flashlm.ops.dequantize gives exactly the rows ggml's get_rows gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashlm import ops

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GGUFEmbedding(torch.nn.Module):
    """Lookup table [num_embeddings, embedding_dim] held as the uint8 bytes of its GGML blocks (buffer `raw`,
    [num_embeddings, bytes per row])."""

    def __init__(self, raw: torch.Tensor, ggml_type: str, shape: Sequence[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(ggml_type, str) or not ops.dequantize_supported(ggml_type.upper()):
            raise ValueError(f"ggml_type: {ggml_type!r} cannot be dequantized")
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype: must be one of {_OUT_DTYPES}, got {dtype}")
        try:
            n, d = (int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape: expected (num_embeddings, embedding_dim), got {shape!r}") from None
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            raise ValueError(f"raw: expected a uint8 tensor of blocks, got {getattr(raw, 'dtype', type(raw).__name__)}")
        if n <= 0 or d <= 0 or raw.numel() % n:
            raise ValueError(f"raw: {raw.numel()} bytes are not {n} equal rows")
        self.ggml_type = ggml_type.upper()
        self.num_embeddings, self.embedding_dim = n, d
        self.register_buffer("raw", raw.reshape(n, raw.numel() // n))
        # empty; its dtype is the output's, so module.to(torch.bfloat16) switches the output as for nn.Embedding
        self.register_buffer("out_dtype_tag", torch.empty(0, dtype=dtype), persistent=False)
        # a row that does not decode to d values raises here rather than at the first lookup
        ops.dequantize(self.raw[:1], self.ggml_type, (1, d), out_dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.out_dtype_tag.dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx: expected an int64 or int32 tensor, got {idx.dtype}")
        raw = self.raw
        flat = idx.reshape(-1)
        if flat.device != raw.device:
            flat = flat.to(raw.device)
        n = flat.numel()
        if n:
            # A decode step looks up a few ids: a list is cheaper than two reductions (~2 us each) and syncs.
            ids = flat.tolist() if n <= 4096 and not flat.is_cuda else None
            lo, hi = (min(ids), max(ids)) if ids is not None else (int(flat.min()), int(flat.max()))
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(f"idx: ids must be in [0, {self.num_embeddings}), got [{lo}, {hi}]")
        rows = raw.index_select(0, flat)
        out = ops.dequantize(rows, self.ggml_type, (n, self.embedding_dim), out_dtype=self.out_dtype_tag.dtype)
        return out.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={self.ggml_type}"
