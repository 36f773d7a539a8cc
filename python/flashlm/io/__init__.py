"""Model and weight file formats: GGUF reading, and loading HF directories and GGUF files as flashlm models.

    loaded = load_model("model.gguf")     # or an HF model directory
    loaded.model, loaded.tokenizer, loaded.config

The loaders are imported on first use, so `flashlm.io.gguf` stays a light import.
"""

import importlib
import os

__all__ = ["LoadedModel", "load_gguf", "load_hf", "load_model"]

_LAZY = {"LoadedModel": "flashlm.io.loaded", "load_gguf": "flashlm.io.gguf_model", "load_hf": "flashlm.io.hf"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm.io' has no attribute {name!r}")


def load_model(path, **kwargs):
    """A GGUF file (load_gguf) or an HF model directory (load_hf) as a LoadedModel; keyword arguments go to
    that loader."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return __getattr__("load_hf")(path, **kwargs)
    if os.path.isfile(path):
        return __getattr__("load_gguf")(path, **kwargs)
    raise ValueError(f"path: {path!r} is neither a GGUF file nor a model directory")
