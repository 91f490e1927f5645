"""Turning raw attributions into comparable 2-D maps: an explicit, named pipeline with presets.

"SSIM >= 0.99" means nothing until the map pipeline is fixed: whether the sign is kept, how
channels are reduced, how the map is normalized and which SSIM window and data range are used.
The papers differ on every one of these, so the pipeline is a value (:class:`MapPipeline`) that
is recorded in every result and printed in every failure message.

Steps, in order: (1) absolute value or keep the sign, (2) reduce channels, (3) normalize each
map on its own, (4) resize. Each step is a named option, so a user can build their own pipeline
or start from a preset with :func:`dataclasses.replace`.

Presets:

``adebayo2018`` (the default)
    ``|a|`` summed over channels, clipped at the map's 99th percentile and scaled to [0, 1]
    (Adebayo et al.'s ``VisualizeImageGrayscale``); SSIM ``win_size=5``, ``data_range=1``.
``sam2020``
    Signed channel mean divided by ``max |a|`` into [-1, 1] (the SAM authors' code); SSIM
    ``win_size=5``, ``data_range=2``.
``thesis2023``
    ``|a|`` (channel sum) min-max scaled to [0, 1] (the disagreement thesis); SSIM with
    scikit-image's default ``win_size=7``, ``data_range=1``.

Why ``adebayo2018`` is the default: magnitude maps are what people read off a heatmap, the same
pipeline serves methods that are non-negative by construction (GradCAM, occlusion) and signed
ones, and the 99th-percentile clip keeps one extreme pixel from squashing the rest of the map to
zero. With max-normalization (``sam2020``) a single outlier makes both maps almost constant, and
nearly constant maps have SSIM close to 1 whatever the model did: a false "insensitive" verdict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.forward import current_call, model_call_options
from ..core.integrity import short_usage_errors
from ..core.torchtools import require_torch
from ..core.validation import check_finite, check_number, unknown_choice
from ..exceptions import SaliencyUsageError
from .modality import tabular_positions

REDUCTIONS = ("sum", "mean", "max_abs", "l2", "none")
NORMALIZATIONS = ("none", "max_abs", "min_max", "percentile")

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SSIMParams:
    """scikit-image ``structural_similarity`` parameters; the same names and meanings."""

    win_size: int = 7
    gaussian_weights: bool = False
    sigma: float = 1.5
    data_range: float = 1.0
    K1: float = 0.01
    K2: float = 0.03
    use_sample_covariance: bool = True

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pytest_saliency.compare.similarity.structural_similarity`
        (and of ``skimage.metrics.structural_similarity``) that these parameters set."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        weights = f"gaussian sigma={self.sigma}" if self.gaussian_weights else "uniform"
        return f"win_size={self.win_size}, {weights} window, data_range={self.data_range:g}"


@dataclass(frozen=True)
class MapPipeline:
    """How raw attributions become the 2-D maps that are compared.

    Attributes:
        name: a label printed in results (a preset name, or ``"custom"``).
        absolute: take ``|a|`` before reducing channels (``False`` keeps the sign).
        reduce: channel reduction: ``sum``, ``mean``, ``max_abs`` (the signed value of largest
            magnitude), ``l2`` (Euclidean norm, non-negative) or ``none`` (single-channel only).
        normalize: per-map scaling: ``none``; ``max_abs`` (divide by ``max |m|``: [-1, 1], or
            [0, 1] for non-negative maps); ``min_max`` (to [0, 1]); ``percentile`` (subtract the
            minimum, divide by the ``percentile``-th percentile minus the minimum, clip to [0, 1]).
        percentile: the clipping percentile for ``normalize="percentile"``.
        size: ``(H, W)`` to resize maps to (bilinear), or ``None`` to keep the input size.
        ssim: the SSIM parameters that belong with this value range.
    """

    name: str = "custom"
    absolute: bool = True
    reduce: str = "sum"
    normalize: str = "percentile"
    percentile: float = 99.0
    size: tuple[int, int] | None = None
    ssim: SSIMParams = SSIMParams(win_size=5, data_range=1.0)

    @short_usage_errors
    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise unknown_choice("channel reduction", self.reduce, REDUCTIONS)
        if self.normalize not in NORMALIZATIONS:
            raise unknown_choice("normalization", self.normalize, NORMALIZATIONS)
        check_number(self.percentile, "percentile", low=0.0, low_open=True, high=100.0,
                     hint="99 clips the top 1% of pixels.")

    def describe(self) -> str:
        sign = "|a|" if self.absolute else "signed"
        norm = f"percentile({self.percentile:g})" if self.normalize == "percentile" else self.normalize
        size = f", resize {self.size[0]}x{self.size[1]}" if self.size else ""
        return f"{self.name}: {sign}, {self.reduce} over channels, {norm} normalization{size}; SSIM {self.ssim.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __call__(self, attributions: torch.Tensor) -> torch.Tensor:
        return apply_pipeline(attributions, self)


PRESETS: dict[str, MapPipeline] = {
    "adebayo2018": MapPipeline(
        name="adebayo2018", absolute=True, reduce="sum", normalize="percentile", percentile=99.0,
        ssim=SSIMParams(win_size=5, data_range=1.0),
    ),
    "sam2020": MapPipeline(
        name="sam2020", absolute=False, reduce="mean", normalize="max_abs",
        ssim=SSIMParams(win_size=5, data_range=2.0),
    ),
    "thesis2023": MapPipeline(
        name="thesis2023", absolute=True, reduce="sum", normalize="min_max",
        ssim=SSIMParams(win_size=7, data_range=1.0),
    ),
    # SAM's comparison of Meaningful Perturbation masks: 1 - m as it is, in [0, 1] (data_range 1)
    "sam2020_mp": MapPipeline(
        name="sam2020_mp", absolute=False, reduce="mean", normalize="none",
        ssim=SSIMParams(win_size=5, data_range=1.0),
    ),
}
DEFAULT_PRESET = "adebayo2018"


def get_pipeline(preset: str | MapPipeline | None) -> MapPipeline:
    """Resolve a preset name (or pass a :class:`MapPipeline` through)."""
    if preset is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(preset, MapPipeline):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise unknown_choice(
        "preset", preset, PRESETS, "Or pass a pytest_saliency.MapPipeline(...) for a custom pipeline."
    )


def _reduce_channels(a: torch.Tensor, how: str) -> torch.Tensor:
    torch = require_torch()
    if how == "sum":
        return a.sum(dim=1)
    if how == "mean":
        return a.mean(dim=1)
    if how == "l2":
        return torch.linalg.vector_norm(a, dim=1)
    if how == "max_abs":
        index = a.abs().argmax(dim=1, keepdim=True)
        return a.gather(1, index).squeeze(1)
    if a.shape[1] != 1:
        raise SaliencyUsageError(
            f"reduce='none' needs single-channel attributions, got {a.shape[1]} channels. "
            "Use reduce='sum', 'mean', 'max_abs' or 'l2'."
        )
    return a[:, 0]


def _percentile(flat: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy's default ("linear") percentile of each row, from the two order statistics it needs.

    ``topk`` of the few values above the percentile is far cheaper than sorting every map (and
    torch.quantile is slower still); the values, and so the result, are the same as numpy's.
    """
    n = flat.shape[1]
    position = (percentile / 100.0) * (n - 1)
    below = int(position)
    above = min(below + 1, n - 1)
    if n - below <= below + 1:  # the order statistics sit in the top part: take the largest values
        top = flat.topk(n - below, dim=1, largest=True, sorted=True).values  # descending
        at_below, at_above = top[:, n - 1 - below], top[:, n - 1 - above]
    else:
        bottom = flat.topk(above + 1, dim=1, largest=False, sorted=True).values  # ascending
        at_below, at_above = bottom[:, below], bottom[:, above]
    return at_below + (position - below) * (at_above - at_below)


