"""The attention kernels (flashlm._C.flash_attention_forward/backward) on every device against the float64
reference (reference.py): on the CPU each ISA it has (scalar, AVX2/FMA, and the AVX2 kernels' AVX-512 build where the CPU
has AVX-512F) on the same inputs, on CUDA f16 and
bf16 (skipped without a GPU). Every sequence of a batch is checked on its own.

Tolerance (flash-attn's rule, compare.py): the error against float64 may be at most twice that of a torch
baseline, plus a floor. The baseline is the same math in the input dtype on the CPU (floors per dtype), and
float32 math with the probabilities rounded to the input dtype on CUDA, as its kernels keep them (floors 1e-3
forward, 2e-3 backward). The AVX2 kernels' exp2/tanh approximations are checked on their own by compiling
tests/cpp/attention_exp_check.cpp.
"""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compare import FLOOR, assert_close, assert_close_to_reference, assert_equal
from conftest import per_device
from flashlm import _C
from reference import attention_with_grads, band_edges, visible

ROOT = Path(__file__).resolve().parent.parent
# "avx512": the AVX2 kernels' AVX-512 build (set_attention_avx512), which the AVX2 ISA uses where it can.
AVX512 = _C.cpu_isa_supported("avx2") and _C.cpu_features()["avx512f"]
CPU_ISAS = [isa for isa in ("avx512", "avx2", "scalar") if (AVX512 if isa == "avx512" else _C.cpu_isa_supported(isa))]

pytestmark = pytest.mark.usefixtures("restore_isa", "restore_avx512")  # every test may switch the ISA


@pytest.fixture
def restore_avx512():
    saved = _C.set_attention_avx512(True)
    yield
    _C.set_attention_avx512(saved)


# --- running the kernels ------------------------------------------------------------------------------------

def kernels(device):
    """The kernels of a device: the CPU's ISAs, or CUDA's one (None)."""
    return CPU_ISAS if device == "cpu" else [None]


def launch(isa, fn, *args, **kwargs):
    if isa is not None:
        _C.set_cpu_isa("avx2" if isa == "avx512" else isa)
        _C.set_attention_avx512(isa == "avx512")
    stream = torch.cuda.current_stream().cuda_stream if args[0].is_cuda else 0
    fn(*args, stream, **kwargs)


def run_forward(isa, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, version):
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)  # NaN: a row never written shows
    lse_shape = (q.shape[1], q.shape[0]) if cu_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, math.nan, device=q.device)
    launch(isa, _C.flash_attention_forward, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window[0],
           window[1], softcap, version)
    return out, lse


def run_backward(isa, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap):
    dq, dk, dv = (torch.full(x.shape, math.nan, dtype=x.dtype, device=x.device) for x in (q, k, v))
    delta = torch.full(lse.shape, math.nan, device=lse.device)
    launch(isa, _C.flash_attention_backward, dout, q, k, v, out, lse, dq, dk, dv, delta, cu_q, cu_k, max_q, max_k,
           scale, causal, window[0], window[1], softcap)
    return dq, dk, dv, delta


# --- what the kernels are held to ---------------------------------------------------------------------------

def floors(device, dtype):
    """(out, gradients, lse) floors of the 2x rule."""
    return (FLOOR[dtype], FLOOR[dtype], FLOOR[torch.float32]) if device == "cpu" else (1e-3, 2e-3, 1e-3)


def baseline(q, k, v, dout, **opts):
    """(out, lse, grads) of the low-precision torch computation each device's kernels are compared with."""
    if not q.is_cuda:
        return attention_with_grads(q, k, v, dout, **opts)
    out, lse, grads = attention_with_grads(q.float(), k.float(), v.float(), None if dout is None else dout.float(),
                                           p_dtype=q.dtype, **opts)
    return out.to(q.dtype), lse, None if grads is None else tuple(g.to(q.dtype) for g in grads)


def split(x, cu, b):
    """Sequence b of a padded [B, S, ...] (cu is None) or packed [T, ...] tensor."""
    return x[b] if cu is None else x[int(cu[b]):int(cu[b + 1])]


def split_lse(lse, cu, b):
    return lse[b] if cu is None else lse[:, int(cu[b]):int(cu[b + 1])]


