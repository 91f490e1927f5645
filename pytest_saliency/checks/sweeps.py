"""Hyperparameter sweeps: the SAM protocol (Bansal, Agarwal & Nguyen, CVPR 2020), and the sweep
machinery and results that the input-noise check (:mod:`pytest_saliency.checks.input_noise`) shares.

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

**Built-in grids** (:func:`sam_grid`, :data:`GRIDS`, in :mod:`pytest_saliency.checks.sam_grids`)
reproduce SAM's sweeps, with pixel sizes scaled from SAM's 224 px inputs to the inputs' smaller side.

**Hyperparameters beyond the method's own options** (materialized here, then passed to captum):

* ``baselines="uniform"`` / ``"blurred"`` for methods with a ``baselines`` option (integrated
  gradients, deeplift, occlusion, feature_ablation): :func:`uniform_baseline` (one draw per
  image, uniform over the image's own range: the draw ``explain`` makes for it) and
  :func:`blurred_baseline` (Gaussian blur, sigma = 1/16 of the smaller side).
* ``n_segments`` for lime, kernel_shap and feature_ablation: per-image SLIC superpixels
  (:func:`slic_feature_masks`, scikit-image) instead of the default square grid.
* ``seed`` for every method (a no-op for deterministic ones: a useful control).

Custom explainer callables can be swept over ``seed`` and over their own keyword parameters.

**Streams.** :func:`hyperparameter_sweep` and :func:`assert_stable_under_hyperparameters` accept
an iterable of batches (a ``DataLoader``) as their inputs (:mod:`pytest_saliency.checks.streaming`):
each batch is swept in turn with the same settings and seed, and :func:`combine_sweep_results`
joins the batches' per-image similarities, so every mean, dataset mean and the verdict are those
of all the images; the reference maps shown are the first batch's. A grid scaled to the inputs
(:func:`sam_grid`) is scaled to each batch's images, which share their size. Raw attributions
(``keep_attributions=True``) are not kept for a stream.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeGuard

from ..core.forward import OutputSelector, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.torchtools import require_torch
from ..core.validation import (
    check_count,
    check_model,
    check_seed,
    check_threshold,
    checked_inputs,
    is_int,
    is_tensor_like,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError, raise_if_failed, warn_user
from ..maps.baselines import SAM_INPUT_SIZE, blurred_baseline, slic_feature_masks, uniform_baseline
from ..maps.explainers import attribute, resolved_options, run_captum
from ..maps.methods import EXTRA_OPTIONS, Explainer, MethodSpec, method_name, resolve_method
from ..maps.modality import check_metric_fits, current_modality, default_metrics, default_similarity, valid_positions
from ..maps.options import check_option_value, format_value
from ..maps.postprocess import MapPipeline, apply_pipeline, get_pipeline
from ..maps.targets import resolve_target
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .sam_grids import GRIDS, SweepGrid, sam_grid
from .streaming import StreamSpec, streams

if TYPE_CHECKING:
    import torch

    from ..maps.cache import MapCache

DEFAULT_METRICS = ("ssim", "spearman", "hog_pearson")
#: The top-k metrics' k when a sweep's metric_options give none: the top 10% of the features.
TOP_K = 0.1
#: The sweeps' default map pipeline: SAM's own (see the module docstring). The other checks default
#: to :data:`pytest_saliency.maps.postprocess.DEFAULT_PRESET`.
SWEEP_PRESET = "sam2020"
#: SAM code: skimage.feature.hog(h, pixels_per_cell=(16, 16)) on 224 px maps.
SAM_HOG_CELL = 16
STABILITY_NOTE = (
    "stability alone is not quality: an explainer that ignores the model (e.g. |input| or an edge "
    "detector) is perfectly stable. Pair this check with the randomization checks "
    "(assert_sensitive_to_layer_randomization) and a faithfulness score (deletion / insertion AUC)."
)
#: ``progress(done, total, label)``: called before each setting is explained, and once at the end.
Progress = Callable[[int, int, str], None]
#: ``{hyperparameter: [values]}`` (one at a time) or ``[{hyperparameter: value, ...}, ...]`` (joint settings).
SweepSpec = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]

#: Methods that can be swept over ``n_segments`` (per-image SLIC superpixels instead of a square grid).
SEGMENT_METHODS = ("lime", "kernel_shap", "feature_ablation")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def nanmean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN when there are none."""
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
    attributions: torch.Tensor | None = field(default=None, repr=False)  # raw maps, kept with keep_attributions=True

    def mean(self, metric: str) -> float:
        return nanmean(self.scores[metric])

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
        return [nanmean([row.scores[metric][i] for row in self.rows]) for i in range(n)]

    def dataset_mean(self, metric: str) -> float:
        """SAM's number: per image, the mean over swept values; then the mean over images."""
        return nanmean(self._per_image_means(metric))

    def dataset_std(self, metric: str) -> float:
        """SAM's spread: sqrt of the mean over images of each image's variance across swept values."""
        n = len(self.rows[0].scores[metric]) if self.rows else 0
        variances = [_nanstd([row.scores[metric][i] for row in self.rows]) ** 2 for i in range(n)]
        return math.sqrt(nanmean(variances)) if variances else math.nan

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
    reference_maps: torch.Tensor | None = field(default=None, repr=False)  # (k, H, W) first maps, for reports/plots
    reference_attributions: torch.Tensor | None = field(default=None, repr=False)
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
            return f"input noise {self.noise.get('kind', 'gaussian')} variance={format_value(row.value)}"
        if table.hyperparameter == "setting":
            return f"setting {format_value(row.value)}"
        return f"{table.hyperparameter}={format_value(row.value)}"

    def _reference_label(self) -> str:
        if self.check == "input_noise_stability":
            return "the clean inputs"
        shown = {k: v for k, v in self.reference.items()}
        return ", ".join(f"{k}={format_value(v)}" for k, v in shown.items()) or "the method's defaults"

    def numbers(self) -> dict[str, Number]:
        """The least stable value against the threshold, the failing values, the run's size and settings."""
        least = self.least_stable
        return {
            "metric": self.metric, "threshold": self.threshold, "higher_is_better": self.higher_is_better,
            "least_stable": None if least is None else self._label(*least),
            "least_stable_mean": None if least is None else least[1].mean(self.metric),
            "failing_values": len(self.failures), "n_images": self.n_images, "seed": self.seed,
            "method": self.method, "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """Mean similarity (std over images) per swept value, one plot per hyperparameter."""
        from ..reporting.figures import SweepSeries, sweep_figures

        failing = {id(row) for _, row in self.failures}
        series = [
            SweepSeries(name=t.hyperparameter, values=[r.value for r in t.rows],
                        means={m: [r.mean(m) for r in t.rows] for m in self.metrics},
                        stds={m: [r.std(m) for r in t.rows] for m in self.metrics},
                        failing=[id(r) in failing for r in t.rows], reference=t.reference_value)
            for t in self.tables
        ]
        return sweep_figures(series=series, metric=self.metric, threshold=self.threshold, method=self.method,
                             noise=self.check == "input_noise_stability")

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.threshold is None:
            verdict = "REPORT"
        worst = self.least_stable
        detail = ""
        if worst is not None:
            table, row = worst
            detail = f"least stable: {self._label(table, row)} with mean {self.metric} {format_score(row.mean(self.metric))}"
        bound = ""
        if self.threshold is not None:
            bound = f" vs {'>=' if self.higher_is_better else '<='} {format_threshold(self.threshold)}"
        return f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: {detail}{bound}; N = {self.n_images}"

    def table_text(self) -> str:
        lines = []
        for table in self.tables:
            head = "input noise (vs the clean inputs)" if self.check == "input_noise_stability" else (
                f"{table.hyperparameter} (reference {format_value(table.reference_value)})"
            )
            lines.append(f"    {head}")
            labels = [format_value(r.value) for r in table.rows]
            width = max([len("value")] + [len(x) for x in labels])
            cols = "  ".join(f"{m + ' mean +- std':>24}" for m in self.metrics)
            lines.append(f"      {'value':<{width}}  {cols}" + ("  verdict" if self.threshold is not None else ""))
            failing = {id(r) for _, r in self.failures}
            for label, row in zip(labels, table.rows):
                cells = []
                for m in self.metrics:
                    nan = row.nan_count(m)
                    extra = f" ({nan} NaN)" if nan else ""
                    cell = f"{format_score(row.mean(m)):>11} +- {format_score(row.std(m)):<7}{extra:>2}"
                    cells.append(cell.rjust(24))
                verdict = "" if self.threshold is None else ("UNSTABLE" if id(row) in failing else "ok")
                lines.append(f"      {label:<{width}}  {'  '.join(cells)}  {verdict}".rstrip())
            means = ", ".join(f"{m} {format_score(table.dataset_mean(m))}" for m in self.metrics)
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
        options = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(self.method_options.items())
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
            f"mean {self.metric} {format_score(row.mean(self.metric))} to the reference ({self._reference_label()}), "
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


def _layout(result: SweepResult) -> list[tuple[str, list[str]]]:
    """Each table's hyperparameter and swept values, as the report writes them."""
    return [(t.hyperparameter, [format_value(r.value) for r in t.rows]) for t in result.tables]


def combine_sweep_results(parts: Sequence[SweepResult]) -> SweepResult:
    """One result of the results of one sweep (or input-noise check) run batch by batch on the
    batches of a stream, in order: each swept value's per-image similarities concatenated, so the
    means, the tables' dataset means and the verdict are recomputed on every image; the targets
    concatenated; the image counts and seconds summed, the tensors the model wrote joined; the
    first batch's reference maps. Raw attributions are not kept. The batches must have been swept over the
    same values (a grid scaled to images of another size is refused)."""
    torch = require_torch()
    if not parts:
        raise SaliencyUsageError("combine_sweep_results needs the result of at least one batch.")
    first = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if _layout(part) != _layout(first) or part.metrics != first.metrics:
            raise SaliencyUsageError(
                f"batch {index} of the inputs was swept over other values or metrics than batch 0 ({_layout(part)!r:.120} "
                f"vs {_layout(first)!r:.120}); the batches of one check must have the same shapes (a grid is scaled "
                "to the images' size)."
            )
    tables = [
        replace(table, rows=[
            replace(row, attributions=None, scores={
                metric: [v for part in parts for v in part.tables[t].rows[r].scores[metric]] for metric in row.scores})
            for r, row in enumerate(table.rows)])
        for t, table in enumerate(first.tables)
    ]
    target_tensors = [part.target_tensor for part in parts]
    joined_targets = torch.cat([t.reshape(-1) for t in target_tensors]) if all(
        isinstance(t, torch.Tensor) for t in target_tensors) else first.target_tensor
    return replace(
        first, tables=tables, n_images=sum(part.n_images for part in parts),
        targets=[t for part in parts for t in part.targets], target_tensor=joined_targets,
        seconds=sum(part.seconds for part in parts), reference_attributions=None,
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
    )


def slim_sweep_result(part: SweepResult) -> SweepResult:
    """A batch's result with only its per-image numbers: no reference maps, no raw attributions
    (what a stream keeps of its later batches)."""
    return replace(part, reference_maps=None, reference_attributions=None,
                   tables=[replace(t, rows=[replace(r, attributions=None) for r in t.rows]) for t in part.tables])


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


def _valid_names(resolved: MethodSpec | Explainer) -> tuple[list[str], bool]:
    """The hyperparameters ``resolved`` can be swept over, and whether it takes any (``**kwargs``)."""
    if isinstance(resolved, MethodSpec):
        names = set(resolved.defaults) | set(EXTRA_OPTIONS.get(resolved.name, ())) | {"seed"}
        if resolved.name in SEGMENT_METHODS:
            names.add("n_segments")
        return sorted(names), False
    names, var_kw = _callable_parameters(resolved)
    return sorted(names | {"seed"}), var_kw


def check_hyperparameters(label: str, resolved: MethodSpec | Explainer, setting: Mapping[str, Any], where: str) -> None:
    """Refuse a hyperparameter that method ``label`` does not take, or a value its option rules refuse.

    ``where`` names the argument in the message: ``"reference"``, ``"options"``, ``"sweep"``.
    """
    valid, open_ended = _valid_names(resolved)
    for name in setting:
        if not isinstance(name, str):
            raise SaliencyUsageError(f"{where}: hyperparameter names must be strings, got {name!r}.")
        if name not in valid and not open_ended:
            hint = "" if isinstance(resolved, MethodSpec) else (
                " A custom explainer can be swept over 'seed' and over its own keyword parameters."
            )
            raise SaliencyUsageError(
                f"{where}: unknown hyperparameter {name!r} for method {label!r}; valid hyperparameters: "
                f"{', '.join(valid)}.{hint}"
            )
        check_option_value(label, name, setting[name], where)


def _per_input(value: object, inputs: torch.Tensor) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a tensor with one entry per input (of several)."""
    torch = require_torch()
    return (isinstance(value, torch.Tensor) and value.dim() == inputs.dim()
            and value.shape[0] == inputs.shape[0] > 1)


def _check_occlusion_window(native: Mapping[str, Any], inputs: torch.Tensor) -> None:
    """Refuse an occlusion window larger than the images, or a stride larger than the window."""
    window: Any = native.get("window")
    stride: Any = native.get("stride")
    if not (is_int(window) and inputs.dim() == 4):
        return
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


def _split_setting(
    resolved: MethodSpec | Explainer, setting: dict[str, Any], inputs: torch.Tensor, seed: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Native options for captum, and per-image tensors (materialized baselines, SLIC masks)."""
    native = {k: v for k, v in setting.items() if k != "seed"}
    per_image: dict[str, torch.Tensor] = {}
    if not isinstance(resolved, MethodSpec):
        return native, per_image
    kind = native.get("baselines")
    if isinstance(kind, str) and kind in ("uniform", "blurred"):
        native.pop("baselines")
        per_image["baselines"] = (uniform_baseline(inputs, seed, method=resolved.name) if kind == "uniform"
                                  else blurred_baseline(inputs))
    elif _per_input(kind, inputs):
        native.pop("baselines")
        per_image["baselines"] = kind.to(inputs.device)
    if "n_segments" in native:
        per_image["feature_mask"] = slic_feature_masks(inputs, int(native.pop("n_segments")))
    if _per_input(native.get("feature_mask"), inputs):
        per_image["feature_mask"] = native.pop("feature_mask").to(inputs.device)
    _check_occlusion_window(native, inputs)
    return native, per_image


def _per_image_explainer(
    spec: MethodSpec, options: dict[str, Any], per_image: dict[str, torch.Tensor], seed: int
) -> Explainer:
    """An explainer that gives captum the per-image tensors of the chunk ``attribute`` hands it.

    Chunks come in order, so ``offset`` is the chunk's first index in the inputs: with ``seed`` it
    seeds each image's random draws, and :func:`pytest_saliency.maps.explainers.run_captum` takes the
    rows of a per-input baseline by it; feature masks are sliced here.
    """
    offset = 0
    one_at_a_time = spec.name in ("lime", "kernel_shap") and "feature_mask" in per_image

    def run(model: torch.nn.Module, chunk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        n = chunk.shape[0]
        first = offset
        sliced = {k: v if k == "baselines" else v[first:first + n] for k, v in per_image.items()}
        offset += n
        if not one_at_a_time:
            return run_captum(spec, model, chunk, target, {**options, **sliced}, seed=seed, index=first)
        # captum's Lime takes one feature mask per call: explain image by image (it loops anyway).
        return require_torch().cat([
            run_captum(spec, model, chunk[i:i + 1], target[i:i + 1],
                        {**options, **{k: v if k == "baselines" else v[i:i + 1] for k, v in sliced.items()}},
                        seed=seed, index=first + i)
            for i in range(n)
        ])

    run.__name__ = spec.name
    return run


def _explain_setting(
    model: torch.nn.Module, inputs: torch.Tensor, resolved: MethodSpec | Explainer, setting: dict[str, Any],
    target: torch.Tensor, seed: int, batch_size: int | None, cache: MapCache | None = None,
) -> torch.Tensor:
    """Raw attributions at one setting; reused from ``cache`` when it holds them."""
    key = None
    if cache is not None and isinstance(resolved, MethodSpec) and not any(is_tensor_like(v) for v in setting.values()):
        key = cache.key(model, inputs, target, resolved.name, {k: v for k, v in setting.items() if k != "seed"},
                        seed, batch_size)
        hit = cache.get(key)
        if hit is not None:
            return hit
    raw = _compute_setting(model, inputs, resolved, setting, target, seed, batch_size)
    if cache is not None and key is not None:
        cache.put(key, raw)
    return raw


def _compute_setting(
    model: torch.nn.Module, inputs: torch.Tensor, resolved: MethodSpec | Explainer, setting: dict[str, Any],
    target: torch.Tensor, seed: int, batch_size: int | None,
) -> torch.Tensor:
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
    if not native:
        return attribute(model, inputs, resolved, target, seed, batch_size, True, {})
    explainer = functools.partial(resolved, **native)
    explainer.__name__ = method_name(resolved)  # type: ignore[attr-defined]  # the name the report shows
    return attribute(model, inputs, explainer, target, seed, batch_size, True, {})


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _check_metrics(
    metrics: str | Sequence[str], metric: str, threshold: float | None
) -> tuple[tuple[str, ...], bool]:
    from ..compare.metrics import METRICS

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
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


def setup_check(
    method: str | Explainer, preset: str | MapPipeline | None, metrics: str | Sequence[str] | None,
    metric: str | None, threshold: float | None,
) -> tuple[MethodSpec | Explainer, str, MapPipeline, tuple[str, ...], str, bool]:
    """``(resolved method, label, pipeline, metrics, summary metric, higher_is_better)`` of a sweep check.

    ``metrics`` and ``metric`` default to the modality's (:mod:`pytest_saliency.maps.modality`).
    The sweeps' preset ``"sam2020"`` is SAM's convention for each method: for Meaningful
    Perturbation's masks, ``"sam2020_mp"`` (the mask as it is, SSIM ``data_range=1``).
    """
    resolved = resolve_method(method)
    label = resolved.name if isinstance(resolved, MethodSpec) else method_name(method)
    if preset == SWEEP_PRESET and label == "meaningful_perturbation":
        preset = "sam2020_mp"
    pipeline = get_pipeline(preset)
    metric = default_similarity(metric)
    metrics = default_metrics(metrics)
    metric_names, higher = _check_metrics(metrics, metric, threshold)
    for name in metric_names:
        check_metric_fits(name)
    if threshold is None and metric not in metric_names and metric_names:
        metric = metric_names[0]  # no verdict: summarize with the first metric asked for
        higher = _higher_is_better(metric)
    return resolved, label, pipeline, metric_names, metric, higher


def with_default_k(metric_options: Any, metrics: Sequence[str]) -> Any:
    """``metric_options`` with ``k`` = :data:`TOP_K` for each top-k metric they give no options for."""
    from ..compare.metrics import METRICS

    if metric_options is not None and not isinstance(metric_options, Mapping):
        return metric_options  # check_metric_options says what is wrong with it
    given = dict(metric_options or {})
    defaults = {m: {"k": TOP_K} for m in metrics if m in METRICS and METRICS[m].takes_k and m not in given}
    return {**defaults, **given}


def _higher_is_better(metric: str) -> bool:
    from ..compare.metrics import METRICS

    return METRICS[metric].higher_is_better


def _metric_kwargs(name: str, pipeline: MapPipeline, maps: torch.Tensor, user: Mapping[str, Any]) -> dict[str, Any]:
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
    metrics: Sequence[str], reference: torch.Tensor, maps: torch.Tensor, pipeline: MapPipeline,
    metric_options: Mapping[str, Any],
) -> dict[str, list[float]]:
    from ..compare.metrics import compute_on_valid

    out = {}
    valid = valid_positions(reference)  # token maps: padding left out
    for name in metrics:
        values = compute_on_valid(name, reference, maps, valid,
                                  **_metric_kwargs(name, pipeline, reference, metric_options))
        out[name] = [float(v) for v in values.double().cpu()]
    return out


def _warn_constant(maps: torch.Tensor, label: str) -> None:
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


@dataclass
class SettingRunner:
    """What stays fixed for every setting of a sweep: the model, the method, the targets, the
    batch size, the map pipeline and the similarity measures. :meth:`attributions` explains inputs
    at one setting; :meth:`scores` compares a setting's maps with the reference maps, per image."""

    model: torch.nn.Module
    resolved: MethodSpec | Explainer
    label: str
    target: torch.Tensor
    batch_size: int | None
    pipeline: MapPipeline
    metrics: tuple[str, ...]
    metric_options: Mapping[str, Mapping[str, Any]]
    cache: MapCache | None = None

    def attributions(self, inputs: torch.Tensor, setting: dict[str, Any], seed: int, *,
                     cached: bool = True) -> torch.Tensor:
        """Raw attributions of ``inputs`` at ``setting``; from the map cache when ``cached`` and it holds them."""
        return _explain_setting(self.model, inputs, self.resolved, setting, self.target, seed, self.batch_size,
                                self.cache if cached else None)

    def reference_maps(self, raw: torch.Tensor) -> torch.Tensor:
        """The reference's maps, with a warning for constant ones (no similarity to them means anything)."""
        maps = apply_pipeline(raw, self.pipeline)
        _warn_constant(maps, self.label)
        return maps

    def scores(self, reference_maps: torch.Tensor | None, raw: torch.Tensor) -> dict[str, list[float]]:
        """Per metric, each image's similarity between its reference map and its map in ``raw``."""
        if reference_maps is None or not self.metrics:
            return {}
        maps = apply_pipeline(raw, self.pipeline)
        return _similarities(self.metrics, reference_maps, maps, self.pipeline, self.metric_options)


def no_progress(done: int, total: int, label: str) -> None:
    """A :data:`Progress` callback that shows nothing."""


def require_threshold(threshold: float | None, check: str) -> None:
    """Refuse an assertion without a threshold: SAM gives none, and the right one depends on the setup."""
    if threshold is None:
        raise SaliencyUsageError(
            f"{check} needs threshold=... (the lowest acceptable mean similarity). SAM reports no pass/fail level and "
            "the right one depends on the metric and the map preset: run the sweep once without asserting "
            "(hyperparameter_sweep / input_noise_stability), read result.report(), and set the floor below the "
            "values you accept, e.g. threshold=0.8 for SSIM under sam2020."
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
                shown = format_value(values) if is_tensor_like(values) else repr(values)  # a tensor: its shape
                raise SaliencyUsageError(
                    f"sweep[{name!r}] must be a list of values, got {shown}. Wrap a single value: "
                    f"sweep={{{name!r}: [{shown}]}}."
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


def _resolve_grid(
    method: str | Explainer | SweepGrid, sweep: SweepSpec | None, reference: Mapping[str, Any] | None,
    options: dict[str, Any], inputs: torch.Tensor,
) -> tuple[str | Explainer, Any, Mapping[str, Any] | None, dict[str, Any]]:
    """``(method, sweep, reference, options)``, taken from a grid (or a grid's name) where not given."""
    if isinstance(method, SweepGrid):
        grid = method
    elif sweep is None and isinstance(method, str) and method in GRIDS:
        modality = current_modality().name
        if modality != "image":
            raise SaliencyUsageError(
                f"SAM's grid for {method!r} is for images (blurred and uniform baselines, windows and superpixels in "
                f"pixels), and these inputs are {modality}. Pass sweep={{'<hyperparameter>': [values]}}, e.g. "
                "sweep={'n_steps': [16, 64]} for integrated_gradients or {'window': [2, 4, 8]} for occlusion."
            )
        grid = sam_grid(method, tuple(inputs.shape))
    elif sweep is None:
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


def _check_sweep_names(
    label: str, resolved: MethodSpec | Explainer, reference: dict[str, Any], options: dict[str, Any],
    tables: list[tuple[str, list[Any]]],
) -> None:
    """Every hyperparameter is one the method takes, and each is either swept from the reference or fixed."""
    check_hyperparameters(label, resolved, reference, "reference")
    check_hyperparameters(label, resolved, options, "options")
    if "seed" in options:
        raise SaliencyUsageError("pass the seed as seed=... or inside reference, not as a method option.")
    both = sorted(set(reference) & set(options))
    if both:
        raise SaliencyUsageError(
            f"{both} given both in reference and as fixed options; name each hyperparameter once "
            "(reference values are the ones the sweep changes)."
        )
    for name, values in tables:
        settings = values if name == "setting" else [{name: v} for v in values]
        for setting in settings:
            check_hyperparameters(label, resolved, setting, "sweep")
            fixed = sorted(set(setting) & set(options))
            if fixed:
                raise SaliencyUsageError(
                    f"{fixed} are swept but also given as fixed options; move the fixed value into reference={{...}}."
                )


def _swept_setting(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    """The reference setting with one hyperparameter changed (or, for ``"setting"``, a joint setting)."""
    return {**base, **value} if name == "setting" else {**base, name: value}


def _sweep_row(
    runner: SettingRunner, inputs: torch.Tensor, setting: dict[str, Any], value: Any, reference_seed: int,
    reference_maps: torch.Tensor | None, keep_attributions: bool,
) -> SweepRow:
    """One swept value, explained with the reference's seed (unless ``seed`` is what is swept) and
    compared with the reference maps."""
    seed = int(setting.get("seed", reference_seed))
    raw = runner.attributions(inputs, setting, seed)
    return SweepRow(value=value, seed=seed, scores=runner.scores(reference_maps, raw),
                    attributions=raw.cpu() if keep_attributions else None)


def _reference_value(
    resolved: MethodSpec | Explainer, reference: Mapping[str, Any], name: str, values: list[Any], seed: int
) -> Any:
    """A table's reference value: the swept hyperparameter's (the joint setting's) value at the reference."""
    if name == "setting":
        return {k: reference.get(k, _default(resolved, k, seed)) for k in values[0]}
    return reference.get(name, _default(resolved, name, seed))


def _prepare_sweep(arguments: dict[str, Any], seen: int) -> dict[str, Any]:
    """Refuse ``keep_attributions`` for a stream; nothing else changes from batch to batch."""
    if arguments["keep_attributions"]:
        raise SaliencyUsageError(
            "keep_attributions=True keeps the raw attributions of every input at every setting, and a loader's "
            "inputs are streamed so that they need not all be in memory at once. Leave keep_attributions off with "
            "a loader (the per-image similarities are kept); accuracy_spread takes the loader itself and scores "
            "each batch's maps as they are made. Or pass an inputs tensor."
        )
    return {}


def _combined_sweep(parts: list[SweepResult], arguments: dict[str, Any], stopped: str) -> SweepResult:
    """The stream's result (:func:`combine_sweep_results`): the verdict follows from the rows' means."""
    return combine_sweep_results(parts)


@rng_isolated
@streams(StreamSpec(_combined_sweep, slim_sweep_result, _prepare_sweep,
                     shard_tensor=lambda arguments: not arguments["keep_attributions"]))
@passes_model_call
def hyperparameter_sweep(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    method: str | Explainer | SweepGrid = "smoothgrad",
    sweep: SweepSpec | None = None,
    reference: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | str | None = None,
    *,
    preset: str | MapPipeline | None = SWEEP_PRESET,
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    threshold: float | None = None,
    metric: str | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    keep_attributions: bool = False,
    keep_maps: int = 4,
    cache: MapCache | None = None,
    reproduce: str = "",
    progress: Progress | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **options: Any,
) -> SweepResult:
    """Explain at the reference and at each swept value; per-image similarity to the reference.

    Args:
        model, inputs: as for :func:`pytest_saliency.explain`; ``inputs`` may also be an iterable
            of batches such as a ``DataLoader`` (:mod:`pytest_saliency.checks.streaming`: each
            batch swept in turn, the per-image similarities of all of them in one result).
        method: a method name, a custom explainer ``(model, inputs, target, **kw)``, or a
            :class:`SweepGrid` (then ``sweep``/``reference`` default to the grid's).
        sweep: ``{"nt_samples": [100, 200]}`` (each value changed alone, the others at the
            reference; one table per hyperparameter), or a list of dicts, each a *joint* setting
            compared with the reference (one table, ``"setting"``). ``None``: SAM's grid for
            ``method`` (:func:`sam_grid`, scaled to the inputs), where there is one.
        reference: the reference setting; hyperparameters not named keep the method's defaults.
            ``"seed"`` may be part of it (else ``seed``).
        metrics: similarity measures of :mod:`pytest_saliency.compare.metrics` (map-level ones);
            ``None``: the modality's (SSIM, Spearman and HOG-Pearson for images; SSIM and
            Spearman for series; Spearman and top-k feature agreement for tabular and text).
        preset: the map pipeline; ``sam2020`` (SAM's) by default, see the module docstring.
        target: ``None`` = each input's predicted class, fixed for every setting.
        threshold, metric: with a threshold the result has a verdict: every swept value's mean
            ``metric`` must be >= threshold (<= for distances such as ``l1_distance``); ``metric``
            defaults to the modality's comparison (SSIM; Spearman for tabular and text).
        metric_options: per-metric keyword arguments, e.g. ``{"hog_pearson": {"pixels_per_cell": (4, 4)}}``;
            a top-k metric without options takes ``k`` = :data:`TOP_K` (the top 10%).
        batch_size: images per explainer call (memory bound).
        keep_attributions: keep every setting's raw attributions (for
            :func:`pytest_saliency.checks.faithfulness.accuracy_spread`); refused for a stream.
        cache: a :class:`pytest_saliency.maps.cache.MapCache`: settings already explained for the same
            model (fingerprint), inputs, targets, options and seed are reused (named methods,
            no tensor-valued options). Pass one to a hypothesis test so that the reference is
            explained once, not once per example.
        **options: method options fixed at every setting (not swept), e.g. ``perturbations_per_eval``.

    The model is left exactly as it was and no global RNG state changes.
    """
    from ..compare.metrics import check_metric_options

    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    method, sweep, reference, options = _resolve_grid(method, sweep, reference, dict(options), inputs)
    resolved, label, pipeline, metric_names, metric, higher = setup_check(method, preset, metrics, metric, threshold)
    checked_options = check_metric_options(with_default_k(metric_options, metric_names), metric_names)
    seed = check_seed(seed)
    keep_maps = check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the images one explainer call sees; None explains all at once.")
    reference = dict(reference or {})
    tables_spec = _normalize_sweep(sweep, label)
    _check_sweep_names(label, resolved, reference, options, tables_spec)
    reference_seed = int(reference.get("seed", seed))
    base = {**options, **reference}
    progress = progress or no_progress
    total = 1 + sum(len(values) for _, values in tables_spec)
    progress(0, total, "reference")
    # SAM's protocol: the targets and the seed stay fixed; each swept value is compared with the
    # reference's maps, one hyperparameter at a time.
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    runner = SettingRunner(model, resolved, label, fixed_target, batch_size, pipeline, metric_names, checked_options,
                           cache)
    ref_raw = runner.attributions(inputs, base, reference_seed)
    ref_maps = runner.reference_maps(ref_raw) if metric_names else None
    tables = []
    done = 1
    for name, values in tables_spec:
        rows = []
        for value in values:
            progress(done, total, f"{name}={format_value(value)}")
            rows.append(_sweep_row(runner, inputs, _swept_setting(base, name, value), value, reference_seed, ref_maps,
                                   keep_attributions))
            done += 1
        ref_value = _reference_value(resolved, reference, name, values, reference_seed)
        tables.append(SweepTable(hyperparameter=name, reference_value=ref_value, rows=rows))
    progress(total, total, "")
    if not reproduce:
        reproduce = (
            f"pytest_saliency.hyperparameter_sweep(model, inputs, {label!r}, sweep={jsonable(sweep)!r}, "
            f"reference={jsonable(reference)!r}, preset={pipeline.name!r}, seed={seed})"
        )
    return SweepResult(
        check="hyperparameter_stability", method=label, reference=reference, method_options=options,
        pipeline=pipeline, metrics=metric_names, metric=metric,
        threshold=None if threshold is None else float(threshold), higher_is_better=higher, tables=tables,
        n_images=int(inputs.shape[0]), device=str(inputs.device), seed=reference_seed,
        targets=[int(t) for t in fixed_target.cpu()],
        target_policy="predicted class on the inputs (fixed)" if target is None else "given (fixed)",
        seconds=time.perf_counter() - start, reproduce=reproduce,
        reference_maps=None if ref_maps is None else ref_maps[:keep_maps].detach().cpu(),
        reference_attributions=ref_raw.cpu() if keep_attributions else None,
        target_tensor=fixed_target,
    )


def _default(resolved: MethodSpec | Explainer, name: str, seed: int) -> Any:
    """The value hyperparameter ``name`` has when not set: the method's default, or ``"default"``."""
    if name == "seed":
        return seed
    if isinstance(resolved, MethodSpec):
        return resolved.defaults.get(name, "default")
    try:
        parameter = inspect.signature(resolved).parameters.get(name)
    except (TypeError, ValueError):
        parameter = None
    return "default" if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


@rng_isolated
@passes_model_call
def assert_stable_under_hyperparameters(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    method: str | Explainer | SweepGrid = "smoothgrad",
    sweep: SweepSpec | None = None,
    reference: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    metric: str | None = None,
    metrics: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Fail when any swept value's mean similarity to the reference is below ``threshold``.

    The failure names the hyperparameter (or the joint setting), the value, the similarity and
    the threshold, and prints the full table; the report says that stability alone is not
    quality. ``metrics`` defaults to just ``metric`` (the verdict needs only it; pass
    ``metrics=("ssim", "spearman", "hog_pearson")`` for SAM's full table). Other keyword arguments
    are those of :func:`hyperparameter_sweep`; ``inputs`` may be an iterable of batches
    (:mod:`pytest_saliency.checks.streaming`).
    """
    __tracebackhide__ = True
    require_threshold(threshold, "assert_stable_under_hyperparameters")
    metric = default_similarity(metric)
    result = hyperparameter_sweep(
        model, inputs, method, sweep, reference, metrics=(metric,) if metrics is None else metrics,
        threshold=threshold, metric=metric, **kwargs,
    )
    return raise_if_failed(result)


__all__ = [
    "DEFAULT_METRICS", "GRIDS", "STABILITY_NOTE", "SWEEP_PRESET", "SweepGrid", "SweepResult", "SweepRow", "SweepTable",
    "assert_stable_under_hyperparameters", "blurred_baseline", "combine_sweep_results", "hyperparameter_sweep",
    "sam_grid", "slic_feature_masks", "slim_sweep_result", "uniform_baseline", "with_default_k", "TOP_K",
]
