"""Randomizing layers in place, and putting every bit back afterwards.

No copy of the model is made per layer. :func:`randomized` saves the tensors of the layers it is
about to change (a copy of just those parameters), overwrites them in place under a seeded local
RNG, and restores them in a ``finally`` block, so the model is bit-identical after the block
whether it finished, failed or raised. :func:`preserved` guards a whole check the same way for
the ``training`` and ``requires_grad`` flags.

Strategies (``randomization=``):

``"reinit"`` (default)
    every submodule with ``reset_parameters`` re-draws its parameters from its own initializer,
    as Adebayo et al. re-ran the variables' initializers. Parameters no initializer covers get
    a Gaussian with the original tensor's standard deviation. Normalization layers
    (BatchNorm, LayerNorm, GroupNorm, ...) reset their affine parameters to the constants 1 and
    0; that makes the layer a fixed transformation rather than a random one (Quantus additionally
    resets the running statistics, turning BatchNorm into the identity in eval mode). Here a
    parameter whose initializer is a constant is instead drawn from a Gaussian with the original
    tensor's mean and standard deviation, so the layer is really randomized, and running
    statistics (buffers) are kept, as Adebayo's code kept them.
``"gaussian"``
    every parameter ~ N(0, std of the original tensor).
``"permute"``
    the entries of every parameter are shuffled: the weight distribution is kept exactly and
    only the structure is destroyed.

Every draw of this module and of torch's own initializers comes from the CPU generator, whatever
device the model is on (on a GPU the drawn values are copied over), so a seed randomizes a layer
the same way on the CPU and on a GPU: a failure seen in GPU CI reproduces on a laptop, up to
floating-point rounding of the maps. A user-defined ``reset_parameters`` runs as written, on the
model's device (its draws on a GPU come from that GPU's generator).

Buffers are never changed by any strategy. For a parameter whose standard deviation is zero
(e.g. an untrained BatchNorm scale of all ones) the Gaussian uses ``max(|mean|, 1)`` as its scale
so that randomizing it still changes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..core.integrity import Undo
from ..core.rng import derive_seed, seeded
from ..core.torchtools import require_torch, restore_training_flags, training_flags
from ..core.validation import unknown_choice
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: A layer to randomize: its name in ``model.named_modules()`` and the module.
Layer = tuple[str, "torch.nn.Module"]
#: A parameter and the values it gets.
Draw = tuple["torch.nn.Parameter", "torch.Tensor"]

STRATEGIES = ("reinit", "gaussian", "permute")


def _own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(module.parameters(recurse=True))


def _scale(original: torch.Tensor) -> torch.Tensor:
    torch = require_torch()
    std = original.float().std() if original.numel() > 1 else torch.zeros((), device=original.device)
    if float(std) > 0:
        return std.to(original.dtype)
    return torch.clamp(original.float().mean().abs(), min=1.0).to(original.dtype)


def _gaussian_like(original: torch.Tensor, mean: float | torch.Tensor = 0.0) -> torch.Tensor:
    torch = require_torch()
    noise = torch.randn_like(original, device="cpu")  # the CPU generator, on any device
    return noise.to(original.device) * _scale(original) + mean


def _reset(sub: torch.nn.Module) -> None:
    """``sub.reset_parameters()``: a method of most torch layers but not of ``torch.nn.Module``,
    so it is looked up at run time (callers check that ``sub`` has one)."""
    reset: Callable[[], None] = getattr(sub, "reset_parameters")
    reset()


def _class_reset_module(sub: torch.nn.Module) -> str:
    """The module that defines the ``reset_parameters`` of ``sub``'s class ("" when it has none)."""
    return str(getattr(getattr(type(sub), "reset_parameters", None), "__module__", "") or "")


def _torch_reset(sub: torch.nn.Module) -> bool:
    """Whether ``sub.reset_parameters`` is torch's own (not overridden by the class or the instance)."""
    return "reset_parameters" not in vars(sub) and _class_reset_module(sub).startswith("torch.")


