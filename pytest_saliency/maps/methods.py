"""The attribution methods by name: what each one is (:data:`METHODS`), which options it takes, and
the facts about a method that do not need captum: whether it draws random numbers, the seed of
each image's draws, SmoothGrad's noise scale, occlusion's windows.


**Seeds, per image.** Methods that draw random numbers (smoothgrad, gradient_shap, lime,
kernel_shap, and any method with ``baselines="uniform"``: see :func:`draws_random`) explain one
image at a time, with every generator seeded from :func:`image_seed` (``seed``, the image's index
in the user's inputs and the method's sample counts), so an image's map never depends on
``batch_size``, the memory budget's chunks or the other images of its batch.
meaningful_perturbation keeps the promise its own way: each image's random start comes from its
own generator seeded with :func:`image_seed`, and its masks are optimized one image at a time on
the CPU (a chunk together, each from its own image's loss, on an accelerator).
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.rng import derive_seed
from ..core.stream import example_offset
from ..core.validation import unknown_choice

if TYPE_CHECKING:
    import torch

#: A user's explainer: ``(model, inputs, target) -> attributions``.
Explainer = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class MethodSpec:
    """What a named method is and which defaults it runs with."""

    name: str
    captum: str
    defaults: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    layer_based: bool = False
    signed: bool = True
    note: str = ""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("saliency", "Saliency", {"abs": False}, note="plain (signed) gradient of the target logit"),
        MethodSpec("input_x_gradient", "InputXGradient"),
        MethodSpec(
            "integrated_gradients", "IntegratedGradients",
            {"n_steps": 50, "baselines": "zero", "integration_method": "gausslegendre", "internal_batch_size": None},
            note="zero (black) baseline as in Sriram & Conati",
        ),
        MethodSpec(
            "smoothgrad", "NoiseTunnel(Saliency)",
            {"nt_samples": 50, "noise_level": 0.15, "nt_samples_batch_size": None},
            stochastic=True,
            note="noise std = noise_level * (max - min) of each image, as in SAM and Adebayo et al.",
        ),
        MethodSpec("guided_backprop", "GuidedBackprop"),
        MethodSpec("deconvolution", "Deconvolution"),
        MethodSpec(
            "gradcam", "LayerGradCam", {"layer": None, "relu_attributions": True, "interpolate_mode": "bilinear"},
            layer_based=True, signed=False, note="last Conv2d unless layer= is given; upsampled to the input",
        ),
        MethodSpec("guided_gradcam", "GuidedGradCam", {"layer": None}, layer_based=True),
        MethodSpec("deeplift", "DeepLift", {"baselines": "zero"}),
        MethodSpec(
            "gradient_shap", "GradientShap", {"n_samples": 20, "n_baselines": 10, "stdevs": 0.0},
            stochastic=True, note="baselines: zero plus n_baselines-1 uniform draws over each image's range",
        ),
        MethodSpec(
            "occlusion", "Occlusion", {"window": None, "stride": None, "baselines": 0.0, "perturbations_per_eval": None},
            signed=True, note="square window of 1/8 of the smaller side (at least 2 px), stride half the window",
        ),
        MethodSpec(
            "lime", "Lime", {"n_samples": 200, "grid": 8, "perturbations_per_eval": None, "alpha": 0.01},
            stochastic=True,
            note="features: a grid x grid superpixel grid; captum's default Lasso surrogate (alpha=0.01); "
            "a model whose outputs barely move under perturbation gets all-zero maps: lower alpha",
        ),
        MethodSpec(
            "kernel_shap", "KernelShap", {"n_samples": 200, "grid": 8, "perturbations_per_eval": None},
            stochastic=True, note="features: a grid x grid superpixel grid",
        ),
        MethodSpec(
            "meaningful_perturbation", "(own optimizer: pytest_saliency.maps.meaningful_perturbation)",
            {"n_iter": 300, "blur_radius": None, "mask_size": None, "init": "random", "learning_rate": 0.1,
             "l1_coeff": 1e-4, "tv_coeff": 1e-2, "tv_beta": 3.0},
            stochastic=True, signed=False,
            note="Fong & Vedaldi's blur mask as SAM's code: n_iter Adam steps on a mask_size grid (None: 28 cells "
            "on 224 px, scaled), blur sigma blur_radius px (None: 10 px on 224 px, scaled); init 'random' (seeded "
            "per image) or 'circular' (draws nothing); maps 1 - m in [0, 1], (N, 1, H, W); images only",
        ),
        MethodSpec(
            "deep_lift_shap", "DeepLiftShap", {"background": None},
            note="DeepLIFT averaged over a background set: background= a tensor (B, *input shape), B >= 2, shared "
            "by all inputs; None: per image, a zero image and its Gaussian blur (sigma 1/16 of the smaller side; "
            "images only)",
        ),
        MethodSpec(
            "feature_ablation", "FeatureAblation", {"grid": 8, "baselines": 0.0, "perturbations_per_eval": None},
            note="features: a grid x grid superpixel grid, replaced by the baseline",
        ),
    ]
}


#: Options accepted on top of the documented defaults (they have no default value); every named
#: method also accepts memory_budget (see :func:`pytest_saliency.maps.batching.auto_batching`).
EXTRA_OPTIONS = {
    "smoothgrad": ("stdevs", "input_range"),
    "lime": ("feature_mask",),
    "kernel_shap": ("feature_mask",),
    "feature_ablation": ("feature_mask",),
}


def method_name(method: str | Explainer) -> str:
    """A printable name for a method name or a user callable."""
    if isinstance(method, str):
        return method
    return getattr(method, "__name__", None) or type(method).__name__


def resolve_method(method: str | Explainer) -> MethodSpec | Explainer:
    if callable(method) and not isinstance(method, str):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise unknown_choice(
        "method", method, METHODS, "Or pass a callable (model, inputs, target) -> attributions."
    )


def draws_random(spec: MethodSpec, options: dict[str, Any]) -> bool:
    """Whether one call of this named method draws random numbers (its noise, sampled
    perturbations, a ``"uniform"`` baseline whatever the method, or meaningful_perturbation's
    random start: its ``init="circular"`` draws nothing)."""
    if spec.name == "meaningful_perturbation":
        return {**spec.defaults, **options}.get("init") == "random"
    baselines = options.get("baselines")
    return spec.stochastic or (isinstance(baselines, str) and baselines == "uniform")


#: Per method, the options that set how many random numbers it draws for an image. They are part
#: of the image's seed: with the same seed, 100 noisy samples are a fresh draw rather than the 50
#: of nt_samples=50 and 50 more, so a sweep over a sample count compares independent estimates.
_DRAW_COUNTS = {"smoothgrad": ("nt_samples",), "gradient_shap": ("n_samples", "n_baselines"),
                "lime": ("n_samples",), "kernel_shap": ("n_samples",)}


def image_seed(seed: int, index: int, method: str, options: dict[str, Any]) -> int:
    """The seed of every random draw ``method`` makes to explain the input at ``index`` of the
    check's inputs (with ``options``, whose sample counts it includes: see :data:`_DRAW_COUNTS`).
    The index counts from the batch's place in a stream (:func:`~pytest_saliency.core.stream.example_offset`),
    so an example draws alike whichever batch of a loader it comes in."""
    o = {**METHODS[method].defaults, **options}
    return derive_seed(seed, "image", example_offset() + index,
                       *(int(o[name]) for name in _DRAW_COUNTS.get(method, ())))


def image_ids(index: int | Sequence[int] | torch.Tensor, n: int) -> list[int]:
    """The indices in the user's inputs of ``n`` inputs: ``index`` is the first one's (an int) or
    one index per input (a sequence or an integer tensor), counted in the check's inputs, which
    start at :func:`~pytest_saliency.core.stream.example_offset` of a stream (which
    :func:`image_seed` adds)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return list(range(index, index + n))
    values: Any = index.reshape(-1).tolist() if hasattr(index, "reshape") else index
    ids = [int(i) for i in values]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} image indices for {n} inputs")
    return ids


