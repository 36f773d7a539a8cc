"""Structured pruning: a smaller dense model cut out of a bigger one, with a new config.

    pruned, plan = prune_model(model, heads_keep=0.5, ffn_keep=0.75, drop_layers=[3], score="magnitude")
    prune_file("model.gguf", "small.gguf", heads_keep=0.5, score="taylor", calib_data="text.txt")  # `flashlm prune`

What goes:
- attention heads, as whole K/V groups: a group's query heads go with its k and v heads, so the GQA ratio
  n_head / n_kv_head is the model's. heads_keep is the fraction of K/V groups kept and must leave a whole
  number of them. ModelConfig has one head count for every layer, so every layer keeps the same number of
  groups (each its own best ones). gpt2's head_dim is d_model / n_head by definition (HF's GPT-2 has no
  other), so its heads cannot be pruned.
- MLP channels: each layer keeps its round(ffn_keep * d_ff) best (gate and up rows with the down column;
  gpt2's fc row, fc bias and proj column), the same count in every layer (one d_ff).
- whole layers, by index (drop_layers). Gemma's local/global pattern follows the layer index, so a drop is
  refused where a kept layer would change kind.

Kept structures stay in their order, so the smaller model computes exactly what the original computes with
the pruned heads' o columns, the pruned channels' down columns and the dropped layers' outputs zeroed.
Scores: flashlm.train.prune_scores. A quantized (GGUF) model is dequantized to float32 first: pruning
changes the matrices' shapes, so the result is written anew (quantize it again with --type).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flashlm.io.loaded import empty_model
from flashlm.models import ModelConfig, Transformer
from flashlm.train.prune_scores import activation_scores, magnitude_scores, taylor_scores

SCORES = ("magnitude", "activation", "taylor")
OUT_FORMATS = ("run", "hf", "gguf")


@dataclass
class PrunePlan:
    """What the pruned model keeps of the original, in the original's indices."""
    layers: list  # kept layers, ascending
    groups: list  # per original layer: the kept K/V groups, ascending
    channels: list  # per original layer: the kept MLP channels, ascending