def _reset_on_cpu(sub: torch.nn.Module) -> None:
    """torch's ``sub.reset_parameters()`` with its draws taken from the CPU generator.

    It runs on uninitialized CPU stand-ins of ``sub``'s own parameters (same shapes, strides and
    dtypes), and each stand-in the reset wrote (torch's initializers write in place, which moves
    the version counter) is copied into the real parameter. Only for torch's own resets: a
    user's ``reset_parameters`` may read the current values, keep references to its parameters
    or write through ``.data``, so it runs on the device as written (drawing from that device's
    generator). A reset that fails on the stand-ins, or parameters that are not floating point,
    get the reset on the device too.
    """
    torch = require_torch()
    own = {key: p for key, p in sub._parameters.items() if p is not None}
    if not all(p.is_floating_point() for p in own.values()):
        _reset(sub)
        return
    stand_ins = {key: torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype), requires_grad=False)
                 for key, p in own.items()}
    registered = dict(sub._parameters)
    sub._parameters.update(stand_ins)
    try:
        _reset(sub)
        drawn = {key: sub._parameters.get(key) for key in stand_ins}
        written = {key: value is not None and (value is not stand_ins[key] or value._version > 0)
                   for key, value in drawn.items()}
    except Exception:  # noqa: BLE001 - the device's own reset below reports a real error
        drawn = None
    finally:
        sub._parameters.clear()
        sub._parameters.update(registered)
    if drawn is None:
        _reset(sub)
        return
    for key, real in own.items():
        value = drawn[key]
        if value is not None and written[key]:
            real.copy_(value.detach())


def _randomize_module(module: torch.nn.Module, strategy: str, seed: int, name: str, params: list[Any],
                      originals: list[torch.Tensor]) -> None:
    """Overwrite ``module``'s parameters ``params`` in place; ``originals`` are copies of their
    values (the scale of Gaussian draws). Buffers are restored by the caller. The submodules'
    ``reset_parameters`` are found at run time (:func:`_reset`)."""
    torch = require_torch()
    # torch's own initializers draw only from torch's generator; a user-defined reset_parameters
    # may use numpy or Python's random too, so those generators are seeded and restored as well.
    torch_only = strategy != "reinit" or all(
        _class_reset_module(sub).startswith("torch.")
        for sub in module.modules() if callable(getattr(sub, "reset_parameters", None))
    )
    device = params[0].device if params else None
    on_cpu = device is None or device.type == "cpu"
    with seeded(derive_seed(seed, name), device, torch_only=torch_only), torch.no_grad():
        if strategy == "reinit":
            covered: set[int] = set()
            for sub in module.modules():
                if callable(getattr(sub, "reset_parameters", None)):
                    if on_cpu or not _torch_reset(sub):
                        _reset(sub)
                    else:
                        _reset_on_cpu(sub)
                    covered.update(id(p) for p in sub.parameters(recurse=False))
            for p, original in zip(params, originals):
                if id(p) not in covered:
                    p.copy_(_gaussian_like(original))
                elif _constant(p):
                    p.copy_(_gaussian_like(original, original.mean()))
                elif torch.equal(p, original):  # a reset that did not reach it: the weight_orig of
                    p.copy_(_gaussian_like(original))  # torch.nn.utils.prune, hook-based weight_norm
        elif strategy == "gaussian":
            for p, original in zip(params, originals):
                p.copy_(_gaussian_like(original))
        else:
            for p in params:
                flat = p.reshape(-1)
                perm = torch.randperm(flat.numel()).to(p.device)  # the CPU generator, on any device
                p.copy_(flat[perm].reshape(p.shape))


def _constant(tensor: torch.Tensor) -> bool:
    """Whether every entry equals the first (an initializer that fills a constant, like BatchNorm's
    ones and zeros). Drawn values already differ in their first two entries, which settles big
    tensors without comparing them all."""
    flat = tensor.reshape(-1)
    if flat.numel() < 2:
        return False
    if flat.numel() > 256 and bool(flat[1] != flat[0]):
        return False
    return bool((flat == flat[0]).all())


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise unknown_choice("randomization", strategy, STRATEGIES)


