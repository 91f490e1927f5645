"""The data-randomization sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", the second test).

A model trained on permuted labels can only memorize them: there is nothing about the inputs'
classes left for it to learn. A method whose maps of that model look like the maps of the model
trained on the real labels is explaining the inputs, not what the model learned. Adebayo et al.
permute the training labels (``np.random.permutation(y_train)``), train the same network to a
high training accuracy (> 95%; 100 epochs for random labels against 50 for real ones, "it
requires more epochs to fit random labels") and compare the two models' maps (Spearman, SSIM):
gradient and GradCAM maps change, guided backprop and gradient x input stay close to the input.

How :func:`data_randomization` runs it. The user's factory ``train(seed, *, permute=None) ->
model`` (the factory seed consistency takes, with one more keyword) is called twice with the
same seed: once as ``train(seed)`` and once as ``train(seed, permute=permute)``, where
``permute`` is a :class:`LabelPermutation` the check makes, a callable ``labels -> labels``
permuted by a seeded generator, which the factory applies to its training labels. The check never
sees the training set. Each model is stored in a :class:`pytest_saliency.model.cache.ModelCache`
when one is given (the permuted model's key names the permutation and its seed; the real model's
is seed consistency's own entry), so it trains once. Then each input is explained by both models,
each for its own predicted class (Adebayo) or for the ``target`` given, and the two maps are
compared by the modality's similarity: the verdict and the report are those of
:mod:`pytest_saliency.checks.random_logit` (the 1 x N matrix; maps differ below 0.99; S^I >=
0.01; ``max_similarity`` as a stricter gate; the chance level of the real model's maps of
different inputs).

Whether the permuted model fitted its labels matters: a model that learned nothing is close to
its random initialization, whose maps differ from anything trivially. With ``fit=(x_train,
y_train)`` (the factory's training set, in its order) the check reports the training accuracy of
the real model on the real labels and of the permuted model on the permuted labels (and on the
real ones: chance), and warns when the latter is below ``min_fit_accuracy`` (0.95, Adebayo's).
"""

from __future__ import annotations

import functools
import inspect
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..compare.statistics import (
    CONFIDENCE,
    N_BOOTSTRAP,
    SENSITIVITY_THRESHOLD,
    SSIM_THRESHOLD,
)
from ..core.forward import OutputSelector, model_call_options, passes_model_call
from ..core.integrity import rng_isolated
from ..core.rng import as_seed, derive_seed, torch_seed_of
from ..core.stream import is_stream
from ..core.torchtools import require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
)
from ..engine.base import Explanation
from ..exceptions import SaliencyUsageError, raise_if_failed, warn_user
from ..maps.explainers import prepare_method
from ..maps.methods import Explainer
from ..maps.modality import current_modality, default_similarity
from ..maps.postprocess import MapPipeline, get_pipeline
from ..maps.targets import predicted_targets, resolve_target
from ..model.cache import ModelCache, call_train, factory_name
from ..model.randomize import preserved
from ..reporting.numbers import format_score, format_threshold
from .random_logit import (
    PairedMapsResult,
    chance_values,
    combined_paired,
    compared_maps,
    floor_numbers,
    mean_defined,
    paired_similarity,
    repeated_maps,
    shown_inputs,
    slim_paired,
    usable_rows,
    valid_tokens,
    verdict_settings,
)
from .randomization import SIMILARITY_LABELS
from .streaming import StreamSpec, streams

if TYPE_CHECKING:
    import torch

    from ..core.stream import Inputs
    from ..maps.cache import MapCache

#: Adebayo et al. trained the random-label models to more than 95% training accuracy.
MIN_FIT_ACCURACY = 0.95


