"""Layer selection: granularities, forward-execution order, and errors that list the valid names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, select_layers


class HeadFirst(nn.Module):
    """Registers its head before its body, reuses a block, and owns an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(3, 3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8))
        self.shared = nn.Linear(8, 8)

    def forward(self, x):
        h = self.body(x)
        h = self.shared(self.shared(h))
        return self.head(h)


def names(layers):
    return [name for name, _ in layers]


def test_leaf_layers_follow_execution_not_registration_order():
    model = HeadFirst()
    assert names(select_layers(model, torch.rand(2, 4))) == ["body.0", "body.2", "shared", "head"]


def test_block_granularity_and_depth():
    model = HeadFirst()
    assert names(select_layers(model, torch.rand(2, 4), "block")) == ["body", "shared", "head"]
    assert names(select_layers(model, torch.rand(2, 4), "block", depth=2)) == ["body.0", "body.2"]
    with pytest.raises(SaliencyUsageError, match="no module with parameters at depth 3"):
        select_layers(model, torch.rand(2, 4), "block", depth=3)


def test_explicit_critical_layers_are_ordered_by_execution():
    model = make_tiny_cnn()
    chosen = select_layers(model, tiny_images(), ["fc", "conv1"])
    assert names(chosen) == ["conv1", "fc"]


def test_frozen_layers_are_still_layers():
    model = make_tiny_cnn()
    model.conv1.requires_grad_(False)
    assert names(select_layers(model, tiny_images()))[0] == "conv1"


@pytest.mark.parametrize(
    "layers, message",
    [
        (["conv3"], r"unknown layer 'conv3'\. Did you mean 'conv2', 'conv1'.*Valid layers: conv1, bn, conv2, fc"),
        ([], "list of layers to randomize is empty"),
        (["conv1", "conv1"], "repeated"),
        ("leaves", "unknown layer granularity"),
    ],
)
def test_bad_layer_lists(layers, message):
    with pytest.raises(SaliencyUsageError, match=message):
        select_layers(make_tiny_cnn(), tiny_images(), layers)


def test_unexecuted_and_nested_layers_are_refused():
    model = HeadFirst()
    with pytest.raises(SaliencyUsageError, match="never runs"):
        select_layers(model, torch.rand(2, 4), ["unused"])
    with pytest.raises(SaliencyUsageError, match="lies inside 'body'"):
        select_layers(model, torch.rand(2, 4), ["body", "body.0"])
    assert "unused" not in names(select_layers(model, torch.rand(2, 4)))


def test_tracing_leaves_the_model_mode_alone():
    model = make_tiny_cnn().train()
    select_layers(model, tiny_images())
    assert all(m.training for m in model.modules())
