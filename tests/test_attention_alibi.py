"""ALiBi (alibi_slopes) in flash attention against the float64 reference (reference.py), with flash-attn's rule
(compare.py): out, lse and the gradients of q, k and v, on every CPU kernel ISA (scalar and AVX2) and on CUDA
(skipped without a GPU), padded and packed, causal or not, with windows, softcap and GQA.
"""

import pytest
import torch

from compare import FLOOR, assert_close_to_reference
from conftest import per_kernel, use_isa
from flashlm.flash_attn_interface import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache)
from reference import alibi_bias, attention_with_grads

pytestmark = pytest.mark.usefixtures("restore_isa")

CPU_DTYPES = [(torch.float32,), (torch.bfloat16,)]
CUDA_DTYPES = [(torch.float16,), (torch.bfloat16,)]


def slopes_for(batch, heads, per_batch, device, seed=2):
    """Slopes as flash-attn's tests draw them: uniform in [0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads) if per_batch else (heads,)
    return (torch.rand(shape, generator=g) * 0.3).to(device)


def leaves_for(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def check_all(out, lse, leaves, dout, ref_opts, dtype, cu=None):
    """out, lse and the leaves' gradients (after out.backward(dout)) against the float64 reference and the
    same-dtype torch baseline."""
    cpu = [t.detach().cpu() for t in leaves]
    extra = {} if cu is None else dict(cu_seqlens_q=cu[0].cpu(), cu_seqlens_k=cu[1].cpu())
    out_ref, lse_ref, grads_ref = attention_with_grads(*(t.double() for t in cpu), dout.cpu().double(), **ref_opts,
                                                       **extra)
    out_base, _, grads_base = attention_with_grads(*cpu, dout.cpu(), **ref_opts, **extra)
    assert_close_to_reference(out.cpu(), out_ref, out_base, FLOOR[dtype], name="out", relative_floor=True)
    assert_close_to_reference(lse.cpu(), lse_ref, None, 1e-5, name="lse", relative_floor=True)
    out.backward(dout)
    for name, leaf, ref, base in zip(("dq", "dk", "dv"), leaves, grads_ref, grads_base):
        assert_close_to_reference(leaf.grad.cpu(), ref, base, FLOOR[dtype], name=name, relative_floor=True)


CASES = [  # batch, sq, sk, heads, kv_heads, d, causal, window, softcap
    (2, 17, 17, 4, 4, 32, False, (-1, -1), 0.0),
    (2, 17, 17, 4, 4, 32, True, (-1, -1), 0.0),
    (1, 70, 130, 4, 2, 64, True, (-1, -1), 0.0),
    (1, 130, 70, 4, 1, 64, False, (-1, -1), 0.0),
    (1, 130, 70, 4, 1, 64, True, (-1, -1), 0.0),
    (2, 100, 100, 6, 2, 40, False, (20, 5), 0.0),
    (1, 64, 200, 2, 2, 64, True, (30, -1), 30.0),
    (2, 33, 97, 4, 2, 16, False, (-1, -1), 5.0),
]


@pytest.mark.parametrize("batch,sq,sk,heads,kv_heads,d,causal,window,softcap", CASES)
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=CPU_DTYPES, cuda=CUDA_DTYPES))
def test_padded(device, isa, dtype, version, per_batch, batch, sq, sk, heads, kv_heads, d, causal, window, softcap):
    use_isa(isa)
    q, k, v = leaves_for([(batch, sq, heads, d), (batch, sk, kv_heads, d), (batch, sk, kv_heads, d)], dtype, device)
    slopes = slopes_for(batch, heads, per_batch, device)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                                  return_attn_probs=True, version=version)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    check_all(out, lse, (q, k, v), dout, dict(causal=causal, window=window, softcap=softcap,
                                              alibi_slopes=slopes.cpu()), dtype)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (7, 3))])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("device,isa,dtype", per_kernel(cpu=CPU_DTYPES, cuda=CUDA_DTYPES))
def test_varlen(device, isa, dtype, per_batch, causal, window):
    use_isa(isa)
    lens_q, lens_k = [5, 0, 40, 77, 1], [9, 3, 40, 20, 100]  # q > k, q < k, q = k, an empty sequence
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    heads, kv_heads, d = 4, 2, 32
    q, k, v = leaves_for([(sum(lens_q), heads, d), (sum(lens_k), kv_heads, d), (sum(lens_k), kv_heads, d)], dtype,
                         device)
    slopes = slopes_for(len(lens_q), heads, per_batch, device)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         window_size=window, alibi_slopes=slopes, return_attn_probs=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    check_all(out, lse, (q, k, v), dout, dict(causal=causal, window=window, alibi_slopes=slopes.cpu()), dtype,
              cu=(cu_q, cu_k))


def test_bias_is_flash_attns():
    """The reference's bias is flash-attn's non-causal one, -slope * |i + sk - sq - j|, written out as a loop."""
    slopes = torch.tensor([[0.5, 0.25, 0.1], [0.3, 0.0, 1.0]])
    for sq, sk in ((2, 5), (5, 2), (3, 3)):
        bias = alibi_bias(slopes, sq, sk)
        assert bias.shape == (2, 3, sq, sk)
        for b, h, i, j in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, sq, sk))).tolist():
            assert bias[b, h, i, j] == -slopes[b, h].double() * abs(i + sk - sq - j)


def test_zero_slopes_change_nothing():
    q, k, v = leaves_for([(2, 30, 4, 32), (2, 50, 2, 32), (2, 50, 2, 32)], torch.float32, "cpu")
    with torch.no_grad():
        plain = flash_attn_func(q, k, v, causal=True)
        zero = flash_attn_func(q, k, v, causal=True, alibi_slopes=torch.zeros(4))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("slopes,error,match", [
    (torch.ones(4, dtype=torch.float64), ValueError, "alibi_slopes: must be float32"),
    (torch.ones(5), ValueError, r"alibi_slopes: expected shape \[heads\] = \[4\]"),
    (torch.ones(3, 4), ValueError, r"alibi_slopes: expected shape"),
    (torch.ones(4, 2)[:, 0], ValueError, "alibi_slopes: must be contiguous"),
    (torch.ones(2, 4, 1), ValueError, "alibi_slopes: expected shape"),
    ([0.1] * 4, TypeError, "alibi_slopes"),
    (torch.ones(4, device="meta"), ValueError, "alibi_slopes"),
])
def test_bad_slopes_raise(slopes, error, match):
    q, k, v = leaves_for([(2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4, 16)], torch.float32, "cpu")
    with pytest.raises(error, match=match):
        flash_attn_func(q, k, v, alibi_slopes=slopes)


def test_paged_bad_slopes_raise():
    q = torch.randn(1, 1, 2, 16)
    cache = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \[heads\] = \[2\] or \[batch, heads\] = \[1, 2\]"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=4, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes: must be float32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=4, alibi_slopes=torch.ones(2).bfloat16())
