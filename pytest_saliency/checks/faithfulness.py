"""Explanation accuracy: the insertion and deletion games of RISE (Petsiuk et al. 2018), as used by SAM.

**Deletion** replaces pixels, most important first, with a *substrate* and records the model's
probability for the target class after each step; a map that points at what the model uses
drives the probability down quickly, so a **lower** area under the curve is better.
**Insertion** starts from the substrate and puts the original pixels back in the same order; a
**higher** AUC is better. Both need only forward passes, so they work for any model.

Definitions, each an option with the default written here (SAM 2020 and the RISE code it used):

``order``
    ``"signed"`` (default): pixels sorted by the **signed** attribution, descending, as
    ``np.flip(np.argsort(explanation))`` in the RISE/SAM code, so strongly *negative* evidence
    comes last. ``"absolute"``: sorted by ``|attribution|``, for methods whose sign is not "for
    the class". A pixel is one spatial location with all its channels (RISE replaces the three
    colour channels together); multi-channel attributions are summed over channels first
    (signed sum, or the sum of ``|a|`` for ``"absolute"``). Ties are broken by the lower
    flattened pixel index (a stable sort), so the curves are deterministic even for maps with
    flat regions (a constant map deletes in raster order).
``step``
    Pixels changed per step. Default: the image width, i.e. ``H`` steps for an ``H x W`` image;
    RISE used ``step=224`` on 224x224 images. For ``(N, D)`` feature vectors the default is 1.
``substrate``
    What deleted pixels become (deletion) or what the game starts from (insertion). Default
    ``"zero"`` for both, as SAM describes them ("zero out the input pixels", "inserting ... into
    a zero image"). ``"blur"`` is the RISE notebook's insertion substrate (a blurred copy of the
    input); also a float constant, a tensor broadcastable to the inputs, or a callable
    ``inputs -> tensor``. Zero means the value 0 in the model's input space: for normalized
    inputs (ImageNet mean/std) pass the value that black maps to, or ``"blur"``.
``"blur"``
    A separable Gaussian blur in torch (:func:`gaussian_blur`): sigma defaults to RISE's 5 px on
    224 px images scaled to the input's smaller side, at least 1 px (1 px on 32x32); the kernel
    has radius ``int(3 sigma + 0.5)`` and edges are padded by replication, i.e. exactly
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3.0)`` per channel. RISE
    truncates its kernel at 11x11 taps and pads with zeros (which darkens the border); neither is
    reproduced.
``probability``
    ``"softmax"`` (default): the probability is ``softmax(model(x))[target]``, since RISE wraps
    the classifier in a softmax; ``"raw"`` when the model already outputs probabilities.
``normalize``
    ``"max"`` (default, SAM's ``RISE_evaluation.auc``): the trapezoidal AUC over the fraction of
    pixels changed (0 to 1), **divided by the maximum of that image's curve**, so the score is
    in [0, 1] and no longer depends on how confident the model was. ``None``: the raw
    trapezoidal AUC in probability units, the original RISE definition.
``target``
    ``None``: each input's predicted class on the unmodified input (RISE and SAM), fixed for the
    whole curve.

The x axis of a curve is the actual fraction of pixels changed after each step (``k / (H W)``);
it equals RISE's uniform grid whenever ``step`` divides ``H W``, as the default does.

Cost and memory: ``N x (steps + 1)`` forward passes, run ``batch_size`` perturbed inputs at a
time with no gradients, the model in ``eval()`` mode (its flags restored afterwards).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from ..core.forward import OutputSelector, call_model, current_call, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.torchtools import require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_finite,
    check_flag,
    check_inputs,
    check_model,
    check_seed,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError
from ..maps.baselines import default_blur_sigma, gaussian_blur
from ..maps.options import format_value
from ..reporting.numbers import format_score
from ..reporting.protocol import Figure, Number

if TYPE_CHECKING:
    import torch

    from ..maps.methods import Explainer
    from .sam_grids import SweepGrid
    from .sweeps import SweepResult, SweepSpec

#: What deleted pixels become: "zero", "blur", a constant, a tensor broadcastable to the inputs,
#: or a callable ``inputs -> tensor``.
Substrate = Union[str, float, "torch.Tensor", Callable[["torch.Tensor"], "torch.Tensor"]]

MODES = ("deletion", "insertion")
ORDERS = ("signed", "absolute")
OUTPUTS = ("softmax", "raw")
NORMALIZATIONS = ("max", None)
SUBSTRATES = ("zero", "blur")
DEFAULT_BATCH_SIZE = 256


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass
class CausalCurves:
    """Insertion or deletion curves for a batch of images, with their AUCs.

    ``curves`` is (N, steps + 1): the target-class probability after 0, 1, ... steps;
    ``fractions`` (steps + 1,) the fraction of pixels changed at each point (the x axis for a
    plot: ``plt.plot(r.fractions, r.curves[i])``); ``auc`` (N,) per image.

    A data object, what :func:`causal_curves`, :func:`deletion` and :func:`insertion` return: not
    a check result, so it does not implement
    :class:`~pytest_saliency.reporting.protocol.CheckResult` (it has no verdict) and the
    ``saliency`` fixture does not record it. The check built on these curves is
    :func:`accuracy_spread`, whose :class:`AccuracySpread` is a result.
    """

    mode: str
    curves: torch.Tensor
    fractions: torch.Tensor
    auc: torch.Tensor
    targets: list[int]
    order: str
    step: int
    substrate: str
    normalize: str | None
    probability: str
    seconds: float = 0.0
    method: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_auc(self) -> float:
        return float(self.auc.double().mean())

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "insertion"

    def summary(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        norm = "AUC / max of curve" if self.normalize == "max" else "raw AUC"
        what = f" [{self.method}]" if self.method else ""
        return (
            f"{self.mode}{what}: mean {norm} = {format_score(self.mean_auc)} ({better} is better); "
            f"N = {self.auc.shape[0]}, {self.curves.shape[1] - 1} steps of {self.step} px, "
            f"order={self.order}, substrate={self.substrate}, probability={self.probability}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method": self.method,
            "auc": [float(v) for v in self.auc.double().cpu()],
            "mean_auc": self.mean_auc,
            "higher_is_better": self.higher_is_better,
            "curves": self.curves.double().cpu().tolist(),
            "fractions": self.fractions.double().cpu().tolist(),
            "targets": list(self.targets),
            "order": self.order,
            "step": self.step,
            "substrate": self.substrate,
            "normalize": self.normalize,
            "probability": self.probability,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------------------------
# the games
# --------------------------------------------------------------------------------------------


def area_under_curve(curves: torch.Tensor, fractions: torch.Tensor, normalize: str | None = "max") -> torch.Tensor:
    """Trapezoidal AUC of (N, S) curves over the x values ``fractions`` (S,).

    ``normalize="max"`` divides each AUC by its curve's maximum (SAM); a curve whose maximum is
    0 (the model gives the class probability 0 throughout) gets AUC 0. ``None``: raw AUC.
    """
    torch = require_torch()
    if normalize not in NORMALIZATIONS:
        raise unknown_choice("AUC normalization", normalize, ["max", "None"])
    widths = (fractions[1:] - fractions[:-1]).to(curves.dtype)
    area = ((curves[:, 1:] + curves[:, :-1]) * 0.5 * widths).sum(dim=1)
    if normalize == "max":
        peak = curves.amax(dim=1)
        area = torch.where(peak > 0, area / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(area))
    return area


def _pixel_scores(attributions: object, inputs: torch.Tensor, order: str) -> torch.Tensor:
    """(N, P) per-pixel scores whose descending order is the deletion/insertion order."""
    torch = require_torch()
    if not isinstance(attributions, torch.Tensor) or not attributions.is_floating_point():
        raise SaliencyUsageError(
            f"attributions must be a floating torch.Tensor (one map per input), got {type(attributions).__name__}"
            f"{' of dtype ' + str(attributions.dtype) if isinstance(attributions, torch.Tensor) else ''}. "
            "Pass the output of explain(...), or a method name to compute it."
        )
    check_finite(attributions, "attributions")
    n = inputs.shape[0]
    channelled = inputs.dim() >= 3  # images (N, C, H, W) and series (N, C, T) have channels
    spatial = tuple(inputs.shape[2:]) if channelled else (inputs.shape[1],)
    a = attributions
    if current_call().modality == "text" and a.dim() == 3:  # (N, L, E) at the embedding: one score per token
        a = a.sum(dim=-1)
    if a.shape[0] != n:
        raise SaliencyUsageError(
            f"attributions hold {a.shape[0]} maps for {n} inputs; pass one map per input (same order)."
        )
    if channelled and a.dim() == inputs.dim() - 1:
        a = a[:, None]
    if tuple(a.shape[2:] if channelled else a.shape[1:]) != spatial or a.dim() != inputs.dim():
        raise SaliencyUsageError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs of shape {tuple(inputs.shape)}: "
            f"expected (N, C, {', '.join(map(str, spatial))}) or (N, {', '.join(map(str, spatial))}) maps. "
            "Upsample low-resolution maps to the input size first (explain() already does this for GradCAM)."
        )
    if order == "absolute":
        a = a.abs()
    if channelled:
        a = a.sum(dim=1)
    return a.reshape(n, -1)


def _substrate(kind: Substrate, inputs: torch.Tensor, blur_sigma: float | None) -> tuple[torch.Tensor, str]:
    """The substrate as a tensor shaped like the inputs, and its name for the report."""
    torch = require_torch()
    if isinstance(kind, str):
        text = current_call().text
        if kind == "zero" and text is not None:  # tokens are deleted by replacing them with the baseline token
            return torch.full_like(inputs, text.baseline), f"token {text.baseline}"
        if kind == "zero":
            return torch.zeros_like(inputs), "zero"
        if kind == "blur":
            sigma = default_blur_sigma(*inputs.shape[-2:]) if blur_sigma is None and inputs.dim() == 4 else blur_sigma
            return gaussian_blur(inputs, sigma), f"blur(sigma={sigma:g})"
        raise unknown_choice("substrate", kind, SUBSTRATES, "Or pass a float, a tensor or a callable inputs -> tensor.")
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        if not math.isfinite(kind):
            raise SaliencyUsageError(f"a constant substrate must be finite, got {kind!r}.")
        return torch.full_like(inputs, float(kind)), f"constant({kind:g})"
    if isinstance(kind, torch.Tensor):
        try:
            value = kind.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs).clone()
        except RuntimeError:
            raise SaliencyUsageError(
                f"a substrate tensor of shape {tuple(kind.shape)} cannot be broadcast to the inputs' shape "
                f"{tuple(inputs.shape)}."
            ) from None
        check_finite(value, "substrate")
        return value, "tensor"
    if callable(kind):
        value = kind(inputs)
        if not isinstance(value, torch.Tensor) or value.shape != inputs.shape:
            raise SaliencyUsageError(
                f"the substrate callable returned {type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}; "
                f"it must return a tensor shaped like the inputs {tuple(inputs.shape)}."
            )
        check_finite(value, "substrate")
        return value.detach(), getattr(kind, "__name__", "callable")
    raise SaliencyUsageError(
        f"substrate must be 'zero', 'blur', a float, a tensor or a callable, got {type(kind).__name__}."
    )


def _check_curve_options(mode: Any, order: Any, probability: Any, normalize: Any, batch_size: Any,
                         output: Any = None) -> int:
    """The game's options, checked before anything runs; returns ``batch_size`` as an int."""
    check_choice(mode, "mode", MODES)
    check_choice(order, "pixel order", ORDERS, "order ranks pixels by their signed or their absolute attribution.")
    if isinstance(output, str) and output in OUTPUTS:
        raise SaliencyUsageError(
            f"output={output!r}: output= selects the scores in the model's output (e.g. output='logits'); "
            f"the probability the games score is probability={output!r}."
        )
    check_choice(probability, "probability", OUTPUTS, "'softmax' applies a softmax to the model's logits.")
    if normalize is not None and not (isinstance(normalize, str) and normalize in NORMALIZATIONS):
        raise unknown_choice("AUC normalization", normalize, ["max", "None"])
    return check_count(batch_size, "batch_size", hint="It bounds the perturbed inputs per forward pass.")


