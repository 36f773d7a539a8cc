"""The input gradient through frozen quantized weights, dx = dy @ W (flashlm.ops.backward_input), against
float64 references, and the autograd of GGUFLinear / Int4Linear / Int8Linear built on it.

W is decoded independently: GGML blocks (fresh random blocks, flashlm.io.random_blocks) by gguf-py's
`gguf.quants.dequantize`; int8 as q * s and int4 as (u - z) * s in float64 from the packed bytes here. The
kernels decode each weight exactly (the GGML decoders are bit-exact with ggml; the int decoders round (u - z)
and the product with s once each) and sum the N products in float32, so the bound is rigorous:
|dx - ref| <= (N + 4) u (|dy| @ |W|), u = 2^-24; a bf16 dx adds its rounding, 2^-8 |ref|. A wrong nibble, scale
or column moves an element by O(1) of |dy| @ |W|.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQT
from torch import nn

from compare import assert_close, assert_equal
from conftest import devices, per_kernel, use_isa
from flashlm import _C, ops
from flashlm.io.random_blocks import random_blocks
from flashlm.quant import GGUFLinear
from flashlm.quant.linear import Int4Linear, Int8Linear

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
SUPER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")  # 256-element blocks
N = 37  # awkward: not a multiple of the 4-row groups
U = 2.0**-24
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = pytest.mark.usefixtures("restore_isa")


def k_for(ggml_type, blocks=2):
    return 256 * blocks if ggml_type in SUPER else 32 * (2 * blocks + 1)


def gguf_weight(ggml_type, n, k, seed=0):
    """(raw uint8 [n, row bytes], W float64 [n, k] decoded by gguf-py)."""
    raw = random_blocks(ggml_type, n * k, seed)
    w = gguf.quants.dequantize(raw.reshape(n, -1), GQT[ggml_type]).astype(np.float64).reshape(n, k)
    return torch.from_numpy(raw.reshape(n, -1)), torch.from_numpy(w)


def check_dx(dx, dy, w):
    """The module docstring's bound; dy as the kernel saw it."""
    dy, w = dy.double().reshape(-1, w.shape[0]), w.double()
    ref = dy @ w
    bound = (w.shape[0] + 4) * U * (dy.abs() @ w.abs())
    if dx.dtype != torch.float32:
        bound = bound + 2.0**-8 * ref.abs()
    assert_close(dx.double().reshape(ref.shape), ref, atol=bound, name="dx")


@pytest.mark.parametrize("device,isa,dtype,m", per_kernel(
    cpu=[(torch.float32, m) for m in (1, 3, 64)] + [(torch.bfloat16, m) for m in (1, 3, 64)],
    cuda=[(d, m) for d in CUDA_DTYPES for m in (1, 3, 64)]))
@pytest.mark.parametrize("ggml_type", TYPES)
def test_gguf_matches_float64(ggml_type, device, isa, dtype, m):
    use_isa(isa)
    k = k_for(ggml_type)
    raw, w = gguf_weight(ggml_type, N, k, seed=m)
    dy = torch.randn(m, N, generator=torch.Generator().manual_seed(m)).to(dtype)
    dx = ops.gguf_linear_backward_input(dy.to(device), raw.to(device), ggml_type, (N, k))
    assert dx.dtype == dtype and dx.shape == (m, k)
    check_dx(dx.cpu(), dy, w)


@pytest.mark.parametrize("device,isa,m,n,k", per_kernel(
    cpu=[(1, 300, 4096), (2, 129, 12288), (64, 70, 2048), (5, 1, 1024)], cuda=[(1, 300, 4096), (64, 70, 2048)]))
@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_shapes_that_tile_and_split(ggml_type, device, isa, m, n, k):
    """Several column tiles per thread (M = 2 on the fused AVX2 path: 2,048 columns a tile), all threads busy, a
    single weight row."""
    use_isa(isa)
    raw, w = gguf_weight(ggml_type, n, k, seed=n)
    dy = torch.randn(2, m, n)  # leading dimensions are flattened
    dx = ops.gguf_linear_backward_input(dy.to(device), raw.to(device), ggml_type, (n, k))
    assert dx.shape == (2, m, k)
    check_dx(dx.cpu(), dy, w)


@pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")
# 1 and 2: the fused kernels for the common types; 7: decode and add; 9: the GEMM over decoded panels
@pytest.mark.parametrize("m", [1, 2, 7, 9])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_avx2_matches_scalar(ggml_type, m):
    k = k_for(ggml_type, 3)
    raw, w = gguf_weight(ggml_type, N, k, seed=5)
    dy = torch.randn(m, N)
    out = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        out[isa] = ops.gguf_linear_backward_input(dy, raw, ggml_type, (N, k)).double()
    bound = 2 * (N + 4) * U * (dy.double().abs() @ w.abs())
    assert_close(out["avx2"], out["scalar"], atol=bound, name=f"{ggml_type}: avx2 vs scalar")


def test_gguf_no_rows_gives_zeros():
    dx = ops.gguf_linear_backward_input(torch.randn(3, 0), torch.zeros(0, dtype=torch.uint8), "Q4_0", (0, 64))
    assert_equal(dx, torch.zeros(3, 64))


# --- int8 and int4 ------------------------------------------------------------------------------------------

def int8_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.1
    return w, s, w.double() * s.double()[:, None]


def int4_weight(n, k, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.1
    zeros = None if symmetric else torch.rand(n, k // group, generator=g) * 15
    # Byte j of a group: element j (low nibble) and element j + group / 2 (high nibble).
    b = packed.reshape(n, k // group, group // 2).long()
    u = torch.cat([b & 15, b >> 4], dim=-1).double()
    z = 8.0 if symmetric else zeros.double()[..., None]
    w = ((u - z) * scales.double()[..., None]).reshape(n, k)
    return packed, scales, zeros, w


@pytest.mark.parametrize("device,isa,dtype,m", per_kernel(
    cpu=[(torch.float32, m) for m in (1, 2, 3, 64)] + [(torch.bfloat16, m) for m in (3, 64)],
    cuda=[(d, m) for d in CUDA_DTYPES for m in (1, 3, 64)]))
@pytest.mark.parametrize("k", [96, 100, 1030, 320])  # blocks of 32 columns, of 4, of 2, of 64
def test_int8_matches_float64(k, device, isa, dtype, m):
    use_isa(isa)
    w, s, ref_w = int8_weight(N, k, seed=k)
    dy = torch.randn(m, N).to(dtype)
    dx = ops.int8_linear_backward_input(dy.to(device), w.to(device), s.to(device))
    assert dx.dtype == dtype
    check_dx(dx.cpu(), dy, ref_w)


@pytest.mark.parametrize("device,isa,dtype,m", per_kernel(
    cpu=[(torch.float32, m) for m in (1, 2, 3, 64)] + [(torch.bfloat16, 3)],
    cuda=[(d, m) for d in CUDA_DTYPES for m in (1, 3, 64)]))
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True), (128, False)])
def test_int4_matches_float64(group, symmetric, device, isa, dtype, m):
    use_isa(isa)
    k = 3 * group
    packed, scales, zeros, ref_w = int4_weight(N, k, group, symmetric, seed=group)
    dy = torch.randn(m, N).to(dtype)
    to = (lambda t: None if t is None else t.to(device))
    dx = ops.int4_linear_backward_input(dy.to(device), to(packed), to(scales), to(zeros), group)
    assert dx.dtype == dtype
    check_dx(dx.cpu(), dy, ref_w)


AVX512 = _C.cpu_isa_supported("avx2") and _C.cpu_features()["avx512f"] and _C.cpu_features()["avx512bw"]


@pytest.fixture
def restore_avx512():
    saved = _C.set_backward_input_avx512(True)
    yield
    _C.set_backward_input_avx512(saved)


def fused_cases():
    """(kind, k, m) for the few-rows kernels: every kind they read (int8 with K a multiple of 64, and one that
    the AVX2 kernel takes), int4 in every group size, with and without zeros; Q4_0 and Q8_0 also with more
    blocks than the 16 whose scales are read together, and a remainder."""
    gguf = [(t, k_for(t, 3), m) for t in ("Q4_0", "Q8_0", "Q4_K", "Q6_K") for m in (1, 2)]
    gguf += [(t, 32 * 37, m) for t in ("Q4_0", "Q8_0") for m in (1, 2)]
    ints = [(kind, k, m) for kind, k in [("int8", 320), ("int8", 96), ("int4/32", 96), ("int4/64", 192),
                                         ("int4z/128", 384)] for m in (1, 2)]
    return gguf + ints


