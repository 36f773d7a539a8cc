"""LoRA (Hu et al. 2021) as PEFT computes it: y = base(x) + B(A(dropout(x))) * scaling, with A [r, in]
Kaiming-uniform (a = sqrt(5), torch's nn.Linear default), B [out, r] zero, scaling alpha / r (rsLoRA:
alpha / sqrt(r)).

    names = apply_lora(model, r=8, alpha=16, targets="q,k,v,o")   # wraps blocks.*.attn.{q,k,v,o}
    opt = AdamW(trainable_parameters(model), lr=1e-4)              # A and B only

LoRALinear wraps any flashlm linear: nn.Linear, Int8Linear, Int4Linear, GGUFLinear. The base is called as it is
and never copied; only A and B require grad (the gradient through a quantized base is its own layer's backward).
merge() folds B A * scaling into a float base's weight and keeps the unmerged weight, so unmerge() is exact;
merge_and_unload() folds for good and puts the plain bases back. It lives with the model (not the trainer) as
the runtime runs a base with an adapter too (flashlm.io.lora_adapter); flashlm.train.peft re-exports it.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn



def freeze(model: nn.Module) -> None:
    """No parameter of the base gets a gradient (nor, through trainable_parameters, optimiser state)."""
    for p in model.parameters():
        p.requires_grad_(False)


def positive_int(value, name: str) -> int:
    """value as a count > 0; ValueError naming `name` otherwise (bools, floats and strings included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


# The module names a target may use, flashlm's own or HF's (as PEFT configs write them).
TARGET_NAMES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "gate": "mlp.gate", "up": "mlp.up",
                "down": "mlp.down", "fc": "mlp.fc", "proj": "mlp.proj",
                "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
                "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)$")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        check_lora_arguments(r, alpha, dropout)
        in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(f"base: must be a linear layer with in_features and out_features, got "
                            f"{type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.rslora = r, alpha, bool(rslora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device))
        # Drawn in PEFT's order (A and B initialised as nn.Linear's are, then A again, then B zeroed), so that
        # one seed gives PEFT's A: runs can be reproduced across the two.
        for w in (self.lora_A, self.lora_B, self.lora_A):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self._unmerged_weight: Optional[torch.Tensor] = None

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        # The scaling on A's r columns and B's product added to y inside the GEMM (addmm): PEFT's
        # B(A(x)) * scaling scales and adds [tokens, out] tensors, two more passes over them forward and
        # backward and two more activation-sized buffers a layer (the same result up to rounding).
        a = F.linear(h, self.lora_A) * self.scaling
        if y.dtype != a.dtype:
            return y + F.linear(a, self.lora_B).to(y.dtype)
        out = torch.addmm(y.reshape(-1, self.out_features), a.reshape(-1, self.r), self.lora_B.t())
        return out.reshape(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling [out, in], float32 (what merge adds to the base's weight)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merge(self) -> None:
        """Folds the adapter into the base's weight (a new tensor: the unmerged one is kept for unmerge)."""
        if self.merged:
            return
        w = _float_weight(self.base)
        self._unmerged_weight = w
        self.base.weight = nn.Parameter((w.float() + self.delta_weight()).to(w.dtype), requires_grad=False)

    def unmerge(self) -> None:
        """Puts the base's own weight back, bit for bit."""
        if not self.merged:
            return
        self.base.weight = nn.Parameter(self._unmerged_weight, requires_grad=False)
        self._unmerged_weight = None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def check_lora_arguments(r, alpha, dropout) -> None:
    positive_int(r, "r")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha: must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")


def _device_of(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


def _float_weight(base: nn.Module) -> torch.Tensor:
    w = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise NotImplementedError(f"merge: needs a float nn.Linear base, got {type(base).__name__} (a quantized "
                                  f"base is merged by dequantizing it, then requantizing)")
    return w.detach()


def parse_targets(targets: Union[str, Iterable[str]]) -> list[str]:
    """Targets ("q,k,v,o", or a list of names, flashlm's or HF's) as flashlm's module suffixes ("attn.q", ...)."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not names:
        raise ValueError("targets: name at least one module")
    out = []
    for n in names:
        if n not in TARGET_NAMES:
            raise ValueError(f"targets: unknown module name {n!r}; expected some of "
                             f"{', '.join(sorted(TARGET_NAMES))}")
        if TARGET_NAMES[n] not in out:
            out.append(TARGET_NAMES[n])
    return out


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Union[str, Iterable[str]] = "q,k,v,o", rslora: bool = False) -> list[str]:
    """Freezes the model and wraps every block linear named by targets in a LoRALinear, in place. Returns the
    wrapped modules' names. Draws A from torch's default generator: seed it for a reproducible init."""
    check_lora_arguments(r, alpha, dropout)
    found = target_modules(model, targets)
    freeze(model)
    for name, module in found:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, r, alpha, dropout, rslora))
    return [name for name, _ in found]


def target_modules(model: nn.Module, targets: Union[str, Iterable[str]]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block linear that targets name, checked: each target matches some module, and
    the model has no LoRA layers yet."""
    suffixes = parse_targets(targets)
    found = [(name, m) for name, m in model.named_modules()
             if _BLOCK_RE.match(name) and _BLOCK_RE.match(name).group(2) in suffixes]
    missing = [s for s in suffixes if not any(name.endswith("." + s) for name, _ in found)]
    if missing:
        raise ValueError(f"targets: {', '.join(missing)} match no module of this model")
    if lora_layers(model):
        raise ValueError("model: already has LoRA layers")
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by name ("blocks.0.attn.q", ...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _mergeable_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers, each checked to have a float base before any is merged (none or all are)."""
    layers = lora_layers(model)
    for m in layers.values():
        _float_weight(m.base)
    return layers


def merge_lora(model: nn.Module) -> None:
    for m in _mergeable_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base for good and puts the bases back in the LoRALinears' places."""
    for name, m in _mergeable_layers(model).items():
        m.merge()
        m._unmerged_weight = None  # nothing to go back to
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, m.base)
    return model
