"""flashlm.models: decoder-only transformers (GPT-2 and Llama families) built on flashlm's kernels."""

from flashlm.models.config import ModelConfig
from flashlm.models.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
