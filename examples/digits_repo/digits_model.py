"""A small model repo as a user would have it: a CNN trained on scikit-learn's digits.

The 8x8 digit images are upsampled to 32x32 so that SSIM windows have room, scaled to [0, 1],
and a 2-conv CNN with BatchNorm is trained for a few epochs (a few seconds on a laptop CPU).
``load_or_train`` caches the trained weights next to this file so that reruns skip training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_DIR = Path(__file__).resolve().parent / ".model_cache"


class SmallCNN(nn.Module):
    """conv-bn-relu-pool x2, then two linear layers: 6 parameterized layers."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, classes)
        # One nn.ReLU module per use: captum's GuidedBackprop, Deconvolution and DeepLift override
        # nn.ReLU modules, so a functional F.relu would silently give them the plain gradient.
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.relu2(self.bn2(self.conv2(x))), 2)
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def load_digits_32(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 32, 32) floats in [0, 1] and labels; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    index = order[:cut] if split == "train" else order[cut:]
    return x[index], y[index]


def train(seed: int = 0, epochs: int = 8) -> SmallCNN:
    """Train from scratch; touches no global RNG state (everything runs under fork_rng)."""
    x, y = load_digits_32("train")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            model.train()
            for index in torch.randperm(len(y)).split(64):
                optimizer.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def load_or_train(seed: int = 0, cache_dir: Path = CACHE_DIR) -> SmallCNN:
    """The trained model, from the cache when present (state_dict, loaded with weights_only=True)."""
    path = Path(cache_dir) / f"small_cnn_seed{seed}.pt"
    model = SmallCNN()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(model)}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
