"""The parameter-randomization sanity check (Adebayo et al. 2018; thresholds of Sriram & Conati).

Independent (IPR): each layer is randomized on its own while the others keep their trained
values. Cascading (CPR): layers are randomized cumulatively, from the output towards the input by
default (Adebayo's order), or from the input upwards with ``order="bottom_up"``.

The method, as :func:`layer_randomization` runs it: select the layers, compute the original
model's maps, compute each randomized state's maps and compare them with the originals (SSIM),
then the statistics over layers and images, and the verdict.

Cost: one traced forward pass gives the execution order and the predicted targets; the original
model's maps are computed once; then the maps of every randomized state, with the layers
randomized in place and restored (no model copies). How those maps are computed is the engine's
business (:mod:`pytest_saliency.engine`): one captum call per state, or, for gradient methods
(saliency, input x gradient, integrated gradients, SmoothGrad), only the part of the forward
pass after the randomized layer (:mod:`pytest_saliency.engine.replay`), or, for occlusion, all
states in one captum call whose forward passes share the original model's prefix
(:mod:`pytest_saliency.engine.stacks`). SSIM runs batched on the maps' device, against filtered
moments of the original maps computed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..compare.statistics import (
    CONFIDENCE,
    N_BOOTSTRAP,
    SENSITIVITY_THRESHOLD,
    SSIM_THRESHOLD,
    SensitivityStatistics,
    check_sensitivity_options,
    sensitivity_statistics,
)
from ..core.forward import OutputSelector, current_call, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.stream import CarryTaken, carried_rows, carry_only, previous_rows
from ..core.torchtools import require_torch
from ..core.validation import (
    all_finite,
    check_choice,
    check_count,
    check_finite,
    check_flag,
    check_inputs,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
)
from ..engine.base import Explanation, MapEngine, Progress, States
from ..engine.select import engine_for
from ..exceptions import SaliencyUsageError, warn_user
from ..maps.explainers import prepare_method
from ..maps.methods import Explainer
from ..maps.modality import current_modality, default_similarity, figure_context, top_features
from ..maps.options import format_options
from ..maps.postprocess import MapPipeline, get_pipeline, pipeline_maps
from ..maps.targets import resolve_target
from ..model.layers import select_layers
from ..model.randomize import STRATEGIES, check_strategy, preserved
from ..reporting.numbers import format_score, format_threshold, layer_label
from ..reporting.protocol import Figure, Number
from .controls import (
    ControlScores,
    Floor,
    above_controls,
    control_scores,
    floor_lines,
    floor_of,
    second_run,
    sensitivity_of,
)
from .streaming import StreamSpec, capped_images, same_across_batches, streams, tensor_size, weighted_mean

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..core.stream import Inputs
    from ..maps.cache import MapCache

MODES = ("independent", "cascading")
#: How a state's maps can be compared with the original ones (1 = identical maps).
SIMILARITY_LABELS = {"ssim": "SSIM", "spearman": "Spearman", "pearson": "Pearson"}
#: A randomization result class (:class:`RandomizationResult` or a subclass, e.g. smooth MPRT's).
R = TypeVar("R", bound="RandomizationResult")
ORDERS = ("top_down", "bottom_up")


@dataclass
class RandomizationResult:
    """The outcome of one randomization check; ``to_dict()`` is JSON-serializable.

    ``ssim`` (and, in ``to_dict()``, ``ssim_threshold``, ``clip_negative_ssim`` and each layer's
    ``mean_ssim``, ``std_ssim``, ``min_ssim``, ``max_ssim``) hold the values of the comparison that
    ``similarity`` names: SSIM, or Spearman or Pearson correlation (the default for tabular and
    text maps). The keys keep their names across comparisons so that readers of the JSON report
    need one layout; ``similarity`` says what the numbers are.
    """

    mode: str
    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    layers: list[str]
    ssim: list[list[float]]  # (layers, images)
    stats: SensitivityStatistics
    n_images: int
    device: str
    seed: int
    randomization: str
    order: str
    require_every_layer: bool
    seconds: float
    reproduce: str = ""
    images_available: int = 0
    stopped_early: str = ""
    reused_activations: bool = False
    original_maps: torch.Tensor | None = field(default=None, repr=False)  # (N, H, W) tensor, kept for reports
    randomized_maps: torch.Tensor | None = field(default=None, repr=False)  # (layers, k, H, W) for the first k images
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)
    similarity: str = "ssim"  # how each state's maps were compared with the original ones
    modality: str = "image"
    chance: float | None = None  # mean similarity of the original maps of different inputs
    chance_pairs: int = 0  # the pairs of different inputs that mean is over
    # the noise floor (checks.controls): per image, the random control's S^i and the entropies
    random_control_scores: list[float] = field(default_factory=list, repr=False)
    entropy_method: list[float] = field(default_factory=list, repr=False)
    entropy_random: list[float] = field(default_factory=list, repr=False)
    repeat_scores: list[float] = field(default_factory=list, repr=False)  # empty: a deterministic method
    require_above_controls: bool = False
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # see maps.modality

    @property
    def check(self) -> str:
        return f"{self.mode}_layer_randomization"

    @property
    def unit(self) -> str:
        """What the inputs are called in the report: images, or inputs for the other modalities."""
        return "images" if self.modality == "image" else "inputs"

    @property
    def similarity_label(self) -> str:
        """The comparison's name in messages: SSIM, Spearman or Pearson."""
        return SIMILARITY_LABELS[self.similarity]

    @property
    def passed(self) -> bool:
        every_layer = all(layer.sensitive for layer in self.stats.layers)
        return self.stats.dataset_sensitive and (every_layer or not self.require_every_layer) and (
            self.above_controls or not self.require_above_controls)

    @property
    def floor(self) -> Floor:
        """The controls' S^I and the maps' structure (see :mod:`pytest_saliency.checks.controls`)."""
        return floor_of(self.random_control_scores, self.entropy_method, self.entropy_random, self.repeat_scores)

    @property
    def above_controls(self) -> bool:
        """Clearly above the uninformative controls (:func:`~pytest_saliency.checks.controls.above_controls`)."""
        return above_controls(self.stats.ci_low, self.stats.sensitivity_threshold, self.floor)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "model_writes": list(self.model_writes),
            "check": self.check,
            "passed": self.passed,
            "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(),
            "mode": self.mode,
            "order": self.order,
            "randomization": self.randomization,
            "layers": [layer.to_dict() for layer in s.layers],
            "ssim": self.ssim,
            "image_scores": s.image_scores,
            "image_sensitive_to_all_layers": s.image_sensitive_to_all_layers,
            "dataset_score": s.dataset_score,
            "dataset_score_ci": [s.ci_low, s.ci_high],
            "confidence": s.confidence,
            "fraction_images_sensitive_to_all_layers": s.fraction_images_sensitive_to_all_layers,
            "ssim_threshold": s.ssim_threshold,
            "sensitivity_threshold": s.sensitivity_threshold,
            "clip_negative_ssim": s.clip_negative,
            "require_every_layer": self.require_every_layer,
            "n_images": self.n_images,
            "device": self.device,
            "seed": self.seed,
            "seconds": self.seconds,
            "images_available": self.images_available,
            "stopped_early": self.stopped_early,
            "reused_activations": self.reused_activations,
            "reproduce": self.reproduce,
            "similarity": self.similarity,
            "modality": self.modality,
            "chance": self.chance,
            "controls": {**self.floor.to_dict(), "position": self.floor.position(s.dataset_score),
                         "above_controls": self.above_controls, "require_above_controls": self.require_above_controls,
                         },
        }

    def numbers(self) -> dict[str, Number]:
        """S^I against its threshold, the insensitive layers, the run's size and settings."""
        s = self.stats
        return {
            "dataset_score": s.dataset_score, "ci_low": s.ci_low, "ci_high": s.ci_high,
            "sensitivity_threshold": s.sensitivity_threshold, "insensitive_layers": len(s.insensitive_layers),
            "layers": len(s.layers), "ssim_threshold": s.ssim_threshold, "n_images": self.n_images,
            "seed": self.seed, "method": self.method, "preset": self.pipeline.name, "mode": self.mode,
            "control_random": self.floor.random if self.random_control_scores else None,
            "control_repeat": self.floor.repeat if self.random_control_scores else None,
        }

    def figures(self) -> list[Figure]:
        """The strip of maps after each layer's randomization and the per-layer SSIM curve."""
        from ..reporting.figures import randomization_figures

        s = self.stats
        return randomization_figures(
            layers=self.layers, ssim=self.ssim, ssim_threshold=s.ssim_threshold,
            insensitive_layers=[layer.name for layer in s.insensitive_layers], original_maps=self.original_maps,
            randomized_maps=self.randomized_maps, method=self.method, preset=self.pipeline.name, mode=self.mode,
            order=self.order, check=self.check, dataset_score=s.dataset_score, ci=(s.ci_low, s.ci_high),
            similarity=self.similarity_label, **self.figure_context,
        )

    def summary(self) -> str:
        """One line: the key number, the threshold and the verdict."""
        s = self.stats
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: S^I = {format_score(s.dataset_score)} "
            f"({s.confidence:.0%} CI {format_score(s.ci_low)} \u2013 {format_score(s.ci_high)}) vs >= "
            f"{format_threshold(s.sensitivity_threshold)}; {len(s.insensitive_layers)}/{len(s.layers)} layers with "
            f"mean {self.similarity_label} >= {format_threshold(s.ssim_threshold)}; "
            f"N = {self.n_images}" + ("" if not self.require_above_controls else
                                      "; above the controls" if self.above_controls else "; NOT above the controls")
        )

    def table(self, max_rows: int = 20) -> str:
        """Per-layer table, insensitive layers first (they are what needs attention)."""
        s = self.stats
        rows = sorted(s.layers, key=lambda layer: (layer.sensitive, -layer.mean_ssim))
        width = max([len("layer")] + [len(layer_label(r.name)) for r in rows])
        lines = [
            f"    {'layer':<{width}}  {'mean ' + self.similarity_label:>9}    std    min     max   sensitive {self.unit}  verdict",
        ]
        for r in rows[:max_rows]:
            verdict = "sensitive" if r.sensitive else "INSENSITIVE"
            lines.append(
                f"    {layer_label(r.name):<{width}}  {format_score(r.mean_ssim):>9} {r.std_ssim:6.3f} "
                f"{r.min_ssim:6.3f} {r.max_ssim:7.3f}"
                f"   {r.fraction_sensitive:15.1%}  {verdict}"
            )
        if len(rows) > max_rows:
            lines.append(f"    ... {len(rows) - max_rows} more layers (all in result.to_dict()['layers'])")
        return "\n".join(lines)

    def report(self) -> str:
        """The full human-readable account used in failure messages."""
        s = self.stats
        label = self.similarity_label
        boundary = f"{label} < threshold counts as sensitive; S from max({label}, 0)" if s.clip_negative else (
            f"{label} < threshold counts as sensitive; S from raw {label} (may exceed 1)"
        )
        chance = format_score(self.chance) if self.chance is not None else (
            "n/a (a single input)" if self.n_images < 2 else
            "n/a (undefined for every pair: one of the two maps is constant on the positions they share)")
        order = f", {self.order.replace('_', '-')}" if self.mode == "cascading" else ""
        lines = [
            f"  check:       {self.check} ({self.mode}{order}, randomization={self.randomization})",
            f"  method:      {self.method}{format_options(self.method_options)}   target: original model's prediction",
            f"  preset:      {self.pipeline.describe()}",
            f"  compared:    {self.modality} maps by {label}; chance (original maps of different {self.unit}): {chance}",
            *self._top_features(),
            *self._floor_lines(),
            f"  thresholds:  layer sensitive if {label} < {s.ssim_threshold:g}; dataset sensitive if "
            f"S^I >= {s.sensitivity_threshold:g} ({boundary})",
            f"  S^I:         {format_score(s.dataset_score)}  ({s.confidence:.0%} bootstrap CI "
            f"{format_score(s.ci_low)} .. {format_score(s.ci_high)})"
            f"  vs >= {s.sensitivity_threshold:g}  -> {'sensitive' if s.dataset_sensitive else 'NOT sensitive'}",
            f"  {self.unit} sensitive to every layer (Definition 2): {s.fraction_images_sensitive_to_all_layers:.1%}",
            f"  layers:      {len(s.layers)} ({len(s.insensitive_layers)} with mean {label} >= {s.ssim_threshold:g})"
            + ("; every layer must be sensitive (require_every_layer=True)" if self.require_every_layer else ""),
            self.table(),
            f"  {self.unit}: {self.n_images}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s"
            + (f"   ({self.stopped_early})" if self.stopped_early else ""),
        ]
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def _floor_lines(self) -> list[str]:
        """The noise floor: the controls' S^I, where the method sits between them, the structure."""
        if not self.random_control_scores:
            return []
        return floor_lines(self.floor, self.stats.dataset_score, self.above_controls, self.require_above_controls)

    def _top_features(self) -> list[str]:
        """Feature maps: the features the original maps of the kept inputs weigh most."""
        if self.modality != "tabular" or self.original_maps is None:
            return []
        top = top_features(self.original_maps, self.figure_context.get("feature_names"))
        return [f"  top features (original maps of the first {self.original_maps.shape[0]} {self.unit}): {top}"]

    def failure_message(self) -> str:
        s = self.stats
        if not s.dataset_sensitive:
            headline = (
                f"Saliency check failed: {self.method} maps are NOT sensitive to {self.mode} layer randomization "
                f"(S^I = {format_score(s.dataset_score)} < {format_threshold(s.sensitivity_threshold)})"
            )
        elif s.insensitive_layers and self.require_every_layer:
            names = ", ".join(layer_label(layer.name) for layer in s.insensitive_layers[:5])
            headline = (
                f"Saliency check failed: {self.method} maps do not change when these layers are randomized: {names}"
            )
        else:
            f = self.floor
            headline = (
                f"Saliency check failed: {self.method} maps are NOT clearly above the uninformative controls "
                f"(S^I CI low {format_score(s.ci_low)} vs the method's own repeat level {format_score(f.repeat)} "
                f"and the edge detector's {format_score(f.edge)}, + {format_threshold(s.sensitivity_threshold)})"
            )
        hint = (
            "  what next:   an explanation that does not depend on the model's parameters is not explaining the "
            "model. Try another method (e.g. saliency or integrated_gradients), check that the model is the "
            "trained one, or, for a known-irrelevant layer, leave it out with layers=[...]."
        )
        return "\n".join([headline, self.report(), hint])


