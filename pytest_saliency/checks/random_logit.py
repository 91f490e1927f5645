"""The random-logit sanity check (Sixt, Granz & Landgraf, ICML 2020, "When Explanations Lie").

A map explains one output. If the map of the predicted class and the map of another class look
the same, the method is not explaining the class: Sixt et al. show that modified-backprop methods
(LRP-alpha-beta and z+, DTD, PatternAttribution, guided backprop on deep nets) converge to a
class-independent map. Plain gradients are class-specific.

How :func:`random_logit` runs it, per input: the map for the target (the predicted class by
default), the map for one other class drawn uniformly from the C - 1 classes that are not the
target (seeded from the check's seed and the input's index in the whole stream, so a loader
draws what one tensor draws; ``classes=`` pins them), both post-processed by the preset, and
their similarity (the modality's: SSIM for images and series, Spearman for tabular and text
maps). The explainer's seed is the same for both maps, so a stochastic method (SmoothGrad)
draws the same noise for both classes: only the class differs.

Verdict. The similarities form a 1 x N matrix for Sriram & Conati's statistics
(:mod:`pytest_saliency.compare.statistics`), read as for the layer-randomization checks: an
input's maps differ when their similarity is below ``ssim_threshold`` (0.99), and the check
passes when S^I = mean(1 - max(similarity, 0)) >= ``sensitivity_threshold`` (0.01). Why this
rule and not "mean similarity below a level": maps of two classes of *one* input share that
input's structure (edges, the digit's strokes), so their similarity sits well above the chance
level measured between *different* inputs (digits CNN, gradient maps: 0.29 against 0.08;
guided backprop 0.51; input x gradient 0.49), and where between the two a level should sit
depends on the model and the data. What the check must catch is a map that does not depend on
the class, and such a map has similarity 1 (the |x| and edge controls: exactly 1): the same
0.99 line as a layer that randomization does not change. ``max_similarity=`` adds a stricter,
calibrated gate: the upper end of the mean similarity's bootstrap interval must be below it.
The chance level (the mean similarity of the target maps of neighbouring inputs, each with the one before it) and the
position between chance and 1 are reported with every result.

:class:`PairedMapsResult` and the helpers below are shared with
:mod:`pytest_saliency.checks.data_randomization`, which compares two models' maps of one input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..compare.statistics import (
    CONFIDENCE,
    N_BOOTSTRAP,
    SENSITIVITY_THRESHOLD,
    SSIM_THRESHOLD,
    SensitivityStatistics,
    bootstrap_interval,
    check_sensitivity_options,
    sensitivity_statistics,
)
from ..core.forward import OutputSelector, call_model, current_call, passes_model_call
from ..core.integrity import rng_isolated, short_usage_errors
from ..core.jsonable import jsonable
from ..core.rng import derive_seed, pass_seeded
from ..core.stream import example_offset, previous_rows
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_flag,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
)
from ..engine.base import Explanation
from ..exceptions import SaliencyUsageError, raise_if_failed, warn_user
from ..maps.batching import chunks
from ..maps.explainers import prepare_method
from ..maps.methods import Explainer
from ..maps.modality import current_modality, default_similarity, figure_context
from ..maps.options import format_options
from ..maps.postprocess import MapPipeline, get_pipeline, pipeline_maps
from ..maps.targets import resolve_target
from ..model.randomize import preserved
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .controls import Floor, above_controls, control_scores, floor_lines, floor_of, second_run, sensitivity_of
from .randomization import SIMILARITY_LABELS
from .streaming import StreamSpec, same_across_batches, streams, weighted_mean

if TYPE_CHECKING:
    import torch

    from ..core.stream import Inputs
    from ..maps.cache import MapCache

#: The row name of the 1 x N similarity matrix the statistics read.
ROW = "other class"


@dataclass(kw_only=True)
class PairedMapsResult:
    """Two maps per input compared by one similarity, with the verdict of
    :func:`verdict_statistics`; ``to_dict()`` is JSON-serializable.

    ``reference_label`` and ``other_label`` say what the two maps are (the target class's and a
    random other class's; the real-label model's and the permuted-label model's); ``values`` is
    each input's similarity, ``targets`` and ``other_targets`` the classes the two maps explain.
    """

    check_name: str
    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    similarity: str
    values: list[float]
    stats: SensitivityStatistics
    similarity_ci: tuple[float, float]
    targets: list[int]
    other_targets: list[int]
    reference_label: str
    other_label: str
    n_images: int
    device: str
    seed: int
    seconds: float
    max_similarity: float | None = None
    chance: float | None = None
    chance_pairs: int = 0  # the pairs of neighbouring inputs the chance level is the mean of
    images_available: int = 0
    reproduce: str = ""
    modality: str = "image"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)
    figure_rows: str = "classes"  # what the two rows of the figure are, in its title
    figure_names: tuple[str, str] | None = None  # the rows' labels (at most 18 characters; default the labels)
    target_policy: str = "predicted class"  # what the reference map explains
    reference_maps: torch.Tensor | None = field(default=None, repr=False)  # (k, H, W), kept for reports
    other_maps: torch.Tensor | None = field(default=None, repr=False)
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # the noise floor (checks.controls): per input, the random control's S^i and the entropies
    random_control_scores: list[float] = field(default_factory=list, repr=False)
    entropy_method: list[float] = field(default_factory=list, repr=False)
    entropy_random: list[float] = field(default_factory=list, repr=False)
    repeat_scores: list[float] = field(default_factory=list, repr=False)  # empty: a deterministic method
    require_above_controls: bool = False

    @property
    def check(self) -> str:
        return self.check_name

    @property
    def above_controls(self) -> bool:
        """Clearly above the uninformative controls (:func:`~pytest_saliency.checks.controls.above_controls`)."""
        return above_controls(self.stats.ci_low, self.stats.sensitivity_threshold, self.floor)

    @property
    def floor(self) -> Floor:
        """The controls' S^I and the maps' structure (see :mod:`pytest_saliency.checks.controls`)."""
        return floor_of(self.random_control_scores, self.entropy_method, self.entropy_random, self.repeat_scores)

    @property
    def unit(self) -> str:
        return "images" if self.modality == "image" else "inputs"

    @property
    def similarity_label(self) -> str:
        return SIMILARITY_LABELS[self.similarity]

    @property
    def mean_similarity(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def fraction_different(self) -> float:
        """The inputs whose two maps differ: similarity below ``ssim_threshold``."""
        return self.stats.layers[0].fraction_sensitive

    @property
    def position(self) -> float | None:
        """Where the mean similarity sits between the chance level (0) and identical maps (1)."""
        if self.chance is None or self.chance >= 1.0:
            return None
        return (self.mean_similarity - self.chance) / (1.0 - self.chance)

    @property
    def passed(self) -> bool:
        calibrated = self.max_similarity is None or self.similarity_ci[1] < self.max_similarity
        return self.stats.dataset_sensitive and calibrated and (self.above_controls or not self.require_above_controls)

    def extra_dict(self) -> dict[str, Any]:
        """What a check adds to ``to_dict()`` (none here)."""
        return {}

    def extra_lines(self) -> list[str]:
        """What a check adds to ``report()`` (none here)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "check": self.check, "passed": self.passed, "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(), "similarity": self.similarity, "modality": self.modality,
            "similarities": self.values, "targets": self.targets, "other_targets": self.other_targets,
            "reference": self.reference_label, "other": self.other_label, "target_policy": self.target_policy,
            "mean_similarity": self.mean_similarity, "similarity_ci": list(self.similarity_ci),
            "max_similarity": self.max_similarity, "fraction_different": self.fraction_different,
            "image_scores": s.image_scores, "dataset_score": s.dataset_score, "dataset_score_ci": [s.ci_low, s.ci_high],
            "confidence": s.confidence, "ssim_threshold": s.ssim_threshold,
            "sensitivity_threshold": s.sensitivity_threshold, "clip_negative_ssim": s.clip_negative,
            "chance": self.chance, "position": self.position, "n_images": self.n_images,
            "images_available": self.images_available, "device": self.device, "seed": self.seed,
            "seconds": self.seconds, "reproduce": self.reproduce, "model_writes": list(self.model_writes),
            "controls": {**self.floor.to_dict(), "position": self.floor.position(s.dataset_score),
                         "above_controls": self.above_controls, "require_above_controls": self.require_above_controls},
            **self.extra_dict(),
        }

    def numbers(self) -> dict[str, Number]:
        s = self.stats
        return {
            "dataset_score": s.dataset_score, "ci_low": s.ci_low, "ci_high": s.ci_high,
            "sensitivity_threshold": s.sensitivity_threshold, "mean_similarity": self.mean_similarity,
            "ssim_threshold": s.ssim_threshold, "max_similarity": self.max_similarity, "chance": self.chance,
            "n_images": self.n_images, "seed": self.seed, "method": self.method, "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """The two maps of the first inputs, the inputs on top, on one colour scale."""
        from ..reporting.figures import model_maps_figures

        if self.reference_maps is None or self.other_maps is None:
            return []
        context = dict(self.figure_context)
        return model_maps_figures(
            maps=dict(zip(self.figure_names or (self.reference_label, self.other_label),
                          (self.reference_maps, self.other_maps))),
            inputs=context.pop("inputs", None), n_inputs=self.n_images, method=self.method,
            preset=self.pipeline.name, what=self.figure_rows, name=f"{self.check}_maps", **context)

    def summary(self) -> str:
        s = self.stats
        verdict = "PASS" if self.passed else "FAIL"
        gate = "" if self.max_similarity is None else f"; mean {self.similarity_label} < {format_threshold(self.max_similarity)}"
        return (
            f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: S^I = {format_score(s.dataset_score)} "
            f"({s.confidence:.0%} CI {format_score(s.ci_low)} \u2013 {format_score(s.ci_high)}) vs >= "
            f"{format_threshold(s.sensitivity_threshold)}; mean {self.similarity_label} "
            f"{format_score(self.mean_similarity)} (chance {format_score(self.chance)}){gate}; N = {self.n_images}"
        )

    def table(self, max_rows: int = 10) -> str:
        """The inputs whose two maps are most alike (what needs attention first)."""
        order = sorted(range(len(self.values)), key=lambda i: -self.values[i])[:max_rows]
        lines = [f"    {'input':>6}  {self.similarity_label:>9}  {'class':>6}  {'other':>6}  maps"]
        for i in order:
            same = "DIFFER" if self.values[i] < self.stats.ssim_threshold else "ALIKE"
            lines.append(f"    {i:>6}  {format_score(self.values[i]):>9}  {self.targets[i]:>6}  "
                         f"{self.other_targets[i]:>6}  {same}")
        if len(self.values) > max_rows:
            lines.append(f"    ... {len(self.values) - max_rows} more (all in result.to_dict()['similarities'])")
        return "\n".join(lines)

    def report(self) -> str:
        s = self.stats
        label = self.similarity_label
        chance = format_score(self.chance) if self.chance is not None else "n/a (fewer than two inputs)"
        chance += f" over {self.chance_pairs} pairs of neighbouring {self.unit}" if self.chance is not None else ""
        position = "" if self.position is None else f"; position between chance (0) and identical maps (1): " \
            f"{format_score(self.position)}"
        low, high = self.similarity_ci
        clipped = f"max({label}, 0)" if s.clip_negative else label
        gate = "" if self.max_similarity is None else (
            f"  calibrated:  mean {label} {s.confidence:.0%} CI upper end {format_score(high)} vs < "
            f"{format_threshold(self.max_similarity)} (max_similarity)")
        lines = [
            f"  check:       {self.check}: {self.reference_label} vs {self.other_label}",
            f"  method:      {self.method}{format_options(self.method_options)}   target: {self.target_policy}",
            f"  preset:      {self.pipeline.describe()}",
            *self.extra_lines(),
            *(floor_lines(self.floor, s.dataset_score, self.above_controls, self.require_above_controls)
              if self.random_control_scores else []),
            f"  compared:    {self.modality} maps by {label}; mean {format_score(self.mean_similarity)} "
            f"({s.confidence:.0%} CI {format_score(low)} .. {format_score(high)}); chance ({self.reference_label}'s maps of "
            f"different {self.unit}): {chance}{position}",
            f"  thresholds:  maps differ if {label} < {s.ssim_threshold:g}; pass if S^I >= {s.sensitivity_threshold:g} "
            f"(S^I = mean of 1 - {clipped})",
            f"  S^I:         {format_score(s.dataset_score)}  ({s.confidence:.0%} bootstrap CI {format_score(s.ci_low)} "
            f".. {format_score(s.ci_high)})  -> {'maps differ' if s.dataset_sensitive else 'maps do NOT differ'}",
            *([gate] if gate else []),
            f"  {self.unit} whose maps differ: {self.fraction_different:.1%}",
            self.table(),
            f"  {self.unit}: {self.n_images}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s",
        ]
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def what_next(self) -> str:
        return (
            "  what next:   a map that is the same whichever class it explains is not explaining the class (Sixt et "
            "al. 2020: LRP-alpha-beta, DTD, PatternAttribution and guided backprop on deep nets converge to such "
            "maps). Try a class-specific method (saliency, integrated_gradients, gradcam), or check the target."
        )

    def failure_message(self) -> str:
        s = self.stats
        if not s.dataset_sensitive:
            headline = (
                f"Saliency check failed: {self.method} maps of the {self.reference_label} and the {self.other_label} "
                f"do NOT differ (S^I = {format_score(s.dataset_score)} < {format_threshold(s.sensitivity_threshold)})")
        else:
            headline = (
                f"Saliency check failed: {self.method} maps of the {self.reference_label} and the {self.other_label} "
                f"are too alike (mean {self.similarity_label} up to {format_score(self.similarity_ci[1])}, "
                f"max_similarity {format_threshold(self.max_similarity)})")
        return f"{headline}\n{self.report()}\n{self.what_next()}"


@dataclass(kw_only=True)
class RandomLogitResult(PairedMapsResult):
    """The outcome of :func:`random_logit`: the target class's maps against a random other class's."""

    num_classes: int
    classes_given: bool = False

    def extra_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "classes_given": self.classes_given}

    def extra_lines(self) -> list[str]:
        drawn = "given (classes=)" if self.classes_given else (
            f"drawn uniformly from the {self.num_classes - 1} other classes (seeded per input)")
        return [f"  classes:     {self.num_classes}; the other class {drawn}"]


# ----------------------------------------------------------------------------------------------
# shared with data_randomization


def valid_tokens(x: torch.Tensor) -> torch.Tensor | None:
    """Which positions of token inputs are not padding (None for other inputs or without a pad token)."""
    text = current_call().text
    if current_modality().name != "text" or text is None or text.pad_token_id is None:
        return None
    return x != text.pad_token_id


def compared_maps(raw: torch.Tensor, pipeline: MapPipeline) -> torch.Tensor:
    """Raw attributions post-processed into the maps that are compared (float32 or float64)."""
    torch = require_torch()
    maps = pipeline_maps(raw, pipeline)
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def usable_rows(maps: torch.Tensor, pipeline: MapPipeline, method: str, similarity: str, constant_maps: str,
                valid: torch.Tensor | None, what: str) -> torch.Tensor:
    """The rows of reference ``maps`` that can be compared: every row, or an error, when none is
    constant (over the positions that are not padding); with ``constant_maps="skip"`` the others,
    with a warning. SSIM also needs maps as large as its window."""
    from ..compare.similarity import check_ssim_window

    torch = require_torch()
    if similarity == "ssim":
        check_ssim_window(maps.shape[-2], maps.shape[-1], pipeline.ssim.win_size, method=method, preset=pipeline.name)
    flat = maps.flatten(1)
    if valid is None:
        constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 0
    else:
        mask = valid.reshape(flat.shape).to(flat.device)
        spread = flat.masked_fill(~mask, float("-inf")).amax(dim=1) - flat.masked_fill(~mask, float("inf")).amin(dim=1)
        constant = ~(spread > 0) | (mask.sum(dim=1) < 2)
    if not bool(constant.any()):
        return torch.arange(maps.shape[0], device=maps.device)
    index = torch.nonzero(constant).flatten().tolist()
    problem = (f"the {what} {method} maps are constant for {len(index)} of {len(constant)} input(s) (indices "
               f"{index[:10]}{' ...' if len(index) > 10 else ''}); {SIMILARITY_LABELS[similarity]} against a "
               "constant map measures nothing.")
    if constant_maps == "skip":
        warn_user(f"{problem} Those inputs are left out of the check.")
        return torch.nonzero(~constant).flatten()
    raise SaliencyUsageError(
        f"{problem} Typical causes: dead ReLUs, a saturated output, a ReLU'd GradCAM that is zero everywhere. Drop "
        "those inputs, pass constant_maps='skip' to leave them out with a warning, or pick another method.")


def paired_similarity(a: torch.Tensor, b: torch.Tensor, pipeline: MapPipeline, similarity: str,
                      valid: torch.Tensor | None) -> torch.Tensor:
    """The similarity of each pair of maps ``(a[i], b[i])`` (float64, on the CPU). A constant
    ``b`` map has no ranking: its Spearman or Pearson value (NaN) counts as 0, no agreement."""
    from ..compare.metrics import compute_on_valid
    from ..compare.similarity import ssim_setup, ssim_unchecked

    if similarity == "ssim":
        values = ssim_unchecked(a, b, ssim_setup(**pipeline.ssim.kwargs()))
    else:
        values = compute_on_valid(similarity, a, b, valid).nan_to_num(nan=0.0)
    return values.double().cpu()


def chance_values(a: torch.Tensor, pipeline: MapPipeline, similarity: str, valid: torch.Tensor | None,
                  key: str) -> torch.Tensor:
    """The similarity of each reference map with the previous input's (NaN for the first input of
    all, which has none; across the batches of a stream too, see
    :func:`~pytest_saliency.core.stream.previous_rows`, ``key`` naming the maps): what maps of
    different inputs score on these inputs, the chance level. NaN where undefined."""
    from ..compare.metrics import compute_on_valid
    from ..compare.similarity import ssim_setup, ssim_unchecked

    other, paired = previous_rows(f"{key}:reference", a)
    if similarity == "ssim":
        values = ssim_unchecked(a, other, ssim_setup(**pipeline.ssim.kwargs()))
    else:
        both = None if valid is None else valid & previous_rows(f"{key}:valid", valid)[0]
        values = compute_on_valid(similarity, a, other, both)
    return values.double().masked_fill(~paired.to(values.device), float("nan")).cpu()


def shown_inputs(inputs: torch.Tensor, count: int) -> dict[str, Any]:
    """The figure context of the first ``count`` inputs, with the inputs drawn above their maps
    (images and feature vectors; a series' signal is in the context already, a text's tokens are its map)."""
    context = figure_context(inputs, count)
    if context["modality"] in ("image", "tabular"):
        context["inputs"] = inputs[:count].detach().float().cpu()
    return context


def repeated_maps(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation, target: torch.Tensor,
                  pipeline: MapPipeline) -> torch.Tensor | None:
    """The reference maps from a second run of the method with another seed (the method's own
    noise floor, :mod:`pytest_saliency.checks.controls`), the model in eval mode without parameter
    gradients (flags restored); None for a method of the package that draws no random numbers."""
    with preserved(model):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        raw = second_run(explanation, inputs, target, list(range(inputs.shape[0])))
    return None if raw is None else compared_maps(raw, pipeline)


def floor_numbers(reference: torch.Tensor, pipeline: MapPipeline, similarity: str, valid: torch.Tensor | None,
                  seed: int, clip_negative: bool,
                  repeated: torch.Tensor | None = None) -> tuple[list[float], list[float], list[float], list[float]]:
    """The noise floor of paired maps (:mod:`pytest_saliency.checks.controls`): the random
    control's S^i per input (two noise maps compared, as the two maps of an input are) and the
    entropies of the reference maps and of noise maps, and each input's S between two runs of the
    method (``repeated``: the second run's maps; empty for None): ``(random_control_scores,
    entropy_method, entropy_random, repeat_scores)``."""
    from ..compare.similarity import ssim_setup

    scores = control_scores(reference, 1, pipeline, ssim_setup(**pipeline.ssim.kwargs()), similarity, valid, seed, 0,
                            repeated)
    repeat = [] if scores.repeat is None else sensitivity_of(scores.repeat, clip_negative).tolist()
    return (sensitivity_of(scores.random[0], clip_negative).tolist(), scores.entropy_method.tolist(),
            scores.entropy_random.tolist(), repeat)


def mean_defined(values: torch.Tensor) -> tuple[float | None, int]:
    """The mean of the values that are not NaN (None when there are none), and their number."""
    defined = values[~values.isnan()]
    return (float(defined.mean()) if defined.numel() else None), int(defined.numel())


@dataclass(frozen=True)
class Verdict:
    """The thresholds and bootstrap settings of a paired-maps check, checked once."""

    ssim_threshold: float
    sensitivity_threshold: float
    clip_negative: bool
    confidence: float
    n_bootstrap: int
    max_similarity: float | None
    seed: int
    require_above_controls: bool = False

    def statistics(self, values: Sequence[float]) -> tuple[SensitivityStatistics, tuple[float, float]]:
        """Sriram & Conati's statistics of the 1 x N matrix, and the mean similarity's interval."""
        torch = require_torch()
        matrix = torch.tensor([list(values)], dtype=torch.float64)
        stats = sensitivity_statistics(
            matrix, [ROW], ssim_threshold=self.ssim_threshold, sensitivity_threshold=self.sensitivity_threshold,
            clip_negative=self.clip_negative, confidence=self.confidence, n_bootstrap=self.n_bootstrap, seed=self.seed)
        return stats, bootstrap_interval(matrix[0], self.confidence, self.n_bootstrap, self.seed)


def verdict_settings(arguments: Mapping[str, Any]) -> Verdict:
    """:class:`Verdict` of a check's arguments (``ssim_threshold``, ``sensitivity_threshold``,
    ``clip_negative_ssim``, ``confidence``, ``n_bootstrap``, ``max_similarity``, ``seed``)."""
    clip = check_flag(arguments["clip_negative_ssim"], "clip_negative_ssim")
    check_sensitivity_options(
        ssim_threshold=arguments["ssim_threshold"], sensitivity_threshold=arguments["sensitivity_threshold"],
        clip_negative=clip, confidence=arguments["confidence"], n_bootstrap=arguments["n_bootstrap"])
    limit = arguments["max_similarity"]
    if limit is not None:
        limit = check_number(limit, "max_similarity", low=-1.0, high=1.0, high_open=True,
                             hint="It is the most the mean similarity's interval may reach, e.g. 0.5; None turns it off.")
    return Verdict(float(arguments["ssim_threshold"]), float(arguments["sensitivity_threshold"]), clip,
                   float(arguments["confidence"]), int(arguments["n_bootstrap"]), limit,
                   check_seed(arguments["seed"]),
                   check_flag(arguments.get("require_above_controls", False), "require_above_controls"))


def combined_paired(parts: list[Any], arguments: dict[str, Any], stopped: str) -> Any:
    """One result of a stream's batches: every input's similarity and classes, the statistics on all."""
    same_across_batches(parts, "similarity", "comparisons")
    first = parts[0]
    values = [v for part in parts for v in part.values]
    stats, interval = verdict_settings(arguments).statistics(values)
    sizes = [part.n_images for part in parts]
    return replace(
        first, values=values, stats=stats, similarity_ci=interval, n_images=sum(sizes),
        targets=[t for part in parts for t in part.targets],
        other_targets=[t for part in parts for t in part.other_targets],
        images_available=sum(part.images_available for part in parts), seconds=sum(p.seconds for p in parts),
        chance=weighted_mean([part.chance for part in parts], [part.chance_pairs for part in parts]),
        chance_pairs=sum(part.chance_pairs for part in parts),
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
        random_control_scores=[v for part in parts for v in part.random_control_scores],
        entropy_method=[v for part in parts for v in part.entropy_method],
        entropy_random=[v for part in parts for v in part.entropy_random],
        repeat_scores=[v for part in parts for v in part.repeat_scores],
    )


def slim_paired(part: Any) -> Any:
    return replace(part, reference_maps=None, other_maps=None, figure_context={"modality": part.modality})


# ----------------------------------------------------------------------------------------------
# the random logit check


class StreamRows:
    """The rows of a per-example argument (``classes=``) left for the next batches of a stream;
    a batch takes its first rows. Made by the stream's ``prepare`` step, never by users."""

    def __init__(self, rows: torch.Tensor, start: int) -> None:
        self.rows, self.start = rows, start


