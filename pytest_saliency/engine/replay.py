"""Gradient maps for many randomized states without recomputing the unchanged prefix.

When a randomization check randomizes layer ``k`` (alone, or with the layers after it), every
module that finished running before ``k`` could first influence anything computes exactly what it
computed for the original model: its inputs and parameters are the same. "First influence" is
:attr:`pytest_saliency.model.layers.ForwardTrace.first_use`: ``k``'s start, a submodule's start (a child
may be called from outside its parent), or the first torch operation that reads one of ``k``'s
parameters' storage (code may use a weight before its layer runs). The original forward pass
therefore runs once with its autograd graph kept. In each randomized state the outermost finished
modules return their recorded outputs (their ``forward`` is replaced for that pass, once per
module), and only the rest of the forward pass runs again. Torch calls made directly in a
composite module's ``forward`` before the cut (say an ``F.max_pool2d`` between two layers) return
their recorded outputs too. A ``TorchFunctionMode`` recognises them by what they compute
(:func:`call_key`: the function, where each tensor argument comes from, the other arguments),
not by their position, so a forward pass that makes other calls in between (a cache filled on
the first call, a hook) cannot be handed a neighbour's output. The backward goes in two stages:
through the recomputed part to the replayed outputs (which enter as detached leaves, so that part
is freed as it goes), then from the recorded outputs through the kept graph to the inputs. An IPR
check over L layers then costs less than (L + 1) full forward and backward passes, the "floor" of
a straightforward loop.

The recorded pass is a :func:`pytest_saliency.model.layers.trace_forward` pass with gradients on, so the
cuts come from the pass that is replayed; for ``saliency`` and ``input_x_gradient`` it is also
the check's only traced pass.

Memory stays at about one forward graph. Only outputs the graph saves anyway are kept (a module
whose output nothing saves, such as a BatchNorm feeding a ReLU, runs again instead, or, in states
where only replayed modules read its output, returns a zero-memory stand-in: the recording
pass notes when each module's outputs are read, and a read it did not see, on a path that control
flow after the cut takes, raises and turns the state into a full pass), plus the
outputs of calls that reduce their input to at most half (pooling), whose input the graph saves. Independent
states run from the last layer to the first, and before each state the recorded outputs that end
after the new cut are dropped, which frees the part of the original graph only they kept alive.

Where it applies (:func:`reusable`):

* the named methods ``saliency``, ``input_x_gradient``, ``integrated_gradients`` and ``smoothgrad``.
  Their maps are made of input gradients, computed here with captum's arithmetic (see
  :class:`_Recipe`). For the last two, all interpolation steps or noisy samples of a batch must
  fit in one internal batch of the memory budget.
* a model output of shape (N, num_classes), no parameter shared between modules, no global module
  backward hooks, and modules that are pure functions of their inputs. A model that draws random
  numbers (dropout left on in eval mode) is not replayed: the check sees its traced pass change a
  global generator and runs full passes, each seeded alike (see :mod:`pytest_saliency.core.rng`).

A module is replayed only if it ran exactly once on the batch (counted on ``forward`` itself, so
direct ``.forward()`` calls count), returned plain tensors that no later in-place operation
changed, has no backward hooks, and is not scripted. The others run again. A call is replayed
only if its output is a plain tensor that is not a view or an in-place result of its inputs and
did not change afterwards. Safety nets:

* :meth:`GradientReplay.verify` recomputes the logits from the recorded outputs at the largest cut
  and falls back to full captum passes if they differ.
* The saved-tensor hooks keep autograd's in-place check.
* A recorded output changed in place after it was recorded (for example by a forward pass that
  works in place when gradients are off, during the verification) stops the replay.
* Calls that draw random numbers (:data:`RANDOM_CALLS`) are never replayed.

Whatever stops a replay raises :class:`pytest_saliency.engine.base.CannotReplay`, and
:class:`ReplayEngine` then runs that state and the ones after it as full captum passes. An
exception raised by the model's own code in a replayed pass becomes one too (see
:func:`pytest_saliency.engine.base.model_code`): the full pass reports it if it is the model's
error. Any other exception is an error of the engine and propagates.

``layer_randomization(..., reuse_activations=False)`` turns it all off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from ..core.fingerprint import weighted_checksum
from ..core.forward import call_model
from ..core.torchtools import require_torch
from ..core.validation import all_finite
from ..model.layers import (
    ForwardTrace,
    flat_arguments,
    output_tensors,
    patch_forward,
    plain_tensor,
    restore_forwards,
    trace_forward,
)
from .base import CannotReplay, Explanation, PlainEngine, States, engine_callback, model_code

if TYPE_CHECKING:
    import torch

    from ..maps.methods import Explainer, MethodSpec

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")


def reusable(model: torch.nn.Module, trace: ForwardTrace, method: MethodSpec | Explainer, options: dict[str, Any],
             batch_size: int | None, images_per_call: int) -> bool:
    """Whether :class:`GradientReplay` can compute ``method``'s maps for this model and batch."""
    from ..maps.methods import MethodSpec

    if not isinstance(method, MethodSpec) or method.name not in GRADIENT_METHODS:
        return False
    chunk = batch_size or options.get("_image_batch")
    if chunk and chunk < images_per_call:  # the caller bounds the batch: keep captum's chunked path
        return False
    if method.name == "integrated_gradients":
        # All interpolation steps of all images in one graph: only within the memory budget, which
        # sized internal_batch_size (captum's own path would split the steps otherwise).
        o = {**method.defaults, **options}
        rows = o["internal_batch_size"]
        if rows is not None and rows < images_per_call * int(o["n_steps"]):
            return False
    if method.name == "smoothgrad":  # likewise: every noisy sample in one captum partition
        o = {**method.defaults, **options}
        per_image = o["nt_samples_batch_size"]
        if per_image is not None and per_image < int(o["nt_samples"]):
            return False
    return replayable_model(model, trace)


