"""Bad input gets a SaliencyUsageError that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, explain, layer_randomization


@pytest.mark.parametrize(
    "model, inputs, message",
    [
        (lambda x: x, tiny_images(), "must be a torch.nn.Module"),
        (nn.ReLU(), tiny_images(), "has no parameters"),
        (nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), tiny_images(),
         r"uninitialized lazy parameters \['1.weight', '1.bias'\].*Run the model once"),
        (make_tiny_cnn(), tiny_images().numpy(), "must be a torch.Tensor"),
        (make_tiny_cnn(), (tiny_images() * 255).long(), "floating-point"),
        (make_tiny_cnn(), tiny_images()[:, 0], r"\(N, C, H, W\).*unsqueeze"),
        (make_tiny_cnn(), tiny_images()[:0], "empty batch"),
        (make_tiny_cnn(), torch.full((2, 1, 16, 16), float("nan")), "NaN or infinite"),
        (make_tiny_cnn(), tiny_images().to("meta"), "model is on cpu but inputs are on meta"),
    ],
)
def test_bad_models_and_inputs(model, inputs, message):
    for call in (explain, layer_randomization):
        with pytest.raises(SaliencyUsageError, match=message):
            call(model, inputs)


def test_maps_smaller_than_the_ssim_window():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(SaliencyUsageError, match=r"4x4, smaller than the SSIM window \(5x5\).*Upsample"):
        layer_randomization(model, torch.rand(3, 1, 4, 4))


def test_nan_maps_from_a_custom_explainer():
    with pytest.raises(SaliencyUsageError, match="attribution maps from 'nan_maps' contain"):
        def nan_maps(model, inputs, target):
            return torch.full_like(inputs, float("nan"))

        layer_randomization(make_tiny_cnn(), tiny_images(), nan_maps)


def test_custom_explainer_with_the_wrong_batch_size():
    with pytest.raises(SaliencyUsageError, match="one map per input"):
        layer_randomization(make_tiny_cnn(), tiny_images(), lambda m, x, t: x[:1])


def test_constant_maps_error_or_skip():
    def half_constant(model, inputs, target):
        maps = inputs.clone()
        maps[:2] = 0.5
        return maps * (1 + model.fc.weight.abs().sum())

    with pytest.raises(SaliencyUsageError, match=r"constant for 2 of 6 image\(s\) \(indices \[0, 1\]\).*constant_maps='skip'"):
        layer_randomization(make_tiny_cnn(), tiny_images(), half_constant)
    from pytest_saliency import SaliencyWarning

    with pytest.warns(SaliencyWarning, match="left out"):
        result = layer_randomization(make_tiny_cnn(), tiny_images(), half_constant, constant_maps="skip")
    assert result.n_images == 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "random"}, "unknown mode 'random'"),
        ({"order": "topdown"}, "Did you mean 'top_down'"),
        ({"preset": "adebayo"}, "unknown preset"),
        ({"method": "gradients"}, "unknown method 'gradients'"),
        ({"layers": []}, "empty"),
        ({"confidence": 1.5}, "confidence"),
        ({"constant_maps": "drop"}, "constant_maps"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(SaliencyUsageError, match=message):
        layer_randomization(make_tiny_cnn(), tiny_images(), **options)


def test_usage_errors_are_value_errors():
    assert issubclass(SaliencyUsageError, ValueError)


def test_model_output_must_be_scores_for_a_predicted_target():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x).sum(1)

    with pytest.raises(SaliencyUsageError, match=r"\(N, num_classes\)"):
        explain(Scalar(), torch.rand(3, 4))
