"""The noise floor of the randomization checks (Binder et al.): the edge-detector and noise
controls' S^I, the structure of the method's maps against noise, and the gate that asks a method
to be clearly above both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch.utils.data import DataLoader

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed
from pytest_saliency.checks.controls import Floor, control_scores
from pytest_saliency.compare.similarity import ssim_setup
from pytest_saliency.core.rng import derive_seed
from pytest_saliency.maps.postprocess import get_pipeline, pipeline_maps

_NOISE = torch.Generator().manual_seed(0)


def _fresh_noise(model: torch.nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    """An uninformative explainer: new i.i.d. noise at every call (every model state), from a
    generator of its own (the checks seed the global one alike for every state)."""
    return torch.randn(inputs.shape, generator=_NOISE)


def _masked_noise(model: torch.nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    """Fresh noise on the input's strokes only: structured like a digit, informative of nothing."""
    return torch.randn(inputs.shape, generator=_NOISE) * (inputs > inputs.amin())


def test_the_random_control_is_each_examples_own_seeded_noise_through_the_same_pipeline() -> None:
    """A straightforward reference: per example and state, N(0, 1) from derive_seed(seed,
    "random_control", state, index), the pipeline, then SSIM against state 0's map."""
    from skimage.metrics import structural_similarity

    pipeline = get_pipeline("adebayo2018")
    setup = ssim_setup(**pipeline.ssim.kwargs())
    original = torch.rand(3, 16, 16)
    scores = control_scores(original, 2, pipeline, setup, "ssim", None, seed=7, first=0)

    def noise(state: int, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(7, "random_control", state, index))
        return torch.randn(256, generator=g, dtype=torch.float64).float().reshape(1, 1, 16, 16)

    for index in range(3):
        reference = pipeline_maps(noise(0, index), pipeline)[0].numpy()
        for state in (1, 2):
            other = pipeline_maps(noise(state, index), pipeline)[0].numpy()
            expected = structural_similarity(reference, other, win_size=5, data_range=1.0)
            assert float(scores.random[state - 1, index]) == pytest.approx(expected, abs=1e-5)
        counts, _ = np.histogram(reference, bins=100)
        p = counts[counts > 0] / counts.sum()
        assert float(scores.entropy_random[index]) == pytest.approx(-(p * np.log(p)).sum(), abs=1e-9)


def test_floor_arithmetic() -> None:
    floor = Floor(edge=0.0, random=0.8, entropy_method=3.0, entropy_random=4.0)
    assert floor.position(0.4) == pytest.approx(0.5) and floor.structure == pytest.approx(0.75)
    assert np.isnan(Floor(0.0, 0.0, 1.0, 0.0).position(0.3)) and np.isnan(Floor(0.0, 0.0, 1.0, 0.0).structure)


def test_gradients_clear_the_floor_and_noise_passes_ipr_but_not_the_floor(digits) -> None:
    """Binder et al.'s point, measured: an explainer of pure noise changes completely with every
    layer, so it passes IPR; its maps are as unstructured as noise, so the floor catches it."""
    model, x, _ = digits
    inputs = x[:16]
    gradients = ps.layer_randomization(model, inputs, "saliency", require_above_controls=True)
    assert gradients.passed and gradients.above_controls and gradients.floor.repeat == 0.0  # deterministic
    assert gradients.floor.structure < 1 and 0 < gradients.floor.position(gradients.stats.dataset_score) <= 1.2
    for noise_maps in (_fresh_noise, _masked_noise):  # Binder's uninformative maps, plain and on the digit
        noise = ps.layer_randomization(model, inputs, noise_maps)
        assert noise.passed and noise.stats.dataset_score > 0.5  # the plain gate is fooled
        assert noise.floor.repeat > 0.5 and not noise.above_controls  # running it again moves it as much
        with pytest.raises(SaliencyCheckFailed, match=r"NOT clearly above the uninformative controls"):
            ps.assert_sensitive_to_layer_randomization(model, inputs, noise_maps, require_above_controls=True)
    # SmoothGrad with 8 samples: its maps are dominated by its own sampling noise (two runs on the
    # same model: SSIM about 0.26, S about 0.74), more than the randomized layers move them (with
    # the same noise in every state): the floor says so, which plain IPR cannot.
    smooth = ps.layer_randomization(model, inputs, "smoothgrad", nt_samples=8, require_above_controls=True)
    assert smooth.stats.dataset_sensitive and smooth.floor.repeat > 0.5
    assert smooth.passed == (smooth.stats.ci_low >= smooth.floor.repeat + 0.01) and not smooth.passed
    edges = ps.layer_randomization(model, inputs, lambda m, x, t: x.abs())
    assert not edges.passed and not edges.above_controls  # the edge control itself: S^I 0


