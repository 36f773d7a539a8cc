"""Model-parallel start-up without the full model (flashlm.parallel.materialize, ModelParallel's init=): each rank
builds the model on the meta device and makes only the values of the parameters it holds, replaying the
initialisation's draws in their order, and gathers full tensors one at a time for checkpoints.

tests/mesh_start_worker.py on each layout checks, on every rank: the parameters it holds equal the slice of a
model built the usual way with the same seed, bit for bit; the generator ends where the usual start-up leaves
it; the full model holds no storage; the rank holds less than the model (tp, pp: about 1 / (tp * pp) of it); and
full_state_dict() gives the usual model's state dict on rank 0 (nothing elsewhere), load_full_state_dict of it
changing nothing. Under DataParallel's ZeRO-3 (2 and 3 ranks) the checkpoint is made tensor by tensor onto rank 0
(bit-equal to the one every rank made from the whole model gathered, no block gathered for it) and a fresh start
resumed from it (memory-mapped, each rank copying its slices) continues with the losses of the run that went on.
test_tensor_parallel_stage_makes_only_its_layers: a tp x pp rank makes its stage's layers alone.
"""

import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_zero_mesh import run_workers  # noqa: E402

from flashlm.models import ModelConfig, Transformer  # noqa: E402
from flashlm.parallel import shard_model  # noqa: E402
from flashlm.parallel.materialize import deferred_init, materialize, materialize_part, start_part  # noqa: E402
from flashlm.train.parallel_state import tensor_bytes  # noqa: E402

# name: (arch, dp, tp, pp, cp, zero stage)
LAYOUTS = {
    "tp2": ("gpt2", 1, 2, 1, 1, 0),
    "pp2": ("llama", 1, 1, 2, 1, 0),
    "tp2_pp2": ("llama", 1, 2, 2, 1, 0),
    "cp2": ("llama", 1, 1, 1, 2, 0),
    "zero3_dp2_pp2": ("gpt2", 2, 1, 2, 1, 3),
    "zero3_dp2_tp2": ("llama", 2, 2, 1, 1, 3),
    "zero3_dp2": ("llama", 2, 1, 1, 1, 3),  # DataParallel's ZeRO-3: each rank makes its shards
    "zero3_dp3": ("gpt2", 3, 1, 1, 1, 3),  # slices that cut parameters at uneven places
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_deferred_init_replays_the_constructor(arch):
    """One process: the replayed values are Transformer(cfg)'s with the same seed, bit for bit, taken once each in
    the constructor's order of final values, and the generator ends where the constructor leaves it."""
    heads = dict(n_head=2) if arch == "gpt2" else dict(n_head=4, n_kv_head=2)
    cfg = ModelConfig(arch=arch, vocab_size=96, n_layer=3, d_model=32, seq_len=16, **heads)
    torch.manual_seed(11)
    ref = Transformer(cfg)
    ref_after = torch.rand(4)
    torch.manual_seed(11)
    model, init = deferred_init(lambda: Transformer(cfg))
    assert all(p.is_meta for p in model.parameters())
    got = []
    init.replay(lambda name, value: got.append((name, value.clone())))
    assert torch.equal(torch.rand(4), ref_after)
    want = dict(ref.named_parameters())
    assert sorted(n for n, _ in got) == sorted(want)
    for name, value in got:
        assert torch.equal(value, want[name]), name
    model.make_buffers()
    for name, b in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], b), name


def test_deferred_init_replays_ops_that_read_the_value():
    """A draw followed by ops that read it (uniform_, erfinv_, mul_, add_, clamp_: the inverse-CDF truncated normal)
    between two plain draws: the reading ops run on the tensor they follow, and the values are the
    constructor's."""
    class Chained(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(7, 5)
            self.b = torch.nn.Parameter(torch.empty(6, 3))
            with torch.no_grad():
                self.b.uniform_(-0.6, 0.6).erfinv_().mul_(0.5 * 2 ** 0.5).add_(0.1).clamp_(min=-0.4, max=0.4)
            torch.nn.init.normal_(self.a.weight)

    torch.manual_seed(3)
    ref = Chained()
    torch.manual_seed(3)
    _, init = deferred_init(Chained)
    got = {}
    init.replay(lambda name, value: got.__setitem__(name, value.clone()))
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], p), name


def test_deferred_init_refuses_what_it_cannot_replay():
    class Plain(torch.nn.Module):  # a parameter made by a factory and never set in place
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    class Rejection(torch.nn.Module):  # torch's trunc_normal_ draws until the values fall inside: not replayable
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 4))
            torch.nn.init.trunc_normal_(self.w)

    for module in (Plain, Rejection):
        with pytest.raises(ValueError, match="no in-place op sets"):
            deferred_init(module)


