"""Ensembles as a remedy for explanatory multiplicity (Ley et al., "Consistent Explanations in the
Face of Model Indeterminacy via Ensembling").

Models that differ only in their training seed explain differently. Averaging several of them
averages the seed-specific parts of their explanations away, so two ensembles built from
*disjoint* sets of models agree more than two single models do. This module provides:

* :func:`ensemble`: an ``nn.Module`` that averages its members' probabilities. Its maps go
  through every check of this package like any other model's.
* :func:`perturbed_ensemble`: Ley et al.'s local weight-perturbation ensemble. It holds n copies
  of a trained model with Gaussian noise on one layer's weights or biases, and needs no extra
  training.
* :func:`consistency_vs_ensemble_size`: how consistency across disjoint ensembles grows with the
  number of members. It shows whether ensembling removes a model's indeterminacy, and how many
  members that takes.

What the ensemble outputs, and why: ``log(mean_i softmax(f_i(x)))``, the **log of the averaged
probabilities** (``how="average"``, computed stably with ``logsumexp``). Its exponential is
exactly the probability average of Ley et al.'s "Average" ensemble, and its argmax is the
ensemble's prediction, so ``target=None`` works as usual. For gradients it is the better output:

* Per input, its gradient for class c is ``grad(mean_i p_ic) / mean_i p_ic``, the probability
  average's gradient, which is the mean of the member gradients, times a positive factor. Every
  map pipeline normalizes each map and every top-k or sign metric ignores scale, so the maps
  and metrics are those of the probability average.
* It does not saturate. When the members are confident (p close to 1) the gradient of the
  probability itself shrinks towards 0, and maps of confident inputs become numerically tiny.
  The log keeps them at the scale of a log-probability.
* It is a proper log-probability (``exp`` sums to 1), so ``nll_loss`` and captum targets work
  on it unchanged.

``how="logits"`` averages logits instead (a different model, a geometric mean of the
probabilities), for users who want that.

The members are held by reference (no copies) in an ``nn.ModuleList``, so ``ensemble.to(...)``
and ``ensemble.eval()`` apply to them, as for any ``nn.Module``; ``forward`` itself changes
nothing. :func:`pytest_saliency.maps.explainers.explain` and the checks restore every mode flag and ``requires_grad`` they
touch. :func:`perturbed_ensemble` deep-copies the model it perturbs and never touches the
original.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..core.forward import current_call, passes_model_call, select_scores
from ..core.integrity import rng_isolated, short_usage_errors
from ..core.rng import derive_seed
from ..core.stream import is_stream
from ..core.validation import (
    check_choice,
    check_count,
    check_flag,
    check_inputs,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError
from ..model.curves import LossFunction, check_train, fit_curve, refresh_batchnorm
from ..reporting.numbers import format_score
from ..reporting.protocol import Figure, Number
from .consistency import (
    ConsistencySettings,
    ExplainedPairs,
    consistency_result,
    consistency_settings,
    explained_pairs,
    join_pairs,
    models_from,
    slim_pairs,
)
from .streaming import StreamSpec, streams

if TYPE_CHECKING:
    import os

    from ..compare.metrics import KValue
    from ..maps.methods import Explainer
    from ..model.cache import ModelCache
    from .consistency import ConsistencyResult, ModelsOrFactory

HOWS = ("average", "logits")
PARAMETERS = ("weight", "bias", "both")


def _check_how(how: Any) -> str:
    return check_choice(
        how, "ensemble method", HOWS,
        "Majority voting is not offered: it is piecewise constant, so its gradients are zero.",
    )


class Ensemble(nn.Module):
    """The mean of its members' probabilities, returned as a log-probability (see the module docstring).

    ``forward(x)`` returns ``log(mean_i softmax(member_i(x)))`` of shape (N, K) for
    ``how="average"``, or ``mean_i member_i(x)`` for ``how="logits"``. ``exp`` of the former is
    the averaged probability.
    """

    #: Its forward selects each member's scores (``output=``) itself: :func:`call_model` takes its
    #: output as it is.
    selects_scores = True

    @short_usage_errors
    def __init__(self, members: Sequence[nn.Module], how: str = "average") -> None:
        super().__init__()
        how = _check_how(how)
        members = list(members)
        if not members:
            raise SaliencyUsageError("an ensemble needs at least one member model, got none.")
        for index, member in enumerate(members):
            try:
                check_model(member)
            except SaliencyUsageError as exc:
                raise SaliencyUsageError(f"ensemble member {index}: {exc}") from None
        self.members = nn.ModuleList(members)
        self.how = how

    def extra_repr(self) -> str:
        return f"how={self.how!r}, n={len(self.members)}"

    def forward(self, x: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """``forward_kwargs`` go to every member; each member's scores are selected by the
        check's ``output=`` (a tensor output as it is)."""
        outputs: list[torch.Tensor] = []
        selector = current_call().output
        for index, member in enumerate(self.members):
            out = select_scores(member(x, **forward_kwargs), selector)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise SaliencyUsageError(
                    f"ensemble member {index} returned {type(out).__name__} of shape "
                    f"{tuple(getattr(out, 'shape', ()))}; members must return (N, num_classes) logits."
                )
            if outputs and out.shape != outputs[0].shape:
                raise SaliencyUsageError(
                    f"ensemble member {index} returned shape {tuple(out.shape)} but member 0 returned "
                    f"{tuple(outputs[0].shape)}; members must share the output shape (the same classes)."
                )
            outputs.append(out)
        stacked = torch.stack(outputs)
        if self.how == "logits":
            return stacked.mean(dim=0)
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(outputs))