class LayerDraws:
    """The values :func:`randomized` gives each layer's parameters, drawn once and then reused.

    A check randomizes every layer once per batch of images, and drawing is mostly Python and
    generator work (seeding, ``reset_parameters``, the constant-initializer test), which for a
    small model weighs as much as its forward pass. Drawing every layer up front, in one tight
    loop, and writing the kept values in each
    state costs a copy per parameter instead; with several image batches (``images="auto"``) the
    draws are not repeated per batch.

    The draws run on stand-ins (:func:`shadow_draw`), so the model's tensors are not written
    (not even their version counters move: a recorded forward graph stays usable). A draw
    depends on the seed, the layer's name and its own current values, so a kept draw is used
    only while the layer holds the values it was drawn from (:meth:`values_for`; in cascading
    states a layer sharing storage with an earlier one, or a model whose forward pass writes its
    own weights, draws afresh). Kept are only layers whose draws stand-ins reproduce exactly:

    * with ``"reinit"``, ``reset_parameters`` that are torch's own (a user's could keep
      references to its parameters, or read other layers' values);
    * dense parameters that share no storage with each other or with the layer's buffers (a draw
      on one would change the other), in modules without plain tensor attributes (the weight that
      ``torch.nn.utils.prune`` or hook-based ``weight_norm`` compute before each forward pass:
      the reset writes into it, and the recorded graph holds it).

    ``limit_bytes`` bounds the memory kept (values and originals); the other layers are drawn in
    place, state by state, as without a ``LayerDraws``, and so is a layer whose draw fails.
    """

    def __init__(self, layers: Sequence[Layer], strategy: str, seed: int, *,
                 limit_bytes: int | None = None) -> None:
        check_strategy(strategy)
        torch = require_torch()
        self.kept: dict[str, tuple[list[Tensor], list[Draw]]] = {}  # name -> (originals, drawn)
        chosen, used = [], 0
        for name, module in layers:
            params = _own_parameters(module)
            size = 2 * sum(_aligned(p.numel() * p.element_size()) for p in params)
            if params and _shadow_safe(module, params, strategy) and (limit_bytes is None or used + size <= limit_bytes):
                chosen.append((name, module, params))
                used += size
        if not chosen:
            return
        # One block per device for everything kept: many small long-lived tensors allocated while
        # the recorded graph is alive would pin scattered pieces of the heap, raising the peak
        # memory by more than they hold.
        blocks = {}
        for device in {p.device for _, _, params in chosen for p in params}:
            blocks[device] = torch.empty(sum(2 * _aligned(p.numel() * p.element_size()) for _, _, params in chosen
                                             for p in params if p.device == device), dtype=torch.uint8, device=device)
        offsets = dict.fromkeys(blocks, 0)

        def place(tensor: Any) -> Any:
            nbytes = tensor.numel() * tensor.element_size()
            start = offsets[tensor.device]
            offsets[tensor.device] = start + _aligned(nbytes)
            view = blocks[tensor.device][start:start + nbytes].view(tensor.dtype).view(tensor.shape)
            return view.copy_(tensor.detach())

        for name, module, params in chosen:
            try:
                drawn = shadow_draw(name, module, strategy, seed)
            except Exception:  # noqa: BLE001 - drawn in place in its state, which reports the error
                for p in params:  # keep the offsets in step
                    offsets[p.device] += 2 * _aligned(p.numel() * p.element_size())
                continue
            self.kept[name] = ([place(p) for p in params], [(p, place(value)) for p, value in drawn])

    def values_for(self, name: str) -> list[Draw] | None:
        """The kept draw of layer ``name`` if its parameters still hold the values it was drawn from."""
        kept = self.kept.get(name)
        if kept is None:
            return None
        torch = require_torch()
        originals, drawn = kept
        if not all(torch.equal(p, original) for (p, _), original in zip(drawn, originals)):
            return None
        return drawn


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _shadow_safe(module: torch.nn.Module, params: list[torch.nn.Parameter], strategy: str) -> bool:
    """Whether :func:`shadow_draw` draws what :func:`randomized` would (see :class:`LayerDraws`)."""
    torch = require_torch()
    if strategy == "reinit" and not _torch_resets_only(module):
        return False
    tensors = [*params, *module.buffers()]
    if len({t.untyped_storage().data_ptr() for t in tensors}) < len(tensors) or not all(map(_dense, params)):
        return False
    return not any(isinstance(value, torch.Tensor) for sub in module.modules() for value in vars(sub).values())


