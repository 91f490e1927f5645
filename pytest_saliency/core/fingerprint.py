"""Fingerprints: short digests that say whether two models, two batches of tensors or two sets of
options are the same, for the map cache (:mod:`pytest_saliency.maps.cache`) and the stored
baselines (:func:`input_fingerprint`).

What the model fingerprint covers (:func:`model_fingerprint`). Two models get the same digest only
if the digest proves that they compute the same function; when it cannot, the fingerprint is
None (the map cache then stores and finds nothing for that model). The walk starts at the model
and follows every module's ``__dict__`` (parameters, buffers, submodules, and everything else an
instance holds), and what it reaches is identified so:

* plain values (None, bools, numbers, strings, bytes, ``torch.dtype``/``device``/``Size``, numpy
  scalars) by value; tuples, lists, dicts and sets of anything by their items; tensors and numpy
  arrays by a content checksum (below); a module object by its name;
* objects defined by torch, numpy, captum, torchvision or the standard library (a class, a
  function such as ``torch.nn.functional.relu``, a C function such as ``torch.relu``) by their
  import path, when that path leads back to the object itself; C functions bound to an object,
  with that object;
* other Python functions (a lambda, an activation passed to a constructor, a ``forward``
  monkeypatched on an instance) by their code (``marshal`` of the code object, nested code
  included), defaults, closure cells and the globals the code loads, each walked in turn; bound
  methods by function and ``self``; ``functools.partial``, properties, static and class methods
  by what they wrap, and so are ``functools.lru_cache`` wrappers (their stored results aside);
* other classes (a user's ``nn.Module`` subclass, or one made by a factory around a closure) by
  their bases and the contents of their ``__dict__`` (methods included), so two classes with one
  ``__qualname__`` but different closures differ, and so does a class whose method is replaced;
* other instances of pure-Python classes (no ``__slots__``, no C state) by class and ``__dict__``.

Forward, pre-forward and backward hooks are in the modules' ``__dict__`` and the global hooks of
``torch.nn.modules.module`` are added, so a hook changes the digest. A module's ``training`` flag
and its state-dict hooks are left out (checks explain in eval mode). Anything else (a C object
such as a lock, a ``torch.Generator`` or a scripted module's C++ state, a tensor subclass, an
object graph beyond ``_MAX_OBJECTS`` objects) makes the fingerprint None. What the walk cannot
see: a torch or standard-library object rebound at its import path, and attributes a function
reads from a module at run time (``F.relu`` with ``torch.nn.functional.relu`` replaced).
:func:`value_fingerprint` walks any other value (a method's options) the same way.

The tensor checksum (:func:`tensor_fingerprint`) is computed on the tensors' own device (three
wrapping integer sums of their bit patterns, two of them position-weighted so that a permutation
changes them) and only a few scalars cross to the host. It is not cryptographic; it
distinguishes models that differ, including by a permutation of their weights, which is all a
cache needs. :func:`input_fingerprint` is a SHA-256 of the inputs' values, the same on every
device, for baselines stored in files; :func:`array_digest` is a SHA-256 of one tensor's dtype,
shape and bytes, for tensors in a stored baseline's options. :func:`weighted_checksum` is the
cheapest, one matrix-vector product on the device: activation replay uses it to see that nothing
it recorded was written in place.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import marshal
import sys
import types
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .torchtools import require_torch

if TYPE_CHECKING:
    import torch

#: Top-level packages whose classes and functions are identified by their import path.
_TRUSTED = frozenset(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "captum"}
#: Beyond this many objects in the model's graph, the fingerprint gives up (the model is uncacheable).
_MAX_OBJECTS = 200_000
#: ``nn.Module`` attributes that do not change what a module computes in eval mode.
_MODULE_SKIPPED = frozenset({"training", "_state_dict_hooks", "_state_dict_pre_hooks",
                             "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})
#: Whether backward hooks are "full" stays set after the last one is removed; it matters only with hooks.
_MODULE_SKIPPED_NO_BACKWARD_HOOKS = _MODULE_SKIPPED | {"_is_full_backward_hook"}
#: Class attributes that do not change what an instance computes (``__slotnames__`` is written by
#: ``copy`` and ``pickle``; ``_abc_impl`` is the ABC registry's cache; a dataclass's fields describe
#: construction, and an instance's values are in its ``__dict__``).
_CLASS_SKIPPED = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
                            "__slotnames__", "_abc_impl", "__parameters__", "__orig_bases__",
                            "__dataclass_fields__", "__dataclass_params__"})
#: The global hooks of ``torch.nn.modules.module`` that run in a module's forward or backward pass.
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called", "_global_backward_pre_hooks", "_global_backward_hooks",
                 "_global_is_full_backward_hook")
_C_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                types.MethodWrapperType, types.ClassMethodDescriptorType, types.GetSetDescriptorType,
                types.MemberDescriptorType)
#: The C type of ``functools.lru_cache``'s wrappers (its results cache does not change what it computes).
_LRU_CACHE_WRAPPER = type(functools.lru_cache(maxsize=None)(lambda: None))
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (or by a C extension)


class _Plain:
    pass


#: An instance of a pure-Python class without ``__slots__`` holds its whole state in ``__dict__``;
#: a C base (a lock, a pybind object, a tensor) or slots make the instance larger.
_PLAIN_BASICSIZE = _Plain.__basicsize__
_CODE: weakref.WeakKeyDictionary[types.CodeType, tuple[str, tuple[str, ...]]] = weakref.WeakKeyDictionary()


class _Unprovable(Exception):
    """The walk met an object whose behaviour it cannot pin down."""


def _code_summary(code: types.CodeType) -> tuple[str, tuple[str, ...]]:
    """A digest of a code object (nested code included) and the global names its instructions load."""
    summary = _CODE.get(code)
    if summary is None:
        names: set[str] = set()
        stack = [code]
        while stack:
            current = stack.pop()
            for instruction in dis.get_instructions(current):
                if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                    names.add(instruction.argval)
            stack.extend(const for const in current.co_consts if isinstance(const, types.CodeType))
        summary = (hashlib.blake2b(marshal.dumps(code), digest_size=16).hexdigest(), tuple(sorted(names)))
        _CODE[code] = summary
    return summary


def _trusted_name(value: Any) -> tuple[str, str] | None:
    """``(module, qualname)`` when ``value`` comes from a trusted package and that path leads back to it."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module.partition(".")[0] not in _TRUSTED:
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return (module, qualname) if found is value else None


