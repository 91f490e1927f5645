"""Input-shift invariance (Kindermans et al., "The (Un)reliability of Saliency Methods", 2019).

A constant shift m of the inputs, compensated in the model's first layer, gives a model f2 with
``f2(x + m) = f(x)`` for every x (:mod:`pytest_saliency.model.shift` builds it and verifies that
it computes the same function). The two models are the same function of the data, so a method
that explains the model should give the same map for (f, x) as for (f2, x + m). The check
compares the **raw** attributions, before any absolute value or normalisation, per input::

    d_i = max |a2_i - a1_i| / max |a1_i|          a1 = method(f, x),  a2 = method(f2, x + m)

and passes when every input's ``d_i`` is at most ``tolerance`` (default 1e-4). Quantus'
``InputInvariance`` asks ``np.isclose(a1, a2, atol=1e-4)`` of every value, an absolute
tolerance that depends on the scale of the attributions; ``d_i`` is scale-free (a map of
gradients of size 1e-3 and one of size 10 are held to the same relative precision). An input
whose map is zero everywhere has ``d_i = 0`` when the shifted map is zero too, and infinity
otherwise. The similarity of the two maps after the preset's pipeline (SSIM for images,
Spearman for feature vectors) is reported alongside, not gated.

What the paper shows, and what the tests of this module measure: the gradient (and SmoothGrad,
whose noise is the same for both runs) is invariant, since ``grad f2(x + m) = grad f(x)``
exactly; input x gradient is not, its maps move by ``m * grad f(x)``; integrated gradients with
a zero baseline is not, and with a baseline shifted with the data (``shift_baselines=True``:
the baseline b becomes b + m) it is. Baselines computed from each input (``"uniform"`` over its
range, ``"blurred"``) shift with it anyway.

Precision. Both models run on a float64 copy of the model by default (``precision="float64"``;
``"model"`` runs the model as it is). The invariance is mathematical, and float32 rounding
confounds it: ``(x + m) - m != x`` for values off the shifted grid, and a piecewise-linear
network's gradient jumps wherever a rounding error crosses a ReLU's kink or a max pooling's tie.
In float32 the ResNet-18 layout's gradient maps of normalised images moved by 6% of their
maximum at a few pixels, and the digits CNN's integrated gradients with a shifted baseline by
0.1-0.5%; in float64 both are 0 (float32 data shifted in float64 is exact).

Token inputs are refused: a token id is a category, so "id + m" is another token or none, not
the same text shifted, and there is no constant to compensate in an embedding lookup.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.forward import OutputSelector, call_model, current_call, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import (
    check_choice,
    check_count,
    check_flag,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
    is_real,
)
from ..exceptions import SaliencyUsageError, raise_if_failed
from ..maps.explainers import attribute, prepare_method
from ..maps.methods import Explainer, MethodSpec
from ..maps.modality import current_modality, default_similarity, figure_context
from ..maps.options import format_options
from ..maps.postprocess import MapPipeline, get_pipeline, pipeline_maps
from ..maps.targets import resolve_target
from ..model.shift import FUNCTION_TOL, ShiftedModel, build_shifted, compensated
from ..reporting.numbers import format_score
from ..reporting.protocol import Figure, Number
from .streaming import StreamSpec, same_across_batches, streams

if TYPE_CHECKING:
    import torch

    from ..core.stream import Inputs

#: Kindermans et al.'s shift: [0, 1] images to [-1, 0] (also Quantus' ``input_shift`` default).
DEFAULT_SHIFT = -1.0
#: The largest relative difference ``max |a2 - a1| / max |a1|`` an input may have (Quantus: atol 1e-4).
SHIFT_TOLERANCE = 1e-4
#: Inputs listed in the report's table (the worst first).
TABLE_ROWS = 10


def relative_differences(original: torch.Tensor, shifted_maps: torch.Tensor) -> torch.Tensor:
    """Per input, ``max |b - a| / max |a|`` over all its values, in float64: 0 where both maps are
    zero everywhere, infinity where only ``a`` is."""
    torch = require_torch()
    a = original.detach().double().flatten(1)
    b = shifted_maps.detach().double().flatten(1)
    gap = (b - a).abs().amax(dim=1)
    scale = a.abs().amax(dim=1)
    ratio = gap / scale.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(scale > 0, ratio, torch.where(gap > 0, torch.full_like(gap, math.inf), torch.zeros_like(gap)))


def describe_shift(shift: Any) -> str:
    """The shift as the report names it: the number, or a tensor's shape and range."""
    torch = require_torch()
    if isinstance(shift, torch.Tensor):
        value = shift.detach().double()
        if value.numel() == 1:
            return f"{float(value):g}"
        return f"a tensor {tuple(shift.shape)} with values {float(value.min()):.3g} .. {float(value.max()):.3g}"
    return f"{float(shift):g}"


