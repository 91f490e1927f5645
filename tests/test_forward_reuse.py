"""Occlusion states from one captum call (forward_reuse): the loop's numbers, bit for bit.

Every check compares the state stack with ``reuse_activations=False`` (one captum call per
state) on the models of test_activation_reuse that were built to break replays, and looks at
the model afterwards: same values, same parameter tensors, same flags.
"""

from __future__ import annotations

import random

import captum.attr as ca
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import layer_randomization
from pytest_saliency.explainers import occlusion_positions
from pytest_saliency.forward_reuse import StateStack, occlusion_states
from pytest_saliency.layers import select_layers
from pytest_saliency.randomization import randomized
from test_activation_reuse import (
    Experts, FunctionalTricks, Gate, PooledInForward, Remembers, Tied, assert_unchanged, make_residual, seeded_model,
    snapshot,
)

OCCLUSION = {"window": 4, "stride": 2}


def both_ways(model: nn.Module, x: torch.Tensor, **kwargs):
    fast = layer_randomization(model, x, "occlusion", **OCCLUSION, **kwargs)
    slow = layer_randomization(model, x, "occlusion", reuse_activations=False, **OCCLUSION, **kwargs)
    return fast, slow


def assert_same(fast, slow) -> None:
    assert fast.layers == slow.layers
    assert fast.ssim == slow.ssim  # bit for bit: the same logits reach captum's arithmetic
    assert torch.equal(fast.original_maps, slow.original_maps)
    assert torch.equal(fast.randomized_maps, slow.randomized_maps)
    assert fast.passed == slow.passed


