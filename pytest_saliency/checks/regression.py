"""Regression baselines: stored maps that a retrained model's explanations are compared with.

One baseline per test and name: ``<dir>/<module>/<test>[__<name>].npz`` (``~<hash>`` added when
the test id had to be changed to make a file name, so that no two tests share a file; see
:func:`baseline_path`) plus a human-readable JSON sidecar (the file name less a final ``.npz``,
plus ``.json``: :func:`sidecar_path`). The ``.npz`` holds the maps (float32,
compressed: float16 would add errors of about 1e-3 to SSIM, the size of the tightest calibrated
tolerances) and an authoritative copy of
the metadata as a plain string array, so the one atomic ``os.replace`` of the ``.npz`` is what
makes a new baseline visible: an interrupted run leaves the old file intact. Loading uses
``allow_pickle=False``; a file that needs unpickling is refused, never executed.

A baseline records what it was made from (method and options, preset, a SHA-256 of the inputs,
target and the classes it explained, seed, metric, library versions, time). Comparing it with a
call that differs in what changes the maps or the threshold is an error, not a silent comparison
of unlike things:

* inputs, method and options, preset, always. A tensor option is recorded as its shape, dtype
  and a SHA-256 of its values; files of earlier versions record it (and any other value that is
  not a JSON string, number, list or object) as its ``repr``, and are matched against that
  encoding of the current options (:func:`previous_option_encoding`);
* the target: both calls ask for given classes, the same ones (``2`` and ``tensor([2, 2, ...])``
  are the same), or both for the predicted classes (``target=None``). With ``target=None`` the
  baseline stores the classes it explained (``targets``), and a later model is explained for
  *those* classes, not its own predictions: a retrained model that predicts another class for
  an image is still compared on the same (image, class) maps, as the reference models of an
  envelope are when it is calibrated; whether its predictions changed is a matter for an accuracy
  test. Files of earlier versions lack ``targets``; they are compared on the current predictions,
  as those versions did (refusing them would break every baseline written with the default
  target, and for an unchanged model the classes are the same);
* the seed, for methods whose maps depend on it: named methods that draw random numbers
  (:func:`~pytest_saliency.maps.explainers.draws_random`) and custom explainers, which run with seeded
  generators and may draw from them;
* the metric, when the threshold comes from the file: a calibrated envelope (or the threshold the
  file was written with) holds for the metric it was computed with only. With ``threshold=`` the
  stored maps may be compared by any metric.

A field that every version has written (all but ``targets``) and that a file lacks is reported as
"(not recorded)" and refused like a different value.

Thresholds for retraining: a plain ``threshold`` on the mean per-image similarity, or
``reference_models=[...]`` (a few models trained with the same recipe and different seeds) when
the baseline is written: the lowest mean similarity between any two of them is stored as the
envelope, and a later model passes when it is at least as close to the baseline as the recipe's
own seeds are to each other.

Inputs may also come as an iterable of batches (a ``DataLoader``; :mod:`pytest_saliency.core.stream`
says what a batch may be). They are streamed, so that a baseline of 50,000 examples is never whole
in memory: a baseline is written a batch of maps at a time to a temporary file beside it, and made
into the ``.npz`` (the same format, read by :func:`read_baseline` too) only when the last batch is
in, with the same atomic replace; a comparison reads the stored maps in order, a batch of rows at
a time, and compares each batch's maps with the rows at its offset. The reference models of an
envelope are explained batch by batch too (the mean similarity of each pair is summed over the
batches). What a streamed comparison keeps is the per-example similarities and the maps of the
first batch (for the report's figure). The inputs' fingerprint is a SHA-256 updated batch by
batch, so a loader over other examples, or over the same in another order, is refused; a loader
and a tensor of the same examples in the same order are interchangeable (either may write the
baseline the other compares with). A streamed baseline records ``example_fingerprint``, the
SHA-256 of the shape of one example and the float32 bytes of all examples in order (the whole
inputs' shape is ``input_shape``), as the ``input_fingerprint`` of a tensor cannot be computed
before the number of examples is known; a stream compared with a file that records
``input_fingerprint`` computes that hash from the recorded shape and its batches. The target
works per batch: ``target="labels"`` explains each batch's labels, a target with one class per
example of the whole stream is sliced batch by batch, and with ``target=None`` a comparison
explains each batch for the classes stored at its offset.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from ..core.distributed import Ranks, exchange, ranks, unsharded
from ..core.fingerprint import input_fingerprint
from ..core.forward import OutputSelector, model_call_options, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.stream import Batches, Chunk, chunks, examples_from, in_stream, is_stream
from ..core.torchtools import require_torch
from ..core.validation import check_inputs, check_model, model_device
from ..exceptions import SaliencyCheckFailed, SaliencyUsageError
from ..maps.explainers import attribute, prepare_method
from ..maps.methods import MethodSpec, draws_random
from ..maps.modality import default_similarity, figure_context, valid_positions
from ..maps.options import DERIVED_OPTIONS
from ..maps.postprocess import MapPipeline, apply_pipeline, get_pipeline
from ..maps.targets import resolve_target
from ..reporting.numbers import format_score, format_threshold
from ..reporting.protocol import Figure, Number
from .streaming import (
    batch_checksum,
    check_sampler,
    has_example_rows,
    models_fingerprint,
    owner,
    same_batches,
    same_models,
    tensor_shards,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..maps.methods import Explainer

FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.9
BASELINE_METRICS = ("ssim", "spearman", "pearson")
_MATCHED_FIELDS = ("input_fingerprint", "input_shape", "method", "method_options", "preset")


class _NotRecorded:
    """A field the baseline's metadata lacks: unequal to every value, shown as such in errors."""

    def __repr__(self) -> str:
        return "(not recorded)"


_NOT_RECORDED = _NotRecorded()


# Generated file names stay this many bytes below the usual 255-byte limit of one path component,
# leaving room for ".json" and the affixes of the temporary file written next to a baseline.
_STEM_BYTES = 200
_HASH_CHARS = 12
_SAFE_NAME = re.compile(r"[\w\-]+")  # a class or function name: no "." (the separator) in it
_SAFE_PARAMS = re.compile(r"\[[\w.\-\[\]]*")  # a parametrized id, "[...]"
_SAFE_LABEL = re.compile(r"[\w.\-]+")  # the ``name=`` of one of several baselines of a test


def _bounded(text: str) -> tuple[str, bool]:
    """``text`` cut to the generated-name budget (at a character boundary); True when it was cut."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) <= _STEM_BYTES:
        return text, False
    return data[: _STEM_BYTES - _HASH_CHARS - 1].decode("utf-8", "ignore"), True


def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]


def baseline_path(directory: Path | str, nodeid: str, name: str | None = None, *, module_dirs: bool = False) -> Path:
    """Where the baseline of test ``nodeid`` (and ``name``) lives: ``<dir>/<module stem>/<test>[__<name>].npz``.

    ``module_dirs=True`` (one baseline folder shared by the whole suite) keeps the module's folders:
    ``<dir>/tests/unit/test_model/...``, so same-named modules in different packages stay apart.

    Names are readable and every distinct test id gets a file of its own: classes and functions
    are joined with ``.``, and when making a file name changed or dropped anything (a character
    outside ``[\\w.\\-\\[\\]]``, a ``::`` inside a parametrized id, a ``__`` that could be read as the
    name separator, a name longer than a file name may be) the name ends in ``~`` and the first
    12 hex digits of the SHA-256 of the exact module, test id and name. ``~`` never appears
    otherwise, so a hashed name cannot equal an unhashed one. Ids that need none of this keep the
    names of earlier versions (:func:`legacy_baseline_path`).
    """
    module, _, test = nodeid.partition("::")
    parts = module.split("/")  # pytest writes node ids with "/" on every platform
    if not module_dirs:
        parts = parts[-1:]
    lossy = False
    folders = []
    for part in parts[:-1]:  # real folder names, valid on this file system, except "..", "." and ""
        if part in ("", ".", ".."):
            part, lossy = "_" * max(len(part), 1), True
        folders.append(part)
    module_file = Path(parts[-1])
    stem = module_file.stem or "baselines"
    lossy |= module_file.suffix != ".py" or stem in (".", "..")
    if stem in (".", ".."):
        stem = "_" * len(stem)

    bracket = test.find("[")
    names, params = (test, "") if bracket < 0 else (test[:bracket], test[bracket:])
    pieces = names.split("::")
    readable = ".".join(re.sub(r"[^\w\-]", "_", piece) for piece in pieces) + re.sub(r"[^\w.\-\[\]]", "_", params)
    lossy |= not all(_SAFE_NAME.fullmatch(piece) for piece in pieces)
    lossy |= bool(params) and not (_SAFE_PARAMS.fullmatch(params) and params.endswith("]"))
    # "__" separates the test from ``name``: a test that holds "__" or ends in "_" could be read
    # as another test plus a name.
    lossy |= "__" in readable + "_"
    if name:
        lossy |= not _SAFE_LABEL.fullmatch(name)
        readable += "__" + re.sub(r"[^\w.\-]", "_", name)
    identity = "\0".join([*parts, test, name or ""])
    readable, cut = _bounded(readable or "test")
    if lossy or cut:
        readable += "~" + _digest(identity)
    return Path(directory).joinpath(*folders, stem, f"{readable}.npz")


def legacy_baseline_path(directory: Path | str, nodeid: str, name: str | None = None) -> Path:
    """The name earlier versions gave the baseline: characters outside ``[\\w.\\-\\[\\]]`` replaced
    by ``_``, ``::`` by ``.``, and no module folders, so that several tests could share one file."""
    module, _, test = nodeid.partition("::")
    stem = Path(module).stem or "baselines"
    safe = re.sub(r"[^\w.\-\[\]]", "_", test.replace("::", ".")) or "test"
    if name:
        safe += "__" + re.sub(r"[^\w.\-]", "_", name)
    return Path(directory) / stem / f"{safe}.npz"


def _versions() -> dict[str, str]:
    import numpy as np

    torch = require_torch()
    from .. import __version__

    try:
        import captum

        captum_version = captum.__version__
    except Exception:  # pragma: no cover - captum is a dependency
        captum_version = "unknown"
    return {"pytest_saliency": __version__, "torch": torch.__version__, "captum": captum_version,
            "numpy": np.__version__}


# "." + name + "." + pid + "." + 8 hex digits + ".tmp": the temporary file written next to a target.
_TEMP_AFFIX_BYTES = 25
_NAME_MAX_BYTES = 255  # one path component, on the common file systems
# A temporary file is stale (its writer was killed) once it is this old (its age is the time since
# its last write), whoever wrote it: no baseline takes an hour to write, and a streamed one writes
# its temporary file of maps with every batch.
_TEMP_STALE_SECONDS = 3600.0
# ... or once its writer's process is gone and it is this old. The grace keeps the files of a
# writer on another machine (a shared network folder, where a pid means nothing here).
_TEMP_DEAD_WRITER_SECONDS = 30.0


def _as_path(path: Any) -> Path:
    """``path`` as a :class:`Path`, or a usage error for what cannot name a file."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise SaliencyUsageError(
            f"saliency baseline path must be a file path (a str or os.PathLike), got {path!r:.80}. "
            "Pass e.g. tmp_path / 'model.npz', or use the saliency_baseline fixture, which names the file itself."
        )
    if not text:
        raise SaliencyUsageError(
            "saliency baseline path is empty; pass the .npz file to compare with, e.g. 'baselines/model.npz'."
        )
    if "\0" in text:
        raise SaliencyUsageError(
            f"saliency baseline path {text!r:.120} contains a NUL byte, which no file name may hold. "
            "Build the path from the intended folder and file name."
        )
    return Path(text)