def check_case(device, q, k, v, cu_q=None, cu_k=None, scale=None, causal=False, window=(-1, -1), softcap=0.0,
               grads=True, versions=(2, 1), seed=0, equal_nan=False):
    """Runs forward (each version) and backward on every kernel of the device and checks them against the
    reference, one sequence at a time; with equal_nan, NaN must be where the reference has it, and only there."""
    dtype = q.dtype
    packed = cu_q is not None
    batch = len(cu_q) - 1 if packed else q.shape[0]
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if packed and batch else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if packed and batch else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    floor_out, floor_grad, floor_lse = floors(device, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    opts = dict(scale=scale, causal=causal, window=window, softcap=softcap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref_out, ref_lse, ref_grads = attention_with_grads(q.double(), k.double(), v.double(),
                                                       dout.double() if grads else None, **opts)
    base_out, base_lse, base_grads = baseline(q, k, v, dout if grads else None, **opts)
    if device != "cpu":
        base_lse = ref_lse.float()  # CUDA's lse is float32 math: held to the reference's float32 rounding
    args = (cu_q, cu_k, max_q, max_k, scale, causal, window, softcap)
    for version in versions:
        results = {}
        for isa in kernels(device):
            out, lse = run_forward(isa, q, k, v, *args, version)
            results[isa] = (out, lse)
            what = f"({isa or device}, v{version})"
            for b in range(batch):
                assert_close_to_reference(split(out, cu_q, b), split(ref_out, cu_q, b), split(base_out, cu_q, b),
                                          floor_out, name=f"out[{b}] {what}", equal_nan=equal_nan)
                assert_close_to_reference(split_lse(lse, cu_q, b), split_lse(ref_lse, cu_q, b),
                                          split_lse(base_lse, cu_q, b), floor_lse, name=f"lse[{b}] {what}",
                                          equal_nan=equal_nan)
        same_bits_as_avx2(results, ("out", "lse"), f"v{version}")
    if not grads:
        return
    out, lse = run_forward("scalar" if device == "cpu" else None, q, k, v, *args, 2)
    results = {}
    for isa in kernels(device):
        res = run_backward(isa, dout, q, k, v, out, lse, *args)
        results[isa] = res
        if isa in ("avx2", "avx512"):  # the backward splits the keys over threads: a second run gives the same bits
            again = run_backward(isa, dout, q, k, v, out, lse, *args)
            for name, a, b_ in zip(("dq", "dk", "dv", "delta"), res, again):
                assert_equal(b_, a, name=f"{name}: second {isa} run vs first", nan_equal=True)  # NaN: no sequence
        for b in range(batch):
            for j, name in enumerate(("dq", "dk", "dv")):
                cu = cu_q if name == "dq" else cu_k
                assert_close_to_reference(split(res[j], cu, b), split(ref_grads[j], cu, b), split(base_grads[j], cu, b),
                                          floor_grad, name=f"{name}[{b}] ({isa or device})", equal_nan=equal_nan)
        check_delta(device, res[3], dout, out, cu_q, f"delta ({isa or device})", equal_nan)
    same_bits_as_avx2(results, ("dq", "dk", "dv", "delta"), "backward")


def same_bits_as_avx2(results, names, what):
    """The AVX-512 build runs each output's FMAs in the AVX2 kernel's order: it must give the same bits."""
    if "avx512" in results and "avx2" in results:
        for name, a, b in zip(names, results["avx512"], results["avx2"]):
            assert_equal(a, b, name=f"{name} ({what}): AVX-512 build vs AVX2", nan_equal=True)


def check_delta(device, delta, dout, out, cu_q, name, equal_nan=False):
    """delta = rowsum(dout * out), laid out as lse."""
    exact, low = ((dout.to(t) * out.to(t)).sum(-1) for t in (torch.float64, torch.float32))
    exact, low = (x.transpose(0, 1) if cu_q is not None else x.transpose(1, 2) for x in (exact, low))
    if cu_q is not None:  # rows outside every sequence are not written
        used = slice(int(cu_q[0]), int(cu_q[-1]))
        delta, exact, low = delta[:, used], exact[:, used], low[:, used]
    if device == "cpu":
        assert_close_to_reference(delta, exact, low, FLOOR[torch.float32], name=name, equal_nan=equal_nan)
    else:
        assert_close(delta, exact, atol=1e-3, rtol=1e-3, name=name, equal_nan=equal_nan)


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# --- cases --------------------------------------------------------------------------------------------------

# (dtype, batch, sq, sk, heads, kv_heads, head_dim, causal, window, softcap)
CPU_CASES = [(dtype, 2, sq, sk, h, hkv, d, causal, (-1, -1), 0.0)
             for sq, sk, h, hkv, d, causal in [
                 (1, 1, 1, 1, 1, False),
                 (2, 2, 2, 1, 8, True),
                 (17, 17, 4, 4, 32, False),
                 (128, 128, 8, 1, 64, True),     # GQA 8:1
                 (257, 257, 4, 2, 40, True),     # GQA 4:2, ragged tiles
                 (17, 128, 2, 2, 80, True),      # Sq < Sk, causal
                 (128, 17, 2, 1, 96, True),      # Sq > Sk: the first rows see no key
                 (257, 100, 2, 2, 128, False),
                 (33, 65, 2, 1, 256, True)]
             for dtype in (torch.float32, torch.bfloat16)]
# One long sequence where a window leaves many key blocks outside the band.
CPU_CASES += [(torch.float32, 1, s, s, 2, 2, 64, causal, window, softcap)
              for s, window, causal, softcap in [(300, (16, 3), False, 0.0), (1000, (40, -1), True, 0.0),
                                                 (300, (-1, 0), False, 0.0), (300, (-1, -1), True, 7.5),
                                                 (300, (20, 20), False, 2.0)]]
# Sq > Sk with a right window at least Sk wide but narrower than Sq - 1: the first rows still see only part of
# the keys (it once counted as no window).
CPU_CASES += [(dtype, 2, 40, 9, 2, 1, 32, False, (3, 12), 0.0) for dtype in (torch.float32, torch.bfloat16)]
CUDA_CASES = [(dtype, *case) for case in [
    (2, 128, 128, 4, 4, 128, False, (-1, -1), 0.0),
    (1, 257, 257, 2, 1, 64, True, (-1, -1), 0.0),
    (2, 17, 300, 4, 2, 96, True, (-1, -1), 0.0),
    (1, 300, 17, 2, 2, 128, True, (-1, -1), 0.0),
    (1, 1, 65, 8, 1, 256, False, (-1, -1), 0.0),
    (2, 190, 190, 2, 2, 40, False, (32, 7), 0.0),
    (1, 129, 129, 2, 2, 192, True, (-1, -1), 30.0),
    (1, 64, 64, 2, 2, 8, False, (-1, -1), 5.0),
    (1, 100, 100, 1, 1, 160, False, (0, 0), 0.0),
    (2, 90, 9, 2, 1, 64, False, (3, 12), 0.0),
] for dtype in (torch.float16, torch.bfloat16)]
CASES = per_device(cpu=CPU_CASES, cuda=CUDA_CASES)
CASE_ARGS = "device,dtype,batch,sq,sk,heads,kv_heads,d,causal,window,softcap"


def padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d):
    return (randn(batch, s, n, d, dtype=dtype, seed=i, device=device)
            for i, (s, n) in enumerate(((sq, heads), (sk, kv_heads), (sk, kv_heads))))


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_forward(device, dtype, batch, sq, sk, heads, kv_heads, d, causal, window, softcap, version):
    q, k, v = padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d)
    check_case(device, q, k, v, causal=causal, window=window, softcap=softcap, grads=False, versions=(version,))


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_backward(device, dtype, batch, sq, sk, heads, kv_heads, d, causal, window, softcap):
    q, k, v = padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d)
    check_case(device, q, k, v, causal=causal, window=window, softcap=softcap, versions=(), seed=sq * 1000 + d)


