"""Attention dropout (flash_attn_func and its variants with dropout_p > 0) against float64 references.

The mask is reconstructed from what flash-attn's tests read, S_dmask's sign pattern (return_attn_probs), and the
reference is softmax(s) * mask / (1 - p) @ V in float64 (reference.py), its gradients by autograd with the same
mask; the 2x rule of compare.py holds the kernels to it. The generator is checked on its own: Random123's
known-answer vectors (tests/cpp/philox_kat_test.cpp), an independent Python Philox4x32-10 for the mask, the kept
fraction within 5 standard errors of 1 - p, and each kernel's mask read back exactly from its output (q = 0 and
V = identity make out[i, j] = mask[i, j] / (Sk (1 - p))).
"""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compare import FLOOR, assert_close_to_reference, assert_equal
from conftest import per_kernel, use_isa
from flashlm.flash_attn_interface import (_get_block_size_n, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                          flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                          flash_attn_varlen_qkvpacked_func)
from flashlm.ops.attention import dropout_mask, flash_attn_backward, flash_attn_forward
from reference import attention_with_grads, visible

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("restore_isa")


# --- the generator ------------------------------------------------------------------------------------------

def test_philox_known_answers(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "philox_kat_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'attention'}",
                    str(ROOT / "tests" / "cpp" / "philox_kat_test.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Philox4x32-10 as Salmon et al. define it, in plain Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def test_python_philox_known_answer():
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("p,seed,offset", [(0.17, 12345, 0), (0.5, (1 << 62) + 7, 2**32 - 3), (0.9, 1, 40)])
def test_mask_is_the_documented_philox_draw(p, seed, offset):
    batch, heads, sq, sk = 2, 3, 5, 11
    mask = dropout_mask(batch, heads, sq, sk, p, seed, offset)
    keep_below = round((1 - p) * 2**32)
    want = torch.zeros(batch, heads, sq, sk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            sub = offset + b * heads + h
            for i in range(sq):
                for j in range(sk):
                    words = philox4x32_10((j // 4, i, sub & M32, sub >> 32), (seed & M32, seed >> 32))
                    want[b, h, i, j] = words[j % 4] < keep_below
    assert_equal(mask, want, name="dropout_mask vs Python Philox")


@pytest.mark.parametrize("p", [0.05, 0.17, 0.5, 0.83])
def test_kept_fraction(p):
    mask = dropout_mask(2, 4, 300, 257, p, 2024, 8)
    n = mask.numel()
    kept = mask.float().mean().item()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) <= 5 * se, f"kept {kept:.5f}, expected {1 - p} +- {5 * se:.5f} (5 standard errors)"
    # Rows, heads and batches draw different masks.
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1])
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0], mask[1])


# --- each kernel's mask, read back exactly ------------------------------------------------------------------

def mask_readback(q_len, k_len, heads, kv_heads, cu=None):
    """(q, k, v) with q = 0 and V = identity over the keys, so that out[.., i, h, j] = keep / (k_len (1 - p))."""
    d = 128
    assert k_len <= d
    eye = torch.eye(k_len, d)
    if cu is None:
        batch = 2
        q = torch.zeros(batch, q_len, heads, d)
        k = torch.randn(batch, k_len, kv_heads, d, generator=torch.Generator().manual_seed(3))
        v = eye[None, :, None].expand(batch, k_len, kv_heads, d).contiguous()
    else:
        q = torch.zeros(int(cu[-1]), heads, d)
        k = torch.randn(int(cu[-1]), kv_heads, d, generator=torch.Generator().manual_seed(3))
        v = torch.cat([eye[:int(cu[b + 1] - cu[b]), None].expand(-1, kv_heads, d) for b in range(len(cu) - 1)])
    return q, k, v


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_each_kernel_applies_the_documented_mask(device, isa, dtype, version):
    use_isa(isa)
    p, seed, offset = 0.3, 987654321, 12
    heads, kv_heads, sq, sk = 4, 2, 70, 100  # GQA; 70 rows: two v2 blocks and a partial one
    q, k, v = (t.to(device, dtype) for t in mask_readback(sq, sk, heads, kv_heads))
    out, _ = flash_attn_forward(q, k, v, None, None, 0, 0, 1.0, False, -1, -1, 0.0, version, None, p, seed, offset)
    got = out.float().cpu()[..., :sk].permute(0, 2, 1, 3) * (sk * (1 - p))  # [B, H, Sq, Sk]
    want = dropout_mask(2, heads, sq, sk, p, seed, offset)
    assert_equal(got.round() != 0, want, name=f"mask of the forward ({isa or device}, v{version})")


