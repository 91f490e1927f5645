"""Attribution methods by name: one function, :func:`explain`, over captum.

Every method is a captum attribution class with defaults written down in :data:`METHODS`
(and in the README). Conventions that hold for all of them:

* **Target.** ``target=None`` means the class the model predicts for each input. The randomization
  checks resolve it once on the *original* model and hold it fixed for every randomized variant
  (Sriram & Conati: explanations are computed "for the original prediction").
* **Raw output.** ``explain`` returns attributions shaped like the inputs (GradCAM: ``(N, 1, H, W)``,
  upsampled to the input size). Pass ``preset=`` to get post-processed 2-D maps instead.
* **Gradients of the inputs only.** Parameters' ``requires_grad`` is switched off while a method
  runs (and restored), so backward passes skip the weight gradients nobody reads.
* **Evaluation mode.** The model runs in ``eval()`` (dropout off, BatchNorm on running statistics)
  and its ``training`` flags are restored afterwards; pass ``eval_mode=False`` to keep its mode.
* **Seeds, per image.** Methods that draw random numbers (smoothgrad, gradient_shap, lime,
  kernel_shap, and any method with ``baselines="uniform"``: see :func:`draws_random`) explain one
  image at a time, with every generator seeded from :func:`image_seed` (``seed``, the image's
  index in the user's inputs and the method's sample counts) and noise scaled by that image's own range (as SAM's and Adebayo
  et al.'s code do). An image's map therefore depends on the model, the image, its index, the
  options and the seed, never on ``batch_size``, the memory budget's chunks or the other images
  of its batch: bit for bit on the CPU. No global RNG state changes. Every explanation pass is
  seeded, so a model that draws random numbers itself (dropout left on) draws the same ones in each.
* **Signed gradients.** ``saliency`` returns the signed gradient (captum's ``abs=False``); taking
  the absolute value is the map pipeline's job, so signed and magnitude views stay available.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.rng import derive_seed, pass_seeded

from ..core.integrity import rng_isolated
from ..core.torchtools import ensure_eval_mode, module_settings, require_torch, restore_training_flags, training_flags
from ..core.validation import check_count, check_finite, check_inputs, check_model, unknown_choice
from .baselines import zero_or
from ..exceptions import SaliencyUsageError, warn_user
from .options import check_option_value
from .postprocess import MapPipeline, apply_pipeline

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
            "feature_ablation", "FeatureAblation", {"grid": 8, "baselines": 0.0, "perturbations_per_eval": None},
            note="features: a grid x grid superpixel grid, replaced by the baseline",
        ),
    ]
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


def last_conv_layer(model: Any) -> tuple[str, Any]:
    """The last ``Conv2d`` in registration order, the usual GradCAM layer."""
    torch = require_torch()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise SaliencyUsageError(
            f"{type(model).__name__} has no nn.Conv2d layer for GradCAM. Pass layer='<module name>' "
            "naming the layer whose activations GradCAM should use, or choose a non-layer method."
        )
    return convs[-1]


def _find_module(model: Any, layer: Any) -> Any:
    if layer is None:
        return last_conv_layer(model)[1]
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise unknown_choice("layer", layer, [n for n in modules if n])
        return modules[layer]
    return layer


def predicted_targets(model: Any, inputs: Any, batch_size: int | None = None, seed: int = 0) -> Any:
    """The class each input is predicted as: the default, fixed target of every check.

    Seeded like an explanation pass (a model that draws random numbers predicts reproducibly).
    """
    torch = require_torch()
    with torch.no_grad(), model_in_eval_mode(model, True), pass_seeded(seed, inputs.device):
        outputs = [model(chunk) for chunk in chunks(inputs, batch_size)]
    return targets_from_outputs(torch.cat(outputs))


def targets_from_outputs(out: Any) -> Any:
    """The predicted class of each row of (N, num_classes) scores (an error for other shapes)."""
    torch = require_torch()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SaliencyUsageError(
            f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; target=None needs (N, num_classes) "
            "scores to take the predicted class. Pass target= explicitly or return logits of shape (N, K)."
        )
    return out.argmax(dim=1)


def resolve_target(
    model: Any, inputs: Any, target: Any, batch_size: int | None = None, outputs: Any = None, seed: int = 0,
) -> Any:
    """None -> predicted classes; an int or a per-input tensor is checked and returned as a tensor.

    ``outputs``: the model's outputs for ``inputs`` if the caller already has them; ``seed``: the
    check's (see :func:`predicted_targets`).
    """
    torch = require_torch()
    n = inputs.shape[0]
    if target is None:
        if outputs is None:
            return predicted_targets(model, inputs, batch_size, seed)
        return targets_from_outputs(outputs)
    resolved = None
    if isinstance(target, torch.Tensor) and target.is_meta:
        raise SaliencyUsageError(
            "target is on the meta device, which holds shapes but no class indices. Pass target= as an int "
            f"or an integer tensor of real values, on the inputs' device ({inputs.device}) or the CPU, or "
            "target=None for each input's predicted class."
        )
    if isinstance(target, int) and not isinstance(target, bool):
        resolved = torch.full((n,), target, dtype=torch.long, device=inputs.device)
    elif (isinstance(target, torch.Tensor) and target.dim() <= 1 and not target.is_floating_point()
          and not target.is_complex() and target.dtype != torch.bool and target.numel() in (1, n)):
        target = target.to(inputs.device).long().reshape(-1)
        resolved = target.expand(n).clone() if target.numel() == 1 else target
    if resolved is None:
        raise SaliencyUsageError(
            f"target must be None (the predicted class), an int, or an integer tensor of shape ({n},), "
            f"got {target!r:.80}."
        )
    classes = outputs.shape[1] if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 else \
        output_classes(model, inputs[:1])
    if classes is not None:
        low, high = int(resolved.min()), int(resolved.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise SaliencyUsageError(
                f"target {bad} is out of range: the model has {classes} output classes, so a target must be an "
                f"int from 0 to {classes - 1} (negative indices are not accepted: they would silently pick "
                "another class). Pass the class index, or target=None for each input's predicted class."
            )
    return resolved


@contextlib.contextmanager
def model_in_eval_mode(model: Any, enabled: bool) -> Iterator[None]:
    flags = training_flags(model)
    if enabled:
        ensure_eval_mode(model, flags)
    try:
        yield
    finally:
        restore_training_flags(flags)


@contextlib.contextmanager
def _inputs_only_gradients(model: Any) -> Iterator[None]:
    """Turn off parameter gradients while explaining; the flags are restored exactly."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# captum's notices about what it does on purpose (hooks on ReLUs, setting requires_grad on the
