"""Model and weight file formats: GGUF reading, and loading HF directories and GGUF files as flashlm models;
the runtime's Tokenizer (tokenizer), training checkpoints read back (checkpoint), and the converters that write
GGUF files (quantize_file, from a GGUF file or an HF directory read by hf_source).

    loaded = load_model("model.gguf")     # or an HF model directory, or a training checkpoint / run folder
    loaded.model, loaded.tokenizer, loaded.config

The loaders are imported on first use, so `flashlm.io.gguf` stays a light import.
"""

import importlib
import os

__all__ = ["LoadedModel", "load_checkpoint_model", "load_gguf", "load_hf", "load_model"]

_LAZY = {"LoadedModel": "flashlm.io.loaded", "load_gguf": "flashlm.io.gguf_model", "load_hf": "flashlm.io.hf",
         "load_checkpoint_model": "flashlm.io.checkpoint_model"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm.io' has no attribute {name!r}")


def load_model(path, **kwargs):
    """A GGUF file (load_gguf), an HF model directory (load_hf) or a flashlm training checkpoint or run folder
    (load_checkpoint_model) as a LoadedModel; keyword arguments go to that loader."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return __getattr__("load_hf")(path, **kwargs)
        return __getattr__("load_checkpoint_model")(path, **kwargs)  # a run folder
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"PK":  # torch.save's zip container: a training checkpoint
            return __getattr__("load_checkpoint_model")(path, **kwargs)
        return __getattr__("load_gguf")(path, **kwargs)
    raise ValueError(f"path: {path!r} is not a GGUF file, model directory or training checkpoint")
