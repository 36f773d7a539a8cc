import numpy as np
import pytest
import torch

from flashlm import ops
from flashlm.io.random_blocks import TYPES, random_blocks


@pytest.mark.parametrize("name", TYPES)
def test_random_blocks_decode_to_finite_values(name):
    a, b = random_blocks(name, 4096, 1), random_blocks(name, 4096, 1)
    assert a.dtype == np.uint8 and np.array_equal(a, b)  # reproducible from the seed
    assert not np.array_equal(a, random_blocks(name, 4096, 2))
    assert torch.isfinite(ops.dequantize(torch.from_numpy(a), name, (4096,))).all()


def test_random_blocks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        random_blocks("IQ2_XXS", 256)
    with pytest.raises(ValueError, match="n: 100"):
        random_blocks("Q4_K", 100)