# Packed batches: a sequence with no queries and one with no keys; on the CPU rows outside every sequence at
# both ends; on CUDA head_dim 72 (run by the 96 kernel) in rows of 75, whose odd stride forces element-wise loads.
PACKED = {"cpu": dict(lens_q=[1, 0, 300, 5, 17], lens_k=[1, 300, 300, 0, 40], first=3, extra=2, heads=8, d=64,
                      row=64, scale=None, versions=(2, 1), grads=True),
          "cuda": dict(lens_q=[5, 0, 130, 64], lens_k=[7, 3, 130, 1], first=0, extra=0, heads=4, d=72, row=75,
                       scale=0.1, versions=(2,), grads=False)}


@pytest.mark.parametrize("device,dtype,causal,window", per_device(
    cpu=[(dtype, causal, window) for dtype in (torch.float32, torch.bfloat16)
         for causal, window in [(True, (-1, -1)), (False, (8, 8))]],
    cuda=[(dtype, True, (-1, -1)) for dtype in (torch.float16, torch.bfloat16)]))
def test_packed_batches_with_empty_sequences(device, dtype, causal, window):
    p = PACKED[device]
    cu_q = torch.tensor([p["first"]] + [p["first"] + sum(p["lens_q"][:i + 1]) for i in range(len(p["lens_q"]))],
                        dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + [sum(p["lens_k"][:i + 1]) for i in range(len(p["lens_k"]))], dtype=torch.int32,
                        device=device)
    q = randn(int(cu_q[-1]) + p["extra"], p["heads"], p["row"], dtype=dtype, seed=1, device=device)[..., :p["d"]]
    k, v = (randn(int(cu_k[-1]), 2, p["d"], dtype=dtype, seed=s, device=device) for s in (2, 3))
    check_case(device, q, k, v, cu_q=cu_q, cu_k=cu_k, scale=p["scale"], causal=causal, window=window,
               grads=p["grads"], versions=p["versions"])


