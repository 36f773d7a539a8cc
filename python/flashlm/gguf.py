"""GGUF files: `GGUFFile(path)` reads metadata, tensor infos and tensor data (see flashlm.io.gguf)."""

from flashlm.io.gguf import GGUFError, GGUFFile, TensorInfo

__all__ = ["GGUFError", "GGUFFile", "TensorInfo"]
