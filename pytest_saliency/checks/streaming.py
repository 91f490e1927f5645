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

Chance levels that compare each input's map with another input's pair every example with the one
before it, across batch boundaries too (:func:`~pytest_saliency.core.stream.previous_rows`).

Inside a torch.distributed process group (``torchrun``; :mod:`pytest_saliency.core.distributed`),
the batches -- or a tensor of inputs cut into shards of
:func:`~pytest_saliency.core.distributed.shard_size` examples -- are split across the ranks
(:func:`_sharded`): each rank runs its contiguous share, the per-batch results are exchanged, and
every rank combines all of them in batch order, so the result is the one a single process running
every batch gets, bit for bit where the computation is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..core.distributed import RankError, Ranks, exchange, ranks, shard_size, unsharded
from ..core.fingerprint import tensor_fingerprint
from ..core.stream import Batches, Chunk, carried_rows, carrying_only, chunks, examples_from, in_stream, is_stream
from ..core.torchtools import require_torch
from ..core.validation import model_device
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

#: combine(parts, arguments, stopped): the one result of the per-batch results ``parts`` (the
#: first with its maps, the others slimmed), for the call's ``arguments`` (defaults applied).
Combine = Callable[[list[Any], dict[str, Any], str], Any]


@dataclasses.dataclass(frozen=True)
class StreamSpec(Generic[R]):
    """How one check streams.

    ``combine`` makes the result; ``slim(part)`` drops a later batch's maps; ``prepare(arguments,
    seen)`` returns the argument overrides for the next batch (``seen``: the examples of the
    batches before it), or None to stop before it (a cap on the examples); ``stop(parts,
    arguments)`` returns why to stop after a batch ("" to go on), and ``decides(arguments)``
    whether it may stop early for these arguments (then ranks exchange results after every round
    of batches, one batch each). ``carries``: the check compares each example with the one before
    it (:func:`~pytest_saliency.core.stream.previous_rows`), so a rank that starts after another
    rank's batch first runs that batch for its carried rows. ``shard_tensor(arguments)``: whether
    a tensor of inputs may be split into shards across ranks (True when not given).
    """

    combine: Combine
    slim: Callable[[Any], Any]
    prepare: Callable[[dict[str, Any], int], dict[str, Any] | None] | None = None
    stop: Callable[[list[Any], dict[str, Any]], str] | None = None
    decides: Callable[[dict[str, Any]], bool] | None = None
    carries: bool = False
    shard_tensor: Callable[[dict[str, Any]], bool] | None = None
    shard_examples: Callable[[dict[str, Any]], int | None] | None = None
    caps: Callable[[dict[str, Any]], bool] | None = None


