"""Checks over an iterable of batches (a ``DataLoader``): one call per batch, one result.

An entry point decorated with :func:`streams` accepts, as its ``inputs``, a tensor (the check runs
as it is) or an iterable of batches (:mod:`pytest_saliency.core.stream` says what a batch may
be). For the latter it runs the check on each batch in turn, with the same arguments and seed,
so every batch meets the same randomized layers, models and settings, and combines the per-batch
results into one: the per-example numbers of every batch, the statistics and the verdict
recomputed on all of them, and the maps of the first batch for the report (the later batches'
are dropped as soon as they are made). Memory thus grows with the number of examples only by
their per-example numbers.

Per batch:

- ``target="labels"`` explains each batch's labels; a target tensor (or list) with one entry per
  example of the whole stream is sliced batch by batch;
- ``labels=`` (for the checks that take it) defaults to the batch's labels;
- ``forward_kwargs=`` is passed to every batch, with the batch's own per-input arguments (a
  Hugging Face batch's ``attention_mask``) added;
- a usage error names the batch and its examples;
- random draws made per example (SmoothGrad's noise, GradientSHAP's and LIME's samples, input
  noise) are keyed by the example's index in the whole stream
  (:func:`pytest_saliency.core.stream.example_offset`), so a stochastic method's per-example
  numbers are the tensor run's too.

Chance levels measured between inputs (an unrelated input's map) are measured within each batch
and averaged over the batches, weighted by their sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ..core.stream import Chunk, carried_rows, chunks, examples_from, is_stream
from ..core.torchtools import require_torch
from ..core.validation import model_device
from ..exceptions import SaliencyUsageError

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

#: combine(parts, arguments, stopped): the one result of the per-batch results ``parts`` (the
#: first with its maps, the others slimmed), for the call's ``arguments`` (defaults applied).
Combine = Callable[[list[Any], dict[str, Any], str], Any]


@dataclasses.dataclass(frozen=True)
class StreamSpec(Generic[R]):
    """How one check streams.

    ``combine`` makes the result; ``slim(part)`` drops a later batch's maps; ``prepare(arguments,
    parts)`` returns the argument overrides for the next batch, or None to stop before it (a cap
    on the examples); ``stop(parts, arguments)`` returns why to stop after a batch ("" to go on).
    """

    combine: Combine
    slim: Callable[[Any], Any]
    prepare: Callable[[dict[str, Any], list[Any]], dict[str, Any] | None] | None = None
    stop: Callable[[list[Any], dict[str, Any]], str] | None = None


def streams(spec: StreamSpec[Any]) -> Callable[[F], F]:
    """Let an entry point take an iterable of batches as its ``inputs`` (module docstring).

    Goes between :func:`~pytest_saliency.core.integrity.rng_isolated` (the seed and the guard
    cover the whole stream) and :func:`~pytest_saliency.core.forward.passes_model_call` (the model
    call is set per batch)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            bound = signature.bind(*args, **kwargs)
            if not is_stream(bound.arguments.get("inputs")):
                return function(*args, **kwargs)
            bound.apply_defaults()
            return _run(function, signature, dict(bound.arguments), spec)

        return wrapper  # type: ignore[return-value]

    return decorate


def _run(function: Callable[..., Any], signature: inspect.Signature, arguments: dict[str, Any],
         spec: StreamSpec[Any]) -> Any:
    __tracebackhide__ = True
    parts: list[Any] = []
    stopped = ""
    loader = arguments["inputs"]
    _check_loader(loader)
    total = _length(loader)
    batches = chunks(loader, _device(arguments))
    seen, exhausted = 0, False
    with carried_rows():
        for index in itertools.count():
            # asked before the next batch is read: a cap on the examples reads no batch past it
            overrides = {} if spec.prepare is None else spec.prepare(arguments, parts)
            chunk = None if overrides is None else next(batches, None)
            if chunk is None:
                exhausted = overrides is not None
                break
            seen += int(chunk.inputs.shape[0])
            call = {**arguments, **_per_batch(arguments, chunk, index, total, signature), **(overrides or {})}
            part = _call(function, signature, call, chunk, index)
            parts.append(part if index == 0 else spec.slim(part))
            stopped = "" if spec.stop is None else spec.stop(parts, arguments)
            if stopped:
                break
    if not parts:
        raise SaliencyUsageError(
            f"the inputs ({type(loader).__name__}) yielded no batch; pass a loader over at least one example.")
    if exhausted:
        _check_lengths(arguments, signature, seen)
    return spec.combine(parts, arguments, stopped)


