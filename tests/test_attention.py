"""Flash attention (flashlm.flash_attn_interface) on every device against the float64 reference (reference.py).

The rule is flash-attn's (compare.py): flashlm's error against the float64 reference may be at most twice the
error of the same math done by PyTorch in the input dtype, plus a small floor (relative to the reference's
magnitude here). Forward output, lse and the gradients of q, k and v are all checked. CUDA cases run in f16
and bf16 and are skipped without a GPU.
"""

import math

import pytest
import torch

from compare import FLOOR, assert_close, assert_close_to_reference, assert_equal
from conftest import devices, per_device
from flashlm.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from reference import attention, attention_with_grads

CUDA_HEAD_DIMS = (64, 96, 128, 256)


def dtypes_for(device):
    return (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16, torch.bfloat16)


def check(name, got, ref, base, floor, equal_nan=False):
    assert_close_to_reference(got, ref, base, floor, name=name, relative_floor=True, equal_nan=equal_nan)


def random_qkv(b, sq, sk, heads, kv_heads, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, heads, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, sk, kv_heads, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, sk, kv_heads, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, causal=False, window=(-1, -1), softcap=0.0, version=2, backward=True,
                            equal_nan=False):
    """Runs flashlm forward (and backward) and checks out, lse and the gradients with the 2x rule (with
    equal_nan: NaN exactly where the reference has it)."""
    dtype = q.dtype
    opts = dict(causal=causal, window=window, softcap=softcap)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q) if backward else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, window_size=window, softcap=softcap,
                                  return_attn_probs=True, version=version)
    out_ref, lse_ref, grads_ref = attention_with_grads(*(t.double() for t in (q, k, v)),
                                                       None if dout is None else dout.double(), **opts)
    out_base, _, grads_base = attention_with_grads(q, k, v, dout, **opts)

    assert out.shape == q.shape and out.dtype == dtype
    check("out", out, out_ref, out_base, FLOOR[dtype], equal_nan)
    check("lse", lse, lse_ref, None, 1e-5, equal_nan)  # +inf exactly on the rows that see no key
    if not backward:
        return
    out.backward(dout)
    for name, leaf, ref, base in zip(("dq", "dk", "dv"), leaves, grads_ref, grads_base):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
        check(name, leaf.grad, ref, base, FLOOR[dtype], equal_nan)


# --- padded batches -----------------------------------------------------------------------------------------

SEQLENS = [(1, 1), (2, 2), (17, 17), (128, 128), (257, 257), (1000, 1000), (17, 300), (300, 17), (1, 257), (64, 1)]


@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_seqlens(device, dtype, sq, sk, causal):
    if device == "cpu":  # fewer heads for the long cases: the float64 reference is the slow part here
        big = sq * sk > 100_000
        q, k, v = random_qkv(1 if big else 2, sq, sk, 2 if big else 4, 2, 64, dtype, device)
    else:
        q, k, v = random_qkv(2, sq, sk, 4, 2, 128, dtype, device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,d,version", per_device(
    cpu=[(d, 2) for d in (1, 8, 32, 40, 64, 80, 96, 128, 256)],
    cuda=[(d, version) for d in CUDA_HEAD_DIMS + (32, 40, 80, 200) for version in (1, 2)]))
def test_head_dims(device, d, version, causal):
    if device == "cpu":
        q, k, v = random_qkv(2, 77, 91, 2, 1, d, torch.float32, device, seed=d)
    else:
        q, k, v = random_qkv(2, 177, 211, 4, 2, d, torch.bfloat16, device, seed=d)
    check_against_reference(q, k, v, causal=causal, version=version, backward=version == 2)


@pytest.mark.parametrize("device,dtype,heads,kv_heads,window,softcap", per_device(
    cpu=[(dtype, h, kv, (-1, -1), 0.0) for h, kv in [(8, 1), (4, 2), (6, 3), (3, 3)]
         for dtype in (torch.float32, torch.bfloat16)],
    cuda=[(torch.float16, h, kv, window, softcap) for h, kv in [(8, 1), (4, 2)]
          for window in [(-1, -1), (16, 16), (64, 0)] for softcap in (0.0, 20.0)]))
