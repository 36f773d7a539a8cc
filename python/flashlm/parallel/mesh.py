"""The process-group mesh: the world's ranks laid out as dp x pp x cp x tp, one group per dimension.

    import flashlm.dist as fd
    from flashlm.parallel import Mesh
    fd.init()
    mesh = Mesh(dp=2, tp=2)            # collective: every rank calls it with the same sizes
    mesh.tp.all_reduce(t)              # over the ranks that hold the other shards of this rank's layers
    mesh.coords                        # {"dp": 1, "pp": 0, "cp": 0, "tp": 1} on rank 3

The layout is Megatron's: tp innermost (neighbouring ranks, the fastest links), then cp, then pp, then dp:

    rank = ((dp_i * pp + pp_i) * cp + cp_i) * tp + tp_i

A 2 x 2 x 2 mesh (dp x pp x tp, cp 1) on 8 ranks:

             pp 0       pp 1
    dp 0   [0 | 1]  -> [2 | 3]      [a | b]: one tp group (the shards of one layer)
    dp 1   [4 | 5]  -> [6 | 7]      ->: the pipeline, stage 0 to stage 1;  dp groups: {0,4} {1,5} {2,6} {3,7}

Each group of more than one rank connects its own flashlm ring (shared memory between the processes of this
host); the job names are made by rank 0 and shared through torch.distributed's store. CUDA tensors go
through the group's own NCCL ring, connected at its first CUDA collective (parallel/cuda_mesh.py). Ranks on
several hosts (gloo subgroups) are not supported yet: a mesh over several hosts raises NotImplementedError.
`mesh.pp.prev_rank` / `mesh.pp.next_rank` are a stage's neighbours; the pipeline talks to them over its own
2-rank rings (parallel/pipeline.py's StageLinks: a ring sends one way only, and gradients go back).
"""

import os
import secrets
import threading
from typing import Optional

import torch
import torch.distributed as tdist

import flashlm.dist as fd
from flashlm.ops import comm
from flashlm.parallel.cuda_mesh import cuda_index, group_nccl_ring

DIMS = ("tp", "cp", "pp", "dp")  # innermost first: the order of the rank layout and of the rings' creation
_KEY = "flashlm/mesh"
_meshes = 0  # meshes made by this process: every rank makes them in the same order, so the store keys agree


def check_sizes(world_size: Optional[int] = None, **sizes) -> dict:
    """The sizes {dp, tp, pp, cp} checked: ints >= 1 whose product is `world_size` (None: not checked).
    Raises ValueError naming the flag (--dp, --tp, --pp, --cp)."""
    for dim in DIMS:
        if dim not in sizes:
            raise ValueError(f"--{dim}: missing")
    for dim, n in sizes.items():
        if dim not in DIMS:
            raise ValueError(f"{dim}: not a mesh dimension (dp, tp, pp, cp)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--{dim}: must be an int >= 1, got {n!r}")
    product = sizes["dp"] * sizes["tp"] * sizes["pp"] * sizes["cp"]
    if world_size is not None and product != world_size:
        given = " x ".join(f"--{d} {sizes[d]}" for d in ("dp", "tp", "pp", "cp"))
        raise ValueError(f"--dp/--tp/--pp/--cp: {given} = {product} ranks, but the world has {world_size}")
    return sizes