def _dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and without gaps (contiguous in some order of its dimensions)."""
    expected = 1
    for stride, size in sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def shadow_draw(name: str, module: torch.nn.Module, strategy: str, seed: int) -> list[Draw]:
    """Each parameter of ``module`` with the value :func:`randomized` would give it, drawn on
    stand-ins: copies of its parameters and buffers are registered in their place for the draw
    and the real ones are put back, untouched. Only for draws that reach parameters through the
    module's registrations (torch's own ``reset_parameters``, the Gaussian and permute strategies).
    """
    torch = require_torch()
    params = _own_parameters(module)
    copies: dict[int, Any] = {id(t): torch.nn.Parameter(_copy(t), requires_grad=False)
                              if isinstance(t, torch.nn.Parameter) else _copy(t) for t in [*params, *module.buffers()]}
    registered = [(sub, dict(sub._parameters), dict(sub._buffers)) for sub in module.modules()]
    try:
        for sub, parameters, buffers in registered:
            sub._parameters.update({key: copies[id(p)] for key, p in parameters.items() if p is not None})
            sub._buffers.update({key: copies[id(b)] for key, b in buffers.items() if b is not None})
        stand_ins = [copies[id(p)] for p in params]
        _randomize_module(module, strategy, seed, name, stand_ins, [p.detach() for p in params])
        return [(p, sub_in.detach()) for p, sub_in in zip(params, stand_ins)]
    finally:
        for sub, parameters, buffers in registered:
            sub._parameters.clear()
            sub._parameters.update(parameters)
            sub._buffers.clear()
            sub._buffers.update(buffers)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (CPU draws take another path for other layouts)."""
    copy = require_torch().empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor.detach())


def drawn_values(name: str, module: torch.nn.Module, strategy: str, seed: int) -> list[Draw] | None:
    """Each parameter of ``module`` with (a copy of) the value :func:`randomized` gives it, or
    None if the draw changed which parameters the module has.

    Drawn in place (any ``reset_parameters``), then restored. Paired by name, so a
    ``reset_parameters`` that assigns new ``nn.Parameter`` objects is followed too
    (:func:`randomized` puts the old ones back; writing the values into them gives the forward
    pass the same numbers).
    """
    parameters = dict(module.named_parameters())
    with randomized([(name, module)], strategy, seed):
        now = dict(module.named_parameters())
        if now.keys() != parameters.keys():
            return None
        return [(parameters[key], p.detach().clone()) for key, p in now.items()]


def _torch_resets_only(module: torch.nn.Module) -> bool:
    """Whether every ``reset_parameters`` in ``module`` is torch's own, not overridden."""
    return all(_torch_reset(sub) for sub in module.modules() if callable(getattr(sub, "reset_parameters", None)))


@contextlib.contextmanager
def randomized(
    layers: Sequence[Layer], strategy: str = "reinit", seed: int = 0, draws: LayerDraws | None = None,
) -> Iterator[None]:
    """Randomize ``layers`` in place for the duration of the block, then restore them exactly.

    Each layer's draw depends only on ``seed`` and its name, so independent and cascading
    randomization change a given layer identically. ``draws`` (made with the same strategy and
    seed) supplies the values of the layers it kept instead of drawing them again.
    """
    torch = require_torch()
    check_strategy(strategy)
    saved = []  # per layer: its parameters and buffers, and copies of their values
    for _, module in layers:
        params, buffers = _own_parameters(module), list(module.buffers())
        saved.append((params, [p.detach().clone() for p in params], buffers, [b.detach().clone() for b in buffers]))
    # A reset_parameters that assigns new nn.Parameter objects (instead of writing in place)
    # would leave them in the model: the registrations are put back too.
    registered = [(sub, dict(sub._parameters), dict(sub._buffers)) for _, module in layers for sub in module.modules()]
    # Registered before the first write: if an interrupt ends the block anywhere after this
    # line, the guard of the check runs the restore (see pytest_saliency.core.integrity).
    undo = Undo(functools.partial(_restore_layers, registered, saved), [p for params, *_ in saved for p in params])
    try:
        for (name, module), (params, values, buffers, buffer_values) in zip(layers, saved):
            kept = draws.values_for(name) if draws is not None else None
            if kept is not None:  # (buffers are untouched)
                with torch.no_grad():
                    for parameter, value in kept:
                        parameter.copy_(value)
                continue
            try:
                _randomize_module(module, strategy, seed, name, params, values)
            except Exception as error:
                raise _randomization_error(name, module, strategy, error) from error
            with torch.no_grad():
                for buffer, value in zip(buffers, buffer_values):
                    buffer.copy_(value)
        yield
    finally:
        undo.run()


