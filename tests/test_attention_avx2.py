"""The AVX2/FMA attention kernels against the scalar kernels and a float64 torch reference (CPU only).

Each case runs the same inputs through both CPU paths (`_C.set_cpu_isa`). Tolerance (flash-attn's rule):
the error against the float64 reference may be at most twice the error of the same math done by torch in
the input dtype, plus a small floor. The exp2/tanh approximations are checked on their own by compiling
tests/cpp/attention_exp_check.cpp.
"""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashlm import _C

ROOT = Path(__file__).resolve().parent.parent
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}

pytestmark = [pytest.mark.skipif(not _C.cpu_isa_supported("avx2"), reason="this CPU has no AVX2/FMA"),
              pytest.mark.usefixtures("restore_isa")]  # conftest.py: every test may switch the ISA


# --- reference ----------------------------------------------------------------------------------------------

def attention_math(q, k, v, scale, causal, window, softcap):
    """One sequence, q [Sq, H, D], k/v [Sk, Hkv, D], in the tensors' dtype; returns out [Sq, H, D] and the
    logsumexp [H, Sq]."""
    sq, h, _ = q.shape
    sk, hkv, _ = k.shape
    k = k.repeat_interleave(h // hkv, 1)
    v = v.repeat_interleave(h // hkv, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, -math.inf)
    s32 = s.float() if s.dtype == torch.bfloat16 else s
    lse = torch.logsumexp(s32, -1)  # -inf for rows that see no key (the kernels write +inf)
    p = torch.nan_to_num(torch.softmax(s32, -1), 0.0).to(s.dtype)
    return torch.einsum("hij,jhd->ihd", p, v), lse.detach().masked_fill(torch.isinf(lse), math.inf)


def reference(seqs, dout_seqs, dtype, want_grads, **opts):
    """Per sequence: (out, dq, dk, dv, lse) in float64 and the same in `dtype` (the baseline)."""
    results = {}
    for name, work in (("ref", torch.float64), ("base", dtype)):
        outs = []
        for (q, k, v), dout in zip(seqs, dout_seqs):
            q, k, v = (x.detach().to(work).requires_grad_(want_grads) for x in (q, k, v))
            out, lse = attention_math(q, k, v, **opts)
            grads = (None, None, None)
            if want_grads and out.numel():
                grads = torch.autograd.grad(out, (q, k, v), dout.to(work), allow_unused=True)
            elif want_grads:
                grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
            outs.append((out.detach(), *grads, lse))
        results[name] = outs
    return results["ref"], results["base"]


def check_close(name, got, ref, base, dtype):
    """|got - ref| <= 2 |base - ref| + floor, elementwise maxima; the message names the worst index."""
    got, ref, base = got.double(), ref.double(), base.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    err = (got - ref).abs()
    assert not torch.isnan(err).any(), f"{name}: NaN at {tuple(torch.nonzero(torch.isnan(err))[0].tolist())}"
    tol = 2 * (base - ref).abs().max().item() + FLOOR[dtype]
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.max().item() <= tol, (f"{name}: max error {err.max().item():.3e} at {idx} (got {got[idx].item():.6g}, "
                                     f"ref {ref[idx].item():.6g}) > tolerance {tol:.3e}")


# --- running the kernels ------------------------------------------------------------------------------------

def run_forward(isa, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, version):
    _C.set_cpu_isa(isa)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse_shape = (q.shape[1], q.shape[0]) if cu_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, float("nan"))
    _C.flash_attention_forward(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window[0], window[1],
                               softcap, version)
    return out, lse


def run_backward(isa, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap):
    _C.set_cpu_isa(isa)
    dq, dk, dv = (torch.full(x.shape, float("nan"), dtype=x.dtype) for x in (q, k, v))
    delta = torch.full(lse.shape, float("nan"))
    _C.flash_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, delta, cu_q, cu_k, max_q, max_k, scale, causal,
                                window[0], window[1], softcap)
    return dq, dk, dv, delta


