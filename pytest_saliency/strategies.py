"""Hypothesis strategies over attribution hyperparameters: let hypothesis find the least stable setting.

::

    from hypothesis import given, settings
    from pytest_saliency import assert_stable_under_hyperparameters
    from pytest_saliency.strategies import saliency_hyperparameters

    @settings(max_examples=20, deadline=None)   # explanations take longer than hypothesis' 200 ms deadline
    @given(params=saliency_hyperparameters("integrated_gradients"))
    def test_ig_is_stable(params):
        assert_stable_under_hyperparameters(model, images, "integrated_gradients", sweep=[params], threshold=0.8)

``sweep=[params]`` compares the whole drawn setting (all its hyperparameters changed at once)
with the reference (the method's defaults, or ``reference=``). On a failure hypothesis shrinks
the setting towards the cheapest, simplest values (fewest steps or samples, the first listed
choice) and prints the falsifying example; the :class:`SaliencyCheckFailed` message names the
same setting, its similarity and the threshold.

Every dict drawn holds only options that :func:`pytest_saliency.explain` accepts for that method
(``explain(model, x, method, **params)`` works), with bounds kept moderate so that one example
costs about as much as one or two default explanations. Options that only trade memory for
speed (``perturbations_per_eval``, ``internal_batch_size``, ...) are never drawn: they do not
change the maps. hypothesis is a test dependency: it is imported only when a strategy is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .exceptions import SaliencyUsageError

#: Shrinking goes to the first element of each choice list, so the most common setting is first.
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
GRADCAM_INTERPOLATION = ("bilinear", "nearest", "bicubic")
STOCHASTIC = ("smoothgrad", "gradient_shap", "lime", "kernel_shap")


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies
    except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without hypothesis
        raise ModuleNotFoundError(
            "pytest_saliency.strategies needs hypothesis, a test dependency: `pip install hypothesis` "
            "(or `pip install pytest-saliency[test]`)."
        ) from exc
    return strategies


def _spatial(input_shape: Sequence[int] | None) -> tuple[int, int]:
    """The (H, W) the bounds are scaled to; 32x32 when not given."""
    if input_shape is None:
        return 32, 32
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) < 2 or min(shape[-2:]) < 1:
        raise SaliencyUsageError(
            f"input_shape must end in (H, W) (e.g. inputs.shape for (N, C, H, W) images), got {input_shape!r}."
        )
    return shape[-2], shape[-1]


def saliency_hyperparameters(
    method: str, input_shape: Sequence[int] | None = None, *, include_seed: bool = False
) -> Any:
    """A hypothesis strategy of dicts of valid hyperparameters for the named ``method``.

    Args:
        method: a name from :data:`pytest_saliency.maps.methods.METHODS`.
        input_shape: ``inputs.shape``; window and grid sizes are bounded by the image size
            (occlusion windows up to a quarter of the smaller side, superpixel grids up to 16 or
            the side). ``None`` assumes 32x32.
        include_seed: also draw ``seed`` (0..1000) for stochastic methods; it is passed to
            :func:`explain` and :func:`hyperparameter_sweep` like any hyperparameter.

    Bounds (inclusive): integrated_gradients ``n_steps`` 2-64 and the integration rule
    (gausslegendre first, so shrinking keeps captum's default);
    smoothgrad ``nt_samples`` 1-32, ``noise_level`` 0-0.5; gradient_shap ``n_samples`` 1-32,
    ``n_baselines`` 1-10, ``stdevs`` 0-0.3; occlusion ``window`` 1-side/4, ``stride`` 1-window;
    lime ``n_samples`` 10-200, ``grid`` 2-16, ``alpha`` 1e-4-0.1; kernel_shap ``n_samples``
    10-200, ``grid`` 2-16; feature_ablation ``grid`` 2-16; gradcam ``relu_attributions`` and the
    upsampling mode; saliency ``abs``. Methods without hyperparameters (input_x_gradient,
    guided_backprop, deconvolution, guided_gradcam, deeplift) give ``{}``.
    """
    from .maps.methods import METHODS

    st = _hypothesis()
    if not isinstance(method, str) or method not in METHODS:
        from .core.validation import unknown_choice

        raise unknown_choice(
            "method", method, METHODS,
            "Strategies exist for named methods only; for a custom explainer build one with "
            "hypothesis.strategies.fixed_dictionaries.",
        )
    h, w = _spatial(input_shape)
    side = min(h, w)
    max_grid = max(2, min(16, side))
    real = {"allow_nan": False, "allow_infinity": False}
    fields: dict[str, Any]
    if method == "saliency":
        fields = {"abs": st.booleans()}
    elif method == "integrated_gradients":
        fields = {"n_steps": st.integers(2, 64), _ig_rule_option(): st.sampled_from(IG_RULES)}
    elif method == "smoothgrad":
        fields = {"nt_samples": st.integers(1, 32), "noise_level": st.floats(0.0, 0.5, **real)}
    elif method == "gradient_shap":
        fields = {
            "n_samples": st.integers(1, 32), "n_baselines": st.integers(1, 10), "stdevs": st.floats(0.0, 0.3, **real),
        }
    elif method == "gradcam":
        fields = {"relu_attributions": st.booleans(), "interpolate_mode": st.sampled_from(GRADCAM_INTERPOLATION)}
    elif method == "occlusion":
        max_window = max(1, side // 4)
        strategy = st.integers(1, max_window).flatmap(
            lambda window: st.fixed_dictionaries({"window": st.just(window), "stride": st.integers(1, window)})
        )
        return _with_seed(st, strategy, method, include_seed)
    elif method == "lime":
        fields = {
            "n_samples": st.integers(10, 200), "grid": st.integers(2, max_grid), "alpha": st.floats(1e-4, 0.1, **real),
        }
    elif method == "kernel_shap":
        fields = {"n_samples": st.integers(10, 200), "grid": st.integers(2, max_grid)}
    elif method == "feature_ablation":
        fields = {"grid": st.integers(2, max_grid)}
    else:
        fields = {}
    return _with_seed(st, st.fixed_dictionaries(fields), method, include_seed)


def _ig_rule_option() -> str:
    """The name of integrated gradients' integration-rule option: captum's ``method``.

    ``explain(model, x, "integrated_gradients", method=...)`` collides with explain's own ``method``
    parameter; where the option is renamed ``integration_method`` the strategy follows the rename.
    ``hyperparameter_sweep(..., sweep=[params])`` accepts either spelling.
    """
    from .maps.methods import METHODS

    defaults = METHODS["integrated_gradients"].defaults
    return "integration_method" if "integration_method" in defaults else "method"


def _with_seed(st: Any, strategy: Any, method: str, include_seed: bool) -> Any:
    if not include_seed or method not in STOCHASTIC:
        return strategy
    return st.tuples(strategy, st.integers(0, 1000)).map(lambda pair: {**pair[0], "seed": pair[1]})


__all__ = ["saliency_hyperparameters"]
