"""The guard around every public entry point: models, global generators and torch's modes come
back exactly as they were, whatever ends the call (a return, an exception, a Ctrl-C).

:func:`guarded_call` (through :func:`rng_isolated`) protects every
``nn.Module`` among a call's arguments, directly or inside a list, tuple or dict. On entry it
takes, per module: its attribute dictionary (the ``training`` flag, a patched ``forward``, plain
tensor attributes) and the contents of torch's registries in it (parameters, buffers,
submodules, hooks); per parameter its ``requires_grad`` flag and version counter; per buffer
a copy and its version counter; and the grad mode, torch-function modes, saved-tensor hooks and
the global generators. On the way out, whatever happened, it puts all of that back.

Values written by a forward pass. A model may write its own state when it runs: a call counter,
the running statistics of a module left in train mode, ``Embedding(max_norm=...)`` renormalizing
rows of its weight in place. Buffers are copied on entry (they are small next to the parameters:
BatchNorm statistics and counters) and compared bit for bit on the way out (BatchNorm's kernels
update running statistics without moving the version counter); those that differ are put back.
Parameters are not all copied (that would double a large model's memory on every check):
copied are those of modules known to write them in forward (``Embedding``/``EmbeddingBag`` with
``max_norm``) and those an earlier check in this process saw written. Any other parameter whose
version counter moved for a reason other than the library's own randomization (which restores
what it changed and says so through :class:`Undo`) was written by the model itself: it is
named, and copied by every later check. A call that returns normally warns
(:class:`pytest_saliency.exceptions.SaliencyWarning`) naming every tensor the model wrote.

Interrupts. In the main thread the outermost guard installs a SIGINT handler for the call: while
the guard takes or restores state, or an :class:`Undo` runs, a Ctrl-C is recorded and raised as
``KeyboardInterrupt`` (through the handler that was installed before) once the restore is
complete; elsewhere it is raised at once. Library code that changes the model and undoes the
change itself (:func:`pytest_saliency.model.randomize.randomized`) registers the undo first, so
the guard runs it if an interrupt lands before or inside the code that would have.

Tracebacks. :func:`short_usage_errors` (which :func:`rng_isolated` applies, and which public
entry points that run no model apply directly, e.g. ``ModelCache.get_or_train``) re-raises a
:class:`pytest_saliency.exceptions.SaliencyUsageError` without the library frames below it, so a
test that passes a bad argument shows its own line and the message, not pages of library source
with tensors and models as locals. An exception chained to it (``raise ... from exc``: the model
or the factory failed inside torch) stays its ``__cause__`` and is still shown, with its type,
message and the frames of the user's code (the line of the model's ``forward`` that failed); its
frames inside pytest-saliency, the standard library and installed packages (torch, captum,
pytest) are dropped (:func:`user_frames_only`). Any other exception keeps its full traceback.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import signal
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..exceptions import SaliencyCheckFailed, SaliencyUsageError, warn_user
from .rng import (
    ISOLATION_LOCK,
    as_seed,
    initialized_cuda_devices,
    isolated_devices,
    restore_generators,
    save_generators,
    seed_all,
    seed_isolated,
    set_isolated_devices,
)
from .torchtools import require_torch, set_plain_attribute

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])

_MAIN = threading.main_thread().ident


class _Signals:
    """Main-thread SIGINT state. ``depth > 0``: a restore is running and a SIGINT waits."""

    depth = 0
    pending: tuple[int, Any] | None = None
    previous: Any = None  # the handler the outermost guard replaced
    installed = False


_SIGNALS = _Signals()


def _on_sigint(signum: int, frame: Any) -> None:
    if _SIGNALS.depth:
        _SIGNALS.pending = (signum, frame)
        return
    _raise_with(_SIGNALS.previous, signum, frame)


def _raise_with(handler: Any, signum: int, frame: Any) -> None:
    """Deliver a SIGINT as ``handler`` would (``KeyboardInterrupt`` for Python's default)."""
    if callable(handler):
        handler(signum, frame)
    else:
        raise KeyboardInterrupt


def _raise_pending() -> None:
    """Deliver a SIGINT that arrived while restores ran, once none is running any more."""
    if _SIGNALS.pending is not None and not _SIGNALS.depth:
        signum, frame = _SIGNALS.pending
        _SIGNALS.pending = None
        _raise_with(_SIGNALS.previous, signum, frame)


class Undo:
    """A restore registered before the change it undoes.

    ``Undo(restore, written)`` registers ``restore`` with the guard of the current call (if any),
    and :meth:`run` runs it once, with SIGINT deferred. If an interrupt ends the block before
    :meth:`run` completes, the guard runs it on the way out. ``written``: parameters the block
    writes in place and ``restore`` puts back to their values of now; those that still hold the
    values they had when the guard began are not reported as written by the model.
    """

    __slots__ = ("restore", "guard", "fresh", "done")

    def __init__(self, restore: Callable[[], None], written: Iterable[torch.nn.Parameter] = ()) -> None:
        self.restore, self.done = restore, False
        guard = getattr(_STATE, "guard", None)
        self.guard = guard
        self.fresh = guard.unwritten(written) if guard is not None else []
        if guard is not None:
            guard.undos.append(self)

    def run(self) -> None:
        """Run the restore (once), with SIGINT deferred until it is complete."""
        if _main_thread() and _SIGNALS.installed:
            _SIGNALS.depth += 1
            try:
                self._run()
            finally:
                _SIGNALS.depth -= 1
            _raise_pending()
        elif _main_thread():
            _deferred_outside_guard(self._run)
        else:
            self._run()

    def _run(self) -> None:
        if self.done:
            return
        try:
            self.restore()
        finally:
            self.done = True
            guard = self.guard
            if guard is not None:
                guard.rebase(self.fresh)
                if guard.undos and guard.undos[-1] is self:
                    guard.undos.pop()
                else:
                    guard.undos[:] = [undo for undo in guard.undos if undo is not self]


def _deferred_outside_guard(function: Callable[[], None]) -> None:
    """Run ``function`` with a SIGINT-recording handler installed (library code used outside a
    guarded call, e.g. :func:`pytest_saliency.model.randomize.randomized` on its own)."""
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        function()
        return
    _SIGNALS.depth, _SIGNALS.pending, _SIGNALS.previous = 1, None, previous
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        function()
    finally:
        signal.signal(signal.SIGINT, previous)
        _SIGNALS.depth = 0
        pending, _SIGNALS.pending = _SIGNALS.pending, None
    if pending is not None:
        _raise_with(previous, *pending)


def _main_thread() -> bool:
    return threading.get_ident() == _MAIN


_STATE = threading.local()  # .guard: the outermost guard of this thread's current call

# Parameters seen written by a forward pass: module -> names (in its _parameters) to copy first.
_WRITERS: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()

_REGISTRIES: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None


def _registries() -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A getter of the dicts and sets ``nn.Module.__init__`` puts in a module's ``__dict__``
    (``_parameters`` and ``_buffers`` first, then hooks, ``_modules``, ...), as a tuple."""
    global _REGISTRIES
    if _REGISTRIES is None:
        torch = require_torch()
        keys = [key for key, value in vars(torch.nn.Module()).items()
                if isinstance(value, (dict, set)) and key not in ("_parameters", "_buffers")]
        _REGISTRIES = operator.itemgetter("_parameters", "_buffers", *keys)
    return _REGISTRIES


def models_in(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.nn.Module]:
    """The ``nn.Module`` arguments of a call: given directly, or as items of a list, tuple or dict."""
    torch = require_torch()
    module = torch.nn.Module
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, module):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, module))
        elif isinstance(value, Mapping):
            found.extend(item for item in value.values() if isinstance(item, module))
    return found


class Guard:
    """What :func:`guarded_call` saves of the models, and puts back (see the module docstring)."""

    def __init__(self) -> None:
        self.undos: list[Undo] = []
        self.roots: list[torch.nn.Module] = []
        self.covered: set[int] = set()
        # (module, its __dict__, its registries, their sizes, copies of the non-empty ones)
        self.modules: list[tuple[torch.nn.Module, dict[str, Any], tuple[Any, ...], tuple[int, ...],
                                 list[tuple[Any, Any]]]] = []
        self.scripted: list[tuple[torch.nn.Module, bool]] = []
        self.grads: list[tuple[torch.nn.Parameter, bool]] = []
        self.versions: dict[int, int] = {}  # parameter id -> version when it held its original value
        # (module, key, parameter) of the parameters not copied
        self.params: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self.copies: list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]] = []  # (module, key, tensor, copy)
        self.written: list[tuple[torch.nn.Module, str, str]] = []  # (module, key, what) the model wrote

    def protect(self, models: Iterable[torch.nn.Module]) -> None:
        torch = require_torch()
        registries = _registries()
        seen = self.covered
        writers = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        script = torch.jit.ScriptModule
        for model in models:
            if id(model) in seen:
                continue
            self.roots.append(model)
            for sub in model.modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                if isinstance(sub, script):
                    self.scripted.append((sub, sub.training))
                    continue
                state = vars(sub)
                try:
                    dicts = registries(state)
                except KeyError:  # a module that removed one of torch's registries
                    dicts = ()
                # Copied are the registries with entries (parameters, buffers, submodules; hooks
                # rarely): most of the hook dicts are empty, and their lengths say they still are.
                self.modules.append((sub, state.copy(), dicts, tuple(map(len, dicts)),
                                     [(registry, registry.copy()) for registry in dicts if registry]))
                known = _WRITERS.get(sub, ()) if _WRITERS else ()
                if isinstance(sub, writers) and sub.max_norm is not None:
                    known = {*known, "weight"}
                for key, p in sub._parameters.items():
                    if p is None or id(p) in seen:
                        continue
                    seen.add(id(p))
                    self.grads.append((p, p.requires_grad))
                    if key in known:
                        self.copies.append((sub, key, p, p.detach().clone()))
                    else:
                        self.versions[id(p)] = p._version
                        self.params.append((sub, key, p))
                for key, b in sub._buffers.items():
                    if b is None or id(b) in seen:
                        continue
                    seen.add(id(b))
                    self.copies.append((sub, key, b, b.detach().clone()))

    def unwritten(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Those of ``params`` whose version counter has not moved since they were saved."""
        versions = self.versions
        return [p for p in params if versions.get(id(p), -1) == p._version]

    def rebase(self, params: list[torch.nn.Parameter]) -> None:
        """``params`` hold their original values again (a library write was undone)."""
        for p in params:
            self.versions[id(p)] = p._version

    def restore(self) -> None:
        """Put everything back; report what the model wrote. Every step runs even if one fails."""
        torch = require_torch()
        errors: list[BaseException] = []
        while self.undos:
            undo = self.undos[-1]
            try:
                undo._run()
            except Exception as error:  # noqa: BLE001 - the other restores still run; raised below
                errors.append(error)
            if self.undos and self.undos[-1] is undo:
                self.undos.pop()
        for sub, saved, dicts, sizes, copies in self.modules:
            state = sub.__dict__
            try:  # mostly C-level comparisons for the usual case: nothing changed
                if (state == saved and tuple(map(len, dicts)) == sizes
                        and all(_same_contents(registry, items) for registry, items in copies)):
                    continue
            except Exception:  # noqa: BLE001 - e.g. a tensor's elementwise == : compared one by one below
                pass
            for registry in dicts:
                if registry and not any(registry is kept for kept, _ in copies):
                    registry.clear()  # empty before (a hook added and not removed)
            for registry, items in copies:
                if not _same_contents(registry, items):
                    if registry is sub.__dict__.get("_buffers") or registry is sub.__dict__.get("_parameters"):
                        kind = "buffer" if registry is sub.__dict__.get("_buffers") else "parameter"
                        self.written.extend((sub, key, f"{kind} replaced") for key in _changed_keys(registry, items))
                    registry.clear()
                    registry.update(items)
            if len(state) != len(saved) or any(state.get(key, _MISSING) is not value for key, value in saved.items()):
                for key in [key for key in state if key not in saved]:
                    del state[key]
                state.update(saved)
        for sub, training in self.scripted:
            if sub.training is not training:
                set_plain_attribute(sub, "training", training)
        for p, flag in self.grads:
            if p.requires_grad is not flag:
                p.requires_grad_(flag)
        with torch.no_grad():
            # Compared whatever their version counters say: BatchNorm's kernels update the
            # running statistics without moving them.
            for sub, key, tensor, copy in self.copies:
                if not _same_bits(tensor, copy):
                    self.written.append((sub, key, "buffer" if key in sub._buffers else "parameter"))
                    try:
                        tensor.copy_(copy)
                    except Exception as error:  # noqa: BLE001
                        errors.append(error)
        versions = self.versions
        for sub, key, p in self.params:
            if p._version != versions[id(p)]:
                self.written.append((sub, key, "parameter, not restored"))
                _WRITERS.setdefault(sub, set()).add(key)
        if errors:
            raise errors[0]

    def written_names(self) -> list[str]:
        """The tensors the model wrote, named from the models passed (``name (kind)``)."""
        if not self.written:
            return []
        names: dict[int, str] = {}
        for index, root in enumerate(self.roots):
            prefix = f"models[{index}]" if len(self.roots) > 1 else ""
            for name, sub in root.named_modules():
                names.setdefault(id(sub), ".".join(part for part in (prefix, name) if part))
        listed = []
        for sub, key, what in self.written:
            module = names.get(id(sub), "")
            entry = f"{module + '.' if module else ''}{key} ({what})"
            if entry not in listed:
                listed.append(entry)
        return listed

    def report(self) -> str:
        """A warning's text naming the tensors the model wrote, or "" if none."""
        listed = self.written_names()
        if not listed:
            return ""
        lost = any("not restored" in entry for entry in listed)
        return (
            "the model writes its own state when it runs: " + ", ".join(listed) + ". "
            + ("The check put these values back afterwards"
               if not lost else "Parameters marked 'not restored' were copied by no check yet and keep the value "
               "the forward passes gave them (later checks in this process copy them first); the rest were put back")
            + ", but every pass of the check saw different values: a call counter, the running statistics of a "
            "module left in train mode (BatchNorm with eval_mode=False), Embedding(max_norm=...) renormalizing its "
            "weight. Make the forward pass free of side effects (e.g. renormalize the embedding once, before the "
            "check, and pass max_norm=None) for results that depend only on the model and the inputs."
        )


_MISSING = object()


def _same_contents(registry: Any, items: Any) -> bool:
    """The same keys, in order, naming the same objects (tensors are compared by identity)."""
    if len(registry) != len(items):
        return False
    if isinstance(registry, set):
        return registry == items
    return all(map(operator.is_, registry.values(), items.values())) and all(map(operator.eq, registry, items))


def _changed_keys(registry: Any, items: dict[str, Any]) -> list[str]:
    """The keys of a parameter or buffer registry that name another object than in ``items``."""
    keys = [key for key, value in items.items() if registry.get(key, _MISSING) is not value]
    return keys + [key for key in registry if key not in items]


_INTEGER_OF_SIZE: dict[int, Any] = {}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bits (NaN payloads and -0.0 count)."""
    torch = require_torch()
    if a.is_meta:  # no values to compare (a model built on the meta device)
        return True
    if a.layout != torch.strided:  # sparse or other layouts have no bit view: compare dense values
        a, b = a.to_dense(), b.to_dense()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        if not _INTEGER_OF_SIZE:
            _INTEGER_OF_SIZE.update({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64})
        integer = _INTEGER_OF_SIZE.get(a.element_size())
        if integer is not None:
            return torch.equal(a.view(integer), b.view(integer))
    return torch.equal(a, b)


def rng_isolated(function: F) -> F:
    """Run ``function`` (a public entry point that runs a model) with the global generators
    seeded from its ``seed`` argument (0 if it has none) and restored afterwards, as
    :func:`pytest_saliency.core.rng.isolated_rngs` does, and its model arguments, grad mode and torch's other modes put
    back whatever ends the call, a Ctrl-C included (:func:`guarded_call`)."""
    signature = inspect.signature(function)
    parameter = signature.parameters.get("seed")
    default = parameter.default if parameter is not None and parameter.default is not inspect.Parameter.empty else 0
    by_keyword_only = parameter is None or parameter.kind is inspect.Parameter.KEYWORD_ONLY

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # a failed check's traceback ends in the user's test
        if "seed" in kwargs or by_keyword_only:
            seed = kwargs.get("seed", default)
        else:
            seed = signature.bind_partial(*args, **kwargs).arguments.get("seed", default)
        return guarded_call(function, args, kwargs, seed)

    return short_usage_errors(wrapper)  # type: ignore[return-value]


def short_usage_errors(function: F) -> F:
    """Re-raise a :class:`~pytest_saliency.exceptions.SaliencyUsageError` out of ``function`` (a
    public entry point) with a short traceback: the caller's line and the message.

    A usage error's message says what was wrong and how to fix it; the library frames under the
    entry point (and their locals: tensors, models) only bury it. Raised again without them, its
    traceback starts in this wrapper (hidden from pytest) and pytest shows the caller's line and
    the message, as for ``SaliencyCheckFailed``. The exceptions chained to it keep only the frames
    of the user's code (:func:`user_frames_only`). Other exceptions (a crash in the user's model,
    a bug) keep their whole traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            return function(*args, **kwargs)
        except SaliencyUsageError as error:
            user_frames_only(error)
            raise error.with_traceback(None)

    return wrapper  # type: ignore[return-value]


