"""Explanation consistency across retrained models, and the explainer's own seed stability.

Two kinds of randomness can change a saliency map without changing what a model "knows":

1. **Training randomness** (Watson et al., "Agree to Disagree"). Models of one architecture that
   differ only in the seed, the data shuffle or dropout reach the same accuracy, yet their
   explanations differ. The paper measures this with a logistic-regression (LR) classifier that
   tries to tell model a's maps from model b's. M is its accuracy, S = 2|M - 0.5| the
   separability, and the consistency is C = 1 - mean S over the model pairs. C = 1 means no
   classifier can tell the maps apart; C = 0 means every pair is perfectly separable.
   :func:`explanation_consistency` computes C, and :func:`assert_seed_consistency_above` gates
   on it or on a pairwise similarity.
2. **The explainer's randomness** (SAM). SmoothGrad's noise, GradientSHAP's baselines and LIME's
   samples depend on the method's seed. :func:`assert_explainer_seed_stable` explains one model
   under several seeds, compares the maps and checks determinism: the same seed twice must give
   bit-identical maps.

How the open choices of the paper are settled here, and why:

Held-out accuracy with grouped folds
    M is the **held-out** accuracy of K-fold cross-validation (``n_splits=5``). The inputs are
    assigned to folds by a seeded permutation, and **both maps of one input fall in the same
    fold** (this is GroupKFold with the input index as the group, shuffled). In-sample accuracy
    would be about 1 whenever maps have more features than there are inputs, so every model
    would look inconsistent. Ungrouped folds leak the other way: the twin map of a test input,
    with the opposite label, sits in the training set, so near-identical maps are predicted
    *wrong* and M drops below 0.5. Because each input contributes one map of each model, every
    fold is exactly balanced and chance is exactly 0.5. The mean training-fold accuracy is
    reported next to M (``train_accuracy``) to make the difference visible.
Standardization
    The classifier is ``StandardScaler`` followed by ``LogisticRegression(C=1.0, lbfgs,
    max_iter=10000, random_state=seed)``, and the scaler is fit on the training folds only. The
    scaler makes the L2 penalty, and so the verdict, independent of the attribution's units:
    gradients of logits and of probabilities differ by orders of magnitude. It is fit on the
    pooled maps of both models, so a difference in scale between the two models is still
    visible to the classifier. Pass ``classifier=`` (any scikit-learn classifier, cloned per
    fold) to use another one, e.g. a linear SVM.
What the classifier sees
    ``lr_input="attributions"`` (default): the raw attributions flattened, as the paper used raw
    SHAP values; the sign is kept. ``lr_input="maps"``: the preset's post-processed maps.
Targets
    By default every model is explained for the class that the **first (reference) model**
    predicts, and this target is held fixed for all models. The maps then answer the same
    question ("why class c?"), so a difference is a difference in explanation, not in the
    decision. ``target="each"`` explains each model's own prediction: a disagreement in
    predictions then also counts as an inconsistency. An int or a tensor of shape (N,) (e.g. the
    true labels) is used as given.
Pairs and factors
    C is pooled over all pairs (``pairs="all"``, as the paper's "Overall"), or over the pairs
    with the reference model only (``pairs="reference"``). ``factors`` maps model labels to the
    one training factor in which they differ from the reference, e.g. ``{"seed1": "seed",
    "seed2": "seed", "shuffle1": "shuffle"}``; models not listed are references. A pair counts
    towards factor f when f is the only factor listed for its two models: (ref, seed1) and
    (seed1, seed2) count for "seed". A pair that mixes factors, or joins two references, counts
    only towards the overall C.
Similarities
    The classifier says *whether* maps differ; the similarities say *how much*. Each pair also
    gets, per input and then averaged: SSIM (``"ssim"``) on the preset's maps with the preset's
    SSIM parameters, and top-k sign agreement (``"sign_agreement"``, ``k=0.1`` = top 10%) on
    the signed raw attributions. Any metric of :data:`pytest_saliency.compare.metrics.METRICS` can be
    named. ``ssim`` and ``hog_pearson`` use the maps; all other metrics use the raw attributions.
Feature vectors
    Inputs of shape (N, D) give attributions of shape (N, D). ``map_shape=(H, W)`` views them as
    H x W images (e.g. (8, 8) for flattened digits), for SSIM and the preset. Without it, SSIM is
    left out of the default metrics.
Different-input baseline
    Next to each similarity the result reports its value for maps of *different* inputs: model
    a's map of input i against model b's map of input i+1. This is a chance level measured on
    your own data and pipeline. A similarity between seeds that is barely above this baseline
    means the models agree only on what every map of this data set looks like.
Accuracy parity
    With ``labels=`` each model's accuracy is reported. Equal accuracies with a low C are the
    paper's point: accuracy parity does not imply explanation parity.
Inputs as batches
    ``inputs`` may be an iterable of batches, such as a ``DataLoader`` (see
    :mod:`pytest_saliency.checks.streaming`). A factory's models are trained (or loaded) once;
    then each batch is explained by every model and compared input by input, and the means are
    taken over the per-input numbers of all batches. The classifier is fit on all inputs at
    once, so each model's classifier features (its flattened maps, N x D numbers, on the CPU)
    are kept until the end: the one part of the check whose memory grows with N times the map
    size. The figure shows the first batch's maps, and the different-input baseline pairs
    inputs within a batch. ``labels`` default to the batches' labels, and ``target="labels"``
    explains them.
Fidelity next to consistency
    Watson et al. plot each architecture's consistency against the infidelity and the
    sensitivity (Yeh et al. 2019) of its explanations. ``fidelity=True`` measures both per model
    with captum.metrics (:mod:`pytest_saliency.compare.fidelity`: the perturbations of an input
    are drawn from a local generator keyed by the seed and the input's index, the same for every
    model and any batching), for the class each model was explained for, and reports per model
    the mean over inputs with a 95% percentile bootstrap interval (``result.fidelity``), the
    model's C over the pairs it is in (:meth:`ConsistencyResult.model_consistency`), a table in
    the report and the figure ``consistency_vs_fidelity``. The infidelity is in squared output
    units, so the table adds the **relative infidelity**, the infidelity over the mean squared
    output change under the same perturbations, which compares models whose outputs differ in
    scale (a model with random weights has a tiny infidelity because its outputs hardly move).
    Off by default: per input and model it costs ``2 * n_perturb_samples`` forward passes and
    ``n_perturb_samples`` explanations of perturbed copies (a perturbed copy is explained with
    its input's index, so a stochastic method draws the same numbers for it). Options:
    ``n_perturb_samples`` (10), ``perturb_radius`` (0.02, in input units: the infidelity's
    Gaussian std and the sensitivity's L-inf radius), ``fidelity_normalize`` (True); over a
    loader the per-example values of the batches are concatenated.

Two things to know when reading C:

* **Logits versus probabilities.** A softmax classifier's logits are identified only up to a
  common shift: adding the same function g(x) to every logit leaves the probabilities and the
  loss unchanged, so training never constrains g, and its gradient comes from the
  initialization. Logit maps (captum's default target, since models return logits) therefore
  carry a seed-specific component that is invisible in the predictions, and the classifier
  finds it easily: C of logit maps can be far lower than C of log-probability maps of the same
  models, while SSIM and sign agreement hardly change (figures in ``benchmarks/RESULTS.md``,
  "Where the seed-consistency defaults come from"). Both numbers are correct; they answer
  different questions. Wrap each model as ``pytest_saliency.ensemble([model])`` to explain
  log-probabilities.
* **M detects any systematic difference, however small.** The classifier predicts by sign,
  not by size. When maps do not vary between inputs (the saliency of a linear model is its
  weight row), weights that agree to 1e-6 still give maps that are separable. The pair's
  ``relative_difference`` (||a - b|| / max(||a||, ||b||)) and the similarities (SSIM and sign
  agreement of 1.000) show that such a difference is negligible. Input-dependent methods
  (input_x_gradient, integrated_gradients) do not have this problem.

Library hygiene: no global RNG state changes (explanations run under
:func:`pytest_saliency.core.rng.seeded`; the folds use a local numpy generator), and the models are
left exactly as they were (mode flags and ``requires_grad`` restored).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..compare.fidelity import (
    DEFAULT_RADIUS,
    DEFAULT_SAMPLES,
    check_fidelity_options,
    infidelity_values,
    sensitivity_values,
)
from ..compare.separability import Separability, fold_assignment, lr_separability, require_sklearn
from ..compare.statistics import bootstrap_interval
from ..core.forward import OutputSelector, call_model, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.rng import derive_seed, pass_seeded
from ..core.stream import example_offset, is_stream, previous_rows
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import (
    check_count,
    check_flag,
    check_inputs,
    check_model,
    check_seed,
    check_threshold,
    checked_inputs,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError, raise_if_failed, warn_user
from ..maps.explainers import attribute, prepare_method
from ..maps.methods import Explainer, MethodSpec, draws_random
from ..maps.modality import current_modality, figure_context, per_position, valid_positions
from ..maps.options import format_options
from ..maps.postprocess import MapPipeline, apply_pipeline, get_pipeline
from ..maps.targets import predicted_targets, resolve_target
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .streaming import StreamSpec, same_across_batches, streams

if TYPE_CHECKING:
    import os

    import torch

    from ..compare.metrics import KValue, MetricInfo
    from ..model.cache import ModelCache

    #: Trained models (a list, or a dict by label), or a factory ``train(seed) -> model``.
    ModelsOrFactory = Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module] | Callable[[int], torch.nn.Module]

# Gate defaults for assert_seed_consistency_above (see its docstring for the reasoning). The top-k
# agreement metrics default to CHANCE_MULTIPLE times their chance level for the k and map size used.
CONSISTENCY_THRESHOLDS: dict[str, float] = {"lr_separability": 0.5}
CHANCE_MULTIPLE = 2.0
_CHANCE_DEFAULT_METRICS = ("sign_agreement", "feature_agreement")
# Gate defaults for assert_explainer_seed_stable (see its docstring).
SEED_STABILITY_THRESHOLDS: dict[str, float] = {"ssim": 0.5, "sign_agreement": 0.5}
#: Two explanations with one seed count as the same when they differ by at most this fraction of the
#: map's largest magnitude: float32 sums in another order differ by about 1e-7 of it.
REPRODUCIBLE_RTOL = 1e-4
LR_SEPARABILITY = "lr_separability"
TARGET_MODES = ("reference", "each")
PAIR_MODES = ("all", "reference")
LR_INPUTS = ("attributions", "maps")
_MAP_METRICS = ("ssim", "hog_pearson")  # metrics with a spatial window: computed on the preset's maps
DEFAULT_METRICS = ("ssim", "sign_agreement")
#: Inputs whose maps a ConsistencyResult keeps for its figure (each model's maps of the first ones).
SHOWN_INPUTS = 4
#: The most inputs whose flattened maps the separability classifier is fit on (the first ones):
#: what bounds the check's memory over a loader of any size.
CLASSIFIER_INPUTS = 5000
#: The per-model fidelity's bootstrap interval: its confidence and resamples.
FIDELITY_CONFIDENCE = 0.95
FIDELITY_RESAMPLES = 1000


# ============================================================================================
# Results
# ============================================================================================


@dataclass
class PairConsistency:
    """One model pair: the classifier's verdict and the maps' similarities (means over inputs)."""

    a: str
    b: str
    factor: str | None  # the single factor the pair differs in (None: none or several)
    lr_accuracy: float  # M, held out
    train_accuracy: float  # in-sample (training folds), for contrast
    similarities: dict[str, float]
    prediction_agreement: float  # share of inputs both models predict the same class for
    fold_accuracies: list[float] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)  # the same metrics on different inputs
    relative_difference: float = math.nan  # ||a - b|| / max(||a||, ||b||) of the raw attributions

    @property
    def separability(self) -> float:
        return 2.0 * abs(self.lr_accuracy - 0.5)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "factor": self.factor, "lr_accuracy": self.lr_accuracy,
            "separability": self.separability, "train_accuracy": self.train_accuracy,
            "similarities": {k: _finite_or_none(v) for k, v in self.similarities.items()},
            "prediction_agreement": self.prediction_agreement, "fold_accuracies": self.fold_accuracies,
            "baselines": {k: _finite_or_none(v) for k, v in self.baselines.items()},
            "relative_difference": _finite_or_none(self.relative_difference),
        }


@dataclass
class ModelFidelity:
    """One model's explanations measured by Yeh et al.'s infidelity and sensitivity (captum.metrics,
    see :mod:`pytest_saliency.compare.fidelity`): the means over inputs with percentile bootstrap
    intervals of the mean. Lower is better for all three.

    The infidelity is in squared units of the model's output, so a model whose outputs barely
    move (random weights) has a tiny infidelity whatever its maps. ``relative_infidelity``
    divides each input's infidelity by the mean squared output change ``E[(f(x) - f(x - I))^2]``
    under the same perturbations (captum's infidelity of an all-zero map): the share of the
    output's change that the map does not explain, in [0, 1] with the normalized infidelity,
    comparable across models."""

    model: str
    infidelity: float
    infidelity_interval: tuple[float, float]
    sensitivity: float
    sensitivity_interval: tuple[float, float]
    n_inputs: int  # inputs with a finite value of all three (an all-zero map has no normalized infidelity)
    relative_infidelity: float = math.nan
    relative_infidelity_interval: tuple[float, float] = (math.nan, math.nan)
    # Not in to_dict(): each input's values (float64, CPU), in the order of the inputs.
    infidelity_values: Any = field(default=None, repr=False, compare=False)
    sensitivity_values: Any = field(default=None, repr=False, compare=False)
    output_change_values: Any = field(default=None, repr=False, compare=False)  # E[(f(x) - f(x - I))^2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "infidelity": _finite_or_none(self.infidelity),
            "infidelity_interval": [_finite_or_none(v) for v in self.infidelity_interval],
            "sensitivity": _finite_or_none(self.sensitivity),
            "sensitivity_interval": [_finite_or_none(v) for v in self.sensitivity_interval],
            "relative_infidelity": _finite_or_none(self.relative_infidelity),
            "relative_infidelity_interval": [_finite_or_none(v) for v in self.relative_infidelity_interval],
            "n_inputs": self.n_inputs,
        }


@dataclass
class ConsistencyResult:
    """Explanation consistency of a set of models; ``to_dict()`` is JSON-serializable.

    ``consistency`` is C over all compared pairs, ``per_factor`` C per training factor,
    ``pairs`` the per-pair table. ``metric`` and ``threshold`` are the gate (set by
    :func:`assert_seed_consistency_above`); without a threshold ``passed`` is True.
    """

    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    models: list[str]
    factors: dict[str, str]
    pairs: list[PairConsistency]
    consistency: float
    per_factor: dict[str, float]
    metrics: list[str]
    k: KValue
    target_mode: str
    pair_mode: str
    lr_input: str
    classifier: str
    n_splits: int
    n_inputs: int
    seed: int
    device: str
    seconds: float
    accuracies: dict[str, float] | None = None
    num_features: int = 0  # features per raw attribution map (D), for top-k chance levels
    metric: str = LR_SEPARABILITY
    threshold: float | None = None
    converged: bool = True
    reproduce: str = ""
    check: str = "explanation_consistency"  # "seed_consistency" when gated by assert_seed_consistency_above
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)
    # For figures() only, not in to_dict(): the first SHOWN_INPUTS inputs and each model's preset maps of them (CPU)
    shown_inputs: Any = field(default=None, repr=False, compare=False)
    shown_maps: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # see maps.modality
    lr_inputs: int = 0  # the inputs whose maps the classifier was fit on: the first ones, at most classifier_inputs
    # fidelity=True: each model's infidelity and sensitivity, and how they were measured ({} and None without)
    fidelity: dict[str, ModelFidelity] = field(default_factory=dict)
    fidelity_settings: dict[str, Any] | None = None

    def model_consistency(self) -> dict[str, float]:
        """Each model's C over the pairs it is in: 1 - mean separability of those pairs."""
        return {label: _consistency([p for p in self.pairs if label in (p.a, p.b)]) for label in self.models}

    def value(self, metric: str | None = None) -> float:
        """The gated number: C for ``"lr_separability"``, else the mean pairwise similarity."""
        metric = metric or self.metric
        if metric == LR_SEPARABILITY:
            return self.consistency
        if metric not in self.metrics:
            raise unknown_choice("metric", metric, [LR_SEPARABILITY, *self.metrics], "Compute it with metrics=(...).")
        return _nanmean([p.similarities[metric] for p in self.pairs])

    def baseline(self, metric: str) -> float:
        """The metric's mean over pairs on *different* inputs: the chance level on this data."""
        if metric not in self.metrics:
            raise unknown_choice("metric", metric, self.metrics)
        return _nanmean([p.baselines.get(metric, math.nan) for p in self.pairs])

    @property
    def score(self) -> float:
        return self.value(self.metric)

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        score = self.score
        return not math.isnan(score) and score >= self.threshold

    @property
    def mean_lr_accuracy(self) -> float:
        return _nanmean([p.lr_accuracy for p in self.pairs])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_writes": list(self.model_writes),
            "check": self.check,
            "passed": self.passed,
            "metric": self.metric,
            "threshold": self.threshold,
            "score": _finite_or_none(self.score),
            "consistency": self.consistency,
            "per_factor": dict(self.per_factor),
            "mean_lr_accuracy": self.mean_lr_accuracy,
            "similarities": {m: _finite_or_none(self.value(m)) for m in self.metrics},
            "baselines": {m: _finite_or_none(self.baseline(m)) for m in self.metrics},
            "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(),
            "models": list(self.models),
            "factors": dict(self.factors),
            "pairs": [p.to_dict() for p in self.pairs],
            "accuracies": None if self.accuracies is None else dict(self.accuracies),
            "metrics": list(self.metrics),
            "k": jsonable(self.k),
            "target": self.target_mode,
            "pair_mode": self.pair_mode,
            "lr_input": self.lr_input,
            "classifier": self.classifier,
            "converged": self.converged,
            "n_splits": self.n_splits,
            "n_inputs": self.n_inputs,
            "lr_inputs": self.lr_inputs,
            "num_features": self.num_features,
            "seed": self.seed,
            "device": self.device,
            "seconds": self.seconds,
            "reproduce": self.reproduce,
            "fidelity": self._fidelity_dict(),
        }

    def _fidelity_dict(self) -> dict[str, Any] | None:
        if not self.fidelity:
            return None
        per_model = self.model_consistency()
        return {
            "settings": dict(self.fidelity_settings or {}),
            "models": {label: {**f.to_dict(), "consistency": _finite_or_none(per_model.get(label, math.nan)),
                               "accuracy": None if self.accuracies is None else self.accuracies.get(label)}
                       for label, f in self.fidelity.items()},
        }

    def fidelity_table(self) -> str:
        """Per model: accuracy, its C, and the mean infidelity and sensitivity with their intervals."""
        settings = self.fidelity_settings or {}
        per_model = self.model_consistency()
        confidence = settings.get("confidence", FIDELITY_CONFIDENCE)
        lines = [
            f"  fidelity:    Yeh et al.'s infidelity (captum; Gaussian perturbations, std "
            f"{settings.get('perturb_radius')}, {settings.get('n_perturb_samples')} per input"
            f"{', normalized' if settings.get('normalize') else ''}) and sensitivity_max (uniform in the L-inf ball "
            f"of radius {settings.get('perturb_radius')}); means over inputs [{confidence:.0%} bootstrap interval]; "
            "lower is better",
        ]
        width = max([len("model")] + [len(label) for label in self.fidelity])
        lines.append("               relative infidelity: the infidelity over the mean squared output change under "
                     "the same perturbations (comparable across models whose outputs differ in scale)")
        lines.append(f"    {'model':<{width}}  accuracy  C (its pairs)  {'infidelity':>32}  {'relative infidelity':>28}"
                     f"  {'sensitivity':>28}")
        for label, f in self.fidelity.items():
            accuracy = "-" if self.accuracies is None else f"{self.accuracies[label]:.1%}"
            lines.append(
                f"    {label:<{width}}  {accuracy:>8}  {_fmt(per_model.get(label, math.nan)):>13}  "
                f"{_with_interval(f.infidelity, f.infidelity_interval):>32}  "
                f"{_with_interval(f.relative_infidelity, f.relative_infidelity_interval):>28}  "
                f"{_with_interval(f.sensitivity, f.sensitivity_interval):>28}"
            )
        return "\n".join(lines)

    def _metric_label(self, metric: str) -> str:
        if metric == LR_SEPARABILITY:
            return "C"
        info = _metric_info(metric)
        return f"{metric}@{self.k}" if info is not None and info.takes_k else f"mean {metric}"

    def numbers(self) -> dict[str, Number]:
        """The gated score against its threshold, C and the mean LR accuracy, the run's size and settings."""
        return {
            "metric": self.metric, "score": self.score, "threshold": self.threshold, "consistency": self.consistency,
            "mean_lr_accuracy": self.mean_lr_accuracy, "models": len(self.models), "pairs": len(self.pairs),
            "n_inputs": self.n_inputs, "seed": self.seed, "method": self.method, "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """Model x model matrices (held-out LR accuracy, separability and each similarity metric),
        and each model's maps of the first inputs (see :meth:`map_figures`)."""
        from ..reporting.figures import pair_figures

        values = {"lr_accuracy": [p.lr_accuracy for p in self.pairs],
                  "separability": [p.separability for p in self.pairs]}
        values.update({m: [p.similarities[m] for p in self.pairs] for m in self.metrics})
        infos = {m: _metric_info(m) for m in self.metrics}
        return pair_figures(
            pairs=[(p.a, p.b) for p in self.pairs], values=values, n_inputs=self.n_inputs, check=self.check,
            what="model", higher_is_better={m: info.higher_is_better for m, info in infos.items() if info is not None},
        ) + self.fidelity_figures() + self.map_figures()

    def fidelity_figures(self) -> list[Figure]:
        """Watson et al.'s second panel: each model's C (over its pairs) against the infidelity and
        the sensitivity of its explanations; none without ``fidelity=True``."""
        from ..reporting.fidelity_figures import FidelityPoint, consistency_fidelity_figures

        if not self.fidelity:
            return []
        per_model = self.model_consistency()
        points = [FidelityPoint(label=label, consistency=per_model.get(label, math.nan), infidelity=f.infidelity,
                                infidelity_interval=f.infidelity_interval, sensitivity=f.sensitivity,
                                sensitivity_interval=f.sensitivity_interval, relative_infidelity=f.relative_infidelity,
                                relative_infidelity_interval=f.relative_infidelity_interval)
                  for label, f in self.fidelity.items()]
        return consistency_fidelity_figures(points, method=self.method, n_inputs=self.n_inputs, check=self.check)

    def map_figures(self, what: str = "models", name: str = "model_maps") -> list[Figure]:
        """The grid of ``shown_maps``: the first inputs on top, then one row per model (``what``
        names the rows, in the plural; ``name`` the figure); none when the result kept no maps."""
        from ..reporting.figures import model_maps_figures

        return model_maps_figures(maps=self.shown_maps, inputs=self.shown_inputs, n_inputs=self.n_inputs,
                                  method=self.method, preset=self.pipeline.name, what=what, name=name,
                                  **self.figure_context)

    def summary(self) -> str:
        """One line: the gated number, the threshold and the verdict."""
        parts = [f"C = {format_score(self.consistency)} (mean held-out LR accuracy "
                 f"{format_score(self.mean_lr_accuracy)})"]
        parts += [f"{self._metric_label(m)} = {format_score(self.value(m))}" for m in self.metrics]
        head = f"{self.check} [{self.method}, {self.pipeline.name}]"
        if self.threshold is not None:
            verdict = "PASS" if self.passed else "FAIL"
            head = (f"{verdict} {head}: {self._metric_label(self.metric)} = {format_score(self.score)} vs >= "
                    f"{format_threshold(self.threshold)};")
        else:
            head += ":"
        return f"{head} {'; '.join(parts)}; {len(self.models)} models, {len(self.pairs)} pairs, N = {self.n_inputs}"

    def table(self, max_rows: int = 30) -> str:
        """Per-pair table, most separable pairs first."""
        rows = sorted(self.pairs, key=lambda p: -p.separability)
        name_w = max([len("pair")] + [len(f"{p.a} vs {p.b}") for p in rows])
        fac_w = max([len("factor")] + [len(p.factor or "-") for p in rows])
        sims = "".join(f"  {m[:14]:>14}" for m in self.metrics)
        lines = [f"    {'pair':<{name_w}}  {'factor':<{fac_w}}  M held-out  M train      S  same pred{sims}"]
        for p in rows[:max_rows]:
            values = "".join(f"  {_fmt(p.similarities[m]):>14}" for m in self.metrics)
            lines.append(
                f"    {p.a + ' vs ' + p.b:<{name_w}}  {p.factor or '-':<{fac_w}}  {p.lr_accuracy:10.3f}"
                f"  {p.train_accuracy:7.3f}  {p.separability:5.3f}  {p.prediction_agreement:9.1%}{values}"
            )
        if len(rows) > max_rows:
            lines.append(f"    ... {len(rows) - max_rows} more pairs (all in result.to_dict()['pairs'])")
        return "\n".join(lines)

    def report(self) -> str:
        target = {
            "reference": f"the reference model's ({self.models[0]}) prediction, fixed for all models",
            "each": "each model's own prediction",
        }.get(self.target_mode, self.target_mode)
        lines = [
            f"  check:       {self.check} (C = 1 - mean 2|M - 0.5| over {len(self.pairs)} pair(s), "
            f"pairs={self.pair_mode})",
            f"  method:      {self.method}{format_options(self.method_options)}   target: {target}",
            f"  preset:      {self.pipeline.describe()}",
            f"  classifier:  {self.classifier} on {self.lr_input}"
            + (f" of the first {self.lr_inputs} inputs" if 0 < self.lr_inputs < self.n_inputs else "")
            + f", {self.n_splits}-fold CV grouped by input "
            f"(held-out M; chance = 0.5)" + ("" if self.converged else "  [did NOT converge in some folds]"),
            f"  C:           {format_score(self.consistency)}   (mean held-out M {self.mean_lr_accuracy:.3f})",
        ]
        if self.threshold is not None:
            lines.append(
                f"  gate:        {self._metric_label(self.metric)} = {format_score(self.score)} vs >= "
                f"{format_threshold(self.threshold)}"
                f"  -> {'PASS' if self.passed else 'FAIL'}"
            )
        if self.per_factor:
            lines.append("  per factor:  " + ", ".join(f"{f}: C = {format_score(c)}"
                                                   for f, c in sorted(self.per_factor.items())))
        if self.metrics:
            lines.append(
                "  similarity:  "
                + ", ".join(
                    f"{self._metric_label(m)} = {_fmt(self.value(m))} (different inputs: {_fmt(self.baseline(m))})"
                    for m in self.metrics
                )
            )
        tiny = [p for p in self.pairs if p.separability >= 0.2 and p.relative_difference < 1e-3]
        if tiny:
            lines.append(
                f"  note:        {len(tiny)} pair(s) are separable although their attributions differ by less than 0.1% "
                "(relative difference); the classifier found a tiny systematic difference, e.g. maps that do not "
                "vary between inputs. Judge such pairs by the similarities."
            )
        if self.accuracies:
            values = list(self.accuracies.values())
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            lines.append(
                f"  accuracy:    {mean:.2%} +- {std:.2%} across models ("
                + ", ".join(f"{k}: {v:.1%}" for k, v in self.accuracies.items())
                + "); accuracy parity does not imply explanation parity"
            )
        lines.append(self.table())
        if self.fidelity:
            lines.append(self.fidelity_table())
        lines.append(f"  inputs: {self.n_inputs}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s")
        return _report_text(lines, self.reproduce)

    def failure_message(self) -> str:
        if self.threshold is None:  # no gate, so nothing failed: the summary and the report
            return "\n".join([self.summary(), self.report()])
        if self.metric == LR_SEPARABILITY:
            headline = (
                f"Saliency check failed: {self.method} explanations are not consistent across the models "
                f"(C = {format_score(self.consistency)} < {format_threshold(self.threshold)}): "
                "a classifier tells their maps apart with "
                f"held-out accuracy {self.mean_lr_accuracy:.3f} on average"
            )
            hint = (
                "  what next:   the explanations depend on training randomness. Watson et al. report C = 0-0.34 for "
                "neural networks (and 0.94 for an SVM), so C gates suit convex or kernel models. For a neural net, "
                "gate on a similarity (metric='sign_agreement' or 'ssim'), explain log-probabilities instead of "
                "logits (wrap each model as pytest_saliency.ensemble([model]); logit maps carry a component that "
                "training does not constrain), or average the randomness out with an ensemble of seeds "
                "(consistency_vs_ensemble_size shows how many members it takes)."
            )
        else:
            headline = (
                f"Saliency check failed: {self.method} maps of the models are not similar enough "
                f"({self._metric_label(self.metric)} = {format_score(self.score)} < {format_threshold(self.threshold)})"
            )
            hint = (
                "  what next:   the models explain the same inputs differently although they differ only in training "
                "randomness. Look at the least similar pairs above; ensembling several seeds "
                "(pytest_saliency.ensemble) usually raises the agreement."
            )
        return "\n".join([headline, self.report(), hint])


@dataclass
class SeedStabilityResult:
    """The same model explained under several method seeds; ``to_dict()`` is JSON-serializable."""

    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    seeds: list[int]
    metric: str
    k: KValue
    threshold: float | None
    pair_scores: list[tuple[int, int, float]]  # (seed a, seed b, mean similarity over inputs)
    deterministic: bool
    max_abs_difference: float  # between two runs with seeds[0]; 0.0 when bit-identical
    stochastic: bool | None  # whether the named method draws random numbers (None: custom callable)
    n_inputs: int
    device: str
    seconds: float
    reproduce: str = ""

    check = "explainer_seed_stability"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)
    # Not in to_dict(): per seed pair, the similarity of each input (a tensor; the means of a
    # stream's batches are taken over them), and the largest |value| of the seeds[0] maps (the
    # scale of the determinism tolerance).
    pair_values: list[Any] = field(default_factory=list, repr=False, compare=False)
    scale: float = 0.0

    @property
    def score(self) -> float:
        """Mean pairwise similarity over the seed pairs."""
        return _nanmean([s for _, _, s in self.pair_scores])

    @property
    def worst_pair(self) -> tuple[int, int, float]:
        return min(self.pair_scores, key=lambda row: (math.inf if math.isnan(row[2]) else row[2]))

    @property
    def passed(self) -> bool:
        if not self.deterministic:
            return False
        if self.threshold is None:
            return True
        return not math.isnan(self.score) and self.score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_writes": list(self.model_writes),
            "check": self.check, "passed": self.passed, "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(), "seeds": list(self.seeds), "metric": self.metric,
            "k": jsonable(self.k), "threshold": self.threshold, "score": _finite_or_none(self.score),
            "pairs": [{"seed_a": a, "seed_b": b, "similarity": _finite_or_none(s)} for a, b, s in self.pair_scores],
            "deterministic": self.deterministic, "max_abs_difference": self.max_abs_difference,
            "stochastic": self.stochastic, "n_inputs": self.n_inputs, "device": self.device,
            "seconds": self.seconds, "reproduce": self.reproduce,
        }

    def _label(self) -> str:
        info = _metric_info(self.metric)
        return f"{self.metric}@{self.k}" if info is not None and info.takes_k else f"mean {self.metric}"

    def numbers(self) -> dict[str, Number]:
        """The mean similarity over seed pairs against its threshold, determinism, the run's size and settings."""
        return {
            "metric": self.metric, "score": self.score, "threshold": self.threshold,
            "deterministic": self.deterministic, "max_abs_difference": self.max_abs_difference,
            "seeds": ", ".join(str(s) for s in self.seeds), "n_inputs": self.n_inputs, "method": self.method,
            "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """The seed x seed matrix of mean similarities."""
        from ..reporting.figures import pair_figures

        info = _metric_info(self.metric)
        return pair_figures(
            pairs=[(f"seed {a}", f"seed {b}") for a, b, _ in self.pair_scores],
            values={self.metric: [s for _, _, s in self.pair_scores]}, n_inputs=self.n_inputs, check=self.check,
            what="seed", higher_is_better={} if info is None else {self.metric: info.higher_is_better},
        )

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        threshold = f" vs >= {format_threshold(self.threshold)}" if self.threshold is not None else ""
        determinism = "deterministic" if self.deterministic else "NOT deterministic"
        return (
            f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: {self._label()} = {format_score(self.score)}"
            f"{threshold} over {len(self.seeds)} seeds; {determinism}; N = {self.n_inputs}"
        )

    def report(self) -> str:
        a, b, worst = self.worst_pair
        kind = {True: "stochastic", False: "deterministic (seeds cannot change its maps)", None: "custom callable"}[
            self.stochastic
        ]
        lines = [
            f"  check:       {self.check} (the same model and inputs explained under seeds {self.seeds})",
            f"  method:      {self.method}{format_options(self.method_options)} ({kind})   target: the model's "
            "prediction, fixed",
            f"  preset:      {self.pipeline.describe()}",
            f"  similarity:  {self._label()} = {format_score(self.score)} "
            f"(mean over {len(self.pair_scores)} seed pairs; "
            f"worst: seeds {a} vs {b} = {_fmt(worst)})"
            + (f"  vs >= {self.threshold:g}" if self.threshold is not None else ""),
            f"  determinism: seed {self.seeds[0]} twice -> "
            + ("bit-identical maps" if self.max_abs_difference == 0 else
               f"the same maps up to rounding (max |diff| = {self.max_abs_difference:.3g}, within "
               f"{REPRODUCIBLE_RTOL:g} of the largest |value|: kernels that sum in a varying order)"
               if self.deterministic else f"DIFFERENT maps (max |diff| = {self.max_abs_difference:.3g})"),
            "    " + "   ".join(f"{x} vs {y}: {_fmt(s)}" for x, y, s in self.pair_scores[:12]),
            f"  inputs: {self.n_inputs}   device: {self.device}   time: {self.seconds:.1f} s",
        ]
        return _report_text(lines, self.reproduce)

    def failure_message(self) -> str:
        if self.deterministic and self.threshold is None:  # nothing failed: the summary and the report
            return "\n".join([self.summary(), self.report()])
        if not self.deterministic:
            headline = (
                f"Saliency check failed: {self.method} is not deterministic: explaining twice with seed "
                f"{self.seeds[0]} gave different maps (max |diff| = {self.max_abs_difference:.3g}, more than "
                f"{REPRODUCIBLE_RTOL:g} of the largest |value|)"
            )
            hint = (
                "  what next:   a fixed seed must reproduce a map. Usual causes: a custom explainer drawing from "
                "its own unseeded generator, a model that is not in eval mode (dropout), or a model whose forward "
                "draws random numbers itself."
            )
        else:
            headline = (
                f"Saliency check failed: {self.method} maps change with the explainer's seed "
                f"({self._label()} = {format_score(self.score)} < {format_threshold(self.threshold)})"
            )
            hint = (
                "  what next:   the maps depend on the method's own random draws more than the threshold allows. "
                "Use more samples (smoothgrad: nt_samples; gradient_shap: n_samples; lime/kernel_shap: n_samples) "
                "or a deterministic method."
            )
        return "\n".join([headline, self.report(), hint])


# ============================================================================================
# Helpers
# ============================================================================================


def _report_text(lines: list[str], reproduce: str) -> str:
    """A result's report lines, ending with the reproduce line when there is one."""
    if reproduce:
        lines.append(f"  reproduce:   {reproduce}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    """``mean [low, high]`` in 4 significant digits (infidelity spans many orders of magnitude)."""
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _metric_info(name: str) -> MetricInfo | None:
    """A map metric's description; None for ``"lr_separability"``, which is not one."""
    from ..compare.metrics import METRICS

    return METRICS.get(name)


@dataclass(frozen=True)
class _DefaultsAnd:
    """``metrics=`` for the default metrics of the inputs followed by ``extra``: resolved for each
    batch, as whether the inputs are feature vectors is known only from a batch."""

    extra: tuple[str, ...]


def _resolve_metrics(
    metrics: str | Sequence[str] | _DefaultsAnd | None, vector_inputs: bool, map_shape: tuple[int, int] | None
) -> list[str]:
    from ..compare.metrics import METRICS

    if isinstance(metrics, _DefaultsAnd):
        defaults = _resolve_metrics(None, vector_inputs, map_shape)
        return _resolve_metrics([*defaults, *metrics.extra], vector_inputs, map_shape)
    if metrics is None:
        if vector_inputs and map_shape is None:
            return ["sign_agreement"]  # SSIM needs 2-D maps; feature vectors get it only with map_shape
        return list(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = (metrics,)
    out = []
    for name in metrics:
        if name not in METRICS:
            raise unknown_choice("metric", name, METRICS)
        if name in _MAP_METRICS and vector_inputs and map_shape is None:
            raise SaliencyUsageError(
                f"metric {name!r} needs 2-D maps, but the inputs are feature vectors (N, D). Pass "
                f"map_shape=(H, W) with H * W = D to view them as images (e.g. (8, 8) for 64 pixels), or "
                "drop it from metrics (e.g. metrics=('sign_agreement',))."
            )
        if name not in out:
            out.append(name)
    return out


def _check_map_shape(map_shape: Any, inputs: torch.Tensor) -> tuple[int, int] | None:
    if map_shape is None:
        return None
    if inputs.dim() != 2:
        raise SaliencyUsageError(
            f"map_shape is for feature-vector inputs (N, D); these inputs are images of shape "
            f"{tuple(inputs.shape)} and already have a 2-D shape. Drop map_shape."
        )
    try:
        h, w = (int(v) for v in map_shape)
    except (TypeError, ValueError):
        raise SaliencyUsageError(f"map_shape must be a pair (H, W) of ints, got {map_shape!r}.") from None
    if h < 1 or w < 1 or h * w != inputs.shape[1]:
        raise SaliencyUsageError(
            f"map_shape={map_shape!r} does not fit {inputs.shape[1]} features per input: H * W must equal D = "
            f"{inputs.shape[1]}."
        )
    return h, w


def _to_maps(raw: torch.Tensor, pipeline: MapPipeline, map_shape: tuple[int, int] | None) -> torch.Tensor:
    if map_shape is not None:
        raw = raw.reshape(raw.shape[0], 1, *map_shape)
    return apply_pipeline(raw, pipeline)


def _shown(
    inputs: torch.Tensor, raw: dict[str, torch.Tensor], pipeline: MapPipeline, map_shape: tuple[int, int] | None,
    maps: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The result's ``shown_inputs`` and ``shown_maps``: the first :data:`SHOWN_INPUTS` inputs (as
    images with ``map_shape``) and each model's preset maps of them (``maps``' where the check made
    them), on the CPU, for its figure."""
    k = min(SHOWN_INPUTS, int(inputs.shape[0]))
    first = inputs[:k].detach().float().cpu()
    shown = {label: maps[label][:k] if label in maps else _to_maps(r[:k].detach(), pipeline, map_shape)
             for label, r in raw.items()}
    return {
        "shown_inputs": first if map_shape is None else first.reshape(k, 1, *map_shape),
        "shown_maps": {label: m.detach().float().cpu() for label, m in shown.items()},
        "figure_context": figure_context(inputs, k, with_inputs=False) if map_shape is None else {"modality": "image"},
    }


def _check_ssim_size(maps: torch.Tensor, pipeline: MapPipeline, method: str) -> None:
    from ..compare.similarity import check_ssim_window

    check_ssim_window(
        maps.shape[-2], maps.shape[-1], pipeline.ssim.win_size, method=method, preset=pipeline.name,
        hint="For feature vectors, map_shape=(H, W) sets the map size; or leave 'ssim' out of metrics.",
    )


def _similarity(
    name: str, raw_a: torch.Tensor, raw_b: torch.Tensor, maps_a: torch.Tensor | None, maps_b: torch.Tensor | None,
    pipeline: MapPipeline, k: KValue, valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-input similarity: spatial metrics on the preset's maps, all others on raw attributions
    (token maps: over the positions in ``valid``, those that are not padding)."""
    from ..compare.metrics import compute_metric, compute_on_valid, metric_info

    info = metric_info(name)
    if name in _MAP_METRICS:
        if maps_a is None or maps_b is None:  # made whenever a spatial metric is asked for
            raise RuntimeError(f"pytest-saliency bug: no maps were made for the spatial metric {name!r}")
        if name == "ssim":
            return compute_metric("ssim", maps_a, maps_b, **dataclasses.asdict(pipeline.ssim))
        return compute_metric(name, maps_a, maps_b)
    a, b = raw_a.flatten(1), raw_b.flatten(1)
    if info.takes_k:
        return compute_on_valid(name, a, b, valid, k=k)
    return compute_on_valid(name, a, b, valid)


def _mean(values: torch.Tensor) -> float:
    torch = require_torch()
    values = values.double()
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _named_models(models: object) -> list[tuple[str, torch.nn.Module]]:
    torch = require_torch()
    if isinstance(models, torch.nn.Module):
        raise SaliencyUsageError(
            "explanation consistency compares at least two models, got a single nn.Module. Pass a list "
            "[model_a, model_b, ...] or a dict {label: model}, or a factory train(seed) -> model with seeds=[...]."
        )
    if isinstance(models, Mapping):
        named = [(str(label), model) for label, model in models.items()]
        if len({label for label, _ in named}) != len(named):
            raise SaliencyUsageError(f"model labels must be distinct as strings, got {list(models)!r}.")
    elif isinstance(models, Sequence) and not isinstance(models, (str, bytes)):
        named = [(f"model{i}", model) for i, model in enumerate(models)]
    else:
        raise SaliencyUsageError(
            f"models must be a list of nn.Modules or a dict {{label: nn.Module}}, got {type(models).__name__}."
        )
    if len(named) < 2:
        raise SaliencyUsageError(
            f"explanation consistency needs at least two models to compare, got {len(named)}. Train the same "
            "architecture again with another seed (or pass a factory and seeds=[0, 1, ...])."
        )
    _check_models(named)
    return named


def _check_models(named: list[tuple[str, torch.nn.Module]]) -> None:
    """:func:`check_model` for each model, the error naming the model's label."""
    for label, model in named:
        try:
            check_model(model)
        except SaliencyUsageError as exc:
            raise SaliencyUsageError(f"model {label!r}: {exc}") from None


def _check_compatible(named: list[tuple[str, torch.nn.Module]], inputs: torch.Tensor) -> None:
    """Every model must accept the inputs and give (N, K) outputs of one shape (one forward on inputs[:1])."""
    torch = require_torch()
    shapes: list[tuple[str, tuple[int, ...]]] = []
    probe = inputs[:1]
    for label, model in named:
        try:
            check_inputs(inputs, model)
        except SaliencyUsageError as exc:
            raise SaliencyUsageError(f"model {label!r}: {exc}") from None
        try:
            with torch.no_grad(), model_in_eval_mode(model, True):
                out = call_model(model, probe, rows=[0])
        except SaliencyUsageError as exc:  # an output without scores: says which option selects them
            raise SaliencyUsageError(f"model {label!r}: {exc}") from None
        except Exception as exc:
            raise SaliencyUsageError(
                f"model {label!r} ({type(model).__name__}) cannot run on inputs of shape {tuple(inputs.shape)}: "
                f"{type(exc).__name__}: {str(exc)[:300]}. All models must share the input shape; compare models "
                "of one architecture."
            ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise SaliencyUsageError(
                f"model {label!r} returned {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}; "
                "explanation consistency compares classifiers with (N, num_classes) outputs."
            )
        shapes.append((label, tuple(out.shape[1:])))
    ref_label, ref_shape = shapes[0]
    for label, shape in shapes[1:]:
        if shape != ref_shape:
            raise SaliencyUsageError(
                f"model {label!r} has {shape[0]} outputs but the reference model {ref_label!r} has {ref_shape[0]}: "
                "models must share the output shape (the same classes) to be explained for the same target."
            )


def _check_labels(labels: object, inputs: torch.Tensor, from_batches: bool = False) -> torch.Tensor | None:
    torch = require_torch()
    if labels is None:
        return None
    if (
        not isinstance(labels, torch.Tensor)
        or labels.is_floating_point()
        or labels.reshape(-1).shape[0] != inputs.shape[0]
    ):
        raise SaliencyUsageError(
            f"labels must be an integer tensor of shape ({inputs.shape[0]},), the true class of each input, got "
            f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}."
            + (" These are the batches' labels, taken for each model's accuracy: wrap the loader as "
               "pytest_saliency.Batches(loader, labels=None) to leave them out." if from_batches else "")
        )
    return labels.reshape(-1).to(inputs.device).long()


def _check_factors(factors: Any, labels: list[str]) -> dict[str, str]:
    if factors is None:
        return {}
    if not isinstance(factors, Mapping):
        raise SaliencyUsageError(
            "factors must be a dict {model label: factor name}, e.g. {'seed1': 'seed', 'shuffle1': 'shuffle'}, "
            f"got {type(factors).__name__}."
        )
    out = {}
    for label, factor in factors.items():
        if str(label) not in labels:
            raise unknown_choice(
                "model label in factors", label, labels,
                "factors keys are the labels of the models dict (list models are model0, model1, ...).",
            )
        if not isinstance(factor, str) or not factor:
            raise SaliencyUsageError(f"factors[{label!r}] must be a non-empty factor name such as 'seed', got {factor!r}.")
        out[str(label)] = factor
    return out


def _pair_factor(a: str, b: str, factors: dict[str, str]) -> str | None:
    listed = {factors[x] for x in (a, b) if x in factors}
    return listed.pop() if len(listed) == 1 else None


def _consistency(pairs: list[PairConsistency]) -> float:
    return 1.0 - sum(p.separability for p in pairs) / len(pairs) if pairs else math.nan


def _classifier_name(classifier: Any) -> str:
    if classifier is None:
        return "StandardScaler + LogisticRegression(C=1.0)"
    return type(classifier).__name__


def _check_folds(n: int, n_splits: int) -> None:
    """Held-out accuracy needs two inputs per test fold."""
    if n < 2 * n_splits:
        raise SaliencyUsageError(
            f"{n} input(s) are too few for {n_splits}-fold cross-validation: held-out accuracy needs at least "
            f"2 * n_splits = {2 * n_splits} inputs (two per test fold); with the default n_splits=5 pass at least "
            "10, and preferably 100 or more for a stable C. Or lower n_splits (>= 2)."
        )


def _targets(
    named: list[tuple[str, torch.nn.Module]], inputs: torch.Tensor, target: str | int | torch.Tensor | None,
    predictions: dict[str, torch.Tensor], batch_size: int | None, seed: int,
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(target mode, {label: target})``: the reference model's predictions, each model's own, or the given target."""
    labels = [label for label, _ in named]
    if target is None or (isinstance(target, str) and target == "reference"):
        return "reference", {label: predictions[labels[0]] for label in labels}
    if isinstance(target, str):
        if target != "each":
            raise unknown_choice("target mode", target, TARGET_MODES, "Or pass an int or an integer tensor (N,).")
        return "each", dict(predictions)
    fixed = resolve_target(named[0][1], inputs, target, batch_size, seed=seed)
    return "given", {label: fixed for label in labels}


def _model_pairs(labels: list[str], pairs: str) -> list[tuple[str, str]]:
    """Every pair of models (``"all"``), or the reference model with each other one."""
    if pairs == "all":
        return [(labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    return [(labels[0], other) for other in labels[1:]]


def _pair_values(
    raw: dict[str, torch.Tensor], maps: dict[str, torch.Tensor], a: str, b: str, metrics: list[str],
    pipeline: MapPipeline, k: KValue, key: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each metric's value per input for the pair, and its different-input baseline per input: a's
    map of input i against b's map of the input before it (NaN for the first input of all, which
    has none; over a stream, across batches: :func:`~pytest_saliency.core.stream.previous_rows`,
    ``key`` naming the models' maps)."""
    valid = valid_positions(raw[a])  # token maps: padding left out
    similarities = {m: _similarity(m, raw[a], raw[b], maps.get(a), maps.get(b), pipeline, k, valid).double().cpu()
                    for m in metrics}
    shifted_raw, paired = previous_rows(f"{key}:raw:{b}", raw[b])
    shifted_maps = previous_rows(f"{key}:maps:{b}", maps[b])[0] if b in maps else None
    both = None if valid is None else valid & previous_rows(f"{key}:valid", valid)[0]
    unpaired = ~paired.cpu()
    baselines = {
        m: _similarity(m, raw[a], shifted_raw, maps.get(a), shifted_maps, pipeline, k, both).double().cpu()
        .masked_fill(unpaired, math.nan)
        for m in metrics
    }
    return similarities, baselines


def _squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(||a - b||^2, ||a||^2, ||b||^2)`` of two models' raw attributions, in double: sums over
    batches give the relative difference of all inputs (:func:`_relative_difference`)."""
    torch = require_torch()
    a, b = a.detach().double(), b.detach().double()
    return torch.stack([(a - b).square().sum(), a.square().sum(), b.square().sum()]).cpu()


def _relative_difference(squares: torch.Tensor) -> float:
    """||a - b|| / max(||a||, ||b||) from :func:`_squares` (0 for two zero maps)."""
    diff, a, b = (math.sqrt(float(v)) for v in squares)
    scale = max(a, b)
    return diff / scale if scale > 0 else 0.0


def _warn_unconverged() -> None:
    warn_user(
        "the separability classifier did not converge in some folds, so M may be underestimated. Pass "
        "classifier=make_pipeline(StandardScaler(), LogisticRegression(max_iter=100_000)) or a stronger "
        "regularization (smaller C)."
    )


def _per_factor(rows: list[PairConsistency], factors: dict[str, str]) -> dict[str, float]:
    """C over the pairs that differ in each training factor alone."""
    return {
        factor: _consistency([p for p in rows if p.factor == factor])
        for factor in sorted(set(factors.values()))
        if any(p.factor == factor for p in rows)
    }


def _accuracies(predictions: dict[str, torch.Tensor], labels: torch.Tensor | None) -> dict[str, float] | None:
    """Each model's accuracy on the true labels, when given."""
    if labels is None:
        return None
    return {label: float((predicted == labels).double().mean()) for label, predicted in predictions.items()}


# ============================================================================================
# Across retrained models
# ============================================================================================


@dataclass(frozen=True)
class ConsistencySettings:
    """What :func:`explanation_consistency` explains and how it compares, the same for every batch
    of its inputs (made by :func:`consistency_settings`, which checks them)."""

    method: str | Explainer
    method_kwargs: dict[str, Any]
    pipeline: MapPipeline
    seed: int = 0
    n_splits: int = 5
    metrics: Any = None  # as given: resolved for the inputs (feature vectors or maps) of each batch
    k: KValue = 0.1
    map_shape: Any = None
    pairs: str = "all"
    lr_input: str = "attributions"
    classifier: Any = None
    batch_size: int | None = None
    factors: Mapping[str, str] | None = None
    labels_from_batches: bool = False  # labels= left out for a loader: the batches' labels, if they have any
    classifier_inputs: int = CLASSIFIER_INPUTS  # the classifier is fit on the maps of the first ones
    fidelity: bool = False  # each model's infidelity and sensitivity (compare.fidelity)
    n_perturb_samples: int = DEFAULT_SAMPLES
    perturb_radius: float = DEFAULT_RADIUS
    fidelity_normalize: bool = True


def consistency_settings(
    method: str | Explainer = "saliency", *, factors: Mapping[str, str] | None = None,
    preset: str | MapPipeline | None = None, seed: int = 0, n_splits: int = 5, metrics: Any = None,
    k: KValue = 0.1, map_shape: tuple[int, int] | None = None, pairs: str = "all", lr_input: str = "attributions",
    classifier: Any = None, batch_size: int | None = None, classifier_inputs: int = CLASSIFIER_INPUTS,
    fidelity: bool = False, n_perturb_samples: int = DEFAULT_SAMPLES, perturb_radius: float = DEFAULT_RADIUS,
    fidelity_normalize: bool = True, **method_kwargs: Any,
) -> ConsistencySettings:
    """The options of :func:`explanation_consistency` that do not depend on its inputs, checked."""
    require_sklearn()
    fidelity = check_flag(fidelity, "fidelity")
    fidelity_normalize = check_flag(fidelity_normalize, "fidelity_normalize")
    n_perturb_samples, perturb_radius = check_fidelity_options(n_perturb_samples, perturb_radius)
    classifier_inputs = check_count(classifier_inputs, "classifier_inputs", minimum=2,
                                    hint="It caps the inputs whose maps the classifier is fit on, e.g. 5000.")
    seed = check_seed(seed)
    n_splits = check_count(n_splits, "n_splits", minimum=2, hint="It is the number of cross-validation folds.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the inputs one explainer call sees; None explains all at once.")
    if pairs not in PAIR_MODES:
        raise unknown_choice("pairs option", pairs, PAIR_MODES)
    if lr_input not in LR_INPUTS:
        raise unknown_choice("lr_input option", lr_input, LR_INPUTS)
    return ConsistencySettings(
        method=method, method_kwargs=dict(method_kwargs), pipeline=get_pipeline(preset), seed=seed, n_splits=n_splits,
        metrics=metrics, k=k, map_shape=map_shape, pairs=pairs, lr_input=lr_input, classifier=classifier,
        classifier_inputs=classifier_inputs, batch_size=batch_size, factors=factors, fidelity=fidelity,
        n_perturb_samples=n_perturb_samples, perturb_radius=perturb_radius, fidelity_normalize=fidelity_normalize,
    )


@dataclass
class ExplainedPairs:
    """The models' explanations of some inputs, reduced to what :func:`consistency_result` needs:
    per input, each model's prediction, each pair's similarities and different-input baselines;
    per pair, the sums of squares of the relative difference; per model, the classifier's
    features (its flattened maps), which the classifier needs all at once; and the maps of the
    first inputs for the figure. :func:`join_pairs` joins those of a stream's batches."""

    labels: list[str]
    pairs: list[tuple[str, str]]
    method: str
    method_options: dict[str, Any]
    metrics: list[str]
    target_mode: str
    n: int
    num_features: int
    predictions: dict[str, torch.Tensor]
    true_labels: torch.Tensor | None
    similarities: dict[tuple[str, str], dict[str, torch.Tensor]]
    baselines: dict[tuple[str, str], dict[str, torch.Tensor]]
    squares: dict[tuple[str, str], torch.Tensor]
    features: dict[str, torch.Tensor] = field(repr=False)
    device: str = "cpu"
    seconds: float = 0.0
    shown: dict[str, Any] = field(default_factory=dict, repr=False)
    # with settings.fidelity: {label: {"infidelity": (n,), "sensitivity": (n,)}} per input, float64 on the CPU
    fidelity: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def join_pairs(parts: Sequence[ExplainedPairs]) -> ExplainedPairs:
    """One :class:`ExplainedPairs` of a stream's batches: every input's numbers in order, the sums
    summed, the first batch's maps for the figure."""
    torch = require_torch()
    first = parts[0]
    if len(parts) == 1:
        return first
    for name, what in (("labels", "models"), ("metrics", "metrics"), ("target_mode", "target modes")):
        same_across_batches(parts, name, what)
    for index, part in enumerate(parts[1:], start=1):
        if part.num_features != first.num_features:
            raise SaliencyUsageError(
                f"batch {index} of the inputs gives maps of {part.num_features} features, batch 0 of "
                f"{first.num_features}; the separability classifier needs maps of one size. Give every batch the "
                "same shape (for text, pad every batch to one length, e.g. padding='max_length').")
    with_labels = all(part.true_labels is not None for part in parts)

    def per_pair(get: Callable[[ExplainedPairs], dict[tuple[str, str], dict[str, Any]]]) -> Any:
        return {pair: {m: torch.cat([get(p)[pair][m] for p in parts]) for m in first.metrics} for pair in first.pairs}

    return dataclasses.replace(
        first, n=sum(part.n for part in parts), seconds=sum(part.seconds for part in parts),
        predictions={label: torch.cat([part.predictions[label] for part in parts]) for label in first.labels},
        true_labels=torch.cat([part.true_labels for part in parts if part.true_labels is not None])
        if with_labels else None,
        similarities=per_pair(lambda part: part.similarities), baselines=per_pair(lambda part: part.baselines),
        squares={pair: sum((part.squares[pair] for part in parts), torch.zeros(3, dtype=torch.float64))
                 for pair in first.pairs},
        features={label: torch.cat([part.features[label] for part in parts]) for label in first.labels},
        fidelity={label: {name: torch.cat([part.fidelity[label][name] for part in parts]) for name in values}
                  for label, values in first.fidelity.items()},
    )


def slim_pairs(part: ExplainedPairs) -> ExplainedPairs:
    """A later batch's :class:`ExplainedPairs` without its maps for the figure."""
    return dataclasses.replace(part, shown={})


def _joined(parts: list[ExplainedPairs], arguments: dict[str, Any], stopped: str) -> ExplainedPairs:
    return join_pairs(parts)


@streams(StreamSpec(_joined, slim_pairs, carries=True))
@passes_model_call
def explained_pairs(
    models: Mapping[str, torch.nn.Module],
    inputs: torch.Tensor | Iterable[Any],
    settings: ConsistencySettings,
    *,
    target: str | int | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    chance_key: str = "consistency",
) -> ExplainedPairs:
    """Explain ``inputs`` (a tensor or an iterable of batches, see
    :mod:`pytest_saliency.checks.streaming`) with every model and compare the pairs' maps input by
    input: the per-example part of :func:`explanation_consistency`. ``models`` are checked
    (:func:`_named_models`) by the caller. ``chance_key`` names these models' maps among those the
    different-input baselines carry from batch to batch (one per set of models compared)."""
    from ..compare.metrics import metric_info, resolve_k

    start = time.perf_counter()
    named = list(models.items())
    inputs = checked_inputs(inputs)
    true_labels = _check_labels(labels, inputs, settings.labels_from_batches)
    shape = _check_map_shape(settings.map_shape, inputs)
    metric_names = _resolve_metrics(settings.metrics, inputs.dim() == 2, shape)
    if any(metric_info(m).takes_k for m in metric_names):
        resolve_k(settings.k, int(inputs[0].numel()))  # a bad k fails here, before any explanation runs
    _check_compatible(named, inputs)
    resolved, name, options = prepare_method(settings.method, named[0][1], inputs, dict(settings.method_kwargs))
    seed, batch_size, pipeline = settings.seed, settings.batch_size, settings.pipeline
    predictions = {label: predicted_targets(model, inputs, batch_size, seed) for label, model in named}
    target_mode, targets = _targets(named, inputs, target, predictions, batch_size, seed)
    unprocessed = {label: attribute(model, inputs, resolved, targets[label], seed, batch_size, True, options)
                   for label, model in named}
    raw = {label: per_position(attributions) for label, attributions in unprocessed.items()}
    label_list = [label for label, _ in named]
    need_maps = settings.lr_input == "maps" or any(m in _MAP_METRICS for m in metric_names)
    maps = {label: _to_maps(raw[label], pipeline, shape) for label in label_list} if need_maps else {}
    if "ssim" in metric_names:
        _check_ssim_size(next(iter(maps.values())), pipeline, name)
    features = maps if settings.lr_input == "maps" else raw
    pairs = _model_pairs(label_list, settings.pairs)
    values = {(a, b): _pair_values(raw, maps, a, b, metric_names, pipeline, settings.k, chance_key)
              for a, b in pairs}
    return ExplainedPairs(
        labels=label_list, pairs=pairs, method=name, method_options=options, metrics=metric_names,
        target_mode=target_mode, n=int(inputs.shape[0]), num_features=int(raw[label_list[0]][0].numel()),
        predictions={label: p.detach().cpu() for label, p in predictions.items()},
        true_labels=None if true_labels is None else true_labels.cpu(),
        similarities={pair: v[0] for pair, v in values.items()}, baselines={pair: v[1] for pair, v in values.items()},
        squares={(a, b): _squares(raw[a], raw[b]) for a, b in pairs},
        # the classifier's inputs: the first classifier_inputs of the whole stream
        features={label: f[:max(0, settings.classifier_inputs - example_offset())].detach().flatten(1).cpu()
                  for label, f in features.items()},
        device=str(inputs.device), seconds=time.perf_counter() - start,
        shown=_shown(inputs, raw, pipeline, shape, maps),
        fidelity={label: _model_fidelity(model, inputs, unprocessed[label], targets[label], resolved, options, settings)
                  for label, model in named} if settings.fidelity else {},
    )


def _per_feature(attributions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Attributions with one value per input feature, as infidelity pairs them with the inputs: a
    one-channel map (GradCAM, Meaningful Perturbation) is shared by the input's channels."""
    if attributions.shape == inputs.shape:
        return attributions
    one_channel = attributions.dim() == inputs.dim() == 4 and attributions.shape[1] == 1 \
        and attributions.shape[2:] == inputs.shape[2:]
    if one_channel:
        return attributions.expand_as(inputs)
    raise SaliencyUsageError(
        f"fidelity=True needs one attribution per input feature, but the maps have shape {tuple(attributions.shape)} "
        f"for inputs of shape {tuple(inputs.shape)}. Use a method whose maps match the inputs (e.g. saliency, "
        "integrated_gradients), or leave fidelity out for this method.")


def _model_fidelity(model: torch.nn.Module, inputs: torch.Tensor, attributions: torch.Tensor, target: torch.Tensor,
                    method: MethodSpec | Explainer, options: dict[str, Any],
                    settings: ConsistencySettings) -> dict[str, torch.Tensor]:
    """One model's infidelity and sensitivity per input (:mod:`pytest_saliency.compare.fidelity`),
    for the class it was explained for. A perturbed copy of an input is explained with that
    input's target and index, so a stochastic method draws the same numbers for it as for the
    input: the sensitivity measures the change of the input, not of the method's draws."""
    torch = require_torch()
    if not inputs.is_floating_point():
        raise SaliencyUsageError(
            f"fidelity=True perturbs the inputs with small real-valued noise, but these are {inputs.dtype} (token "
            "ids?). Leave fidelity out for text models, or pass their embeddings as floating-point inputs.")
    targets = target.reshape(-1).expand(inputs.shape[0]) if target.numel() == 1 else target.reshape(-1)
    seed, batch_size = settings.seed, settings.batch_size

    def forward(x: Any, rows: list[int]) -> Any:
        with model_in_eval_mode(model, True):
            scores = call_model(model, x, rows=rows)
        return scores[torch.arange(x.shape[0], device=scores.device), targets[rows].to(scores.device)]

    def explain(x: Any, rows: list[int]) -> Any:
        return attribute(model, x, method, targets[rows], seed, batch_size, True, options, index=rows)

    common: dict[str, Any] = {"n_perturb_samples": settings.n_perturb_samples, "radius": settings.perturb_radius,
                              "seed": seed, "max_rows": batch_size}
    with pass_seeded(derive_seed(seed, "fidelity", example_offset()), inputs.device):  # a model that draws
        infidelity = infidelity_values(forward, inputs, _per_feature(attributions, inputs).to(inputs.dtype),
                                       normalize=settings.fidelity_normalize, **common)
        # an all-zero map explains nothing: its (unnormalized) infidelity is E[(f(x) - f(x - I))^2]
        change = infidelity_values(forward, inputs, torch.zeros_like(inputs), normalize=False, **common)
    return {"infidelity": infidelity, "output_change": change,
            "sensitivity": sensitivity_values(explain, inputs, attributions=attributions, **common)}


def _summarized_fidelity(label: str, values: dict[str, torch.Tensor], seed: int) -> ModelFidelity:
    """A model's means over the inputs with a finite value of all three, with bootstrap intervals."""
    torch = require_torch()
    infidelity, sensitivity, change = values["infidelity"], values["sensitivity"], values["output_change"]
    relative = infidelity / change
    finite = torch.isfinite(infidelity) & torch.isfinite(sensitivity) & torch.isfinite(relative)
    stats = {}
    for name, v in (("infidelity", infidelity[finite]), ("sensitivity", sensitivity[finite]),
                    ("relative_infidelity", relative[finite])):
        if v.numel() == 0:
            stats[name] = (math.nan, (math.nan, math.nan))
            continue
        interval = bootstrap_interval(v, FIDELITY_CONFIDENCE, FIDELITY_RESAMPLES, derive_seed(seed, "fidelity", name))
        stats[name] = (float(v.mean()), interval)
    return ModelFidelity(
        model=label, infidelity=stats["infidelity"][0], infidelity_interval=stats["infidelity"][1],
        sensitivity=stats["sensitivity"][0], sensitivity_interval=stats["sensitivity"][1],
        n_inputs=int(finite.sum()), relative_infidelity=stats["relative_infidelity"][0],
        relative_infidelity_interval=stats["relative_infidelity"][1], infidelity_values=infidelity,
        sensitivity_values=sensitivity, output_change_values=change,
    )


def consistency_result(examples: ExplainedPairs, settings: ConsistencySettings, *, reproduce: str = "",
                       seconds: float | None = None) -> ConsistencyResult:
    """The :class:`ConsistencyResult` of the models' explanations ``examples`` (of all inputs):
    per pair, the classifier's held-out accuracy on all inputs' maps and the means over inputs."""
    lr_inputs = int(examples.features[examples.labels[0]].shape[0])
    _check_folds(lr_inputs, settings.n_splits)
    factor_map = _check_factors(settings.factors, examples.labels)
    rows: list[PairConsistency] = []
    converged = True
    for a, b in examples.pairs:
        sep = lr_separability(examples.features[a], examples.features[b], n_splits=settings.n_splits,
                              seed=settings.seed, classifier=settings.classifier)
        converged &= sep.converged
        rows.append(PairConsistency(
            a=a, b=b, factor=_pair_factor(a, b, factor_map), lr_accuracy=sep.accuracy,
            train_accuracy=sep.train_accuracy,
            similarities={m: _mean(v) for m, v in examples.similarities[(a, b)].items()},
            prediction_agreement=float((examples.predictions[a] == examples.predictions[b]).double().mean()),
            fold_accuracies=sep.fold_accuracies,
            baselines={m: _mean(v) for m, v in examples.baselines[(a, b)].items()},
            relative_difference=_relative_difference(examples.squares[(a, b)]),
        ))
    if not converged:
        _warn_unconverged()
    pipeline = settings.pipeline
    if not reproduce:
        reproduce = (
            f"pytest_saliency.explanation_consistency(models, inputs, method={examples.method!r}, "
            f"preset={pipeline.name!r}, seed={settings.seed}, n_splits={settings.n_splits})"
        )
    return ConsistencyResult(
        method=examples.method, method_options=examples.method_options, pipeline=pipeline, models=examples.labels,
        factors=factor_map, pairs=rows, consistency=_consistency(rows), per_factor=_per_factor(rows, factor_map),
        metrics=examples.metrics, k=settings.k, target_mode=examples.target_mode, pair_mode=settings.pairs,
        lr_input=settings.lr_input, classifier=_classifier_name(settings.classifier), n_splits=settings.n_splits,
        n_inputs=examples.n, lr_inputs=lr_inputs, seed=settings.seed, device=examples.device,
        seconds=examples.seconds if seconds is None else seconds,
        accuracies=_accuracies(examples.predictions, examples.true_labels), num_features=examples.num_features,
        converged=converged, reproduce=reproduce, **examples.shown,
        fidelity={label: _summarized_fidelity(label, values, settings.seed) for label, values in examples.fidelity.items()},
        fidelity_settings={
            "n_perturb_samples": settings.n_perturb_samples, "perturb_radius": settings.perturb_radius,
            "normalize": settings.fidelity_normalize, "confidence": FIDELITY_CONFIDENCE,
            "n_bootstrap": FIDELITY_RESAMPLES, "seed": settings.seed,
        } if examples.fidelity else None,
    )


@rng_isolated
@passes_model_call
def explanation_consistency(
    models: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
    inputs: torch.Tensor | Iterable[Any],
    method: str | Explainer = "saliency",
    *,
    factors: Mapping[str, str] | None = None,
    labels: torch.Tensor | None = None,
    target: str | int | torch.Tensor | None = None,
    preset: str | MapPipeline | None = None,
    seed: int = 0,
    n_splits: int = 5,
    metrics: Sequence[str] | None = None,
    k: KValue = 0.1,
    map_shape: tuple[int, int] | None = None,
    pairs: str = "all",
    lr_input: str = "attributions",
    classifier: Any = None,
    batch_size: int | None = None,
    classifier_inputs: int = CLASSIFIER_INPUTS,
    fidelity: bool = False,
    n_perturb_samples: int = DEFAULT_SAMPLES,
    perturb_radius: float = DEFAULT_RADIUS,
    fidelity_normalize: bool = True,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> ConsistencyResult:
    """Watson et al.'s explanation consistency C of several models of one architecture.

    Args:
        models: a list of trained models (labelled ``model0``, ``model1``, ...) or a dict
            ``{label: model}``. The first one is the reference. The models are not modified.
        inputs: a floating tensor (N, C, H, W) or (N, D) on the models' device, with
            N >= 2 * ``n_splits``, or an iterable of batches such as a ``DataLoader`` (see
            :mod:`pytest_saliency.checks.streaming`): each batch is explained and compared as it
            comes, while each model's classifier features (its flattened maps) of the first
            ``classifier_inputs`` inputs are kept for the classifier, which is fit on them at
            once; the different-input baselines are measured within each batch.
        method: a name from :data:`pytest_saliency.METHODS` or a callable ``(model, inputs, target)``.
        factors: ``{label: factor name}`` for the models that differ from the reference in one
            training factor (see the module docstring); it gives ``result.per_factor``.
        labels: the true classes (N,), to report each model's accuracy next to C; for a
            loader, the batches' labels when left out.
        target: ``None``/``"reference"`` (the first model's prediction, held fixed), ``"each"``
            (each model's own prediction), an int, or an integer tensor (N,); for a loader also
            ``"labels"``, each batch's labels.
        preset: the map pipeline for SSIM (and for the classifier when ``lr_input="maps"``).
        seed: seeds the method's randomness, the fold assignment and the classifier.
        n_splits: cross-validation folds (grouped by input).
        metrics: pairwise similarities to report, names of :data:`pytest_saliency.compare.metrics.METRICS`;
            default ``("ssim", "sign_agreement")`` (``("sign_agreement",)`` for feature
            vectors without ``map_shape``).
        k: top-k for the top-k metrics: an int count or a float fraction (0.1 = top 10%).
        map_shape: ``(H, W)`` to view (N, D) attributions as images.
        pairs: ``"all"`` pairs, or only the pairs with the ``"reference"`` model.
        lr_input: ``"attributions"`` (raw, flattened) or ``"maps"`` (the preset's maps).
        classifier: a scikit-learn classifier to use instead of the standardized LR.
        batch_size: explain at most this many inputs per call.
        classifier_inputs: the classifier is fit on the maps of the first this many inputs
            (default 5,000; the similarities cover every input): what bounds the memory over a
            loader, at N x D numbers per model otherwise.
        fidelity: also measure each model's explanations by Yeh et al.'s infidelity and
            sensitivity (captum.metrics; Watson et al.'s second panel, consistency against both):
            ``result.fidelity``, a table in the report and a figure. Off by default for its cost:
            ``n_perturb_samples`` forward passes per input and model for the infidelity, and
            ``n_perturb_samples`` explanations per input and model for the sensitivity (with
            ``batch_size``, at most that many perturbed inputs per call).
        n_perturb_samples: perturbations per input for both (default 10, captum's).
        perturb_radius: their size in input units (default 0.02, captum's sensitivity radius):
            the std of the infidelity's Gaussian noise and the L-inf radius of the sensitivity's
            uniform noise. Scale it with the inputs' range.
        fidelity_normalize: rescale each map by its least-squares factor before the infidelity
            (captum's ``normalize``, as Yeh et al.'s code; default True).
        reproduce: a command line recorded in the result (the pytest plugin fills it in).
        **method_kwargs: the method's hyperparameters.

    Returns a :class:`ConsistencyResult`. Cost: one explanation of the inputs per model, and
    ``n_splits`` classifier fits per pair (there are M(M-1)/2 pairs for M models); with
    ``fidelity=True`` also ``n_perturb_samples`` forward passes and explanations per input and model.
    """
    start = time.perf_counter()
    named = _named_models(models)
    n = None if is_stream(inputs) else int(checked_inputs(inputs).shape[0])
    settings = consistency_settings(
        method, factors=factors, preset=preset, seed=seed, n_splits=n_splits, metrics=metrics, k=k,
        map_shape=map_shape, pairs=pairs, lr_input=lr_input, classifier=classifier, batch_size=batch_size,
        classifier_inputs=classifier_inputs, fidelity=fidelity, n_perturb_samples=n_perturb_samples,
        perturb_radius=perturb_radius, fidelity_normalize=fidelity_normalize, **method_kwargs,
    )
    settings = dataclasses.replace(settings, labels_from_batches=n is None and labels is None)
    if n is not None:
        _check_folds(min(n, settings.classifier_inputs), settings.n_splits)  # before any explanation runs
    _check_factors(factors, [label for label, _ in named])
    # Every model explains the same targets, input by input (batch by batch for a loader); then,
    # per pair of models, a classifier tries to tell their maps apart (held out) and the
    # similarities say how alike the maps are.
    examples = explained_pairs(dict(named), inputs, settings, target=target, labels=labels, output=output,
                               forward_kwargs=forward_kwargs, modality=modality)
    return consistency_result(examples, settings, reproduce=reproduce, seconds=time.perf_counter() - start)


def models_from(
    models_or_factory: ModelsOrFactory,
    seeds: Sequence[int] | None = None,
    cache: ModelCache | str | os.PathLike[str] | None = None,
    *,
    build: Callable[[], torch.nn.Module] | None = None,
    version: str = "",
    inputs: torch.Tensor | Iterable[Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module], dict[str, str]]:
    """Turn ``models_or_factory`` into ``({label: model}, factors)``.

    A list or dict passes through (no factors). A callable ``train(seed) -> model`` is called
    once per seed, and each model is labelled ``seed=<s>`` with factor ``"seed"``. Models come
    from ``cache`` (a :class:`pytest_saliency.model.cache.ModelCache` or a directory path) when
    given. The factory runs with the global RNGs seeded and restored, and a factory that raises
    becomes a :class:`SaliencyUsageError` naming the seed. With ``inputs``, the first model is
    checked before the other seeds are trained (a valid model, inputs it accepts, one forward
    pass giving an ``(N, num_classes)`` tensor), so that a model the explanation cannot use fails
    after one training instead of after all of them (``inputs`` an iterable of batches: the models
    are checked on each batch as it is explained, after the training). ``progress(done, total, label)`` is called
    before each seed is trained or loaded (``label`` is ``seed=<s>``) and once when all are done
    (``done == total``, empty label).
    """
    from ..core.validation import check_progress
    from ..model.cache import ModelCache, call_train

    check_progress(progress)

    if not callable(models_or_factory) or isinstance(models_or_factory, require_torch().nn.Module):
        if seeds is not None:
            raise SaliencyUsageError(
                "seeds= is for a model factory train(seed) -> model; with a list or dict of trained models "
                "leave it out."
            )
        return models_or_factory, {}
    if seeds is None or isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise SaliencyUsageError(
            "a model factory needs seeds=[...], the seeds to train it with, e.g. seeds=[0, 1, 2] (at least two)."
        )
    seed_list = [check_seed(s, f"seeds[{index}]") for index, s in enumerate(seeds)]
    if len(seed_list) < 2 or len(set(seed_list)) != len(seed_list):
        raise SaliencyUsageError(f"seeds must hold at least two distinct ints, got {list(seeds)!r}.")
    if cache is not None and not isinstance(cache, ModelCache):
        cache = ModelCache(cache)
    named: dict[str, torch.nn.Module] = {}
    for index, s in enumerate(seed_list):
        s = check_seed(s, f"seeds[{index}]")
        if progress is not None:
            progress(index, len(seed_list), f"seed={s}")
        model = cache.get_or_train(models_or_factory, s, build, version=version) if cache is not None else (
            call_train(models_or_factory, s)
        )
        named[f"seed={s}"] = model
        if index == 0 and inputs is not None and not is_stream(inputs):
            first = [(f"seed={s}", model)]
            _check_models(first)
            _check_compatible(first, checked_inputs(inputs))
    if progress is not None:
        progress(len(seed_list), len(seed_list), "")
    return named, {label: "seed" for label in named}


@rng_isolated
@passes_model_call
def seed_consistency(
    models_or_factory: ModelsOrFactory,
    inputs: torch.Tensor | Iterable[Any],
    threshold: float | None = None,
    metric: str = LR_SEPARABILITY,
    seeds: Sequence[int] | None = None,
    cache: ModelCache | str | os.PathLike[str] | None = None,
    *,
    build: Callable[[], torch.nn.Module] | None = None,
    version: str = "",
    progress: Callable[[int, int, str], None] | None = None,
    **options: Any,
) -> ConsistencyResult:
    """:func:`assert_seed_consistency_above` without the assertion: the result with its verdict.

    ``progress(done, total, label)`` counts the seeds a factory's models are trained or loaded
    for (see :func:`models_from`); it is not called for a list or dict of trained models.
    ``inputs`` may be an iterable of batches (see :mod:`pytest_saliency.checks.streaming`): the
    models are trained or loaded once, then explained batch by batch."""
    from ..compare.metrics import METRICS

    if metric != LR_SEPARABILITY:
        if metric not in METRICS:
            raise unknown_choice("metric", metric, [LR_SEPARABILITY, *METRICS])
        if not METRICS[metric].higher_is_better:
            raise SaliencyUsageError(
                f"metric {metric!r} is a distance (lower is better) and cannot gate 'consistency above'; use "
                "'lr_separability', 'sign_agreement', 'ssim' or another similarity."
            )
    if threshold is None and metric not in CONSISTENCY_THRESHOLDS and metric not in _CHANCE_DEFAULT_METRICS:
        raise SaliencyUsageError(
            f"metric {metric!r} has no default threshold; pass threshold=<value>. SSIM between retrained models "
            "depends on the map pipeline, the data and the architecture (digits CNN seeds: about 0.12; digits MLP: "
            "0.4-0.6), so calibrate it: compute explanation_consistency(...) once, read the similarity and its "
            "different-input baseline in result.report(), and set the threshold between them. Defaults exist for "
            f"{', '.join([*CONSISTENCY_THRESHOLDS, *_CHANCE_DEFAULT_METRICS])}."
        )
    if threshold is not None:
        threshold = check_threshold(threshold, metric)
    if not is_stream(inputs):
        check_inputs(inputs)
    models, factors = models_from(models_or_factory, seeds, cache, build=build, version=version, inputs=inputs,
                                  progress=progress)
    if factors and "factors" not in options:
        options["factors"] = factors
    if metric != LR_SEPARABILITY:
        metrics = options.get("metrics")
        if metrics is None:  # the default metrics of the inputs (of each batch), and the gated one
            options["metrics"] = _DefaultsAnd((metric,))
        else:
            metrics = [metrics] if isinstance(metrics, str) else list(metrics)
            options["metrics"] = metrics if metric in metrics else [*metrics, metric]
    result = explanation_consistency(models, inputs, **options)
    if threshold is None:
        threshold = default_consistency_threshold(metric, result.k, result.num_features)
    return dataclasses.replace(result, metric=metric, threshold=float(threshold), check="seed_consistency")


def default_consistency_threshold(metric: str, k: KValue = 0.1, num_features: int | None = None) -> float:
    """The default gate of :func:`assert_seed_consistency_above` for ``metric``.

    ``lr_separability``: 0.5. ``sign_agreement`` and ``feature_agreement``: ``CHANCE_MULTIPLE``
    (2) times the metric's chance level for this ``k`` and map size, i.e. ``k`` for sign
    agreement with a fractional k (0.1 at the top 10%).
    """
    if metric in CONSISTENCY_THRESHOLDS:
        return CONSISTENCY_THRESHOLDS[metric]
    if metric in _CHANCE_DEFAULT_METRICS:
        from ..compare.metrics import chance_level

        if num_features is None:
            raise SaliencyUsageError(f"the default threshold of {metric!r} needs num_features (features per map).")
        chance = chance_level(metric, k, num_features)
        if chance is not None:
            return min(CHANCE_MULTIPLE * chance, (1.0 + chance) / 2.0)
    raise SaliencyUsageError(f"metric {metric!r} has no default threshold; pass threshold=<value>.")


@rng_isolated
@passes_model_call
def assert_seed_consistency_above(
    models_or_factory: ModelsOrFactory,
    inputs: torch.Tensor | Iterable[Any],
    threshold: float | None = None,
    metric: str = LR_SEPARABILITY,
    seeds: Sequence[int] | None = None,
    cache: ModelCache | str | os.PathLike[str] | None = None,
    **options: Any,
) -> ConsistencyResult:
    """Models that differ only in training randomness must explain alike.

    ``models_or_factory`` is a list or dict of trained models, or a callable
    ``train(seed) -> model`` with ``seeds=[...]``. A factory's models are loaded from ``cache``
    (a :class:`pytest_saliency.model.cache.ModelCache`, e.g. the ``saliency_model_cache``
    fixture, or a directory) when given, with ``build=`` or ``train.build`` naming the
    architecture, and ``version=`` (a string) added to the cache key to keep entries of factories
    that the cache cannot tell apart, or of changed training code it cannot see, separate (see
    :mod:`pytest_saliency.model.cache`). The first model is checked against ``inputs`` before
    the other seeds are trained. ``inputs`` is a tensor or an iterable of batches such as a
    ``DataLoader`` (see :mod:`pytest_saliency.checks.streaming`; the models are trained once, and
    the classifier is fit on all examples). Other options are those of :func:`explanation_consistency`.

    The check passes when ``metric`` is >= ``threshold``. Defaults (``threshold=None``):

    ``"lr_separability"`` (default metric): C >= **0.5**.
        C = 0.5 means the classifier is right on 75% of the maps on average. This is the midpoint
        between the two regimes that Watson et al. measured: every neural network had C between
        0 and 0.34 (MLP 0.07, CNN 0.065, DenseNet 0.33), the SVM had 0.94, and a model compared
        with itself has 1. The gate passes convex and kernel models and models that really are
        consistent. It is **expected to fail for ordinary neural networks**, whose seed alone
        makes the maps separable. That is the paper's finding, not a bug.
    ``"sign_agreement"``: mean top-k sign agreement >= **2 x its chance level**, i.e. >= k for
        a fractional k (**0.1** at the default top 10%, where chance is 0.05).
        This is the realistic gate for a neural network. It does not ask that no classifier
        can find any difference; it asks that the retrained models' most important features
        overlap, with the same sign, clearly more than unrelated maps would. Single networks
        agree far from perfectly: Ley et al. report top-5 SA of 0.49-0.91 on 6-90 tabular
        features and signed-set agreement near 0 in high dimensions. A fixed absolute bar would
        fail healthy image models, so the default catches explanations that are no better than
        chance across retrainings. To guard against regressions,
        calibrate a tighter threshold from your own baseline (e.g. 80% of the measured value).
        ``feature_agreement`` gets the same rule (2k for a fractional k).
    ``"ssim"`` and the other similarities: no default; pass ``threshold=``. SSIM between seeds
        depends on the pipeline, the data and the architecture, and SSIM has no closed-form
        chance level. The report shows each similarity next to its different-input baseline,
        so that a threshold can be set between them.

    Where digits MLPs and CNNs fall against these defaults: ``benchmarks/RESULTS.md``, "Where
    the seed-consistency defaults come from".

    Any higher-is-better metric of :data:`pytest_saliency.compare.metrics.METRICS` can gate.
    Returns the :class:`ConsistencyResult`, or raises :class:`SaliencyCheckFailed`.
    """
    __tracebackhide__ = True
    result = seed_consistency(models_or_factory, inputs, threshold, metric, seeds, cache, **options)
    return raise_if_failed(result)


# ============================================================================================
# The explainer's own randomness
# ============================================================================================


def _stability_combined(parts: list[SeedStabilityResult], arguments: dict[str, Any],
                        stopped: str) -> SeedStabilityResult:
    """One result of a stream's batches: each seed pair's mean over every input, determinism over all."""
    torch = require_torch()
    for name, what in (("seeds", "seeds"), ("metric", "metrics")):
        same_across_batches(parts, name, what)
    first = parts[0]
    pair_values = [torch.cat([part.pair_values[index] for part in parts]) for index in range(len(first.pair_scores))]
    pair_scores = [(a, b, _mean(values)) for (a, b, _), values in zip(first.pair_scores, pair_values)]
    max_diff = max(part.max_abs_difference for part in parts)
    scale = max(part.scale for part in parts)
    return dataclasses.replace(
        first, pair_scores=pair_scores, pair_values=pair_values, max_abs_difference=max_diff, scale=scale,
        deterministic=max_diff <= REPRODUCIBLE_RTOL * scale, n_inputs=sum(part.n_inputs for part in parts),
        seconds=sum(part.seconds for part in parts),
    )


@rng_isolated
@streams(StreamSpec(_stability_combined, lambda part: part))  # the result keeps no maps
@passes_model_call
def explainer_seed_stability(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    method: str | Explainer,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    metric: str | None = None,
    threshold: float | None = None,
    k: KValue = 0.1,
    preset: str | MapPipeline | None = None,
    target: int | str | torch.Tensor | None = None,
    map_shape: tuple[int, int] | None = None,
    batch_size: int | None = None,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> SeedStabilityResult:
    """Explain one model under several method seeds and compare every pair of seeds.

    Also explains twice with ``seeds[0]``: the two runs must agree to within
    :data:`REPRODUCIBLE_RTOL` of the maps' largest magnitude (``result.deterministic``); if they do
    not, the check fails whatever the similarity. Bit-identical maps are not required: on a GPU,
    kernels that sum in a varying order (cuDNN's backward passes) change the last bits from run to
    run, while a seed that does not fix the draws changes the first digits. The
    target is the model's prediction (or ``target``), held fixed for all seeds. ``threshold=None``
    uses :data:`SEED_STABILITY_THRESHOLDS` for ``ssim`` and ``sign_agreement``; other metrics
    need an explicit threshold. ``inputs`` is a tensor or an iterable of batches such as a
    ``DataLoader`` (see :mod:`pytest_saliency.checks.streaming`), each batch explained with the
    same seeds; ``target="labels"`` then explains each batch's labels.
    """
    torch = require_torch()
    from ..compare.metrics import METRICS, resolve_k

    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    seed_list = list(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, (str, bytes)) else None
    if seed_list is not None:
        seed_list = [check_seed(s, f"seeds[{index}]") for index, s in enumerate(seed_list)]
    if seed_list is None or len(seed_list) < 2 or len(set(seed_list)) != len(seed_list):
        raise SaliencyUsageError(f"seeds must be at least two distinct ints, e.g. (0, 1, 2), got {seeds!r}.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the inputs one explainer call sees; None explains all at once.")
    if metric is None:
        metric = "ssim" if current_modality().window_ok else "sign_agreement"
    if metric not in METRICS:
        raise unknown_choice("metric", metric, METRICS)
    if not METRICS[metric].higher_is_better:
        raise SaliencyUsageError(
            f"metric {metric!r} is a distance (lower is better); seed stability needs a similarity such as 'ssim' "
            "or 'sign_agreement'."
        )
    if threshold is None:
        if metric not in SEED_STABILITY_THRESHOLDS:
            raise SaliencyUsageError(
                f"metric {metric!r} has no default seed-stability threshold; pass threshold=<value>."
            )
        threshold = SEED_STABILITY_THRESHOLDS[metric]
    threshold = check_threshold(threshold, metric)
    shape = _check_map_shape(map_shape, inputs)
    _resolve_metrics([metric], inputs.dim() == 2, shape)
    if METRICS[metric].takes_k:
        resolve_k(k, int(inputs[0].numel()))
    pipeline = get_pipeline(preset)
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    fixed = resolve_target(model, inputs, target, batch_size)
    raw = {s: per_position(attribute(model, inputs, resolved, fixed, s, batch_size, True, options)) for s in seed_list}
    again = per_position(attribute(model, inputs, resolved, fixed, seed_list[0], batch_size, True, options))
    first = raw[seed_list[0]]
    max_diff = 0.0 if torch.equal(first, again) else float((first - again).abs().max())
    # Reproduced up to rounding: GPU kernels that sum in a varying order (atomic adds in cuDNN's
    # backward passes) differ in the last bits; a seed that does not fix the draws differs in the
    # first digits.
    scale = float(first.abs().max()) if first.numel() else 0.0
    deterministic = max_diff <= REPRODUCIBLE_RTOL * scale
    maps = {s: _to_maps(r, pipeline, shape) for s, r in raw.items()} if metric in _MAP_METRICS else {}
    if metric == "ssim":
        _check_ssim_size(maps[seed_list[0]], pipeline, name)
    pair_scores, pair_values = [], []
    for i, a in enumerate(seed_list):
        for b in seed_list[i + 1:]:
            values = _similarity(metric, raw[a], raw[b], maps.get(a), maps.get(b), pipeline, k, valid_positions(raw[a]))
            pair_scores.append((a, b, _mean(values)))
            pair_values.append(values.double().cpu())
    if not reproduce:
        reproduce = (
            f"pytest_saliency.assert_explainer_seed_stable(model, inputs, {name!r}, seeds={tuple(seed_list)!r}, "
            f"metric={metric!r}, preset={pipeline.name!r})"
        )
    return SeedStabilityResult(
        method=name, method_options=options, pipeline=pipeline, seeds=seed_list, metric=metric, k=k,
        threshold=float(threshold), pair_scores=pair_scores, deterministic=deterministic, max_abs_difference=max_diff,
        stochastic=draws_random(resolved, options) if isinstance(resolved, MethodSpec) else None,
        n_inputs=int(inputs.shape[0]),
        device=str(inputs.device), seconds=time.perf_counter() - start, reproduce=reproduce,
        pair_values=pair_values, scale=scale,
    )


@rng_isolated
@passes_model_call
def assert_explainer_seed_stable(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    method: str | Explainer,
    seeds: Sequence[int] = (0, 1, 2),
    metric: str | None = None,
    threshold: float | None = None,
    **options: Any,
) -> SeedStabilityResult:
    """The explainer's own randomness must not change the maps much, and a fixed seed must reproduce them.

    ``metric=None`` is SSIM for images and series and sign agreement for tabular and text maps
    (see :mod:`pytest_saliency.maps.modality`).
    Default thresholds (``threshold=None``): mean pairwise SSIM >= **0.5**, or top-10% sign
    agreement >= **0.5**. The maps compared share the model, the inputs and the target, and
    differ only in the method's random draws. So at least half of their structure, or of their
    top features with the same sign, should survive a change of seed; otherwise the map is
    mostly sampling noise. Deterministic methods give exactly 1; a sampling method passes once
    it draws enough samples, and fails with too few (more samples is the fix; the figures for
    SmoothGrad and GradientSHAP on the digits CNN are in ``benchmarks/RESULTS.md``, "Where the
    seed-consistency defaults come from"). SAM reports the same picture: SmoothGrad maps of
    regular models keep changing as the sample count grows, while robust models stay near 1.
    Options are those of :func:`explainer_seed_stability`; ``inputs`` may be an iterable of
    batches (see :mod:`pytest_saliency.checks.streaming`). Returns the result, or raises
    :class:`SaliencyCheckFailed`.
    """
    __tracebackhide__ = True
    result = explainer_seed_stability(model, inputs, method, seeds, metric=metric, threshold=threshold, **options)
    return raise_if_failed(result)


__all__ = [
    "CONSISTENCY_THRESHOLDS", "SEED_STABILITY_THRESHOLDS", "ConsistencyResult", "ModelFidelity", "PairConsistency",
    "Separability",
    "SeedStabilityResult", "assert_explainer_seed_stable", "assert_seed_consistency_above", "explainer_seed_stability",
    "explanation_consistency", "fold_assignment", "lr_separability", "models_from", "seed_consistency",
]
