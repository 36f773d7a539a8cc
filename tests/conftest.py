"""Shared pytest setup: CUDA-marked tests skip without a GPU; parameters for tests that run on every device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_isa():
    """Puts back the CPU kernel ISA a test switches (flashlm.ops.set_cpu_isa)."""
    from flashlm import ops

    saved = ops.cpu_isa()
    yield
    ops.set_cpu_isa(saved)


def devices():
    """Parameters for tests that run on every device: CPU always, CUDA marked (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _case_id(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return "x".join(_case_id(v) for v in value)
    return str(value)


def per_device(cpu=(), cuda=()):
    """Parameters (device, *case) for one test whose cases differ per device (dtypes, shapes): each cpu case
    on "cpu", each cuda case on "cuda", marked (skipped without a GPU). A case is a tuple of values."""
    return [pytest.param(device, *case, marks=marks, id="-".join(map(_case_id, (device, *case))))
            for device, cases, marks in (("cpu", cpu, ()), ("cuda", cuda, pytest.mark.cuda)) for case in cases]


def cpu_isas():
    """The CPU kernel ISAs this machine runs: "scalar", and "avx2" where the CPU has AVX2/FMA."""
    from flashlm import ops

    return [isa for isa in ("scalar", "avx2") if ops.cpu_isa_supported(isa)]


def per_kernel(cpu=(), cuda=()):
    """per_device parameters (device, isa, *case) for tests of every kernel: each cpu case once per CPU ISA
    (the test switches to it, with the restore_isa fixture), each cuda case with isa None."""
    return per_device(cpu=[(isa, *case) for isa in cpu_isas() for case in cpu], cuda=[(None, *case) for case in cuda])


def use_isa(isa):
    """Switches the CPU kernels to `isa`, a per_kernel parameter (None, on CUDA, leaves them); the test holds
    the restore_isa fixture."""
    if isa is not None:
        from flashlm import ops

        ops.set_cpu_isa(isa)
