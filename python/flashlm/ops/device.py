"""Devices as a user names them and as they are: check_device turns a device name from a user (a flag, a
config) into a torch.device that torch can use, checked before anything is moved there, so that `--device cuda`
on a machine without a GPU is a ValueError naming the argument rather than torch's AssertionError ("Torch not
compiled with CUDA enabled") half way through; available_memory says how much a new allocation can still take."""

import os
from typing import Optional

import torch


def check_device(device, name: str = "device") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: {device!r} is not a device ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{name}: {device!r} is not supported (cpu or cuda)")
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: {device!r} asked, but torch sees no CUDA device (use cpu)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name}: {device!r} asked, but torch sees {count} CUDA device{'s' if count > 1 else ''}")
    return dev


def available_memory(device) -> Optional[int]:
    """Bytes a new allocation can still take on the device, or None where it cannot be told: CUDA's free
    memory; on the CPU the kernel's MemAvailable (sysconf's free pages without /proc), within the cgroup's
    memory.max and the address-space limit when the process runs under them."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f_max, open("/sys/fs/cgroup/memory.current") as f_cur:
            limit = f_max.read().strip()
            if limit != "max":
                found.append(max(int(limit) - int(f_cur.read()), 0))
    except (OSError, ValueError):
        pass
    found += _address_space_left()
    return min(found) if found else None


def _address_space_left() -> list:
    """[what the process's address-space limit (RLIMIT_AS, `ulimit -v`) leaves above its mappings], or [] where
    it has none: past it an allocation fails however much memory the machine has."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return []
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return [max(limit - size, 0)]
    except (ImportError, OSError, ValueError, StopIteration):
        return []
