"""Checking the tensors a file holds (name -> shape) against what its declared sizes imply.

    check_block_count(n_layer, names, "blk.", "metadata: llama.block_count")   # before anything is built
    check_tensor_shapes(cfg.state_shapes(), shapes, "checkpoint run/ckpt.pt")

A layer count from a file is compared with the blocks the file has tensors for before the expected names are
listed (a count of 2^31 must not cost 2^31 of anything); then every expected tensor must be there with its
shape, and nothing else. The GGUF, HF and checkpoint loaders and the exporters share these.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping


def block_indices(names: Iterable[str], prefix: str) -> dict:
    """{block index: the first name of that block} over names "<prefix><index>.<rest>"."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), name)
    return found


def check_block_count(n_layer, names: Iterable[str], prefix: str, field: str,
                      shown: Callable[[str], str] = str) -> None:
    """ValueError unless the tensors named <prefix><i>.* cover exactly blocks 0 .. n_layer - 1. field names the
    count where it was read ("metadata: llama.block_count"); shown, as check_tensor_shapes's. A count that is
    not an int is left to the config's own check."""
    if isinstance(n_layer, bool) or not isinstance(n_layer, int):
        return
    blocks = block_indices(names, prefix)
    beyond = sorted(i for i in blocks if i >= n_layer)
    if beyond:
        raise ValueError(f"{field} is {n_layer}, but the file has tensor {shown(blocks[beyond[0]])!r} "
                         f"(it holds {_describe(blocks, prefix)})")
    if len(blocks) != n_layer:
        missing = next(i for i in range(n_layer) if i not in blocks)
        raise ValueError(f"{field} is {n_layer}, but the file holds {_describe(blocks, prefix)} "
                         f"(none of {prefix}{missing}.*)")


def _describe(blocks: dict, prefix: str) -> str:
    if not blocks:
        return "no blocks"
    n = len(blocks)
    return f"{n} block{'s' if n > 1 else ''}, {prefix}{min(blocks)} to {prefix}{max(blocks)}"


def check_tensor_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], where: str,
                        shown: Callable[[str], str] = str) -> None:
    """ValueError unless `found` has exactly the tensors of `expected`, each with its shape. shown: the name a
    message gives a tensor (the file's own name, where the caller renamed it)."""
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{where}: tensor {shown(name)!r} is missing")
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{where}: tensor {shown(name)!r} has shape {tuple(found[name])}, the config implies "
                             f"{tuple(shape)}")
    extra = [name for name in found if name not in expected]
    if extra:
        raise ValueError(f"{where}: unexpected tensor {shown(extra[0])!r}")
