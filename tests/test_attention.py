"""Flash attention (flashlm.flash_attn_interface) against a float64 math reference.

The rule is flash-attn's: flashlm's error against the float64 reference may be at most twice the error of
the same math done by PyTorch in the input dtype, plus a small floor. Forward output and the gradients of
q, k and v are all checked; every failure names the tensor, the max error and where it is.
"""

import math

import pytest
import torch

from conftest import devices
from flashlm.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
CUDA_HEAD_DIMS = (64, 96, 128, 256)


def dtypes_for(device):
    return (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16, torch.bfloat16)


def visible(sq, sk, causal, window, device=None):
    """[sq, sk] bool: which keys each query sees (bottom-right aligned)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def attention_math(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """Plain attention in q's dtype: q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> (out, lse [B, H, Sq])."""
    sq, sk, heads, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    group = heads // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = d ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = visible(sq, sk, causal, window, q.device)
    any_key = mask.any(-1, keepdim=True)  # rows that see no key output 0
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~any_key, 0.0)
    lse = torch.logsumexp(s.float(), dim=-1).masked_fill(~any_key[:, 0], float("inf"))
    p = torch.softmax(s, dim=-1) * mask
    return torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), v), lse


def assert_close(name, got, ref, base, floor):
    """|got - ref| <= 2 |base - ref| + floor, elementwise maxima; ref is float64."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs()
    base_err = (base.double() - ref).abs().max().item() if base is not None else 0.0
    bound = 2 * base_err + floor * max(1.0, ref.abs().max().item())
    worst = err.max().item()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert not torch.isnan(got).any(), f"{name}: NaN in the result"
    assert worst <= bound, f"{name}: max error {worst:.3g} at {where} > bound {bound:.3g} (baseline error {base_err:.3g})"


def random_qkv(b, sq, sk, heads, kv_heads, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, heads, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, sk, kv_heads, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, sk, kv_heads, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, causal=False, window=(-1, -1), softcap=0.0, version=2, backward=True):
    """Runs flashlm forward (and backward) and checks out, lse and the gradients with the 2x rule."""
    dtype = q.dtype
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, window_size=window, softcap=softcap,
                                  return_attn_probs=True, version=version)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_math(*refs, causal=causal, window=window, softcap=softcap)
    bases = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_base, _ = attention_math(*bases, causal=causal, window=window, softcap=softcap)

    assert out.shape == q.shape and out.dtype == dtype
    assert_close("out", out, out_ref.detach(), out_base, FLOOR[dtype])
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "lse: +inf exactly on the rows that see no key"
    assert_close("lse", lse[finite], lse_ref[finite].detach(), None, 1e-5)
    if not backward:
        return
    out.backward(dout)
    out_ref.backward(dout.double())
    out_base.backward(dout)
    for name, leaf, ref, base in zip(("dq", "dk", "dv"), leaves, refs, bases):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
        assert_close(name, leaf.grad, ref.grad, base.grad, FLOOR[dtype])


# --- padded batches -----------------------------------------------------------------------------------------

SEQLENS = [(1, 1), (2, 2), (17, 17), (128, 128), (257, 257), (1000, 1000), (17, 300), (300, 17), (1, 257), (64, 1)]


@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seqlens_cpu(sq, sk, causal, dtype):
    heads = 2 if sq * sk > 100_000 else 4
    q, k, v = random_qkv(1 if sq * sk > 100_000 else 2, sq, sk, heads, 2, 64, dtype, "cpu")
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("d", [1, 8, 32, 40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_cpu(d, causal):
    q, k, v = random_qkv(2, 77, 91, 2, 1, d, torch.float32, "cpu", seed=d)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (4, 2), (6, 3), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_cpu(heads, kv_heads, dtype):
    q, k, v = random_qkv(2, 50, 70, heads, kv_heads, 32, dtype, "cpu")
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("window", [(0, 0), (3, 0), (16, 16), (50, -1), (-1, 5), (200, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_cpu(window, causal):
    q, k, v = random_qkv(2, 150, 190, 4, 2, 32, torch.float32, "cpu")
    check_against_reference(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cpu(softcap, dtype):
    q, k, v = random_qkv(2, 100, 100, 4, 4, 64, dtype, "cpu")
    check_against_reference(q * 4, k * 4, v, causal=True, softcap=softcap)  # scaled up so the cap bites


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("sq,sk,causal,window", [(300, 300, True, (-1, -1)), (129, 400, False, (-1, -1)),
                                                  (400, 129, True, (-1, -1)), (200, 260, False, (30, 10))])
def test_v1_and_v2_forward_cpu(version, sq, sk, causal, window):
    q, k, v = random_qkv(2, sq, sk, 4, 2, 64, torch.float32, "cpu")
    check_against_reference(q, k, v, causal=causal, window=window, version=version, backward=version == 1)


def test_v1_equals_v2_cpu():
    q, k, v = random_qkv(2, 333, 333, 4, 2, 64, torch.bfloat16, "cpu")
    out1 = flash_attn_func(q, k, v, causal=True, version=1)
    out2 = flash_attn_func(q, k, v, causal=True, version=2)
    out_ref, _ = attention_math(q.double(), k.double(), v.double(), causal=True)
    out_base, _ = attention_math(q, k, v, causal=True)
    assert_close("v1", out1, out_ref, out_base, FLOOR[torch.bfloat16])
    assert_close("v2", out2, out_ref, out_base, FLOOR[torch.bfloat16])
    assert (out1.float() - out2.float()).abs().max().item() <= 2 * (out_base.double() - out_ref).abs().max().item()


def test_rows_that_see_no_key_cpu():
    # Sq > Sk, causal: the first Sq - Sk queries sit before the first key.
    q, k, v = random_qkv(1, 40, 10, 2, 2, 16, torch.float32, "cpu")
    q.requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :30] == 0) and torch.all(lse[:, :, :30] == float("inf"))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :30] == 0)
    check_against_reference(q.detach(), k, v, causal=True)


def test_strided_inputs_cpu():
    # Slices of a packed qkv tensor: row and head strides differ from a contiguous tensor's.
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 70, 3, 4, 32, generator=g, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    out_ref, _ = attention_math(q.double(), k.double(), v.double(), causal=True)
    assert_close("out", out, out_ref, attention_math(q, k, v, causal=True)[0], FLOOR[torch.float32])
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()
    kv = torch.stack([k, v], dim=2)
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=True), out.detach())


def test_backward_is_deterministic_cpu():
    q, k, v = random_qkv(1, 300, 300, 8, 2, 64, torch.float32, "cpu")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attn_func(*leaves, causal=True).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --- packed variable-length batches -------------------------------------------------------------------------

def check_varlen(lens_q, lens_k, heads, kv_heads, d, dtype, device, causal, window=(-1, -1), softcap=0.0):
    g = torch.Generator().manual_seed(len(lens_q))
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), heads, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(sum(lens_k), kv_heads, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    v = torch.randn(sum(lens_k), kv_heads, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         window_size=window, softcap=softcap, return_attn_probs=True)
    assert lse.shape == (heads, sum(lens_q))
    dout = torch.randn(out.shape, generator=g).to(out)
    out.backward(dout)
    # Each sequence on its own through the padded path's reference.
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        leaves = [t[s].detach()[None] for t, s in ((q, qs), (k, ks), (v, ks))]
        refs = [t.double().requires_grad_() for t in leaves]
        bases = [t.clone().requires_grad_() for t in leaves]
        out_ref, lse_ref = attention_math(*refs, causal=causal, window=window, softcap=softcap)
        out_base, _ = attention_math(*bases, causal=causal, window=window, softcap=softcap)
        assert_close(f"out[seq {i}]", out[qs][None], out_ref.detach(), out_base, FLOOR[dtype])
        finite = torch.isfinite(lse_ref[0])
        assert torch.equal(torch.isfinite(lse[:, qs]), finite), f"lse[seq {i}]: +inf exactly where no key is seen"
        assert_close(f"lse[seq {i}]", lse[:, qs][finite], lse_ref[0][finite].detach(), None, 1e-5)
        d_seq = dout[qs][None]
        out_ref.backward(d_seq.double())
        out_base.backward(d_seq)
        for name, full, s, ref, base in zip(("dq", "dk", "dv"), (q, k, v), (qs, ks, ks), refs, bases):
            assert_close(f"{name}[seq {i}]", full.grad[s][None], ref.grad, base.grad, FLOOR[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_cpu(causal, dtype):
    check_varlen([1, 300, 1, 45, 300], [1, 300, 37, 60, 299], 4, 2, 64, dtype, "cpu", causal)


def test_varlen_window_softcap_cpu():
    check_varlen([5, 130, 1], [9, 100, 70], 4, 1, 32, torch.float32, "cpu", True, window=(20, 0), softcap=10.0)


def test_varlen_empty_sequences_cpu():
    check_varlen([0, 7, 0, 3], [4, 7, 0, 0], 2, 2, 16, torch.float32, "cpu", False)


# --- CUDA (skipped without a GPU) ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_seqlens_cuda(sq, sk, causal, dtype):
    q, k, v = random_qkv(2, sq, sk, 4, 2, 128, dtype, "cuda")
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS + (32, 40, 80, 200))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_head_dims_cuda(d, causal, version):
    q, k, v = random_qkv(2, 177, 211, 4, 2, d, torch.bfloat16, "cuda", seed=d)
    check_against_reference(q, k, v, causal=causal, version=version, backward=version == 2)


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (4, 2)])
@pytest.mark.parametrize("window", [(-1, -1), (16, 16), (64, 0)])
@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_gqa_window_softcap_cuda(heads, kv_heads, window, softcap):
    q, k, v = random_qkv(2, 300, 333, heads, kv_heads, 64, torch.float16, "cuda")
    check_against_reference(q, k, v, causal=True, window=window, softcap=softcap)


@pytest.mark.cuda
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cuda(d, causal):
    check_varlen([1, 300, 1, 45, 300], [1, 300, 37, 60, 299], 4, 2, d, torch.bfloat16, "cuda", causal)


@pytest.mark.cuda
def test_strided_and_deterministic_cuda():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 300, 3, 4, 64, generator=g).to("cuda", torch.float16).requires_grad_()
    grads = []
    for _ in range(2):
        qkv.grad = None
        flash_attn_qkvpacked_func(qkv, causal=True).float().square().sum().backward()
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1])
    q, k, v = qkv.detach().unbind(2)
    check_against_reference(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)


# --- the op layer: torch.library, torch.compile -------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    dtype = dtypes_for(device)[1]
    q, k, v = random_qkv(2, 19, 23, 4, 2, 64, dtype, device)
    fwd = torch.ops.flashlm.flash_attn_forward.default
    torch.library.opcheck(fwd, (q, k, v, None, None, 0, 0, 0.125, True, -1, -1, 0.0, 2))
    out, lse = fwd(q, k, v, None, None, 0, 0, 0.125, True, -1, -1, 0.0, 2)
    bwd = torch.ops.flashlm.flash_attn_backward.default
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, 0.125, True, -1, -1, 0.0))


def test_torch_compile_fullgraph_cpu():
    q, k, v = random_qkv(2, 40, 40, 4, 2, 32, torch.float32, "cpu")

    def loss(q, k, v):
        return flash_attn_func(q, k, v, causal=True).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)


# --- bad input ----------------------------------------------------------------------------------------------

def test_unsupported_arguments_raise():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="version"):
        flash_attn_func(q, k, v, version=3)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=5)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn_func(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="k"):
        flash_attn_func(q, k.numpy(), v)


@pytest.mark.parametrize("case,match", [
    ("gqa", "must divide"),
    ("head_dim", "head_dim"),
    ("v_shape", "v: expected shape"),
    ("dtype", "dtype"),
    ("f16_cpu", "float32 or bfloat16"),
    ("ndim", "4 dimensions"),
    ("big_head_dim", "head_dim 320"),
    ("batch", "batch"),
])
def test_bad_shapes_and_dtypes_raise(case, match):
    q, k, v = random_qkv(2, 8, 8, 4, 2, 16, torch.float32, "cpu")
    if case == "gqa":
        k, v = k[:, :, :1].expand(2, 8, 3, 16), v[:, :, :1].expand(2, 8, 3, 16)
    elif case == "head_dim":
        k, v = k[..., :8], v[..., :8]
    elif case == "v_shape":
        v = v[:, :5]
    elif case == "dtype":
        k = k.bfloat16()
    elif case == "f16_cpu":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "ndim":
        q = q[0]
    elif case == "big_head_dim":
        q, k, v = (torch.randn(1, 2, 2, 320) for _ in range(3))
    elif case == "batch":
        k, v = k[:1], v[:1]
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("cu_q,cu_k,max_q,match", [
    ([0, 5, 3], [0, 4, 8], 5, "non-decreasing"),
    ([0, 5, 12], [0, 4, 8], 7, "past the 10 rows"),
    ([0, 5, 10], [0, 4, 8], 4, "more than max_seqlen_q"),
    ([0, 5, 10], [0, 8], 5, "entries"),
    ([-1, 5, 10], [0, 4, 8], 6, "negative"),
])
def test_bad_cu_seqlens_raise(cu_q, cu_k, max_q, match):
    q, k, v = torch.randn(10, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                               max_q, 8)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 10]), torch.tensor([0, 8], dtype=torch.int32), 10, 8)