@short_usage_errors
def random_other_classes(targets: torch.Tensor, num_classes: int, seed: int = 0, *,
                         first_example: int = 0) -> torch.Tensor:
    """For each target class, another class drawn uniformly from the ``num_classes - 1`` others.

    The draw of input ``i`` comes from a local generator seeded by ``(seed, first_example + i)``
    alone (:func:`pytest_saliency.core.rng.derive_seed`): no global RNG changes, and an input
    draws the same class whichever batch of a loader it comes in.
    """
    torch = require_torch()
    num_classes = check_count(num_classes, "num_classes", minimum=2, hint="A random other class needs two classes.")
    seed = check_seed(seed)
    flat = targets.reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise SaliencyUsageError(f"targets must lie in 0 .. {num_classes - 1}, got {flat.tolist()[:10]}.")
    generator = torch.Generator()
    drawn = []
    for i, target in enumerate(flat.tolist()):
        generator.manual_seed(derive_seed(seed, "random_logit", first_example + i))
        r = int(torch.randint(0, num_classes - 1, (1,), generator=generator))
        drawn.append(r + (r >= target))  # the r-th class of the list without the target
    return torch.tensor(drawn, dtype=torch.long, device=targets.device)


def _scores(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int | None, seed: int) -> torch.Tensor:
    """The model's (N, C) scores, seeded like an explanation pass."""
    torch = require_torch()
    with torch.no_grad(), model_in_eval_mode(model, True), pass_seeded(seed, inputs.device):
        outputs, first = [], 0
        for chunk in chunks(inputs, batch_size):
            outputs.append(call_model(model, chunk, rows=range(first, first + chunk.shape[0])))
            first += chunk.shape[0]
    out = torch.cat(outputs)
    if out.dim() != 2 or out.shape[1] < 2:
        raise SaliencyUsageError(
            f"random_logit needs (N, num_classes) scores with two or more classes; the model's output has shape "
            f"{tuple(out.shape)}. Pass output= to select the class scores.")
    return out