def replayable_model(model: torch.nn.Module, trace: ForwardTrace) -> bool:
    """Whether a recorded pass of ``model`` (traced as ``trace``) can be replayed at all.

    The output must be one (N, num_classes) tensor, the model not scripted, no global module
    backward hook installed (it would not run on replayed modules), and no parameter shared by
    two modules (it would change inside the reused prefix too).
    """
    torch = require_torch()
    if not isinstance(trace.output, torch.Tensor) or trace.output.dim() != 2 or not trace.replayable:
        return False
    if isinstance(model, torch.jit.ScriptModule):
        return False
    hooks = torch.nn.modules.module
    if getattr(hooks, "_global_backward_hooks", None) or getattr(hooks, "_global_backward_pre_hooks", None):
        return False
    return len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters()))


def state_cuts(trace: ForwardTrace, names: list[str], mode: str) -> list[int]:
    """Per state, the trace event from which the randomized parameters can change anything.

    That is :attr:`ForwardTrace.first_use` (a layer's start, or earlier if its parameters or
    submodules are used before it runs); everything that ended before it is unchanged in that
    state. Independent: the state's own layer. Cascading: the earliest of the layers randomized
    so far (``names`` in randomization order).
    """
    never = max(trace.end.values(), default=0) + 1  # a layer that did not run here changes nothing
    starts = [trace.first_use.get(n, never) for n in names]
    if mode == "independent":
        return starts
    return [min(starts[: i + 1]) for i in range(len(starts))]


class _Replay:
    """Stands in for a module's ``forward`` for one pass: the recorded output, once.

    A second call in the same pass (a module the trace saw once but that runs again, e.g.
    through a path the trace did not take) runs the real ``forward``, so it is never wrong.
    """

    def __init__(self, value: Any, forward: Any) -> None:
        self.value, self.forward, self.used = value, forward, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.used:
            return self.forward(*args, **kwargs)
        self.used = True
        return self.value


#: Torch calls that draw random numbers: never replayed (a full pass would draw again).
RANDOM_CALLS = frozenset({
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal", "bernoulli",
    "multinomial", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "rrelu", "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d",
})


def call_key(func: Any, args: Any, kwargs: Any, origin: dict[int, Any]) -> Any:
    """What a torch call computes, as a hashable key, or None if that cannot be told.

    Tensor arguments are named by where they come from (``origin``: the model's input, a
    parameter or buffer, a recorded module or call output) and their version (an in-place change
    makes another value), other arguments by value. Two calls
    with the same key compute the same output (for a deterministic function), whatever else the
    forward pass did in between; a call with a tensor of unknown origin, no tensor at all, or an
    argument that is not a plain value gets no key and is never replayed.
    """
    torch = require_torch()
    if getattr(func, "__name__", "") in RANDOM_CALLS:
        return None
    plain = (bool, int, float, str, torch.dtype, torch.device, torch.Size)
    tensors = 0

    def part(value: Any) -> Any:
        """The key of one argument; nested sequences keep their structure (``(2, 2), 1`` is not
        ``2, (2, 1)``). Raises LookupError for what cannot be named."""
        nonlocal tensors
        if isinstance(value, torch.Tensor):
            token = origin.get(id(value))
            if token is None:
                raise LookupError
            tensors += 1
            return token, value._version  # an in-place change in between makes it another value
        if value is None or isinstance(value, plain):
            return type(value), value
        if type(value) in (tuple, list):
            return type(value), tuple(part(item) for item in value)
        raise LookupError

    try:
        key = (func, tuple(part(value) for value in args),
               tuple((name, part(kwargs[name])) for name in sorted(kwargs)))
    except LookupError:
        return None
    return key if tensors else None


#: :func:`call_key` as the replay's torch-function mode runs it, inside the model's code.
_guarded_call_key = engine_callback(call_key)


def _op_replay_mode(values: dict[Any, Any], origin: dict[int, Any]) -> Any:
    """A ``TorchFunctionMode`` that returns ``values[key]`` for a call whose :func:`call_key` is ``key``."""
    return _op_replay_class()(values, origin)


@functools.lru_cache(maxsize=1)
def _op_replay_class() -> Any:
    """The mode's class, made once (defining a class costs more than a small layer's forward)."""
    from torch.overrides import TorchFunctionMode

    class OpReplay(TorchFunctionMode):
        def __init__(self, values: dict[Any, Any], origin: dict[int, Any]) -> None:
            super().__init__()
            self.values, self.origin = values, origin
            self.functions = {key[0] for key in values}  # most calls are of other functions: skip their keys

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func in self.functions:
                key = _guarded_call_key(func, args, kwargs, self.origin)
                if key is not None and key in self.values:
                    return self.values[key]
            return func(*args, **kwargs)

    return OpReplay