def user_frames_only(error: BaseException) -> None:
    """Drop the library frames from the tracebacks of the exceptions chained under ``error`` (its
    ``__cause__``, or its ``__context__`` when that is shown), down the whole chain.

    Kept are the frames whose file is outside pytest-saliency, the standard library and the
    installed packages (:func:`_library_roots`): the user's model, factory or callback. A
    traceback with no such frame keeps its last one, so the failing line is still shown. The
    exceptions themselves stay chained (``__cause__`` and ``__context__`` are not touched)."""
    seen = {id(error)}
    chained = _shown_under(error)
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        tb = chained.__traceback__
        if tb is not None:
            chained.__traceback__ = _pruned(tb)
        chained = _shown_under(chained)


def _shown_under(error: BaseException) -> BaseException | None:
    """The exception shown above ``error`` in its report (as Python and pytest chain them)."""
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__


def _pruned(tb: types.TracebackType) -> types.TracebackType:
    """``tb`` without its library frames (its last frame when every frame is a library's)."""
    entries: list[types.TracebackType] = []
    entry: types.TracebackType | None = tb
    while entry is not None:
        entries.append(entry)
        entry = entry.tb_next
    kept = [entry for entry in entries if not _in_library(entry.tb_frame.f_code.co_filename)] or entries[-1:]
    if len(kept) == len(entries):
        return tb
    last = kept[-1]
    pruned = types.TracebackType(None, last.tb_frame, last.tb_lasti, last.tb_lineno)
    for entry in reversed(kept[:-1]):
        pruned = types.TracebackType(pruned, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return pruned


@functools.cache
def _library_roots() -> tuple[str, ...]:
    """The folders of library code: this package, the standard library, the installed packages."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    roots += [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    roots += getattr(site, "getsitepackages", list)()
    if site.ENABLE_USER_SITE and site.USER_SITE:
        roots.append(site.USER_SITE)
    return tuple(sorted({os.path.normcase(os.path.realpath(root)) + os.sep for root in roots}))


@functools.lru_cache(maxsize=4096)
def _in_library(filename: str) -> bool:
    """Whether code from ``filename`` is library code (frozen modules count; other generated code,
    such as a traced model's forward, does not)."""
    if filename.startswith("<"):
        return filename.startswith("<frozen ")
    return os.path.normcase(os.path.realpath(filename)).startswith(_library_roots())


def guarded_call(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], seed: Any) -> Any:
    """``function(*args, **kwargs)`` with every global generator seeded from ``seed`` and restored,
    and its model arguments, grad mode, torch-function modes and saved-tensor hooks restored,
    whatever ends the call (see the module docstring). Nested calls only seed again and protect
    models the outer call does not cover; the outermost one restores."""
    __tracebackhide__ = True
    guard = getattr(_STATE, "guard", None)
    if guard is not None:
        guard.protect(models_in(args, kwargs))
        seed_isolated(seed)
        return function(*args, **kwargs)
    seed = as_seed(seed)
    models = models_in(args, kwargs)
    if not _main_thread():
        return _outermost(function, args, kwargs, seed, models)
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or previous is _on_sigint:
        return _outermost(function, args, kwargs, seed, models)
    # From the moment the handler is installed until the body starts, and from the moment the body
    # ends until the restore is complete, SIGINT only records (depth 1). The switches between the
    # two (a local flag and the depth, in plain assignments) contain no point where Python runs a
    # signal handler, so no interrupt lands between the body and the restore.
    _SIGNALS.depth, _SIGNALS.pending, _SIGNALS.previous = 1, None, previous
    signal.signal(signal.SIGINT, _on_sigint)
    _SIGNALS.installed = True
    try:
        result = _outermost(function, args, kwargs, seed, models, signals=True)
    finally:
        # Still depth 1: a SIGINT before the swap below is recorded; one after it goes to the
        # previous handler (the check is complete by then).
        _SIGNALS.installed = False
        signal.signal(signal.SIGINT, previous)
        _SIGNALS.depth = 0
        pending, _SIGNALS.pending = _SIGNALS.pending, None
        if pending is not None:
            _raise_with(previous, *pending)
    return result


def _outermost(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], seed: int,
               models: list[torch.nn.Module], *, signals: bool = False) -> Any:
    """The outermost guarded call (with ``signals``: in the main thread, SIGINT recorded, depth 1)."""
    __tracebackhide__ = True
    torch = require_torch()
    deferred = signals  # whether SIGINT is deferred now (depth 1)
    locked = started = False
    guard = Guard()
    enclosing: list[int] | None = None
    failure: SaliencyCheckFailed | None = None
    try:
        ISOLATION_LOCK.acquire()
        locked = True
        enclosing = isolated_devices()  # inside a plain isolated_rngs block: its devices
        cuda = enclosing if enclosing is not None else initialized_cuda_devices()
        saved = save_generators(cuda)
        grad = torch.is_grad_enabled()
        modes = torch._C._len_torch_function_stack()
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
        guard.protect(models)
        set_isolated_devices(cuda)
        _STATE.guard = guard
        started = True
        seed_all(seed, cuda)
        if signals:
            deferred = False
            _SIGNALS.depth = 0
            _raise_pending()  # a SIGINT that came while the state was taken
        try:
            result = function(*args, **kwargs)
        except SaliencyCheckFailed as error:
            failure = error
            raise
    finally:
        if signals and not deferred:
            _SIGNALS.depth = 1
        try:
            if started:
                _STATE.guard = None
                set_isolated_devices(enclosing)
                try:
                    guard.restore()
                finally:
                    torch._C._set_grad_enabled(grad)
                    while torch._C._len_torch_function_stack() > modes:
                        torch._C._pop_torch_function_stack()
                    while not _same_hooks(torch._C._autograd._top_saved_tensors_default_hooks(True), hooks):
                        torch._C._autograd._pop_saved_tensors_default_hooks()
                    restore_generators(cuda, saved)
        finally:
            if locked:
                ISOLATION_LOCK.release()
        if failure is not None:
            _report_writes(guard, getattr(failure, "result", None))
    _report_writes(guard, result)
    return result


def _report_writes(guard: Guard, result: Any) -> None:
    """Warn about the state the model wrote, and record it in the result (``model_writes``)."""
    message = guard.report()
    if not message:
        return
    if result is not None and hasattr(result, "model_writes"):
        object.__setattr__(result, "model_writes", tuple(guard.written_names()))
    warn_user(message)


def _same_hooks(top: Any, saved: Any) -> bool:
    if top is None or saved is None:
        return top is saved or top is None
    return top[0] is saved[0] and top[1] is saved[1]


__all__ = ["Guard", "Undo", "guarded_call", "models_in", "rng_isolated", "short_usage_errors", "user_frames_only"]
