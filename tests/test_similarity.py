"""Cross-checks of pytest_saliency.compare.similarity against scikit-image and scipy.

The torch implementations must be drop-in replacements for the references the papers used, so
every test compares against the reference itself rather than against hand-computed numbers.
Map *values* come from a seeded numpy generator (drawn seed + drawn "kind" of map), which keeps
hypothesis fast on 2-D maps while still shrinking to a small failing configuration.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.metrics import structural_similarity as sk_ssim

from pytest_saliency.compare.similarity import pearson, rankdata, spearman, structural_similarity
from pytest_saliency.exceptions import SaliencyUsageError

SKIMAGE_TRUNCATE = 3.5
MAP_KINDS = ("random", "related", "anti", "const_equal", "const_diff", "mixed", "near_const")


def effective_win_size(win_size: int | None, gaussian: bool, sigma: float) -> int:
    """scikit-image's window-size rule (the crop size) for ``win_size=None``."""
    if win_size is not None:
        return win_size
    return 2 * int(SKIMAGE_TRUNCATE * sigma + 0.5) + 1 if gaussian else 7


def make_maps(kind: str, shape: tuple[int, ...], data_range: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of float64 maps of one kind, valued in [0, data_range] (near_const: +-1e-7 noise)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, data_range, shape)
    if kind == "random":
        b = rng.uniform(0.0, data_range, shape)
    elif kind == "related":
        b = np.clip(a + rng.normal(0.0, 0.1 * data_range, shape), 0.0, data_range)
    elif kind == "anti":
        b = data_range - a
    elif kind == "const_equal":
        a = np.full(shape, rng.uniform(0.0, data_range))
        b = a.copy()
    elif kind == "const_diff":
        a = np.full(shape, rng.uniform(0.0, data_range))
        b = np.full(shape, rng.uniform(0.0, data_range))
    elif kind == "mixed":
        a = np.full(shape, rng.uniform(0.0, data_range))
        b = rng.uniform(0.0, data_range, shape)
    elif kind == "near_const":
        c = rng.uniform(0.0, data_range)
        a = c + 1e-7 * rng.standard_normal(shape)
        b = c + 1e-7 * rng.standard_normal(shape)
    else:  # pragma: no cover - test bug
        raise AssertionError(kind)
    return a, b


def skimage_reference(a: np.ndarray, b: np.ndarray, **kwargs: object) -> np.ndarray:
    """skimage SSIM map by map (float64 accumulation of the mean, as skimage does)."""
    return np.array([sk_ssim(a[i], b[i], **kwargs) for i in range(a.shape[0])], dtype=np.float64)


