"""Input-noise stability (SAM 4.1, Bansal, Agarwal & Nguyen, CVPR 2020): maps of x against maps of noisy x.

The inputs are explained once as they are and once per noisy copy ``clip(x + N(0, variance))``,
for the class predicted on the *clean* input and with the explainer's seed unchanged, so that
only the input changes. Each noisy map is compared with the clean map of the same image (the
measures, map pipeline and table of :mod:`pytest_saliency.checks.sweeps`), and per image the
similarity is averaged over the noisy copies. The defaults are SAM's code:
``skimage.util.random_noise(img, "gaussian", mean=0, var=0.1)`` on [0, 1] images, clipped.
The noise of an example is drawn from the seed, the draw and the example's index alone, so an
iterable of batches (a ``DataLoader``) gives every example the numbers one tensor gives it.

Stability alone is not quality: an explainer that ignores the model is perfectly stable under
any noise (see :data:`pytest_saliency.checks.sweeps.STABILITY_NOTE`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..core.forward import OutputSelector, passes_model_call
from ..core.integrity import rng_isolated, short_usage_errors
from ..core.rng import derive_seed
from ..core.stream import example_offset
from ..core.torchtools import require_torch
from ..core.validation import (
    check_count,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
    is_int,
    is_real,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError, raise_if_failed
from ..maps.methods import Explainer, method_name
from ..maps.modality import current_modality, default_similarity
from ..maps.postprocess import MapPipeline
from ..maps.targets import resolve_target
from .streaming import StreamSpec, streams
from .sweeps import (
    SWEEP_PRESET,
    Progress,
    SettingRunner,
    SweepResult,
    SweepRow,
    SweepTable,
    check_hyperparameters,
    nanmean,
    no_progress,
    require_threshold,
    setup_check,
    with_default_k,
)

if TYPE_CHECKING:
    import torch

    from ..core.stream import Inputs
    from ..maps.cache import MapCache

#: SAM code: skimage.util.random_noise(img, "gaussian", mean=0, var=0.1) on [0, 1] images (clipped).
SAM_INPUT_NOISE_VARIANCE = 0.1
NOISES = ("gaussian",)
#: A custom noise: ``noise(inputs, seed, draw) -> noisy inputs`` of the inputs' shape.
NoiseFunction = Callable[["torch.Tensor", int, int], "torch.Tensor"]


@short_usage_errors
def add_input_noise(
    inputs: torch.Tensor, variance: float = SAM_INPUT_NOISE_VARIANCE, clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0, draw: int = 0, *, first_example: int = 0,
) -> torch.Tensor:
    """``clip(x + N(0, variance))``: scikit-image's ``random_noise(x, "gaussian", var=variance)`` in torch.

    The noise of each example (a row of ``inputs``) comes from a local ``torch.Generator``
    seeded by ``(seed, draw, its index)``, the index counted from ``first_example``: no global
    RNG changes; an example's noise does not depend on the other examples, so a batch of a
    loader gets the noise its examples get in one tensor; and the same ``(seed, draw)`` gives
    the same standard-normal draw for every variance (common random numbers, so a variance
    sweep compares like with like).
    """
    torch = require_torch()
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise SaliencyUsageError(
            f"inputs must be a floating-point torch.Tensor, got {type(inputs).__name__} "
            f"{getattr(inputs, 'dtype', '')}. Convert with torch.as_tensor(x, dtype=torch.float32)."
        )
    variance = check_number(variance, "variance", low=0.0,
                            hint="It is the noise's variance, a squared std (SAM: 0.1 on [0, 1] images).")
    if clip is not None:
        clip = _check_clip(clip)
    seed = check_seed(seed)
    draw = check_count(draw, "draw", minimum=0, hint="It numbers the noisy copy: 0, 1, 2, ...")
    first_example = check_count(first_example, "first_example", minimum=0,
                                hint="It is the index of the first input among all the examples, e.g. 0.")
    noisy = inputs + math.sqrt(variance) * _standard_normal(inputs, seed, draw, first_example)
    return noisy if clip is None else noisy.clamp(clip[0], clip[1])


def _standard_normal(inputs: torch.Tensor, seed: int, draw: int, first_example: int) -> torch.Tensor:
    """N(0, 1) shaped like ``inputs``, row ``i`` drawn from ``(seed, draw, first_example + i)``."""
    torch = require_torch()
    rows = inputs.reshape(1) if inputs.dim() == 0 else inputs
    z = torch.empty_like(rows)
    generator = torch.Generator(device=inputs.device)
    for i in range(rows.shape[0]):
        generator.manual_seed(derive_seed(seed, "input_noise", draw, first_example + i))
        z[i] = torch.randn(rows.shape[1:], generator=generator, device=inputs.device, dtype=inputs.dtype)
    return z.reshape(inputs.shape)


def _check_clip(clip: Any) -> tuple[float, float]:
    if not (isinstance(clip, Sequence) and len(clip) == 2 and all(is_real(c) for c in clip) and clip[0] < clip[1]):
        raise SaliencyUsageError(f"clip must be (low, high) with low < high, or None; got {clip!r}.")
    return float(clip[0]), float(clip[1])


def _check_noise_args(inputs: torch.Tensor, noise: Any, variance: Any, clip: Any, n_draws: Any) -> list[float]:
    """The noise options, checked before anything runs; returns the variances as floats."""
    if not (noise in NOISES or callable(noise)):
        raise unknown_choice("noise", noise, NOISES, "Or pass a callable (inputs, seed, draw) -> noisy inputs.")
    variances = list(variance) if isinstance(variance, Sequence) and not isinstance(variance, str) else [variance]
    if not variances:
        raise SaliencyUsageError("variance is an empty list; pass a float such as 0.1 (SAM's value).")
    for v in variances:
        if not is_real(v):
            raise SaliencyUsageError(
                f"noise variance must be a finite float >= 0, got {v!r}. SAM's convention is variance=0.1 "
                "(std ~0.316) on [0, 1] images."
            )
        if v < 0:
            raise SaliencyUsageError(
                f"noise variance must be >= 0, got {v}; a variance is a squared std (SAM: 0.1, std ~0.316 on [0, 1] "
                "images). Pass a non-negative value."
            )
    if not (is_int(n_draws) and n_draws >= 1):
        raise SaliencyUsageError(f"n_draws must be a positive int (noisy copies per image), got {n_draws!r}.")
    if clip is not None:
        clip = _check_clip(clip)
        low, high = float(inputs.min()), float(inputs.max())
        if low < clip[0] or high > clip[1]:
            raise SaliencyUsageError(
                f"the inputs range over [{low:.4g}, {high:.4g}], outside clip={tuple(clip)}: clipping would change the "
                "clean inputs' range. SAM's convention is [0, 1] images; pass clip=(low, high) for your input scale, or "
                "clip=None (and scale variance to your inputs' units)."
            )
    return [float(v) for v in variances]


def _noisy_copy(
    inputs: torch.Tensor, noise: str | NoiseFunction, clip: tuple[float, float] | None, seed: int,
    first_example: int, variance: float, draw: int,
) -> torch.Tensor:
    """Noisy copy number ``draw`` of the inputs: the built-in noise, or the callable's (checked)."""
    torch = require_torch()
    if not callable(noise):
        return add_input_noise(inputs, variance, None if clip is None else (float(clip[0]), float(clip[1])), seed, draw,
                               first_example=first_example)
    noisy = noise(inputs, seed, draw)
    if not isinstance(noisy, torch.Tensor) or noisy.shape != inputs.shape:
        raise SaliencyUsageError(
            f"the noise callable returned {type(noisy).__name__} of shape "
            f"{tuple(getattr(noisy, 'shape', ()))}; it must return a tensor shaped like the inputs."
        )
    return noisy


