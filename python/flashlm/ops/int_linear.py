"""Quantized linear layers: W8A8 (int8 weights and activations) and W4A16 (int4 weights, float activations).

All compute y = x @ W.T (+ bias) for x [..., K]; the output has x's dtype. Layouts (csrc/include/flashlm/gemm/
int_gemm.h): int8 weights [N, K] with float32 per-output-channel scales [N]; int4 weights packed uint8 [N, K/2],
group-wise along K (group 32, 64 or 128): byte j of a group holds element j (low nibble) and element
j + group/2 (high nibble); float32 scales [N, K/group] and, for asymmetric weights, float32 zero points of the
same shape (w = (u - z) * s; symmetric: z = 8). Activations: float32/bfloat16 on the CPU, float16/bfloat16 on
CUDA (also float32 for quantize_per_token and int8_linear).

int8_linear_static is W8A8 with one fixed activation scale (static calibration): x is quantized natively
(round half to even of x / scale, clamped to +-127: quantize_static) and multiplied by the same int8 GEMM.

int8_linear, int8_linear_static and int4_linear are differentiable with respect to x and bias, the weights frozen: dx = dy @ W from the
stored weights (flashlm.ops.backward_input), nothing of x saved. int8_linear's rounding of x to int8 passes the
gradient straight through (dx is the gradient of x @ W.T).
"""

import math
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._check import check_optional_tensors, check_same_device, check_tensors, contiguous, new_output
from flashlm.ops._util import cuda_stream, custom_op
from flashlm.ops.backward_input import _int4_backward, _int8_backward, bias_grad

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _check_x(x: torch.Tensor, allow_cuda_f32: bool) -> None:
    check_tensors("x", x, readable=True)
    allowed = _CPU_DTYPES if x.device.type == "cpu" else _CUDA_DTYPES + ((torch.float32,) if allow_cuda_f32 else ())
    if x.dtype not in allowed:
        raise ValueError(f"x: on {x.device.type} the dtype must be one of {allowed}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension [..., K]")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous rows [M, K] (explicit M: reshape(-1, K) is ambiguous when K == 0); a view that
    must be copied is checked to fit in memory first."""
    if not x.is_contiguous():
        x = contiguous(x, "x")
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])


def _bias_f32(bias: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    if bias.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    return bias.to(torch.float32).contiguous()


@custom_op("flashlm::quantize_per_token", mutates_args=())
def _quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)  # smaller than x, which is in memory
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _C.quantize_per_token(x, q, scales, cuda_stream(x))
    return q, scales


@_quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of x [..., K]: returns (q int8 [..., K], scales float32 [...]) with
    scale = absmax / 127 and q = round_half_even(x * 127 / absmax) in [-127, 127]."""
    _check_x(x, allow_cuda_f32=True)
    q, scales = _quantize_per_token(_rows(x))
    return q.reshape(x.shape), scales.reshape(x.shape[:-1])


@custom_op("flashlm::int8_gemm", mutates_args=())
def _int8_gemm(x_q: torch.Tensor, x_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    out = new_output((x_q.shape[0], w.shape[0]), out_dtype, x_q.device, "x")
    _C.int8_gemm(x_q, x_scales, w, w_scales, bias, out, cuda_stream(x_q))
    return out


@_int8_gemm.register_fake
def _(x_q, x_scales, w, w_scales, bias, out_dtype):
    check_same_device(x_q=x_q, x_scales=x_scales, w=w, w_scales=w_scales, bias=bias)
    return x_q.new_empty((x_q.shape[0], w.shape[0]), dtype=out_dtype)


@custom_op("flashlm::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x_q, x_scales = _quantize_per_token(x)
    return _int8_gemm(x_q, x_scales, w, w_scales, bias, x.dtype)


@_int8_linear.register_fake
def _(x, w, w_scales, bias):
    check_same_device(x=x, w=w, w_scales=w_scales, bias=bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def _int8_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])  # the weights and bias; x is not needed


def _int8_backward_formula(ctx, grad):
    w, w_scales, bias = ctx.saved_tensors
    dx = _int8_backward.op(grad.contiguous(), w, w_scales) if ctx.needs_input_grad[0] else None
    return dx, None, None, bias_grad(grad, bias, ctx.needs_input_grad[3])


_int8_linear.register_autograd(_int8_backward_formula, setup_context=_int8_setup)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8: quantizes x per token to int8, multiplies with int8 weights [N, K] (per-channel float32 scales
    [N]) accumulating in int32, and applies the scales and bias in the epilogue."""
    n = _check_int8_weights(x, w_int8, w_scales, bias)
    y = _int8_linear(_rows(x), w_int8.contiguous(), w_scales.to(torch.float32).contiguous(), _bias_f32(bias, n))
    return y.reshape(*x.shape[:-1], n)


def _quantize_static(x: torch.Tensor, act_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [M, K] and a float32 scale of one element -> (q int8 [M, K], scales float32 [M], each the scale)."""
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)  # smaller than x, which is in memory
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _C.quantize_static(x, act_scale.reshape(1).contiguous(), q, scales, cuda_stream(x))
    return q, scales