@dataclass
class InputShiftResult:
    """The outcome of :func:`input_shift_invariance`; ``to_dict()`` is JSON-serializable."""

    method: str
    method_options: dict[str, Any]
    pipeline: MapPipeline
    shift: str
    layer: str | None
    layer_type: str
    shift_baselines: str  # "shifted", "as given" or "n/a" (the method has no baselines)
    relative_difference: list[float]  # per input: max |a2 - a1| / max |a1|
    max_abs_difference: list[float]  # per input: max |a2 - a1|
    similarity_values: list[float]  # per input, after the pipeline (NaN: undefined, a constant map)
    similarity: str
    tolerance: float
    max_function_difference: float
    allowed_function_difference: float
    n_inputs: int
    device: str
    seed: int
    seconds: float
    reproduce: str = ""
    modality: str = "image"
    precision: str = "float64"
    original_maps: Any = field(default=None, repr=False)  # (k, ...) signed views of a1 / max|a1|, for figures
    shifted_maps: Any = field(default=None, repr=False)  # the same for a2, on a1's scale
    inputs_shown: Any = field(default=None, repr=False)
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def check(self) -> str:
        return "input_shift_invariance"

    @property
    def unit(self) -> str:
        return "images" if self.modality == "image" else "inputs"

    @property
    def over_tolerance(self) -> list[int]:
        """The inputs whose maps moved more than the tolerance (NaN counts as moved)."""
        return [i for i, d in enumerate(self.relative_difference) if not d <= self.tolerance]

    @property
    def max_relative_difference(self) -> float:
        values = self.relative_difference
        return max(values) if values else math.nan

    @property
    def passed(self) -> bool:
        return bool(self.relative_difference) and not self.over_tolerance

    def mean_similarity(self) -> float:
        finite = [v for v in self.similarity_values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check, "passed": self.passed, "method": self.method,
            "method_options": {k: jsonable(v) for k, v in self.method_options.items()},
            "preset": self.pipeline.to_dict(), "shift": self.shift, "layer": self.layer,
            "layer_type": self.layer_type, "baselines": self.shift_baselines,
            "relative_difference": [_json_float(v) for v in self.relative_difference],
            "max_abs_difference": [_json_float(v) for v in self.max_abs_difference],
            "max_relative_difference": _json_float(self.max_relative_difference),
            "tolerance": self.tolerance, "inputs_over_tolerance": self.over_tolerance,
            "similarity": self.similarity, "similarity_values": [_json_float(v) for v in self.similarity_values],
            "mean_similarity": _json_float(self.mean_similarity()),
            "max_function_difference": _json_float(self.max_function_difference),
            "allowed_function_difference": self.allowed_function_difference,
            "n_inputs": self.n_inputs, "device": self.device, "seed": self.seed, "seconds": self.seconds,
            "reproduce": self.reproduce, "modality": self.modality, "precision": self.precision,
        }

    def numbers(self) -> dict[str, Number]:
        return {
            "max_relative_difference": self.max_relative_difference, "tolerance": self.tolerance,
            "inputs_over_tolerance": len(self.over_tolerance), "mean_similarity": self.mean_similarity(),
            "max_function_difference": self.max_function_difference, "n_inputs": self.n_inputs,
            "seed": self.seed, "method": self.method, "preset": self.pipeline.name, "shift": self.shift,
        }

    def figures(self) -> list[Figure]:
        """The maps of (f, x), of (f_shifted, x + m) and their difference, all divided by max |a1|."""
        from ..reporting.figures import model_maps_figures

        if self.original_maps is None or self.shifted_maps is None:
            return []
        maps = {"f, x": self.original_maps, "f_shifted, x + m": self.shifted_maps,
                "difference": self.shifted_maps - self.original_maps}
        context = {k: v for k, v in self.figure_context.items() if k in ("modality", "feature_names", "tokens")}
        inputs = self.figure_context.get("inputs", self.inputs_shown)
        return model_maps_figures(maps=maps, inputs=inputs, n_inputs=self.n_inputs,
                                  method=f"{self.method} raw (channels summed, / max |a1|)", what="views",
                                  name="input_shift_maps", **context)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.check} [{self.method}, shift {self.shift}]: max |a2 - a1| / max |a1| = "
            f"{self.max_relative_difference:.3g} vs <= {self.tolerance:g}; {len(self.over_tolerance)}/{self.n_inputs} "
            f"{self.unit} over; N = {self.n_inputs}"
        )

    def table(self, rows: int = TABLE_ROWS) -> str:
        """The inputs whose maps moved most."""
        order = sorted(range(len(self.relative_difference)),
                       key=lambda i: -math.inf if math.isnan(self.relative_difference[i])
                       else -self.relative_difference[i])
        label = _SIMILARITY_LABELS.get(self.similarity, self.similarity)
        lines = [f"    {'input':>6}  {'max|a2-a1|/max|a1|':>19}  {'max|a2-a1|':>11}  {label:>9}  verdict"]
        for i in order[:rows]:
            d = self.relative_difference[i]
            lines.append(f"    {i:>6}  {d:>19.3g}  {self.max_abs_difference[i]:>11.3g}  "
                         f"{format_score(self.similarity_values[i]):>9}  {'same' if d <= self.tolerance else 'MOVED'}")
        if len(order) > rows:
            lines.append(f"    ... {len(order) - rows} more {self.unit} (all in result.to_dict())")
        return "\n".join(lines)

    def report(self) -> str:
        label = _SIMILARITY_LABELS.get(self.similarity, self.similarity)
        layer = (f"compensated at layer {self.layer!r} ({self.layer_type})" if self.layer is not None
                 else "no compensation needed (the model's output ignores this shift)")
        lines = [
            f"  check:       {self.check} (Kindermans et al.): raw maps of (f, x) against (f_shifted, x + m), "
            "f_shifted(x + m) = f(x)",
            f"  method:      {self.method}{format_options(self.method_options)}   target: original model's prediction",
            f"  shift:       m = {self.shift}; {layer}; max |f_shifted(x + m) - f(x)| = "
            f"{self.max_function_difference:.3g} (allowed {self.allowed_function_difference:.3g})",
            f"  baselines:   {self.shift_baselines}   precision: "
            + ("the model's own" if self.precision == "model" else "a float64 copy of the model"),
            f"  verdict:     every input's max |a2 - a1| / max |a1| <= {self.tolerance:g} (raw attributions, before "
            "abs and normalisation; Quantus InputInvariance: |a2 - a1| <= 1e-4 absolute)",
            f"  result:      max {self.max_relative_difference:.3g}; {len(self.over_tolerance)} of {self.n_inputs} "
            f"{self.unit} over the tolerance; mean {label} after {self.pipeline.name}: "
            f"{format_score(self.mean_similarity())} (reported, not gated)",
            self.table(),
            f"  {self.unit}: {self.n_inputs}   device: {self.device}   seed: {self.seed}   time: {self.seconds:.1f} s",
        ]
        if self.reproduce:
            lines.append(f"  reproduce:   {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        headline = (
            f"Saliency check failed: {self.method} maps change when the inputs are shifted by {self.shift} and the "
            f"model compensates the shift (max |a2 - a1| / max |a1| = {self.max_relative_difference:.3g} > "
            f"{self.tolerance:g} for {len(self.over_tolerance)} of {self.n_inputs} {self.unit})"
        )
        hint = (
            "  what next:   the model computes the same function of the data, so the change comes from the method "
            "reading the raw input values or a fixed reference point. Methods that multiply by the input (input x "
            "gradient) or integrate from a fixed zero baseline are not input-invariant (Kindermans et al.); use the "
            "gradient or SmoothGrad, or a baseline that moves with the data (shift_baselines=True, a 'blurred' or "
            "'uniform' baseline). Differences far below 1 from a method that should be invariant (integrated "
            "gradients with shift_baselines=True) with precision='model' are float32 rounding crossing a ReLU or "
            "max-pooling tie: rerun with precision='float64' (the default)."
        )
        return "\n".join([headline, self.report(), hint])