def _noise_rows(
    runner: SettingRunner, inputs: torch.Tensor, clean: torch.Tensor, setting: dict[str, Any], seed: int,
    noisy_copy: Callable[[float, int], torch.Tensor], variances: list[float], n_draws: int, progress: Progress,
) -> list[SweepRow]:
    """One row per variance: per image, the similarity of its noisy maps to its clean map, averaged
    over the draws. Step 0 of ``progress`` is the clean inputs."""
    total = 1 + len(variances) * n_draws
    rows = []
    for index, variance in enumerate(variances):
        per_draw: dict[str, list[list[float]]] = {m: [] for m in runner.metrics}
        for draw in range(n_draws):
            progress(1 + index * n_draws + draw, total, f"variance={variance:g} draw {draw + 1}/{n_draws}")
            raw = runner.attributions(noisy_copy(variance, draw).detach(), dict(setting), seed, cached=False)
            scores = runner.scores(clean, raw)
            for m in runner.metrics:
                per_draw[m].append(scores[m])
        averaged = {m: [nanmean([d[i] for d in per_draw[m]]) for i in range(inputs.shape[0])] for m in runner.metrics}
        rows.append(SweepRow(value=variance, seed=seed, scores=averaged))
    progress(total, total, "")
    return rows




def _combined_row(rows: list[SweepRow]) -> SweepRow:
    """One variance's row over a stream's batches: every image's similarity, in order."""
    return replace(rows[0], scores={m: [v for row in rows for v in row.scores[m]] for m in rows[0].scores})