@rng_isolated
@passes_model_call
def causal_curves(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor | str | Explainer,
    mode: str = "deletion",
    *,
    target: int | torch.Tensor | None = None,
    order: str = "signed",
    step: int | None = None,
    substrate: Substrate = "zero",
    blur_sigma: float | None = None,
    normalize: str | None = "max",
    probability: str = "softmax",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_options: Any,
) -> CausalCurves:
    """Play the deletion or insertion game for every input; batched over images and steps.

    ``attributions``: a tensor of maps (N, C, H, W), (N, 1, H, W) or (N, H, W) (or (N, D) for
    feature vectors), or a method name / explainer callable, in which case the maps are computed
    with :func:`pytest_saliency.explain` (``seed`` and ``method_options`` go there). The module
    docstring defines every option. Returns :class:`CausalCurves` with the curves for plotting.
    """
    torch = require_torch()
    from ..core.torchtools import model_in_eval_mode
    from ..maps.explainers import explain
    from ..maps.methods import method_name
    from ..maps.targets import resolve_target

    start_time = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    batch_size = _check_curve_options(mode, order, probability, normalize, batch_size, output)
    seed = check_seed(seed)
    label = ""
    if isinstance(attributions, str) or (callable(attributions) and not isinstance(attributions, torch.Tensor)):
        label = method_name(attributions)
        attributions = explain(model, inputs, attributions, target=target, seed=seed, **method_options)
    elif method_options:
        raise SaliencyUsageError(
            f"method options {sorted(method_options)} were given with precomputed attributions; they only apply "
            "when attributions is a method name or explainer."
        )
    scores = _pixel_scores(attributions, inputs, order).to(inputs.device)
    n, pixels = scores.shape
    if step is None:
        step = inputs.shape[-1] if inputs.dim() == 4 else 1
    step = check_count(step, "step", hint=f"It is the number of pixels changed per step (1 to {pixels}).")
    if step > pixels:
        raise SaliencyUsageError(
            f"step={step} changes more positions per step than the {pixels} each input has, so the curve would have "
            f"a single step. Pass a step from 1 to {pixels}."
        )
    if isinstance(substrate, str) and substrate == "blur" and inputs.dim() != 4:
        raise SaliencyUsageError(
            "substrate='blur' needs images (N, C, H, W); for series and feature vectors use substrate='zero' or a "
            "constant."
        )
    fill, substrate_label = _substrate(substrate, inputs, blur_sigma)
    channels = inputs.shape[1] if inputs.dim() >= 3 else 1
    x_flat = inputs.detach().reshape(n, channels, pixels)
    s_flat = fill.reshape(n, channels, pixels)
    begin, finish = (x_flat, s_flat) if mode == "deletion" else (s_flat, x_flat)

    # rank[i, p] = position of pixel p in image i's order (0 = changed first); stable ties.
    sorted_index = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(sorted_index)
    rank.scatter_(1, sorted_index, torch.arange(pixels, device=scores.device).expand(n, pixels).contiguous())

    n_steps = (pixels + step - 1) // step
    changed = torch.clamp(torch.arange(n_steps + 1, device=inputs.device) * step, max=pixels)
    fractions = changed.double() / pixels
    with model_in_eval_mode(model, True), torch.no_grad():
        fixed_target = resolve_target(model, inputs, target, seed=seed)
        image_index = torch.arange(n, device=inputs.device).repeat_interleave(n_steps + 1)
        step_index = torch.arange(n_steps + 1, device=inputs.device).repeat(n)
        probabilities = torch.empty(n * (n_steps + 1), dtype=torch.float64, device=inputs.device)
        for first in range(0, image_index.numel(), batch_size):
            img = image_index[first:first + batch_size]
            keep = (rank[img] < changed[step_index[first:first + batch_size]][:, None])[:, None, :]
            perturbed = torch.where(keep, finish[img], begin[img]).reshape((img.numel(), *inputs.shape[1:]))
            out = call_model(model, perturbed, rows=img)
            if out.dim() != 2:
                raise SaliencyUsageError(
                    f"the model's output has shape {tuple(out.shape)}; insertion/deletion need (N, num_classes) scores."
                )
            if probability == "softmax":
                out = torch.softmax(out.double(), dim=1)
            probabilities[first:first + img.numel()] = out.gather(1, fixed_target[img][:, None])[:, 0].double()
    curves = probabilities.reshape(n, n_steps + 1)
    auc = area_under_curve(curves, fractions, normalize)
    return CausalCurves(
        mode=mode, curves=curves.cpu(), fractions=fractions.cpu(), auc=auc.cpu(),
        targets=[int(t) for t in fixed_target.cpu()], order=order, step=step, substrate=substrate_label,
        normalize=normalize, probability=probability, seconds=time.perf_counter() - start_time, method=label,
        method_options={k: v for k, v in method_options.items()},
    )


