"""`flashlm export` of a run folder: a training run's model, or a fine-tuning run's adapter and merged model.

    export_run("runs/sft", peft_dir="out/peft", lora_gguf="out/adapter.gguf", gguf_path="out/merged.gguf",
               hf_dir="out/merged-hf", type="Q8_0")

A fine-tuning run's checkpoint holds the adapter and the base's path, not the base: the base is loaded again
(as `flashlm finetune` loaded it) and the adapter put on it. Outputs: the adapter in HF PEFT's format (LoRA,
prompt and prefix tuning on Llama-family models), as a llama.cpp GGUF adapter (LoRA on llama and qwen2), and
the model with the adapter folded in, as GGUF (the `type` mix; by default a GGUF base's own) or HF safetensors
(LoRA or full fine-tuning of a float or GGUF base; a GGUF base's blocks are dequantized, the adapter added and
the result quantized again). A training run's checkpoint exports as flashlm.train.export.export_checkpoint does.
"""

from __future__ import annotations

from flashlm.io.checkpoint import find_checkpoint, load_checkpoint
from flashlm.train.export import export_checkpoint, export_gguf, export_hf

_OUTPUTS = "a GGUF output path, an HF output directory, a PEFT directory or a GGUF adapter path"


def load_finetuned(ckpt: dict, where: str):
    """(the base's LoadedModel with the run's adapter on its model, the SFTModel, the FinetuneConfig)."""
    from flashlm.train.finetune import FinetuneConfig, SFTModel, attach_method, load_adapter, load_base

    ft = FinetuneConfig.from_dict(ckpt["finetune"])
    loaded = load_base(ft.model, ft.method)
    if loaded.config.to_dict() != ckpt.get("model_config"):
        raise ValueError(f"{where}: its base {ft.model!r} is not the model the run tuned (its config differs)")
    model = SFTModel(loaded.model, attach_method(loaded.model, ft))
    try:
        load_adapter(model, ckpt.get("adapter"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return loaded, model.eval(), ft


def export_run(path, gguf_path=None, hf_dir=None, type: str | None = None, peft_dir=None, lora_gguf=None,
               progress: bool = False) -> dict:
    """Export a checkpoint or run folder (see the module's doc); returns what was written, by output. type: the
    GGUF mix; None: a fine-tuning run's GGUF base's own (its general.file_type), otherwise F32."""
    if all(p is None for p in (gguf_path, hf_dir, peft_dir, lora_gguf)):
        raise ValueError(f"export: give {_OUTPUTS}")
    path = find_checkpoint(path)
    ckpt = load_checkpoint(path)
    where = f"checkpoint {path}"
    if not isinstance(ckpt.get("finetune"), dict):
        if peft_dir is not None or lora_gguf is not None:
            raise ValueError(f"{where}: is a training run's, with no adapter (--peft and --lora-gguf export a "
                             "`flashlm finetune` run's)")
        return export_checkpoint(path, gguf_path=gguf_path, hf_dir=hf_dir, type=type or "F32", progress=progress)
    loaded, model, ft = load_finetuned(ckpt, where)
    written = {}
    if peft_dir is not None:
        from flashlm.train.peft import save_peft

        if ft.method == "full":
            raise ValueError(f"{where}: a full fine-tuning run has no adapter; export it with --gguf or --hf")
        save_peft(model.tuned, peft_dir, base_model_name_or_path=ft.model)
        written["peft"] = str(peft_dir)
    if lora_gguf is not None:
        from flashlm.train.lora_gguf import export_lora_gguf

        if ft.method not in ("lora", "qlora"):
            raise ValueError(f"{where}: --lora-gguf writes a LoRA adapter; this run's method is {ft.method}")
        written["lora_gguf"] = export_lora_gguf(loaded.model, lora_gguf)
    if gguf_path is not None or hf_dir is not None:
        written |= _export_merged(loaded, ft, where, gguf_path, hf_dir, type, progress)
    return written


def _export_merged(loaded, ft, where, gguf_path, hf_dir, mix, progress) -> dict:
    from flashlm.train.finetune import merged_state_dict

    if ft.method not in ("lora", "qlora", "full"):
        raise ValueError(f"{where}: a {ft.method} run has no merged form (--gguf and --hf need a lora, qlora or full "
                         f"run)")
    int_layers = [n for n, m in loaded.model.named_modules() if type(m).__name__ in ("Int4Linear", "Int8Linear")]
    if int_layers:
        raise NotImplementedError(f"{where}: the base {ft.model!r} was quantized to int4/int8 on load ({int_layers[0]}"
                                  f", ...); merging into it is not supported (export the adapter with --lora-gguf "
                                  f"or --peft, or tune a float or GGUF base)")
    state = merged_state_dict(loaded.model)
    tok = loaded.tokenizer
    tokenizer_json = tok.to_str() if tok is not None else None
    eos = tok.eos_token_id if tok is not None else None
    written = {}
    if hf_dir is not None:
        written["hf"] = export_hf(state, loaded.config, tokenizer_json, hf_dir, eos_token_id=eos)
    if gguf_path is not None:
        mix = mix or base_mix(ft.model, where)
        written["gguf"] = export_gguf(state, loaded.config, tokenizer_json, gguf_path, type=mix, eos_token_id=eos,
                                      progress=progress)
    return written


def base_mix(base_path: str, where: str) -> str:
    """The quantization mix of a GGUF base (its general.file_type), F32 for any other base."""
    import os

    from flashlm.io.gguf import GGUFFile
    from flashlm.quant.mix import MIXES

    if not (os.path.isfile(base_path) and base_path.endswith(".gguf")):
        return "F32"
    with GGUFFile(base_path) as f:
        file_type = f.metadata.get("general.file_type")
    by_file_type = {int(ft): name for name, (_, ft) in MIXES.items()}
    if file_type not in by_file_type:
        raise ValueError(f"{where}: the base {base_path!r} has general.file_type {file_type!r}, no mix flashlm "
                         f"writes; give --type")
    return by_file_type[file_type]