def _other_classes(classes: Any, targets: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """The other class of each input: drawn (``classes=None``), or the given ones, checked."""
    torch = require_torch()
    n = targets.shape[0]
    if classes is None:
        return random_other_classes(targets, num_classes, seed, first_example=example_offset())
    rows = classes.rows[:n] if isinstance(classes, StreamRows) else classes
    given = torch.as_tensor(rows) if not isinstance(rows, torch.Tensor) else rows
    if isinstance(classes, StreamRows) and given.shape[0] < n:
        raise SaliencyUsageError(
            f"classes has {classes.start + given.shape[0]} entries, but the loader has more examples (at least "
            f"{classes.start + n}); pass one class per example of the whole loader, in its order.")
    if given.dim() != 1 or given.shape[0] != n or given.is_floating_point() or given.dtype == torch.bool:
        raise SaliencyUsageError(
            f"classes must hold one integer class per input ({n}), got {type(rows).__name__} of shape "
            f"{tuple(given.shape)}. With a loader, pass one per example of the whole loader, in its order.")
    given = given.to(targets.device).long()
    if int(given.min()) < 0 or int(given.max()) >= num_classes:
        raise SaliencyUsageError(f"classes must lie in 0 .. {num_classes - 1} (the model's classes), got "
                                 f"{given.min().item()} .. {given.max().item()}.")
    same = torch.nonzero(given == targets).flatten().tolist()
    if same:
        raise SaliencyUsageError(
            f"classes equals the target class for inputs {same[:10]}: the two maps would be the same map. Pass "
            "another class than the target for every input, or classes=None to draw them.")
    return given


def _prepare_batch(arguments: dict[str, Any], seen: int) -> dict[str, Any]:
    """A stream's batch takes its rows of ``classes=`` (one per example of the whole stream)."""
    classes = arguments["classes"]
    if classes is None:
        return {}
    torch = require_torch()
    rows = classes if isinstance(classes, torch.Tensor) else torch.as_tensor(classes)
    start = seen
    if rows.dim() != 1:
        raise SaliencyUsageError(f"classes must hold one integer class per example, got shape {tuple(rows.shape)}.")
    return {"classes": StreamRows(rows[start:], start)}


def _combined(parts: list[RandomLogitResult], arguments: dict[str, Any], stopped: str) -> RandomLogitResult:
    classes = arguments["classes"]
    seen = sum(part.images_available for part in parts)
    if classes is not None and len(classes) != seen:
        raise SaliencyUsageError(f"classes has {len(classes)} entries but the loader yielded {seen} examples; pass "
                                 "one class per example of the whole loader, in its order.")
    result: RandomLogitResult = combined_paired(parts, arguments, stopped)
    return result


def _explained(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation, target: torch.Tensor,
               others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps for the target and for the other classes, the model in eval mode without parameter
    gradients (flags restored); the target maps come from, and go to, the session's map cache."""
    ids = list(range(inputs.shape[0]))
    with preserved(model):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        raw_target = explanation.original(inputs, target, ids)
        raw_other = explanation.maps(inputs, others, ids)
    return raw_target, raw_other


@rng_isolated
@streams(StreamSpec(_combined, slim_paired, _prepare_batch, carries=True))
@passes_model_call
def random_logit(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    target: int | Sequence[int] | torch.Tensor | None = None,
    classes: Sequence[int] | torch.Tensor | None = None,
    preset: str | MapPipeline | None = None,
    seed: int = 0,
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
    cache: MapCache | None = None,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> RandomLogitResult:
    """Sixt et al.'s random logit: each input's map for the target against its map for another class.

    ``target``: the class explained first (default: the predicted class; an int, a per-input
    tensor, or ``"labels"`` with a loader of (inputs, labels)). ``classes``: the other class per
    input (default: drawn uniformly from the classes that are not the target, seeded by
    ``seed`` and the input's index in the whole stream). The two maps are post-processed by
    ``preset`` and compared by ``similarity`` (default: the modality's: SSIM for images,
    Spearman for tabular and text maps). Verdict (module docstring): S^I of the 1 x N matrix >=
    ``sensitivity_threshold``, an input's maps differing when the similarity is below
    ``ssim_threshold``; with ``max_similarity``, also the upper end of the mean similarity's
    interval below it. The model is bit-identical afterwards and no global RNG changes.
    """
    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    verdict = verdict_settings(locals())
    pipeline = get_pipeline(preset)
    similarity = check_choice(default_similarity(similarity), "similarity", SIMILARITY_LABELS)
    constant_maps = check_choice(constant_maps, "constant_maps", ("error", "skip"))
    keep_maps = check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True, hint="It bounds the inputs one call explains.")
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    scores = _scores(model, inputs, batch_size, verdict.seed)
    fixed_target = resolve_target(model, inputs, target, batch_size, outputs=scores)
    others = _other_classes(classes, fixed_target, int(scores.shape[1]), verdict.seed)
    explanation = Explanation(model, resolved, name, options, verdict.seed, batch_size, cache)
    raw_target, raw_other = _explained(model, inputs, explanation, fixed_target, others)
    valid = valid_tokens(inputs)
    reference = compared_maps(raw_target, pipeline)
    keep = usable_rows(reference, pipeline, name, similarity, constant_maps, valid, "target class's")
    if keep.numel() == 0:
        raise SaliencyUsageError(f"the target class's {name} maps are constant for every input (constant_maps='skip' "
                                 "left none); pick other inputs or another method.")
    valid = None if valid is None else valid[keep]
    reference, other = reference[keep], compared_maps(raw_other, pipeline)[keep]
    values = paired_similarity(reference, other, pipeline, similarity, valid).tolist()
    stats, interval = verdict.statistics(values)
    chance = mean_defined(chance_values(reference, pipeline, similarity, valid, "random_logit"))
    again = repeated_maps(model, inputs, explanation, fixed_target, pipeline)
    floor = floor_numbers(reference, pipeline, similarity, valid, verdict.seed, verdict.clip_negative,
                          None if again is None else again[keep])
    k = min(keep_maps, len(values))
    return RandomLogitResult(
        check_name="random_logit", method=name, method_options=options, pipeline=pipeline, similarity=similarity,
        values=values, stats=stats, similarity_ci=interval, targets=fixed_target[keep].tolist(),
        other_targets=others[keep].tolist(), reference_label="target class", other_label="random other class",
        n_images=len(values), device=str(inputs.device), seed=verdict.seed, seconds=time.perf_counter() - start,
        max_similarity=verdict.max_similarity, chance=chance[0], chance_pairs=chance[1],
        images_available=int(inputs.shape[0]), modality=current_modality().name,
        reproduce=reproduce or f"pytest_saliency.random_logit(model, inputs, method={name!r}, preset={pipeline.name!r}, "
        f"seed={verdict.seed})",
        reference_maps=reference[:k].detach().cpu(), other_maps=other[:k].detach().cpu(),
        figure_context=shown_inputs(inputs[keep], k), num_classes=int(scores.shape[1]),
        target_policy="predicted class" if target is None else "given",
        classes_given=classes is not None, random_control_scores=floor[0], entropy_method=floor[1],
        entropy_random=floor[2], repeat_scores=floor[3], require_above_controls=verdict.require_above_controls,
    )


@rng_isolated
@passes_model_call
def assert_sensitive_to_random_logit(model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency",
                                     **options: Any) -> RandomLogitResult:
    """Fail (``SaliencyCheckFailed``) when :func:`random_logit`'s maps of the target and of a
    random other class do not differ; returns the result on success."""
    __tracebackhide__ = True
    result = random_logit(model, inputs, method, **options)
    return raise_if_failed(result)


__all__ = [
    "PairedMapsResult", "RandomLogitResult", "StreamRows", "Verdict", "assert_sensitive_to_random_logit",
    "chance_values", "combined_paired", "compared_maps", "mean_defined", "paired_similarity", "random_logit",
    "random_other_classes", "shown_inputs", "slim_paired", "usable_rows", "valid_tokens", "verdict_settings",
]