@pytest.mark.parametrize("device,isa", per_kernel(cpu=[()], cuda=[()]))
def test_packed_batches_draw_each_sequence_from_its_own_start(device, isa):
    use_isa(isa)
    p, seed = 0.4, 55
    cu = torch.tensor([0, 30, 30, 91, 128], dtype=torch.int32)
    q, k, v = mask_readback(None, 64, 2, 1, cu)
    q, k, v, cu_d = q.to(device), k.to(device), v.to(device), cu.to(device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    out, _ = flash_attn_forward(q.to(dtype), k.to(dtype), v.to(dtype), cu_d, cu_d, 61, 61, 1.0, False, -1, -1, 0.0,
                                2, None, p, seed, 0)
    want = dropout_mask(4, 2, 61, 61, p, seed, 0)
    for b in range(4):
        n = int(cu[b + 1] - cu[b])
        got = out.float().cpu()[int(cu[b]):int(cu[b + 1]), :, :n].permute(1, 0, 2) * (n * (1 - p))
        assert_equal(got.round() != 0, want[b, :, :n, :n], name=f"mask of sequence {b} ({isa or device})")


# --- outputs and gradients against float64 ------------------------------------------------------------------

def mask_from_s_dmask(s_dmask, sq, sk):
    """flash-attn's tests' reading of S_dmask: kept where the value is >= 0."""
    return s_dmask[:, :, :sq, :sk] >= 0


def check_with_reference(out, leaves, dout, q, k, v, keep, p, name, **opts):
    dtype = q.dtype
    ref_out, _, ref_grads = attention_with_grads(q.double(), k.double(), v.double(), dout.double(),
                                                 dropout=(keep, p), **opts)
    base_out, _, base_grads = attention_with_grads(q.float(), k.float(), v.float(), dout.float(), p_dtype=dtype,
                                                   dropout=(keep, p), **opts)
    base_out, base_grads = base_out.to(dtype), tuple(g.to(dtype) for g in base_grads)
    floor = FLOOR[dtype] if q.is_cpu else 2e-3
    assert_close_to_reference(out, ref_out, base_out, floor, name=f"out {name}", relative_floor=True)
    out.backward(dout)
    for g, leaf, ref, base in zip(("dq", "dk", "dv"), leaves, ref_grads, base_grads):
        assert_close_to_reference(leaf.grad, ref, base, floor, name=f"{g} {name}", relative_floor=True)


CASES = [  # (sq, sk, heads, kv_heads, d, causal, window, softcap)
    (67, 67, 2, 2, 32, False, (-1, -1), 0.0),
    (67, 130, 4, 2, 64, True, (-1, -1), 0.0),
    (130, 67, 4, 1, 40, True, (-1, -1), 0.0),
    (100, 100, 2, 2, 64, False, (20, 5), 0.0),
    (90, 70, 6, 3, 32, False, (-1, -1), 10.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-c{int(c[5])}-w{c[6][0]}-s{c[7]}")
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_padded(device, isa, dtype, version, case):
    use_isa(isa)
    sq, sk, heads, kv_heads, d, causal, window, softcap = case
    p = 0.17
    g = torch.Generator().manual_seed(sq + sk + d)
    q = torch.randn(2, sq, heads, d, generator=g).to(device, dtype)
    k = torch.randn(2, sk, kv_heads, d, generator=g).to(device, dtype)
    v = torch.randn(2, sk, kv_heads, d, generator=g).to(device, dtype)
    dout = torch.randn(q.shape, generator=g).to(device, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gen = torch.Generator(device).manual_seed(7)
    out, lse, s_dmask = flash_attn_func(*leaves, p, causal=causal, window_size=window, softcap=softcap,
                                        return_attn_probs=True, version=version, generator=gen)
    assert s_dmask.shape == (2, heads, (sq + 127) // 128 * 128, (sk + 127) // 128 * 128)
    keep = mask_from_s_dmask(s_dmask, sq, sk)
    # The sign pattern is the mask wherever P is not 0 (a 0 reads as kept, as in flash-attn).
    seen = visible(sq, sk, causal, window, device)
    assert bool((s_dmask[:, :, :sq, :sk] != 0).any())
    check_with_reference(out, leaves, dout, q, k, v, keep, p, f"({isa or device}, v{version})", causal=causal,
                         window=window, softcap=softcap)
    # Where the row sees the key the kept fraction is near 1 - p (a loose check; test_kept_fraction is exact).
    frac = keep.expand(2, heads, sq, sk)[:, :, seen].float().mean().item()
    assert abs(frac - (1 - p)) < 0.05


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                        cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_varlen(device, isa, dtype, causal):
    use_isa(isa)
    p = 0.3
    cu_q = torch.tensor([0, 37, 37, 101, 180], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 61, 101, 150], dtype=torch.int32)
    heads, kv_heads, d = 4, 2, 48
    g = torch.Generator().manual_seed(5)
    q = torch.randn(180, heads, d, generator=g).to(device, dtype)
    k = torch.randn(150, kv_heads, d, generator=g).to(device, dtype)
    v = torch.randn(150, kv_heads, d, generator=g).to(device, dtype)
    dout = torch.randn(q.shape, generator=g).to(device, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse, s_dmask = flash_attn_varlen_func(*leaves, cu_q.to(device), cu_k.to(device), 79, 50, p, causal=causal,
                                               return_attn_probs=True, generator=torch.Generator(device).manual_seed(1))
    assert s_dmask.shape == (4, heads, 128, 128)
    keep = mask_from_s_dmask(s_dmask, 79, 50)
    check_with_reference(out, leaves, dout, q, k, v, keep, p, f"({isa or device})", causal=causal,
                         cu_seqlens_q=cu_q.tolist(), cu_seqlens_k=cu_k.tolist())


def test_s_dmask_normalises_to_the_probabilities():
    """S_dmask's magnitudes, normalised as flash-attn's tests do (each key block of _get_block_size_n() keys
    times exp(m - lse), m the running max of the block maxima from the last block back), are softmax(s)."""
    g = torch.Generator().manual_seed(2)
    sq, sk, heads, d = 45, 150, 2, 32
    q, k, v = (torch.randn(1, n, heads, d, generator=g) for n in (sq, sk, sk))
    _, lse, s_dmask = flash_attn_func(q, k, v, 0.4, causal=True, return_attn_probs=True,
                                      generator=torch.Generator().manual_seed(0))
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(d)
    seen = visible(sq, sk, causal=True)
    s = s.masked_fill(~seen, -math.inf)
    n = _get_block_size_n()
    m = torch.stack([blk.amax(-1) for blk in s.split(n, -1)], -1).flip(-1).cummax(-1).values.flip(-1)
    scale = torch.exp(m - lse.double()[..., None])  # [B, H, Sq, blocks]
    attn = torch.cat([blk * scale[..., i:i + 1] for i, blk in enumerate(s_dmask[:, :, :sq, :sk].abs().double()
                                                                         .split(n, -1))], -1)
    want = torch.softmax(s, -1)
    err = (attn - want).abs().max().item()
    assert err < 1e-6, f"normalised S_dmask differs from softmax by {err}"


def test_packed_variants_and_the_raw_ops_agree():
    """qkvpacked / kvpacked / varlen packed variants give the functions' results for the same generator state, and
    the raw backward op with the forward's seed and offset gives autograd's gradients."""
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 40, 3, 2, 32, generator=g)
    dout = torch.randn(2, 40, 2, 32, generator=g)
    out = flash_attn_qkvpacked_func(qkv, 0.2, causal=True, generator=torch.Generator().manual_seed(3))
    again = flash_attn_func(*qkv.unbind(2), 0.2, causal=True, generator=torch.Generator().manual_seed(3))
    assert_equal(out, again, name="qkvpacked vs flash_attn_func")
    kv = qkv[:, :, 1:]
    assert_equal(flash_attn_kvpacked_func(qkv[:, :, 0], kv, 0.2, causal=True,
                                          generator=torch.Generator().manual_seed(3)), again, name="kvpacked")
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    flat = qkv.reshape(80, 3, 2, 32)
    varlen = flash_attn_varlen_qkvpacked_func(flat, cu, 40, 0.2, causal=True,
                                              generator=torch.Generator().manual_seed(3))
    # The CPU seed is drawn from the generator, so the same state gives the same seed: the same masks as padded.
    assert_equal(varlen.view(2, 40, 2, 32), again, name="varlen qkvpacked vs padded")
    assert_equal(flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, 40, 40, 0.2, causal=True,
                                                 generator=torch.Generator().manual_seed(3)).view(2, 40, 2, 32),
                 again, name="varlen kvpacked vs padded")
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    o, lse = flash_attn_forward(q, k, v, None, None, 0, 0, 32 ** -0.5, True, -1, -1, 0.0, 2, None, 0.2, 99, 4)
    o.backward(dout)
    raw = flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), o.detach(), lse, None, None, 0, 0, 32 ** -0.5,
                              True, -1, -1, 0.0, None, 0.2, 99, 4)
    for name, a, b in zip(("dq", "dk", "dv"), raw, (q.grad, k.grad, v.grad)):
        assert_equal(a, b, name=f"raw backward {name} vs autograd")


# --- the generator's state ----------------------------------------------------------------------------------

def run_once(q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, 0.25, **kw)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_same_seed_same_results_different_seeds_differ(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 33, 2, 32, generator=g).to(device, dtype) for _ in range(4))
    torch.manual_seed(123)
    first = run_once(q, k, v, dout)
    second = run_once(q, k, v, dout)  # the generator moved on: another mask
    torch.manual_seed(123)
    again = run_once(q, k, v, dout)
    torch.manual_seed(124)
    other = run_once(q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, again):
        assert_equal(b, a, name=f"{name} after torch.manual_seed(123) twice")
    assert not torch.equal(first[0], second[0]), "two calls in a row drew the same mask"
    assert not torch.equal(first[0], other[0]), "seeds 123 and 124 drew the same mask"
    mine = run_once(q, k, v, dout, generator=torch.Generator(device).manual_seed(5))
    assert_equal(run_once(q, k, v, dout, generator=torch.Generator(device).manual_seed(5))[0], mine[0],
                 name="out with a passed generator")


