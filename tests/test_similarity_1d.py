"""SSIM of one-dimensional maps (time series, feature vectors) against scikit-image.

Maps of height 1, ``(N, 1, T)``, are 1-D signals: SSIM slides a window of ``win_size`` samples
along their length, exactly what ``skimage.metrics.structural_similarity`` computes on the 1-D
arrays ``a[i, 0]`` (``NP = win_size``, the border crop along that axis only, gaussian weights
along that axis). Every test compares against scikit-image itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.metrics import structural_similarity as sk_ssim
from test_similarity import effective_win_size

from pytest_saliency.compare.similarity import (
    check_ssim_window,
    ssim_reference_moments,
    ssim_setup,
    ssim_unchecked,
    structural_similarity,
)
from pytest_saliency.exceptions import SaliencyUsageError

SERIES_KINDS = ("random", "related", "anti", "ties", "zeros", "zero_vs_random", "const_equal", "const_diff",
                "near_const", "far_from_zero")


def make_series(kind: str, shape: tuple[int, ...], data_range: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of float64 series of one kind (mostly valued in [0, data_range])."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, data_range, shape)
    if kind == "random":
        b = rng.uniform(0.0, data_range, shape)
    elif kind == "related":
        b = np.clip(a + rng.normal(0.0, 0.1 * data_range, shape), 0.0, data_range)
    elif kind == "anti":
        b = data_range - a
    elif kind == "ties":  # a few exact levels: many tied samples and flat stretches
        a = rng.integers(0, 3, shape) * (data_range / 2)
        b = rng.integers(0, 3, shape) * (data_range / 2)
    elif kind == "zeros":
        a, b = np.zeros(shape), np.zeros(shape)
    elif kind == "zero_vs_random":
        a = np.zeros(shape)
        b = rng.uniform(0.0, data_range, shape)
    elif kind == "const_equal":
        a = np.full(shape, rng.uniform(0.0, data_range))
        b = a.copy()
    elif kind == "const_diff":
        a = np.full(shape, rng.uniform(0.0, data_range))
        b = np.full(shape, rng.uniform(0.0, data_range))
    elif kind == "near_const":
        c = rng.uniform(0.0, data_range)
        a = c + 1e-7 * data_range * rng.standard_normal(shape)
        b = c + 1e-7 * data_range * rng.standard_normal(shape)
    elif kind == "far_from_zero":  # a large offset: E[x^2] - E[x]^2 would cancel catastrophically
        offset = 1e3 * data_range
        b = offset + np.clip(a + rng.normal(0.0, 0.1 * data_range, shape), 0.0, data_range)
        a = offset + a
    else:  # pragma: no cover - test bug
        raise AssertionError(kind)
    return a, b


def skimage_1d(a: np.ndarray, b: np.ndarray, **kwargs: object) -> np.ndarray:
    """scikit-image on each pair of 1-D arrays ``a[i, 0]``, ``b[i, 0]``, in float64."""
    assert a.ndim == 3 and a.shape[1] == 1
    return np.array([sk_ssim(a[i, 0].astype(np.float64), b[i, 0].astype(np.float64), **kwargs)
                     for i in range(a.shape[0])])


def tolerance(dtype: torch.dtype, kwargs: dict, kind: str = "random") -> tuple[float, float]:
    """(rtol, atol) against scikit-image in float64 on the same values (the exact SSIM of the maps).

    float64: 1e-10 relative, 1e-12 absolute (for SSIM near 0). On series ~1e3 data ranges from 0,
    scikit-image's own variance ``E[x^2] - E[x]^2`` is off by up to ``1e6 * eps64 / K2**2 ~ 1e-7``
    of the SSIM (ours subtracts the first sample first): that bounds the comparison there.
    float32: 1e-5 relative, 1e-4 absolute (the 2-D tests' float32 tolerance). A float32 local
    variance is rounded by ``~eps32 * data_range**2``, i.e. up to ``eps32 / K2**2 ~ 7e-5`` of a
    window's SSIM: a peaked gaussian (sigma < 1) or a short series of nearly flat windows (one
    value among zeros, averaged over three windows: 3.3e-5 seen) gets near that.
    """
    if dtype == torch.float64:
        return 1e-10, 1e-6 if kind == "far_from_zero" else 1e-12
    return 1e-5, 1e-4


@st.composite
def series_cases(draw: st.DrawFn) -> dict:
    win_size = draw(st.sampled_from([3, 5, 7, 9, 11, None]))
    gaussian = draw(st.booleans())
    sigma = draw(st.sampled_from([0.5, 1.0, 1.5, 2.5]) | st.floats(0.3, 3.0))
    win = effective_win_size(win_size, gaussian, sigma)
    return {
        "shape": (draw(st.integers(1, 4)), 1, draw(st.integers(max(7, win), 200))),
        "kind": draw(st.sampled_from(SERIES_KINDS)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "kwargs": {
            "win_size": win_size,
            "gaussian_weights": gaussian,
            "sigma": sigma,
            "data_range": draw(st.sampled_from([0.5, 1.0, 2.0, 255.0]) | st.floats(1e-2, 1e3)),
            "use_sample_covariance": draw(st.booleans()),
        },
    }


def as_tensors(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, np.ndarray,
                                                                            np.ndarray]:
    """The maps in ``dtype``, and their values back in numpy (float32 values are what is compared)."""
    ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
    return ta, tb, ta.double().numpy(), tb.double().numpy()


# ------------------------------------------------------------------------------------------
# against scikit-image
# ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(case=series_cases())
def test_series_ssim_matches_skimage_1d(case: dict) -> None:
    kwargs, dtype = case["kwargs"], case["dtype"]
    ta, tb, a, b = as_tensors(*make_series(case["kind"], case["shape"], kwargs["data_range"], case["seed"]), dtype)
    got = structural_similarity(ta, tb, **kwargs)
    assert got.dtype == dtype and got.shape == (case["shape"][0],)
    rtol, atol = tolerance(dtype, kwargs, case["kind"])
    np.testing.assert_allclose(got.double().numpy(), skimage_1d(a, b, **kwargs), rtol=rtol, atol=atol)


@settings(max_examples=100, deadline=None)
@given(case=series_cases(), k=st.integers(1, 3), with_moments=st.booleans())
def test_series_ssim_unchecked_with_k_batches_matches_skimage_1d(case: dict, k: int, with_moments: bool) -> None:
    """The randomization engine's path: a 2-D setup from the parameters alone, one (N, 1, T)
    original against a (K, N, 1, T) stack, with or without the original's moments computed once."""
    kwargs, dtype = case["kwargs"], case["dtype"]
    a, _ = make_series(case["kind"], case["shape"], kwargs["data_range"], case["seed"])
    others = [make_series(case["kind"], case["shape"], kwargs["data_range"], case["seed"] + 1 + i)[1]
              for i in range(k)]
    ta, stack, a, stack_values = as_tensors(a, np.stack(others), dtype)
    setup = ssim_setup(**kwargs)
    moments = ssim_reference_moments(ta, setup) if with_moments else None
    got = ssim_unchecked(ta, stack, setup, moments)
    assert got.shape == (k, case["shape"][0]) and got.dtype == dtype
    rtol, atol = tolerance(dtype, kwargs, case["kind"])
    for row, b in zip(got, stack_values):
        np.testing.assert_allclose(row.double().numpy(), skimage_1d(a, b, **kwargs), rtol=rtol, atol=atol)
    # without the K dim: one row
    single = ssim_unchecked(ta, torch.from_numpy(others[0]).to(dtype), setup, moments)
    torch.testing.assert_close(single, got[0], rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    maps=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.just(1), st.integers(3, 12)),
                    elements=st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0)),
    shift=st.integers(-3, 3),
    gaussian=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_series_ssim_matches_skimage_on_adversarial_short_series(
    maps: np.ndarray, shift: int, gaussian: bool, dtype: torch.dtype
) -> None:
    """Element-wise drawn values (ties, zeros, flat stretches) on series barely longer than the window."""
    kwargs = {"win_size": 3, "gaussian_weights": gaussian, "data_range": 1.0}
    ta, tb, a, b = as_tensors(maps, np.roll(maps, shift, axis=-1), dtype)
    rtol, atol = tolerance(dtype, kwargs)
    np.testing.assert_allclose(structural_similarity(ta, tb, **kwargs).double().numpy(), skimage_1d(a, b, **kwargs),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [7, 8, 31, 200])
