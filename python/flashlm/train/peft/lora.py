"""LoRA: flashlm.models.lora, where the runtime finds it too (re-exported here for the trainer's users)."""

from flashlm.models.lora import (TARGET_NAMES, LoRALinear, apply_lora, check_lora_arguments,  # noqa: F401
                                 lora_layers, merge_and_unload, merge_lora, parse_targets, target_modules,
                                 unmerge_lora)
