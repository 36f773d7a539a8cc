"""One rank of test_parallel_start: ModelParallel started from a Transformer built on the meta device.

    python mesh_start_worker.py OUT_DIR ARCH DP TP PP CP ZERO_STAGE   # RANK, WORLD_SIZE, MASTER_ADDR/PORT set

The rank builds the model with deferred_init under seed 7 and starts ModelParallel on it, then builds the same
model the usual way (Transformer(cfg) with the same seed, and shard_model's tensor-parallel part where tp > 1) as
the reference, and writes to OUT_DIR/rank{RANK}.pt: for every parameter it holds whether its value equals the
reference's slice bit for bit; whether the generator stands where the usual start-up leaves it; whether the
full model is still on the meta device (but
for the modules a stage holds as its own, without tp); the bytes of the parameters this rank holds against the full
model's; and on rank 0 whether full_state_dict() equals the reference's state dict bit for bit (after
load_full_state_dict of it, which must change nothing). Under DataParallel's ZeRO-3 (dp alone) also: the
checkpoint made tensor by tensor onto rank 0 against the one the whole model gave, and a resume from it
(save_and_resume).
"""

import os
import sys
import types

import torch


def main():
    import flashlm.dist as fd
    from flashlm.models import ModelConfig, Transformer
    from flashlm.parallel import shard_model
    from flashlm.parallel.materialize import deferred_init
    from flashlm.train.parallel_state import tensor_bytes
    from flashlm.train.parallel_step import ModelParallel

    out, arch = sys.argv[1], sys.argv[2]
    dp, tp, pp, cp, zero = map(int, sys.argv[3:8])
    torch.set_num_threads(1)
    fd.init(timeout=60.0)
    heads = dict(n_head=2) if arch == "gpt2" else dict(n_head=4, n_kv_head=2)
    mcfg = ModelConfig(arch=arch, vocab_size=96, n_layer=4, d_model=32, seq_len=16, **heads)
    sizes = dict(dp=dp, tp=tp, pp=pp, cp=cp)
    cfg = types.SimpleNamespace(**sizes, sequence_parallel=False, seq_len=16, batch_size=2, micro_batches=2,
                                pp_schedule="1f1b", zero_stage=zero, weight_decay=0.1)
    torch.manual_seed(7)
    model, init = deferred_init(lambda: Transformer(mcfg))
    make_optimizer = lambda groups: torch.optim.AdamW(groups, lr=1e-3)  # noqa: E731
    if tp * pp * cp == 1:  # ZeRO-3 over data parallelism alone: the trainer's DataParallel
        model.make_buffers()
        return check_data_parallel(out, mcfg, model, init, make_optimizer)
    mp = ModelParallel(model, cfg, sizes, make_optimizer, init=init)
    rng_after = torch.get_rng_state()
    held_bytes = tensor_bytes(mp.part)  # (ZeRO-3: its units are empty between uses)

    torch.manual_seed(7)  # the usual start-up: the full model on every rank, then its tp part
    ref = Transformer(mcfg)
    if tp > 1:
        shard_model(ref, mp.mesh.tp)
    result = {"rng_equal": torch.equal(torch.get_rng_state(), rng_after),
              # the full model's parameters: no storage but for those a pipeline stage holds as its own
              "full_on_meta": all(p.is_meta for n, p in model.named_parameters()
                                  if tp > 1 or n not in mp.params),
              "held_bytes": held_bytes, "full_bytes": tensor_bytes(ref), "equal": {}}
    full = ref.state_dict()
    with mp._zero3_gathered():
        for name, p in mp.params.items():
            result["equal"][name] = torch.equal(p.detach(), mp._slice(name, full[name]))
    gathered = mp.full_state_dict()
    mp.load_full_state_dict(full)
    again = mp.full_state_dict()
    if mp.keeps_full:
        result["full_state_equal"] = (list(gathered) == list(full) and all(torch.equal(gathered[n], full[n])
                                                                           for n in full)
                                      and all(torch.equal(again[n], full[n]) for n in full))
    else:
        result["full_state_equal"] = gathered == {} and again == {}
    mp.close()
    torch.save(result, os.path.join(out, f"rank{fd.get_rank()}.pt"))
    fd.destroy()