@st.composite
def ssim_cases(draw: st.DrawFn) -> dict:
    win_size = draw(st.sampled_from([3, 5, 7, 9, None]))
    gaussian = draw(st.booleans())
    sigma = draw(st.floats(0.3, 2.5))
    win = effective_win_size(win_size, gaussian, sigma)
    height = win + draw(st.integers(0, 6))  # includes maps exactly the window size, non-square
    width = win + draw(st.integers(0, 6))
    return {
        "shape": (draw(st.integers(1, 4)), height, width),
        "kind": draw(st.sampled_from(MAP_KINDS)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "kwargs": {
            "win_size": win_size,
            "gaussian_weights": gaussian,
            "sigma": sigma,
            "data_range": draw(st.sampled_from([0.5, 1.0, 2.0, 255.0]) | st.floats(1e-2, 1e3)),
            "K1": draw(st.sampled_from([0.01]) | st.floats(1e-4, 0.1)),
            "K2": draw(st.sampled_from([0.03]) | st.floats(1e-4, 0.1)),
            "use_sample_covariance": draw(st.booleans()),
        },
    }


# ------------------------------------------------------------------------------------------
# SSIM vs scikit-image
# ------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(case=ssim_cases())
def test_ssim_float64_matches_skimage(case: dict) -> None:
    kwargs = case["kwargs"]
    a, b = make_maps(case["kind"], case["shape"], kwargs["data_range"], case["seed"])
    got = structural_similarity(torch.from_numpy(a), torch.from_numpy(b), **kwargs)
    assert got.dtype == torch.float64 and got.shape == (case["shape"][0],)
    np.testing.assert_allclose(got.numpy(), skimage_reference(a, b, **kwargs), rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(case=ssim_cases(), k=st.integers(1, 3))
def test_ssim_against_several_batches_with_reference_moments_matches_skimage(case: dict, k: int) -> None:
    """The engine's path: one (N, H, W) original against a (K, N, H, W) stack, moments computed once."""
    from pytest_saliency.compare.similarity import ssim_reference_moments, ssim_setup, ssim_unchecked

    kwargs = case["kwargs"]
    a, _ = make_maps(case["kind"], case["shape"], kwargs["data_range"], case["seed"])
    others = [make_maps(case["kind"], case["shape"], kwargs["data_range"], case["seed"] + 1 + i)[1] for i in range(k)]
    setup = ssim_setup(**kwargs)
    ta = torch.from_numpy(a)
    got = ssim_unchecked(ta, torch.from_numpy(np.stack(others)), setup, ssim_reference_moments(ta, setup))
    assert got.shape == (k, case["shape"][0])
    for row, b in zip(got, others):
        np.testing.assert_allclose(row.numpy(), skimage_reference(a, b, **kwargs), rtol=0, atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(case=ssim_cases())
def test_ssim_float32_matches_skimage(case: dict) -> None:
    """float32 maps: within 1e-4 of scikit-image.

    Two references. (1) skimage on the same float32 values in float64, i.e. the exact SSIM of
    these maps: always within 1e-4. (2) skimage run in float32: its E[x^2] - E[x]^2 variance
    loses ~1e-4 of SSIM to rounding on nearly-flat maps (``near_const``), where our
    shift-invariant variance stays exact, so that comparison is made on the other kinds.
    """
    kwargs = case["kwargs"]
    a, b = make_maps(case["kind"], case["shape"], kwargs["data_range"], case["seed"])
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    got = structural_similarity(torch.from_numpy(a32), torch.from_numpy(b32), **kwargs)
    assert got.dtype == torch.float32
    exact = skimage_reference(a32.astype(np.float64), b32.astype(np.float64), **kwargs)
    np.testing.assert_allclose(got.numpy(), exact, rtol=0, atol=1e-4)
    if case["kind"] != "near_const":
        np.testing.assert_allclose(got.numpy(), skimage_reference(a32, b32, **kwargs), rtol=0, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    maps=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(3, 6), st.integers(3, 6)),
        elements=st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0),
    ),
    shift=st.integers(-2, 2),
    gaussian=st.booleans(),
)
def test_ssim_matches_skimage_on_adversarial_small_maps(maps: np.ndarray, shift: int, gaussian: bool) -> None:
    """Element-wise drawn values (ties, zeros, flat patches) on maps barely larger than the window."""
    b = np.roll(maps, shift, axis=-1)
    kwargs = {"win_size": 3, "gaussian_weights": gaussian, "data_range": 1.0}
    got = structural_similarity(torch.from_numpy(maps), torch.from_numpy(b), **kwargs)
    np.testing.assert_allclose(got.numpy(), skimage_reference(maps, b, **kwargs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_equal_constant_maps_is_exactly_one(dtype: torch.dtype) -> None:
    a = torch.full((3, 9, 11), 0.7, dtype=dtype)
    got = structural_similarity(a, a.clone(), data_range=1.0)
    assert torch.equal(got, torch.ones(3, dtype=dtype))


def test_ssim_anti_correlated_maps_are_negative() -> None:
    a = np.random.default_rng(0).uniform(size=(2, 16, 16))
    b = 1.0 - a
    got = structural_similarity(torch.from_numpy(a), torch.from_numpy(b), data_range=1.0)
    ref = skimage_reference(a, b, data_range=1.0)
    assert (ref < 0).all()
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)


def test_ssim_single_map_pair_gives_0d() -> None:
    a = np.random.default_rng(1).uniform(size=(12, 10))
    b = np.random.default_rng(2).uniform(size=(12, 10))
    got = structural_similarity(torch.from_numpy(a), torch.from_numpy(b), data_range=1.0)
    assert got.dim() == 0
    assert got.item() == pytest.approx(sk_ssim(a, b, data_range=1.0), abs=1e-6)


def test_ssim_default_gaussian_window_is_skimage_default() -> None:
    """win_size=None with gaussian weights is 11 for sigma=1.5, like skimage (Wang et al. 2004)."""
    a = np.random.default_rng(3).uniform(size=(1, 11, 13))
    b = np.random.default_rng(4).uniform(size=(1, 11, 13))
    got = structural_similarity(torch.from_numpy(a), torch.from_numpy(b), gaussian_weights=True, data_range=1.0)
    np.testing.assert_allclose(
        got.numpy(), skimage_reference(a, b, gaussian_weights=True, data_range=1.0), rtol=0, atol=1e-6
    )
    with pytest.raises(SaliencyUsageError, match="smaller than the 11x11 SSIM window"):
        structural_similarity(
            torch.from_numpy(a[:, :10]), torch.from_numpy(b[:, :10]), gaussian_weights=True, data_range=1.0
        )


#: The last version of the module before maps of height 1 became 1-D signals: the 2-D path must
#: give bit-for-bit the results it gave.
BEFORE_1D = "eae59bf679236b498b12298f73fde758f631bb31"


def _similarity_before_1d(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """``pytest_saliency/compare/similarity.py`` at :data:`BEFORE_1D`, imported as a sibling module."""
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE_1D}:pytest_saliency/compare/similarity.py"], cwd=root, capture_output=True,
            text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {BEFORE_1D[:7]})")
    name = "pytest_saliency.compare.similarity_before_1d"
    path = tmp_path / "similarity_before_1d.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)  # its relative imports resolve in pytest_saliency.compare
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_of_2d_maps_is_bit_for_bit_what_it_was_before_1d_maps(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Maps with H >= 2 keep the 2-D SSIM unchanged: same setup, same bits, every path and window."""
    from pytest_saliency.compare import similarity as new

    old = _similarity_before_1d(monkeypatch, tmp_path)
    configs = [
        {}, {"win_size": 3}, {"win_size": 5, "use_sample_covariance": False}, {"gaussian_weights": True},
        {"gaussian_weights": True, "win_size": 3}, {"gaussian_weights": True, "win_size": 7, "sigma": 0.6},
        {"gaussian_weights": True, "win_size": 5, "sigma": 2.5, "K1": 0.02, "K2": 0.05},
    ]
    for index, config in enumerate(configs):
        kwargs = {"data_range": 2.0, **config}
        win = effective_win_size(config.get("win_size"), bool(config.get("gaussian_weights")), config.get("sigma", 1.5))
        for shape in ((3, win, win), (2, win + 1, win + 6), (2, 2 * win + 3, win + 2)):
            a, b = make_maps("related", shape, 2.0, seed=index)
            ta, tb = torch.from_numpy(a - 1.0).to(dtype), torch.from_numpy(b - 1.0).to(dtype)
            assert torch.equal(new.structural_similarity(ta, tb, **kwargs), old.structural_similarity(ta, tb, **kwargs))
            setup_new, setup_old = new.ssim_setup(**kwargs), old.ssim_setup(**kwargs)
            assert setup_new.for_maps(shape[1]) is setup_new and setup_new.ndim == 2
            for field in ("win_size", "pad", "radius", "cov_norm", "c1", "c2"):
                assert getattr(setup_new, field) == getattr(setup_old, field)
            stack = torch.stack([tb, tb.flip(-1), ta * 0.5])  # K = 3 batches against one original
            got = new.ssim_unchecked(ta, stack.clone(), setup_new, new.ssim_reference_moments(ta, setup_new))
            want = old.ssim_unchecked(ta, stack.clone(), setup_old, old.ssim_reference_moments(ta, setup_old))
            assert torch.equal(got, want)
            single = new.ssim_unchecked(ta, tb.clone(), setup_new)
            assert torch.equal(single, old.ssim_unchecked(ta, tb.clone(), setup_old))


# ------------------------------------------------------------------------------------------
# correlation vs scipy
# ------------------------------------------------------------------------------------------

# Many ties and zeros; exact quarters so scipy and torch see the same values without rounding.
TIED_VALUES = st.integers(-3, 3).map(float) | st.integers(-40, 40).map(lambda k: k / 4)
SPREAD_VALUES = st.floats(-1e3, 1e3).map(lambda v: round(v, 3))


def row_batches(elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 20)), elements=elements)


def scipy_rows(fn, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scipy per row; it warns (ConstantInputWarning) on constant rows, which is expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([fn(x[i], y[i]).statistic for i in range(x.shape[0])], dtype=np.float64)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), elements=st.sampled_from([TIED_VALUES, SPREAD_VALUES]))
def test_pearson_and_spearman_match_scipy(data: st.DataObject, elements: st.SearchStrategy[float]) -> None:
    x = data.draw(row_batches(elements), label="x")
    y = data.draw(hnp.arrays(np.float64, x.shape, elements=elements), label="y")
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    got_p, got_s = pearson(tx, ty), spearman(tx, ty)
    assert got_p.shape == got_s.shape == (x.shape[0],)
    np.testing.assert_allclose(got_p.numpy(), scipy_rows(scipy.stats.pearsonr, x, y), rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_s.numpy(), scipy_rows(scipy.stats.spearmanr, x, y), rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(x=row_batches(TIED_VALUES), data=st.data())
def test_correlation_float32_and_multi_dim_rows(x: np.ndarray, data: st.DataObject) -> None:
    """float32 stays float32 (close to scipy's float64 answer); (N, ...) rows are flattened."""
    y = data.draw(hnp.arrays(np.float64, x.shape, elements=TIED_VALUES), label="y")
    ref_p, ref_s = scipy_rows(scipy.stats.pearsonr, x, y), scipy_rows(scipy.stats.spearmanr, x, y)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    for fn, ref in ((pearson, ref_p), (spearman, ref_s)):
        got = fn(tx, ty)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-5)
        # (N, D) -> (N, 1, D): same rows after flattening
        np.testing.assert_allclose(fn(tx[:, None, :], ty[:, None, :]).numpy(), ref, rtol=0, atol=1e-5)


def test_constant_rows_give_nan_without_warning() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.1, 0.1, 0.1, 0.1], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our code must stay silent
        got_p, got_s = pearson(x, y), spearman(x, y)
    for got, fn in ((got_p, scipy.stats.pearsonr), (got_s, scipy.stats.spearmanr)):
        ref = scipy_rows(fn, x.double().numpy(), y.double().numpy())
        assert torch.isnan(got).tolist() == [False, True, True, True] == np.isnan(ref).tolist()
        assert got[0].item() == pytest.approx(ref[0], abs=1e-6)
    # the mean of identical floats need not equal them; a constant row is still NaN, never +-1
    assert torch.isnan(pearson(torch.full((7,), 0.1, dtype=torch.float64), torch.arange(7.0).double()))