@pytest.mark.parametrize(
    "kwargs",
    [{"win_size": 3}, {"win_size": 7}, {"win_size": 7, "use_sample_covariance": False},
     {"gaussian_weights": True, "win_size": 7}, {"gaussian_weights": True, "sigma": 0.8},
     {"gaussian_weights": True, "sigma": 1.0, "win_size": 3}, {"gaussian_weights": True, "sigma": 1.5, "win_size": 5}],
)
def test_series_ssim_grid_matches_skimage_1d(dtype: torch.dtype, length: int, kwargs: dict) -> None:
    """A fixed grid of lengths 7..200, both windows (gaussian radius equal to, above and below the crop)."""
    kwargs = {"data_range": 2.0, **kwargs}
    win = effective_win_size(kwargs.get("win_size"), bool(kwargs.get("gaussian_weights")), kwargs.get("sigma", 1.5))
    if win > length:
        pytest.skip("window longer than the series")
    a, b = make_series("related", (3, 1, length), 2.0, seed=length)
    ta, tb, a, b = as_tensors(a - 1.0, b - 1.0, dtype)
    rtol, atol = tolerance(dtype, kwargs)
    np.testing.assert_allclose(structural_similarity(ta, tb, **kwargs).double().numpy(), skimage_1d(a, b, **kwargs),
                               rtol=rtol, atol=atol)
    # one (1, T) pair: a 0-d result, the same number
    single = structural_similarity(ta[0], tb[0], **kwargs)
    assert single.dim() == 0
    np.testing.assert_allclose(single.item(), sk_ssim(a[0, 0], b[0, 0], **kwargs), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------
# defined cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"gaussian_weights": True}, {"win_size": 3, "use_sample_covariance": False}])
@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "const_equal", "near_const", "far_from_zero"])
def test_identical_series_give_exactly_one(dtype: torch.dtype, kwargs: dict, kind: str) -> None:
    a, _ = make_series(kind, (4, 1, 40), 1.0, seed=7)
    ta = torch.from_numpy(a).to(dtype)
    assert torch.equal(structural_similarity(ta, ta.clone(), data_range=1.0, **kwargs), torch.ones(4, dtype=dtype))
    setup = ssim_setup(data_range=1.0, **kwargs)
    got = ssim_unchecked(ta, torch.stack([ta, ta]), setup, ssim_reference_moments(ta, setup))
    assert torch.equal(got, torch.ones(2, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_and_zero_series(dtype: torch.dtype) -> None:
    """C1, C2 > 0 define SSIM of flat series: equal constants give 1, different ones skimage's value."""
    zeros = torch.zeros(2, 1, 20, dtype=dtype)
    assert torch.equal(structural_similarity(zeros, zeros.clone(), data_range=1.0), torch.ones(2, dtype=dtype))
    const = torch.full((2, 1, 20), 0.3, dtype=dtype)
    assert torch.equal(structural_similarity(const, const.clone(), data_range=1.0), torch.ones(2, dtype=dtype))
    rtol, atol = tolerance(dtype, {})
    for a, b in ((zeros, const), (const, torch.full_like(const, 0.9)), (zeros, torch.linspace(0, 1, 20, dtype=dtype)
                                                                         .expand(2, 1, 20).contiguous())):
        np.testing.assert_allclose(structural_similarity(a, b, data_range=1.0).double().numpy(),
                                   skimage_1d(a.double().numpy(), b.double().numpy(), data_range=1.0),
                                   rtol=rtol, atol=atol)


def test_series_far_from_zero_subtract_their_first_sample() -> None:
    """The shift that keeps the variance exact is each map's first sample, for series as for images:
    float32 series at 1000 +- 1e-3 then keep their SSIM, where E[x^2] - E[x]^2 in float32 loses it."""
    rng = np.random.default_rng(11)
    a = 1000.0 + 1e-3 * rng.standard_normal((3, 1, 60))
    b = a + 2e-4 * rng.standard_normal((3, 1, 60))
    ta, tb, a, b = as_tensors(a, b, torch.float32)
    setup = ssim_setup(data_range=1e-2)
    moments = ssim_reference_moments(ta, setup)
    assert torch.equal(moments.shift, ta[..., :1, :1]) and torch.equal(moments.centred, ta - ta[..., :1, :1])
    exact = skimage_1d(a, b, data_range=1e-2)  # float64 on the float32 values: no cancellation at this size
    assert (exact < 0.99).all() and (exact > 0.1).all()  # the structure term matters here
    np.testing.assert_allclose(structural_similarity(ta, tb, data_range=1e-2).numpy(), exact, rtol=1e-4, atol=1e-5)


def test_height_one_setup_is_1d_and_other_heights_keep_the_2d_setup() -> None:
    setup = ssim_setup(win_size=5, data_range=1.0)
    assert setup.ndim == 2 and setup.cov_norm == 25 / 24
    one_d = setup.for_maps(1)
    assert one_d.ndim == 1 and one_d.cov_norm == 5 / 4 and one_d.pad == setup.pad and one_d.c1 == setup.c1
    assert setup.for_maps(2) is setup and setup.for_maps(9) is setup and one_d.for_maps(1) is one_d
    assert one_d.for_maps(7) == setup
    assert ssim_setup(win_size=5, data_range=1.0, use_sample_covariance=False).for_maps(1).cov_norm == 1.0


def test_meta_series_results_stay_on_meta() -> None:
    a = torch.empty(3, 1, 30, device="meta")
    for kwargs in ({}, {"gaussian_weights": True}, {"gaussian_weights": True, "win_size": 3}):
        got = structural_similarity(a, a, data_range=1.0, **kwargs)
        assert got.device.type == "meta" and got.shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_series_match_skimage(dtype: torch.dtype) -> None:
    a, b = make_series("related", (4, 1, 150), 1.0, seed=3)
    ta, tb, a, b = as_tensors(a, b, dtype)
    for kwargs in ({"data_range": 1.0}, {"data_range": 1.0, "gaussian_weights": True},
                   {"data_range": 1.0, "gaussian_weights": True, "win_size": 5}):
        got = structural_similarity(ta.cuda(), tb.cuda(), **kwargs)
        assert got.device.type == "cuda" and got.dtype == dtype
        np.testing.assert_allclose(got.double().cpu().numpy(), skimage_1d(a, b, **kwargs), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# window errors
# ------------------------------------------------------------------------------------------


def test_series_shorter_than_the_window_are_refused_with_advice() -> None:
    a = torch.rand(2, 1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyUsageError, match=r"^maps are 1x6: 1-D signals of 6 sample\(s\), compared along their "
                                                 r"length, and shorter than the 1-D SSIM window of 7 samples "
                                                 r"\(win_size=7\)\. Pass a smaller odd win_size \(3 to 5\)"):
        structural_similarity(a, a, data_range=1.0)
    with pytest.raises(SaliencyUsageError, match=r"1-D SSIM window of 11 samples"):
        structural_similarity(a, a, data_range=1.0, gaussian_weights=True)  # win_size None: 11 for sigma 1.5
    structural_similarity(a, a, data_range=1.0, win_size=5)  # the advice works
    structural_similarity(a[..., :5], a[..., :5], data_range=1.0, win_size=5)  # exactly the window


def test_check_ssim_window_on_series_names_the_1d_window_and_the_preset() -> None:
    check_ssim_window(1, 5, 5, method="saliency", preset="sam2020")  # only the length must hold the window
    check_ssim_window(1, 64, 5)
    with pytest.raises(SaliencyUsageError) as info:
        check_ssim_window(1, 4, 5, method="saliency", preset="sam2020", hint="Or use spearman.")
    message = str(info.value)
    assert message.startswith("saliency maps are 1x4: 1-D signals of 4 sample(s)")
    assert "1-D window of 5 samples of preset 'sam2020'" in message
    assert "dataclasses.replace(preset, ssim=dataclasses.replace(preset.ssim, win_size=3))" in message
    assert "upsample" not in message and "interpolate" not in message and message.endswith(" Or use spearman.")
    # the advice applies: a preset with that window accepts the series
    from pytest_saliency.maps.postprocess import PRESETS

    preset = dataclasses.replace(PRESETS["sam2020"], ssim=dataclasses.replace(PRESETS["sam2020"].ssim, win_size=3))
    check_ssim_window(1, 4, preset.ssim.win_size, method="saliency", preset=preset.name)


@pytest.mark.parametrize("length", [1, 2])
def test_series_too_short_for_any_window_get_no_win_size_advice(length: int) -> None:
    with pytest.raises(SaliencyUsageError, match=rf"No SSIM window fits 1x{length} maps") as info:
        check_ssim_window(1, length, 5, method="saliency", preset="sam2020")
    assert "win_size" not in str(info.value) and "spearman" in str(info.value)


def test_maps_of_height_two_keep_the_2d_window_rule() -> None:
    with pytest.raises(SaliencyUsageError, match=r"No SSIM window fits 2x64 maps"):
        check_ssim_window(2, 64, 5)
    with pytest.raises(SaliencyUsageError, match=r"^maps are 4x64, smaller than the 5x5 SSIM window"):
        check_ssim_window(4, 64, 5)
