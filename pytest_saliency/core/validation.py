"""Argument validation shared by every public function.

Two kinds of helpers, named so that a reader knows which one a call is:

* **predicates** (``is_*``) answer True or False and never raise: :func:`is_int`, :func:`is_real`,
  :func:`is_count`, :func:`is_tensor_like` (the per-method option rules of
  :mod:`pytest_saliency.maps.options` are built from them);
* **checkers** (``check_*``) return the value in its canonical type (an int, a float, a bool) or
  raise a :class:`SaliencyUsageError` saying what was wrong, what was expected and how to fix it,
  so that a user never has to decode a traceback from deep inside torch or captum.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

from ..exceptions import SaliencyUsageError
from .stream import is_stream
from .torchtools import require_torch

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------
# Predicates
# --------------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """An integer (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number (ints, floats, numpy scalars), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def is_count(value: Any, minimum: int = 1) -> bool:
    """An integer (:func:`is_int`) of at least ``minimum``."""
    return is_int(value) and value >= minimum


def is_tensor_like(value: Any) -> bool:
    """A tensor or an array (anything with a shape and a dtype), without importing torch."""
    return type(value).__name__ == "Tensor" or (hasattr(value, "shape") and hasattr(value, "dtype"))


# --------------------------------------------------------------------------------------------
# Checkers
# --------------------------------------------------------------------------------------------


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


def model_device(model: torch.nn.Module) -> torch.device:
    """The single device holding the model's parameters (an error if they are spread out)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise SaliencyUsageError(
            f"model parameters live on several devices ({sorted(str(d) for d in devices)}). "
            "Move the whole model to one device (model.to(device)) before running saliency checks."
        )
    return devices.pop()


def checked_inputs(inputs: Any, model: torch.nn.Module | None = None, *, name: str = "inputs") -> torch.Tensor:
    """``inputs`` after :func:`check_inputs`, typed as the tensor it is (the body of a streamed
    entry point sees one batch; see :mod:`pytest_saliency.checks.streaming`)."""
    check_inputs(inputs, model, name=name)
    return inputs


def check_inputs(inputs: Any, model: torch.nn.Module | None = None, *, name: str = "inputs") -> None:
    """Inputs must be a finite floating tensor of shape (N, C, H, W), (N, C, T) or (N, D) on the
    model's device."""
    torch = require_torch()
    if is_stream(inputs):
        raise SaliencyUsageError(
            f"{name} must be a tensor here, got a {type(inputs).__name__} of batches: this function returns or "
            f"compares something for every input at once. Pass the batches one at a time (e.g. torch.cat([... "
            f"for x, y in loader])); the checks themselves take a loader (pytest_saliency.checks.streaming)."
        )
    if not isinstance(inputs, torch.Tensor):
        raise SaliencyUsageError(
            f"{name} must be a torch.Tensor of shape (N, C, H, W), (N, C, T) or (N, D), got "
            f"{type(inputs).__name__}. Convert with torch.as_tensor(x, dtype=torch.float32)."
        )
    token_ids = inputs.dim() == 2 and not inputs.is_floating_point() and not inputs.is_complex() \
        and inputs.dtype != torch.bool
    if not inputs.is_floating_point() and not token_ids:
        raise SaliencyUsageError(
            f"{name} must be a floating-point tensor (or integer token ids of shape (N, L)), got dtype "
            f"{inputs.dtype} and shape {tuple(inputs.shape)}. Convert with {name}.float() (and scale images to "
            "the range the model was trained on)."
        )
    if inputs.dim() not in (2, 3, 4):
        raise SaliencyUsageError(
            f"{name} must have shape (N, C, H, W) for images, (N, C, T) for series or (N, D) for feature "
            f"vectors, got shape {tuple(inputs.shape)}. Add the batch dimension with {name}.unsqueeze(0) for "
            "a single example."
        )
    if inputs.shape[0] < 1:
        raise SaliencyUsageError(f"{name} is an empty batch (N = 0); pass at least one example.")
    if model is not None:
        device = model_device(model)
        if device.type == "meta":
            raise SaliencyUsageError(
                f"model {type(model).__name__} is on the meta device: its parameters have shapes but no values, "
                "so there is nothing to explain. Materialize it first, e.g. model = model.to_empty(device='cpu') "
                "followed by model.load_state_dict(state_dict)."
            )
    if inputs.device.type == "meta":
        raise SaliencyUsageError(
            f"{name} are on the meta device: they have a shape but no values. Pass real data, e.g. a batch "
            "from the data loader, on the model's device."
        )
    if model is not None:
        if inputs.device != device:
            raise SaliencyUsageError(
                f"model is on {device} but {name} are on {inputs.device}. Move them to one device, "
                f"e.g. {name} = {name}.to({str(device)!r}) (or model.to({str(inputs.device)!r}))."
            )
        _check_input_dtype(inputs, model, name)
        if inputs.dim() == 3:
            _check_series_run(inputs, model, name)
        if token_ids:
            _check_embedding(model, name)
    check_finite(inputs, name)


def _check_embedding(model: torch.nn.Module, name: str) -> None:
    """Integer inputs (N, L) are token ids, explained at an embedding module: one must exist."""
    from .forward import current_call

    torch = require_torch()
    text = current_call().text
    if (text is not None and text.embedding is not None) or any(isinstance(m, torch.nn.Embedding)
                                                                for m in model.modules()):
        return
    raise SaliencyUsageError(
        f"{name} are integers of shape (N, L), taken as token ids, but {type(model).__name__} has no nn.Embedding "
        f"to explain them at. Feature vectors: convert them with {name}.float(). Token ids read by another module: "
        "name it with modality=Text(embedding='<module name>')."
    )


def _check_series_run(inputs: torch.Tensor, model: torch.nn.Module, name: str) -> None:
    """3-D inputs are series (N, C, T); a model that cannot run on one was most likely given
    images without their channel dimension: say so before a check fails inside the model."""
    from .forward import call_model, current_call
    from .rng import seeded
    from .torchtools import model_in_eval_mode

    torch = require_torch()
    convs = {type(m) for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))}
    if convs == {torch.nn.Conv2d} and not current_call().modality_given:
        raise SaliencyUsageError(
            f"the {name} have shape {tuple(inputs.shape)}, which is taken as series (N, C, T), but "
            f"{type(model).__name__} has Conv2d layers and no Conv1d: images need the shape (N, C, H, W). Add the "
            f"channel dimension with {name}.unsqueeze(1), or pass modality='sequence' if these are series."
        )
    series_layers = (torch.nn.Conv1d, torch.nn.RNNBase, torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)
    if not convs and not any(isinstance(m, series_layers) for m in model.modules()) \
            and not current_call().modality_given:
        raise SaliencyUsageError(
            f"the {name} have shape {tuple(inputs.shape)}: series (N, C, T) or images without their channel dimension "
            f"(N, H, W)? {type(model).__name__} has no layer that says which (a Conv1d, recurrent or attention layer "
            f"for series, a Conv2d for images), and the two give different maps (a series' map sums its channels). "
            f"Pass modality='sequence' if these are series, or add the channel dimension with {name}.unsqueeze(1) "
            "for images."
        )
    try:
        with model_in_eval_mode(model, True), torch.no_grad(), seeded(0, inputs.device):
            call_model(model, inputs[:1], rows=[0])
    except SaliencyUsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the likely cause
        raise SaliencyUsageError(
            f"the model ({type(model).__name__}) cannot run on one of the {name} of shape {tuple(inputs.shape[1:])} "
            f"({type(exc).__name__}: {str(exc)[:200]}). Inputs of 3 dimensions are taken as series (N, C, T); "
            f"images need the shape (N, C, H, W): add the channel dimension with {name}.unsqueeze(1)."
        ) from exc


