"""Dynamic loss scaling for float16 training, and the optimizer step that goes with it.

float16 gradients underflow to zero below ~6e-8, so the loss is multiplied by a large scale before backward
and the gradients divided by it before the update. When a gradient overflows (inf or NaN) the step is
skipped and the scale halved; after `growth_interval` clean steps in a row it doubles, so it settles just
below the largest scale that does not overflow (the policy of torch.cuda.amp.GradScaler and of apex).

    scaler = LossScaler(enabled=precision == "fp16")
    scaler.scale(loss).backward()          # per micro-step
    dp.finish_gradients()
    grad_norm = scaler.step(dp, grad_clip) # None when the step was skipped

bfloat16 has float32's exponent range, so bf16 and fp32 use a disabled scaler: scale() is the identity and
step() only clips and steps.
"""

import math


class LossScaler:
    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale: must be a positive finite number, got {init_scale}")
        if growth_interval <= 0:
            raise ValueError(f"growth_interval: must be positive, got {growth_interval}")
        if not growth_factor > 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"growth_factor must be > 1 and backoff_factor in (0, 1), got {growth_factor}, "
                             f"{backoff_factor}")
        self.enabled = enabled
        self.loss_scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.clean_steps = 0  # consecutive steps without overflow since the scale last changed
        self.skipped_steps = 0

    def scale(self, loss):
        return loss * self.loss_scale if self.enabled else loss

    def step(self, dp, grad_clip: float):
        """Unscales the (already averaged) gradients, skips the update if any is inf/NaN on any rank,
        otherwise clips them to global norm `grad_clip` (0: no clipping) and steps. Updates the scale.
        Returns the gradient norm before clipping, or None for a skipped step."""
        if self.enabled:
            dp.unscale_(1.0 / self.loss_scale)
            if dp.found_inf():
                self.loss_scale *= self.backoff_factor
                self.clean_steps = 0
                self.skipped_steps += 1
                return None
        grad_norm = dp.clip_grad_norm_(grad_clip)
        dp.step()
        if self.enabled:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.loss_scale *= self.growth_factor
                self.clean_steps = 0
        return grad_norm

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "loss_scale": self.loss_scale, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict):
        if bool(state.get("enabled")) != self.enabled:
            raise ValueError(f"scaler state: saved with enabled={state.get('enabled')}, this scaler has "
                             f"enabled={self.enabled} (the precision changed)")
        scale = float(state["loss_scale"])
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scaler state: loss_scale must be positive and finite, got {scale}")
        self.loss_scale = scale
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
