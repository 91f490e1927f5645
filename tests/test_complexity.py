"""The batched histogram entropy of maps against numpy's histogram and scipy's entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from pytest_saliency.compare.complexity import (
    BIN_RULES,
    bin_counts,
    discrete_entropy,
    histogram_counts,
    max_entropy,
)
from pytest_saliency.exceptions import SaliencyUsageError


def _rows(kind: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random maps of several kinds: gaussian, ties (few integers), heavy-tailed, a tiny range far
    from zero, values on a grid (many exactly on bin edges), sparse (mostly exact zeros)."""
    if kind == 0:
        return rng.normal(size=shape)
    if kind == 1:
        return rng.integers(0, 7, size=shape).astype(float)
    if kind == 2:
        return np.abs(rng.standard_cauchy(size=shape))
    if kind == 3:
        return rng.random(shape) * 1e-3 + 5
    if kind == 4:
        return np.round(rng.random(shape), 2)
    return np.where(rng.random(shape) < 0.8, 0.0, rng.random(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counts_and_entropy_equal_numpy_and_scipy(dtype: type) -> None:
    rng = np.random.default_rng(0)
    for trial in range(120):
        shape = (4, int(rng.integers(1, 400)))
        a = _rows(trial % 6, shape, rng).astype(dtype)
        a[0] = 3.0  # a constant map in every batch
        n_bins = int(rng.integers(2, 160))
        counts = histogram_counts(torch.from_numpy(a), n_bins).numpy()
        entropy = discrete_entropy(torch.from_numpy(a), n_bins).numpy()
        assert entropy.dtype == np.float64
        for i in range(shape[0]):
            reference, _ = np.histogram(a[i], bins=n_bins)
            np.testing.assert_array_equal(counts[i], reference)
            assert entropy[i] == pytest.approx(scipy.stats.entropy(reference), abs=1e-12)


def test_valid_positions_only_count() -> None:
    rng = np.random.default_rng(1)
    for trial in range(60):
        shape = (5, int(rng.integers(1, 200)))
        a = _rows(trial % 6, shape, rng).astype(np.float32)
        valid = rng.random(shape) < 0.6
        valid[0] = False  # no valid position: entropy 0
        valid[1, :] = False
        valid[1, 0] = True  # one valid position: a constant map
        a[~valid] = 1e6  # padding values must not reach the range or the counts
        counts = histogram_counts(torch.from_numpy(a), 50, valid=torch.from_numpy(valid)).numpy()
        entropy = discrete_entropy(torch.from_numpy(a), 50, valid=torch.from_numpy(valid)).numpy()
        assert counts[0].sum() == 0 and entropy[0] == 0.0 and entropy[1] == 0.0
        for i in range(1, shape[0]):
            reference, _ = np.histogram(a[i][valid[i]], bins=50)
            np.testing.assert_array_equal(counts[i], reference)
            assert entropy[i] == pytest.approx(scipy.stats.entropy(reference), abs=1e-12)


def test_constant_maps_have_entropy_zero_and_natural_log_is_used() -> None:
    maps = torch.stack([torch.zeros(10, 10), torch.full((10, 10), -2.5), torch.arange(100.0).reshape(10, 10)])
    entropy = discrete_entropy(maps, 100)
    assert entropy[0] == 0.0 and entropy[1] == 0.0
    assert entropy[2] == pytest.approx(math.log(100), abs=1e-12)  # one value per bin: ln 100 nats
    assert max_entropy(100, 100) == pytest.approx(math.log(100)) and max_entropy(100, 30) == pytest.approx(math.log(30))
    # two equal halves: ln 2
    assert discrete_entropy(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 100)[0] == pytest.approx(math.log(2))


def test_maps_of_any_shape_and_half_precision() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 8, 8, generator=g)
    flat = discrete_entropy(maps.reshape(3, -1), 20)
    assert torch.equal(discrete_entropy(maps, 20), flat)
    half = maps.half()
    reference = [scipy.stats.entropy(np.histogram(m.float().numpy().ravel(), bins=20)[0]) for m in half]
    np.testing.assert_allclose(discrete_entropy(half, 20).numpy(), reference, atol=1e-12)


def test_bin_rules_use_the_number_of_values() -> None:
    for n in range(1, 3000):
        assert int(bin_counts("sturges", [n])[0]) == math.ceil(math.log2(n) + 1)
        assert int(bin_counts("sqrt", [n])[0]) == math.ceil(math.sqrt(n))
        rice = 2 * n ** (1 / 3)
        expected = round(rice) if abs(rice - round(rice)) < 1e-9 else math.ceil(rice)  # exact cubes: no extra bin
        assert int(bin_counts("rice", [n])[0]) == expected
    assert int(bin_counts("rice", [1000])[0]) == 20 and int(bin_counts("sqrt", [1024])[0]) == 32
    assert bin_counts(100, [5, 7]).tolist() == [100, 100]


def test_a_rule_gives_each_masked_map_its_own_count() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 100)).astype(np.float32)
    valid = np.ones((3, 100), dtype=bool)
    valid[1, 10:] = False  # 10 values
    valid[2, 50:] = False  # 50 values
    for rule in BIN_RULES:
        entropy = discrete_entropy(torch.from_numpy(a), rule, valid=torch.from_numpy(valid)).numpy()
        for i in range(3):
            row = a[i][valid[i]]
            n_bins = int(bin_counts(rule, [row.size])[0])
            assert entropy[i] == pytest.approx(scipy.stats.entropy(np.histogram(row, bins=n_bins)[0]), abs=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: discrete_entropy(torch.rand(2, 5), 0), "bins must be an int >= 1"),
    (lambda: discrete_entropy(torch.rand(2, 5), "fd"), "unknown bins"),
    (lambda: discrete_entropy(torch.tensor([[0.0, float("nan")]]), 10), "NaN or inf"),
    (lambda: discrete_entropy(torch.rand(2, 5), 10, valid=torch.ones(2, 4, dtype=torch.bool)), "valid must have"),
    (lambda: discrete_entropy(torch.rand(0, 5), 10), "N >= 1"),
])
def test_bad_input_is_a_usage_error(call, match: str) -> None:
    with pytest.raises(SaliencyUsageError, match=match):
        call()