_SIMILARITY_LABELS = {"ssim": "SSIM", "spearman": "Spearman", "pearson": "Pearson"}


def _json_float(value: float) -> float | str:
    """NaN and infinity as strings (JSON has neither)."""
    return value if math.isfinite(value) else str(value)


def _shifted_options(resolved: Any, options: dict[str, Any], shift: torch.Tensor,
                     shift_baselines: bool) -> tuple[dict[str, Any], str]:
    """The method's options for (f2, x + m), and how the baselines were treated (for the report)."""
    torch = require_torch()
    has = isinstance(resolved, MethodSpec) and ("baselines" in resolved.defaults or "baselines" in options)
    if not has:
        return options, "n/a (the method takes no baselines)"
    value = options.get("baselines", resolved.defaults.get("baselines"))
    if isinstance(value, str) and value in ("uniform", "blurred"):
        return options, f"{value!r}, computed from each input, so it shifts with the inputs"
    if not shift_baselines:
        return options, f"as given ({_baseline_name(value)}), not shifted (shift_baselines=True shifts them)"
    if value is None or (isinstance(value, str) and value == "zero"):
        moved = shift.clone()
    elif isinstance(value, torch.Tensor):
        moved = value + shift
    elif is_real(value):
        moved = shift + float(value)
    else:
        raise SaliencyUsageError(
            f"shift_baselines=True cannot shift the baselines {value!r:.60}; pass a number, a tensor, 'zero', "
            "'uniform' or 'blurred'.")
    return {**options, "baselines": moved}, f"shifted with the inputs ({_baseline_name(value)} + m)"


