"""CUDA attention kernels (forward v1/v2, backward) against an independent float64 torch reference of the
contract in flash_attention.h. Needs a CUDA device; skipped elsewhere.

Tolerance (flash-attn's rule): the kernel's max error against float64 is at most twice that of a plain
low-precision torch implementation (inputs and P in the kernel's dtype, f32 softmax), plus a small floor."""

import math

import pytest
import torch

from flashlm import _C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or _C.cuda_device_count() == 0,
                                reason="needs a CUDA device")


def reference(q, k, v, scale, causal, window, softcap, compute_dtype, lowp=None):
    """q [Sq, H, D], k/v [Sk, Hkv, D] -> out [Sq, H, D], lse [H, Sq]. lowp: round q.k and P @ V inputs to it."""
    sq, h, _ = q.shape
    sk, hkv, _ = k.shape
    g = h // hkv
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None, :]
    wl, wr = window
    if causal:
        wr = 0
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if wl >= 0:
        visible &= j >= i - wl
    if wr >= 0:
        visible &= j <= i + wr
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no key
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])  # 0 for those rows
    if lowp is not None:
        p = p.to(lowp).to(compute_dtype)
    out = torch.einsum("hij,jhd->ihd", p, v)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    return out, lse


def run_forward(q, k, v, scale, causal, window, softcap, version, cu=None, max_q=0, max_k=0):
    out = torch.empty_like(q)
    if cu is None:
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    _C.flash_attention_forward(q, k, v, out, lse, cu[0] if cu else None, cu[1] if cu else None, max_q, max_k, scale,
                               causal, window[0], window[1], softcap, version, torch.cuda.current_stream().cuda_stream)
    return out, lse


def check(name, got, ref64, base, floor):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref64).abs()
    base_err = (base.double() - ref64).abs().max().item()
    worst = err.max().item()
    where = tuple(int(x) for x in (err == err.max()).nonzero()[0]) if worst > 0 else ()
    assert worst <= 2 * base_err + floor, f"{name}: max error {worst:.3e} at {where} (torch low-precision: {base_err:.3e})"


CASES = [
    # batch, sq, sk, heads, kv_heads, d, causal, window, softcap
    (2, 128, 128, 4, 4, 128, False, (-1, -1), 0.0),
    (1, 257, 257, 2, 1, 64, True, (-1, -1), 0.0),
    (2, 17, 300, 4, 2, 96, True, (-1, -1), 0.0),
    (1, 300, 17, 2, 2, 128, True, (-1, -1), 0.0),
    (1, 1, 65, 8, 1, 256, False, (-1, -1), 0.0),
    (2, 190, 190, 2, 2, 40, False, (32, 7), 0.0),
    (1, 129, 129, 2, 2, 192, True, (-1, -1), 30.0),
    (1, 64, 64, 2, 2, 8, False, (-1, -1), 5.0),
    (1, 100, 100, 1, 1, 160, False, (0, 0), 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, version, dtype):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(d)
    out, lse = run_forward(q, k, v, scale, causal, window, softcap, version)
    torch.cuda.synchronize()
    for i in range(b):
        ref, ref_lse = reference(q[i], k[i], v[i], scale, causal, window, softcap, torch.float64)
        base, _ = reference(q[i], k[i], v[i], scale, causal, window, softcap, torch.float32, lowp=dtype)
        check(f"out[{i}] {case} v{version} {dtype}", out[i], ref, base.to(dtype), 1e-3)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse[i]), ~finite), "lse must be +inf exactly for rows that see no key"
        check(f"lse[{i}]", lse[i][finite], ref_lse[finite], ref_lse[finite].float(), 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_and_strided(dtype):
    torch.manual_seed(1)
    lens_q, lens_k = [5, 0, 130, 64], [7, 3, 130, 1]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device="cuda")
    h, hkv, d = 4, 2, 72  # head_dim 72 runs on the 96 kernel; an odd row stride forces the element-wise loads
    q = torch.randn(sum(lens_q), h, d + 3, device="cuda", dtype=dtype)[..., :d]
    k = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=dtype)
    scale = 0.1
    out, lse = run_forward(q, k, v, scale, True, (-1, -1), 0.0, 2, (cu_q, cu_k), max(lens_q), max(lens_k))
    torch.cuda.synchronize()
    for i in range(len(lens_q)):
        a, e = int(cu_q[i]), int(cu_q[i + 1])
        ka, ke = int(cu_k[i]), int(cu_k[i + 1])
        if a == e:
            continue
        ref, ref_lse = reference(q[a:e], k[ka:ke], v[ka:ke], scale, True, (-1, -1), 0.0, torch.float64)
        base, _ = reference(q[a:e], k[ka:ke], v[ka:ke], scale, True, (-1, -1), 0.0, torch.float32, lowp=dtype)
        check(f"packed seq {i}", out[a:e], ref, base.to(dtype), 1e-3)
        assert torch.equal(torch.isinf(lse[:, a:e]), torch.isinf(ref_lse))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(case, dtype):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    torch.manual_seed(2)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(d)
    out, lse = run_forward(q, k, v, scale, causal, window, softcap, 2)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    _C.flash_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, delta, None, None, 0, 0, scale, causal,
                                window[0], window[1], softcap, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    for i in range(b):
        grads = {}
        for prec, lowp in ((torch.float64, None), (torch.float32, dtype)):
            qi, ki, vi = (x[i].to(prec).requires_grad_() for x in (q, k, v))
            o, _ = reference(qi, ki, vi, scale, causal, window, softcap, prec, lowp=lowp)
            grads[prec] = torch.autograd.grad(o, (qi, ki, vi), dout[i].to(prec))
        for name, got, ref, base in zip(("dq", "dk", "dv"), (dq[i], dk[i], dv[i]), grads[torch.float64],
                                        grads[torch.float32]):
            check(f"{name}[{i}] {case} {dtype}", got, ref, base.to(dtype), 2e-3)
        ref_delta = (dout[i].double() * out[i].double()).sum(-1).transpose(0, 1)
        assert torch.allclose(delta[i].double(), ref_delta, rtol=1e-3, atol=1e-3)
