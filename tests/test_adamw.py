"""The fused AdamW kernel (flashlm.ops.adamw_step_) and optimizer (flashlm.train.optim.AdamW).

References: torch.optim.AdamW step for step (f32), a float64 re-implementation of one step (bf16 params on the
CPU, f16 on CUDA), and the scalar kernel bit for bit (AVX2, CUDA). Sizes 1, 7 and 1000003 cover the vector tails.
Moments and f32 parameters are held relative to the tensor's scale (they pass near 0; compare.assert_close).
"""

import copy

import pytest
import torch

import flashlm.ops as ops
from compare import assert_close, assert_equal
from conftest import per_kernel, use_isa
from flashlm.train.optim import AdamW

ISAS = [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]


def make_groups(gen):
    sizes = [[1, 7, 1000003], [(17, 64), 33], [(5, 3)]]
    hyper = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0), dict(lr=5e-2, weight_decay=1.0)]
    params = [[torch.randn(s if isinstance(s, tuple) else (s,), generator=gen) for s in g] for g in sizes]
    return params, hyper


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_adamw_f32(isa, maximize, restore_isa):
    ops.set_cpu_isa(isa)
    gen = torch.Generator().manual_seed(1)
    init, hyper = make_groups(gen)
    ours = [[p.clone().requires_grad_() for p in g] for g in init]
    theirs = [[p.clone().requires_grad_() for p in g] for g in init]
    kw = dict(betas=(0.9, 0.95), eps=1e-8, maximize=maximize)
    opt = AdamW([dict(params=g, **h) for g, h in zip(ours, hyper)], **kw)
    ref = torch.optim.AdamW([dict(params=g, **h) for g, h in zip(theirs, hyper)], foreach=False, **kw)
    flat_ours = [p for g in ours for p in g]
    flat_theirs = [p for g in theirs for p in g]
    for step in range(20):
        for a, b in zip(flat_ours, flat_theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        flat_ours[1].grad = flat_theirs[1].grad = None if step % 5 == 3 else flat_ours[1].grad  # skipped sometimes
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(flat_ours, flat_theirs)):
        assert_close(a.detach(), b.detach(), rtol_of_max=1e-6, name=f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[a][key], ref.state[b][key], rtol_of_max=1e-6, name=f"{key} {i}")
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"])


@pytest.mark.skipif("avx2" not in ISAS, reason="needs AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100003])
def test_avx2_matches_scalar_bitwise(dtype, n, restore_isa):
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen).to(dtype)
    m0 = torch.randn(n, generator=gen) * 0.1
    v0 = torch.rand(n, generator=gen) * 0.01
    grads = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    results = {}
    for isa in ("scalar", "avx2"):
        ops.set_cpu_isa(isa)
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        for step, g in enumerate(grads, start=1):
            ops.adamw_step_([p], [g], [m], [v], step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.05, maximize=step == 2)
        results[isa] = (p, m, v)
    for name, a, b in zip("pmv", results["scalar"], results["avx2"]):
        assert_equal(b, a, name=f"{name}: AVX2 vs scalar")