@short_usage_errors
def ensemble(models: Sequence[nn.Module] | Mapping[Any, nn.Module], how: str = "average") -> Ensemble:
    """An :class:`Ensemble` of ``models`` (a list, or the values of a dict), held by reference."""
    if isinstance(models, nn.Module):
        models = [models]
    elif isinstance(models, Mapping):
        models = list(models.values())
    elif not isinstance(models, Sequence) or isinstance(models, (str, bytes)):
        raise SaliencyUsageError(
            f"models must be a list of nn.Modules (or a dict of them), got {type(models).__name__}."
        )
    return Ensemble(models, how=how)


def first_parameterized_layer(model: nn.Module) -> str:
    """The first module, in registration order, that owns a ``weight`` or ``bias`` itself."""
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if name and ("weight" in own or "bias" in own):
            return name
    raise SaliencyUsageError(
        f"{type(model).__name__} has no layer with its own weight or bias to perturb; pass layer='<module name>'."
    )


def _perturb(copy_: nn.Module, layer: str, sigma: float, parameter: str, seed: int) -> None:
    module = dict(copy_.named_modules())[layer]
    names = ("weight", "bias") if parameter == "both" else (parameter,)
    with torch.no_grad():
        for pname in names:
            p = getattr(module, pname, None)
            if p is None:
                continue
            g = torch.Generator(device=p.device).manual_seed(derive_seed(seed, layer, pname))
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype)
            p.add_(noise, alpha=sigma)