DRAWS_ERROR = "the model drew random numbers in a replayed pass (a replay cannot give the full pass's numbers)"

INPLACE_ERROR = (
    "one of the variables needed for gradient computation has been modified by an inplace operation "
    "(found while reusing the original model's activations; pass reuse_activations=False to get "
    "autograd's own report)"
)


class _Recorder:
    """The bookkeeping of one recording pass (:meth:`_RecordedPass._record`): its callbacks note every
    module output and every torch call made directly in a composite module's ``forward``, where
    each tensor comes from, which outputs autograd saves, and which ones are read by whom.

    The recorded outputs, calls and readers go to ``owner`` (``recorded``, ``ops``, ``consumers``);
    what only the filtering after the pass needs stays here.
    """

    def __init__(self, owner: _RecordedPass) -> None:
        self.owner = owner
        self.calls: dict[str, int] = {}
        self.sums: dict[Any, list[Any]] = {}
        self.versions: dict[Any, list[int]] = {}
        # Where each tensor of this pass comes from (see call_key): the input, parameters and
        # buffers, then every module output and recorded call output as it appears. The tensors
        # stay alive until the filtering after the pass, so their ids are not reused meanwhile.
        self.origin = owner._fixed_origins()
        self.keys: set[Any] = set()  # call_keys recorded so far
        self.reducing: set[Any] = set()  # modules and calls whose output is at most half their largest input
        self.saved: set[int] = set()  # storages of the tensors autograd saved
        self.aliased: set[str] = set()  # modules whose outputs are also another module's, or the input's

    def fingerprint(self, key: Any, tensors: Any) -> None:
        """Note the versions and checksums of an output, to see later whether it changed."""
        self.sums[key] = [weighted_checksum(t) for t in tensors]
        self.versions[key] = [t._version for t in tensors]

    def note(self, name: str, output: Any, args: Any, kwargs: Any) -> None:
        """A module returned ``output`` (``on_output`` of :func:`trace_forward`)."""
        self.calls[name] = self.calls.get(name, 0) + 1
        tensors = output_tensors(output) if name else None  # the root's output is never replayed
        if tensors is None:
            return
        self.owner.recorded[name] = output
        self.fingerprint(name, tensors)
        for position, tensor in enumerate(tensors):
            earlier = self.origin.get(id(tensor))
            if earlier is not None and earlier[0] != "call":  # another module's output, or the input
                self.aliased.add(name)
                if earlier[0] == "module":
                    self.aliased.add(earlier[1])
            self.origin[id(tensor)] = ("module", name, position)
        if _reduces(tensors, args, kwargs):
            self.reducing.add(name)

    def note_op(self, index: int, event: int, owner: str, func: Any, args: Any, kwargs: Any, result: Any) -> None:
        """A torch call returned ``result`` (``on_op`` of :func:`trace_forward`)."""
        torch = require_torch()
        for value in flat_arguments(args, kwargs):  # which modules' outputs this call reads
            token = self.origin.get(id(value)) if isinstance(value, torch.Tensor) else None
            if token is not None and token[0] == "module":
                self.owner.consumers.setdefault(token[1], set()).add(event)
        if owner not in self.owner.composite or not plain_tensor(result):
            return
        key = call_key(func, args, kwargs, self.origin)
        if key is None or key in self.keys:
            return  # a second call computing the same thing: the first one's output serves it
        storage = result.untyped_storage().data_ptr()
        if any(plain_tensor(value) and value.untyped_storage().data_ptr() == storage
               for value in flat_arguments(args, kwargs)):
            return  # a view or an in-place result: nothing to save by replaying it
        self.keys.add(key)
        self.owner.ops[index] = (event, key, result)
        self.origin[id(result)] = ("call", index)
        self.fingerprint(index, [result])
        if _reduces([result], args, kwargs):
            self.reducing.add(index)

    def pack(self, tensor: Any) -> Any:
        """The saved-tensor hook's pack: notes what autograd saves."""
        torch = require_torch()
        # Not seen by the trace's TorchFunctionMode (a custom autograd.Function packs outside any
        # torch call it sees).
        with torch._C.DisableTorchFunction():
            if plain_tensor(tensor):
                self.saved.add(tensor.untyped_storage().data_ptr())
            # Detached, as autograd stores saved outputs (the tensor would otherwise hold its own
            # grad_fn, and the graph would live until the garbage collector found the cycle). The
            # version is kept because autograd skips its in-place check for hooked tensors.
            return tensor.detach(), tensor._version

    @staticmethod
    def unpack(packed: Any) -> Any:
        """The saved-tensor hook's unpack: autograd's in-place check, which hooked tensors skip."""
        tensor, version = packed
        if tensor._version != version:
            raise CannotReplay(INPLACE_ERROR)
        return tensor


