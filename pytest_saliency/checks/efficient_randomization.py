"""Efficient MPRT (eMPRT, Hedström et al., "Sanity Checks Revisited"): the fast randomization gate.

Model parameter randomization asks whether an explanation depends on what the model learned.
The full per-layer audit (:func:`pytest_saliency.layer_randomization`, IPR/CPR) explains L + 1
model states; eMPRT explains two, the trained model and the **fully randomized** one (every
selected layer randomized at once), and asks whether the explanations became more complex:
once the learned structure is gone, a faithful explanation should be closer to noise.

Per input, with H the entropy of the map's histogram (:mod:`pytest_saliency.compare.complexity`:
``bins`` equal-width bins over the map's own range, natural log):

    rise = (H_randomized - H_original) / H_original

The verdict: pass when the lower bound of the ``confidence`` (90%) bootstrap interval of the
mean rise is above ``rise_threshold`` (default 0.01 rather than 0: with 0, an explainer of pure
noise passes 4% to 15% of runs by chance; see :data:`RISE_THRESHOLD` for the measurements).

How the states and maps are made:

* the fully randomized model is :func:`pytest_saliency.model.randomize.randomized` over every
  selected layer, with the same ``randomization=`` strategies and per-layer seeds as
  ``layer_randomization`` (each layer's draw depends on the seed and its name only), so it is
  the last state of a cascading run and does not depend on an order;
* the maps are post-processed by the preset's pipeline first (sign, channel reduction,
  normalization). Entropy does not change under a positive affine rescaling, so a min-max or
  max-abs normalization does not matter; the default preset's clip at the 99th percentile does
  (it puts the top 1% of values into the last bin), and so does ``|a|`` (it folds the signs);
* the original maps come from the session's map cache when ``layer_randomization`` computed
  them already.

Controls, on the same inputs, stated in every report:

* a model-independent map (an edge detector, ``|x|``) is the same in both states: its rise is
  exactly 0, so it fails;
* a map of i.i.d. noise is already near the largest entropy the bins allow, so its rise is
  about 0 (Binder et al.'s uninformative maps do not pass this check as they can pass a
  similarity check); the report gives the entropy of such noise maps after the same pipeline,
  next to the original maps' entropy.

A map whose original entropy is 0 (a constant map) gives no ratio: ``constant_maps="error"``
refuses the check, ``"skip"`` leaves those inputs out with a warning.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..compare.complexity import BIN_RULES, N_BINS, discrete_entropy, max_entropy
from ..compare.statistics import CONFIDENCE, N_BOOTSTRAP, bootstrap_interval
from ..core.forward import OutputSelector, current_call, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.rng import derive_seed, torch_seed_of
from ..core.stream import example_offset
from ..core.torchtools import require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_model,
    check_number,
    check_progress,
    check_seed,
    checked_inputs,
)
from ..engine.base import Explanation, Progress
from ..exceptions import SaliencyUsageError, raise_if_failed, warn_user
from ..maps.explainers import prepare_method
from ..maps.methods import Explainer
from ..maps.modality import current_modality, figure_context
from ..maps.options import format_options
from ..maps.postprocess import MapPipeline, get_pipeline, pipeline_maps
from ..maps.targets import resolve_target
from ..model.layers import select_layers
from ..model.randomize import check_strategy, preserved, randomized
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .streaming import StreamSpec, capped_images, streams, tensor_size, weighted_mean

if TYPE_CHECKING:
    import torch

    from ..core.stream import Inputs
    from ..maps.cache import MapCache

#: The default threshold on the lower confidence bound of the mean rise. Measured (maps of
#: i.i.d. noise in both states, the adebayo2018 preset, 90% interval, 300 runs each): with 0, such
#: a random-map explainer passes 4% to 15% of runs (N = 64 down to 4: the percentile interval is
#: narrow for small N); with 0.01, none of the 32x32 or 3x64x64 image runs at N = 4 to 64, and 6%,
#: 2%, 0.7% and 0% of 30-feature tabular runs at N = 4, 8, 16 and 64. Plain gradients of the
#: trained digits CNN rise 0.08 (lower bound 0.07, N = 64), guided backprop 0.036 (0.025).
RISE_THRESHOLD = 0.01
CHECK = "efficient_randomization"


@dataclass
class EfficientRandomizationResult:
    """The outcome of one efficient-MPRT check; ``to_dict()`` is JSON-serializable.

    Per input (the inputs used, in order): ``entropy_original``, ``entropy_randomized`` and
    ``rise``. ``skipped`` holds the indices (in the inputs) of inputs left out because their
    original map is constant (``constant_maps="skip"``).
    """

    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    layers: list[str]
    entropy_original: list[float]
    entropy_randomized: list[float]
    rise: list[float]
    mean_rise: float
    ci_low: float
    ci_high: float
    confidence: float
    rise_threshold: float
    bins: int | str
    n_images: int
    device: str
    seed: int
    randomization: str
    seconds: float
    reproduce: str = ""
    images_available: int = 0
    skipped: list[int] = field(default_factory=list)
    noise_entropy: float | None = None  # mean entropy of i.i.d. Gaussian maps after the same pipeline
    max_entropy: float = math.log(N_BINS)  # ln(min(bins, values per map))
    modality: str = "image"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)
    original_maps: torch.Tensor | None = field(default=None, repr=False)  # the first inputs' maps, for reports
    randomized_maps: torch.Tensor | None = field(default=None, repr=False)
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def check(self) -> str:
        return CHECK

    @property
    def unit(self) -> str:
        return "images" if self.modality == "image" else "inputs"

    @property
    def passed(self) -> bool:
        return self.ci_low > self.rise_threshold

    @property
    def mean_entropy_original(self) -> float:
        return statistics.fmean(self.entropy_original)

    @property
    def mean_entropy_randomized(self) -> float:
        return statistics.fmean(self.entropy_randomized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check, "passed": self.passed, "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(), "layers": self.layers, "randomization": self.randomization,
            "bins": self.bins, "entropy_original": self.entropy_original,
            "entropy_randomized": self.entropy_randomized, "rise": self.rise, "mean_rise": self.mean_rise,
            "mean_rise_ci": [self.ci_low, self.ci_high], "confidence": self.confidence,
            "rise_threshold": self.rise_threshold, "mean_entropy_original": self.mean_entropy_original,
            "mean_entropy_randomized": self.mean_entropy_randomized, "noise_entropy": self.noise_entropy,
            "max_entropy": self.max_entropy, "n_images": self.n_images, "images_available": self.images_available,
            "skipped": self.skipped, "device": self.device, "seed": self.seed, "seconds": self.seconds,
            "reproduce": self.reproduce, "modality": self.modality, "model_writes": list(self.model_writes),
        }

    def numbers(self) -> dict[str, Number]:
        """The mean rise against its threshold, the entropies, the run's size and settings."""
        return {
            "mean_rise": self.mean_rise, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "rise_threshold": self.rise_threshold, "entropy_original": self.mean_entropy_original,
            "entropy_randomized": self.mean_entropy_randomized, "noise_entropy": self.noise_entropy,
            "layers": len(self.layers), "n_images": self.n_images, "seed": self.seed, "method": self.method,
            "preset": self.pipeline.name,
        }

    def figures(self) -> list[Figure]:
        """The first inputs' maps from the original and the fully randomized model."""
        from ..reporting.figures import model_maps_figures

        if self.original_maps is None or self.randomized_maps is None or self.original_maps.shape[0] == 0:
            return []
        context = dict(self.figure_context)
        return model_maps_figures(
            maps={"original model": self.original_maps, "randomized model": self.randomized_maps},
            inputs=context.pop("inputs", None), n_inputs=self.n_images, method=self.method,
            preset=self.pipeline.name, what="model states", name="efficient_randomization_maps",
            modality=context.pop("modality", self.modality), feature_names=context.get("feature_names"),
            tokens=context.get("tokens"),
        )

    def summary(self) -> str:
        """One line: the mean rise with its interval against the threshold, the entropies, N."""
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: entropy rise = "
            f"{format_score(self.mean_rise)} ({self.confidence:.0%} CI {format_score(self.ci_low)} \u2013 "
            f"{format_score(self.ci_high)}) vs lower bound > {format_threshold(self.rise_threshold)}; "
            f"H {self.mean_entropy_original:.3f} -> {self.mean_entropy_randomized:.3f} nats "
            f"(noise maps {_nats(self.noise_entropy)}); N = {self.n_images}"
        )

    def report(self) -> str:
        """The full human-readable account used in failure messages."""
        rise = sorted(self.rise)
        above = sum(value > self.rise_threshold for value in rise) / len(rise)
        bins = f"{self.bins} equal-width bins" if isinstance(self.bins, int) else f"bins by the {self.bins!r} rule"
        lines = [
            f"  check:       {self.check} (eMPRT: the original model vs all {len(self.layers)} layers randomized at "
            f"once, randomization={self.randomization}; 2 explanation passes, IPR needs {len(self.layers) + 1})",
            f"  method:      {self.method}{format_options(self.method_options)}   target: original model's prediction",
            f"  preset:      {self.pipeline.describe()}",
            f"  complexity:  entropy of each {self.modality} map's histogram, {bins} over the map's own range, "
            f"in nats (at most {self.max_entropy:.3f})",
            f"  entropy:     original maps {self.mean_entropy_original:.4f}, randomized model's "
            f"{self.mean_entropy_randomized:.4f} (means over {self.unit})",
            f"  controls:    i.i.d. noise maps after the same pipeline have entropy {_nats(self.noise_entropy)} "
            "(a random-map explainer rises about 0); a model-independent map (edge detector, |x|) rises exactly 0",
            f"  threshold:   pass if the {self.confidence:.0%} bootstrap CI's lower bound of the mean rise "
            f"(H_rand - H_orig) / H_orig is > {self.rise_threshold:g}",
            f"  rise:        mean {format_score(self.mean_rise)} ({self.confidence:.0%} CI {format_score(self.ci_low)} "
            f".. {format_score(self.ci_high)})  -> {'PASS' if self.passed else 'FAIL'}; per input min "
            f"{rise[0]:.4f}, median {statistics.median(rise):.4f}, max {rise[-1]:.4f}; "
            f"{above:.1%} of {self.unit} above {self.rise_threshold:g}",
            f"  {self.unit}: {self.n_images}" + (f" ({len(self.skipped)} left out: constant original map, "
                                                  f"indices {self.skipped[:10]})" if self.skipped else "")
            + f"   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s",
        ]
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        headline = (
            f"Saliency check failed: {self.method} maps do NOT become more complex when the model is randomized "
            f"(mean entropy rise {format_score(self.mean_rise)}, {self.confidence:.0%} CI lower bound "
            f"{format_score(self.ci_low)} <= {format_threshold(self.rise_threshold)})"
        )
        hint = (
            "  what next:   maps that stay as simple when the model's parameters are random are not explaining "
            "what the model learned (a model-independent map rises exactly 0). Try another method, check that the "
            "model is the trained one, and run the per-layer audit (layer_randomization) to see which layers the "
            "maps ignore."
        )
        return "\n".join([headline, self.report(), hint])


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class _Settings:
    """The check's arguments as validation normalizes them."""

    bins: int | str
    rise_threshold: float
    confidence: float
    n_bootstrap: int
    seed: int
    batch_size: int | None
    images: str | int
    keep_maps: int
    constant_maps: str
    depth: int


