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

**Token inputs** (``modality=Text(pad_token_id=...)``): a position is a token, and padding is
not part of the game: padding positions are never ranked nor changed, and the fraction on the x
axis is of each input's own tokens (``k / tokens``, so texts of different lengths each go from 0
to 1; ``fractions`` is then (N, steps + 1), one row per input, and a shorter text's curve stays
at its last value once all its tokens are changed). A deleted token is *replaced* by the
substrate's token (``"zero"``: the baseline token of ``Text``), the standard "replace with
``[MASK]``" deletion: a ``[MASK]`` or unknown token stays attended, since the model reads it as a
token. Where the substrate's token is the pad token itself (the baseline token defaults to it),
the token is *removed*, as padding is: a per-input ``attention_mask`` in ``forward_kwargs`` (or
in the batches of a loader) is set to 0 at those positions, so the model neither reads nor
attends to what was deleted (or not yet inserted).

**Streams**: :func:`causal_curves`, :func:`deletion`, :func:`insertion` and
:func:`accuracy_spread` accept an iterable of batches (a ``DataLoader``) as their inputs
(:mod:`pytest_saliency.checks.streaming`); the curves and AUCs are per input, so the result
holds those of every input, in order. Precomputed ``attributions`` for a stream are a tensor
with one map per input of the whole loader, in its order (sliced batch by batch, like a
``target``); a method name explains each batch.

Cost and memory: ``N x (steps + 1)`` forward passes, run ``batch_size`` perturbed inputs at a
time with no gradients, the model in ``eval()`` mode (its flags restored afterwards).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

from ..core.forward import (
    OutputSelector,
    call_model,
    current_call,
    model_call_options,
    passes_model_call,
)
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.stream import example_offset, in_stream
from ..core.torchtools import require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_finite,
    check_flag,
    check_model,
    check_seed,
    checked_inputs,
    unknown_choice,
)
from ..exceptions import SaliencyUsageError
from ..maps.baselines import default_blur_sigma, gaussian_blur
from ..maps.options import format_value
from ..reporting.numbers import format_score
from ..reporting.protocol import Figure, Number
from .streaming import StreamSpec, streams

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
    plot: ``plt.plot(r.fractions, r.curves[i])``); ``auc`` (N,) per image. For token inputs of
    different lengths ``fractions`` is (N, steps + 1), each input's fraction of its own tokens
    (``plt.plot(r.fractions[i], r.curves[i])``).

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
    """Trapezoidal AUC of (N, S) curves over the x values ``fractions``: (S,), or (N, S) with
    each curve's own (token inputs of different lengths).

    ``normalize="max"`` divides each AUC by its curve's maximum (SAM); a curve whose maximum is
    0 (the model gives the class probability 0 throughout) gets AUC 0. ``None``: raw AUC.
    """
    torch = require_torch()
    if normalize not in NORMALIZATIONS:
        raise unknown_choice("AUC normalization", normalize, ["max", "None"])
    widths = (fractions[..., 1:] - fractions[..., :-1]).to(curves.dtype)
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


