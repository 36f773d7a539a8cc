"""Quantization-aware training: block linears that train float weights but compute their forward as the
quantized layer they will become (Int8Linear: W8A8, per-channel weights, per-token activations; Int4Linear:
group-wise weights, symmetric or asymmetric; GGUFLinear: the GGML block types Q8_0, Q4_0 and Q4_K).

    apply_qat(model, "int4")   # every block's nn.Linear becomes a QATLinear (the same Parameters)
    ... train ...
    convert_qat(model)         # each QATLinear becomes the real Int4Linear, with the same forward bit for bit

The forward rounds the weights with flashlm.quant.rtn's quantizers (the ones Int8Linear.from_float and
Int4Linear.from_float use) and multiplies with the real kernels (flashlm.ops.int8_linear / int4_linear), so the
QAT forward and the exported layer agree exactly. The backward is the straight-through estimator: the rounding
counts as the identity, except where a value was clipped to the end of the code range (there the gradient is
zero). Per-token and per-channel absmax scales clip nothing; int4 groups clip the value opposite the largest
magnitude when it rounds past code 15 (symmetric) and the ends a rounded zero point pushes out (asymmetric).
Scales follow the weights (absmax / min-max) unless lsq is set (int8 and symmetric int4): then each output
channel's (int8) or group's (int4) step is a Parameter, initialised from RTN's scale and trained with LSQ's
gradient (flashlm.quant.lsq), and the exported layer holds the learned steps.

The GGML block types quantize the weights with flashlm's quantizer (byte-exact with ggml's) and multiply with
the real GGUF kernel (flashlm.ops.gguf_linear: on the CPU it rounds x to Q8_0 / Q8_K blocks as ggml does), so
the forward is GGUFLinear's bit for bit. Their straight-through gradient is the identity everywhere: each
block's scale (and K-quant sub-block scale and minimum) is chosen from that block's own values, so every
value lies inside its block's range and none is clipped. The weights' gradient is dy.T @ x with x as given
(the CUDA kernel does not round x, so the float input is what every device shares).

The state dict of a QATLinear is an nn.Linear's (weight, bias; with lsq also weight_step): a QAT checkpoint loads as a float model, and
quantizing it by the same rule gives the layers convert_qat gives (flashlm.io.qat_export: `flashlm quantize RUN
OUT --method qat` writes them as a quantized checkpoint).
"""

from typing import Optional

import torch
from torch import nn

from flashlm.ops import (dequantize, gguf_linear, gguf_linear_backward_input, int4_linear, int4_linear_backward_input, int8_linear, int8_linear_backward_input,
                         quantize_per_token)
from flashlm.ops.gguf_linear import gguf_linear_row_bytes
from flashlm.quant.gguf_linear import GGUFLinear
from flashlm.quant.gguf_quantize import quantize_gguf
from flashlm.quant.linear import Int4Linear, Int8Linear
from flashlm.quant.lsq import INT4_CODES, INT8_CODES, lsq_codes, lsq_grad_scale, lsq_grads
from flashlm.quant.rtn import (GROUP_SIZES, check_group_size, dequantize_int4, int4_group_params, int4_group_size,
                               pack_int4, quantize_int4, quantize_int8_per_channel)
from flashlm.quant.w8a8 import BLOCK_LINEARS

GGUF_QAT_TYPES = ("Q8_0", "Q4_0", "Q4_K")
QAT_TYPES = ("int8", "int4", "int4-asym") + GGUF_QAT_TYPES
LSQ_TYPES = ("int8", "int4")  # the types whose steps LSQ learns (no zero points, no GGML blocks)


def has_groups(qat_type: str) -> bool:
    """Whether qat_type's weights come in int4 groups of a chosen size."""
    return qat_type in ("int4", "int4-asym")


def check_qat_type(qat_type) -> None:
    if qat_type not in QAT_TYPES:
        raise ValueError(f"qat: must be one of {', '.join(QAT_TYPES)}, got {qat_type!r}")


def check_qat_setting(qat_type, group_size) -> None:
    """A training run's qat (None: off) and qat_group_size (int4 only; None: apply_qat's default)."""
    if qat_type is None:
        if group_size is not None:
            raise ValueError("qat_group_size: goes with qat int4 or int4-asym")
        return
    check_qat_type(qat_type)
    if group_size is not None and (not has_groups(qat_type) or isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"qat_group_size: must be one of {GROUP_SIZES} with qat int4 or int4-asym, got "
                         f"{group_size!r} with qat {qat_type!r}")