def _for_ssim(raw: torch.Tensor, pipeline: MapPipeline) -> torch.Tensor:
    """Raw attributions post-processed into the maps SSIM compares. SSIM runs in float32 or
    float64; maps of half-precision models are compared in float32."""
    torch = require_torch()
    maps = pipeline_maps(raw, pipeline)
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


#: Maps of consecutive states are post-processed and compared in one batch up to this many bytes:
#: for small maps the per-call overhead of a dozen tensor operations outweighs their work.
SIMILARITY_BATCH_BYTES = 2**20


class _Comparison:
    """SSIM (or another similarity) of each randomized state's maps against the original maps,
    batched over states.

    Raw attributions are added state by state (in any order) and post-processed and compared
    in groups of up to :data:`SIMILARITY_BATCH_BYTES` of maps; the filtered moments of the
    original maps are computed once. Each group is checked for NaN and inf in one reduction; a
    non-finite state is reported as ``describe(index)``. The first ``keep`` maps of every state
    are kept as copies for the report (a view would keep the whole batch alive).
    """

    def __init__(self, original: torch.Tensor, pipeline: MapPipeline, setup: Any, states: int, keep: int,
                 describe: Callable[[int], str], similarity: str = "ssim", valid: torch.Tensor | None = None) -> None:
        from ..compare.similarity import ssim_reference_moments

        self.original, self.pipeline, self.setup, self.keep = original, pipeline, setup, keep
        self.describe, self.similarity, self.valid = describe, similarity, valid
        self.moments = ssim_reference_moments(original, setup) if similarity == "ssim" else None
        self.map_bytes = original.numel() * original.element_size()
        self.rows: list[Any] = [None] * states
        self.kept_maps: list[Any] = [None] * states
        self.pending: list[tuple[int, Any]] = []

    def add(self, index: int, raw: torch.Tensor) -> None:
        self.pending.append((index, raw))
        if len(self.pending) * self.map_bytes >= SIMILARITY_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        from ..compare.metrics import compute_on_valid
        from ..compare.similarity import ssim_unchecked

        torch = require_torch()
        if not self.pending:
            return
        raws = [raw for _, raw in self.pending]
        raw = torch.cat(raws) if len(raws) > 1 else raws[0]
        if not all_finite(raw):  # say which state's maps are not finite (the first layer's, as the loop would)
            for index, state_raw in sorted(self.pending, key=lambda pair: pair[0]):
                check_finite(state_raw, self.describe(index))
        maps = _for_ssim(raw, self.pipeline).unflatten(0, (len(raws), -1))
        if self.similarity == "ssim":
            scores = ssim_unchecked(self.original, maps, self.setup, self.moments)
        else:
            scores = torch.stack([compute_on_valid(self.similarity, self.original, state, self.valid) for state in maps])
            # NaN: the state's map is constant (the original is not): no rank agreement left, 0
            scores = scores.nan_to_num(nan=0.0)
        for row, (index, _) in enumerate(self.pending):
            self.rows[index] = scores[row]
            self.kept_maps[index] = maps[row, : self.keep].clone()
        self.pending.clear()

    def ssim(self) -> torch.Tensor:
        """(states, images) SSIM of the states added so far (all of them, after :meth:`flush`)."""
        return require_torch().stack(self.rows)

    def kept(self) -> torch.Tensor:
        return require_torch().stack(self.kept_maps)


