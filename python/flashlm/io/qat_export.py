"""`flashlm quantize RUN OUT --method qat`: a run trained with `flashlm train --qat int8|int4|int4-asym` (or
fine-tuned with `flashlm finetune --method full --qat ...`) written as a quantized checkpoint
(flashlm.io.quantized_checkpoint) whose Int4Linear or Int8Linear layers compute exactly the forward the run
trained with: the same quantizer, group size and symmetry (int8: per-channel weights, per-token activations).
A run trained with a GGML block type (--qat Q8_0|Q4_0|Q4_K) has no quantized checkpoint form: convert_qat gives
its GGUFLinear layers in memory, and writing it as a GGUF file is not available yet (a clear error says so).
"""

from __future__ import annotations


def qat_setting(path: str) -> tuple[str, int | None]:
    """(qat type, group size or None) that the checkpoint at path (a file or run folder) was trained with."""
    from flashlm.io.checkpoint import find_checkpoint, load_checkpoint
    from flashlm.quant.qat import check_qat_setting

    ckpt = load_checkpoint(find_checkpoint(path))
    saved = ckpt.get("train_config") or ckpt.get("finetune") or {}
    if not isinstance(saved, dict) or saved.get("qat") is None:
        raise ValueError(f"input: {path!r} was not trained with --qat")
    qat, group_size = saved.get("qat"), saved.get("qat_group_size")
    check_qat_setting(qat, group_size)  # the file is untrusted
    return qat, group_size


def export_qat(input_path: str, output_path: str) -> dict:
    """Writes input_path's model with its block linears as the int4 or int8 layers it trained for; returns
    {"qat", "group_size" (None for int8), "symmetric", "layers"}."""
    from flashlm.io import load_model
    from flashlm.io.quantized_checkpoint import save_quantized_model
    from flashlm.quant.qat import apply_qat, convert_qat

    from flashlm.quant.qat import GGUF_QAT_TYPES

    qat, group_size = qat_setting(input_path)
    if qat in GGUF_QAT_TYPES:
        raise NotImplementedError(f"qat: a run trained with --qat {qat} cannot be written as a quantized checkpoint "
                                  "(its layers are GGML blocks); a GGUF export is not available yet")
    loaded = load_model(input_path)
    apply_qat(loaded.model, qat, group_size)
    layers = convert_qat(loaded.model)
    save_quantized_model(loaded, output_path, "qat")
    first = loaded.model.get_submodule(layers[0])
    return {"qat": qat, "group_size": getattr(first, "group_size", None), "symmetric": getattr(first, "symmetric", True),
            "layers": len(layers)}
