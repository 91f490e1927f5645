"""The parameter-randomization sanity check (Adebayo et al. 2018; thresholds of Sriram & Conati).

Independent (IPR): each layer is randomized on its own while the others keep their trained
values. Cascading (CPR): layers are randomized cumulatively, from the output towards the input by
default (Adebayo's order), or from the input upwards with ``order="bottom_up"``.

Cost: one traced forward pass gives the execution order and the predicted targets; the original
model's maps are computed once; then one explanation of the whole batch per randomized state,
with the layer randomized in place and restored (no model copies). For gradient methods
(saliency, input x gradient, integrated gradients, SmoothGrad) only the part of the forward pass after the
randomized layer is recomputed (:mod:`pytest_saliency.engine.replay`); occlusion explains all
states in one captum call whose forward passes share the original model's prefix
(:mod:`pytest_saliency.engine.stacks`). SSIM runs batched on the maps' device, against
filtered moments of the original maps computed once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.jsonable import jsonable
from ..maps.options import format_options
from ..core.rng import generator_states, pass_seeded, same_generator_states
from ..core.integrity import rng_isolated
from ..core.torchtools import require_torch
from ..core.validation import (
    all_finite, check_choice, check_count, check_finite, check_flag, check_inputs, check_model, check_number,
    check_seed,
)
from ..engine.replay import GRADIENT_METHODS, GradientReplay, replayable_model, reusable, state_cuts
from ..exceptions import SaliencyUsageError, warn_user
from ..maps.explainers import (
    Explainer, MethodSpec, attribute, draws_random, memory_budget_bytes, prepare_method, resolve_target,
)
from ..engine.stacks import FORWARD_METHODS, occlusion_states, stackable
from ..model.layers import select_layers, trace_forward
from ..maps.postprocess import MapPipeline, get_pipeline, pipeline_maps
from ..model.randomize import STRATEGIES, LayerDraws, check_strategy, preserved, randomized
from ..compare.statistics import (
    CONFIDENCE, N_BOOTSTRAP, SENSITIVITY_THRESHOLD, SSIM_THRESHOLD, SensitivityStatistics, check_sensitivity_options,
    sensitivity_statistics,
)

MODES = ("independent", "cascading")
ORDERS = ("top_down", "bottom_up")
Progress = Callable[[int, int, str], None]


@dataclass
class RandomizationResult:
    """The outcome of one randomization check; ``to_dict()`` is JSON-serializable."""

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
    original_maps: Any = field(default=None, repr=False)  # (N, H, W) tensor, kept for reports
    randomized_maps: Any = field(default=None, repr=False)  # (layers, k, H, W) for the first k images
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    @property
    def check(self) -> str:
        return f"{self.mode}_layer_randomization"

    @property
    def passed(self) -> bool:
        every_layer = all(layer.sensitive for layer in self.stats.layers)
        return self.stats.dataset_sensitive and (every_layer or not self.require_every_layer)

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
        }

    def summary(self) -> str:
        """One line: the key number, the threshold and the verdict."""
        s = self.stats
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.check} [{self.method}, {self.pipeline.name}]: S^I = {s.dataset_score:.4f} "
            f"({s.confidence:.0%} CI {s.ci_low:.4f}-{s.ci_high:.4f}) vs >= {s.sensitivity_threshold:g}; "
            f"{len(s.insensitive_layers)}/{len(s.layers)} layers with mean SSIM >= {s.ssim_threshold:g}; "
            f"N = {self.n_images}"
        )

    def table(self, max_rows: int = 20) -> str:
        """Per-layer table, insensitive layers first (they are what needs attention)."""
        s = self.stats
        rows = sorted(s.layers, key=lambda layer: (layer.sensitive, -layer.mean_ssim))
        width = max([len("layer")] + [len(r.name) for r in rows])
        lines = [
            f"    {'layer':<{width}}  mean SSIM    std    min     max   sensitive images  verdict",
        ]
        for r in rows[:max_rows]:
            verdict = "sensitive" if r.sensitive else "INSENSITIVE"
            lines.append(
                f"    {r.name:<{width}}  {r.mean_ssim:9.4f} {r.std_ssim:6.3f} {r.min_ssim:6.3f} {r.max_ssim:7.3f}"
                f"   {r.fraction_sensitive:15.1%}  {verdict}"
            )
        if len(rows) > max_rows:
            lines.append(f"    ... {len(rows) - max_rows} more layers (all in result.to_dict()['layers'])")
        return "\n".join(lines)

    def report(self) -> str:
        """The full human-readable account used in failure messages."""
        s = self.stats
        boundary = "SSIM < threshold counts as sensitive; S from max(SSIM, 0)" if s.clip_negative else (
            "SSIM < threshold counts as sensitive; S from raw SSIM (may exceed 1)"
        )
        order = f", {self.order.replace('_', '-')}" if self.mode == "cascading" else ""
        lines = [
            f"  check:       {self.check} ({self.mode}{order}, randomization={self.randomization})",
            f"  method:      {self.method}{format_options(self.method_options)}   target: original model's prediction",
            f"  preset:      {self.pipeline.describe()}",
            f"  thresholds:  layer sensitive if SSIM < {s.ssim_threshold:g}; dataset sensitive if "
            f"S^I >= {s.sensitivity_threshold:g} ({boundary})",
            f"  S^I:         {s.dataset_score:.4f}  ({s.confidence:.0%} bootstrap CI {s.ci_low:.4f} .. {s.ci_high:.4f})"
            f"  vs >= {s.sensitivity_threshold:g}  -> {'sensitive' if s.dataset_sensitive else 'NOT sensitive'}",
            f"  images sensitive to every layer (Definition 2): {s.fraction_images_sensitive_to_all_layers:.1%}",
            f"  layers:      {len(s.layers)} ({len(s.insensitive_layers)} with mean SSIM >= {s.ssim_threshold:g})"
            + ("; every layer must be sensitive (require_every_layer=True)" if self.require_every_layer else ""),
            self.table(),
            f"  images: {self.n_images}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s"
            + (f"   ({self.stopped_early})" if self.stopped_early else ""),
        ]
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        s = self.stats
        if not s.dataset_sensitive:
            headline = (
                f"Saliency check failed: {self.method} maps are NOT sensitive to {self.mode} layer randomization "
                f"(S^I = {s.dataset_score:.4f} < {s.sensitivity_threshold:g})"
            )
        else:
            names = ", ".join(layer.name for layer in s.insensitive_layers[:5])
            headline = (
                f"Saliency check failed: {self.method} maps do not change when these layers are randomized: {names}"
            )
        hint = (
            "  what next:   an explanation that does not depend on the model's parameters is not explaining the "
            "model. Try another method (e.g. saliency or integrated_gradients), check that the model is the "
            "trained one, or, for a known-irrelevant layer, leave it out with layers=[...]."
        )
        return "\n".join([headline, self.report(), hint])


def _as_ssim_maps(maps: Any) -> Any:
    """SSIM runs in float32 or float64; maps of half-precision models are compared in float32."""
    torch = require_torch()
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


#: Maps of consecutive states are post-processed and compared in one batch up to this many bytes:
#: for small maps the per-call overhead of a dozen tensor operations outweighs their work.
SIMILARITY_BATCH_BYTES = 2**20


class _Comparison:
    """SSIM of each randomized state's maps against the original maps, batched over states.

    Raw attributions are added state by state (in any order) and post-processed and compared
    in groups of up to :data:`SIMILARITY_BATCH_BYTES` of maps; the filtered moments of the
    original maps are computed once. Each group is checked for NaN and inf in one reduction; a
    non-finite state is reported as ``describe(index)``. The first ``keep`` maps of every state
    are kept as copies for the report (a view would keep the whole batch alive).
    """

    def __init__(self, original: Any, pipeline: MapPipeline, setup: Any, states: int, keep: int,
                 describe: Callable[[int], str]) -> None:
        from ..compare.similarity import ssim_reference_moments

        self.original, self.pipeline, self.setup, self.keep = original, pipeline, setup, keep
        self.describe = describe
        self.moments = ssim_reference_moments(original, setup)
        self.map_bytes = original.numel() * original.element_size()
        self.rows: list[Any] = [None] * states
        self.kept_maps: list[Any] = [None] * states
        self.pending: list[tuple[int, Any]] = []

    def add(self, index: int, raw: Any) -> None:
        self.pending.append((index, raw))
        if len(self.pending) * self.map_bytes >= SIMILARITY_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        from ..compare.similarity import ssim_unchecked

        torch = require_torch()
        if not self.pending:
            return
        raws = [raw for _, raw in self.pending]
        raw = torch.cat(raws) if len(raws) > 1 else raws[0]
        if not all_finite(raw):  # say which state's maps are not finite (the first layer's, as the loop would)
            for index, state_raw in sorted(self.pending, key=lambda pair: pair[0]):
                check_finite(state_raw, self.describe(index))
        maps = _as_ssim_maps(pipeline_maps(raw, self.pipeline)).unflatten(0, (len(raws), -1))
        scores = ssim_unchecked(self.original, maps, self.setup, self.moments)
        for row, (index, _) in enumerate(self.pending):
            self.rows[index] = scores[row]
            self.kept_maps[index] = maps[row, : self.keep].clone()
        self.pending.clear()

    def ssim(self) -> Any:
        """(states, images) SSIM of the states added so far (all of them, after :meth:`flush`)."""
        return require_torch().stack(self.rows)

    def kept(self) -> Any:
        return require_torch().stack(self.kept_maps)


def _check_original_maps(maps: Any, pipeline: MapPipeline, method: str, constant_maps: str) -> Any:
    """Original maps must be big enough for the SSIM window and must not be constant.

    Returns the indices of the images to keep (all of them unless ``constant_maps="skip"``; none
    when every map of the batch is constant, and the check fails only if no batch has any left).
    """
    torch = require_torch()
    win = pipeline.ssim.win_size
    h, w = maps.shape[-2:]
    if min(h, w) < win:
        from ..compare.similarity import window_advice

        raise SaliencyUsageError(
            f"{method} maps are {h}x{w}, smaller than the SSIM window ({win}x{win}) of preset "
            f"{pipeline.name!r}. {window_advice(h, w, win)}"
        )
    flat = maps.flatten(1)
    constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 0
    keep = torch.nonzero(~constant).flatten()
    if bool(constant.any()):
        index = torch.nonzero(constant).flatten().tolist()
        problem = (
            f"the original model's {method} maps are constant for {len(index)} of {len(constant)} image(s) "
            f"(indices {index[:10]}{' ...' if len(index) > 10 else ''}); SSIM against a constant map measures nothing."
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


IMAGE_MODES = ("all", "auto")
#: Up to this fraction (1 / DRAW_SHARE) of the memory budget holds drawn layer values and their
#: originals (LayerDraws): 4 MiB on the CPU; on an idle 80 GB GPU about 150 MB, three quarters of
#: what a ResNet-50's layers need.
DRAW_SHARE = 256
#: Methods whose replay feeds the images themselves: their recording pass can be the traced pass.
TRACED_RECORDING = ("saliency", "input_x_gradient")


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


@rng_isolated
def layer_randomization(
    model: Any,
    inputs: Any,
    method: str | Explainer = "saliency",
    *,
    mode: str = "independent",
    order: str = "top_down",
    layers: str | Sequence[str] = "leaf",
    depth: int = 1,
    randomization: str = "reinit",
    preset: str | MapPipeline | None = None,
    target: Any = None,
    seed: int = 0,
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
    cache: Any = None,
    keep_maps: int = 4,
    constant_maps: str = "error",
    progress: Progress | None = None,
    reproduce: str = "",
    reuse_activations: bool = True,
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
    ``constant_maps``: an image whose original map is constant cannot be compared by SSIM;
        ``"error"`` (default) refuses the check, ``"skip"`` leaves such images out with a warning.
    ``reuse_activations``: for ``saliency``, ``input_x_gradient``, ``integrated_gradients``,
        ``smoothgrad`` and ``occlusion``, recompute only the part of the forward pass that the
        randomized layer can change (see :mod:`pytest_saliency.engine.replay` and
        :mod:`pytest_saliency.engine.stacks`); ``False`` runs every state as a full captum call.
        ``result.reused_activations`` says whether it ran.
    """
    torch = require_torch()
    from ..compare.similarity import ssim_setup

    start = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    mode = check_choice(mode, "mode", MODES)
    order = check_choice(order, "order", ORDERS)
    constant_maps = check_choice(constant_maps, "constant_maps", ("error", "skip"))
    images_hint = "images is 'all' (every input), 'auto' (stop when decisive) or the most images to use, e.g. 32."
    if isinstance(images, str):
        images = check_choice(images, "images", IMAGE_MODES, images_hint)
    else:
        images = check_count(images, "images", hint=images_hint)
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
    pipeline = get_pipeline(preset)
    setup = ssim_setup(**pipeline.ssim.kwargs())
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    if isinstance(images, int):
        inputs = inputs[:images]
    adaptive = images == "auto"
    batched = adaptive or early_exit
    step = image_batch if batched else inputs.shape[0]

    def cache_key(x: Any, t: Any, ids: list[int]) -> str | None:
        """The cache's key for the original maps of ``x``, the images at ``ids`` in the inputs. Their
        indices seed a method's random draws: part of the key unless they are 0, 1, ... (the
        images of a check over all its inputs, or of any other entry point)."""
        drawn = isinstance(resolved, MethodSpec) and draws_random(resolved, options) and ids != list(range(len(ids)))
        return cache.key(model, x, t, name, {**options, "image_ids": tuple(ids)} if drawn else options, seed,
                         batch_size)

    def maps_of(x: Any, t: Any, ids: list[int]) -> Any:
        """The original model's maps of the images at ``ids`` in the inputs, through captum (or the cache)."""
        key = None
        if cache is not None and isinstance(resolved, MethodSpec):
            key = cache_key(x, t, ids)
            raw = cache.get(key)
            if raw is not None:
                return _as_ssim_maps(pipeline_maps(raw, pipeline))
        raw = attribute(model, x, resolved, t, seed, batch_size, True, options, prepared=True, index=ids)
        if key is not None:
            cache.put(key, raw)
        return _as_ssim_maps(pipeline_maps(raw, pipeline))

    def reused_original(raw: Any, x: Any, t: Any, ids: list[int]) -> Any:
        """The original maps from a pass that runs anyway (a replay's recorded pass, whose graph
        is reused, or the state stack's column 0); an earlier check's maps from the cache take
        precedence, so checks in a session compare against identical originals."""
        check_finite(raw, f"attribution maps from {name!r}")
        if cache is not None:
            key = cache_key(x, t, ids)
            cached = cache.get(key)
            if cached is None:
                cache.put(key, raw)
            else:
                raw = cached
        return _as_ssim_maps(pipeline_maps(raw, pipeline))

    def state_maps(index: int) -> str:
        return f"attribution maps from {name!r} with {names[index]!r} randomized"

    with preserved(model):
        # Explaining never needs parameter gradients, and every state runs in eval mode: set both
        # once for the whole check (preserved() restores the flags) instead of once per state.
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # One traced forward pass of the check's inputs gives the execution order, which layers
        # run, what activation reuse may replay, and the predicted targets. For saliency and
        # input x gradient over all images at once it is also the replay's recording pass.
        might_reuse = reuse_activations and getattr(resolved, "name", None) in GRADIENT_METHODS
        whole_batch = not batched and not options.get("_image_batch") and (
            not batch_size or batch_size >= inputs.shape[0])
        first_replay = None
        model_draws = False  # (a recording that draws raises: see GradientReplay)
        if might_reuse and whole_batch and name in TRACED_RECORDING and isinstance(resolved, MethodSpec):
            first_replay = GradientReplay(model, inputs, None, name, options, seed)
            try:
                trace = first_replay.record()
            except Exception:  # noqa: BLE001 - the plain traced pass below reports a real model error
                first_replay.close()
                first_replay = None
        if first_replay is None:
            # In chunks of the memory budget's size at most: the traced chunk keeps every module's
            # output (900 ResNet-50 images at 224x224 in one chunk: over 80 GB). Seeded like every
            # explanation pass (the recording too), so the predicted targets of a model that draws
            # random numbers (dropout left on) do not depend on reuse_activations.
            with pass_seeded(seed, inputs.device):
                generators = generator_states(inputs.device)
                trace = trace_forward(model, inputs, batch_size or options.get("_image_batch"))
                # A model that draws random numbers gets the same ones in every state's full pass;
                # a replay would skip the draws of the part it reuses and shift the rest.
                model_draws = not same_generator_states(generators, generator_states(inputs.device))
        # The replay explains one chunk of images at a time (batch_size, or the memory budget's
        # chunk); in the adaptive modes only if a chunk holds a whole image_batch.
        chunk = batch_size or options.get("_image_batch")
        replay_step = min(step, chunk) if chunk and not batched else step
        reuse = might_reuse and not model_draws and reusable(model, trace, resolved, options, batch_size,
                                                       min(replay_step, inputs.shape[0]))
        if reuse:
            step = replay_step
        fixed_target = resolve_target(model, inputs, target, batch_size, outputs=trace.output)
        if first_replay is not None and not reuse:
            first_replay.close()
            first_replay = None
        selected = select_layers(model, inputs, layers, depth=depth, trace=trace)
        stages = selected if mode == "independent" or order == "bottom_up" else selected[::-1]
        names = [layer_name for layer_name, _ in stages]
        # Occlusion: every state's maps from one captum call per step, the forward passes sharing
        # the original model's prefix (forward_reuse). It holds states x images maps at once.
        stacked = (reuse_activations and not model_draws and isinstance(resolved, MethodSpec) and name in FORWARD_METHODS
                   and stackable(stages, mode) and replayable_model(model, trace))
        if stacked:  # (and captum's totals and differences: about three times the maps)
            held = 3 * (len(stages) + 1) * inputs[0].numel() * inputs.element_size()
            fits = memory_budget_bytes(method_kwargs.get("memory_budget", "auto"), inputs.device) // held
            if batched:  # the adaptive modes decide after each image_batch: keep the loop if one does not fit
                stacked = fits >= step
            else:
                step = max(1, min(step, fits))
        # Each layer's randomized values, drawn once up front for every state and image batch
        # (within a small share of the memory budget; see LayerDraws).
        draws = None if stacked else LayerDraws(
            stages, randomization, seed,
            limit_bytes=memory_budget_bytes(method_kwargs.get("memory_budget", "auto"), inputs.device) // DRAW_SHARE)
        columns, originals, kept, used_inputs = [], [], [], 0
        stopped = ""
        reused = False
        for first in range(0, inputs.shape[0], step):
            x, t = inputs[first:first + step], fixed_target[first:first + step]
            # Each image's index in the inputs: it seeds the image's random draws (noise, a uniform
            # baseline), so its maps do not depend on the image batch or the images skipped.
            ids = list(range(first, first + x.shape[0]))
            if first_replay is not None:  # recorded by the traced pass (one step over all images)
                replay, first_replay = first_replay, None
                replay.target = t.reshape(-1)
            else:
                replay = GradientReplay(model, x, t, name, options, seed, index=ids) if reuse else None
            original = stack_maps = None
            if stacked:
                label = f"images {used_inputs + 1}-{used_inputs + x.shape[0]}"
                try:
                    stack_maps, from_replay = occlusion_states(
                        model, x, t, stages, mode, randomization, seed, options, chunk=chunk, progress=progress,
                        label=label, index=ids)
                except Exception:  # noqa: BLE001 - the loop over states below reports a real model error
                    stacked = False
                else:  # (reused_original checks the original maps for NaN and inf, _Comparison the states')
                    reused = reused or from_replay
                    original = reused_original(stack_maps[0], x, t, ids)
            if replay is not None:
                try:
                    original = reused_original(replay.original(), x, replay.target, ids)
                except Exception:  # noqa: BLE001 - captum's pass below reports a real model error
                    replay.close()
                    replay = None
            if original is None:
                original = maps_of(x, t, ids)
            used = _check_original_maps(original, pipeline, name, constant_maps)
            while 0 < used.numel() < original.shape[0]:  # constant_maps="skip" dropped some images
                x, t, original = x[used], t[used], original[used]
                ids = [ids[i] for i in used.tolist()]
                if stack_maps is not None:  # occlusion explains each image on its own, in one stack
                    stack_maps = stack_maps[:, used]
                    break
                if replay is not None:  # the recorded graph covers the dropped images too: start afresh
                    replay.close()
                    replay = GradientReplay(model, x, t, name, options, seed, index=ids)
                    try:
                        replay.original()  # (the images left keep their maps, drawn at their indices)
                    except Exception:  # noqa: BLE001 - captum's passes report a real model error
                        replay.close()
                        replay = None
                if not model_draws:
                    break
                # A model that draws random numbers itself draws them for the whole batch, and the
                # states explain the images left as one batch: the original model must explain that
                # batch too, to draw the same numbers (such a model is never replayed). Its maps may
                # be constant elsewhere now: check again.
                original = maps_of(x, t, ids)
                used = _check_original_maps(original, pipeline, name, constant_maps)
            if used.numel() == 0:  # constant_maps="skip" and every map of this step is constant
                if replay is not None:
                    replay.close()
                continue
            # Each replay's recorded pass traced the images it explains (per step: the control
            # flow may depend on the batch), and its cuts come from that trace.
            cuts = state_cuts(replay.trace, names, mode) if replay is not None else []
            if replay is not None and not replay.verify(max(cuts)):
                replay.close()
                replay = None
            # With reuse, independent states run from the last layer to the first (see activation_reuse).
            state_order = list(range(len(stages)))
            if replay is not None and mode == "independent":
                state_order.sort(key=lambda i: -cuts[i])
            keep = max(0, min(keep_maps - sum(o.shape[0] for o in originals), x.shape[0]))
            comparison = _Comparison(original, pipeline, setup, len(stages), keep, state_maps)
            try:
                with contextlib.ExitStack() as cascade:
                    for index in range(len(stages)) if stack_maps is not None else ():
                        comparison.add(index, stack_maps[index + 1])
                    for done, index in enumerate(state_order if stack_maps is None else ()):
                        layer_name, module = stages[index]
                        if progress is not None:
                            progress(done, len(stages),
                                     f"{layer_name} (images {used_inputs + 1}-{used_inputs + x.shape[0]})")
                        state = randomized([(layer_name, module)], randomization, seed, draws)
                        with state if mode == "independent" else contextlib.nullcontext():
                            if mode == "cascading":
                                cascade.enter_context(state)
                            raw = None
                            if replay is not None:
                                try:
                                    raw = replay.maps(cuts[index])
                                    reused = True  # at least one state came from the replay
                                except Exception:  # noqa: BLE001
                                    # A recorded tensor changed in place (the replay is stale), the
                                    # suffix wrote into a replayed one, or the output stopped
                                    # depending on the inputs: use full passes from here on. A
                                    # genuine error in the model comes back from captum's pass.
                                    replay.close()
                                    replay = None
                            if raw is None:  # (replayed maps are checked for NaN and inf with the others, in comparison)
                                raw = attribute(model, x, resolved, t, seed, batch_size, True, options,
                                                 prepared=True, what=state_maps(index), index=ids)
                        comparison.add(index, raw)
                comparison.flush()
            finally:
                if replay is not None:
                    replay.close()
            columns.append(comparison.ssim())
            originals.append(original[:keep].clone())
            kept.append(comparison.kept())
            used_inputs += x.shape[0]
            if batched and first + step < inputs.shape[0]:
                verdict = _decision(
                    columns, names, ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold,
                    require_every_layer=require_every_layer, clip_negative=clip_negative_ssim,
                    confidence=adaptive_confidence, seed=seed,
                )
                if verdict == "fail" or (verdict == "pass" and adaptive):
                    stopped = f"decisive {verdict} after {used_inputs} of {inputs.shape[0]} images"
                    break
        if progress is not None:
            progress(len(stages), len(stages), "")
    if not columns:
        raise SaliencyUsageError(
            f"the original model's {name} maps are constant for every one of the {inputs.shape[0]} images "
            "(constant_maps='skip' left none); SSIM against a constant map measures nothing. Typical causes: a "
            "ReLU'd GradCAM that is zero everywhere, dead ReLUs, a saturated output, or a surrogate that zeroes "
            "every feature (lime: raise n_samples). Pick other inputs or another method."
        )
    ssim = torch.cat(columns, dim=1)
    stats = sensitivity_statistics(
        ssim, names, ssim_threshold=ssim_threshold, sensitivity_threshold=sensitivity_threshold,
        clip_negative=clip_negative_ssim, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed,
    )
    if not reproduce:
        reproduce = (
            f"pytest_saliency.layer_randomization(model, inputs, method={name!r}, mode={mode!r}, "
            f"preset={pipeline.name!r}, seed={seed}, images={images!r})"
        )
    return RandomizationResult(
        mode=mode, method=name, method_options=options, pipeline=pipeline, layers=names,
        ssim=ssim.double().cpu().tolist(), stats=stats, n_images=used_inputs, device=str(inputs.device),
        seed=seed, randomization=randomization, order=order if mode == "cascading" else "n/a",
        require_every_layer=require_every_layer, seconds=time.perf_counter() - start, reproduce=reproduce,
        images_available=int(inputs.shape[0]), stopped_early=stopped, reused_activations=reused,
        original_maps=torch.cat(originals).detach().cpu(), randomized_maps=torch.cat(kept, dim=1).detach().cpu(),
    )


__all__ = ["MODES", "ORDERS", "STRATEGIES", "RandomizationResult", "layer_randomization", "N_BOOTSTRAP"]
