"""Several processes (torch.distributed ranks) running one check: the process group, whether a
check is sharded, and the exchange of what the ranks computed.

Under ``torchrun`` (or ``--saliency-devices``, which starts it), the plugin joins the process
group when the session starts (:func:`join`). Every rank runs the same tests; every saliency check
splits its examples' batches between the ranks (:mod:`pytest_saliency.checks.streaming` says how),
and the ranks then exchange their per-batch results (:func:`exchange`), so that every rank combines
the same numbers in the same order and reaches the same verdict. Only rank 0 writes reports and
baselines (:func:`is_main`).

A rank whose share fails sends its error instead of its results, and every rank fails the check
with it (the others with :class:`~pytest_saliency.exceptions.SaliencyRankFailed`, or the rank's
:class:`~pytest_saliency.exceptions.SaliencyUsageError`). A rank that never reaches the exchange
(it died, hangs, or runs another test) is waited for as long as the process group's timeout; then
every rank that waited fails the check with a :class:`~pytest_saliency.exceptions.SaliencyRankFailed`.

What travels between the ranks is serialized with ``torch.save`` in memory and read back only by
the ranks of this run (tensors that were on a GPU land on the receiving rank's GPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import io
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..exceptions import SaliencyRankFailed, SaliencyUsageError
from .torchtools import require_torch

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: Examples per shard when a check's inputs are one tensor: the same for any number of ranks, so
#: that the per-example numbers do not depend on it. ``--saliency-shard-size`` sets it.
DEFAULT_SHARD_SIZE = 32
SHARD_SIZE_VARIABLE = "PYTEST_SALIENCY_SHARD_SIZE"
#: Seconds a rank waits for the others at an exchange (``--saliency-timeout``).
DEFAULT_TIMEOUT = 1800.0

_UNSHARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("pytest_saliency_unsharded", default=False)
_JOINED: dict[str, Any] = {}  # what join() set up: {"device": torch.device, "timeout": float}


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's rank among ``size`` processes."""

    rank: int
    size: int


@dataclasses.dataclass(frozen=True)
class RankError:
    """What a rank sends instead of its results when its share failed."""

    rank: int
    kind: str
    message: str
    details: str
    usage: bool

    @classmethod
    def of(cls, rank: int, error: BaseException) -> RankError:
        """What rank ``rank`` sends of ``error`` (its traceback as text)."""
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls(rank, type(error).__name__, str(error), details[-4000:], isinstance(error, SaliencyUsageError))

    def exception(self, size: int, where: str) -> BaseException:
        """The error the other ranks raise: the rank's usage error, its pytest outcome (a skip, an
        xfail) or Ctrl-C as such, or a :class:`SaliencyRankFailed` with its traceback."""
        if self.usage:
            return SaliencyUsageError(f"on rank {self.rank} of {size}: {self.message}")
        outcome = _outcomes().get(self.kind)
        if outcome is not None:
            return outcome(f"on rank {self.rank} of {size}: {self.message}")
        return SaliencyRankFailed(
            f"rank {self.rank} of {size} failed with {self.kind}: {self.message} (in {where}); every rank fails the "
            f"check with it. Its traceback:\n{self.details}")