def _check_input_dtype(inputs: torch.Tensor, model: torch.nn.Module, name: str) -> None:
    """Inputs of another floating dtype than the model's parameters must be ones the model accepts.

    A model may convert its inputs itself (``x.float()`` in ``forward``), so a differing dtype is
    refused only when one forward pass of the first input fails; that pass runs in eval mode,
    without gradients and with the random generators restored afterwards, so it changes nothing.
    """
    from .forward import call_model
    from .rng import seeded
    from .torchtools import model_in_eval_mode

    torch = require_torch()
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or inputs.dtype in dtypes or not inputs.is_floating_point():  # token ids index an embedding
        return
    (dtype,) = dtypes
    try:
        with model_in_eval_mode(model, True), torch.no_grad(), seeded(0, inputs.device):
            call_model(model, inputs[:1], rows=[0])
    except SaliencyUsageError:  # an output without scores: its own message says which option selects them
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the dtype mismatch it most likely is
        raise SaliencyUsageError(
            f"{name} are {inputs.dtype} but the model's parameters are {dtype}, and the model cannot run on "
            f"them ({type(exc).__name__}: {str(exc)[:200]}). Convert one to the other's dtype, e.g. "
            f"{name} = {name}.to({dtype}) or model.to({inputs.dtype})."
        ) from exc