def _check_loader(loader: Any) -> None:
    """Refuse the iterables that are most likely not batches: a dataset (its items are single
    examples) and an ``(inputs, labels)`` pair of tensors."""
    torch = require_torch()
    if isinstance(loader, torch.utils.data.Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        raise SaliencyUsageError(
            f"inputs is a {type(loader).__name__}, whose items are single examples, not batches. Wrap it in a "
            f"DataLoader: inputs=torch.utils.data.DataLoader(dataset, batch_size=64).")
    if isinstance(loader, tuple) and all(isinstance(t, torch.Tensor) for t in loader) \
            and len({t.dim() for t in loader}) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in loader)
        raise SaliencyUsageError(
            f"inputs is a tuple of tensors of shapes {shapes}: one (inputs, labels) pair, not a sequence of batches. "
            "Pass the inputs tensor (and target=labels), or a DataLoader of such pairs.")


def _check_lengths(arguments: dict[str, Any], signature: inspect.Signature, seen: int) -> None:
    """A target or labels with one entry per example must have as many as the stream had."""
    for name in ("target", "labels"):
        values = arguments.get(name) if name in signature.parameters else None
        if values is None or isinstance(values, (int, str)):
            continue
        count = len(values) if not hasattr(values, "shape") else (int(values.shape[0]) if len(values.shape) else 1)
        if count not in (1, seen):
            raise SaliencyUsageError(
                f"{name} has {count} entries, but the inputs' batches had {seen} examples; pass one entry per "
                f"example of the whole loader, in its order (a shuffled loader reorders them: pass shuffle=False)"
                + (", or target='labels' for the batches' labels." if name == "target" else "."))


def _call(function: Callable[..., Any], signature: inspect.Signature, call: dict[str, Any], chunk: Chunk,
          index: int) -> Any:
    __tracebackhide__ = True
    bound = inspect.BoundArguments(signature, call)
    try:
        with examples_from(chunk.start):
            return function(*bound.args, **bound.kwargs)
    except SaliencyUsageError as error:
        n = int(chunk.inputs.shape[0])
        raise SaliencyUsageError(
            f"in batch {index} of the inputs (examples {chunk.start} to {chunk.start + n - 1}): {error}") from None


def _length(loader: Any) -> int | None:
    inner = getattr(loader, "loader", loader)
    try:
        return len(inner)
    except TypeError:
        return None


def _device(arguments: dict[str, Any]) -> Any:
    torch = require_torch()
    model = _model(arguments)
    return model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")


def _per_batch(arguments: dict[str, Any], chunk: Chunk, index: int, total: int | None,
               signature: inspect.Signature) -> dict[str, Any]:
    """The arguments that change from batch to batch: the inputs, the model call's extra
    arguments, the target and labels of the batch, and a progress that names the batch."""
    call: dict[str, Any] = {"inputs": chunk.inputs}
    if "forward_kwargs" in signature.parameters:
        call["forward_kwargs"] = _forward_kwargs(arguments.get("forward_kwargs"), chunk, _model(arguments))
    elif chunk.forward_kwargs:
        raise SaliencyUsageError("this check takes no forward_kwargs, but the batches carry per-input arguments "
                                 f"{sorted(chunk.forward_kwargs)}.")
    if "target" in signature.parameters:
        call["target"] = _target(arguments.get("target"), chunk)
    if "labels" in signature.parameters and arguments.get("labels") is None:
        call["labels"] = chunk.labels
    elif "labels" in signature.parameters:
        call["labels"] = _sliced(arguments["labels"], chunk, "labels")
    progress = arguments.get("progress")
    if callable(progress):
        call["progress"] = _batch_progress(progress, index, total)
    return call


