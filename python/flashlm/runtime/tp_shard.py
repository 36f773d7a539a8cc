"""A loaded model cut, in place, into one rank's slice for tensor-parallel serving (runtime/tensor_parallel.py).

    check_tensor_parallel_size(model, 2)      # before any worker starts: heads, K/V heads, d_ff, GGUF blocks
    shard_for_serving(model, group)           # this rank keeps its heads and MLP columns

Megatron's layout, as parallel/tensor.py has it for training, but over the modules the loaders make (nn.Linear
and GGUFLinear, whose blocks are sliced without being decoded), so a GGUF model stays in its blocks:

    x -> norm -> q, k, v (rows: this rank's heads) -> paged attention (its K/V heads) -> o (columns) -> sum -> + bias
    x -> norm -> gate, up | fc (rows: d_ff / size) -> act -> down | proj (columns)                  -> sum -> + bias

so each layer runs one all-reduce after attention's o and one after the MLP's down. K/V heads are split when
n_kv_head divides by the size; with fewer K/V heads than ranks each rank keeps the one head its query heads read.
A GGUFLinear's rows are whole blocks, so splitting rows (column-parallel) always works; splitting its columns
(row-parallel o and down) must cut on block boundaries, which check_tensor_parallel_size checks.
The embedding, norms and the lm head are replicated: only the driver computes logits (they are not gathered).
"""

from torch import nn

from flashlm.ops.dequant import BLOCKS
from flashlm.parallel.mesh import Group
from flashlm.parallel.tensor import check_splits
from flashlm.quant.gguf_linear import GGUFLinear

_SPLITTABLE = (nn.Linear, GGUFLinear)


def check_tensor_parallel_size(model, size) -> int:
    """`size` checked against a loaded model: an int >= 1 that divides n_head (and is at most n_head), d_ff,
    and n_kv_head (or that n_kv_head divides), with layers tensor parallelism can slice. Raises ValueError or
    NotImplementedError naming what does not split; returns size."""
    size = check_size(size)
    cfg = model.cfg
    if size > cfg.n_head:
        raise ValueError(f"tensor_parallel_size: {size} ranks for {cfg.n_head} attention heads (at most one rank "
                         f"per head)")
    check_splits(cfg, size, "tensor_parallel_size", ("n_head", "d_ff"), str(size))
    for i, block in enumerate(model.blocks):
        for name, module in _column_layers(block):
            _check_layer(module, f"blocks.{i}.{name}")
        for name, module in _row_layers(block):
            _check_layer(module, f"blocks.{i}.{name}")
            if isinstance(module, GGUFLinear):
                block_size = BLOCKS[module.ggml_type][1]
                part = module.in_features // size
                if part % block_size:
                    raise ValueError(f"tensor_parallel_size: blocks.{i}.{name} ({module.ggml_type}, K "
                                     f"{module.in_features}) splits into {size} parts of {part} columns, not whole "
                                     f"blocks of {block_size}")
    return size


def check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"tensor_parallel_size: expected an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {size}")
    return size


def _column_layers(block) -> list:
    """(name, module) of the block's column-parallel layers: their output features (rows) are split."""
    mlp = block.mlp
    names = ["attn.q", "attn.k", "attn.v"] + (["mlp.fc"] if hasattr(mlp, "fc") else ["mlp.gate", "mlp.up"])
    return [(n, _get(block, n)) for n in names]


def _row_layers(block) -> list:
    """(name, module) of the block's row-parallel layers: their input features (columns) are split."""
    names = ["attn.o", "mlp.proj" if hasattr(block.mlp, "proj") else "mlp.down"]
    return [(n, _get(block, n)) for n in names]


def _get(block, name):
    owner, attr = name.split(".")
    return getattr(getattr(block, owner), attr)


def _check_layer(module, name: str) -> None:
    if type(module) not in _SPLITTABLE:
        raise NotImplementedError(f"tensor_parallel_size: {name} is a {type(module).__name__}; tensor parallelism "
                                  f"splits nn.Linear and GGUFLinear layers")


class RowParallelLinear(nn.Module):
    """This rank's columns of a layer (no bias), its products summed over the group, then the bias once."""

    def __init__(self, part: nn.Module, bias, group: Group):
        super().__init__()
        self.part = part
        self.group = group
        self.register_buffer("bias", bias)

    def forward(self, x):
        y = self.group.all_reduce(self.part(x).contiguous())
        return y if self.bias is None else y + self.bias


def shard_for_serving(model, group: Group):
    """Cuts `model` (checked by check_tensor_parallel_size) in place into rank group.rank's slice of
    group.size; returns it. Its attention modules then hold this rank's n_head and n_kv_head."""
    rank, size = group.rank, group.size
    for block in model.blocks:
        attn = block.attn
        heads, kv_heads, hd = attn.n_head, attn.n_kv_head, attn.head_dim
        local = heads // size
        if kv_heads % size == 0:
            local_kv, first_kv = kv_heads // size, rank * (kv_heads // size)
        else:  # replicated: the K/V head this rank's query heads share
            local_kv, first_kv = 1, rank * local // (heads // kv_heads)
        attn.q = _rows(attn.q, rank * local * hd, local * hd)
        attn.k = _rows(attn.k, first_kv * hd, local_kv * hd)
        attn.v = _rows(attn.v, first_kv * hd, local_kv * hd)
        attn.o = _columns(attn.o, rank * local * hd, local * hd, group)
        attn.n_head, attn.n_kv_head = local, local_kv
        mlp = block.mlp
        up_names, down_name = (("fc",), "proj") if hasattr(mlp, "fc") else (("gate", "up"), "down")
        ff = getattr(mlp, down_name).in_features // size
        for name in up_names:
            setattr(mlp, name, _rows(getattr(mlp, name), rank * ff, ff))
        setattr(mlp, down_name, _columns(getattr(mlp, down_name), rank * ff, ff, group))
    return model


def _rows(layer, start: int, count: int):
    """Output features [start, start + count) of a layer, with their bias."""
    bias = None if layer.bias is None else layer.bias.detach()[start:start + count].clone()
    if isinstance(layer, GGUFLinear):  # a row is whole blocks
        raw = layer.raw[start:start + count].contiguous()
        return GGUFLinear(raw, layer.ggml_type, (count, layer.in_features), bias)
    out = nn.Linear(layer.in_features, count, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(layer.weight.detach()[start:start + count].clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _columns(layer, start: int, count: int, group: Group) -> RowParallelLinear:
    """Input features [start, start + count) of a layer as a RowParallelLinear over `group`."""
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, GGUFLinear):  # whole blocks (checked): byte columns of each row
        _, block, nbytes = BLOCKS[layer.ggml_type]
        first, end = start // block * nbytes, (start + count) // block * nbytes
        part = GGUFLinear(layer.raw[:, first:end].contiguous(), layer.ggml_type, (layer.out_features, count))
    else:
        part = nn.Linear(count, layer.out_features, bias=False, device="meta")
        part.weight = nn.Parameter(layer.weight.detach()[:, start:start + count].contiguous(), requires_grad=False)
    return RowParallelLinear(part, bias, group)
