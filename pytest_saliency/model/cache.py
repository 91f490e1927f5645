"""An on-disk cache of trained models, so that seed-consistency checks do not retrain in CI.

A seed-consistency check needs several models trained from different seeds. Training them on
every run would make the check too slow for a test suite, so :class:`ModelCache` stores each
trained model's ``state_dict`` once and loads it on later runs.

Design, and why:

Key
    ``<train.__module__>.<train.__qualname__>``, an optional ``version`` string, a digest of the
    factory and the seed. The qualified name keeps entries readable; it is not enough on its own,
    because factories defined inside fixtures all share one (``make.<locals>.factory``). The
    digest (:func:`pytest_saliency.core.fingerprint.value_fingerprint`, walked the way the map
    cache walks a model) covers the factory's code, defaults, closure values and the globals its
    code loads (helper functions and classes by their code, tensors and arrays by content), so two
    closures over different settings (a dtype, a width, a learning rate) get different entries, and
    editing the factory's code retrains. A callable object is digested with its attributes, and a
    ``functools.partial`` with its bound arguments. The digest is taken the first time a cache
    sees a factory object in the process and reused for that object, so a factory that records
    its own calls (a counter in a closure or an attribute) keeps its key.
    When the walk cannot prove what the factory is (it reaches a C object such as a lock, a
    generator or a file handle, or too large a graph), the key is the qualified name and
    ``version`` only, and a :class:`SaliencyWarning` asks for an explicit ``version=`` naming the
    settings that make the models differ (e.g. ``version="float64"``) unless one is given. The
    walk does not see code the factory reaches through another package (a training library) or
    data it reads from files: pass a new ``version=`` when those change, or clear the directory.
What is stored
    ``{"format": 2, "key": ..., "seed": ..., "training": bool, "architecture": "<module.qualname of
    the model's class>", "state_dict": {name: cpu tensor}}``
    written with :func:`torch.save`. Only tensors, strings, ints and bools are stored, so
    ``torch.load(path, weights_only=True)`` can read it: loading a cache entry never unpickles
    arbitrary objects, even if someone else wrote to the cache directory.
Rebuilding the architecture
    A ``state_dict`` needs a model instance to load into. ``get_or_train(train, seed, build=...)``
    takes a zero-argument ``build()`` that returns an untrained instance of the architecture. If
    ``build`` is not given, the cache uses a ``train.build`` attribute, so that the factory can
    carry its own architecture (``train.build = SmallCNN``). With neither, the call is a
    :class:`SaliencyUsageError`: a cache that could store models but never load them would only
    hide the retraining. ``build()`` decides the device; the weights are loaded onto it.
Atomic writes
    An entry is written to a temporary file in the same directory, flushed, fsynced and moved
    into place with :func:`os.replace`. Readers, including other pytest-xdist workers, see either
    no entry or a complete one, never a half-written file. A write that fails leaves no
    temporary file behind and keeps any previous entry.
One trainer at a time
    With ``lock=True`` (the default), a miss creates ``<entry>.lock`` with ``O_CREAT | O_EXCL``
    before training. A second worker that misses at the same moment waits for the entry instead
    of training the same model again. A lock older than ``lock_timeout`` seconds, left by a
    crashed run, is ignored and replaced, so a stale lock cannot block the cache forever.
Damaged or stale entries
    An entry is loaded only into a model of the same architecture: ``build()``'s class must be the
    stored one, and its ``state_dict`` must have the same names, shapes and dtypes (a dtype
    mismatch is refused too, although ``load_state_dict`` would cast silently). If an entry
    cannot be loaded (a truncated file, a non-weights payload, an entry written for another key,
    or weights that no longer fit ``build()`` because the architecture changed), the model is
    retrained and the entry replaced, with a :class:`SaliencyWarning` that says why: the cache
    is only a shortcut, so a stale entry costs time, never a wrong model.
Build and train must agree
    After training, the trained model is compared with ``build()``'s the same way; if they differ
    (another class, dtype or parameter shapes), the call is a :class:`SaliencyUsageError` before
    anything is stored: such an entry could never be loaded into the model ``train`` makes.
Randomness
    ``train(seed)`` runs inside :func:`pytest_saliency.core.rng.seeded`: the global torch, numpy and
    Python RNGs are seeded with ``seed`` for the call and restored afterwards. A factory that
    forgets to seed is then still reproducible, and one that calls ``torch.manual_seed`` does
    not change the randomness of the rest of the test session.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.fingerprint import value_fingerprint
from ..core.integrity import short_usage_errors
from ..core.rng import seeded
from ..core.torchtools import require_torch
from ..core.validation import check_flag, check_number, check_seed
from ..exceptions import SaliencyUsageError, warn_user

if TYPE_CHECKING:
    import torch

FORMAT = 2
DEFAULT_LOCK_TIMEOUT = 600.0


def factory_name(train: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable: the part of the key that names the training code.

    A :func:`functools.partial` is named by its function and its bound arguments (they change
    what it trains); a callable object by its class.
    """
    if isinstance(train, functools.partial):
        bound = ", ".join([repr(a) for a in train.args] + [f"{k}={v!r}" for k, v in sorted(train.keywords.items())])
        return f"{factory_name(train.func)}({bound})"
    qualname = getattr(train, "__qualname__", None)
    if qualname is None:  # a callable instance: its class names the code
        return f"{type(train).__module__}.{type(train).__qualname__}"
    return f"{getattr(train, '__module__', None) or '<unknown>'}.{qualname}"


