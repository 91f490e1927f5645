"""Batched map similarity in torch: SSIM (scikit-image semantics), Pearson and Spearman.

Why a torch re-implementation instead of calling scikit-image / scipy per map: the checks compare
hundreds of saliency maps, often on a GPU, and a Python loop with a device-to-host copy per map
dominates the run time. Every function here is fully batched (no loop over maps), computes on the
input's device in the input's floating dtype, and is cross-checked against the reference
implementations in ``tests/test_similarity.py``:

* :func:`structural_similarity` equals ``skimage.metrics.structural_similarity`` per map (2-D,
  ``channel_axis=None``) to 1e-6 in float64 and 1e-4 in float32; maps of height 1 (sequences and
  feature vectors, (N, 1, T)) are 1-D signals, compared as skimage compares 1-D arrays (a window of
  ``win_size`` samples along their length; ``tests/test_similarity_1d.py``);
* :func:`pearson` equals ``scipy.stats.pearsonr(...).statistic`` per row;
* :func:`spearman` equals ``scipy.stats.spearmanr(...).statistic`` per row, ties included;
* :func:`rankdata` equals ``scipy.stats.rankdata(..., method="average")`` along the last dim.

Edge cases are defined rather than left to chance:

* NaN or infinite values in any input raise :class:`SaliencyUsageError` (a similarity of a
  broken map is meaningless, and a silent NaN would make a check pass or fail for no reason).
* A constant row has no correlation: :func:`pearson` and :func:`spearman` return NaN for that row
  (scipy does the same) and never raise or warn; use ``torch.isnan`` on the result to find them.
* SSIM of constant maps is well defined because ``C1, C2 > 0``: two equal constants give 1.0.

This module imports torch at the top; it is only ever imported lazily, after torch is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F

from ..core.integrity import short_usage_errors
from ..core.validation import check_finite, check_number, is_count
from ..exceptions import SaliencyUsageError

__all__ = ["pearson", "rankdata", "spearman", "structural_similarity"]

#: scikit-image builds its gaussian SSIM window with ``scipy.ndimage.gaussian_filter(truncate=3.5)``
#: so that the default ``sigma=1.5`` gives the 11-tap window of Wang et al. (2004).
SKIMAGE_GAUSSIAN_TRUNCATE = 3.5

_SSIM_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse NaN / inf, naming the argument and how many values. Meta tensors pass: they carry
    no data, and every function here propagates their shapes."""
    check_finite(
        x, name, plural=False, allow_meta=True,
        hint="Similarity of a map with missing values is undefined; fix the map pipeline (e.g. a "
             "division by a zero maximum during normalization) or replace them explicitly with "
             f"torch.nan_to_num({name}) if that is really intended.",
    )


