"""`flashlm quantize RUN OUT --method qat`: a run trained with `flashlm train --qat int8|int4|int4-asym` (or
fine-tuned with `flashlm finetune --method full --qat ...`) written as a quantized checkpoint
(flashlm.io.quantized_checkpoint) whose Int4Linear or Int8Linear layers compute exactly the forward the run
trained with: the same quantizer, group size and symmetry (int8: per-channel weights, per-token activations);
a run trained with --qat-lsq, its learned steps as the layers' scales.
A run trained with a GGML block type (--qat Q8_0|Q4_0|Q4_K) has no such form: flashlm.train.export.export_qat_run
writes it as a GGUF file (OUT must end in .gguf) with block_linear_plan's types:
its block linears (attn_q/k/v/qkv, attn_output, ffn_gate/up/down; MoE experts are no QAT layers) in that type,
quantized by the same ggml-exact quantizer as the QAT forward (the same bytes), every other tensor F32.
"""

from __future__ import annotations


def qat_setting(path: str) -> tuple[str, int | None]:
    """(qat type, group size or None) that the checkpoint at path (a file or run folder) was trained with."""
    qat, group_size, _, _ = _trained_setting(path)
    return qat, group_size


def _trained_setting(path: str) -> tuple:
    """(qat type, group size or None, whether its steps were learned (--qat-lsq), the checkpoint)."""
    from flashlm.io.checkpoint import find_checkpoint, load_checkpoint
    from flashlm.quant.qat import check_lsq, check_qat_setting

    ckpt = load_checkpoint(find_checkpoint(path))
    saved = ckpt.get("train_config") or ckpt.get("finetune") or {}
    if not isinstance(saved, dict) or saved.get("qat") is None:
        raise ValueError(f"input: {path!r} was not trained with --qat")
    qat, group_size, lsq = saved.get("qat"), saved.get("qat_group_size"), saved.get("qat_lsq", False)
    check_qat_setting(qat, group_size)  # the file is untrusted
    check_lsq(qat, lsq)
    return qat, group_size, lsq, ckpt


def put_learned_steps(model, state, where: str) -> None:
    """Copies each learned step tensor of state (a run's model state) into model's QATLinear layers made with
    lsq, every name, shape and value checked."""
    import torch

    from flashlm.quant.qat import QATLinear

    if not isinstance(state, dict):
        raise ValueError(f"input: {where}: has no model state")
    for name, layer in model.named_modules():
        if not (isinstance(layer, QATLinear) and layer.lsq):
            continue
        key, want = f"{name}.weight_step", layer.weight_step
        step = state.get(key)
        if not isinstance(step, torch.Tensor) or step.shape != want.shape or not step.is_floating_point():
            got = tuple(step.shape) if isinstance(step, torch.Tensor) else type(step).__name__
            raise ValueError(f"input: {where}: {key}: expected float steps of shape {tuple(want.shape)}, got {got}")
        if not torch.isfinite(step).all():
            raise ValueError(f"input: {where}: {key}: holds a step that is not finite")
        with torch.no_grad():
            want.copy_(step)


def export_qat(input_path: str, output_path: str) -> dict:
    """Writes input_path's model with its block linears as the int4 or int8 layers it trained for; returns
    {"qat", "group_size" (None for int8), "symmetric", "layers"}."""
    from flashlm.io import load_model
    from flashlm.io.quantized_checkpoint import save_quantized_model
    from flashlm.quant.qat import GGUF_QAT_TYPES, apply_qat, convert_qat

    qat, group_size, lsq, ckpt = _trained_setting(input_path)
    if qat in GGUF_QAT_TYPES:
        raise ValueError(f"qat: a run trained with --qat {qat} has no quantized checkpoint form (its layers are GGML "
                         "blocks): write it as a GGUF file (flashlm.train.export.export_qat_run)")
    loaded = load_model(input_path)
    apply_qat(loaded.model, qat, group_size, lsq=lsq)
    if lsq:  # the scales it learned, not RTN's of its weights
        put_learned_steps(loaded.model, ckpt.get("model"), repr(input_path))
    layers = convert_qat(loaded.model)
    save_quantized_model(loaded, output_path, "qat")
    first = loaded.model.get_submodule(layers[0])
    return {"qat": qat, "group_size": getattr(first, "group_size", None), "symmetric": getattr(first, "symmetric", True),
            "layers": len(layers)}


# The GGUF weights a flashlm Transformer's block linears (flashlm.quant.w8a8.BLOCK_LINEARS) become.
_BLOCK_LINEAR_CATEGORIES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def block_linear_plan(qat: str, output_path: str):
    """export_gguf's per-tensor plan for a run trained with the GGML block type qat, written to output_path
    (checked: a .gguf path): GGUF name -> qat for a block linear's weight, None (F32) for the rest, experts
    and shared experts included (they are no QAT layers)."""
    from flashlm.quant.mix import allows_quantization, category

    if not str(output_path).lower().endswith(".gguf"):
        raise ValueError(f"output: a run trained with --qat {qat} is written as a GGUF file: give a .gguf path, "
                         f"got {output_path!r}")

    def type_of(name: str):
        linear = (name.startswith("blk.") and allows_quantization(name, 2)
                  and category(name) in _BLOCK_LINEAR_CATEGORIES and "_exps" not in name and "shexp" not in name)
        return qat if linear else None

    return type_of
