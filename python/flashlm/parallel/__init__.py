"""Model parallelism: the process-group mesh and one file per parallelism.

    mesh.py       Mesh(dp, tp, pp, cp): the world's ranks as groups, one flashlm ring per group
    cuda_mesh.py  CUDA tensors on the mesh: an NCCL ring per group and pipeline link; the ranks' devices checked
    tensor.py     Megatron tensor parallelism of flashlm's Transformer (column/row-parallel linears, heads split
                  across ranks, vocabulary-parallel embedding and cross-entropy), shard and gather
    pipeline.py   pipeline stages and their schedules (GPipe, 1F1B) over Ring.sendrecv
    context.py    context parallelism: ring attention over a sequence split across ranks
    context_model.py  context-parallel training of the Transformer: each rank its part of the sequence
    zero3.py      ZeRO-3: parameters sharded over the data-parallel ranks, gathered per block (DataParallel's
                  zero_stage=3)
    zero3_state.py  its checkpoints: full tensors made one at a time onto rank 0, each rank loading its slices
"""

from flashlm.parallel.context_model import ContextParallelTransformer, check_context_parallel
from flashlm.parallel.mesh import Group, Mesh, check_sizes
from flashlm.parallel.tensor import (TensorParallelTransformer, check_tensor_parallel, gather_state_dict,
                                     shard_model, vocab_parallel_cross_entropy)

__all__ = [
    "ContextParallelTransformer", "Group", "Mesh", "TensorParallelTransformer", "check_context_parallel",
    "check_sizes", "check_tensor_parallel", "gather_state_dict", "shard_model", "vocab_parallel_cross_entropy",
]
