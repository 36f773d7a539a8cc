"""Data-parallel collectives on flashlm's ring allreduce.

    import flashlm.dist as fd
    fd.init()                        # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (or an existing group)
    fd.all_reduce(t, op="avg")       # in place
    shard = fd.reduce_scatter(t)     # this rank's 1/world_size of t, summed over ranks
    full = fd.all_gather(shard)      # the shards of every rank, concatenated
    fd.broadcast(t, src=0)

The transport follows the tensor: CPU tensors go through flashlm's shared-memory ring when every rank runs
on this host, and through torch.distributed's gloo backend when the ranks span hosts (said in the log);
CUDA tensors go through flashlm's NCCL ring (one GPU per rank), created at the first CUDA collective.
`GradientSync` averages gradients during backward, bucket by bucket. `connect_nccl_ring` connects an NCCL ring
over some of the ranks (a mesh group's: flashlm.parallel), its unique id shared through the store.
"""

import logging
import os
import secrets
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist

from flashlm.ops import comm

log = logging.getLogger("flashlm.dist")

_KEY = "flashlm/dist"


class _State:
    def __init__(self, rank, world_size, store, cpu_ring, timeout, owns_group, generation):
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.cpu_ring = cpu_ring  # a comm.Ring, or None when CPU collectives go through gloo
        self.gpu_ring = None  # made at the first CUDA collective
        self.gpu_ring_device = None
        self.timeout = timeout
        self.owns_group = owns_group
        self.generation = generation


_state: Optional[_State] = None
_generation = 0


def is_initialized() -> bool:
    return _state is not None


def get_rank() -> int:
    return _require().rank


def get_world_size() -> int:
    return _require().world_size


def cpu_transport() -> str:
    """"shm" (flashlm's shared-memory ring) or "gloo" (torch.distributed, ranks on several hosts)."""
    return "shm" if _require().cpu_ring is not None else "gloo"


def init(timeout: float = 60.0, *, force_gloo: bool = False) -> None:
    """Joins the job. Uses torch.distributed's default process group when one exists; otherwise creates a
    gloo group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Collective: every
    rank calls it. `timeout` (seconds) bounds every wait for a peer in flashlm's rings: a peer that died
    makes the collective raise RuntimeError instead of hanging. `force_gloo`: CPU collectives through gloo
    even on one host (for comparisons)."""
    global _state, _generation
    if _state is not None:
        raise RuntimeError("flashlm.dist.init: already initialized (call flashlm.dist.destroy() first)")
    if not timeout > 0:
        raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
    owns_group = False
    if not tdist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"environment: {', '.join(missing)} not set (launch with torchrun, or call "
                             "torch.distributed.init_process_group first)")
        tdist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=max(timeout, 60.0)))
        owns_group = True
    rank, world_size = tdist.get_rank(), tdist.get_world_size()
    store = tdist.distributed_c10d._get_default_store()
    _generation += 1
    prefix = f"{_KEY}/{_generation}"

    hosts = [None] * world_size
    tdist.all_gather_object(hosts, host_id())
    one_host = len(set(hosts)) == 1
    cpu_ring = None
    if one_host and not force_gloo:
        if rank == 0:
            store.set(f"{prefix}/job", f"{os.getpid()}-{secrets.token_hex(6)}")
        job = store.get(f"{prefix}/job").decode()
        cpu_ring = comm.shm_ring(job, rank, world_size, timeout=timeout)
        log.info("flashlm.dist: rank %d of %d, CPU tensors through the shared-memory ring", rank, world_size)
    else:
        why = f"ranks span {len(set(hosts))} hosts" if not one_host else "force_gloo"
        log.info("flashlm.dist: rank %d of %d, CPU tensors through torch.distributed gloo (%s)", rank, world_size, why)
    _state = _State(rank, world_size, store, cpu_ring, timeout, owns_group, _generation)


def destroy() -> None:
    """Leaves the job: drops the rings (and the process group, if init() created it)."""
    global _state
    if _state is None:
        return
    owns_group = _state.owns_group
    _state = None
    if owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """tensor := sum (op="sum") or mean (op="avg") of tensor over ranks, in place; returns tensor.
    float32, float16 or bfloat16, contiguous, the same shape on every rank."""
    comm.check_tensor(tensor)
    comm.check_op(op)
    ring = _ring_for(tensor)
    if ring is None:
        tdist.all_reduce(tensor, tdist.ReduceOp.SUM)
        if op == "avg":
            tensor.div_(_require().world_size)
        return tensor
    return ring.allreduce(tensor, op)


