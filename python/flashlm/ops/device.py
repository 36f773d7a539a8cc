"""check_device: a device name from a user (a flag, a config) as a torch.device that torch can use, checked
before anything is moved there, so that `--device cuda` on a machine without a GPU is a ValueError naming the
argument rather than torch's AssertionError ("Torch not compiled with CUDA enabled") half way through."""

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
