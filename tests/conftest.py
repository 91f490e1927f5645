"""Shared fixtures: tiny models, and the digits CNN of the bundled example repo.

torch is imported at module top on purpose: pytester snapshots ``sys.modules`` around in-process
runs, and a torch first imported inside one would be dropped and re-imported by the next.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import sklearn.linear_model  # noqa: F401 - like torch, loaded before pytester snapshots sys.modules
import sklearn.pipeline  # noqa: F401
import sklearn.preprocessing  # noqa: F401
import threadpoolctl  # noqa: F401
import torch
from hypothesis import settings
from torch import nn

# CI runs the property tests with a fixed seed sequence: a red CI must mean a real regression.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

EXAMPLE_REPO = Path(__file__).resolve().parent.parent / "examples" / "digits_repo"
if str(EXAMPLE_REPO) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_REPO))


class TinyCNN(nn.Module):
    """Two convolutions, a BatchNorm and a linear head on 1x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn(self.conv1(x)))
        return self.fc(self.relu2(self.conv2(x)).flatten(1))


def make_tiny_cnn(seed: int = 0) -> TinyCNN:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyCNN()
    # Non-trivial BatchNorm state, so tests notice if running statistics are touched.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        model.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        model.bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
        model.bn.bias.copy_(torch.randn(4, generator=g) * 0.1)
    return model.eval()


def tiny_images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_model() -> TinyCNN:
    return make_tiny_cnn()


@pytest.fixture
def tiny_inputs() -> torch.Tensor:
    return tiny_images()


@pytest.fixture(scope="session")
def digits(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(model, test images, test labels): the example repo's CNN, trained once and cached."""
    from digits_model import load_digits_32, load_or_train

    cache_plugin = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(cache_plugin.mkdir("pytest_saliency_digits")) if cache_plugin else tmp_path_factory.mktemp("digits")
    model = load_or_train(seed=0, cache_dir=cache)
    x, y = load_digits_32("test")
    return model, x, y