def check_lsq(qat_type, lsq) -> None:
    """lsq (learned steps) is a bool, True only with a type in LSQ_TYPES."""
    if not isinstance(lsq, bool):
        raise ValueError(f"lsq: expected True or False, got {lsq!r}")
    if lsq and qat_type not in LSQ_TYPES:
        raise ValueError(f"lsq: learned steps go with qat {' or '.join(LSQ_TYPES)}, got qat {qat_type!r}")


def check_gguf_in_features(qat_type: str, k: int) -> None:
    """ValueError unless k input features are a whole number of qat_type's blocks."""
    try:
        gguf_linear_row_bytes(qat_type, k)
    except ValueError:
        raise ValueError(f"in_features: {qat_type} needs a multiple of its block size, got {k}") from None


def gguf_blocks(w: torch.Tensor, qat_type: str) -> torch.Tensor:
    """uint8 [N, row bytes] on w's device: w [N, K] as GGUFLinear.from_float quantizes it."""
    return torch.as_tensor(quantize_gguf(w.detach().float().cpu(), qat_type)).to(w.device)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    """round(x / scale) + zero before clamping (a zero scale counts as 1), as flashlm.quant.rtn rounds."""
    return torch.round(x / torch.where(scale != 0, scale, torch.ones_like(scale))) + zero


class FakeQuantize(torch.autograd.Function):
    """x -> (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale (scale and zero broadcast against x;
    a zero scale counts as 1), with the straight-through gradient: dx = dy where the code was not clamped,
    0 where it was."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: int, qmax: int):
        codes = _codes(x, scale, zero)
        inside = (codes >= qmin) & (codes <= qmax)
        ctx.save_for_backward(inside)
        return (codes.clamp(qmin, qmax) - zero) * scale

    @staticmethod
    def backward(ctx, dy):
        (inside,) = ctx.saved_tensors
        return dy * inside, None, None, None, None


class _StraightThrough(torch.autograd.Function):
    """(x, value) -> value (exactly, signed zeros included), with the gradient passed to x unchanged."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.dtype = x.dtype
        return value

    @staticmethod
    def backward(ctx, dy):
        return dy.to(ctx.dtype), None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero, qmin: int, qmax: int) -> torch.Tensor:
    """FakeQuantize.apply with its arguments checked."""
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    if not torch.is_tensor(scale) or not scale.is_floating_point():
        raise ValueError(f"scale: expected a float tensor, got {type(scale).__name__}")
    if not isinstance(qmin, int) or not isinstance(qmax, int) or qmin >= qmax:
        raise ValueError(f"qmin, qmax: expected integers with qmin < qmax, got {qmin!r}, {qmax!r}")
    zero = torch.as_tensor(zero, dtype=scale.dtype, device=scale.device)
    try:
        torch.broadcast_shapes(x.shape, scale.shape, zero.shape)
    except RuntimeError:
        raise ValueError(f"scale, zero: shapes {tuple(scale.shape)} and {tuple(zero.shape)} do not broadcast "
                         f"against x {tuple(x.shape)}") from None
    return FakeQuantize.apply(x, scale.detach(), zero.detach(), qmin, qmax)


def _int4_groups(w: torch.Tensor, group_size: int, symmetric: bool):
    """w [N, K] as groups [N, K/group, group] with rtn's scales and zero points [N, K/group, 1]."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group_size, group_size)
    s, z = int4_group_params(g, symmetric, 1.0)
    return g, s, z


def fake_quant_weight(w: torch.Tensor, qat_type: str, group_size: Optional[int] = None) -> torch.Tensor:
    """w [N, K] quantized as `qat_type`'s layer quantizes it and dequantized (float32), differentiable with the
    straight-through gradient. group_size (int4): None is int4_group_size(K)."""
    check_qat_type(qat_type)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if qat_type in GGUF_QAT_TYPES:
        check_gguf_in_features(qat_type, w.shape[1])
        w_dq = dequantize(gguf_blocks(w, qat_type).reshape(-1), qat_type, tuple(w.shape))
        return _StraightThrough.apply(w, w_dq.to(w.device))  # nothing is clipped
    if qat_type == "int8":
        scales = w.detach().float().abs().amax(dim=1, keepdim=True) / 127.0
        return fake_quantize(w.float(), scales, 0.0, -127, 127)
    group_size = int4_group_size(w.shape[1]) if group_size is None else group_size
    check_group_size(group_size, w.shape[1])
    _, s, z = _int4_groups(w, group_size, qat_type == "int4")
    n, k = w.shape
    return fake_quantize(w.float().reshape(n, k // group_size, group_size), s, z, 0, 15).reshape(n, k)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded per token as Int8Linear rounds its input (flashlm.ops.quantize_per_token) and
    dequantized (float32); the gradient passes straight through (absmax scales clip nothing)."""
    q, scales = quantize_per_token(x.detach())
    x_dq = q.float() * scales.unsqueeze(-1)
    return x_dq + (x - x.detach()).float()  # the value of x_dq, the gradient of x