def test_gqa(device, dtype, heads, kv_heads, window, softcap):
    sq, sk, d = (50, 70, 32) if device == "cpu" else (300, 333, 64)
    q, k, v = random_qkv(2, sq, sk, heads, kv_heads, d, dtype, device)
    check_against_reference(q, k, v, causal=True, window=window, softcap=softcap)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("device,dtype", per_device(cpu=[(torch.float32,), (torch.bfloat16,)],
                                                    cuda=[(torch.float16,), (torch.bfloat16,)]))
def test_nonfinite_inputs_propagate(device, dtype, value):
    # NaN and inf go through forward and autograd as through softmax attention: NaN exactly where the float64
    # reference has it. Placed where autograd on the reference meets no 0 * NaN from masked keys: in q's last
    # row (it sees every key), in k's first key (every row sees it), anywhere in v.
    q, k, v = random_qkv(2, 70, 90, 4, 2, 64 if device == "cpu" else 128, dtype, device)
    q[0, -1, 1, 5] = value
    k[1, 0, 0] = value
    v[0, 40, 1, 3] = value
    check_against_reference(q, k, v, causal=True, equal_nan=True)


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
    out_ref, _ = attention(q.double(), k.double(), v.double(), causal=True)
    out_base, _ = attention(q, k, v, causal=True)
    check("v1", out1, out_ref, out_base, FLOOR[torch.bfloat16])
    check("v2", out2, out_ref, out_base, FLOOR[torch.bfloat16])
    assert_close(out1, out2, atol=2 * (out_base.double() - out_ref).abs().max(), name="v1 vs v2")


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
    out_ref, _ = attention(q.double(), k.double(), v.double(), causal=True)
    check("out", out, out_ref, attention(q, k, v, causal=True)[0], FLOOR[torch.float32])
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()
    kv = torch.stack([k, v], dim=2)
    assert_equal(flash_attn_kvpacked_func(q, kv, causal=True), out.detach(), name="kvpacked vs qkvpacked")


