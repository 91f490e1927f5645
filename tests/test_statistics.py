"""Sriram & Conati's statistics against hand-computed cases and a plain loop (validation target V2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_saliency import SaliencyUsageError
from pytest_saliency.compare.statistics import bootstrap_interval, sensitivity_statistics


def test_v2_three_layers_mean_below_threshold_and_definition_2_fails():
    # SSIMs [0.98, 1.0, 0.995] for one image: S = [0.02, 0, 0.005], S^i = 0.00833 < 0.01.
    stats = sensitivity_statistics([[0.98], [1.0], [0.995]], ["a", "b", "c"])
    assert stats.image_scores[0] == pytest.approx(0.025 / 3, abs=1e-12)
    assert stats.dataset_score == pytest.approx(0.00833333, abs=1e-7)
    assert not stats.dataset_sensitive
    assert stats.image_sensitive_to_all_layers == [False]
    assert [layer.sensitive for layer in stats.layers] == [True, False, False]


def test_v2_one_layer_changes_the_mean_passes_but_not_every_layer():
    # SSIMs [0.5, 1 x 9]: S^i = 0.05 passes Definition 3, but Definition 2 (every layer) fails.
    stats = sensitivity_statistics([[0.5]] + [[1.0]] * 9, [f"l{i}" for i in range(10)])
    assert stats.dataset_score == pytest.approx(0.05)
    assert stats.dataset_sensitive
    assert stats.fraction_images_sensitive_to_all_layers == 0.0
    assert len(stats.insensitive_layers) == 9


def test_boundary_ssim_exactly_at_threshold_is_not_sensitive():
    stats = sensitivity_statistics([[0.99, 0.9899999]], ["l"])
    assert stats.layers[0].fraction_sensitive == 0.5  # 0.99 is "similar enough"; just below is sensitive
    exact = sensitivity_statistics([[0.99]], ["l"])
    assert exact.dataset_score >= 0.01 and exact.dataset_sensitive  # S^I >= 0.01 (Definition 3)
    assert not exact.layers[0].sensitive


def test_negative_ssim_is_clipped_to_full_dissimilarity_by_default():
    stats = sensitivity_statistics([[-0.5, 0.5]], ["l"])
    assert stats.image_scores == [1.0, 0.5]
    raw = sensitivity_statistics([[-0.5, 0.5]], ["l"], clip_negative=False)
    assert raw.image_scores == [1.5, 0.5]
    assert stats.layers[0].min_ssim == -0.5  # raw SSIM kept


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(50)
    a = bootstrap_interval(values, 0.9, 2000, seed=1)
    assert a == bootstrap_interval(values, 0.9, 2000, seed=1)
    assert a != bootstrap_interval(values, 0.9, 2000, seed=2)
    assert a[0] < values.mean() < a[1]
    wide = bootstrap_interval(values, 0.99, 2000, seed=1)
    assert wide[0] < a[0] and wide[1] > a[1]
    # Normal approximation: the 90% interval is about mean +- 1.645 * sd / sqrt(n).
    half = 1.645 * values.std(ddof=1) / math.sqrt(len(values))
    assert (a[1] - a[0]) / 2 == pytest.approx(half, rel=0.2)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda layers: st.integers(1, 6).flatmap(
            lambda images: st.lists(
                st.lists(st.floats(-1, 1, allow_nan=False), min_size=images, max_size=images),
                min_size=layers, max_size=layers,
            )
        )
    ),
    st.floats(0.5, 1.0),
    st.floats(0.0, 0.2, exclude_min=True),
    st.booleans(),
)
def test_matches_a_plain_loop(ssim, ssim_threshold, sensitivity_threshold, clip):
    names = [f"l{i}" for i in range(len(ssim))]
    stats = sensitivity_statistics(
        ssim, names, ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold,
        clip_negative=clip, n_bootstrap=50,
    )
    n_layers, n_images = len(ssim), len(ssim[0])
    image_scores = []
    for i in range(n_images):
        total = 0.0
        for row in ssim:
            total += 1.0 - (max(row[i], 0.0) if clip else row[i])
        image_scores.append(total / n_layers)
    assert stats.image_scores == pytest.approx(image_scores, abs=1e-12)
    dataset = sum(image_scores) / n_images
    assert stats.dataset_score == pytest.approx(dataset, abs=1e-12)
    assert stats.dataset_sensitive == (stats.dataset_score >= sensitivity_threshold)
    for layer, row in zip(stats.layers, ssim):
        assert layer.mean_ssim == pytest.approx(sum(row) / n_images, abs=1e-12)
        assert layer.fraction_sensitive == pytest.approx(sum(v < ssim_threshold for v in row) / n_images)
    every = [all(row[i] < ssim_threshold for row in ssim) for i in range(n_images)]
    assert stats.image_sensitive_to_all_layers == every
    assert stats.ci_low <= stats.ci_high


def test_bad_shapes_and_options():
    with pytest.raises(SaliencyUsageError, match="shape"):
        sensitivity_statistics([[0.5, 0.5]], ["a", "b"])
    with pytest.raises(SaliencyUsageError, match="confidence"):
        sensitivity_statistics([[0.5]], ["a"], confidence=90)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sensitivity_threshold": math.nan}, r"sensitivity_threshold must be a finite number with 0 < "),
        ({"sensitivity_threshold": -0.5}, r"sensitivity_threshold .*got -0.5.*would pass every method"),
        ({"sensitivity_threshold": 0.0}, r"sensitivity_threshold .*got 0.0"),
        ({"sensitivity_threshold": math.inf}, r"sensitivity_threshold .*got inf"),
        ({"sensitivity_threshold": "0.01"}, r"sensitivity_threshold .*got '0.01'"),
        ({"sensitivity_threshold": True}, r"sensitivity_threshold .*got True"),
        ({"sensitivity_threshold": 1.5}, r"sensitivity_threshold .*<= 1, got 1.5"),
        ({"ssim_threshold": math.nan}, r"ssim_threshold must be a finite number with -1 <= ssim_threshold <= 1"),
        ({"ssim_threshold": "0.99"}, r"ssim_threshold .*got '0.99'"),
        ({"confidence": 1.0}, r"confidence .*< 1, got 1.0"),
        ({"n_bootstrap": 0}, r"n_bootstrap must be an int >= 1, got 0"),
        ({"n_bootstrap": 2.5}, r"n_bootstrap must be an int >= 1, got 2.5"),
        ({"clip_negative": "yes"}, r"clip_negative must be True or False"),
    ],
)
def test_every_threshold_and_option_is_checked(options, message):
    with pytest.raises(SaliencyUsageError, match=message):
        sensitivity_statistics([[0.5, 0.7]], ["a"], **options)


def test_unclipped_scores_reach_2_so_the_threshold_may_too():
    stats = sensitivity_statistics([[-0.5, -1.0]], ["a"], clip_negative=False, sensitivity_threshold=1.5)
    assert stats.dataset_score == 1.75 and stats.dataset_sensitive
    with pytest.raises(SaliencyUsageError, match=r"<= 2, got 2.5"):
        sensitivity_statistics([[0.5]], ["a"], clip_negative=False, sensitivity_threshold=2.5)
