"""RMSNorm (flashlm.ops.rms_norm) and its fused residual form.

References: a float64 evaluation of the formula (f32 inputs); HF's LlamaRMSNorm run in torch as a bf16
model runs it, bit for bit on inputs whose sum of squares is exact in f32 (so no summation order can change
it) and to one bf16 ulp elsewhere; the scalar kernel bit for bit (AVX2). CUDA cases of the same tests (f32,
f16, bf16) are marked and skipped without a GPU. Bounds are relative, with a floor at 1e-3 of the tensor's
largest magnitude (compare.assert_close); bit-for-bit checks are compare.assert_equal.
"""

import pytest
import torch

import flashlm.ops as ops
from compare import assert_close, assert_equal
from conftest import devices, per_device, per_kernel, use_isa
from flashlm import _C

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]
EPS = 1e-6


def reference_f64(x, weight, eps, residual=None):
    """(out, new residual) in float64; the residual sum is rounded to x's dtype first, as a model adds."""
    s = x if residual is None else x + residual
    h = s.double()
    y = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * y, s


def hf_formula(x, weight, eps):
    """HF's LlamaRMSNorm.forward, in x's dtype, rounded to it (an f32 weight promotes the product to f32)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def rel(rtol):
    """|actual - expected| <= rtol (|expected| + 1e-3 max|expected|), elementwise."""
    return dict(rtol=rtol, rtol_of_max=1e-3 * rtol)


def stream(device):
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def exact_sum_inputs(rows, d, gen, dtype=torch.bfloat16):
    """Multiples of 1/8 in [-15/8, 15/8]: their squares, and every partial sum of them up to d = 4097, are
    exact in f32, so every summation order gives the same mean."""
    return (torch.randint(-15, 16, (rows, d), generator=gen) / 8).to(dtype)


# ---- against float64 and HF's formula ------------------------------------------------------------------

RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10 * 1.01, torch.bfloat16: 2.0**-7 * 1.01}  # one ulp, a little


@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("device,isa,dtype,weight_dtype,d", per_kernel(
    cpu=[(torch.float32, torch.float32, d) for d in (1, 7, 64, 4097)],
    cuda=[(dtype, weight_dtype, d) for dtype, weight_dtype in [
        (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)] for d in (1, 7, 64, 1024, 1032, 4097, 8192)]))
def test_against_float64(device, isa, dtype, weight_dtype, rows, d, with_residual, restore_isa):
    use_isa(isa)
    gen = torch.Generator().manual_seed(rows * 10000 + d)
    x = (torch.randn(rows, d, generator=gen) * 3).to(dtype).to(device)
    w = torch.randn(d, generator=gen).to(weight_dtype).to(device)
    residual = torch.randn(rows, d, generator=gen).to(dtype).to(device) if with_residual else None
    ref, ref_residual = reference_f64(x, w, EPS, residual)
    out = ops.rms_norm(x, w, EPS, residual=residual)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close(out, ref, **rel(RTOL[dtype]), name=f"out {dtype} [{rows}, {d}]")
    if with_residual:
        assert_equal(residual, ref_residual, name="residual")  # one add in x's dtype, as torch's


@pytest.mark.parametrize("device,isa,dtype,weight_dtype,d,with_residual", per_kernel(
    cpu=[(torch.bfloat16, weight_dtype, d, with_residual) for d in (1, 7, 64, 4097)
         for weight_dtype in (torch.bfloat16, torch.float32) for with_residual in (False, True)],
    cuda=[(dtype, dtype, d, False) for dtype in (torch.float16, torch.bfloat16) for d in (64, 4097, 8192)]))
def test_is_hf_formula_bit_for_bit(device, isa, dtype, weight_dtype, d, with_residual, restore_isa):
    # y rounded to dtype, then the product rounded again: on exact-sum inputs nothing but those two roundings
    # can differ, so the result must be HF's to the bit (a single rounding differs in ~7% of elements). The
    # formula runs on the CPU: torch's CUDA rsqrt is approximate, its CPU one is 1 / sqrt rounded twice, as the
    # kernels compute it.
    use_isa(isa)
    gen = torch.Generator().manual_seed(d)
    rows = 300
    w = torch.randn(d, generator=gen).to(weight_dtype)
    if with_residual:
        x = exact_sum_inputs(rows, d, gen, dtype) / 2  # x + residual stays a multiple of 1/16 below 2: exact sums
        residual = exact_sum_inputs(rows, d, gen, dtype) / 2
        expected_residual = x + residual
        expected = hf_formula(expected_residual, w, EPS)
        residual = residual.to(device)
        out = ops.rms_norm(x.to(device), w.to(device), EPS, residual=residual)
        assert_equal(residual.cpu(), expected_residual, name="residual")
    else:
        x = exact_sum_inputs(rows, d, gen, dtype)
        expected = hf_formula(x, w, EPS)
        out = ops.rms_norm(x.to(device), w.to(device), EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert_equal(out.cpu(), expected, name=f"out {dtype} d={d}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("d", [7, 64, 4097])
def test_bf16_random_within_one_ulp_of_hf(isa, rows, d, restore_isa):
    # On general inputs the f32 mean may differ from torch's in its last bit (summation order), which moves a
    # rare element across a bf16 rounding boundary: one bf16 ulp (2^-7 relative) at most, and rarely.
    ops.set_cpu_isa(isa)
    gen = torch.Generator().manual_seed(rows + d)
    x = (torch.randn(rows, d, generator=gen) * 2).bfloat16()
    w = torch.randn(d, generator=gen).bfloat16()
    out = ops.rms_norm(x, w, EPS)
    expected = hf_formula(x, w, EPS)
    assert_close(out, expected, **rel(2.0**-7), name="out vs HF")
    assert (out != expected).float().mean().item() < 0.01, "out: more than 1% of elements differ from HF"
    ref, _ = reference_f64(x, w, EPS)
    assert_close(out, ref, **rel(2.0**-7 * 1.01), name="out vs float64")  # two roundings of 2^-8 each


# ---- layouts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    gen = torch.Generator().manual_seed(11)
    d = 67
    x_buf = torch.randn(5, d + 9, generator=gen).to(dtype)
    x = x_buf[:, 4:4 + d]  # row stride d + 9, offset 4
    w = torch.randn(d, generator=gen).to(dtype)
    r_buf = torch.randn(10, d, generator=gen).to(dtype)
    r_before = r_buf.clone()
    residual = r_buf[::2]  # row stride 2d
    expected_residual = x + residual
    out = ops.rms_norm(x, w, EPS, residual=residual)
    assert_equal(out, ops.rms_norm(expected_residual.contiguous(), w, EPS), name="out (strided rows)")
    assert_equal(r_buf[::2], expected_residual, name="residual rows")
    assert_equal(r_buf[1::2], r_before[1::2], name="rows between the residual's")
    # Stride-0 rows (an expanded x) are read, never written.
    row = torch.randn(1, d, generator=gen).to(dtype)
    assert_equal(ops.rms_norm(row.expand(4, d), w, EPS), ops.rms_norm(row, w, EPS).expand(4, d), name="expanded x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dimensions(dtype):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 5, 40, generator=gen).to(dtype)
    w = torch.randn(40, generator=gen).to(dtype)
    flat = ops.rms_norm(x.reshape(30, 40), w, EPS).view(x.shape)
    assert_equal(ops.rms_norm(x, w, EPS), flat, name="4-D x")
    assert_equal(ops.rms_norm(x[1, 2, 3], w, EPS), flat[1, 2, 3], name="1-D x")
    # Leading dimensions that do not nest (a transpose), a strided last dimension, and a residual of the same
    # kind: copies on the way in, and the residual written back.
    xt = x.transpose(0, 2)
    assert_equal(ops.rms_norm(xt, w, EPS), flat.transpose(0, 2), name="transposed x")
    xs = torch.randn(6, 80, generator=gen).to(dtype)[:, ::2]
    assert_equal(ops.rms_norm(xs, w, EPS), ops.rms_norm(xs.contiguous(), w, EPS), name="x with a strided last dim")
    r = torch.randn(2, 3, 5, 40, generator=gen).to(dtype).transpose(0, 2)
    expected_r = xt + r
    out = ops.rms_norm(xt, w, EPS, residual=r)
    assert_equal(r, expected_r, name="transposed residual")
    assert_equal(out, ops.rms_norm(expected_r.contiguous(), w, EPS), name="out with a transposed residual")


@pytest.mark.parametrize("device,dtype,d,with_residual", per_device(
    cpu=[(dtype, 4097, with_residual) for dtype in (torch.float32, torch.bfloat16) for with_residual in (False, True)],
    cuda=[(torch.bfloat16, d, True) for d in (64, 4096)]))
def test_out_may_be_x(device, dtype, d, with_residual):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(9, d, generator=gen).to(dtype).to(device)
    w = torch.randn(d, generator=gen).to(dtype).to(device)
    r = torch.randn(9, d, generator=gen).to(dtype).to(device) if with_residual else None
    r_copy = None if r is None else r.clone()
    expected = ops.rms_norm(x.clone(), w, EPS, residual=r_copy)
    _C.rms_norm(x, w, x, r, EPS, stream(device))
    assert_equal(x, expected, name="out written over x")
    if with_residual:
        assert_equal(r, r_copy, name="residual")


def test_empty_and_tiny():
    w = torch.randn(5)
    assert ops.rms_norm(torch.randn(0, 5), w, EPS).shape == (0, 5)
    assert ops.rms_norm(torch.randn(3, 0), torch.randn(0), EPS).shape == (3, 0)
    # d = 1: x / |x| * w (+0 stays +0 with eps > 0).
    x = torch.tensor([[2.0], [-3.0], [0.0]])
    assert_close(ops.rms_norm(x, torch.tensor([1.5]), 0.0)[:2], torch.tensor([[1.5], [-1.5]]), **rel(1e-7),
                 name="d = 1")
    assert ops.rms_norm(x, torch.tensor([1.5]), EPS)[2].item() == 0.0


# ---- AVX2 against scalar --------------------------------------------------------------------------------

@pytest.mark.skipif("avx2" not in ISAS, reason="needs AVX2")
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("d", [1, 7, 8, 31, 32, 33, 64, 100, 4097])
@pytest.mark.parametrize("with_residual", [False, True])
def test_avx2_matches_scalar_bitwise(dtype, weight_dtype, d, with_residual, restore_isa):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(5, d, generator=gen) * 4).to(dtype)
    w = torch.randn(d, generator=gen).to(weight_dtype)
    r0 = torch.randn(5, d, generator=gen).to(dtype) if with_residual else None
    results = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        r = None if r0 is None else r0.clone()
        results[isa] = (ops.rms_norm(x, w, EPS, residual=r), r)
    assert_equal(results["avx2"][0], results["scalar"][0], name="out: AVX2 vs scalar")
    if with_residual:
        assert_equal(results["avx2"][1], results["scalar"][1], name="residual: AVX2 vs scalar")


@pytest.mark.skipif("avx2" not in ISAS, reason="needs AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_matches_scalar_on_nan_and_inf(dtype, restore_isa):
    # A NaN makes its row NaN; an inf makes its row's rms inf, so the row 0 but NaN where the inf was (as in HF's
    # formula). bf16 NaNs are stored as 0x7FC0 by both kernels, whatever NaN the arithmetic produced on the way.
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(4, 45, generator=gen)
    x[0, 3], x[1, 40], x[2, 7] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    w = torch.randn(45, generator=gen).to(dtype)
    bits = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        r = torch.zeros(4, 45, dtype=dtype)
        out = ops.rms_norm(x, w, EPS, residual=r)
        assert_equal(out.isnan(), hf_formula(x, w, EPS).isnan(), name=f"{isa}: where the NaNs are")
        bits[isa] = (out.view(torch.int32 if dtype == torch.float32 else torch.int16),
                     r.view(torch.int32 if dtype == torch.float32 else torch.int16))
    assert_equal(bits["avx2"][0], bits["scalar"][0], name="out bits: AVX2 vs scalar")
    assert_equal(bits["avx2"][1], bits["scalar"][1], name="residual bits: AVX2 vs scalar")


# ---- bad input ------------------------------------------------------------------------------------------

def _bad_cases():
    """(args, kwargs, the argument the error names[, the error: ValueError unless given])."""
    x, w = torch.randn(3, 8), torch.randn(8)
    xb, wb = x.bfloat16(), w.bfloat16()
    return [
        ((torch.tensor(1.0), w), {}, "x"),
        ((x.double(), w.double()), {}, "x"),
        ((x.half(), w.half()), {}, "x"),  # no f16 on the CPU
        ((x.to(torch.int32), w), {}, "x"),
        (([[1.0] * 8], w), {}, "x", TypeError),  # not a tensor at all
        ((x, [1.0] * 8), {}, "weight", TypeError),
        ((x, None), {}, "weight", TypeError),
        ((x, torch.randn(9)), {}, "weight"),
        ((x, torch.randn(2, 4)), {}, "weight"),
        ((x, wb), {}, "weight"),  # f32 x takes an f32 weight only
        ((xb, w.half()), {}, "weight"),
        ((x, torch.randn(16)[::2]), {}, "weight"),
        ((x, w), dict(residual=torch.randn(3, 9)), "residual"),
        ((x, w), dict(residual=torch.randn(24)), "residual"),
        ((x, w), dict(residual=xb), "residual"),
        ((x, w), dict(residual=torch.randn(1, 8).expand(3, 8)), "residual"),  # rows would overlap
        ((x, w), dict(residual=x), "residual"),  # the residual is written: it may not be x
        ((x, w, float("nan")), {}, "eps"),
        ((x, w, -1.0), {}, "eps"),
        ((x.to("meta"), w), {}, "x"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    args, kwargs, name, *error = _bad_cases()[case]
    if len(args) == 2:
        args = args + (EPS,)
    with pytest.raises(error[0] if error else ValueError, match=name):
        ops.rms_norm(*args, **kwargs)


@pytest.mark.parametrize("make_out, name", [
    (lambda x: torch.empty(3, 9), "out"),
    (lambda x: torch.empty(3, 8).bfloat16(), "out"),
    (lambda x: torch.empty(3, 16)[:, ::2], "out"),
    (lambda x: torch.empty(1, 8).expand(3, 8), "out"),
    (lambda x: x.view(-1)[1:].as_strided((3, 8), (8, 1)), "out"),  # overlaps x without being x
])
def test_bad_out(make_out, name):
    x = torch.randn(4, 8)[:3]
    with pytest.raises(ValueError, match=name):
        _C.rms_norm(x, torch.randn(8), make_out(x), None, EPS)


def test_out_overlapping_weight_is_rejected():
    buf = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out"):
        _C.rms_norm(torch.randn(3, 8), buf[2], buf[:3], None, EPS)


# ---- torch.library ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 5, 33, generator=gen).to(dtype).to(device)
    w = torch.randn(33, generator=gen).to(dtype).to(device)
    op = torch.ops.flashlm.rms_norm.default
    torch.library.opcheck(op, (x, w, EPS))
    torch.library.opcheck(op, (x, w, EPS, torch.randn(2, 5, 33, generator=gen).to(dtype).to(device)))


def test_compiles():
    x, w, r = torch.randn(4, 64), torch.randn(64), torch.randn(4, 64)
    r_eager = r.clone()
    expected = ops.rms_norm(x, w, EPS, residual=r_eager)
    # aot_eager: the op's fake and its declared mutation traced, without compiling C++ here.
    fn = torch.compile(lambda x, w, r: ops.rms_norm(x, w, EPS, residual=r) * 2, fullgraph=True, backend="aot_eager")
    assert_equal(fn(x, w, r), expected * 2, name="compiled out")
    assert_equal(r, r_eager, name="compiled residual")


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_and_strided(dtype):
    # Offsets of one element defeat the 16-byte loads: the element-wise path, same results.
    gen = torch.Generator().manual_seed(15)
    d = 4096
    x_buf = torch.randn(6, d + 1, generator=gen).to(dtype).cuda()
    w = torch.randn(d, generator=gen).to(dtype).cuda()
    for x in (x_buf[:, 1:], x_buf[:, :d], x_buf.view(-1)[1:1 + 5 * d].view(5, d)):
        r = torch.randn(x.shape, generator=gen).to(dtype).cuda()
        r_aligned = r.clone()
        out = ops.rms_norm(x, w, EPS, residual=r)
        expected = ops.rms_norm(x.contiguous(), w, EPS, residual=r_aligned)
        # The sums run in another order on the element-wise path: f32 rounding, then at most one ulp of dtype.
        assert_close(out, expected, **rel(1e-5 if dtype == torch.float32 else 2.0**-7), name="unaligned out")
        assert_equal(r, r_aligned, name="unaligned residual")


@pytest.mark.cuda
def test_cuda_device_mismatch_is_rejected():
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(torch.randn(2, 8, device="cuda"), torch.randn(8), EPS)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(torch.randn(2, 8, device="cuda"), torch.randn(8, device="cuda"), EPS, residual=torch.randn(2, 8))



# ---- the model's inference path -----------------------------------------------------------------------------

def test_module_uses_the_kernel_only_without_grad():
    from flashlm.models.transformer import RMSNorm
    gen = torch.Generator().manual_seed(16)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    x = torch.randn(3, 48, generator=gen)
    y = norm(x)  # grad enabled, weight requires grad: the torch formula, differentiable
    assert y.grad_fn is not None
    y.sum().backward()
    assert norm.weight.grad is not None
    with torch.no_grad():
        assert_equal(norm(x), ops.rms_norm(x, norm.weight, 1e-5), name="no_grad: the kernel")
        assert_close(norm(x), y.detach(), **rel(1e-6), name="kernel vs torch formula")
        xb = x.bfloat16()
        assert norm(xb).dtype == torch.float32  # bf16 x, f32 weight: torch's promotion, kept
        nb = RMSNorm(48, 1e-5).bfloat16()
        assert_equal(nb(xb), hf_formula(xb, nb.weight, 1e-5), name="bf16 module")


def paged_logits(model, tokens):
    """forward_paged logits for one sequence's prefill of every token."""
    from flashlm.models.transformer import PagedBatch
    cfg = model.cfg
    T = tokens.numel()
    caches = [(torch.zeros(2, 16, cfg.n_kv_head, cfg.head_dim), torch.zeros(2, 16, cfg.n_kv_head, cfg.head_dim))
              for _ in range(cfg.n_layer)]
    batch = PagedBatch(positions=torch.arange(T), slot_mapping=torch.arange(T),
                       block_table=torch.tensor([[0, 1]], dtype=torch.int32),
                       seq_lens=torch.tensor([T], dtype=torch.int32),
                       cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32), max_seqlen_q=T, logits_rows=torch.arange(T))
    return model.forward_paged(tokens, batch, caches)


def test_paged_forward_fused_residual_equals_unfused(monkeypatch):
    from flashlm.models import ModelConfig, Transformer
    from flashlm.models.transformer import Block, RMSNorm
    cfg = ModelConfig(arch="llama", vocab_size=53, n_layer=3, n_head=4, n_kv_head=2, d_model=64, seq_len=32)
    torch.manual_seed(17)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (1.0 if p.dim() == 1 else 0.2))
    tokens = torch.randint(0, cfg.vocab_size, (19,))
    fused = paged_logits(model, tokens)

    def unfused(self, x, rope, batch, cache):
        x = x + self.attn.forward_paged(self.attn_norm(x), rope, batch, cache)
        return x + self.mlp(self.mlp_norm(x))

    with monkeypatch.context() as m:
        m.setattr(Block, "forward_paged", unfused)
        assert_equal(fused, paged_logits(model, tokens), name="fused residual vs x + a, then the norm")
        m.setattr(RMSNorm, "_native", lambda self, x, w, *others: False)
        torch_logits = paged_logits(model, tokens)
    # The torch formula sums in another order: f32 rounding, carried through three blocks.
    assert_close(fused, torch_logits, rtol_of_max=1e-5, name="kernel vs torch formula")
