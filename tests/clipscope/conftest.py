import pytest
import torch

from tests.clipscope.stream import CLASSES


@pytest.fixture(scope="module")
def image():
    """One random ``[1, 3, 224, 224]`` model input."""
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def classifier():
    """A random unit-norm zero-shot classifier ``[512, len(CLASSES)]``."""
    return torch.nn.functional.normalize(torch.randn(512, len(CLASSES), generator=torch.Generator().manual_seed(4)), dim=0)
