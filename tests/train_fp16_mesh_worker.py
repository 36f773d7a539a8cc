"""One rank of test_train_zero_mesh's fp16 runs: `flashlm train`'s Trainer with an overflow injected on one rank.

    python train_fp16_mesh_worker.py SETTINGS_JSON INJECT_RANK INJECT_STEP   # RANK, WORLD_SIZE, MASTER_* set

SETTINGS_JSON holds the TrainConfig values (the "tiny" preset's, overridden), the layout's sizes and ZeRO stage
among them. On global rank INJECT_RANK the gradients of step INJECT_STEP get an inf after finish_gradients (in
the first gradient tensor the rank owns), where no collective runs before the loss scaler's found_inf: only a
flag reduced over the whole mesh lets the other ranks see it. Each rank writes its own metrics (the loss scale
and whether the step was skipped, as that rank saw them) to OUT_DIR/rank{RANK}.json.
"""

import json
import os
import sys


def inject_overflow(trainer, step: int, first_grad) -> None:
    """After step `step`'s finish_gradients, element 0 of first_grad(trainer) (a gradient tensor) := inf."""
    finish = trainer.dp.finish_gradients

    def finish_and_overflow():
        finish()
        if trainer.step + 1 == step:
            first_grad(trainer).view(-1)[0] = float("inf")
    trainer.dp.finish_gradients = finish_and_overflow


def main():
    from flashlm.train.config import TrainConfig
    from flashlm.train.trainer import Trainer

    values, inject_rank, inject_step = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    trainer = Trainer(TrainConfig.from_sources("tiny", overrides=values))
    trainer.peak_flops = 1.0  # MFU is not compared: skip measuring the machine
    if trainer.rank == inject_rank:
        inject_overflow(trainer, inject_step, lambda t: t.dp.zero.grads()[0])
    trainer.train()
    trainer.dp.close()
    with open(os.path.join(values["out_dir"], f"rank{trainer.rank}.json"), "w") as f:
        json.dump(trainer.metrics, f)


if __name__ == "__main__":
    main()
