"""Which GGML type each tensor gets in a quantization mix, as llama.cpp's llama-quant.cpp decides it.

A mix ("file type") such as Q4_K_M has a default type (Q4_K) and rules that give some tensors more bits:
the output projection (and the token embedding when it is tied to it) gets Q6_K, and for _M mixes part of
attn_v and ffn_down, chosen by `use_more_bits` (the first and last eighth of the layers and every third
one between), gets Q6_K too. Tensors that are not 2-D weights (norms, biases) keep their type, and a
tensor whose rows are not a whole number of blocks falls back to a type with smaller blocks, then to F16.
This follows llama_tensor_get_type and tensor_type_fallback for dense models (no expert-count rules) and
for the mixes `flashlm quantize` writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import LlamaFileType

# mix name -> (default GGML type, general.file_type value)
MIXES = {
    "F32": ("F32", LlamaFileType.ALL_F32), "F16": ("F16", LlamaFileType.MOSTLY_F16),
    "BF16": ("BF16", LlamaFileType.MOSTLY_BF16),
    "Q4_0": ("Q4_0", LlamaFileType.MOSTLY_Q4_0), "Q4_1": ("Q4_1", LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": ("Q5_0", LlamaFileType.MOSTLY_Q5_0), "Q5_1": ("Q5_1", LlamaFileType.MOSTLY_Q5_1),
    "Q8_0": ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "Q2_K": ("Q2_K", LlamaFileType.MOSTLY_Q2_K),
    "Q3_K_S": ("Q3_K", LlamaFileType.MOSTLY_Q3_K_S), "Q3_K_M": ("Q3_K", LlamaFileType.MOSTLY_Q3_K_M),
    "Q4_K_S": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_S), "Q4_K_M": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_S": ("Q5_K", LlamaFileType.MOSTLY_Q5_K_S), "Q5_K_M": ("Q5_K", LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": ("Q6_K", LlamaFileType.MOSTLY_Q6_K),
    "IQ4_NL": ("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL), "IQ4_XS": ("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS),
}

# llama.cpp's mixes that flashlm does not write: their types (IQ1, IQ2, IQ3, ternary) have no flashlm quantizer.
UNSUPPORTED_MIXES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
                     "Q2_K_S", "Q3_K_L", "TQ1_0", "TQ2_0", "MXFP4_MOE")

BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
              "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_NL": 32, "IQ4_XS": 256}

# A type whose block does not divide a row falls back to one with 32-element blocks.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}

# Substrings of weights llama.cpp never quantizes (small, or read at full precision).
_KEEP = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", "attn_rel_b.weight", "altup", "laurel",
         "per_layer_model_proj", ".position_embd", "time_mix_first.weight", "time_mix_w0.weight",
         "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
         "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
         "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
         "time_mix_lerp_fused.weight")
_KEEP_EXACT = ("position_embd.weight", "token_types.weight")


def allows_quantization(name: str, n_dims: int) -> bool:
    """Whether llama.cpp would quantize this tensor at all (2-D or 3-D weights, minus a few)."""
    return (n_dims >= 2 and name.endswith("weight") and name not in _KEEP_EXACT
            and not any(k in name for k in _KEEP))


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


# The categories `--keep-float` takes (what `category` returns, "other" aside).
CATEGORIES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b", "attn_output",
              "ffn_gate", "ffn_up", "ffn_down")


def parse_keep_float(spec, names: list[str]) -> tuple[str, ...]:
    """The entries of a keep-float list ("attn_v,ffn_down" or a list), checked against the tensors `names`.

    An entry is a category (CATEGORIES: every such tensor), a layer ("blk.3": all its weights) or one layer's
    category ("blk.3.ffn_down"). Every entry must name at least one quantizable tensor of the model."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"keep_float: expected names, got {type(entry).__name__}")
        entry = entry.strip()
        parts = entry.split(".")
        if parts[0] == "blk":
            valid = len(parts) in (2, 3) and parts[1].isdigit() and (len(parts) == 2 or parts[2] in CATEGORIES)
        else:
            valid = entry in CATEGORIES
        if not valid:
            raise ValueError(f"keep_float: {entry!r} is not a tensor category ({', '.join(CATEGORIES)}), a layer "
                             f"(blk.N) or a layer's category (blk.N.ffn_down)")
        if not any(keeps_float(name, (entry,)) for name in names):
            raise ValueError(f"keep_float: {entry!r} names no weight of this model")
        out.append(entry)
    if not out:
        raise ValueError("keep_float: no names given")
    return tuple(out)


def keeps_float(name: str, keep: tuple[str, ...]) -> bool:
    """Whether the weight `name` is one that the (checked) keep-float entries `keep` name."""
    if not allows_quantization(name, 2):
        return False
    for entry in keep:
        if entry.startswith("blk."):
            _, layer, *cat = entry.split(".")
            if name.startswith(f"blk.{layer}.") and (not cat or category(name) == cat[0]):
                return True
        elif category(name) == entry:
            return True
    return False


