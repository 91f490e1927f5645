"""Benchmark models, written from scratch (torchvision is not a dependency).

* :class:`SmallCNN`: conv-bn-relu-pool x2, then two linear layers; 6 parameterized (leaf) layers.
  ``channels=3`` for the 3x32x32 workload, ``channels=1`` for 1x32x32 (the digits workload itself
  uses the trained ``examples/digits_repo`` model, which has the same layout).
* :func:`resnet18`: the torchvision ResNet-18 layout (BasicBlock, [2, 2, 2, 2]): 7x7/2 stem conv,
  BatchNorm, nn.ReLU modules, 3x3/2 max-pool, four stages, adaptive average pool, fc.
  20 Conv2d + 20 BatchNorm2d + 1 Linear = 41 leaf layers.
* :func:`resnet50`: the ResNet-50 layout (Bottleneck, [3, 4, 6, 3], expansion 4): 53 Conv2d +
  53 BatchNorm2d + 1 Linear = 107 leaf layers.

Every activation is its own ``nn.ReLU`` module (captum's ReLU-rule methods hook modules only).
:func:`build` makes a model under a fixed seed without touching global RNG state, and
optionally "calibrates" BatchNorm running statistics with a few train-mode forward passes of
random data so that eval-mode BatchNorm is not the identity.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu-pool x2, fc-relu-fc: 6 parameterized layers; inputs (N, C, 32, 32)."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(
            width, width, stride
        )  # stride on the 3x3 (torchvision's "v1.5")
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.downsample = downsample
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[nn.Module],
        blocks: list[int],
        classes: int = 1000,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, blocks[0], 1)
        self.layer2 = self._stage(block, 128, blocks[1], 2)
        self.layer3 = self._stage(block, 256, blocks[2], 2)
        self.layer4 = self._stage(block, 512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(
        self, block: type[nn.Module], width: int, count: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, width * block.expansion, stride),
                nn.BatchNorm2d(width * block.expansion),
            )
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(classes: int = 1000, channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], classes, channels)


def resnet50(classes: int = 1000, channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], classes, channels)


def leaf_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly (the engine's ``layers="leaf"``)."""
    return [
        n
        for n, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    shape: tuple[int, ...],
    generator: torch.Generator,
    batches: int = 4,
) -> None:
    """A few train-mode forward passes of random data so BatchNorm running statistics are not 0/1."""
    model.train()
    for _ in range(batches):
        model(torch.rand(shape, generator=generator))
    model.eval()


def build(
    name: str, seed: int = 0, calibrate_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """A model by name, initialized under ``seed`` (global RNG state is left as it was), in eval mode."""
    factories = {
        "small_cnn3": lambda: SmallCNN(3),
        "small_cnn1": lambda: SmallCNN(1),
        "resnet18": resnet18,
        "resnet50": resnet50,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factories[name]()
    if calibrate_shape is not None:
        calibrate_batchnorm(
            model, calibrate_shape, torch.Generator().manual_seed(seed + 1)
        )
    return model.eval()