@short_usage_errors
def perturbed_ensemble(
    model: nn.Module | Sequence[nn.Module],
    layer: str | None = None,
    sigma: float = 0.1,
    n: int = 20,
    *,
    parameter: str = "weight",
    seed: int = 0,
    how: str = "average",
    include_original: bool = False,
) -> Ensemble:
    """Ley et al.'s local weight-perturbation ensemble, with no extra training.

    Each of ``n`` deep copies of ``model`` gets ``N(0, sigma^2)`` noise added to one layer's
    ``weight``, ``bias`` or ``both``. The noise comes from a local generator seeded with
    ``derive_seed(seed, model index, copy index, layer, parameter)``, so the ensemble is
    reproducible and no global RNG state changes. ``model`` itself is never modified.

    ``layer=None`` perturbs the first layer with parameters, because Ley et al. found that only
    the first layer (input to first hidden) helps. Their settings were first-layer bias sigma =
    0.05-0.5 or first-layer weight sigma = 0.2-0.3 on standardized tabular features, with 50
    perturbations (100 for HELOC), and sigma chosen so that test accuracy drops by at most 1%.
    Check the ensemble's accuracy when you choose sigma.

    A list of models gives the ensemble of their perturbed versions (``n`` copies each), as in
    the paper's "n perturbed models". ``include_original=True`` also adds the unperturbed
    model(s).

    Memory: the ensemble holds ``n`` full copies per model.
    """
    models = list(model) if isinstance(model, Sequence) and not isinstance(model, nn.Module) else [model]
    if not models:
        raise SaliencyUsageError("perturbed_ensemble needs a model (or a non-empty list of models).")
    parameter = check_choice(parameter, "parameter", PARAMETERS)
    how = _check_how(how)
    n = check_count(n, "n", hint="n must be a positive int: the perturbed copies per model, e.g. n=20.")
    sigma = check_number(sigma, "sigma", low=0.0, hint="It is the std of the noise added to the weights, e.g. 0.1.")
    seed = check_seed(seed)
    check_flag(include_original, "include_original")
    members: list[nn.Module] = []
    for index, base in enumerate(models):
        check_model(base)
        name = first_parameterized_layer(base) if layer is None else layer
        modules = dict(base.named_modules())
        if name not in modules or not name:
            raise unknown_choice("layer", name, [m for m in modules if m])
        own = dict(modules[name].named_parameters(recurse=False))
        wanted = ("weight", "bias") if parameter == "both" else (parameter,)
        if not any(w in own for w in wanted):
            raise SaliencyUsageError(
                f"layer {name!r} ({type(modules[name]).__name__}) has no {parameter} to perturb "
                f"(its own parameters: {sorted(own) or 'none'}). Choose parameter='weight' or another layer."
            )
        if include_original:
            members.append(base)
        for copy_index in range(n):
            member = copy.deepcopy(base)
            _perturb(member, name, sigma, parameter, derive_seed(seed, index, copy_index))
            members.append(member)
    return Ensemble(members, how=how)


# ============================================================================================
# Mode-connected ensembles ("connect") and their perturbation ("combine")
# ============================================================================================


def curve_points(n: int) -> list[float]:
    """``n`` positions spread uniformly over the curve: the midpoints ``(i + 0.5) / n`` of ``n`` equal
    pieces of [0, 1] (for n = 1 the curve's middle; the trained endpoints themselves are not drawn)."""
    return [(index + 0.5) / n for index in range(n)]


@rng_isolated
def connected_ensemble(
    model_a: nn.Module,
    model_b: nn.Module,
    train: Iterable[Any] | LossFunction,
    n: int = 10,
    *,
    criterion: Callable[..., torch.Tensor] | None = None,
    epochs: int = 10,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    ts: Sequence[float] | None = None,
    how: str = "average",
) -> Ensemble:
    """Ley et al.'s mode-connected ensemble ("connect"): ``n`` models sampled along a trained
    quadratic Bezier curve between two trained models (Garipov et al.).

    The curve's control point is trained (:class:`pytest_saliency.model.curves.BezierCurve`) on
    ``train``: a loader of ``(x, y)`` batches (``criterion(model(x), y)``, cross-entropy by default;
    ``epochs`` passes) or a function ``loss(forward) -> scalar tensor`` (``steps`` Adam steps), at
    ``t ~ U(0, 1)`` drawn from ``seed``. The members are the models at ``ts``, by default
    :func:`curve_points` (``(i + 0.5) / n``, uniform over the curve). Every member is a new model;
    ``model_a`` and ``model_b`` are never modified. With a loader, the members' BatchNorm running
    statistics are recomputed from it (without one they are interpolated between the endpoints').

    The global generators and both endpoints (values, modes, flags) are as before the call.

    "Combine", the paper's best strategy, perturbs these members:
    ``perturbed_ensemble(list(connected_ensemble(...).members), ...)``.
    """
    how = _check_how(how)
    n = check_count(n, "n", hint="n must be a positive int: the models sampled along the curve, e.g. n=10.")
    loader = check_train(train)
    if ts is None:
        points = curve_points(n)
    elif isinstance(ts, Sequence) and not isinstance(ts, (str, bytes)) and len(ts) > 0:
        points = [check_number(t, f"ts[{i}]", low=0.0, high=1.0, hint="Positions on the curve lie in [0, 1].")
                  for i, t in enumerate(ts)]
    else:
        raise SaliencyUsageError(f"ts must be a non-empty list of positions in [0, 1] (or None), got {ts!r:.80}.")
    curve = fit_curve(model_a, model_b, train, criterion=criterion, epochs=epochs, steps=steps, lr=lr, seed=seed)
    members = [curve.model_at(t) for t in points]
    if loader:
        for index, member in enumerate(members):
            refresh_batchnorm(member, cast(Iterable[Any], train), seed=derive_seed(seed, index))
    return Ensemble(members, how=how)