def _settings(*, bins: Any, rise_threshold: Any, confidence: Any, n_bootstrap: Any, seed: Any, batch_size: Any,
              images: Any, keep_maps: Any, constant_maps: Any, depth: Any, randomization: Any,
              progress: Any) -> _Settings:
    """Every option but the model, inputs and method, checked before any work is done."""
    if isinstance(bins, str):
        bins = check_choice(bins, "bins", BIN_RULES, f"Or pass a number of bins >= 2, e.g. bins={N_BINS}.")
    else:
        bins = check_count(bins, "bins", minimum=2, hint=f"It is the number of equal-width bins of each map's "
                           f"histogram (default {N_BINS}), or a rule: {', '.join(BIN_RULES)}.")
    rise_threshold = check_number(rise_threshold, "rise_threshold", low=-1.0, hint=(
        "The rise (H_rand - H_orig) / H_orig is at least -1; the check passes when the lower confidence bound of "
        f"its mean is above the threshold (default {RISE_THRESHOLD:g})."))
    confidence = check_number(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True,
                              hint="E.g. confidence=0.9 for a 90% interval.")
    n_bootstrap = check_count(n_bootstrap, "n_bootstrap", hint="E.g. n_bootstrap=2000 bootstrap resamples.")
    if isinstance(images, str):
        images = check_choice(images, "images", ("all",), "Or pass the most inputs to use, e.g. images=32.")
    else:
        images = check_count(images, "images", hint="It is the most inputs to use, or 'all'.")
    check_strategy(randomization)
    check_progress(progress)
    return _Settings(
        bins=bins, rise_threshold=rise_threshold, confidence=confidence, n_bootstrap=n_bootstrap,
        seed=check_seed(seed), batch_size=check_count(batch_size, "batch_size", allow_none=True,
                                                      hint="It bounds the inputs one explainer call sees."),
        images=images, keep_maps=check_count(keep_maps, "keep_maps", minimum=0,
                                             hint="It is the number of maps kept for the report."),
        constant_maps=check_choice(constant_maps, "constant_maps", ("error", "skip")),
        depth=check_count(depth, "depth", hint="depth=1 means the model's children (for layers='block')."),
    )