def _chance(original: torch.Tensor, setup: Any, similarity: str, valid: torch.Tensor | None,
            first: int) -> torch.Tensor | None:
    """The similarity of each original map with the previous input's (NaN for the first input of
    all, which has none; see :func:`~pytest_saliency.core.stream.previous_rows`): what maps that have
    nothing to do with each other score on these inputs, the chance level. Token maps are compared
    on the positions that are not padding in both."""
    from ..compare.metrics import compute_on_valid
    from ..compare.similarity import ssim_unchecked

    other, paired = previous_rows("randomization:original", original, first)
    if similarity == "ssim":
        values = ssim_unchecked(original, other, setup)
    else:
        both = None if valid is None else valid & previous_rows("randomization:valid", valid, first)[0]
        values = compute_on_valid(similarity, original, other, both)
    return values.double().masked_fill(~paired.to(values.device), float("nan"))


def _mean_chance(values: list[torch.Tensor]) -> tuple[float | None, int]:
    """The chance level: the mean over the pairs it is defined for (None when there are none),
    and the number of those pairs."""
    if not values:
        return None, 0
    joined = require_torch().cat(values).double()
    defined = joined[~joined.isnan()]
    return (float(defined.mean()) if defined.numel() else None), int(defined.numel())


def _valid_tokens(x: torch.Tensor) -> torch.Tensor | None:
    """Which positions of token inputs are not padding (None for other inputs or without a pad token)."""
    text = current_call().text
    if current_modality().name != "text" or text is None or text.pad_token_id is None:
        return None
    return x != text.pad_token_id


