"""GradientSync: averages gradients over ranks during backward, DDP-style.

    sync = flashlm.dist.GradientSync(model)   # after flashlm.dist.init()
    loss.backward()                            # buckets are reduced while backward goes on
    sync.wait()                                # then optimizer.step()

Parameters are grouped into buckets of about `bucket_mb` MB, in reverse order of model.parameters() (the
order in which backward produces their gradients). A post-accumulate-grad hook copies each gradient into
its bucket; when a bucket is complete and every bucket before it has been launched, its allreduce starts
(on a background thread for CPU tensors, so the ring runs while autograd computes the next gradients; on
the current CUDA stream for GPU tensors, each call returning once its allreduce has finished on the GPU so
that a dead peer raises within the timeout). Buckets are launched strictly in order so every rank runs the
same sequence of collectives. After wait() each .grad is a view into its bucket, so the next backward
accumulates straight into it and the copy is skipped. Between backward and wait() the background thread
owns the ring: run no other flashlm.dist collective on the same device then (the ranks could interleave
them in different orders; the shared-memory ring detects that and raises).
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

import flashlm.dist as _dist


class _Bucket:
    def __init__(self, params, dtype, device):
        self.params = params
        numel = sum(p.numel() for p in params)
        self.flat = torch.zeros(numel, dtype=dtype, device=device)
        self.views = {}
        offset = 0
        for p in params:
            self.views[p] = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.arrived = set()
        self.future = None
        self.launched = False


class BucketHooks:
    """Gradient hooks that launch buckets strictly in one order, each once every parameter in it has its
    gradient, so that every rank runs the same sequence of collectives. A subclass sets self._order (the
    buckets, each with .params, .arrived and .launched, in launch order), calls _install_hooks(params) and
    defines _launch(bucket); _arrive(bucket, p) sees each gradient as it comes."""

    _finish_call = "wait()"  # what the error message asks for

    def _install_hooks(self, params) -> None:
        self._bucket_of = {p: b for b in self._order for p in b.params}
        self._next = 0  # the next bucket to launch
        self._enabled = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally; the next one outside synchronizes the sum."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._enabled:
            return
        b = self._bucket_of[p]
        if b.launched:
            raise RuntimeError(f"{type(self).__name__}: a gradient arrived for a bucket already being reduced; call "
                               f"{self._finish_call} after each backward (or use no_sync() to accumulate)")
        self._arrive(b, p)
        b.arrived.add(p)
        self._launch_ready()

    def _arrive(self, b, p: torch.Tensor) -> None:
        pass

    def _launch_ready(self) -> None:
        while self._next < len(self._order) and len(self._order[self._next].arrived) == len(self._order[self._next].params):
            self._launch(self._order[self._next])
            self._next += 1

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class GradientSync(BucketHooks):
    """Averages (op="avg") or sums (op="sum") the gradients of `params` (a module or an iterable of
    parameters) over all ranks, bucket by bucket, as backward produces them. Call wait() after backward
    and before the optimizer step."""

    def __init__(self, params, bucket_mb: float = 25.0, op: str = "avg"):
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        if op not in ("sum", "avg"):
            raise ValueError(f"op: must be 'sum' or 'avg', got {op!r}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb: must be > 0, got {bucket_mb}")
        seen, unique = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        for p in unique:
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"params: gradients must be float32, float16 or bfloat16, got {p.dtype}")
        _dist.get_world_size()  # raises unless init() was called
        self.op = op
        self._buckets = []
        limit = int(bucket_mb * 1e6)
        current, size = [], 0
        for p in reversed(unique):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype or p.device != current[0].device):
                self._buckets.append(_Bucket(current, current[0].dtype, current[0].device))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._buckets.append(_Bucket(current, current[0].dtype, current[0].device))
        self._order = self._buckets
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlm-grad-sync")
        self._install_hooks(unique)

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def _arrive(self, b: _Bucket, p: torch.Tensor) -> None:
        view = b.views[p]
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)

    def _launch(self, b: _Bucket) -> None:
        b.launched = True
        if b.flat.device.type == "cpu":
            b.future = self._executor.submit(_dist.all_reduce, b.flat, self.op)
        else:
            _dist.all_reduce(b.flat, self.op)

    def wait(self) -> None:
        """Finishes every bucket's allreduce and points each .grad at its reduced gradient. Gradients that
        did not arrive on this rank (parameters unused in this step) count as zero."""
        if not self._enabled:
            raise RuntimeError("GradientSync.wait: called inside no_sync()")
        for b in self._buckets[self._next:]:
            for p in b.params:
                if p not in b.arrived:
                    b.views[p].zero_()
                    b.arrived.add(p)
        self._launch_ready()
        try:
            for b in self._buckets:
                if b.future is not None:
                    b.future.result()
        finally:
            for b in self._buckets:
                for p in b.params:
                    p.grad = b.views[p]
                b.arrived.clear()
                b.future = None
                b.launched = False
            self._next = 0

    def remove(self) -> None:
        """Removes the hooks and stops the background thread."""
        self._remove_hooks()
        self._executor.shutdown(wait=True)
