"""Mixture-of-experts kernels as torch functions: top-k routing, the expert-indexed matmul and the expert
feed-forward (see csrc/include/flashlm/moe/moe.h).

    weights, experts = route(router_logits, top_k)          # [T, k] float32, [T, k] int32
    out = expert_ffn(x, weights, experts, gate, up, down)    # x [T, D]; gate, up [E, F, D]; down [E, D, F]

Expert weights are a float tensor [E, N, K] (float32 or bfloat16; float16 too on CUDA) or an object holding
GGML blocks with attributes `raw` (uint8 [E, N, row bytes]), `ggml_type` (one of GGUF_LINEAR_TYPES) and
`shape` (E, N, K): flashlm.quant.gguf_experts.GGUFExperts.

On the CPU the rows of a call are grouped by expert (a counting sort) and each expert's rows go through its
weight as one GEMM; GGUF weights through the GGUF matmul's integer block dot products (each row quantized once
to 8-bit blocks, as gguf_linear does). No Python loop over experts runs without autograd. With autograd: float
weights are differentiable in x and the weights, GGUF weights in x only (the weight stays frozen in its blocks);
the backward groups rows by expert with torch index ops and loops over the experts present, the GGUF one
calling gguf_linear_backward_input per expert. route is differentiable in router_logits.
"""

import torch

from flashlm import _C
from flashlm.ops._check import (as_bool, as_int, as_str, check_same_device, check_tensor, check_device, contiguous,
                                index_tensor, new_output)
from flashlm.ops._util import cuda_stream, custom_op
from flashlm.ops.gguf_linear import GGUF_LINEAR_TYPES, check_gguf_weight, gguf_linear_backward_input

_FLOAT_TYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_X_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
ACTIVATIONS = ("silu", "gelu_tanh")


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _X_DTYPES.get(t.device.type, ()):
        raise ValueError(f"{name}: {t.dtype} on {t.device.type} is not supported "
                         "(CPU: float32, bfloat16; CUDA: float32, float16, bfloat16)")


def is_gguf_experts(weight) -> bool:
    """Whether `weight` is a GGML-block expert weight (raw, ggml_type, shape) rather than a tensor."""
    return not isinstance(weight, torch.Tensor) and hasattr(weight, "raw") and hasattr(weight, "ggml_type")


def expert_weight(weight, name: str):
    """(data, type name, E, N, K) of an expert weight: a float tensor [E, N, K] or GGML blocks (GGUFExperts)."""
    if is_gguf_experts(weight):
        try:
            e, n, k = (as_int(s, f"{name}.shape", 0) for s in weight.shape)
        except (TypeError, ValueError):
            raise ValueError(f"{name}.shape: expected (E, N, K), got {weight.shape!r}") from None
        raw = weight.raw
        check_tensor(raw, f"{name}.raw")
        check_device(raw, f"{name}.raw")
        ggml_type, _, _, _ = check_gguf_weight(raw, weight.ggml_type, (e * n, k))
        if e < 1:
            raise ValueError(f"{name}.shape: E must be >= 1, got {e}")
        return raw, ggml_type, e, n, k
    check_tensor(weight, name, 3, "[E, N, K]")
    check_device(weight, name)
    _check_float(weight, name)
    e, n, k = weight.shape
    if e < 1:
        raise ValueError(f"{name}: E must be >= 1, got shape {list(weight.shape)}")
    return weight, _FLOAT_TYPES[weight.dtype], e, n, k


def _check_experts(experts: torch.Tensor, name: str, ndim: int, num_experts: int) -> torch.Tensor:
    """experts as int32 with every value in [0, num_experts), read on CUDA too (an index out of range there
    would leave its row at zero). Under torch.compile the values are not read here (they are data the graph
    does not have); the CPU kernel checks them again."""
    if torch.compiler.is_compiling():
        return index_tensor(experts, name, ndim, torch.int32).contiguous()
    experts = index_tensor(experts, name, ndim, torch.int32, 0, num_experts - 1)
    if experts.is_cuda and experts.numel():
        lo, hi = (int(v) for v in torch.aminmax(experts))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{name}: values must be in [0, {num_experts - 1}], found {lo if lo < 0 else hi}")
    return experts.contiguous()


# --- routing ---------------------------------------------------------------------------------------------------

@custom_op("flashlm::moe_route", mutates_args=())
def _route(logits: torch.Tensor, top_k: int, softmax_first: bool, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = logits.shape[0]
    weights = new_output((t, top_k), torch.float32, logits.device, "router_logits")
    experts = new_output((t, top_k), torch.int32, logits.device, "router_logits")
    _C.moe_route(logits, top_k, softmax_first, renormalize, weights, experts, cuda_stream(logits))
    return weights, experts


@_route.register_fake
def _(logits, top_k, softmax_first, renormalize):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int32)


def _route_setup(ctx, inputs, output):
    logits, _, softmax_first, renormalize = inputs
    weights, experts = output
    ctx.save_for_backward(logits, weights, experts)
    ctx.full_softmax = softmax_first and not renormalize


