"""The input-shifted model of Kindermans et al., "The (Un)reliability of Saliency Methods" (2019).

Given a model f, a constant shift m of the inputs and the first layer L that reads the input,
the shifted model f2 is f with L's bias lowered by L's bias-free response to the shift,
``b2 = b - W t(m)`` (the paper's construction), so that ``f2(x + m) = f(x)`` for every x. Here
``t`` is whatever the model does to the input before L: the identity, a reshape, or any fixed
affine map (a normalisation inside ``forward``), whose effect on the shift is measured as
``delta = t(m) - t(0)`` at L's input.

f2 is built with a forward pre-hook on L that lowers L's input by ``delta``:
``L(u - delta) = W u + (b - W delta)``, the same affine map as L with the compensated bias,
for every kind of padding (the padding's zeros are not shifted, in f2 as in the paper's f2)
and for layers without a bias (a ResNet's ``conv1``). The hook

- never writes the model's parameters (the model is bit-identical afterwards; the hook is
  removed when the block ends, also through an exception);
- computes f2 with f's own rounding wherever the input is exactly representable after the
  shift (zeros and ones of [0, 1] images shifted by -1 come back exact): L then sees what it
  sees in f, ties between equal activations stay ties, and a max pooling over a flat region
  routes the gradient through the same position in f2 as in f. Subtracting ``W * delta`` from
  L's output instead (the bias form, computed in float32) breaks those ties at the 1e-7
  level, and the digits CNN's gradient maps then differ by 27% of their maximum at a few
  pixels: a rounding artefact, not a property of the method;
- differs from Quantus' ``add_mean_shift_to_first_layer``, which puts one number per
  channel into the bias (the response at one position, wrong at zero-padded borders) and
  needs a bias.

L is found by one forward pass of a zero input and one of m alone (a single example each): the
first ``nn.Linear`` or convolution, in execution order, whose input differs between the two, or
the module named by ``layer``; ``delta`` is the difference of its inputs in the two passes.

The construction is verified, not assumed: ``max |f2(x + m) - f(x)|`` over the given inputs
must be at most ``function_tol * (1 + max |f(x)|)``. It is not when the input is transformed
non-linearly before L (a clamp, a nonlinearity, per-input statistics), when the input also
reaches the output by another path (a skip connection from the input, its mean used as a
feature), or when L runs more than once per forward pass; :func:`build_shifted` then raises a
:class:`~pytest_saliency.exceptions.SaliencyUsageError` naming L.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.forward import call_model
from ..core.rng import pass_seeded
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import check_number, is_real
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch

#: ``max |f2(x + m) - f(x)|`` may be at most this times ``1 + max |f(x)|`` (float32 rounding of a
#: shifted first layer is ~1e-7 relative; the digits CNN gives ~1e-7 for m = -1).
FUNCTION_TOL = 1e-5

SHIFT_HINT = (
    "shift is a number (added to every input value, e.g. -1.0 maps [0, 1] images to [-1, 0]) or a "
    "tensor that broadcasts to one input (e.g. an image of the inputs' shape without the batch dimension)."
)


@dataclass(frozen=True)
class ShiftedModel:
    """What :func:`build_shifted` built: the compensated layer (``None`` when no layer needs one:
    the model's output ignores the shift), the shift as a ``(1, *input shape)`` tensor, ``delta``
    (what the hook subtracts from the layer's input), and the verification's numbers."""

    layer: str | None
    layer_type: str
    shift: torch.Tensor
    delta: torch.Tensor | None
    max_function_difference: float
    function_scale: float  # max |f(x)| over the verified inputs
    function_tol: float

    @property
    def allowed_difference(self) -> float:
        return self.function_tol * (1.0 + self.function_scale)


def affine_layer_types() -> tuple[type, ...]:
    """The modules searched for the first layer: linear layers and convolutions (transposed too)."""
    nn = require_torch().nn
    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check_shift(shift: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The shift as a ``(1, *inputs.shape[1:])`` tensor in the inputs' dtype and device.

    A number, or a tensor that broadcasts to one input (a leading batch dimension of 1 is allowed);
    finite and not zero everywhere (a zero shift tests nothing)."""
    torch = require_torch()
    one = tuple(inputs.shape[1:])
    if isinstance(shift, torch.Tensor):
        if shift.is_complex() or shift.dtype == torch.bool:
            raise SaliencyUsageError(f"shift is a {shift.dtype} tensor; {SHIFT_HINT}")
        value = shift.detach()
        if value.dim() == len(one) + 1 and value.shape[0] == 1:
            value = value[0]
        try:
            fits = value.dim() <= len(one) and torch.broadcast_shapes(tuple(value.shape), one) == one
        except RuntimeError:
            fits = False
        if not fits:
            raise SaliencyUsageError(
                f"shift has shape {tuple(shift.shape)}, which does not broadcast to one input of shape {one}. "
                f"{SHIFT_HINT}")
        value = value.to(device=inputs.device, dtype=inputs.dtype).expand(one)
    elif isinstance(shift, float) and not math.isfinite(shift):
        raise SaliencyUsageError(f"shift is {shift}, not a finite number. {SHIFT_HINT}")
    elif is_real(shift):
        value = torch.full(one, float(shift), dtype=inputs.dtype, device=inputs.device)
    else:
        raise SaliencyUsageError(f"shift={shift!r:.60} ({type(shift).__name__}) is not a shift. {SHIFT_HINT}")
    if not bool(torch.isfinite(value).all()):
        raise SaliencyUsageError(f"shift has NaN or infinite values. {SHIFT_HINT}")
    if not bool((value != 0).any()):
        raise SaliencyUsageError(
            "shift is 0 everywhere: the shifted inputs are the inputs and every method passes trivially. "
            "Pass a non-zero shift, e.g. -1.0 (Kindermans et al.: [0, 1] images to [-1, 0]).")
    return value.unsqueeze(0).contiguous()


@dataclass
class _Seen:
    """A module's first call in a traced pass (its input tensor, or None) and how often it ran."""

    order: int
    input: Any
    calls: int = 1


def _record(model: torch.nn.Module, x: torch.Tensor, candidates: dict[str, torch.nn.Module],
            seed: int) -> dict[str, _Seen]:
    """One forward pass of ``x`` with the candidates' first inputs recorded."""
    torch = require_torch()
    seen: dict[str, _Seen] = {}
    handles = []

    def recorder(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            if name in seen:
                seen[name].calls += 1
                return
            first = args[0] if args else None
            seen[name] = _Seen(len(seen), first.detach().clone() if isinstance(first, torch.Tensor) else None)
        return hook

    try:
        for name, module in candidates.items():
            handles.append(module.register_forward_pre_hook(recorder(name)))
        with torch.no_grad(), pass_seeded(seed, x.device):
            call_model(model, x, rows=[0])
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _candidates(model: torch.nn.Module, layer: str | None) -> dict[str, torch.nn.Module]:
    """The modules that may be the first layer: the one named, or every linear layer and convolution."""
    modules: dict[str, torch.nn.Module] = dict(model.named_modules())
    if layer is not None:
        if not isinstance(layer, str) or layer not in modules or layer == "":
            names = [n for n, m in modules.items() if isinstance(m, affine_layer_types())][:8]
            raise SaliencyUsageError(
                f"first_layer={layer!r:.80} is not the name of a submodule of {type(model).__name__}. Pass the "
                f"name of the layer that reads the input (candidates: {', '.join(names) or 'none'}), or leave "
                "first_layer=None to find it.")
        return {layer: modules[layer]}
    found = {n: m for n, m in modules.items() if isinstance(m, affine_layer_types())}
    if not found:
        raise SaliencyUsageError(
            f"{type(model).__name__} has no nn.Linear or convolution module for the shift's compensation. The "
            "shifted model moves the shift into the first layer that reads the input; a model that multiplies "
            "the input by its weights functionally (F.linear, x @ W) has none to hook. Pass first_layer='<name>' "
            "of the module that reads the input.")
    return found


def _first_layer(model: torch.nn.Module, shift: torch.Tensor, layer: str | None,
                 seed: int) -> tuple[str | None, torch.Tensor | None]:
    """The first layer whose input the shift changes, and ``delta``: its input for the shift alone
    minus its input for a zero input (None, None when no candidate's input changes)."""
    torch = require_torch()
    candidates = _candidates(model, layer)
    zero = _record(model, torch.zeros_like(shift), candidates, seed)
    moved = _record(model, shift, candidates, seed)
    for name, first in sorted(zero.items(), key=lambda item: item[1].order):
        other = moved.get(name)
        kind = type(candidates[name]).__name__
        if other is None or first.input is None or other.input is None or first.input.shape != other.input.shape:
            raise SaliencyUsageError(
                f"the layer {name!r} ({kind}) does not read one input tensor of the same shape in a pass of a zero "
                "input and one of the shift alone (it takes its input as a keyword, or only runs for some inputs); "
                "the shifted model lowers that tensor by the shift. Pass first_layer='<name>' of a linear or "
                "convolution layer that reads the input positionally.")
        if torch.equal(first.input, other.input) and layer is None:
            continue  # the shift does not reach this layer's input
        if first.calls > 1 or other.calls > 1:
            raise SaliencyUsageError(
                f"the layer {name!r} ({kind}), the first to read the shifted input, runs {first.calls} times in one "
                "forward pass; the shift's compensation would be applied every time. Input-shift invariance needs "
                "a model whose first layer reads the input once.")
        return name, other.input - first.input
    if layer is not None:
        raise SaliencyUsageError(f"first_layer={layer!r} does not run in the model's forward pass.")
    return None, None


@contextlib.contextmanager
def _hooked(module: torch.nn.Module | None, delta: torch.Tensor | None) -> Iterator[None]:
    """The forward pre-hook that lowers ``module``'s input by ``delta``, removed on exit."""
    if module is None or delta is None:
        yield
        return

    def lower(_module: Any, args: Any) -> Any:
        return (args[0] - delta, *args[1:])

    handle = module.register_forward_pre_hook(lower)
    try:
        yield
    finally:
        handle.remove()


def _function_difference(model: torch.nn.Module, inputs: torch.Tensor, shift: torch.Tensor,
                         hook: Callable[[], contextlib.AbstractContextManager[None]], seed: int,
                         batch_size: int | None) -> tuple[float, float]:
    """``(max |f2(x + m) - f(x)|, max |f(x)|)`` over ``inputs``, ``batch_size`` at a time."""
    torch = require_torch()
    step = batch_size or max(int(inputs.shape[0]), 1)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, int(inputs.shape[0]), step):
            x = inputs[start:start + step]
            rows = list(range(start, start + x.shape[0]))
            with pass_seeded(seed, x.device):
                plain = call_model(model, x, rows=rows)
            with hook(), pass_seeded(seed, x.device):
                moved = call_model(model, x + shift, rows=rows)
            gap = (moved.double() - plain.double()).abs()
            worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
            scale = max(scale, float(plain.double().abs().max()) if plain.numel() else 0.0)
    if math.isnan(worst):
        worst = float("inf")
    return worst, scale


def build_shifted(model: torch.nn.Module, inputs: torch.Tensor, shift: Any, *, layer: str | None = None,
                  function_tol: float = FUNCTION_TOL, seed: int = 0, batch_size: int | None = None) -> ShiftedModel:
    """Build the shifted model f2 of ``model`` for ``shift`` and verify ``f2(x + m) = f(x)`` on ``inputs``.

    ``shift`` (m) is a number or a tensor that broadcasts to one input (:func:`check_shift`);
    ``layer`` names the layer to compensate (default: found, see the module docstring). The
    verification runs in eval mode, without gradients, every forward pass seeded with ``seed``,
    ``batch_size`` inputs at a time; a model for which the construction does not hold is refused
    with a :class:`SaliencyUsageError` naming the layer. Nothing of the model is changed: the
    compensation is applied only inside :func:`compensated` (or :func:`shifted`).
    """
    check_number(function_tol, "function_tol", low=0.0, low_open=True,
                 hint="It bounds max |f_shifted(x + m) - f(x)| relative to 1 + max |f(x)|, e.g. 1e-5.")
    m = check_shift(shift, inputs)
    with model_in_eval_mode(model, True):
        name, delta = _first_layer(model, m, layer, seed)
        module = None if name is None else dict(model.named_modules())[name]
        if delta is not None and not bool(require_torch().isfinite(delta).all()):
            raise SaliencyUsageError(
                f"the shift's compensation at layer {name!r} is not finite: the model's forward gives NaN or inf for "
                "a zero input or for the shift alone (per-input statistics of the input, say). Input-shift "
                "invariance needs a model that reads the input through a fixed affine map.")
        worst, scale = _function_difference(model, inputs, m, lambda: _hooked(module, delta), seed,
                                            batch_size)
    info = ShiftedModel(name, type(module).__name__ if module is not None else "", m, delta, worst, scale,
                        float(function_tol))
    if not worst <= info.allowed_difference:
        raise _not_the_same_function(model, info)
    return info


@contextlib.contextmanager
def compensated(model: torch.nn.Module, info: ShiftedModel) -> Iterator[None]:
    """Inside the block, ``model`` computes the shifted model ``info`` describes (a forward hook on
    pre-hook on its layer, removed when the block ends, whatever ends it)."""
    module = None if info.layer is None else dict(model.named_modules())[info.layer]
    with _hooked(module, info.delta):
        yield


@contextlib.contextmanager
def shifted(model: torch.nn.Module, inputs: torch.Tensor, shift: Any, *, layer: str | None = None,
            function_tol: float = FUNCTION_TOL, seed: int = 0,
            batch_size: int | None = None) -> Iterator[ShiftedModel]:
    """Inside the block, ``model`` computes the shifted model f2, with ``f2(x + m) = f(x)``:
    :func:`build_shifted` (which verifies it on ``inputs``) and :func:`compensated` in one."""
    info = build_shifted(model, inputs, shift, layer=layer, function_tol=function_tol, seed=seed,
                         batch_size=batch_size)
    with compensated(model, info):
        yield info


def _not_the_same_function(model: torch.nn.Module, info: ShiftedModel) -> SaliencyUsageError:
    where = (f"with the shift compensated at the layer {info.layer!r} ({info.layer_type}), the first layer whose "
             "input the shift changes" if info.layer is not None else
             "and no linear or convolution layer's input changes with the shift, so none can compensate it")
    return SaliencyUsageError(
        f"the shifted model does not compute the function of {type(model).__name__}: max |f_shifted(x + m) - f(x)| "
        f"= {info.max_function_difference:.3g} > {info.allowed_difference:.3g} (function_tol={info.function_tol:g} "
        f"times 1 + max |f(x)| = {info.function_scale:.3g}), {where}. The construction of Kindermans et al. needs "
        "the input to reach the network only through that layer, unchanged or through a fixed affine map (a "
        "reshape, a normalisation). Is the input transformed non-linearly before it (a clamp, a nonlinearity, "
        "per-input statistics), or used elsewhere too (a skip connection from the input)? Pass first_layer='<name>' "
        "of the layer that reads the input, or test the network behind such preprocessing."
    )


__all__ = ["FUNCTION_TOL", "ShiftedModel", "affine_layer_types", "build_shifted", "check_shift", "compensated",
           "shifted"]