class LabelPermutation:
    """The ``permute=`` the check passes to the factory: ``labels -> labels`` permuted along their
    first axis by a generator seeded with ``seed`` (a torch tensor, a numpy array or a list; the
    same type comes back). The same seed and length always give the same permutation.

    ``calls`` counts the calls and ``changed`` is the fraction of labels the last call changed
    (a permutation of balanced classes changes about 1 - 1/C of them).
    """

    def __init__(self, seed: int) -> None:
        self.seed = as_seed(seed, "permutation_seed")
        self.calls = 0
        self.changed: float | None = None

    def __repr__(self) -> str:
        return f"LabelPermutation(seed={self.seed})"

    def order(self, n: int) -> torch.Tensor:
        """The permutation of ``n`` labels: position ``i`` gets label ``order[i]``."""
        torch = require_torch()
        return torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed_of(self.seed)))

    def __call__(self, labels: Any) -> Any:
        torch = require_torch()
        if isinstance(labels, torch.Tensor):
            if labels.dim() == 0:
                raise SaliencyUsageError("permute(labels) needs one label per training example, got a 0-d tensor.")
            permuted = labels[self.order(labels.shape[0]).to(labels.device)]
            changed = float((permuted != labels).reshape(labels.shape[0], -1).any(dim=1).double().mean())
        elif hasattr(labels, "__array__") and hasattr(labels, "shape") and len(labels.shape) > 0:
            permuted = labels[self.order(labels.shape[0]).numpy()]
            changed = float((permuted != labels).reshape(labels.shape[0], -1).any(axis=1).mean())
        elif isinstance(labels, (list, tuple)):
            permuted = type(labels)(labels[i] for i in self.order(len(labels)).tolist())
            changed = sum(a != b for a, b in zip(permuted, labels)) / max(1, len(labels))
        else:
            raise SaliencyUsageError(
                f"permute(labels) takes the training labels as a tensor, a numpy array or a list, got "
                f"{type(labels).__name__}.")
        self.calls += 1
        self.changed = changed
        return permuted


@dataclass(kw_only=True)
class DataRandomizationResult(PairedMapsResult):
    """The outcome of :func:`data_randomization`: the real-label model's maps against the permuted-label model's."""

    factory: str = "given models"
    permutation_seed: int | None = None
    training: dict[str, str] | None = None  # "trained", "loaded from the cache" or "given", per model
    labels_changed: float | None = None  # the fraction of training labels the permutation changed
    fit: dict[str, Any] | None = None  # training accuracies (fit=(x, y))
    min_fit_accuracy: float = MIN_FIT_ACCURACY
    reference_seed: int | None = None  # the seed of a second real-label model (reference_seed=)
    reference_values: list[float] | None = None  # per input: the real model's maps vs that model's

    @property
    def reference_similarity(self) -> float | None:
        """The mean similarity of two real-label models' maps (seeds ``seed`` and ``reference_seed``)."""
        values = self.reference_values
        return None if not values else sum(values) / len(values)

    @property
    def fitted(self) -> bool | None:
        """Whether the permuted model fitted its permuted labels (None: not measured)."""
        accuracy = None if self.fit is None else self.fit.get("permuted_on_permuted")
        return None if accuracy is None else accuracy >= self.min_fit_accuracy

    def extra_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "permutation_seed": self.permutation_seed, "training": self.training,
                "labels_changed": self.labels_changed, "fit": self.fit, "min_fit_accuracy": self.min_fit_accuracy,
                "fitted": self.fitted, "reference_seed": self.reference_seed,
                "reference_similarities": self.reference_values, "reference_similarity": self.reference_similarity}

    def extra_lines(self) -> list[str]:
        how = self.training or {}
        lines = [f"  models:      real labels: {self.factory}(seed={self.seed}) [{how.get('real', 'given')}]; permuted "
                 f"labels: {self.factory}(seed={self.seed}, permute=LabelPermutation(seed={self.permutation_seed})) "
                 f"[{how.get('permuted', 'given')}]" if self.permutation_seed is not None else
                 "  models:      given as (real-label model, permuted-label model)"]
        if self.reference_similarity is not None:
            further = "further from" if self.mean_similarity < self.reference_similarity else "NOT further from"
            lines.append(
                f"  retrained:   real-label models of seeds {self.seed} and {self.reference_seed}: mean "
                f"{self.similarity_label} {format_score(self.reference_similarity)}; the permuted-label model's maps "
                f"({format_score(self.mean_similarity)}) are {further} the real model's than a retrained model's")
        if self.labels_changed is not None:
            lines.append(f"  labels:      the permutation changed {self.labels_changed:.1%} of the training labels"
                         + (" (of fit's labels)" if self.fit is not None else ""))
        if self.fit is not None:
            fit = self.fit
            permuted = "" if fit.get("permuted_on_permuted") is None else (
                f"; permuted-label model {format_score(fit['permuted_on_permuted'])} on its permuted labels "
                f"(needs >= {format_threshold(self.min_fit_accuracy)}: "
                f"{'fitted' if self.fitted else 'NOT fitted, the check means less'})")
            lines.append(f"  fit:         training accuracy on {fit['n']} examples: real-label model "
                         f"{format_score(fit['real_on_real'])}{permuted}; permuted-label model on the real labels "
                         f"{format_score(fit['permuted_on_real'])}")
        return lines

    def what_next(self) -> str:
        return (
            "  what next:   maps that stay the same when the model was trained on permuted labels (and learned nothing "
            "about the classes) explain the input, not the model (Adebayo et al. 2018: guided backprop and gradient x "
            "input stay close to the input's edges). Try saliency, integrated_gradients or gradcam, and check that the "
            "factory applies permute= to its training labels.")