def test_single_pair_gives_0d_and_two_values_give_exactly_one() -> None:
    got = pearson(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 2.0]))
    assert got.dim() == 0
    assert pearson(torch.tensor([0.3, 0.1]), torch.tensor([7.0, -2.0])).item() == 1.0
    assert spearman(torch.tensor([0.3, 0.1]), torch.tensor([-2.0, 7.0])).item() == -1.0


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from([np.float64, np.float32, np.int64]),
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
        elements=st.integers(-3, 3),
    )
    | hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 30)), elements=TIED_VALUES | SPREAD_VALUES)
)
def test_rankdata_matches_scipy(x: np.ndarray) -> None:
    got = rankdata(torch.from_numpy(x))
    ref = scipy.stats.rankdata(x, method="average", axis=-1)
    assert got.dtype == (torch.float64 if x.dtype == np.int64 else torch.from_numpy(x).dtype)
    np.testing.assert_array_equal(got.double().numpy(), ref)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def _maps(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _with_nan(count: int) -> torch.Tensor:
    x = _maps(2, 8, 8)
    x.view(-1)[:count] = float("nan")
    return x


M = _maps(2, 8, 8)
SSIM_ERRORS = [
    ((M.numpy(), M), {}, "a must be a torch.Tensor"),
    ((M, _maps(2, 8, 9)), {}, "identical shapes"),
    ((_maps(2, 1, 8, 8), _maps(2, 1, 8, 8)), {}, "2-D single-channel maps"),
    ((_maps(8), _maps(8)), {}, "2-D single-channel maps"),
    ((M, M), {"win_size": 4}, "odd integer >= 3"),
    ((M, M), {"win_size": 1}, "odd integer >= 3"),
    ((M, M), {"win_size": 7.0}, "odd integer >= 3"),
    ((_maps(2, 5, 9), _maps(2, 5, 9)), {}, r"^maps are 5x9, smaller than the 7x7 SSIM window \(win_size=7\)"),
    ((_maps(2, 9, 5), _maps(2, 9, 5)), {"win_size": 7}, r"smaller odd win_size \(3 to 5\)"),
    ((_maps(2, 6, 6), _maps(2, 6, 6)), {"win_size": 7}, r"smaller odd win_size \(3 to 5\)"),
    # no odd window >= 3 fits: the only advice is to resize (or use a metric without a window)
    ((_maps(2, 2, 2), _maps(2, 2, 2)), {}, r"^maps are 2x2, .*No SSIM window fits 2x2 maps.*3x3 pixels(?!.*win_size \()"),
    ((_maps(2, 2, 9), _maps(2, 2, 9)), {"win_size": 3}, r"No SSIM window fits 2x9 maps"),
    # maps of height 1 are 1-D signals: only their length must hold the window (tests/test_similarity_1d.py)
    ((_maps(2, 1, 9), _maps(2, 1, 9)), {"win_size": 11},
     r"^maps are 1x9: 1-D signals .*1-D SSIM window of 11 samples .*win_size \(3 to 9\)"),
    ((_maps(2, 1, 2), _maps(2, 1, 2)), {"win_size": 3}, r"No SSIM window fits 1x2 maps"),
    ((M.long(), M.long()), {}, "float32 or float64"),
    ((M.half(), M.half()), {}, "float32 or float64"),
    ((M, M.float()), {}, "must match"),
    ((_with_nan(3), M), {}, "a contains 3 NaN or infinite value"),
    ((M, M.clone().fill_(float("inf"))), {}, "b contains 128 NaN or infinite value"),
    ((M, M), {"data_range": None}, r"data_range is required.*data_range=1\.0.*data_range=2\.0"),
    ((M, M), {"data_range": 0.0}, "data_range must be a finite number with 0 < data_range"),
    ((M, M), {"data_range": -1.0}, "data_range must be a finite number with 0 < data_range"),
    ((M, M), {"data_range": float("nan")}, "data_range must be a finite number with 0 < data_range"),
    ((M, M), {"K1": 0.0}, "K1 must be a finite number with 0 < K1"),
    ((M, M), {"K2": -0.03}, "K2 must be a finite number with 0 < K2"),
    ((M, M), {"gaussian_weights": True, "sigma": 0.0, "win_size": 3}, "sigma must be a finite number with 0 < sigma"),
    ((_maps(0, 8, 8), _maps(0, 8, 8)), {}, "empty batch"),
    ((M, M.to("meta")), {}, "a is on cpu but b is on meta"),
]


@pytest.mark.parametrize(("args", "kwargs", "match"), SSIM_ERRORS)
def test_ssim_errors(args: tuple, kwargs: dict, match: str) -> None:
    kwargs = {"data_range": 1.0, **kwargs}
    with pytest.raises(SaliencyUsageError, match=match):
        structural_similarity(*args, **kwargs)


V = _maps(3, 5)
CORRELATION_ERRORS = [
    ((V, [1.0]), "b must be a torch.Tensor"),
    ((V, _maps(3, 6)), "identical shapes"),
    ((_with_nan(2), _maps(2, 8, 8)), "a contains 2 NaN or infinite value"),
    ((V, V.clone().fill_(float("-inf"))), "b contains 15 NaN or infinite value"),
    ((_maps(3, 1), _maps(3, 1)), "at least two values per row, got 1"),
    ((torch.tensor(1.0), torch.tensor(2.0)), "at least two values per row, got 0-d"),
    ((_maps(0, 4), _maps(0, 4)), "empty batch"),
    ((V.to(torch.complex64), V.to(torch.complex64)), "complex"),
    ((V, V.to("meta")), "a is on cpu but b is on meta"),
]


@pytest.mark.parametrize("fn", [pearson, spearman])
@pytest.mark.parametrize(("args", "match"), CORRELATION_ERRORS)
def test_correlation_errors(fn, args: tuple, match: str) -> None:
    with pytest.raises(SaliencyUsageError, match=match):
        fn(*args)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.tensor([1.0, float("nan")]), "x contains 1 NaN"),
        (torch.tensor(1.0), "at least a 1-D tensor"),
        ([1.0, 2.0], "needs a torch.Tensor"),
    ],
)
def test_rankdata_errors(x: object, match: str) -> None:
    with pytest.raises(SaliencyUsageError, match=match):
        rankdata(x)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        structural_similarity(M, M)