def _rows_of_batch(substrate: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A substrate with one row per example of a whole loader: the rows of this batch (from
    :func:`~pytest_saliency.core.stream.example_offset`); any other tensor as it is."""
    n, start = inputs.shape[0], example_offset()
    if not in_stream() or substrate.dim() != inputs.dim() or substrate.shape[0] == 1:
        return substrate
    if substrate.shape[0] < start + n:
        raise SaliencyUsageError(
            f"the substrate has {substrate.shape[0]} rows, one per example, but the inputs' batches have more "
            f"examples (at least {start + n}); pass one row per example of the whole loader, in its order, or a "
            "substrate that broadcasts to every batch (a float, 'zero', 'blur', a callable).")
    return substrate[start:start + n]


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
        kind = _rows_of_batch(kind, inputs)
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


def _token_positions(inputs: torch.Tensor) -> torch.Tensor | None:
    """(N, L), True where token inputs hold a token and not padding; None for other inputs, or for
    tokens without ``Text(pad_token_id=...)`` (every position is then a token)."""
    call = current_call()
    text = call.text
    if call.modality != "text" or text is None or text.pad_token_id is None or inputs.dim() != 2:
        return None
    valid = inputs != text.pad_token_id
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise SaliencyUsageError(
            f"input(s) {empty[:10]} hold only padding (pad_token_id={text.pad_token_id}): they have no token to "
            "delete or insert. Leave them out of the inputs."
        )
    return valid


def _ranks(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """rank[i, p]: when position p of input i is changed (0 = first), by descending score, ties
    broken by the lower index (a stable sort). Padding ranks after every token of its input, so
    the schedule (:func:`_schedule`) never reaches it."""
    torch = require_torch()
    n, pixels = scores.shape
    if valid is not None:
        scores = scores.masked_fill(~valid.to(scores.device), -math.inf)
    sorted_index = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(sorted_index)
    rank.scatter_(1, sorted_index, torch.arange(pixels, device=scores.device).expand(n, pixels).contiguous())
    return rank


def _schedule(valid: torch.Tensor | None, n: int, pixels: int, step: int,
              device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """How many positions of each input are changed after each step, (N, steps + 1), and the
    fractions of the input's positions (its tokens, for token inputs) they are: (steps + 1,) when
    every input has as many, else one row per input."""
    torch = require_torch()
    counts = torch.full((n,), pixels, device=device) if valid is None else valid.sum(dim=1).to(device)
    n_steps = (int(counts.max()) + step - 1) // step
    changed = torch.minimum(torch.arange(n_steps + 1, device=device)[None, :] * step, counts[:, None])
    fractions = changed.double() / counts[:, None].double()
    return changed, fractions[0] if bool((fractions == fractions[:1]).all()) else fractions


def _removed_tokens(inputs: torch.Tensor, fill: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    """(N, L), True at the tokens the substrate turns into the pad token, when the model takes a
    per-input ``attention_mask``: those tokens are removed, and the mask follows (module
    docstring). None when no token is removed."""
    call = current_call()
    mask = call.per_example.get("attention_mask")
    if valid is None or mask is None or call.text is None:
        return None
    removed = valid & (fill.reshape(inputs.shape) == call.text.pad_token_id)
    if not bool(removed.any()):
        return None
    if tuple(mask.shape) != tuple(inputs.shape):
        raise SaliencyUsageError(
            f"the substrate replaces deleted tokens by the pad token {call.text.pad_token_id}, which removes them, "
            f"so the attention_mask must follow; but the attention_mask has shape {tuple(mask.shape)}, not one "
            f"entry per token {tuple(inputs.shape)}. Pass an (N, L) attention_mask, or replace deleted tokens by "
            "a token the model reads (modality=Text(pad_token_id=..., baseline_token=<a [MASK] or unknown token>))."
        )
    return removed


def _class_scores(model: torch.nn.Module, perturbed: torch.Tensor, rows: torch.Tensor,
                  removed: torch.Tensor | None) -> torch.Tensor:
    """The model's (B, classes) scores on perturbed inputs made from the inputs at ``rows``; with
    ``removed`` (B, L), the attention mask is 0 at the removed tokens."""
    from ..core.forward import static

    if removed is None:
        out = call_model(model, perturbed, rows=rows)
    else:
        call = current_call()
        kwargs = {**{k: static(v) for k, v in call.static.items()},
                  **{k: v[rows] for k, v in call.per_example.items()}}
        kwargs["attention_mask"] = kwargs["attention_mask"].masked_fill(removed.to(perturbed.device), 0)
        with model_call_options(call.output, kwargs, perturbed, call.text):
            out = call_model(model, perturbed)
    if out.dim() != 2:
        raise SaliencyUsageError(
            f"the model's output has shape {tuple(out.shape)}; insertion/deletion need (N, num_classes) scores."
        )
    return out


@dataclass(frozen=True)
class _Game:
    """One game's perturbations: the inputs it starts from and ends at (N, C, P), when each
    position changes (:func:`_ranks`), how many have changed after each step (:func:`_schedule`)
    and which changed tokens are removed (:func:`_removed_tokens`)."""

    begin: torch.Tensor
    finish: torch.Tensor
    rank: torch.Tensor
    changed: torch.Tensor
    removed: torch.Tensor | None
    deletion: bool


def _play(model: torch.nn.Module, inputs: torch.Tensor, game: _Game, target: torch.Tensor, probability: str,
          batch_size: int) -> torch.Tensor:
    """(N, steps + 1): the target class's probability after each step of each input's game, for
    ``batch_size`` perturbed inputs per forward pass."""
    torch = require_torch()
    n, steps = game.changed.shape
    image_index = torch.arange(n, device=inputs.device).repeat_interleave(steps)
    step_index = torch.arange(steps, device=inputs.device).repeat(n)
    probabilities = torch.empty(n * steps, dtype=torch.float64, device=inputs.device)
    for first in range(0, image_index.numel(), batch_size):
        img = image_index[first:first + batch_size]
        keep = game.rank[img] < game.changed[img, step_index[first:first + batch_size]][:, None]
        perturbed = torch.where(keep[:, None, :], game.finish[img], game.begin[img])
        # the positions that hold the substrate: deletion's changed ones, insertion's unchanged ones
        removed = None if game.removed is None else game.removed[img] & (keep if game.deletion else ~keep)
        out = _class_scores(model, perturbed.reshape((img.numel(), *inputs.shape[1:])), img, removed)
        if probability == "softmax":
            out = torch.softmax(out.double(), dim=1)
        probabilities[first:first + img.numel()] = out.gather(1, target[img][:, None])[:, 0].double()
    return probabilities.reshape(n, steps)


@dataclass(frozen=True)
class _StreamMaps:
    """Precomputed attributions of a stream: one map per input of the whole loader, taken batch
    by batch from ``start`` (the index of the batch's first input)."""

    maps: torch.Tensor
    start: int

    def take(self, n: int) -> torch.Tensor:
        if self.maps.shape[0] < self.start + n:
            raise SaliencyUsageError(
                f"attributions hold {self.maps.shape[0]} maps, but the inputs' batches have more examples (at least "
                f"{self.start + n}). With a loader, pass one map per example of the whole loader, in its order, or a "
                "method name to explain each batch."
            )
        return self.maps[self.start:self.start + n]


def _prepare_curves(arguments: dict[str, Any], seen: int) -> dict[str, Any]:
    """A batch's share of precomputed attributions (see :class:`_StreamMaps`)."""
    attributions = arguments["attributions"]
    if isinstance(attributions, require_torch().Tensor):
        return {"attributions": _StreamMaps(attributions, seen)}
    return {}


def _to_width(rows: torch.Tensor, width: int) -> torch.Tensor:
    """(N, S) rows extended to ``width`` columns by repeating their last value (a finished game
    stays where it ended)."""
    return require_torch().cat([rows, rows[:, -1:].expand(-1, width - rows.shape[1])], dim=1)


def _combined_curves(parts: list[CausalCurves], arguments: dict[str, Any], stopped: str) -> CausalCurves:
    """One result of a stream's batches: every input's curve and AUC, in order. Token inputs of
    batches with fewer steps (shorter texts) have finished their games: their curves and
    fractions are extended by their last value, which leaves the AUCs as they are."""
    torch = require_torch()
    first = parts[0]
    n = sum(part.auc.shape[0] for part in parts)
    attributions = arguments["attributions"]
    if isinstance(attributions, torch.Tensor) and attributions.shape[0] != n:
        raise SaliencyUsageError(
            f"attributions hold {attributions.shape[0]} maps, but the inputs' batches have {n} examples; pass one "
            "map per example of the whole loader, in its order, or a method name to explain each batch."
        )
    width = max(part.curves.shape[1] for part in parts)
    fractions = torch.cat([_to_width(p.fractions.expand(p.curves.shape[0], -1), width) for p in parts])
    return replace(
        first, curves=torch.cat([_to_width(part.curves, width) for part in parts]),
        fractions=fractions[0] if bool((fractions == fractions[:1]).all()) else fractions,
        auc=torch.cat([part.auc for part in parts]), targets=[t for part in parts for t in part.targets],
        seconds=sum(part.seconds for part in parts),
    )


def _whole(part: Any) -> Any:
    """A later batch's result as it is: it holds per-input numbers only (curves and AUCs)."""
    return part


@rng_isolated
@streams(StreamSpec(_combined_curves, _whole, _prepare_curves))
@passes_model_call
def causal_curves(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
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

    ``inputs``: a tensor, or an iterable of batches such as a ``DataLoader``
    (:mod:`pytest_saliency.checks.streaming`: one call per batch, the curves of every input).
    ``attributions``: a tensor of maps (N, C, H, W), (N, 1, H, W) or (N, H, W) (or (N, D) for
    feature vectors; for a loader, one map per input of the whole loader, in its order), or a
    method name / explainer callable, in which case the maps are computed with
    :func:`pytest_saliency.explain` (``seed`` and ``method_options`` go there). The module
    docstring defines every option, and how token inputs are played (padding left out; tokens
    replaced by the substrate's token, or removed from the attention mask when that token is the
    pad token). Returns :class:`CausalCurves` with the curves for plotting.
    """
    torch = require_torch()
    from ..core.torchtools import model_in_eval_mode
    from ..maps.explainers import explain
    from ..maps.methods import method_name
    from ..maps.targets import resolve_target

    start_time = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
    batch_size = _check_curve_options(mode, order, probability, normalize, batch_size, output)
    seed = check_seed(seed)
    label = ""
    if isinstance(attributions, _StreamMaps):  # a stream's batch: its rows of the whole loader's maps
        attributions = attributions.take(int(inputs.shape[0]))
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
    valid = _token_positions(inputs)
    changed, fractions = _schedule(valid, n, pixels, step, inputs.device)
    game = _Game(begin=x_flat if mode == "deletion" else s_flat, finish=s_flat if mode == "deletion" else x_flat,
                 rank=_ranks(scores, valid), changed=changed, removed=_removed_tokens(inputs, fill, valid),
                 deletion=mode == "deletion")
    with model_in_eval_mode(model, True), torch.no_grad():
        fixed_target = resolve_target(model, inputs, target, seed=seed)
        curves = _play(model, inputs, game, fixed_target, probability, batch_size)
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
    model: torch.nn.Module, inputs: torch.Tensor | Iterable[Any], attributions: torch.Tensor | str | Explainer,
    **options: Any,
) -> CausalCurves:
    """The deletion game (lower AUC is better). See :func:`causal_curves` for the options; ``inputs``
    may be an iterable of batches (:mod:`pytest_saliency.checks.streaming`)."""
    return causal_curves(model, inputs, attributions, "deletion", **options)


@rng_isolated
@passes_model_call
def insertion(
    model: torch.nn.Module, inputs: torch.Tensor | Iterable[Any], attributions: torch.Tensor | str | Explainer,
    **options: Any,
) -> CausalCurves:
    """The insertion game (higher AUC is better). See :func:`causal_curves` for the options; ``inputs``
    may be an iterable of batches (:mod:`pytest_saliency.checks.streaming`)."""
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


def _prepare_spread(arguments: dict[str, Any], seen: int) -> dict[str, Any]:
    """Nothing changes from batch to batch but the inputs; a SweepResult cannot be streamed."""
    from .sweeps import SweepResult

    if isinstance(arguments["method"], SweepResult):
        raise SaliencyUsageError(
            "accuracy_spread was given a SweepResult and a loader: the SweepResult's kept attributions are those "
            "of the inputs tensor it explained, not of the loader's batches. Pass that inputs tensor with the "
            "SweepResult, or pass the method name (or grid) and sweep with the loader, to explain each batch."
        )
    return {}


def _spread_shardable(arguments: dict[str, Any]) -> bool:
    """A SweepResult's kept attributions are of its whole inputs tensor: not split across ranks."""
    from .sweeps import SweepResult

    return not isinstance(arguments["method"], SweepResult)


def _combined_spread(parts: list[AccuracySpread], arguments: dict[str, Any], stopped: str) -> AccuracySpread:
    """One result of a stream's batches: every input's AUC at every value, the spreads recomputed
    on all of them."""
    torch = require_torch()
    first = parts[0]
    shape = [(r.hyperparameter, r.score, len(r.values)) for r in first.rows]
    for index, part in enumerate(parts[1:], start=1):
        if [(r.hyperparameter, r.score, len(r.values)) for r in part.rows] != shape:
            raise SaliencyUsageError(
                f"batch {index} of the inputs gives other sweep rows than batch 0; the batches of one check must "
                "have the same shapes (a grid is scaled to the inputs' size)."
            )
    rows = []
    for index, row in enumerate(first.rows):
        per_value = [torch.tensor([auc for part in parts for auc in part.rows[index].per_image[value]],
                                  dtype=torch.float64) for value in range(len(row.values))]
        rows.append(_spread_row(row.hyperparameter, row.score, row.values, per_value))
    return replace(first, rows=rows, n_images=sum(part.n_images for part in parts),
                   seconds=sum(part.seconds for part in parts),
                   model_writes=tuple(sorted({w for part in parts for w in part.model_writes})))


@rng_isolated
@streams(StreamSpec(_combined_spread, _whole, _prepare_spread, shard_tensor=_spread_shardable))
@passes_model_call
def accuracy_spread(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
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

    ``inputs`` may be an iterable of batches (:mod:`pytest_saliency.checks.streaming`): each
    batch is swept and scored in turn, and the spreads are computed on the AUCs of every input
    (a SweepResult, whose maps are those of one inputs tensor, then cannot be passed).
    """
    from .sweeps import SweepResult, hyperparameter_sweep

    start = time.perf_counter()
    check_model(model)
    inputs = checked_inputs(inputs, model)
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