# ----------------------------------------------------------------------------------------------
# the two models


def _check_factory(train: Any) -> None:
    if not callable(train):
        raise SaliencyUsageError(
            f"data_randomization takes a factory train(seed, *, permute=None) -> model, or a pair (real-label "
            f"model, permuted-label model); got {type(train).__name__}.")
    try:
        parameters = inspect.signature(train).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: its call shows whether it takes permute=
    takes = "permute" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if not takes:
        raise SaliencyUsageError(
            f"the model factory {factory_name(train)} takes no permute= argument. data_randomization calls "
            "train(seed, permute=permute) for the permuted-label model, with permute a callable labels -> labels; "
            "add `permute=None` to the factory and apply it to the training labels: "
            "`if permute is not None: y_train = permute(y_train)`.")


#: The permuted-label factory of each factory and permutation seed: one object, so that the model
#: cache takes its digest once per process, as it does for the factory itself (a factory that
#: records its own calls keeps its key; see :mod:`pytest_saliency.model.cache`).
_PERMUTED: weakref.WeakKeyDictionary[Any, dict[int, functools.partial[Any]]] = weakref.WeakKeyDictionary()


def _permuted_factory(train: Callable[..., Any], permutation_seed: int) -> functools.partial[Any]:
    """``train`` with ``permute=LabelPermutation(permutation_seed)`` bound: its cache key is the
    factory's name with the permutation in it (``train(permute=LabelPermutation(seed=...))``)."""
    try:
        known = _PERMUTED.setdefault(train, {})
    except TypeError:  # not weakly referenceable: a new object every time
        known = {}
    if permutation_seed not in known:
        known[permutation_seed] = functools.partial(train, permute=LabelPermutation(permutation_seed))
    return known[permutation_seed]


def _one_model(train: Callable[..., Any], seed: int, cache: ModelCache | None, build: Any,
               version: str) -> tuple[torch.nn.Module, str]:
    """``train(seed)``'s model, from the cache when it holds it; and how it came ("trained", "loaded from the cache")."""
    if cache is None:
        return call_train(train, seed), "trained"
    misses = cache.misses
    model = cache.get_or_train(train, seed, build, version=version)
    return model, "trained" if cache.misses > misses else "loaded from the cache"


@dataclass
class _Models:
    real: torch.nn.Module
    permuted: torch.nn.Module
    factory: str
    permutation: LabelPermutation | None
    training: dict[str, str]
    reference: torch.nn.Module | None = None  # train(reference_seed)


def _trained(train: Any, seed: int, permutation_seed: int, cache: ModelCache | str | os.PathLike[str] | None,
             build: Any, version: str, inputs: Any, reference_seed: int | None) -> _Models:
    """The real-label and the permuted-label model of a factory, or the pair given."""
    torch = require_torch()
    if isinstance(train, (tuple, list)) and len(train) == 2 and all(isinstance(m, torch.nn.Module) for m in train):
        check_model(train[0])
        check_model(train[1])
        if reference_seed is not None:
            raise SaliencyUsageError("reference_seed= trains a second real-label model with the factory; with a pair of "
                                     "trained models there is none: leave it out.")
        return _Models(train[0], train[1], "given models", None, {"real": "given", "permuted": "given"})
    _check_factory(train)
    if cache is not None and not isinstance(cache, ModelCache):
        cache = ModelCache(cache)
    builder = build if build is not None else getattr(train, "build", None)
    real, real_how = _one_model(train, seed, cache, builder, version)
    if not is_stream(inputs):  # a model the inputs do not fit fails before the second training
        checked_inputs(inputs, real)
    permuted_train = _permuted_factory(train, permutation_seed)
    permutation = permuted_train.keywords["permute"]
    calls = permutation.calls
    permuted, permuted_how = _one_model(permuted_train, seed, cache, builder, version)
    if permuted_how == "trained" and permutation.calls == calls:
        raise SaliencyUsageError(
            f"the model factory {factory_name(train)}(seed={seed}, permute=...) returned without calling permute: "
            "its 'permuted-label' model was trained on the real labels. Apply it to the training labels: "
            "`if permute is not None: y_train = permute(y_train)`.")
    models = _Models(real, permuted, factory_name(train), permutation, {"real": real_how, "permuted": permuted_how})
    if reference_seed is not None:
        models.reference, models.training["reference"] = _one_model(train, reference_seed, cache, builder, version)
    return models


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None, seed: int,
              output: OutputSelector) -> float:
    with model_call_options(output, None, x):
        predicted = predicted_targets(model, x, batch_size or 256, seed)
    return float((predicted == y.to(predicted.device)).double().mean())


