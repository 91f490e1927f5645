"""Inputs that come as an iterable of batches (a ``DataLoader``) instead of one tensor.

Every check accepts, as its ``inputs``, either a tensor of examples or an iterable of batches
(a ``torch.utils.data.DataLoader``, a list of tensors, a generator). A batch is

- a tensor of inputs;
- a tuple or list ``(inputs, labels, ...)``, as a ``DataLoader`` over a ``TensorDataset`` yields:
  the first element is the inputs, the second (when it is a tensor with one row per input) the
  labels;
- a mapping, as Hugging Face collators yield: the inputs are the first of ``input_ids``,
  ``pixel_values``, ``input_values``, ``inputs``, ``x`` that it has, the labels its ``labels`` or
  ``label``, and every other tensor with one row per input (``attention_mask``,
  ``token_type_ids``) is a per-input forward argument of the model.

:class:`Batches` names the parts of batches that follow none of these rules. The batches are
moved to the model's device one at a time; only what a check keeps of each (its per-example
numbers, and the first batch's maps for the report) stays in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union

from ..exceptions import SaliencyUsageError
from .torchtools import require_torch

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: Mapping keys tried, in order, for a batch's inputs and labels.
INPUT_KEYS = ("input_ids", "pixel_values", "input_values", "inputs", "x")
LABEL_KEYS = ("labels", "label")

#: What a check's ``inputs`` may be: a tensor of examples, or an iterable of batches.
Inputs = Union["torch.Tensor", Iterable[Any]]

#: How :class:`Batches` names a part of a batch: a key, an index, or a function of the batch.
Part = Union[str, int, Callable[[Any], Any], None]

BATCHES_HINT = (
    "Wrap the loader in pytest_saliency.Batches(loader, inputs=..., labels=..., forward_kwargs=[...]) to name "
    "the parts of its batches (a key, an index or a function of the batch)."
)


@dataclasses.dataclass(frozen=True)
class Batches:
    """An iterable of batches with its parts named.

    ``inputs`` and ``labels`` are each a mapping key, a tuple index or a function of the batch;
    ``labels=None`` means the batches carry none. ``forward_kwargs`` names the keys of a mapping
    batch passed to the model's forward (one row per input); ``None`` takes every other tensor
    with one row per input.
    """

    loader: Iterable[Any]
    inputs: Part = None
    labels: Part = "auto"
    forward_kwargs: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One batch of a stream, on the model's device: its inputs, the forward arguments with one
    row per input, its labels (None if it has none) and the index of its first example."""

    inputs: torch.Tensor
    forward_kwargs: dict[str, Any]
    labels: torch.Tensor | None
    start: int
    named: bool = False  # forward_kwargs named by Batches(forward_kwargs=...), not found in a dict batch


_OFFSET: contextvars.ContextVar[int | None] = contextvars.ContextVar("pytest_saliency_example_offset", default=None)


def example_offset() -> int:
    """The index, in the whole stream, of the first example of the batch a check is running on
    (0 for a tensor). Per-example random draws are keyed by ``example_offset() + row``, so an
    example draws the same numbers whichever batch it comes in."""
    return _OFFSET.get() or 0


def in_stream() -> bool:
    """Whether the check is running on one batch of a stream (not on a tensor of inputs)."""
    return _OFFSET.get() is not None


@contextlib.contextmanager
def examples_from(start: int) -> Iterator[None]:
    """Run a check's batch as the examples from ``start`` on (see :func:`example_offset`)."""
    token = _OFFSET.set(start)
    try:
        yield
    finally:
        _OFFSET.reset(token)


_CARRIED: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "pytest_saliency_carried", default=None)


@contextlib.contextmanager
def carried_rows() -> Iterator[None]:
    """Keep, for the length of a check (over all the batches of a stream), the last row of what
    each batch compared with another input's (see :func:`previous_rows`). Inside a check that
    keeps them already, it keeps using that check's."""
    token = _CARRIED.set({}) if _CARRIED.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _CARRIED.reset(token)


