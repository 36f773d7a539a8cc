"""Importance scores for structured pruning: one per K/V group of each layer's attention (the group's query
heads with it) and one per MLP channel of each layer, higher meaning keep.

    scores = magnitude_scores(model, p=2)             # {"heads": [n_layer, n_kv_head], "ffn": [n_layer, d_ff]}
    scores = activation_scores(model, batches)        # forward hooks over calibration batches
    scores = taylor_scores(model, batches)            # sum of |w * dL/dw| over calibration batches

What a structure owns: a K/V group its query heads' q rows (and biases), its k and v rows (and biases) and
its heads' o columns; an MLP channel its gate and up rows (gpt2: its fc row and bias) and its down (proj)
column. The per-head q/k norms (qwen3, gemma3) are shared by every head and belong to none.

- magnitude: the Lp norm (p = 1 or 2) of all the weights a structure owns.
- activation: what a structure adds to the residual stream on calibration text: a head's output through its
  o columns, ||o_h(y_h)||_2, averaged over tokens and summed over a group's heads; an MLP channel's
  sqrt(mean h_c^2) * ||down[:, c]||_2 (its activation's RMS times the norm of the column it is multiplied
  into: the RMS of its contribution, as Wanda weighs |w| by ||x||).
- taylor: the first-order estimate of the loss change when a structure is removed, summed elementwise:
  sum over its weights of |w * dL/dw|, accumulated over calibration batches (next-token cross-entropy).
"""

from __future__ import annotations

import torch

from flashlm.models import Transformer


def _block_keys(model: Transformer, layer: int) -> dict:
    """The state-dict names of block `layer`'s weights that a head group or MLP channel owns, by role."""
    p = f"blocks.{layer}."
    gpt2 = model.cfg.arch == "gpt2"
    keys = {"q": p + "attn.q.weight", "k": p + "attn.k.weight", "v": p + "attn.v.weight", "o": p + "attn.o.weight",
            "in": [p + "mlp.fc.weight"] if gpt2 else [p + "mlp.gate.weight", p + "mlp.up.weight"],
            "in_bias": [p + "mlp.fc.bias"] if gpt2 else [],
            "out": p + ("mlp.proj.weight" if gpt2 else "mlp.down.weight")}
    if model.cfg.qkv_bias:
        keys |= {"q_bias": p + "attn.q.bias", "k_bias": p + "attn.k.bias", "v_bias": p + "attn.v.bias"}
    return keys


def structure_sums(model: Transformer, values: dict) -> dict:
    """Sums of nonnegative elementwise values (state-dict name -> tensor of the parameter's shape) over each
    structure: {"heads": float64 [n_layer, n_kv_head], "ffn": float64 [n_layer, d_ff]}."""
    cfg = model.cfg
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    heads = torch.zeros(cfg.n_layer, KV, dtype=torch.float64)
    ffn = torch.zeros(cfg.n_layer, cfg.d_ff, dtype=torch.float64)
    for i in range(cfg.n_layer):
        keys = _block_keys(model, i)
        v = {role: values[k].double() for role, k in keys.items() if isinstance(k, str)}
        per_head = v["q"].reshape(H, -1).sum(1) + v["o"].reshape(-1, H, hd).sum((0, 2))
        if "q_bias" in v:
            per_head += v["q_bias"].reshape(H, hd).sum(1)
        per_group = per_head.reshape(KV, H // KV).sum(1)
        for role in ("k", "v", "k_bias", "v_bias"):
            if role in v:
                per_group += v[role].reshape(KV, -1).sum(1)
        heads[i] = per_group
        ffn[i] = values[keys["out"]].double().sum(0)
        for key in keys["in"]:
            ffn[i] += values[key].double().sum(1)
        for key in keys["in_bias"]:
            ffn[i] += values[key].double()
    return {"heads": heads, "ffn": ffn}


def magnitude_scores(model: Transformer, p: int = 2) -> dict:
    """The Lp norm (p 1 or 2) of each structure's weights."""
    if p not in (1, 2):
        raise ValueError(f"p: the magnitude norm must be 1 or 2, got {p!r}")
    with torch.no_grad():
        values = {name: t.detach().double().abs() ** p for name, t in model.state_dict().items()
                  if name.startswith("blocks.")}
    sums = structure_sums(model, values)
    return {k: s ** (1.0 / p) for k, s in sums.items()}


def _next_token_loss(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens 1.. of each row of batch (int64 [B, T + 1]) from those before."""
    _, loss = model(batch[:, :-1], batch[:, 1:])
    return loss


def activation_scores(model: Transformer, batches) -> dict:
    """Each structure's mean contribution to the residual stream over the calibration batches (int64
    [B, T + 1], as taylor_scores takes them: the first T tokens of each row go through the model)."""
    cfg = model.cfg
    H, hd = cfg.n_head, cfg.head_dim
    head_sum = torch.zeros(cfg.n_layer, H, dtype=torch.float64)
    chan_sq = torch.zeros(cfg.n_layer, cfg.d_ff, dtype=torch.float64)
    tokens = [0]

    def attn_hook(layer, o):
        def hook(module, args):
            y = args[0].detach().reshape(-1, H, hd).double()  # [tokens, H, hd]: each head's output before o
            w = o.weight.detach().double().reshape(-1, H, hd)  # [d, H, hd]
            for h in range(H):
                head_sum[layer, h] += (y[:, h] @ w[:, h].T).norm(dim=-1).sum()
        return hook

    def mlp_hook(layer):
        def hook(module, args):
            chan_sq[layer] += args[0].detach().reshape(-1, cfg.d_ff).double().square().sum(0)
        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        out = block.mlp.proj if cfg.arch == "gpt2" else block.mlp.down
        handles.append(block.attn.o.register_forward_pre_hook(attn_hook(i, block.attn.o)))
        handles.append(out.register_forward_pre_hook(mlp_hook(i)))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch[:, :-1])  # the inputs taylor_scores sees
                tokens[0] += batch[:, :-1].numel()
    finally:
        for handle in handles:
            handle.remove()
    if not tokens[0]:
        raise ValueError("batches: no calibration tokens")
    heads = (head_sum / tokens[0]).reshape(cfg.n_layer, cfg.n_kv_head, -1).sum(-1)
    ffn = torch.stack([(chan_sq[i] / tokens[0]).sqrt() * _out_weight(model, i).detach().double().norm(dim=0)
                       for i in range(cfg.n_layer)])
    return {"heads": heads, "ffn": ffn}


def _out_weight(model: Transformer, layer: int) -> torch.Tensor:
    mlp = model.blocks[layer].mlp
    return mlp.proj.weight if model.cfg.arch == "gpt2" else mlp.down.weight


def taylor_scores(model: Transformer, batches) -> dict:
    """sum over batches and over each structure's weights of |w * dL/dw| (L: the batch's mean next-token
    cross-entropy; batches int64 [B, T + 1])."""
    params = {name: p for name, p in model.named_parameters() if name.startswith("blocks.")}
    wanted = {name: p.requires_grad for name, p in params.items()}
    # float32 sums of a few nonnegative terms each: the weights' size again, not twice it
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(_next_token_loss(model, batch), list(params.values()), allow_unused=True)
            for (name, p), g in zip(params.items(), grads):
                if g is not None:
                    acc[name] += (p.detach().float() * g.float()).abs()
            seen += 1
    finally:
        for name, p in params.items():
            p.requires_grad_(wanted[name])
    if not seen:
        raise ValueError("batches: no calibration batches")
    return structure_sums(model, acc)