def all_finite(tensor: torch.Tensor) -> bool:
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


def nonfinite_values(tensor: torch.Tensor) -> torch.Tensor | None:
    """The mask of ``tensor``'s NaN and infinite values, or None when every value is finite (one
    reduction in the usual case, see :func:`all_finite`)."""
    if all_finite(tensor):
        return None
    bad = ~require_torch().isfinite(tensor)
    return bad if bool(bad.any()) else None


def check_finite(tensor: torch.Tensor, name: str, *, plural: bool = True, allow_meta: bool = False,
                 per_map: bool = False, hint: str = "") -> None:
    """NaN or inf anywhere makes every similarity meaningless: refuse it loudly.

    The one finiteness check of the package; the message says what ``name`` holds, how many
    values are not finite and ``hint`` (what to do about it; a default that points at the data
    pipeline and the model's numerics).

    Args:
        plural: ``name`` is a plural noun ("inputs contain ..."); False for one argument ("a contains ...").
        allow_meta: meta tensors pass unchecked (they carry no values, only shapes: the similarity
            functions propagate them); by default they are refused, as a check cannot run on them.
        per_map: also name the maps (rows of the first dimension) that hold the bad values.
    """
    verb, be = ("contain", "are") if plural else ("contains", "is")
    if getattr(tensor, "is_meta", False):
        if allow_meta:
            return
        raise SaliencyUsageError(
            f"{name} {be} on the meta device, which holds shapes but no values. Pass real tensors "
            "(materialize the model with model.to_empty(device=...) and load its weights first)."
        )
    bad = nonfinite_values(tensor.detach())
    if bad is not None:
        where = ""
        if per_map and bad.dim() >= 1:
            rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            where = f" (in map(s) {rows[:10]}{'...' if len(rows) > 10 else ''})"
        raise SaliencyUsageError(
            f"{name} {verb} {int(bad.sum())} NaN or infinite value(s) out of {tensor.numel()}{where}. "
            + (hint or "Check the data pipeline and the model's numerics (e.g. a log of zero, an exploding "
                       "layer); saliency checks need finite values.")
        )