# inputs, one Lime surrogate per example) say nothing actionable to a user of these checks.
_CAPTUM_NOTICES = (
    r"Input Tensor \d+ did not already require gradients",
    r"Setting backward hooks on ReLU activations",
    r"Setting forward, backward hooks and attributes on non-linear",
    r"You are providing multiple inputs for Lime / Kernel SHAP",
)


@contextlib.contextmanager
def quiet_captum() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield


def chunks(tensor: Any, size: int | None) -> list[Any]:
    size = check_count(size, "batch_size", minimum=1, allow_none=True,
                       hint="It is how many inputs one explainer call sees; None explains all at once.")
    if size is None or size >= tensor.shape[0]:
        return [tensor]
    return list(tensor.split(size))


def _grid_mask(inputs: Any, grid: int) -> Any:
    """A (1, 1, H, W) (or (1, D)) feature mask of grid x grid superpixels shared by channels."""
    torch = require_torch()
    if inputs.dim() == 2:
        d = inputs.shape[1]
        groups = min(grid * grid, d)
        return (torch.arange(d, device=inputs.device) * groups // d)[None]
    h, w = inputs.shape[-2:]
    gy, gx = min(grid, h), min(grid, w)
    rows = torch.arange(h, device=inputs.device) * gy // h
    cols = torch.arange(w, device=inputs.device) * gx // w
    return (rows[:, None] * gx + cols[None, :])[None, None]


def draws_random(spec: MethodSpec, options: dict[str, Any]) -> bool:
    """Whether one call of this named method draws random numbers (its noise, sampled
    perturbations, or a ``"uniform"`` baseline, whatever the method)."""
    baselines = options.get("baselines")
    return spec.stochastic or (isinstance(baselines, str) and baselines == "uniform")


#: Per method, the options that set how many random numbers it draws for an image. They are part
#: of the image's seed: with the same seed, 100 noisy samples are a fresh draw rather than the 50
#: of nt_samples=50 and 50 more, so a sweep over a sample count compares independent estimates.
_DRAW_COUNTS = {"smoothgrad": ("nt_samples",), "gradient_shap": ("n_samples", "n_baselines"),
                "lime": ("n_samples",), "kernel_shap": ("n_samples",)}


def image_seed(seed: int, index: int, method: str, options: dict[str, Any]) -> int:
    """The seed of every random draw ``method`` makes to explain the input at ``index`` of the
    user's inputs (with ``options``, whose sample counts it includes: see :data:`_DRAW_COUNTS`)."""
    o = {**METHODS[method].defaults, **options}
    return derive_seed(seed, "image", index, *(int(o[name]) for name in _DRAW_COUNTS.get(method, ())))


def uniform_baselines(inputs: Any, seed: int, index: Any, method: str, options: dict[str, Any]) -> Any:
    """One ``"uniform"`` baseline per input, drawn under that input's :func:`image_seed` (its place
    in the user's inputs: ``index``, see :func:`image_ids`): the draws :func:`run_captum` makes,
    for code that builds the baselines itself. No global RNG state changes."""
    torch = require_torch()
    from ..core.rng import seeded

    rows = []
    for row, image in enumerate(image_ids(index, inputs.shape[0])):
        with seeded(image_seed(seed, image, method, options), inputs.device, torch_only=True):
            rows.append(zero_or("uniform", inputs[row:row + 1]))
    return torch.cat(rows)


def _check_baselines(method: str, inputs: Any, value: Any) -> None:
    """A baseline tensor must broadcast to the inputs like captum expects, on their device and dtype."""
    torch = require_torch()
    if not isinstance(value, torch.Tensor):
        if type(value).__name__ == "ndarray" or (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise SaliencyUsageError(
                f"baselines for {method} must be a torch.Tensor, got {type(value).__name__}. Convert it with "
                "torch.as_tensor(baselines, dtype=inputs.dtype, device=inputs.device)."
            )
        return
    shape, one = tuple(value.shape), tuple(inputs.shape[1:])
    if value.is_meta or value.device != inputs.device:
        where = "on the meta device, which holds no values" if value.is_meta else f"on {value.device}"
        raise SaliencyUsageError(
            f"baselines for {method} are {where}, but the inputs are on {inputs.device}. Pass a baseline "
            "tensor with real values on the inputs' device: baselines.to(inputs)."
        )
    if value.dtype != inputs.dtype:
        raise SaliencyUsageError(
            f"baselines for {method} are {value.dtype} but the inputs are {inputs.dtype}. Convert them "
            "with baselines.to(inputs)."
        )
    if shape not in ((), one, (1, *one), tuple(inputs.shape)):
        raise SaliencyUsageError(
            f"baselines for {method} has shape {shape}, which does not broadcast to the inputs: expected the "
            f"inputs' shape {tuple(inputs.shape)} (one baseline per input), one input's shape {one} or "
            f"{(1, *one)} (shared by every input), or a scalar tensor. Reshape the baseline, or pass a "
            "float or 'zero', 'uniform', 'blurred'."
        )


def _check_occlusion_windows(inputs: Any, options: dict[str, Any]) -> None:
    """captum's Occlusion needs one window size and stride per input dimension after the batch, each
    window at most the input's size and each stride at most the window."""
    o = {**METHODS["occlusion"].defaults, **options}
    shape, strides = occlusion_windows(inputs, o)
    sizes = tuple(inputs.shape[1:])
    images = inputs.dim() == 4
    described = "x".join(map(str, sizes[1:])) + " inputs" if images else f"inputs of shape {sizes}"
    for name, given, value in (("window", o["window"], shape), ("stride", o["stride"], strides)):
        if len(value) != len(sizes):
            raise SaliencyUsageError(
                f"occlusion's {name}={given!r} has {len(value)} entries, but {described} need {len(sizes)} "
                f"entries (one per dimension of {sizes}). Pass an int, or a tuple of {len(sizes)} ints."
            )
    if any(w > size for w, size in zip(shape, sizes)):
        largest = min(sizes[1:]) if images and isinstance(o["window"], int) else sizes
        raise SaliencyUsageError(
            f"occlusion's window={o['window']!r} does not fit the {described} (of shape {sizes}): the "
            f"largest allowed is {largest}. Pass a smaller window, or None for the default "
            "(an eighth of the smaller side)."
        )
    if any(step > w for step, w in zip(strides, shape)):
        largest = min(shape[1:]) if images and isinstance(o["stride"], int) else shape
        raise SaliencyUsageError(
            f"occlusion's stride={o['stride']!r} is larger than the window {shape} (captum would skip "
            f"pixels): the largest allowed is {largest}. Pass a smaller stride, or a larger window."
        )


def occlusion_windows(inputs: Any, options: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """captum's ``sliding_window_shapes`` and ``strides`` for the ``window`` and ``stride`` options.

    Images: a square window of about an eighth of the smaller side over all channels, moved by
    half a window; flat (N, D) inputs: an eighth of the features, likewise.
    """
    window, stride = options["window"], options["stride"]
    if inputs.dim() == 4:
        side = max(2, round(min(inputs.shape[-2:]) / 8))
        window = window or side
        shape = (inputs.shape[1], window, window) if isinstance(window, int) else tuple(window)
        stride = stride or (max(1, window // 2) if isinstance(window, int) else tuple(max(1, w // 2) for w in shape))
        strides = (1, stride, stride) if isinstance(stride, int) else tuple(stride)
    else:
        shape = (window or max(1, inputs.shape[1] // 8),) if not isinstance(window, tuple) else window
        strides = (stride or max(1, shape[0] // 2),) if not isinstance(stride, tuple) else stride
    return shape, strides


def occlusion_positions(inputs: Any, options: dict[str, Any]) -> int:
    """How many windows captum's ``Occlusion`` slides over one input (one forward row each)."""
    shape, strides = occlusion_windows(inputs, {**METHODS["occlusion"].defaults, **options})
    count = 1
    for size, window, stride in zip(inputs.shape[1:], shape, strides):
        count *= -(-(size - window) // stride) + 1
    return count


def uniform_baseline(inputs: Any, seed: int = 0, *, index: Any = 0, method: str = "integrated_gradients") -> Any:
    """One baseline per input, uniform over that input's own ``[min, max]``: the draw that
    ``explain(..., method, baselines="uniform", seed=seed)`` makes for the input at its index in
    the user's inputs (``index``: the first input's, or one per input), so an input's baseline
    does not depend on the other inputs. No global RNG state changes."""
    return uniform_baselines(inputs, seed, index, method, {})


def image_ids(index: Any, n: int) -> list[int]:
    """The indices in the user's inputs of ``n`` inputs: ``index`` is the first one's (an int) or
    one index per input (a sequence or an integer tensor)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return list(range(index, index + n))
    ids = [int(i) for i in (index.reshape(-1).tolist() if hasattr(index, "reshape") else index)]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} image indices for {n} inputs")
    return ids


def _stream_seed() -> int:
    """A seed from the global torch generator, for callers that give no seed (it is seeded for the pass)."""
    torch = require_torch()
    return int(torch.randint(0, 2**62, (1,)))


def run_captum(spec: MethodSpec, model: Any, inputs: Any, target: Any, options: dict[str, Any], *,
                seed: int | None = None, index: Any = 0) -> Any:
    """Build the captum object for ``spec`` and attribute one chunk of inputs.

    A method that draws random numbers (:func:`draws_random`) explains the inputs one at a time,
    every generator seeded with :func:`image_seed` of ``seed`` and the input's index in the user's
    inputs (``index``: the first input's, or one per input; see :func:`image_ids`), so that its
    map does not depend on the other inputs of the chunk. ``seed=None``: taken from the global
    torch generator (which the caller's pass seeded).
    """
    torch = require_torch()
    baselines = options.get("baselines")
    if isinstance(baselines, torch.Tensor) and baselines.dim() == inputs.dim() and baselines.shape[0] > 1:
        # one baseline per input of the check (see _check_baselines): these inputs' own
        options = {**options, "baselines": baselines[image_ids(index, inputs.shape[0])]}
    if not draws_random(spec, options):
        return _run_captum_chunk(spec, model, inputs, target, options)
    if seed is None:
        seed = _stream_seed()
    ids = image_ids(index, inputs.shape[0])
    targets = target.reshape(-1).expand(inputs.shape[0]) if target is not None else None
    maps = []
    for row, image in enumerate(ids):
        with pass_seeded(image_seed(seed, image, spec.name, options), inputs.device):
            maps.append(_run_captum_chunk(spec, model, inputs[row:row + 1], None if targets is None
                                          else targets[row:row + 1], options))
    return torch.cat(maps) if len(maps) > 1 else maps[0]


def smoothgrad_stdev(options: dict[str, Any], image: Any) -> float:
    """SmoothGrad's noise standard deviation for one image: ``stdevs`` if set, else ``noise_level``
    times ``input_range`` if set, else times the image's own range (1 for a constant image)."""
    o = {**METHODS["smoothgrad"].defaults, **options}
    if o.get("stdevs") is not None:
        return float(o["stdevs"])
    scale = o.get("input_range")
    if scale is None:
        scale = float(image.max() - image.min()) or 1.0
    return float(o["noise_level"]) * float(scale)


def _in_dtype_of(model: Any, inputs: Any) -> Any:
    """``model``, or for half-precision inputs a forward function that casts its input to their dtype.

    captum's NoiseTunnel (SmoothGrad, GradientSHAP) adds float32 noise, which turns float16 and
    bfloat16 inputs into float32 ones that a half-precision model refuses; the cast feeds the
    model the noisy inputs in its own dtype (the gradients come back in float32).
    """
    torch = require_torch()
    if inputs.dtype not in (torch.float16, torch.bfloat16):
        return model
    dtype = inputs.dtype

    def forward(batch: Any) -> Any:
        return model(batch.to(dtype))

    return forward


@contextlib.contextmanager
def _spatial_layer_guard(method: str, model: Any, layer: Any, given: Any, inputs: Any) -> Iterator[None]:
    """GradCAM upsamples the layer's (N, C, H, W) activations to images: a forward hook on the layer
    refuses any other output during the method's own forward passes (no extra pass), before torch's
    interpolation fails on it or captum's GuidedGradCam returns empty maps."""
    torch = require_torch()
    if inputs.dim() != 4:
        yield
        return
    if given is None:
        label = repr(next((n for n, m in model.named_modules() if m is layer), type(layer).__name__))
    else:
        label = repr(given)

    def check(module: Any, args: Any, output: Any) -> None:
        if not (isinstance(output, torch.Tensor) and output.dim() == 4):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise SaliencyUsageError(
                f"{method}: the layer {label} gives an output of shape {shape}, but GradCAM weighs the "
                "channels of a spatial activation and upsamples it to the image, so it needs a conv layer "
                "whose output is (N, C, H, W). Pass layer='<name of a Conv2d or a block ending in one>', "
                "or layer=None for the last Conv2d."
            )

    handle = layer.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _run_captum_chunk(spec: MethodSpec, model: Any, inputs: Any, target: Any, options: dict[str, Any]) -> Any:
    """One captum call on ``inputs`` (for methods that draw: one image, its generators seeded)."""
    import captum.attr as ca

    torch = require_torch()
    o = {**spec.defaults, **options}
    name = spec.name
    if name == "saliency":
        return ca.Saliency(model).attribute(inputs, target=target, abs=o["abs"])
    if name == "input_x_gradient":
        return ca.InputXGradient(model).attribute(inputs, target=target)
    if name == "integrated_gradients":
        return ca.IntegratedGradients(model).attribute(
            inputs, baselines=zero_or(o["baselines"], inputs), target=target, n_steps=o["n_steps"],
            method=o["integration_method"], internal_batch_size=o["internal_batch_size"],
        )
    if name == "smoothgrad":
        stdev = smoothgrad_stdev(o, inputs)  # one image: its own range
        return ca.NoiseTunnel(ca.Saliency(_in_dtype_of(model, inputs))).attribute(
            inputs, nt_type="smoothgrad", nt_samples=o["nt_samples"], stdevs=stdev, target=target,
            nt_samples_batch_size=o["nt_samples_batch_size"], abs=False,
        )
    if name == "guided_backprop":
        return ca.GuidedBackprop(model).attribute(inputs, target=target)
    if name == "deconvolution":
        return ca.Deconvolution(model).attribute(inputs, target=target)
    if name == "gradcam":
        layer = _find_module(model, o["layer"])
        with _spatial_layer_guard(name, model, layer, o["layer"], inputs):
            cam = ca.LayerGradCam(model, layer).attribute(inputs, target=target, relu_attributions=o["relu_attributions"])
        if inputs.dim() == 4:
            cam = ca.LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), o["interpolate_mode"])
        return cam
    if name == "guided_gradcam":
        layer = _find_module(model, o["layer"])
        with _spatial_layer_guard(name, model, layer, o["layer"], inputs):
            return ca.GuidedGradCam(model, layer).attribute(inputs, target=target)
    if name == "deeplift":
        return ca.DeepLift(model).attribute(inputs, baselines=zero_or(o["baselines"], inputs), target=target)
    if name == "gradient_shap":
        low, high = float(inputs.min()), float(inputs.max())  # one image: its own range
        n_random = max(int(o["n_baselines"]) - 1, 0)
        draws = torch.rand((n_random, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        baselines = torch.cat([torch.zeros_like(inputs[:1]), low + (high - low) * draws])
        return ca.GradientShap(_in_dtype_of(model, inputs)).attribute(
            inputs, baselines=baselines, n_samples=o["n_samples"], stdevs=o["stdevs"], target=target
        )
    if name == "occlusion":
        shape, strides = occlusion_windows(inputs, o)
        return ca.Occlusion(model).attribute(
            inputs, sliding_window_shapes=shape, strides=strides, baselines=zero_or(o["baselines"], inputs),
            target=target,
            perturbations_per_eval=o["perturbations_per_eval"],
        )
    mask = o.get("feature_mask")
    if mask is None:
        mask = _grid_mask(inputs, int(o["grid"]))
    if name == "feature_ablation":
        return ca.FeatureAblation(model).attribute(
            inputs, baselines=zero_or(o["baselines"], inputs), target=target, feature_mask=mask.expand_as(inputs),
            perturbations_per_eval=o["perturbations_per_eval"],
        )
    if name == "lime":
        from captum._utils.models.linear_model import SkLearnLasso

        explainer = ca.Lime(model, interpretable_model=SkLearnLasso(alpha=o["alpha"]))
    else:
        explainer = ca.KernelShap(model)
    return explainer.attribute(
        inputs, target=target, feature_mask=mask.expand(1, *inputs.shape[1:]), n_samples=o["n_samples"],
        perturbations_per_eval=o["perturbations_per_eval"],
    )


# Options accepted on top of the documented defaults (they have no default value); every named
# method also accepts memory_budget (see _auto_batching).
EXTRA_OPTIONS = {
    "smoothgrad": ("stdevs", "input_range"),
    "lime": ("feature_mask",),
    "kernel_shap": ("feature_mask",),
    "feature_ablation": ("feature_mask",),
}


_RELU_RULE_METHODS = ("guided_backprop", "deconvolution", "guided_gradcam", "deeplift")


def _warn_if_relu_rules_cannot_apply(spec: MethodSpec, model: Any) -> None:
    """captum's ReLU-rule methods only hook ``nn.ReLU`` modules; ``F.relu`` gets the plain gradient."""
    torch = require_torch()
    if spec.name in _RELU_RULE_METHODS and not any(isinstance(m, torch.nn.ReLU) for m in model.modules()):
        warn_user(
            f"{spec.name}: {type(model).__name__} has no nn.ReLU module. captum applies this method's "
            "modified backward rule only to nn.ReLU modules, so with functional relu calls (F.relu, "
            "torch.relu) the maps are just the plain gradient. Use one nn.ReLU module per activation."
        )


# Methods whose cost multiplies the batch (steps, samples, perturbations) and the captum option
# that bounds how many rows one forward pass sees.
_ROW_OPTIONS = {
    "integrated_gradients": "internal_batch_size",
    "smoothgrad": "nt_samples_batch_size",
    "occlusion": "perturbations_per_eval",
    "feature_ablation": "perturbations_per_eval",
    "lime": "perturbations_per_eval",
    "kernel_shap": "perturbations_per_eval",
}
CPU_MEMORY_BUDGET = 1 * 2**30


def memory_budget_bytes(budget: Any, device: Any) -> int:
    """``"auto"``: half the free memory of a CUDA device, 1 GiB on the CPU; or an explicit byte count."""
    torch = require_torch()
    if budget == "auto":
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.5)
        return CPU_MEMORY_BUDGET
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    raise SaliencyUsageError(f"memory_budget must be 'auto' or a positive number of bytes, got {budget!r}.")


#: Per model, the probed :func:`activation_bytes_per_input` by what the probe depends on (see
#: :func:`_probe_key`), with the number of classes the model scores (:func:`output_classes`).
#: Weak keys: a model's entries go when the model does. Memory sizing and the target's range
#: check read it, never a result.
_PROBED: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, int | None]]] = weakref.WeakKeyDictionary()
def activation_bytes_per_input(model: Any, example: Any) -> int:
    """Bytes of all module outputs for one input: what one row of a batch costs to keep for backward.

    Probed with a one-image forward pass the first time a model meets an input, and remembered
    while nothing the output sizes could depend on changes (:func:`_probe_key`): a test session
    runs several checks on the same model, and on a small CNN the probe is about 2% of a check.
    """
    return _probe(model, example)[0]


def output_classes(model: Any, example: Any) -> int | None:
    """How many classes the model scores: the width of its (1, K) output for one input, or None
    for another output shape or a model the probe cannot run (the real pass reports why).
    Read from the memory probe's remembered pass (:func:`activation_bytes_per_input`)."""
    try:
        return _probe(model, example)[1]
    except Exception:  # noqa: BLE001 - only a check's convenience; the explanation pass reports errors
        return None


def _probe(model: Any, example: Any) -> tuple[int, int | None]:
    try:
        key = _probe_key(model, example)
        cached = _PROBED.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: probe every time
        return _probe_activation_bytes(model, example)
    if key not in cached:
        cached[key] = _probe_activation_bytes(model, example)
    return cached[key]


def _probe_key(model: Any, example: Any) -> Any:
    """The input's shape, dtype and device, autocast, and per module its object, its parameters'
    and buffers' shapes and its plain settings (``scale_factor``, ``kernel_size``, flags...)."""
    torch = require_torch()
    modules = []
    for module in model.modules():
        settings = module_settings(module)
        shapes = tuple(None if isinstance(t, torch.nn.parameter.UninitializedTensorMixin) else t.shape
                       for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
        modules.append((id(module), settings, shapes))
    autocast = torch.is_autocast_enabled(example.device.type)
    return tuple(example.shape[1:]), example.dtype, example.device, autocast, tuple(modules)


def _probe_activation_bytes(model: Any, example: Any) -> tuple[int, int | None]:
    """The bytes of one input's module outputs, and the width of a (1, K) model output (else None)."""
    torch = require_torch()
    total = 0

    def hook(module: Any, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if next(m.children(), None) is None
              and not isinstance(m, torch.jit.ScriptModule)]  # scripted modules take no hooks
    handles = []
    try:
        handles.extend(m.register_forward_hook(hook) for m in leaves)
        with torch.no_grad(), model_in_eval_mode(model, True):
            out = model(example)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        if isinstance(error, SaliencyUsageError):
            raise
        raise SaliencyUsageError(
            f"the model ({type(model).__name__}) raised {type(error).__name__} on one input of shape "
            f"{tuple(example.shape)} ({example.dtype}, {example.device}): {error} Check that the inputs have the "
            "shape, channels, dtype and value range the model was trained on (the traceback above shows where "
            "in the model it failed)."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    classes = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1 else None
    return total + example.numel() * example.element_size(), classes


def _auto_batching(spec: MethodSpec, model: Any, inputs: Any, options: dict[str, Any]) -> None:
    """Size internal batches (IG steps, SmoothGrad samples, perturbations) and image chunks to the memory budget.

    One row (an input, an interpolation step, a noisy sample, a perturbation) costs about three
    times its forward activations (kept for backward, plus gradients). Options the user set are
    left alone. Images are explained one chunk at a time (``_image_batch``) when all of them at
    once would exceed the budget: for gradient methods that is one row per image (900 ResNet-50
    images at 224x224 need about 90 GB), for the others when even one image's rows do not fit.
    """
    option = _ROW_OPTIONS.get(spec.name)
    budget = options.pop("memory_budget", "auto")
    if option is not None and options.get(option) is not None:
        return
    row = 3 * activation_bytes_per_input(model, inputs[:1])
    rows = max(1, memory_budget_bytes(budget, inputs.device) // max(row, 1))
    n = inputs.shape[0]
    # GradientShap runs every input n_samples times in one pass, SmoothGrad (up to) nt_samples
    # times; the others one row per image
    per_image = 1
    if spec.name == "gradient_shap":
        per_image = int(options.get("n_samples", spec.defaults["n_samples"]))
    elif spec.name == "smoothgrad":
        per_image = int(options.get("nt_samples", spec.defaults["nt_samples"]))
    images = min(n, max(1, rows // per_image) if option is None or spec.name == "smoothgrad" else rows)
    if images < n:
        options["_image_batch"] = images
    if option is None:
        return
    if spec.name == "integrated_gradients":
        options[option] = max(images, rows)
    elif spec.name in ("lime", "kernel_shap"):
        options[option] = max(1, min(rows, int(options.get("n_samples", spec.defaults["n_samples"]))))
    elif spec.name == "smoothgrad":
        # Samples per pass of one image, whatever the number of images: SmoothGrad explains one
        # image at a time (see run_captum), so its map never depends on the chunking.
        options[option] = max(1, min(rows, per_image))
    else:
        options[option] = max(1, rows // images)


def _noise_std(value: Any) -> float:
    """SmoothGrad's ``stdevs`` as the one float captum takes for a single input tensor."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SaliencyUsageError(
            f"smoothgrad's stdevs must be a number >= 0 (the noise standard deviation), got {value!r}. "
            "Or leave it out and set noise_level, a fraction of the inputs' range."
        )
    return float(value)


def resolved_options(spec: MethodSpec, model: Any, inputs: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Validate user options, size internal batches, and add the input-range facts some methods scale by."""
    allowed = set(spec.defaults) | set(EXTRA_OPTIONS.get(spec.name, ())) | {"memory_budget"}
    extra = sorted(set(options) - allowed)
    if extra:
        valid = ", ".join(sorted(allowed)) or "none (this method has no hyperparameters)"
        raise SaliencyUsageError(f"unknown option(s) {extra} for method {spec.name!r}; valid options: {valid}.")
    options = dict(options)
    if spec.name == "smoothgrad" and options.get("stdevs") is not None:
        options["stdevs"] = _noise_std(options["stdevs"])
    for name, value in options.items():
        if not (value is None and name in spec.defaults and spec.defaults[name] is None):  # the documented default
            check_option_value(spec.name, name, value, where="options")
    if options.get("baselines") is not None:
        _check_baselines(spec.name, inputs, options["baselines"])
    if spec.name == "occlusion":
        _check_occlusion_windows(inputs, options)
    _warn_if_relu_rules_cannot_apply(spec, model)
    _auto_batching(spec, model, inputs, options)
    return options


def prepare_method(
    method: str | Explainer, model: Any, inputs: Any, method_kwargs: dict[str, Any]
) -> tuple[MethodSpec | Explainer, str, dict[str, Any]]:
    """Resolve a method once per check: ``(method, printable name, validated options)``.

    Named methods get their options checked and their internal batches sized; a user callable
    takes no options (they would be silently ignored), so passing some is an error.
    """
    resolved = resolve_method(method)
    if isinstance(resolved, MethodSpec):
        return resolved, resolved.name, resolved_options(resolved, model, inputs, method_kwargs)
    name = method_name(method)
    if method_kwargs:
        raise SaliencyUsageError(
            f"options {sorted(method_kwargs)} were given for the custom explainer {name!r}, which takes only "
            "(model, inputs, target); bind them with functools.partial instead."
        )
    return resolved, name, {}


@rng_isolated
def explain(
    model: Any,
    inputs: Any,
    method: str | Explainer = "saliency",
    target: Any = None,
    seed: int = 0,
    preset: str | MapPipeline | None = None,
    *,
    batch_size: int | None = None,
    eval_mode: bool = True,
    **method_kwargs: Any,
) -> Any:
    """Compute a batch of attribution maps with a named captum method or a user callable.

    Args:
        model: the ``nn.Module`` to explain; its state is left exactly as it was.
        inputs: a floating tensor (N, C, H, W) or (N, D) on the model's device.
        method: a name from :data:`METHODS` or a callable ``(model, inputs, target) -> attributions``.
        target: ``None`` (each input's predicted class), an int, or an integer tensor of shape (N,).
        seed: seeds the method's own randomness without touching global RNG state.
        preset: ``None`` returns raw attributions; a preset name or :class:`MapPipeline` returns
            post-processed maps of shape (N, H, W).
        batch_size: explain at most this many inputs per call (memory bound); ``None`` = all at once.
        eval_mode: run the model in ``eval()`` mode (restored afterwards).
        **method_kwargs: the method's hyperparameters (see :data:`METHODS` for names and defaults).
    """
    check_model(model)
    check_inputs(inputs, model)
    check_count(batch_size, "batch_size", minimum=1, allow_none=True,
                hint="It is how many inputs one explainer call sees; None explains all at once.")
    resolved, _, options = prepare_method(method, model, inputs, method_kwargs)
    target = resolve_target(model, inputs, target, batch_size, seed=seed)
    attributions = attribute(model, inputs, resolved, target, seed, batch_size, eval_mode, options)
    return attributions if preset is None else apply_pipeline(attributions, preset)


def _raise_reused_module_error(method: MethodSpec, exc: RuntimeError) -> None:
    """captum's DeepLIFT refuses a module called more than once in a forward pass (a shared ReLU):
    say which module and what to do, instead of captum's traceback from inside its hooks."""
    text = str(exc)
    if method.name != "deeplift" or "used more than once" not in text:
        return
    module = text.split("A Module ", 1)[-1].split(" was detected", 1)[0]
    raise SaliencyUsageError(
        f"deeplift cannot explain this model: the module {module} is called more than once in one "
        "forward pass (a shared activation module, say), and captum's DeepLIFT keeps one input and "
        "output per module. Give each call its own module (e.g. one nn.ReLU per activation), or use "
        "another method (saliency, integrated_gradients, guided_backprop)."
    ) from exc


def _raise_no_gradient_path_error(method: MethodSpec, exc: RuntimeError) -> None:
    """A gradient taken of an output that autograd does not connect to the input (or to GradCAM's
    layer): torch's "does not require grad" / "not have been used in the graph" become a usage error."""
    text = str(exc)
    layer = method.layer_based and "appears to not have been used in the graph" in text
    if "does not require grad" not in text and not layer:
        return
    subject = "the input or the chosen layer's activations" if method.layer_based else "the input"
    fix = " Or pass layer= naming a layer the output is computed from." if method.layer_based else ""
    raise SaliencyUsageError(
        f"{method.name} cannot explain this model: the model's output does not depend on {subject} through "
        "autograd (a detach, no_grad, or an input or layer output that is not used in forward), so there is "
        "no gradient to take, and gradient methods cannot explain it. Remove the .detach() / "
        "torch.no_grad() / inference_mode from forward, or use a perturbation method (occlusion, "
        f"feature_ablation, lime, kernel_shap).{fix}"
    ) from exc


def attribute(
    model: Any, inputs: Any, method: MethodSpec | Explainer, target: Any, seed: int,
    batch_size: int | None, eval_mode: bool, options: dict[str, Any], *, prepared: bool = False,
    what: str = "", index: Any = 0,
) -> Any:
    """The core loop, without argument checks: the randomization engine calls it once per layer.

    ``prepared=True``: the caller has already put the model in eval mode with parameter
    gradients off for a whole check (and restores the flags), so a named method skips doing it
    again for every call. User callables are always guarded, since they may change the flags.
    ``what``: how an error names the maps (default: "attribution maps from <method>").
    ``index``: where ``inputs`` sit in the user's inputs, which seeds each image's random draws
    (:func:`run_captum`): the first input's index (``inputs`` is a slice of them) or one index
    per input (a selection).
    """
    torch = require_torch()
    label = method.name if isinstance(method, MethodSpec) else method_name(method)
    outputs = []
    named = isinstance(method, MethodSpec)
    # Seeded for deterministic methods too: a model may draw random numbers in eval mode (dropout
    # left on), and every pass of a check then sees the same ones (see pytest_saliency.core.rng).
    rng = pass_seeded(seed, inputs.device)
    guard = contextlib.ExitStack()
    if not (prepared and named):
        guard.enter_context(model_in_eval_mode(model, eval_mode))
        guard.enter_context(_inputs_only_gradients(model))
    with guard, rng, quiet_captum():
        batch_size = check_count(batch_size, "batch_size", minimum=1, allow_none=True) or options.get("_image_batch")
        ids = image_ids(index, inputs.shape[0])
        first = 0
        for chunk, chunk_target in zip(chunks(inputs, batch_size), chunks(target, batch_size)):
            chunk_ids, first = ids[first:first + chunk.shape[0]], first + chunk.shape[0]
            if isinstance(method, MethodSpec):
                try:
                    out = run_captum(method, model, chunk.detach(), chunk_target, options, seed=seed, index=chunk_ids)
                except RuntimeError as exc:
                    _raise_reused_module_error(method, exc)
                    _raise_no_gradient_path_error(method, exc)
                    raise
            else:
                out = method(model, chunk.detach(), chunk_target)
            outputs.append(out.detach())
    result = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if not isinstance(result, torch.Tensor) or result.shape[0] != inputs.shape[0]:
        raise SaliencyUsageError(
            f"explainer {label!r} returned "
            f"{type(result).__name__} of shape {tuple(getattr(result, 'shape', ()))}; expected a tensor with "
            f"one map per input ({inputs.shape[0]})."
        )
    check_finite(result, what or f"attribution maps from {label!r}")
    return result
