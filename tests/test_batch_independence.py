"""An image's map depends on the model, the image, its index, the options and the seed only.

Never on ``batch_size``, on the memory budget's chunks, or on the other images of its batch:
methods that draw random numbers explain image by image from a seed derived from (seed, index),
with noise scaled by the image's own range. On the CPU that holds bit for bit.

Deterministic methods are not bitwise batch-size invariant on a CPU, and cannot be made so here:
a matrix product's rows depend on how many rows it has (oneDNN/MKL block the reduction
differently for one row, a few rows and many rows: with torch 2.13 on this project's CI CPU a
256 -> 64 Linear layer's output row differs in the last bits between batches of 8 and 16 rows,
and its input gradient between batches of 1 and 2). Their maps agree to
float rounding (``test_explainers``); the methods that draw explain each image in passes of its
own rows only, so the same rows meet the same kernels whatever the batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import METHODS, explain
from pytest_saliency.engine.replay import GradientReplay
from pytest_saliency.maps.explainers import attribute, prepare_method
from pytest_saliency.maps.methods import draws_random
from pytest_saliency.maps.targets import resolve_target

# (4 x 4 superpixels: with fewer samples than features the KernelSHAP regression is underdetermined,
# and the rounding of one forward pass could swing its coefficients)
FAST = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"nt_samples": 4},
        "lime": {"n_samples": 24, "grid": 4, "alpha": 1e-3}, "kernel_shap": {"n_samples": 24, "grid": 4},
        "gradient_shap": {"n_samples": 3, "n_baselines": 3},
        "deeplift": {}, "occlusion": {"window": 4, "stride": 4}, "feature_ablation": {"grid": 4},
        "meaningful_perturbation": {"n_iter": 5}}

#: Every method that draws random numbers: the stochastic ones, and those with a "uniform" baseline.
DRAWING = [(name, dict(FAST.get(name, {}))) for name, spec in sorted(METHODS.items()) if spec.stochastic] + [
    (name, {**FAST.get(name, {}), "baselines": "uniform"})
    for name, spec in sorted(METHODS.items()) if "baselines" in spec.defaults
]


def test_the_list_covers_every_method_that_draws() -> None:
    for name, options in DRAWING:
        assert draws_random(METHODS[name], options), name
    assert {name for name, _ in DRAWING} >= {n for n, s in METHODS.items() if s.stochastic}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def make_mlp() -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP().eval()


MODELS = {"cnn": make_tiny_cnn, "mlp": make_mlp}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method, options", DRAWING, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in DRAWING])
def test_batch_size_and_chunks_do_not_change_a_single_bit(model_name: str, method: str, options: dict) -> None:
    model, x = MODELS[model_name](), tiny_images(5, seed=2)
    whole = explain(model, x, method, seed=5, **options)
    for batch_size in (1, 3):
        assert torch.equal(explain(model, x, method, seed=5, batch_size=batch_size, **options), whole), batch_size
    # A budget of one row also runs one step, sample or perturbation per pass: rounding, nothing more
    torch.testing.assert_close(explain(model, x, method, seed=5, memory_budget=1, **options), whole,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, options", DRAWING, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in DRAWING])
def test_the_other_images_of_the_batch_do_not_change_an_images_map(method: str, options: dict) -> None:
    """Image 2 keeps its map, bit for bit, when every other image is replaced by one of another
    range (ten times brighter, or black): its noise and baselines scale with its own range."""
    model, x = make_tiny_cnn(), tiny_images(4, seed=4)
    target = resolve_target(model, x, None)
    alone = explain(model, x, method, target=target, seed=1, **options)[2]
    for other in (x * 10, torch.zeros_like(x)):
        mixed = other.clone()
        mixed[2] = x[2]
        assert torch.equal(explain(model, mixed, method, target=target, seed=1, **options)[2], alone)


@pytest.mark.parametrize("method, options", DRAWING, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in DRAWING])
def test_a_slice_explained_at_its_index_gives_the_whole_batchs_maps(method: str, options: dict) -> None:
    """What the randomization engine does for image batches: explain inputs[2:5] as images 2 to 4."""
    model, x = make_tiny_cnn(), tiny_images(5, seed=6)
    target = resolve_target(model, x, None)
    spec, _, prepared = prepare_method(method, model, x, dict(options))
    whole = attribute(model, x, spec, target, 3, None, True, prepared)
    part = attribute(model, x[2:5], spec, target[2:5], 3, None, True, prepared, index=2)
    assert torch.equal(part, whole[2:5])
    picked = attribute(model, x[[4, 0]], spec, target[[4, 0]], 3, None, True, prepared, index=[4, 0])
    assert torch.equal(picked, whole[[4, 0]])
    assert not torch.equal(attribute(model, x[2:5], spec, target[2:5], 3, None, True, prepared), whole[2:5])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5), batch_size=st.integers(1, 5), seed=st.integers(0, 2**31),
       method=st.sampled_from(["smoothgrad", "gradient_shap", "integrated_gradients"]))
def test_any_chunking_of_any_batch_gives_the_same_bits(n: int, batch_size: int, seed: int, method: str) -> None:
    model, x = make_tiny_cnn(), tiny_images(n, seed=seed % 1000)
    options = {"integrated_gradients": {"n_steps": 3, "baselines": "uniform"}, "smoothgrad": {"nt_samples": 3},
               "gradient_shap": {"n_samples": 3}}[method]
    whole = explain(model, x, method, seed=seed, **options)
    assert torch.equal(explain(model, x, method, seed=seed, batch_size=batch_size, **options), whole)


class HalfSquare(nn.Module):
    """Class 0 scores 0.5 * |x|^2, so its gradient is the input itself: SmoothGrad's map minus the
    image is the mean of its noisy samples' noise."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = 0.5 * (x * x).flatten(1).sum(1, keepdim=True)
        return energy * self.scale


