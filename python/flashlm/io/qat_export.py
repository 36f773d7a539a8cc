"""`flashlm quantize RUN OUT --method qat`: a run trained with `flashlm train --qat int4|int4-asym` (or fine-tuned
with `flashlm finetune --method full --qat ...`) written as an int4 checkpoint (flashlm.io.int4_checkpoint) whose
Int4Linear layers compute exactly the forward the run trained with: the same quantizer, group size and symmetry.

An int8 run has no int8 file format to go to; load_model(RUN, quantize="int8") gives its Int8Linear layers, the
same as flashlm.quant.qat.convert_qat.
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
    """Writes input_path's model with its block linears as the int4 layers it trained for; returns
    {"qat", "group_size", "symmetric", "layers"}."""
    from flashlm.io import load_model
    from flashlm.io.int4_checkpoint import save_int4_model
    from flashlm.quant.qat import apply_qat, convert_qat

    qat, group_size = qat_setting(input_path)
    if qat == "int8":
        raise ValueError(f"input: {input_path!r} trained for int8, which has no file format; load it with "
                         f"load_model(path, quantize='int8')")
    loaded = load_model(input_path)
    apply_qat(loaded.model, qat, group_size)
    layers = convert_qat(loaded.model)
    save_int4_model(loaded, output_path, "qat")
    first = loaded.model.get_submodule(layers[0])
    return {"qat": qat, "group_size": first.group_size, "symmetric": first.symmetric, "layers": len(layers)}