def _route_backward(ctx, grad_weights, _grad_experts):
    logits, weights, experts = ctx.saved_tensors
    g = grad_weights.float()
    long_experts = experts.long()
    if ctx.full_softmax:
        # w_j = p[e_j], p = softmax(l): dl_i = sum_j g_j w_j [i == e_j] - p_i sum_j g_j w_j.
        p = torch.softmax(logits.float(), dim=-1)
        gw = g * weights
        dl = (-p * gw.sum(-1, keepdim=True)).scatter_add(1, long_experts, gw)
    else:
        # A softmax over the kept logits (top k then softmax; or softmax then top k renormalised, the same
        # values): dl_{e_j} = w_j (g_j - sum_i g_i w_i), nothing for the others.
        kept = weights * (g - (g * weights).sum(-1, keepdim=True))
        dl = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_add(1, long_experts, kept)
    return dl.to(logits.dtype), None, None, None


_route.register_autograd(_route_backward, setup_context=_route_setup)


def route(router_logits: torch.Tensor, top_k: int, *, softmax_first: bool = True,
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights [T, top_k] float32, experts [T, top_k] int32) from router_logits [T, E]
    (float32 or bfloat16; float16 too on CUDA).

    softmax_first=True: softmax over all E, then the k largest (Mixtral, Qwen-MoE); with renormalize they are
    divided by their sum (Mixtral always, Qwen's norm_topk_prob). softmax_first=False: the k largest logits,
    softmaxed over those k (renormalize changes nothing there). Experts come largest first; ties go to the lower
    expert index first, as torch.topk does on the CPU. A row holding a NaN is refused (ValueError).
    Differentiable in router_logits."""
    check_tensor(router_logits, "router_logits", 2, "[T, E]")
    check_device(router_logits, "router_logits")
    _check_float(router_logits, "router_logits")
    e = router_logits.shape[1]
    top_k = as_int(top_k, "top_k", 1, max(e, 1))
    if top_k > e:
        raise ValueError(f"top_k: must be in [1, {e}] (router_logits has {e} experts), got {top_k}")
    softmax_first, renormalize = as_bool(softmax_first, "softmax_first"), as_bool(renormalize, "renormalize")
    logits = contiguous(router_logits, "router_logits")
    if logits.is_cuda and logits.numel() and not torch.compiler.is_compiling() and bool(torch.isnan(logits).any()):
        raise ValueError("router_logits: holds a NaN")
    return _route(logits, top_k, softmax_first, renormalize)


# --- expert matmul --------------------------------------------------------------------------------------------

@custom_op("flashlm::moe_expert_matmul", mutates_args=())
def _matmul(x: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor, weight_type: str, num_experts: int,
            n: int, k: int) -> torch.Tensor:
    y = new_output((x.shape[0], n), x.dtype, x.device, "x")
    _C.moe_expert_matmul(x, experts, weight, weight_type, num_experts, n, k, y, cuda_stream(x))
    return y


@_matmul.register_fake
def _(x, experts, weight, weight_type, num_experts, n, k):
    check_same_device(x=x, experts=experts, weight=weight)
    return x.new_empty((x.shape[0], n))


def _matmul_setup(ctx, inputs, output):
    x, experts, weight, weight_type, num_experts, n, k = inputs
    ctx.save_for_backward(x, experts, weight)
    ctx.gguf = weight_type not in ("F32", "BF16", "F16")
    ctx.weight_type, ctx.shape = weight_type, (num_experts, n, k)


def _matmul_backward(ctx, dy):
    x, experts, weight = ctx.saved_tensors
    e, n, k = ctx.shape
    want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2] and not ctx.gguf
    dx = torch.zeros_like(x) if want_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    if ctx.gguf:
        raw = weight.reshape(e, -1)
    # Rows grouped by expert with index ops; one GEMM per expert present.
    order = torch.argsort(experts, stable=True)
    present, counts = torch.unique_consecutive(experts[order], return_counts=True)
    start = 0
    for ex, count in zip(present.tolist(), counts.tolist()):
        rows = order[start:start + count]
        start += count
        dy_e = dy.index_select(0, rows)
        if want_x:
            if ctx.gguf:
                dx_e = gguf_linear_backward_input(dy_e.contiguous(), raw[ex], ctx.weight_type, (n, k))
            else:
                dx_e = dy_e.float() @ weight[ex].float()
            dx.index_copy_(0, rows, dx_e.to(x.dtype))
        if want_w:
            dw[ex] = dy_e.float().T @ x.index_select(0, rows).float()
    return dx, None, None if dw is None else dw.to(weight.dtype), None, None, None, None


_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


def _matmul_args(x, experts, weight, name: str = "weight"):
    """The checked arguments of one expert matmul: (x, experts int32, data, type, E, N, K)."""
    data, weight_type, e, n, k = expert_weight(weight, name)
    check_tensor(x, "x", 2, "[R, K]")
    check_device(x, "x")
    _check_float(x, "x")
    if x.shape[1] != k:
        raise ValueError(f"x: expected [R, {k}] ({name} is [{e}, {n}, {k}]), got {list(x.shape)}")
    check_same_device(x=x, **{name: data})
    check_tensor(experts, "experts", 1, "[R]")
    if experts.shape[0] != x.shape[0]:
        raise ValueError(f"experts: expected [{x.shape[0]}] (one per row of x), got {list(experts.shape)}")
    check_same_device(x=x, experts=experts)
    experts = _check_experts(experts, "experts", 1, e)
    return contiguous(x, "x"), experts, contiguous(data, name), weight_type, e, n, k


def expert_matmul(x: torch.Tensor, experts: torch.Tensor, weight) -> torch.Tensor:
    """y[r] = W[experts[r]] @ x[r]: x [R, K], experts [R] (int32, or int64 in range) in [0, E), weight a float
    tensor [E, N, K] or GGUFExperts; y [R, N] with x's dtype."""
    return _matmul(*_matmul_args(x, experts, weight))


# --- expert feed-forward ------------------------------------------------------------------------------------------

@custom_op("flashlm::moe_expert_ffn", mutates_args=())
def _ffn(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor, gate_type: str,
         up: torch.Tensor, up_type: str, down: torch.Tensor, down_type: str, num_experts: int, f: int,
         activation: str) -> torch.Tensor:
    out = new_output(tuple(x.shape), x.dtype, x.device, "x")
    _C.moe_expert_ffn(x, weights, experts, gate, gate_type, up, up_type, down, down_type, num_experts, f, activation,
                      out)
    return out


@_ffn.register_fake
def _(x, weights, experts, gate, gate_type, up, up_type, down, down_type, num_experts, f, activation):
    check_same_device(x=x, weights=weights, experts=experts, gate=gate, up=up, down=down)
    return torch.empty_like(x)


def _activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def _ffn_composed(x, weights, experts, gate, up, down, activation):
    """The feed-forward as expert matmuls and torch ops (autograd, CUDA): every (token, expert) pair a row."""
    t, k = experts.shape
    flat = experts.reshape(-1)
    rows = x.repeat_interleave(k, dim=0)
    h = _activate(_matmul(rows, flat, *gate), activation) * _matmul(rows, flat, *up)
    y = _matmul(h, flat, *down)
    out = (y.float().reshape(t, k, -1) * weights.unsqueeze(-1)).sum(1)
    return out.to(x.dtype)


def expert_ffn(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate, up, down,
               activation: str = "silu") -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t), e = experts[t, j].

    x [T, D] (float32 or bfloat16; float16 too on CUDA); weights [T, k] and experts [T, k] as route returns them;
    gate, up [E, F, D] and down [E, D, F], each a float tensor or GGUFExperts; activation "silu" or "gelu_tanh"
    (tanh-approximated GELU). The output has x's dtype. Without autograd on the CPU one native call: three grouped
    GEMMs, the intermediate in float32. With autograd (or on CUDA) expert_matmul calls and torch ops."""
    activation = as_str(activation, "activation")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    check_tensor(x, "x", 2, "[T, D]")
    check_device(x, "x")
    _check_float(x, "x")
    g, u, d = expert_weight(gate, "gate"), expert_weight(up, "up"), expert_weight(down, "down")
    e, f, dim = g[2], g[3], x.shape[1]
    if g[4] != dim:
        raise ValueError(f"gate: expected [E, F, {dim}] (D = x's last dimension), got [{e}, {f}, {g[4]}]")
    if u[2:] != (e, f, dim):
        raise ValueError(f"up: expected [{e}, {f}, {dim}] as gate is, got {list(u[2:])}")
    if d[2:] != (e, dim, f):
        raise ValueError(f"down: expected [{e}, {dim}, {f}], got {list(d[2:])}")
    check_tensor(experts, "experts", 2, "[T, k]")
    check_tensor(weights, "weights", 2, "[T, k]")
    if experts.shape[0] != x.shape[0] or experts.shape[1] < 1:
        raise ValueError(f"experts: expected [{x.shape[0]}, k >= 1] (one row per token of x), got {list(experts.shape)}")
    if weights.shape != experts.shape:
        raise ValueError(f"weights: expected {list(experts.shape)} as experts, got {list(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights: expected a float tensor, got {weights.dtype}")
    check_same_device(x=x, weights=weights, experts=experts, gate=g[0], up=u[0], down=d[0])
    experts = _check_experts(experts, "experts", 2, e)
    x = contiguous(x, "x")
    parts = [(contiguous(w[0], name), w[1], w[2], w[3], w[4]) for w, name in ((g, "gate"), (u, "up"), (d, "down"))]
    grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weights, parts[0][0], parts[1][0], parts[2][0]))
    if grad or x.is_cuda:
        return _ffn_composed(x, weights.float(), experts, *parts, activation)
    return _ffn(x, weights.float().contiguous(), experts, parts[0][0], parts[0][1], parts[1][0], parts[1][1],
                parts[2][0], parts[2][1], e, f, activation)


__all__ = ["ACTIVATIONS", "GGUF_LINEAR_TYPES", "expert_ffn", "expert_matmul", "expert_weight", "is_gguf_experts",
           "route"]