def _maps(raw: torch.Tensor, pipeline: MapPipeline) -> torch.Tensor:
    """Raw attributions post-processed by the preset (float32 or float64, as the histogram bins them)."""
    torch = require_torch()
    maps = pipeline_maps(raw, pipeline)
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def _valid_tokens(x: torch.Tensor) -> torch.Tensor | None:
    """Which positions of token inputs are not padding (None for other inputs or without a pad token)."""
    text = current_call().text
    if current_modality().name != "text" or text is None or text.pad_token_id is None:
        return None
    return x != text.pad_token_id


def _noise_entropy(raw: torch.Tensor, pipeline: MapPipeline, bins: int | str, valid: torch.Tensor | None,
                   seed: int) -> float:
    """The mean entropy of i.i.d. N(0, 1) raw maps (shaped like the inputs' attributions) after the
    same pipeline: where a random-map explainer's maps sit (the report's noise level). Each input's
    noise comes from its own seed (its index in the stream), so any batching gives the same mean."""
    torch = require_torch()
    start = example_offset()
    rows = [torch.randn(raw.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(
        torch_seed_of(derive_seed(seed, "efficient_randomization_noise", start + row)))) for row in range(raw.shape[0])]
    entropy = discrete_entropy(_maps(torch.stack(rows), pipeline), bins, valid=None if valid is None else valid.cpu())
    return float(entropy.mean())


