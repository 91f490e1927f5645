"""Exceptions and warnings raised by pytest-saliency.

Kept free of torch so the pytest plugin can import them at collection time.
"""

from __future__ import annotations

from types import FrameType
from typing import Any, Protocol, TypeVar


class Verdict(Protocol):
    """What :func:`raise_if_failed` reads of a check result (the whole protocol is
    :class:`pytest_saliency.reporting.protocol.CheckResult`)."""

    @property
    def passed(self) -> bool: ...

    def failure_message(self) -> str: ...


R = TypeVar("R", bound=Verdict)


class SaliencyUsageError(ValueError):
    """The caller passed something the checks cannot work with.

    The message always says what was wrong, what was expected, and how to fix it.
    It is a ``ValueError`` so code that guards generic bad input still catches it.
    Public entry points raise it with a short traceback (the caller's line and the message); an
    error it wraps (``__cause__``: the model or a factory failed) keeps the frames of the user's
    code only. See :func:`pytest_saliency.core.integrity.short_usage_errors`.
    """


class SaliencyCheckFailed(AssertionError):
    """A saliency sanity check ran and its verdict is "fail".

    Subclasses ``AssertionError`` so pytest reports it as a test failure (not an
    error) and plain ``assert``-style tooling treats it the same way. The full
    result object is attached as ``.result``.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class SaliencyRankFailed(RuntimeError):
    """Another rank of a distributed run (torchrun) failed its share of a check, or the ranks lost
    step: every rank fails the check with the failing rank's error, instead of waiting forever.
    See :mod:`pytest_saliency.core.distributed`."""


class SaliencyWarning(UserWarning):
    """A check ran, but the numbers are likely to mislead (e.g. a sign metric on non-negative maps)."""


def warn_user(message: str, category: type[Warning] = SaliencyWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside pytest-saliency (the user's test or
    script), however deep in the library the warning is raised: a fixed ``stacklevel`` points into
    the library when a public function is wrapped or called by another one."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def raise_if_failed(result: R) -> R:
    """``result`` when it passed; otherwise raise :class:`SaliencyCheckFailed` with its failure
    message (what the ``assert_*`` functions do with the result of their check)."""
    __tracebackhide__ = True
    if not result.passed:
        raise SaliencyCheckFailed(result.failure_message(), result)
    return result