class _RecordedPass:
    """One recorded forward pass of ``model`` on ``x`` and the replays of it (see the module docstring).

    :class:`GradientReplay` keeps the pass's graph for input gradients; :class:`ForwardReplay`
    only its outputs, for perturbation methods, which need logits alone.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, seed: int | None = None) -> None:
        self.model = model
        self.x = x
        self.seed = seed  # each pass starts from it, as the full pass it stands for (None: not reseeded)
        self._seeded_states: Any = None  # the generators' states right after seeding with seed
        self.trace: Any = None  # the recorded pass's ForwardTrace
        self.modules = dict(model.named_modules())
        self.composite = {name for name, module in self.modules.items() if next(module.children(), None) is not None}
        self.recorded: dict[str, Any] = {}
        self.ops: dict[int, tuple[int, Any, Any]] = {}  # call number -> (event, call_key, output)
        self.versions: dict[Any, list[int]] = {}  # recorded module / call -> its tensors' versions
        # Modules not recorded whose outputs only recorded modules may read: (outputs' shapes,
        # dtypes, devices, tuple or not), and when (trace events) torch calls read each module's outputs.
        self.unread: dict[str, tuple[list[tuple[Any, Any, Any]], bool]] = {}
        self.consumers: dict[str, set[int]] = {}  # module -> the trace events of the calls that read its outputs
        self.logits: Any = None
        self._state_origins: dict[int, Any] | None = None
        self.stood_in = False  # whether the last replay gave some module a stand-in (see _replaying)

    @contextlib.contextmanager
    def _pass(self) -> Iterator[None]:
        """One pass of the replay, seeded like the full pass it stands for. A pass that draws random
        numbers raises (:data:`DRAWS_ERROR`): the replay skips the draws of the part it reuses, so
        the rest would draw other numbers than the full pass; the caller falls back to full passes."""
        from ..core.rng import generator_states, pass_seeded, same_generator_states

        device = self.x.device
        with contextlib.nullcontext() if self.seed is None else pass_seeded(self.seed, device):
            if self.seed is None:
                before = generator_states(device)
            else:
                if self._seeded_states is None:
                    self._seeded_states = generator_states(device)
                before = self._seeded_states
            yield
            if not same_generator_states(before, generator_states(device)):
                raise CannotReplay(DRAWS_ERROR)

    def _record(self, keep_graph: bool) -> torch.Tensor:
        """The original forward pass, traced (:func:`pytest_saliency.model.layers.trace_forward`), with
        the outputs worth replaying recorded; returns its output.

        Recorded are the outputs of modules (for the replay of whole modules) and of torch calls
        made directly in a composite module's own ``forward``, such as an ``F.max_pool2d``
        between two layers (for the calls left when the modules around them are replayed).
        ``keep_graph``: the pass runs with gradients and keeps its graph, and only outputs the
        graph saves anyway (or pooling outputs) are kept; without, every unchanged output is.
        """
        torch = require_torch()
        recorder = _Recorder(self)
        hooks = (engine_callback(recorder.pack), engine_callback(recorder.unpack)) if keep_graph else None
        with self._pass(), model_code("the model's recorded forward pass"):
            self.trace = trace_forward(self.model, self.x, on_output=engine_callback(recorder.note),
                                       on_op=engine_callback(recorder.note_op), saved_tensors_hooks=hooks)
        out = self.trace.output
        if not isinstance(out, torch.Tensor):
            raise CannotReplay("the model's output is not a tensor")
        self.trace.output = out.detach()
        self._keep_worth_replaying(recorder, keep_graph)
        self.logits = out.detach()
        return out

    def _keep_worth_replaying(self, recorder: _Recorder, keep_graph: bool) -> None:
        """Drop the recorded outputs that are not worth replaying, or not safe to.

        With the graph kept, only outputs the graph holds anyway stay: a module whose output
        nothing saves (a BatchNorm feeding a ReLU, which saves its own output) is cheaper to run
        again than to keep. Modules and calls that reduce their input (pooling: a quarter of it; a
        Linear layer to a few features) stay either way: they cost little next to their input,
        and running them again costs a pass over it. Only modules that ran exactly once on this
        batch stay, and never an output that carries a gradient hook registered outside the
        module (it would fire twice: on the replayed leaf and on the original) or that changed
        after it was returned (its version moved, or, for a write through ``.data``, its
        checksum; checked last, on the outputs left). Modules dropped that nothing but replayed
        modules may read are noted in :attr:`unread`.
        """
        torch = require_torch()

        def keep(key: Any, tensors: Any) -> bool:
            return all((not keep_graph or t.untyped_storage().data_ptr() in recorder.saved or key in recorder.reducing)
                       and not t._backward_hooks for t in tensors)

        hooks = torch.nn.modules.module
        global_hooks = bool(getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None))
        for name, output in list(self.recorded.items()):
            tensors = output if isinstance(output, tuple) else (output,)
            once = name in self.trace.replayable and recorder.calls.get(name) == 1
            if not once or not keep(name, tensors):
                del self.recorded[name]
                module = self.modules[name]
                if (keep_graph and once and name not in recorder.aliased
                        and self.consumers.get(name) and not global_hooks
                        and not module._forward_hooks and not module._forward_pre_hooks
                        and all(t.is_floating_point() for t in tensors)):
                    self.unread[name] = ([(t.shape, t.dtype, t.device) for t in tensors], isinstance(output, tuple))
        for index, (_, _, result) in list(self.ops.items()):
            if not keep(index, [result]):
                del self.ops[index]
        for key in self._changed_since(recorder.sums, recorder.versions):
            if key in self.recorded:
                del self.recorded[key]
            else:
                del self.ops[key]
        self.versions = {key: recorder.versions[key] for key in [*self.recorded, *self.ops]}

    def _changed_since(self, sums: dict[Any, list[Any]], versions: dict[Any, list[int]]) -> set[Any]:
        """Keys of recorded outputs whose versions or checksums are no longer those taken when they were made."""
        torch = require_torch()
        outputs: dict[Any, Any] = {**self.recorded, **{index: result for index, (_, _, result) in self.ops.items()}}
        keys = [key for key in outputs if sums.get(key)]
        if not keys:
            return set()
        current = {key: [t for t in (outputs[key] if isinstance(outputs[key], tuple) else (outputs[key],))]
                   for key in keys}
        changed = {key for key in keys if [t._version for t in current[key]] != versions[key]}
        for key in keys:  # (torch.equal is False for NaN: such outputs are not replayed)
            if key not in changed and not all(torch.equal(weighted_checksum(t), before)
                                              for t, before in zip(current[key], sums[key])):
                changed.add(key)
        return changed

    def verify(self, cut: int) -> bool:
        """Recompute the logits from the recorded outputs before ``cut``; True if they are the same.

        A replay that stops (:class:`CannotReplay`) is a False: the caller falls back.
        """
        torch = require_torch()
        try:
            logits = self.replayed_logits(cut)
        except CannotReplay:
            return False
        if not isinstance(logits, torch.Tensor) or logits.shape != self.logits.shape:
            return False
        scale = float(self.logits.abs().max()) if self.logits.numel() else 0.0
        return bool(torch.allclose(logits, self.logits, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))

    def replayed_logits(self, cut: int) -> torch.Tensor:
        """The model's output as it is now (without gradients), with what ended before ``cut`` replayed."""
        torch = require_torch()
        with torch.no_grad(), self._pass(), self._replaying(cut), model_code("the model's replayed forward pass"):
            return call_model(self.model, self.x)

    def close(self) -> None:
        """Drop the recorded outputs (and with them a kept graph)."""
        self.recorded.clear()
        self.ops.clear()
        self.logits = None

    def _fixed_origins(self) -> dict[int, Any]:
        """Names for the tensors every pass shares: the fed input, the parameters and the buffers
        (a fresh dict each time; the model's tensors are looked up once per recorded pass)."""
        if self._state_origins is None:
            self._state_origins = {id(tensor): ("state", name)
                                   for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]}
        return {**self._state_origins, id(self.x): ("input",)}

    @contextlib.contextmanager
    def _replaying(self, cut: int, leaves: dict[int, tuple[Any, Any]] | None = None) -> Iterator[None]:
        """Make the outermost recorded modules that ended before ``cut`` return their outputs, and
        the recorded torch calls made before ``cut`` outside them (see :func:`call_key`).

        With ``leaves``, each recorded tensor that carries a gradient is served as a detached leaf
        (one per tensor, shared by every module or call that returns it) and noted there. A
        recorded tensor changed in place since it was recorded (say by a forward that works in
        place when gradients are off, during :meth:`verify`) is an error: the replay is stale.
        """
        done = {n for n in self.recorded if self.trace.end[n] < cut}
        outermost = [n for n in done if not any(a in done for a in _ancestors(n))]
        patched: list[tuple[Any, Any]] = []
        replayed = set(outermost)
        # The replayed modules' calls, as spans of trace events: a read made during one of them
        # does not happen in this state (a read by a submodule the parent calls directly, after
        # or before, does).
        spans = [(self.trace.start[n], self.trace.end[n]) for n in outermost]

        def inside_replayed(name: str) -> bool:
            return name in replayed or any(a in replayed for a in _ancestors(name))
        origin = self._fixed_origins()

        def served(tensor: Any, key: Any, position: int, token: Any) -> Any:
            if tensor._version != self.versions[key][position]:
                raise CannotReplay("a recorded output was changed in place after it was recorded")
            if leaves is not None and tensor.requires_grad:
                if id(tensor) not in leaves:
                    leaf = tensor.detach().requires_grad_(True)
                    leaf.__dict__.update(tensor.__dict__)  # Python attributes a module set on its output
                    leaves[id(tensor)] = (tensor, leaf)
                tensor = leaves[id(tensor)][1]
            origin[id(tensor)] = token
            return tensor

        values = {key: served(result, index, 0, ("call", index))
                  for index, (event, key, result) in self.ops.items() if event <= cut}
        mode = _op_replay_mode(values, origin) if values else None
        try:
            for name in outermost:
                module = self.modules[name]
                value = self.recorded[name]
                if isinstance(value, tuple):
                    value = tuple(served(v, name, i, ("module", name, i)) for i, v in enumerate(value))
                else:
                    value = served(value, name, 0, ("module", name, 0))
                patch_forward(module, _Replay(value, module.forward), patched)
            # A module that finished before the cut and whose outputs only replayed modules read
            # (a BatchNorm feeding a replayed ReLU) need not run: it returns stand-ins of the
            # right shapes, which nothing reads. A read the recording pass did not see (control
            # flow after the cut taking another path) raises, and the caller falls back to a
            # full pass (see _unread_stand_in).
            self.stood_in = False
            for name, (specs, is_tuple) in self.unread.items():
                if self.trace.end[name] < cut and not inside_replayed(name) and all(
                        any(start < event <= end for start, end in spans) for event in self.consumers[name]):
                    stand_ins = tuple(_unread_stand_in(*spec) for spec in specs)
                    module = self.modules[name]
                    patch_forward(module, _Replay(stand_ins if is_tuple else stand_ins[0], module.forward), patched)
                    self.stood_in = True
            with mode if mode is not None else contextlib.nullcontext():
                yield
        finally:
            restore_forwards(patched)