def _grad_weight(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy [..., N], x [..., K] -> dy.T @ x [N, K] in float32."""
    return dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()


class _Int8QAT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        q, scales = quantize_int8_per_channel(weight)
        ctx.save_for_backward(x, q, scales)
        ctx.weight_dtype = weight.dtype
        return int8_linear(x, q, scales, bias)

    @staticmethod
    def backward(ctx, dy):
        x, q, scales = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = int8_linear_backward_input(dy.contiguous(), q, scales)
        if ctx.needs_input_grad[1]:  # the weights met x as Int8Linear rounds it
            q_x, s_x = quantize_per_token(x)
            dw = _grad_weight(dy, q_x.float() * s_x.unsqueeze(-1)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0)
        return dx, dw, db


def _int4_forward(ctx, x, packed, scales, zeros, group_size: int, bias):
    """Int4Linear's forward, its kernel choice kept in ctx.kernel for _int4_backward_input."""
    # The CUDA kernel takes float16/bfloat16 activations only: float32 ones multiply the dequantized
    # weights in torch (same weights, torch's accumulation order).
    ctx.kernel = not (x.is_cuda and x.dtype == torch.float32)
    if ctx.kernel:
        return int4_linear(x, packed, scales, zeros, group_size, bias)
    w = dequantize_int4(packed, scales, zeros, group_size)
    return torch.nn.functional.linear(x, w, bias)


def _int4_backward_input(ctx, dy, packed, scales, zeros):
    if ctx.kernel:
        return int4_linear_backward_input(dy.contiguous(), packed, scales, zeros, ctx.group_size)
    return dy @ dequantize_int4(packed, scales, zeros, ctx.group_size)


class _Int4QAT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group_size: int, symmetric: bool):
        packed, scales, zeros = quantize_int4(weight, group_size, symmetric)
        # Where rounding pushed a code out of 0..15 (the weights' gradient is zero there).
        g, s, z = _int4_groups(weight, group_size, symmetric)
        codes = _codes(g, s, z)
        inside = ((codes >= 0) & (codes <= 15)).reshape(weight.shape)
        ctx.save_for_backward(x, packed, scales, zeros, inside)
        ctx.group_size, ctx.weight_dtype = group_size, weight.dtype
        return _int4_forward(ctx, x, packed, scales, zeros, group_size, bias)

    @staticmethod
    def backward(ctx, dy):
        x, packed, scales, zeros, inside = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _int4_backward_input(ctx, dy, packed, scales, zeros)
        if ctx.needs_input_grad[1]:
            dw = (_grad_weight(dy, x) * inside).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0)
        return dx, dw, db, None, None


def lsq_int8_weights(weight: torch.Tensor, step: torch.Tensor):
    """(q int8 [N, K], scales float32 [N], codes, v) of weight [N, K] with learned steps [N] (flashlm.quant.lsq)."""
    codes, v = lsq_codes(weight, step.unsqueeze(1), *INT8_CODES)
    return codes.to(torch.int8), step.detach().float().contiguous(), codes, v


