"""Which values each named method's options accept: one set of rules for every entry point.

:func:`pytest_saliency.maps.explainers.prepare_method` (and so ``explain``, the randomization checks,
the faithfulness scores...) and the hyperparameter sweeps check options with the same rules, so a
value is refused with the same message wherever it is given: ``n_steps=0`` or ``nt_samples=-1``
get a :class:`SaliencyUsageError` naming the option, what it must be, and an example, instead of
a traceback from inside captum. :func:`check_method_options` applies them, with the checks that
need the inputs (a baseline tensor's shape, occlusion's windows), to a named method's options.

It is also the one place that writes option values for people (:func:`format_value`,
:func:`format_options`): results' reports, the sweeps' tables and the faithfulness rankings show
a tensor option as its shape, never as its values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..core.jsonable import jsonable
from ..core.torchtools import require_torch
from ..core.validation import is_count, is_real, is_tensor_like
from ..exceptions import SaliencyUsageError
from .methods import EXTRA_OPTIONS, METHODS, MethodSpec, occlusion_windows

if TYPE_CHECKING:
    import torch

IG_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
BASELINE_KINDS = ("zero", "uniform", "blurred")


def _optional_count(value: Any) -> bool:
    return value is None or is_count(value)


def _window(value: Any) -> bool:
    if value is None or is_count(value):
        return True
    return isinstance(value, tuple) and len(value) > 0 and all(is_count(v) for v in value)


def _baselines(value: Any) -> bool:
    if value is None or is_tensor_like(value):
        return True
    return (isinstance(value, str) and value in BASELINE_KINDS) or is_real(value)


# name -> (predicate, what is expected, an example)
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "nt_samples": (is_count, "a positive int (noisy samples averaged)", "nt_samples=100"),
    "n_steps": (is_count, "a positive int (integration steps)", "n_steps=50"),
    "n_samples": (is_count, "a positive int (perturbation samples)", "n_samples=200"),
    "n_baselines": (is_count, "a positive int", "n_baselines=10"),
    "grid": (is_count, "a positive int (grid x grid superpixels)", "grid=8"),
    "n_segments": (lambda v: is_count(v, 2), "an int >= 2 (SLIC superpixels per image)", "n_segments=50"),
    "perturbations_per_eval": (is_count, "a positive int", "perturbations_per_eval=16"),
    "nt_samples_batch_size": (_optional_count, "a positive int or None", "nt_samples_batch_size=50"),
    "internal_batch_size": (_optional_count, "a positive int or None", "internal_batch_size=64"),
    "noise_level": (lambda v: is_real(v) and v >= 0, "a finite float >= 0 (noise std / input range)", "noise_level=0.15"),
    "stdevs": (lambda v: v is None or (is_real(v) and v >= 0), "a finite float >= 0", "stdevs=0.1"),
    "input_range": (lambda v: is_real(v) and v > 0, "a finite float > 0", "input_range=1.0"),
    "alpha": (lambda v: is_real(v) and v > 0, "a finite float > 0 (Lasso penalty)", "alpha=0.01"),
    "abs": (lambda v: isinstance(v, bool), "True or False", "abs=False"),
    "relu_attributions": (lambda v: isinstance(v, bool), "True or False", "relu_attributions=True"),
    "method": (lambda v: isinstance(v, str) and v in IG_RULES, f"one of {', '.join(IG_RULES)}", "method='gausslegendre'"),
    "integration_method": (
        lambda v: isinstance(v, str) and v in IG_RULES, f"one of {', '.join(IG_RULES)}",
        "integration_method='gausslegendre'",
    ),
    "interpolate_mode": (lambda v: isinstance(v, str) and v in INTERPOLATE_MODES, f"one of {', '.join(INTERPOLATE_MODES)}", "interpolate_mode='bilinear'"),
    "window": (_window, "a positive int (square side in pixels), a tuple of positive ints, or None", "window=5"),
    "stride": (_window, "a positive int, a tuple of positive ints, or None", "stride=2"),
    "baselines": (
        _baselines, f"one of {', '.join(map(repr, BASELINE_KINDS))}, a finite float, or a tensor", "baselines='zero'",
    ),
    "seed": (lambda v: is_count(v, 0), "an int >= 0", "seed=1"),
    "layer": (lambda v: True, "a module name, a module or None", "layer='conv2'"),
    "feature_mask": (lambda v: v is None or is_tensor_like(v), "an integer tensor or None", "feature_mask=mask"),
}


def check_option_value(method: str, name: str, value: Any, where: str = "sweep") -> None:
    rule = _RULES.get(name)
    if rule is None:
        return
    predicate, expected, example = rule
    try:
        ok = bool(predicate(value))
    except Exception:  # a weird object that cannot even be compared
        ok = False
    if not ok:
        raise SaliencyUsageError(
            f"{where} for {method}: hyperparameter {name!r} must be {expected}, got {value!r} "
            f"({type(value).__name__}). Fix the value, e.g. {example}."
        )


def check_method_options(spec: MethodSpec, inputs: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
    """A named method's options, checked: known names, values by the rules above, a baseline
    tensor's shape and device, occlusion's windows. Returns a copy (SmoothGrad's ``stdevs`` as the
    one float captum takes)."""
    allowed = set(spec.defaults) | set(EXTRA_OPTIONS.get(spec.name, ())) | {"memory_budget"}
    extra = sorted(set(options) - allowed)
    if extra:
        valid = ", ".join(sorted(allowed)) or "none (this method has no hyperparameters)"
        raise SaliencyUsageError(f"unknown option(s) {extra} for method {spec.name!r}; valid options: {valid}.")
    options = dict(options)
    if spec.name == "smoothgrad" and options.get("stdevs") is not None:
        options["stdevs"] = _noise_std(options["stdevs"])
    for name, value in options.items():
        if not (value is None and name in spec.defaults and spec.defaults[name] is None):  # the documented default
            check_option_value(spec.name, name, value, where="options")
    if options.get("baselines") is not None:
        check_baselines(spec.name, inputs, options["baselines"])
    if spec.name == "occlusion":
        check_occlusion_windows(inputs, options)
    return options


def _noise_std(value: Any) -> float:
    """SmoothGrad's ``stdevs`` as the one float captum takes for a single input tensor."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not (is_real(value) and value >= 0):
        raise SaliencyUsageError(
            f"smoothgrad's stdevs must be a finite number >= 0 (the noise standard deviation), got {value!r}. "
            "Or leave it out and set noise_level, a fraction of the inputs' range."
        )
    return float(value)