def split(x, cu, b):
    """Sequence b of a padded [B, S, ...] (cu is None) or packed [T, ...] tensor."""
    return x[b] if cu is None else x[int(cu[b]):int(cu[b + 1])]


def check_case(q, k, v, cu_q=None, cu_k=None, causal=False, window=(-1, -1), softcap=0.0, grads=True,
               versions=(2, 1), seed=0):
    """Runs forward (both versions) and backward on both ISAs and checks them against the reference."""
    dtype = q.dtype
    packed = cu_q is not None
    batch = len(cu_q) - 1 if packed else q.shape[0]
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if packed and batch else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if packed and batch else 0
    scale = 1.0 / math.sqrt(q.shape[-1])
    opts = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    seqs = [(split(q, cu_q, b), split(k, cu_k, b), split(v, cu_k, b)) for b in range(batch)]
    ref, base = reference(seqs, [split(dout, cu_q, b) for b in range(batch)], dtype, grads, **opts)
    args = (cu_q, cu_k, max_q, max_k, scale, causal, window, softcap)
    for version in versions:
        for isa in ("avx2", "scalar"):
            out, lse = run_forward(isa, q, k, v, *args, version)
            for b in range(batch):
                check_close(f"out[{b}] ({isa}, v{version})", split(out, cu_q, b), ref[b][0], base[b][0], dtype)
                lse_b = lse[..., int(cu_q[b]):int(cu_q[b + 1])] if packed else lse[b]
                inf_ref = torch.isinf(ref[b][4])
                assert torch.equal(torch.isposinf(lse_b), inf_ref), (
                    f"lse[{b}] ({isa}, v{version}): +inf at {torch.nonzero(torch.isinf(lse_b) != inf_ref)[0].tolist()}"
                    " where the reference differs")
                check_close(f"lse[{b}] ({isa}, v{version})", lse_b[~inf_ref], ref[b][4][~inf_ref],
                            base[b][4][~inf_ref], torch.float32)
    if not grads:
        return
    out, lse = run_forward("scalar", q, k, v, *args, 2)
    first = None
    for isa in ("avx2", "avx2", "scalar"):
        res = run_backward(isa, dout, q, k, v, out, lse, *args)
        if isa == "avx2" and first is not None:
            for name, a, b_ in zip(("dq", "dk", "dv", "delta"), first, res):
                same = (a == b_) | (torch.isnan(a) & torch.isnan(b_))  # NaN: rows outside every sequence
                assert same.all(), f"{name}: two AVX2 backward runs differ at {torch.nonzero(~same)[0].tolist()}"
        first = res if isa == "avx2" else first
        for b in range(batch):
            for j, name in enumerate(("dq", "dk", "dv")):
                got = split(res[j], cu_q if name == "dq" else cu_k, b)
                check_close(f"{name}[{b}] ({isa})", got, ref[b][j + 1], base[b][j + 1], dtype)
        delta_ref, delta_base = ((dout.to(t) * out.to(t)).sum(-1) for t in (torch.float64, torch.float32))
        delta_ref, delta_base = (x.transpose(0, 1) if packed else x.transpose(1, 2) for x in (delta_ref, delta_base))
        res_delta = res[3]
        if packed and batch:
            used = slice(int(cu_q[0]), int(cu_q[-1]))
            res_delta, delta_ref, delta_base = res_delta[:, used], delta_ref[:, used], delta_base[:, used]
        check_close(f"delta ({isa})", res_delta, delta_ref, delta_base, torch.float32)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- cases --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sq,sk,h,hkv,d,causal", [
    (1, 1, 1, 1, 1, False),
    (2, 2, 2, 1, 8, True),
    (17, 17, 4, 4, 32, False),
    (128, 128, 8, 1, 64, True),     # GQA 8:1
    (257, 257, 4, 2, 40, True),     # GQA 4:2, ragged tiles
    (17, 128, 2, 2, 80, True),      # Sq < Sk, causal
    (128, 17, 2, 1, 96, True),      # Sq > Sk: the first rows see no key
    (257, 100, 2, 2, 128, False),
    (33, 65, 2, 1, 256, True),
])
def test_padded_batches(dtype, sq, sk, h, hkv, d, causal):
    q, k, v = (randn(2, s, n, d, dtype=dtype, seed=i) for i, (s, n) in enumerate(((sq, h), (sk, hkv), (sk, hkv))))
    check_case(q, k, v, causal=causal, seed=sq * 1000 + d)