def _normalize(m: torch.Tensor, how: str, percentile: float) -> torch.Tensor:
    """Per-map scaling; a map that is all zeros stays all zeros instead of becoming NaN."""
    torch = require_torch()
    flat = m.flatten(1)
    if how == "none":
        return m
    if how == "max_abs":
        scale = flat.abs().amax(dim=1)
        return m / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None, None]
    if how == "min_max":
        low, high = flat.amin(dim=1), flat.amax(dim=1)
    else:
        low, high = flat.amin(dim=1), _percentile(flat, percentile)
    span = high - low
    scaled = (m - low[:, None, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None, None]
    return scaled.clamp(0.0, 1.0)


@short_usage_errors
def apply_pipeline(attributions: torch.Tensor, pipeline: str | MapPipeline | None = None,
                   modality: Any = None) -> torch.Tensor:
    """Raw attributions of shape (N, C, H, W), (N, H, W), (N, C, T) or (N, D) to maps of shape (N, H, W).

    Series (N, C, T) (the ``sequence`` modality) and feature vectors (N, D) become (N, 1, T) and
    (N, 1, D) maps, with channels reduced as for images; SSIM runs along such one-row maps; a
    text model's (N, L, E) embedding attributions become (N, 1, L). 3-D attributions are read by
    ``modality`` (``"sequence"`` or ``"text"``; inside a check, the check's); without one they are
    (N, H, W) image maps. NaN or inf attributions are an error, not a map.
    """
    if modality is not None:
        with model_call_options(modality=modality):
            return apply_pipeline(attributions, pipeline)
    torch = require_torch()
    pipeline = get_pipeline(pipeline)
    if not isinstance(attributions, torch.Tensor):
        raise SaliencyUsageError(
            f"attributions must be a torch.Tensor, got {type(attributions).__name__}; a custom "
            "explainer must return a tensor shaped like the inputs (or (N, 1, H, W))."
        )
    _check_floating(attributions)
    check_finite(attributions, "attribution maps")
    return pipeline_maps(attributions, pipeline)


def _check_floating(attributions: Any) -> None:
    """Maps are scaled and compared as real numbers: bool, integer or complex ones are refused."""
    if not attributions.is_floating_point():
        raise SaliencyUsageError(
            f"attribution maps must be a floating-point tensor, got {attributions.dtype}. The map pipeline "
            "takes absolute values and scales them, which needs real numbers; convert the maps with "
            ".float() (a complex map: take .abs() or .real first)."
        )


def pipeline_maps(attributions: torch.Tensor, pipeline: MapPipeline) -> torch.Tensor:
    """:func:`apply_pipeline` for a resolved pipeline and attributions already checked finite.

    The randomization engine checks each batch of attributions once, when it is made; this
    saves checking it again for every randomized state.
    """
    torch = require_torch()
    _check_floating(attributions)
    a = attributions
    if a.dim() == 2:
        a = tabular_positions(a)[:, None, None, :]  # one-hot groups summed (Tabular(groups=...))
    elif a.dim() == 3:
        # a series' (N, C, T) attributions are channels over one axis; an image method's (N, H, W)
        # maps (GradCAM) one channel over two
        modality = current_call().modality
        if modality == "text":  # (N, L, E) at the embedding: the embedding dimensions are the channels
            a = a.transpose(1, 2)[:, :, None, :]
        else:
            a = a[:, :, None, :] if modality == "sequence" else a[:, None]
    elif a.dim() != 4:
        raise SaliencyUsageError(
            f"attribution maps must have shape (N, C, H, W), (N, H, W), (N, C, T) or (N, D), got {tuple(a.shape)}."
        )
    if pipeline.absolute:
        a = a.abs()
    m = _reduce_channels(a, pipeline.reduce)
    if pipeline.size is not None and tuple(m.shape[-2:]) != tuple(pipeline.size):
        m = torch.nn.functional.interpolate(
            m[:, None], size=tuple(pipeline.size), mode="bilinear", align_corners=False
        )[:, 0]
    return _normalize(m, pipeline.normalize, pipeline.percentile)