MODELS = {
    "tiny_cnn": (make_tiny_cnn, lambda: tiny_images(5)),
    "residual": (make_residual, lambda: tiny_images(4, seed=3)),
    "pooled": (lambda: seeded_model(PooledInForward), lambda: tiny_images(4, seed=1)),
    "tricks": (lambda: seeded_model(FunctionalTricks), lambda: tiny_images(4, seed=2)),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("mode,order", [("independent", "top_down"), ("cascading", "top_down"),
                                        ("cascading", "bottom_up")])
def test_the_state_stack_gives_the_loops_numbers(model_name: str, mode: str, order: str) -> None:
    make, images = MODELS[model_name]
    model, x = make(), images()
    before = snapshot(model)
    for randomization in ("reinit", "permute"):
        fast, slow = both_ways(model, x, mode=mode, order=order, randomization=randomization)
        assert fast.reused_activations and not slow.reused_activations
        assert_same(fast, slow)
    assert_unchanged(model, before)


@pytest.mark.parametrize("chunking", [{"batch_size": 2}, {"perturbations_per_eval": 3}, {"memory_budget": 1},
                                      {"images": "auto", "image_batch": 2}])
def test_chunked_images_and_perturbations_give_the_same_numbers(chunking: dict) -> None:
    model, x = make_residual(), tiny_images(5, seed=4)
    fast, slow = both_ways(model, x, **chunking)
    assert fast.reused_activations
    assert_same(fast, slow)
    assert fast.n_images == slow.n_images


def test_layers_are_drawn_once_per_step_not_once_per_chunk(monkeypatch) -> None:
    from pytest_saliency import forward_reuse

    draws = []
    real = forward_reuse.randomized_values
    monkeypatch.setattr(forward_reuse, "randomized_values", lambda *a: draws.append(1) or real(*a))
    result = layer_randomization(make_tiny_cnn(), tiny_images(5), "occlusion", batch_size=2, **OCCLUSION)
    assert result.reused_activations and len(draws) == 1


@pytest.mark.parametrize("cls", [Gate, Experts, Tied])
def test_models_that_cannot_be_replayed_fall_back_and_agree(cls: type) -> None:
    """Value-dependent routing, tied weights."""
    model = seeded_model(cls)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    fast, slow = both_ways(model, x, preset="thesis2023")
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
    if cls is Tied:  # a shared weight would change inside the reused prefix: no stack at all
        assert not fast.reused_activations
    assert_unchanged(model, before)


def test_stack_columns_are_the_logits_of_each_randomized_state() -> None:
    model, x = make_residual(), tiny_images(3, seed=5)
    stages = select_layers(model, x, "leaf")
    target = torch.tensor([0, 2, 1])
    batch = torch.cat([x, x * 0.5])  # two copies of the images, as captum sends them
    for mode in ("independent", "cascading"):
        stack = StateStack(model, stages, mode, "reinit", 7, target)
        with torch.no_grad():
            columns = stack(batch)
            assert stack.reused
            rows = target.repeat(2)[:, None]
            assert torch.equal(columns[:, 0], model(batch).gather(1, rows)[:, 0])
            for i in range(len(stages)):
                changed = stages[i:i + 1] if mode == "independent" else stages[:i + 1]
                with randomized(changed, "reinit", 7):
                    expected = model(batch).gather(1, rows)[:, 0]
                assert torch.equal(columns[:, i + 1], expected), stages[i][0]


def test_the_stack_equals_separate_captum_calls_per_state() -> None:
    model, x = make_tiny_cnn(), tiny_images(3, seed=6)
    stages = select_layers(model, x, "leaf")
    target = model(x).argmax(1)
    options = {"window": 4, "stride": 3, "baselines": 0.0, "perturbations_per_eval": 4}
    maps, reused = occlusion_states(model, x, target, stages, "independent", "gaussian", 1, options)
    assert reused and maps.shape == (len(stages) + 1,) + tuple(x.shape)
    occlusion = {"sliding_window_shapes": (1, 4, 4), "strides": (1, 3, 3), "baselines": 0.0,
                 "perturbations_per_eval": 4}
    assert torch.equal(maps[0], ca.Occlusion(model).attribute(x, target=target, **occlusion))
    for i, stage in enumerate(stages):
        with randomized([stage], "gaussian", 1):
            assert torch.equal(maps[i + 1], ca.Occlusion(model).attribute(x, target=target, **occlusion))


def test_progress_counts_captums_forward_calls() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    seen = []
    layer_randomization(model, x, "occlusion", perturbations_per_eval=5, batch_size=3,
                        progress=lambda done, total, label: seen.append((done, total, label)), **OCCLUSION)
    # 7x7 windows (16 px, window 4, stride 2) in 10 calls of 5 plus the unperturbed call, per chunk
    assert occlusion_positions(x, OCCLUSION) == 49
    calls = [(done, total) for done, total, label in seen if "forward pass" in label]
    assert calls == [(i, 22) for i in range(1, 23)]
    assert "all 4 layers at once (images 1-4), forward pass 22 of 22" in seen[-2][2]


def test_an_error_inside_a_state_leaves_parameters_values_and_rngs_untouched() -> None:
    model, x = make_residual(), tiny_images(3)
    before = snapshot(model)
    tensors = [p.data for p in model.parameters()]
    rng = torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()
    calls = []

    def progress(done: int, total: int, label: str) -> None:
        calls.append(done)
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layer_randomization(model, x, "occlusion", perturbations_per_eval=4, progress=progress, **OCCLUSION)
    assert calls == [1, 2, 3]
    assert_unchanged(model, before)
    # the very tensors, not just equal values: nothing swapped in is left behind
    assert all(p.data.data_ptr() == t.data_ptr() for p, t in zip(model.parameters(), tensors))
    assert torch.equal(torch.random.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]


def test_skipped_constant_maps_are_dropped_from_every_state() -> None:
    model, x = make_tiny_cnn(), tiny_images(5, seed=8)
    x[2] = 0.0  # occluding an all-zero image with a zero baseline changes nothing: a constant map
    with pytest.warns(UserWarning, match="constant"):
        fast, slow = both_ways(model, x, constant_maps="skip")
    assert fast.n_images == slow.n_images == 4
    assert_same(fast, slow)


def test_a_model_with_state_between_calls_is_not_replayed() -> None:
    """Its logits depend on how often it ran, so the recorded pass does not verify."""
    model = seeded_model(Remembers)
    result = layer_randomization(model, tiny_images(2), "occlusion", preset="thesis2023", **OCCLUSION)
    assert not result.reused_activations


class Blind(nn.Module):
    """A control: its output ignores the conv layer, so randomizing it cannot change any map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + 0.0 * self.conv(x).sum()


def test_a_layer_the_output_ignores_keeps_ssim_one_and_fails_the_check() -> None:
    model = seeded_model(Blind)
    x = tiny_images(4, seed=9)
    fast, slow = both_ways(model, x, layers=["conv"])
    assert fast.reused_activations
    assert_same(fast, slow)
    assert min(min(row) for row in fast.ssim) == pytest.approx(1.0)
    assert not fast.passed

