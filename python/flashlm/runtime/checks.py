"""Argument checks shared by the runtime's public entry points (LLM, SamplingParams, BlockManager, the commands),
built on flashlm.ops' own (ops/_check.py): a TypeError for the wrong kind of object (a float or a string where
an integer goes, a string where a bool goes), a ValueError for a value out of range, each message starting
with the name of the argument the caller passed.
"""

import math
import operator
import os
from collections.abc import Iterable, Mapping, Set

import torch

from flashlm.ops._check import INT64_MAX, as_float, as_int  # noqa: F401 - as_float: re-exported

# torch.Generator.manual_seed takes [-2^63, 2^64) and folds negative seeds onto large ones; a seed here is a
# plain non-negative 64-bit integer, so two different seeds never draw the same numbers.
SEED_MAX = 2**64 - 1
# The dtypes the paged-attention kernels take for the KV cache on each device (csrc/kvcache/paged_attention.cpp).
KV_CACHE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}


def as_count(value, name: str, low: int = 1, high: int = INT64_MAX) -> int:
    """An integer in [low, high] as an int: not a bool, a float or a string."""
    if type(value) is int and low <= value <= high:  # the common case first: checked per request
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got bool")
    n = as_int(value, name, -math.inf, math.inf)  # the type alone: the range is said below
    if not low <= n <= high:
        bounds = f"at least {low}" if high == INT64_MAX and n < low else f"in [{low}, {high}]"
        raise ValueError(f"{name}: must be {bounds}, got {n}")
    return n


def as_optional_count(value, name: str, low: int = 1, high: int = INT64_MAX):
    return None if value is None else as_count(value, name, low, high)


def as_bool(value, name: str) -> bool:
    """True or False: a string such as 'no' is not read as a truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def as_seed(value, name: str = "seed") -> int:
    return as_count(value, name, 0, SEED_MAX)


def as_model_source(value, name: str):
    """A model as LLM takes it: a path (str or os.PathLike) or a flashlm Transformer."""
    from flashlm.models.transformer import Transformer

    if not isinstance(value, (str, os.PathLike, Transformer)):
        raise TypeError(f"{name}: expected a path (a GGUF file, an HF model directory or a training checkpoint) or "
                        f"a flashlm Transformer, got {type(value).__name__}")
    return value


def as_kv_cache_dtype(value, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: one the paged-attention kernels take on `device` (None: float32 on the CPU,
    bfloat16 on CUDA)."""
    if value is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    allowed = KV_CACHE_DTYPES.get(device.type, ())
    if not isinstance(value, torch.dtype):
        raise TypeError(f"kv_cache_dtype: expected a torch.dtype such as torch.bfloat16, got {type(value).__name__} "
                        f"{value!r}")
    if value not in allowed:
        raise ValueError(f"kv_cache_dtype: the {device.type.upper()} kernels take "
                         f"{' or '.join(str(d) for d in allowed)}, got {value}")
    return value


def as_token_ids(value, name: str, limit: int = INT64_MAX + 1) -> list:
    """Token ids as a new list of ints, each in [0, limit): from a list, a tuple or another ordered iterable of
    integers (not a string, a mapping or a set, which only look like one)."""
    if type(value) is list:  # the common case first: the block manager checks each step's new tokens
        tokens = value.copy()
    elif isinstance(value, (str, bytes, Mapping, Set)) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a list of token ids, got {type(value).__name__}")
    else:
        tokens = list(value)
    for t in tokens:
        if type(t) is not int or not 0 <= t < limit:
            return _convert_token_ids(tokens, name, limit)
    return tokens


def _convert_token_ids(tokens: list, name: str, limit: int) -> list:
    """as_token_ids past its common case: other integer types (numpy's) converted, or the bad ids named."""
    for i, t in enumerate(tokens):
        if isinstance(t, (bool, float, str, bytes)) or not hasattr(t, "__index__"):
            raise TypeError(f"{name}[{i}]: expected a token id (an integer), got {type(t).__name__} {t!r}")
    tokens = [operator.index(t) for t in tokens]
    bad = [t for t in tokens if not 0 <= t < limit]
    if bad:
        raise ValueError(f"{name}: token ids must be in [0, {limit}), got {bad[:5]}")
    return tokens


def as_prompts(prompts) -> list:
    """LLM.generate's prompts as a list: a str or a list of token ids is one prompt; a list whose items are all
    strs or lists (or tuples) is several (each checked when it is queued)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a str, a list of token ids or a list of those, got "
                        f"{type(prompts).__name__}")
    if prompts and all(isinstance(p, (str, list, tuple)) for p in prompts):
        return list(prompts)
    return [prompts] if prompts else []
