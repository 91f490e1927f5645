"""The protocol every check result implements: what the plugin, the reports and the figures read.

A check returns a result object (``RandomizationResult``, ``AgreementResult``, ``SweepResult``...).
Everything outside the check reads it through :class:`CheckResult` and nothing else: the
``saliency`` fixture records ``passed``, ``summary()`` and ``numbers()`` (terminal summary, JUnit
properties) and raises with ``failure_message()``; :mod:`pytest_saliency.reporting.report`
stores ``to_dict()``, ``report()`` and ``numbers()`` in the report entry and renders
``figures()``. A result class needs no base class: implementing the members is enough
(:class:`typing.Protocol` is structural), and a user's own result gets into the reports, with its
pictures, the same way.

Torch-free: this module imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

#: One headline number (or label) of a result: what fits a JUnit property or a terminal line.
Number = float | int | str | bool | None

#: A figure a result can draw: ``(name, render)``. ``name`` is a file-name-safe stem (it names
#: the PNG file and the HTML caption); ``render()`` draws it and returns PNG bytes. Rendering is
#: lazy: listing a result's figures costs nothing, and a figure that cannot be drawn costs only
#: itself (the report notes why and keeps the others).
Figure = tuple[str, Callable[[], bytes]]

#: The members of :class:`CheckResult`, in the order the protocol documents them.
MEMBERS = ("check", "passed", "numbers", "to_dict", "summary", "report", "failure_message", "figures")


@runtime_checkable
class CheckResult(Protocol):
    """The outcome of one saliency check, as the plugin and the reports read it.

    ``isinstance(result, CheckResult)`` tells whether an object has every member (it does not
    check their types; the type checker does).
    """

    @property
    def check(self) -> str:
        """The check's kind, e.g. ``independent_layer_randomization`` or ``method_agreement``.

        It groups results in the terminal summary and the HTML report, names the JUnit
        properties (``saliency.<check>.<number>``) and the figure folders.
        """
        ...

    @property
    def passed(self) -> bool:
        """The verdict. A measurement with no gate (no threshold) passes; its ``summary()``
        then begins with ``REPORT`` and the HTML report shows it as such."""
        ...

    def numbers(self) -> dict[str, Number]:
        """The headline numbers as a flat ``{name: value}`` dict of scalars: the score and its
        threshold, the number of images, the seed, the method and preset... what a JUnit
        property or a one-line summary shows. The verdict itself is ``passed``, not one of them.
        A value that does not apply is ``None``; a float may be NaN (an undefined score)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The whole result as a JSON-serializable document (the report entry's ``result``):
        every number behind the verdict. An optional string ``status`` refines the verdict
        (a baseline ``written`` or ``updated``); the HTML report shows it as a badge."""
        ...

    def summary(self) -> str:
        """One line: the verdict (``PASS``, ``FAIL``, or ``REPORT`` for a measurement with no
        gate), the check, the key number against its threshold, the number of images."""
        ...

    def report(self) -> str:
        """The full human-readable account: settings, the per-layer, per-pair or per-value
        table, and how to reproduce the run. Failure messages embed it."""
        ...

    def failure_message(self) -> str:
        """The message a failing check raises: what failed, ``report()``, and what to do next.
        For a result that cannot fail (a measurement) it is its summary and report."""
        ...

    def figures(self) -> list[Figure]:
        """The pictures of this result, as ``(name, render)`` pairs rendered lazily (see
        :data:`Figure`); an empty list when the result has none. The check modules pass their
        own fields to the drawing functions of :mod:`pytest_saliency.reporting.figures`."""
        ...


def missing_members(result: object) -> list[str]:
    """The members of :class:`CheckResult` that ``result`` lacks (empty when it implements it)."""
    return [name for name in MEMBERS if not hasattr(result, name)]


__all__ = ["CheckResult", "Figure", "MEMBERS", "Number", "missing_members"]