class Group:
    """The ranks of one mesh dimension that this rank shares a group with. rank, size: this rank's place in
    the group; ranks: the global ranks of the group in group order. Collectives as flashlm.dist's, within the
    group, on CPU tensors (its shared-memory ring) or CUDA tensors (its NCCL ring, on the rank's GPU); a
    group of one rank has no ring and its collectives return at once. `job`: the mesh's ring name prefix, which
    names the NCCL ring; `timeout` bounds its waits for a peer."""

    def __init__(self, name: str, ranks: tuple, rank: int, ring: Optional[comm.Ring], job: Optional[str] = None,
                 timeout: float = 60.0):
        self.name = name
        self.ranks = ranks
        self.rank = rank
        self.size = len(ranks)
        self.ring = ring  # the CPU comm.Ring of the group (None for one rank); the pipeline's links run on pp's
        self.job, self.timeout = job, timeout
        self._gpu_ring, self._gpu = None, None  # the NCCL ring and its GPU, from the first CUDA collective
        self._connecting = threading.Lock()  # ZeRO-3 runs collectives on a thread of its own too

    @property
    def prev_rank(self) -> int:
        """The global rank before this one in the group, cyclically (the previous pipeline stage)."""
        return self.ranks[(self.rank - 1) % self.size]

    @property
    def next_rank(self) -> int:
        """The global rank after this one in the group, cyclically (the next pipeline stage)."""
        return self.ranks[(self.rank + 1) % self.size]

    def __repr__(self) -> str:
        return f"Group({self.name}, rank {self.rank} of {self.size}, ranks {list(self.ranks)})"

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """tensor := its sum (or mean, op="avg") over the group, in place; returns tensor."""
        comm.check_tensor(tensor)
        comm.check_op(op)
        if self.size > 1:
            self._ring_for(tensor).allreduce(tensor, op)
        return tensor

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """This rank's rows [rank * m, (rank + 1) * m) of the sum (or mean) over the group of `tensor`, whose
        first dimension m * size divides by the group's size. `tensor` is not changed."""
        comm.check_tensor(tensor)
        comm.check_op(op)
        if tensor.dim() == 0 or tensor.shape[0] % self.size:
            raise ValueError(f"tensor: its first dimension must divide by the {self.name} group's size "
                             f"{self.size}, got shape {tuple(tensor.shape)}")
        if self.size == 1:
            return tensor.clone()
        m = tensor.shape[0] // self.size
        # The ring leaves chunk `rank` of the flat tensor reduced (comm.chunk_bounds): equal parts, so whole rows.
        work = self._ring_for(tensor).reduce_scatter(tensor.clone(), op)
        return work[self.rank * m:(self.rank + 1) * m].clone()

    def all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's shard (the same shape on each) concatenated along the first dimension, in group order."""
        comm.check_tensor(shard, "shard")
        if shard.dim() == 0:
            raise ValueError("shard: must have at least one dimension")
        if self.size == 1:
            return shard.clone()
        m = shard.shape[0]
        out = torch.empty((self.size * m, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        out[self.rank * m:(self.rank + 1) * m] = shard
        return self._ring_for(shard).all_gather(out)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """tensor := the tensor of group rank `src`, in place; returns tensor."""
        comm.check_tensor(tensor, reduction=False)
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self.size:
            raise ValueError(f"src: must be a rank of the {self.name} group, in [0, {self.size}), got {src!r}")
        if self.size > 1:
            self._ring_for(tensor).broadcast(tensor, src)
        return tensor

    def ring_on(self, device) -> Optional[comm.Ring]:
        """The group's ring for tensors on `device`: its shared-memory ring for the CPU, its NCCL ring for this
        rank's GPU (connected on the first call: collective over the group, whose first rank makes the unique
        id). None for a group of one rank. A second GPU is refused: one communicator per group, on one GPU."""
        if self.size == 1:
            return None
        index = cuda_index(device)
        if index is None:
            if torch.device(device).type != "cpu":
                raise ValueError(f"tensor: the {self.name} group moves CPU or CUDA tensors, got {device}")
            return self.ring
        with self._connecting:
            if self._gpu_ring is None:
                self._gpu_ring = group_nccl_ring(self.job, f"{self.name}{self.ranks[0]}", self.rank, self.size,
                                                 index, self.timeout)
                self._gpu = index
        if index != self._gpu:
            raise ValueError(f"tensor: the {self.name} group's NCCL ring is on cuda:{self._gpu}, got {device}")
        return self._gpu_ring

    def _ring_for(self, tensor: torch.Tensor) -> comm.Ring:
        return self.ring_on(tensor.device)


class Mesh:
    """dp x pp x cp x tp groups over the world of flashlm.dist (call flashlm.dist.init() first). Collective:
    every rank makes the same Mesh. The sizes are checked (ints >= 1 whose product is the world size) before
    any group is made. `timeout` (seconds) bounds every wait for a peer in the groups' rings."""

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, *, timeout: float = 60.0):
        global _meshes
        sizes = check_sizes(None, dp=dp, tp=tp, pp=pp, cp=cp)
        if not fd.is_initialized():
            raise RuntimeError("Mesh: call flashlm.dist.init() first")
        self.world_size, self.rank = fd.get_world_size(), fd.get_rank()
        check_sizes(self.world_size, **sizes)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout!r}")
        self.sizes = sizes
        strides, stride = {}, 1
        for dim in DIMS:
            strides[dim] = stride
            stride *= sizes[dim]
        self.coords = {dim: self.rank // strides[dim] % sizes[dim] for dim in DIMS}

        job = None
        if any(sizes[d] > 1 for d in DIMS):
            if fd.cpu_transport() != "shm":
                raise NotImplementedError("Mesh: groups over several hosts (or flashlm.dist's force_gloo) are not "
                                          "supported yet: the groups' rings are shared-memory rings of one host")
            _meshes += 1
            store = tdist.distributed_c10d._get_default_store()
            key = f"{_KEY}/{_meshes}/job"
            if self.rank == 0:
                store.set(key, f"mesh-{os.getpid()}-{secrets.token_hex(6)}")
            job = store.get(key).decode()
        self.job = job  # the rings' name prefix (None for one rank): more rings of this mesh start with it
        # Every rank connects its groups in the order of DIMS; a ring waits only for its own members.
        self.groups = {}
        for dim in DIMS:
            first = self.rank - self.coords[dim] * strides[dim]  # the group's lowest rank: its name
            ranks = tuple(first + i * strides[dim] for i in range(sizes[dim]))
            ring = None
            if sizes[dim] > 1:
                ring = comm.shm_ring(f"{job}-{dim}{first}", self.coords[dim], sizes[dim], timeout=timeout)
            self.groups[dim] = Group(dim, ranks, self.coords[dim], ring, job, timeout)

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def cp(self) -> Group:
        return self.groups["cp"]

    @property
    def pp(self) -> Group:
        return self.groups["pp"]

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    def __repr__(self) -> str:
        shape = " x ".join(f"{d} {self.sizes[d]}" for d in ("dp", "pp", "cp", "tp"))
        at = ", ".join(f"{d} {self.coords[d]}" for d in ("dp", "pp", "cp", "tp"))
        return f"Mesh({shape}; rank {self.rank} at {at})"
