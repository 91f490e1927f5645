"""Which values each named method's options accept: one set of rules for every entry point.

:func:`pytest_saliency.maps.explainers.prepare_method` (and so ``explain``, the randomization checks,
the faithfulness scores...) and the hyperparameter sweeps check options with the same rules, so a
value is refused with the same message wherever it is given: ``n_steps=0`` or ``nt_samples=-1``
get a :class:`SaliencyUsageError` naming the option, what it must be, and an example, instead of
a traceback from inside captum.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from ..exceptions import SaliencyUsageError

IG_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
BASELINE_KINDS = ("zero", "uniform", "blurred")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def _optional_positive_int(value: Any) -> bool:
    return value is None or _positive_int(value)


def _window(value: Any) -> bool:
    if value is None or _positive_int(value):
        return True
    return isinstance(value, tuple) and len(value) > 0 and all(_positive_int(v) for v in value)


def is_tensor_like(value: Any) -> bool:
    return type(value).__name__ == "Tensor" or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _baselines(value: Any) -> bool:
    if value is None or is_tensor_like(value):
        return True
    return (isinstance(value, str) and value in BASELINE_KINDS) or is_real(value)


# name -> (predicate, what is expected, an example)
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "nt_samples": (_positive_int, "a positive int (noisy samples averaged)", "nt_samples=100"),
    "n_steps": (_positive_int, "a positive int (integration steps)", "n_steps=50"),
    "n_samples": (_positive_int, "a positive int (perturbation samples)", "n_samples=200"),
    "n_baselines": (_positive_int, "a positive int", "n_baselines=10"),
    "grid": (_positive_int, "a positive int (grid x grid superpixels)", "grid=8"),
    "n_segments": (lambda v: is_int(v) and v >= 2, "an int >= 2 (SLIC superpixels per image)", "n_segments=50"),
    "perturbations_per_eval": (_positive_int, "a positive int", "perturbations_per_eval=16"),
    "nt_samples_batch_size": (_optional_positive_int, "a positive int or None", "nt_samples_batch_size=50"),
    "internal_batch_size": (_optional_positive_int, "a positive int or None", "internal_batch_size=64"),
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
    "seed": (lambda v: is_int(v) and v >= 0, "an int >= 0", "seed=1"),
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


# Filled in from the inputs and the memory budget, not chosen by the user: not worth printing.
DERIVED_OPTIONS = ("input_range", "input_min", "input_max", "internal_batch_size", "nt_samples_batch_size",
                    "perturbations_per_eval")


def format_options(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k not in DERIVED_OPTIONS and not k.startswith("_")}
    if not shown:
        return ""
    return " (" + ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items())) + ")"

