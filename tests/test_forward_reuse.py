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
from pytest_saliency.maps.methods import occlusion_positions
from pytest_saliency.engine.stacks import StateStack, occlusion_states
from pytest_saliency.model.layers import select_layers
from pytest_saliency.model.randomize import randomized
from test_activation_reuse import (
    Experts, FunctionalTricks, Gate, PooledInForward, Remembers, StorageAlias, Tied, assert_unchanged, make_residual,
    seeded_model, snapshot,
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
    from pytest_saliency.engine import stacks as forward_reuse

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


def test_progress_counts_captums_forward_calls_in_states() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    seen = []
    layer_randomization(model, x, "occlusion", perturbations_per_eval=5, batch_size=3,
                        progress=lambda done, total, label: seen.append((done, total, label)), **OCCLUSION)
    # 7x7 windows (16 px, window 4, stride 2) in 10 calls of 5 plus the unperturbed call, per chunk
    assert occlusion_positions(x, OCCLUSION) == 49
    # all 4 states advance together: after call k of 22, 4 * k // 22 states' worth is done
    assert seen[:21] == [(4 * k // 22, 4, f"forward pass {k + 1} of 22, all 4 states at once (images 1-4)")
                         for k in range(1, 22)]
    assert seen[21:] == [(4, 4, ""), (4, 4, "")]  # the stack's last call, then the check's end


def test_an_error_inside_a_state_leaves_parameters_values_and_rngs_untouched() -> None:
    model, x = make_residual(), tiny_images(3)
    before = snapshot(model)
    tensors = [p.data for p in model.parameters()]
    rng = torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()
    calls = []

    def progress(done: int, total: int, label: str) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layer_randomization(model, x, "occlusion", perturbations_per_eval=4, progress=progress, **OCCLUSION)
    assert len(calls) == 3
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



# Models whose parameters share storage, nest, cache a derived tensor or are replaced by their reset:
# a stack must write randomized values in place and draw each cascading stage on top of the
# stages before it, as the loop over states does.


class TiedByData(nn.Module):
    """Two layers whose weights share storage through ``.data`` (distinct Parameter objects)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.a, self.mid, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight.data = self.a.weight.data
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.tanh(self.conv(x))).flatten(1)
        return self.out(torch.tanh(self.b(torch.tanh(self.mid(torch.tanh(self.a(h)))))))


class ScaledBlock(nn.Module):
    """ConvNeXt-style: the block owns a layer scale and has parameterized children."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.norm, self.pw = nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.GroupNorm(1, 2), nn.Conv2d(2, 2, 1)
        self.gamma = nn.Parameter(torch.full((1, 2, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.pw(nn.functional.gelu(self.norm(self.dw(x))))


class LayerScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(1, 2, 3, padding=1), ScaledBlock(), nn.Linear(512, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).flatten(1))


class CachedTranspose(nn.Module):
    """Caches W^T and refreshes it when the weight's version moves (as in-place writes bump it).

    The root owns a parameter and has parameterized children, so cascading keeps the loop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 512) / 512 ** 0.5)
        self.fc = nn.Linear(8, 3)
        self._cache, self._tag = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tag != self.weight._version:
            self._cache, self._tag = self.weight.detach().t().contiguous(), self.weight._version
        return self.fc(torch.tanh(torch.tanh(self.conv(x)).flatten(1) @ self._cache))


class NewParameters(nn.Linear):
    """A reset_parameters that assigns new nn.Parameter objects instead of writing in place."""

    def reset_parameters(self) -> None:
        self.weight = nn.Parameter(torch.randn_like(self.weight) * 0.1)
        self.bias = nn.Parameter(torch.zeros_like(self.bias))


class Replaces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 2, 3, padding=1), NewParameters(512, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("cls, cascading_stacks", [(StorageAlias, True), (TiedByData, False), (LayerScaled, False),
                                                   (CachedTranspose, False), (Replaces, True)])
@pytest.mark.parametrize("randomization", ["reinit", "permute"])
def test_aliased_nested_cached_and_replaced_parameters_give_the_loops_numbers(
        cls: type, cascading_stacks: bool, randomization: str) -> None:
    model, x = seeded_model(cls), tiny_images(3, seed=4)
    before = snapshot(model)
    for mode in ("independent", "cascading"):
        for order in ("top_down", "bottom_up"):
            fast, slow = both_ways(model, x, mode=mode, order=order, randomization=randomization)
            # cascading over stages that share parameters or storage keeps the loop
            assert fast.reused_activations == (mode == "independent" or cascading_stacks)
            assert_same(fast, slow)
    assert_unchanged(model, before)
    if cls is TiedByData:  # the tie survives the check
        assert model.b.weight.data_ptr() == model.a.weight.data_ptr()


def test_adaptive_steps_keep_the_loop_when_the_budget_cannot_hold_an_image_batch() -> None:
    model, x = make_tiny_cnn(), tiny_images(12, seed=5)
    held = 3 * 5 * x[0].numel() * 4  # (4 layers + original) x one image, three times over
    for budget, stacks in [(3 * held, False), (10**9, True)]:
        fast, slow = both_ways(model, x, images="auto", image_batch=4, memory_budget=budget)
        assert fast.reused_activations == stacks
        assert fast.n_images == slow.n_images and fast.stopped_early == slow.stopped_early
        assert_same(fast, slow)


class Exploding(nn.Module):
    """Finite logits as given; infinite ones once ``gate``'s weight (all zeros) is randomized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(512, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.conv(x) + self.gate(x)).flatten(1)
        return self.fc(torch.where(self.gate.weight.abs().max() > 0.5, h * float("inf"), h))


@pytest.mark.parametrize("reuse", [True, False])
def test_non_finite_maps_name_the_randomized_layer(reuse: bool) -> None:
    model = seeded_model(Exploding)
    with torch.no_grad():
        model.gate.weight.zero_()
    # a Gaussian draw for a weight of zero spread has scale 1 (randomization._scale): some entry exceeds 0.5
    with pytest.raises(ValueError, match=r"from 'occlusion' with 'gate' randomized contain .* out of 768\b"):
        layer_randomization(model, tiny_images(3), "occlusion", randomization="gaussian", seed=0,
                            reuse_activations=reuse, **OCCLUSION)


class EditsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(512, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(1.0)  # an in-place write (the values stay): the batch's version moves
        return self.fc(self.conv(x).flatten(1))


def test_a_model_that_writes_into_its_input_keeps_the_loop() -> None:
    model, x = seeded_model(EditsInput), tiny_images(3)
    fast, slow = both_ways(model, x)
    assert not fast.reused_activations
    assert_same(fast, slow)