def _restore_layers(registered: list[tuple[Any, dict[str, Any], dict[str, Any]]],
                    saved: list[tuple[list[Any], list[Any], list[Any], list[Any]]]) -> None:
    """Put back the registrations and the values :func:`randomized` saved."""
    torch = require_torch()
    for sub, parameters, buffers in registered:
        if not _same_objects(sub._parameters, parameters):
            sub._parameters.clear()
            sub._parameters.update(parameters)
        if not _same_objects(sub._buffers, buffers):
            sub._buffers.clear()
            sub._buffers.update(buffers)
    with torch.no_grad():
        for params, values, layer_buffers, buffer_values in saved:
            for tensor, value in zip(params + layer_buffers, values + buffer_values):
                tensor.copy_(value)


def _randomization_error(name: str, module: torch.nn.Module, strategy: str, error: Exception) -> SaliencyUsageError:
    """What failed while randomizing a layer (the cause stays chained), and what to do about it."""
    hint = "Leave the layer out (layers=[...] names the layers to randomize) or pick another randomization."
    integer = [key for key, p in module.named_parameters() if not (p.is_floating_point() or p.is_complex())]
    if integer and strategy != "permute":
        hint = (f"Its parameters {integer} are not floating point, and randomization={strategy!r} draws floating-point "
                "values: use randomization='permute', or leave the layer out (layers=[...]).")
    elif strategy == "reinit":
        hint = ("randomization='reinit' runs the layer's reset_parameters; if that is your own code, the traceback "
                "above shows where it failed. Or pass randomization='gaussian' or 'permute'.")
    return SaliencyUsageError(
        f"randomizing layer {name!r} ({type(module).__name__}) with randomization={strategy!r} failed: "
        f"{type(error).__name__}: {error}. {hint}")


def _same_objects(now: dict[str, Any], before: dict[str, Any]) -> bool:
    return now.keys() == before.keys() and all(now[key] is value for key, value in before.items())


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Restore the model's ``training`` and ``requires_grad`` flags when the block ends, and its
    modules' plain tensor attributes (objects and values).

    Parameter values need no copy here: :func:`randomized` is the only code that writes them and
    it restores what it changed in its own ``finally``; a whole-model copy would double the
    memory a check needs. Plain tensor attributes are few and small: the weights that
    ``torch.nn.utils.prune`` and hook-based ``weight_norm`` compute before each forward pass
    (forward passes in randomized states replace them, and a layer's reset writes into them).
    """
    torch = require_torch()
    flags = training_flags(model)
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    attributes = [(sub, key, value, value.detach().clone()) for sub in model.modules()
                  for key, value in vars(sub).items() if isinstance(value, torch.Tensor)]
    undo = Undo(functools.partial(_restore_preserved, flags, params, grads, attributes))
    try:
        yield
    finally:
        undo.run()


def _restore_preserved(flags: list[tuple[Any, bool]], params: list[Any], grads: list[bool],
                       attributes: list[tuple[Any, str, Any, Any]]) -> None:
    torch = require_torch()
    restore_training_flags(flags)
    for p, flag in zip(params, grads):
        p.requires_grad_(flag)
    for sub, key, value, copy in attributes:
        sub.__dict__[key] = value
        if not torch.equal(value, copy):
            with torch.no_grad():
                value.copy_(copy)
