"""Saliency sanity checks for the digits CNN: run with `pytest --saliency`."""

import pytest
import torch
import torch.nn.functional as F

from pytest_saliency import SaliencyCheckFailed


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "guided_backprop"])
def test_maps_depend_on_every_layer(saliency, model, images, method):
    """Independent randomization (IPR): each method's maps must change when a layer is randomized."""
    saliency.assert_sensitive_to_layer_randomization(model, images, method=method)


def test_gradients_survive_cascading_randomization(saliency, model, images):
    """Cascading randomization (CPR), output layer first."""
    saliency.assert_sensitive_to_cascading_randomization(model, images, method="saliency")


def sobel_edges(model, inputs, target):
    """An "explanation" that never looks at the model: an edge detector."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=inputs.device)
    kernel = torch.stack([kx, kx.T])[:, None]
    return F.conv2d(inputs, kernel, padding=1).norm(dim=1, keepdim=True)


def test_an_edge_detector_is_caught(saliency, model, images):
    """The control: a model-independent map must fail the check, or the gate proves nothing."""
    with pytest.raises(SaliencyCheckFailed, match="NOT sensitive"):
        saliency.assert_sensitive_to_layer_randomization(model, images, method=sobel_edges)


def test_gradient_methods_agree_beyond_chance(saliency, model, images):
    """Agreement: the top 10% pixels of saliency and guided backprop overlap more than chance (k/N)."""
    saliency.assert_agreement_above(model, images, methods=("saliency", "guided_backprop"), metric="feature_agreement")


def test_smoothgrad_is_stable_across_its_own_seeds(saliency, model, images):
    """The method's own randomness: same seed, same maps; other noise draws, similar maps."""
    saliency.assert_explainer_seed_stable(model, images[:16], "smoothgrad", seeds=(0, 1, 2), threshold=0.5)
