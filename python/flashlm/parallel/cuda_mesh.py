"""CUDA tensors on the mesh: an NCCL ring per group and per pipeline link, and the checks made before any.

    index = local_gpu()                            # the trainer's cuda:LOCAL_RANK, refused past the host's GPUs
    check_mesh_devices(device)                     # collective, before the Mesh: one kind of device, a GPU a rank,
                                                   # NCCL in the build and on the machine
    ring = mesh.tp.ring_on(device)                 # the group's NCCL ring (group_nccl_ring), made at first use
    links = stage_links(stage, plan, tied, nccl_connect(f"{mesh.job}-pipe{first}", index, timeout))

A group moves each tensor over the ring of the tensor's device: CPU tensors over its shared-memory ring, CUDA
tensors over its own NCCL ring (flashlm.dist's NCCL transport, one communicator per group on the rank's GPU),
connected at the group's first CUDA collective. The group's first rank makes the ring's unique id and shares it
through torch.distributed's store, under a key named after the mesh's job and the group, as the shared-memory
rings share their job names (flashlm.dist.connect_nccl_ring). Every rank of a group makes its collectives in the
same order, so the group's first CUDA collective is the same call on each: the communicator is created by all
of them at once, and a peer that never comes makes the creation time out like a collective.

A CUDA mesh needs every rank on a GPU of its own (cuda:LOCAL_RANK, the trainer's choice), and the NCCL transport
in the build and on the machine; check_mesh_devices (check_placements, check_nccl) refuses the rest by name, on
every rank, before any group is made (a rank that went ahead would wait for peers that never connect).
"""

import os
from typing import Callable, Optional

import torch
import torch.distributed as tdist

import flashlm
import flashlm.dist as fd
from flashlm.ops import comm


def check_nccl() -> None:
    """NotImplementedError (a build without the NCCL transport) or RuntimeError (libnccl.so.2 missing or too
    old) unless CUDA tensors can go through NCCL rings."""
    if not flashlm.build_info()["nccl"]:
        raise NotImplementedError("--device cuda: this flashlm was built without the NCCL transport (build with "
                                  "FLASHLM_CUDA=ON and FLASHLM_NCCL left AUTO or ON), so a mesh cannot move CUDA "
                                  "tensors; train with --device cpu")
    status = comm.nccl_status()
    if not status.startswith("NCCL "):
        raise RuntimeError(f"--device cuda: the mesh's NCCL rings cannot start: {status}")


def placement(device: torch.device) -> tuple:
    """(this host, the device's name): what check_placements compares across ranks."""
    index = cuda_index(device)
    return fd.host_id(), str(torch.device(device) if index is None else torch.device("cuda", index))


def gather_placements(device: torch.device) -> list:
    """Every rank's placement(device), in rank order (collective over the world)."""
    out = [None] * fd.get_world_size()
    tdist.all_gather_object(out, placement(device))
    return out


def check_placements(placements: list) -> None:
    """ValueError unless the ranks (their (host, device) in rank order) are all on the CPU or all on CUDA, and no
    two ranks of a host share a GPU (an NCCL ring connects one GPU per rank)."""
    kinds = {device.split(":")[0] for _, device in placements}
    if len(kinds) > 1:
        said = "; ".join(f"{kind} on rank(s) {[r for r, (_, d) in enumerate(placements) if d.split(':')[0] == kind]}"
                         for kind in sorted(kinds))
        raise ValueError(f"--device: every rank of a mesh must train on the same kind of device, got {said}")
    seen = {}
    for rank, where in enumerate(placements):
        if where[1] != "cpu" and where in seen:
            raise ValueError(f"--device: ranks {seen[where]} and {rank} are both on {where[1]} of one host: a mesh "
                             "needs a GPU per rank (cuda:LOCAL_RANK; start at most as many ranks per host as it has "
                             "GPUs)")
        seen.setdefault(where, rank)


def check_mesh_devices(device: torch.device) -> None:
    """The checks every rank makes before its mesh's groups, this rank's model on `device` (collective over the
    world): check_placements over every rank's, then check_nccl on GPUs. The same error on every rank."""
    placements = gather_placements(device)
    check_placements(placements)
    if placements[0][1] != "cpu":
        check_nccl()


def group_key(job: str, name: str) -> str:
    """The store key of the unique id of the NCCL ring `name` of the mesh (or pipeline) whose rings start with
    `job`."""
    return f"flashlm/mesh-nccl/{job}-{name}"


def group_nccl_ring(job: str, name: str, rank: int, world_size: int, device: int, timeout: float) -> comm.Ring:
    """The NCCL ring `name` of this job (a group or a pipeline link), this rank's on cuda:`device` (collective
    over the ring's ranks; its rank 0 makes the unique id)."""
    if job is None:
        raise RuntimeError(f"{name}: a ring of {world_size} ranks needs the mesh's job name")
    return fd.connect_nccl_ring(group_key(job, name), rank, world_size, device, timeout)


def nccl_connect(job: str, device: int, timeout: float = 60.0) -> Callable:
    """connect(name, rank, world_size): the NCCL ring `name` of `job` on cuda:`device`, as pipeline.stage_links
    asks for its links (shm_stage_links' rings, over NCCL)."""
    return lambda name, rank, world_size: group_nccl_ring(job, name, rank, world_size, device, timeout)


def local_gpu(local_rank: Optional[str] = None, count: Optional[int] = None) -> int:
    """This rank's GPU: LOCAL_RANK (torchrun's place of the rank on its host; `local_rank`, from the environment
    when None, "0" when unset), checked against the `count` GPUs of the host (torch's when None). ValueError,
    naming LOCAL_RANK, for a host with fewer GPUs than the ranks started on it."""
    if local_rank is None:
        local_rank = os.environ.get("LOCAL_RANK", "0")
    if count is None:
        count = torch.cuda.device_count()
    try:
        index = int(local_rank)
    except ValueError:
        raise ValueError(f"LOCAL_RANK: expected an integer, got {local_rank!r}") from None
    if index < 0:
        raise ValueError(f"LOCAL_RANK: must be >= 0, got {index}")
    if index >= count:
        raise ValueError(f"LOCAL_RANK: rank {index} of this host has no GPU of its own: the host has {count} "
                         f"GPU(s); start at most {count} rank(s) per host on CUDA, or train with --device cpu")
    return index


def cuda_index(device: torch.device) -> Optional[int]:
    """The GPU of a CUDA device (the current one for a bare "cuda"), None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index