@pytest.mark.cuda
def test_cuda_and_cpu_draw_the_same_mask():
    p, seed, offset = 0.2, 31337, 16
    q, k, v = mask_readback(50, 90, 2, 2)
    out, _ = flash_attn_forward(q.cuda().half(), k.cuda().half(), v.cuda().half(), None, None, 0, 0, 1.0, False, -1,
                                -1, 0.0, 2, None, p, seed, offset)
    cpu, _ = flash_attn_forward(q, k, v, None, None, 0, 0, 1.0, False, -1, -1, 0.0, 2, None, p, seed, offset)
    assert_equal((out.float().cpu() * 90 * (1 - p)).round(), (cpu * 90 * (1 - p)).round(), name="CUDA vs CPU mask")


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,error", [(1.0, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), ("0.1", TypeError), (None, TypeError)])
def test_bad_dropout_p_raises(value, error):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(error, match="dropout_p"):
        flash_attn_func(q, q, q, dropout_p=value)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(error, match="dropout_p"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8, dropout_p=value)
    with pytest.raises(error, match="dropout_p"):
        dropout_mask(1, 1, 2, 2, value, 0, 0)


def test_paged_attention_has_no_dropout():
    q = torch.randn(4, 2, 16)
    cache = torch.randn(2, 4, 2, 16)
    cu_q = torch.tensor([0, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 6], dtype=torch.int32)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_varlen_func(q, cache, cache, cu_q, cu_k, 4, 6, dropout_p=0.1, block_table=table)


def test_opcheck_with_dropout():
    q, k, v = (torch.randn(2, 19, 2, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    fwd = torch.ops.flashlm.flash_attn_forward.default
    args = (q, k, v, None, None, 0, 0, 0.125, True, -1, -1, 0.0, 2, None, 0.3, -5, 8)  # a negative int64 seed is allowed
    torch.library.opcheck(fwd, args)
    out, lse = fwd(*args)
    bwd = torch.ops.flashlm.flash_attn_backward.default
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, 0.125, True, -1, -1, 0.0,
                                None, 0.3, -5, 8))
