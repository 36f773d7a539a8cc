import functools

import torch


def cuda_stream(t: torch.Tensor) -> int:
    """The raw cudaStream_t of torch's current stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


class EagerOp:
    """A torch.library custom op that eager callers reach without the dispatcher.

    The dispatcher's round trip (argument boxing, the autograd and fake-tensor layers) costs 20-60 us a call:
    a decode-sized paged_attention took 80 us through the op and 25 us called directly, so a decode step of a
    12-layer model would spend milliseconds there. Eager calls run the function itself; under torch.compile the
    registered op is traced, with its fake implementation. An op with an autograd formula (register_autograd)
    goes through the dispatcher whenever autograd records: grad mode on and a tensor argument requiring grad."""

    def __init__(self, op, fn):
        self.op = op  # the CustomOpDef (torch.ops.flashlm.<name>)
        self.fn = fn
        self.differentiable = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or (self.differentiable and torch.is_grad_enabled()
                                             and _requires_grad(args, kwargs)):
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, setup_context):
        self.differentiable = True
        self.op.register_autograd(backward, setup_context=setup_context)


def _requires_grad(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def custom_op(name: str, *, mutates_args, device_types=("cpu", "cuda")):
    """torch.library.custom_op, returning an EagerOp."""
    def wrap(fn):
        return EagerOp(torch.library.custom_op(name, mutates_args=mutates_args, device_types=device_types)(fn), fn)
    return wrap