def test_check_ssim_window_names_the_method_and_the_preset_and_appends_the_hint() -> None:
    """The one SSIM size check: structural_similarity's argument wording, or a check's (method, preset, hint)."""
    from pytest_saliency.compare.similarity import check_ssim_window

    check_ssim_window(7, 9, 7)
    check_ssim_window(3, 3, 3, method="saliency", preset="sam2020")
    with pytest.raises(SaliencyUsageError, match=r"^maps are 6x9, smaller than the 7x7 SSIM window \(win_size=7\)\. "
                                                 r"Either resize .*pass a smaller odd win_size \(3 to 5\)\.$"):
        check_ssim_window(6, 9, 7)
    with pytest.raises(SaliencyUsageError,
                       match=r"^saliency maps are 4x4, smaller than the SSIM window \(5x5\) of preset 'sam2020'\. "
                             r"Either resize .*win_size=3\)\)\. Or use spearman\.$"):
        check_ssim_window(4, 4, 5, method="saliency", preset="sam2020", hint="Or use spearman.")


# ------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------


def test_meta_device_results_stay_on_meta() -> None:
    """Shape/device propagation without data: meta tensors go through every code path."""
    a = torch.empty(3, 12, 12, device="meta")
    for kwargs in ({}, {"gaussian_weights": True}, {"gaussian_weights": True, "win_size": 3}):
        got = structural_similarity(a, a, data_range=1.0, **kwargs)
        assert got.device.type == "meta" and got.shape == (3,)
    for fn in (pearson, spearman):
        got = fn(a, a)
        assert got.device.type == "meta" and got.shape == (3,)
    assert rankdata(a).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_results_stay_on_device_and_match_cpu(dtype: torch.dtype) -> None:
    a, b = make_maps("related", (4, 20, 17), 1.0, seed=5)
    ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-6
    for kwargs in ({}, {"gaussian_weights": True}, {"gaussian_weights": True, "win_size": 5}):
        cpu = structural_similarity(ta, tb, data_range=1.0, **kwargs)
        gpu = structural_similarity(ta.cuda(), tb.cuda(), data_range=1.0, **kwargs)
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=tol)
    for fn in (pearson, spearman):
        gpu = fn(ta.cuda(), tb.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), fn(ta, tb), rtol=0, atol=tol)
    assert rankdata(ta.cuda()).device.type == "cuda"


def test_ssim_of_maps_that_require_gradients_is_a_detached_measurement() -> None:
    a = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = (a * 0.5 + 0.25).detach().requires_grad_(True)
    got = structural_similarity(a, b, data_range=1.0)
    assert not got.requires_grad
    torch.testing.assert_close(got, structural_similarity(a.detach(), b.detach(), data_range=1.0), rtol=0, atol=0)