def test_strided_inputs_from_packed_qkv():
    qkv = randn(2, 200, 3, 4, 48, seed=5)  # q, k, v are non-contiguous views
    check_case("cpu", qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    big = randn(1, 150, 6, 72, seed=6)[..., :40]  # head_dim 40 inside rows of 72
    check_case("cpu", big[:, :, :4], big[:, :, 4:5], big[:, :, 5:6], window=(10, -1))


def test_mqa_single_head_backward_chunks():
    # One (batch, K/V head) pair: the backward splits the keys into chunks and sums dQ partials.
    q, k, v = randn(1, 700, 4, 64, seed=7), randn(1, 700, 1, 64, seed=8), randn(1, 700, 1, 64, seed=9)
    check_case("cpu", q, k, v, causal=True, versions=(2,))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_fully_masked_rows(isa):
    q, k, v = randn(1, 50, 2, 16, seed=1), randn(1, 20, 2, 16, seed=2), randn(1, 20, 2, 16, seed=3)
    out, lse = run_forward(isa, q, k, v, None, None, 0, 0, 0.25, True, (-1, -1), 0.0, 2)
    assert torch.isinf(lse[:, :, :30]).all() and (lse[:, :, :30] > 0).all(), f"{isa}: lse of rows without keys"
    assert (out[:, :30] == 0).all(), f"{isa}: out of rows without keys, max {out[:, :30].abs().max():.3e}"
    dq, dk, dv, _ = run_backward(isa, torch.ones_like(q), q, k, v, out, lse, None, None, 0, 0, 0.25, True,
                                 (-1, -1), 0.0)
    assert (dq[:, :30] == 0).all(), f"{isa}: dq of rows without keys, max {dq[:, :30].abs().max():.3e}"


# --- NaN and inf ---------------------------------------------------------------------------------------------
# softmax(s) V propagates NaN, and so must the kernels (the rule is csrc/attention/shared_softmax.h's): out,
# lse and the gradients are NaN (or +-inf) exactly where the float64 reference's are, and held to the 2x rule
# elsewhere. What a query does not see (keys outside its causal band or window, another sequence's) never
# reaches it, whatever it holds.

# (dtype, batch, sq, sk, heads, kv_heads, head_dim, causal, window, softcap)
NONFINITE_CPU = [
    (torch.float32, 2, 130, 130, 4, 2, 40, True, (-1, -1), 0.0),  # GQA, ragged tiles, causal
    (torch.bfloat16, 2, 77, 150, 2, 1, 64, False, (16, 3), 0.0),  # keys hidden on both sides of a window
    (torch.float32, 2, 100, 100, 2, 2, 32, True, (-1, -1), 5.0),  # softcap: an inf score is capped
    (torch.float32, 2, 90, 40, 2, 1, 32, True, (-1, -1), 0.0),    # Sq > Sk: the first rows see no key
]
NONFINITE_CUDA = [
    (torch.float16, 2, 150, 150, 4, 2, 128, True, (-1, -1), 0.0),
    (torch.bfloat16, 1, 190, 190, 2, 2, 64, False, (32, 7), 0.0),
    (torch.float16, 1, 129, 129, 2, 2, 64, True, (-1, -1), 30.0),
    (torch.bfloat16, 2, 70, 200, 4, 1, 96, True, (-1, -1), 0.0),
]
VALUES = [math.nan, math.inf, -math.inf]


def placed(x, value, places):
    """A copy of x with `value` at each index of places."""
    x = x.clone()
    for index in places:
        x[index] = value
    return x


def spread(x, value, where):
    """Non-finite values in a padded [B, S, H, D] tensor: for q one element of a middle row, the whole last row
    of the last head (which sees every key) and an element of an early row; for k and v the same in a middle
    key, the next-to-last key (which most rows of a causal mask do not see) and the first key."""
    s = x.shape[1]
    rows = (s // 2, s - 1, 1) if where == "q" else (s // 2, s - 2, 0)
    return placed(x, value, [(0, rows[0], 0, 3), (x.shape[0] - 1, rows[1], -1, slice(None)), (0, rows[2], -1, 5)])


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize(CASE_ARGS, per_device(cpu=NONFINITE_CPU, cuda=NONFINITE_CUDA))
def test_nonfinite_forward(device, dtype, batch, sq, sk, heads, kv_heads, d, causal, window, softcap, where, value):
    qkv = dict(zip("qkv", padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d)))
    qkv[where] = spread(qkv[where], value, where)
    check_case(device, *qkv.values(), causal=causal, window=window, softcap=softcap, grads=False, equal_nan=True)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_infinite_scores(device, dtype, sign):
    # q has +-inf in dim 0 and every key a negative dim 0: every score of those rows is -inf (sign 1) or
    # +inf (sign -1). All -inf: out NaN (0 / 0), lse -inf; a +inf score: out NaN (inf - inf), lse +inf.
    q, k, v = padded_inputs(device, dtype, 2, 40, 40, 2, 2, 64)
    k = k.clone()
    k[..., 0] = -k[..., 0].abs() - 0.5
    q = placed(q, sign * math.inf, [(0, 0, 0, 0), (0, 17, 1, 0), (1, 39, 0, 0)])
    for causal, window in [(True, (-1, -1)), (False, (3, 0)), (False, (-1, -1))]:
        check_case(device, q, k, v, causal=causal, window=window, grads=False, equal_nan=True)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_nonfinite_packed(device, dtype, where):
    # Sequences of 40, 0 and 100 queries over 60, 10 and 100 keys, and 3 rows in none: NaN and inf in one
    # sequence reach none of the others, nor the rows outside every sequence. Placed as in
    # test_nonfinite_backward (q in a sequence's last row, k in its first key), so the gradients are checked too.
    cu_q = torch.tensor([0, 40, 40, 140], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 60, 70, 170], dtype=torch.int32, device=device)
    qkv = {"q": randn(143, 4, 64, dtype=dtype, seed=1, device=device)}
    qkv["k"], qkv["v"] = (randn(170, 2, 64, dtype=dtype, seed=s, device=device) for s in (2, 3))
    rows = {"q": [(39, 0, 3), (139, 3, slice(None))], "k": [(0, 0, slice(None)), (65, 1, 2), (70, 1, 7)],
            "v": [(59, 0, slice(None)), (65, 1, 2), (169, 1, 7)]}[where]
    qkv[where] = placed(placed(qkv[where], math.nan, rows[:1]), math.inf, rows[1:])
    check_case(device, *qkv.values(), cu_q=cu_q, cu_k=cu_k, causal=True, grads=device == "cpu",
               versions=(2, 1) if device == "cpu" else (2,), equal_nan=True)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize(CASE_ARGS, per_device(cpu=[c for c in NONFINITE_CPU if c[8] == (-1, -1) and c[2] <= c[3]],
                                               cuda=[c for c in NONFINITE_CUDA if c[8] == (-1, -1)]))
