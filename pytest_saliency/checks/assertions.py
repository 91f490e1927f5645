"""``assert_*`` helpers: run a check, return its result when it passes, raise when it fails.

They work without pytest (plain scripts, notebooks) and inside it; ``__tracebackhide__`` makes
pytest's traceback end at the user's call line rather than inside this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..core.forward import passes_model_call
from ..core.integrity import rng_isolated
from ..core.torchtools import require_torch
from ..exceptions import SaliencyUsageError, raise_if_failed
from ..maps.methods import Explainer
from ..reporting.protocol import CheckResult
from .randomization import RandomizationResult, layer_randomization

if TYPE_CHECKING:
    import torch
    from torch.nn import Module

    from ..core.stream import Inputs
    from .agreement import AgreementResult

R = TypeVar("R", bound=CheckResult)


@rng_isolated
@passes_model_call
def assert_sensitive_to_layer_randomization(
    model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency", **options: Any
) -> RandomizationResult:
    """Independent parameter randomization (IPR): the maps must change when any layer is randomized.

    Passes when S^I >= ``sensitivity_threshold`` (default 0.01, Sriram & Conati's Definition 3).
    Options are those of :func:`pytest_saliency.layer_randomization` plus the method's own
    hyperparameters. Raises :class:`SaliencyCheckFailed` with the per-layer table otherwise.
    """
    __tracebackhide__ = True
    return raise_if_failed(layer_randomization(model, inputs, method, mode="independent", **options))


@rng_isolated
@passes_model_call
def assert_sensitive_to_cascading_randomization(
    model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency", **options: Any
) -> RandomizationResult:
    """Cascading parameter randomization (CPR), top-down by default (``order="bottom_up"`` for the reverse)."""
    __tracebackhide__ = True
    return raise_if_failed(layer_randomization(model, inputs, method, mode="cascading", **options))


@rng_isolated
@passes_model_call
def assert_agreement_above(
    model: torch.nn.Module | torch.Tensor,
    inputs: Inputs,
    methods: Sequence[str | Explainer] = ("saliency", "integrated_gradients"),
    metric: str = "feature_agreement",
    k: float | int = 0.1,
    threshold: float | None = None,
    *,
    statistic: str = "mean",
    **options: Any,
) -> AgreementResult:
    """Every pair of ``methods`` must agree: the mean (or, with ``statistic="bound"``, the lower
    confidence bound) of ``metric`` above ``threshold`` (below it for distances and angles).

    ``threshold=None`` means "better than chance": the lower confidence bound must beat the
    stricter of the metric's theoretical chance level (k/D for feature agreement) and the chance
    level measured on maps of different inputs (each pair's ``chance``; see
    :mod:`pytest_saliency.checks.agreement`). Metrics without a theoretical chance level (SSIM) need an
    explicit threshold. Images with a constant map are left out of the ranking metrics, and a
    pair with none left fails the check.

    ``inputs`` may be an iterable of batches (a ``DataLoader``, see
    :mod:`pytest_saliency.checks.streaming`): the gate then holds on every image of every batch.
    Precomputed maps work too: ``assert_agreement_above(maps_a, maps_b, metric="ssim",
    threshold=0.5)`` compares two tensors of attributions directly (``names=("a", "b")`` labels them).
    """
    __tracebackhide__ = True
    from ..compare.metrics import metric_info
    from ..core.validation import check_choice
    from .agreement import agreement_matrix, compare_maps

    torch = require_torch()
    info = metric_info(metric)
    check_choice(statistic, "statistic", ("mean", "bound"),
                 "'mean' gates on the mean over images, 'bound' on its confidence bound.")
    if threshold is None:
        if not info.takes_k and info.chance(None, None) is None:
            raise SaliencyUsageError(
                f"{metric} has no chance level to beat by default; pass threshold= (e.g. threshold=0.5 for ssim)."
            )
        statistic = "bound"
    if isinstance(model, torch.Tensor) and isinstance(inputs, torch.Tensor):
        names = options.pop("names", ("maps_a", "maps_b"))
        if (isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != 2
                or not all(isinstance(n, str) for n in names) or names[0] == names[1]):
            raise SaliencyUsageError(
                f"names must be two different strings labelling the two batches of maps, e.g. "
                f"names=('mine', 'theirs'), got {names!r:.80}."
            )
        reproduce = options.pop("reproduce", "")
        result = compare_maps(dict(zip(names, (model, inputs))), [metric], k=k, statistic=statistic,
                              threshold=threshold, **options)
        result.reproduce = reproduce
    elif isinstance(model, torch.Tensor):
        raise SaliencyUsageError(
            f"precomputed maps are compared as two tensors of attributions, but the second is a "
            f"{type(inputs).__name__}. Concatenate each method's maps into one (N, ...) tensor (maps are small), "
            "or pass the model and the inputs (a DataLoader works) to explain them batch by batch."
        )
    else:  # (a model that is not a module is refused there, with a message that says so)
        result = agreement_matrix(cast("Module", model), inputs, methods, [metric], k=k, statistic=statistic,
                                  threshold=threshold, **options)
    if threshold is None:
        result.threshold = result.pairs[0].chance_theory  # the same for every pair of one metric
        result.beat_chance = True
    return raise_if_failed(result)