class _Walk:
    """One fingerprint's walk: nested tuples of plain values naming everything the model reaches.

    An object seen before is named by the order in which it was first seen, so equal graphs give
    equal tokens (shared and cyclic references included). Tensors are collected for
    :func:`tensor_fingerprint` and named by their position in that list.
    """

    def __init__(self) -> None:
        self.torch = require_torch()
        self.numpy = sys.modules.get("numpy")
        self.seen: dict[int, int] = {}
        self.alive: list[Any] = []  # the objects seen, kept alive so that their ids stay unique
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.plain = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), type(NotImplemented),
                      self.torch.dtype, self.torch.device, self.torch.layout, self.torch.memory_format)

    def token(self, value: Any) -> Any:
        kind = type(value)
        if kind in self.plain:
            return (kind.__name__, value)
        index = self.seen.get(id(value))
        if index is not None:
            return ("seen", index)
        if len(self.alive) >= _MAX_OBJECTS:
            raise _Unprovable(f"more than {_MAX_OBJECTS} objects")
        self.seen[id(value)] = len(self.alive)
        self.alive.append(value)
        return self._new(value, kind)

    def _new(self, value: Any, kind: type) -> Any:  # noqa: C901, PLR0911, PLR0912 - one case per kind of object
        torch, token = self.torch, self.token
        if kind in (tuple, list, torch.Size):
            return (kind.__name__, tuple(token(item) for item in value))
        if kind in (dict, OrderedDict):
            return (kind.__name__, tuple((token(k), token(v)) for k, v in value.items()))
        if kind in (set, frozenset):
            return (kind.__name__, tuple(sorted((token(item) for item in value), key=repr)))
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            self.tensors.append((str(len(self.tensors)), value))
            return ("tensor", len(self.tensors) - 1)
        if isinstance(value, torch.nn.Module):
            if isinstance(value, torch.jit.ScriptModule):
                raise _Unprovable("a scripted module keeps its attributes in C++")
            state = vars(value)
            skipped = _MODULE_SKIPPED if state.get("_backward_hooks") else _MODULE_SKIPPED_NO_BACKWARD_HOOKS
            return ("nn", self._instance_class(value), tuple((k, token(v)) for k, v in state.items() if k not in skipped))
        if kind is types.ModuleType:
            return ("module", value.__name__)
        if kind is types.FunctionType:
            return self._function(value)
        if kind is types.MethodType:
            return ("method", token(value.__func__), token(value.__self__))
        if kind in _C_CALLABLES:
            owner = getattr(value, "__self__", None)
            bound = None if owner is None or type(owner) is types.ModuleType else token(owner)
            return ("c", kind.__name__, getattr(value, "__module__", None), value.__qualname__,
                    getattr(owner, "__name__", None) if type(owner) is types.ModuleType else None,
                    token(getattr(value, "__objclass__", None)), bound)
        if isinstance(value, type):
            return self._class(value)
        if kind is _LRU_CACHE_WRAPPER:  # functools.lru_cache / cache: what it computes is what it wraps
            return ("lru_cache", token(value.__wrapped__))
        if kind is functools.partial:
            return ("partial", token(value.func), token(value.args), token(value.keywords), token(vars(value)))
        if kind in (staticmethod, classmethod):
            return (kind.__name__, token(value.__func__))
        if kind is property:
            return ("property", token(value.fget), token(value.fset), token(value.fdel))
        if kind is weakref.ref:
            return ("weakref", token(value()))
        numpy = self.numpy
        if numpy is not None and kind is numpy.ndarray and not value.dtype.hasobject:
            return ("ndarray", str(value.dtype), value.shape,
                    hashlib.blake2b(numpy.ascontiguousarray(value).tobytes(), digest_size=16).hexdigest())
        if numpy is not None and isinstance(value, numpy.generic) and not value.dtype.hasobject:
            return ("numpy", str(value.dtype), value.tobytes())
        return ("object", self._instance_class(value), tuple((k, token(v)) for k, v in vars(value).items()))

    def _instance_class(self, value: Any) -> Any:
        """The token of ``type(value)``, for an instance whose whole state is in its ``__dict__``."""
        kind = type(value)
        if not kind.__flags__ & _HEAPTYPE or kind.__basicsize__ != _PLAIN_BASICSIZE or not hasattr(value, "__dict__"):
            raise _Unprovable(f"a {kind.__qualname__} keeps state outside its __dict__")
        return self.token(kind)

    def _class(self, cls: type) -> Any:
        name = _trusted_name(cls)
        if name is not None or not cls.__flags__ & _HEAPTYPE:  # (a C type cannot be changed)
            return ("class", cls.__module__, cls.__qualname__)
        token = self.token
        return ("class", cls.__module__, cls.__qualname__, token(type(cls)), tuple(token(base) for base in cls.__bases__),
                tuple((k, token(v)) for k, v in vars(cls).items() if k not in _CLASS_SKIPPED))

    def _function(self, function: Any) -> Any:
        name = _trusted_name(function)
        if name is not None:
            return ("function", *name)
        token = self.token
        code, global_names = _code_summary(function.__code__)
        namespace = function.__globals__
        builtins = namespace.get("__builtins__", {})
        builtins = vars(builtins) if type(builtins) is types.ModuleType else builtins
        missing = object()
        loaded = []
        for global_name in global_names:
            found = namespace.get(global_name, missing)
            if found is missing:
                found = builtins.get(global_name, missing)
            loaded.append((global_name, "missing" if found is missing else token(found)))
        cells = []
        for cell in function.__closure__ or ():
            try:
                cells.append(token(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append("empty")
        return ("function", function.__module__, function.__qualname__, code, token(function.__defaults__),
                token(function.__kwdefaults__), tuple(cells), tuple(loaded), token(vars(function)))


# Elements per step of the content checksum: bounds its temporaries (a few int64 copies of one
# step) for large inputs.
_CHECKSUM_STEP = 1 << 22
# Odd 64-bit multipliers (golden-ratio and splitmix constants as signed int64) for the weighted sums.
_K1, _K2, _K3 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as their bit patterns, flattened to int64: every difference in value,
    including infinities, NaN payloads, the sign of zero and imaginary parts, is a difference here."""
    torch = require_torch()
    flat = tensor.detach()
    if flat.layout != torch.strided:
        flat = flat.to_dense()
    if flat.is_complex():
        flat = torch.view_as_real(flat)
    flat = flat.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.to(torch.int64)
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return flat.view(integer).to(torch.int64)


def _checksums(tensor: torch.Tensor) -> torch.Tensor:
    """Three wrapping int64 sums of the bit patterns: plain, position-weighted, and mixed-and-weighted.

    Integer sums are exact and order-free, so they are the same on every device and reduction
    order, and no value can absorb another (as large floats do in a float sum). A change of one
    element always changes the plain sum; a permutation changes the weighted ones. Not
    cryptographic: two different models collide only if built to.
    """
    torch = require_torch()
    bits = _bit_patterns(tensor)
    total = torch.zeros(3, dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHECKSUM_STEP):
        part = bits[start:start + _CHECKSUM_STEP]
        index = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64)
        weights = index * _K1 + _K2
        mixed = (part ^ (part >> 31)) * _K3
        total += torch.stack([part.sum(), (part * weights).sum(), (mixed * (weights ^ (index >> 5))).sum()])
    return total


def tensor_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """A hex digest of names, shapes, dtypes and content checksums of ``(name, tensor)`` pairs."""
    torch = require_torch()
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor.device.type}|{tensor.layout};".encode())
    sums = [_checksums(tensor) for _, tensor in tensors if tensor.numel()]
    if sums:
        device = sums[0].device
        digest.update(torch.cat([part.to(device) for part in sums]).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str | None:
    """A digest of everything the model's forward and backward passes can depend on (see the module
    docstring), or None when the walk cannot prove what some part of the model computes: a variant
    with equal weights but another activation (a module, or a function passed to a constructor),
    a patched ``forward``, a hook or a flag that changes its forward pass does not share maps."""
    walk = _Walk()
    try:
        structure = walk.token(model)
        hooks = sys.modules["torch.nn.modules.module"]
        global_hooks = tuple(walk.token(getattr(hooks, name, None)) for name in _GLOBAL_HOOKS
                             if name != "_global_is_full_backward_hook" or getattr(hooks, "_global_backward_hooks", None))
    except (_Unprovable, RecursionError):
        return None
    digest = hashlib.blake2b(repr((structure, global_hooks)).encode(), digest_size=16).hexdigest()
    return tensor_fingerprint(walk.tensors) + digest


def value_fingerprint(value: Any) -> str | None:
    """A digest of ``value`` walked as the model is (its tensors by content, its functions by code),
    or None when the walk cannot prove what some part of it is."""
    walk = _Walk()
    try:
        structure = walk.token(value)
    except (_Unprovable, RecursionError):
        return None
    return tensor_fingerprint(walk.tensors) + hashlib.blake2b(repr(structure).encode(), digest_size=16).hexdigest()


def input_fingerprint(inputs: torch.Tensor) -> str:
    """SHA-256 of the inputs' float32 bytes and shape: the same data gives the same hash on any device."""
    torch = require_torch()
    data = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def array_digest(value: Any) -> str:
    """SHA-256 (hex) of a tensor's or numpy array's dtype, shape and bytes: every dtype (bfloat16,
    bool, complex...), any layout, strides or device give the digest of the values themselves, so
    equal values of one dtype and shape share it and a change of dtype changes it."""
    torch = require_torch()
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.resolve_conj().resolve_neg().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    else:  # a numpy array: an object array has no bytes of its own, its items' reprs stand in
        numpy = sys.modules["numpy"]
        data = repr(value.tolist()).encode() if value.dtype.hasobject else numpy.ascontiguousarray(value).tobytes()
    digest = hashlib.sha256(f"{value.dtype}|{tuple(int(s) for s in value.shape)};".encode())
    digest.update(data)
    return digest.hexdigest()


#: The period of :func:`weighted_checksum`'s weights (a prime: strided layouts do not line up with it).
CHECKSUM_PERIOD = 4099


def weighted_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A cheap on-device fingerprint of a tensor's values (activation replay checks with it that
    nothing it recorded was written in place) that any write through ``.data`` (which does not bump
    the version) changes, a swap or permutation of unequal values included.

    The flattened values are weighted by a fixed pattern of :data:`CHECKSUM_PERIOD` distinct
    weights and summed per period (one matrix-vector product, a single pass): two positions
    share a weight only within different periods, whose sums then both move, so a swap of two
    neighbours shows as surely as any other.
    """
    torch = require_torch()
    flat = tensor.detach().reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16) or not (flat.is_floating_point() or flat.is_complex()):
        flat = flat.double()  # a half-precision sum would round small changes away
    n = flat.numel()
    whole = n - n % CHECKSUM_PERIOD
    weights = _period_weights(flat.dtype, flat.device)
    parts = []
    if whole:
        parts.append(torch.mv(flat[:whole].view(-1, CHECKSUM_PERIOD), weights))
    if n > whole:
        parts.append(torch.dot(flat[whole:], weights[:n - whole]).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else flat)


@functools.lru_cache(maxsize=16)
def _period_weights(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:data:`CHECKSUM_PERIOD` distinct weights in [0.5, 1.5) (the fractional parts of multiples
    of the golden ratio), made once per dtype and device: constants, never written."""
    torch = require_torch()
    weights = (torch.arange(1, CHECKSUM_PERIOD + 1, dtype=torch.float64) * 0.6180339887498949).frac_()
    return (weights + 0.5).to(dtype=dtype, device=device)



__all__ = ["array_digest", "input_fingerprint", "model_fingerprint", "tensor_fingerprint", "value_fingerprint", "weighted_checksum"]
