"""Parameter-efficient fine-tuning: one file per method (lora, prompt_tuning, prefix_tuning), and adapters in
HF PEFT's format (peft_format)."""

from flashlm.train.peft.common import trainable_parameters
from flashlm.train.peft.lora import (LoRALinear, apply_lora, lora_layers, merge_and_unload, merge_lora,
                                     unmerge_lora)
from flashlm.train.peft.peft_format import load_peft, save_peft
from flashlm.train.peft.prefix_tuning import PrefixTuning
from flashlm.train.peft.prompt_tuning import PromptTuning

__all__ = ["LoRALinear", "PrefixTuning", "PromptTuning", "apply_lora", "load_peft", "lora_layers",
           "merge_and_unload", "merge_lora", "save_peft", "trainable_parameters", "unmerge_lora"]
