"""Data randomization (Adebayo et al. 2018): maps of a model trained on permuted labels against the real model's."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError, SaliencyWarning
from pytest_saliency.checks.data_randomization import (
    LabelPermutation,
    assert_sensitive_to_data_randomization,
    data_randomization,
)
from pytest_saliency.model.cache import ModelCache
from pytest_saliency.reporting.figures import figures_for
from pytest_saliency.reporting.protocol import CheckResult


def _digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits upsampled to 16x16 (room for the SSIM window), in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], torch.tensor(data.target)[order]


X, Y = _digits16()
X_TRAIN, Y_TRAIN = X[:300], Y[:300]
X_TEST = X[1500:1532]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc1, self.relu3, self.fc2 = nn.Linear(8 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = F.max_pool2d(self.relu2(self.conv2(x)), 2)
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def make_factory(max_steps: int = 600) -> tuple[Callable[..., nn.Module], list[str]]:
    """A training factory as a user writes it: full-batch Adam until the (possibly permuted)
    training labels are fitted; ``calls`` records each training."""
    calls: list[str] = []

    def train(seed: int, *, permute: Callable | None = None) -> nn.Module:
        calls.append("permuted" if permute is not None else "real")
        y = Y_TRAIN if permute is None else permute(Y_TRAIN)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny network: threads only cost (a busy CI machine)
        try:
            torch.manual_seed(seed)
            model = DigitsCNN()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for step in range(max_steps):
                optimizer.zero_grad()
                F.cross_entropy(model(X_TRAIN), y).backward()
                optimizer.step()
                if step % 25 == 24:
                    with torch.no_grad():
                        if bool((model(X_TRAIN).argmax(1) == y).all()):
                            break
        finally:
            torch.set_num_threads(threads)
        return model.eval()

    train.build = DigitsCNN  # type: ignore[attr-defined]
    return train, calls


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The factory, its calls and a model cache; the first check trains both models into it."""
    train, calls = make_factory()
    cache = ModelCache(tmp_path_factory.mktemp("data_randomization_models"))
    first = data_randomization(train, X_TEST, "saliency", cache=cache, fit=(X_TRAIN, Y_TRAIN))
    return train, calls, cache, first