@rng_isolated
@passes_model_call
def deletion(
    model: torch.nn.Module, inputs: torch.Tensor, attributions: torch.Tensor | str | Explainer, **options: Any
) -> CausalCurves:
    """The deletion game (lower AUC is better). See :func:`causal_curves` for the options."""
    return causal_curves(model, inputs, attributions, "deletion", **options)


@rng_isolated
@passes_model_call
def insertion(
    model: torch.nn.Module, inputs: torch.Tensor, attributions: torch.Tensor | str | Explainer, **options: Any
) -> CausalCurves:
    """The insertion game (higher AUC is better). See :func:`causal_curves` for the options."""
    return causal_curves(model, inputs, attributions, "insertion", **options)


# --------------------------------------------------------------------------------------------
# the spread of accuracy scores across a sweep (SAM 4.5 and 4.6)
# --------------------------------------------------------------------------------------------


@dataclass
class SpreadRow:
    """One hyperparameter: per-value dataset means and the two spreads SAM reports."""

    hyperparameter: str
    score: str  # "deletion" or "insertion"
    values: list[Any]
    value_means: list[float]  # dataset mean AUC per value
    per_image: list[list[float]]  # (values, images)
    mean_image_std: float  # SAM 4.5: per-image std across values, averaged over images
    std_of_means: float  # SAM 4.6: std across values of the dataset means

    def to_dict(self) -> dict[str, Any]:

        return {
            "hyperparameter": self.hyperparameter,
            "score": self.score,
            "values": [jsonable(v) for v in self.values],
            "value_means": self.value_means,
            "per_image": self.per_image,
            "mean_image_std": self.mean_image_std,
            "std_of_means": self.std_of_means,
        }


