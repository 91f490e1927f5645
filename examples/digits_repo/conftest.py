import pytest

from digits_model import load_digits_32, load_or_train


@pytest.fixture(scope="session")
def model(saliency_device):
    """The trained CNN (trained once, then loaded from .model_cache/) on the saliency device."""
    return load_or_train(seed=0).to(saliency_device)


@pytest.fixture(scope="session")
def images(saliency_device):
    """32 held-out digits, 1x32x32 in [0, 1]."""
    x, _ = load_digits_32("test")
    return x[:32].to(saliency_device)
