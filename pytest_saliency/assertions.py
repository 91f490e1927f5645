"""``assert_*`` helpers: run a check, return its result when it passes, raise when it fails.

They work without pytest (plain scripts, notebooks) and inside it; ``__tracebackhide__`` makes
pytest's traceback end at the user's call line rather than inside this package.
"""

from __future__ import annotations

from typing import Any

from .exceptions import SaliencyCheckFailed
from .parameter_randomization import RandomizationResult, layer_randomization


def _raise_if_failed(result: Any) -> Any:
    __tracebackhide__ = True
    if not result.passed:
        raise SaliencyCheckFailed(result.failure_message(), result)
    return result


def assert_sensitive_to_layer_randomization(
    model: Any, inputs: Any, method: Any = "saliency", **options: Any
) -> RandomizationResult:
    """Independent parameter randomization (IPR): the maps must change when any layer is randomized.

    Passes when S^I >= ``sensitivity_threshold`` (default 0.01, Sriram & Conati's Definition 3).
    Options are those of :func:`pytest_saliency.layer_randomization` plus the method's own
    hyperparameters. Raises :class:`SaliencyCheckFailed` with the per-layer table otherwise.
    """
    __tracebackhide__ = True
    return _raise_if_failed(layer_randomization(model, inputs, method, mode="independent", **options))


def assert_sensitive_to_cascading_randomization(
    model: Any, inputs: Any, method: Any = "saliency", **options: Any
) -> RandomizationResult:
    """Cascading parameter randomization (CPR), top-down by default (``order="bottom_up"`` for the reverse)."""
    __tracebackhide__ = True
    return _raise_if_failed(layer_randomization(model, inputs, method, mode="cascading", **options))