def _baseline_name(value: Any) -> str:
    torch = require_torch()
    if isinstance(value, torch.Tensor):
        return f"a tensor {tuple(value.shape)}"
    return "zero" if value is None else repr(value)


def _signed_view(raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Raw maps with channels summed ((N, H, W) images, (N, 1, T) series, (N, 1, D) features), each
    divided by ``scale`` (its input's max |a1|), for the figure."""
    torch = require_torch()
    a = raw.detach().double()
    if a.dim() == 4:
        a = a.sum(dim=1)
    elif a.dim() == 3 and current_modality().name == "sequence":
        a = a.sum(dim=1, keepdim=True)
    elif a.dim() == 2:
        a = a[:, None]
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (a / torch.where(scale > 0, scale, torch.ones_like(scale)).view(shape)).float().cpu()


def _similarities(a1: torch.Tensor, a2: torch.Tensor, pipeline: MapPipeline, similarity: str) -> list[float]:
    """The similarity of the two maps of each input after the pipeline (NaN where undefined)."""
    from ..compare.metrics import compute_metric

    m1, m2 = pipeline_maps(a1, pipeline).double(), pipeline_maps(a2, pipeline).double()
    kwargs = pipeline.ssim.kwargs() if similarity == "ssim" else {}
    values = compute_metric(similarity, m1, m2, **kwargs)
    return [float(v) for v in values.double().cpu()]


def _refuse_tokens(inputs: Any) -> None:
    torch = require_torch()
    if current_call().modality == "text" or (isinstance(inputs, torch.Tensor) and not inputs.is_floating_point()):
        raise SaliencyUsageError(
            "input_shift_invariance shifts every input value by a constant, but these inputs are token ids: a "
            "token id is a category, so 'id + m' is another token (or none), not the same text shifted, and an "
            "embedding lookup has no bias to compensate it. The check applies to continuous inputs (images, "
            "series, feature vectors). For a text model, test its embedding-level network with float inputs.")


@dataclass(frozen=True)
class _Run:
    """What one batch's two explanation passes gave."""

    a1: Any
    a2: Any
    baselines: str


def _explain_both(model: torch.nn.Module, inputs: torch.Tensor, resolved: Any, options: dict[str, Any],
                  target: torch.Tensor, seed: int, batch_size: int | None, info: ShiftedModel,
                  shift_baselines: bool) -> _Run:
    """a1 = method(f, x) and a2 = method(f2, x + m), with the same target, seed and options (the
    baselines shifted when asked); the second inside the shifted model's block."""
    a1 = attribute(model, inputs, resolved, target, seed, batch_size, True, options,
                   what="attribution maps of the original model")
    moved, baselines = _shifted_options(resolved, options, info.shift, shift_baselines)
    with compensated(model, info):
        a2 = attribute(model, inputs + info.shift, resolved, target, seed, batch_size, True, moved,
                       what="attribution maps of the shifted model on the shifted inputs")
    return _Run(a1, a2, baselines)


def _check_options(tolerance: Any, function_tol: Any, seed: Any, batch_size: Any, keep_maps: Any,
                   shift_baselines: Any) -> tuple[float, int, int | None, int]:
    tolerance = check_number(tolerance, "tolerance", low=0.0,
                             hint="It is the largest max |a2 - a1| / max |a1| an input may have, e.g. 1e-4.")
    check_number(function_tol, "function_tol", low=0.0, low_open=True,
                 hint="It bounds max |f_shifted(x + m) - f(x)| relative to 1 + max |f(x)|, e.g. 1e-5.")
    check_flag(shift_baselines, "shift_baselines")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the inputs one explainer call sees; None explains all at once.")
    keep_maps = check_count(keep_maps, "keep_maps", minimum=0, hint="It is the number of maps kept for the report.")
    return float(tolerance), check_seed(seed), batch_size, keep_maps


PRECISIONS = ("model", "float64")


def _reproduce(name: str, shift: Any, shift_baselines: bool, precision: str, seed: int) -> str:
    """The call that reruns the check (a tensor shift is named ``shift``, with what it is)."""
    torch = require_torch()
    tensor = isinstance(shift, torch.Tensor) and shift.numel() > 1
    given = "shift" if tensor else describe_shift(shift)
    return (f"pytest_saliency.input_shift_invariance(model, inputs, method={name!r}, shift={given}, "
            f"shift_baselines={shift_baselines}, precision={precision!r}, seed={seed})"
            + (f"  # shift: {describe_shift(shift)}" if tensor else ""))


def _in_precision(model: torch.nn.Module, inputs: torch.Tensor, method_kwargs: dict[str, Any],
                  precision: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The model, inputs and method options the check runs: as given, or a float64 copy of them."""
    torch = require_torch()
    precision = check_choice(precision, "precision", PRECISIONS,
                             "'model' runs the model as it is; 'float64' a float64 copy of it.")
    if precision == "model":
        return model, inputs, method_kwargs
    try:
        twin = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad(), model_in_eval_mode(twin, True):
            call_model(twin, inputs[:1].to(torch.float64), rows=[0])  # a forward that mixes in float32 fails here
    except Exception as error:  # whatever stops the copy from running, the remedy is the same
        raise SaliencyUsageError(
            f"precision='float64' (the default) runs a float64 copy of the model, and {type(model).__name__} cannot "
            f"be copied or run in float64 ({type(error).__name__}: {str(error)[:160]}). Pass precision='model' to "
            "run the model as it is (float32 rounding of the shifted inputs may then move a few values of an "
            "invariant method's maps, see the docstring).") from error
    options = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in method_kwargs.items()}
    return twin, inputs.to(torch.float64), options


def _combined(parts: list[InputShiftResult], arguments: dict[str, Any], stopped: str) -> InputShiftResult:
    """One result of a stream's batches: every input's numbers, the verdict on all of them."""
    same_across_batches(parts, "layer", "compensated layers")
    first = parts[0]
    return replace(
        first,
        relative_difference=[v for p in parts for v in p.relative_difference],
        max_abs_difference=[v for p in parts for v in p.max_abs_difference],
        similarity_values=[v for p in parts for v in p.similarity_values],
        max_function_difference=max(p.max_function_difference for p in parts),
        # the tolerance scales with the largest |f(x)| of all inputs, as over one tensor
        allowed_function_difference=max(p.allowed_function_difference for p in parts),
        n_inputs=sum(p.n_inputs for p in parts), seconds=sum(p.seconds for p in parts),
    )


def _slim(part: InputShiftResult) -> InputShiftResult:
    return replace(part, original_maps=None, shifted_maps=None, inputs_shown=None,
                   figure_context={"modality": part.modality})


@rng_isolated
@streams(StreamSpec(_combined, _slim))
@passes_model_call
def input_shift_invariance(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    shift: float | torch.Tensor = DEFAULT_SHIFT,
    shift_baselines: bool = False,
    first_layer: str | None = None,
    tolerance: float = SHIFT_TOLERANCE,
    precision: str = "float64",
    function_tol: float = FUNCTION_TOL,
    preset: str | MapPipeline | None = None,
    similarity: str | None = None,
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    keep_maps: int = 4,
    reproduce: str = "",
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> InputShiftResult:
    """Are ``method``'s maps the same for the model and its input-shifted twin? (module docstring)

    ``shift`` (m): a number or a tensor that broadcasts to one input (default -1.0, Kindermans'
    [0, 1] to [-1, 0]). ``first_layer``: the layer that absorbs the shift (default: the first
    ``nn.Linear`` or convolution whose input the shift changes); the shifted model must compute
    the model's function within ``function_tol`` (relative to 1 + max |f(x)|) or the check is
    refused with a :class:`SaliencyUsageError` naming the layer. ``shift_baselines=True`` moves
    the method's baselines with the data (b + m). Verdict: every input's ``max |a2 - a1| /
    max |a1|`` of the raw attributions <= ``tolerance`` (1e-4). ``preset`` and ``similarity``
    (default: the modality's) only shape the reported similarity.

    ``precision="float64"`` (default) runs both models on a float64 copy of the model (the model
    itself is never converted); ``"model"`` runs the model as it is. The property is
    mathematical, and float32 rounding confounds it: ``x + m`` is not exact (``(x + m) - m != x``
    for inputs that are not on the shifted grid, e.g. normalised images), a piecewise-linear
    network's gradient jumps where a ReLU or a max pooling's tie is crossed, and a rounding
    error of 1e-7 crosses some: the ResNet-18 layout's float32 gradient maps of normalised
    images move by 6% of their maximum at a few pixels, integrated gradients' with a shifted
    baseline by 0.3% on [0, 1] images (its path ``alpha * x + m`` rounds near the baseline).
    In float64 both are 0. The model is bit-identical afterwards and no global RNG state changes.
    """
    start = time.perf_counter()
    check_model(model)
    _refuse_tokens(inputs)
    inputs = checked_inputs(inputs, model)
    tolerance, seed, batch_size, keep_maps = _check_options(tolerance, function_tol, seed, batch_size, keep_maps,
                                                            shift_baselines)
    model, inputs, method_kwargs = _in_precision(model, inputs, method_kwargs, precision)
    pipeline = get_pipeline(preset)
    similarity = default_similarity(similarity)
    resolved, name, options = prepare_method(method, model, inputs, method_kwargs)
    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)
    info = build_shifted(model, inputs, shift, layer=first_layer, function_tol=function_tol, seed=seed,
                         batch_size=batch_size)
    run = _explain_both(model, inputs, resolved, options, fixed_target, seed, batch_size, info, shift_baselines)
    a1, a2 = run.a1, run.a2
    if a1.shape != a2.shape:
        raise SaliencyUsageError(
            f"{name} gave maps of shape {tuple(a1.shape)} for the model and {tuple(a2.shape)} for the shifted one; "
            "the check compares them value by value.")
    scale = a1.detach().double().flatten(1).abs().amax(dim=1)
    k = min(keep_maps, int(inputs.shape[0]))
    return InputShiftResult(
        method=name, method_options=options, pipeline=pipeline, shift=describe_shift(shift), layer=info.layer,
        layer_type=info.layer_type, shift_baselines=run.baselines,
        relative_difference=relative_differences(a1, a2).tolist(),
        max_abs_difference=(a2.double() - a1.double()).abs().flatten(1).amax(dim=1).tolist(),
        similarity_values=_similarities(a1, a2, pipeline, similarity), similarity=similarity, tolerance=tolerance,
        max_function_difference=info.max_function_difference, allowed_function_difference=info.allowed_difference,
        n_inputs=int(inputs.shape[0]), device=str(inputs.device), seed=seed, seconds=time.perf_counter() - start,
        reproduce=reproduce or _reproduce(name, shift, shift_baselines, precision, seed),
        modality=current_modality().name, precision=precision,
        original_maps=_signed_view(a1[:k], scale[:k]) if k else None,
        shifted_maps=_signed_view(a2[:k], scale[:k]) if k else None,
        inputs_shown=inputs[:k].detach().float().cpu() if k else None,
        figure_context=figure_context(inputs, k),
    )


@rng_isolated
@passes_model_call
def assert_input_shift_invariant(
    model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency", **options: Any
) -> InputShiftResult:
    """Input-shift invariance (Kindermans et al.): the maps of the model and of its input-shifted
    twin must be the same, every input's ``max |a2 - a1| / max |a1|`` <= ``tolerance`` (1e-4).

    Options are those of :func:`input_shift_invariance` plus the method's own hyperparameters.
    Returns the result when it passes; raises :class:`SaliencyCheckFailed` with the per-input
    table otherwise.
    """
    __tracebackhide__ = True
    result = input_shift_invariance(model, inputs, method, **options)
    return raise_if_failed(result)


__all__ = ["DEFAULT_SHIFT", "PRECISIONS", "SHIFT_TOLERANCE", "InputShiftResult", "assert_input_shift_invariant",
           "describe_shift", "input_shift_invariance", "relative_differences"]
