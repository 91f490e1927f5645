"""Input checks shared by every public function.

Each check raises :class:`SaliencyUsageError` saying what was wrong, what was expected and how
to fix it, so that a user never has to decode a traceback from deep inside torch or captum.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from ._torch import require_torch
from .exceptions import SaliencyUsageError


def check_model(model: Any) -> None:
    """The model must be an ``nn.Module`` that owns at least one parameter."""
    torch = require_torch()
    if not isinstance(model, torch.nn.Module):
        raise SaliencyUsageError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Pass the network itself (not a function or a state_dict); wrap a plain callable "
            "in an nn.Module whose forward calls it."
        )
    if next(model.parameters(), None) is None:
        raise SaliencyUsageError(
            f"model {type(model).__name__} has no parameters, so there is nothing to randomize "
            "or compare. Pass the trained network, not a parameter-free wrapper."
        )
    lazy = torch.nn.parameter.UninitializedTensorMixin
    uninitialized = [name for name, p in model.named_parameters() if isinstance(p, lazy)]
    if uninitialized:
        raise SaliencyUsageError(
            f"model {type(model).__name__} has uninitialized lazy parameters {uninitialized[:5]}"
            f"{' ...' if len(uninitialized) > 5 else ''}: they hold no values yet. Run the model once on a batch "
            "(which initializes them) before the check; a lazy module that no forward pass reaches stays "
            "uninitialized and should be removed."
        )


def model_device(model: Any) -> Any:
    """The single device holding the model's parameters (an error if they are spread out)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise SaliencyUsageError(
            f"model parameters live on several devices ({sorted(str(d) for d in devices)}). "
            "Move the whole model to one device (model.to(device)) before running saliency checks."
        )
    return devices.pop()


def check_inputs(inputs: Any, model: Any = None, *, name: str = "inputs") -> None:
    """Inputs must be a finite floating tensor of shape (N, C, H, W) or (N, D) on the model's device."""
    torch = require_torch()
    if not isinstance(inputs, torch.Tensor):
        raise SaliencyUsageError(
            f"{name} must be a torch.Tensor of shape (N, C, H, W) or (N, D), got "
            f"{type(inputs).__name__}. Convert with torch.as_tensor(x, dtype=torch.float32)."
        )
    if not inputs.is_floating_point():
        raise SaliencyUsageError(
            f"{name} must be a floating-point tensor, got dtype {inputs.dtype}. "
            f"Convert with {name}.float() (and scale images to the range the model was trained on)."
        )
    if inputs.dim() not in (2, 4):
        raise SaliencyUsageError(
            f"{name} must have shape (N, C, H, W) for images or (N, D) for feature vectors, got "
            f"shape {tuple(inputs.shape)}. Add the batch dimension with {name}.unsqueeze(0) for a "
            "single example, or a channel dimension with unsqueeze(1) for (N, H, W) images."
        )
    if inputs.shape[0] < 1:
        raise SaliencyUsageError(f"{name} is an empty batch (N = 0); pass at least one example.")
    if model is not None:
        device = model_device(model)
        if inputs.device != device:
            raise SaliencyUsageError(
                f"model is on {device} but {name} are on {inputs.device}. Move them to one device, "
                f"e.g. {name} = {name}.to({str(device)!r}) (or model.to({str(inputs.device)!r}))."
            )
    check_finite(inputs, name)


def all_finite(tensor: Any) -> bool:
    """True when no value is NaN or inf, checked with one reduction instead of a mask.

    NaN and inf propagate through a sum, so a finite sum proves every value finite; only a sum
    that overflowed (or a real NaN/inf) takes the exact, slower path. Checks run on every map of
    every randomized state, so this matters for speed.
    """
    torch = require_torch()
    if not tensor.is_floating_point() and not tensor.is_complex():
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: Any, name: str) -> None:
    """NaN or inf anywhere makes every similarity meaningless: refuse it loudly."""
    torch = require_torch()
    if all_finite(tensor):
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        count = int(bad.sum())
        raise SaliencyUsageError(
            f"{name} contain {count} NaN or infinite value(s) out of {tensor.numel()}. "
            "Check the data pipeline and the model's numerics (e.g. a log of zero, an exploding "
            "layer); saliency checks need finite values."
        )


def unknown_choice(kind: str, value: object, valid: Iterable[str], hint: str = "") -> SaliencyUsageError:
    """An error for an unknown name that lists the valid ones and the closest matches."""
    valid = list(valid)
    close = difflib.get_close_matches(str(value), valid, n=3)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return SaliencyUsageError(
        f"unknown {kind} {value!r}.{suggestion} Valid {kind}s: {', '.join(valid)}.{(' ' + hint) if hint else ''}"
    )


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite real number (not a bool) within ``[low, high]`` (ends open when asked), as a float.

    For thresholds and tolerances: NaN would make every comparison fail and an infinity every
    comparison pass, so neither is ever a valid gate.
    """
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    number = float(value) if ok else math.nan
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        left = "" if low is None else f"{low:g} {'<' if low_open else '<='} "
        right = "" if high is None else f" {'<' if high_open else '<='} {high:g}"
        raise SaliencyUsageError(
            f"{name} must be a finite number with {left}{name}{right}, got {value!r:.80}."
            f"{(' ' + hint) if hint else ''}"
        )
    return number


def check_count(value: Any, name: str, *, minimum: int = 1, allow_none: bool = False, hint: str = "") -> int | None:
    """An integer (numpy integers included, bools not) of at least ``minimum``, as an int; ``None``
    passes through when ``allow_none``."""
    import operator

    if value is None and allow_none:
        return None
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise SaliencyUsageError(
            f"{name} must be {expected}, got {value!r:.80}.{(' ' + hint) if hint else ''}"
        )
    return count


def check_choice(value: Any, name: str, valid: Iterable[str], hint: str = "") -> str:
    """One of the names in ``valid`` (exactly; no stripping or case folding), else a usage error
    that lists them and the closest matches."""
    valid = list(valid)
    if not isinstance(value, str) or value not in valid:
        raise unknown_choice(name, value, valid, hint)
    return value
