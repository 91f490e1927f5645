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
from collections.abc import Iterator, Sequence
from typing import Any

from ._rng import derive_seed, seeded
from ._torch import require_torch, restore_training_flags, training_flags
from ._validation import unknown_choice

STRATEGIES = ("reinit", "gaussian", "permute")


def _own_parameters(module: Any) -> list[Any]:
    return list(module.parameters(recurse=True))


def _scale(original: Any) -> Any:
    torch = require_torch()
    std = original.float().std() if original.numel() > 1 else torch.zeros((), device=original.device)
    if float(std) > 0:
        return std.to(original.dtype)
    return torch.clamp(original.float().mean().abs(), min=1.0).to(original.dtype)


def _gaussian_like(original: Any, mean: Any = 0.0) -> Any:
    torch = require_torch()
    noise = torch.randn_like(original, device="cpu")  # the CPU generator, on any device
    return noise.to(original.device) * _scale(original) + mean


def _torch_reset(sub: Any) -> bool:
    """Whether ``sub.reset_parameters`` is torch's own (not overridden by the class or the instance)."""
    return "reset_parameters" not in vars(sub) and getattr(
        type(sub).reset_parameters, "__module__", "").startswith("torch.")


def _reset_on_cpu(sub: Any) -> None:
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
        sub.reset_parameters()
        return
    stand_ins = {key: torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype), requires_grad=False)
                 for key, p in own.items()}
    registered = dict(sub._parameters)
    sub._parameters.update(stand_ins)
    try:
        sub.reset_parameters()
        drawn = {key: sub._parameters.get(key) for key in stand_ins}
        written = {key: value is not None and (value is not stand_ins[key] or value._version > 0)
                   for key, value in drawn.items()}
    except Exception:  # noqa: BLE001 - the device's own reset below reports a real error
        drawn = None
    finally:
        sub._parameters.clear()
        sub._parameters.update(registered)
    if drawn is None:
        sub.reset_parameters()
        return
    for key, real in own.items():
        if written[key]:
            real.copy_(drawn[key].detach())


