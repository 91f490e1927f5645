"""Agreement between explanation methods: a method-by-method matrix and its gate,
:func:`pytest_saliency.checks.assertions.assert_agreement_above`.

Every method explains the same inputs for the same targets (the model's predictions, resolved
once). Which maps a metric sees depends on what it measures:

* **signed maps** (attributions summed over channels, sign and scale kept) for the top-k
  metrics, rank and linear correlations, cosine and angle: top-k is taken by ``|value|`` and
  the sign metrics need the sign, so no absolute value or clipping may come first;
* **preset maps** (the session's :class:`~pytest_saliency.maps.postprocess.MapPipeline`) for SSIM,
  HOG-Pearson, L1 and Jensen-Shannon: these need a fixed value range, and SSIM uses the preset's
  window and data range.

Each pair's per-image values are summarized by their mean, standard deviation and a seeded
bootstrap interval, and printed next to the metric's chance level: an FA of 0.10 at the top 10%
is exactly what two unrelated maps give.

Constant maps
    A map whose ``|values|`` are all equal (e.g. all zero: a ReLU'd GradCAM that found nothing, a
    model that ignores its input) carries no ranking. Such images are left out of the ranking
    metrics (the top-k metrics, pairwise rank agreement, rank correlations by magnitude), as a
    correlation with a constant map is undefined and left out; both are counted per pair
    (``undefined``) and the constant maps per method (``constant_maps``). When a pair has no
    image left under a metric, the check is refused with :class:`SaliencyCheckFailed`: the data
    or the model is at fault (every map of a method is constant), not the call, and any number
    would be made up.
Chance level
    Two numbers: the theoretical one (:func:`pytest_saliency.compare.metrics.chance_level`, the value for
    independent maps with exchangeable features) and one *measured* on these maps: the same
    metric between method a's map of input i and method b's map of input i-1 (as the
    seed-consistency report does), which picks up what every map of the data set shares (e.g. a
    bright centre). The pair's ``chance`` is the stricter of the two (the higher, or the lower
    for distances and angles), and the default gate of
    :func:`pytest_saliency.checks.assertions.assert_agreement_above` must beat it. With one image
    nothing can be measured and the theoretical value stands.
Iterable of batches
    :func:`agreement_matrix` takes a ``DataLoader`` as its inputs
    (:mod:`pytest_saliency.checks.streaming`): each batch is explained and compared in turn; the
    result holds every image's values, the statistics and the verdict on all of them, the
    constant maps counted over all batches, the chance level measured within each batch (input
    i against input i-1 of the same batch) averaged over the batches by size, and the maps of
    the first batch. A pair with no image left is refused only when no batch has one.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..compare.statistics import bootstrap_interval
from ..core.forward import OutputSelector, passes_model_call
from ..core.integrity import rng_isolated, short_usage_errors
from ..core.rng import as_seed
from ..core.stream import previous_rows
from ..core.validation import (
    check_choice,
    check_count,
    check_model,
    check_number,
    check_progress,
    checked_inputs,
)
from ..exceptions import SaliencyCheckFailed, SaliencyUsageError
from ..maps.explainers import attribute, prepare_method
from ..maps.methods import method_name
from ..maps.modality import (
    WINDOW_METRICS,
    check_metric_fits,
    current_modality,
    figure_context,
    valid_positions,
)
from ..maps.postprocess import MapPipeline, apply_pipeline, get_pipeline
from ..maps.targets import resolve_target
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .streaming import StreamSpec, same_across_batches, streams, weighted_mean

if TYPE_CHECKING:
    import torch

    from ..compare.metrics import KValue
    from ..core.stream import Inputs
    from ..maps.methods import Explainer

PRESET_METRICS = ("ssim", "hog_pearson", "l1_distance", "jensen_shannon_divergence")
DEFAULT_METRICS = ("feature_agreement", "sign_agreement", "rank_correlation", "ssim")
#: How many inputs' series, feature names or tokens a result keeps for its figures.
SHOWN_INPUTS = 8
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PairAgreement:
    """One metric for one pair of methods, over the images."""

    method_a: str
    method_b: str
    metric: str
    values: list[float]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    chance: float | None  # the stricter of chance_theory and chance_measured
    undefined: int = 0  # images left out: a constant map (no ranking) or an undefined correlation
    chance_theory: float | None = None  # metrics.chance_level: independent maps, exchangeable features
    chance_measured: float | None = None  # the metric on maps of different inputs; None when N == 1
    chance_pairs: int = 0  # the pairs of different inputs chance_measured is the mean over

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["values"] = [None if math.isnan(v) else v for v in self.values]  # strict JSON has no NaN
        for key in ("mean", "std", "ci_low", "ci_high", "chance", "chance_theory", "chance_measured"):
            data[key] = None if data[key] is None or math.isnan(data[key]) else data[key]
        return data

    def chance_text(self) -> str:
        """The chance level and where it comes from, e.g. ``0.178 (theory 0.100, different inputs 0.178)``."""
        def fmt(value: float | None) -> str:
            return format_score(value, 3)  # as the HTML report writes chance levels

        measured = "not measured (N = 1)" if self.chance_measured is None else f"different inputs {fmt(self.chance_measured)}"
        return f"{fmt(self.chance)} (theory {fmt(self.chance_theory)}, {measured})"


@dataclass
class AgreementResult:
    """Every pair of methods under every metric; ``to_dict()`` is JSON-serializable."""

    methods: list[str]
    metrics: list[str]
    pairs: list[PairAgreement]
    k: float | int
    pipeline: MapPipeline
    n_images: int
    device: str
    seed: int
    confidence: float
    seconds: float
    threshold: float | None = None
    statistic: str = "mean"
    reproduce: str = ""
    maps: dict[str, Any] = field(default_factory=dict, repr=False)  # method -> (N, H, W) preset maps
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # see maps.modality
    # True: each pair must beat the stricter of ``threshold`` and its measured chance level (the
    # default gate of assert_agreement_above, which sets ``threshold`` to the theoretical chance).
    beat_chance: bool = False
    constant_maps: dict[str, int] = field(default_factory=dict)  # method -> maps with constant |values|

    check = "method_agreement"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    def pair(self, a: str, b: str, metric: str) -> PairAgreement:
        for p in self.pairs:
            if p.metric == metric and {p.method_a, p.method_b} == {a, b}:
                return p
        raise SaliencyUsageError(f"no result for the pair ({a!r}, {b!r}) under metric {metric!r}.")

    def matrix(self, metric: str) -> list[list[float | None]]:
        """Method x method means (diagonal: None, a method compared with itself is not computed)."""
        index = {m: i for i, m in enumerate(self.methods)}
        grid: list[list[float | None]] = [[None] * len(self.methods) for _ in self.methods]
        for p in self.pairs:
            if p.metric == metric:
                grid[index[p.method_a]][index[p.method_b]] = grid[index[p.method_b]][index[p.method_a]] = p.mean
        return grid

    def _value(self, p: PairAgreement) -> float:
        from ..compare.metrics import METRICS

        if self.statistic == "mean":
            return p.mean
        return p.ci_low if METRICS[p.metric].higher_is_better else p.ci_high

    def required(self, p: PairAgreement) -> float | None:
        """The value pair ``p`` must beat: ``threshold``, or with ``beat_chance`` the stricter of
        ``threshold`` and the pair's measured chance level."""
        from ..compare.metrics import METRICS

        if self.threshold is None:
            return None
        if not self.beat_chance or p.chance_measured is None or math.isnan(p.chance_measured):
            return self.threshold
        stricter = max if METRICS[p.metric].higher_is_better else min
        return stricter(self.threshold, p.chance_measured)

    def failing_pairs(self) -> list[PairAgreement]:
        from ..compare.metrics import METRICS

        if self.threshold is None:
            return []
        failing = []
        for p in self.pairs:
            value, required = self._value(p), self.required(p)
            higher = METRICS[p.metric].higher_is_better
            ok = required is not None and (value > required if higher else value < required)
            if not ok or math.isnan(value):
                failing.append(p)
        return failing

    @property
    def passed(self) -> bool:
        return not self.failing_pairs()

    def to_dict(self) -> dict[str, Any]:
        failing = {id(p) for p in self.failing_pairs()}
        return {
            "model_writes": list(self.model_writes),
            "check": self.check,
            "passed": self.passed,
            "methods": self.methods,
            "metrics": self.metrics,
            "k": self.k,
            "preset": self.pipeline.to_dict(),
            "pairs": [{**p.to_dict(), "required": self.required(p), "failing": id(p) in failing} for p in self.pairs],
            "matrices": {m: self.matrix(m) for m in self.metrics},
            "constant_maps": dict(self.constant_maps),
            "beat_chance": self.beat_chance,
            "threshold": self.threshold,
            "statistic": self.statistic,
            "n_images": self.n_images,
            "device": self.device,
            "seed": self.seed,
            "confidence": self.confidence,
            "seconds": self.seconds,
            "reproduce": self.reproduce,
        }

    def table(self) -> str:
        """One row per pair and metric: mean, spread, interval, chance level (and its sources), verdict."""
        failing = {id(p) for p in self.failing_pairs()}
        width = max(len(f"{p.method_a} vs {p.method_b}") for p in self.pairs)
        mwidth = max(len(m) for m in self.metrics)
        lines = [f"    {'pair':<{width}}  {'metric':<{mwidth}}    mean    std   {self.confidence:.0%} CI          "
                 "chance (theory, different inputs)"]
        ordered = sorted(self.pairs, key=lambda p: id(p) not in failing)
        for p in ordered:
            chance = f"{p.chance_text():>6}" if p.chance is not None else "   n/a"
            flag = "  BELOW THRESHOLD" if id(p) in failing else ""
            if p.undefined:
                flag += f"  ({p.undefined} image(s) left out: constant map or undefined)"
            lines.append(
                f"    {p.method_a + ' vs ' + p.method_b:<{width}}  {p.metric:<{mwidth}}  {p.mean:6.3f} {p.std:6.3f}"
                f"   {p.ci_low:6.3f} .. {p.ci_high:6.3f}  {chance}{flag}"
            )
        return "\n".join(lines)

    def numbers(self) -> dict[str, Number]:
        """The lowest pair against the threshold, the failing pairs, the run's size and settings."""
        worst = min(self.pairs, key=lambda p: -math.inf if math.isnan(self._value(p)) else self._value(p))
        return {
            "lowest": self._value(worst), "lowest_pair": f"{worst.metric}({worst.method_a}, {worst.method_b})",
            "threshold": self.threshold, "statistic": self.statistic, "failing_pairs": len(self.failing_pairs()),
            "pairs": len(self.pairs), "methods": ", ".join(self.methods), "metrics": ", ".join(self.metrics),
            "k": self.k, "n_images": self.n_images, "seed": self.seed, "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """Method x method matrices per metric (failing pairs framed in red) and each method's maps."""
        from ..compare.metrics import METRICS
        from ..reporting.figures import agreement_figures

        return agreement_figures(
            methods=self.methods, metrics=self.metrics, matrices={m: self.matrix(m) for m in self.metrics},
            n_images=self.n_images, chance={m: next((p.chance for p in self.pairs if p.metric == m), None)
                                            for m in self.metrics},
            failing=[(p.method_a, p.method_b, p.metric) for p in self.failing_pairs()], threshold=self.threshold,
            statistic=self.statistic, higher_is_better={m: METRICS[m].higher_is_better for m in self.metrics},
            maps=self.maps, preset=self.pipeline.name, **self.figure_context,
        )

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = min(self.pairs, key=lambda p: -math.inf if math.isnan(self._value(p)) else self._value(p))
        limit = "" if self.threshold is None else f" vs > {format_threshold(self.threshold)}"
        what = "" if self.statistic == "mean" else f" ({self.confidence:.0%} bound)"
        if self.beat_chance and self.threshold is not None:
            limit = f" vs > {format_threshold(self.required(worst))}"
        constant = "".join(f"; {c} of {self.n_images} {m} maps constant" for m, c in self.constant_maps.items() if c)
        return (
            f"{verdict} method_agreement [{', '.join(self.metrics)}, {self.pipeline.name}]: lowest "
            f"{worst.metric}({worst.method_a}, {worst.method_b}){what} = {format_score(self._value(worst))}{limit} "
            f"(chance {worst.chance_text()}); N = {self.n_images}{constant}"
        )

    def report(self) -> str:
        lines = [
            f"  methods:    {', '.join(self.methods)}   target: the model's prediction",
            f"  metrics:    {', '.join(self.metrics)}   k = {self.k}",
            f"  maps:       top-k, correlation and angle metrics on signed channel-summed maps; "
            f"{', '.join(m for m in self.metrics if m in PRESET_METRICS) or 'preset metrics'} on "
            f"preset {self.pipeline.describe()}",
            self.table(),
            f"  images: {self.n_images}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s",
        ]
        if any(self.constant_maps.values()):
            counts = ", ".join(f"{m} {c} of {self.n_images}" for m, c in self.constant_maps.items() if c)
            lines.append(f"  constant maps (no ranking; left out of the ranking metrics): {counts}")
        if self.beat_chance:
            lines.append("  gate:       each pair must beat the stricter of the theoretical chance level and the "
                         "one measured on maps of different inputs")
        if self.reproduce:
            lines.append(f"  reproduce:  {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        failing = self.failing_pairs()
        from ..compare.metrics import METRICS

        bound = "mean" if self.statistic == "mean" else f"{self.confidence:.0%} confidence bound"
        details = []
        for p in failing:
            op = ">" if METRICS[p.metric].higher_is_better else "<"
            chance = "n/a" if p.chance is None else p.chance_text()
            left_out = f"; {p.undefined} of {self.n_images} image(s) left out (constant map)" if p.undefined else ""
            details.append(
                f"  {p.metric}({p.method_a}, {p.method_b}) {bound} = {format_score(self._value(p))}, required {op} "
                f"{format_threshold(self.required(p))}; chance level {chance}{left_out}"
            )
        return "\n".join(
            [f"Saliency check failed: explanation methods disagree ({len(failing)} of {len(self.pairs)} pair(s))"]
            + details
            + [self.report(),
               "  what next:   methods that disagree cannot both be right about what the model uses; compare the "
               "maps in the report, prefer the method that passes the randomization checks, or average them "
               "(an ensemble of explanations)."]
        )


def _signed_maps(attributions: torch.Tensor) -> torch.Tensor:
    """Channel sum with the sign kept: (N, C, H, W) -> (N, H, W); (N, C, T) series -> (N, 1, T);
    (N, D) -> (N, 1, D)."""
    a = attributions
    if a.dim() == 2:
        return a[:, None, :]
    if a.dim() == 3:
        if current_modality().name == "text":  # (N, L, E) at the embedding: one value per token
            return a.sum(dim=-1)[:, None, :]
        return a.sum(dim=1, keepdim=True) if current_modality().name == "sequence" else a
    return a.sum(dim=1)


def _metric_kwargs(
    metric: str, k: KValue, pipeline: MapPipeline, metric_options: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    from ..compare.metrics import METRICS

    kwargs = dict(metric_options.get(metric, {}))
    if METRICS[metric].takes_k:
        kwargs.setdefault("k", k)
    if metric == "ssim":
        kwargs = {**pipeline.ssim.kwargs(), **kwargs}
    return kwargs


def _ranks_by_magnitude(metric: str, kwargs: dict[str, Any]) -> bool:
    """Whether the metric compares the maps' rankings by ``|value|``, which a constant map lacks."""
    from ..compare.metrics import METRICS

    if METRICS[metric].takes_k or metric in ("pairwise_rank_agreement", "spearman_abs"):
        return True
    return metric == "rank_correlation" and kwargs.get("absolute", True) is True


def _no_ranking(maps: torch.Tensor) -> torch.Tensor:
    """(N,) bool on the CPU: the maps whose ``|values|`` are all equal (e.g. all zero)."""
    return _constant(maps.detach().abs())


def _constant(maps: torch.Tensor) -> torch.Tensor:
    """(N,) bool on the CPU: the maps whose values are all equal (no pattern to compare)."""
    flat = maps.detach().reshape(maps.shape[0], -1)
    return (flat == flat[:, :1]).all(dim=1).cpu()


def _stricter(theory: float | None, measured: float | None, higher_is_better: bool) -> float | None:
    known = [c for c in (theory, measured) if c is not None and not math.isnan(c)]
    if not known:
        return None
    return max(known) if higher_is_better else min(known)


def _metric_values(
    metric: str, a: torch.Tensor, b: torch.Tensor, skip: torch.Tensor, kwargs: dict[str, Any],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric per image as float64 on the CPU, NaN for the images in ``skip`` (not computed).
    ``valid``: token maps' positions that are not padding (the others left out)."""
    import torch

    from ..compare.metrics import compute_metric, compute_on_valid

    n = a.shape[0]
    if valid is not None and "mask" not in kwargs:
        values = compute_on_valid(metric, a, b, valid, **kwargs).double().cpu()
        return values.masked_fill(skip.cpu(), math.nan)
    if not bool(skip.any()):
        return compute_metric(metric, a, b, **kwargs).double().cpu()
    values = torch.full((n,), math.nan, dtype=torch.float64)
    keep = ~skip
    if not bool(keep.any()):
        return values
    mask = kwargs.get("mask")
    if metric == "rank_correlation" and isinstance(mask, torch.Tensor):
        map_shape, d = tuple(a.shape[1:]), a[0].numel()
        if tuple(mask.shape) not in (map_shape, (d,)) and mask.dim() >= 1 and mask.shape[0] == n:
            kwargs = {**kwargs, "mask": mask[keep.to(mask.device)]}  # one mask per image
    rows = keep.to(a.device)
    values[keep] = compute_metric(metric, a[rows], b[rows], **kwargs).double().cpu()
    return values


def _check_threshold(threshold: Any, metrics: list[str], metric_options: dict[str, dict[str, Any]]) -> float | None:
    """A finite threshold inside each metric's range, where a gate can both pass and fail."""
    from ..compare.metrics import METRICS

    if threshold is None:
        return None
    for metric in metrics:
        info = METRICS[metric]
        low, high = info.bounds
        if metric == "angular_difference" and metric_options.get(metric, {}).get("degrees") is True:
            low, high = 0.0, 180.0
        higher = info.higher_is_better
        span = f"[{low:g}, {high:g}]"
        check_number(
            threshold, "threshold", low=low, high=None if math.isinf(high) else high, low_open=not higher,
            high_open=higher,
            hint=f"{metric} takes values in {span} and passes when {'above' if higher else 'below'} the "
                 "threshold, so a threshold outside that range passes or fails whatever the maps. Pass a "
                 "value inside it (or threshold=None to gate on the chance level with assert_agreement_above).",
        )
    return float(threshold)


def _check_options(
    metrics: Any, k: Any, num_features: int, confidence: Any, n_bootstrap: Any, seed: Any, threshold: Any,
    statistic: Any, metric_options: Any,
) -> tuple[list[str], dict[str, dict[str, Any]], float | None]:
    """Every option of compare_maps / agreement_matrix, checked before any work is done."""
    from ..compare.metrics import METRICS, check_metric_options, metric_info, resolve_k

    if isinstance(metrics, str) or not isinstance(metrics, Sequence):
        raise SaliencyUsageError(
            f"metrics must be a list of metric names, e.g. ['feature_agreement', 'ssim'], got {metrics!r:.80}."
        )
    metrics = list(metrics)
    if not metrics:
        raise SaliencyUsageError(f"metrics is empty; pass at least one of {', '.join(METRICS)}.")
    for metric in metrics:
        metric_info(metric)
    if len(set(metrics)) != len(metrics):
        raise SaliencyUsageError(f"metrics lists a metric twice: {metrics}; list each metric once.")
    check_choice(statistic, "statistic", ("mean", "bound"),
                 "'mean' gates on the mean over images, 'bound' on its confidence bound.")
    resolve_k(k, num_features)
    check_number(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True,
                 hint="It is the level of the bootstrap interval, e.g. confidence=0.9.")
    check_count(n_bootstrap, "n_bootstrap", minimum=1, hint="It is the number of bootstrap resamples, e.g. 1000.")
    as_seed(seed)
    metric_options = check_metric_options(metric_options, metrics, caller_sets_k=True)
    return metrics, metric_options, _check_threshold(threshold, metrics, metric_options)


def _refusal(result: AgreementResult, empty: list[PairAgreement]) -> str:
    n = result.n_images
    dead = [m for m, count in result.constant_maps.items() if count == n]
    lines = [f"Saliency check failed: {len(empty)} pair(s) have no image left to compare (N = {n})"]
    for m in dead:
        lines.append(
            f"  all {n} maps of method {m!r} are constant (every |value| equal, e.g. all zero): the method or the "
            "model ignores the input, so there is no ranking to agree on and any agreement would be made up."
        )
    for p in empty:
        counts = f"{p.method_a}: {result.constant_maps.get(p.method_a, 0)}, {p.method_b}: " \
                 f"{result.constant_maps.get(p.method_b, 0)} constant"
        lines.append(f"  {p.metric}({p.method_a}, {p.method_b}): all {n} image(s) left out ({counts})")
    lines.append(result.report())
    lines.append(
        "  what next:   check the method on this model (GradCAM's target layer, dead or saturated ReLUs, a "
        "baseline equal to the input) and that the model's output depends on the input; or drop the method."
    )
    return "\n".join(lines)


def _checked_maps(maps: object) -> dict[str, torch.Tensor]:
    """``maps``, refused unless a dict of at least two tensors of one shape (N >= 1 maps each)."""
    import torch

    if not isinstance(maps, dict):
        raise SaliencyUsageError(
            f"maps must be a dict {{method name: (N, ...) tensor of attributions}}, got {type(maps).__name__}."
        )
    if len(maps) < 2:
        raise SaliencyUsageError(f"agreement needs at least two explanations to compare, got {len(maps)}.")
    for name, m in maps.items():
        if not isinstance(m, torch.Tensor) or m.dim() < 2 or m.shape[0] < 1:
            raise SaliencyUsageError(
                f"maps[{name!r}] must be a tensor of N >= 1 attributions, shape (N, C, H, W), (N, H, W) or (N, D); "
                f"got {type(m).__name__}{tuple(m.shape) if isinstance(m, torch.Tensor) else ''}."
            )
    return maps


def _check_same_positions(maps: dict[str, torch.Tensor], signed: dict[str, torch.Tensor]) -> None:
    """The maps, their channels reduced, must cover the same positions of the same inputs (a
    one-channel GradCAM map and a three-channel saliency map of the same images do)."""
    if len({tuple(m.shape) for m in signed.values()}) != 1:
        shapes = {name: tuple(m.shape) for name, m in maps.items()}
        raise SaliencyUsageError(
            f"maps of different shapes cannot be compared: {shapes}. Explain the same inputs with every method "
            "(GradCAM-style maps must be upsampled to the input size first)."
        )


def _statistics(values: torch.Tensor, confidence: float, n_bootstrap: int,
                seed: int) -> tuple[float, float, float, float]:
    """Mean, std and bootstrap interval of the values that are defined (not NaN); NaN without any."""
    defined = values[~values.isnan()]
    if defined.numel() == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(defined.mean())
    std = float(defined.std()) if defined.numel() > 1 else 0.0
    low, high = bootstrap_interval(defined, confidence, n_bootstrap, seed)
    return mean, std, low, high


def _measured_chance(metric: str, a: torch.Tensor, b: torch.Tensor, skip_a: torch.Tensor, skip_b: torch.Tensor,
                     kwargs: dict[str, Any], key: str) -> tuple[float | None, int]:
    """The metric between a's map of input i and b's map of the input before it (over a stream,
    across batches: :func:`~pytest_saliency.core.stream.previous_rows`, ``key`` naming b's maps),
    averaged, and the number of pairs it is defined for; None and 0 when there are none."""
    valid = valid_positions(a)
    before, paired = previous_rows(f"{key}:maps", b)
    skip_before = previous_rows(f"{key}:skip", skip_b)[0]
    valid_before = None if valid is None else valid & previous_rows(f"{key}:valid", valid)[0]
    shifted = _metric_values(metric, a, before, skip_a | skip_before | ~paired.to(skip_a.device), kwargs,
                             valid_before)
    shifted = shifted[~shifted.isnan()]
    return (float(shifted.mean()) if shifted.numel() else None), int(shifted.numel())


@short_usage_errors
def compare_maps(
    maps: dict[str, torch.Tensor],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    k: KValue = 0.1,
    preset: str | MapPipeline | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    statistic: str = "mean",
) -> AgreementResult:
    """Compare precomputed attributions ``{name: (N, C, H, W) or (N, H, W) tensor}`` pairwise.

    Images where either map is constant are left out of the ranking metrics and counted; a pair
    with no image left raises :class:`SaliencyCheckFailed` (see the module docstring). Each pair
    also gets its chance level measured on maps of different inputs.
    """
    __tracebackhide__ = True
    result = _compared(maps, metrics, k=k, preset=preset, metric_options=metric_options, confidence=confidence,
                       n_bootstrap=n_bootstrap, seed=seed, threshold=threshold, statistic=statistic)
    _refuse_empty_pairs(result)
    return result


def _refuse_empty_pairs(result: AgreementResult) -> None:
    """Raise :class:`SaliencyCheckFailed` when a pair has no image left under a metric (module docstring)."""
    __tracebackhide__ = True
    empty = [p for p in result.pairs if p.undefined == result.n_images]
    if empty:
        raise SaliencyCheckFailed(_refusal(result, empty), result)


def _refusing_empty_pairs(function: F) -> F:
    """Refuse, once the whole check has run (every batch of a stream), a pair with no image left."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        result = function(*args, **kwargs)
        _refuse_empty_pairs(result)
        return result

    return wrapper  # type: ignore[return-value]


def _compared(
    maps: dict[str, torch.Tensor], metrics: Sequence[str], *, k: KValue, preset: str | MapPipeline | None,
    metric_options: dict[str, dict[str, Any]] | None, confidence: float, n_bootstrap: int, seed: int,
    threshold: float | None, statistic: str,
) -> AgreementResult:
    """:func:`compare_maps`' result, a pair with no image left included (NaN statistics)."""
    from ..compare.metrics import METRICS, chance_level

    start = time.perf_counter()
    pipeline = get_pipeline(preset)
    maps = _checked_maps(maps)
    signed = {name: _signed_maps(m) for name, m in maps.items()}
    _check_same_positions(maps, signed)
    n = next(iter(signed.values())).shape[0]
    num_features = next(iter(signed.values()))[0].numel()
    metrics, metric_options, threshold = _check_options(
        metrics, k, num_features, confidence, n_bootstrap, seed, threshold, statistic, metric_options
    )
    processed = {name: apply_pipeline(m, pipeline) for name, m in maps.items()}
    no_ranking = {name: _no_ranking(m) for name, m in signed.items()}
    # Every other metric leaves out constant maps as it sees them: two all-zero maps have SSIM 1
    # and L1 0, an agreement made up by a method or model that ignores the input.
    constant_processed = {name: _constant(m) for name, m in processed.items()}
    constant_signed = {name: _constant(m) for name, m in signed.items()}
    pairs = []
    for metric in metrics:
        info = METRICS[metric]
        kwargs = _metric_kwargs(metric, k, pipeline, metric_options)
        quiet = {**kwargs, "warn_unsigned": False} if info.sign_metric else kwargs  # warned once already
        preset_metric = metric in PRESET_METRICS
        source = processed if preset_metric else signed
        theory = chance_level(metric, k=kwargs.get("k"), num_features=num_features) if info.takes_k else (
            chance_level(metric)
        )
        by_magnitude = _ranks_by_magnitude(metric, kwargs)
        skip = no_ranking if by_magnitude else constant_processed if preset_metric else constant_signed
        for a, b in itertools.combinations(maps, 2):
            values = _metric_values(metric, source[a], source[b], skip[a] | skip[b], kwargs, valid_positions(source[a]))
            mean, std, low, high = _statistics(values, confidence, n_bootstrap, seed)
            measured, measured_pairs = _measured_chance(metric, source[a], source[b], skip[a], skip[b], quiet,
                                                        f"agreement:{metric}:{b}")
            pairs.append(PairAgreement(
                method_a=a, method_b=b, metric=metric, values=values.tolist(), mean=mean, std=std,
                ci_low=low, ci_high=high, chance=_stricter(theory, measured, info.higher_is_better),
                undefined=int(values.isnan().sum()), chance_theory=theory, chance_measured=measured,
                chance_pairs=measured_pairs,
            ))
    return AgreementResult(
        methods=list(maps), metrics=metrics, pairs=pairs, k=k, pipeline=pipeline, n_images=n,
        device=str(next(iter(maps.values())).device), seed=seed, confidence=confidence,
        seconds=time.perf_counter() - start, threshold=threshold, statistic=statistic,
        maps={name: m.detach().cpu() for name, m in processed.items()},
        constant_maps={name: int(c.sum()) for name, c in no_ranking.items()},
    )


def _combined_pair(pairs: list[PairAgreement], sizes: list[int], arguments: dict[str, Any]) -> PairAgreement:
    """One pair under one metric over a stream's batches: every image's value, the statistics on
    all of them, the chance measured within each batch averaged over the batches."""
    import torch

    from ..compare.metrics import METRICS

    first = pairs[0]
    values = [v for p in pairs for v in p.values]
    mean, std, low, high = _statistics(torch.tensor(values, dtype=torch.float64), arguments["confidence"],
                                       arguments["n_bootstrap"], arguments["seed"])
    measured = weighted_mean([p.chance_measured for p in pairs], [p.chance_pairs for p in pairs])
    return replace(first, values=values, mean=mean, std=std, ci_low=low, ci_high=high,
                   chance=_stricter(first.chance_theory, measured, METRICS[first.metric].higher_is_better),
                   undefined=sum(p.undefined for p in pairs), chance_measured=measured,
                   chance_pairs=sum(p.chance_pairs for p in pairs))


def _combined(parts: list[AgreementResult], arguments: dict[str, Any], stopped: str) -> AgreementResult:
    """One result of a stream's batches (see :func:`_combined_pair`); the maps and figures of the
    first batch, the constant maps counted over all."""
    same_across_batches(parts, "methods", "methods")
    same_across_batches(parts, "metrics", "metrics")
    first = parts[0]
    sizes = [part.n_images for part in parts]
    pairs = [_combined_pair([part.pairs[i] for part in parts], sizes, arguments) for i in range(len(first.pairs))]
    return replace(
        first, pairs=pairs, n_images=sum(sizes), seconds=sum(part.seconds for part in parts),
        constant_maps={m: sum(part.constant_maps.get(m, 0) for part in parts) for m in first.constant_maps},
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
    )


def _slim(part: AgreementResult) -> AgreementResult:
    return replace(part, maps={}, figure_context={})


@rng_isolated
@_refusing_empty_pairs
@streams(StreamSpec(_combined, _slim, carries=True))
@passes_model_call
def agreement_matrix(
    model: torch.nn.Module,
    inputs: Inputs,
    methods: Sequence[str | Explainer] = ("saliency", "integrated_gradients", "guided_backprop"),
    metrics: Sequence[str] | None = None,
    *,
    k: KValue = 0.1,
    preset: str | MapPipeline | None = None,
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    threshold: float | None = None,
    statistic: str = "mean",
    reproduce: str = "",
    progress: Callable[[int, int, str], None] | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
) -> AgreementResult:
    """Every pair of ``methods`` on the same inputs and targets, under every metric.

    ``inputs`` is a tensor or an iterable of batches (a ``DataLoader``, see
    :mod:`pytest_saliency.checks.streaming`): every image's values, the statistics on all of
    them, the chance level measured within each batch and averaged, the maps of the first batch.
    ``method_options`` maps a method name to its hyperparameters, e.g.
    ``{"integrated_gradients": {"n_steps": 32}}``; methods may also be callables.
    ``progress(done, total, label)`` is called before each method is explained (``label`` names
    it) and once when all are done (``done == total``, empty label).
    """
    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise SaliencyUsageError(
            f"methods must be a list of methods (names or callables), e.g. ['saliency', 'guided_backprop'], "
            f"got {methods!r:.80}."
        )
    if len(methods) < 2:
        raise SaliencyUsageError(f"agreement needs at least two methods, got {list(methods)}.")
    if method_options is not None and not isinstance(method_options, dict):
        raise SaliencyUsageError(
            f"method_options must be a dict mapping a method name to its hyperparameters, e.g. "
            f"{{'integrated_gradients': {{'n_steps': 32}}}}, got {type(method_options).__name__}."
        )
    method_options = method_options or {}
    check_progress(progress)
    check_count(batch_size, "batch_size", minimum=1, allow_none=True,
                hint="It is the number of inputs explained per batch; None explains all at once.")
    if not isinstance(reproduce, str):
        raise SaliencyUsageError(f"reproduce must be a str (a command line for the report), got {reproduce!r:.80}.")
    # Features per map as the metrics see them (channels summed): k, thresholds and options are
    # checked here, before any attribution is computed.
    num_features = inputs[0, 0].numel() if inputs.dim() == 4 else inputs.shape[-1]
    if metrics is None:  # the defaults without SSIM where a window means nothing (tabular, text)
        metrics = tuple(m for m in DEFAULT_METRICS if m not in WINDOW_METRICS or current_modality().window_ok)
    for metric_name in metrics:
        check_metric_fits(metric_name)
    _check_options(metrics, k, num_features, confidence, n_bootstrap, seed, threshold, statistic, metric_options)
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    maps: dict[str, Any] = {}
    for done, method in enumerate(methods):
        label = method if isinstance(method, str) else method_name(method)
        if label in maps:
            raise SaliencyUsageError(f"method {label!r} is listed twice; list each method once.")
        resolved, name, options = prepare_method(method, model, inputs, dict(method_options.get(label, {})))
        if progress is not None:
            progress(done, len(methods), name)
        maps[name] = attribute(model, inputs, resolved, fixed_target, seed, batch_size, True, options)
    if progress is not None:
        progress(len(methods), len(methods), "")
    unknown = sorted(set(method_options) - set(maps))
    if unknown:
        raise SaliencyUsageError(f"method_options names {unknown}, which are not among the methods {list(maps)}.")
    result = _compared(
        maps, metrics, k=k, preset=preset, metric_options=metric_options, confidence=confidence,
        n_bootstrap=n_bootstrap, seed=seed, threshold=threshold, statistic=statistic,
    )
    result.seconds = time.perf_counter() - start
    result.figure_context = figure_context(inputs, SHOWN_INPUTS)
    result.reproduce = reproduce or (
        f"pytest_saliency.agreement_matrix(model, inputs, methods={list(maps)!r}, metrics={list(result.metrics)!r}, "
        f"k={k!r}, preset={result.pipeline.name!r}, seed={seed})"
    )
    return result