def sidecar_path(path: Path | str) -> Path:
    """The JSON sidecar of baseline ``path``: its file name less a final ``.npz`` (in any case), plus
    ``.json``. ``model.npz`` -> ``model.json``, ``model.v1`` -> ``model.v1.json``, ``model`` ->
    ``model.json``: every name :func:`baseline_path` makes ends in ``.npz``, so its sidecar is its
    ``with_suffix(".json")``, and dotted names of several baselines keep sidecars of their own."""
    path = Path(path)
    name = path.name[:-4] if path.name.lower().endswith(".npz") else path.name
    return path.with_name(name + ".json")


def _sidecar_twin(path: Path) -> Path:
    """The other baseline name with the same sidecar: ``model`` for ``model.npz`` and back."""
    if path.name.lower().endswith(".npz"):
        return path.with_name(path.name[:-4])
    return path.with_name(path.name + ".npz")


def _checked_path(path: Any) -> Path:
    """The baseline's path for writing, refused when it cannot be one: not a path, a name too long
    for the file system, a folder, or a name its own JSON sidecar would overwrite."""
    path = _as_path(path)
    if path.name in ("", ".", ".."):
        raise SaliencyUsageError(
            f"saliency baseline path {str(path)!r} names a folder, not a file. Pass the path of an .npz file, "
            "e.g. baselines/model.npz."
        )
    if path.name.lower().endswith(".json"):
        stem = path.name[:-5]
        raise SaliencyUsageError(
            f"saliency baseline path {path} ends in .json, the name of a baseline's metadata sidecar (the "
            f"sidecar of {stem}.npz and of {stem or '.npz'}), so maps and metadata would overwrite each other. "
            f"Give the baseline an .npz name, e.g. {path.with_name((stem or 'baseline') + '.npz')}; the sidecar "
            "is written beside it."
        )
    longest = max(len(os.fsencode(name)) for name in (path.name, sidecar_path(path).name))
    if longest + _TEMP_AFFIX_BYTES > _NAME_MAX_BYTES:
        raise SaliencyUsageError(
            f"the file name of saliency baseline {path} is {len(os.fsencode(path.name))} bytes long; file "
            f"systems hold at most {_NAME_MAX_BYTES} bytes per name, and the temporary file written next to "
            f"the baseline needs {_TEMP_AFFIX_BYTES} more. Pass a shorter name (at most "
            f"{_NAME_MAX_BYTES - _TEMP_AFFIX_BYTES - 1} bytes)."
        )
    if path.is_dir():
        raise SaliencyUsageError(
            f"saliency baseline {path} is a folder, not a baseline file. Pass the path of an .npz file "
            "(e.g. a file inside that folder)."
        )
    return path


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True when that cannot be told."""
    if os.name == "nt" or pid <= 0:  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's live process
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Remove temporary files of ``target`` that killed writers left behind (see the ages above).

    Ours are ``.<name>.<pid>.<8 hex>.tmp``; ``.<name>.<8 chars>.tmp`` are ``tempfile.mkstemp``'s, as
    earlier versions named them, judged by age alone. A file a live writer is writing now, here or
    (for the grace period) elsewhere, is left alone.
    """
    prefix = f".{target.name}."
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d{{1,10}})\.[0-9a-f]{{8}}|[a-z0-9_]{{8}})\.tmp")
    now = time.time()
    try:
        entries = [entry for entry in os.scandir(target.parent) if entry.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = match.group(1)
        if age > _TEMP_STALE_SECONDS or (
            pid is not None and age > _TEMP_DEAD_WRITER_SECONDS and not _writer_alive(int(pid))
        ):
            try:
                os.unlink(entry.path)
            except OSError:  # removed by another writer meanwhile, or not ours to remove
                pass


def write_baseline(path: Path | str, maps: np.ndarray, metadata: dict[str, Any]) -> None:
    """Write ``maps`` and ``metadata`` atomically: temp file in the same folder, fsync, rename.

    Files get the usual mode (0666 less the umask), like any other file a test writes. Temporary
    files that killed writers left next to the targets are removed first.
    """
    import numpy as np

    path = _checked_path(path)
    _refuse_shared_sidecar(path)
    text = json.dumps(metadata, sort_keys=True, indent=2)
    _write_files(path, lambda handle: np.savez_compressed(handle, maps=maps, metadata=np.array(text)), text)


def _refuse_shared_sidecar(path: Path) -> None:
    """Refuse to write ``path`` when another baseline file has the same JSON sidecar."""
    sidecar, twin = sidecar_path(path), _sidecar_twin(path)
    if twin.is_file():
        raise SaliencyUsageError(
            f"saliency baseline {path} and the baseline {twin} would share the JSON sidecar {sidecar.name} "
            f"(a sidecar is named after its baseline less a final .npz), and each write would replace the "
            f"other's. Rename one of them, e.g. pass {sidecar.with_name(sidecar.name[:-5] + '_2.npz')}, "
            "or delete the one no longer used (with its sidecar)."
        )


def _temp_path(target: Path) -> Path:
    """A new temporary file's name beside ``target`` (see :func:`_remove_stale_temps`)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create(path: Path) -> IO[bytes]:
    """``path``, created (it must not exist) and opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o666), "wb")


def _unwritable(path: Path, exc: OSError) -> SaliencyUsageError:
    return SaliencyUsageError(
        f"saliency baseline {path} could not be written ({type(exc).__name__}: {exc}). Check that its folder "
        f"{path.parent} can be created and is writable (not a file, not on a read-only or full disk), or "
        "choose another place (--saliency-baseline-dir)."
    )