@dataclass
class AccuracySpread:
    """Which hyperparameters change explanation accuracy (insertion/deletion AUC) the most."""

    method: str
    reference: dict[str, Any]
    rows: list[SpreadRow]
    n_images: int
    options: dict[str, Any]
    seconds: float
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    @property
    def check(self) -> str:
        return "accuracy_spread"

    @property
    def passed(self) -> bool:
        """A measurement, not a gate: always True (the report says which knob matters most)."""
        return True

    def ranking(self, score: str | None = None, by: str = "std_of_means") -> list[SpreadRow]:
        """Rows sorted by ``by`` (``"std_of_means"`` or ``"mean_image_std"``), largest spread first."""
        if by not in ("std_of_means", "mean_image_std"):
            raise unknown_choice("spread", by, ("std_of_means", "mean_image_std"))
        rows = [r for r in self.rows if score is None or r.score == score]
        return sorted(rows, key=lambda r: -getattr(r, by))

    def ratio(self, first: str, second: str, score: str = "insertion", by: str = "std_of_means") -> float:
        """spread(first) / spread(second), SAM's "130.5x" comparison (inf when the second is 0)."""
        lookup = {r.hyperparameter: getattr(r, by) for r in self.rows if r.score == score}
        for name in (first, second):
            if name not in lookup:
                raise unknown_choice("hyperparameter", name, lookup)
        return lookup[first] / lookup[second] if lookup[second] > 0 else math.inf

    def report(self) -> str:
        auc = "AUC / max of curve" if self.options.get("normalize", "max") == "max" else "raw AUC"
        lines = [
            f"  explanation accuracy spread [{self.method}] over {self.n_images} images ({auc})",
            ("    std_of_means: std across values of the dataset-mean AUC (SAM 4.6); "
             "mean_image_std: per-image std across values, averaged (SAM 4.5)"),
        ]
        for score in MODES:
            rows = self.ranking(score)
            if not rows:
                continue
            width = max(len("hyperparameter"), *(len(r.hyperparameter) for r in rows))
            better = "lower" if score == "deletion" else "higher"
            lines.append(f"    {score} ({better} AUC is better)")
            lines.append(f"      {'hyperparameter':<{width}}  std_of_means  mean_image_std  mean AUC per value")
            for r in rows:
                means = ", ".join(f"{format_value(v, width=24)}: {m:.3f}" for v, m in zip(r.values, r.value_means))
                lines.append(f"      {r.hyperparameter:<{width}}  {format_score(r.std_of_means):>12}  "
                             f"{format_score(r.mean_image_std):>14}  {means}")
        return "\n".join(lines)

    def numbers(self) -> dict[str, Number]:
        """The hyperparameter that moves the AUC most, by how much, and the run's size."""
        top = self.ranking()
        return {
            "method": self.method, "n_images": self.n_images,
            "hyperparameters": len({r.hyperparameter for r in self.rows}),
            "most_spread": top[0].hyperparameter if top else None, "most_spread_score": top[0].score if top else None,
            "std_of_means": top[0].std_of_means if top else None,
        }

    def failure_message(self) -> str:
        """A measurement cannot fail: its summary and report."""
        return "\n".join([self.summary(), self.report()])

    def figures(self) -> list[Figure]:
        """No figure: the report's table ranks the hyperparameters."""
        return []

    def summary(self) -> str:
        top = self.ranking()
        if not top:
            return f"REPORT accuracy_spread [{self.method}]: no rows"
        r = top[0]
        return (
            f"REPORT accuracy_spread [{self.method}]: {r.hyperparameter} changes {r.score} AUC most "
            f"(std of dataset means {format_score(r.std_of_means)}); N = {self.n_images}"
        )

    def to_dict(self) -> dict[str, Any]:

        return {
            "check": "accuracy_spread",
            "passed": True,
            "method": self.method,
            "reference": {k: jsonable(v) for k, v in self.reference.items()},
            "rows": [r.to_dict() for r in self.rows],
            "n_images": self.n_images,
            "options": {k: jsonable(v) for k, v in self.options.items()},
            "seconds": self.seconds,
            "model_writes": list(self.model_writes),
        }


