import functools
import inspect
from contextlib import nullcontext

import torch
from torch.profiler import record_function


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
    goes through the dispatcher whenever autograd records (grad mode on and a tensor argument requiring grad),
    unless it was registered with eager=True: then eager calls run the function and the same formula in a
    torch.autograd.Function, without the dispatcher's autograd layer."""

    def __init__(self, op, fn, name: str):
        self.op = op  # the CustomOpDef (torch.ops.flashlm.<name>)
        self.fn = fn
        self.name = name  # "flashlm::<name>"
        self.differentiable = False
        self.function = None  # the eager autograd.Function (register_autograd(..., eager=True))
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or _any_meta(args, kwargs):
            return self.op(*args, **kwargs)  # meta tensors: the fake implementation, and its device checks
        if self.differentiable and torch.is_grad_enabled() and _requires_grad(args, kwargs):
            if self.function is None:
                return self.op(*args, **kwargs)
            if not kwargs and self.required <= len(args) <= self.required + len(self.defaults):
                return self.function.apply(*args, *self.defaults[len(args) - self.required:])
            bound = self.signature.bind(*args, **kwargs)  # apply() takes the op's arguments in order
            bound.apply_defaults()
            return self.function.apply(*bound.args)
        return self.fn(*args, **kwargs)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, setup_context, eager: bool = False):
        """The op's autograd formula (torch.library's contract). eager: eager training calls run it in an
        autograd.Function (forward: the function itself) instead of through the dispatcher's autograd layer,
        whose round trip costs 25-50 us of CPU time per forward + backward (silu_mul, gelu_tanh, rms_norm_train,
        rope on [64, 64]-sized tensors, one thread: 102-186 us a call this way, 127-218 us through it);
        the formula calls its backward op through backward_call, so that it too skips the dispatcher there
        while torch.compile and opcheck trace the registered op."""
        self.differentiable = True
        self.op.register_autograd(backward, setup_context=setup_context)
        if eager:
            self.signature = inspect.signature(self.fn)
            # Positional calls skip signature.bind (28 us of CPU for attention's 17 arguments): the defaults
            # of the trailing parameters are appended as they are.
            params = list(self.signature.parameters.values())
            positional = all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
            self.defaults = tuple(p.default for p in params if p.default is not p.empty) if positional else ()
            self.required = len(params) - len(self.defaults) if positional else len(params) + 1  # else: bind
            self.function = _eager_function(self.name, self.fn, backward, setup_context)


def named(name: str):
    """A profiler record of `name` while torch.profiler records (record_function costs ~15 us a call even when
    nothing records)."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


def _eager_function(qualname: str, fn, backward, setup_context) -> type:
    """A torch.autograd.Function running fn forward and torch.library's formula (setup_context, backward)
    backward; the profiler names its forward qualname (its backward node is <name>Backward)."""

    def forward(ctx, *inputs):
        with named(qualname):
            output = fn(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True  # backward_call: the backward ops' functions
        return output

    name = qualname.split("::")[-1]
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def backward_call(ctx, op: EagerOp, *args):
    """op(*args) inside an autograd formula: op's function itself under the eager autograd.Function
    (register_autograd(..., eager=True)), else the registered op (what torch.compile and opcheck trace, with
    fake or functional tensors that the native code cannot take)."""
    if not getattr(ctx, "eager", False):
        return op.op(*args)
    with named(op.name):  # the profiler names it as it names the registered op
        return op.fn(*args)


def _any_meta(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values()))


def _requires_grad(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def custom_op(name: str, *, mutates_args, device_types=("cpu", "cuda")):
    """torch.library.custom_op, returning an EagerOp."""
    def wrap(fn):
        return EagerOp(torch.library.custom_op(name, mutates_args=mutates_args, device_types=device_types)(fn), fn,
                       name)
    return wrap