class GradientReplay(_RecordedPass):
    """Input-gradient maps of one batch, for the original model and then for each randomized state.

    ``target``: one class per input (the original model's predictions by default); it may be set
    after :meth:`record`, whose trace gives the predictions. ``seed`` and ``index`` (where the
    inputs sit in the user's inputs, as for :func:`pytest_saliency.maps.explainers.attribute`) give
    each image the random draws (noise, a uniform baseline) of the full captum pass.

    Use :meth:`original` first (it calls :meth:`record` if needed), then :meth:`verify`, then
    :meth:`maps` once per state with the state's cut (:attr:`ForwardTrace.first_use`, in
    :attr:`trace`, of the earliest randomized module). Cuts should not increase from one call to
    the next; if they do, the result stays correct but less is reused.
    """

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor | None, method: str,
                 options: dict[str, Any], seed: int = 0, index: Any = 0) -> None:
        self.recipe = _Recipe(method, options, inputs.detach(), seed, index)
        super().__init__(model, self.recipe.fed.detach().requires_grad_(True), seed)
        self.target = None if target is None else target.reshape(-1)
        self._out: Any = None  # the recorded pass's logits, with their graph, until original()

    def record(self) -> ForwardTrace:
        """The original forward pass with its graph kept (:meth:`_record`). For ``saliency`` and
        ``input_x_gradient``, which feed the images themselves, this is also the check's traced
        forward pass."""
        self._out = self._record(keep_graph=True)
        return self.trace

    def original(self) -> torch.Tensor:
        """The original model's maps (after :meth:`record`, which this runs if it has not run)."""
        if self._out is None:
            self.record()
        out, self._out = self._out, None
        with self._pass():
            return self._gradient(out)

    def maps(self, cut: int) -> torch.Tensor:
        """Maps of the model as it is now, whose modules that ended before ``cut`` are unchanged.

        The replayed outputs enter this pass as detached leaves, so the backward runs in two
        stages: through the recomputed suffix to those leaves (and to the inputs directly),
        freeing the suffix's buffers as it goes, then from the recorded outputs through the kept
        original graph to the inputs. Retaining the whole graph instead would keep every suffix's
        buffers alive during its backward and make it allocate fresh memory for each state.
        """
        for name in [n for n in self.recorded if self.trace.end[n] >= cut]:
            del self.recorded[name]  # frees the part of the original graph only it kept alive
        for index in [i for i, (event, _, _) in self.ops.items() if event > cut]:
            del self.ops[index]
        with self._pass():
            return self._state_maps(cut)

    def _state_maps(self, cut: int) -> torch.Tensor:
        torch = require_torch()
        leaves: dict[int, tuple[Any, Any]] = {}  # id(recorded tensor) -> (recorded, leaf)
        with torch.enable_grad(), self._replaying(cut, leaves), model_code("the model's replayed forward pass"):
            out = call_model(self.model, self.x)
        if self.stood_in and not bool(torch.isfinite(out).all()):
            raise CannotReplay(UNREAD_ERROR)
        selected = out.gather(1, self.recipe.targets(self.target)[:, None]).sum()
        total = self._two_stage_gradient(selected, list(leaves.values())) if selected.requires_grad else None
        if total is None:  # the output does not depend on the inputs: let captum's path report it
            raise CannotReplay("the model's output does not depend on its inputs in this state")
        if self.stood_in and not bool(torch.isfinite(total).all()):
            raise CannotReplay(UNREAD_ERROR)
        return self.recipe.attributions(total.detach())

    def _two_stage_gradient(self, selected: torch.Tensor, pairs: list[tuple[Any, Any]]) -> torch.Tensor | None:
        """d(selected)/d(inputs): through the recomputed suffix to the inputs and to the replayed
        leaves of ``pairs`` (recorded tensor, leaf), then from the recorded tensors, weighted by
        their leaves' gradients, through the kept original graph to the inputs."""
        torch = require_torch()
        with model_code("the backward pass through the replayed state"):
            grads = torch.autograd.grad(selected, [self.x] + [leaf for _, leaf in pairs], allow_unused=True)
        total = grads[0]
        through = [(recorded, g) for (recorded, _), g in zip(pairs, grads[1:]) if g is not None]
        if through:
            # A scalar root, not the recorded tensors with grad_outputs: on a retained graph the
            # latter leaves about one activation-sized buffer per node allocated for as long as
            # the graph lives. A dot product, not (r * g).sum(): no product tensor in the forward
            # direction.
            root = sum(torch.dot(r.reshape(-1), g.reshape(-1)) for r, g in through)
            with model_code("the backward pass through the original model"):
                (prefix,) = torch.autograd.grad(root, self.x, retain_graph=True, allow_unused=True)
            if prefix is not None:
                total = prefix if total is None else total + prefix
        return total

    def close(self) -> None:
        super().close()
        self._out = None

    def _gradient(self, out: torch.Tensor) -> torch.Tensor:
        """d(selected logits)/d(model inputs) of the original pass (which keeps its graph)."""
        torch = require_torch()
        selected = out.gather(1, self.recipe.targets(self.target)[:, None]).sum()
        grad = None
        if selected.requires_grad:
            with model_code("the backward pass through the original model"):
                (grad,) = torch.autograd.grad(selected, self.x, retain_graph=True, allow_unused=True)
        if grad is None:  # the output does not depend on the inputs: let captum's path report it
            raise CannotReplay("the model's output does not depend on its inputs")
        return self.recipe.attributions(grad.detach())