def reduce_scatter(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """This rank's shard of the sum (or mean) over ranks of `tensor`, whose first dimension divides by the
    world size: rows [rank * m, (rank + 1) * m) with m = len(tensor) / world_size. `tensor` is not changed."""
    comm.check_tensor(tensor)
    comm.check_op(op)
    state = _require()
    if tensor.dim() == 0 or tensor.shape[0] % state.world_size:
        raise ValueError(f"tensor: its first dimension must divide by the world size {state.world_size}, "
                         f"got shape {tuple(tensor.shape)}")
    m = tensor.shape[0] // state.world_size
    work = tensor.clone()
    ring = _ring_for(tensor)
    if ring is None:
        all_reduce(work, op)
    else:
        ring.reduce_scatter(work, op)
    return work[state.rank * m:(state.rank + 1) * m].clone()


def all_gather(shard: torch.Tensor) -> torch.Tensor:
    """The shards of all ranks concatenated along the first dimension (rank order); every rank's shard has
    the same shape and dtype."""
    comm.check_tensor(shard, "shard", reduction=False)
    state = _require()
    if shard.dim() == 0:
        raise ValueError("shard: must have at least one dimension")
    m = shard.shape[0]
    out = torch.empty((state.world_size * m, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
    ring = _ring_for(shard)
    if ring is None:
        tdist.all_gather(list(out.chunk(state.world_size)), shard)
        return out
    out[state.rank * m:(state.rank + 1) * m] = shard
    return ring.all_gather(out)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """tensor := rank src's tensor, in place; returns tensor."""
    comm.check_tensor(tensor, reduction=False)
    state = _require()
    if not isinstance(src, int) or not 0 <= src < state.world_size:
        raise ValueError(f"src: must be a rank in [0, {state.world_size}), got {src!r}")
    ring = _ring_for(tensor)
    if ring is None:
        tdist.broadcast(tensor, src)
        return tensor
    return ring.broadcast(tensor, src)


def _require() -> _State:
    if _state is None:
        raise RuntimeError("flashlm.dist: call flashlm.dist.init() first")
    return _state


def host_id() -> str:
    """This host, as the ranks compare it (hostname and boot id)."""
    # Processes share /dev/shm only on one host: hostname plus boot id (containers may share a hostname).
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def _ring_for(tensor: torch.Tensor):
    """The flashlm ring that moves this tensor, or None for torch.distributed (gloo)."""
    state = _require()
    if tensor.device.type == "cpu":
        return state.cpu_ring
    if tensor.device.type != "cuda":
        raise ValueError(f"tensor: must be on the CPU or a CUDA device, got {tensor.device}")
    if state.gpu_ring is None:
        state.gpu_ring = _connect_gpu_ring(state, tensor.device.index)
    elif state.gpu_ring_device != tensor.device.index:
        raise ValueError(f"tensor: this rank's GPU ring is on cuda:{state.gpu_ring_device}, got {tensor.device}")
    return state.gpu_ring


def _connect_gpu_ring(state: _State, device: int):
    ring = connect_nccl_ring(f"{_KEY}/{state.generation}/nccl_id", state.rank, state.world_size, device)
    state.gpu_ring_device = device
    log.info("flashlm.dist: rank %d, CUDA tensors through the NCCL ring on cuda:%d (%s)", state.rank, device,
             comm.nccl_status())
    return ring


def connect_nccl_ring(key: str, rank: int, world_size: int, device: int, timeout: Optional[float] = None):
    """Connects an NCCL ring of `world_size` ranks of this job, this one `rank` of it on cuda:`device`
    (collective over the ring's ranks). Its rank 0 makes the unique id and puts it in torch.distributed's store
    under `key`, which must be new for every ring; the others read it there (waiting for it). A rank 0 that
    cannot make one (no NCCL) says why under the key, so that its peers raise instead of waiting. `timeout`:
    init()'s when None."""
    state = _require()
    if rank == 0:
        try:
            unique_id = comm.nccl_unique_id()
        except Exception as e:  # tell the peers instead of leaving them waiting on the store
            state.store.set(key, b"error: " + str(e).encode())
            raise
        state.store.set(key, unique_id)
    else:
        unique_id = state.store.get(key)
        if unique_id.startswith(b"error: "):
            raise RuntimeError(f"flashlm.dist: the ring's rank 0 could not start NCCL: {unique_id[7:].decode()}")
    return comm.nccl_ring(unique_id, rank, world_size, device, timeout=state.timeout if timeout is None else timeout)


from flashlm.dist.grad_sync import GradientSync  # noqa: E402  (it calls all_reduce)

__all__ = [
    "GradientSync", "all_gather", "all_reduce", "broadcast", "connect_nccl_ring", "cpu_transport", "destroy",
    "get_rank", "get_world_size", "host_id", "init", "is_initialized", "reduce_scatter",
]
