"""Ring collectives over flashlm's transports (shared memory between CPU processes, NCCL between GPUs).

These are the raw rings; `flashlm.dist` sets them up from torch.distributed and picks one per device.
Every collective works in place on a contiguous tensor; every rank calls the same collectives in the same
order with tensors of the same size and dtype.
"""

import os
from typing import Optional

import torch

from flashlm import _C
from flashlm.ops._util import cuda_stream

REDUCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCE_OPS = ("sum", "avg")


def check_tensor(tensor, name: str = "tensor", reduction: bool = True) -> None:
    """Raises ValueError naming `name` unless `tensor` is a contiguous tensor a ring collective accepts."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if reduction and tensor.dtype not in REDUCE_DTYPES:
        raise ValueError(f"{name}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"op: must be 'sum' or 'avg', got {op!r}")


class Ring:
    """A connected ring; build one with `shm_ring` or `nccl_ring` (collectively, on every rank)."""

    def __init__(self, ring):
        self._ring = ring

    @property
    def rank(self) -> int:
        return self._ring.rank

    @property
    def world_size(self) -> int:
        return self._ring.world_size

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """tensor := sum (or mean) over ranks, in place."""
        check_tensor(tensor)
        check_op(op)
        self._ring.allreduce(_flat(tensor), op, cuda_stream(tensor))
        return tensor

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: chunk `rank` (chunk_bounds) of the flattened tensor gets the sum (or mean) over ranks."""
        check_tensor(tensor)
        check_op(op)
        self._ring.reduce_scatter(_flat(tensor), op, cuda_stream(tensor))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: chunk `rank` of the flattened tensor is this rank's part; afterwards every chunk is filled."""
        check_tensor(tensor)
        self._ring.all_gather(_flat(tensor), cuda_stream(tensor))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """tensor := rank src's tensor, in place (any dtype)."""
        check_tensor(tensor, reduction=False)
        if not 0 <= src < self.world_size:
            raise ValueError(f"src: must be in [0, {self.world_size}), got {src}")
        self._ring.broadcast(_flat(tensor).view(torch.uint8), src, cuda_stream(tensor))
        return tensor

    def sendrecv(self, send: Optional[torch.Tensor] = None, recv: Optional[torch.Tensor] = None):
        """Point to point: sends `send` to the right neighbour, (rank + 1) % world_size, while receiving the
        left neighbour's tensor into `recv` in place; either may be None (one side only). Any dtype, as bytes;
        on a 2-rank ring both neighbours are the one peer. Each call pairs, in order, with the left
        neighbour's call that sends and the right neighbour's that receives; a size or dtype that differs
        from what arrives raises RuntimeError (shm transport), as does a peer that does not answer within
        the ring's timeout. Returns `recv`."""
        for tensor, name in ((send, "send"), (recv, "recv")):
            if tensor is not None:
                check_tensor(tensor, name, reduction=False)
        if send is not None and recv is not None:
            if send.device != recv.device:
                raise ValueError(f"recv: on {recv.device}, but send is on {send.device}")
            if _overlap(send, recv):
                raise ValueError("recv: must not overlap send")
        stream = cuda_stream(send if send is not None else recv) if send is not None or recv is not None else 0
        self._ring.sendrecv(_wire(send), _wire(recv), stream)
        return recv


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1)


# dtypes the native ring knows by name (a sendrecv tag carries it); others travel as their bytes.
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
                  torch.int32, torch.int64)


def _wire(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    flat = _flat(tensor)
    return flat if tensor.dtype in _NATIVE_DTYPES else flat.view(torch.uint8)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a.nbytes > 0 and b.nbytes > 0 and a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def chunk_bounds(n: int, world_size: int, i: int) -> tuple:
    """(begin, end) of chunk i of an n-element tensor split over world_size ranks."""
    return _C.chunk_begin(n, world_size, i), _C.chunk_begin(n, world_size, i + 1)


def shm_ring(job: str, rank: int, world_size: int, timeout: float = 60.0, slice_bytes: int = 0, slots: int = 0) -> Ring:
    """Connects the shared-memory ring of `world_size` processes of this host (segments named after `job`,
    which must be new for every ring and the same on every rank). A peer that does not answer within
    `timeout` seconds makes a collective raise RuntimeError instead of hanging."""
    return Ring(_C.shm_ring(job, rank, world_size, timeout, slice_bytes, slots))


def nccl_status() -> str:
    """The NCCL version the GPU ring would use, or why it cannot be used."""
    _point_at_nccl_wheel()
    return _C.nccl_status()


def nccl_unique_id() -> bytes:
    """A new 128-byte ncclUniqueId (rank 0 makes it and hands it to the others)."""
    _point_at_nccl_wheel()
    return _C.nccl_unique_id()


def nccl_ring(unique_id: bytes, rank: int, world_size: int, device: int, timeout: float = 60.0,
              slice_bytes: int = 0) -> Ring:
    """Connects the NCCL ring of `world_size` GPUs, one per rank (collective). Creating the communicator and
    every collective wait at most `timeout` seconds for the peers: past that, the communicator is aborted
    and the call raises RuntimeError naming the timeout (a collective returns once it has finished on the
    GPU)."""
    _point_at_nccl_wheel()
    return Ring(_C.nccl_ring(unique_id, rank, world_size, device, timeout, slice_bytes))


def reduce_add(dst: torch.Tensor, src: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
    """dst := (dst + src) / divisor in float32, rounded once to dst's dtype: the ring's reduction kernel."""
    check_tensor(dst, "dst")
    check_tensor(src, "src")
    _C.reduce_add(dst, src, divisor, cuda_stream(dst))
    return dst


def _point_at_nccl_wheel(_done=[]) -> None:
    # CUDA builds of torch bring NCCL as the nvidia-nccl wheel (site-packages/nvidia/nccl/lib); libtorch
    # has usually loaded it already, but say where it is in case it has not.
    if _done or os.environ.get("FLASHLM_NCCL_LIBRARY"):
        return
    _done.append(True)
    path: Optional[str] = None
    try:
        import nvidia.nccl  # noqa: PLC0415

        for base in nvidia.nccl.__path__:
            candidate = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(candidate):
                path = candidate
                break
    except ImportError:
        pass
    if path:
        os.environ["FLASHLM_NCCL_LIBRARY"] = path