def test_smoothgrad_noise_scales_with_each_images_own_range() -> None:
    """noise std = noise_level * (max - min) of the image itself, as in SAM and Adebayo et al.:
    a dim image next to a bright one gets a tenth of its noise, not the batch's."""
    samples, level = 400, 0.2
    base = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base, base * 10, base * 10 + 5])  # ranges r, 10 r, 10 r
    maps = explain(HalfSquare(), x, "smoothgrad", target=0, nt_samples=samples, noise_level=level)
    noise_std = (maps - x).flatten(1).std(1) * samples ** 0.5  # the mean of n draws has std sigma / sqrt(n)
    ranges = (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    torch.testing.assert_close(noise_std, level * ranges, rtol=0.08, atol=0)
    fixed = explain(HalfSquare(), x, "smoothgrad", target=0, nt_samples=samples, noise_level=level, input_range=1.0)
    torch.testing.assert_close((fixed - x).flatten(1).std(1) * samples ** 0.5, torch.full((3,), level), rtol=0.08,
                               atol=0)


@pytest.mark.parametrize("method, options", [("smoothgrad", {"nt_samples": 4}),
                                             ("integrated_gradients", {"n_steps": 4, "baselines": "uniform"})])
def test_the_replay_draws_each_images_noise_at_its_index(method: str, options: dict) -> None:
    """The activation-reuse engine explains image batches too: images 2 to 4 see the noise (or
    uniform baseline) of the full captum pass over all images, in the original model and so in
    every randomized state."""
    model, x = make_tiny_cnn(), tiny_images(6, seed=7)
    target = resolve_target(model, x, None)
    spec, _, prepared = prepare_method(method, model, x, dict(options))
    whole = attribute(model, x, spec, target, 2, None, True, prepared)
    replay = GradientReplay(model, x[2:5], target[2:5], method, prepared, seed=2, index=2)
    try:
        torch.testing.assert_close(replay.original(), whole[2:5], rtol=1e-5, atol=1e-6)
    finally:
        replay.close()


def test_occlusion_with_a_uniform_baseline_draws_per_image_in_the_state_stack() -> None:
    from pytest_saliency.engine.stacks import occlusion_states
    from pytest_saliency.model.layers import select_layers

    model, x = make_tiny_cnn(), tiny_images(5, seed=8)
    target = resolve_target(model, x, None)
    options = {"window": 4, "stride": 4, "baselines": "uniform"}
    spec, _, prepared = prepare_method("occlusion", model, x, dict(options))
    whole = attribute(model, x, spec, target, 4, None, True, prepared)
    stages = select_layers(model, x, "leaf")[:2]
    maps, _ = occlusion_states(model, x[1:4], target[1:4], stages, "independent", "gaussian", 4, prepared, index=1)
    torch.testing.assert_close(maps[0], whole[1:4], rtol=0, atol=1e-6)



DETERMINISTIC = [("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 4}),
                 ("guided_backprop", {}), ("occlusion", {}), ("deeplift", {})]


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method, options", DETERMINISTIC, ids=[m for m, _ in DETERMINISTIC])
def test_deterministic_methods_agree_across_batch_sizes_to_float_rounding(model_name: str, method: str,
                                                                          options: dict) -> None:
    if model_name == "mlp" and method == "occlusion":
        pytest.skip("occlusion's square windows need images")
    model, x = MODELS[model_name](), tiny_images(5, seed=2)
    if model_name == "mlp":
        x = x.flatten(1)
    whole = explain(model, x, method, **options)
    scale = float(whole.abs().max())
    for batch_size in (1, 3):
        gap = float((explain(model, x, method, batch_size=batch_size, **options) - whole).abs().max())
        assert gap <= 1e-7 + 1e-6 * scale, (batch_size, gap, scale)  # float32 rounding of outputs and maps
