"""GGUFExperts: the weights of one expert family of a mixture-of-experts layer ([E, N, K]: gate, up or down
of every expert) kept in their GGML blocks, as GGUF files store `blk.N.ffn_{gate,up,down}_exps.weight`, and
multiplied in that form by flashlm.ops.moe (expert_matmul, expert_ffn).

    gate = GGUFExperts.from_float(torch.randn(8, 5632, 2048), "Q4_0")
    with GGUFFile("mixtral.gguf") as f:
        gate = GGUFExperts.from_gguf(f, "blk.0.ffn_gate_exps.weight")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashlm import ops
from flashlm.ops._check import as_int, check_tensor
from flashlm.ops.gguf_linear import GGUF_LINEAR_TYPES, check_gguf_weight
from flashlm.quant.gguf_quantize import quantize_gguf


def _expert_shape(shape, name: str = "shape") -> tuple[int, int, int]:
    """(E, N, K), each an int >= 0 and E >= 1."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name}: expected (E, N, K), got {type(shape).__name__}") from None
    if len(dims) != 3:
        raise ValueError(f"{name}: expected (E, N, K), got {dims!r}")
    e, n, k = (as_int(d, f"{name}[{i}]", 0) for i, d in enumerate(dims))
    if e < 1:
        raise ValueError(f"{name}: E (the number of experts) must be >= 1, got {e}")
    return e, n, k


class GGUFExperts(torch.nn.Module):
    """Expert weights W[e] [N, K] for e < E held as the uint8 bytes of their GGML blocks: buffer `raw`
    [E, N, K / block_size * block_bytes], `ggml_type` one of GGUF_LINEAR_TYPES, `shape` (E, N, K)."""

    def __init__(self, raw: torch.Tensor, ggml_type: str, shape: Sequence[int]):
        super().__init__()
        e, n, k = _expert_shape(shape)
        check_tensor(raw, "raw")
        ggml_type, _, _, row_bytes = check_gguf_weight(raw, ggml_type, (e * n, k))
        self.ggml_type = ggml_type
        self.shape = (e, n, k)
        self.register_buffer("raw", raw.reshape(e, n, row_bytes))

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @classmethod
    def from_float(cls, weight: torch.Tensor, ggml_type: str = "Q8_0") -> "GGUFExperts":
        """Quantizes float expert weights [E, N, K] to `ggml_type` blocks (kept on the weight's device)."""
        check_tensor(weight, "weight", 3, "[E, N, K]")
        if not weight.dtype.is_floating_point:
            raise ValueError(f"weight: expected a float tensor, got {weight.dtype}")
        if not isinstance(ggml_type, str) or ggml_type.upper() not in GGUF_LINEAR_TYPES:
            raise ValueError(f"ggml_type: must be one of {', '.join(GGUF_LINEAR_TYPES)}, got {ggml_type!r}")
        e, n, k = _expert_shape(weight.shape, "weight")
        flat = weight.detach().reshape(e * n, k)
        if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            flat = flat.float()
        raw = torch.as_tensor(quantize_gguf(flat.cpu(), ggml_type.upper())).to(weight.device)
        return cls(raw, ggml_type, (e, n, k))

    @classmethod
    def from_gguf(cls, file, name: str, device="cpu") -> "GGUFExperts":
        """The 3-D tensor `name` of a flashlm.io.gguf.GGUFFile (ggml dims [K, N, E], e.g.
        "blk.0.ffn_gate_exps.weight"), kept in its blocks and copied to `device`."""
        info = file.tensor(name)
        if len(info.shape) != 3:
            raise ValueError(f"name: '{name}' has shape {info.shape}; expert weights are 3-D [E, N, K]")
        if info.ggml_type not in GGUF_LINEAR_TYPES:
            raise ValueError(f"name: '{name}' is {info.ggml_type}; expert weights in blocks must be one of "
                             f"{', '.join(GGUF_LINEAR_TYPES)} (load other types as float)")
        raw = file.raw(name).to(device, copy=True)  # the copy outlives the file's mapping
        return cls(raw, info.ggml_type, info.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights as a float tensor [E, N, K] (bit-exact with ggml's decoding) on raw's device."""
        return ops.dequantize(self.raw.reshape(-1), self.ggml_type, self.shape, out_dtype=dtype)

    def extra_repr(self) -> str:
        e, n, k = self.shape
        return f"num_experts={e}, out_features={n}, in_features={k}, ggml_type={self.ggml_type}"