def _check_original_maps(maps: torch.Tensor, pipeline: MapPipeline, method: str, constant_maps: str,
                         similarity: str = "ssim", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Original maps must be big enough for the SSIM window and must not be constant.

    Returns the indices of the images to keep (all of them unless ``constant_maps="skip"``; none
    when every map of the batch is constant, and the check fails only if no batch has any left).
    """
    from ..compare.similarity import check_ssim_window

    torch = require_torch()
    if similarity == "ssim":
        check_ssim_window(maps.shape[-2], maps.shape[-1], pipeline.ssim.win_size, method=method, preset=pipeline.name)
    flat = maps.flatten(1)
    if valid is None:
        constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 0
    else:  # token maps: constant over the tokens that are not padding (or fewer than two of them)
        mask = valid.reshape(flat.shape).to(flat.device)
        spread = flat.masked_fill(~mask, float("-inf")).amax(dim=1) - flat.masked_fill(~mask, float("inf")).amin(dim=1)
        constant = ~(spread > 0) | (mask.sum(dim=1) < 2)
    keep = torch.nonzero(~constant).flatten()
    if bool(constant.any()):
        index = torch.nonzero(constant).flatten().tolist()
        problem = (
            f"the original model's {method} maps are constant for {len(index)} of {len(constant)} image(s) "
            f"(indices {index[:10]}{' ...' if len(index) > 10 else ''}"
            f"{', over their tokens that are not padding; a text needs two or more' if valid is not None else ''}); "
            f"{SIMILARITY_LABELS[similarity]} against a constant map measures nothing."
        )
        if constant_maps == "skip":  # an empty keep: the caller skips this batch of images
            warn_user(f"{problem} Those images are left out of the check.")
            return keep
        raise SaliencyUsageError(
            f"{problem} Typical causes: a ReLU'd GradCAM that is zero everywhere for those inputs, dead ReLUs, a "
            "saturated output, or a surrogate that zeroes every feature (lime: raise n_samples). Drop those "
            "inputs, pass constant_maps='skip' to leave them out with a warning, or pick another method."
        )
    return keep


def _usable_original(batch: MapEngine, pipeline: MapPipeline, constant_maps: str,
                     similarity: str = "ssim") -> torch.Tensor | None:
    """The original model's maps of the batch, post-processed for SSIM. Images whose map is
    constant are refused (``constant_maps="error"``) or left out of the batch (``"skip"``); None
    when no image is left (the batch is skipped, and the check fails only if none has any left)."""
    name = batch.explanation.name
    original = _for_ssim(batch.original(), pipeline)
    used = _check_original_maps(original, pipeline, name, constant_maps, similarity, _valid_tokens(batch.x))
    while 0 < used.numel() < original.shape[0]:  # constant_maps="skip" dropped some images
        original = original[used]
        batch.keep_images(used)
        if not batch.model_draws:
            break
        # A model that draws random numbers itself draws them for the whole batch, and the
        # states explain the images left as one batch: the original model must explain that
        # batch too, to draw the same numbers (such a model is never replayed). Its maps may be
        # constant elsewhere now: check again.
        original = _for_ssim(batch.original(), pipeline)
        used = _check_original_maps(original, pipeline, name, constant_maps, similarity, _valid_tokens(batch.x))
    return original if used.numel() else None


def _compared(batch: MapEngine, pipeline: MapPipeline, setup: Any, similarity: str, constant_maps: str, keep: int,
              states: States, explanation: Explanation) -> tuple[torch.Tensor, _Comparison, Any, ControlScores] | None:
    """One batch of images: the original model's maps (images with a constant map refused, or left
    out: None when none is left), each randomized state's maps compared with them (the first
    ``keep`` of each kept for the report), the chance level's values on the batch, and the
    uninformative controls' numbers (:mod:`pytest_saliency.checks.controls`)."""
    with batch:
        original = _usable_original(batch, pipeline, constant_maps, similarity)
        if original is None:
            return None
        if carry_only():  # run for the next batch's chance level only: no state is explained
            _chance(original, setup, similarity, _valid_tokens(batch.x), batch.offset)
            return None
        valid = _valid_tokens(batch.x)
        comparison = _Comparison(original, pipeline, setup, len(states), max(0, min(keep, original.shape[0])),
                                 lambda index: explanation.describe(states.names[index]), similarity, valid)
        for index, raw in batch.state_maps():
            comparison.add(index, raw)
        comparison.flush()
    controls = control_scores(original, len(states), pipeline, setup, similarity, valid, explanation.seed,
                              batch.offset, _repeated(batch, explanation, pipeline))
    return original, comparison, _chance(original, setup, similarity, valid, batch.offset), controls