def absolute_input(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A control that ignores the model: |x|."""
    return inputs.abs()


# ---------------------------------------------------------------------------------------- the proof


def test_the_permuted_label_models_gradient_maps_differ(trained):
    _, calls, _, result = trained
    assert result.passed, result.failure_message()
    assert calls == ["real", "permuted"]
    assert result.training == {"real": "trained", "permuted": "trained"}
    # SSIM well below the 0.99 threshold, every input; the permuted model memorized its labels
    assert result.mean_similarity < 0.4 and max(result.values) < 0.7
    assert result.stats.dataset_score > 0.5
    assert result.fit["real_on_real"] >= 0.95 and result.fit["permuted_on_permuted"] >= 0.95
    assert result.fit["permuted_on_real"] < 0.3 and result.fitted
    assert 0.8 < result.labels_changed < 0.95  # a permutation of 10 balanced classes changes about 90%
    assert "permute=LabelPermutation(seed=" in result.report()
    assert result.figures() and isinstance(result, CheckResult)
    json.dumps(result.to_dict())


def test_the_models_train_once_and_come_from_the_cache(trained):
    train, calls, cache, first = trained
    again = data_randomization(train, X_TEST, "saliency", cache=cache)
    assert calls == ["real", "permuted"]  # no training: both loaded
    assert again.training == {"real": "loaded from the cache", "permuted": "loaded from the cache"}
    assert again.values == pytest.approx(first.values, abs=1e-6)
    # the permutation seed is part of the permuted model's key: another seed trains another model
    other = data_randomization(train, X_TEST[:8], "saliency", cache=cache, permutation_seed=123)
    assert calls == ["real", "permuted", "permuted"]
    assert other.training == {"real": "loaded from the cache", "permuted": "trained"} and other.permutation_seed == 123
    assert len(list(cache.directory.glob("*.pt"))) == 3


def test_a_model_independent_control_fails_and_identical_models_fail(trained):
    train, _, cache, _ = trained
    failed = data_randomization(train, X_TEST, absolute_input, cache=cache)
    assert not failed.passed and failed.values == pytest.approx([1.0] * 32, abs=1e-6)
    with pytest.raises(SaliencyCheckFailed, match="maps of the real-label model and the permuted-label model do NOT"):
        assert_sensitive_to_data_randomization(train, X_TEST, absolute_input, cache=cache)
    real = cache.get_or_train(train, 0)
    same = data_randomization((real, real), X_TEST[:8], "saliency")
    assert not same.passed and same.values == pytest.approx([1.0] * 8, abs=1e-6)


def test_retrained_real_models_are_more_alike_than_the_permuted_one(trained):
    train, _, cache, result = trained
    with_reference = data_randomization(train, X_TEST, "saliency", cache=cache, reference_seed=1)
    assert with_reference.training["reference"] in ("trained", "loaded from the cache")
    assert with_reference.values == pytest.approx(result.values, abs=1e-6)
    # the seed-consistency floor: two real models agree more than the real and the permuted one
    assert with_reference.reference_similarity > with_reference.mean_similarity + 0.05
    assert "are further from the real model's than a retrained model's" in with_reference.report()
    pair = data_randomization((cache.get_or_train(train, 0), cache.get_or_train(train, 1)), X_TEST, "saliency")
    assert pair.values == pytest.approx(with_reference.reference_values, abs=1e-6)
    streamed = data_randomization(train, [X_TEST[:20], X_TEST[20:]], "saliency", cache=cache, reference_seed=1)
    assert streamed.reference_values == pytest.approx(with_reference.reference_values, abs=1e-6)
    with pytest.raises(SaliencyUsageError, match="reference_seed must differ"):
        data_randomization(train, X_TEST, cache=cache, reference_seed=0)


# ---------------------------------------------------------------------------------------- the permutation


def test_label_permutation_is_seeded_and_keeps_the_type():
    labels = torch.arange(20) % 4
    p = LabelPermutation(5)
    permuted = p(labels)
    assert torch.equal(permuted.sort().values, labels.sort().values)  # a permutation of the labels
    assert torch.equal(permuted, LabelPermutation(5)(labels)) and not torch.equal(permuted, LabelPermutation(6)(labels))
    assert p.calls == 1 and p.changed == float((permuted != labels).double().mean())
    as_numpy = LabelPermutation(5)(labels.numpy())
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, permuted.numpy())
    as_list = LabelPermutation(5)(labels.tolist())
    assert as_list == permuted.tolist()
    with pytest.raises(SaliencyUsageError, match="one label per training example"):
        p(torch.tensor(3))
    assert repr(p) == "LabelPermutation(seed=5)"


def test_a_factory_must_take_and_apply_permute():
    calls = []

    def no_permute(seed):
        calls.append(seed)
        return make_tiny_cnn(seed)

    with pytest.raises(SaliencyUsageError, match="takes no permute= argument"):
        data_randomization(no_permute, tiny_images(4))
    assert calls == []  # refused before any training

    def ignores_permute(seed, *, permute=None):
        return make_tiny_cnn(seed)

    with pytest.raises(SaliencyUsageError, match="returned without calling permute"):
        data_randomization(ignores_permute, tiny_images(4))


def test_a_permuted_model_that_did_not_fit_warns():
    train, _ = make_factory(max_steps=3)
    with pytest.warns(SaliencyWarning, match="did not memorize|below 95%"):
        result = data_randomization(train, X_TEST[:6], "saliency", fit=(X_TRAIN, Y_TRAIN))
    assert result.fitted is False and "NOT fitted" in result.report()


# ---------------------------------------------------------------------------------------- guarantees


def test_a_loader_gives_the_tensor_runs_numbers():
    models, x = (make_tiny_cnn(0), make_tiny_cnn(1)), tiny_images(10)
    whole = data_randomization(models, x, "saliency")
    streamed = data_randomization(models, DataLoader(TensorDataset(x), batch_size=3), "saliency")
    assert streamed.values == pytest.approx(whole.values, abs=1e-6)
    assert streamed.targets == whole.targets and streamed.other_targets == whole.other_targets
    assert streamed.chance == pytest.approx(whole.chance, abs=1e-6)
    assert streamed.stats.dataset_score == pytest.approx(whole.stats.dataset_score, abs=1e-9)


def test_models_bit_identical_and_global_rng_unchanged():
    models = (make_tiny_cnn(0), make_tiny_cnn(1))
    models[0].train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    flags = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    rng = torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()
    data_randomization(models, tiny_images(5), "smoothgrad", nt_samples=3)
    for model, state, flag in zip(models, before, flags):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert flag == (model.training, [p.requires_grad for p in model.parameters()])
    assert torch.equal(rng[0], torch.random.get_rng_state()) and np.array_equal(rng[1], np.random.get_state()[1])
    assert rng[2] == random.getstate()


def test_bad_arguments_are_usage_errors():
    models, x = (make_tiny_cnn(0), make_tiny_cnn(1)), tiny_images(4)
    with pytest.raises(SaliencyUsageError, match="factory train"):
        data_randomization("model.pt", x)
    with pytest.raises(SaliencyUsageError, match="min_fit_accuracy"):
        data_randomization(models, x, min_fit_accuracy=1.5)
    with pytest.raises(SaliencyUsageError, match=r"fit must be \(x_train, y_train\)"):
        data_randomization(models, x, fit=x)
    with pytest.raises(SaliencyUsageError, match="one integer label per training input"):
        data_randomization(models, x, fit=(x, torch.zeros(3, dtype=torch.long)))
    pictures = figures_for(data_randomization(models, x, "saliency"), strict=True)
    assert list(pictures) == ["data_randomization_maps"]
