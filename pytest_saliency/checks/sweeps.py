"""Hyperparameter sweeps and input-noise invariance: the SAM protocol (Bansal, Agarwal & Nguyen, CVPR 2020).

**Protocol.** The inputs are explained once at a *reference* setting (the method's documented
default, or the one given) and once per swept value, changing **one hyperparameter at a time**
while the others stay at the reference. Each map is compared with the reference map of the same
image (SSIM, Spearman and HOG-Pearson by default, SAM's three measures, following Adebayo et al.),
and every swept value gets the per-image mean and std of that similarity. The table's *dataset
mean* is SAM's number: per image, the similarity averaged over the swept (non-reference) values, then
averaged over images. Several hyperparameters in one call give one table each.

Fixed for the whole sweep, so that only the hyperparameter changes:

* **Targets**: each input's class as predicted on the unmodified input (``target=None``), or the
  given target; never re-resolved per setting.
* **Seed**: stochastic methods (smoothgrad, lime, kernel_shap, gradient_shap) get the same seed
  at every value, so "nt_samples 50 -> 100" does not also change the random draws' seed; sweep
  ``"seed"`` itself (``sweep={"seed": [1, 2, 3]}``) to measure seed sensitivity (SAM's LIME/MP
  seed experiments).
* **Inputs, map pipeline and metrics.**

**Default preset: ``sam2020``** (signed channel mean divided by ``max |a|`` into [-1, 1]; SSIM
``win_size=5``, ``data_range=2``): the SAM authors' own pipeline, so numbers are comparable with
the paper's. Caveat (see :mod:`pytest_saliency.maps.postprocess`): with max-normalization a single
extreme pixel flattens the rest of a map, and flat maps look alike, which *inflates* stability;
``preset="adebayo2018"`` (magnitude, 99th-percentile clip) is the stricter choice. HOG-Pearson
uses SAM's ``pixels_per_cell=(16, 16)`` on 224 px maps, scaled to the map size (2 px on 32x32).

**Stability is not quality.** An explainer that ignores the model (``|input|``, an edge
detector) is perfectly stable under any hyperparameter and any input noise. Every report says
so next to its verdict; pair these checks with the randomization checks and with a faithfulness
score (:mod:`pytest_saliency.checks.faithfulness`).

**Built-in grids** (:func:`sam_grid`, :data:`GRIDS`) reproduce SAM's sweeps, with pixel sizes
scaled from SAM's 224 px inputs to the inputs' smaller side.

**Hyperparameters beyond the method's own options** (materialized here, then passed to captum):

* ``baselines="uniform"`` / ``"blurred"`` for methods with a ``baselines`` option (integrated
  gradients, deeplift, occlusion, feature_ablation): :func:`uniform_baseline` (one draw per
  image, uniform over the image's own range: the draw ``explain`` makes for it) and
  :func:`blurred_baseline` (Gaussian blur, sigma = 1/16 of the smaller side).
* ``n_segments`` for lime, kernel_shap and feature_ablation: per-image SLIC superpixels
  (:func:`slic_feature_masks`, scikit-image) instead of the default square grid.
* ``seed`` for every method (a no-op for deterministic ones: a useful control).

Custom explainer callables can be swept over ``seed`` and over their own keyword parameters.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.jsonable import jsonable
from ..core.rng import derive_seed
from ..core.integrity import rng_isolated
from ..core.torchtools import require_torch
from ..core.validation import (
    check_choice, check_count, check_inputs, check_model, check_number, check_seed, check_threshold, unknown_choice,
)
from ..exceptions import SaliencyCheckFailed, SaliencyUsageError, warn_user
from ..maps.baselines import SAM_INPUT_SIZE, blurred_baseline, slic_feature_masks
from ..maps.explainers import uniform_baseline
from ..maps.options import check_option_value, is_int, is_real, is_tensor_like
from ..maps.postprocess import MapPipeline, apply_pipeline, get_pipeline

DEFAULT_METRICS = ("ssim", "spearman", "hog_pearson")
DEFAULT_PRESET = "sam2020"
#: SAM code: skimage.feature.hog(h, pixels_per_cell=(16, 16)) on 224 px maps.
SAM_HOG_CELL = 16
#: SAM code: skimage.util.random_noise(img, "gaussian", mean=0, var=0.1) on [0, 1] images (clipped).
SAM_INPUT_NOISE_VARIANCE = 0.1
STABILITY_NOTE = (
    "stability alone is not quality: an explainer that ignores the model (e.g. |input| or an edge "
    "detector) is perfectly stable. Pair this check with the randomization checks "
    "(assert_sensitive_to_layer_randomization) and a faithfulness score (deletion / insertion AUC)."
)
Progress = Callable[[int, int, str], None]

# --------------------------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------------------------

SEGMENT_METHODS = ("lime", "kernel_shap", "feature_ablation")


# --------------------------------------------------------------------------------------------
# materialized hyperparameters: baselines and SLIC superpixels
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# built-in grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepGrid:
    """A named sweep: the method, its reference setting, the swept values and fixed options."""

    name: str
    method: str
    reference: dict[str, Any]
    sweep: dict[str, list[Any]]
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "reference": dict(self.reference),
                "sweep": {k: list(v) for k, v in self.sweep.items()}, "options": dict(self.options), "note": self.note}


def _side(input_shape: Sequence[int] | None) -> int:
    if input_shape is None:
        return SAM_INPUT_SIZE
    try:
        shape = tuple(check_count(s, "input_shape entry", minimum=0) for s in input_shape)
    except (SaliencyUsageError, TypeError):
        shape = ()
    if len(shape) < 2 or min(shape[-2:]) < 1:
        raise SaliencyUsageError(
            f"input_shape must end in (H, W), e.g. inputs.shape = (N, C, H, W); got {tuple(input_shape)!r}."
        )
    return min(shape[-2:])


def _scaled(pixels: float, side: int) -> int:
    """SAM's pixel size on 224 px inputs, scaled to ``side`` px, at least 1."""
    return max(1, int(round(pixels * side / SAM_INPUT_SIZE)))


def _unique(values: list[int], exclude: int) -> list[int]:
    out: list[int] = []
    for v in values:
        if v != exclude and v not in out:
            out.append(v)
    return out


def _grid_smoothgrad(side: int) -> SweepGrid:
    return SweepGrid(
        "smoothgrad", "smoothgrad", {"nt_samples": 50, "noise_level": 0.15},
        {"nt_samples": [100, 200, 500, 800], "noise_level": [0.05, 0.10, 0.20, 0.30]},
        {"nt_samples_batch_size": 50},
        "SAM 4.3.1: N_SG reference 50 vs {100, 200, 500, 800} at sigma = 0.15 (noise std relative to the input "
        "range). The sigma values are ours (SAM's supplement S4.1 grid is not available). nt_samples_batch_size=50 "
        "bounds memory and does not change what is averaged.",
    )