def weight_and_run(kind, n, k, dy):
    """(W float64 [n, k], a function computing dy @ W natively) for kind: a GGML type, "int8", "int4/G"
    (symmetric, group G) or "int4z/G" (with zeros)."""
    if kind == "int8":
        w, s, ref_w = int8_weight(n, k, seed=k)
        return ref_w, lambda: ops.int8_linear_backward_input(dy, w, s)
    if kind.startswith("int4"):
        group = int(kind.split("/")[1])
        packed, scales, zeros, ref_w = int4_weight(n, k, group, not kind.startswith("int4z"), seed=group)
        return ref_w, lambda: ops.int4_linear_backward_input(dy, packed, scales, zeros, group)
    raw, ref_w = gguf_weight(kind, n, k, seed=6)
    return ref_w, lambda: ops.gguf_linear_backward_input(dy, raw, kind, (n, k))


def check_same_bits(switch, kind, n, k, m):
    """dy @ W on the AVX2 ISA with a kernel switch (_C.set_backward_input_*) off, then on: within the float64
    bound, and the same bits."""
    ops.set_cpu_isa("avx2")
    dy = torch.randn(m, n)
    ref_w, run = weight_and_run(kind, n, k, dy)
    switch(False)
    off = run()
    switch(True)
    on = run()
    check_dx(on, dy, ref_w)
    assert_equal(on, off)


@pytest.mark.skipif(not AVX512, reason="no AVX-512F and BW")
@pytest.mark.usefixtures("restore_avx512")
@pytest.mark.parametrize("kind,k,m", fused_cases())
@pytest.mark.parametrize("n", [N, 3])  # row groups of 4 and a remainder; fewer rows than the prefetch distance
def test_avx512_matches_avx2_bits(kind, k, m, n):
    """The AVX-512 build of the few-rows kernels adds the same products in the same order as the AVX2 one."""
    check_same_bits(_C.set_backward_input_avx512, kind, n, k, m)



# --- autograd through the layers -------------------------------------------------------------------------------