def _fit(models: _Models, fit: Any, batch_size: int | None, seed: int, output: OutputSelector) -> dict[str, Any] | None:
    """Training accuracies on ``fit=(x_train, y_train)``: the real model on the real labels, the
    permuted model on the permuted labels (when the check made the permutation) and on the real ones."""
    torch = require_torch()
    if fit is None:
        return None
    if not (isinstance(fit, (tuple, list)) and len(fit) == 2):
        raise SaliencyUsageError(
            f"fit must be (x_train, y_train), the factory's training inputs and labels in its order; got "
            f"{type(fit).__name__}.")
    x = checked_inputs(fit[0], models.real, name="fit[0] (x_train)")
    y = torch.as_tensor(fit[1]) if not isinstance(fit[1], torch.Tensor) else fit[1]
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise SaliencyUsageError(
            f"fit[1] (y_train) must hold one integer label per training input ({x.shape[0]}), got shape "
            f"{tuple(y.shape)} of {y.dtype}.")
    permuted_labels, changed = None, None
    if models.permutation is not None:
        permutation = LabelPermutation(models.permutation.seed)
        permuted_labels, changed = permutation(y), permutation.changed
    return {
        "n": int(x.shape[0]), "labels_changed": changed,
        "real_on_real": _accuracy(models.real, x, y, batch_size, seed, output),
        "permuted_on_permuted": None if permuted_labels is None else _accuracy(
            models.permuted, x, permuted_labels, batch_size, seed, output),
        "permuted_on_real": _accuracy(models.permuted, x, y, batch_size, seed, output),
    }


# ----------------------------------------------------------------------------------------------
# the maps


def _raw_maps(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation,
              target: torch.Tensor) -> torch.Tensor:
    """Raw maps of one model, in eval mode without parameter gradients (flags restored); from, and
    to, the session's map cache."""
    with preserved(model):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return explanation.original(inputs, target, list(range(inputs.shape[0])))


def _combined(parts: list[DataRandomizationResult], arguments: dict[str, Any], stopped: str) -> DataRandomizationResult:
    result: DataRandomizationResult = combined_paired(parts, arguments, stopped)
    if parts[0].reference_values is None:
        return result
    return replace(result, reference_values=[v for part in parts for v in part.reference_values or ()])


