"""Which parts of a model the randomization tests randomize, in forward-execution order.

Registration order (``named_modules``) is not execution order: a model may define its head before
its backbone, or reuse a module. The layers are therefore ordered by one traced forward pass of a
single input, with forward pre-hooks recording when each module is first entered.

Granularities:

``"leaf"`` (default)
    every module that directly owns parameters (``nn.Parameter``, whether or not
    ``requires_grad`` is set: a frozen backbone still decides what the model computes).
``"block"``
    the modules ``depth`` levels below the root that own parameters somewhere inside them
    (depth 1 = the model's children), e.g. a ResNet's stages or an ``nn.Sequential``'s items.
a list of names
    exactly those modules (the critical layers L_c of Sriram & Conati).

Modules that own parameters but never run in the forward pass are left out: randomizing them
cannot change any map. Naming one explicitly is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._torch import require_torch
from ._validation import unknown_choice
from .exceptions import SaliencyUsageError

GRANULARITIES = ("leaf", "block")


def _owns_parameters(module: Any, recurse: bool) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


def execution_order(model: Any, example: Any) -> list[str]:
    """Names of all modules in the order the forward pass first enters them."""
    torch = require_torch()
    order: list[str] = []
    seen: set[int] = set()
    handles = []

    def make_hook(name: str):
        def hook(module: Any, args: Any) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append(name)

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    return order


def select_layers(
    model: Any,
    inputs: Any,
    layers: str | Sequence[str] = "leaf",
    *,
    depth: int = 1,
) -> list[tuple[str, Any]]:
    """``(name, module)`` pairs to randomize, in forward-execution order (input side first)."""
    modules = dict(model.named_modules())
    executed = execution_order(model, inputs[:1])
    rank = {name: i for i, name in enumerate(executed)}
    if isinstance(layers, str):
        if layers == "leaf":
            names = [n for n, m in modules.items() if _owns_parameters(m, recurse=False)]
        elif layers == "block":
            if depth < 1:
                raise SaliencyUsageError(f"depth must be >= 1 for granularity='block', got {depth}.")
            names = [
                n for n, m in modules.items()
                if n and n.count(".") == depth - 1 and _owns_parameters(m, recurse=True)
            ]
            if not names:
                raise SaliencyUsageError(
                    f"no module with parameters at depth {depth} of {type(model).__name__}. Use a smaller "
                    "depth, granularity='leaf', or list the layer names."
                )
        else:
            raise unknown_choice(
                "layer granularity", layers, GRANULARITIES, "Or pass a list of module names (critical layers)."
            )
        names = [n for n in names if n in rank]
    else:
        names = list(layers)
        if not names:
            raise SaliencyUsageError(
                "the list of layers to randomize is empty. Pass at least one module name, or "
                "layers='leaf' (every parameterized layer) / 'block'."
            )
        valid = [n for n, m in modules.items() if n and _owns_parameters(m, recurse=True)]
        for name in names:
            if name not in modules or not _owns_parameters(modules[name], recurse=True):
                raise unknown_choice("layer", name, valid, "Names are those of model.named_modules().")
            if name not in rank:
                raise SaliencyUsageError(
                    f"layer {name!r} never runs in the model's forward pass, so randomizing it cannot "
                    "change any explanation. Remove it from the list."
                )
        if len(set(names)) != len(names):
            raise SaliencyUsageError(f"layer names are repeated in {names}; list each layer once.")
        nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
        if nested:
            raise SaliencyUsageError(
                f"layer {nested[0][1]!r} lies inside {nested[0][0]!r}; list either the block or its parts, not both."
            )
    if not names:
        raise SaliencyUsageError(f"{type(model).__name__} has no parameterized layer that runs in its forward pass.")
    names.sort(key=rank.__getitem__)
    return [(n, modules[n]) for n in names]