def streams(spec: StreamSpec[Any]) -> Callable[[F], F]:
    """Let an entry point take an iterable of batches as its ``inputs`` (module docstring), and
    split its batches, or a tensor's shards, across the ranks of a process group (:func:`_sharded`).

    Goes between :func:`~pytest_saliency.core.integrity.rng_isolated` (the seed and the guard
    cover the whole stream) and :func:`~pytest_saliency.core.forward.passes_model_call` (the model
    call is set per batch)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            bound = signature.bind(*args, **kwargs)
            world = None if in_stream() else ranks()
            stream = is_stream(bound.arguments.get("inputs"))
            if not stream and world is None:
                return function(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            if world is None:
                return _run(function, signature, arguments, spec)
            shards = None if stream else _tensor_shards(arguments, signature, spec)
            if not stream and shards is None:  # every rank runs the check whole, alike
                with unsharded():
                    return function(*args, **kwargs)
            return _sharded(function, signature, {**arguments, **(shards or {})}, spec, world)

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
            overrides = {} if spec.prepare is None else spec.prepare(arguments, seen)
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
    return _finished(parts, loader, arguments, signature, spec, stopped, seen if exhausted else None)


def _finished(parts: list[Any], loader: Any, arguments: dict[str, Any], signature: inspect.Signature,
              spec: StreamSpec[Any], stopped: str, seen: int | None) -> Any:
    """The combined result; ``seen``: the examples of a stream read to its end (None if cut short)."""
    __tracebackhide__ = True
    if not parts:
        raise SaliencyUsageError(
            f"the inputs ({type(loader).__name__}) yielded no batch; pass a loader over at least one example.")
    if seen is not None:
        _check_lengths(arguments, signature, seen)
    return spec.combine(parts, arguments, stopped)


class _TensorShards(list):
    """A tensor of inputs cut into shards (dicts of the inputs and the per-input forward arguments)."""


#: Arguments a stream's batches take their own rows of (the rest must not have one row per input).
_PER_BATCH = frozenset({"inputs", "target", "labels", "forward_kwargs", "classes", "attributions"})


def _tensor_shards(arguments: dict[str, Any], signature: inspect.Signature,
                   spec: StreamSpec[Any]) -> dict[str, Any] | None:
    """The arguments of a check whose tensor of inputs is split into shards across ranks (see
    :func:`tensor_shards`), or None when it is not: one example, ``spec.shard_tensor`` says no, or
    another argument holds one row per input (per-input IG baselines: the check then runs whole
    on every rank)."""
    torch = require_torch()
    inputs = arguments.get("inputs")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        return None
    n = int(inputs.shape[0])
    if n < 2 or (spec.shard_tensor is not None and not spec.shard_tensor(arguments)):
        return None
    if isinstance(arguments.get("target"), (list, tuple)):  # the check's own rules for it apply: run whole
        return None
    if has_example_rows({k: v for k, v in arguments.items() if k not in _PER_BATCH}, n):
        return None
    takes = "forward_kwargs" in signature.parameters
    size = None if spec.shard_examples is None else spec.shard_examples(arguments)
    stream, rest = tensor_shards(inputs, arguments.get("forward_kwargs") if takes else None, size)
    return {"inputs": stream, **({"forward_kwargs": rest} if takes else {})}


def tensor_shards(inputs: torch.Tensor, forward_kwargs: Any = None, size: int | None = None) -> tuple[Batches, Any]:
    """``inputs`` cut into a stream of shards of ``size`` examples (by default
    :func:`~pytest_saliency.core.distributed.shard_size`), with the per-input tensors of
    ``forward_kwargs`` cut alike; and what is left of ``forward_kwargs`` (passed to every shard)."""
    n = int(inputs.shape[0])
    given = forward_kwargs if isinstance(forward_kwargs, Mapping) else {}
    rows = {k: v for k, v in given.items() if _has_rows(v, n)}
    size = size or shard_size()
    shards = _TensorShards({"inputs": inputs[i:i + size], **{k: v[i:i + size] for k, v in rows.items()}}
                           for i in range(0, n, size))
    rest = forward_kwargs
    if isinstance(forward_kwargs, Mapping):
        rest = {k: v for k, v in given.items() if k not in rows} or None
    return Batches(shards, inputs="inputs", labels=None, forward_kwargs=list(rows)), rest


def tensor_size(inputs: Any) -> int | None:
    """The number of examples of a tensor cut into shards by :func:`tensor_shards` (None for any
    other stream): what a check over the tensor reports as its inputs."""
    inner = inputs.loader if isinstance(inputs, Batches) else inputs
    return sum(int(shard["inputs"].shape[0]) for shard in inner) if isinstance(inner, _TensorShards) else None


def _has_rows(value: Any, n: int) -> bool:
    torch = require_torch()
    return isinstance(value, torch.Tensor) and value.dim() > 0 and int(value.shape[0]) == n


def has_example_rows(arguments: Mapping[str, Any], n: int) -> bool:
    """Whether an argument (or a value of a mapping argument, such as ``**method_kwargs``) is a
    tensor with one row per input (``n``): a check given one is not split into shards."""
    for value in arguments.values():
        values = value.values() if isinstance(value, Mapping) else [value]
        if any(_has_rows(v, n) for v in values):
            return True
    return False


#: Batches per rank in a round over a loader of unknown length: a rank that does not run the
#: batch before its share runs it first (for the checks that carry rows), once per round.
UNKNOWN_ROUND = 8


def capped_images(arguments: Mapping[str, Any]) -> bool:
    """Whether ``images=`` is a number: a cap that may stop a stream before its end (``caps``)."""
    images = arguments.get("images")
    return isinstance(images, int) and not isinstance(images, bool)


def batch_checksum(inputs: torch.Tensor) -> float:
    """A number that differs, as a rule, between two batches of inputs: ranks compare theirs to
    be sure they read the same batches in the same order (:func:`same_batches`)."""
    total = inputs.detach().double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).sum()
    return float(total) + float(inputs.shape[0])


def models_fingerprint(arguments: Mapping[str, Any]) -> str:
    """A digest of the parameters and buffers of every model among ``arguments`` (a model, or a
    list or mapping of them): ranks compare theirs before combining (:func:`same_models`)."""
    torch = require_torch()
    found: list[tuple[str, Any]] = []
    for name, value in arguments.items():
        values = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else [value]
        for index, model in enumerate(values):
            if isinstance(model, torch.nn.Module):
                found.extend((f"{name}[{index}].{key}", tensor) for key, tensor in model.state_dict().items()
                             if isinstance(tensor, torch.Tensor))
    return tensor_fingerprint(found)


def same_models(fingerprints: Sequence[str]) -> None:
    """Refuse to combine when the ranks were given different models (see :func:`models_fingerprint`)."""
    for rank, fingerprint in enumerate(fingerprints[1:], start=1):
        if fingerprint != fingerprints[0]:
            raise SaliencyUsageError(
                f"rank {rank} was given another model than rank 0 (their parameters or buffers differ): the ranks "
                "would explain different models. Every rank must build the same model: load one checkpoint, or "
                "train it deterministically from one seed (the saliency_model_cache fixture trains it once and lets "
                "every rank load it).")


def same_batches(reads: Sequence[Sequence[tuple[int, float]]]) -> None:
    """Refuse to combine when the ranks read different batches (their :func:`batch_checksum`
    per batch index differ): a shuffled loader, or files that differ between hosts."""
    first = dict(reads[0])
    for rank, read in enumerate(reads[1:], start=1):
        for index, checksum in read:
            if index in first and first[index] != checksum:
                raise SaliencyUsageError(
                    f"rank {rank} read another batch {index} from the inputs than rank 0 (its values differ): every "
                    "rank must get the same batches in the same order. Pass a loader that does not shuffle "
                    "(shuffle=False, or a sampler seeded alike on every rank) over the same files on every host, and "
                    "give every rank the same inputs.")


def call_digest(arguments: Mapping[str, Any]) -> str:
    """A short digest of a call's arguments by their structure: tensors by shape and dtype (never
    their values or device), models as "module" (:func:`same_models` compares them), plain values
    by their text, other objects by their type. Ranks that exchange results of calls that differ
    are out of step, even when they run the same check in the same test."""
    described = ";".join(f"{name}={_structure(value)}" for name, value in arguments.items() if name != "progress")
    return hashlib.blake2b(described.encode(), digest_size=4).hexdigest()


def _structure(value: Any, depth: int = 0) -> str:
    torch = require_torch()
    if depth > 8:
        return type(value).__qualname__
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}{value.dtype}"
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_structure(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_structure(v, depth + 1) for v in value) + "]"
    if isinstance(value, (set, frozenset)):  # (its order follows each process's string hashing)
        return "{" + ",".join(sorted(_structure(v, depth + 1) for v in value)) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ",".join(f"{f.name}={_structure(getattr(value, f.name), depth + 1)}" for f in dataclasses.fields(value))
        return f"{type(value).__qualname__}({fields})"
    if callable(value):
        return str(getattr(value, "__qualname__", type(value).__qualname__))
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
        return repr(value)[:200]
    return type(value).__qualname__  # (another object's text may hold addresses, times or counts)


def owner(index: int, batches: int | None, world: Ranks) -> int:
    """The rank that runs batch ``index`` of ``batches`` (contiguous shares; one batch per rank in
    turn when the number is unknown)."""
    return index * world.size // batches if batches else index % world.size


def _sharded(function: Callable[..., Any], signature: inspect.Signature, arguments: dict[str, Any],
             spec: StreamSpec[Any], world: Ranks) -> Any:
    """The stream's batches split across the ranks: every rank reads every batch and runs its own
    (a contiguous share of a round), then the ranks exchange their per-batch results and each
    combines all of them in order, as one process running every batch would, to the same numbers.

    One round holds every batch, unless the stream's length is unknown or the check may stop early
    (``images="auto"``): then a round holds one batch per rank, and the stop is decided after each
    batch of the exchanged round, in order (a later batch of that round is dropped)."""
    __tracebackhide__ = True
    began = time.perf_counter()
    run = _ShardedRun(function, signature, arguments, spec, world)
    parts: list[Any] = []
    stopped = ""
    with carried_rows():
        for round_index in itertools.count():
            tag = f"{function.__qualname__} round {round_index} (arguments {run.called})"
            start, size = run.read, run.round_size()
            shares = exchange(tag, lambda: run.compute_round(start, size))
            same_models([models for _, _, models in shares])
            same_batches([read for _, read, _ in shares])
            for index, part in sorted(((i, part) for done, _, _ in shares for i, part in done), key=lambda p: p[0]):
                if isinstance(part, RankError):  # raised when one process would have reached that batch
                    raise run.failed.get(index) or part.exception(world.size, function.__qualname__)
                parts.append(part)
                stopped = "" if spec.stop is None else spec.stop(parts, arguments)
                if stopped:
                    break
            if stopped or run.ended or run.capped:
                break
    result = _finished(parts, arguments["inputs"], arguments, signature, spec, stopped,
                       run.seen if run.ended and not stopped else None)
    return _timed(result, time.perf_counter() - began)


def _timed(result: Any, seconds: float) -> Any:
    """``result`` with the check's wall time as its ``seconds`` (its parts' add up the ranks' times)."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type) \
            and any(field.name == "seconds" for field in dataclasses.fields(result)):
        return dataclasses.replace(result, seconds=seconds)
    return result