def _repeated(batch: MapEngine, explanation: Explanation, pipeline: MapPipeline) -> torch.Tensor | None:
    """The original model's maps of the batch from a second run of the method with another seed
    (the method's own noise floor, :mod:`pytest_saliency.checks.controls`); None for a method of
    the package that draws no random numbers, whose second run would repeat the first exactly."""
    raw = second_run(explanation, batch.x, batch.target, batch.ids)
    return None if raw is None else _for_ssim(raw, pipeline)


class _Collected:
    """What a check keeps of its image batches: the SSIM columns, the maps for the report, the
    chance level's values, the controls' numbers."""

    def __init__(self) -> None:
        self.columns: list[Tensor] = []
        self.originals: list[Tensor] = []
        self.kept: list[Tensor] = []
        self.chance: list[Tensor] = []
        self.floor: list[ControlScores] = []
        self.explained, self.stopped = 0, ""

    @property
    def shown(self) -> int:
        return sum(o.shape[0] for o in self.originals)

    def add(self, original: Tensor, comparison: _Comparison, unrelated: Tensor | None,
            controls: ControlScores) -> None:
        self.chance.extend(() if unrelated is None else (unrelated,))
        self.columns.append(comparison.ssim())
        self.originals.append(original[:comparison.keep].clone())
        self.kept.append(comparison.kept())
        self.floor.append(controls)
        self.explained += original.shape[0]

    def random_scores(self, clip_negative: bool) -> list[float]:
        """The random control's S^i per image (negative similarities clipped as the method's are)."""
        similarity = require_torch().cat([c.random for c in self.floor], dim=1)
        return sensitivity_of(similarity, clip_negative).mean(dim=0).tolist()

    def repeat_scores(self, clip_negative: bool) -> list[float]:
        """Each image's S between two runs of the method on the unchanged model (empty when the
        method is deterministic)."""
        runs = [c.repeat for c in self.floor if c.repeat is not None]
        if not runs:
            return []
        return sensitivity_of(require_torch().cat(runs), clip_negative).tolist()

    def entropies(self, of: str) -> list[float]:
        """Each image's original-map entropy: the method's (``"method"``) or the noise control's."""
        return require_torch().cat([getattr(c, f"entropy_{of}") for c in self.floor]).tolist()


def _no_image_left(method: str, images: int) -> SaliencyUsageError:
    return SaliencyUsageError(
        f"the original model's {method} maps are constant for every one of the {images} images "
        "(constant_maps='skip' left none); SSIM against a constant map measures nothing. Typical causes: a "
        "ReLU'd GradCAM that is zero everywhere, dead ReLUs, a saturated output, or a surrogate that zeroes "
        "every feature (lime: raise n_samples). Pick other inputs or another method."
    )