def check_keep(value, name: str) -> float:
    """A keep fraction in (0, 1]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: must be a fraction in (0, 1], got {value!r}")
    return float(value)


def kept_group_count(cfg: ModelConfig, heads_keep) -> int:
    """The K/V groups every layer keeps: heads_keep * n_kv_head, which must be a whole number."""
    heads_keep = check_keep(heads_keep, "heads_keep")
    if heads_keep == 1:
        return cfg.n_kv_head
    if cfg.arch == "gpt2":
        raise NotImplementedError("heads_keep: gpt2's head_dim is d_model / n_head, so its heads cannot be pruned")
    count = heads_keep * cfg.n_kv_head
    if abs(count - round(count)) > 1e-6 or round(count) < 1:
        ratio = cfg.n_head // cfg.n_kv_head
        allowed = ", ".join(f"{k}/{cfg.n_kv_head}" for k in range(1, cfg.n_kv_head + 1))
        raise ValueError(f"heads_keep: {heads_keep} of {cfg.n_kv_head} K/V groups is not a whole number of groups; "
                         f"each group carries {ratio} query heads (n_head {cfg.n_head}), so heads_keep must be one "
                         f"of {allowed}")
    return round(count)


def check_drop_layers(cfg: ModelConfig, drop_layers) -> list:
    """The layers kept after dropping `drop_layers` (distinct indices in [0, n_layer), at least one layer
    left, and no kept gemma layer changing between local and global)."""
    drop = list(drop_layers or ())
    for i in drop:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.n_layer:
            raise ValueError(f"drop_layers: layer {i!r} is not in [0, {cfg.n_layer}) (the model has "
                             f"{cfg.n_layer} layers)")
    if len(set(drop)) != len(drop):
        raise ValueError(f"drop_layers: a layer is named twice in {drop}")
    kept = [i for i in range(cfg.n_layer) if i not in drop]
    if not kept:
        raise ValueError(f"drop_layers: dropping all {cfg.n_layer} layers leaves no model")
    for new, old in enumerate(kept):
        if cfg.local_layer(new) != cfg.local_layer(old):
            raise ValueError(f"drop_layers: {cfg.arch}'s layer {old} would become layer {new}, which attends "
                             f"{'locally' if cfg.local_layer(new) else 'globally'} where it attended "
                             f"{'locally' if cfg.local_layer(old) else 'globally'}; drop whole periods of the pattern")
    return kept


def parse_layers(text: str) -> list:
    """"3,5" -> [3, 5] (--drop-layers); ValueError naming the flag for anything else."""
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--drop-layers: expected layer indices separated by commas, got {text!r}") from None


def structure_scores(model: Transformer, score: str, batches=None, p: int = 2) -> dict:
    """{"heads": [n_layer, n_kv_head], "ffn": [n_layer, d_ff]} by the named score."""
    if score not in SCORES:
        raise ValueError(f"score: must be one of {SCORES}, got {score!r}")
    if score == "magnitude":
        return magnitude_scores(model, p)
    if not batches:
        raise ValueError(f"calib_data: the {score} score needs calibration text")
    return activation_scores(model, batches) if score == "activation" else taylor_scores(model, batches)


def _top(scores: torch.Tensor, k: int) -> list:
    """The indices of the k highest scores, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def plan_pruning(model: Transformer, heads_keep=1.0, ffn_keep=1.0, drop_layers=(), score="magnitude",
                 batches=None, p: int = 2) -> PrunePlan:
    """What to keep: every argument checked, then each layer's best K/V groups and channels by `score`."""
    if score not in SCORES:
        raise ValueError(f"score: must be one of {SCORES}, got {score!r}")
    cfg = model.cfg
    if cfg.moe:
        raise NotImplementedError(f"model: structured pruning covers dense MLPs, not {cfg.arch}'s experts")
    groups = kept_group_count(cfg, heads_keep)
    channels = max(1, round(check_keep(ffn_keep, "ffn_keep") * cfg.d_ff))
    layers = check_drop_layers(cfg, drop_layers)
    if groups == cfg.n_kv_head and channels == cfg.d_ff:  # nothing to rank
        every = [list(range(cfg.n_kv_head)), list(range(cfg.d_ff))]
        return PrunePlan(layers, [every[0]] * cfg.n_layer, [every[1]] * cfg.n_layer)
    s = structure_scores(model, score, batches, p)
    return PrunePlan(layers, [_top(s["heads"][i], groups) for i in range(cfg.n_layer)],
                     [_top(s["ffn"][i], channels) for i in range(cfg.n_layer)])


def pruned_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    ratio = cfg.n_head // cfg.n_kv_head
    groups = len(plan.groups[0])
    return ModelConfig.from_dict({**cfg.to_dict(), "n_layer": len(plan.layers), "n_head": groups * ratio,
                                  "n_kv_head": groups, "head_dim": cfg.head_dim, "d_ff": len(plan.channels[0])})


def _prune_block(cfg: ModelConfig, state: dict, old: str, new: str, groups: list, channels: list) -> dict:
    """Block `old`'s tensors (state-dict prefix) cut down to the kept groups and channels, under prefix `new`."""
    H, KV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    ratio = H // KV
    heads = torch.tensor([g * ratio + j for g in groups for j in range(ratio)])
    kv, chan = torch.tensor(groups), torch.tensor(channels)
    out = {}
    for name, t in state.items():
        if not name.startswith(old):
            continue
        role = name[len(old):]
        if role in ("attn.q.weight", "attn.q.bias"):
            t = t.reshape(H, hd, *t.shape[1:])[heads].reshape(-1, *t.shape[1:])
        elif role in ("attn.k.weight", "attn.v.weight", "attn.k.bias", "attn.v.bias"):
            t = t.reshape(KV, hd, *t.shape[1:])[kv].reshape(-1, *t.shape[1:])
        elif role == "attn.o.weight":
            t = t.reshape(t.shape[0], H, hd)[:, heads].reshape(t.shape[0], -1)
        elif role in ("mlp.gate.weight", "mlp.up.weight", "mlp.fc.weight", "mlp.fc.bias"):
            t = t[chan]
        elif role in ("mlp.down.weight", "mlp.proj.weight"):
            t = t[:, chan]
        out[new + role] = t.clone()
    return out