def check_data_parallel(out, mcfg, model, init, make_optimizer):
    """DataParallel(zero_stage=3, init=...): its shards and then full_parameters() against the usual model."""
    import flashlm.dist as fd
    from flashlm.models import Transformer
    from flashlm.train.parallel import DataParallel

    dp = DataParallel(model, make_optimizer, zero_stage=3, param_groups=model.param_groups(0.1), init=init)
    rng_after = torch.get_rng_state()
    held_bytes = sum(p.numel() * p.element_size() for g in dp.param_groups for p in g["params"])
    torch.manual_seed(7)
    ref = Transformer(mcfg)
    full = ref.state_dict()
    # between uses the model's parameters are empty: the shards are all a rank holds
    result = {"rng_equal": torch.equal(torch.get_rng_state(), rng_after),
              "full_on_meta": all(p.numel() == 0 for p in model.parameters()),
              "held_bytes": held_bytes, "full_bytes": sum(t.numel() * 4 for t in full.values()), "equal": {}}
    with dp.full_parameters():
        for name, p in model.named_parameters():
            result["equal"][name] = torch.equal(p.detach(), full[name])
    gathered = dp.full_state_dict()
    if fd.get_rank() == 0:
        result["full_state_equal"] = list(gathered) == list(full) and all(torch.equal(gathered[n], full[n])
                                                                          for n in full)
    else:
        result["full_state_equal"] = gathered == {}
    save_and_resume(out, mcfg, model, dp, make_optimizer, result)
    dp.close()
    torch.save(result, os.path.join(out, f"rank{fd.get_rank()}.pt"))
    fd.destroy()


def save_and_resume(out, mcfg, model, dp, make_optimizer, result):
    """ZeRO-3 over data parallelism, after a step: the checkpoint made tensor by tensor onto rank 0 (full_state_dict,
    state_dict(rank0_only=True)) against the one every rank made with the whole model gathered (full_parameters,
    state_dict()), bit for bit, with no unit gathered for it; then a fresh start (another seed) resumed from it,
    memory-mapped, with no unit gathered, steps with the losses and values of the run that went on."""
    import flashlm.dist as fd
    from flashlm.models import Transformer
    from flashlm.parallel.materialize import deferred_init
    from flashlm.train.parallel import DataParallel
    from train_parallel_worker import states_equal

    rank = fd.get_rank()

    def train(dp, model, steps):
        losses = []
        for step in steps:
            g = torch.Generator().manual_seed(100 * step + rank)  # this rank's share of the step's batch
            idx = torch.randint(0, mcfg.vocab_size, (2, mcfg.seq_len + 1), generator=g)
            _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
            loss.backward()
            dp.finish_gradients()
            dp.clip_grad_norm_(1.0)
            dp.step()
            dp.zero_grad()
            losses.append(loss.item())
        return losses

    train(dp, model, [0])
    with dp.full_parameters():  # the old checkpoint: the whole model gathered on every rank
        old_model = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
    old_optimizer = dp.state_dict()
    dp.reset_peak_materialized_bytes()
    saved = {"model": dp.full_state_dict(), "optimizer": dp.state_dict(rank0_only=True)}
    result["save_gathers_no_unit"] = dp.peak_materialized_bytes == 0
    path = os.path.join(out, "checkpoint.pt")
    if rank == 0:
        result["save_equal"] = (list(saved["model"]) == list(old_model)
                                and all(torch.equal(saved["model"][n], v) for n, v in old_model.items())
                                and states_equal(saved["optimizer"], old_optimizer))
        torch.save(saved, path)
    else:
        result["save_equal"] = saved["model"] == {} and saved["optimizer"]["state"] == {}
    fd.all_reduce(torch.zeros(1))  # the file is written
    want = train(dp, model, [1, 2])
    want_final = dp.full_state_dict()

    torch.manual_seed(99)
    model2, init2 = deferred_init(lambda: Transformer(mcfg))
    model2.make_buffers()
    dp2 = DataParallel(model2, make_optimizer, zero_stage=3, param_groups=model2.param_groups(0.1), init=init2)
    state = torch.load(path, mmap=True)
    dp2.load_full_state_dict(state["model"])
    dp2.load_state_dict(state["optimizer"])
    result["resume_gathers_no_unit"] = dp2.peak_materialized_bytes == 0
    got = train(dp2, model2, [1, 2])
    final = dp2.full_state_dict()
    result["resume_equal"] = got == want and list(final) == list(want_final) and all(
        torch.equal(final[n], want_final[n]) for n in want_final)
    dp2.close()


if __name__ == "__main__":
    main()
