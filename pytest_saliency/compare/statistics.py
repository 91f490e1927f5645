"""Sriram & Conati's sensitivity statistics over a (layers x images) matrix of SSIM values.

Notation (paper eqs. 2-7): S^i_l = 1 - SSIM(E^i_M, E^i_{M_l'}) per layer l and image i;
S^i = mean over layers; S^I = mean over images, with a bootstrap confidence interval.

How the paper's loose ends are settled here (and printed with every result):

* **Boundary.** Definition 1 says "sensitive if SSIM < 0.99", Definition 2 says "<= 0.99". One rule
  is used for both: a layer is sensitive for an image when SSIM **<** the threshold, so SSIM of
  exactly 0.99 counts as "similar enough" (a tie is no evidence of sensitivity). The dataset
  verdict is Definition 3 as stated: sensitive when S^I **>=** 0.01.
* **Negative SSIM.** SSIM lies in [-1, 1]. With ``clip_negative=True`` (the default) S is computed
  from max(SSIM, 0), so S stays in [0, 1] as the paper assumes: an anti-correlated map counts as
  fully dissimilar, not as "twice" dissimilar. Raw SSIM values are kept in the result either way.
* **Mean versus all layers.** S^I >= 0.01 (Definition 3, the default verdict) can pass while a
  layer's maps never change (one layer with SSIM 0.5 and nine with 1.0 give S^i = 0.05). Both the
  per-image "every layer" verdict (Definition 2) and each layer's mean SSIM are reported, and
  ``require_every_layer=True`` makes every layer's mean SSIM < threshold part of the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.integrity import short_usage_errors
from ..core.rng import as_seed, torch_seed_of
from ..core.torchtools import require_torch
from ..core.validation import check_count, check_flag, check_number, check_seed
from ..exceptions import SaliencyUsageError

SSIM_THRESHOLD = 0.99
SENSITIVITY_THRESHOLD = 0.01
CONFIDENCE = 0.90
N_BOOTSTRAP = 2000


@dataclass(frozen=True)
class LayerStatistics:
    """One row of the per-layer table."""

    name: str
    mean_ssim: float
    std_ssim: float
    min_ssim: float
    max_ssim: float
    fraction_sensitive: float  # images with SSIM < threshold for this layer (Definition 1)
    sensitive: bool  # the layer's mean SSIM < threshold

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SensitivityStatistics:
    """Everything Definitions 1-3 say about one SSIM matrix."""

    layers: list[LayerStatistics]
    image_scores: list[float]  # S^i per image
    image_sensitive_to_all_layers: list[bool]  # Definition 2 per image
    dataset_score: float  # S^I
    ci_low: float
    ci_high: float
    confidence: float
    fraction_images_sensitive_to_all_layers: float
    dataset_sensitive: bool  # Definition 3: S^I >= sensitivity threshold
    ssim_threshold: float
    sensitivity_threshold: float
    clip_negative: bool

    @property
    def insensitive_layers(self) -> list[LayerStatistics]:
        return [layer for layer in self.layers if not layer.sensitive]


def bootstrap_interval(values: Any, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, with a local seeded generator."""
    torch = require_torch()
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    n = values.numel()
    if n == 1:
        v = float(values[0])
        return v, v
    generator = torch.Generator().manual_seed(torch_seed_of(as_seed(seed)))
    means = torch.empty(n_resamples, dtype=torch.float64)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        index = torch.randint(0, n, (stop - start, n), generator=generator)
        means[start:stop] = values[index].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(low), float(high)


def check_sensitivity_options(*, ssim_threshold: Any, sensitivity_threshold: Any, clip_negative: Any,
                              confidence: Any, n_bootstrap: Any) -> None:
    """The thresholds and bootstrap options of the statistics, checked before any work is done.

    S^i lies in [0, 1] (in [0, 2] without ``clip_negative``), so a sensitivity threshold of 0 or
    less passes every method; SSIM lies in [-1, 1].
    """
    check_flag(clip_negative, "clip_negative")
    check_number(ssim_threshold, "ssim_threshold", low=-1.0, high=1.0,
                 hint="SSIM lies in [-1, 1]; a layer is sensitive when SSIM < ssim_threshold (default 0.99).")
    check_number(sensitivity_threshold, "sensitivity_threshold", low=0.0, low_open=True,
                 high=1.0 if clip_negative else 2.0,
                 hint="S^I is never negative, so a threshold <= 0 would pass every method; the default is 0.01.")
    check_number(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True,
                 hint="E.g. confidence=0.9 for a 90% interval.")
    check_count(n_bootstrap, "n_bootstrap", minimum=1, hint="E.g. n_bootstrap=2000 bootstrap resamples.")


@short_usage_errors
def sensitivity_statistics(
    ssim: Any,
    layer_names: list[str],
    *,
    ssim_threshold: float = SSIM_THRESHOLD,
    sensitivity_threshold: float = SENSITIVITY_THRESHOLD,
    clip_negative: bool = True,
    confidence: float = CONFIDENCE,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
) -> SensitivityStatistics:
    """Apply the paper's equations to an SSIM matrix of shape (layers, images)."""
    torch = require_torch()
    s = torch.as_tensor(ssim, dtype=torch.float64).cpu()
    if s.dim() != 2 or s.shape[0] != len(layer_names) or s.shape[1] < 1:
        raise SaliencyUsageError(
            f"ssim must have shape (layers, images) = ({len(layer_names)}, N >= 1), got {tuple(s.shape)}."
        )
    check_sensitivity_options(
        ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold, clip_negative=clip_negative,
        confidence=confidence, n_bootstrap=n_bootstrap,
    )
    seed = check_seed(seed)
    scores = 1.0 - (s.clamp(min=0.0) if clip_negative else s)  # S^i_l, eq. 2
    sensitive = s < ssim_threshold  # Definition 1
    image_scores = scores.mean(dim=0)  # S^i, eq. 4
    dataset_score = float(image_scores.mean())  # S^I, eq. 6
    low, high = bootstrap_interval(image_scores, confidence, n_bootstrap, seed)
    all_layers = sensitive.all(dim=0)  # Definition 2
    # One reduction per statistic over all layers (then one conversion to Python numbers).
    means = s.mean(dim=1)
    stds = s.std(dim=1) if s.shape[1] > 1 else torch.zeros_like(means)
    columns = torch.stack([means, stds, s.amin(dim=1), s.amax(dim=1), sensitive.double().mean(dim=1)], dim=1)
    layers = [
        LayerStatistics(
            name=name,
            mean_ssim=mean,
            std_ssim=std,
            min_ssim=low_ssim,
            max_ssim=high_ssim,
            fraction_sensitive=fraction,
            sensitive=mean < ssim_threshold,
        )
        for name, (mean, std, low_ssim, high_ssim, fraction) in zip(layer_names, columns.tolist())
    ]
    return SensitivityStatistics(
        layers=layers,
        image_scores=image_scores.tolist(),
        image_sensitive_to_all_layers=all_layers.tolist(),
        dataset_score=dataset_score,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        fraction_images_sensitive_to_all_layers=float(all_layers.double().mean()),
        dataset_sensitive=dataset_score >= sensitivity_threshold,  # Definition 3
        ssim_threshold=ssim_threshold,
        sensitivity_threshold=sensitivity_threshold,
        clip_negative=clip_negative,
    )
