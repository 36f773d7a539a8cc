"""The learning-rate schedule: linear warmup, then cosine decay to min_lr.

    lr = learning_rate(step, lr=3e-3, min_lr=3e-4, warmup=100, max_steps=2000)

Steps count from 0. During warmup, step s uses lr * (s + 1) / warmup, so the first update is already
non-zero and step warmup - 1 reaches the peak. From step `warmup` to `max_steps` the rate follows half a
cosine from lr down to min_lr; at and beyond max_steps it stays at min_lr.
"""

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    if warmup < 0 or max_steps <= 0:
        raise ValueError(f"warmup and max_steps: must be >= 0 and > 0, got {warmup} and {max_steps}")
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"min_lr: must be in [0, lr={lr}], got {min_lr}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)  # in [0, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