def _explain_only(model: torch.nn.Module) -> None:
    """Eval mode and no parameter gradients for the whole check (:func:`preserved` restores both)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _two_states(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation, target: Any,
                layers: str | Sequence[str], s: _Settings, randomization: str,
                progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The raw maps of the original model and of the model with every selected layer randomized
    at once, and the layers' names."""
    with preserved(model):
        _explain_only(model)
        fixed_target = resolve_target(model, inputs, target, s.batch_size, seed=s.seed)
        selected = select_layers(model, inputs, layers, depth=s.depth)
        ids = list(range(inputs.shape[0]))
        if progress is not None:
            progress(0, 2, "original model")
        original = explanation.original(inputs, fixed_target, ids)
        if progress is not None:
            progress(1, 2, f"all {len(selected)} layers randomized")
        with randomized(selected, randomization, s.seed):
            randomized_raw = explanation.maps(inputs, fixed_target, ids, f"all {len(selected)} selected layers")
        if progress is not None:
            progress(2, 2, "")
    return original, randomized_raw, [name for name, _ in selected]


def _kept(h_original: torch.Tensor, method: str, constant_maps: str) -> torch.Tensor:
    """The positions of the inputs whose original map is not constant (entropy > 0); the others
    are refused (``constant_maps="error"``) or left out with a warning (``"skip"``)."""
    torch = require_torch()
    constant = ~(h_original > 0)
    keep = torch.nonzero(~constant).flatten()
    if not bool(constant.any()):
        return keep
    index = (torch.nonzero(constant).flatten() + example_offset()).tolist()
    problem = (
        f"the original model's {method} maps are constant (histogram entropy 0) for {len(index)} of "
        f"{constant.numel()} input(s) (indices {index[:10]}{' ...' if len(index) > 10 else ''}), so the relative "
        "rise of their entropy, (H_rand - H_orig) / H_orig, is undefined."
    )
    if constant_maps == "skip" and keep.numel():
        warn_user(f"{problem} Those inputs are left out of the check.")
        return keep
    raise SaliencyUsageError(
        f"{problem} Typical causes: a ReLU'd GradCAM that is zero everywhere for those inputs, dead ReLUs, a "
        "saturated output, or a text with fewer than two tokens that are not padding. Drop those inputs, pass "
        "constant_maps='skip' to leave them out with a warning, or pick another method."
        + (" (constant_maps='skip' left none.)" if constant_maps == "skip" else "")
    )