class ForwardReplay(_RecordedPass):
    """Logits of one batch for the original model and then for model states whose modules that
    ended before a cut are unchanged: perturbation methods (occlusion) need nothing else.

    :meth:`record` runs the original pass without gradients and keeps every module output (and
    call output) that did not change afterwards; :meth:`replayed_logits` then runs only the rest.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        super().__init__(model, x.detach())

    def record(self) -> torch.Tensor:
        """The original pass's logits (its :class:`ForwardTrace` is :attr:`trace`)."""
        return self._record(keep_graph=False)


class _Recipe:
    """What a gradient method feeds the model, and how it turns input gradients into attributions.

    Written to match captum's arithmetic exactly (the tests compare with captum): ``saliency`` is
    the gradient (``abs`` optional), ``input_x_gradient`` the gradient times the input, and
    ``integrated_gradients`` feeds all interpolation steps as one batch, ``baseline + alpha *
    (x - baseline)`` step by step, and sums the step-size-weighted gradients times ``x - baseline``
    (captum's ``IntegratedGradients.attribute`` with every step in one internal batch);
    ``smoothgrad`` feeds every noisy sample of every image at once, each image's noise drawn by
    the same call under the same seed (:func:`pytest_saliency.maps.explainers.image_seed`) and with
    the same standard deviation as captum's ``NoiseTunnel`` on that image alone (one partition),
    and averages the gradients. A ``"uniform"`` IG baseline is likewise drawn image by image.
    The noisy or interpolated inputs are the same in every randomized state, so their prefix
    activations are reused like the images' own.
    """

    def __init__(self, method: str, options: dict[str, Any], x: Any, seed: int, index: Any = 0) -> None:
        torch = require_torch()
        from ..core.rng import seeded
        from ..maps.methods import METHODS, image_ids, image_seed, smoothgrad_stdev

        o = {**METHODS[method].defaults, **options}
        self.method, self.x, self.steps = method, x, 1
        self.absolute = method == "saliency" and bool(o.get("abs", False))
        self.fed = x
        if method == "integrated_gradients":
            from captum.attr._utils.approximation_methods import approximation_parameters

            from ..maps.baselines import uniform_baselines, zero_or

            step_sizes_func, alphas_func = approximation_parameters(o["integration_method"])
            self.steps = int(o["n_steps"])
            step_sizes, alphas = step_sizes_func(self.steps), alphas_func(self.steps)
            if isinstance(o["baselines"], str) and o["baselines"] == "uniform":
                self.baseline = uniform_baselines(x, seed, index, method, options)  # the captum path's draws
            else:
                self.baseline = zero_or(o["baselines"], x)
            self.fed = torch.cat([self.baseline + alpha * (x - self.baseline) for alpha in alphas], dim=0)
            self.step_sizes = torch.tensor(step_sizes).float().view(self.steps, 1).to(x.device)
        if method == "smoothgrad":
            self.steps = int(o["nt_samples"])
            size = (self.steps,) + tuple(x.shape[1:])
            noisy = []
            for row, image in enumerate(image_ids(index, x.shape[0])):
                one = x[row:row + 1]
                stdev = smoothgrad_stdev(o, one)
                # captum's NoiseTunnel._add_noise_to_input on this image, drawn first thing under its seed as there
                with seeded(image_seed(seed, image, method, options), x.device):
                    noise = torch.normal(0, torch.tensor(stdev, device=x.device).repeat(size))
                noisy.append(one.repeat_interleave(self.steps, dim=0) + noise)
            self.fed = torch.cat(noisy)

    def targets(self, target: Any) -> Any:
        """One target per fed row: IG repeats the batch per step, SmoothGrad each image per sample."""
        if self.steps == 1 or target.numel() == 1:
            return target.expand(self.fed.shape[0])
        if self.method == "integrated_gradients":
            return target.repeat(self.steps)
        return target.repeat_interleave(self.steps)

    def attributions(self, grad: Any) -> Any:
        if self.method == "saliency":
            return grad.abs() if self.absolute else grad
        if self.method == "input_x_gradient":
            return grad * self.x
        if self.method == "smoothgrad":  # NoiseTunnel: the sum over samples, times 1, over nt_samples
            total = grad.view((self.x.shape[0], self.steps) + tuple(grad.shape[1:])).sum(dim=1)
            return total * 1 / self.steps
        scaled = grad.contiguous().view(self.steps, -1) * self.step_sizes
        total = scaled.reshape((self.steps, self.x.shape[0]) + tuple(grad.shape[1:])).sum(dim=0)
        return total * (self.x - self.baseline)


