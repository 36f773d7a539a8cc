"""Round-to-nearest weight quantizers for flashlm.ops.int8_linear and int4_linear (offline, torch ops).

- int8 per output channel: scale = absmax / 127, q = round(w / scale) in [-127, 127].
- int4 group-wise along K (group 32, 64 or 128), packed as in csrc/include/flashlm/gemm/int_gemm.h
  (byte j of a group: element j in the low nibble, element j + group/2 in the high nibble):
  symmetric: as ggml's Q4_0, the value of largest magnitude m maps to -8: s = m / -8 (s may be negative),
  u = clamp(round(w / s) + 8, 0, 15), w ~ (u - 8) * s;
  asymmetric: min-max, s = (max - min) / 15, z = clamp(round(-min / s), 0, 15), u = clamp(round(w / s) + z, 0, 15),
  w ~ (u - z) * s.
  With search_clip, each group's range is shrunk by the ratio in `clip_ratios` (1.0 .. 0.8) that gives the
  smallest squared error of the reconstructed group; ratio 1.0 is among them, so it is never worse.
"""

from typing import Optional, Sequence

import torch

GROUP_SIZES = (32, 64, 128)
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(11))  # 1.0, 0.98, ..., 0.8


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales float32 [N]) with w ~ q * scales[:, None]."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    w = w.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def check_group_size(group_size, k: int) -> None:
    """An int4 group size flashlm's kernels take, dividing K (the input features)."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: must be one of {GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide K = {k}")


def int4_group_size(in_features: int) -> int:
    """The largest group size (128, 64, 32) dividing in_features: the int4 group a model's linears get when
    loaded with quantize="int4" (flashlm.io.loaded) or trained with QAT's default (flashlm.quant.qat)."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"quantize: int4 needs in_features divisible by 32, got {in_features}")


def pack_int4(u: torch.Tensor, group_size: int) -> torch.Tensor:
    """u uint8 [N, K] with values 0..15 -> packed uint8 [N, K/2] (the layout above)."""
    n, k = u.shape
    g = u.reshape(n, k // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed uint8 [N, K/2] -> u uint8 [N, K] with values 0..15."""
    n, half_k = packed.shape
    g = packed.reshape(n, 2 * half_k // group_size, group_size // 2)
    return torch.stack((g & 15, g >> 4), dim=2).reshape(n, 2 * half_k)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights int4_linear multiplies with, w = (u - z) * s (z = 8 when zeros is None), as `dtype` [N, K]."""
    u = unpack_int4(packed, group_size).to(dtype)
    n, k = u.shape
    z = 8.0 if zeros is None else zeros.to(dtype)[:, :, None]
    w = (u.reshape(n, k // group_size, group_size) - z) * scales.to(dtype)[:, :, None]
    return w.reshape(n, k)


def int4_group_params(g: torch.Tensor, symmetric: bool, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (s, z), each float [..., 1], of groups g [..., G] with each group's range scaled by
    ratio (a number, or a tensor [..., 1])."""
    if symmetric:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        s = torch.gather(g, -1, idx) * ratio / -8.0
        z = torch.full_like(s, 8.0)
    else:
        lo, hi = g.amin(dim=-1, keepdim=True) * ratio, g.amax(dim=-1, keepdim=True) * ratio
        s = (hi - lo) / 15.0
        z = torch.round(-lo / torch.where(s != 0, s, torch.ones_like(s))).clamp_(0, 15)
    return s, z


def int4_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The codes u (float, 0..15) of weights w under scales s and zero points z (broadcast): w ~ (u - z) * s."""
    safe = torch.where(s != 0, s, torch.ones_like(s))
    return (torch.round(w / safe) + z).clamp_(0, 15)


def _int4_groups(g: torch.Tensor, symmetric: bool, ratio: torch.Tensor):
    """Quantizes groups g [..., G] with each group's range scaled by ratio [..., 1]: returns (u, s, z) with
    u float [..., G] in 0..15, s and z float [..., 1]."""
    s, z = int4_group_params(g, symmetric, ratio)
    return int4_codes(g, s, z), s, z


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True, search_clip: bool = False,
                  clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS):
    """w [N, K] float -> (packed uint8 [N, K/2], scales float32 [N, K/group], zeros float32 [N, K/group] or
    None when symmetric), for flashlm.ops.int4_linear."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    check_group_size(group_size, k)
    g = w.detach().float().reshape(n, k // group_size, group_size)
    ratios = list(clip_ratios) if search_clip else [1.0]
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"clip_ratios: each must lie in (0, 1], got {ratios}")
    best = None
    for r in ratios:
        u, s, z = _int4_groups(g, symmetric, torch.full_like(g[..., :1], r))
        err = ((u - z) * s - g).square().sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, u, s, z]
        else:
            better = err < best[0]
            best = [torch.where(better, new, old) for new, old in zip((err, u, s, z), best)]
    _, u, s, z = best
    packed = pack_int4(u.to(torch.uint8).reshape(n, k), group_size)
    return packed, s.reshape(n, -1).contiguous(), None if symmetric else z.reshape(n, -1).contiguous()
