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