def _check_reusable(result: SweepResult, inputs: torch.Tensor, sweep: object, reference: object,
                    options: dict[str, Any]) -> None:
    """A SweepResult whose maps can be scored: attributions kept, nothing given again, the same inputs."""
    if result.reference_attributions is None:
        raise SaliencyUsageError(
            "this SweepResult has no attributions; run hyperparameter_sweep(..., keep_attributions=True) "
            "to reuse its maps, or pass the method name and sweep instead."
        )
    if sweep is not None or reference is not None or options:
        raise SaliencyUsageError(
            "sweep, reference and method options come from the SweepResult; do not pass them again."
        )
    if result.n_images != inputs.shape[0]:
        raise SaliencyUsageError(
            f"the SweepResult explained {result.n_images} images but {inputs.shape[0]} inputs were given; "
            "pass the same inputs."
        )


def _spread_row(hyperparameter: str, score: str, values: list[Any], aucs: list[torch.Tensor]) -> SpreadRow:
    """SAM's two spreads of one hyperparameter's AUCs (one (N,) tensor per value)."""
    matrix = require_torch().stack(aucs)  # (values, images)
    means = matrix.mean(dim=1)
    return SpreadRow(
        hyperparameter=hyperparameter, score=score, values=values,
        value_means=[float(m) for m in means], per_image=matrix.tolist(),
        mean_image_std=float(matrix.std(dim=0, unbiased=False).mean()),
        std_of_means=float(means.std(unbiased=False)),
    )