class _ShardedRun:
    """What one rank of :func:`_sharded` reads and computes, a round of batches at a time."""

    def __init__(self, function: Callable[..., Any], signature: inspect.Signature, arguments: dict[str, Any],
                 spec: StreamSpec[Any], world: Ranks) -> None:
        loader = arguments["inputs"]
        _check_loader(loader)
        self.function, self.signature, self.arguments, self.spec, self.world = function, signature, arguments, spec, world
        self.total = _length(loader)
        inner = loader.loader if isinstance(loader, Batches) else loader
        self.shards = len(inner) if isinstance(inner, _TensorShards) else None
        self.part = "batch" if self.shards is None else "shard"
        check_sampler(inner)
        self.blocks = self._blocks(inner)
        self.reader = _OwnBatches.of(loader, inner, self) or _AllBatches(chunks(loader, _device(arguments)))
        self.read = self.seen = 0  # batches and examples read
        self.ended = self.capped = False
        self.computed = -1  # the last batch this rank ran
        self.previous: tuple[int, Chunk, dict[str, Any]] | None = None  # the last batch read, with its call
        self.models = models_fingerprint(arguments) if world.size > 1 else ""  # one rank: nothing to compare
        self.failed: dict[int, Exception] = {}  # the batches of this rank that raised, by index
        self.called = call_digest(arguments)

    def _blocks(self, inner: Any) -> int | None:
        """How many batches the run will read: a tensor's shards up to a cap on the examples, a
        loader's length (None when it has none)."""
        if not isinstance(inner, _TensorShards) or self.spec.prepare is None:
            return self.total
        seen = 0
        for index, shard in enumerate(inner):
            if self.spec.prepare(self.arguments, seen) is None:
                return index
            seen += int(shard["inputs"].shape[0])
        return len(inner)

    def in_rounds(self) -> bool:
        """Whether the ranks take one batch each per round (an adaptive stop, or a cap in a loader)."""
        adaptive = self.spec.decides is not None and self.spec.decides(self.arguments)
        capped = self.shards is None and self.spec.caps is not None and self.spec.caps(self.arguments)
        return adaptive or capped

    def round_size(self) -> int:
        """Every batch at once when their number is known; one per rank with an adaptive stop, or a
        cap somewhere in a loader; :data:`UNKNOWN_ROUND` per rank when the number is unknown."""
        if self.in_rounds():
            return self.world.size
        if self.blocks is None:
            return self.world.size * UNKNOWN_ROUND
        return max(self.blocks - self.read, 1)

    def compute_round(self, start: int, size: int) -> tuple[list[tuple[int, Any]], list[tuple[int, float]], str]:
        """Read the batches ``start`` to ``start + size - 1`` and run this rank's share of them:
        the results of its batches, the checksum of every batch read (see :func:`same_batches`) and
        the models' fingerprint (:func:`same_models`)."""
        done: list[tuple[int, Any]] = []
        read: list[tuple[int, float]] = []
        for index in range(start, start + size):
            overrides = {} if self.spec.prepare is None else self.spec.prepare(self.arguments, self.seen)
            batch = None if overrides is None else self.reader.next(index)
            if batch is None:
                self.capped, self.ended = overrides is None, overrides is not None
                break
            examples, chunk = batch
            self.read, self.seen = index + 1, self.seen + examples
            if chunk is None:  # another rank's, not read here (see _OwnBatches)
                continue
            call = {**self.arguments, **_per_batch(self.arguments, chunk, index, self.total, self.signature),
                    **(overrides or {})}
            read.append((index, batch_checksum(chunk.inputs)))
            if owner(index - start, size, self.world) == self.world.rank:
                try:
                    self._carry_from(index)
                    part = _call(self.function, self.signature, call, chunk, index, self.part)
                except Exception as error:  # sent as the batch's part: a stop before it makes it moot
                    self.failed[index] = error
                    done.append((index, RankError.of(self.world.rank, error)))
                    break
                done.append((index, part if index == 0 else self.spec.slim(part)))
                self.computed = index
            self.previous = (index, chunk, call)
        if self.shards is not None and self.read >= (self.blocks or 0):  # a tensor's shards: known to the end
            self.capped, self.ended = self.read < self.shards, self.read >= self.shards
        return done, read, self.models

    def _carry_from(self, index: int) -> None:
        """Run the batch before ``index`` for its carried rows, if another rank ran it."""
        if not self.spec.carries or index == 0 or self.computed == index - 1 or self.previous is None:
            return
        _, chunk, call = self.previous
        with carrying_only():
            _call(self.function, self.signature, {**call, **({"progress": None} if "progress" in call else {})},
                  chunk, index - 1, self.part)


