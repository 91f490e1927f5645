"""Models that draw random numbers in eval mode: dropout left on (Monte Carlo dropout), noise
layers, sampling steps, drawing from torch, numpy or Python's ``random``.

Every public function that runs a model must leave the global generators as they were, give the
same result twice for one seed, and give every explanation pass of a check the same random numbers
(so a randomization check measures the change of the model, not a fresh dropout mask). Activation
reuse must not change the result: it cannot replay such a model, and falls back to full passes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.core.integrity import rng_isolated
from pytest_saliency.core.rng import generator_states, isolated_rngs, pass_seeded, same_generator_states, seeded


class Noise(nn.Module):
    """Random numbers in eval mode, from the generator named by ``source``."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source == "torch":
            return x + 0.3 * torch.randn_like(x)
        if self.source == "dropout":
            return nn.functional.dropout(x, 0.3, training=True)
        if self.source == "numpy":
            return x + 0.3 * torch.from_numpy(np.random.randn(*x.shape).astype("float32"))
        return x * (1.0 + 0.3 * random.random())  # Python's random


class NoisyCNN(nn.Module):
    """conv -> noise -> relu -> conv -> relu -> fc on 1x8x8 inputs, plus a ``dead`` layer whose
    output is multiplied by zero (randomizing it changes nothing)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.noise = Noise(source)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.dead = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.noise(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + 0.0 * self.dead(x)
        return self.fc(x.flatten(1))


SOURCES = ["torch", "dropout", "numpy", "python"]
LAYERS = ["conv1", "conv2", "fc"]


def noisy_model(source: str) -> NoisyCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return NoisyCNN(source).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def global_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_global_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), "torch's CPU generator changed"
    assert before[1][2:] == after[1][2:] and (before[1][1] == after[1][1]).all(), "numpy's global state changed"
    assert before[2] == after[2], "Python's random state changed"


def numbers(result) -> list[float]:
    """Every number a result holds, in a fixed order (to compare two runs)."""
    if isinstance(result, torch.Tensor):
        return result.double().reshape(-1).tolist()
    if isinstance(result, list):
        return [name for name, _ in result]
    found: list[float] = []

    def walk(value) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            found.append(float(value))
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if key not in ("seconds", "elapsed", "duration", "time", "started", "created"):
                    walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(result.to_dict())
    return found


def _factory(source: str):
    def build(seed: int) -> NoisyCNN:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return NoisyCNN(source).eval()
    return build


# name -> call(model, x, source): every public entry point that runs a model
CHECKS = {
    "explain": lambda m, x, s: ps.explain(m, x, "saliency"),
    "explain smoothgrad": lambda m, x, s: ps.explain(m, x, "smoothgrad", nt_samples=3),
    "select_layers": lambda m, x, s: ps.select_layers(m, x),
    "IPR saliency": lambda m, x, s: ps.layer_randomization(m, x, "saliency", layers=LAYERS, seed=3),
    "IPR integrated gradients": lambda m, x, s: ps.layer_randomization(
        m, x, "integrated_gradients", layers=LAYERS, n_steps=4),
    "CPR occlusion": lambda m, x, s: ps.layer_randomization(
        m, x, "occlusion", mode="cascading", layers=LAYERS, window=4, stride=4),
    "IPR auto images": lambda m, x, s: ps.layer_randomization(
        m, x, "input_x_gradient", layers=LAYERS, images="auto", image_batch=2),
    "agreement": lambda m, x, s: ps.agreement_matrix(m, x, ["saliency", "input_x_gradient"], metrics=["ssim"]),
    "sweep": lambda m, x, s: ps.hyperparameter_sweep(m, x, "smoothgrad", {"nt_samples": [2, 3]}, metrics="ssim"),
    "input noise": lambda m, x, s: ps.input_noise_stability(m, x, "saliency", metrics="ssim"),
    "seed stability": lambda m, x, s: ps.explainer_seed_stability(m, x, "saliency", seeds=(0, 1)),
    "causal curves": lambda m, x, s: ps.causal_curves(m, x, ps.explain(m, x, "saliency"), step=16),
    "deletion": lambda m, x, s: ps.deletion(m, x, torch.rand(x.shape, generator=torch.Generator()), step=16),
    "consistency": lambda m, x, s: ps.explanation_consistency(
        [m, noisy_model(s)], x, "saliency", metrics=["ssim"], n_splits=2),
    "ensemble size": lambda m, x, s: ps.consistency_vs_ensemble_size(
        _factory(s), x, sizes=(1, 2), seeds=[0, 1, 2, 3], n_splits=2),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("check", list(CHECKS))
def test_a_model_drawing_random_numbers_leaves_the_global_generators_alone_and_reproduces(check, source):
    model, x = noisy_model(source), images()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    before = global_states()
    first = CHECKS[check](model, x, source)
    assert_same_global_states(before, global_states())
    second = CHECKS[check](model, x, source)
    assert numbers(first) == numbers(second)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("method, options", [
    ("saliency", {}),
    ("input_x_gradient", {"mode": "cascading"}),
    ("integrated_gradients", {"n_steps": 4}),
    ("smoothgrad", {"nt_samples": 3}),
    ("occlusion", {"window": 4, "stride": 4}),
])
def test_activation_reuse_falls_back_and_gives_what_full_passes_give(source, method, options):
    model, x = noisy_model(source), images()
    reused = ps.layer_randomization(model, x, method, layers=LAYERS, seed=2, **options)
    full = ps.layer_randomization(model, x, method, layers=LAYERS, seed=2, reuse_activations=False, **options)
    assert not reused.reused_activations
    assert torch.equal(torch.as_tensor(reused.ssim), torch.as_tensor(full.ssim))


@pytest.mark.parametrize("source", SOURCES)
def test_every_pass_of_a_check_sees_the_same_random_numbers(source):
    """Control: randomizing a layer that cannot change the output leaves every map as it was,
    only if the original pass and the randomized state draw the same noise."""
    model, x = noisy_model(source), images()
    result = ps.layer_randomization(model, x, "saliency", layers=["dead"], seed=4)
    assert torch.as_tensor(result.ssim).min() > 1 - 1e-6
    live = ps.layer_randomization(model, x, "saliency", layers=["conv2"], seed=4)
    assert torch.as_tensor(live.ssim).max() < 0.99  # (the control can fail: a live layer does change the maps)


def test_the_generators_come_back_when_a_check_fails_or_raises():
    model, x = noisy_model("dropout"), images()
    before = global_states()
    with pytest.raises(SaliencyCheckFailed):
        ps.assert_sensitive_to_layer_randomization(model, x, "saliency", layers=["dead"])
    assert_same_global_states(before, global_states())
    with pytest.raises(SaliencyUsageError):
        ps.layer_randomization(model, x, "saliency", layers=["no_such_layer"])
    assert_same_global_states(before, global_states())

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            torch.rand(3), np.random.rand(), random.random()
            raise RuntimeError("boom")

    exploding = Exploding()  # (its initialization draws)
    before = global_states()
    with pytest.raises(SaliencyUsageError, match="raised RuntimeError.*boom"):
        ps.explain(exploding, x, "saliency")
    assert_same_global_states(before, global_states())


def test_a_deterministic_model_gives_what_it_gave_before():
    """Seeding the passes changes nothing for a model that draws nothing (the usual case)."""
    model, x = make_tiny_cnn(), tiny_images(4)
    with torch.random.fork_rng():
        torch.manual_seed(123)  # whatever the global state, the same maps
        a = ps.explain(model, x, "saliency")
    assert torch.equal(a, ps.explain(model, x, "saliency"))
    result = ps.layer_randomization(model, x, "saliency", seed=1)
    assert result.reused_activations  # a model that draws nothing is still replayed


def test_rng_isolated_seeds_from_the_seed_argument_wherever_it_is_passed():
    @rng_isolated
    def draw(a, seed=0):
        return torch.rand(1).item(), np.random.rand(), random.random()

    @rng_isolated
    def draw_keyword(*, seed=5):
        return torch.rand(1).item()

    @rng_isolated
    def no_seed(**options):
        return torch.rand(1).item()

    before = global_states()
    assert draw(1, 7) == draw(1, seed=7) != draw(1, 8)
    assert draw(1) == draw(1, seed=0)
    with seeded(7):
        assert draw(1, 7) == (torch.rand(1).item(), np.random.rand(), random.random())  # what seeded(7) gives
    assert draw_keyword() == draw_keyword(seed=5)
    assert no_seed(seed=3) == draw_keyword(seed=3) and no_seed() == draw_keyword(seed=0)
    assert_same_global_states(before, global_states())


def test_nested_isolation_restores_only_at_the_outermost_level():
    before = global_states()
    with isolated_rngs(1):
        torch.rand(5)
        with isolated_rngs(2):
            inner = torch.rand(1)
        after_inner = torch.rand(1)  # the inner block seeded again and did not restore
        with pass_seeded(2):
            assert torch.equal(torch.rand(1), inner)
        with seeded(2):
            assert torch.equal(torch.rand(1), inner)
        assert not torch.equal(after_inner, inner)
    assert_same_global_states(before, global_states())
    with pass_seeded(9):  # outside an isolation it forks like seeded()
        torch.rand(3), np.random.rand(), random.random()
    assert_same_global_states(before, global_states())


@pytest.mark.parametrize("draw", [lambda: torch.rand(1), lambda: np.random.rand(), lambda: random.random()])
def test_generator_states_tell_whether_anything_was_drawn(draw):
    a = generator_states()
    assert same_generator_states(a, generator_states())
    draw()
    assert not same_generator_states(a, generator_states())


class DrawsWhenChanged(nn.Module):
    """Monte Carlo dropout only where activations are large: the original model never draws, some
    randomized states do (the recording pass cannot see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.limit = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        if h.abs().mean() > self.limit:
            h = nn.functional.dropout(h, 0.5, training=True)
        return self.fc(h.flatten(1))


class DrawsWithGradients(NoisyCNN):
    """Dropout only while gradients are taken (not in a plain no-grad traced pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        if torch.is_grad_enabled():
            x = nn.functional.dropout(x, 0.3, training=True)
        x = torch.relu(self.conv2(x)) + 0.0 * self.dead(x)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method, options", [
    ("saliency", {}), ("integrated_gradients", {"n_steps": 3}), ("occlusion", {"window": 4, "stride": 4}),
])
def test_draws_only_in_randomized_states_give_what_full_passes_give(method, options):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DrawsWhenChanged().eval()
    x = images()
    with torch.no_grad():
        model.conv1.weight.mul_(0.1)
        model.conv1.bias.mul_(0.1)
        model.limit = 1.5 * float(torch.relu(model.conv2(torch.relu(model.conv1(x)))).abs().mean())
    drawn = generator_states()
    with torch.no_grad():
        model(x)
    assert same_generator_states(drawn, generator_states())  # the original model never draws
    kwargs = dict(layers=LAYERS, seed=2, **options)
    reused = ps.layer_randomization(model, x, method, **kwargs)
    full = ps.layer_randomization(model, x, method, reuse_activations=False, **kwargs)
    assert torch.equal(torch.as_tensor(reused.ssim), torch.as_tensor(full.ssim))


@pytest.mark.parametrize("method, options", [("integrated_gradients", {"n_steps": 4}), ("smoothgrad", {"nt_samples": 3})])
def test_draws_only_with_gradients_on_are_seen_by_the_replay(method, options):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DrawsWithGradients("torch").eval()
    x = images()
    for reuse in (True, False):
        result = ps.layer_randomization(model, x, method, layers=["dead"], seed=1, reuse_activations=reuse, **options)
        assert torch.as_tensor(result.ssim).min() > 1 - 1e-6, reuse


@pytest.mark.parametrize("source", ["dropout", None])
def test_skipped_constant_maps_leave_the_other_images_draws_aligned(source):
    """constant_maps="skip": the original maps of the images kept come from the same batch as the
    states' (a stochastic method, or a model that draws, then draws the same numbers)."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.dead = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            h = torch.relu(self.conv1(x))
            if source:
                h = nn.functional.dropout(h, 0.3, training=True)
            out = self.fc((h + 0.0 * self.dead(h)).flatten(1))
            return out * (x.mean(dim=(1, 2, 3)) > 0.2).float()[:, None]  # a blank image: a constant map

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Masked().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[1] = 0
    for method, options in [("saliency", {}), ("smoothgrad", {"nt_samples": 3})]:
        with pytest.warns(ps.SaliencyWarning, match="left out") as caught:
            result = ps.layer_randomization(model, x, method, layers=["dead"], target=0, constant_maps="skip",
                                            seed=1, **options)
        assert result.n_images == 5
        assert torch.as_tensor(result.ssim).min() > 1 - 1e-6, method
        assert caught[0].filename == __file__  # the warning points at the caller, not into the library


@pytest.mark.parametrize("seed", [np.int64(3), 2**64 + 3, -5, True])
def test_seeds_of_any_integer_type_work(seed):
    model, x = noisy_model("dropout"), images()
    before = global_states()
    a = ps.layer_randomization(model, x, "saliency", layers=LAYERS, seed=seed)
    b = ps.layer_randomization(model, x, "saliency", layers=LAYERS, seed=int(seed))
    assert a.ssim == b.ssim
    assert torch.equal(ps.explain(model, x, "smoothgrad", seed=seed, nt_samples=2),
                       ps.explain(model, x, "smoothgrad", seed=int(seed), nt_samples=2))
    assert_same_global_states(before, global_states())


@pytest.mark.parametrize("seed", [None, 1.5, "3"])
def test_a_seed_that_is_not_an_integer_is_a_usage_error(seed):
    with pytest.raises(SaliencyUsageError, match="seed must be an integer"):
        ps.explain(noisy_model("torch"), images(), "saliency", seed=seed)


def test_checks_in_threads_run_one_at_a_time_and_leave_the_generators_alone():
    import threading

    model, x = noisy_model("dropout"), images()
    expected = {seed: ps.explain(model, x, "saliency", seed=seed) for seed in range(4)}
    before = global_states()
    got: dict[int, list[torch.Tensor]] = {seed: [] for seed in range(4)}

    def work(seed: int) -> None:
        for _ in range(5):
            got[seed].append(ps.explain(model, x, "saliency", seed=seed))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_same_global_states(before, global_states())
    assert all(torch.equal(maps, expected[seed]) for seed in got for maps in got[seed])