def _prepare_batch(arguments: dict[str, Any], seen: int) -> dict[str, Any] | None:
    """A cap on the inputs (``images=``) is counted over the whole stream."""
    images = arguments["images"]
    if isinstance(images, int) and not isinstance(images, bool):
        left = images - seen
        return None if left <= 0 else {"images": left}
    return {}


def _available(parts: list[EfficientRandomizationResult], arguments: dict[str, Any]) -> int:
    """The inputs there were: a tensor's (split into shards across ranks) all of them, as over the
    tensor; a loader's, those read."""
    total = tensor_size(arguments["inputs"])
    return total if total is not None else sum(part.images_available for part in parts)


def _combined(parts: list[EfficientRandomizationResult], arguments: dict[str, Any],
              stopped: str) -> EfficientRandomizationResult:
    """One result of a stream's batches: every input's entropies and rise, the interval on all of them."""
    first = parts[0]
    rise = [value for part in parts for value in part.rise]
    low, high = bootstrap_interval(rise, first.confidence, arguments["n_bootstrap"], first.seed)
    sizes = [part.n_images for part in parts]
    return replace(
        first, rise=rise, mean_rise=statistics.fmean(rise), ci_low=low, ci_high=high,
        entropy_original=[v for part in parts for v in part.entropy_original],
        entropy_randomized=[v for part in parts for v in part.entropy_randomized],
        n_images=sum(sizes), images_available=_available(parts, arguments),
        skipped=[i for part in parts for i in part.skipped], seconds=sum(part.seconds for part in parts),
        noise_entropy=weighted_mean([part.noise_entropy for part in parts], sizes),
        max_entropy=max(part.max_entropy for part in parts),
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
    )


def _slim(part: EfficientRandomizationResult) -> EfficientRandomizationResult:
    return replace(part, original_maps=None, randomized_maps=None, figure_context={"modality": part.modality})


def _result_maps(original: torch.Tensor, randomized_maps: torch.Tensor, inputs: torch.Tensor, keep: torch.Tensor,
                 count: int) -> dict[str, Any]:
    """The first kept inputs' maps of both states and what their figure needs."""
    shown = keep[:count]
    context = figure_context(inputs[shown], int(shown.numel()))
    if context["modality"] == "image":
        context["inputs"] = inputs[shown].detach().float().cpu()
    return {"original_maps": original[shown].detach().cpu(), "randomized_maps": randomized_maps[shown].detach().cpu(),
            "figure_context": context}


