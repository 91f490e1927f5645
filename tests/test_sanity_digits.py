"""The randomization tests on a CNN trained on digits (validation target V1) and their controls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pytest_saliency import (
    SaliencyCheckFailed, assert_sensitive_to_cascading_randomization, assert_sensitive_to_layer_randomization,
    explain, structural_similarity,
)
from pytest_saliency.maps.postprocess import PRESETS


@pytest.fixture(scope="module")
def trained(digits):
    model, x, y = digits
    return model, x[:24]


def test_the_example_model_is_actually_trained(digits):
    model, x, y = digits
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize(
    "method, options",
    [("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 16})],
)
def test_gradient_methods_pass_ipr(trained, method, options):
    model, x = trained
    result = assert_sensitive_to_layer_randomization(model, x, method, **options)
    assert result.stats.dataset_score > 0.1
    assert result.stats.ci_low > 0.01
    assert result.layers == ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]


def test_gradients_pass_cascading_randomization_in_both_orders(trained):
    model, x = trained
    top_down = assert_sensitive_to_cascading_randomization(model, x, "saliency")
    bottom_up = assert_sensitive_to_cascading_randomization(model, x, "saliency", order="bottom_up")
    assert top_down.layers[0] == "fc2" and bottom_up.layers[0] == "conv1"
    # Cumulative randomization only moves maps further from the original.
    assert top_down.stats.dataset_score >= assert_sensitive_to_layer_randomization(model, x).stats.dataset_score


def absolute_input(model, inputs, target):
    return inputs.abs()


def sobel_edges(model, inputs, target):
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return F.conv2d(inputs, torch.stack([kx, kx.T])[:, None], padding=1).norm(dim=1, keepdim=True)


@pytest.mark.parametrize("control", [absolute_input, sobel_edges])
@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_explainers_that_ignore_the_model_fail_with_zero_sensitivity(trained, control, mode):
    model, x = trained
    check = assert_sensitive_to_layer_randomization if mode == "independent" else assert_sensitive_to_cascading_randomization
    with pytest.raises(SaliencyCheckFailed) as failure:
        check(model, x, control)
    result = failure.value.result
    assert result.stats.dataset_score == 0.0
    assert result.stats.ci_high == 0.0
    assert len(result.stats.insensitive_layers) == 6
    message = str(failure.value)
    for expected in ("NOT sensitive", "S^I = 0.0000 < 0.01", control.__name__, "adebayo2018", "win_size=5",
                     "INSENSITIVE", "images: 24", "device: cpu", "seed: 0", "reproduce:"):
        assert expected in message


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "guided_backprop", "deeplift", "gradcam"])
def test_the_original_model_against_itself_has_ssim_one(trained, method):
    """The noise floor: deterministic methods reproduce their maps exactly."""
    model, x = trained
    a = explain(model, x, method, preset="adebayo2018")
    b = explain(model, x, method, preset="adebayo2018")
    keep = (a.flatten(1).amax(1) > a.flatten(1).amin(1))  # GradCAM can be all-zero for an image
    p = PRESETS["adebayo2018"].ssim
    ssim = structural_similarity(a[keep], b[keep], win_size=p.win_size, data_range=p.data_range)
    assert torch.all(ssim == 1.0)


def test_require_every_layer_turns_an_insensitive_layer_into_a_failure(trained):
    model, x = trained
    result = assert_sensitive_to_layer_randomization(model, x, "saliency", ssim_threshold=0.5)
    assert result.stats.insensitive_layers, "with a strict SSIM threshold some layer counts as insensitive"
    with pytest.raises(SaliencyCheckFailed, match="do not change when these layers are randomized"):
        assert_sensitive_to_layer_randomization(model, x, "saliency", ssim_threshold=0.5, require_every_layer=True)


def test_result_to_dict_is_json_serializable(trained):
    import json

    model, x = trained
    result = assert_sensitive_to_layer_randomization(model, x, "saliency", layers=["conv2", "fc1"])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["passed"] is True and data["preset"]["name"] == "adebayo2018"
    assert [layer["name"] for layer in data["layers"]] == ["conv2", "fc1"]
    assert len(data["ssim"]) == 2 and len(data["ssim"][0]) == 24