def _validate_array_pair(
    a: object,
    b: object,
    *,
    names: tuple[str, str] = ("a", "b"),
    expected: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks shared by every pair-similarity: tensors, identical shape, one device, finite values.

    ``expected`` describes the accepted shapes in the error messages (e.g. "(N, H, W) or (H, W)").
    Dtype and ndim policies differ between SSIM and correlation, so the callers check those.
    Looser than the metric registry's ``_validate_map_batches`` (:mod:`.metrics`) because these
    functions follow their scipy/scikit-image counterparts: a single unbatched pair, integer data
    (correlations) and meta tensors (shapes propagate) are accepted, and nothing is flattened.
    """
    na, nb = names
    for value, name in ((a, na), (b, nb)):
        if not isinstance(value, torch.Tensor):
            raise SaliencyUsageError(
                f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}. "
                f"Convert with torch.as_tensor({name}, dtype=torch.float64)."
            )
    a, b = cast(torch.Tensor, a), cast(torch.Tensor, b)
    if a.shape != b.shape:
        raise SaliencyUsageError(
            f"{na} and {nb} must have identical shapes {expected}, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}. Compare maps produced by the same pipeline (same size, same batch); "
            "resize one to the other's size before comparing."
        )
    if a.device != b.device:
        raise SaliencyUsageError(
            f"{na} is on {a.device} but {nb} is on {b.device}. Move both to one device, e.g. "
            f"{nb} = {nb}.to({na}.device)."
        )
    for value, name in zip((a, b), names):
        if value.is_complex():
            raise SaliencyUsageError(
                f"{name} is complex ({value.dtype}); similarities are defined for real maps. "
                f"Pass {name}.abs() or {name}.real explicitly."
            )
        _check_finite(value, name)
    return a, b


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------


def _gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter``, built the same way (in float64).

    scipy: ``x = arange(-radius, radius + 1); phi = exp(-0.5 / sigma**2 * x**2); phi / phi.sum()``.
    """
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _reflect_index(start: int, stop: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices ``start..stop-1`` folded into ``[0, size)`` like ``scipy.ndimage`` ``mode='reflect'``.

    scipy's 'reflect' is the half-sample symmetric extension ``(d c b a | a b c d | d c b a)``,
    repeated with period ``2 * size`` when the filter is wider than the map. torch's own 'reflect'
    padding is a different rule (scipy's 'mirror') and cannot pad by more than the map size.
    """
    idx = torch.arange(start, stop, device=device) % (2 * size)
    return torch.where(idx >= size, 2 * size - 1 - idx, idx)


def _valid_filter(stack: torch.Tensor, setup: SSIMSetup) -> torch.Tensor:
    """Separable filter of (..., H, W) maps, evaluated only where skimage keeps the result.

    With a 1-D setup (``setup.ndim == 1``, for maps of height 1) only the last axis is filtered
    and cropped, as skimage does for 1-D arrays; everything below then applies to columns only.

    skimage filters the whole map (scipy ``mode='reflect'``) and then crops ``pad = (win_size -
    1) // 2`` pixels from every border before averaging. Each kept output pixel only needs input
    pixels within the kernel radius ``r``, so we gather rows/cols ``[pad - r, size - pad + r)``
    (reflected where that leaves the map, which happens only when ``r > pad``) and run a 'valid'
    filter: exactly the cropped region, without computing the border that is thrown away.
    The uniform window is a box filter: sums over ``unfold`` windows, along columns then rows,
    which on the CPU beats ``avg_pool2d`` and two single-channel convolutions on single-channel
    maps (same result to float rounding). The gaussian one runs as two 1-D convolutions, rows
    then columns, in scipy's axis order.
    """
    pad, radius, two_d = setup.pad, setup.radius, setup.ndim == 2
    if setup.kernel is None:
        side = setup.win_size
        sums = stack.unfold(-1, side, 1).sum(-1)
        return sums.unfold(-2, side, 1).sum(-1) / (side * side) if two_d else sums / side
    height, width = stack.shape[-2:]
    if radius != pad:
        if two_d:
            stack = stack.index_select(-2, _reflect_index(pad - radius, height - pad + radius, height, stack.device))
        stack = stack.index_select(-1, _reflect_index(pad - radius, width - pad + radius, width, stack.device))
    k = setup.kernel.to(dtype=stack.dtype, device=stack.device)
    lead = stack.shape[:-2]
    out = stack.reshape(-1, 1, *stack.shape[-2:])
    if two_d:
        out = F.conv2d(out, k.view(1, 1, -1, 1))
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    return out.reshape(*lead, *out.shape[-2:])


def _cov_norm(win_size: int, ndim: int, use_sample_covariance: bool) -> float:
    """skimage's (co)variance factor: ``NP / (NP - 1)`` with ``NP = win_size ** ndim``, or 1."""
    num_px = win_size**ndim  # for either window
    return num_px / (num_px - 1) if use_sample_covariance else 1.0


@dataclass(frozen=True)
class SSIMSetup:
    """Validated SSIM parameters, resolved once for many comparisons (see :func:`ssim_setup`).

    ``ndim`` is the number of filtered axes: 2 for (H, W) maps, 1 for maps of height 1, which are
    1-D signals compared along their length (a window of ``win_size`` samples, ``NP = win_size``).
    :func:`ssim_setup` makes a 2-D setup; :meth:`for_maps` gives the one that fits given maps, and
    :func:`ssim_reference_moments` and :func:`ssim_unchecked` apply it themselves.
    """

    win_size: int
    pad: int
    radius: int
    kernel: torch.Tensor | None  # float64 1-D gaussian taps; None for the uniform (box) window
    cov_norm: float
    c1: float
    c2: float
    use_sample_covariance: bool = True
    ndim: int = 2

    def for_maps(self, height: int) -> SSIMSetup:
        """This setup for maps of ``height`` rows: 1-D for height 1, 2-D otherwise (``self`` when it fits)."""
        ndim = 1 if height == 1 else 2
        if ndim == self.ndim:
            return self
        return replace(self, ndim=ndim, cov_norm=_cov_norm(self.win_size, ndim, self.use_sample_covariance))


def ssim_setup(
    *,
    win_size: int | None = None,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    data_range: float | None = None,
    K1: float = 0.01,
    K2: float = 0.03,
    use_sample_covariance: bool = True,
) -> SSIMSetup:
    """Check the SSIM parameters once (same rules and messages as :func:`structural_similarity`)."""
    radius = 0  # of the gaussian filter; the uniform one always matches win_size
    if gaussian_weights:
        sigma = check_number(sigma, "sigma", low=0, low_open=True,
                             hint="Pass the gaussian window's standard deviation, e.g. sigma=1.5.")
        radius = int(SKIMAGE_GAUSSIAN_TRUNCATE * sigma + 0.5)  # scipy.ndimage's radius rule
    if win_size is None:
        win_size = 2 * radius + 1 if gaussian_weights else 7
    if not is_count(win_size, 3) or win_size % 2 == 0:
        raise SaliencyUsageError(
            f"win_size must be an odd integer >= 3 (as scikit-image requires), got {win_size!r}. "
            "Pass e.g. win_size=7 (scikit-image's default), 5 or 3 for small maps, or None for "
            "scikit-image's default."
        )
    win_size = int(win_size)
    if data_range is None:
        raise SaliencyUsageError(
            "data_range is required for floating-point maps (as in scikit-image): it sets the "
            "stability constants C1 and C2. Pass the range the maps can span, e.g. data_range=1.0 "
            "for maps in [0, 1] or data_range=2.0 for maps in [-1, 1]."
        )
    data_range = check_number(data_range, "data_range", low=0, low_open=True,
                              hint="Pass e.g. 1.0 for maps in [0, 1] or 2.0 for maps in [-1, 1].")
    K1 = check_number(K1, "K1", low=0, low_open=True,
                      hint="The usual value is K1=0.01; 0 would make flat windows 0 / 0.")
    K2 = check_number(K2, "K2", low=0, low_open=True,
                      hint="The usual value is K2=0.03; 0 would make flat windows 0 / 0.")
    return SSIMSetup(
        win_size=win_size,
        pad=(win_size - 1) // 2,
        radius=radius if gaussian_weights else (win_size - 1) // 2,
        kernel=_gaussian_kernel1d(sigma, radius) if gaussian_weights else None,
        cov_norm=_cov_norm(win_size, 2, use_sample_covariance),
        c1=(K1 * data_range) ** 2,
        c2=(K2 * data_range) ** 2,
        use_sample_covariance=bool(use_sample_covariance),
    )


def window_advice(height: int, width: int, win_size: int, pipeline: bool = True) -> str:
    """How to fit an SSIM window to ``height x width`` maps: advice that can always be followed.

    SSIM windows are odd and at least 3 pixels wide, so maps under 3 pixels on a side can only be
    resized; larger maps may also take a smaller window, up to the largest odd size that fits.
    ``pipeline``: phrase the advice for a map pipeline (a preset) rather than for the
    ``win_size`` argument of :func:`structural_similarity`. Maps of height 1 are 1-D signals
    (:func:`series_window_advice`).
    """
    if height == 1:
        return series_window_advice(width, pipeline)
    how = (
        "(MapPipeline(size=(32, 32)) in the map pipeline, or upsample the inputs)" if pipeline
        else "first (e.g. with torch.nn.functional.interpolate)"
    )
    side = min(height, width)
    if side < 3:
        return (
            f"No SSIM window fits {height}x{width} maps (windows are odd and at least 3x3): resize the maps to at "
            f"least 3x3 pixels {how}, or compare them with a metric that needs no window (e.g. spearman)."
        )
    largest = side if side % 2 else side - 1
    smaller = (
        "use a pipeline whose SSIM window is smaller, e.g. dataclasses.replace(preset, "
        f"ssim=dataclasses.replace(preset.ssim, win_size={largest}))" if pipeline
        else f"pass a smaller odd win_size (3 to {largest})"
    )
    return f"Either resize the maps to at least {win_size}x{win_size} pixels {how}, or {smaller}."


def series_window_advice(length: int, pipeline: bool = True) -> str:
    """How to fit an SSIM window to 1-D signals (maps of height 1) of ``length`` samples.

    Only a shorter window can: a series is never upsampled (interpolated samples would be
    compared as if measured), so signals under 3 samples take a metric without a window.
    """
    if length < 3:
        return (
            f"No SSIM window fits 1x{length} maps (1-D signals of {length} sample(s); 1-D windows are odd and at "
            "least 3 samples long): compare them with a metric that needs no window (e.g. spearman)."
        )
    largest = length if length % 2 else length - 1
    if pipeline:
        return (
            "Use a pipeline whose SSIM window is shorter, e.g. dataclasses.replace(preset, "
            f"ssim=dataclasses.replace(preset.ssim, win_size={largest})) (any odd win_size from 3 to {largest} "
            "fits), or compare with a metric that needs no window (e.g. spearman)."
        )
    return f"Pass a smaller odd win_size (3 to {largest}); series are never upsampled to fit a window."


def check_ssim_window(height: int, width: int, win_size: int, *, method: str | None = None,
                      preset: str | None = None, hint: str = "") -> None:
    """Refuse ``height x width`` maps smaller than the ``win_size`` SSIM window, with advice that fits.

    The one SSIM size check, for :func:`structural_similarity` and for every check that compares
    maps with SSIM. ``method`` names the method whose maps they are; ``preset`` the map pipeline
    whose window it is (the advice is then about the pipeline, else about the ``win_size``
    argument); ``hint`` is appended (what else the caller's check allows, e.g. another metric).
    Maps of height 1 are 1-D signals compared along their length: they only need
    ``width >= win_size`` (a 1-D window of ``win_size`` samples).
    """
    one_d = height == 1
    if width >= win_size and (one_d or height >= win_size):
        return
    maps = f"{method} maps" if method else "maps"
    if one_d:
        window = (f"the 1-D window of {win_size} samples of preset {preset!r}" if preset is not None
                  else f"the 1-D SSIM window of {win_size} samples (win_size={win_size})")
        raise SaliencyUsageError(
            f"{maps} are 1x{width}: 1-D signals of {width} sample(s), compared along their length, and shorter than "
            f"{window}. {window_advice(1, width, win_size, pipeline=preset is not None)}"
            f"{(' ' + hint) if hint else ''}"
        )
    window = (f"the SSIM window ({win_size}x{win_size}) of preset {preset!r}" if preset is not None
              else f"the {win_size}x{win_size} SSIM window (win_size={win_size})")
    raise SaliencyUsageError(
        f"{maps} are {height}x{width}, smaller than {window}. "
        f"{window_advice(height, width, win_size, pipeline=preset is not None)}{(' ' + hint) if hint else ''}"
    )


class ReferenceMoments(NamedTuple):
    """What SSIM needs of fixed maps ``a`` (see :func:`ssim_reference_moments`)."""

    shift: torch.Tensor  # each map's first pixel (see ssim_unchecked)
    centred: torch.Tensor  # a - shift
    dx: torch.Tensor  # local mean of a - shift
    twice_ux: torch.Tensor  # 2 * local mean of a
    ux_squared: torch.Tensor  # (local mean of a) ** 2
    vx: torch.Tensor  # local variance of a


def ssim_reference_moments(a: torch.Tensor, setup: SSIMSetup) -> ReferenceMoments:
    """The filtered moments of fixed maps ``a``, to compare them with many ``b`` batches.

    A randomization check compares the same original maps with one batch of maps per layer;
    computing their local mean and variance (and the terms of the SSIM formula made of them
    alone) once saves two of the five filters per layer and a third of the arithmetic.
    Maps of height 1 are 1-D signals (:meth:`SSIMSetup.for_maps`).
    """
    setup = setup.for_maps(a.shape[-2])
    shift = a[..., :1, :1]
    da = a - shift
    dx, dxx = _valid_filter(torch.stack([da, da * da]), setup).unbind(0)
    ux = dx + shift
    vx = setup.cov_norm * (dxx - dx * dx)
    return ReferenceMoments(shift, da, dx, 2 * ux, ux**2, vx)


def ssim_unchecked(
    a: torch.Tensor, b: torch.Tensor, setup: SSIMSetup, a_moments: ReferenceMoments | None = None,
) -> torch.Tensor:
    """Per-map mean SSIM of (N, H, W) maps ``a`` against ``b`` of shape (N, H, W) or (K, N, H, W).

    No validation: for callers that have already checked shape, dtype, device, finiteness and
    size (the randomization engine checks each batch of maps once, when it is made), and for
    maps without gradients (the arithmetic runs in place). A leading K dimension compares the
    same ``a`` with K batches at once (one result row per batch). Maps of height 1 are 1-D
    signals, compared along their length (:meth:`SSIMSetup.for_maps`).
    """
    setup = setup.for_maps(a.shape[-2])
    # skimage computes a variance as E[x^2] - E[x]^2, which cancels catastrophically for nearly
    # flat maps far from 0 (float32 loses the whole variance of a map at 0.7 +- 1e-4). (Co)variances
    # do not change when a map is shifted, so filter the maps minus their first pixel (a value in
    # the map's own range; constant maps become exactly 0) and add the shift back to the means
    # only. Same formula, far less rounding: the float32 result tracks the exact SSIM.
    ref = a_moments if a_moments is not None else ssim_reference_moments(a, setup)
    shift_b = b[..., :1, :1]
    products = torch.empty((3, *b.shape), dtype=b.dtype, device=b.device)
    db = torch.sub(b, shift_b, out=products[0])
    torch.mul(db, db, out=products[1])
    torch.mul(ref.centred, db, out=products[2])
    dy, dyy, dxy = _valid_filter(products, setup).unbind(0)
    # In place from here on (each line names what the buffer now holds): the batch of K states
    # makes these the largest temporaries of a check. The roundings are those of the textbook
    # order (identical maps give exactly 1).
    cov_norm, c1, c2 = setup.cov_norm, setup.c1, setup.c2
    contrast_num = dxy.sub_(ref.dx * dy).mul_(2 * cov_norm).add_(c2)  # 2 cov(x, y) + C2
    contrast_den = dyy.sub_(dy * dy).mul_(cov_norm).add_(ref.vx).add_(c2)  # var(y) + var(x) + C2
    uy = dy.add_(shift_b)
    luminance_num = (ref.twice_ux * uy).add_(c1)  # 2 ux uy + C1
    luminance_den = uy.mul_(uy).add_(ref.ux_squared).add_(c1)  # uy^2 + ux^2 + C1
    return luminance_num.mul_(contrast_num).div_(luminance_den.mul_(contrast_den)).mean(dim=(-2, -1))


@short_usage_errors
def structural_similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    win_size: int | None = None,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    data_range: float | None = None,
    K1: float = 0.01,
    K2: float = 0.03,
    use_sample_covariance: bool = True,
) -> torch.Tensor:
    """Mean SSIM of each pair of 2-D maps, exactly as ``skimage.metrics.structural_similarity``.

    Maps of height 1 (``(N, 1, T)``: sequences, feature vectors) are 1-D signals: the window is
    ``win_size`` samples along their length, exactly as skimage on the 1-D arrays ``a[i, 0]``
    (``NP = win_size``, border crop along that axis only). They are never upsampled.

    Args:
        a, b: maps of identical shape ``(N, H, W)`` (a batch of single-channel maps) or ``(H, W)``;
            float32 or float64, any device. The result is computed in that dtype on that device.
        win_size: odd side length of the window, >= 3. ``None`` is scikit-image's default: 7 for
            the uniform window, ``2 * int(3.5 * sigma + 0.5) + 1`` for the gaussian one (11 for
            ``sigma=1.5``). As in scikit-image, ``win_size`` sets the border crop and the
            sample-covariance factor even with ``gaussian_weights=True``, where the filter itself
            always has radius ``int(3.5 * sigma + 0.5)``; mismatched values are reproduced
            exactly (with scipy's 'reflect' border), but you almost always want ``None`` there.
        gaussian_weights: gaussian-weighted window (Wang et al. 2004) instead of a uniform one.
        sigma: standard deviation of the gaussian window (only used with ``gaussian_weights``).
        data_range: the value range the maps can span (max - min possible value), e.g. 1.0 for
            maps in [0, 1] or 2.0 for maps in [-1, 1]. Required, as in scikit-image for floats:
            guessing it from the data makes the stability constants depend on the maps.
        K1, K2: the SSIM constants; ``C1 = (K1 * data_range)**2``, ``C2 = (K2 * data_range)**2``.
            Must be > 0 (scikit-image also allows 0, but then flat windows give 0 / 0).
        use_sample_covariance: divide (co)variances by ``NP - 1`` instead of ``NP``,
            ``NP = win_size**2`` (``win_size`` for maps of height 1; scikit-image's default;
            ``False`` matches Wang et al.).

    Returns:
        ``(N,)`` per-map mean SSIM, or a 0-d tensor for ``(H, W)`` inputs, in the input dtype; a
        measurement, detached from autograd (the arithmetic runs in place to save memory).

    Raises:
        SaliencyUsageError: non-tensor input, shapes that differ or are not 2-D/3-D, dtype other
            than float32/float64 or differing between ``a`` and ``b``, different devices, NaN or
            inf values, an empty batch, an even / too small ``win_size``, maps smaller than the
            window (maps of height 1: shorter than ``win_size``), or a missing / non-positive
            ``data_range``, ``K1``, ``K2`` or ``sigma``.
    """
    expected = "(N, H, W) or (H, W)"
    a, b = _validate_array_pair(a, b, expected=expected)
    if a.dim() not in (2, 3):
        raise SaliencyUsageError(
            f"SSIM compares 2-D single-channel maps: a and b must have shape {expected}, got "
            f"{tuple(a.shape)}. Reduce channels first (e.g. maps.abs().sum(dim=1) for (N, C, H, W)) "
            "or add a batch dimension with unsqueeze(0)."
        )
    for value, name in ((a, "a"), (b, "b")):
        if value.dtype not in _SSIM_DTYPES:
            raise SaliencyUsageError(
                f"{name} has dtype {value.dtype}, but SSIM needs float32 or float64 maps (integer "
                "maps would be truncated, half precision loses the variance terms). Convert with "
                f"{name}.double() (exact) or {name}.float()."
            )
    if a.dtype != b.dtype:
        raise SaliencyUsageError(
            f"a is {a.dtype} but b is {b.dtype}; SSIM is computed in the maps' dtype, so both must "
            "match. Convert both, e.g. a.double() and b.double()."
        )
    single = a.dim() == 2
    if single:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.shape[0] == 0:
        raise SaliencyUsageError("a and b are an empty batch (N = 0); pass at least one pair of maps.")
    setup = ssim_setup(
        win_size=win_size, gaussian_weights=gaussian_weights, sigma=sigma, data_range=data_range, K1=K1, K2=K2,
        use_sample_covariance=use_sample_covariance,
    )
    check_ssim_window(a.shape[-2], a.shape[-1], setup.win_size)
    result = ssim_unchecked(a.detach(), b.detach(), setup)
    return result[0] if single else result


# --------------------------------------------------------------------------------------------
# correlation
# --------------------------------------------------------------------------------------------


def _correlation_rows(
    a: object, b: object, what: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate a pair for correlation and flatten it to (N, D) rows; also report "single pair"."""
    expected = "(N, ...) or (D,)"
    a, b = _validate_array_pair(a, b, expected=expected)
    if a.dim() == 0:
        raise SaliencyUsageError(
            f"{what} needs at least two values per row, got 0-d tensors. Pass 1-D tensors for one "
            "pair, or (N, ...) batches (each row is flattened)."
        )
    single = a.dim() == 1
    if single:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.shape[0] == 0:
        raise SaliencyUsageError(f"a and b are an empty batch (N = 0); pass at least one pair for {what}.")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] < 2:
        raise SaliencyUsageError(
            f"{what} needs at least two values per row, got {a.shape[1]}. Pass a 1-D tensor for a "
            "single pair or an (N, ...) batch whose rows hold two or more values each; an (N, 1) "
            "batch has nothing to correlate within a row."
        )
    return a, b, single


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Compute in the inputs' (promoted) floating dtype; integer / bool inputs go to float64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.float64


def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r of matching rows of (N, D) floating tensors; NaN where a row is constant.

    Mirrors ``scipy.stats.pearsonr``: constant means "all values equal the first" (exact, not a
    variance threshold, because the mean of identical floats need not equal them), deviations are
    scaled by their max before the norm (no overflow for huge values), r is clipped to [-1, 1],
    and rows of two values give exactly +-1.
    """
    constant = (x == x[:, :1]).all(dim=1) | (y == y[:, :1]).all(dim=1)
    xm = x - x.mean(dim=1, keepdim=True)
    ym = y - y.mean(dim=1, keepdim=True)

    def unit(v: torch.Tensor) -> torch.Tensor:
        vmax = v.abs().amax(dim=1, keepdim=True)
        vmax = torch.where(vmax > 0, vmax, torch.ones_like(vmax))  # constant rows: masked below
        norm = vmax * torch.linalg.vector_norm(v / vmax, dim=1, keepdim=True)
        return v / torch.where(norm > 0, norm, torch.ones_like(norm))

    r = (unit(xm) * unit(ym)).sum(dim=1).clamp(-1.0, 1.0)
    if x.shape[1] == 2:
        r = r.round()
    return torch.where(constant, torch.full_like(r, math.nan), r)


@short_usage_errors
def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of rows, like ``scipy.stats.pearsonr(a_i, b_i).statistic``.

    Args:
        a, b: tensors of identical shape ``(N, ...)``; everything after the first dim is flattened
            into one row of at least two values. A 1-D pair gives a 0-d result. Floating inputs
            are used in their dtype (float64 stays float64); integer / bool inputs use float64.

    Returns:
        ``(N,)`` correlations in [-1, 1] (or a 0-d tensor), on the input device.
        **A row where a or b is constant has no correlation: its entry is NaN** (as in scipy);
        nothing is raised or warned, so a batch with one flat map still yields the other rows.
        Find them with ``torch.isnan(result)``.

    Raises:
        SaliencyUsageError: non-tensor or complex input, differing shapes or devices, NaN or inf
            values, an empty batch, or fewer than two values per row.
    """
    x, y, single = _correlation_rows(a, b, "pearson")
    dtype = _float_dtype(x, y)
    r = _pearson_rows(x.to(dtype), y.to(dtype))
    return r[0] if single else r


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, ties averaged: ``scipy.stats.rankdata(x, method="average", axis=-1)``.

    Ranks start at 1; tied values all get the mean of the ranks they span (e.g. ``[10, 20, 20, 30]``
    -> ``[1, 2.5, 2.5, 4]``). Batched over all leading dims via one sort: tie groups are runs of
    equal sorted values, each element's group start/end come from a cumulative max/min of the
    run boundaries, and the average rank ``(start + end) / 2 + 1`` is scattered back.

    The result has the input's floating dtype (float32 is exact for ranks up to 2**24), or float64
    for integer / bool input. NaN or inf raises :class:`SaliencyUsageError` (scipy would propagate
    NaN, which would silently poison a rank correlation).
    """
    if not isinstance(x, torch.Tensor):
        raise SaliencyUsageError(
            f"rankdata needs a torch.Tensor, got {type(x).__name__}. Convert with torch.as_tensor(x)."
        )
    if x.dim() == 0:
        raise SaliencyUsageError("rankdata needs at least a 1-D tensor (ranks are taken along the last dim), got a 0-d tensor.")
    if x.is_complex():
        raise SaliencyUsageError(f"rankdata needs real values, got dtype {x.dtype}. Pass x.abs() or x.real.")
    _check_finite(x, "x")
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    size = x.shape[-1]
    if size == 0:
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)
    values, order = torch.sort(x, dim=-1)
    pos = torch.arange(size, device=x.device).expand_as(order)
    differs = values[..., 1:] != values[..., :-1]
    edge = torch.ones(*x.shape[:-1], 1, dtype=torch.bool, device=x.device)
    is_start = torch.cat([edge, differs], dim=-1)  # first element of a tie run
    is_end = torch.cat([differs, edge], dim=-1)  # last element of a tie run
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    end = torch.where(is_end, pos, torch.full_like(pos, size)).flip(-1).cummin(dim=-1).values.flip(-1)
    # (start + end) / 2 + 1 is an exact half-integer; compute in float64 then cast (exact if < 2**24).
    avg = ((start + end).to(torch.float64) / 2 + 1).to(out_dtype)
    return torch.empty_like(avg).scatter_(-1, order, avg)


@short_usage_errors
def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows, like ``scipy.stats.spearmanr(a_i, b_i)``.

    The Pearson correlation of the average ranks (:func:`rankdata`), so ties are handled exactly as
    in scipy. Same shapes, dtype rules and errors as :func:`pearson`.

    Returns:
        ``(N,)`` correlations in [-1, 1] (or a 0-d tensor for a 1-D pair).
        **A row where a or b is constant (all values tied) is NaN** (as in scipy); nothing is
        raised or warned. Find them with ``torch.isnan(result)``.
    """
    x, y, single = _correlation_rows(a, b, "spearman")
    dtype = _float_dtype(x, y)
    r = _pearson_rows(rankdata(x).to(dtype), rankdata(y).to(dtype))
    return r[0] if single else r