def dequantized(layer):
    """The float64 weight [N, K] a quantized layer holds, decoded independently of its kernels."""
    if isinstance(layer, GGUFLinear):
        raw = layer.raw.cpu().numpy()
        return torch.from_numpy(gguf.quants.dequantize(raw, GQT[layer.ggml_type]).astype(np.float64))
    if isinstance(layer, Int8Linear):
        return layer.weight.double() * layer.weight_scales.double()[:, None]
    n, k, group = layer.out_features, layer.in_features, layer.group_size
    b = layer.weight.reshape(n, k // group, group // 2).long()
    u = torch.cat([b & 15, b >> 4], dim=-1).double()
    z = 8.0 if layer.zeros is None else layer.zeros.double()[..., None]
    return ((u - z) * layer.scales.double()[..., None]).reshape(n, k)


class Tiny(nn.Module):
    """x -> L1 -> silu -> L2 -> L3, one layer of each kind (K a multiple of every block size)."""

    def __init__(self, kinds):
        super().__init__()
        torch.manual_seed(0)
        dims = [256, 512, 256, 96]
        layers = []
        for (kind, arg), k, n in zip(kinds, dims, dims[1:]):
            lin = nn.Linear(k, n)
            layers.append(GGUFLinear.from_float(lin, arg) if kind == "gguf" else
                          Int4Linear.from_float(lin, 64, symmetric=arg) if kind == "int4" else Int8Linear.from_float(lin))
        self.l1, self.l2, self.l3 = layers

    def forward(self, x):
        self.h = self.l1(x)
        return self.l3(self.l2(torch.nn.functional.silu(self.h)))


MODELS = [(("gguf", "Q4_K"), ("gguf", "Q8_0"), ("gguf", "Q6_K")),
          (("gguf", "Q5_0"), ("int4", False), ("int8", None)),
          (("int4", True), ("int8", None), ("gguf", "Q4_0"))]


@pytest.mark.parametrize("kinds", MODELS, ids=lambda k: "-".join(str(a) for kind in k for a in kind))
def test_loss_backward_gives_the_float64_input_gradient(kinds):
    model = Tiny(kinds)
    x = torch.randn(2, 5, 256, requires_grad=True)
    target = torch.randn(2, 5, 96)
    loss = (model(x) * target).sum()
    loss.backward()
    # float64: dx = ((target @ W3) @ W2 * silu'(h)) @ W1 at the h the forward computed.
    w1, w2, w3 = (dequantized(layer) for layer in (model.l1, model.l2, model.l3))
    h = model.h.detach().double()
    sig = torch.sigmoid(h)
    g_h = (target.double() @ w3 @ w2) * (sig * (1 + h * (1 - sig)))
    ref = g_h @ w1
    # Each of the three float32 sums has the bound of check_dx, relative to the sum of magnitudes.
    mag = ((target.double().abs() @ w3.abs() @ w2.abs()) * (sig * (1 + h * (1 - sig))).abs()) @ w1.abs()
    assert_close(x.grad.double(), ref, atol=3 * (512 + 4) * U * mag + 1e-6 * mag, name="x.grad")
    assert all(p.grad is None for p in model.parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_checkpointing_gives_the_same_gradient():
    model = Tiny(MODELS[1])
    x = torch.randn(3, 256)
    grads = []
    for wrap in (lambda f, x: f(x), lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)):
        xi = x.clone().requires_grad_()
        wrap(model, xi).square().sum().backward()
        grads.append(xi.grad)
    assert_equal(grads[1], grads[0])


@pytest.mark.parametrize("kind", [("gguf", "Q4_K"), ("int4", True), ("int8", None)])
def test_saves_no_activation_for_backward(kind):
    layer = Tiny((kind, ("gguf", "Q8_0"), ("gguf", "Q8_0"))).l1
    buffers = {b.data_ptr() for b in layer.buffers() if b is not None}
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert saved and all(t.data_ptr() in buffers for t in saved), [tuple(t.shape) for t in saved]


def test_bias_gradient():
    layer = GGUFLinear.from_float(nn.Linear(64, 8), "Q8_0")
    layer.bias.requires_grad_()
    x = torch.randn(2, 3, 64)
    g = torch.randn(2, 3, 8)
    layer(x).backward(g)
    assert_close(layer.bias.grad, g.double().sum((0, 1)), atol=1e-5, name="bias.grad")


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    raw, _ = gguf_weight("Q4_K", 6, 256)
    raw = raw.to(device)
    dtype = torch.float32
    x = torch.randn(2, 256, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.flashlm.gguf_linear.default, (x, raw, "Q4_K", 6, None))
    torch.library.opcheck(torch.ops.flashlm.gguf_linear_backward_input.default,
                          (torch.randn(2, 6, device=device), raw, "Q4_K", 256))
    w, s, _ = int8_weight(6, 64, 0)
    x8 = torch.randn(3, 64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.flashlm.int8_linear.default, (x8, w.to(device), s.to(device), None))
    torch.library.opcheck(torch.ops.flashlm.int8_linear_backward_input.default,
                          (torch.randn(3, 6, device=device), w.to(device), s.to(device)))
    packed, scales, zeros, _ = int4_weight(6, 64, 32, False, 0)
    x4 = torch.randn(3, 64, device=device, dtype=torch.float32 if device == "cpu" else torch.float16,
                     requires_grad=True)
    args = (packed.to(device), scales.to(device), zeros.to(device))
    torch.library.opcheck(torch.ops.flashlm.int4_gemm.default, (x4, *args, None, 32))
    torch.library.opcheck(torch.ops.flashlm.int4_linear_backward_input.default,
                          (torch.randn(3, 6, device=device, dtype=x4.dtype), *args, 32))


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_arguments():
    raw, _ = gguf_weight("Q4_0", 4, 64)
    dy = torch.randn(2, 4)
    with pytest.raises(ValueError, match="ggml_type"):
        ops.gguf_linear_backward_input(dy, raw, "Q9_9", (4, 64))
    with pytest.raises(ValueError, match="ggml_type"):
        ops.gguf_linear_backward_input(dy, raw, "F32", (4, 64))
    with pytest.raises(ValueError, match="^dy"):
        ops.gguf_linear_backward_input(torch.randn(2, 5), raw, "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="^dy"):
        ops.gguf_linear_backward_input(dy.half(), raw, "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="^raw"):
        ops.gguf_linear_backward_input(dy, raw[:3], "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="^shape"):
        ops.gguf_linear_backward_input(dy, raw, "Q4_0", (4, 60))
    with pytest.raises(ValueError, match="^shape"):
        ops.gguf_linear_backward_input(dy, raw, "Q4_0", 4)
    w, s, _ = int8_weight(4, 64, 0)
    with pytest.raises(ValueError, match="^w_scales"):
        ops.int8_linear_backward_input(dy, w, s[:3])
    with pytest.raises(ValueError, match="^w_int8"):
        ops.int8_linear_backward_input(dy, w.float(), s)
    with pytest.raises(ValueError, match="^dy"):
        ops.int8_linear_backward_input(torch.randn(2, 3), w, s)
    packed, scales, zeros, _ = int4_weight(4, 64, 32, False, 0)
    with pytest.raises(ValueError, match="^group_size"):
        ops.int4_linear_backward_input(dy, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="^zeros"):
        ops.int4_linear_backward_input(dy, packed, scales, zeros[:, :1], 32)
    with pytest.raises(ValueError, match="^scales"):
        ops.int4_linear_backward_input(dy, packed, scales, None, 64)


def test_native_checks_name_the_argument():
    """The library's own checks, for C++ callers and anything the wrappers let through."""
    raw, _ = gguf_weight("Q4_0", 4, 64)
    raw = raw.reshape(-1)
    dy = torch.randn(2, 4)
    with pytest.raises(ValueError, match="dx must have dy's 2 rows"):
        _C.gguf_linear_backward_input(dy, raw, "Q4_0", torch.empty(3, 64))
    with pytest.raises(ValueError, match="dx must have dy's dtype"):
        _C.gguf_linear_backward_input(dy, raw, "Q4_0", torch.empty(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight has .* bytes"):
        _C.gguf_linear_backward_input(dy, raw, "Q4_0", torch.empty(2, 96))
    with pytest.raises(ValueError, match="multiple of Q4_K's block size"):
        _C.gguf_linear_backward_input(dy, raw, "Q4_K", torch.empty(2, 64))
    with pytest.raises(ValueError, match="ggml_type"):
        _C.gguf_linear_backward_input(dy, raw, "F16", torch.empty(2, 64))
    w, s, _ = int8_weight(4, 64, 0)
    with pytest.raises(ValueError, match="w must be \\[4, 64\\]"):
        _C.int8_linear_backward_input(dy, w[:, :32].contiguous(), s, torch.empty(2, 64))
    packed, scales, _, _ = int4_weight(4, 64, 32, True, 0)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        _C.int4_linear_backward_input(dy, packed, scales, None, 16, torch.empty(2, 64))
    with pytest.raises(ValueError, match="scales must be"):
        _C.int4_linear_backward_input(dy, packed, scales, None, 64, torch.empty(2, 64))


@pytest.fixture
def restore_gemm():
    saved = _C.set_backward_input_gemm(True)
    yield
    _C.set_backward_input_gemm(saved)


# (kind, K): every storage form the GEMM decodes, with columns that end a panel inside a vector (int8 blocks of
# 4 and 2 columns: K = 100, 1030) and several tiles of 256 columns (Q4_0 K = 1184, Q4_K K = 768).
GEMM_CASES = [("Q4_0", 32 * 37), ("Q8_0", 96), ("Q5_1", 160), ("Q4_K", 768), ("Q6_K", 512), ("Q2_K", 256),
              ("IQ4_XS", 256), ("int8", 320), ("int8", 100), ("int8", 1030), ("int4/32", 96), ("int4z/128", 384)]


@pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="no AVX2")
@pytest.mark.usefixtures("restore_avx512", "restore_gemm")
@pytest.mark.parametrize("kind,k", GEMM_CASES)
# M: the fewest rows the GEMM takes, remainders of a 6-row strip; N: part of a 128-row panel, several panels and
# a partial one.
@pytest.mark.parametrize("m,n", [(8, N), (13, 300), (70, 129)])
@pytest.mark.parametrize("avx512", [False, True] if AVX512 else [False])
def test_gemm_matches_row_path_bits(kind, k, m, n, avx512):
    """M >= 8: the GEMM over decoded panels adds each element's N products in weight-row order with fused
    multiply-adds, as the row-by-row path does, so the two give the same bits (AVX2 and AVX-512 alike); both
    are within the float64 bound."""
    _C.set_backward_input_avx512(avx512)
    check_same_bits(_C.set_backward_input_gemm, kind, n, k, m)
