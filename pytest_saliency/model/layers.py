"""Which parts of a model the randomization tests randomize, in forward-execution order.

Registration order (``named_modules``) is not execution order: a model may define its head before
its backbone, or reuse a module. The layers are therefore ordered by one traced forward pass of a
single input (or of the check's inputs, when the check traces them anyway), with forward pre-hooks
recording when each module is first entered.

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

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.forward import OutputSelector, call_model, passes_model_call
from ..core.integrity import rng_isolated
from ..core.torchtools import (
    ensure_eval_mode,
    require_torch,
    restore_training_flags,
    set_plain_attribute,
    training_flags,
)
from ..core.validation import check_count, check_inputs, check_model, unknown_choice
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch

GRANULARITIES = ("leaf", "block")


def _owns_parameters(module: torch.nn.Module, recurse: bool) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


@dataclass
class ForwardTrace:
    """What one forward pass of the model did, recorded for every module.

    ``start[name]`` / ``end[name]`` are event numbers of a module's first entry and last exit
    (entries and exits share one counter), so ``end[a] < start[b]`` means ``a`` finished before
    ``b`` began. ``first_use[name]`` is the earliest event at which the module could have
    influenced anything: its own start, a submodule's start (a child may be called from outside
    its parent), or the first torch operation that read one of its parameters (code may use a
    layer's weight before the layer runs). Every module that ended before ``first_use[k]`` computes
    the same output whatever ``k``'s parameters are.

    ``replayable`` holds the modules whose output :mod:`pytest_saliency.engine.replay` may
    stand in for: called exactly once (counted on ``forward`` itself, so direct ``.forward()``
    calls count too), returning a plain tensor or a tuple of them that no later in-place
    operation changed, without backward hooks and not scripted. ``mutated`` holds the modules
    whose output was changed in place later (e.g. the BatchNorm before an
    ``nn.ReLU(inplace=True)``): they are recomputed, which for such layers is cheaper than keeping
    a copy of their output.
    """

    order: list[str]
    start: dict[str, int]
    end: dict[str, int]
    calls: dict[str, int]
    first_use: dict[str, int]
    replayable: set[str]
    mutated: set[str]
    output: Any = field(repr=False)


def plain_tensor(tensor: Any) -> bool:
    """A dense tensor with its own storage (not sparse, not a functorch wrapper)."""
    torch = require_torch()
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        return False
    try:
        tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def output_tensors(output: Any) -> list[Any] | None:
    torch = require_torch()
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif type(output) is tuple and output and all(isinstance(o, torch.Tensor) for o in output):
        tensors = list(output)
    else:
        return None
    return tensors if all(plain_tensor(t) for t in tensors) else None


def _scripted(module: torch.nn.Module) -> bool:
    return isinstance(module, require_torch().jit.ScriptModule)


def patch_forward(module: torch.nn.Module, replacement: Any, patched: list[tuple[Any, Any]]) -> None:
    """Set ``module.forward`` (an instance attribute); ``patched`` collects what to restore.

    A ``forward`` that is a property (or another data descriptor) cannot be patched and put back
    exactly: TypeError, and the caller times or runs such a module otherwise.
    """
    if hasattr(getattr(type(module), "forward", None), "__set__"):
        raise TypeError(f"{type(module).__name__}.forward is a property")
    patched.append((module, module.__dict__.get("forward")))
    set_plain_attribute(module, "forward", replacement)


def restore_forwards(patched: list[tuple[Any, Any]]) -> None:
    """Undo :func:`patch_forward`, newest first, whatever happened in between."""
    while patched:
        module, previous = patched.pop()
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            set_plain_attribute(module, "forward", previous)


#: ``on_op(index, event, owner, func, args, kwargs, result)``: see :func:`trace_forward`.
OpCallback = Callable[[int, int, str, Any, Any, Any, Any], None]


def trace_forward(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int | None = None, *,
                  on_output: Callable[[str, Any, Any, Any], None] | None = None,
                  on_op: OpCallback | None = None,
                  saved_tensors_hooks: tuple[Any, Any] | None = None) -> ForwardTrace:
    """Run the model once in eval mode (without gradients, by default) and record :class:`ForwardTrace`.

    Each module's ``forward`` is wrapped for the first chunk of ``batch_size`` inputs (and
    restored afterwards, whatever happens); the output covers all inputs (it gives the predicted
    targets, so checks need no separate forward pass for them).

    With ``saved_tensors_hooks`` (a ``(pack, unpack)`` pair) the pass runs with gradients
    enabled under those hooks, over all inputs in one chunk, and ``output`` keeps its autograd
    graph: :class:`pytest_saliency.engine.replay.GradientReplay` records the original model's
    activations in the same pass that traces it. ``on_output(name, output, args, kwargs)`` is called
    whenever a module's ``forward`` returns, with the arguments it was called with.

    Torch operations are numbered in the order they run (every call a ``TorchFunctionMode`` sees,
    on the first chunk), and ``on_op(index, event, owner, func, args, kwargs, result)`` is called
    after each one, with the innermost running module (``owner``) and the event counter when it
    started: the call ran after event ``event - 1`` and before event ``event``, so it precedes a
    cut ``c`` if ``event <= c``. (The first use of a parameter is an event of its own, numbered before the
    call that reads it.) The trace's own bookkeeping runs with torch functions disabled.
    """
    torch = require_torch()
    tracer = _Tracer(model, on_output, on_op)
    modules = dict(model.named_modules())
    flags = training_flags(model)
    chunks = [inputs] if not batch_size or batch_size >= inputs.shape[0] else list(inputs.split(batch_size))
    patched: list[tuple[Any, Any]] = []
    handles: list[Any] = []
    try:
        tracer.instrument(modules, patched, handles)
        ensure_eval_mode(model, flags)
        if saved_tensors_hooks is not None:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(*saved_tensors_hooks), tracer.mode():
                results = [call_model(model, inputs, rows=range(inputs.shape[0]))]
        else:
            with torch.no_grad():
                with tracer.mode():
                    results = [call_model(model, chunks[0], rows=range(chunks[0].shape[0]))]
                restore_forwards(patched)
                if len(chunks) > 1:  # note the order of module calls: see _place_later_modules
                    tracer.watch_entries(modules, handles)
                first = chunks[0].shape[0]
                for chunk in chunks[1:]:
                    tracer.later.append(None)
                    results.append(call_model(model, chunk, rows=range(first, first + chunk.shape[0])))
                    first += chunk.shape[0]
    finally:
        restore_forwards(patched)
        for handle in handles:
            handle.remove()
        restore_training_flags(flags)
    _place_later_modules(tracer.later, tracer.start, tracer.end)
    output = torch.cat(results) if len(results) > 1 and isinstance(results[0], torch.Tensor) else results[0]
    return tracer.trace(modules, output)


class _Tracer:
    """The bookkeeping of one :func:`trace_forward` pass: module entries and exits and first
    parameter uses are events, numbered on one counter as they happen; torch calls are numbered
    on their own."""

    def __init__(self, model: torch.nn.Module, on_output: Callable[[str, Any, Any, Any], None] | None,
                 on_op: OpCallback | None) -> None:
        self.on_output, self.on_op = on_output, on_op
        self.torch = require_torch()
        self.events = 0
        self.ops = 0
        self.running: list[str] = []  # the module stack, innermost last
        self.start: dict[str, Any] = {}
        self.end: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, list[tuple[Any, int]]] = {}
        # Parameters are matched by storage, not identity: a view or .detach() of a weight reads it too.
        self.storage_params: dict[int, list[int]] = {}
        for p in model.parameters():
            if plain_tensor(p):
                self.storage_params.setdefault(p.untyped_storage().data_ptr(), []).append(id(p))
        self.first_param_use: dict[int, int] = {}
        self.hooked: set[str] = set()  # modules timed by hooks (their forward cannot be patched)
        self.later: list[str | None] = []  # module entries in the later chunks (None: a new chunk)

    def mode(self) -> Any:
        """The ``TorchFunctionMode`` that sees every torch call of the first chunk."""
        return _parameter_use_class()(self)

    def torch_call(self, func: Any, args: Any, kwargs: Any) -> Any:
        """Run one torch call, noting the event at which each parameter's storage is first read."""
        kwargs = kwargs or {}
        index, self.ops = self.ops, self.ops + 1
        if self.storage_params:
            first = False
            for value in flat_arguments(args, kwargs):
                if isinstance(value, self.torch.Tensor) and plain_tensor(value):
                    ids = self.storage_params.pop(value.untyped_storage().data_ptr(), None)
                    for key in ids or ():
                        self.first_param_use[key] = self.events
                        first = True
            if first:  # a first use is an event: calls before it have a smaller count
                self.events += 1
        event = self.events  # this call runs between events event - 1 and event
        result = func(*args, **kwargs)
        if self.on_op is not None and self.running:
            self.on_op(index, event, self.running[-1], func, args, kwargs, result)
        return result

    def enter(self, name: str) -> None:
        self.start.setdefault(name, self.events)
        self.calls[name] = self.calls.get(name, 0) + 1
        self.events += 1
        self.running.append(name)

    def counted(self, name: str, inner: Any) -> Any:
        """``inner`` (a module's ``forward``) with its entry, exit and output noted."""
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.enter(name)
            try:
                output = inner(*args, **kwargs)
            finally:
                self.running.pop()
            self.end[name] = self.events
            self.events += 1
            with self.torch._C.DisableTorchFunction():
                if self.on_output is not None:
                    self.on_output(name, output, args, kwargs)
                tensors = output_tensors(output)
                self.outputs[name] = [(t, t._version) for t in tensors] if tensors is not None else []
            return output

        return forward

    def instrument(self, modules: dict[str, torch.nn.Module], patched: list[tuple[Any, Any]],
                   handles: list[Any]) -> None:
        """Wrap every module's ``forward`` (:meth:`counted`), or time it by hooks where it cannot be
        patched (a ``forward`` defined as a property); scripted modules are left alone."""
        for name, module in modules.items():
            if _scripted(module):
                continue
            try:
                patch_forward(module, self.counted(name, module.forward), patched)
            except (AttributeError, TypeError):
                self.hooked.add(name)
                handles.append(module.register_forward_pre_hook(self.pre_hook(name)))
                handles.append(module.register_forward_hook(self.post_hook(name)))

    def pre_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.enter(name)

        return hook

    def post_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.end[name] = self.events
            self.events += 1
            if self.running and self.running[-1] == name:
                self.running.pop()

        return hook

    def watch_entries(self, modules: dict[str, torch.nn.Module], handles: list[Any]) -> None:
        """Note the modules entered in the later chunks, in order (see :func:`_place_later_modules`)."""
        for name, module in modules.items():
            if name and not _scripted(module):
                handles.append(module.register_forward_pre_hook(self.entered(name)))

    def entered(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.later.append(name)

        return hook

    def trace(self, modules: dict[str, torch.nn.Module], output: Any) -> ForwardTrace:
        """The :class:`ForwardTrace` of what was noted."""
        replayable = {
            name for name, saved in self.outputs.items()
            if name and self.calls.get(name) == 1 and saved and not _scripted(modules[name]) and name not in self.hooked
            and not modules[name]._backward_hooks and not modules[name]._backward_pre_hooks
        }
        mutated = {name for name in replayable if any(t._version != version for t, version in self.outputs[name])}
        replayable -= mutated
        first_use = {}
        for name, module in modules.items():
            touched = [self.start[sub] for sub, _ in module.named_modules(prefix=name) if sub in self.start]
            touched += [self.first_param_use[id(p)] for p in module.parameters() if id(p) in self.first_param_use]
            if touched:
                first_use[name] = min(touched)
        order = sorted(self.start, key=self.start.__getitem__)
        return ForwardTrace(order=order, start=self.start, end=self.end, calls=self.calls, first_use=first_use,
                            replayable=replayable, mutated=mutated, output=output)


@functools.lru_cache(maxsize=1)
def _parameter_use_class() -> Any:
    """The trace's ``TorchFunctionMode`` class, made once; each pass makes an instance of it."""
    from torch.overrides import TorchFunctionMode

    class ParameterUse(TorchFunctionMode):
        """Hands every torch call to the :class:`_Tracer`."""

        def __init__(self, tracer: _Tracer) -> None:
            super().__init__()
            self.tracer = tracer

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return self.tracer.torch_call(func, args, kwargs)

    return ParameterUse


def _place_later_modules(later: list[str | None], start: dict[str, Any], end: dict[str, Any]) -> None:
    """Give modules that ran only in later chunks (control flow on the data) a place in the order.

    Each goes right after the traced module that ran last before it (fractional event numbers
    between that module's start and the next event), so layer selection and the cascading order
    are those of a pass over all images at once. They get no call count: nothing replays them.
    """
    groups: dict[float, list[str]] = {}
    placed: set[str] = set()
    anchor = -1.0
    for name in later:
        if name is None:  # a new chunk
            anchor = -1.0
        elif name in start:
            anchor = start[name]
        elif name not in placed:
            placed.add(name)
            groups.setdefault(anchor, []).append(name)
    for anchor, names in groups.items():
        for rank, name in enumerate(names, start=1):
            start[name] = end[name] = anchor + rank / (len(names) + 1)


def flat_arguments(args: Any, kwargs: Any) -> Any:
    """The leaves of a torch call's arguments: tensors and values inside (nested) tuples, lists
    and dicts, which is every container torch functions take. Written out instead of torch's
    pytree walk, which costs a few microseconds per call on every call the trace sees (a
    convolution's stride and padding are tuples)."""
    if not kwargs and not any(isinstance(v, _CONTAINERS) for v in args):
        return args
    leaves: list[Any] = []
    _collect(args, leaves)
    _collect(kwargs, leaves)
    return leaves


_CONTAINERS = (list, tuple, dict)


def _collect(value: Any, leaves: list[Any]) -> None:
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        leaves.append(value)
        return
    for item in value:
        if isinstance(item, _CONTAINERS):
            _collect(item, leaves)
        else:
            leaves.append(item)


@rng_isolated
@passes_model_call
def select_layers(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] = "leaf",
    *,
    depth: int = 1,
    trace: ForwardTrace | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` pairs to randomize, in forward-execution order (input side first).

    ``trace``: a :func:`trace_forward` of these inputs, if the caller has one (saves a forward pass).
    """
    depth = check_count(depth, "depth", hint="depth=1 means the model's children (for layers='block').")
    if trace is None:
        check_model(model)
        check_inputs(inputs, model)
    modules = dict(model.named_modules())
    executed = (trace or trace_forward(model, inputs[:1])).order
    rank = {name: i for i, name in enumerate(executed)}
    if isinstance(layers, str):
        if layers == "leaf":
            names = [n for n, m in modules.items() if _owns_parameters(m, recurse=False)]
        elif layers == "block":
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
        if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
            raise SaliencyUsageError(
                f"layers must be 'leaf', 'block' or a list of module names (strings), got {layers!r:.80}."
            )
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
