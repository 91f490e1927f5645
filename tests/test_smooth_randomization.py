"""Smooth MPRT (sMPRT): the denoised explainer against a plain loop, its noise (common to every
model state, keyed by the input), its batching, the verdict on the digits CNN and its controls,
the variability it removes, loaders, the guarantees, and its usage errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_saliency import (
    SaliencyCheckFailed,
    SaliencyUsageError,
    explain,
    layer_randomization,
)
from pytest_saliency.checks.smooth_randomization import (
    CHECK,
    SmoothRandomizationResult,
    assert_sensitive_to_smooth_randomization,
    smooth_randomization,
    smoothed_explainer,
)
from pytest_saliency.core.forward import model_call_options

SOBEL = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def edges(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    """A model-independent control: the Sobel gradient magnitude of the channel-summed input."""
    gray = inputs.sum(1, keepdim=True)
    kernels = torch.stack([SOBEL, SOBEL.T])[:, None].to(inputs)
    g = torch.nn.functional.conv2d(gray, kernels, padding=1)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def magnitude(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    return inputs.abs()


def rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


# -- the denoised explainer -------------------------------------------------------------------


def test_the_smoothed_map_is_the_mean_of_the_methods_maps_of_the_noisy_copies() -> None:
    """Against a plain loop: each copy (input + noise_level x range x its draws; the clean input
    last) explained alone by captum, the maps averaged."""
    model, x = make_tiny_cnn(), tiny_images(3)
    x[2] = 0.5  # a constant input: noise std = noise_level x 1
    target = torch.tensor([0, 2, 1])
    explainer = smoothed_explainer(model, x, "saliency", n_samples=6, noise_level=0.2, seed=3)
    draws = explainer.noise(x)
    assert draws.shape == (3, 5, 1, 16, 16)
    expected = []
    for i in range(3):
        span = float(x[i].max() - x[i].min()) or 1.0
        copies = [x[i] + 0.2 * span * draws[i, k] for k in range(5)] + [x[i]]
        maps = [Saliency(model).attribute(c[None].clone().requires_grad_(), target=int(target[i]), abs=False)[0] for c in copies]
        expected.append(torch.stack(maps).mean(0))
    got = explain(model, x, explainer, target=target)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-7)
    without_clean = smoothed_explainer(model, x, "saliency", n_samples=5, include_clean=False, noise_level=0.2, seed=3)
    assert torch.equal(without_clean.noise(x), draws)  # the same 5 draws, none of them the clean input


def test_noise_is_keyed_by_the_input_not_by_its_batch_or_position() -> None:
    model, x = make_tiny_cnn(), tiny_images(5)
    explainer = smoothed_explainer(model, x, "saliency", n_samples=8)
    draws = explainer.noise(x)
    assert torch.equal(explainer.noise(x[[3, 1]]), draws[[3, 1]])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean().abs() < 0.05) and abs(float(draws.std()) - 1.0) < 0.05
    other = smoothed_explainer(model, x, "saliency", n_samples=8, seed=1)
    assert not torch.equal(other.noise(x), draws)
    # the same maps for an input whatever else is in its call
    whole = explain(model, x, explainer)
    torch.testing.assert_close(explain(model, x[[4, 0]], explainer), whole[[4, 0]], rtol=0, atol=1e-7)


def test_the_copies_are_explained_in_as_few_captum_calls_as_the_budget_allows() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    batched = smoothed_explainer(model, x, "saliency", n_samples=10)
    whole = explain(model, x, batched)
    assert batched.calls == [40]  # 4 inputs x 10 copies in one call
    capped = smoothed_explainer(model, x, "saliency", n_samples=10, batch_size=7)
    torch.testing.assert_close(explain(model, x, capped), whole, rtol=0, atol=1e-7)
    assert capped.calls == [7] * 5 + [5]
    # a memory budget sizes the calls in copies (a row of this model costs about 60 kB)
    small = smoothed_explainer(model, x, "saliency", n_samples=10, memory_budget=300_000)
    assert small.copies_per_call is not None and small.copies_per_call < 40
    torch.testing.assert_close(explain(model, x, small), whole, rtol=0, atol=1e-7)
    assert len(small.calls) == -(-40 // small.copies_per_call) and max(small.calls) <= small.copies_per_call


def test_per_input_forward_arguments_follow_their_copies() -> None:
    class Weighted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_tiny_cnn()

        def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return self.net(x) * weight[:, None]

    model, x = Weighted().eval(), tiny_images(4)
    weight = torch.tensor([1.0, -2.0, 3.0, 0.5])
    with model_call_options(forward_kwargs={"weight": weight}, inputs=x):  # its memory probe calls the model
        explainer = smoothed_explainer(model, x, "saliency", n_samples=4)
    whole = explain(model, x, explainer, target=0, forward_kwargs={"weight": weight})
    for i in range(4):
        alone = explain(model, x[i:i + 1], explainer, target=0, forward_kwargs={"weight": weight[i:i + 1]})
        torch.testing.assert_close(whole[i:i + 1], alone, rtol=1e-5, atol=1e-7)


# -- the check on the digits CNN ----------------------------------------------------------------


def test_gradients_pass_and_model_independent_controls_fail_on_the_digits_cnn(digits) -> None:
    model, x, _ = digits
    x = x[:8]
    passed = assert_sensitive_to_smooth_randomization(model, x, "saliency", n_samples=20)
    assert isinstance(passed, SmoothRandomizationResult) and passed.check == CHECK
    assert passed.mode == "cascading" and passed.order == "bottom_up" and passed.stats.dataset_score > 0.9
    assert len(passed.layers) == 6 and not passed.stats.insensitive_layers
    for control in (edges, magnitude):
        result = smooth_randomization(model, x, control, n_samples=20)
        # the same noisy copies in every state: a map that ignores the model is identical in all of them
        assert not result.passed and np.allclose(result.ssim, 1.0) and result.stats.dataset_score == 0.0
    with pytest.raises(SaliencyCheckFailed, match=r"smoothed edges maps \(sMPRT, 20 samples\) are NOT sensitive"):
        assert_sensitive_to_smooth_randomization(model, x, edges, n_samples=20)


def test_averaging_reduces_the_variability_of_gradient_mprt_scores_across_noise_seeds(digits) -> None:
    """Hedström et al.: gradient maps are noisy, so a gradient MPRT score depends on the noise in
    the input. The gradient at one noisy copy of each input (n_samples=1) against the mean over
    32 copies, each for 3 noise seeds, with the same randomized states: the spread of the
    per-(layer, image) Spearman similarities over the seeds shrinks with the averaging (measured:
    0.029 -> 0.019, a ratio of 0.65)."""
    model, x, _ = digits
    x = x[:4]

    def spread(n_samples: int, include_clean: bool) -> float:
        runs = [layer_randomization(model, x, smoothed_explainer(model, x, "saliency", n_samples=n_samples,
                                                                 include_clean=include_clean, seed=seed),
                                    mode="cascading", order="bottom_up", seed=0, similarity="spearman").ssim
                for seed in range(3)]
        return float(np.std(np.array(runs), axis=0, ddof=1).mean())

    single, averaged = spread(1, False), spread(32, True)
    assert averaged < 0.8 * single, (single, averaged)


# -- loaders, guarantees, results -------------------------------------------------------------


def test_a_loader_gives_the_tensor_runs_numbers_and_counts_the_cap_over_the_stream() -> None:
    model, x = make_tiny_cnn(), tiny_images(7)
    y = torch.arange(7) % 3
    options = {"n_samples": 6, "layers": ["conv1", "conv2", "fc"]}
    whole = smooth_randomization(model, x, "saliency", **options)
    streamed = smooth_randomization(model, DataLoader(TensorDataset(x, y), batch_size=3), "saliency", **options)
    np.testing.assert_allclose(streamed.ssim, whole.ssim, rtol=0, atol=1e-6)
    assert streamed.n_images == 7 and streamed.check == CHECK
    assert streamed.stats.dataset_score == pytest.approx(whole.stats.dataset_score, abs=1e-6)
    assert streamed.passed == whole.passed and streamed.original_maps.shape[0] == 3
    capped = smooth_randomization(model, DataLoader(TensorDataset(x), batch_size=3), "saliency", images=5, **options)
    np.testing.assert_allclose(capped.ssim, smooth_randomization(model, x[:5], "saliency", **options).ssim, atol=1e-6)
    assert capped.n_images == 5


def test_the_model_is_bit_identical_and_no_global_rng_moves() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    states = rng_states()
    result = smooth_randomization(model, x, "saliency", n_samples=4, mode="independent")
    assert result.mode == "independent" and result.check == CHECK
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert flags == [p.requires_grad for p in model.parameters()]
    after = rng_states()
    assert torch.equal(states[0], after[0]) and np.array_equal(states[1], after[1]) and states[2] == after[2]


def test_the_result_reports_the_smoothing_in_every_form() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    result = smooth_randomization(model, x, "integrated_gradients", n_samples=3, noise_level=0.05, n_steps=4,
                                  layers=["conv1", "fc"])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["check"] == CHECK and data["n_samples"] == 3 and data["noise_level"] == 0.05
    assert data["method"] == "integrated_gradients" and data["method_options"]["n_steps"] == 4
    assert result.numbers()["n_samples"] == 3 and "3 samples, noise 0.05" in result.summary()
    assert "smoothing:   mean of 3 raw maps per input (2 noisy + the clean input)" in result.report()
    assert "smooth_randomization(model, inputs, method='integrated_gradients', n_samples=3" in result.reproduce
    assert [name for name, _ in result.figures()] == ["randomization_strip", "ssim_curve"]


def test_tabular_inputs_are_compared_by_spearman() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6, generator=g)
    result = smooth_randomization(model, x, "saliency", n_samples=5)
    assert result.similarity == "spearman" and result.modality == "tabular" and len(result.layers) == 2


@pytest.mark.parametrize("options, message", [
    ({"n_samples": 0}, r"n_samples"),
    ({"noise_level": -0.1}, r"noise_level"),
    ({"include_clean": "yes"}, r"include_clean"),
    ({"images": "auto"}, r"images"),
    ({"batch_size": 0}, r"batch_size"),
    ({"method": "smoothgrad"}, r"draws random numbers of its own"),
    ({"method": "integrated_gradients", "baselines": torch.zeros(4, 1, 16, 16)}, r"one baseline per input"),
    ({"method": magnitude, "n_steps": 3}, r"custom explainer"),
])
def test_bad_options_are_usage_errors(options, message) -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    options = dict(options)
    method = options.pop("method", "saliency")
    with pytest.raises(SaliencyUsageError, match=message):
        smooth_randomization(model, x, method, **options)


def test_token_ids_are_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    ids = torch.randint(0, 10, (3, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyUsageError, match=r"token ids cannot take noise"):
        smooth_randomization(model, ids, "saliency", n_samples=2)


def test_one_sample_with_the_clean_input_is_refused_as_plain_mprt() -> None:
    with pytest.raises(SaliencyUsageError, match=r"n_samples=1 with include_clean=True averages the clean input alone"):
        smooth_randomization(make_tiny_cnn(), tiny_images(2), "saliency", n_samples=1)
