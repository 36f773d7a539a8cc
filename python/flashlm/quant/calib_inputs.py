"""Calibration inputs for the layer-by-layer quantizers (GPTQ, AWQ): the hidden states entering a
Transformer's first block for a batch of calibration token rows, each block run on them in turn, and forward
hooks that hand each linear's input (as [tokens, in_features] rows) to a collector.

    tokens = check_calib_tokens(calib_tokens, model)        # int64 [rows, seq]
    xs, ropes = first_block_inputs(model, tokens)            # [rows, seq, d], one rope per block
    with linear_input_hooks(block, collect) as shared:       # collect(name, x2d) per distinct input
        ys = run_block(block, xs, ropes[i])
"""

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

# Rows of calibration tokens per block call: bounds the activations held at once.
ROWS_PER_CALL = 8


class _StopForward(Exception):
    pass


def check_calib_tokens(calib_tokens, model) -> torch.Tensor:
    """calib_tokens as int64 [rows, seq] (a 1-D tensor is one row), checked against the model: at least one row,
    1 <= seq <= the model's seq_len, ids within the vocabulary."""
    if not isinstance(calib_tokens, torch.Tensor):
        raise TypeError(f"calib_tokens: expected an int64 tensor [rows, seq], got {type(calib_tokens).__name__}")
    t = calib_tokens[None] if calib_tokens.dim() == 1 else calib_tokens
    if t.dtype != torch.int64 or t.dim() != 2:
        raise ValueError(f"calib_tokens: expected an int64 tensor [rows, seq], got {t.dtype} {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"calib_tokens: empty calibration data {tuple(t.shape)}")
    cfg = model.cfg
    if t.shape[1] > cfg.seq_len:
        raise ValueError(f"calib_tokens: rows of {t.shape[1]} tokens exceed the model's seq_len {cfg.seq_len}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"calib_tokens: token ids must lie in [0, {cfg.vocab_size}), got [{lo}, {hi}]")
    return t


@torch.no_grad()
def first_block_inputs(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The hidden states entering model.blocks[0] for each row of tokens ([rows, seq, d]) and the rope argument
    each block receives (the same for every row: the rows share their positions). The model's own forward
    computes them (embeddings, scaling, position tables), stopped at the first block."""
    xs, ropes, done = [], [None] * len(model.blocks), []

    def first(module, args):
        xs.append(args[0])
        if done:  # every block's rope is known: the rest of the forward is not needed
            raise _StopForward

    def record(i):
        def hook(module, args):
            ropes[i] = args[1]
            if i == len(model.blocks) - 1:
                done.append(True)
                raise _StopForward
        return hook

    handles = [model.blocks[0].register_forward_pre_hook(first)]  # before block 0's record hook, which may stop
    handles += [b.register_forward_pre_hook(record(i)) for i, b in enumerate(model.blocks)]
    # The first call runs every block to learn their ropes: one row, not ROWS_PER_CALL (on a 22-layer 1B llama
    # a full forward of 8 x 512 tokens was most of the first block's time); the later calls stop at block 0.
    starts = [0] + list(range(1, tokens.shape[0], ROWS_PER_CALL))
    ends = starts[1:] + [tokens.shape[0]]
    try:
        for row, end in zip(starts, ends):
            try:
                model(tokens[row:end])
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(xs), ropes


@torch.no_grad()
def run_block(block: nn.Module, xs: torch.Tensor, rope) -> torch.Tensor:
    """block's outputs for inputs xs [rows, seq, d], ROWS_PER_CALL rows a call."""
    return torch.cat([block(xs[r:r + ROWS_PER_CALL], rope) for r in range(0, xs.shape[0], ROWS_PER_CALL)])


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules of a block, by dotted name, in definition order."""
    return [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def check_block_linears(model, group_size: int) -> None:
    """Before any work: every block linear is a float nn.Linear (not already quantized) whose in_features is a
    multiple of group_size."""
    for i, block in enumerate(model.blocks):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                if m.in_features % group_size:
                    raise ValueError(f"group_size: {group_size} does not divide in_features = {m.in_features} "
                                     f"of blocks.{i}.{name}")
            elif type(m).__name__.endswith("Linear"):
                raise TypeError(f"model: blocks.{i}.{name} is a {type(m).__name__}; quantize a float model "
                                "(nn.Linear block layers)")


@contextmanager
def linear_input_hooks(block: nn.Module, collect: Callable[[str, torch.Tensor], None]):
    """While open, block's nn.Linear calls hand (a dotted name, the input as float32 [tokens, in_features]) to
    collect, once per input: linears called one after another on the same tensor (q, k and v; gate and up)
    share it, and collect sees it under the first one's name. Yields {linear name: the name its input is
    collected under}, filled as the linears run."""
    shared, last = {}, [None, None]  # last: the input tensor seen last and the name it was collected under

    def hook(name):
        def pre(module, args):
            x = args[0]
            if x is not last[0]:
                last[0], last[1] = x, name
                collect(name, x.detach().reshape(-1, x.shape[-1]).float())
            shared[name] = last[1]
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in block_linears(block)]
    try:
        yield shared
    finally:
        last[0] = None
        for h in handles:
            h.remove()
