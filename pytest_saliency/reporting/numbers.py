"""How a score or a threshold is written for people: one format for the terminal and the HTML.

Every result's ``summary()`` and the HTML report write their numbers with these functions, so the
same score reads the same everywhere (``0.1016`` in the terminal and in the report, never
``0.101562`` in one and ``0.1016`` in the other).

- :func:`format_score`: a measured value. Four decimals (``0.1016``, ``1.0000``, ``-0.0420``): a
  fixed number of decimals lines up in tables and is finer than any gate. A value too small for
  that (``0 < |x| < 0.001``) is written in scientific notation with three significant digits
  (``2.35e-05``) so that it does not read as zero; a very large one (``|x| >= 1e5``) as ``1.235e+05``.
  ``None`` and NaN are ``n/a``; infinities ``inf`` / ``-inf``.
- :func:`format_threshold`: a limit someone chose (``0.5``, ``0.85``, ``0.025``): up to four
  significant digits with no trailing zeros, as it was typed.

Torch-free: this module imports only the standard library.
"""

from __future__ import annotations

import math
from typing import Any

#: Decimals of a score: fixed, so that scores line up in tables.
SCORE_DECIMALS = 4


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_score(value: Any, decimals: int = SCORE_DECIMALS) -> str:
    """A measured value as people read it: ``0.1016``; ``2.35e-05`` when tiny; ``n/a`` when undefined.

    An int is written as is (``12``); anything that is not a number as ``str(value)``.
    """
    special = _not_a_float(value)
    if special is not None:
        return special
    number = float(value)
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    size = abs(number)
    if size >= 1e5 or (0 < size < 10.0 ** -(decimals - 1)):
        return f"{number:.{decimals}g}" if size >= 1e5 else f"{number:.2e}"
    return f"{number:.{decimals}f}"


def format_threshold(value: Any) -> str:
    """A chosen limit as it was typed: ``0.5``, ``0.85``, ``0.025``, ``1e-06``; ``n/a`` for ``None``."""
    special = _not_a_float(value)
    return special if special is not None else f"{float(value):.4g}"


def _not_a_float(value: Any) -> str | None:
    """The text of a value that is not a finite-or-infinite float to format: an int as is, ``n/a``
    for None and NaN, anything else that is not a number as ``str(value)``; None for the rest."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = _number(value)
    if number is None:
        return "n/a" if value is None else str(value)
    return "n/a" if math.isnan(number) else None




#: How a layer or parameter owned by the root module (its name is ``""`` in ``named_modules()``)
#: is shown: an empty name would read as a missing one.
ROOT_NAME = "(model)"


def layer_label(name: Any) -> str:
    """A layer or parameter name as people read it: ``"(model)"`` for the root module's ``""``
    (a parameter of the root, e.g. ``".weight"``, reads ``"(model).weight"``)."""
    text = "" if name is None else str(name)
    if not text:
        return ROOT_NAME
    return ROOT_NAME + text if text.startswith(".") else text


__all__ = ["ROOT_NAME", "SCORE_DECIMALS", "format_score", "format_threshold", "layer_label"]