@rng_isolated
@streams(StreamSpec(_combined, slim_paired, carries=True))
@passes_model_call
def _compared(
    model: torch.nn.Module, permuted_model: torch.nn.Module, inputs: Inputs, method: str | Explainer, *,
    reference_model: torch.nn.Module | None,
    target: Any, preset: str | MapPipeline | None, seed: int, similarity: str | None, ssim_threshold: float,
    sensitivity_threshold: float, max_similarity: float | None, require_above_controls: bool,
    clip_negative_ssim: bool, confidence: float,
    n_bootstrap: int, batch_size: int | None, constant_maps: str, keep_maps: int, cache: MapCache | None,
    output: OutputSelector, forward_kwargs: Mapping[str, Any] | None, modality: str | None,
    method_kwargs: dict[str, Any],
) -> DataRandomizationResult:
    """Both models' maps of the inputs (each for its own prediction, or ``target``), compared per input."""
    start = time.perf_counter()
    inputs = checked_inputs(inputs, model)
    checked_inputs(inputs, permuted_model)
    verdict = verdict_settings(locals())
    pipeline = get_pipeline(preset)
    similarity = check_choice(default_similarity(similarity), "similarity", SIMILARITY_LABELS)
    resolved, name, options = prepare_method(method, model, inputs, dict(method_kwargs))
    maps, targets, explanations = [], [], []
    for each in (model, permuted_model) if reference_model is None else (model, permuted_model, reference_model):
        targets.append(resolve_target(each, inputs, target, batch_size, seed=verdict.seed))
        explanations.append(Explanation(each, resolved, name, options, verdict.seed, batch_size, cache))
        maps.append(compared_maps(_raw_maps(each, inputs, explanations[-1], targets[-1]), pipeline))
    valid = valid_tokens(inputs)
    keep = usable_rows(maps[0], pipeline, name, similarity, constant_maps, valid, "real-label model's")
    if keep.numel() == 0:
        raise SaliencyUsageError(f"the real-label model's {name} maps are constant for every input "
                                 "(constant_maps='skip' left none); pick other inputs or another method.")
    valid = None if valid is None else valid[keep]
    reference, other = maps[0][keep], maps[1][keep]
    values = paired_similarity(reference, other, pipeline, similarity, valid).tolist()
    retrained = None if reference_model is None else \
        paired_similarity(reference, maps[2][keep], pipeline, similarity, valid).tolist()
    stats, interval = verdict.statistics(values)
    chance = mean_defined(chance_values(reference, pipeline, similarity, valid, "data_randomization"))
    again = repeated_maps(model, inputs, explanations[0], targets[0], pipeline)
    floor = floor_numbers(reference, pipeline, similarity, valid, verdict.seed, verdict.clip_negative,
                          None if again is None else again[keep])
    k = min(keep_maps, len(values))
    return DataRandomizationResult(
        check_name="data_randomization", method=name, method_options=options, pipeline=pipeline,
        similarity=similarity, values=values, stats=stats, similarity_ci=interval, targets=targets[0][keep].tolist(),
        other_targets=targets[1][keep].tolist(), reference_label="real-label model",
        other_label="permuted-label model", n_images=len(values), device=str(inputs.device), seed=verdict.seed,
        seconds=time.perf_counter() - start, max_similarity=verdict.max_similarity,
        chance=chance[0], chance_pairs=chance[1],
        images_available=int(inputs.shape[0]), modality=current_modality().name, figure_rows="models",
        figure_names=("real labels", "permuted labels"),
        reference_maps=reference[:k].detach().cpu(), other_maps=other[:k].detach().cpu(),
        figure_context=shown_inputs(inputs[keep], k),
        target_policy="each model's own predicted class" if target is None else "given (the same for both models)",
        reference_values=retrained, random_control_scores=floor[0], entropy_method=floor[1], entropy_random=floor[2],
        repeat_scores=floor[3], require_above_controls=verdict.require_above_controls,
    )


def _check_options(min_fit_accuracy: Any, keep_maps: Any, batch_size: Any, constant_maps: Any) -> float:
    check_choice(constant_maps, "constant_maps", ("error", "skip"))
    check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    check_count(batch_size, "batch_size", allow_none=True, hint="It bounds the inputs one call explains.")
    return check_number(min_fit_accuracy, "min_fit_accuracy", low=0.0, high=1.0,
                        hint="It is the training accuracy on the permuted labels below which the check warns (0.95).")