def lsq_int4_weights(weight: torch.Tensor, step: torch.Tensor, group_size: int):
    """(packed uint8 [N, K/2], scales float32 [N, K/group], codes, v) of weight [N, K] with learned symmetric steps
    [N, K/group]: Int4Linear's codes 0..15 are the LSQ codes -8..7 plus its zero point 8."""
    n, k = weight.shape
    codes, v = lsq_codes(weight.reshape(n, k // group_size, group_size), step.unsqueeze(2), *INT4_CODES)
    packed = pack_int4((codes + 8).to(torch.uint8).reshape(n, k), group_size)
    return packed, step.detach().float().contiguous(), codes, v


class _Int8LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, step, bias):
        q, scales, _, _ = lsq_int8_weights(weight, step)
        ctx.save_for_backward(x, weight, step)
        return int8_linear(x, q, scales, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, step = ctx.saved_tensors
        q, scales, codes, v = lsq_int8_weights(weight, step)
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = int8_linear_backward_input(dy.contiguous(), q, scales)
        q_x, s_x = quantize_per_token(x)  # the weights met x as Int8Linear rounds it
        grad_wq = _grad_weight(dy, q_x.float() * s_x.unsqueeze(-1))
        dw, dstep = lsq_grads(grad_wq, codes, v, *INT8_CODES, (step.shape[0], 1),
                              lsq_grad_scale(weight.numel(), INT8_CODES[1]))
        if ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0)
        return dx, dw.to(weight.dtype), dstep.reshape(step.shape).to(step.dtype), db


class _Int4LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, step, bias, group_size: int):
        packed, scales, _, _ = lsq_int4_weights(weight, step, group_size)
        ctx.save_for_backward(x, weight, step)
        ctx.group_size = group_size
        return _int4_forward(ctx, x, packed, scales, None, group_size, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, step = ctx.saved_tensors
        packed, scales, codes, v = lsq_int4_weights(weight, step, ctx.group_size)
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _int4_backward_input(ctx, dy, packed, scales, None)
        grad_wq = _grad_weight(dy, x).reshape(codes.shape)
        dw, dstep = lsq_grads(grad_wq, codes, v, *INT4_CODES, (*step.shape, 1),
                              lsq_grad_scale(weight.numel(), INT4_CODES[1]))
        if ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0)
        return dx, dw.reshape(weight.shape).to(weight.dtype), dstep.reshape(step.shape).to(step.dtype), db, None