#: Why a replayed state stopped: the caller runs the state as a full pass instead (where a
#: non-finite result of the model itself is reported as such).
UNREAD_ERROR = "a stand-in for a module output that nothing was seen to read was read, or the state is not finite"


def _unread_stand_in(shape: Any, dtype: Any, device: Any) -> Any:
    """A tensor of the given shape for an output nothing reads, which costs no memory (one value,
    expanded) and stops any read: every torch function on it raises (comparisons, ``where`` and
    masks included), so the caller falls back to a full pass. Its value is NaN, for reads that
    bypass torch functions (``torch._C.DisableTorchFunction``): those mostly show as NaN."""
    torch = require_torch()
    return torch.Tensor._make_subclass(_stand_in_class(), torch.full((), float("nan"), dtype=dtype, device=device).expand(shape))


@functools.lru_cache(maxsize=1)
def _stand_in_class() -> Any:
    tensor: Any = require_torch().Tensor

    class UnreadStandIn(tensor):
        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            raise CannotReplay(UNREAD_ERROR)

    return UnreadStandIn


def _reduces(outputs: list[Any], args: Any, kwargs: Any) -> bool:
    """Whether ``outputs`` (plain tensors) take at most half the bytes of the largest tensor argument
    that does not share their storage (pooling, a strided convolution, a Linear layer to fewer features)."""
    storages = {t.untyped_storage().data_ptr() for t in outputs}
    largest = max((value.numel() * value.element_size() for value in flat_arguments(args, kwargs)
                   if plain_tensor(value) and value.untyped_storage().data_ptr() not in storages), default=0)
    return 2 * sum(t.numel() * t.element_size() for t in outputs) <= largest


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class ReplayEngine(PlainEngine):
    """Gradient maps of one batch of images by activation replay (:class:`GradientReplay`): the
    original maps from the recorded pass, each state's from a replay of what follows its cut.

    ``recording``: the check's traced pass, when it recorded the batch already (its targets are
    set here). Whatever stops the replay (:class:`CannotReplay`) sends the rest of the batch
    down the plain path: a failed recording or verification all of it, a failed state that
    state and the ones after it.
    """

    def __init__(self, explanation: Explanation, states: States, x: torch.Tensor, target: torch.Tensor,
                 ids: list[int], *, recording: GradientReplay | None = None, **batch: Any) -> None:
        super().__init__(explanation, states, x, target, ids, **batch)
        if recording is None:
            recording = self._recording()
        else:
            recording.target = target.reshape(-1)
        self.replay: GradientReplay | None = recording
        self.cuts: list[int] = []

    def _recording(self) -> GradientReplay:
        e = self.explanation
        return GradientReplay(e.model, self.x, self.target, e.name, e.options, e.seed, index=self.ids)

    def original(self) -> torch.Tensor:
        if self.replay is not None:
            try:
                raw = self.replay.original()
            except CannotReplay:
                self._stop_replay()
            else:
                if all_finite(raw):
                    return self.explanation.shared(raw, self.x, self.target, self.ids)
                self._stop_replay()  # captum's pass reports non-finite maps in the plain path's words
        return super().original()

    def keep_images(self, keep: torch.Tensor) -> None:
        super().keep_images(keep)
        if self.replay is not None:  # the recorded graph covers the dropped images too: start afresh
            self.replay.close()
            self.replay = self._recording()
            try:
                self.replay.original()  # (the images left keep their maps, drawn at their indices)
            except CannotReplay:
                self._stop_replay()

    def _each_state(self) -> Generator[tuple[int, torch.Tensor], None, None]:
        if self.replay is not None:
            # The recorded pass traced the images it explains (the control flow may depend on
            # the batch), and the cuts come from that trace.
            self.cuts = state_cuts(self.replay.trace, self.states.names, self.states.mode)
            if not self.replay.verify(max(self.cuts)):
                self._stop_replay()
        return super()._each_state()

    def order(self) -> list[int]:
        """Independent states run from the last cut to the first: each state drops the recorded
        outputs after its cut, which frees the part of the original graph only they kept alive."""
        order = super().order()
        if self.replay is not None and self.states.mode == "independent":
            order.sort(key=lambda i: -self.cuts[i])
        return order

    def state_raw(self, index: int) -> torch.Tensor:
        if self.replay is not None:
            try:
                raw = self.replay.maps(self.cuts[index])
            except CannotReplay:
                self._stop_replay()  # full captum passes from this state on
            else:
                self.reused = True
                return raw  # (checked for NaN and inf with the other states' maps, by the caller)
        return super().state_raw(index)

    def close(self) -> None:
        super().close()
        self._stop_replay()

    def _stop_replay(self) -> None:
        if self.replay is not None:
            self.replay.close()
            self.replay = None


__all__ = ["GRADIENT_METHODS", "ForwardReplay", "GradientReplay", "ReplayEngine", "replayable_model", "reusable",
           "state_cuts"]