def apply_plan(model: Transformer, plan: PrunePlan) -> Transformer:
    """The smaller Transformer (eval mode, float32 weights on the CPU) that `plan` cuts out of `model`."""
    cfg = model.cfg
    state = {k: t.detach().to("cpu", torch.float32) for k, t in model.state_dict().items()}
    new_state = {k: t.clone() for k, t in state.items() if not k.startswith("blocks.")}
    for new, old in enumerate(plan.layers):
        new_state |= _prune_block(cfg, state, f"blocks.{old}.", f"blocks.{new}.", plan.groups[old], plan.channels[old])
    small = empty_model(pruned_config(cfg, plan), attn_impl=model.blocks[0].attn.attn_impl)
    small.load_state_dict(new_state, assign=True)
    if cfg.rotary:  # the original's tables (a GGUF file's own rope factors, say), not ones computed afresh
        small.rope_cos, small.rope_sin = model.rope_cos.clone(), model.rope_sin.clone()
    return small.eval()


def prune_model(model: Transformer, heads_keep=1.0, ffn_keep=1.0, drop_layers=(), score="magnitude",
                batches=None, p: int = 2):
    """(the pruned Transformer, its PrunePlan). batches: calibration batches (int64 [B, T + 1]) for the
    activation and taylor scores."""
    plan = plan_pruning(model, heads_keep, ffn_keep, drop_layers, score, batches, p)
    return apply_plan(model, plan), plan


# ----------------------------------------------------------------------------------------- files


def calibration_batches(tokenizer, path, n_samples: int = 16, seq_len: int = 128, batch_size: int = 4) -> list:
    """Up to n_samples windows of seq_len + 1 tokens of the text file `path`, in batches (int64 [B, seq_len + 1])."""
    for name, value in (("calib_samples", n_samples), ("calib_seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if tokenizer is None:
        raise ValueError("calib_data: the model has no tokenizer to read calibration text with")
    if not os.path.isfile(path):
        raise ValueError(f"calib_data: {path!r} is not a file")
    with open(path, encoding="utf-8", errors="replace") as f:
        # enough text for the windows at any tokenizer's rate (a token spans at most a few dozen characters)
        ids = tokenizer.encode(f.read(64 * n_samples * (seq_len + 1)), add_special_tokens=False)
    if len(ids) < 2:
        raise ValueError(f"calib_data: {path!r} holds {len(ids)} tokens; at least 2 are needed")
    window = min(seq_len, len(ids) - 1) + 1
    rows = [ids[s:s + window] for s in range(0, len(ids) - window + 1, window)][:n_samples]
    data = torch.tensor(rows, dtype=torch.int64)
    return list(data.split(batch_size))


def float_model(loaded) -> Transformer:
    """A loaded model (flashlm.io.load_model) as a float32 Transformer: GGUF blocks dequantized."""
    from flashlm import ops
    from flashlm.quant.gguf_embedding import GGUFEmbedding
    from flashlm.quant.gguf_linear import GGUFLinear

    model, cfg = loaded.model, loaded.config
    state = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, GGUFLinear):
            shape = (module.out_features, module.in_features)
            state[prefix + "weight"] = ops.dequantize(module.raw, module.ggml_type, shape, out_dtype=torch.float32)
            if module.bias is not None:
                state[prefix + "bias"] = module.bias
        elif isinstance(module, GGUFEmbedding):
            shape = (module.num_embeddings, module.embedding_dim)
            state[prefix + "weight"] = ops.dequantize(module.raw, module.ggml_type, shape, out_dtype=torch.float32)
    for name, t in model.state_dict().items():
        state.setdefault(name, t)
    wanted = cfg.state_shapes()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise NotImplementedError(f"model: cannot read {missing[0]!r} as a float tensor (int8/int4 models are not "
                                  f"pruned)")
    out = empty_model(cfg)
    out.load_state_dict({k: state[k].detach().to("cpu", torch.float32) for k in wanted}, assign=True)
    if cfg.rotary:
        out.rope_cos, out.rope_sin = model.rope_cos.clone(), model.rope_sin.clone()
    return out.eval()


def out_format(out: str, fmt=None) -> str:
    """The form OUT is written in: `fmt` if given, else a GGUF file for a .gguf name and a run folder otherwise."""
    if fmt is None:
        fmt = "gguf" if str(out).lower().endswith(".gguf") else "run"
    if fmt not in OUT_FORMATS:
        raise ValueError(f"format: must be one of {OUT_FORMATS}, got {fmt!r}")
    return fmt


def check_out(model_path, out, fmt: str) -> None:
    """ValueError where writing OUT would overwrite the model being pruned or mix into another run's checkpoints."""
    from flashlm.io.checkpoint import list_checkpoints

    if os.path.realpath(out) == os.path.realpath(model_path):
        raise ValueError(f"out: {out!r} is the model being pruned; write the pruned model elsewhere")
    if fmt == "run" and list_checkpoints(out):
        raise ValueError(f"out: {out!r} holds checkpoints of another run; choose another folder")
    if fmt != "gguf" and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} is a file, not a folder")
    if fmt == "gguf" and os.path.isdir(out):
        raise ValueError(f"out: {out!r} is a folder, not a GGUF file")