@pytest.mark.parametrize("window,causal,softcap", [((16, 3), False, 0.0), ((40, -1), True, 0.0),
                                                   ((-1, 0), False, 0.0), ((-1, -1), True, 7.5),
                                                   ((20, 20), False, 2.0)])
def test_windows_and_softcap(window, causal, softcap):
    s = 1000 if window == (40, -1) else 300  # one long sequence: many key blocks outside the band
    q, k, v = (randn(1, s, 2, 64, seed=i) for i in range(3))
    check_case(q, k, v, causal=causal, window=window, softcap=softcap, versions=(2, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_batches_with_empty_sequences(dtype):
    lens_q, lens_k = [1, 0, 300, 5, 17], [1, 300, 300, 0, 40]  # a sequence with no queries, one with no keys
    cu_q = torch.tensor([3] + [3 + sum(lens_q[:i + 1]) for i in range(len(lens_q))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(lens_k[:i + 1]) for i in range(len(lens_k))], dtype=torch.int32)
    q = randn(int(cu_q[-1]) + 2, 8, 64, dtype=dtype, seed=1)  # rows outside every sequence at both ends
    k, v = (randn(int(cu_k[-1]), 2, 64, dtype=dtype, seed=s) for s in (2, 3))
    check_case(q, k, v, cu_q=cu_q, cu_k=cu_k, causal=True)
    check_case(q, k, v, cu_q=cu_q, cu_k=cu_k, window=(8, 8))


def test_strided_inputs_from_packed_qkv():
    qkv = randn(2, 200, 3, 4, 48, seed=5)  # q, k, v are non-contiguous views
    check_case(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    big = randn(1, 150, 6, 72, seed=6)[..., :40]  # head_dim 40 inside rows of 72
    check_case(big[:, :, :4], big[:, :, 4:5], big[:, :, 5:6], window=(10, -1))


def test_mqa_single_head_backward_chunks():
    # One (batch, K/V head) pair: the backward splits the keys into chunks and sums dQ partials.
    q, k, v = randn(1, 700, 4, 64, seed=7), randn(1, 700, 1, 64, seed=8), randn(1, 700, 1, 64, seed=9)
    check_case(q, k, v, causal=True, versions=(2,))


def test_fully_masked_rows():
    q, k, v = randn(1, 50, 2, 16, seed=1), randn(1, 20, 2, 16, seed=2), randn(1, 20, 2, 16, seed=3)
    for isa in ("avx2", "scalar"):
        out, lse = run_forward(isa, q, k, v, None, None, 0, 0, 0.25, True, (-1, -1), 0.0, 2)
        assert torch.isinf(lse[:, :, :30]).all() and (lse[:, :, :30] > 0).all(), f"{isa}: lse of rows without keys"
        assert (out[:, :30] == 0).all(), f"{isa}: out of rows without keys, max {out[:, :30].abs().max():.3e}"
        dq, dk, dv, _ = run_backward(isa, torch.ones_like(q), q, k, v, out, lse, None, None, 0, 0, 0.25, True,
                                     (-1, -1), 0.0)
        assert (dq[:, :30] == 0).all(), f"{isa}: dq of rows without keys, max {dq[:, :30].abs().max():.3e}"


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
    assert lines["specials"] == "ok", "exp2 of 0, -inf or below -127 is not exact"
