"""The hypothesis strategy over attribution hyperparameters, and a search for an unstable setting."""

from __future__ import annotations

import textwrap

import captum.attr  # noqa: F401  (it raises the recursion limit on import; hypothesis warns if that happens mid-test)
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_saliency import explain
from pytest_saliency.maps.cache import MapCache
from pytest_saliency.exceptions import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.maps.explainers import attribute, resolved_options
from pytest_saliency.maps.methods import METHODS
from pytest_saliency.maps.targets import resolve_target
from pytest_saliency.strategies import (
    STOCHASTIC,
    _ig_rule_option,
    saliency_hyperparameters,
)
from pytest_saliency.checks.sweeps import assert_stable_under_hyperparameters, check_hyperparameters

MODEL = make_tiny_cnn()
IMAGES = tiny_images(2)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(METHODS)), include_seed=st.booleans(), data=st.data())
def test_every_drawn_setting_is_accepted_by_explain(method, include_seed, data):
    params = data.draw(saliency_hyperparameters(method, IMAGES.shape, include_seed=include_seed), label="params")
    assert isinstance(params, dict)
    assert ("seed" in params) == (include_seed and method in STOCHASTIC)
    check_hyperparameters(method, METHODS[method], params, "strategy")  # the sweep's own validation agrees
    if "method" in params:
        # captum's name for IG's integration rule collides with explain's own `method` parameter, so
        # explain(..., method=...) cannot be spelled; run what explain runs after parsing its arguments.
        spec = METHODS[method]
        options = resolved_options(spec, MODEL, IMAGES, {k: v for k, v in params.items() if k != "seed"})
        maps = attribute(MODEL, IMAGES, spec, resolve_target(MODEL, IMAGES, None), 0, None, True, options)
    else:
        maps = explain(MODEL, IMAGES, method, **params)
    assert maps.shape[0] == 2 and torch.isfinite(maps).all()


@settings(deadline=None, max_examples=30)
@given(side=st.integers(4, 64), data=st.data())
def test_sizes_are_bounded_by_the_input(side, data):
    occlusion = data.draw(saliency_hyperparameters("occlusion", (1, 3, side, side + 5)))
    assert 1 <= occlusion["stride"] <= occlusion["window"] <= max(1, side // 4)
    lime = data.draw(saliency_hyperparameters("lime", (side, side)))
    assert 2 <= lime["grid"] <= max(2, min(16, side)) and 10 <= lime["n_samples"] <= 200
    assert data.draw(saliency_hyperparameters("deeplift")) == {}


def test_bad_strategy_arguments():
    with pytest.raises(SaliencyUsageError, match="unknown method 'integrated_gradient'. Did you mean 'integrated_gradients'"):
        saliency_hyperparameters("integrated_gradient")
    with pytest.raises(SaliencyUsageError, match="Strategies exist for named methods only"):
        saliency_hyperparameters(lambda model, x, t: x)
    with pytest.raises(SaliencyUsageError, match=r"input_shape must end in \(H, W\)"):
        saliency_hyperparameters("occlusion", (16,))


def test_hypothesis_finds_and_shrinks_to_the_least_stable_setting():
    """Integrated gradients with few steps drift from the 50-step reference; hypothesis must find the
    cheapest such setting and the failure must name it."""
    cache = MapCache()  # the reference is explained once, not once per example
    seen = []

    @settings(max_examples=25, deadline=None, database=None, derandomize=True)
    @given(params=saliency_hyperparameters("integrated_gradients", IMAGES.shape))
    def search(params):
        seen.append(params)
        assert_stable_under_hyperparameters(
            MODEL, tiny_images(6), "integrated_gradients", sweep=[params], threshold=0.99, cache=cache,
        )

    with pytest.raises(SaliencyCheckFailed) as failure:
        search()
    rule = _ig_rule_option()
    shrunk = {"n_steps": 2, rule: "gausslegendre"}
    assert seen[-1] == shrunk  # hypothesis re-runs the shrunk example last
    message = str(failure.value)
    assert f"setting {{n_steps=2, {rule}='gausslegendre'}} gives mean ssim 0.8" in message
    assert "below the threshold 0.99" in message and "stability alone is not quality" in message
    assert failure.value.result.failures[0][1].value == shrunk
    assert cache.hits >= len(seen) - 1


def test_pytest_reports_the_shrunk_setting(pytester):
    pytester.makepyfile(
        textwrap.dedent(
            """
            import torch
            from hypothesis import given, settings
            from torch import nn

            from pytest_saliency.maps.cache import MapCache
            from pytest_saliency.strategies import saliency_hyperparameters
            from pytest_saliency.checks.sweeps import assert_stable_under_hyperparameters

            with torch.random.fork_rng():
                torch.manual_seed(0)
                MODEL = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3))
            IMAGES = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
            CACHE = MapCache()

            @settings(max_examples=15, deadline=None, database=None, derandomize=True)
            @given(params=saliency_hyperparameters("integrated_gradients", IMAGES.shape))
            def test_ig_is_stable(params):
                assert_stable_under_hyperparameters(
                    MODEL, IMAGES, "integrated_gradients", sweep=[params], threshold=0.999, cache=CACHE
                )
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    # Hypothesis names the shrunk example "Falsifying example" (before 6.16x) or "Failing test case".
    assert "Falsifying example: test_ig_is_stable(" in output or "Failing test case: test_ig_is_stable(" in output
    rule = _ig_rule_option()
    assert "'n_steps': 2" in output and f"'{rule}': 'gausslegendre'" in output
    assert "SaliencyCheckFailed: Saliency check failed: integrated_gradients maps are NOT stable" in output
    assert f"setting {{n_steps=2, {rule}='gausslegendre'}}" in output