def quantize_static(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] to int8 with one fixed scale (a float32 tensor of one element, finite and > 0): q =
    clamp(round_half_even(x / scale), -127, 127); values beyond 127 * scale are clipped."""
    _check_x(x, allow_cuda_f32=True)
    check_tensors("act_scale", act_scale)
    check_same_device(x=x, act_scale=act_scale)
    if act_scale.numel() != 1 or act_scale.dtype != torch.float32:
        raise ValueError(f"act_scale: expected one float32 value, got {act_scale.dtype} {tuple(act_scale.shape)}")
    return _quantize_static(_rows(x), act_scale)[0].reshape(x.shape)


@custom_op("flashlm::int8_linear_static", mutates_args=())
def _int8_linear_static(x: torch.Tensor, act_scale: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    x_q, x_scales = _quantize_static(x.contiguous(), act_scale)
    return _int8_gemm(x_q, x_scales, w, w_scales, bias, x.dtype)


@_int8_linear_static.register_fake
def _(x, act_scale, w, w_scales, bias):
    check_same_device(x=x, act_scale=act_scale, w=w, w_scales=w_scales, bias=bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def _int8_static_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:])  # the weights and bias; x and its scale are not needed


def _int8_static_backward(ctx, grad):
    w, w_scales, bias = ctx.saved_tensors  # as the dynamic op: dx from the stored weights, rounding passed through
    dx = _int8_backward.op(grad.contiguous(), w, w_scales) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, bias_grad(grad, bias, ctx.needs_input_grad[4])


_int8_linear_static.register_autograd(_int8_static_backward, setup_context=_int8_static_setup)


def _check_int8_weights(x, w_int8, w_scales, bias) -> int:
    """Checks int8_linear's operands; returns N."""
    _check_x(x, allow_cuda_f32=True)
    check_tensors("w_int8 w_scales", w_int8, w_scales)
    check_optional_tensors("bias", bias)
    check_same_device(x=x, w_int8=w_int8, w_scales=w_scales, bias=bias)
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(f"w_int8: expected an int8 [N, K] tensor, got {w_int8.dtype} {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: last dimension {x.shape[-1]} differs from w_int8's K = {k}")
    if w_scales.shape != (n,):
        raise ValueError(f"w_scales: expected shape ({n},), got {tuple(w_scales.shape)}")
    return n


def int8_linear_static(x: torch.Tensor, act_scale: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 with a static per-tensor activation scale (from calibration, flashlm.quant.ranges): x is quantized
    as quantize_static(x, act_scale) and multiplied by the same int8 GEMM as int8_linear's."""
    n = _check_int8_weights(x, w_int8, w_scales, bias)
    check_tensors("act_scale", act_scale)
    check_same_device(x=x, act_scale=act_scale)
    if act_scale.numel() != 1 or not act_scale.is_floating_point():
        raise ValueError(f"act_scale: expected one float, got {act_scale.dtype} {tuple(act_scale.shape)}")
    scale = act_scale.detach().reshape(()).to(torch.float32)
    # Its value is checked where reading it costs nothing; on a GPU that would wait for the device every call
    # (Int8Linear checks its scale when it is set).
    if scale.device.type == "cpu" and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"act_scale: must be finite and positive, got {float(scale)}")
    y = _int8_linear_static(_rows(x), scale, w_int8.contiguous(), w_scales.to(torch.float32).contiguous(),
                            _bias_f32(bias, n))
    return y.reshape(*x.shape[:-1], n)


@custom_op("flashlm::int4_gemm", mutates_args=())
def _int4_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    out = new_output((x.shape[0], w.shape[0]), x.dtype, x.device, "x")
    _C.int4_gemm(x, w, scales, zeros, bias, out, group_size, cuda_stream(x))
    return out


@_int4_gemm.register_fake
def _(x, w, scales, zeros, bias, group_size):
    check_same_device(x=x, w=w, scales=scales, zeros=zeros, bias=bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def _int4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])  # w, scales, zeros, bias; x is not needed
    ctx.group_size = inputs[5]


def _int4_backward_formula(ctx, grad):
    w, scales, zeros, bias = ctx.saved_tensors
    dx = _int4_backward.op(grad.contiguous(), w, scales, zeros, ctx.group_size) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, bias_grad(grad, bias, ctx.needs_input_grad[4]), None


_int4_gemm.register_autograd(_int4_backward_formula, setup_context=_int4_setup)


def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
                group_size: int = 128, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16: x [..., K] times int4 weights (packed uint8 [N, K/2], see the module docstring), dequantized on
    the fly; zeros=None means symmetric weights (w = (u - 8) * s)."""
    _check_x(x, allow_cuda_f32=False)
    check_tensors("w_packed scales", w_packed, scales)
    check_optional_tensors("zeros bias", zeros, bias)
    check_same_device(x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size: must be 32, 64 or 128, got {group_size}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"w_packed: expected a uint8 [N, K/2] tensor, got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x: last dimension {x.shape[-1]} differs from K = {k} (twice w_packed's last dimension)")
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide K = {k}")
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales: expected shape ({n}, {k // group_size}), got {tuple(scales.shape)}")
    if zeros is not None:
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros: expected shape {tuple(scales.shape)}, got {tuple(zeros.shape)}")
        zeros = zeros.to(torch.float32).contiguous()
    y = _int4_gemm(_rows(x), w_packed.contiguous(), scales.to(torch.float32).contiguous(),
                   zeros, _bias_f32(bias, n), group_size)
    return y.reshape(*x.shape[:-1], n)