def _suggestion(value: str, valid: list[str]) -> str:
    """" Did you mean ...?" naming the valid names closest to ``value``, or ""."""
    close = difflib.get_close_matches(value, valid, n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def unknown_choice(kind: str, value: object, valid: Iterable[str], hint: str = "") -> SaliencyUsageError:
    """An error for an unknown name that lists the valid ones and the closest matches."""
    valid = list(valid)
    suggestion = _suggestion(str(value), valid)
    return SaliencyUsageError(
        f"unknown {kind} {value!r}.{suggestion} Valid {kind}s: {', '.join(valid)}.{(' ' + hint) if hint else ''}"
    )


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite real number (not a bool) within ``[low, high]`` (ends open when asked), as a float.

    For thresholds and tolerances: NaN would make every comparison fail and an infinity every
    comparison pass, so neither is ever a valid gate.
    """
    ok = is_real(value)
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


@overload
def check_count(value: Any, name: str, *, minimum: int = ..., allow_none: Literal[False] = ...,
                hint: str = ...) -> int: ...


@overload
def check_count(value: Any, name: str, *, minimum: int = ..., allow_none: bool, hint: str = ...) -> int | None: ...


def check_count(value: Any, name: str, *, minimum: int = 1, allow_none: bool = False, hint: str = "") -> int | None:
    """An integer of at least ``minimum``, as an int; ``None`` passes through when ``allow_none``.

    Anything with ``__index__`` counts (numpy integers, a one-element integer tensor), bools do not.
    """
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
    if isinstance(value, str) and value in valid:
        return value
    suggestion = _suggestion(value, valid) if isinstance(value, str) else ""
    raise SaliencyUsageError(
        f"unknown {name} {value!r:.80}.{suggestion} {name} must be one of: {', '.join(map(repr, valid))}."
        f"{(' ' + hint) if hint else ''}"
    )


def check_flag(value: Any, name: str, *, where: str = "") -> bool:
    """``True`` or ``False`` (numpy bools included): a string such as ``"no"`` would silently count as true.
    ``where``: what the error names first (e.g. ``"sign_agreement: "``)."""
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise SaliencyUsageError(
            f"{where}{name} must be True or False, got {value!r:.80}. Pass {name}=True or {name}=False.")
    return bool(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """Any integer (negative, larger than 64 bits, a numpy integer) as a Python int; every entry point
    takes seeds this way (:func:`pytest_saliency.core.rng.as_seed` is this check)."""
    from .rng import as_seed

    return as_seed(value, name)


#: The values each metric (and the consistency C of ``lr_separability``) can take. A gate
#: ``score >= threshold`` (``<=`` for a distance) with a threshold outside this range passes or
#: fails whatever the maps are.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{name: (0.0, 1.0) for name in (
        "feature_agreement", "sign_agreement", "rank_agreement", "signed_rank_agreement", "pairwise_rank_agreement",
        "signed_set_agreement", "consistent_direction", "lr_separability",
    )},
    **{name: (-1.0, 1.0) for name in (
        "ssim", "spearman", "spearman_abs", "pearson", "hog_pearson", "rank_correlation", "cosine_similarity",
    )},
    "l1_distance": (0.0, float("inf")),
    "angular_difference": (0.0, 3.141592653589793),
}


def check_threshold(value: Any, metric: str, name: str = "threshold") -> float:
    """A finite number within ``metric``'s range (:data:`METRIC_RANGES`), as a float.

    The ends of the range are allowed (a threshold of 1.0 asks for identical maps); beyond them
    the gate's verdict no longer depends on the maps.
    """
    low, high = METRIC_RANGES.get(metric, (None, None))
    hint = (f"{metric} lies in [{low:g}, {high:g}], so a threshold outside that range decides the verdict "
            "without looking at the maps; calibrate one inside it from a run without a threshold."
            if low is not None else "Pass a finite number such as 0.5.")
    return check_number(value, name, low=low, high=None if high == float("inf") else high, hint=hint)


def check_progress(progress: Any) -> Any:
    """``progress`` (None or a callable ``progress(done, total, label)``), or a usage error."""
    if progress is not None and not callable(progress):
        raise SaliencyUsageError(
            f"progress must be None or a callable progress(done, total, label), got {type(progress).__name__}.")
    return progress