def test_nonfinite_backward(device, dtype, batch, sq, sk, heads, kv_heads, d, causal, window, softcap, where, value):
    # Places where autograd on the reference is free of 0 * NaN from what a query does not see: q in the last
    # rows (they see every key), k in the first key (every row sees it), v anywhere. There the gradients are
    # NaN exactly where the reference's are.
    qkv = dict(zip("qkv", padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d)))
    s = qkv[where].shape[1]
    places = {"q": [(0, s - 1, 0, 3), (batch - 1, s - 1, -1, slice(None))],
              "k": [(0, 0, 0, 3), (batch - 1, 0, -1, slice(None))],
              "v": [(0, s // 2, 0, 3), (batch - 1, s - 2, -1, slice(None)), (0, 0, -1, 5)]}[where]
    qkv[where] = placed(qkv[where], value, places)
    check_case(device, *qkv.values(), causal=causal, softcap=softcap, versions=(), seed=sq, equal_nan=True)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("device,dtype,window", per_device(cpu=[(torch.float32, (20, 5)), (torch.bfloat16, (-1, 0))],
                                                           cuda=[(torch.float16, (20, 5))]))
def test_nonfinite_backward_of_poisoned_rows(device, dtype, window, where):
    # Anywhere else autograd on the reference also gets NaN from 0 * NaN through what a query does not see;
    # the kernels never do, but a row the forward made NaN must give NaN gradients (dq, and dk and dv of the
    # keys it sees) wherever the reference's are.
    q, k, v = padded_inputs(device, dtype, 1, 150, 150, 2, 2, 64)
    qkv = dict(q=q, k=k, v=v)
    for value in VALUES:
        qkv[where] = spread(qkv[where], value, where)
        dout = randn(*q.shape, dtype=dtype, seed=4, device=device)
        opts = dict(scale=0.125, causal=False, window=window, softcap=0.0)
        ref_out, _, ref_grads = attention_with_grads(*(x.double() for x in qkv.values()), dout.double(), **opts)
        poisoned = torch.isnan(ref_out).any(-1)[0].cpu()  # [S, H]
        seen = visible(150, 150, False, window)  # [query, key]
        key_scope = torch.stack([(seen & poisoned[:, h, None]).any(0) for h in range(2)], dim=1)  # [S, H]
        args = (None, None, 0, 0, 0.125, False, window, 0.0)
        for isa in kernels(device):
            out, lse = run_forward(isa, *qkv.values(), *args, 2)
            for name, got, ref, scope in zip(("dq", "dk", "dv"), run_backward(isa, dout, *qkv.values(), out, lse, *args),
                                             ref_grads, (poisoned, key_scope, key_scope)):
                got_nan, ref_nan = torch.isnan(got[0]).cpu(), torch.isnan(ref[0]).cpu()
                missed = ref_nan & ~got_nan & scope[:, :, None]
                assert not missed.any(), (f"{name} ({isa or device}, {where} = {value}): finite at "
                                          f"{missed.nonzero()[0].tolist()} where the reference is NaN")
                assert not (got_nan & ~ref_nan).any(), f"{name} ({isa or device}, {where} = {value}): NaN beyond the reference's"


# A NaN key just outside a row's band (before its window, after its window or its causal diagonal) is seen by
# the row's neighbours and not by the row: it must reach exactly the rows that see it. Up to 6 of a case's
# edges, one NaN at a time, on every kernel and in both loop orders.
# (dtype, batch, sq, sk, heads, kv_heads, head_dim, causal, window)
EDGES_CPU = [
    (torch.float32, 2, 6, 2, 4, 4, 16, False, (1, 4)),     # Sq > Sk: a right window wider than the keys
    (torch.bfloat16, 1, 40, 9, 2, 1, 32, False, (3, 12)),
    (torch.float32, 1, 9, 40, 2, 2, 32, False, (5, 3)),    # Sq < Sk: both sides
    (torch.float32, 1, 70, 70, 2, 1, 64, True, (33, -1)),  # causal and a left window, across key blocks
    (torch.bfloat16, 2, 37, 45, 2, 2, 16, True, (-1, -1)),  # right of the causal diagonal
]
EDGES_CUDA = [
    (torch.float16, 2, 6, 2, 4, 4, 16, False, (1, 4)),
    (torch.bfloat16, 1, 90, 9, 2, 1, 64, False, (3, 12)),
    (torch.float16, 1, 70, 130, 2, 2, 64, True, (40, -1)),
    (torch.bfloat16, 1, 150, 150, 2, 2, 128, False, (64, 3)),
]


def some_edges(sq, sk, causal, window, count=6):
    edges = band_edges(sq, sk, causal, window)
    assert edges, "every case has keys outside some row's band"
    return edges[::max(1, len(edges) // count)]


@pytest.mark.parametrize("device,dtype,batch,sq,sk,heads,kv_heads,d,causal,window",
                         per_device(cpu=EDGES_CPU, cuda=EDGES_CUDA))
def test_nan_key_just_outside_the_band(device, dtype, batch, sq, sk, heads, kv_heads, d, causal, window):
    q, k, v = padded_inputs(device, dtype, batch, sq, sk, heads, kv_heads, d)
    for j in some_edges(sq, sk, causal, window):
        k_nan = placed(k, math.nan, [(batch - 1, j, kv_heads - 1, 1)])
        check_case(device, q, k_nan, v, causal=causal, window=window, grads=False, equal_nan=True)


@pytest.mark.parametrize("causal,window", [(False, (1, 6)), (True, (3, -1)), (False, (2, 0))])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_nan_key_just_outside_the_band_packed(device, dtype, causal, window):
    # Sequences of (queries, keys) (6, 2), (0, 5), (9, 3) and (14, 5), more queries than keys: a right window of
    # 6 is wider than every sequence's keys, yet the first rows of the last two do not reach their last keys.
    # The NaN also reaches no other sequence.
    lens = [(6, 2), (0, 5), (9, 3), (14, 5)]
    cu_q, cu_k = ([0] + [sum(n[i] for n in lens[:s + 1]) for s in range(len(lens))] for i in (0, 1))
    q = randn(cu_q[-1], 2, 32, dtype=dtype, seed=1, device=device)
    k, v = (randn(cu_k[-1], 1, 32, dtype=dtype, seed=seed, device=device) for seed in (2, 3))
    cu = [torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_q, cu_k)]
    for s, (sq, sk) in enumerate(lens):
        edges = band_edges(sq, sk, causal, window)
        for j in edges[:1] + edges[-1:]:
            k_nan = placed(k, math.nan, [(cu_k[s] + j, 0, 5)])
            check_case(device, q, k_nan, v, *cu, causal=causal, window=window, grads=False, equal_nan=True)


@pytest.mark.skipif("avx2" not in CPU_ISAS, reason="this CPU has no AVX2/FMA")
def test_exp2_and_tanh_accuracy(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "exp_check"
    subprocess.run([cxx, "-O2", "-mavx2", "-mfma", "-std=c++17", f"-I{ROOT / 'csrc/attention'}",
                    f"-I{ROOT / 'csrc/include'}", str(ROOT / "tests/cpp/attention_exp_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True)
    lines = dict(line.split(" ", 1) for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                               text=True).stdout.splitlines())
    exp_err = float(lines["exp2_max_rel"].split()[0])
    tanh_err = float(lines["tanh_max_abs"].split()[0])
    assert exp_err <= 1.2e-7, f"exp2: max relative error {lines['exp2_max_rel']} (1 ulp is 1.19e-7)"
    assert tanh_err <= 2.4e-7, f"tanh: max absolute error {lines['tanh_max_abs']}"
    assert lines["specials"] == "ok", "exp2 of 0, -inf, NaN or below -127, or tanh of +-inf or NaN, is not exact"


@pytest.mark.skipif(not AVX512, reason="this CPU has no AVX-512F")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", ["alibi", "dropout"])
def test_avx512_build_equals_avx2_with_alibi_and_dropout(dtype, extra):
    # check_case holds both builds to the same bits on the plain cases; ALiBi and dropout add their own steps
    # between the GEMMs (their values are checked against references in test_attention_alibi.py and
    # test_attention_dropout.py). GQA 4:2, head_dim 72 (a ymm column tile after the zmm ones), ragged tiles.
    q, k, v = (randn(2, s, n, 72, dtype=dtype, seed=i) for i, (s, n) in enumerate(((190, 4), (190, 2), (190, 2))))
    dout = randn(2, 190, 4, 72, dtype=dtype, seed=3)
    kw = (dict(alibi_slopes=torch.rand(2, 4, generator=torch.Generator().manual_seed(4)))
          if extra == "alibi" else dict(dropout_p=0.3, philox_seed=11, philox_offset=5))
    args = (None, None, 0, 0, 72 ** -0.5, True, -1, -1, 2.0 if extra == "alibi" else 0.0)
    results = {}
    for isa in ("avx512", "avx2"):
        out = torch.empty_like(q)
        lse = torch.empty(2, 4, 190)
        launch(isa, _C.flash_attention_forward, q, k, v, out, lse, *args, 2, **kw)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        delta = torch.empty_like(lse)
        launch(isa, _C.flash_attention_backward, dout, q, k, v, out, lse, dq, dk, dv, delta, *args, **kw)
        results[isa] = (out, lse, dq, dk, dv, delta)
    assert results["avx512"][0].abs().max() > 0, "the forward wrote nothing"
    same_bits_as_avx2(results, ("out", "lse", "dq", "dk", "dv", "delta"), extra)
