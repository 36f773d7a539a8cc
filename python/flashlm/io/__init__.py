"""Model and weight file formats: GGUF reading, and loading HF directories and GGUF files as flashlm models.

    loaded = load_model("model.gguf")     # or an HF model directory
    loaded.model, loaded.tokenizer, loaded.config
"""

import os

from flashlm.io.gguf_model import load_gguf
from flashlm.io.hf import load_hf
from flashlm.io.loaded import LoadedModel

__all__ = ["LoadedModel", "load_gguf", "load_hf", "load_model"]


def load_model(path, **kwargs) -> LoadedModel:
    """A GGUF file (load_gguf) or an HF model directory (load_hf); keyword arguments go to that loader."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_hf(path, **kwargs)
    if os.path.isfile(path):
        return load_gguf(path, **kwargs)
    raise ValueError(f"path: {path!r} is neither a GGUF file nor a model directory")
