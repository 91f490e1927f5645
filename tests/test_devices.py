"""Device resolution, including one GPU per pytest-xdist worker (simulated on CPU)."""

from __future__ import annotations

import pytest
import torch

from pytest_saliency import SaliencyUsageError
from pytest_saliency.core.devices import resolve_device, worker_index


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this suite may itself run under xdist


def test_worker_index(monkeypatch):
    assert worker_index("gw0") == 0 and worker_index("gw12") == 12
    assert worker_index("master") is None
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert worker_index() == 3
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert worker_index() is None


@pytest.mark.parametrize("worker, expected", [(None, 0), ("gw0", 0), ("gw1", 1), ("gw3", 3), ("gw5", 1)])
def test_auto_gives_each_worker_its_own_gpu(four_gpus, worker, expected):
    assert resolve_device("auto", worker) == torch.device("cuda", expected)
    assert resolve_device("cuda", worker) == torch.device("cuda", expected)


def test_worker_id_comes_from_the_environment(four_gpus, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    assert resolve_device("auto") == torch.device("cuda", 2)


def test_explicit_indices_are_taken_literally_and_checked(four_gpus):
    assert resolve_device("cuda:3", "gw0") == torch.device("cuda", 3)
    with pytest.raises(SaliencyUsageError, match="only 4 CUDA device"):
        resolve_device("cuda:4")


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "gw1") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(SaliencyUsageError, match="CUDA is not available"):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_check_runs_end_to_end_on_cuda():
    from conftest import make_tiny_cnn, tiny_images
    from pytest_saliency import layer_randomization

    device = resolve_device("auto")
    result = layer_randomization(make_tiny_cnn().to(device), tiny_images().to(device), "saliency")
    assert result.passed and result.device.startswith("cuda")
