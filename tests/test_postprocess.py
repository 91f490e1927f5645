"""Map pipelines and presets against straightforward numpy versions of the papers' code."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_saliency import PRESETS, MapPipeline, SaliencyUsageError, apply_pipeline
from pytest_saliency.plugin.config import DEFAULT_PRESET, PRESET_NAMES
from pytest_saliency.maps.postprocess import DEFAULT_PRESET as LIBRARY_DEFAULT


def adebayo_grayscale(image_3d: np.ndarray, percentile: float = 99) -> np.ndarray:
    """Adebayo et al.'s VisualizeImageGrayscale on a (C, H, W) attribution."""
    image_2d = np.sum(np.abs(image_3d), axis=0)
    vmax = np.percentile(image_2d, percentile)
    vmin = np.min(image_2d)
    return np.clip((image_2d - vmin) / (vmax - vmin), 0, 1)


def sam_signed(image_3d: np.ndarray) -> np.ndarray:
    m = image_3d.mean(axis=0)
    return m / np.abs(m).max()


def thesis_abs(image_3d: np.ndarray) -> np.ndarray:
    m = np.abs(image_3d).sum(axis=0)
    return (m - m.min()) / (m.max() - m.min())


maps = arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9)),
              elements=st.floats(-5, 5, allow_nan=False, width=64))


@settings(max_examples=80, deadline=None)
@given(maps)
def test_presets_match_the_reference_code(a):
    t = torch.from_numpy(a)
    for preset, reference in (("adebayo2018", adebayo_grayscale), ("sam2020", sam_signed), ("thesis2023", thesis_abs)):
        got = apply_pipeline(t, preset).numpy()
        for i in range(a.shape[0]):
            with np.errstate(invalid="ignore", divide="ignore"):
                expected = reference(a[i])
            if not np.all(np.isfinite(expected)):  # degenerate map: ours stays finite (zeros), theirs is NaN
                assert np.all(np.isfinite(got[i]))
                continue
            np.testing.assert_allclose(got[i], expected, atol=1e-12)


def test_value_ranges_and_all_zero_maps():
    a = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert apply_pipeline(a, "sam2020").abs().max() == pytest.approx(1.0)
    assert apply_pipeline(a, "sam2020").min() < 0
    for name in ("adebayo2018", "thesis2023"):
        m = apply_pipeline(a, name)
        assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    zeros = apply_pipeline(torch.zeros(2, 3, 8, 8), "adebayo2018")
    assert torch.equal(zeros, torch.zeros(2, 8, 8))


def test_reductions_resize_and_feature_vectors():
    a = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])  # (1, 3, 1, 1)
    signed = dict(absolute=False, normalize="none")
    assert apply_pipeline(a, MapPipeline(reduce="sum", **signed)).item() == 0.0
    assert apply_pipeline(a, MapPipeline(reduce="max_abs", **signed)).item() == -3.0
    assert apply_pipeline(a, MapPipeline(reduce="l2", **signed)).item() == pytest.approx(14 ** 0.5)
    resized = apply_pipeline(torch.rand(2, 1, 8, 8), MapPipeline(size=(16, 12)))
    assert tuple(resized.shape) == (2, 16, 12)
    assert tuple(apply_pipeline(torch.rand(5, 10)).shape) == (5, 1, 10)
    with pytest.raises(SaliencyUsageError, match="single-channel"):
        apply_pipeline(torch.rand(2, 3, 4, 4), MapPipeline(reduce="none"))


def test_presets_describe_their_ssim_parameters():
    assert PRESETS["sam2020"].ssim.win_size == 5 and PRESETS["sam2020"].ssim.data_range == 2.0
    assert PRESETS["thesis2023"].ssim.win_size == 7 and PRESETS["thesis2023"].ssim.data_range == 1.0
    text = PRESETS["adebayo2018"].describe()
    assert "win_size=5" in text and "data_range=1" in text and "percentile(99)" in text
    custom = dataclasses.replace(PRESETS["sam2020"], name="mine", size=(32, 32))
    assert "resize 32x32" in custom.describe()


def test_the_torch_free_config_agrees_with_the_library():
    assert DEFAULT_PRESET == LIBRARY_DEFAULT
    assert set(PRESET_NAMES) == set(PRESETS)


def test_bad_pipelines_and_maps():
    with pytest.raises(SaliencyUsageError, match="Did you mean 'sam2020'"):
        apply_pipeline(torch.rand(1, 1, 8, 8), "sam2021")
    with pytest.raises(SaliencyUsageError, match="channel reduction"):
        MapPipeline(reduce="median")
    with pytest.raises(SaliencyUsageError, match="percentile"):
        MapPipeline(percentile=0)
    nan = torch.rand(2, 1, 8, 8)
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(SaliencyUsageError, match="1 NaN or infinite"):
        apply_pipeline(nan)
    with pytest.raises(SaliencyUsageError, match="torch.Tensor"):
        apply_pipeline(np.zeros((1, 1, 8, 8)))


@settings(max_examples=200, deadline=None)
@given(
    rows=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                elements=st.floats(-5, 5, allow_nan=False, width=64)),
    percentile=st.one_of(st.sampled_from([0.0, 1.0, 50.0, 99.0, 100.0]), st.floats(0.0, 100.0)),
)
def test_percentile_equals_numpy_linear_percentile(rows: np.ndarray, percentile: float) -> None:
    """The topk shortcut picks the same order statistics numpy interpolates between, ties included."""
    from pytest_saliency.maps.postprocess import _percentile

    got = _percentile(torch.from_numpy(rows), percentile).numpy()
    np.testing.assert_allclose(got, np.percentile(rows, percentile, axis=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.complex64])
def test_maps_that_are_not_floating_point_are_a_usage_error(dtype):
    from pytest_saliency import compare_maps

    maps = (torch.rand(3, 1, 8, 8) > 0.5).to(dtype)
    message = rf"attribution maps must be a floating-point tensor, got {dtype}.*\.float\(\)"
    with pytest.raises(SaliencyUsageError, match=message):
        apply_pipeline(maps)
    with pytest.raises(SaliencyUsageError, match=message):
        compare_maps({"a": maps, "b": maps})
