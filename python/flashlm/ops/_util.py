import torch


def cuda_stream(t: torch.Tensor) -> int:
    """The raw cudaStream_t of torch's current stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