def _explain_only(model: torch.nn.Module) -> None:
    """Explaining never needs parameter gradients, and every state runs in eval mode: both are set
    once for the whole check (:func:`preserved` restores the flags) instead of once per state."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


IMAGE_MODES = ("all", "auto")
IMAGES_HINT = "images is 'all' (every input), 'auto' (stop when decisive) or the most images to use, e.g. 32."


@dataclass(frozen=True)
class _Settings:
    """The check's arguments as validation normalizes them (see :func:`_settings`)."""

    mode: str
    order: str
    constant_maps: str
    images: str | int
    image_batch: int
    depth: int
    seed: int
    batch_size: int | None
    keep_maps: int
    early_exit: bool
    ssim_threshold: float
    sensitivity_threshold: float
    require_every_layer: bool
    clip_negative_ssim: bool
    confidence: float
    n_bootstrap: int
    adaptive_confidence: float

    @property
    def adaptive(self) -> bool:
        """``images="auto"``: stop as soon as the verdict is decisive."""
        return self.images == "auto"

    @property
    def batched(self) -> bool:
        """The images are explained ``image_batch`` at a time, with a decision after each batch."""
        return self.adaptive or self.early_exit

    def ordered(self, layers: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
        """The layers (in execution order) in the order they are randomized: cascading top-down
        (Adebayo's order) starts at the output."""
        return layers if self.mode == "independent" or self.order == "bottom_up" else layers[::-1]

    def decision(self, columns: list[torch.Tensor], names: list[str]) -> str | None:
        """:func:`_decision` on the SSIM columns of the image batches explained so far."""
        return _decision(columns, names, ssim_threshold=self.ssim_threshold,
                         sensitivity_threshold=self.sensitivity_threshold,
                         require_every_layer=self.require_every_layer, clip_negative=self.clip_negative_ssim,
                         confidence=self.adaptive_confidence, seed=self.seed)

    def statistics(self, ssim: torch.Tensor, names: list[str]) -> SensitivityStatistics:
        """Per-layer and dataset-level sensitivity of the (layers, images) SSIM."""
        return sensitivity_statistics(
            ssim, names, ssim_threshold=self.ssim_threshold, sensitivity_threshold=self.sensitivity_threshold,
            clip_negative=self.clip_negative_ssim, confidence=self.confidence, n_bootstrap=self.n_bootstrap,
            seed=self.seed,
        )


def _settings(model: torch.nn.Module, inputs: torch.Tensor, *, mode: str, order: str, constant_maps: str,
              images: str | int, image_batch: int, depth: int, seed: int, batch_size: int | None, keep_maps: int,
              early_exit: bool, require_every_layer: bool, reuse_activations: bool, clip_negative_ssim: bool,
              ssim_threshold: float, sensitivity_threshold: float, confidence: float, n_bootstrap: int,
              adaptive_confidence: float, progress: Progress | None, randomization: str) -> _Settings:
    """Every argument of :func:`layer_randomization` but the method's checked, with an error that
    says what to pass for each bad one."""
    check_model(model)
    check_inputs(inputs, model)
    mode = check_choice(mode, "mode", MODES)
    order = check_choice(order, "order", ORDERS)
    constant_maps = check_choice(constant_maps, "constant_maps", ("error", "skip"))
    if isinstance(images, str):
        images = check_choice(images, "images", IMAGE_MODES, IMAGES_HINT)
    else:
        images = check_count(images, "images", hint=IMAGES_HINT)
    image_batch = check_count(image_batch, "image_batch", hint="It is the number of images explained between decisions.")
    depth = check_count(depth, "depth", hint="depth=1 means the model's children (for layers='block').")
    seed = check_seed(seed)
    check_flag(clip_negative_ssim, "clip_negative_ssim")
    check_sensitivity_options(
        ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold, clip_negative=clip_negative_ssim,
        confidence=confidence, n_bootstrap=n_bootstrap,
    )
    check_number(adaptive_confidence, "adaptive_confidence", low=0.0, high=1.0, low_open=True, high_open=True,
                 hint="It is the confidence at which images='auto' or early_exit stop, e.g. 0.99.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the images one explainer call sees; None sizes the chunks from memory.")
    keep_maps = check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    for flag, flag_name in ((require_every_layer, "require_every_layer"), (early_exit, "early_exit"),
                            (reuse_activations, "reuse_activations")):
        check_flag(flag, flag_name)
    if progress is not None and not callable(progress):
        raise SaliencyUsageError(
            f"progress must be None or a callable progress(done, total, label), got {type(progress).__name__}.")
    check_strategy(randomization)
    return _Settings(mode, order, constant_maps, images, image_batch, depth, seed, batch_size, keep_maps, early_exit,
                     ssim_threshold, sensitivity_threshold, require_every_layer, clip_negative_ssim, confidence,
                     n_bootstrap, adaptive_confidence)


def _decision(ssim_columns: list[Any], names: list[str], *, ssim_threshold: float, sensitivity_threshold: float,
              require_every_layer: bool, clip_negative: bool, confidence: float, seed: int) -> str | None:
    """"pass" / "fail" when the evidence so far is decisive at ``confidence``, else None.

    Decisive means the bootstrap interval of S^I lies entirely on one side of its threshold
    (and, with ``require_every_layer``, every layer's mean SSIM interval below the SSIM
    threshold, or one layer's entirely at or above it).
    """
    from ..compare.statistics import bootstrap_interval

    torch = require_torch()
    ssim = torch.cat(ssim_columns, dim=1).double().cpu()
    stats = sensitivity_statistics(
        ssim, names, ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold,
        clip_negative=clip_negative, confidence=confidence, n_bootstrap=1000, seed=seed,
    )
    if stats.ci_high < sensitivity_threshold:
        return "fail"
    layer_verdicts = []
    if require_every_layer:
        for index, row in enumerate(ssim):
            low, high = bootstrap_interval(row, confidence, 1000, seed + index)
            if low >= ssim_threshold:
                return "fail"
            layer_verdicts.append(high < ssim_threshold)
    if stats.ci_low >= sensitivity_threshold and all(layer_verdicts):
        return "pass"
    return None


def _prepare_batch(arguments: dict[str, Any], seen: int) -> dict[str, Any] | None:
    """A batch of a stream runs with every image it has, the cap on images counted over the
    stream; ``images="auto"`` and ``early_exit`` decide on all the images so far, after the batch
    that brings in the next ``image_batch`` of them (:func:`_stop`)."""
    images = arguments["images"]
    overrides: dict[str, Any] = {"early_exit": False}
    if images == "auto":
        overrides["images"] = "all"
    elif isinstance(images, int) and not isinstance(images, bool):
        left = images - seen
        if left <= 0:
            return None
        overrides["images"] = left
    return overrides


def _decides(arguments: dict[str, Any]) -> bool:
    """Whether :func:`_stop` may end a stream early: ``images="auto"`` or ``early_exit``."""
    return arguments["images"] == "auto" or bool(arguments["early_exit"])


def _decision_step(arguments: dict[str, Any]) -> int | None:
    """Shards of ``image_batch`` images when the check decides as it goes: a tensor split across
    ranks is then decided after the same images as in one process."""
    step = arguments["image_batch"]
    valid = isinstance(step, int) and not isinstance(step, bool) and step > 0  # else the check refuses it
    return step if valid and _decides(arguments) else None


def _stop(parts: list[RandomizationResult], arguments: dict[str, Any]) -> str:
    """Why ``images="auto"`` or ``early_exit`` stops a stream after the batches so far ("" to go on)."""
    torch = require_torch()
    adaptive = arguments["images"] == "auto"
    if not adaptive and not arguments["early_exit"]:
        return ""
    # as over a tensor: a decision each time image_batch more images are in, never on fewer
    step, seen = arguments["image_batch"], sum(part.n_images for part in parts)
    if seen < step or seen // step == (seen - parts[-1].n_images) // step:
        return ""
    columns = [torch.tensor(part.ssim, dtype=torch.float64) for part in parts]
    verdict = _decision(columns, parts[0].layers, ssim_threshold=arguments["ssim_threshold"],
                        sensitivity_threshold=arguments["sensitivity_threshold"],
                        require_every_layer=arguments["require_every_layer"],
                        clip_negative=arguments["clip_negative_ssim"],
                        confidence=arguments["adaptive_confidence"], seed=arguments["seed"])
    if verdict == "fail" or (verdict == "pass" and adaptive):
        total = tensor_size(arguments["inputs"])  # a tensor split into shards: as over the tensor
        of = "" if total is None else f" of {total}"
        return f"decisive {verdict} after {sum(part.n_images for part in parts)}{of} {parts[0].unit}"
    return ""


def combine_randomization(parts: list[R], arguments: dict[str, Any], stopped: str) -> R:
    """One result of a stream's batches (of any randomization result class): every image's SSIM,
    the statistics on all of them, the controls' numbers of every image; the first batch's maps."""
    torch = require_torch()
    same_across_batches(parts, "layers", "layers")
    first = parts[0]
    ssim = [[value for part in parts for value in part.ssim[layer]] for layer in range(len(first.layers))]
    stats = sensitivity_statistics(
        torch.tensor(ssim, dtype=torch.float64), first.layers, ssim_threshold=arguments["ssim_threshold"],
        sensitivity_threshold=arguments["sensitivity_threshold"], clip_negative=arguments["clip_negative_ssim"],
        confidence=arguments["confidence"], n_bootstrap=arguments["n_bootstrap"], seed=first.seed)
    sizes = [part.n_images for part in parts]
    available = sum(p.images_available for p in parts)
    total = tensor_size(arguments["inputs"])
    if stopped and total is not None:  # a tensor's shards: all its inputs were there
        available = total
    reproduce = first.reproduce  # each batch of images="auto" ran with images="all" (_prepare_batch)
    if arguments.get("images") == "auto" and not arguments.get("reproduce"):
        reproduce = _reproduce_line(first.method, first.mode, first.pipeline.name, first.seed, "auto")
    return replace(
        first, ssim=ssim, stats=stats, n_images=sum(sizes), images_available=available, reproduce=reproduce,
        seconds=sum(part.seconds for part in parts), stopped_early=stopped,
        reused_activations=all(part.reused_activations for part in parts),
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
        chance=weighted_mean([part.chance for part in parts], [part.chance_pairs for part in parts]),
        random_control_scores=[v for part in parts for v in part.random_control_scores],
        entropy_method=[v for part in parts for v in part.entropy_method],
        entropy_random=[v for part in parts for v in part.entropy_random],
        repeat_scores=[v for part in parts for v in part.repeat_scores],
        chance_pairs=sum(part.chance_pairs for part in parts),
    )


def _reproduce_line(method: str, mode: str, preset: str, seed: int, images: str | int) -> str:
    """The call that reproduces a randomization result (its ``reproduce`` when none is given)."""
    return (f"pytest_saliency.layer_randomization(model, inputs, method={method!r}, mode={mode!r}, "
            f"preset={preset!r}, seed={seed}, images={images!r})")


def _slim(part: RandomizationResult) -> RandomizationResult:
    return replace(part, original_maps=None, randomized_maps=None, figure_context={"modality": part.modality})


@rng_isolated
@streams(StreamSpec(combine_randomization, _slim, _prepare_batch, _stop, decides=_decides, carries=True,
                     shard_examples=_decision_step, caps=capped_images))
@passes_model_call
def layer_randomization(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    mode: str = "independent",
    order: str = "top_down",
    layers: str | Sequence[str] = "leaf",
    depth: int = 1,
    randomization: str = "reinit",
    preset: str | MapPipeline | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    similarity: str | None = None,
    ssim_threshold: float = SSIM_THRESHOLD,
    sensitivity_threshold: float = SENSITIVITY_THRESHOLD,
    require_every_layer: bool = False,
    clip_negative_ssim: bool = True,
    confidence: float = CONFIDENCE,
    n_bootstrap: int = N_BOOTSTRAP,
    batch_size: int | None = None,
    images: str | int = "all",
    image_batch: int = 16,
    adaptive_confidence: float = 0.99,
    early_exit: bool = False,
    cache: MapCache | None = None,
    keep_maps: int = 4,
    constant_maps: str = "error",
    progress: Progress | None = None,
    reproduce: str = "",
    reuse_activations: bool = True,
    require_above_controls: bool = False,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> RandomizationResult:
    """Run IPR (``mode="independent"``) or CPR (``mode="cascading"``) and return the full result.

    The verdict (``result.passed``) is Definition 3: S^I >= ``sensitivity_threshold``; with
    ``require_every_layer=True`` every layer's mean SSIM must also be < ``ssim_threshold``.
    The model is bit-identical afterwards, whatever happens, and no global RNG state changes.
    See :mod:`pytest_saliency.compare.statistics` for how the paper's ambiguities are settled and
    :mod:`pytest_saliency.model.randomize` for what each ``randomization`` strategy does.

    Time to verdict:
        ``images="all"`` (default) uses every input. ``images="auto"`` explains ``image_batch``
        images at a time and stops as soon as the ``adaptive_confidence`` (99%) bootstrap
        interval of S^I lies entirely on one side of its threshold (see :func:`_decision`);
        an int caps the number of images used. ``early_exit=True`` stops at the first decisive
        failure but needs all images to pass (a gate that fails fast). The stricter
        confidence for stopping compensates for looking at the data repeatedly.
    Memory: ``batch_size`` bounds how many images one explainer call sees; without it, the
        method's ``memory_budget`` option (default ``"auto"``) sizes the chunks.
    Sharing: a :class:`pytest_saliency.maps.cache.MapCache` passed as ``cache`` lets several checks
        reuse the original model's attributions (named methods only).
    ``similarity``: how each state's maps are compared with the original ones: ``"ssim"``,
        ``"spearman"`` or ``"pearson"``; ``None`` is the modality's default (SSIM for images and
        series, along the series for the latter; Spearman for tabular and text maps, see
        :mod:`pytest_saliency.maps.modality`). ``ssim_threshold`` is the threshold of that
        similarity, and the result reports its chance level on these inputs.
    ``constant_maps``: an image whose original map is constant cannot be compared by SSIM;
        ``"error"`` (default) refuses the check, ``"skip"`` leaves such images out with a warning.
    ``reuse_activations``: for ``saliency``, ``input_x_gradient``, ``integrated_gradients``,
        ``smoothgrad`` and ``occlusion``, recompute only the part of the forward pass that the
        randomized layer can change (see :mod:`pytest_saliency.engine.replay` and
        :mod:`pytest_saliency.engine.stacks`); ``False`` runs every state as a full captum call.
        ``result.reused_activations`` says whether it ran.
    Noise floor: every result also reports the S^I of two uninformative controls on the same
        inputs, an edge detector (0 by construction) and i.i.d. noise maps, and how structured the
        method's maps are against noise (:mod:`pytest_saliency.checks.controls`);
        ``require_above_controls=True`` also fails a method that is not clearly above them.
    """
    torch = require_torch()
    from ..compare.similarity import ssim_setup

    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    check_flag(require_above_controls, "require_above_controls")
    s = _settings(model, inputs, mode=mode, order=order, constant_maps=constant_maps, images=images,
                  image_batch=image_batch, depth=depth, seed=seed, batch_size=batch_size, keep_maps=keep_maps,
                  early_exit=early_exit, require_every_layer=require_every_layer, reuse_activations=reuse_activations,
                  clip_negative_ssim=clip_negative_ssim, ssim_threshold=ssim_threshold,
                  sensitivity_threshold=sensitivity_threshold, confidence=confidence, n_bootstrap=n_bootstrap,
                  adaptive_confidence=adaptive_confidence, progress=progress, randomization=randomization)
    pipeline = get_pipeline(preset)
    setup = ssim_setup(**pipeline.ssim.kwargs())
    similarity = check_choice(default_similarity(similarity), "similarity", SIMILARITY_LABELS)
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    if isinstance(s.images, int):
        inputs = inputs[:s.images]
    explanation = Explanation(model, resolved, name, options, s.seed, s.batch_size, cache)
    with preserved(model), carried_rows():  # the chance level pairs inputs across the batches
        _explain_only(model)
        # The engine, and the check's traced forward pass: the execution order and the predictions.
        # Leaving the block drops the traced pass's recording (an autograd graph) if no batch took
        # it, e.g. when the target or the layers are refused below.
        with engine_for(model, inputs, explanation, reuse_activations=reuse_activations, batched=s.batched,
                        step=s.image_batch if s.batched else inputs.shape[0],
                        memory_budget=method_kwargs.get("memory_budget", "auto")) as engine:
            fixed_target = resolve_target(model, inputs, target, s.batch_size, outputs=engine.trace.output)
            # 1. The layers to randomize, in the order they are randomized.
            selected = select_layers(model, inputs, layers, depth=s.depth, trace=engine.trace)
            states = States(s.ordered(selected), s.mode, randomization, s.seed)
            got = _Collected()
            for batch in engine.batches(states, fixed_target, progress):
                # 2. and 3.: the original maps, and each state's compared with them (and the controls).
                done = _compared(batch, pipeline, setup, similarity, s.constant_maps, s.keep_maps - got.shown,
                                 states, explanation)
                if done is None:
                    continue
                got.add(*done)
                # images="auto" and early_exit: stop once the evidence so far is decisive.
                verdict = s.decision(got.columns, states.names) if s.batched and not batch.last else None
                if verdict == "fail" or (verdict == "pass" and s.adaptive):
                    got.stopped = f"decisive {verdict} after {got.explained} of {inputs.shape[0]} images"
                    break
            if progress is not None:
                progress(len(states), len(states), "")
    if carry_only():
        raise CarryTaken
    if not got.columns:
        raise _no_image_left(name, inputs.shape[0])
    # 4. The statistics over layers and images, and with them the verdict (result.passed).
    ssim = torch.cat(got.columns, dim=1)
    chance_level, chance_pairs = _mean_chance(got.chance)
    stats = s.statistics(ssim, states.names)
    reproduce = reproduce or _reproduce_line(name, s.mode, pipeline.name, s.seed, s.images)
    return RandomizationResult(
        mode=s.mode, method=name, method_options=options, pipeline=pipeline, layers=states.names,
        ssim=ssim.double().cpu().tolist(), stats=stats, n_images=got.explained, device=str(inputs.device),
        seed=s.seed, randomization=randomization, order=s.order if s.mode == "cascading" else "n/a",
        require_every_layer=require_every_layer, seconds=time.perf_counter() - start, reproduce=reproduce,
        images_available=int(inputs.shape[0]), stopped_early=got.stopped, reused_activations=engine.reused,
        original_maps=torch.cat(got.originals).detach().cpu(),
        randomized_maps=torch.cat(got.kept, dim=1).detach().cpu(),
        similarity=similarity, modality=current_modality().name,
        # the kept maps are the first images' unless constant_maps="skip" left some out
        figure_context=figure_context(inputs, got.shown) if s.constant_maps == "error"
        else {"modality": current_modality().name},
        chance=chance_level, chance_pairs=chance_pairs, require_above_controls=require_above_controls,
        random_control_scores=got.random_scores(s.clip_negative_ssim), entropy_method=got.entropies("method"),
        entropy_random=got.entropies("random"), repeat_scores=got.repeat_scores(s.clip_negative_ssim),
    )


__all__ = ["MODES", "ORDERS", "STRATEGIES", "RandomizationResult", "combine_randomization", "layer_randomization",
           "N_BOOTSTRAP"]