@rng_isolated
@passes_model_call
def accuracy_spread(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    method: str | Explainer | SweepGrid | SweepResult = "smoothgrad",
    sweep: SweepSpec | None = None,
    reference: Mapping[str, Any] | None = None,
    *,
    scores: Sequence[str] = MODES,
    include_reference: bool = True,
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    order: str = "signed",
    step: int | None = None,
    substrate: Substrate = "zero",
    blur_sigma: float | None = None,
    normalize: str | None = "max",
    probability: str = "softmax",
    batch_size: int | None = None,
    curve_batch_size: int = DEFAULT_BATCH_SIZE,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **options: Any,
) -> AccuracySpread:
    """The spread of insertion/deletion AUC across a hyperparameter sweep (SAM 4.5 and 4.6).

    ``method`` is a method name, a :class:`pytest_saliency.checks.sweeps.SweepGrid`, or a
    :class:`pytest_saliency.checks.sweeps.SweepResult` computed with ``keep_attributions=True`` (its
    maps are reused, so nothing is explained twice). ``sweep``/``reference``/``options`` mean
    what they mean in :func:`pytest_saliency.checks.sweeps.hyperparameter_sweep`. For each
    hyperparameter the explanations at each value (and at the reference, with
    ``include_reference=True``: SAM sweeps "N values" including the default) are scored, and two
    spreads are reported per score: ``mean_image_std`` (per image, the std of its N scores,
    averaged over images; SAM 4.5) and ``std_of_means`` (the std of the N dataset-mean scores;
    SAM 4.6). Standard deviations are population std (``ddof=0``, numpy's default, as SAM).
    """
    from .sweeps import SweepResult, hyperparameter_sweep

    start = time.perf_counter()
    check_model(model)
    check_inputs(inputs, model)
    scores = (scores,) if isinstance(scores, str) else tuple(scores)
    for s in scores:
        check_choice(s, "accuracy score", MODES)
    if not scores:
        raise SaliencyUsageError("scores is empty; pass ('deletion', 'insertion') or one of them.")
    check_flag(include_reference, "include_reference")
    seed = check_seed(seed)
    curve_batch_size = _check_curve_options(MODES[0], order, probability, normalize, curve_batch_size, output)
    if step is not None:
        check_count(step, "step", hint="It is the number of pixels changed per step.")
    if isinstance(method, SweepResult):
        result = method
        _check_reusable(result, inputs, sweep, reference, options)
        target = result.target_tensor if target is None else target
    else:
        result = hyperparameter_sweep(
            model, inputs, method, sweep, reference, metrics=(), target=target, seed=seed,
            batch_size=batch_size, keep_attributions=True, **options,
        )
        target = result.target_tensor
    curve_options: dict[str, Any] = dict(
        target=target, order=order, step=step, substrate=substrate, blur_sigma=blur_sigma, normalize=normalize,
        probability=probability, batch_size=curve_batch_size,
    )

    cache: dict[tuple[str, int], torch.Tensor] = {}

    def auc_of(kind: str, key: int, attributions: torch.Tensor | None) -> torch.Tensor:
        """Per-image AUCs of one set of maps, scored once (the reference's serve every table)."""
        # Kept by keep_attributions=True above, or checked by _check_reusable for a given SweepResult.
        if attributions is None:
            raise RuntimeError("pytest-saliency bug: the sweep kept no attributions for the accuracy spread")
        if (kind, key) not in cache:
            cache[(kind, key)] = causal_curves(model, inputs, attributions, kind, **curve_options).auc.double()
        return cache[(kind, key)]

    rows = []
    for table in result.tables:
        for kind in scores:
            values, per_value = [], []
            if include_reference:
                values.append(table.reference_value)
                per_value.append(auc_of(kind, -1, result.reference_attributions))
            for row in table.rows:
                values.append(row.value)
                per_value.append(auc_of(kind, id(row), row.attributions))
            rows.append(_spread_row(table.hyperparameter, kind, values, per_value))
    return AccuracySpread(
        method=result.method, reference=dict(result.reference), rows=rows, n_images=int(inputs.shape[0]),
        options={**{k: v for k, v in curve_options.items() if k != "target"}, "include_reference": include_reference},
        seconds=time.perf_counter() - start,
    )


__all__ = [
    "AccuracySpread", "CausalCurves", "SpreadRow", "accuracy_spread", "area_under_curve", "causal_curves",
    "default_blur_sigma", "deletion", "gaussian_blur", "insertion",
]