def _randomize_module(module: Any, strategy: str, seed: int, name: str, params: list[Any],
                      originals: list[Any]) -> None:
    """Overwrite ``module``'s parameters ``params`` in place; ``originals`` are copies of their
    values (the scale of Gaussian draws). Buffers are restored by the caller."""
    torch = require_torch()
    # torch's own initializers draw only from torch's generator; a user-defined reset_parameters
    # may use numpy or Python's random too, so those generators are seeded and restored as well.
    torch_only = strategy != "reinit" or all(
        getattr(type(sub).reset_parameters, "__module__", "").startswith("torch.")
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
                        sub.reset_parameters()
                    else:
                        _reset_on_cpu(sub)
                    covered.update(id(p) for p in sub.parameters(recurse=False))
            for p, original in zip(params, originals):
                if id(p) not in covered:
                    p.copy_(_gaussian_like(original))
                elif _constant(p):
                    p.copy_(_gaussian_like(original, original.mean()))
        elif strategy == "gaussian":
            for p, original in zip(params, originals):
                p.copy_(_gaussian_like(original))
        else:
            for p in params:
                flat = p.reshape(-1)
                perm = torch.randperm(flat.numel()).to(p.device)  # the CPU generator, on any device
                p.copy_(flat[perm].reshape(p.shape))


def _constant(tensor: Any) -> bool:
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
    generator work (seeding, ``reset_parameters``, the constant-initializer test): on a small CNN
    it costs about as much as a forward pass, and interleaved with the passes it runs slower
    still. Drawing every layer up front, in one tight loop, and writing the kept values in each
    state costs a copy per parameter instead; with several image batches (``images="auto"``) the
    draws are not repeated per batch.

    The draws run on stand-ins (:func:`shadow_draw`), so the model's tensors are not written
    (not even their version counters move: a recorded forward graph stays usable). A kept value
    is exactly what a fresh draw would give, because a draw depends only on the seed, the
    layer's name and its own original values. So only layers whose ``reset_parameters`` are
    torch's own are kept with ``"reinit"`` (a user's reset could keep references to its
    parameters, or read other layers' values), and with ``independent=False`` (cascading states)
    only layers that share no parameter storage with an earlier layer (those are drawn on top of
    that layer's randomized values). ``limit_bytes`` bounds the values kept; the other layers
    are drawn in place, state by state, as without a ``LayerDraws``.
    """

    def __init__(self, layers: Sequence[tuple[str, Any]], strategy: str, seed: int, *,
                 limit_bytes: int | None = None, independent: bool = True) -> None:
        check_strategy(strategy)
        self.values: dict[str, list[tuple[Any, Any]]] = {}
        used = 0
        earlier: set[int] = set()
        for name, module in layers:
            params = _own_parameters(module)
            storages = {p.untyped_storage().data_ptr() for p in params}
            own_draw = independent or not storages & earlier
            earlier |= storages
            size = sum(p.numel() * p.element_size() for p in params)
            if not own_draw or (strategy == "reinit" and not _torch_resets_only(module)) or (
                    limit_bytes is not None and used + size > limit_bytes):
                continue
            self.values[name] = shadow_draw(name, module, strategy, seed)
            used += size


def shadow_draw(name: str, module: Any, strategy: str, seed: int) -> list[tuple[Any, Any]]:
    """Each parameter of ``module`` with the value :func:`randomized` would give it, drawn on
    stand-ins: copies of its parameters and buffers are registered in their place for the draw
    and the real ones are put back, untouched. Only for draws that reach parameters through the
    module's registrations (torch's own ``reset_parameters``, the Gaussian and permute strategies).
    """
    torch = require_torch()
    params = _own_parameters(module)
    copies = {id(t): torch.nn.Parameter(t.detach().clone(), requires_grad=False) if isinstance(t, torch.nn.Parameter)
              else t.detach().clone() for t in [*params, *module.buffers()]}
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


def drawn_values(name: str, module: Any, strategy: str, seed: int) -> list[tuple[Any, Any]] | None:
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


def _torch_resets_only(module: Any) -> bool:
    """Whether every ``reset_parameters`` in ``module`` is torch's own, not overridden."""
    return all(_torch_reset(sub) for sub in module.modules() if callable(getattr(sub, "reset_parameters", None)))


@contextlib.contextmanager
def randomized(
    layers: Sequence[tuple[str, Any]], strategy: str = "reinit", seed: int = 0, draws: LayerDraws | None = None,
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
    try:
        for (name, module), (params, values, buffers, buffer_values) in zip(layers, saved):
            kept = draws.values.get(name) if draws is not None else None
            if kept is not None:  # (buffers are untouched)
                with torch.no_grad():
                    for parameter, value in kept:
                        parameter.copy_(value)
                continue
            _randomize_module(module, strategy, seed, name, params, values)
            with torch.no_grad():
                for buffer, value in zip(buffers, buffer_values):
                    buffer.copy_(value)
        yield
    finally:
        for sub, parameters, buffers in registered:
            if not _same_objects(sub._parameters, parameters):
                sub._parameters.clear()
                sub._parameters.update(parameters)
            if not _same_objects(sub._buffers, buffers):
                sub._buffers.clear()
                sub._buffers.update(buffers)
        with torch.no_grad():
            for params, values, buffers, buffer_values in saved:
                for tensor, value in zip(params + buffers, values + buffer_values):
                    tensor.copy_(value)


def _same_objects(now: dict[str, Any], before: dict[str, Any]) -> bool:
    return now.keys() == before.keys() and all(now[key] is value for key, value in before.items())


@contextlib.contextmanager
def preserved(model: Any) -> Iterator[None]:
    """Restore the model's ``training`` and ``requires_grad`` flags when the block ends.

    Parameter values need no copy here: :func:`randomized` is the only code that writes them and
    it restores what it changed in its own ``finally``; a whole-model copy would double the
    memory a check needs.
    """
    flags = training_flags(model)
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    try:
        yield
    finally:
        restore_training_flags(flags)
        for p, flag in zip(params, grads):
            p.requires_grad_(flag)