def _write_files(path: Path, write_npz: Callable[[IO[bytes]], Any], text: str) -> None:
    """The baseline (``write_npz(handle)`` writes it) and its JSON sidecar (``text``), each written to a
    temporary file beside it, fsynced and renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, write in ((path, write_npz), (sidecar_path(path), lambda handle: handle.write(text.encode("utf-8")))):
            _remove_stale_temps(target)
            tmp = _temp_path(target)
            try:
                with _create(tmp) as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
    except OSError as exc:
        raise _unwritable(path, exc) from None


# Bytes copied at a time from a streamed baseline's temporary file of maps into its .npz.
_COPY_BYTES = 1 << 16


class _RowWriter:
    """A baseline written a batch of maps at a time: the rows go to a temporary file beside the
    baseline, which becomes an .npz like :func:`write_baseline`'s (written to another temporary
    file and renamed into place) only in :meth:`commit`, after the last batch. Until then, and
    when the stream fails, the file at ``path`` is left as it was; :meth:`discard` removes the
    temporary file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shape: tuple[int, ...] | None = None  # the shape of one map
        self.count = 0
        self._rows_path: Path | None = None
        self._rows: IO[bytes] | None = None

    def open(self) -> None:
        _refuse_shared_sidecar(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(self.path)
            self._rows_path = _temp_path(self.path)
            self._rows = _create(self._rows_path)
        except OSError as exc:
            raise _unwritable(self.path, exc) from None

    def append(self, maps: np.ndarray) -> None:
        """Add the maps of the next batch, of the same shape as the earlier ones."""
        import numpy as np

        shape = tuple(int(s) for s in maps.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise SaliencyUsageError(
                f"this batch's maps have shape {shape}, but the earlier batches' have shape {self.shape}; a baseline "
                "stores maps of one shape. Give every batch examples of the same shape (e.g. pad every text batch "
                "to the same length, padding='max_length')."
            )
        if self._rows is None:
            raise SaliencyUsageError(f"the streamed baseline {self.path} is not open for writing.")
        try:
            self._rows.write(np.ascontiguousarray(maps, dtype=np.float32).data)
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        self.count += int(maps.shape[0])

    def commit(self, metadata: dict[str, Any]) -> None:
        """Make the rows written so far, with ``metadata``, the baseline (atomically), then its sidecar."""
        if self._rows is not None:
            self._rows.close()
        text = json.dumps(metadata, sort_keys=True, indent=2)
        _write_files(self.path, lambda handle: self._write_npz(handle, text), text)

    def _write_npz(self, handle: IO[bytes], text: str) -> None:
        """The .npz that ``np.savez_compressed(maps=..., metadata=...)`` writes, the maps copied from
        the temporary file of rows a chunk at a time."""
        import numpy as np

        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.count, *(self.shape or ()))}
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            with archive.open("maps.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                if self._rows_path is not None:
                    with open(self._rows_path, "rb") as rows:
                        shutil.copyfileobj(rows, member, _COPY_BYTES)
            with archive.open("metadata.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.array(text), allow_pickle=False)

    def discard(self) -> None:
        """Close and remove the temporary file of rows (after :meth:`commit`, or when the stream failed)."""
        if self._rows is not None:
            self._rows.close()
        if self._rows_path is not None and os.path.lexists(self._rows_path):
            try:
                os.unlink(self._rows_path)
            except OSError:  # left for _remove_stale_temps
                pass


_FIX = "Delete it and rerun with --saliency-update-baselines to write a fresh one, or restore it from version control."


def _damaged(path: Path, problem: str) -> SaliencyUsageError:
    return SaliencyUsageError(f"saliency baseline {path} {problem}. {_FIX}")


def _check_magic(path: Path, handle: IO[bytes]) -> None:
    """Refuse a file that is empty or not a zip archive (``np.savez`` writes one)."""
    magic = handle.read(4)
    handle.seek(0)
    if not magic:
        raise _damaged(path, "is empty (0 bytes): corrupted or truncated")
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise _damaged(path, f"is not a valid .npz baseline (an .npz file is a zip archive; this file starts "
                             f"with {magic!r})")


def _check_members(path: Path, files: list[str]) -> None:
    if "maps" not in files or "metadata" not in files:
        raise SaliencyUsageError(
            f"saliency baseline {path} is not a pytest-saliency baseline (it holds {sorted(files)}, "
            f"expected 'maps' and 'metadata'). {_FIX}"
        )


def _unreadable(path: Path, exc: Exception) -> SaliencyUsageError:
    """The usage error for a baseline file that could not be read (``exc`` says why)."""
    if isinstance(exc, ValueError) and "pickle" in str(exc).lower():
        return SaliencyUsageError(
            f"saliency baseline {path} contains pickled Python objects; it was refused and nothing in it was "
            f"executed (baselines are loaded with allow_pickle=False). {_FIX}"
        )
    if isinstance(exc, ValueError):
        return SaliencyUsageError(f"saliency baseline {path} could not be read ({exc}). {_FIX}")
    # zipfile.BadZipFile, zlib.error, EOFError, OSError: a damaged file
    return SaliencyUsageError(f"saliency baseline {path} is corrupted or truncated ({type(exc).__name__}: {exc}). {_FIX}")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``maps`` and ``metadata`` arrays of the .npz at ``path``, loaded without unpickling."""
    import numpy as np

    try:
        with open(path, "rb") as handle:
            _check_magic(path, handle)
            with np.load(handle, allow_pickle=False) as data:
                _check_members(path, data.files)
                return data["maps"], data["metadata"]
    except SaliencyUsageError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from None


class _StoredRows:
    """The maps of a stored baseline read in order, a batch of rows at a time (never whole: the
    ``maps`` member of the .npz is read as a stream, decompressed as it goes), and its metadata,
    checked as :func:`read_baseline` checks them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, Any] = {}
        self.count = 0  # rows (maps) stored
        self.position = 0  # rows read
        self._shape: tuple[int, ...] = ()  # of one map
        self._dtype: Any = None
        self._archive: zipfile.ZipFile | None = None
        self._maps: IO[bytes] | None = None

    def open(self) -> None:
        """Open the file and read its metadata and the header of its maps."""
        import numpy as np

        if self.path.is_dir():
            raise SaliencyUsageError(
                f"saliency baseline {self.path} is a folder, not a baseline file. Pass the path of an .npz file.")
        try:
            with open(self.path, "rb") as handle:
                _check_magic(self.path, handle)
            self._archive = zipfile.ZipFile(self.path)
            _check_members(self.path, [name[:-4] for name in self._archive.namelist() if name.endswith(".npy")])
            with self._archive.open("metadata.npy") as member:
                raw = np.lib.format.read_array(member, allow_pickle=False)
            self._maps = self._archive.open("maps.npy")
            version = np.lib.format.read_magic(self._maps)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, self._dtype = read_header(self._maps)
        except SaliencyUsageError:
            raise
        except Exception as exc:
            raise _unreadable(self.path, exc) from None
        self.metadata = _parse_metadata(self.path, raw)
        self._check_header(tuple(int(s) for s in shape), bool(fortran_order))

    def _check_header(self, shape: tuple[int, ...], fortran_order: bool) -> None:
        if self._dtype.hasobject:
            raise _unreadable(self.path, ValueError("pickle"))
        if self._dtype.kind != "f" or len(shape) != 3:
            raise SaliencyUsageError(
                f"saliency baseline {self.path} holds maps of dtype {self._dtype} and shape {shape}; expected float "
                f"maps of shape (N, H, W). {_FIX}"
            )
        if fortran_order:
            raise SaliencyUsageError(
                f"saliency baseline {self.path} stores its maps in Fortran order, which cannot be read a batch of "
                "rows at a time. Pass the inputs as one tensor, or write the baseline again "
                "(pytest --saliency --saliency-update-baselines)."
            )
        _checked_targets(self.path, self.metadata, shape[0])
        self.count, self._shape = shape[0], shape[1:]

    def read(self, rows: int) -> np.ndarray:
        """The next ``rows`` maps, as float32, refused unless finite."""
        import numpy as np

        size = rows * int(np.prod(self._shape)) * self._dtype.itemsize
        try:
            data = self._maps.read(size) if self._maps is not None else b""
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise _unreadable(self.path, exc) from None
        if len(data) != size:
            raise _damaged(self.path, f"ends after {self.position} of its {self.count} maps: corrupted or truncated")
        maps = np.frombuffer(data, dtype=self._dtype).reshape(rows, *self._shape).astype(np.float32)
        finite = np.isfinite(maps)
        if not finite.all():
            raise _damaged(self.path, f"holds maps with {int((~finite).sum())} NaN or infinite value(s) in rows "
                                      f"{self.position} to {self.position + rows - 1}")
        self.position += rows
        return maps

    def close(self) -> None:
        for handle in (self._maps, self._archive):
            if handle is not None:
                handle.close()


def _parse_metadata(path: Path, raw: np.ndarray) -> dict[str, Any]:
    """The metadata: one JSON object of this format version, with thresholds and envelope in range."""
    from ..core.validation import check_count, check_number

    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise _damaged(path, f"holds metadata of dtype {raw.dtype} and shape {raw.shape}; expected one JSON string")
    try:
        metadata = json.loads(str(raw))
    except ValueError as exc:
        raise _damaged(path, f"metadata is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise _damaged(path, f"metadata is not a JSON object (it is a {type(metadata).__name__})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SaliencyUsageError(
            f"saliency baseline {path} has format version {metadata.get('format_version')!r}; this pytest-saliency "
            f"reads version {FORMAT_VERSION}. {_FIX}"
        )
    try:
        if "threshold" in metadata:
            check_number(metadata["threshold"], "threshold", low=-1.0, high=1.0)
        if "envelope" in metadata:
            envelope = metadata["envelope"]
            if not isinstance(envelope, dict):
                raise SaliencyUsageError(
                    f"envelope must be a JSON object with min_mean_similarity and reference_models, got {envelope!r:.80}."
                )
            check_number(envelope.get("min_mean_similarity"), "envelope.min_mean_similarity", low=-1.0, high=1.0)
            check_count(envelope.get("reference_models"), "envelope.reference_models", minimum=2)
    except SaliencyUsageError as exc:
        raise SaliencyUsageError(f"saliency baseline {path}: {exc} {_FIX}") from None
    return metadata


def _checked_targets(path: Path, metadata: dict[str, Any], count: int) -> None:
    """Refuse recorded ``targets`` that are not ``count`` class indices, one per stored map."""
    targets = metadata.get("targets")
    if "targets" in metadata and not (
        isinstance(targets, list) and len(targets) == count
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in targets)
    ):
        raise _damaged(path, f"records targets {targets!r:.80}; expected a list of {count} class indices "
                             "(ints >= 0), one per stored map")


def _checked_maps(path: Path, maps: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """The stored maps as float32, refused unless finite, of shape (N, H, W), one per recorded target."""
    import numpy as np

    if maps.dtype.kind != "f" or maps.ndim != 3:
        raise SaliencyUsageError(
            f"saliency baseline {path} holds maps of dtype {maps.dtype} and shape {maps.shape}; expected float "
            f"maps of shape (N, H, W). {_FIX}"
        )
    _checked_targets(path, metadata, maps.shape[0])
    maps = maps.astype(np.float32, copy=False)
    finite = np.isfinite(maps)
    if not finite.all():
        raise _damaged(path, f"holds maps with {int((~finite).sum())} NaN or infinite value(s) out of {maps.size}")
    return maps


def read_baseline(path: Path | str) -> tuple[np.ndarray, dict[str, Any]]:
    """Load maps and metadata without unpickling anything; damaged files get a clear error.

    Everything the comparison uses is checked here (metadata that is a JSON object, finite
    thresholds in [-1, 1], a well-formed envelope, finite float maps of shape (N, H, W)), so a
    damaged or hand-edited file is reported by name instead of passing or crashing later. The maps
    come back as float32.
    """
    path = _as_path(path)
    if path.is_dir():
        raise SaliencyUsageError(
            f"saliency baseline {path} is a folder, not a baseline file. Pass the path of an .npz file."
        )
    maps, raw = _load_npz(path)
    metadata = _parse_metadata(path, raw)
    return _checked_maps(path, maps, metadata), metadata


def _similarity(metric: str, a: torch.Tensor, b: torch.Tensor, pipeline: MapPipeline) -> torch.Tensor:
    from ..compare.metrics import compute_on_valid
    from ..compare.similarity import pearson, spearman, structural_similarity

    if metric == "ssim":
        return structural_similarity(a, b, **pipeline.ssim.kwargs())
    valid = valid_positions(a)  # token maps: padding left out
    if valid is not None:
        return compute_on_valid(metric, a, b, valid)
    return (spearman if metric == "spearman" else pearson)(a, b)


@dataclass
class BaselineResult:
    """The comparison of current maps with a stored baseline (or the record that one was written)."""

    name: str
    path: str
    status: str  # "compared", "written" (missing: written and failed), "updated" (written on request)
    method: str
    metric: str
    threshold: float
    threshold_source: str  # "given", "default", "calibrated from N reference models"
    values: list[float]
    pipeline: MapPipeline
    n_images: int
    seed: int
    seconds: float
    reproduce: str = ""
    baseline_maps: torch.Tensor | None = field(default=None, repr=False)
    current_maps: torch.Tensor | None = field(default=None, repr=False)
    figure_context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # see maps.modality

    check = "baseline"
    model_writes: tuple[str, ...] = ()  # tensors the model's forward wrote (restored by the guard)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def passed(self) -> bool:
        if self.status == "written":
            return False
        if self.status == "updated":
            return True
        return self.mean >= self.threshold

    def worst(self, count: int = 5) -> list[tuple[int, float]]:
        return sorted(enumerate(self.values), key=lambda item: item[1])[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_writes": list(self.model_writes),
            "check": self.check, "passed": self.passed, "status": self.status, "name": self.name,
            "path": self.path, "method": self.method, "metric": self.metric, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "values": self.values,
            "mean": self.mean if self.values else None,
            "worst": [{"image": i, "value": v} for i, v in self.worst()], "preset": self.pipeline.to_dict(),
            "n_images": self.n_images, "seed": self.seed, "seconds": self.seconds, "reproduce": self.reproduce,
        }

    def numbers(self) -> dict[str, Number]:
        """The mean similarity to the baseline against the threshold (None when a baseline was written)."""
        return {
            "status": self.status, "metric": self.metric, "mean": self.mean if self.values else None,
            "min": min(self.values) if self.values else None, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "n_images": self.n_images, "seed": self.seed,
            "method": self.method, "preset": self.pipeline.name, "path": self.path,
        }

    def figures(self) -> list[Figure]:
        """Baseline, current map and their difference for the worst images; the stored maps when written.

        A streamed check keeps the maps of its first batch only: the worst images among those are drawn."""
        from ..reporting.figures import baseline_figures

        shown = len(self.values) if self.current_maps is None else int(self.current_maps.shape[0])
        return baseline_figures(
            current_maps=self.current_maps, baseline_maps=self.baseline_maps, values=self.values[:shown] or None,
            metric=self.metric, threshold=self.threshold, higher_is_better=True, status=self.status, path=self.path,
            **self.figure_context,
        )

    def summary(self) -> str:
        if self.status in ("written", "updated"):
            return f"{'PASS' if self.passed else 'FAIL'} baseline [{self.method}]: {self.status} {self.path}"
        return (
            f"{'PASS' if self.passed else 'FAIL'} baseline [{self.method}, {self.metric}, {self.pipeline.name}]: "
            f"mean {self.metric} to baseline = {format_score(self.mean)} vs >= {format_threshold(self.threshold)} "
            f"({self.threshold_source}); N = {self.n_images}"
        )

    def report(self) -> str:
        lines = [
            f"  baseline:   {self.path}",
            f"  method:     {self.method}   preset: {self.pipeline.describe()}",
            f"  metric:     mean per-image {self.metric}(current, baseline) must be >= {self.threshold:.4g} "
            f"({self.threshold_source})",
        ]
        if self.values:
            lines.append(f"  observed:   mean {format_score(self.mean)}, min {format_score(min(self.values))} over "
                         f"{self.n_images} images")
            lines.append("  worst images: " + ", ".join(f"#{i} {format_score(v)}" for i, v in self.worst()))
        if self.reproduce:
            lines.append(f"  reproduce:  {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        if self.status == "written":
            return (
                f"Saliency baseline not found: {self.path}\n"
                f"  It has been written now from this run's {self.method} maps ({self.n_images} images); review "
                "it, commit it, and rerun: the next run compares against it.\n"
                "  To write or refresh baselines without failing: pytest --saliency --saliency-update-baselines"
            )
        return "\n".join([
            f"Saliency check failed: {self.method} maps drifted from the stored baseline "
            f"(mean {self.metric} {format_score(self.mean)} < {format_threshold(self.threshold)})",
            self.report(),
            "  what next:   if the new explanations are intended (a deliberate model change), refresh the baseline "
            "with pytest --saliency --saliency-update-baselines and commit it; after a retraining with a new seed, "
            "calibrate the threshold with reference_models=[...] (see the README).",
        ])


def _class_list(target: Any, n: int) -> list[int] | None:
    """The classes a stored ``target`` (an int, or a list of one or ``n`` ints) asks for, one per image."""
    if isinstance(target, int) and not isinstance(target, bool):
        return [target] * n
    if isinstance(target, list) and len(target) in (1, n) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in target):
        return target * n if len(target) == 1 else list(target)
    return None


def fingerprint_key(stored: Mapping[str, Any]) -> str:
    """The field that fingerprints the inputs of the baseline whose metadata is ``stored``:
    ``example_fingerprint`` when it records one (a streamed baseline), else ``input_fingerprint``."""
    return "example_fingerprint" if "example_fingerprint" in stored else "input_fingerprint"


class _InputDigest:
    """A SHA-256 of inputs given a batch at a time: the ``repr`` of ``shape``, then the float32 bytes
    of every batch in order. With the whole inputs' shape it is their ``input_fingerprint``
    (:func:`~pytest_saliency.core.fingerprint.input_fingerprint`); with the shape of one example,
    their ``example_fingerprint``. Either way, how the examples are split into batches does not
    change it, and their order does."""

    def __init__(self, shape: Sequence[int]) -> None:
        self._hash = hashlib.sha256(repr(tuple(shape)).encode())

    def update(self, inputs: torch.Tensor) -> None:
        torch = require_torch()
        self._hash.update(inputs.detach().to("cpu", torch.float32).contiguous().numpy().data)  # (no copy)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def example_fingerprint(inputs: torch.Tensor) -> str:
    """The ``example_fingerprint`` of a tensor of inputs: equal to a stream's over the same examples."""
    digest = _InputDigest(tuple(inputs.shape[1:]))
    digest.update(inputs)
    return digest.hexdigest()


def _refuse_unlike(path: Path, stored: dict[str, Any], metadata: dict[str, Any], classes: list[int] | None,
                   threshold: float | None, *, seeded: str | None, previous_options: dict[str, Any] | None = None) -> None:
    """Refuse a comparison with a baseline made from something that changes the maps or the
    threshold (see the module docstring): a :class:`SaliencyUsageError` naming every such field.

    ``classes``: the classes a given target asks for (None for ``target=None``); ``seeded``: why
    the method's maps depend on the seed, or None when they do not; ``previous_options``: the
    current options in :func:`previous_option_encoding`, which stored ``method_options`` may equal
    instead of ``metadata``'s. The inputs are matched by the fingerprint the file records
    (:func:`fingerprint_key`), which ``metadata`` must hold.
    """
    fingerprint = fingerprint_key(stored)
    matched = tuple(fingerprint if key == "input_fingerprint" else key for key in _MATCHED_FIELDS)
    recorded = {key: stored.get(key, _NOT_RECORDED) for key in (*matched, "target", "seed", "metric")}
    differences = [key for key in matched if recorded[key] != metadata[key] and not (
        key == "method_options" and previous_options is not None and recorded[key] == previous_options)]
    hints = []
    if fingerprint in differences and "input_shape" not in differences:
        hints.append("The inputs have the same shape but other values: other examples, or the same ones in another "
                     "order (a DataLoader must not shuffle: pass shuffle=False).")
    given = recorded["target"]
    if given is _NOT_RECORDED or (given is None) != (metadata["target"] is None) or (
            classes is not None and stored.get("targets", _class_list(given, len(classes))) != classes):
        differences.append("target")
        hints.append("The target must ask for the same classes: target=None explains again the classes the "
                     "baseline recorded (each image's predicted class when it was written), a given target the "
                     "classes it names; pass the target the baseline was written with.")
    if seeded and recorded["seed"] != metadata["seed"]:
        differences.append("seed")
        hints.append(f"{seeded}, so its maps depend on the seed: pass seed={recorded['seed']!r} "
                     "(--saliency-seed, when given, sets the seed of every check).")
    if threshold is None:
        envelope = stored.get("envelope")
        if isinstance(envelope, dict):
            recorded["metric"] = envelope.get("metric", _NOT_RECORDED)
        if recorded["metric"] != metadata["metric"]:
            differences.append("metric")
            source = ("the envelope of its reference models" if isinstance(envelope, dict)
                      else "the one it was written with")
            hints.append(f"Its threshold ({source}) holds for the metric {recorded['metric']!r} only: pass "
                         f"threshold= to compare the stored maps by {metadata['metric']}.")
    if differences:
        detail = "; ".join(f"{key}: baseline {recorded[key]!r:.80} vs now {metadata[key]!r:.80}" for key in differences)
        raise SaliencyUsageError(
            f"saliency baseline {path} was made from different {', '.join(differences)} ({detail}). Comparing them "
            f"would compare unlike things. {' '.join(hints) + ' ' if hints else ''}If the change is intended, "
            "regenerate it with pytest --saliency --saliency-update-baselines."
        )


def _seed_dependence(method: MethodSpec | Explainer, label: str, options: dict[str, Any]) -> str | None:
    """Why ``method``'s maps depend on the seed, or None when they do not."""
    if not isinstance(method, MethodSpec):
        return f"the custom explainer {label} runs with generators seeded from the seed and may draw from them"
    return f"{label} draws random numbers" if draws_random(method, options) else None


def _recorded_classes(path: Path, model: torch.nn.Module, inputs: torch.Tensor, classes: list[int],
                      batch_size: int | None, seed: int) -> torch.Tensor:
    """The classes a ``target=None`` baseline explained, as a target tensor checked against ``model``."""
    torch = require_torch()
    try:
        return resolve_target(model, inputs, torch.tensor(classes, dtype=torch.long, device=inputs.device),
                              batch_size, seed=seed)
    except SaliencyUsageError as exc:
        raise SaliencyUsageError(
            f"saliency baseline {path} was written with target=None and explains the classes the images were "
            f"predicted as then ({classes!r:.80}), which this model cannot be explained for: {exc} If the "
            "model's classes changed on purpose, regenerate it with pytest --saliency --saliency-update-baselines."
        ) from None


def _mean_pairwise(maps: list[torch.Tensor], metric: str, pipeline: MapPipeline) -> float:
    """The lowest mean similarity between any two of ``maps``."""
    values = [float(_similarity(metric, a, b, pipeline).mean()) for a, b in itertools.combinations(maps, 2)]
    return min(values)


def _checked_references(reference_models: object, device: torch.device) -> list[torch.nn.Module]:
    """``reference_models`` as a list of models on ``device`` (empty for None), or a usage error."""
    torch = require_torch()
    if reference_models is None:
        return []
    if isinstance(reference_models, (str, bytes, torch.Tensor)) or (
        isinstance(reference_models, torch.nn.Module) and not isinstance(reference_models, torch.nn.ModuleList)
    ) or not hasattr(reference_models, "__iter__"):
        raise SaliencyUsageError(
            f"reference_models must be a list of models, got {type(reference_models).__name__}. Pass the "
            "models trained with the same recipe and other seeds, e.g. reference_models=[model_seed1, model_seed2]."
        )
    references = list(reference_models)
    if not references:
        raise SaliencyUsageError(
            "reference_models is empty, so there is nothing to calibrate the threshold with. Pass at least one "
            "model trained with the same recipe and another seed, or leave reference_models out."
        )
    for index, ref in enumerate(references):
        if not isinstance(ref, torch.nn.Module):
            raise SaliencyUsageError(
                f"reference_models[{index}] must be a torch.nn.Module, got {type(ref).__name__}. Pass the "
                "trained networks themselves."
            )
        check_model(ref)
        ref_device = model_device(ref)
        if ref_device != device:
            raise SaliencyUsageError(
                f"reference_models[{index}] is on {ref_device} but the model and inputs are on {device}. Move "
                f"every reference model there first: reference_models[{index}].to({str(device)!r})"
                + (" (a meta model holds no weights: materialize it and load them)." if ref_device.type == "meta"
                   else ".")
            )
    return references


def _check_not_on_meta(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Refuse a model or inputs on the meta device: their tensors hold no values to explain."""
    on_meta = [label for label, device in (("model", model_device(model)), ("inputs", getattr(inputs, "device", None)))
               if device is not None and device.type == "meta"]
    if on_meta:
        raise SaliencyUsageError(
            f"{' and '.join(on_meta)} {'is' if on_meta == ['model'] else 'are'} on the meta device, whose tensors "
            "hold no values, so there are no maps to compare. Materialize the model (model.to_empty(device='cpu'), "
            "then load its weights) and pass real inputs on the same device."
        )


def _recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a baseline records: only what changes the maps (batching and values derived
    from the inputs are left out)."""
    return {k: v for k, v in options.items() if k not in DERIVED_OPTIONS and not k.startswith("_")}


def previous_option_encoding(options: Any) -> Any:
    """``options`` as the ``method_options`` of baselines written before tensors were recorded by
    digest: strings, numbers, booleans and None as they are, tuples and lists as lists, dicts with
    their keys as strings, and every other value (a tensor, a numpy scalar) as its ``repr``.

    A file holding this encoding of the current options is compared, not refused. A large
    tensor's ``repr`` summarizes its values, so such a file tells fewer tensors apart than the
    digest does.
    """
    if isinstance(options, (str, int, float, bool)) or options is None:
        return options
    if isinstance(options, (list, tuple)):
        return [previous_option_encoding(v) for v in options]
    if isinstance(options, dict):
        return {str(k): previous_option_encoding(v) for k, v in options.items()}
    return repr(options)


def _metadata(label: str, options: dict[str, Any], pipeline: MapPipeline, inputs: torch.Tensor | Mapping[str, Any],
              target: Any, seed: int, metric: str) -> dict[str, Any]:
    """What a baseline records about the call that made it (see the module docstring). ``inputs``:
    the tensor of inputs, or (for a stream) the fields that describe them, already computed."""
    torch = require_torch()
    described = dict(inputs) if isinstance(inputs, Mapping) else {
        "input_fingerprint": input_fingerprint(inputs), "input_shape": list(inputs.shape)}
    return {
        "format_version": FORMAT_VERSION,
        "method": label,
        "method_options": jsonable(_recorded_options(options), tensors="digest"),
        "preset": pipeline.to_dict(),
        **described,
        "target": jsonable(target.tolist() if isinstance(target, torch.Tensor) else target),
        "seed": seed,
        "metric": metric,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _threshold_to_write(path: Path, threshold: float | None, envelope: float | None, references: int, metric: str,
                        metadata: dict[str, Any]) -> tuple[float, str]:
    """The new baseline's threshold and where it comes from, recorded in ``metadata``: the given one, the
    default, or the ``envelope`` of the maps of the model and its ``references`` reference models (the
    lowest mean similarity of any two; None without reference models)."""
    if envelope is None:
        stored = DEFAULT_THRESHOLD if threshold is None else threshold
        metadata["threshold"] = stored
        return stored, "given" if threshold is not None else "default"
    if not math.isfinite(envelope):
        raise SaliencyCheckFailed(
            f"saliency baseline {path} not written: the mean {metric} between the maps of the model and "
            f"its {references} reference model(s) is {envelope}, so no threshold can be calibrated "
            f"from them ({metric} of constant maps is undefined: does a model's output ignore its "
            "input?). Check the models' maps (saliency.explain), or use metric='ssim', or pass "
            "threshold= instead of reference_models."
        )
    metadata["envelope"] = {"metric": metric, "min_mean_similarity": envelope, "reference_models": references + 1}
    metadata["threshold"] = envelope
    return envelope, f"calibrated from {references + 1} reference models"


def _threshold_in_use(threshold: float | None, stored: dict[str, Any]) -> tuple[float, str]:
    """The threshold a comparison uses and where it comes from: given, the stored envelope, or stored."""
    if threshold is not None:
        return threshold, "given"
    if "envelope" in stored:
        return (float(stored["envelope"]["min_mean_similarity"]),
                f"calibrated from {stored['envelope']['reference_models']} reference models")
    return float(stored.get("threshold", DEFAULT_THRESHOLD)), "default"


def _stored_maps(path: Path, stored: np.ndarray, current: torch.Tensor) -> torch.Tensor:
    """The baseline's maps as a tensor beside ``current``, refused when their shapes differ."""
    torch = require_torch()
    if tuple(stored.shape) != tuple(current.shape):
        raise SaliencyUsageError(
            f"saliency baseline {path} holds maps of shape {tuple(stored.shape)}, but this check's maps have "
            f"shape {tuple(current.shape)} although its metadata matches these inputs: the file was changed after "
            "it was written. Regenerate it with pytest --saliency --saliency-update-baselines (or restore it from "
            "version control)."
        )
    return torch.from_numpy(stored).to(current.device)


def _steps(progress: Callable[[int, int, str], None] | None, total: int) -> Callable[[int, str], None]:
    """``step(done, label)`` calling ``progress(done, total, label)``, or doing nothing without one."""
    def step(done: int, label: str) -> None:
        if progress is not None:
            progress(done, total, label)

    return step


def _batch_steps(progress: Callable[[int, int, str], None] | None, index: int, batches: int | None,
                 total: int) -> Callable[[int, str], None]:
    """:func:`_steps` for batch ``index`` of a stream (of ``batches``, when known): labels name the batch."""
    of = f"/{batches}" if batches else ""

    def step(done: int, label: str) -> None:
        if progress is not None:
            progress(done, total, f"batch {index + 1}{of}" + (f" {label}" if label else ""))

    return step


def _checked_metric(metric: str | None, threshold: float | None) -> tuple[str, float | None]:
    """The metric (the modality's comparison unless given; refused where it cannot apply) and the threshold."""
    from ..core.validation import check_number, unknown_choice

    metric = default_similarity(metric)
    if threshold is not None:
        threshold = check_number(threshold, "threshold", low=-1.0, high=1.0,
                                 hint=f"It bounds the mean per-image {metric} to the baseline, which lies in [-1, 1].")
    if metric not in BASELINE_METRICS:
        raise unknown_choice("baseline metric", metric, BASELINE_METRICS)
    return metric, threshold


@dataclass
class _Call:
    """The arguments of one :func:`check_baseline` call (path, seed and batch size checked)."""

    path: Path
    method: Any
    metric: str | None
    threshold: float | None
    reference_models: Any
    update: bool
    preset: Any
    target: Any
    seed: int
    batch_size: int | None
    name: str
    reproduce: str
    progress: Callable[[int, int, str], None] | None
    output: OutputSelector
    forward_kwargs: Any
    modality: Any
    method_kwargs: dict[str, Any]


def _batch_forward_kwargs(given: Any, chunk: Chunk) -> Any:
    """The call's ``forward_kwargs`` with the batch's per-input arguments (an ``attention_mask``) added."""
    if not chunk.forward_kwargs or (given is not None and not isinstance(given, Mapping)):
        return given  # (what is not a mapping is refused by the model call with its own message)
    clash = sorted(set(given or {}) & set(chunk.forward_kwargs))
    if clash:
        raise SaliencyUsageError(
            f"forward_kwargs names {clash}, which the batches also carry; pass each once (drop it from "
            "forward_kwargs, or name the batches' forward arguments with pytest_saliency.Batches).")
    return {**(given or {}), **chunk.forward_kwargs}


def _stream_target(target: Any) -> Any:
    """A streamed call's target: a list or tuple of classes (one per example) as a tensor; others as given."""
    torch = require_torch()
    if not isinstance(target, (list, tuple)):
        return target
    try:
        return torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise SaliencyUsageError(
            f"target must be None (the predicted class), an int, 'labels' (each batch's labels) or one class index "
            f"per example of the whole loader, got {target!r:.80}.") from None


def _lowest(values: list[float]) -> float:
    """The lowest of ``values``, NaN when any is NaN."""
    return float("nan") if any(math.isnan(v) for v in values) else min(values)


class _Stream:
    """A streamed :func:`check_baseline` (see the module docstring): what it keeps from batch to batch.

    ``open()``, then ``batch()`` for every batch in order, then ``finish()``; ``close()`` in any
    case (it removes the temporary file of a baseline that was not finished)."""

    def __init__(self, model: torch.nn.Module, call: _Call, writing: bool | None = None) -> None:
        self.model, self.call = model, call
        self.target = _stream_target(call.target)
        self.writing = call.update or not call.path.exists() if writing is None else writing
        self.rows = None if self.writing else _StoredRows(call.path)
        self.writer = _RowWriter(call.path) if self.writing else None
        self.references = _checked_references(call.reference_models, model_device(model))
        self.pipeline = get_pipeline(call.preset)
        self.metric, self.threshold = "", call.threshold
        self.method: tuple[Any, str, dict[str, Any]] | None = None  # resolved, label, options (first batch)
        self.example_shape: tuple[int, ...] = ()
        self.digest = _InputDigest(())  # made for the first batch's example shape
        self.count = 0  # examples seen
        self.values: list[float] = []  # per example: the similarity to the stored map
        self.classes: list[int] = []  # per example: the class explained
        self.labels: list[int] = []  # per example, with target="labels": the batch's label
        self.pair_sums: list[float] = []  # per pair of models (when calibrating): the sum of similarities
        self.first: dict[str, Any] = {}  # the first batch's maps and figure context

    @property
    def stored(self) -> dict[str, Any]:
        return {} if self.rows is None else self.rows.metadata

    def open(self) -> None:
        if self.rows is not None:
            self.rows.open()
        if self.writer is not None:
            self.writer.open()

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
        if self.writer is not None:
            self.writer.discard()

    def batch(self, chunk: Chunk, index: int, batches: int | None, own: bool = True) -> None:
        """Explain one batch, then write its maps or compare them with the stored rows at its offset.
        A batch another rank explains (``own=False``) only moves the stream on: its inputs enter
        the fingerprint and its stored rows are passed over."""
        model, call, inputs = self.model, self.call, chunk.inputs
        n = int(inputs.shape[0])
        with model_call_options(call.output, _batch_forward_kwargs(call.forward_kwargs, chunk), inputs, call.modality):
            _check_not_on_meta(model, inputs)
            check_inputs(inputs, model)
            resolved, label, options = prepare_method(call.method, model, inputs, dict(call.method_kwargs))
            if self.method is None:
                self._begin(inputs, resolved, label, options)
            if self.rows is not None and chunk.start + n > self.rows.count:
                raise self._more_examples(chunk.start + n)
            self.digest.update(inputs)
            if own:
                self._explain(chunk, index, batches, (resolved, label, options))
            elif self.rows is not None:
                self.rows.read(n)
        self.count += n

    def _explain(self, chunk: Chunk, index: int, batches: int | None, method: tuple[Any, str, dict[str, Any]]) -> None:
        from ..compare.similarity import check_ssim_window

        model, inputs, (resolved, label, options) = self.model, chunk.inputs, method
        target = self._target(chunk)
        explained = 1 + len(self.references) if self.writer is not None else 1
        step = _batch_steps(self.call.progress, index, batches, explained)
        step(0, "model")
        current = self._maps(model, inputs, resolved, target, options)
        if self.metric == "ssim" and not self.first:  # never write a baseline that no later run could compare
            check_ssim_window(current.shape[-2], current.shape[-1], self.pipeline.ssim.win_size, method=label,
                              preset=self.pipeline.name)
        baseline = None
        if self.writer is not None:
            self._write(self.writer, current, inputs, (resolved, target, options), step)
        elif self.rows is not None:
            baseline = self._compare(self.rows, current)
        step(explained, "")
        if not self.first:
            self.first = {"current": current.detach().cpu(), "context": figure_context(inputs, int(inputs.shape[0])),
                          "baseline": None if baseline is None else baseline.cpu()}

    def marks(self) -> tuple[int, int, int]:
        """Where the per-example lists stand (before a batch: see :meth:`record`)."""
        return len(self.values), len(self.classes), len(self.labels)

    def record(self, index: int, marks: tuple[int, int, int]) -> dict[str, Any]:
        """What batch ``index`` added since ``marks``, for the other ranks (see :meth:`join`)."""
        return {"index": index, "values": self.values[marks[0]:], "classes": self.classes[marks[1]:],
                "labels": self.labels[marks[2]:], "first": self.first if index == 0 else None}

    def join(self, shares: list[list[dict[str, Any]]]) -> None:
        """Every rank's records, in the order of the batches: the per-example lists and the first
        batch's maps as one process running every batch would have them."""
        records = sorted((record for share in shares for record in share), key=lambda record: record["index"])
        self.values = [v for record in records for v in record["values"]]
        self.classes = [c for record in records for c in record["classes"]]
        self.labels = [c for record in records for c in record["labels"]]
        self.first = next((record["first"] for record in records if record["first"]), self.first)

    def _begin(self, inputs: torch.Tensor, resolved: Any, label: str, options: dict[str, Any]) -> None:
        """Set up from the first batch; refuse a stored baseline made with other settings before
        explaining anything (the inputs' fingerprint and number are checked at the end)."""
        self.metric, self.threshold = _checked_metric(self.call.metric, self.call.threshold)
        self.method = (resolved, label, options)
        self.example_shape = tuple(int(s) for s in inputs.shape[1:])
        shape: Any = self.stored.get("input_shape")
        recorded_shape = isinstance(shape, list) and len(shape) > 0 and all(
            isinstance(s, int) and not isinstance(s, bool) for s in shape)
        if self.rows is None or "example_fingerprint" in self.stored or not recorded_shape:
            self.digest = _InputDigest(self.example_shape)
        else:  # the file's input_fingerprint, computed batch by batch with the recorded shape
            self.digest = _InputDigest(shape)
        if self.rows is None:
            return
        key = fingerprint_key(self.stored)
        described = {key: self.stored.get(key, _NOT_RECORDED),
                     "input_shape": [shape[0], *self.example_shape] if recorded_shape else shape}
        target = self.target if isinstance(self.target, str) else self._target_record()  # ("labels": not read yet)
        early = _metadata(label, options, self.pipeline, described, target, self.call.seed, self.metric)
        _refuse_unlike(self.call.path, self.stored, early, None, self.threshold,
                       seeded=_seed_dependence(resolved, label, options),
                       previous_options=previous_option_encoding(_recorded_options(options)))

    def _more_examples(self, seen: int) -> SaliencyUsageError:
        count = self.rows.count if self.rows is not None else 0
        return SaliencyUsageError(
            f"saliency baseline {self.call.path} holds the maps of {count} examples, but the inputs have more "
            f"(at least {seen}): it was made from other inputs (input_shape "
            f"{self.stored.get('input_shape', _NOT_RECORDED)!r:.80}), and comparing them would compare unlike things. "
            "If the change is intended, regenerate it with pytest --saliency --saliency-update-baselines."
        )

    def _target(self, chunk: Chunk) -> torch.Tensor:
        """The classes to explain the batch for, recorded in ``classes`` (and ``labels``)."""
        torch = require_torch()
        call, target, inputs, start = self.call, self.target, chunk.inputs, chunk.start
        n = int(inputs.shape[0])
        if isinstance(target, str) and target == "labels":
            if chunk.labels is None:
                raise SaliencyUsageError(
                    "target='labels' explains each batch's labels, but the batches carry none. Yield (inputs, labels) "
                    "batches, or name the labels with pytest_saliency.Batches(loader, labels=...).")
            given = chunk.labels
        elif isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel() > 1:
            if target.shape[0] < start + n:
                raise SaliencyUsageError(
                    f"target has {target.shape[0]} entries, but the inputs' batches have more examples (at least "
                    f"{start + n}). With a loader, pass one class per example of the whole loader, in its order, or "
                    "target='labels' for the batches' labels.")
            given = target[start:start + n]
        else:  # None, an int, one class for every example (resolve_target refuses the rest)
            given = target
        if given is None and self.rows is not None and "targets" in self.stored:
            fixed = _recorded_classes(call.path, self.model, inputs, self.stored["targets"][start:start + n],
                                      call.batch_size, call.seed)
        else:
            fixed = resolve_target(self.model, inputs, given, call.batch_size, seed=call.seed)
        classes = [int(c) for c in fixed.tolist()]
        if isinstance(target, str):
            self.labels.extend(classes)
        self.classes.extend(classes)
        return fixed

    def _target_record(self) -> Any:
        """The target as a baseline records it (see :func:`_metadata`): a per-example one as its list."""
        torch = require_torch()
        if isinstance(self.target, str) and self.target == "labels":
            return self.labels
        return self.target.tolist() if isinstance(self.target, torch.Tensor) else self.target

    def _maps(self, model: torch.nn.Module, inputs: torch.Tensor, resolved: Any, target: torch.Tensor,
              options: dict[str, Any]) -> torch.Tensor:
        raw = attribute(model, inputs, resolved, target, self.call.seed, self.call.batch_size, True, options)
        return apply_pipeline(raw, self.pipeline).float()

    def _write(self, writer: _RowWriter, current: torch.Tensor, inputs: torch.Tensor,
               method: tuple[Any, torch.Tensor, dict[str, Any]], step: Callable[[int, str], None]) -> None:
        """Write the batch's maps; with reference models, add the batch to each pair's sum of similarities."""
        writer.append(current.detach().cpu().numpy())
        if not self.references:
            return
        maps = [current]
        for index, reference in enumerate(self.references):
            step(1 + index, f"reference model {index + 1}/{len(self.references)}")
            maps.append(self._maps(reference, inputs, *method))
        sums = [float(_similarity(self.metric, a, b, self.pipeline).double().sum())
                for a, b in itertools.combinations(maps, 2)]
        self.pair_sums = [a + b for a, b in zip(self.pair_sums, sums)] if self.pair_sums else sums

    def _compare(self, rows: _StoredRows, current: torch.Tensor) -> torch.Tensor:
        """The stored maps at the batch's offset, their similarities to ``current`` kept."""
        baseline = _stored_maps(self.call.path, rows.read(int(current.shape[0])), current)
        self.values.extend(_similarity(self.metric, current, baseline, self.pipeline).double().cpu().tolist())
        return baseline

    def finish(self, start: float, loader: Any) -> BaselineResult:
        """Check what could only be checked on all examples, then write the baseline or judge the comparison."""
        call = self.call
        if self.method is None:
            raise SaliencyUsageError(
                f"the inputs ({type(loader).__name__}) yielded no batch; pass a loader over at least one example.")
        resolved, label, options = self.method
        self._check_target_length()
        key = "example_fingerprint" if self.rows is None else fingerprint_key(self.stored)
        described = {key: self.digest.hexdigest(), "input_shape": [self.count, *self.example_shape]}
        metadata = _metadata(label, options, self.pipeline, described, self._target_record(), call.seed, self.metric)
        if self.writer is not None:
            envelope = _lowest([s / self.count for s in self.pair_sums]) if self.references else None
            used, source = _threshold_to_write(call.path, self.threshold, envelope, len(self.references), self.metric,
                                               metadata)
            metadata["targets"] = self.classes
            self.writer.commit(metadata)
            status = "updated" if call.update else "written"
        else:
            _refuse_unlike(call.path, self.stored, metadata, None if call.target is None else self.classes,
                           self.threshold, seeded=_seed_dependence(resolved, label, options),
                           previous_options=previous_option_encoding(_recorded_options(options)))
            if self.rows is not None and self.count != self.rows.count:
                raise _damaged(call.path, f"holds {self.rows.count} maps, but its metadata matches these "
                                          f"{self.count} examples: the file was changed after it was written")
            used, source = _threshold_in_use(self.threshold, self.stored)
            status = "compared"
        return BaselineResult(
            name=call.name, path=str(call.path), status=status, method=label, metric=self.metric, threshold=used,
            threshold_source=source, values=self.values, pipeline=self.pipeline, n_images=self.count, seed=call.seed,
            seconds=time.perf_counter() - start, reproduce=call.reproduce, baseline_maps=self.first["baseline"],
            current_maps=self.first["current"], figure_context=self.first["context"],
        )

    def _check_target_length(self) -> None:
        torch = require_torch()
        target = self.target
        if isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel() > 1 and \
                target.shape[0] != self.count:
            raise SaliencyUsageError(
                f"target has {target.shape[0]} entries, but the inputs yielded {self.count} examples. With a loader, "
                "pass one class per example of the whole loader, in its order, or target='labels' for the batches' "
                "labels.")


def _streamed_baseline(model: torch.nn.Module, loader: Any, call: _Call, start: float,
                       world: Ranks | None = None) -> BaselineResult:
    """:func:`check_baseline` over an iterable of batches (see the module docstring); with
    ``world``, comparing: each rank explains its share of the batches, and every rank judges all."""
    __tracebackhide__ = True
    from ..core.validation import check_number

    if call.threshold is not None:  # (the metric is known from the first batch, whose modality it depends on)
        check_number(call.threshold, "threshold", low=-1.0, high=1.0,
                     hint="It bounds the mean per-image similarity to the baseline, which lies in [-1, 1].")
    stream = _Stream(model, call, writing=None if world is None else False)

    def read() -> tuple[list[dict[str, Any]], list[tuple[int, float]], str]:
        stream.open()  # (inside the exchange: a file that one rank cannot open fails every rank)
        return (*_read_stream(stream, loader, world), "" if world is None else models_fingerprint({"model": model}))

    try:
        if world is None:
            read()
        else:
            shares = exchange(_exchange_tag(call), read)
            same_models([models for _, _, models in shares])
            same_batches([read for _, read, _ in shares])
            stream.join([records for records, _, _ in shares])
        return stream.finish(start, loader)
    finally:
        stream.close()


def _read_stream(stream: _Stream, loader: Any,
                 world: Ranks | None) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """Run every batch of ``loader`` through ``stream``: this rank's share explained (all of them
    without ``world``). Returns the records of its batches (:meth:`_Stream.record`) and the
    checksum of every batch read (:func:`~pytest_saliency.checks.streaming.same_batches`)."""
    __tracebackhide__ = True
    inner = loader.loader if isinstance(loader, Batches) else loader
    batches = len(inner) if isinstance(inner, Sized) else None
    records, read = [], []
    for index, chunk in enumerate(chunks(loader, model_device(stream.model))):
        own = world is None or owner(index, batches, world) == world.rank
        marks = stream.marks()
        try:
            with examples_from(chunk.start):  # per-example random draws keyed by the index in the stream
                stream.batch(chunk, index, batches, own)
        except SaliencyUsageError as error:
            last = chunk.start + int(chunk.inputs.shape[0]) - 1
            raise SaliencyUsageError(
                f"in batch {index} of the inputs (examples {chunk.start} to {last}): {error}") from None
        if world is not None:
            read.append((index, batch_checksum(chunk.inputs)))
            if own:
                records.append(stream.record(index, marks))
    return records, read


def _exchange_tag(call: _Call) -> str:
    return f"check_baseline {call.path.name}"


def _ranked_baseline(model: torch.nn.Module, inputs: Any, call: _Call, start: float, world: Ranks) -> BaselineResult:
    """:func:`check_baseline` across the ranks of a process group. Comparing with a stored baseline
    is split across them (a tensor of inputs in shards); writing one is rank 0's alone (the others
    wait for its result): only rank 0 writes files, and whether to write is rank 0's decision."""
    __tracebackhide__ = True
    tag = _exchange_tag(call)
    exists = exchange(f"{tag} (write?)", call.path.exists)
    if not call.update and len(set(exists)) > 1:
        having = [rank for rank, found in enumerate(exists) if found]
        raise SaliencyUsageError(
            f"saliency baseline {call.path} exists on rank(s) {having} but not on the others: every host needs the "
            "baseline files at the same path (they belong in the repository), or none does (the first run writes "
            "them on rank 0).")
    if call.update or not exists[0]:
        def on_rank_0() -> BaselineResult | None:
            if world.rank != 0:
                return None
            with unsharded():
                return _plain_baseline(model, inputs, call, start)

        return cast(BaselineResult, exchange(tag, on_rank_0)[0])
    if not is_stream(inputs) and has_example_rows(call.method_kwargs, int(inputs.shape[0])):
        with unsharded():  # per-input method arguments (IG baselines) are not cut: every rank compares all
            return _plain_baseline(model, inputs, call, start)
    if not is_stream(inputs):
        inputs, rest = tensor_shards(inputs, call.forward_kwargs)
        call = replace(call, forward_kwargs=rest)
    check_sampler(inputs.loader if isinstance(inputs, Batches) else inputs)
    return _streamed_baseline(model, inputs, call, start, world)


def _plain_baseline(model: torch.nn.Module, inputs: Any, call: _Call, start: float) -> BaselineResult:
    if is_stream(inputs):
        return _streamed_baseline(model, inputs, call, start)
    return _tensor_baseline(model, cast("torch.Tensor", inputs), call, start)


@rng_isolated
@passes_model_call
def check_baseline(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    path: Path | str,
    method: str | Explainer = "saliency",
    *,
    metric: str | None = None,
    threshold: float | None = None,
    reference_models: Sequence[torch.nn.Module] | None = None,
    update: bool = False,
    preset: str | MapPipeline | None = None,
    target: int | torch.Tensor | str | Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    name: str = "",
    reproduce: str = "",
    progress: Callable[[int, int, str], None] | None = None,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> BaselineResult:
    """Compare ``model``'s maps on ``inputs`` with the baseline at ``path``, writing it when missing.

    ``inputs`` is a tensor or an iterable of batches (a ``DataLoader``), streamed as
    :mod:`pytest_saliency.checks.streaming` describes: the maps are written and compared a batch at
    a time (see this module's docstring), and the result keeps the similarities of every example
    and the maps of the first batch. With a loader, ``target="labels"`` explains each batch's
    labels, and a target with one class per example of the whole loader is sliced batch by batch.

    ``update=True`` writes (or overwrites) the baseline and passes. A missing baseline is written
    and the result fails (so a new test cannot pass by accident). ``reference_models`` calibrates
    the threshold from seed-to-seed variation when the baseline is written.

    A baseline made from other inputs, method, options, preset or target, from another seed (for a
    method whose maps depend on it), or whose stored threshold belongs to another metric (when
    ``threshold`` is not given) is refused with a :class:`SaliencyUsageError`, not compared.
    ``target=None`` (each image's predicted class) pins the classes: the baseline records the
    classes it explained, and a later model is explained for those, so a retrained model that
    predicts another class for an image is still compared on that image's maps of the same class,
    as reference models are when an envelope is calibrated. (Files written before the classes were
    recorded are compared on the current predictions.)

    ``progress(done, total, label)`` hears of each model explained: the model, then each
    reference model when a baseline is written (``label`` names the next one), then
    ``done == total`` with an empty label (with a loader, once per batch, labels naming the batch).
    """
    from ..core.rng import as_seed
    from ..core.validation import check_count, check_progress

    start = time.perf_counter()
    call = _Call(
        path=_checked_path(path), method=method, metric=metric, threshold=threshold,
        reference_models=reference_models, update=update, preset=preset, target=target, seed=as_seed(seed),
        batch_size=check_count(batch_size, "batch_size", minimum=1, allow_none=True), name=name,
        reproduce=reproduce, progress=progress, output=output, forward_kwargs=forward_kwargs, modality=modality,
        method_kwargs=method_kwargs,
    )
    if not isinstance(name, str):
        raise SaliencyUsageError(f"baseline name must be a str, got {name!r:.80}. Pass e.g. name='integrated_gradients'.")
    check_progress(progress)
    check_model(model)
    world = None if in_stream() else ranks()
    if world is not None:
        return _ranked_baseline(model, inputs, call, start, world)
    return _plain_baseline(model, inputs, call, start)


def _tensor_baseline(model: torch.nn.Module, inputs: torch.Tensor, call: _Call, start: float) -> BaselineResult:
    """:func:`check_baseline` on a tensor of inputs: every map computed and compared at once."""
    from ..compare.similarity import check_ssim_window

    path, target, seed, batch_size = call.path, call.target, call.seed, call.batch_size
    metric, threshold = _checked_metric(call.metric, call.threshold)
    _check_not_on_meta(model, inputs)
    check_inputs(inputs, model)
    references = _checked_references(call.reference_models, inputs.device)
    pipeline = get_pipeline(call.preset)
    resolved, label, options = prepare_method(call.method, model, inputs, call.method_kwargs)
    writing = call.update or not path.exists()
    stored_maps, stored = (None, {}) if writing else read_baseline(path)
    fixed_target = None if target is None else resolve_target(model, inputs, target, batch_size, seed=seed)
    metadata = _metadata(label, options, pipeline, inputs, target, seed, metric)
    if not writing:
        described = metadata if fingerprint_key(stored) == "input_fingerprint" else {
            **metadata, "example_fingerprint": example_fingerprint(inputs)}  # a streamed baseline
        _refuse_unlike(path, stored, described, None if fixed_target is None else fixed_target.tolist(), threshold,
                       seeded=_seed_dependence(resolved, label, options),
                       previous_options=previous_option_encoding(_recorded_options(options)))
        if fixed_target is None and "targets" in stored:
            fixed_target = _recorded_classes(path, model, inputs, stored["targets"], batch_size, seed)
    if fixed_target is None:  # predicted classes: a new baseline, or a file that does not record them
        fixed_target = resolve_target(model, inputs, None, batch_size, seed=seed)
    # The classes explained, one per image: what a later target=None comparison explains again.
    metadata["targets"] = fixed_target.tolist()

    def maps_of(m: torch.nn.Module) -> torch.Tensor:
        raw = attribute(m, inputs, resolved, fixed_target, seed, batch_size, True, options)
        return apply_pipeline(raw, pipeline).float()

    explained = [model, *references] if stored_maps is None else [model]
    step = _steps(call.progress, len(explained))
    step(0, "model")
    current = maps_of(model)
    if metric == "ssim":  # never write a baseline that no later run could compare
        check_ssim_window(current.shape[-2], current.shape[-1], pipeline.ssim.win_size, method=label,
                          preset=pipeline.name)
    baseline = None
    if stored_maps is None:  # writing
        status = "updated" if call.update else "written"
        reference_maps = []
        for index, reference in enumerate(references):
            step(1 + index, f"reference model {index + 1}/{len(references)}")
            reference_maps.append(maps_of(reference))
        step(len(explained), "")
        envelope = _mean_pairwise([current, *reference_maps], metric, pipeline) if reference_maps else None
        used, source = _threshold_to_write(path, threshold, envelope, len(references), metric, metadata)
        write_baseline(path, current.detach().cpu().numpy(), metadata)
        values: list[float] = []
    else:
        status = "compared"
        step(1, "")
        baseline = _stored_maps(path, stored_maps, current)
        values = _similarity(metric, current, baseline, pipeline).double().cpu().tolist()
        used, source = _threshold_in_use(threshold, stored)
    return BaselineResult(
        name=call.name, path=str(path), status=status, method=label, metric=metric, threshold=used,
        threshold_source=source, values=values, pipeline=pipeline, n_images=int(inputs.shape[0]), seed=seed,
        seconds=time.perf_counter() - start, reproduce=call.reproduce,
        baseline_maps=None if baseline is None else baseline.cpu(), current_maps=current.detach().cpu(),
        figure_context=figure_context(inputs, inputs.shape[0]),
    )
