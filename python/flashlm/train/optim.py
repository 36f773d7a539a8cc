"""AdamW on flashlm's fused kernel, a drop-in for torch.optim.AdamW.

The constructor, param groups and state_dict format are torch's (state per parameter: 'step' a float32
scalar tensor, 'exp_avg', 'exp_avg_sq'), so checkpoints move between the two. One difference: the moments
are always float32, also for bfloat16 or float16 parameters (torch keeps them in the parameter's dtype), and
loading a state_dict keeps them float32.
"""

from typing import Iterable, Tuple, Union

import torch

from flashlm.ops.optim import adamw_step_


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: each must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, amsgrad=False)
        super().__init__(params, defaults)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("amsgrad: not supported by flashlm's AdamW")
            # One kernel call per device in the group; the step counters advance in one foreach call.
            by_device, step_tensors = {}, []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("flashlm's AdamW does not take sparse gradients")
                if not p.is_contiguous():
                    raise ValueError(f"params: a parameter of shape {tuple(p.shape)} is not contiguous")
                state = self._state_of(p)
                lists = by_device.setdefault(p.device, ([], [], [], [], []))
                lists[0].append(p)
                lists[1].append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_avg_sq"])
                lists[4].append(len(step_tensors))
                step_tensors.append(state["step"])
            if not step_tensors:
                continue
            torch._foreach_add_(step_tensors, 1.0)
            steps = torch.stack(step_tensors).tolist()
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, indices in by_device.values():
                adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [int(steps[i]) for i in indices], float(group["lr"]),
                            beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded moments to each parameter's dtype; flashlm keeps them float32, so take them again
        # from the saved state at full precision. Copies, not the saved tensors themselves: a state_dict taken
        # from a live optimizer would otherwise share its moments and step with this one.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