STRATEGIES = ("vanilla", "perturb", "connect", "combine")
#: The options each strategy takes (``strategy_options=``), with their defaults.
PERTURB_OPTIONS = {"layer": None, "sigma": 0.1, "parameter": "weight", "perturbations": 20, "seed": 0}
CONNECT_OPTIONS = {"train": None, "n": 10, "criterion": None, "epochs": 10, "steps": 200, "lr": 1e-3, "seed": 0,
                   "ts": None}


def _strategy_options(strategy: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(options or {})
    allowed: dict[str, Any] = {}
    if strategy in ("perturb", "combine"):
        allowed.update(PERTURB_OPTIONS)
    if strategy in ("connect", "combine"):
        allowed.update(CONNECT_OPTIONS)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SaliencyUsageError(
            f"strategy_options {unknown} do not apply to strategy {strategy!r}; it takes {sorted(allowed) or 'none'}."
        )
    merged = {**allowed, **given}
    if strategy in ("connect", "combine") and merged["train"] is None:
        raise SaliencyUsageError(
            f"strategy {strategy!r} trains a curve between pairs of models and needs "
            "strategy_options={'train': <loader of (x, y) batches, or a loss function loss(forward)>}."
        )
    return merged


def _perturbed_members(models: list[nn.Module], options: Mapping[str, Any], key: str) -> list[nn.Module]:
    built = perturbed_ensemble(models, layer=options["layer"], sigma=options["sigma"], n=options["perturbations"],
                               parameter=options["parameter"], seed=derive_seed(options["seed"], key))
    return list(built.members)


def _unit_members(labelled: list[tuple[str, nn.Module]], strategy: str,
                  options: Mapping[str, Any]) -> list[tuple[str, list[nn.Module]]]:
    """The members each unit of pre-trained models contributes: one model per unit (vanilla,
    perturb) or one disjoint pair, consecutive models, per unit (connect, combine)."""
    if strategy == "vanilla":
        return [(label, [model]) for label, model in labelled]
    if strategy == "perturb":
        return [(label, _perturbed_members([model], options, label)) for label, model in labelled]
    units = []
    for j in range(len(labelled) // 2):
        (label_a, a), (label_b, b) = labelled[2 * j], labelled[2 * j + 1]
        label = f"{label_a}~{label_b}"
        built = connected_ensemble(
            a, b, options["train"], options["n"], criterion=options["criterion"], epochs=options["epochs"],
            steps=options["steps"], lr=options["lr"], seed=derive_seed(options["seed"], label), ts=options["ts"],
        )
        members = list(built.members)
        if strategy == "combine":
            members = _perturbed_members(members, options, label)
        units.append((label, members))
    return units


@short_usage_errors
def strategy_ensembles(
    models: Sequence[nn.Module] | Mapping[str, nn.Module],
    sizes: Sequence[int],
    strategy: str = "vanilla",
    strategy_options: Mapping[str, Any] | None = None,
    *,
    how: str = "average",
) -> dict[int, dict[str, Ensemble]]:
    """The disjoint ensembles of each size that :func:`consistency_vs_ensemble_size` compares,
    for Ley et al.'s strategies; a size counts *pre-trained models* per ensemble.

    * ``"vanilla"``: the s models themselves;
    * ``"perturb"``: each model's ``perturbations`` noisy copies (:func:`perturbed_ensemble`,
      options ``layer``, ``sigma``, ``parameter``, ``perturbations``, ``seed``);
    * ``"connect"``: the s models as s/2 disjoint pairs of consecutive models, each pair replaced by
      ``n`` models along its trained curve (:func:`connected_ensemble`, options ``train``, ``n``,
      ``criterion``, ``epochs``, ``steps``, ``lr``, ``seed``, ``ts``); s must be even;
    * ``"combine"``: connect, then every model on the curves perturbed (both sets of options).

    Ensemble j of size s holds the members of models ``j*s .. (j+1)*s - 1``. Each curve and each
    model's perturbations are built once per call and shared by all sizes (the pairs are the same:
    size 4's pairs are size 2's), seeded by ``seed`` and the models' labels.
    """
    strategy = check_choice(strategy, "ensemble strategy", STRATEGIES)
    how = _check_how(how)
    options = _strategy_options(strategy, strategy_options)
    labelled = _labelled(models)
    size_list = _checked_sizes(sizes, len(labelled))
    per_unit = 2 if strategy in ("connect", "combine") else 1
    odd = [s for s in size_list if s % per_unit]
    if odd:
        raise SaliencyUsageError(
            f"strategy {strategy!r} joins pairs of models by a curve, so every size must be even; got sizes {odd}. "
            "Use sizes such as (2, 4, 8)."
        )
    units = _unit_members(labelled, strategy, options)
    sized: dict[int, dict[str, Ensemble]] = {}
    for size in size_list:
        groups = [units[j * size // per_unit:(j + 1) * size // per_unit] for j in range(len(labelled) // size)]
        sized[size] = {"+".join(label for label, _ in group): Ensemble([m for _, ms in group for m in ms], how=how)
                       for group in groups}
    return sized


# ============================================================================================
# Consistency against ensemble size
# ============================================================================================


@dataclass
class EnsembleSizeRow:
    """Consistency between disjoint ensembles of one size."""

    size: int
    n_ensembles: int
    n_pairs: int
    consistency: float
    mean_lr_accuracy: float
    similarities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size, "n_ensembles": self.n_ensembles, "n_pairs": self.n_pairs,
            "consistency": self.consistency, "mean_lr_accuracy": self.mean_lr_accuracy,
            "similarities": {k: (v if math.isfinite(v) else None) for k, v in self.similarities.items()},
        }


@dataclass
class EnsembleSizeResult:
    """How explanation consistency grows with the number of ensemble members."""

    method: str
    metrics: list[str]
    k: KValue
    how: str
    n_models: int
    rows: list[EnsembleSizeRow]
    target_mode: str
    n_inputs: int
    seconds: float
    results: dict[int, ConsistencyResult] = field(default_factory=dict, repr=False)  # by ensemble size
    strategy: str = "vanilla"  # how each ensemble is built from its pre-trained models (see strategy_ensembles)

    check = "consistency_vs_ensemble_size"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    def series(self, metric: str = "lr_separability") -> list[float]:
        """The metric for each size, in the order of ``sizes`` (C for ``"lr_separability"``)."""
        if metric == "lr_separability":
            return [row.consistency for row in self.rows]
        if metric not in self.metrics:
            raise unknown_choice("metric", metric, ["lr_separability", *self.metrics])
        return [row.similarities[metric] for row in self.rows]

    def gain(self, metric: str = "lr_separability") -> float:
        """Largest size's value minus the smallest size's: how much ensembling helped."""
        values = self.series(metric)
        return values[-1] - values[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_writes": list(self.model_writes),
            "check": self.check, "method": self.method, "metrics": list(self.metrics), "k": self.k,
            "how": self.how, "strategy": self.strategy, "n_models": self.n_models, "rows": [row.to_dict() for row in self.rows],
            "target": self.target_mode, "n_inputs": self.n_inputs, "seconds": self.seconds,
        }

    @property
    def passed(self) -> bool:
        """A measurement, not a gate: always True (the summary begins with REPORT)."""
        return True

    def numbers(self) -> dict[str, Number]:
        """C at the smallest and the largest ensemble size and the gain between them."""
        numbers: dict[str, float | int | str | bool | None] = {
            "method": self.method, "how": self.how, "strategy": self.strategy, "models": self.n_models, "n_inputs": self.n_inputs,
        }
        if self.rows:
            first, last = self.rows[0], self.rows[-1]
            numbers.update(smallest_size=first.size, largest_size=last.size, consistency_smallest=first.consistency,
                           consistency_largest=last.consistency, gain=last.consistency - first.consistency)
        return numbers

    def failure_message(self) -> str:
        """A measurement cannot fail: its summary and report."""
        return "\n".join([self.summary(), self.report()])

    def figures(self) -> list[Figure]:
        """Consistency C and the similarities between disjoint ensembles against the ensemble size,
        and the maps of the ensembles of the smallest and the largest size (``model_maps_size<s>``)."""
        from ..reporting.figures import ensemble_figures

        figures = ensemble_figures(
            sizes=[row.size for row in self.rows], consistency=[row.consistency for row in self.rows],
            similarities={m: [row.similarities[m] for row in self.rows] for m in self.metrics}, method=self.method,
        )
        for size in sorted({min(self.results), max(self.results)}) if self.results else []:
            what = "models" if size == 1 else f"ensembles of {size} models"
            figures += self.results[size].map_figures(what=what, name=f"model_maps_size{size}")
        return figures

    def summary(self) -> str:
        parts = []
        for row in self.rows:
            sims = ", ".join(f"{m} {format_score(row.similarities[m])}" for m in self.metrics)
            parts.append(f"size {row.size}: C {format_score(row.consistency)}" + (f", {sims}" if sims else ""))
        return f"REPORT {self.check} [{self.method}, {self.strategy}, {self.n_models} models]: " + " | ".join(parts)

    def report(self) -> str:
        sims = "".join(f"  {m[:14]:>14}" for m in self.metrics)
        target = {
            "ensemble": "the prediction of the ensemble of all models, fixed for every size",
        }.get(self.target_mode, self.target_mode)
        lines = [
            f"  check:       {self.check} (disjoint ensembles of each size, all pairs between them)",
            f"  method:      {self.method}   ensembles: {self.strategy}, {self.how} of probabilities   target: {target}",
            f"     size  ensembles  pairs       C  M held-out{sims}",
        ]
        for row in self.rows:
            values = "".join(f"  {row.similarities[m]:14.3f}" for m in self.metrics)
            lines.append(
                f"    {row.size:5d}  {row.n_ensembles:9d}  {row.n_pairs:5d}  {row.consistency:6.3f}"
                f"  {row.mean_lr_accuracy:10.3f}{values}"
            )
        lines.append(f"  models: {self.n_models}   inputs: {self.n_inputs}   time: {self.seconds:.1f} s")
        return "\n".join(lines)


def _labelled(models: Sequence[nn.Module] | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The models with their labels: a dict's keys, or ``model0``, ``model1``, ... for a list."""
    if isinstance(models, Mapping):
        return [(str(label), model) for label, model in models.items()]
    if isinstance(models, Sequence) and not isinstance(models, (str, bytes, nn.Module)):
        return [(f"model{i}", model) for i, model in enumerate(models)]
    raise SaliencyUsageError(
        "models_or_factory must be a list or dict of models, or a factory train(seed) -> model with seeds=[...]."
    )


def _checked_sizes(sizes: object, n_models: int) -> list[int]:
    """The ensemble sizes, sorted: distinct positive ints, each small enough for two disjoint ensembles."""
    size_list = list(sizes) if isinstance(sizes, Sequence) and not isinstance(sizes, (str, bytes)) else None
    size_hint = f"sizes must be a non-empty list of positive ints, e.g. (1, 2, 4), got {sizes!r:.80}."
    if not size_list:
        raise SaliencyUsageError(size_hint)
    size_list = [check_count(s, f"sizes[{index}]", hint=size_hint) for index, s in enumerate(size_list)]
    if len(set(size_list)) != len(size_list):
        raise SaliencyUsageError(f"sizes must be distinct, got {size_list!r}.")
    size_list = sorted(size_list)
    too_big = [s for s in size_list if n_models // s < 2]
    if too_big:
        raise SaliencyUsageError(
            f"ensemble size(s) {too_big} need at least {2 * max(too_big)} models (two disjoint ensembles to "
            f"compare), but {n_models} were given. Pass more models (or seeds), or smaller sizes."
        )
    return size_list


def _sizes_joined(parts: list[dict[int, ExplainedPairs]], arguments: dict[str, Any],
                  stopped: str) -> dict[int, ExplainedPairs]:
    return {size: join_pairs([part[size] for part in parts]) for size in parts[0]}


def _sizes_slim(part: dict[int, ExplainedPairs]) -> dict[int, ExplainedPairs]:
    return {size: slim_pairs(explained) for size, explained in part.items()}


@streams(StreamSpec(_sizes_joined, _sizes_slim, carries=True))
@passes_model_call
def _explained_by_size(
    model: Ensemble,
    inputs: torch.Tensor | Iterable[Any],
    sized: Mapping[int, Mapping[str, nn.Module]],
    settings: ConsistencySettings,
    *,
    target: str | int | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    output: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: Any = None,
) -> dict[int, ExplainedPairs]:
    """The ensembles of each size (``sized``) explained and compared input by input (batch by batch
    for a loader); ``target=None`` is the prediction of ``model``, the ensemble of all models."""
    from ..maps.targets import predicted_targets

    batch = checked_inputs(inputs, model)
    if target is None:
        target = predicted_targets(model, batch, settings.batch_size, settings.seed)
    return {size: explained_pairs(ensembles, batch, settings, target=target, labels=labels,
                                  chance_key=f"ensembles of {size}")
            for size, ensembles in sized.items()}


@rng_isolated
@passes_model_call
def consistency_vs_ensemble_size(
    models_or_factory: ModelsOrFactory,
    inputs: torch.Tensor | Iterable[Any],
    sizes: Sequence[int] = (1, 2, 4),
    method: str | Explainer = "saliency",
    *,
    seeds: Sequence[int] | None = None,
    cache: ModelCache | str | os.PathLike[str] | None = None,
    build: Callable[[], nn.Module] | None = None,
    version: str = "",
    how: str = "average",
    target: str | int | torch.Tensor | None = None,
    metrics: Sequence[str] | None = ("sign_agreement",),
    batch_size: int | None = None,
    strategy: str = "vanilla",
    strategy_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> EnsembleSizeResult:
    """Explanation consistency between disjoint ensembles, for each ensemble size.

    For size s, the M models (in the given order, or in seed order for a factory) are split into
    ``M // s`` disjoint ensembles of s consecutive models (``Ensemble``, ``how``), and
    :func:`pytest_saliency.checks.consistency.explanation_consistency` compares every pair of them.
    Every size therefore needs at least ``2 * s`` models. With disjoint members, agreement
    between two ensembles cannot come from shared members, only from what the models have in
    common. That is Ley et al.'s protocol (non-overlapping sets of models).

    The target is fixed across sizes, so the sizes answer the same question. By default it is
    the class that the ensemble of *all* models predicts, the most stable estimate available.
    An int or tensor (e.g. the true labels) is used as given, and ``"each"`` explains each
    ensemble's own prediction.

    ``inputs`` is a tensor or an iterable of batches such as a ``DataLoader`` (see
    :mod:`pytest_saliency.checks.streaming`): the models are trained (or loaded) and the
    ensembles built once, and each batch is explained by the ensembles of every size as it
    comes (``target="labels"``: each batch's labels); each size's classifier is fit on all
    examples at once, so it keeps their flattened maps (see ``explanation_consistency``).

    ``metrics`` are the pairwise similarities to report besides C (default top-k sign
    agreement, as in Ley et al.). Every size, size 1 included, is explained through
    :class:`Ensemble`, i.e. as log-probabilities, so the sizes are comparable. C on
    log-probability maps is already high for single models (it lacks the logit-shift component,
    see :mod:`pytest_saliency.checks.consistency`), so sign agreement is usually the informative
    column.

    ``strategy`` is how an ensemble is built from its s pre-trained models, Ley et al.'s four
    (:func:`strategy_ensembles`, with ``strategy_options``): ``"vanilla"`` (the models themselves),
    ``"perturb"`` (weight perturbations of each), ``"connect"`` (models along trained curves between
    disjoint pairs; ``strategy_options={"train": loader_or_loss, ...}``; even sizes) and
    ``"combine"`` (those models perturbed). A size is always the number of pre-trained models, so
    the strategies compare at a fixed training budget; the default target is still the prediction
    of the vanilla ensemble of all the pre-trained models. Other ``options`` go to ``explanation_consistency``
    (``k``, ``n_splits``, ``preset``, ``map_shape``, ``seed``, ``lr_input``, ``labels``, method options).
    """
    start = time.perf_counter()
    _strategy_options(check_choice(strategy, "ensemble strategy", STRATEGIES), strategy_options)  # fail before training
    named, _ = models_from(models_or_factory, seeds, cache, build=build, version=version, inputs=inputs)
    labelled = _labelled(named)
    m = len(labelled)
    size_list = _checked_sizes(sizes, m)
    how = _check_how(how)
    for label, model in labelled:
        try:
            check_model(model)
            if not is_stream(inputs):
                check_inputs(inputs, model)
        except SaliencyUsageError as exc:
            raise SaliencyUsageError(f"model {label!r}: {exc}") from None
    call = {name: options.pop(name, None) for name in ("labels", "output", "forward_kwargs", "modality")}
    reproduce = options.pop("reproduce", "")
    settings = consistency_settings(method, metrics=metrics, batch_size=batch_size, **options)
    settings = dataclasses.replace(settings, labels_from_batches=is_stream(inputs) and call["labels"] is None)
    target_mode = "given"
    if target is None:
        target_mode = "ensemble"
    elif isinstance(target, str):
        modes = ("each", "reference", "labels") if is_stream(inputs) else ("each", "reference")
        if target not in modes:
            raise unknown_choice("target mode", target, modes, "Or pass an int or a tensor (N,).")
        target_mode = "given" if target == "labels" else target
    sized = strategy_ensembles(dict(labelled), size_list, strategy, strategy_options, how=how)
    all_members = Ensemble([model for _, model in labelled], how=how)
    explained = _explained_by_size(all_members, inputs, sized, settings, target=target, **call)
    results = {size: consistency_result(explained[size], settings, reproduce=reproduce) for size in size_list}
    rows = [
        EnsembleSizeRow(
            size=size, n_ensembles=len(sized[size]), n_pairs=len(result.pairs), consistency=result.consistency,
            mean_lr_accuracy=result.mean_lr_accuracy, similarities={mm: result.value(mm) for mm in result.metrics},
        )
        for size, result in results.items()
    ]
    first = results[size_list[0]]
    return EnsembleSizeResult(
        method=first.method, metrics=list(first.metrics), k=first.k, how=how, n_models=m, rows=rows,
        target_mode=target_mode, n_inputs=first.n_inputs, seconds=time.perf_counter() - start, results=results,
        strategy=str(strategy),
    )


__all__ = [
    "HOWS", "STRATEGIES", "Ensemble", "EnsembleSizeResult", "EnsembleSizeRow", "connected_ensemble",
    "consistency_vs_ensemble_size", "curve_points", "ensemble", "first_parameterized_layer", "perturbed_ensemble",
    "strategy_ensembles",
]
