"""An on-disk cache of trained models, so that seed-consistency checks do not retrain in CI.

A seed-consistency check needs several models trained from different seeds. Training them on
every run would make the check too slow for a test suite, so :class:`ModelCache` stores each
trained model's ``state_dict`` once and loads it on later runs.

Design, and why:

Key
    ``<train.__module__>.<train.__qualname__>``, the seed and an optional ``version`` string.
    The qualified name is stable across processes and runs, unlike ``id`` or ``hash``.
    The cache cannot see when the training code changes, so pass a new ``version=`` (for
    example ``"v2"``) when it does, or clear the directory. Closures share a qualname
    (``make.<locals>.train``), so two different closures with one name need different versions.
What is stored
    ``{"format": 1, "key": ..., "seed": ..., "training": bool, "state_dict": {name: cpu tensor}}``
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
    If an entry cannot be loaded (a truncated file, a non-weights payload, or keys or shapes that
    no longer fit ``build()`` because the architecture changed), the model is retrained and the
    entry replaced, with a :class:`SaliencyWarning` that says why.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.rng import seeded
from ..core.torchtools import require_torch
from ..core.validation import check_flag, check_number, check_seed
from ..exceptions import SaliencyUsageError, warn_user

if TYPE_CHECKING:
    import torch

FORMAT = 1
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


class ModelCache:
    """Trained models on disk, keyed by the training function's qualified name and the seed.

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

    def key(self, train: Callable[..., Any], seed: int, version: str = "") -> str:
        """The readable key: ``module.qualname``, the version and the seed."""
        seed = check_seed(seed)
        suffix = f"@{version}" if version else ""
        return f"{factory_name(train)}{suffix}#seed={seed}"

    def path(self, train: Callable[..., Any], seed: int, version: str = "") -> Path:
        """Where the entry for ``(train, seed, version)`` lives.

        The file name is the sanitized qualified name (for a person browsing the directory)
        plus a digest of the exact key, so two names that sanitize alike cannot collide.
        """
        key = self.key(train, seed, version)
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", factory_name(train))[-80:].strip("._") or "model"
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()
        return self.directory / f"{readable}-seed{check_seed(seed)}-{digest}.pt"

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
                raise ValueError("not a pytest-saliency model-cache entry (format 1)")
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
        try:
            model.load_state_dict(payload["state_dict"], strict=True)
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
        payload = {"format": FORMAT, "key": key, "seed": seed, "training": bool(model.training), "state_dict": state}
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