def _combined(parts: list[SweepResult], arguments: dict[str, Any], stopped: str) -> SweepResult:
    """One result of a stream's batches: the per-image similarities and targets of every batch
    (the means, the verdict and the report follow from them), the maps of the first batch."""
    torch = require_torch()
    first = parts[0]
    tables = [replace(table, rows=[_combined_row([part.tables[t].rows[r] for part in parts])
                                   for r in range(len(table.rows))])
              for t, table in enumerate(first.tables)]
    return replace(
        first, tables=tables, n_images=sum(part.n_images for part in parts),
        targets=[t for part in parts for t in part.targets],
        target_tensor=torch.cat([part.target_tensor for part in parts]),
        seconds=sum(part.seconds for part in parts),
        model_writes=tuple(sorted({w for part in parts for w in part.model_writes})),
    )


def _slim(part: SweepResult) -> SweepResult:
    return replace(part, reference_maps=None, reference_attributions=None)


@rng_isolated
@streams(StreamSpec(_combined, _slim))
@passes_model_call
def input_noise_stability(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    noise: str | NoiseFunction = "gaussian",
    variance: float | Sequence[float] = SAM_INPUT_NOISE_VARIANCE,
    clip: tuple[float, float] | str | None = "auto",
    n_draws: int = 1,
    metrics: Sequence[str] | str | None = None,
    preset: str | MapPipeline | None = SWEEP_PRESET,
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    threshold: float | None = None,
    metric: str | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    cache: MapCache | None = None,
    reproduce: str = "",
    progress: Progress | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **options: Any,
) -> SweepResult:
    """SAM 4.1: maps of x against maps of noisy x (``clip(x + N(0, variance))``), per image.

    Defaults are the SAM code's: ``skimage.util.random_noise(img, "gaussian", mean=0, var=0.1)``
    on [0, 1] images, which clips to [0, 1]: **variance** 0.1, i.e. std ~0.316 (the paper's
    "N(0, 0.1)"). The noise is seeded (``seed``; a local generator per draw and example). The target is the
    class predicted for the *clean* input, kept for the noisy copies; the explainer's own seed is
    the same for both. Per image, the similarity is averaged over ``n_draws`` noisy copies (SAM:
    one). ``variance`` may be a list (one row each). ``noise`` may be a callable
    ``(inputs, seed, draw) -> noisy inputs``. A robust model's maps should score higher.
    ``clip="auto"`` clips to [0, 1] for images (SAM) and not at all for other modalities.
    ``cache`` (a MapCache) lets the clean maps be shared with other checks; ``progress`` is
    called as ``progress(done, total, label)``.

    ``inputs`` is a tensor or an iterable of batches (a ``DataLoader``, see
    :mod:`pytest_saliency.checks.streaming`). The Gaussian noise of an example is drawn from the
    seed, the draw and the example's index (in the whole stream, for a loader), so a loader gives each example the noise, and the similarity, that
    one tensor of the same examples gives it. A ``noise`` callable is called per batch, with
    the same ``(seed, draw)`` for every batch.
    """
    from ..compare.metrics import check_metric_options

    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    if current_modality().name == "text":
        raise SaliencyUsageError(
            "input noise adds Gaussian noise to the inputs, and token ids are integers (a noisy id is another "
            "token, not a nearby input). Check text maps' stability with hyperparameter_sweep or "
            "explainer_seed_stability instead."
        )
    if isinstance(clip, str) and clip == "auto":  # SAM's [0, 1] images; other data has its own scale
        clip = (0.0, 1.0) if current_modality().name == "image" else None
    variances = _check_noise_args(inputs, noise, variance, clip, n_draws)
    clip = None if clip is None else _check_clip(clip)
    resolved, label, pipeline, metric_names, metric, higher = setup_check(method, preset, metrics, metric, threshold)
    if not metric_names:
        raise SaliencyUsageError("metrics is empty; pass e.g. metrics=('ssim', 'spearman', 'hog_pearson').")
    checked_options = check_metric_options(with_default_k(metric_options, metric_names), metric_names)
    seed = check_seed(seed)
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the images one explainer call sees; None explains all at once.")
    check_hyperparameters(label, resolved, options, "options")
    if "seed" in options:
        raise SaliencyUsageError("pass the explainer seed as seed=..., not as a method option.")
    # The clean inputs' maps are the reference; every noisy copy is explained for the clean inputs'
    # classes with the same explainer seed, so only the input changes.
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    runner = SettingRunner(model, resolved, label, fixed_target, batch_size, pipeline, metric_names,
                           checked_options, cache)
    progress = progress or no_progress
    progress(0, 1 + len(variances) * n_draws, "clean inputs")
    clean = runner.reference_maps(runner.attributions(inputs, dict(options), seed))
    noisy_copy = functools.partial(_noisy_copy, inputs, noise, clip, seed, example_offset())
    rows = _noise_rows(runner, inputs, clean, options, seed, noisy_copy, variances, n_draws, progress)
    if not reproduce:
        reproduce = (
            f"pytest_saliency.input_noise_stability(model, inputs, {label!r}, variance={variance!r}, clip={clip!r}, "
            f"n_draws={n_draws}, preset={pipeline.name!r}, seed={seed})"
        )
    return SweepResult(
        check="input_noise_stability", method=label, reference={}, method_options=options, pipeline=pipeline,
        metrics=metric_names, metric=metric, threshold=None if threshold is None else float(threshold),
        higher_is_better=higher, tables=[SweepTable("input_noise_variance", 0.0, rows)],
        n_images=int(inputs.shape[0]), device=str(inputs.device), seed=seed,
        targets=[int(t) for t in fixed_target.cpu()],
        target_policy="predicted class on the clean inputs (fixed)" if target is None else "given (fixed)",
        seconds=time.perf_counter() - start, reproduce=reproduce,
        noise={"kind": noise if isinstance(noise, str) else method_name(noise), "variance": variances,
               "std": [math.sqrt(v) for v in variances], "clip": None if clip is None else list(clip), "n_draws": n_draws},
        reference_maps=clean[:4].detach().cpu(), target_tensor=fixed_target,
    )


