"""Unstructured and 2:4 semi-structured sparsity kept as masks while a model trains (for study: the weights
stay dense, no sparse kernel runs), and the L1 penalty of pruning-aware training.

    masks = SparsityMasks.semi_structured(model, "blocks.*.mlp.*")   # 2 of every 4 weights along each row zeroed
    masks = SparsityMasks.magnitude(model, 0.5, "blocks.*")          # the smallest half of each matrix zeroed
    masks.attach(optimizer)     # the mask is applied again after every optimiser step
    loss = loss + l1_penalty(model, weight=1e-5, pattern="blocks.*.mlp.*")   # the trainer's --l1 / --l1-params

Masks are chosen once, by |w|, per matrix (2-D weights whose names match the pattern: fnmatch, several
patterns separated by commas); a masked weight is zero after attach and after each step.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn


def matching_parameters(model: nn.Module, pattern: str, matrices_only: bool = False) -> dict:
    """name -> parameter for every parameter whose name matches one of pattern's comma-separated fnmatch
    patterns; ValueError naming the pattern when none does."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pattern: expected parameter-name patterns such as 'blocks.*.mlp.*', got {pattern!r}")
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    found = {name: p for name, p in model.named_parameters()
             if any(fnmatch(name, part) for part in parts) and (p.dim() == 2 or not matrices_only)}
    if not found:
        raise ValueError(f"pattern: {pattern!r} matches no {'matrix ' if matrices_only else ''}parameter of the model")
    return found


def semi_structured_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """bool mask of w [out, in]: in each run of m consecutive weights along a row, the n largest |w| kept."""
    if w.dim() != 2 or w.shape[1] % m:
        raise ValueError(f"w: {n}:{m} sparsity needs a matrix whose rows divide into groups of {m}, got "
                         f"{tuple(w.shape)}")
    groups = w.detach().abs().reshape(w.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(w.shape)


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool mask of w keeping all but the round(sparsity * numel) smallest |w| (ties: the earlier one goes)."""
    drop = round(sparsity * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if drop:
        keep[w.detach().abs().flatten().argsort(stable=True)[:drop]] = False
    return keep.reshape(w.shape)


class SparsityMasks:
    """Masks for some of a model's weights, applied in place (`apply`) and after each optimiser step (`attach`)."""

    def __init__(self, masks: dict):
        self.masks = masks  # parameter -> bool mask
        self.apply()

    @classmethod
    def semi_structured(cls, model: nn.Module, pattern: str = "blocks.*") -> "SparsityMasks":
        return cls({p: semi_structured_mask(p) for p in matching_parameters(model, pattern, True).values()})

    @classmethod
    def magnitude(cls, model: nn.Module, sparsity: float, pattern: str = "blocks.*") -> "SparsityMasks":
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity: must be a fraction in [0, 1), got {sparsity!r}")
        return cls({p: magnitude_mask(p, sparsity) for p in matching_parameters(model, pattern, True).values()})

    @torch.no_grad()
    def apply(self) -> None:
        for p, mask in self.masks.items():
            p.mul_(mask.to(p.device))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-applies the masks after every optimizer.step(); returns the hook's handle (remove() to stop)."""
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    @classmethod
    def from_spec(cls, model: nn.Module, spec: str, pattern: str) -> "SparsityMasks":
        """The trainer's masks: spec "2:4" (semi-structured) or a fraction ("0.5": magnitude), see parse_sparsity."""
        kind = parse_sparsity(spec)
        return cls.semi_structured(model, pattern) if kind == "2:4" else cls.magnitude(model, kind, pattern)

    def state_dict(self, model: nn.Module) -> dict:
        """parameter name -> mask (on the CPU), for a checkpoint."""
        names = {p: name for name, p in model.named_parameters()}
        return {names[p]: mask.cpu() for p, mask in self.masks.items()}

    def load_state_dict(self, model: nn.Module, state) -> None:
        """Takes the masks a checkpoint saved (the same parameters, the same shapes) and applies them."""
        names = {p: name for name, p in model.named_parameters()}
        mine = {names[p]: p for p in self.masks}
        if not isinstance(state, dict) or set(state) != set(mine):
            saved = sorted(state) if isinstance(state, dict) else state
            raise ValueError(f"checkpoint: its sparsity masks cover {saved}, this run's {sorted(mine)}")
        for name, mask in state.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != mine[name].shape:
                raise ValueError(f"checkpoint: its sparsity mask of {name} is not a bool tensor of shape "
                                 f"{tuple(mine[name].shape)}")
        self.masks = {p: state[name].to(p.device) for name, p in mine.items()}
        self.apply()

    def sparsity(self) -> float:
        """The fraction of the masked weights that are zero now."""
        total = sum(p.numel() for p in self.masks)
        return sum(int((p == 0).sum()) for p in self.masks) / total


def parse_sparsity(spec):
    """TrainConfig.sparsity: "" (none: None), "2:4", or a fraction in (0, 1) of each matrix to zero (a float)."""
    if not isinstance(spec, str):
        raise ValueError(f"sparsity: expected '2:4' or a fraction such as '0.5', got {spec!r}")
    if spec in ("", "2:4"):
        return spec or None
    try:
        value = float(spec)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise ValueError(f"sparsity: expected '2:4' or a fraction in (0, 1) such as '0.5', got {spec!r}")
    return value


def l1_penalty(params, weight: float) -> torch.Tensor:
    """weight * sum of |p| over `params` (an iterable of tensors), the L1 term of pruning-aware training."""
    params = list(params)
    return weight * sum(p.abs().sum() for p in params) if params else torch.zeros(())
