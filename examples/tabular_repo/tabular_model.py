"""A small tabular model repo: Ley et al.'s feed-forward network on scikit-learn's breast cancer data.

Ley et al. ("Consistent Explanations in the Face of Model Indeterminacy via Ensembling") train a
feed-forward network with hidden layers 128, 64 and 16 (ReLU) on standardized tabular features,
with no weight decay, no dropout and no shuffling between epochs, so that models differ only in
their initialization seed. This module does the same on the Wisconsin breast cancer data bundled
with scikit-learn (569 inputs, 30 continuous features; nothing is downloaded):

* a fixed, seeded 80/20 train/test split (455 / 114 inputs), features standardized with the
  mean and standard deviation of the training split, float32 tensors;
* ``train(seed)``: the network initialized from ``seed`` and trained with Adam for a fixed number
  of epochs over the training split in a fixed order (about 0.3 s on one CPU thread). It is a
  factory for ``saliency.assert_seed_consistency_above(train, x, seeds=...)`` and
  ``pytest_saliency.consistency_vs_ensemble_size``; ``train.build`` lets the plugin's model cache
  rebuild the architecture to load stored weights into.

Labels: scikit-learn's encoding, 0 = malignant, 1 = benign. Explanations are computed for class 1,
as Ley et al. explain the positive ("desirable") class.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_SEED = 0
EPOCHS = 30
LR = 1e-3
BATCH = 32
POSITIVE_CLASS = 1  # benign


class FeedForward(nn.Module):
    """Ley et al.'s tabular network: d -> 128 -> 64 -> 16 -> classes, ReLU after each hidden layer."""

    def __init__(self, features: int = 30, classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 16)
        self.fc4 = nn.Linear(16, classes)
        # One nn.ReLU module per use: captum's GuidedBackprop, Deconvolution and DeepLift override
        # nn.ReLU modules, so a functional F.relu would silently give them the plain gradient.
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        x = self.relu3(self.fc3(x))
        return self.fc4(x)


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(0.8 * len(y))
    train_index, test_index = order[:cut], order[cut:]
    mean = x[train_index].mean(dim=0)
    std = x[train_index].std(dim=0)
    x = ((x - mean) / std).to(torch.float32)
    return {"train": (x[train_index], y[train_index]), "test": (x[test_index], y[test_index])}


def load_tabular(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Breast cancer features (N, 30), standardized with the training split's statistics, and labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _splits()[split]
    return x.clone(), y.clone()


def feature_names() -> list[str]:
    """The 30 feature names, in column order."""
    from sklearn.datasets import load_breast_cancer

    return [str(name) for name in load_breast_cancer().feature_names]


def train(seed: int = 0, epochs: int = EPOCHS) -> FeedForward:
    """Train from scratch: only the initialization depends on ``seed`` (the data order is fixed,
    as in Ley et al.). Touches no global RNG state (everything runs under fork_rng)."""
    x, y = load_tabular("train")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FeedForward(features=x.shape[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        model.train()
        for _ in range(epochs):
            for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    return model.eval()


train.build = FeedForward  # the model cache rebuilds the architecture with this to load weights


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def ensemble_accuracy(members: list[nn.Module], size: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean test accuracy of the disjoint ensembles of ``size`` consecutive members, built as
    ``consistency_vs_ensemble_size`` builds them (the average of the members' probabilities)."""
    from pytest_saliency import ensemble

    groups = [members[j * size:(j + 1) * size] for j in range(len(members) // size)]
    return sum(accuracy(ensemble(group), x, y) for group in groups) / len(groups)