@rng_isolated
@passes_model_call
def assert_stable_under_input_noise(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    noise: str | NoiseFunction = "gaussian",
    variance: float | Sequence[float] = SAM_INPUT_NOISE_VARIANCE,
    clip: tuple[float, float] | str | None = "auto",
    n_draws: int = 1,
    threshold: float | None = None,
    metric: str | None = None,
    seed: int = 0,
    *,
    metrics: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Fail when the mean similarity between maps of x and of noisy x is below ``threshold``.

    See :func:`input_noise_stability` for the noise convention (SAM: variance 0.1 on [0, 1]
    images, clipped) and for ``inputs`` given as an iterable of batches (a ``DataLoader``).
    ``metrics`` defaults to just ``metric``.
    """
    __tracebackhide__ = True
    require_threshold(threshold, "assert_stable_under_input_noise")
    metric = default_similarity(metric)
    result = input_noise_stability(
        model, inputs, method, noise=noise, variance=variance, clip=clip, n_draws=n_draws,
        metrics=(metric,) if metrics is None else metrics, threshold=threshold, metric=metric, seed=seed, **kwargs,
    )
    return raise_if_failed(result)


__all__ = [
    "NOISES", "SAM_INPUT_NOISE_VARIANCE", "add_input_noise", "assert_stable_under_input_noise", "input_noise_stability",
]