class _AllBatches:
    """Every batch of the stream, read in turn (each rank reads them all)."""

    def __init__(self, batches: Iterator[Chunk]) -> None:
        self.batches = batches

    def next(self, index: int) -> tuple[int, Chunk | None] | None:
        chunk = next(self.batches, None)
        return None if chunk is None else (int(chunk.inputs.shape[0]), chunk)


class _OwnBatches:
    """The batches of a ``DataLoader`` over a map-style dataset read in order (no shuffling): its
    batch sampler says which examples each batch holds, so a rank loads only its own batches and
    the one before its share (the carried rows' batch), and counts the others by their sizes."""

    def __init__(self, plan: list[list[int]], wanted: list[int], batches: Iterator[Chunk]) -> None:
        self.plan, self.wanted, self.batches = plan, set(wanted), batches

    @classmethod
    def of(cls, loader: Any, inner: Any, run: _ShardedRun) -> _OwnBatches | None:
        """The reader of ``inner`` when it can be loaded per rank (else None: every rank reads it
        all): a plain ``DataLoader`` (not a subclass, which may change its batches) over a
        map-style dataset, batched by a ``BatchSampler`` over a ``SequentialSampler`` (or a list of
        index lists) whose length is its number of batches, and a collate that gives one row per
        index. (A dataset that draws random numbers as it loads sees other draws per rank.)"""
        plan = _plan(inner, run.total)
        if plan is None or not _rows_per_index(loader, inner, plan, run):
            return None
        world, count = run.world, len(plan)
        own = [j for j in range(count) if (j % world.size if run.in_rounds() else owner(j, count, world)) == world.rank]
        carried = [j - 1 for j in own if run.spec.carries and j > 0 and j - 1 not in own]
        wanted = sorted({*own, *carried})
        first = list(itertools.accumulate((len(indices) for indices in plan), initial=0))
        stream = _loader_of(loader, inner, [plan[j] for j in wanted])
        return cls(plan, wanted, chunks(stream, _device(run.arguments), zip(wanted, [first[j] for j in wanted])))

    def next(self, index: int) -> tuple[int, Chunk | None] | None:
        if index >= len(self.plan):
            return None
        size = len(self.plan[index])
        if index not in self.wanted:
            return size, None
        chunk = next(self.batches)
        if int(chunk.inputs.shape[0]) != size:
            raise SaliencyUsageError(
                f"batch {index} of the inputs' DataLoader holds {int(chunk.inputs.shape[0])} examples, but its batch "
                f"sampler gave it {size}: its collate_fn changes the number of examples. Return one row per index.")
        return size, chunk


