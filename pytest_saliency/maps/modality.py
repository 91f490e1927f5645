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
    if metric == "hog_pearson" and modality.name == "sequence":
        raise SaliencyUsageError(
            f"{what} 'hog_pearson' compares histograms of the gradient orientations of 2-D maps, but a series' map "
            "is one row: every gradient points along time, so every cell's histogram is the same one bin. Use "
            f"{what}='ssim' (along the series) or 'spearman'."
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
    return tabular_positions(attributions)


def tabular_positions(values: Any) -> Any:
    """Feature vectors' per-column values (N, D) with the columns of each one-hot group of
    ``Tabular(groups=...)`` summed into one position; others (values already grouped, with fewer
    columns than the inputs) as they are."""
    call = current_call()
    if current_modality().name != "tabular" or call.tabular is None or getattr(values, "dim", lambda: 0)() != 2 \
            or values.shape[-1] != call.n_features:
        return values
    return call.tabular.grouped(values)


def figure_context(inputs: Any, count: int, *, with_inputs: bool = True) -> dict[str, Any]:
    """What a result's figures need to draw its maps of the first ``count`` inputs: the modality,
    and the series (``with_inputs``), the feature names or the token strings where they apply."""
    call = current_call()
    name = current_modality().name
    context: dict[str, Any] = {"modality": name}
    if name == "sequence" and with_inputs:
        context["inputs"] = inputs[:count].detach().float().cpu()
    if name == "tabular" and call.tabular is not None and (call.tabular.feature_names or call.tabular.groups):
        context["feature_names"] = [label for label, _ in call.tabular.positions(int(inputs.shape[-1]))]
    if name == "text" and call.text is not None:
        context["tokens"] = [[call.text.token(int(t)) for t in row] for row in inputs[:count].tolist()]
    return context


def top_features(maps: Any, names: Sequence[str] | None, count: int = 5) -> str:
    """The ``count`` positions of one-row feature maps (k, 1, D) with the largest mean value over
    the maps, named (``x<j>`` without names): "worst radius 0.31, ...", for a report's text."""
    if maps is None or getattr(maps, "dim", lambda: 0)() != 3 or maps.shape[1] != 1 or maps.shape[0] == 0:
        return ""
    mean = maps[:, 0].double().mean(dim=0)
    order = mean.argsort(descending=True)[:count].tolist()
    labels = list(names) if names is not None and len(names) == mean.numel() else [f"x{j}" for j in range(mean.numel())]
    return ", ".join(f"{labels[j]} {float(mean[j]):.3g}" for j in order)


__all__ = ["top_features", "figure_context", "per_position", "tabular_positions", "valid_positions", "SPECS", "WINDOW_METRICS", "Modality", "check_metric_fits", "current_modality", "default_metrics",
           "default_similarity"]