def save_model(model: Transformer, out, fmt: str, tokenizer_json=None, eos_token_id=None, type: str = "F16") -> str:
    """Writes `model` as a run folder (a checkpoint the runtime, `flashlm export` and `flashlm distill --student`
    read), an HF directory or a GGUF file of mix `type`."""
    from flashlm.train.export import export_gguf, export_hf

    fmt = out_format(out, fmt)
    if fmt == "gguf":
        export_gguf(model, model.cfg, tokenizer_json, out, type=type, eos_token_id=eos_token_id)
    elif fmt == "hf":
        export_hf(model, model.cfg, tokenizer_json, out, eos_token_id=eos_token_id)
    else:
        from flashlm.train.checkpoint import CheckpointManager

        state = {"model": {k: t.detach().cpu() for k, t in model.state_dict().items()},
                 "model_config": model.cfg.to_dict(), "tokenizer": tokenizer_json, "eos_token_id": eos_token_id}
        CheckpointManager(out, keep=1).save(state, step=0)
    return fmt


def prune_file(model_path, out, heads_keep=1.0, ffn_keep=1.0, drop_layers=(), score="magnitude", p: int = 2,
               calib_data=None, calib_samples: int = 16, calib_seq_len: int = 128, fmt=None, type: str = "F16") -> dict:
    """`flashlm prune`: loads any model flashlm loads (a GGUF one dequantized), prunes it, writes OUT; returns
    a summary (the configs and parameter counts before and after, and the plan)."""
    from flashlm.io import load_model

    fmt = out_format(out, fmt)
    check_out(model_path, out, fmt)
    loaded = load_model(model_path)
    model = float_model(loaded)
    batches = None
    if calib_data is not None and score != "magnitude":
        seq_len = min(calib_seq_len, model.cfg.seq_len)
        batches = calibration_batches(loaded.tokenizer, calib_data, calib_samples, seq_len)
    pruned, plan = prune_model(model, heads_keep, ffn_keep, drop_layers, score, batches, p)
    tok = loaded.tokenizer.to_str() if loaded.tokenizer is not None else None
    eos = loaded.eos_token_ids[0] if loaded.eos_token_ids else None
    save_model(pruned, out, fmt, tok, eos, type)
    return {"before": model.cfg, "after": pruned.cfg, "params_before": model.num_params(),
            "params_after": pruned.num_params(), "plan": plan, "format": fmt}


def describe(summary: dict) -> str:
    """The lines `flashlm prune` prints."""
    a, b = summary["before"], summary["after"]
    sizes = ", ".join(f"{k} {getattr(a, k)} -> {getattr(b, k)}" for k in ("n_layer", "n_head", "n_kv_head", "d_ff")
                      if getattr(a, k) != getattr(b, k)) or "nothing removed"
    pb, pa = summary["params_before"], summary["params_after"]
    return f"{a.arch}: {sizes}; parameters {pb:,} -> {pa:,} ({100 * pa / pb:.1f}%)"


__all__ = ["PrunePlan", "SCORES", "apply_plan", "calibration_batches", "check_drop_layers", "check_keep",
           "float_model", "kept_group_count", "parse_layers", "plan_pruning", "prune_file", "prune_model",
           "save_model", "structure_scores"]