def smoothgrad_stdev(options: dict[str, Any], image: torch.Tensor) -> float:
    """SmoothGrad's noise standard deviation for one image: ``stdevs`` if set, else ``noise_level``
    times ``input_range`` if set, else times the image's own range (1 for a constant image)."""
    o = {**METHODS["smoothgrad"].defaults, **options}
    if o.get("stdevs") is not None:
        return float(o["stdevs"])
    scale = o.get("input_range")
    if scale is None:
        scale = float(image.max() - image.min()) or 1.0
    return float(o["noise_level"]) * float(scale)


def occlusion_windows(inputs: torch.Tensor, options: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """captum's ``sliding_window_shapes`` and ``strides`` for the ``window`` and ``stride`` options.

    Images: a square window of about an eighth of the smaller side over all channels, moved by
    half a window; series (N, C, T): an eighth of the length over all channels, likewise; flat
    (N, D) inputs: an eighth of the features, likewise.
    """
    window, stride = options["window"], options["stride"]
    if inputs.dim() == 3:
        window = window or max(2, round(inputs.shape[-1] / 8))
        shape = (inputs.shape[1], window) if isinstance(window, int) else tuple(window)
        stride = stride or (max(1, window // 2) if isinstance(window, int) else tuple(max(1, w // 2) for w in shape))
        strides = (1, stride) if isinstance(stride, int) else tuple(stride)
    elif inputs.dim() == 4:
        side = max(2, round(min(inputs.shape[-2:]) / 8))
        window = window or side
        shape = (inputs.shape[1], window, window) if isinstance(window, int) else tuple(window)
        stride = stride or (max(1, window // 2) if isinstance(window, int) else tuple(max(1, w // 2) for w in shape))
        strides = (1, stride, stride) if isinstance(stride, int) else tuple(stride)
    else:
        shape = (window or max(1, inputs.shape[1] // 8),) if not isinstance(window, tuple) else window
        strides = (stride or max(1, shape[0] // 2),) if not isinstance(stride, tuple) else stride
    return shape, strides


def occlusion_positions(inputs: torch.Tensor, options: dict[str, Any]) -> int:
    """How many windows captum's ``Occlusion`` slides over one input (one forward row each)."""
    shape, strides = occlusion_windows(inputs, {**METHODS["occlusion"].defaults, **options})
    count = 1
    for size, window, stride in zip(inputs.shape[1:], shape, strides):
        count *= -(-(size - window) // stride) + 1
    return count