def _outcomes() -> dict[str, Callable[[str], BaseException]]:
    """The BaseExceptions a rank's share may end with that the others raise as such."""
    import pytest

    return {"Skipped": pytest.skip.Exception, "XFailed": pytest.xfail.Exception, "Failed": pytest.fail.Exception,
            "KeyboardInterrupt": KeyboardInterrupt}


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def join(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)
    for ``device``: gloo for the CPU, and NCCL as well on a GPU. False when this process was not
    launched so, or a process group exists already (the user's: used as it is)."""
    torch = require_torch()
    dist = torch.distributed
    if not launched() or not dist.is_available():
        return False
    if dist.is_initialized():
        _JOINED.update(device=device, timeout=timeout, owned=False)
        return True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _JOINED.update(device=device, timeout=timeout, owned=True)
    return True


def leave() -> None:
    """Leave the process group :func:`join` made (one the user made is left alone)."""
    torch = require_torch()
    if _JOINED.pop("owned", False) and torch.distributed.is_initialized() and not _JOINED.get("broken"):
        torch.distributed.destroy_process_group()  # (a broken group may hang in its teardown: left to the exit)
    _JOINED.clear()


def ranks() -> Ranks | None:
    """This process's rank when checks are sharded: inside a process group, outside
    :func:`unsharded`. None otherwise (every check runs whole)."""
    if _UNSHARDED.get():
        return None
    torch = require_torch()
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Whether this process writes reports and baselines: rank 0, or a process with no group."""
    if not launched():
        return True
    torch = sys.modules.get("torch")  # not imported here: the plugin asks before any check runs
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return bool(dist.get_rank() == 0)
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Run the checks of the block whole on this rank, as without a process group (the checks a
    sharded check runs for one of its batches, or a user's check meant for one rank only)."""
    token = _UNSHARDED.set(True)
    try:
        yield
    finally:
        _UNSHARDED.reset(token)


def shard_size() -> int:
    """Examples per shard of a tensor of inputs (:data:`DEFAULT_SHARD_SIZE`, or the environment's
    ``PYTEST_SALIENCY_SHARD_SIZE`` that ``--saliency-shard-size`` sets)."""
    raw = os.environ.get(SHARD_SIZE_VARIABLE, "")
    try:
        size = int(raw) if raw.strip() else DEFAULT_SHARD_SIZE
    except ValueError:
        raise SaliencyUsageError(
            f"{SHARD_SIZE_VARIABLE}={raw!r} is not a number of examples; set it to a positive integer "
            f"(e.g. {DEFAULT_SHARD_SIZE}) or unset it.") from None
    if size < 1:
        raise SaliencyUsageError(f"{SHARD_SIZE_VARIABLE}={raw!r}: a shard needs at least one example.")
    return size


def exchange(tag: str, work: Callable[[], T]) -> list[T]:
    """Run ``work`` on this rank and return every rank's result, in rank order, on every rank.

    ``tag`` names what the ranks are doing (the check); the test running and the number of the
    exchange within it are added, and ranks that send different tags are out of step: every rank
    fails. If ``work`` raised on any rank, every rank raises: the rank that failed its own
    exception, the others that rank's error (the lowest rank's when several failed).

    Ranks out of step, or an exchange that failed (a timeout, a rank gone), leave the process
    group unusable: every later exchange of the session fails at once with that first cause
    (:func:`broken`), and the plugin stops the session."""
    world = ranks()
    if world is None:
        return [work()]
    if _JOINED.get("broken"):
        raise SaliencyRankFailed(
            f"the ranks lost contact or step earlier in this session, so no saliency check can be split across them "
            f"any more: "
            f"{_JOINED['broken']}")
    tag = _numbered(tag)
    error: BaseException | None = None
    try:
        payload: Any = ("ok", _pack(work()))
    except BaseException as caught:  # a pytest outcome or Ctrl-C too: sent to the other ranks, then raised here
        error = caught
        payload = ("error", RankError.of(world.rank, caught))
    gathered = _all_gather(world, (tag, payload))
    _check_in_step(tag, gathered)
    failures = [sent for _, (status, sent) in gathered if status == "error"]
    if failures:
        if error is not None and failures[0].rank == world.rank:
            raise error
        raise failures[0].exception(world.size, tag)
    device = _JOINED.get("device")
    return [_unpack(sent, device) for _, (_, sent) in gathered]


def broken() -> str:
    """Why the ranks can no longer exchange results ("" while they can): see :func:`exchange`."""
    return str(_JOINED.get("broken", ""))


def _numbered(tag: str) -> str:
    """``tag`` with the test running and the number of this exchange within it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    counts = _JOINED.setdefault("counts", {})
    counts[test] = counts.get(test, 0) + 1
    return f"{test}: {tag} #{counts[test]}" if test else f"{tag} #{counts[test]}"


def _all_gather(world: Ranks, payload: Any) -> list[Any]:
    torch = require_torch()
    gathered: list[Any] = [None] * world.size
    try:
        torch.distributed.all_gather_object(gathered, payload)
    except Exception as error:  # a timeout, or a rank's process is gone
        timeout = _JOINED.get("timeout", DEFAULT_TIMEOUT)
        message = (
            f"rank {world.rank} of {world.size} got no answer from every rank while exchanging the results of "
            f"{payload[0]} (waited up to {timeout:g} s, the process group's timeout, --saliency-timeout): a rank "
            f"died, hangs, or is running another test; see the other ranks' output (a rank that is only slow "
            f"needs a larger --saliency-timeout). {type(error).__name__}: "
            f"{str(error)[:400]}")
        _JOINED["broken"] = message
        raise SaliencyRankFailed(message) from None
    return gathered


def _check_in_step(tag: str, gathered: list[Any]) -> None:
    tags = [sent_tag for sent_tag, _ in gathered]
    if len(set(tags)) > 1:
        listed = "; ".join(f"rank {rank}: {name}" for rank, name in enumerate(tags))
        message = (
            f"the ranks are out of step: they exchanged the results of different checks ({listed}). Every rank must "
            "run the same saliency checks in the same order: run the same command on every rank, and do not let "
            "a test run saliency checks on some ranks only (wrap such a check in pytest_saliency.unsharded()).")
        _JOINED["broken"] = message
        raise SaliencyRankFailed(message)


def _pack(value: Any) -> bytes:
    torch = require_torch()
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpack(data: bytes, device: Any) -> Any:
    """Read back what a rank of this run packed: its GPU tensors onto this rank's device."""
    torch = require_torch()

    def place(storage: Any, location: str) -> Any:
        if location.startswith("cuda") and device is not None and getattr(device, "type", "") == "cuda":
            return storage.cuda(device)
        return storage

    # Results are objects (check results, their figures' context), which weights_only refuses. The
    # bytes come only from the ranks of this run, over the process group, as torch's own
    # all_gather_object (which unpickles the envelope) gets them; never from a file.
    return torch.load(io.BytesIO(data), map_location=place, weights_only=False)


__all__ = ["DEFAULT_SHARD_SIZE", "DEFAULT_TIMEOUT", "RankError", "Ranks", "SHARD_SIZE_VARIABLE", "broken", "exchange",
           "is_main", "join", "launched", "leave", "local_rank", "ranks", "shard_size", "unsharded"]