@rng_isolated
def data_randomization(
    train: Callable[..., torch.nn.Module] | Sequence[torch.nn.Module],
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    seed: int = 0,
    permutation_seed: int | None = None,
    reference_seed: int | None = None,
    cache: ModelCache | str | os.PathLike[str] | None = None,
    build: Callable[[], torch.nn.Module] | None = None,
    version: str = "",
    fit: tuple[Any, Any] | None = None,
    min_fit_accuracy: float = MIN_FIT_ACCURACY,
    target: int | Sequence[int] | torch.Tensor | str | None = None,
    preset: str | MapPipeline | None = None,
    similarity: str | None = None,
    ssim_threshold: float = SSIM_THRESHOLD,
    sensitivity_threshold: float = SENSITIVITY_THRESHOLD,
    max_similarity: float | None = None,
    require_above_controls: bool = False,
    clip_negative_ssim: bool = True,
    confidence: float = CONFIDENCE,
    n_bootstrap: int = N_BOOTSTRAP,
    batch_size: int | None = None,
    constant_maps: str = "error",
    keep_maps: int = 4,
    map_cache: MapCache | None = None,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> DataRandomizationResult:
    """Adebayo et al.'s data randomization: maps of a model trained on permuted labels against the real model's.

    ``train``: a factory ``train(seed, *, permute=None) -> model`` (called as ``train(seed)`` and
    ``train(seed, permute=LabelPermutation(permutation_seed))``, which it applies to its training
    labels), or a pair ``(real_model, permuted_model)`` trained elsewhere. ``cache``: a
    :class:`ModelCache` (or its directory) that stores both models (``build`` / ``version`` as for
    :meth:`ModelCache.get_or_train`). ``permutation_seed``: default derived from ``seed``.
    ``fit=(x_train, y_train)``: report the training accuracies, warn below ``min_fit_accuracy``.
    ``reference_seed``: also train (or load) ``train(reference_seed)`` and report how alike two
    real-label models' maps are (the seed-consistency floor): a clear pass has the permuted-label
    model's maps further from the real model's than the retrained model's are.
    ``target=None`` explains each model's own predicted class. ``map_cache``: a
    :class:`~pytest_saliency.maps.cache.MapCache` shared with other checks. ``inputs`` may be a
    loader (the models are trained once, then explained batch by batch). The verdict and the
    other options are :func:`pytest_saliency.checks.random_logit.random_logit`'s.
    """
    start = time.perf_counter()
    seed = check_seed(seed)
    min_fit_accuracy = _check_options(min_fit_accuracy, keep_maps, batch_size, constant_maps)
    if not is_stream(inputs):
        checked_inputs(inputs)
    permutation_seed = derive_seed(seed, "label_permutation") if permutation_seed is None else \
        check_seed(permutation_seed, "permutation_seed")
    if reference_seed is not None and check_seed(reference_seed, "reference_seed") == seed:
        raise SaliencyUsageError(f"reference_seed must differ from seed ({seed}): it trains a second real-label model.")
    models = _trained(train, seed, permutation_seed, cache, build, version, inputs, reference_seed)
    fitted = _fit(models, fit, batch_size, seed, output)
    result = _compared(
        models.real, models.permuted, inputs, method, reference_model=models.reference, target=target, preset=preset,
        seed=seed, similarity=similarity, ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold,
        max_similarity=max_similarity, require_above_controls=require_above_controls,
        clip_negative_ssim=clip_negative_ssim, confidence=confidence, n_bootstrap=n_bootstrap, batch_size=batch_size,
        constant_maps=constant_maps, keep_maps=keep_maps, cache=map_cache, output=output,
        forward_kwargs=forward_kwargs, modality=modality, method_kwargs=method_kwargs)
    permutation = models.permutation
    changed = fitted["labels_changed"] if fitted is not None else (
        permutation.changed if permutation is not None and models.training["permuted"] == "trained" else None)
    result = replace(
        result, factory=models.factory, training=models.training, fit=fitted, min_fit_accuracy=min_fit_accuracy,
        permutation_seed=None if permutation is None else permutation.seed, reference_seed=reference_seed,
        labels_changed=changed, seconds=time.perf_counter() - start,
        reproduce=reproduce or f"pytest_saliency.data_randomization(train, inputs, method={result.method!r}, "
        f"preset={result.pipeline.name!r}, seed={seed})")
    if result.fitted is False and fitted is not None:
        warn_user(
            f"data_randomization: the permuted-label model reached {fitted['permuted_on_permuted']:.1%} training "
            f"accuracy on its permuted labels (below {min_fit_accuracy:.0%}); a model that did not memorize them is "
            "close to its random initialization, whose maps differ from anything, so the check means less. Train it "
            "longer (Adebayo et al. trained random-label models twice as many epochs, to > 95%).")
    return result


@rng_isolated
def assert_sensitive_to_data_randomization(train: Any, inputs: Inputs, method: str | Explainer = "saliency",
                                           **options: Any) -> DataRandomizationResult:
    """Fail (``SaliencyCheckFailed``) when :func:`data_randomization`'s maps of the permuted-label
    model do not differ from the real model's; returns the result on success."""
    __tracebackhide__ = True
    result = data_randomization(train, inputs, method, **options)
    return raise_if_failed(result)


__all__ = [
    "MIN_FIT_ACCURACY",
    "DataRandomizationResult",
    "LabelPermutation",
    "assert_sensitive_to_data_randomization",
    "data_randomization",
]