def _forward_kwargs(given: Any, chunk: Chunk, model: Any) -> dict[str, Any] | None:
    if given is not None and not isinstance(given, Mapping):
        return given  # refused by the check with its own message
    found = chunk.forward_kwargs if chunk.named else _accepted(chunk.forward_kwargs, model)
    clash = sorted(set(given or {}) & set(found))
    if clash:
        raise SaliencyUsageError(
            f"forward_kwargs names {clash}, which the batches also carry; pass each once (drop it from "
            "forward_kwargs, or name the batches' forward arguments with pytest_saliency.Batches).")
    merged = {**(given or {}), **found}
    return merged or None


def _accepted(found: dict[str, Any], model: Any) -> dict[str, Any]:
    """The per-input tensors of a dict batch that the model's forward takes (as Hugging Face's
    Trainer drops unused columns): an index or id column is not passed to it."""
    forward = getattr(model, "forward", None)
    try:
        parameters = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        return found
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return found
    return {name: value for name, value in found.items() if name in parameters}


def _model(arguments: dict[str, Any]) -> Any:
    model = arguments.get("model", arguments.get("models"))
    if isinstance(model, Mapping):
        return next(iter(model.values()), None)
    if isinstance(model, Sequence) and model:
        return model[0]
    return model


def _target(target: Any, chunk: Chunk) -> Any:
    if isinstance(target, str) and target == "labels":
        if chunk.labels is None:
            raise SaliencyUsageError(
                "target='labels' explains each batch's labels, but the batches carry none. Yield (inputs, labels) "
                "batches, or name the labels with pytest_saliency.Batches(loader, labels=...).")
        return chunk.labels
    if target is None or isinstance(target, (int, str)):
        return target
    return _sliced(target, chunk, "target")


def _sliced(values: Any, chunk: Chunk, name: str) -> Any:
    """The rows of ``values`` (one per example of the whole stream) for ``chunk``."""
    torch = require_torch()
    n = int(chunk.inputs.shape[0])
    rows = torch.as_tensor(values) if not isinstance(values, torch.Tensor) else values
    if rows.dim() == 0 or rows.numel() == 1:  # one value for every example
        return values
    if rows.shape[0] < chunk.start + n:
        raise SaliencyUsageError(
            f"{name} has {rows.shape[0]} entries, but the inputs' batches have more examples (at least "
            f"{chunk.start + n}). With a loader, pass one entry per example of the whole loader, in its order, "
            f"or {name}='labels' for the batches' labels." if name == "target" else
            f"{name} has {rows.shape[0]} entries, but the inputs' batches have more examples (at least "
            f"{chunk.start + n}); pass one per example, or leave {name} out to use the batches' labels.")
    return rows[chunk.start:chunk.start + n].to(chunk.inputs.device)


def _batch_progress(progress: Callable[[int, int, str], None], index: int,
                    total: int | None) -> Callable[[int, int, str], None]:
    of = f"/{total}" if total else ""

    def report(done: int, steps: int, label: str) -> None:
        progress(done, steps, f"batch {index + 1}{of}" + (f" {label}" if label else ""))

    return report


def weighted_mean(values: Sequence[float | None], weights: Sequence[int]) -> float | None:
    """The mean of the values that are not None, weighted (a chance level measured per batch)."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def same_across_batches(parts: Sequence[Any], attribute: str, what: str) -> None:
    """Refuse to combine batches whose ``attribute`` differs (e.g. the layers selected)."""
    first = getattr(parts[0], attribute)
    for index, part in enumerate(parts[1:], start=1):
        if getattr(part, attribute) != first:
            raise SaliencyUsageError(
                f"batch {index} of the inputs gives other {what} than batch 0 ({getattr(part, attribute)!r:.120} vs "
                f"{first!r:.120}); the batches of one check must have the same shapes and modality.")


__all__ = ["StreamSpec", "streams", "weighted_mean", "same_across_batches"]