def remembered(key: Hashable, make: Callable[[], T]) -> T:
    """``make()``, made once for the length of a check over all the batches of a stream (inside
    :func:`carried_rows`) and given again to the later batches that ask with an equal ``key``:
    work that does not depend on the batch (each layer's randomized values) is not redone per
    batch. Outside, ``make()`` every time."""
    store = _CARRIED.get()
    if store is None:
        return make()
    memo = store.setdefault(("remembered",), {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def previous_rows(key: str, rows: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(others, paired)``: ``others[i]`` is the row of the example before ``rows[i]`` -- for
    ``i = 0``, the last row the previous batch (of a stream, or of the check's own batches) gave
    under the same ``key`` -- and ``paired[i]`` is False for the first example of all, which has none.

    The chance levels that compare each input's map with another input's pair every example with
    the one before it this way, so that they are the same for a tensor and for any batching of it
    (inside :func:`carried_rows`; outside, rows are paired within ``rows`` only). ``key`` names what
    the rows are (a method's maps, a model's), kept apart; ``first`` is the index of ``rows[0]`` in
    the check's inputs, so that asking again for the same batch gives the same answer.
    """
    torch = require_torch()
    store = _CARRIED.get()
    start = example_offset() + first
    entry = None if store is None else store.get(key)
    if entry is not None and entry["start"] == start:  # asked again for this batch
        before = entry["before"]
    else:
        before = None if entry is None else entry["last"]
    if store is not None:
        store[key] = {"start": start, "last": rows[-1:].detach(), "before": before}
    if before is not None and before.shape[1:] != rows.shape[1:]:
        before = None  # another batch's shape (texts padded to another length): no comparable map
    head = rows[:1] if before is None else before.to(rows.device)
    paired = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    if before is None:
        paired[0] = False
    return torch.cat([head, rows[:-1]]), paired


class CarryTaken(Exception):
    """Raised by a check that runs a batch only for the rows it carries to the next batch
    (:func:`carry_only`), once :func:`previous_rows` has them: the rest of the batch's work is not needed."""


_CARRY_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("pytest_saliency_carry_only", default=False)


def carry_only() -> bool:
    """Whether the batch runs only so that the next batch gets its carried rows (see
    :func:`previous_rows`): a rank of a sharded check starting after another rank's batches runs
    the batch before its first so. A check may then skip what does not feed :func:`previous_rows`
    and raise :class:`CarryTaken`; one that does not runs the batch in full (its result is dropped)."""
    return _CARRY_ONLY.get()


@contextlib.contextmanager
def carrying_only() -> Iterator[None]:
    """Run the block as a batch whose only use is its carried rows (:func:`carry_only`)."""
    token = _CARRY_ONLY.set(True)
    try:
        yield
    except CarryTaken:
        pass
    finally:
        _CARRY_ONLY.reset(token)


def is_stream(inputs: Any) -> bool:
    """True for an iterable of batches: anything iterable that is not a tensor, an array or a string."""
    torch = require_torch()
    if isinstance(inputs, (Batches, torch.utils.data.Dataset)):  # a dataset is refused, with what to pass
        return True
    if isinstance(inputs, (torch.Tensor, str, bytes, Mapping)) or hasattr(inputs, "__array__"):
        return False
    return isinstance(inputs, Iterable)


def chunks(stream: Any, device: Any, positions: Iterable[tuple[int, int]] | None = None) -> Iterator[Chunk]:
    """The batches of ``stream`` (see the module docstring), each moved to ``device``.
    ``positions``: (index, first example) of each batch, when ``stream`` yields some batches of a
    longer one (a rank's own); by default they follow each other from 0."""
    spec = stream if isinstance(stream, Batches) else Batches(stream)
    start = 0
    given = iter(positions) if positions is not None else None
    for index, batch in enumerate(spec.loader):
        if given is not None:
            index, start = next(given)
        inputs = _inputs(batch, spec.inputs, index)
        n = int(inputs.shape[0]) if inputs.dim() else 0
        labels = _labels(batch, spec.labels, n)
        kwargs = _forward_kwargs(batch, spec, inputs, labels)
        yield Chunk(_to(inputs, device), {k: _to(v, device) for k, v in kwargs.items()},
                    None if labels is None else _to(labels, device), start, spec.forward_kwargs is not None)
        start += n


def _to(value: Any, device: Any) -> Any:
    torch = require_torch()
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _part(batch: Any, part: Part) -> Any:
    if callable(part):
        return part(batch)
    try:
        return batch[part]
    except (KeyError, IndexError, TypeError) as error:
        raise SaliencyUsageError(
            f"a batch of the inputs has no part {part!r} ({_describe(batch)}). {BATCHES_HINT}") from error


def _inputs(batch: Any, part: Part, index: int) -> torch.Tensor:
    torch = require_torch()
    if part is not None:
        found = _part(batch, part)
    elif isinstance(batch, torch.Tensor):
        found = batch
    elif isinstance(batch, (tuple, list)) and batch:
        found = batch[0]
    elif isinstance(batch, Mapping):
        found = next((batch[k] for k in INPUT_KEYS if k in batch), None)
    else:
        found = None
    if not isinstance(found, torch.Tensor):
        raise SaliencyUsageError(
            f"batch {index} of the inputs is a {_describe(batch)}; the check found no tensor of inputs in it. "
            f"A batch is a tensor, a tuple (inputs, labels, ...) or a dict with one of the keys "
            f"{', '.join(INPUT_KEYS)}. {BATCHES_HINT}"
        )
    return found


def _rows(value: Any, n: int) -> bool:
    torch = require_torch()
    return isinstance(value, torch.Tensor) and value.dim() > 0 and int(value.shape[0]) == n


def _labels(batch: Any, part: Part, n: int) -> torch.Tensor | None:
    if part is None:
        return None
    if part != "auto":
        labels = _part(batch, part)
        if not _rows(labels, n):
            raise SaliencyUsageError(
                f"the labels {part!r} of a batch are a {_describe(labels)}, not a tensor with one row per input "
                f"({n}). {BATCHES_HINT}")
        return labels
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        found = batch[1]
    elif isinstance(batch, Mapping):
        found = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    else:
        found = None
    return found if _rows(found, n) else None


def _forward_kwargs(batch: Any, spec: Batches, inputs: Any, labels: Any) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        if spec.forward_kwargs:
            raise SaliencyUsageError(
                f"forward_kwargs={list(spec.forward_kwargs)!r} names keys of the batches, but they are "
                f"{_describe(batch)}s, not dicts.")
        return {}
    if spec.forward_kwargs is not None:
        missing = [k for k in spec.forward_kwargs if k not in batch]
        if missing:
            raise SaliencyUsageError(
                f"a batch of the inputs has no key {missing[0]!r} named in forward_kwargs; it has "
                f"{sorted(map(str, batch))}.")
        return {k: batch[k] for k in spec.forward_kwargs}
    n = int(inputs.shape[0])
    return {k: v for k, v in batch.items()
            if isinstance(k, str) and v is not inputs and v is not labels and k not in LABEL_KEYS and _rows(v, n)}


def _describe(value: Any) -> str:
    torch = require_torch()
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


__all__ = ["Batches", "CarryTaken", "Chunk", "carry_only", "carrying_only", "INPUT_KEYS", "Inputs", "carried_rows", "example_offset", "examples_from", "in_stream", "previous_rows", "remembered", "LABEL_KEYS", "chunks", "is_stream"]