#: The digest of each factory object, taken when a cache first sees it (see "Key" above).
_DIGESTS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def factory_digest(train: Callable[..., Any]) -> str | None:
    """A short digest of the factory's code and the values it closes over or loads, or None when the
    fingerprint walk cannot prove what the factory is; taken once per factory object."""
    try:
        return _DIGESTS[train]
    except (KeyError, TypeError):  # not seen yet, or not weak-referenceable (digested on every call)
        pass
    fingerprint = value_fingerprint(train)
    digest = None if fingerprint is None else hashlib.blake2b(fingerprint.encode(), digest_size=8).hexdigest()
    with contextlib.suppress(TypeError):
        _DIGESTS[train] = digest
    return digest


def architecture(model: torch.nn.Module) -> tuple[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """What a stored ``state_dict`` must match to be loaded: the model's class and each entry's dtype and shape."""
    cls = type(model)
    tensors = {name: (str(t.dtype), tuple(t.shape)) for name, t in model.state_dict().items()}
    return f"{cls.__module__}.{cls.__qualname__}", tensors


def architecture_difference(expected: torch.nn.Module, state_dict: dict[str, Any], class_name: Any,
                            source: str = "the entry") -> str | None:
    """How ``state_dict`` (from ``source``, a model of class ``class_name``) differs from build()'s
    model ``expected``, or None."""
    name, tensors = architecture(expected)
    if class_name != name:
        return f"{source} holds a {class_name} and build() makes a {name}"
    stored = {key: (str(t.dtype), tuple(t.shape)) if hasattr(t, "dtype") else (type(t).__name__, ())
              for key, t in state_dict.items()}
    missing, extra = sorted(set(tensors) - set(stored)), sorted(set(stored) - set(tensors))
    if missing or extra:
        return f"the parameter names differ (missing: {missing[:5]}, unexpected: {extra[:5]})"
    for key, (dtype, shape) in tensors.items():
        if stored[key] != (dtype, shape):
            return (f"{key!r} in {source} is {stored[key][0]} of shape {list(stored[key][1])} but build()'s "
                    f"is {dtype} of shape {list(shape)}")
    return None


class ModelCache:
    """Trained models on disk, keyed by the training function (its name and a digest of its code and
    closure values), an optional ``version`` and the seed.

    Example::

        cache = ModelCache(".saliency_models")
        model = cache.get_or_train(train, seed=3, build=SmallCNN)   # trains on the first call only

    Args:
        directory: where the entries live (created if missing). Under pytest, the plugin's
            ``saliency_model_cache`` fixture uses ``config.cache.mkdir("saliency_models")``, so
            entries survive between runs and ``pytest --cache-clear`` removes them.
        lock: serialize training of one entry across processes with a lock file (pytest-xdist).
        lock_timeout: seconds after which a lock file counts as stale (left by a crashed run).

    ``hits`` and ``misses`` count this instance's loads and trainings.
    """

    @short_usage_errors
    def __init__(
        self, directory: str | os.PathLike[str], *, lock: bool = True, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise SaliencyUsageError(
                f"ModelCache needs a directory path (str or pathlib.Path), got {type(directory).__name__}."
            )
        lock_timeout = check_number(lock_timeout, "lock_timeout", low=0.0, low_open=True,
                                    hint="It is the age in seconds after which a lock file counts as stale.")
        self.lock = check_flag(lock, "lock")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = lock_timeout
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"ModelCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"

    # ---------------------------------------------------------------- keys and paths

    @short_usage_errors
    def key(self, train: Callable[..., Any], seed: int, version: str = "") -> str:
        """The key: ``module.qualname``, the version, the factory's digest (when the fingerprint walk
        can prove what the factory is; see the module docstring) and the seed."""
        seed = check_seed(seed)
        if not isinstance(version, str):
            raise SaliencyUsageError(f"version must be a str (e.g. 'v2'), got {type(version).__name__}.")
        suffix = f"@{version}" if version else ""
        digest = factory_digest(train)
        code = f"~{digest}" if digest is not None else ""
        return f"{factory_name(train)}{suffix}{code}#seed={seed}"

    @short_usage_errors
    def path(self, train: Callable[..., Any], seed: int, version: str = "") -> Path:
        """Where the entry for ``(train, seed, version)`` lives.

        The file name is the sanitized qualified name (for a person browsing the directory)
        plus a digest of the exact key, so two names that sanitize alike cannot collide.
        """
        key = self.key(train, seed, version)
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", factory_name(train))[-80:].strip("._") or "model"
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()
        return self.directory / f"{readable}-seed{check_seed(seed)}-{digest}.pt"

    @short_usage_errors
    def __contains__(self, item: tuple[Callable[..., Any], int]) -> bool:
        train, seed = item
        return self.path(train, seed).exists()

    def clear(self) -> int:
        """Delete every entry (and stray temporary or lock files); returns how many entries were removed."""
        removed = 0
        for child in self.directory.iterdir():
            if child.suffix == ".pt" or child.name.startswith(".tmp-") or child.suffix == ".lock":
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
                    removed += child.suffix == ".pt"
        return removed

    # ---------------------------------------------------------------- main entry point

    @short_usage_errors
    def get_or_train(
        self,
        train: Callable[[int], torch.nn.Module],
        seed: int,
        build: Callable[[], torch.nn.Module] | None = None,
        *,
        version: str = "",
    ) -> torch.nn.Module:
        """The model ``train(seed)`` returns, from disk when an entry exists, else trained and stored.

        ``build`` (or ``train.build``) makes an untrained instance to load a stored
        ``state_dict`` into; see the module docstring. On a hit the model gets the stored
        ``training`` flag, so it is in the same mode as the model that was saved.
        """
        if not callable(train):
            raise SaliencyUsageError(
                f"train must be a callable train(seed) -> nn.Module, got {type(train).__name__}."
            )
        seed = check_seed(seed)
        builder = build if build is not None else getattr(train, "build", None)
        if builder is None or not callable(builder):
            raise SaliencyUsageError(
                f"ModelCache cannot rebuild the model of {factory_name(train)}: a stored state_dict "
                "needs an instance of the architecture to load into. Pass build=<zero-argument "
                "callable returning an untrained model>, e.g. get_or_train(train, seed, build=SmallCNN), "
                "or set train.build = SmallCNN once next to the training function."
            )
        path = self.path(train, seed, version)
        key = self.key(train, seed, version)
        if not version and factory_digest(train) is None:
            warn_user(
                f"ModelCache cannot tell the model factory {factory_name(train)} apart from other factories "
                "with that name (it holds or loads something the fingerprint cannot identify), so its cache "
                "key is the name and the seed only. If several factories share the name (closures made "
                "inside fixtures do), pass version='...' naming what makes their models differ, e.g. "
                "version='float64'."
            )
        model = self._load(path, builder, key)
        if model is not None:
            self.hits += 1
            return model
        with self._locked(path):
            model = self._load(path, builder, key, quiet=True)  # another worker may have finished meanwhile
            if model is not None:
                self.hits += 1
                return model
            model = call_train(train, seed)
            self._check_build(builder, model, train, seed)
            self._save(path, model, key, seed)
            self.misses += 1
            return model

    # ---------------------------------------------------------------- storage

    def _load(self, path: Path, build: Callable[[], torch.nn.Module], key: str,
              quiet: bool = False) -> torch.nn.Module | None:
        """The stored model, or None (with a warning unless ``quiet``) when the entry is missing or unusable."""
        torch = require_torch()
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
                raise ValueError(f"not a pytest-saliency model-cache entry (format {FORMAT})")
            if payload.get("key") != key:
                raise ValueError(f"entry belongs to {payload.get('key')!r}")
        except Exception as exc:  # truncated file, foreign pickle refused by weights_only, wrong payload
            if not quiet:
                _warn_stale(path, f"it could not be read ({type(exc).__name__}: {_short(exc)})")
            return None
        model = build()
        torch_module = torch.nn.Module
        if not isinstance(model, torch_module):
            raise SaliencyUsageError(
                f"build() must return an untrained nn.Module to load the cached weights into, got "
                f"{type(model).__name__}."
            )
        state = payload["state_dict"]
        difference = (architecture_difference(model, state, payload.get("architecture"))
                      if isinstance(state, dict) else "its state_dict is not a dict")
        if difference is not None:
            if not quiet:
                _warn_stale(path, f"its weights do not fit build()'s architecture ({difference})")
            return None
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            if not quiet:
                _warn_stale(path, f"its weights do not fit build()'s architecture ({_short(exc)})")
            return None
        model.train(bool(payload.get("training", False)))
        return model

    def _save(self, path: Path, model: torch.nn.Module, key: str, seed: int) -> None:
        """Store the model's weights atomically (temporary file, fsync, rename)."""
        torch = require_torch()
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        payload = {"format": FORMAT, "key": key, "seed": seed, "training": bool(model.training),
                   "architecture": architecture(model)[0], "state_dict": state}
        handle, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(payload, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    @staticmethod
    def _check_build(build: Callable[[], torch.nn.Module], model: torch.nn.Module,
                     train: Callable[..., Any], seed: int) -> None:
        """Refuse to store weights that ``build()``'s model could not take (another class, dtype or shape).

        ``build()`` runs with the global RNGs seeded and restored, as ``train`` does, so the check
        leaves the caller's random streams alone."""
        with seeded(seed):
            empty = build()
        if not isinstance(empty, require_torch().nn.Module):
            raise SaliencyUsageError(
                f"build() must return an untrained nn.Module to load the cached weights into, got "
                f"{type(empty).__name__}."
            )
        name, _ = architecture(model)
        difference = architecture_difference(empty, model.state_dict(), name, source="the trained model")
        if difference is not None:
            raise SaliencyUsageError(
                f"the model factory {factory_name(train)}(seed={seed}) and build() make different models: "
                f"{difference}. "
                "The cache loads stored weights into build()'s model, so they must match; fix build= (or "
                "train.build) to return the same architecture, dtype and sizes as the factory."
            )

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Hold ``<entry>.lock`` while training; wait for another holder's entry instead of retraining."""
        if not self.lock:
            yield
            return
        lock_path = path.with_name(path.name + ".lock")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if path.exists():  # the holder finished: the caller re-reads the entry under no lock
                    yield
                    return
                try:
                    age = time.time() - lock_path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released between our open and stat: try again
                if age > self.lock_timeout or time.monotonic() > deadline:
                    with contextlib.suppress(FileNotFoundError):
                        lock_path.unlink()  # stale: its holder crashed or hangs
                    continue
                time.sleep(0.05)
                continue
            os.close(fd)
            break
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def call_train(train: Callable[[int], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Run ``train(seed)`` with the global RNGs seeded and restored; wrap its errors with the seed."""
    torch = require_torch()
    try:
        with seeded(seed):
            model = train(seed)
    except SaliencyUsageError:
        raise
    except Exception as exc:
        raise SaliencyUsageError(
            f"the model factory {factory_name(train)}(seed={seed}) raised {type(exc).__name__}: {_short(exc)}. "
            "Fix the factory (call it directly with this seed to see the full traceback)."
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise SaliencyUsageError(
            f"the model factory {factory_name(train)}(seed={seed}) returned {type(model).__name__}; "
            "it must return the trained nn.Module."
        )
    return model


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warn_stale(path: Path, why: str) -> None:
    warn_user(
        f"model cache entry {path.name} is ignored because {why}; the model is retrained and the entry "
        "replaced. If the training code or the architecture changed on purpose, pass version='...' to "
        "get_or_train to keep old and new entries apart."
    )


__all__ = ["ModelCache", "factory_name"]