def _plan(inner: Any, total: int | None) -> list[list[int]] | None:
    """The index lists of the batches of a DataLoader :class:`_OwnBatches` can load per rank."""
    torch = require_torch()
    data = torch.utils.data
    if type(inner) is not data.DataLoader or isinstance(inner.dataset, data.IterableDataset):
        return None
    sampler = inner.batch_sampler
    in_order = isinstance(sampler, data.BatchSampler) and isinstance(sampler.sampler, data.SequentialSampler)
    if not (in_order or isinstance(sampler, (list, tuple))):
        return None  # (a random sampler would draw in another order than the loader's own iterator)
    plan = [list(indices) for indices in sampler]
    return plan if total == len(plan) else None


def _loader_of(loader: Any, inner: Any, batches: list[list[int]]) -> Any:
    """``inner`` over the given index lists only (its dataset, collate and workers), wrapped in
    ``loader``'s :class:`Batches` if it had one."""
    data = require_torch().utils.data
    workers = inner.num_workers
    mine = data.DataLoader(
        inner.dataset, batch_sampler=batches, collate_fn=inner.collate_fn, num_workers=workers,
        pin_memory=inner.pin_memory, timeout=inner.timeout, worker_init_fn=inner.worker_init_fn,
        multiprocessing_context=inner.multiprocessing_context, generator=inner.generator,
        prefetch_factor=inner.prefetch_factor if workers else None,
        persistent_workers=inner.persistent_workers if workers else False, pin_memory_device=inner.pin_memory_device)
    return dataclasses.replace(loader, loader=mine) if isinstance(loader, Batches) else mine


