"""Agreement between explanation methods: a method-by-method matrix and ``assert_agreement_above``.

Every method explains the same inputs for the same targets (the model's predictions, resolved
once). Which maps a metric sees depends on what it measures:

* **signed maps** (attributions summed over channels, sign and scale kept) for the top-k
  metrics, rank and linear correlations, cosine and angle: top-k is taken by ``|value|`` and
  the sign metrics need the sign, so no absolute value or clipping may come first;
* **preset maps** (the session's :class:`~pytest_saliency.postprocess.MapPipeline`) for SSIM,
  HOG-Pearson, L1 and Jensen-Shannon: these need a fixed value range, and SSIM uses the preset's
  window and data range.

Each pair's per-image values are summarized by their mean, standard deviation and a seeded
bootstrap interval (images where a metric is undefined, such as a correlation with a constant
map, are counted, reported and left out of the summary), and printed next to the metric's chance level (its value for independent
random maps): an FA of 0.10 at the top 10% is exactly what two unrelated maps give.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._rng import rng_isolated
from ._validation import check_inputs, check_model
from .exceptions import SaliencyUsageError
from .explainers import _attribute, method_name, prepare_method, resolve_target
from .postprocess import MapPipeline, apply_pipeline, get_pipeline
from .statistics import bootstrap_interval

PRESET_METRICS = ("ssim", "hog_pearson", "l1_distance", "jensen_shannon_divergence")
DEFAULT_METRICS = ("feature_agreement", "sign_agreement", "rank_correlation", "ssim")


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
    chance: float | None
    undefined: int = 0  # images where the metric is undefined (e.g. a correlation with a constant map)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["values"] = [None if math.isnan(v) else v for v in self.values]  # strict JSON has no NaN
        for key in ("mean", "std", "ci_low", "ci_high"):
            data[key] = None if math.isnan(data[key]) else data[key]
        return data


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

    check = "method_agreement"

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
        from .metrics import METRICS

        if self.statistic == "mean":
            return p.mean
        return p.ci_low if METRICS[p.metric].higher_is_better else p.ci_high

    def failing_pairs(self) -> list[PairAgreement]:
        from .metrics import METRICS

        if self.threshold is None:
            return []
        failing = []
        for p in self.pairs:
            value = self._value(p)
            ok = value > self.threshold if METRICS[p.metric].higher_is_better else value < self.threshold
            if not ok or math.isnan(value):
                failing.append(p)
        return failing

    @property
    def passed(self) -> bool:
        return not self.failing_pairs()

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "passed": self.passed,
            "methods": self.methods,
            "metrics": self.metrics,
            "k": self.k,
            "preset": self.pipeline.to_dict(),
            "pairs": [p.to_dict() for p in self.pairs],
            "matrices": {m: self.matrix(m) for m in self.metrics},
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
        """One row per pair and metric: mean, spread, interval, chance level, verdict."""
        failing = {id(p) for p in self.failing_pairs()}
        width = max(len(f"{p.method_a} vs {p.method_b}") for p in self.pairs)
        mwidth = max(len(m) for m in self.metrics)
        lines = [f"    {'pair':<{width}}  {'metric':<{mwidth}}    mean    std   {self.confidence:.0%} CI          chance"]
        ordered = sorted(self.pairs, key=lambda p: id(p) not in failing)
        for p in ordered:
            chance = "   n/a" if p.chance is None else f"{p.chance:6.3f}"
            flag = "  BELOW THRESHOLD" if id(p) in failing else ""
            if p.undefined:
                flag += f"  ({p.undefined} image(s) undefined: constant map)"
            lines.append(
                f"    {p.method_a + ' vs ' + p.method_b:<{width}}  {p.metric:<{mwidth}}  {p.mean:6.3f} {p.std:6.3f}"
                f"   {p.ci_low:6.3f} .. {p.ci_high:6.3f}  {chance}{flag}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        worst = min(self.pairs, key=lambda p: -math.inf if math.isnan(self._value(p)) else self._value(p))
        limit = "" if self.threshold is None else f" vs > {self.threshold:.4g}"
        what = "" if self.statistic == "mean" else f" ({self.confidence:.0%} bound)"
        return (
            f"{verdict} method_agreement [{', '.join(self.metrics)}, {self.pipeline.name}]: lowest "
            f"{worst.metric}({worst.method_a}, {worst.method_b}){what} = {self._value(worst):.3f}{limit} "
            f"(chance {'n/a' if worst.chance is None else f'{worst.chance:.3f}'}); N = {self.n_images}"
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
        if self.reproduce:
            lines.append(f"  reproduce:  {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        failing = self.failing_pairs()
        from .metrics import METRICS

        bound = "mean" if self.statistic == "mean" else f"{self.confidence:.0%} confidence bound"
        details = []
        for p in failing:
            op = ">" if METRICS[p.metric].higher_is_better else "<"
            chance = "n/a" if p.chance is None else f"{p.chance:.3f}"
            details.append(
                f"  {p.metric}({p.method_a}, {p.method_b}) {bound} = {self._value(p):.4f}, required {op} "
                f"{self.threshold:.4g}; chance level {chance}"
            )
        return "\n".join(
            [f"Saliency check failed: explanation methods disagree ({len(failing)} of {len(self.pairs)} pair(s))"]
            + details
            + [self.report(),
               "  what next:   methods that disagree cannot both be right about what the model uses; compare the "
               "maps in the report, prefer the method that passes the randomization checks, or average them "
               "(an ensemble of explanations)."]
        )


def _signed_maps(attributions: Any) -> Any:
    """Channel sum with the sign kept: (N, C, H, W) -> (N, H, W); (N, D) -> (N, 1, D)."""
    a = attributions
    if a.dim() == 2:
        return a[:, None, :]
    if a.dim() == 3:
        return a
    return a.sum(dim=1)


def _metric_kwargs(metric: str, k: Any, pipeline: MapPipeline, metric_options: dict[str, Any]) -> dict[str, Any]:
    from .metrics import METRICS

    kwargs = dict(metric_options.get(metric, {}))
    if METRICS[metric].takes_k:
        kwargs.setdefault("k", k)
    if metric == "ssim":
        kwargs = {**pipeline.ssim.kwargs(), **kwargs}
    return kwargs


def compare_maps(
    maps: dict[str, Any],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    k: float | int = 0.1,
    preset: str | MapPipeline | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    statistic: str = "mean",
) -> AgreementResult:
    """Compare precomputed attributions ``{name: (N, C, H, W) or (N, H, W) tensor}`` pairwise."""
    from .metrics import METRICS, _lookup, chance_level, compute_metric

    start = time.perf_counter()
    pipeline = get_pipeline(preset)
    metrics = list(metrics)
    if not metrics:
        raise SaliencyUsageError(f"metrics is empty; pass at least one of {', '.join(METRICS)}.")
    for metric in metrics:
        _lookup(metric)
    if statistic not in ("mean", "bound"):
        raise SaliencyUsageError(f"statistic must be 'mean' or 'bound' (the confidence bound), got {statistic!r}.")
    if len(maps) < 2:
        raise SaliencyUsageError(f"agreement needs at least two explanations to compare, got {len(maps)}.")
    shapes = {name: tuple(m.shape) for name, m in maps.items()}
    if len(set(shapes.values())) != 1:
        raise SaliencyUsageError(
            f"maps of different shapes cannot be compared: {shapes}. Explain the same inputs with every method "
            "(GradCAM-style maps must be upsampled to the input size first)."
        )
    metric_options = metric_options or {}
    signed = {name: _signed_maps(m) for name, m in maps.items()}
    processed = {name: apply_pipeline(m, pipeline) for name, m in maps.items()}
    n = next(iter(signed.values())).shape[0]
    num_features = next(iter(signed.values()))[0].numel()
    pairs = []
    for metric in metrics:
        kwargs = _metric_kwargs(metric, k, pipeline, metric_options)
        source = processed if metric in PRESET_METRICS else signed
        chance = chance_level(metric, k=kwargs.get("k"), num_features=num_features) if METRICS[metric].takes_k else (
            chance_level(metric)
        )
        for a, b in itertools.combinations(maps, 2):
            values = compute_metric(metric, source[a], source[b], **kwargs).double().cpu()
            defined = values[~values.isnan()]
            if defined.numel() == 0:
                mean = std = low = high = math.nan
            else:
                mean = float(defined.mean())
                std = float(defined.std()) if defined.numel() > 1 else 0.0
                low, high = bootstrap_interval(defined, confidence, n_bootstrap, seed)
            pairs.append(PairAgreement(
                method_a=a, method_b=b, metric=metric, values=values.tolist(), mean=mean, std=std,
                ci_low=low, ci_high=high, chance=chance, undefined=int(values.numel() - defined.numel()),
            ))
    return AgreementResult(
        methods=list(maps), metrics=metrics, pairs=pairs, k=k, pipeline=pipeline, n_images=n,
        device=str(next(iter(maps.values())).device), seed=seed, confidence=confidence,
        seconds=time.perf_counter() - start, threshold=threshold, statistic=statistic,
        maps={name: m.detach().cpu() for name, m in processed.items()},
    )


@rng_isolated
def agreement_matrix(
    model: Any,
    inputs: Any,
    methods: Sequence[Any] = ("saliency", "integrated_gradients", "guided_backprop"),
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    k: float | int = 0.1,
    preset: str | MapPipeline | None = None,
    target: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    confidence: float = 0.9,
    n_bootstrap: int = 1000,
    threshold: float | None = None,
    statistic: str = "mean",
    reproduce: str = "",
) -> AgreementResult:
    """Every pair of ``methods`` on the same inputs and targets, under every metric.

    ``method_options`` maps a method name to its hyperparameters, e.g.
    ``{"integrated_gradients": {"n_steps": 32}}``; methods may also be callables.
    """
    start = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    method_options = method_options or {}
    if len(methods) < 2:
        raise SaliencyUsageError(f"agreement needs at least two methods, got {list(methods)}.")
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    maps: dict[str, Any] = {}
    for method in methods:
        label = method if isinstance(method, str) else method_name(method)
        if label in maps:
            raise SaliencyUsageError(f"method {label!r} is listed twice; list each method once.")
        resolved, name, options = prepare_method(method, model, inputs, dict(method_options.get(label, {})))
        maps[name] = _attribute(model, inputs, resolved, fixed_target, seed, batch_size, True, options)
    unknown = sorted(set(method_options) - set(maps))
    if unknown:
        raise SaliencyUsageError(f"method_options names {unknown}, which are not among the methods {list(maps)}.")
    result = compare_maps(
        maps, metrics, k=k, preset=preset, metric_options=metric_options, confidence=confidence,
        n_bootstrap=n_bootstrap, seed=seed, threshold=threshold, statistic=statistic,
    )
    result.seconds = time.perf_counter() - start
    result.reproduce = reproduce or (
        f"pytest_saliency.agreement_matrix(model, inputs, methods={list(maps)!r}, metrics={list(result.metrics)!r}, "
        f"k={k!r}, preset={result.pipeline.name!r}, seed={seed})"
    )
    return result