@pytest.mark.parametrize("arch, tp_rank, stage", [("llama", 1, 0), ("gpt2", 0, 1), ("llama", 0, 2)])
def test_tensor_parallel_stage_makes_only_its_layers(arch, tp_rank, stage):
    """One process, a tp 2 rank's part of a 3-stage pipeline: start_part makes no parameter (the part is on the meta
    device), materialize_part makes the stage's alone, each the tp slice of Transformer(cfg)'s value with the same
    seed (shard_model's), bit for bit; the generator ends where that start-up leaves it; and the rank holds the
    bytes the layout says: the stage's layers and its ends, split tensors at 1 / tp."""
    heads = dict(n_head=2) if arch == "gpt2" else dict(n_head=4, n_kv_head=2)
    cfg = ModelConfig(arch=arch, vocab_size=96, n_layer=5, d_model=32, seq_len=16, tie_embeddings=False, **heads)
    tp = types.SimpleNamespace(rank=tp_rank, size=2)  # (no collective runs before forward)
    layers = [[0, 1], [2, 3], [4]][stage]
    torch.manual_seed(5)
    model, init = deferred_init(lambda: Transformer(cfg))
    part, part_init = start_part(model, tp, False, "cpu")
    assert all(p.is_meta for p in part.parameters())
    ends = ("tok_emb.", "pos_emb.") if stage == 0 else ("final_norm.", "lm_head.") if stage == 2 else ()
    names = {n for n, _ in part.named_parameters()
             if n.startswith(ends) or (n.startswith("blocks.") and int(n.split(".")[1]) in layers)}
    materialize_part(part, init, names, part_init, "cpu")
    rng_after = torch.get_rng_state()
    torch.manual_seed(5)
    ref = shard_model(Transformer(cfg), tp)
    assert torch.equal(torch.get_rng_state(), rng_after)
    want = dict(ref.named_parameters())
    for name, p in part.named_parameters():
        if name in names:
            assert torch.equal(p, want[name]), name
        else:
            assert p.is_meta, name
    # the layout's figure from the full model's shapes: each held tensor whole, or 1 / tp of it where it is split
    with torch.device("meta"):
        full = dict(Transformer(cfg).named_parameters())
    expected = sum(full[n].numel() * 4 // (tp.size if part.tp_dims[n] is not None else 1) for n in names)
    assert tensor_bytes(part) == expected
    assert expected < sum(p.numel() * 4 for p in full.values()) * (len(layers) + 1) / cfg.n_layer / tp.size


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_model_parallel_start_is_bit_equal_without_the_full_model(name, tmp_path):
    arch, dp, tp, pp, cp, zero = LAYOUTS[name]
    n = dp * tp * pp * cp
    run_workers("mesh_start_worker.py", [tmp_path, arch, dp, tp, pp, cp, zero], n)
    for r in range(n):
        res = torch.load(tmp_path / f"rank{r}.pt")
        what = f"{name}, rank {r}"
        assert res["equal"] and all(res["equal"].values()), f"{what}: {res['equal']}"
        assert res["rng_equal"], what
        assert res["full_on_meta"], what
        assert res["full_state_equal"], what
        if tp * pp * cp == 1:  # DataParallel's ZeRO-3: its checkpoint and resume without the whole model
            assert res["save_equal"], f"{what}: the checkpoint differs from the one the whole model gave"
            assert res["save_gathers_no_unit"] and res["resume_gathers_no_unit"], what
            assert res["resume_equal"], f"{what}: the resumed run differs from the one that went on"
        if tp * pp > 1 or zero == 3:  # the tp shard of the stage (about 1 / (tp * pp)), or the ZeRO-3 shards
            assert res["held_bytes"] < res["full_bytes"] * 0.75, f"{what}: {res['held_bytes']} of {res['full_bytes']}"
        else:  # cp alone: every rank holds the whole model
            assert res["held_bytes"] == res["full_bytes"], what


def test_zero3_full_state_dict_round_trip_and_bad_input():
    """One process: ZeRO-3's full_state_dict is the model's state_dict (the same names, order and values, after a
    step); load_full_state_dict of another model's values makes the shards those; a missing tensor or a tensor of
    another shape is refused naming it."""
    from flashlm.train.parallel import DataParallel

    cfg = ModelConfig(arch="llama", vocab_size=96, n_layer=2, d_model=32, seq_len=16, n_head=4, n_kv_head=2)
    torch.manual_seed(3)
    model, other = Transformer(cfg), Transformer(cfg)
    want = {k: v.clone() for k, v in other.state_dict().items()}
    dp = DataParallel(model, lambda groups: torch.optim.AdamW(groups, lr=1e-2), zero_stage=3,
                      param_groups=model.param_groups(0.1))
    idx = torch.randint(0, 96, (2, 17))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    dp.finish_gradients()
    dp.step()
    with dp.full_parameters():
        stepped = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = dp.full_state_dict()
    assert list(full) == list(stepped) and all(torch.equal(full[k], v) for k, v in stepped.items())
    dp.load_full_state_dict(want)
    with dp.full_parameters():
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="^full: .*'final_norm.weight'"):
        dp.load_full_state_dict({k: v for k, v in want.items() if k != "final_norm.weight"})
    with pytest.raises(ValueError, match="^full: tok_emb.weight has shape"):
        dp.load_full_state_dict({**want, "tok_emb.weight": torch.zeros(95, 32)})
    dp.close()


def test_materialize_keeps_gradient_hooks():
    """A hook registered on a meta parameter (sequence parallelism's all-reduce of a norm's gradient, registered by
    the tp part's constructor) still runs once the parameter has its value."""
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 2)
    lin.weight.register_hook(lambda g: g * 2)
    w, b = torch.randn(2, 3), torch.randn(2)
    materialize(lin, {"weight": w, "bias": b})
    x = torch.randn(4, 3)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, 2 * torch.ones(4, 2).T @ x)
    assert torch.equal(lin.bias.grad, torch.full((2,), 4.0))
    assert torch.equal(lin.weight.detach(), w)