def _grid_integrated_gradients(side: int) -> SweepGrid:
    return SweepGrid(
        "integrated_gradients", "integrated_gradients", {"n_steps": 50, "baselines": "zero"},
        {"n_steps": [10, 20, 100, 200], "baselines": ["uniform", "blurred"]}, {},
        "SAM: IG's hyperparameter is N_IG on a zero baseline; the step values and the uniform / blurred baselines "
        "are ours (captum's default 50 steps is the reference).",
    )


def _grid_occlusion(side: int) -> SweepGrid:
    ref = _scaled(29, side)
    stride = _scaled(3, side)
    return SweepGrid(
        "occlusion", "occlusion", {"window": ref, "stride": stride},
        {"window": _unique([_scaled(p, side) for p in (5, 17, 41, 53)], ref),
         "stride": _unique([2 * stride, 3 * stride], stride)}, {},
        f"SAM 4.4.1 SP-L: patch 29 vs {{5, 17, 41, 53}} at stride 3 on 224 px, scaled to {side} px "
        f"(patch {ref}, stride {stride}). The stride values (2x, 3x the reference) are ours.",
    )


def _grid_occlusion_small(side: int) -> SweepGrid:
    ref = _scaled(53, side)
    return SweepGrid(
        "occlusion_small", "occlusion", {"window": ref, "stride": _scaled(3, side)},
        {"window": _unique([ref - 1, ref + 1], ref) if ref > 1 else [2]}, {},
        f"SAM 4.4.1 SP-S: patch 53 vs 52 and 54 (+-1 px) on 224 px; the reference is scaled to {side} px "
        f"({ref}), the +-1 px is not scaled.",
    )


def _grid_lime(side: int) -> SweepGrid:
    grids = [g for g in (4, 5, 10, 14) if g <= side]
    return SweepGrid(
        "lime", "lime", {"seed": 0, "n_samples": 1000, "grid": min(7, side)},
        {"seed": [1, 2, 3, 4], "n_samples": [250, 500, 2000], "grid": _unique(grids, min(7, side))}, {},
        "SAM 4.4.2 and S4.2: LIME seed, N_LIME and number of superpixels; reference = SAM's LIME defaults "
        "(seed 0, 1000 samples, 50 superpixels ~ a 7x7 grid). Swept sample counts and grids are ours. "
        "For SLIC superpixels use the 'lime_slic' grid.",
    )


def _grid_lime_slic(side: int) -> SweepGrid:
    return SweepGrid(
        "lime_slic", "lime", {"seed": 0, "n_samples": 1000, "n_segments": 50},
        {"seed": [1, 2, 3, 4], "n_segments": [25, 100, 150]}, {},
        "SAM's LIME: 50 SLIC superpixels (compactness 30, sigma 3 px on 224 px), 1000 samples, seed 0; "
        "swept superpixel counts are ours.",
    )


def _grid_kernel_shap(side: int) -> SweepGrid:
    return SweepGrid(
        "kernel_shap", "kernel_shap", {"seed": 0, "n_samples": 200},
        {"seed": [1, 2, 3, 4], "n_samples": [50, 100, 500, 1000]}, {},
        "Not in SAM; the same design as LIME: seed and sample count around the package default (200).",
    )


_GRID_BUILDERS: dict[str, Callable[[int], SweepGrid]] = {
    "smoothgrad": _grid_smoothgrad,
    "integrated_gradients": _grid_integrated_gradients,
    "occlusion": _grid_occlusion,
    "occlusion_small": _grid_occlusion_small,
    "lime": _grid_lime,
    "lime_slic": _grid_lime_slic,
    "kernel_shap": _grid_kernel_shap,
}
#: The names :func:`sam_grid` knows.
GRIDS: tuple[str, ...] = tuple(_GRID_BUILDERS)


def sam_grid(name: str, input_shape: Sequence[int] | None = None) -> SweepGrid:
    """SAM's sweep ``name`` (one of :data:`GRIDS`), with pixel sizes scaled to ``input_shape``.

    ``input_shape`` is ``inputs.shape`` (only the last two sizes are used); ``None`` keeps SAM's
    224 px values. Pass the grid as the method: ``hyperparameter_sweep(model, x, sam_grid("occlusion", x.shape))``.
    """
    check_choice(name, "grid", GRIDS)
    return _GRID_BUILDERS[name](_side(input_shape))


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_format_value(v)}" for k, v in value.items()) + "}"
    if is_tensor_like(value):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nanstd(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


@dataclass
class SweepRow:
    """One swept value: per-image similarity to the reference, per metric."""

    value: Any
    seed: int
    scores: dict[str, list[float]]  # metric -> per image (NaN where undefined, e.g. a constant map)
    attributions: Any = field(default=None, repr=False)  # raw maps, kept with keep_attributions=True

    def mean(self, metric: str) -> float:
        return _nanmean(self.scores[metric])

    def std(self, metric: str) -> float:
        """Std over images (population, ``ddof=0``)."""
        return _nanstd(self.scores[metric])

    def nan_count(self, metric: str) -> int:
        return sum(1 for v in self.scores[metric] if math.isnan(v))

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": jsonable(self.value),
            "seed": self.seed,
            "mean": {m: jsonable(self.mean(m)) for m in self.scores},
            "std": {m: jsonable(self.std(m)) for m in self.scores},
            "nan_count": {m: self.nan_count(m) for m in self.scores},
            "per_image": {m: [jsonable(v) for v in s] for m, s in self.scores.items()},
        }


@dataclass
class SweepTable:
    """All swept values of one hyperparameter (``"setting"`` for joint settings)."""

    hyperparameter: str
    reference_value: Any
    rows: list[SweepRow]

    def _per_image_means(self, metric: str) -> list[float]:
        n = len(self.rows[0].scores[metric]) if self.rows else 0
        return [_nanmean([row.scores[metric][i] for row in self.rows]) for i in range(n)]

    def dataset_mean(self, metric: str) -> float:
        """SAM's number: per image, the mean over swept values; then the mean over images."""
        return _nanmean(self._per_image_means(metric))

    def dataset_std(self, metric: str) -> float:
        """SAM's spread: sqrt of the mean over images of each image's variance across swept values."""
        n = len(self.rows[0].scores[metric]) if self.rows else 0
        variances = [_nanstd([row.scores[metric][i] for row in self.rows]) ** 2 for i in range(n)]
        return math.sqrt(_nanmean(variances)) if variances else math.nan

    def to_dict(self) -> dict[str, Any]:
        metrics = list(self.rows[0].scores) if self.rows else []
        return {
            "hyperparameter": self.hyperparameter,
            "reference_value": jsonable(self.reference_value),
            "rows": [row.to_dict() for row in self.rows],
            "dataset_mean": {m: jsonable(self.dataset_mean(m)) for m in metrics},
            "dataset_std": {m: jsonable(self.dataset_std(m)) for m in metrics},
        }