def _rows_per_index(loader: Any, inner: Any, plan: list[list[int]], run: _ShardedRun) -> bool:
    """Whether the collate gives one row per index (the default's does; another's first batch is
    loaded to see): the batch sizes are then known without loading the batches."""
    data = require_torch().utils.data
    if not plan or inner.collate_fn is data.default_collate:
        return True
    probe = data.DataLoader(inner.dataset, batch_sampler=plan[:1], collate_fn=inner.collate_fn)
    stream = dataclasses.replace(loader, loader=probe) if isinstance(loader, Batches) else probe
    chunk = next(chunks(stream, _device(run.arguments)), None)
    return chunk is not None and int(chunk.inputs.shape[0]) == len(plan[0])


def check_sampler(loader: Any) -> None:
    """Refuse a loader that gives each rank a part of the data itself (a ``DistributedSampler``):
    the check splits the batches across the ranks, and every rank must read all of them."""
    torch = require_torch()
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    if any(isinstance(s, torch.utils.data.distributed.DistributedSampler) for s in samplers):
        raise SaliencyUsageError(
            "the inputs' DataLoader has a DistributedSampler, which gives each rank a part of the data; a saliency "
            "check splits the batches across the ranks itself and every rank must read all of them. Pass a loader "
            "over the whole data set (no DistributedSampler, shuffle=False).")


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
          index: int, part: str = "batch") -> Any:
    """The check on one batch (``part``: "shard" for a tensor's shard), its usage errors naming it."""
    __tracebackhide__ = True
    bound = inspect.BoundArguments(signature, call)
    try:
        with examples_from(chunk.start):
            return function(*bound.args, **bound.kwargs)
    except SaliencyUsageError as error:
        n = int(chunk.inputs.shape[0])
        raise SaliencyUsageError(
            f"in {part} {index} of the inputs (examples {chunk.start} to {chunk.start + n - 1}): {error}") from None


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


__all__ = ["StreamSpec", "UNKNOWN_ROUND", "batch_checksum", "call_digest", "capped_images", "check_sampler", "has_example_rows", "models_fingerprint", "same_batches", "same_models", "owner", "streams", "tensor_shards", "tensor_size", "weighted_mean", "same_across_batches"]