class _GGUFQAT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qat_type: str):
        raw = gguf_blocks(weight, qat_type)
        ctx.save_for_backward(x, raw)
        ctx.qat_type, ctx.weight_dtype = qat_type, weight.dtype
        return gguf_linear(x, raw, qat_type, tuple(weight.shape), bias)

    @staticmethod
    def backward(ctx, dy):
        x, raw = ctx.saved_tensors
        dx = dw = db = None
        shape = (dy.shape[-1], x.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = gguf_linear_backward_input(dy.contiguous(), raw, ctx.qat_type, shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _grad_weight(dy, x).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).float().sum(0)
        return dx, dw, db, None


class QATLinear(nn.Linear):
    """An nn.Linear (float weight and bias, trained) whose forward is the quantized layer's: Int8Linear's for
    qat_type "int8", Int4Linear's (group_size; None: int4_group_size(in_features)) for "int4" (symmetric)
    and "int4-asym" (zero points), GGUFLinear's for the GGML block types (GGUF_QAT_TYPES). With lsq (int8,
    int4) the scales are learned: weight_step, a float32 Parameter [out_features] (int8) or [out_features,
    in_features / group_size] (int4), RTN's scales to begin with (flashlm.quant.lsq)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qat_type: str = "int8",
                 group_size: Optional[int] = None, device=None, dtype=None, lsq: bool = False):
        check_qat_type(qat_type)
        check_lsq(qat_type, lsq)
        if qat_type in GGUF_QAT_TYPES:
            check_gguf_in_features(qat_type, in_features)
        if has_groups(qat_type):
            group_size = int4_group_size(in_features) if group_size is None else group_size
            check_group_size(group_size, in_features)
        elif group_size is not None:
            raise ValueError("group_size: only int4 weights have groups")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.qat_type, self.group_size, self.lsq = qat_type, group_size, lsq
        if lsq:
            shape = (out_features,) if qat_type == "int8" else (out_features, in_features // group_size)
            self.weight_step = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
            if self.weight.device.type != "meta":
                self.reset_steps()

    @classmethod
    def from_linear(cls, linear: nn.Linear, qat_type: str, group_size: Optional[int] = None,
                    lsq: bool = False) -> "QATLinear":
        """A QATLinear sharing linear's Parameters (no copy); with lsq, its steps are RTN's scales of them."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, qat_type, group_size,
                  device="meta", lsq=lsq)
        out.weight, out.bias = linear.weight, linear.bias
        if lsq:
            out.weight_step = nn.Parameter(torch.zeros(out.weight_step.shape, device=linear.weight.device))
            out.reset_steps()
        return out

    @torch.no_grad()
    def reset_steps(self) -> None:
        """weight_step := RTN's scales of the current weights (per channel for int8, per group for int4)."""
        if self.qat_type == "int8":
            _, steps = quantize_int8_per_channel(self.weight)
        else:
            steps = _int4_groups(self.weight, self.group_size, True)[1].squeeze(-1)
        self.weight_step.copy_(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lsq:
            if self.qat_type == "int8":
                return _Int8LSQ.apply(x, self.weight, self.weight_step, self.bias)
            return _Int4LSQ.apply(x, self.weight, self.weight_step, self.bias, self.group_size)
        if self.qat_type == "int8":
            return _Int8QAT.apply(x, self.weight, self.bias)
        if self.qat_type in GGUF_QAT_TYPES:
            return _GGUFQAT.apply(x, self.weight, self.bias, self.qat_type)
        return _Int4QAT.apply(x, self.weight, self.bias, self.group_size, self.qat_type == "int4")

    def to_quantized(self) -> nn.Module:
        """The Int8Linear / Int4Linear / GGUFLinear this layer trains for (the same forward, bit for bit)."""
        if self.lsq:
            return self._lsq_quantized()
        if self.qat_type == "int8":
            return Int8Linear.from_float(self)
        if self.qat_type in GGUF_QAT_TYPES:
            return GGUFLinear.from_float(self, self.qat_type)
        return Int4Linear.from_float(self, self.group_size, symmetric=self.qat_type == "int4")

    @torch.no_grad()
    def _lsq_quantized(self) -> nn.Module:
        if self.qat_type == "int4":
            packed, scales, _, _ = lsq_int4_weights(self.weight, self.weight_step, self.group_size)
            return Int4Linear.from_quantized(self, packed, scales, None, self.group_size)
        out = Int8Linear.from_float(self)  # its bias; the weights become the learned steps'
        out.weight, out.weight_scales, _, _ = lsq_int8_weights(self.weight, self.weight_step)
        return out

    def extra_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"{super().extra_repr()}, qat_type={self.qat_type}{groups}{', lsq=True' if self.lsq else ''}"


def _block_linears(model: nn.Module):
    """(parent module, attribute, name) of every block linear of a flashlm Transformer."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"model: expected a flashlm Transformer (with .blocks), got {type(model).__name__}")
    for i, block in enumerate(blocks):
        for dotted in BLOCK_LINEARS:
            parent_name, _, leaf = dotted.rpartition(".")
            parent = getattr(block, parent_name, None)
            if parent is not None and getattr(parent, leaf, None) is not None:
                yield parent, leaf, f"blocks.{i}.{dotted}"


def apply_qat(model: nn.Module, qat_type: str, group_size: Optional[int] = None, lsq: bool = False) -> list:
    """Replaces every block's float nn.Linear by a QATLinear in place (the same Parameters, so an optimizer
    built before or after sees them; with lsq each layer adds its weight_step, which only an optimizer built
    after sees); returns their names. Embeddings, norms and the lm head stay float, as the int8/int4 loaders
    keep them. group_size (int4) None: the largest of 128/64/32 dividing every layer's in_features."""
    check_qat_type(qat_type)
    check_lsq(qat_type, lsq)
    found = list(_block_linears(model))
    if not found:
        raise ValueError("model: has no block linears to train quantization-aware")
    for parent, leaf, name in found:
        linear = getattr(parent, leaf)
        if type(linear) is not nn.Linear:
            raise ValueError(f"model: {name} is {type(linear).__name__}, not a float nn.Linear")
    if has_groups(qat_type) and group_size is None:  # one group for all: an int4 checkpoint holds one
        group_size = min(int4_group_size(getattr(p, leaf).in_features) for p, leaf, _ in found)
    layers = [QATLinear.from_linear(getattr(p, leaf), qat_type, group_size, lsq) for p, leaf, _ in found]
    for (parent, leaf, _), layer in zip(found, layers):  # all checked before any is replaced
        setattr(parent, leaf, layer)
    return [name for _, _, name in found]


def convert_qat(model: nn.Module) -> list:
    """Replaces every QATLinear of model's blocks by its real quantized layer in place; returns their names."""
    names = []
    for parent, leaf, name in _block_linears(model):
        layer = getattr(parent, leaf)
        if isinstance(layer, QATLinear):
            setattr(parent, leaf, layer.to_quantized())
            names.append(name)
    if not names:
        raise ValueError("model: has no QATLinear layers to convert (apply_qat first)")
    return names