def check_baselines(method: str, inputs: torch.Tensor, value: Any) -> None:
    """A baseline tensor must broadcast to the inputs like captum expects, on their device and dtype."""
    torch = require_torch()
    if not isinstance(value, torch.Tensor):
        if is_tensor_like(value):  # an array
            raise SaliencyUsageError(
                f"baselines for {method} must be a torch.Tensor, got {type(value).__name__}. Convert it with "
                "torch.as_tensor(baselines, dtype=inputs.dtype, device=inputs.device)."
            )
        return
    shape, one = tuple(value.shape), tuple(inputs.shape[1:])
    if value.is_meta or value.device != inputs.device:
        where = "on the meta device, which holds no values" if value.is_meta else f"on {value.device}"
        raise SaliencyUsageError(
            f"baselines for {method} are {where}, but the inputs are on {inputs.device}. Pass a baseline "
            "tensor with real values on the inputs' device: baselines.to(inputs)."
        )
    if value.dtype != inputs.dtype:
        raise SaliencyUsageError(
            f"baselines for {method} are {value.dtype} but the inputs are {inputs.dtype}. Convert them "
            "with baselines.to(inputs)."
        )
    if shape not in ((), one, (1, *one), tuple(inputs.shape)):
        raise SaliencyUsageError(
            f"baselines for {method} has shape {shape}, which does not broadcast to the inputs: expected the "
            f"inputs' shape {tuple(inputs.shape)} (one baseline per input), one input's shape {one} or "
            f"{(1, *one)} (shared by every input), or a scalar tensor. Reshape the baseline, or pass a "
            "float or 'zero', 'uniform', 'blurred'."
        )


