"""What each modality's maps are and how the checks compare them.

The inputs say the modality (:func:`pytest_saliency.core.forward.infer_modality`; every entry
point takes ``modality=`` to override it): images (N, C, H, W) give (N, H, W) maps; series
(N, C, T), feature vectors (N, D) and token sequences give one-row maps (N, 1, T), (N, 1, D),
(N, 1, L). Maps are never resized to make a comparison possible.

How the checks compare two maps of one input, by default:

``image``
    SSIM (2-D window), the randomization papers' similarity.
``sequence``
    SSIM along the series (a 1-D window of ``win_size`` samples, as scikit-image computes SSIM
    of 1-D arrays): neighbouring time steps belong together, as neighbouring pixels do.
``tabular`` and ``text``
    Spearman rank correlation of the maps (Ley et al. and Krishna et al. compare feature
    rankings and top-k sets); SSIM is refused, since the order of features has no neighbourhood
    for a window to slide over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.forward import current_call
from ..exceptions import SaliencyUsageError


@dataclass(frozen=True)
class Modality:
    """One modality's map axes and default comparisons (see the module docstring)."""

    name: str
    map_axes: str  # what a map's positions are, for messages
    similarity: str  # how a check compares two maps of one input by default
    metrics: tuple[str, ...]  # the metrics a report-only sweep or noise check shows by default
    window_ok: bool  # whether SSIM's sliding window means anything on these maps


SPECS = {
    "image": Modality("image", "H x W pixels", "ssim", ("ssim", "spearman", "hog_pearson"), True),
    "sequence": Modality("sequence", "T time steps", "ssim", ("ssim", "spearman"), True),
    "tabular": Modality("tabular", "D features", "spearman", ("spearman", "feature_agreement"), False),
    "text": Modality("text", "L tokens", "spearman", ("spearman", "feature_agreement"), False),
}

#: Metrics that slide a 2-D window or read image structure over the map.
WINDOW_METRICS = ("ssim", "hog_pearson")


def current_modality() -> Modality:
    """The ambient check's modality (images outside every entry point)."""
    return SPECS[current_call().modality or "image"]


def check_metric_fits(metric: str, what: str = "metric") -> None:
    """Refuse a window metric (SSIM, HOG) on maps whose positions have no neighbourhood."""
    modality = current_modality()
    if metric in WINDOW_METRICS and not modality.window_ok:
        raise SaliencyUsageError(
            f"{what} {metric!r} slides a window over neighbouring positions, but {modality.name} maps are "
            f"{modality.map_axes} in no spatial order, so the windows would compare arbitrary neighbours. "
            f"Use {what}='spearman' (rank correlation) or a top-k metric such as 'feature_agreement' "
            f"(the {modality.name} default is {modality.similarity!r})."
        )


def default_similarity(metric: str | None) -> str:
    """``metric``, or the modality's default comparison when it is None; checked to fit the maps."""
    chosen = metric if metric is not None else current_modality().similarity
    check_metric_fits(chosen)
    return chosen


def default_metrics(metrics: str | Sequence[str] | None) -> str | Sequence[str]:
    """``metrics``, or the modality's default report metrics when it is None."""
    return metrics if metrics is not None else current_modality().metrics


def valid_positions(maps: Any) -> Any:
    """Which positions of maps of the check's inputs (in order) are not padding: token maps with
    ``Text(pad_token_id=...)``; None otherwise (every position counts)."""
    valid = current_call().valid
    if valid is None or getattr(maps, "shape", (None,))[0] != valid.shape[0]:
        return None
    return valid


def per_position(attributions: Any) -> Any:
    """Raw attributions with one signed value per map position where a position carries a vector:
    token maps' (N, L, E) embedding attributions summed over E to (N, L); others as they are.
    The top-k and sign metrics then rank tokens, not embedding coordinates (which mean nothing
    across models: each has its own embedding basis)."""
    if current_modality().name == "text" and getattr(attributions, "dim", lambda: 0)() == 3:
        return attributions.sum(dim=-1)
    return attributions


def figure_context(inputs: Any, count: int, *, with_inputs: bool = True) -> dict[str, Any]:
    """What a result's figures need to draw its maps of the first ``count`` inputs: the modality,
    and the series (``with_inputs``), the feature names or the token strings where they apply."""
    call = current_call()
    name = current_modality().name
    context: dict[str, Any] = {"modality": name}
    if name == "sequence" and with_inputs:
        context["inputs"] = inputs[:count].detach().float().cpu()
    if name == "tabular" and call.tabular is not None and call.tabular.feature_names is not None:
        context["feature_names"] = list(call.tabular.feature_names)
    if name == "text" and call.text is not None:
        context["tokens"] = [[call.text.token(int(t)) for t in row] for row in inputs[:count].tolist()]
    return context


__all__ = ["figure_context", "per_position", "valid_positions", "SPECS", "WINDOW_METRICS", "Modality", "check_metric_fits", "current_modality", "default_metrics",
           "default_similarity"]