def adamw_reference_f64(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    return p - lr / (1 - beta1**step) * m / denom, m, v


# Half an ulp of each narrow parameter dtype (relative), and of its smallest subnormal (absolute).
HALF_ULP = {torch.bfloat16: (2.0**-8, 1e-30), torch.float16: (2.0**-11, 2.0**-25)}


@pytest.mark.parametrize("device,isa,dtype,steps", per_kernel(cpu=[(torch.bfloat16, 5)], cuda=[(torch.float16, 1)]))
def test_narrow_params_against_float64(device, isa, dtype, steps, restore_isa):
    use_isa(isa)
    gen = torch.Generator().manual_seed(7)
    n = 20011
    p = torch.randn(n, generator=gen).to(dtype).to(device)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    hp = dict(lr=5e-2, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.1)
    rel, floor = HALF_ULP[dtype]
    for step in range(1, steps + 1):
        g = torch.randn(n, generator=gen).to(dtype).to(device)
        ref_p, ref_m, ref_v = adamw_reference_f64(p, g, m, v, step, **hp)
        ops.adamw_step_([p], [g], [m], [v], step, lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                        weight_decay=hp["wd"])
        assert p.dtype == dtype and m.dtype == torch.float32
        assert_close(m, ref_m, rtol_of_max=1e-6, name=f"exp_avg step {step}")
        assert_close(v, ref_v, rtol_of_max=1e-6, name=f"exp_avg_sq step {step}")
        # Within the dtype's rounding: half an ulp (plus the f32 arithmetic's error).
        assert_close(p, ref_p, atol=floor, rtol=rel * (1 + 1e-4), name=f"param step {step}")


def train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(13, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    opt = AdamW([dict(params=[a[0]], weight_decay=0.0), dict(params=[a[1]], lr=1e-2)])
    train(opt, a, gen, 3)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = AdamW([dict(params=[b[0]], weight_decay=0.0), dict(params=[b[1]], lr=1e-2)])
    opt_b.load_state_dict(opt.state_dict())
    train(opt, a, torch.Generator().manual_seed(4), 3)
    train(opt_b, b, torch.Generator().manual_seed(4), 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(opt.state[x]["exp_avg_sq"], opt_b.state[y]["exp_avg_sq"])


def test_loads_torch_state_dict_and_torch_loads_ours():
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(1001), torch.randn(8, 9)]
    theirs = [p.clone().requires_grad_() for p in init]
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05, foreach=False)
    train(ref, theirs, gen, 4)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = AdamW(ours, lr=1e-2, weight_decay=0.05)
    opt.load_state_dict(ref.state_dict())
    train(ref, theirs, torch.Generator().manual_seed(6), 4)
    train(opt, ours, torch.Generator().manual_seed(6), 4)
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), rtol_of_max=1e-6, name="param after loading torch's state")
        assert float(opt.state[a]["step"]) == 8.0
    back = [p.detach().clone().requires_grad_() for p in ours]
    ref_back = torch.optim.AdamW(back, lr=1e-2, weight_decay=0.05, foreach=False)
    ref_back.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch keeps the loaded tensors: copy, as a file does
    train(ref_back, back, torch.Generator().manual_seed(8), 2)
    train(opt, ours, torch.Generator().manual_seed(8), 2)
    for a, b in zip(ours, back):
        assert_close(a.detach(), b.detach(), rtol_of_max=1e-6, name="param after torch loaded ours")


def test_bf16_state_stays_float32_through_state_dict():
    p = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW([p])
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    q = p.detach().clone().requires_grad_()
    opt_q = AdamW([q])
    opt_q.load_state_dict(opt.state_dict())
    assert opt_q.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt_q.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def good_args(n=10, dtype=torch.float32):
    return dict(params=[torch.zeros(n, dtype=dtype)], grads=[torch.ones(n, dtype=dtype)], exp_avgs=[torch.zeros(n)],
                exp_avg_sqs=[torch.zeros(n)], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("change, name", [
    (dict(grads=[torch.ones(9)]), "grad"),
    (dict(exp_avgs=[torch.zeros(11)]), "exp_avg"),
    (dict(exp_avg_sqs=[torch.zeros(10).bfloat16()]), "exp_avg_sq"),
    (dict(grads=[torch.ones(10).bfloat16()]), "grad"),
    (dict(params=[torch.zeros(10, dtype=torch.float64)], grads=[torch.ones(10, dtype=torch.float64)]), "params"),
    (dict(params=[torch.zeros(10).half()], grads=[torch.ones(10).half()]), "params"),
    (dict(params=[torch.zeros(10, 2)[:, 0]]), "param"),
    (dict(grads=[torch.ones(20)[::2]]), "grad"),
    (dict(step=0), "step"),
    (dict(lr=-1.0), "lr"),
    (dict(beta2=1.0), "beta2"),
    (dict(eps=float("nan")), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grads=[]), "grads"),
    (dict(step=[1, 2]), "step"),
])
def test_bad_input_raises(change, name):
    args = good_args()
    args.update(change)
    with pytest.raises(ValueError, match=name):
        ops.adamw_step_(**args)


def test_optimizer_rejects_bad_hyperparameters():
    p = [torch.zeros(3, requires_grad=True)]
    for kw, name in [(dict(lr=-1), "lr"), (dict(betas=(0.9, 1.5)), "betas"), (dict(eps=-1), "eps"),
                     (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=name):
            AdamW(p, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 1000003])
def test_cuda_matches_cpu_scalar_bitwise(dtype, n, restore_isa):
    ops.set_cpu_isa("scalar")
    gen = torch.Generator().manual_seed(n)
    p, g = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    dev = [t.cuda() for t in (p, g, m, v)]
    hp = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    ops.adamw_step_([p], [g], [m], [v], **hp)
    ops.adamw_step_([dev[0]], [dev[1]], [dev[2]], [dev[3]], **hp)
    for name, a, b in zip("pmv", (p, m, v), dev):
        assert_equal(b.cpu(), a, name=f"{name}: CUDA vs the CPU scalar kernel")