@rng_isolated
@streams(StreamSpec(_combined, _slim, _prepare_batch, caps=capped_images))
@passes_model_call
def efficient_randomization(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    layers: str | Sequence[str] = "leaf",
    depth: int = 1,
    randomization: str = "reinit",
    preset: str | MapPipeline | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    bins: int | str = N_BINS,
    rise_threshold: float = RISE_THRESHOLD,
    confidence: float = CONFIDENCE,
    n_bootstrap: int = N_BOOTSTRAP,
    batch_size: int | None = None,
    images: str | int = "all",
    cache: MapCache | None = None,
    keep_maps: int = 4,
    constant_maps: str = "error",
    progress: Progress | None = None,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> EfficientRandomizationResult:
    """Efficient MPRT: the rise in explanation complexity from the trained to the fully randomized model.

    Passes when the lower bound of the ``confidence`` bootstrap interval of the mean per-input
    rise ``(H_rand - H_orig) / H_orig`` is above ``rise_threshold`` (module docstring). The model
    is bit-identical afterwards and no global RNG state changes.

    ``layers``, ``depth`` and ``randomization`` select and randomize the layers as in
    :func:`pytest_saliency.layer_randomization` (all of them at once here). ``bins``: the number
    of equal-width bins of each map's histogram (default 100, as Quantus), or a rule by the
    number of values per map (``"sturges"``, ``"rice"``, ``"sqrt"``; see
    :mod:`pytest_saliency.compare.complexity`). ``images``: ``"all"`` or the most inputs to use.
    ``constant_maps``: ``"error"`` refuses inputs whose original map is constant (entropy 0, no
    ratio), ``"skip"`` leaves them out with a warning. ``cache``: the session's map cache (the
    original maps are shared with ``layer_randomization``). Token maps leave padding out of the
    histograms (``Text(pad_token_id=...)``); tabular and series maps are one-row maps whose
    values are binned like an image's.
    """
    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    s = _settings(bins=bins, rise_threshold=rise_threshold, confidence=confidence, n_bootstrap=n_bootstrap,
                  seed=seed, batch_size=batch_size, images=images, keep_maps=keep_maps, constant_maps=constant_maps,
                  depth=depth, randomization=randomization, progress=progress)
    pipeline = get_pipeline(preset)
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    available = int(inputs.shape[0])
    if isinstance(s.images, int):
        inputs = inputs[:s.images]
    explanation = Explanation(model, resolved, name, options, s.seed, s.batch_size, cache)
    raw_original, raw_randomized, names = _two_states(model, inputs, explanation, target, layers, s, randomization,
                                                      progress)
    original, randomized_maps = _maps(raw_original, pipeline), _maps(raw_randomized, pipeline)
    valid = _valid_tokens(inputs)
    h_original = discrete_entropy(original, s.bins, valid=valid).cpu()
    h_randomized = discrete_entropy(randomized_maps, s.bins, valid=valid).cpu()
    keep = _kept(h_original, name, s.constant_maps)
    rise = (h_randomized[keep] - h_original[keep]) / h_original[keep]
    low, high = bootstrap_interval(rise, s.confidence, s.n_bootstrap, s.seed)
    skipped = sorted(set(range(inputs.shape[0])) - set(keep.tolist()))
    values = int(original[0].numel() if valid is None else valid.sum(dim=1).max())
    return EfficientRandomizationResult(
        method=name, method_options=options, pipeline=pipeline, layers=names,
        entropy_original=h_original[keep].tolist(), entropy_randomized=h_randomized[keep].tolist(),
        rise=rise.tolist(), mean_rise=float(rise.mean()), ci_low=low, ci_high=high, confidence=s.confidence,
        rise_threshold=s.rise_threshold, bins=s.bins, n_images=int(keep.numel()), device=str(inputs.device),
        seed=s.seed, randomization=randomization, seconds=time.perf_counter() - start,
        reproduce=reproduce or (
            f"pytest_saliency.efficient_randomization(model, inputs, method={name!r}, preset={pipeline.name!r}, "
            f"seed={s.seed}, bins={s.bins!r}, images={s.images!r})"),
        images_available=available, skipped=[i + example_offset() for i in skipped],
        noise_entropy=_noise_entropy(raw_original, pipeline, s.bins, valid, s.seed),
        max_entropy=max_entropy(s.bins, values), modality=current_modality().name,
        **_result_maps(original, randomized_maps, inputs, keep.to(original.device), s.keep_maps),
    )


@rng_isolated
@passes_model_call
def assert_efficient_randomization(
    model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency", **options: Any
) -> EfficientRandomizationResult:
    """Efficient MPRT as a gate: the maps must become more complex when the model is fully randomized.

    Passes when the lower bound of the bootstrap interval of the mean entropy rise is above
    ``rise_threshold``; options are those of :func:`efficient_randomization`. Raises
    :class:`~pytest_saliency.exceptions.SaliencyCheckFailed` with the report otherwise.
    """
    __tracebackhide__ = True
    result = efficient_randomization(model, inputs, method, **options)
    return raise_if_failed(result)


__all__ = [
    "CHECK",
    "RISE_THRESHOLD",
    "EfficientRandomizationResult",
    "assert_efficient_randomization",
    "efficient_randomization",
]