def check_occlusion_windows(inputs: torch.Tensor, options: dict[str, Any]) -> None:
    """captum's Occlusion needs one window size and stride per input dimension after the batch, each
    window at most the input's size and each stride at most the window."""
    o = {**METHODS["occlusion"].defaults, **options}
    shape, strides = occlusion_windows(inputs, o)
    sizes = tuple(inputs.shape[1:])
    images = inputs.dim() in (3, 4)  # the window slides over the last axes, across all channels
    described = "x".join(map(str, sizes[1:])) + " inputs" if images else f"inputs of shape {sizes}"
    for name, given, value in (("window", o["window"], shape), ("stride", o["stride"], strides)):
        if len(value) != len(sizes):
            raise SaliencyUsageError(
                f"occlusion's {name}={given!r} has {len(value)} entries, but {described} need {len(sizes)} "
                f"entries (one per dimension of {sizes}). Pass an int, or a tuple of {len(sizes)} ints."
            )
    if any(w > size for w, size in zip(shape, sizes)):
        largest = min(sizes[1:]) if images and isinstance(o["window"], int) else sizes
        raise SaliencyUsageError(
            f"occlusion's window={o['window']!r} does not fit the {described} (of shape {sizes}): the "
            f"largest allowed is {largest}. Pass a smaller window, or None for the default "
            "(an eighth of the smaller side)."
        )
    if any(step > w for step, w in zip(strides, shape)):
        largest = min(shape[1:]) if images and isinstance(o["stride"], int) else shape
        raise SaliencyUsageError(
            f"occlusion's stride={o['stride']!r} is larger than the window {shape} (captum would skip "
            f"pixels): the largest allowed is {largest}. Pass a smaller stride, or a larger window."
        )


# Filled in from the inputs and the memory budget, not chosen by the user: not worth printing.
DERIVED_OPTIONS = ("input_range", "input_min", "input_max", "internal_batch_size", "nt_samples_batch_size",
                    "perturbations_per_eval")


def format_value(value: Any, width: int | None = None) -> str:
    """An option value as people read it in messages and reports: a tensor or array as its shape,
    ``tensor(1, 3, 16, 16)`` (as ``jsonable(tensors="shape")`` writes it; a 0-d one as its number),
    a float by ``:g``, a string quoted, a mapping as ``{k=v, ...}``, tuples and lists item by item,
    an object whose ``repr`` spans lines (a module holding submodules) as ``Name(...)``, anything
    else by ``str``. ``width``: cut to this many characters, ``...`` included."""
    if is_tensor_like(value):
        value = jsonable(value, tensors="shape")
        text = value if isinstance(value, str) else format_value(value)
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, tuple):
        text = "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    elif isinstance(value, list):
        text = "[" + ", ".join(format_value(v) for v in value) + "]"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
        if "\n" in text:
            text = f"{type(value).__name__}(...)"
    return text if width is None or len(text) <= width else text[:max(width - 3, 0)] + "..."


def format_options(options: dict[str, Any]) -> str:
    """`` (name=value, ...)`` of the options a user chose (derived and private ones left out), by
    :func:`format_value`; empty when there are none."""
    shown = {k: v for k, v in options.items() if k not in DERIVED_OPTIONS and not k.startswith("_")}
    if not shown:
        return ""
    return " (" + ", ".join(f"{k}={format_value(v)}" for k, v in sorted(shown.items())) + ")"



# The predicates the rules are built from come from core.validation; they are importable from here
# with the rules for code that checks option values.
__all__ = [
    "BASELINE_KINDS", "DERIVED_OPTIONS", "IG_RULES", "INTERPOLATE_MODES", "check_baselines", "check_method_options",
    "check_occlusion_windows", "check_option_value", "format_options", "format_value",
]