@dataclass
class SweepResult:
    """The outcome of a sweep or an input-noise check; ``to_dict()`` is JSON-serializable."""

    check: str  # "hyperparameter_stability" or "input_noise_stability"
    method: str
    reference: dict[str, Any]  # the reference setting (hyperparameters that were set)
    method_options: dict[str, Any]  # fixed options applied at every setting
    pipeline: MapPipeline
    metrics: tuple[str, ...]
    metric: str
    threshold: float | None
    higher_is_better: bool
    tables: list[SweepTable]
    n_images: int
    device: str
    seed: int
    targets: list[int]
    target_policy: str
    seconds: float
    reproduce: str = ""
    noise: dict[str, Any] = field(default_factory=dict)
    reference_maps: Any = field(default=None, repr=False)  # (k, H, W) first maps, for reports/plots
    reference_attributions: Any = field(default=None, repr=False)
    target_tensor: Any = field(default=None, repr=False)
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    @property
    def passed(self) -> bool:
        """No threshold: always True (a report, not a gate). Else every swept value's mean passes."""
        return not self.failures

    @property
    def failures(self) -> list[tuple[SweepTable, SweepRow]]:
        if self.threshold is None:
            return []
        bad = []
        for table in self.tables:
            for row in table.rows:
                mean = row.mean(self.metric)
                ok = mean >= self.threshold if self.higher_is_better else mean <= self.threshold
                if math.isnan(mean) or not ok:
                    bad.append((table, row))
        return bad

    @property
    def least_stable(self) -> tuple[SweepTable, SweepRow] | None:
        """The swept value whose mean similarity (verdict metric) is worst."""
        pairs = [(t, r) for t in self.tables for r in t.rows]
        if not pairs or self.metric not in self.metrics:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        return min(pairs, key=lambda p: (sign * p[1].mean(self.metric)) if not math.isnan(p[1].mean(self.metric)) else -math.inf)

    def _label(self, table: SweepTable, row: SweepRow) -> str:
        if self.check == "input_noise_stability":
            return f"input noise {self.noise.get('kind', 'gaussian')} variance={_format_value(row.value)}"
        if table.hyperparameter == "setting":
            return f"setting {_format_value(row.value)}"
        return f"{table.hyperparameter}={_format_value(row.value)}"

    def _reference_label(self) -> str:
        if self.check == "input_noise_stability":
            return "the clean inputs"
        shown = {k: v for k, v in self.reference.items()}
        return ", ".join(f"{k}={_format_value(v)}" for k, v in shown.items()) or "the method's defaults"

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.threshold is None:
            verdict = "REPORT"
        worst = self.least_stable
        detail = ""
        if worst is not None:
            table, row = worst
            detail = f"least stable: {self._label(table, row)} with mean {self.metric} {row.mean(self.metric):.4f}"
        bound = ""
        if self.threshold is not None:
            bound = f" vs {'>=' if self.higher_is_better else '<='} {self.threshold:g}"
        return f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: {detail}{bound}; N = {self.n_images}"

    def table_text(self) -> str:
        lines = []
        for table in self.tables:
            head = "input noise (vs the clean inputs)" if self.check == "input_noise_stability" else (
                f"{table.hyperparameter} (reference {_format_value(table.reference_value)})"
            )
            lines.append(f"    {head}")
            labels = [_format_value(r.value) for r in table.rows]
            width = max([len("value")] + [len(x) for x in labels])
            cols = "  ".join(f"{m + ' mean +- std':>24}" for m in self.metrics)
            lines.append(f"      {'value':<{width}}  {cols}" + ("  verdict" if self.threshold is not None else ""))
            failing = {id(r) for _, r in self.failures}
            for label, row in zip(labels, table.rows):
                cells = []
                for m in self.metrics:
                    nan = row.nan_count(m)
                    extra = f" ({nan} NaN)" if nan else ""
                    cells.append(f"{row.mean(m):>11.4f} +- {row.std(m):<7.4f}{extra:>2}".rjust(24))
                verdict = "" if self.threshold is None else ("UNSTABLE" if id(row) in failing else "ok")
                lines.append(f"      {label:<{width}}  {'  '.join(cells)}  {verdict}".rstrip())
            means = ", ".join(f"{m} {table.dataset_mean(m):.4f}" for m in self.metrics)
            lines.append(f"      dataset mean over values (SAM): {means}")
        return "\n".join(lines)

    def report(self) -> str:
        if self.check == "input_noise_stability":
            kind = self.noise.get("kind", "gaussian")
            what = (
                f"  check:       input_noise_stability (maps of x vs maps of x + {kind} noise, clip={self.noise.get('clip')}, "
                f"{self.noise.get('n_draws')} draw(s) per image, seeded)"
            )
        else:
            what = "  check:       hyperparameter_stability (SAM protocol: each value vs the reference, one at a time)"
        options = ", ".join(f"{k}={_format_value(v)}" for k, v in sorted(self.method_options.items())
                            if k not in ("input_range", "input_min", "input_max"))
        lines = [
            what,
            f"  method:      {self.method}   reference: {self._reference_label()}"
            + (f"   fixed: {options}" if options else "") + f"   target: {self.target_policy}",
            f"  preset:      {self.pipeline.describe()}",
        ]
        if self.threshold is not None:
            op = ">=" if self.higher_is_better else "<="
            lines.append(f"  threshold:   mean {self.metric} {op} {self.threshold:g} for every swept value")
            lines.append(f"  verdict:     {'stable' if self.passed else 'NOT stable'}")
        lines.append(f"  note:        {STABILITY_NOTE}")
        lines.append(self.table_text())
        lines.append(f"  images: {self.n_images}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s")
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        failures = self.failures
        if not failures:
            return ""
        table, row = min(failures, key=lambda p: (p[1].mean(self.metric) if self.higher_is_better else -p[1].mean(self.metric))
                         if not math.isnan(p[1].mean(self.metric)) else -math.inf)
        what = "input noise" if self.check == "input_noise_stability" else "hyperparameter changes"
        op = "below" if self.higher_is_better else "above"
        more = f" (and {len(failures) - 1} more value(s))" if len(failures) > 1 else ""
        headline = (
            f"Saliency check failed: {self.method} maps are NOT stable under {what}: {self._label(table, row)} gives "
            f"mean {self.metric} {row.mean(self.metric):.4f} to the reference ({self._reference_label()}), "
            f"{op} the threshold {self.threshold:g}{more}"
        )
        hint = (
            "  what next:   a map that changes with an incidental setting is not a stable account of the model. "
            "Fix the hyperparameter at a value the maps are stable around, average over seeds/samples, or pick a "
            "method with fewer knobs; check the threshold against a control run (e.g. the reference vs itself)."
        )
        return "\n".join([headline, self.report(), hint])

    def to_dict(self) -> dict[str, Any]:
        least = self.least_stable
        return {
            "model_writes": list(self.model_writes),
            "check": self.check,
            "passed": self.passed,
            "method": self.method,
            "reference": jsonable(self.reference),
            "method_options": jsonable({k: v for k, v in self.method_options.items()
                                         if k not in ("input_range", "input_min", "input_max")}),
            "preset": self.pipeline.to_dict(),
            "metrics": list(self.metrics),
            "metric": self.metric,
            "threshold": self.threshold,
            "higher_is_better": self.higher_is_better,
            "tables": [t.to_dict() for t in self.tables],
            "least_stable": None if least is None else {
                "hyperparameter": least[0].hyperparameter, "value": jsonable(least[1].value),
                "mean": jsonable(least[1].mean(self.metric)),
            },
            "failures": [
                {"hyperparameter": t.hyperparameter, "value": jsonable(r.value), "mean": jsonable(r.mean(self.metric))}
                for t, r in self.failures
            ],
            "noise": jsonable(self.noise),
            "note": STABILITY_NOTE,
            "n_images": self.n_images,
            "device": self.device,
            "seed": self.seed,
            "targets": self.targets,
            "target_policy": self.target_policy,
            "seconds": self.seconds,
            "reproduce": self.reproduce,
        }

    def record(self) -> dict[str, Any]:
        """The short summary the pytest plugin writes into the JUnit XML."""
        least = self.least_stable
        return {
            "check": self.check,
            "method": self.method,
            "preset": self.pipeline.name,
            "passed": self.passed,
            "metric": self.metric,
            "threshold": self.threshold,
            "least_stable": None if least is None else self._label(*least),
            "least_stable_mean": None if least is None else jsonable(least[1].mean(self.metric)),
            "n_images": self.n_images,
            "seed": self.seed,
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------------------------
# running one setting
# --------------------------------------------------------------------------------------------


def _callable_parameters(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword parameters of a custom explainer beyond (model, inputs, target), and whether it takes **kwargs."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _valid_names(resolved: Any) -> tuple[list[str], bool]:
    from ..maps.explainers import EXTRA_OPTIONS, MethodSpec

    if isinstance(resolved, MethodSpec):
        names = set(resolved.defaults) | set(EXTRA_OPTIONS.get(resolved.name, ())) | {"seed"}
        if resolved.name in SEGMENT_METHODS:
            names.add("n_segments")
        return sorted(names), False
    names, var_kw = _callable_parameters(resolved)
    return sorted(names | {"seed"}), var_kw


def _check_names(label: str, resolved: Any, setting: Mapping[str, Any], where: str) -> None:
    valid, open_ended = _valid_names(resolved)
    for name in setting:
        if not isinstance(name, str):
            raise SaliencyUsageError(f"{where}: hyperparameter names must be strings, got {name!r}.")
        if name not in valid and not open_ended:
            from ..maps.explainers import MethodSpec

            hint = "" if isinstance(resolved, MethodSpec) else (
                " A custom explainer can be swept over 'seed' and over its own keyword parameters."
            )
            raise SaliencyUsageError(
                f"{where}: unknown hyperparameter {name!r} for method {label!r}; valid hyperparameters: "
                f"{', '.join(valid)}.{hint}"
            )
        check_option_value(label, name, setting[name], where)


def _split_setting(resolved: Any, setting: dict[str, Any], inputs: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Native options for captum, and per-image tensors (materialized baselines, SLIC masks)."""
    torch = require_torch()
    from ..maps.explainers import MethodSpec

    native = {k: v for k, v in setting.items() if k != "seed"}
    per_image: dict[str, Any] = {}
    if not isinstance(resolved, MethodSpec):
        return native, per_image
    kind = native.get("baselines")
    if isinstance(kind, str) and kind in ("uniform", "blurred"):
        native.pop("baselines")
        per_image["baselines"] = (uniform_baseline(inputs, seed, method=resolved.name) if kind == "uniform"
                                  else blurred_baseline(inputs))
    elif isinstance(kind, torch.Tensor) and kind.dim() == inputs.dim() and kind.shape[0] == inputs.shape[0] > 1:
        native.pop("baselines")
        per_image["baselines"] = kind.to(inputs.device)
    if "n_segments" in native:
        per_image["feature_mask"] = slic_feature_masks(inputs, int(native.pop("n_segments")))
    mask = native.get("feature_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == inputs.dim() and mask.shape[0] == inputs.shape[0] > 1:
        per_image["feature_mask"] = native.pop("feature_mask").to(inputs.device)
    window, stride = native.get("window"), native.get("stride")
    if is_int(window) and inputs.dim() == 4:
        if window > min(inputs.shape[-2:]):
            raise SaliencyUsageError(
                f"occlusion window {window} is larger than the {inputs.shape[-2]}x{inputs.shape[-1]} inputs; "
                f"use a window of at most {min(inputs.shape[-2:])} px (sam_grid scales SAM's sizes to the input)."
            )
        if is_int(stride) and stride > window:
            raise SaliencyUsageError(
                f"occlusion stride {stride} is larger than the window {window}: captum's Occlusion would leave pixels "
                f"unvisited and refuses it. Use stride <= {window}, e.g. reference={{'stride': 1}} when sweeping small windows."
            )
    return native, per_image


def _per_image_explainer(
    spec: Any, options: dict[str, Any], per_image: dict[str, Any], seed: int
) -> Callable[..., Any]:
    """An explainer that gives captum the per-image tensors of the chunk ``attribute`` hands it.

    Chunks come in order, so ``offset`` is the chunk's first index in the inputs: with ``seed`` it
    seeds each image's random draws, and :func:`pytest_saliency.maps.explainers.run_captum` takes the
    rows of a per-input baseline by it; feature masks are sliced here.
    """
    torch = require_torch()
    from ..maps.explainers import run_captum

    offset = 0
    one_at_a_time = spec.name in ("lime", "kernel_shap") and "feature_mask" in per_image

    def run(model: Any, chunk: Any, target: Any) -> Any:
        nonlocal offset
        n = chunk.shape[0]
        first = offset
        sliced = {k: v if k == "baselines" else v[first:first + n] for k, v in per_image.items()}
        offset += n
        if not one_at_a_time:
            return run_captum(spec, model, chunk, target, {**options, **sliced}, seed=seed, index=first)
        # captum's Lime takes one feature mask per call: explain image by image (it loops anyway).
        return torch.cat([
            run_captum(spec, model, chunk[i:i + 1], target[i:i + 1],
                        {**options, **{k: v if k == "baselines" else v[i:i + 1] for k, v in sliced.items()}},
                        seed=seed, index=first + i)
            for i in range(n)
        ])

    run.__name__ = spec.name
    return run


def _explain_setting(
    model: Any, inputs: Any, resolved: Any, setting: dict[str, Any], target: Any, seed: int, batch_size: int | None,
    cache: Any = None,
) -> Any:
    """Raw attributions at one setting; reused from ``cache`` (a MapCache) when it holds them."""
    from ..maps.explainers import MethodSpec

    key = None
    cacheable = isinstance(resolved, MethodSpec) and not any(is_tensor_like(v) for v in setting.values())
    if cache is not None and cacheable:
        key = cache.key(model, inputs, target, resolved.name, {k: v for k, v in setting.items() if k != "seed"},
                        seed, batch_size)
        hit = cache.get(key)
        if hit is not None:
            return hit
    raw = _compute_setting(model, inputs, resolved, setting, target, seed, batch_size)
    if key is not None:
        cache.put(key, raw)
    return raw


def _compute_setting(
    model: Any, inputs: Any, resolved: Any, setting: dict[str, Any], target: Any, seed: int, batch_size: int | None
) -> Any:
    from ..maps.explainers import MethodSpec, attribute, resolved_options, method_name

    native, per_image = _split_setting(resolved, setting, inputs, seed)
    if isinstance(resolved, MethodSpec):
        options = resolved_options(resolved, model, inputs, native)
        if not per_image:
            return attribute(model, inputs, resolved, target, seed, batch_size, True, options)
        # attribute chunks the images (batch_size, or the memory-sized "_image_batch"); the wrapper
        # gives captum each chunk's per-image tensors.
        chunking = {k: v for k, v in options.items() if k == "_image_batch"}
        return attribute(model, inputs, _per_image_explainer(resolved, options, per_image, seed), target, seed,
                          batch_size, True, chunking)
    explainer = functools.partial(resolved, **native) if native else resolved
    if native:
        explainer.__name__ = method_name(resolved)  # type: ignore[attr-defined]
    return attribute(model, inputs, explainer, target, seed, batch_size, True, {})


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _check_metrics(metrics: Any, metric: str, threshold: Any) -> tuple[tuple[str, ...], bool]:
    from ..compare.metrics import METRICS

    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    for name in metrics:
        if name not in METRICS:
            raise unknown_choice("metric", name, METRICS)
    if threshold is not None:
        if not isinstance(metric, str) or metric not in METRICS:
            raise unknown_choice("metric", metric, METRICS)
        check_threshold(threshold, metric)
        if metric not in metrics:
            metrics = (*metrics, metric)
        if METRICS[metric].takes_k:
            raise SaliencyUsageError(
                f"metric {metric!r} needs k; use a map-level metric (ssim, spearman, spearman_abs, pearson, hog_pearson) "
                "for the verdict, or pass metric_options={...: {'k': ...}} and metrics=(...) for the report only."
            )
    higher = METRICS[metric].higher_is_better if metric in METRICS else True
    return metrics, higher


def _setup_check(
    method: Any, preset: Any, metrics: Any, metric: str, threshold: Any
) -> tuple[Any, str, MapPipeline, tuple[str, ...], str, bool]:
    """``(resolved method, label, pipeline, metrics, summary metric, higher_is_better)`` of a sweep check."""
    from ..maps.explainers import MethodSpec, method_name, resolve_method

    resolved = resolve_method(method)
    label = resolved.name if isinstance(resolved, MethodSpec) else method_name(method)
    pipeline = get_pipeline(preset)
    metrics, higher = _check_metrics(metrics, metric, threshold)
    if threshold is None and metric not in metrics and metrics:
        metric = metrics[0]  # no verdict: summarize with the first metric asked for
        higher = _higher_is_better(metric)
    return resolved, label, pipeline, metrics, metric, higher


def _higher_is_better(metric: str) -> bool:
    from ..compare.metrics import METRICS

    return METRICS[metric].higher_is_better


def _metric_kwargs(name: str, pipeline: MapPipeline, maps: Any, user: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults that belong to the pipeline (SSIM) or to the map size (HOG), overridden by ``user``."""
    kwargs: dict[str, Any] = {}
    if name == "ssim":
        kwargs = pipeline.ssim.kwargs()
    elif name == "hog_pearson" and maps.dim() == 3:
        cell = max(1, int(round(SAM_HOG_CELL * min(maps.shape[-2:]) / SAM_INPUT_SIZE)))
        kwargs = {"pixels_per_cell": (cell, cell)}
    kwargs.update(user.get(name, {}))
    return kwargs


def _similarities(
    metrics: Sequence[str], reference: Any, maps: Any, pipeline: MapPipeline, metric_options: Mapping[str, Any]
) -> dict[str, list[float]]:
    from ..compare.metrics import compute_metric

    out = {}
    for name in metrics:
        values = compute_metric(name, reference, maps, **_metric_kwargs(name, pipeline, reference, metric_options))
        out[name] = [float(v) for v in values.double().cpu()]
    return out


def _warn_constant(maps: Any, label: str) -> None:
    flat = maps.flatten(1)
    constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 0
    if bool(constant.any()):
        index = constant.nonzero().flatten().tolist()
        warn_user(
            f"{label}: the reference maps are constant for {len(index)} image(s) (indices {index[:10]}); "
            "similarity to a constant map measures nothing (correlations are NaN, SSIM depends only on the other "
            "map's flatness). Typical causes: a ReLU'd GradCAM that is zero, a surrogate that zeroes every feature "
            "(lime: raise n_samples or lower alpha). Drop those inputs or change the reference setting."
        )


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def _normalize_sweep(sweep: Any, label: str) -> list[tuple[str, list[Any]]]:
    """``{name: [values]}`` -> [(name, values)], or ``[{...}, {...}]`` -> [("setting", [dicts])]."""
    if isinstance(sweep, Mapping):
        if not sweep:
            raise SaliencyUsageError(
                f"the sweep for {label!r} is empty; pass at least one hyperparameter with values, "
                "e.g. sweep={'nt_samples': [100, 200]}."
            )
        out = []
        for name, values in sweep.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise SaliencyUsageError(
                    f"sweep[{name!r}] must be a list of values, got {values!r}. Wrap a single value: "
                    f"sweep={{{name!r}: [{values!r}]}}."
                )
            if len(values) == 0:
                raise SaliencyUsageError(
                    f"sweep[{name!r}] is empty; give at least one value to compare with the reference."
                )
            out.append((name, list(values)))
        return out
    if isinstance(sweep, Sequence) and not isinstance(sweep, (str, bytes)):
        if not sweep:
            raise SaliencyUsageError(f"the sweep for {label!r} is an empty list; pass at least one setting dict.")
        for setting in sweep:
            if not isinstance(setting, Mapping) or not setting:
                raise SaliencyUsageError(
                    f"a list sweep must hold non-empty dicts of hyperparameters (joint settings), got {setting!r}."
                )
        return [("setting", [dict(s) for s in sweep])]
    raise SaliencyUsageError(
        f"sweep must be a dict {{hyperparameter: [values]}} (one at a time) or a list of setting dicts (joint), "
        f"got {type(sweep).__name__}."
    )


def _resolve_grid(method: Any, sweep: Any, reference: Any, options: dict[str, Any], inputs: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    if isinstance(method, SweepGrid):
        grid = method
    elif sweep is None and isinstance(method, str) and method in _GRID_BUILDERS:
        grid = sam_grid(method, tuple(inputs.shape))
    elif sweep is None:
        from ..maps.explainers import method_name

        raise SaliencyUsageError(
            f"no sweep given for method {method_name(method)!r} and there is no built-in grid for it; pass "
            f"sweep={{'<hyperparameter>': [values]}}. Built-in SAM grids: {', '.join(GRIDS)}."
        )
    else:
        return method, sweep, reference, options
    return (
        grid.method,
        grid.sweep if sweep is None else sweep,
        grid.reference if reference is None else reference,
        {**grid.options, **options},
    )


@rng_isolated
def hyperparameter_sweep(
    model: Any,
    inputs: Any,
    method: Any = "smoothgrad",
    sweep: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] | None = None,
    reference: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    *,
    preset: str | MapPipeline | None = DEFAULT_PRESET,
    target: Any = None,
    seed: int = 0,
    threshold: float | None = None,
    metric: str = "ssim",
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    keep_attributions: bool = False,
    keep_maps: int = 4,
    cache: Any = None,
    reproduce: str = "",
    progress: Progress | None = None,
    **options: Any,
) -> SweepResult:
    """Explain at the reference and at each swept value; per-image similarity to the reference.

    Args:
        model, inputs: as for :func:`pytest_saliency.explain`.
        method: a method name, a custom explainer ``(model, inputs, target, **kw)``, or a
            :class:`SweepGrid` (then ``sweep``/``reference`` default to the grid's).
        sweep: ``{"nt_samples": [100, 200]}`` (each value changed alone, the others at the
            reference; one table per hyperparameter), or a list of dicts, each a *joint* setting
            compared with the reference (one table, ``"setting"``). ``None``: SAM's grid for
            ``method`` (:func:`sam_grid`, scaled to the inputs), where there is one.
        reference: the reference setting; hyperparameters not named keep the method's defaults.
            ``"seed"`` may be part of it (else ``seed``).
        metrics: similarity measures of :mod:`pytest_saliency.compare.metrics` (map-level ones).
        preset: the map pipeline; ``sam2020`` (SAM's) by default, see the module docstring.
        target: ``None`` = each input's predicted class, fixed for every setting.
        threshold, metric: with a threshold the result has a verdict: every swept value's mean
            ``metric`` must be >= threshold (<= for distances such as ``l1_distance``).
        metric_options: per-metric keyword arguments, e.g. ``{"hog_pearson": {"pixels_per_cell": (4, 4)}}``.
        batch_size: images per explainer call (memory bound).
        keep_attributions: keep every setting's raw attributions (for :func:`accuracy_spread`).
        cache: a :class:`pytest_saliency.maps.cache.MapCache`: settings already explained for the same
            model (fingerprint), inputs, targets, options and seed are reused (named methods,
            no tensor-valued options). Pass one to a hypothesis test so that the reference is
            explained once, not once per example.
        **options: method options fixed at every setting (not swept), e.g. ``perturbations_per_eval``.

    The model is left exactly as it was and no global RNG state changes.
    """
    from ..maps.explainers import resolve_target

    start = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    method, sweep, reference, options = _resolve_grid(method, sweep, reference, dict(options), inputs)
    resolved, label, pipeline, metrics, metric, higher = _setup_check(method, preset, metrics, metric, threshold)
    metric_options = dict(metric_options or {})
    for name in metric_options:
        if name not in metrics:
            raise SaliencyUsageError(f"metric_options has an entry for {name!r}, which is not among metrics {list(metrics)}.")
    seed = check_seed(seed)
    keep_maps = check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the images one explainer call sees; None explains all at once.")
    reference = dict(reference or {})
    if not isinstance(reference, dict):
        raise SaliencyUsageError(f"reference must be a dict of hyperparameters, got {type(reference).__name__}.")
    tables_spec = _normalize_sweep(sweep, label)
    _check_names(label, resolved, reference, "reference")
    _check_names(label, resolved, options, "options")
    if "seed" in options:
        raise SaliencyUsageError("pass the seed as seed=... or inside reference, not as a method option.")
    both = sorted(set(reference) & set(options))
    if both:
        raise SaliencyUsageError(
            f"{both} given both in reference and as fixed options; name each hyperparameter once "
            "(reference values are the ones the sweep changes)."
        )
    for name, values in tables_spec:
        settings = values if name == "setting" else [{name: v} for v in values]
        for setting in settings:
            _check_names(label, resolved, setting, "sweep")
            fixed = sorted(set(setting) & set(options))
            if fixed:
                raise SaliencyUsageError(
                    f"{fixed} are swept but also given as fixed options; move the fixed value into reference={{...}}."
                )
    reference_seed = int(reference.get("seed", seed))
    base = {**options, **{k: v for k, v in reference.items()}}

    total = 1 + sum(len(values) for _, values in tables_spec)
    if progress is not None:
        progress(0, total, "reference")
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    ref_raw = _explain_setting(model, inputs, resolved, base, fixed_target, reference_seed, batch_size, cache)
    ref_maps = apply_pipeline(ref_raw, pipeline) if metrics else None
    if ref_maps is not None:
        _warn_constant(ref_maps, label)
    tables = []
    done = 1
    for name, values in tables_spec:
        rows = []
        for value in values:
            setting = {**base, **value} if name == "setting" else {**base, name: value}
            setting_seed = int(setting.get("seed", reference_seed))
            if progress is not None:
                progress(done, total, f"{name}={_format_value(value)}")
            raw = _explain_setting(model, inputs, resolved, setting, fixed_target, setting_seed, batch_size, cache)
            scores = _similarities(metrics, ref_maps, apply_pipeline(raw, pipeline), pipeline, metric_options) if metrics else {}
            rows.append(SweepRow(value=value, seed=setting_seed, scores=scores,
                                 attributions=raw.cpu() if keep_attributions else None))
            done += 1
        ref_value = {k: reference.get(k, _default(resolved, k, reference_seed)) for k in values[0]} if name == "setting" \
            else reference.get(name, _default(resolved, name, reference_seed))
        tables.append(SweepTable(hyperparameter=name, reference_value=ref_value, rows=rows))
    if progress is not None:
        progress(total, total, "")
    if not reproduce:
        reproduce = (
            f"pytest_saliency.hyperparameter_sweep(model, inputs, {label!r}, sweep={jsonable(sweep)!r}, "
            f"reference={jsonable(reference)!r}, preset={pipeline.name!r}, seed={seed})"
        )
    return SweepResult(
        check="hyperparameter_stability", method=label, reference=reference, method_options=options,
        pipeline=pipeline, metrics=metrics, metric=metric, threshold=None if threshold is None else float(threshold),
        higher_is_better=higher, tables=tables, n_images=int(inputs.shape[0]), device=str(inputs.device),
        seed=reference_seed, targets=[int(t) for t in fixed_target.cpu()],
        target_policy="predicted class on the inputs (fixed)" if target is None else "given (fixed)",
        seconds=time.perf_counter() - start, reproduce=reproduce,
        reference_maps=None if ref_maps is None else ref_maps[:keep_maps].detach().cpu(),
        reference_attributions=ref_raw.cpu() if keep_attributions else None,
        target_tensor=fixed_target,
    )


def _default(resolved: Any, name: str, seed: int) -> Any:
    from ..maps.explainers import MethodSpec

    if name == "seed":
        return seed
    if isinstance(resolved, MethodSpec):
        return resolved.defaults.get(name, "default")
    try:
        parameter = inspect.signature(resolved).parameters.get(name)
    except (TypeError, ValueError):
        parameter = None
    return "default" if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _require_threshold(threshold: Any, check: str) -> None:
    if threshold is None:
        raise SaliencyUsageError(
            f"{check} needs threshold=... (the lowest acceptable mean similarity). SAM reports no pass/fail level and "
            "the right one depends on the metric and the map preset: run the sweep once without asserting "
            "(hyperparameter_sweep / input_noise_stability), read result.report(), and set the floor below the "
            "values you accept, e.g. threshold=0.8 for SSIM under sam2020."
        )


@rng_isolated
def assert_stable_under_hyperparameters(
    model: Any,
    inputs: Any,
    method: Any = "smoothgrad",
    sweep: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] | None = None,
    reference: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    metric: str = "ssim",
    metrics: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Fail when any swept value's mean similarity to the reference is below ``threshold``.

    The failure names the hyperparameter (or the joint setting), the value, the similarity and
    the threshold, and prints the full table; the report says that stability alone is not
    quality. ``metrics`` defaults to just ``metric`` (the verdict needs only it; pass
    ``metrics=("ssim", "spearman", "hog_pearson")`` for SAM's full table). Other keyword arguments
    are those of :func:`hyperparameter_sweep`.
    """
    __tracebackhide__ = True
    _require_threshold(threshold, "assert_stable_under_hyperparameters")
    result = hyperparameter_sweep(
        model, inputs, method, sweep, reference, metrics=(metric,) if metrics is None else metrics,
        threshold=threshold, metric=metric, **kwargs,
    )
    if not result.passed:
        raise SaliencyCheckFailed(result.failure_message(), result)
    return result


# --------------------------------------------------------------------------------------------
# input noise (SAM 4.1)
# --------------------------------------------------------------------------------------------

NOISES = ("gaussian",)


def add_input_noise(
    inputs: Any, variance: float = SAM_INPUT_NOISE_VARIANCE, clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0, draw: int = 0,
) -> Any:
    """``clip(x + N(0, variance))``: scikit-image's ``random_noise(x, "gaussian", var=variance)`` in torch.

    The noise comes from a local ``torch.Generator`` seeded by ``(seed, draw)``: no global RNG
    changes, and the same ``(seed, draw)`` gives the same standard-normal draw for every
    variance (common random numbers, so a variance sweep compares like with like).
    """
    torch = require_torch()
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise SaliencyUsageError(
            f"inputs must be a floating-point torch.Tensor, got {type(inputs).__name__} "
            f"{getattr(inputs, 'dtype', '')}. Convert with torch.as_tensor(x, dtype=torch.float32)."
        )
    variance = check_number(variance, "variance", low=0.0,
                            hint="It is the noise's variance, a squared std (SAM: 0.1 on [0, 1] images).")
    if clip is not None:
        clip = _check_clip(clip)
    seed = check_seed(seed)
    draw = check_count(draw, "draw", minimum=0, hint="It numbers the noisy copy: 0, 1, 2, ...")
    generator = torch.Generator(device=inputs.device).manual_seed(derive_seed(seed, "input_noise", draw))
    z = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
    noisy = inputs + math.sqrt(variance) * z
    return noisy if clip is None else noisy.clamp(clip[0], clip[1])


def _check_clip(clip: Any) -> tuple[float, float]:
    if not (isinstance(clip, Sequence) and len(clip) == 2 and all(is_real(c) for c in clip) and clip[0] < clip[1]):
        raise SaliencyUsageError(f"clip must be (low, high) with low < high, or None; got {clip!r}.")
    return float(clip[0]), float(clip[1])


def _check_noise_args(inputs: Any, noise: Any, variance: Any, clip: Any, n_draws: Any) -> list[float]:
    if not (noise in NOISES or callable(noise)):
        raise unknown_choice("noise", noise, NOISES, "Or pass a callable (inputs, seed, draw) -> noisy inputs.")
    variances = list(variance) if isinstance(variance, Sequence) and not isinstance(variance, str) else [variance]
    if not variances:
        raise SaliencyUsageError("variance is an empty list; pass a float such as 0.1 (SAM's value).")
    for v in variances:
        if not is_real(v):
            raise SaliencyUsageError(
                f"noise variance must be a finite float >= 0, got {v!r}. SAM's convention is variance=0.1 "
                "(std ~0.316) on [0, 1] images."
            )
        if v < 0:
            raise SaliencyUsageError(
                f"noise variance must be >= 0, got {v}; a variance is a squared std (SAM: 0.1, std ~0.316 on [0, 1] "
                "images). Pass a non-negative value."
            )
    if not (is_int(n_draws) and n_draws >= 1):
        raise SaliencyUsageError(f"n_draws must be a positive int (noisy copies per image), got {n_draws!r}.")
    if clip is not None:
        clip = _check_clip(clip)
        low, high = float(inputs.min()), float(inputs.max())
        if low < clip[0] or high > clip[1]:
            raise SaliencyUsageError(
                f"the inputs range over [{low:.4g}, {high:.4g}], outside clip={tuple(clip)}: clipping would change the "
                "clean inputs' range. SAM's convention is [0, 1] images; pass clip=(low, high) for your input scale, or "
                "clip=None (and scale variance to your inputs' units)."
            )
    return [float(v) for v in variances]


@rng_isolated
def input_noise_stability(
    model: Any,
    inputs: Any,
    method: Any = "saliency",
    *,
    noise: Any = "gaussian",
    variance: float | Sequence[float] = SAM_INPUT_NOISE_VARIANCE,
    clip: tuple[float, float] | None = (0.0, 1.0),
    n_draws: int = 1,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    preset: str | MapPipeline | None = DEFAULT_PRESET,
    target: Any = None,
    seed: int = 0,
    threshold: float | None = None,
    metric: str = "ssim",
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    cache: Any = None,
    reproduce: str = "",
    progress: Progress | None = None,
    **options: Any,
) -> SweepResult:
    """SAM 4.1: maps of x against maps of noisy x (``clip(x + N(0, variance))``), per image.

    Defaults are the SAM code's: ``skimage.util.random_noise(img, "gaussian", mean=0, var=0.1)``
    on [0, 1] images, which clips to [0, 1]: **variance** 0.1, i.e. std ~0.316 (the paper's
    "N(0, 0.1)"). The noise is seeded (``seed``; one local generator per draw). The target is the
    class predicted for the *clean* input, kept for the noisy copies; the explainer's own seed is
    the same for both. Per image, the similarity is averaged over ``n_draws`` noisy copies (SAM:
    one). ``variance`` may be a list (one row each). ``noise`` may be a callable
    ``(inputs, seed, draw) -> noisy inputs``. A robust model's maps should score higher.
    ``cache`` (a MapCache) lets the clean maps be shared with other checks; ``progress`` is
    called as ``progress(done, total, label)``.
    """
    torch = require_torch()
    from ..maps.explainers import method_name, resolve_target

    start = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    variances = _check_noise_args(inputs, noise, variance, clip, n_draws)
    resolved, label, pipeline, metrics, metric, higher = _setup_check(method, preset, metrics, metric, threshold)
    if not metrics:
        raise SaliencyUsageError("metrics is empty; pass e.g. metrics=('ssim', 'spearman', 'hog_pearson').")
    metric_options = dict(metric_options or {})
    seed = check_seed(seed)
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the images one explainer call sees; None explains all at once.")
    _check_names(label, resolved, options, "options")
    if "seed" in options:
        raise SaliencyUsageError("pass the explainer seed as seed=..., not as a method option.")
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    total = 1 + len(variances) * n_draws
    if progress is not None:
        progress(0, total, "clean inputs")
    clean_raw = _explain_setting(model, inputs, resolved, dict(options), fixed_target, seed, batch_size, cache)
    clean = apply_pipeline(clean_raw, pipeline)
    _warn_constant(clean, label)
    rows = []
    for index, v in enumerate(variances):
        per_draw: dict[str, list[list[float]]] = {m: [] for m in metrics}
        for draw in range(n_draws):
            if progress is not None:
                progress(1 + index * n_draws + draw, total, f"variance={v:g} draw {draw + 1}/{n_draws}")
            if callable(noise):
                noisy = noise(inputs, seed, draw)
                if not isinstance(noisy, torch.Tensor) or noisy.shape != inputs.shape:
                    raise SaliencyUsageError(
                        f"the noise callable returned {type(noisy).__name__} of shape "
                        f"{tuple(getattr(noisy, 'shape', ()))}; it must return a tensor shaped like the inputs."
                    )
            else:
                noisy = add_input_noise(inputs, v, None if clip is None else (float(clip[0]), float(clip[1])), seed, draw)
            raw = _explain_setting(model, noisy.detach(), resolved, dict(options), fixed_target, seed, batch_size)
            scores = _similarities(metrics, clean, apply_pipeline(raw, pipeline), pipeline, metric_options)
            for m in metrics:
                per_draw[m].append(scores[m])
        averaged = {m: [_nanmean([d[i] for d in per_draw[m]]) for i in range(inputs.shape[0])] for m in metrics}
        rows.append(SweepRow(value=v, seed=seed, scores=averaged))
    if progress is not None:
        progress(total, total, "")
    if not reproduce:
        reproduce = (
            f"pytest_saliency.input_noise_stability(model, inputs, {label!r}, variance={variance!r}, clip={clip!r}, "
            f"n_draws={n_draws}, preset={pipeline.name!r}, seed={seed})"
        )
    return SweepResult(
        check="input_noise_stability", method=label, reference={}, method_options=options, pipeline=pipeline,
        metrics=metrics, metric=metric, threshold=None if threshold is None else float(threshold),
        higher_is_better=higher, tables=[SweepTable("input_noise_variance", 0.0, rows)],
        n_images=int(inputs.shape[0]), device=str(inputs.device), seed=seed,
        targets=[int(t) for t in fixed_target.cpu()],
        target_policy="predicted class on the clean inputs (fixed)" if target is None else "given (fixed)",
        seconds=time.perf_counter() - start, reproduce=reproduce,
        noise={"kind": noise if isinstance(noise, str) else method_name(noise), "variance": variances,
               "std": [math.sqrt(v) for v in variances], "clip": None if clip is None else list(clip), "n_draws": n_draws},
        reference_maps=clean[:4].detach().cpu(), target_tensor=fixed_target,
    )


@rng_isolated
def assert_stable_under_input_noise(
    model: Any,
    inputs: Any,
    method: Any = "saliency",
    noise: Any = "gaussian",
    variance: float | Sequence[float] = SAM_INPUT_NOISE_VARIANCE,
    clip: tuple[float, float] | None = (0.0, 1.0),
    n_draws: int = 1,
    threshold: float | None = None,
    metric: str = "ssim",
    seed: int = 0,
    *,
    metrics: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Fail when the mean similarity between maps of x and of noisy x is below ``threshold``.

    See :func:`input_noise_stability` for the noise convention (SAM: variance 0.1 on [0, 1]
    images, clipped). ``metrics`` defaults to just ``metric``.
    """
    __tracebackhide__ = True
    _require_threshold(threshold, "assert_stable_under_input_noise")
    result = input_noise_stability(
        model, inputs, method, noise=noise, variance=variance, clip=clip, n_draws=n_draws,
        metrics=(metric,) if metrics is None else metrics, threshold=threshold, metric=metric, seed=seed, **kwargs,
    )
    if not result.passed:
        raise SaliencyCheckFailed(result.failure_message(), result)
    return result


__all__ = [
    "DEFAULT_METRICS", "DEFAULT_PRESET", "GRIDS", "STABILITY_NOTE", "SweepGrid", "SweepResult", "SweepRow",
    "SweepTable", "add_input_noise", "assert_stable_under_hyperparameters", "assert_stable_under_input_noise",
    "blurred_baseline", "hyperparameter_sweep", "input_noise_stability", "sam_grid", "slic_feature_masks",
    "uniform_baseline",
]