def test_the_floor_is_in_the_report_the_json_and_the_same_over_a_loader() -> None:
    model, x = make_tiny_cnn(), tiny_images(9)
    whole = ps.layer_randomization(model, x, "saliency")
    data = json.loads(json.dumps(whole.to_dict()))["controls"]
    assert data["edge"] == 0.0 and 0 < data["random"] <= 1 and data["require_above_controls"] is False
    assert set(data) >= {"entropy_method", "entropy_random", "structure", "position", "above_controls", "repeat"}
    assert "controls:    S^I edge detector 0.0000 (model-independent), i.i.d. noise maps" in whole.report()
    streamed = ps.layer_randomization(model, DataLoader(x, batch_size=4), "saliency")
    assert streamed.random_control_scores == pytest.approx(whole.random_control_scores, abs=1e-6)
    assert streamed.entropy_method == pytest.approx(whole.entropy_method, abs=1e-9)
    assert streamed.floor.random == pytest.approx(whole.floor.random, abs=1e-6)


def test_random_logit_reports_the_floor_too_and_a_loader_gives_the_same() -> None:
    model, x = make_tiny_cnn(), tiny_images(8)
    whole = ps.random_logit(model, x, "saliency")
    data = json.loads(json.dumps(whole.to_dict()))["controls"]
    assert data["edge"] == 0.0 and 0 < data["random"] <= 1 and len(whole.random_control_scores) == 8
    assert "controls:    S^I edge detector" in whole.report() and "structure:   entropy" in whole.report()
    streamed = ps.random_logit(model, DataLoader(x, batch_size=3), "saliency")
    assert streamed.random_control_scores == pytest.approx(whole.random_control_scores, abs=1e-6)
    assert streamed.floor.entropy_random == pytest.approx(whole.floor.entropy_random, abs=1e-9)


def test_the_floor_gate_is_offered_by_smooth_mprt_and_random_logit_too() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    for result in (ps.smooth_randomization(model, x, "saliency", n_samples=2, require_above_controls=True),
                   ps.random_logit(model, x, "saliency", require_above_controls=True)):
        assert result.require_above_controls and result.to_dict()["controls"]["require_above_controls"]
        assert result.passed == (result.stats.dataset_sensitive and result.above_controls)


def test_smooth_mprt_and_empRT_report_the_tensor_runs_floor_over_a_loader() -> None:
    model, x = make_tiny_cnn(), tiny_images(7)
    whole = ps.smooth_randomization(model, x, "saliency", n_samples=3)
    streamed = ps.smooth_randomization(model, DataLoader(x, batch_size=3), "saliency", n_samples=3)
    assert streamed.random_control_scores == pytest.approx(whole.random_control_scores, abs=1e-6)
    assert streamed.entropy_method == pytest.approx(whole.entropy_method, abs=1e-9)
    assert streamed.chance == pytest.approx(whole.chance, abs=1e-6) and streamed.chance_pairs == whole.chance_pairs
    efficient = ps.efficient_randomization(model, x, "saliency")
    assert ps.efficient_randomization(model, DataLoader(x, batch_size=3), "saliency").noise_entropy == pytest.approx(
        efficient.noise_entropy, abs=1e-9)


def test_random_logit_floor_catches_a_class_independent_explainer_of_fresh_noise() -> None:
    model, x = make_tiny_cnn(), tiny_images(8)
    noise = ps.random_logit(model, x, _fresh_noise, require_above_controls=True)
    assert noise.stats.dataset_sensitive and noise.floor.repeat > 0.5 and not noise.passed
    assert ps.random_logit(model, x, "saliency").floor.repeat == 0.0  # deterministic: not run again
