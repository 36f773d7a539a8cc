"""Model and weight file formats: GGUF reading, and loading HF directories and GGUF files as flashlm models.

    loaded = load_model("model.gguf")     # or an HF model directory
    loaded.model, loaded.tokenizer, loaded.config
"""

from flashlm.io.hf import load_hf
from flashlm.io.loaded import LoadedModel

__all__ = ["LoadedModel", "load_hf"]