def fallback_type(ncols: int, new: str) -> str:
    """`new`, or the type llama.cpp falls back to when its blocks do not divide a row of ncols."""
    if ncols % BLOCK_SIZE[new] == 0:
        return new
    new = _FALLBACK.get(new, new)
    return new if ncols % BLOCK_SIZE[new] == 0 else "F16"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class ModelInfo:
    arch: str
    n_layer: int           # {arch}.block_count
    n_head: int = 0        # {arch}.attention.head_count
    n_head_kv: int = 0     # {arch}.attention.head_count_kv

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head and self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B: an 80-layer llama with grouped KV heads
        return self.arch == "llama" and self.n_layer == 80 and self.n_head_kv not in (0, self.n_head)


class MixPlanner:
    """Types for the tensors of one model, asked in file order (the attn_v and ffn_down counters depend on it).
    has_imatrix: whether the quantization has an importance matrix (llama.cpp's rules for ffn_down differ).
    keep_float: tensors that stay float (parse_keep_float's entries): F32/F16/BF16 as stored, F16 where stored
    quantized. The others get the types the mix gives them with those tensors quantized (the counters run on).
    types: {tensor name: GGML type} that replace the mix's for those weights (a per-tensor plan, such as a
    quantization-aware run's: its block linears in the type it trained, the rest as the mix gives them)."""

    def __init__(self, mix: str, info: ModelInfo, names: list[str], has_imatrix: bool = False, keep_float=(),
                 types=None):
        if mix not in MIXES:
            raise ValueError(f"type: expected one of {', '.join(MIXES)}, got {mix!r}")
        self.types = dict(types or {})
        for name, t in self.types.items():
            if name not in names or not allows_quantization(name, 2):
                raise ValueError(f"types: {name!r} is not a quantizable weight of this model")
            if t not in BLOCK_SIZE:
                raise ValueError(f"types: {name!r} has type {t!r}, expected one of {', '.join(BLOCK_SIZE)}")
        self.mix, self.info, self.has_imatrix = mix, info, has_imatrix
        self.keep_float = parse_keep_float(keep_float, names) if keep_float else ()
        self.default = MIXES[mix][0]
        self.n_attn_v = sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names)
        self.tied_embeddings = "output.weight" not in names
        self.i_attn_v = self.i_ffn_down = 0

    def type_for(self, name: str, shape: tuple[int, ...], current: str) -> str:
        """The GGML type of tensor `name` (shape in torch order, rows last), now stored as `current`."""
        if not allows_quantization(name, len(shape)):
            return current
        if name in self.types:
            if shape[-1] % BLOCK_SIZE[self.types[name]]:
                raise ValueError(f"types: {name}'s rows of {shape[-1]} are not whole {self.types[name]} blocks")
            return self.types[name]
        new = self.default
        if BLOCK_SIZE[new] == 1:  # F32/F16/BF16 mixes: no rules
            return new
        new = fallback_type(shape[-1], self._mix_rules(name, shape[-1], new))
        if keeps_float(name, self.keep_float):
            return current if current in ("F32", "F16", "BF16") else "F16"
        return new

    def _mix_rules(self, name: str, ncols: int, new: str) -> str:
        mix, info, cat = self.mix, self.info, category(name)
        if cat == "output" or (self.tied_embeddings and cat == "token_embd"):
            if ncols % BLOCK_SIZE[new]:
                return "Q8_0"
            return new if new == "Q8_0" else "Q6_K"
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i = self.i_attn_v
            self.i_attn_v += 1
            if mix == "Q2_K":
                new = "Q4_K" if info.n_gqa >= 4 else "Q3_K"
            elif mix == "Q3_K_M":
                new = "Q5_K" if i < 2 else "Q4_K"
            elif mix in ("IQ4_NL", "IQ4_XS") and info.n_gqa >= 4:
                new = "Q5_K"
            elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attn_v):
                new = "Q6_K"
            elif mix == "Q4_K_S" and i < 4:
                new = "Q5_K"
            if info.is_70b and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"
            return new
        if cat == "ffn_down":
            i, n = self.i_ffn_down, info.n_layer
            self.i_ffn_down += 1
            if mix == "Q2_K":
                new = "Q3_K"
            elif mix == "Q3_K_M":
                new = "Q5_K" if i < n // 16 else "Q4_K" if info.arch != "falcon" or use_more_bits(i, n) else "Q3_K"
            elif mix == "Q4_K_M":
                if info.arch == "falcon":
                    new = "Q6_K" if i < n // 16 else "Q5_K" if use_more_bits(i, n) else "Q4_K"
                elif use_more_bits(i, n):
                    new = "Q6_K"
            elif mix in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not self.has_imatrix:
                new = "Q5_K"
            elif mix == "Q5_K_M" and use_more_bits(i, n):
                new = "Q6_K"
            elif mix == "Q4_K_S" and info.arch != "falcon" and i < n // 8:
                new = "Q5_K"
            elif mix in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
                # llama.cpp guards the first ffn_down layers of Q4_0/Q5_0 when it has an imatrix
                new = "Q4_1" if mix == "Q4_0" else "Q5_1"
            return new
        if cat == "attn_output":
            if info.arch != "falcon":
                new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(mix, new)
            return new
        return new