@pytest.mark.parametrize("device,packed", per_device(cpu=[(False,)], cuda=[(True,)]))
def test_backward_is_deterministic(device, packed):
    # Two backward passes give the same bits: on the CPU with GQA (dK, dV summed over each group of heads),
    # on CUDA through one packed qkv tensor (strided q, k and v).
    if packed:
        g = torch.Generator().manual_seed(3)
        inputs = [torch.randn(2, 300, 3, 4, 64, generator=g).to(device, torch.float16)]
        run = lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True)  # noqa: E731
    else:
        inputs = random_qkv(1, 300, 300, 8, 2, 64, torch.float32, device)
        run = lambda q, k, v: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        run(*leaves).float().square().sum().backward()
        grads.append([t.grad for t in leaves])
    for i, (a, b) in enumerate(zip(*grads)):
        assert_equal(a, b, name=f"gradient {i}, second run vs first")
    q, k, v = inputs[0].unbind(2) if packed else inputs
    check_against_reference(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)


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
    opts = dict(causal=causal, window=window, softcap=softcap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out_ref, lse_ref, grads_ref = attention_with_grads(q.double(), k.double(), v.double(), dout.double(), **opts)
    out_base, _, grads_base = attention_with_grads(q, k, v, dout, **opts)
    # Each sequence on its own: its errors against its own baseline's.
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        check(f"out[seq {i}]", out[qs], out_ref[qs], out_base[qs], FLOOR[dtype])
        check(f"lse[seq {i}]", lse[:, qs], lse_ref[:, qs], None, 1e-5)  # +inf exactly where no key is seen
        for name, full, s, ref, base in zip(("dq", "dk", "dv"), (q, k, v), (qs, ks, ks), grads_ref, grads_base):
            check(f"{name}[seq {i}]", full.grad[s], ref[s], base[s], FLOOR[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,dtype,d", per_device(cpu=[(torch.float32, 64), (torch.bfloat16, 64)],
                                                      cuda=[(torch.bfloat16, d) for d in CUDA_HEAD_DIMS]))
def test_varlen(device, dtype, d, causal):
    check_varlen([1, 300, 1, 45, 300], [1, 300, 37, 60, 299], 4, 2, d, dtype, device, causal)


def test_varlen_window_softcap_cpu():
    check_varlen([5, 130, 1], [9, 100, 70], 4, 1, 32, torch.float32, "cpu", True, window=(20, 0), softcap=10.0)


def test_varlen_empty_sequences_cpu():
    check_varlen([0, 7, 0, 3], [4, 7, 0, 0], 2, 2, 16, torch.float32, "cpu", False)


def test_backward_batch_zero_with_expanded_gradient_cpu():
    # out.sum().backward() hands the kernel an expanded gradient (stride 0); with batch 0 it is empty, which
    # torch calls contiguous, yet its last dimension still has stride 0.
    q, k, v = (torch.randn(0, 5, heads, 16, requires_grad=True) for heads in (4, 2, 2))
    flash_attn_func(q, k, v, causal=True).sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape


@pytest.mark.parametrize("device", devices())
def test_varlen_rows_outside_every_sequence(device):
    # Rows before cu_seqlens[0] and from cu_seqlens[-1] on belong to no sequence: out 0 and lse +inf (a row
    # that sees no key), and gradients 0. The sequences' rows are those of the same call without them.
    dtype = dtypes_for(device)[1]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(rows, heads, 32, generator=g).to(device=device, dtype=dtype)
               for rows, heads in ((16, 4), (13, 2), (13, 2)))
    dout = torch.randn(16, 4, 32, generator=g).to(device=device, dtype=dtype)
    cu_q, cu_k = ([first, first + 5, first + 11] for first in (2, 1))  # q rows 0, 1, 13-15 and k rows 0, 12 outside
    results = []
    for lo_q, lo_k, hi_q, hi_k in ((0, 0, 16, 13), (2, 1, 13, 12)):  # all the rows, then the sequences' alone
        parts = ((q, lo_q, hi_q), (k, lo_k, hi_k), (v, lo_k, hi_k))
        leaves = [t[lo:hi].clone().requires_grad_() for t, lo, hi in parts]
        cu = [torch.tensor([c - lo for c in offsets], dtype=torch.int32, device=device)
              for offsets, lo in ((cu_q, lo_q), (cu_k, lo_k))]
        out, lse, _ = flash_attn_varlen_func(*leaves, *cu, 6, 6, causal=True, return_attn_probs=True)
        out.backward(dout[lo_q:hi_q])
        results.append((out.detach(), lse, *(t.grad for t in leaves)))
    (out, lse, dq, dk, dv), inner = results
    outside_q, outside_k = [0, 1, 13, 14, 15], [0, 12]
    for name, t in (("out", out[outside_q]), ("dq", dq[outside_q]), ("dk", dk[outside_k]), ("dv", dv[outside_k])):
        assert_equal(t, torch.zeros_like(t), name=f"{name} outside every sequence")
    assert_equal(lse[:, outside_q], torch.full_like(lse[:, outside_q], math.inf), name="lse outside every sequence")
    sequences = (out[2:13], lse[:, 2:13], dq[2:13], dk[1:12], dv[1:12])
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), sequences, inner):
        assert_equal(got, want, name=f"{name} of the sequences' rows")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_autograd_matches_the_dispatcher(dtype):
    """Training calls reach the kernels without the dispatcher's autograd layer (EagerOp, eager=True): the same
    outputs and gradients, bit for bit, as the registered op, with the trailing defaults given positionally,
    by keyword or left out."""
    from flashlm.ops.attention import forward_op
    q, k, v = random_qkv(2, 37, 45, 4, 2, 64, dtype, "cpu", seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    args = (None, None, 0, 0, 0.125, True, -1, -1, 0.0, 2)

    def run(call):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = call(*leaves)
        out.backward(dout)
        return [out, lse] + [t.grad for t in leaves]

    expected = run(lambda q, k, v: torch.ops.flashlm.flash_attn_forward(q, k, v, *args))
    for got in (run(lambda q, k, v: forward_op(q, k, v, *args)),
                run(lambda q, k, v: forward_op(q, k, v, *args, None, 0.0, 0, 0)),
                run(lambda q, k, v: forward_op(q, k, v, *args, dropout_p=0.0))):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            assert_equal(a, b, name=name)


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
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):  # supported: one slope per head of q
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(3))
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
