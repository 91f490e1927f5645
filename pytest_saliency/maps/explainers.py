"""Attribution over captum: :func:`explain` (the public function) and :func:`attribute` (the loop the
checks call), with :func:`run_captum`, one captum call per chunk of inputs.

Every method is a captum attribution class with defaults written down in
:data:`pytest_saliency.maps.methods.METHODS` (and in the README). Conventions that hold for all of them:

* **Target.** ``target=None`` means the class the model predicts for each input
  (:mod:`pytest_saliency.maps.targets`).
* **Raw output.** ``explain`` returns attributions shaped like the inputs (GradCAM: ``(N, 1, H, W)``,
  upsampled to the input size). Pass ``preset=`` to get post-processed 2-D maps instead.
* **Gradients of the inputs only.** Parameters' ``requires_grad`` is switched off while a method
  runs (and restored), so backward passes skip the weight gradients nobody reads.
* **Evaluation mode.** The model runs in ``eval()`` (dropout off, BatchNorm on running statistics)
  and its ``training`` flags are restored afterwards; pass ``eval_mode=False`` to keep its mode.
* **Seeds, per image.** Methods that draw random numbers (smoothgrad, gradient_shap, lime,
  kernel_shap, and any method with ``baselines="uniform"``: see
  :func:`~pytest_saliency.maps.methods.draws_random`) explain one image at a time, with every
  generator seeded from :func:`~pytest_saliency.maps.methods.image_seed` (``seed``, the image's
  index in the user's inputs and the method's sample counts) and noise scaled by that image's own
  range (as SAM's and Adebayo et al.'s code do). An image's map therefore depends on the model, the
  image, its index, the options and the seed, never on ``batch_size``, the memory budget's chunks or
  the other images of its batch: bit for bit on the CPU. No global RNG state changes. Every
  explanation pass is seeded, so a model that draws random numbers itself (dropout left on) draws
  the same ones in each.
* **Signed gradients.** ``saliency`` returns the signed gradient (captum's ``abs=False``); taking
  the absolute value is the map pipeline's job, so signed and magnitude views stay available.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..core.forward import (
    OutputSelector,
    ScoresModule,
    Text,
    call_model,
    captum_forward,
    current_call,
    passes_model_call,
)
from ..core.integrity import rng_isolated
from ..core.rng import pass_seeded
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import check_count, check_finite, check_inputs, check_model
from ..exceptions import SaliencyUsageError, warn_user
from .baselines import blurred_baseline, zero_or
from .batching import BATCH_SIZE_HINT, auto_batching, chunks
from .meaningful_perturbation import meaningful_perturbation, mp_settings
from .methods import (
    Explainer,
    MethodSpec,
    draws_random,
    image_ids,
    image_seed,
    method_name,
    occlusion_windows,
    resolve_method,
    smoothgrad_stdev,
)
from .options import check_method_options
from .postprocess import MapPipeline, apply_pipeline
from .targets import find_layer, resolve_target

if TYPE_CHECKING:
    import torch
    from torch.nn import Module  # for functions whose local ``torch`` is require_torch()'s

__all__ = [
    "attribute", "explain", "prepare_method", "quiet_captum", "resolved_options", "run_captum",
]


@contextlib.contextmanager
def _inputs_only_gradients(model: torch.nn.Module) -> Iterator[None]:
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
    """Run the block with captum's notices about its own hooks and inputs silenced."""
    with warnings.catch_warnings():
        for pattern in _CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield


def _grid_mask(inputs: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1, 1, H, W) feature mask of grid x grid superpixels shared by channels; for series
    (N, C, T) a (1, 1, T) mask and for feature vectors a (1, D) one, of grid * grid segments."""
    torch = require_torch()
    if inputs.dim() in (2, 3):
        d = inputs.shape[-1]
        groups = min(grid * grid, d)
        mask = (torch.arange(d, device=inputs.device) * groups // d)[None]
        return mask if inputs.dim() == 2 else mask[None]
    h, w = inputs.shape[-2:]
    gy, gx = min(grid, h), min(grid, w)
    rows = torch.arange(h, device=inputs.device) * gy // h
    cols = torch.arange(w, device=inputs.device) * gx // w
    return (rows[:, None] * gx + cols[None, :])[None, None]


def _stream_seed() -> int:
    """A seed from the global torch generator, for callers that give no seed (it is seeded for the pass)."""
    torch = require_torch()
    return int(torch.randint(0, 2**62, (1,)))


def run_captum(spec: MethodSpec, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor | None,
               options: dict[str, Any], *, seed: int | None = None,
               index: int | Sequence[int] | torch.Tensor = 0) -> torch.Tensor:
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
        # one baseline per input of the check (see maps.options.check_baselines): these inputs' own
        options = {**options, "baselines": baselines[image_ids(index, inputs.shape[0])]}
    ids = image_ids(index, inputs.shape[0])
    if spec.name == "meaningful_perturbation":  # its own optimizer, batched; each image's start seeded
        if seed is None:
            seed = _stream_seed() if draws_random(spec, options) else 0
        return meaningful_perturbation(model, inputs, target, options, seed=seed, ids=ids)
    if not draws_random(spec, options):
        return _run_captum_chunk(spec, model, inputs, target, options, ids)
    if seed is None:
        seed = _stream_seed()
    targets = target.reshape(-1).expand(inputs.shape[0]) if target is not None else None
    maps = []
    for row, image in enumerate(ids):
        with pass_seeded(image_seed(seed, image, spec.name, options), inputs.device):
            maps.append(_run_captum_chunk(spec, model, inputs[row:row + 1], None if targets is None
                                          else targets[row:row + 1], options, [image]))
    return torch.cat(maps) if len(maps) > 1 else maps[0]


def _in_dtype_of(model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """``model``, or for half-precision inputs a forward function that casts its input to their dtype.

    captum's NoiseTunnel (SmoothGrad, GradientSHAP) adds float32 noise, which turns float16 and
    bfloat16 inputs into float32 ones that a half-precision model refuses; the cast feeds the
    model the noisy inputs in its own dtype (the gradients come back in float32).
    """
    torch = require_torch()
    if inputs.dtype not in (torch.float16, torch.bfloat16):
        return model
    dtype = inputs.dtype

    def forward(batch: Any, *per_example: Any) -> Any:
        return model(batch.to(dtype), *per_example)

    return forward


@contextlib.contextmanager
def _spatial_layer_guard(method: str, model: torch.nn.Module, layer: torch.nn.Module, given: Any,
                         inputs: torch.Tensor) -> Iterator[None]:
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

    def check(module: Module, args: Any, output: Any) -> None:
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


def _run_captum_chunk(spec: MethodSpec, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor | None,
                      options: dict[str, Any], rows: Any) -> torch.Tensor:
    """One captum call on ``inputs`` (for methods that draw: one image, its generators seeded).

    captum runs :func:`captum_forward`'s module (the model's selected scores, the per-input
    forward arguments of ``rows`` as ``additional_forward_args``); layers are the model's own.
    """
    import captum.attr as ca

    torch = require_torch()
    o = {**spec.defaults, **options}
    name = spec.name
    forward, extra = captum_forward(model, rows, inputs.shape[0])
    common = {"target": target, "additional_forward_args": extra}
    if current_call().modality == "text":
        return _run_text_chunk(ca, spec, model, forward, inputs, o, common)
    if name == "saliency":
        return ca.Saliency(forward).attribute(inputs, abs=o["abs"], **common)
    if name == "input_x_gradient":
        return ca.InputXGradient(forward).attribute(inputs, **common)
    if name == "integrated_gradients":
        return ca.IntegratedGradients(forward).attribute(
            inputs, baselines=zero_or(o["baselines"], inputs), n_steps=o["n_steps"],
            method=o["integration_method"], internal_batch_size=o["internal_batch_size"], **common,
        )
    if name == "smoothgrad":
        stdev = smoothgrad_stdev(o, inputs)  # one image: its own range
        return ca.NoiseTunnel(ca.Saliency(_in_dtype_of(forward, inputs))).attribute(
            inputs, nt_type="smoothgrad", nt_samples=o["nt_samples"], stdevs=stdev,
            nt_samples_batch_size=o["nt_samples_batch_size"], abs=False, **common,
        )
    if name == "guided_backprop":
        return ca.GuidedBackprop(forward).attribute(inputs, **common)
    if name == "deconvolution":
        return ca.Deconvolution(forward).attribute(inputs, **common)
    if name == "gradcam":
        layer = find_layer(model, o["layer"])
        with _spatial_layer_guard(name, model, layer, o["layer"], inputs):
            cam = ca.LayerGradCam(forward, layer).attribute(inputs, relu_attributions=o["relu_attributions"], **common)
        if inputs.dim() == 4:
            cam = ca.LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), o["interpolate_mode"])
        elif inputs.dim() == 3 and cam.dim() == 3:  # a Conv1d layer's (N, 1, T') map, to the series' length
            mode = "linear" if o["interpolate_mode"] in ("bilinear", "bicubic") else o["interpolate_mode"]
            cam = ca.LayerAttribution.interpolate(cam, (inputs.shape[-1],), mode)
        return cam
    if name == "guided_gradcam":
        layer = find_layer(model, o["layer"])
        with _spatial_layer_guard(name, model, layer, o["layer"], inputs):
            return ca.GuidedGradCam(forward, layer).attribute(inputs, **common)
    if name == "deeplift":
        return ca.DeepLift(forward).attribute(inputs, baselines=zero_or(o["baselines"], inputs), **common)
    if name == "deep_lift_shap":
        return _run_deep_lift_shap(ca, forward, inputs, o["background"], common)
    if name == "gradient_shap":
        low, high = float(inputs.min()), float(inputs.max())  # one image: its own range
        n_random = max(int(o["n_baselines"]) - 1, 0)
        draws = torch.rand((n_random, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        baselines = torch.cat([torch.zeros_like(inputs[:1]), low + (high - low) * draws])
        return ca.GradientShap(_in_dtype_of(forward, inputs)).attribute(
            inputs, baselines=baselines, n_samples=o["n_samples"], stdevs=o["stdevs"], **common
        )
    if name == "occlusion":
        shape, strides = occlusion_windows(inputs, o)
        return ca.Occlusion(forward).attribute(
            inputs, sliding_window_shapes=shape, strides=strides, baselines=zero_or(o["baselines"], inputs),
            perturbations_per_eval=o["perturbations_per_eval"], **common,
        )
    return _run_perturbation_chunk(ca, name, forward, inputs, o, common)


def _run_deep_lift_shap(ca: Any, forward: Any, inputs: torch.Tensor, background: torch.Tensor | None,
                        common: dict[str, Any]) -> torch.Tensor:
    """captum's DeepLiftShap over ``background`` (checked by :func:`_check_background`), shared by the
    inputs; without one, image by image over a zero image and the image's blur (:func:`blurred_baseline`)."""
    torch = require_torch()
    explainer = ca.DeepLiftShap(forward)
    if background is not None:
        return explainer.attribute(inputs, baselines=background, **common)
    maps = []
    for row in range(inputs.shape[0]):
        image = inputs[row:row + 1]
        target, extra = common["target"], common["additional_forward_args"]
        maps.append(explainer.attribute(
            image, baselines=torch.cat([torch.zeros_like(image), blurred_baseline(image)]),
            target=None if target is None else target.reshape(-1).expand(inputs.shape[0])[row:row + 1],
            additional_forward_args=None if extra is None else tuple(e[row:row + 1] for e in extra)))
    return torch.cat(maps)


def _check_background(inputs: torch.Tensor, background: Any) -> None:
    """deep_lift_shap's ``background``: None (images only), or a tensor of B >= 2 inputs (B, *input
    shape) on the inputs' device and dtype."""
    torch = require_torch()
    if background is None:
        if inputs.dim() != 4:
            raise SaliencyUsageError(
                f"deep_lift_shap's default background (a zero image and a blurred copy) needs images (N, C, H, W), "
                f"got inputs of shape {tuple(inputs.shape)}. Pass background= a tensor of reference inputs "
                f"(B, {', '.join(map(str, inputs.shape[1:]))}) with B >= 2, e.g. training examples."
            )
        return
    one = tuple(inputs.shape[1:])
    if not isinstance(background, torch.Tensor) or background.dim() != inputs.dim() or \
            tuple(background.shape[1:]) != one or background.shape[0] < 2:
        shape = tuple(background.shape) if isinstance(background, torch.Tensor) else type(background).__name__
        raise SaliencyUsageError(
            f"deep_lift_shap's background must be a tensor of B >= 2 reference inputs of shape (B, "
            f"{', '.join(map(str, one))}), got {shape}. captum's DeepLiftShap averages DeepLIFT over them, "
            "so one reference is DeepLIFT itself: pass several (e.g. a batch of training examples)."
        )
    if background.device != inputs.device or background.dtype != inputs.dtype:
        raise SaliencyUsageError(
            f"deep_lift_shap's background is {background.dtype} on {background.device}, the inputs "
            f"{inputs.dtype} on {inputs.device}. Convert it with background.to(inputs)."
        )


def _run_perturbation_chunk(ca: Any, name: str, forward: Any, inputs: torch.Tensor, o: dict[str, Any],
                            common: dict[str, Any]) -> torch.Tensor:
    """Feature ablation, LIME and KernelSHAP over superpixel groups (``grid`` or ``feature_mask``)."""
    mask = o.get("feature_mask")
    if mask is None:
        mask = _grid_mask(inputs, int(o["grid"]))
    if name == "feature_ablation":
        return ca.FeatureAblation(forward).attribute(
            inputs, baselines=zero_or(o["baselines"], inputs), feature_mask=mask.expand_as(inputs),
            perturbations_per_eval=o["perturbations_per_eval"], **common,
        )
    if name == "lime":
        from captum._utils.models.linear_model import SkLearnLasso

        explainer = ca.Lime(forward, interpretable_model=SkLearnLasso(alpha=o["alpha"]))
    else:
        explainer = ca.KernelShap(forward)
    return explainer.attribute(
        inputs, baselines=o.get("baselines"), feature_mask=mask.expand(1, *inputs.shape[1:]), n_samples=o["n_samples"],
        perturbations_per_eval=o["perturbations_per_eval"], **common,
    )


#: The methods that explain token ids: gradient methods at the embedding's output (captum's layer
#: methods), perturbation methods by replacing tokens with the baseline token.
TEXT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "deeplift", "occlusion", "feature_ablation",
                "lime", "kernel_shap")


def check_text_method(spec: MethodSpec) -> None:
    """Refuse, for token inputs, a method that cannot explain them (see :data:`TEXT_METHODS`)."""
    if current_call().modality == "text" and spec.name not in TEXT_METHODS:
        raise SaliencyUsageError(
            f"{spec.name} cannot explain token ids: it needs gradients or noise with respect to the inputs "
            f"themselves (or a convolutional layer), and token ids are integers. Use one of "
            f"{', '.join(TEXT_METHODS)}."
        )


#: model -> the embedding module that reads its token ids (found once per model, see embedding_layer)
_EMBEDDINGS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def embedding_layer(model: torch.nn.Module, text: Text, inputs: torch.Tensor) -> torch.nn.Module:
    """The module whose output the text methods attribute to: ``text.embedding``, the model's only
    ``nn.Embedding``, or of several (token, position, segment embeddings) the one that reads the
    token ids themselves, found with one forward pass of the first input."""
    torch = require_torch()
    if text.embedding is not None:
        return find_layer(model, text.embedding)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not embeddings:
        raise SaliencyUsageError(
            f"{type(model).__name__} has no nn.Embedding for the token ids: the text methods attribute to the "
            "embedding's output. Pass modality=Text(embedding='<module name>') naming the module that turns "
            "token ids into vectors."
        )
    if len(embeddings) == 1:
        return embeddings[0]
    found = _EMBEDDINGS.get(model)
    if found is None:
        found = _EMBEDDINGS[model] = _token_embedding(model, embeddings, inputs[:1])
    return found


def _token_embedding(model: torch.nn.Module, embeddings: list[Any], ids: torch.Tensor) -> torch.nn.Module:
    """Of several embeddings, the first that is called on the token ids (a position embedding reads
    positions); an error naming them when none is."""
    torch = require_torch()
    readers: list[Any] = []

    def note(module: Any, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].shape == ids.shape and torch.equal(args[0], ids):
            readers.append(module)

    handles = [m.register_forward_pre_hook(note) for m in embeddings]
    try:
        with torch.no_grad(), model_in_eval_mode(model, True):
            call_model(model, ids, rows=[0])
    finally:
        for handle in handles:
            handle.remove()
    if not readers:
        names = [n for n, m in model.named_modules() if m in embeddings]
        raise SaliencyUsageError(
            f"{type(model).__name__} has {len(embeddings)} nn.Embedding modules ({', '.join(names)}) and none is called "
            "on the token ids themselves. Name the token embedding with modality=Text(embedding='<module name>')."
        )
    return readers[0]


def _run_text_chunk(ca: Any, spec: MethodSpec, model: torch.nn.Module, forward: Any, inputs: torch.Tensor,
                    o: dict[str, Any], common: dict[str, Any]) -> torch.Tensor:
    """Token ids (N, L): (N, L, E) attributions at the embedding's output for gradient methods,
    (N, L) ones for perturbation methods, which replace tokens by the baseline token."""
    torch = require_torch()
    name, text = spec.name, current_call().text or Text()
    check_text_method(spec)
    baseline = torch.full_like(inputs, text.baseline)
    if name in ("occlusion", "feature_ablation", "lime", "kernel_shap"):
        per_token = torch.arange(inputs.shape[1], device=inputs.device)[None]
        o = {**o, "feature_mask": per_token if o.get("feature_mask") is None else o["feature_mask"],
             "baselines": text.baseline}
        if name == "occlusion":
            shape, strides = occlusion_windows(inputs, o)
            return ca.Occlusion(forward).attribute(inputs, sliding_window_shapes=shape, strides=strides,
                                                   baselines=text.baseline,
                                                   perturbations_per_eval=o["perturbations_per_eval"], **common)
        return _run_perturbation_chunk(ca, name, forward, inputs, o, common)
    layer = embedding_layer(model, text, inputs)
    if name in ("integrated_gradients", "deeplift"):
        _check_baseline_tokens(forward, baseline, common["additional_forward_args"], text)
    if name == "saliency":
        grads = ca.LayerGradientXActivation(forward, layer, multiply_by_inputs=False).attribute(inputs, **common)
        return grads.abs() if o["abs"] else grads
    if name == "input_x_gradient":
        return ca.LayerGradientXActivation(forward, layer).attribute(inputs, **common)
    if name == "deeplift":
        return ca.LayerDeepLift(forward, layer).attribute(inputs, baselines=baseline, **common)
    return ca.LayerIntegratedGradients(forward, layer).attribute(
        inputs, baselines=baseline, n_steps=o["n_steps"], method=o["integration_method"],
        internal_batch_size=o["internal_batch_size"], **common,
    )


def _check_baseline_tokens(forward: Any, baseline: torch.Tensor, extra: Any, text: Text) -> None:
    """IG and DeepLIFT run the model on a sequence of baseline tokens (for its embeddings): the
    model must run on it. A model that masks padding may fail on an all-padding sequence
    (``nn.TransformerEncoder``'s nested tensors do), deep inside torch."""
    torch = require_torch()
    args = () if extra is None else tuple(e[:1] for e in extra)
    try:
        with torch.no_grad():
            forward(baseline[:1], *args)
    except RuntimeError as error:
        raise SaliencyUsageError(
            f"the baseline of integrated gradients and DeepLIFT is a sequence of token {text.baseline} only, and the "
            f"model cannot run on it ({type(error).__name__}: {str(error)[:160]}); a model that masks padding has "
            "nothing left to read in an all-padding sequence. Pass modality=Text(pad_token_id=..., "
            "baseline_token=<an unknown or mask token>)."
        ) from error


_RELU_RULE_METHODS = ("guided_backprop", "deconvolution", "guided_gradcam", "deeplift", "deep_lift_shap")


def _warn_if_relu_rules_cannot_apply(spec: MethodSpec, model: torch.nn.Module) -> None:
    """captum's ReLU-rule methods only hook ``nn.ReLU`` modules; ``F.relu`` gets the plain gradient."""
    torch = require_torch()
    if spec.name in _RELU_RULE_METHODS and not any(isinstance(m, torch.nn.ReLU) for m in model.modules()):
        warn_user(
            f"{spec.name}: {type(model).__name__} has no nn.ReLU module. captum applies this method's "
            "modified backward rule only to nn.ReLU modules, so with functional relu calls (F.relu, "
            "torch.relu) the maps are just the plain gradient. Use one nn.ReLU module per activation."
        )


def resolved_options(spec: MethodSpec, model: torch.nn.Module, inputs: torch.Tensor,
                     options: dict[str, Any]) -> dict[str, Any]:
    """Validate user options, size internal batches, and add the input-range facts some methods scale by."""
    check_text_method(spec)
    options = check_method_options(spec, inputs, options)
    if spec.name == "meaningful_perturbation":
        mp_settings(inputs, options)
    elif spec.name == "deep_lift_shap":
        _check_background(inputs, options.get("background"))
    _warn_if_relu_rules_cannot_apply(spec, model)
    auto_batching(spec, model, inputs, options)
    return options


def prepare_method(
    method: str | Explainer, model: torch.nn.Module, inputs: torch.Tensor, method_kwargs: dict[str, Any]
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
@passes_model_call
def explain(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    method: str | Explainer = "saliency",
    target: int | torch.Tensor | None = None,
    seed: int = 0,
    preset: str | MapPipeline | None = None,
    *,
    batch_size: int | None = None,
    eval_mode: bool = True,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> torch.Tensor:
    """Compute a batch of attribution maps with a named captum method or a user callable.

    Args:
        model: the ``nn.Module`` to explain; its state is left exactly as it was.
        inputs: a floating tensor (N, C, H, W) or (N, D) on the model's device.
        method: a name from :data:`pytest_saliency.maps.methods.METHODS` or a callable ``(model, inputs, target) -> attributions``.
        target: ``None`` (each input's predicted class), an int, or an integer tensor of shape (N,).
        seed: seeds the method's own randomness without touching global RNG state.
        preset: ``None`` returns raw attributions; a preset name or :class:`MapPipeline` returns
            post-processed maps of shape (N, H, W).
        batch_size: explain at most this many inputs per call (memory bound); ``None`` = all at once.
        eval_mode: run the model in ``eval()`` mode (restored afterwards).
        output: which part of the model's output holds the scores (a key, attribute, tuple index
            or callable); by default a tensor as is, or its ``.logits``. Every check takes it.
        forward_kwargs: keyword arguments for the model's forward; a tensor with one row per
            input (an attention mask) follows its inputs through every batch. Every check takes it.
        modality: what the inputs are: ``"image"`` (N, C, H, W), ``"tabular"`` (N, D), ``"sequence"``
            (N, C, T) or ``"text"``; ``None`` infers it from the inputs' shape. Every check takes it.
        **method_kwargs: the method's hyperparameters (see :data:`pytest_saliency.maps.methods.METHODS` for names and defaults).
    """
    check_model(model)
    check_inputs(inputs, model)
    check_count(batch_size, "batch_size", minimum=1, allow_none=True, hint=BATCH_SIZE_HINT)
    resolved, _, options = prepare_method(method, model, inputs, method_kwargs)
    target = resolve_target(model, inputs, target, batch_size, seed=seed)
    attributions = attribute(model, inputs, resolved, target, seed, batch_size, eval_mode, options)
    return attributions if preset is None else apply_pipeline(attributions, preset)


def _raise_reused_module_error(method: MethodSpec, exc: RuntimeError) -> None:
    """captum's DeepLIFT refuses a module called more than once in a forward pass (a shared ReLU):
    say which module and what to do, instead of captum's traceback from inside its hooks."""
    text = str(exc)
    if method.name not in ("deeplift", "deep_lift_shap") or "used more than once" not in text:
        return
    module = text.split("A Module ", 1)[-1].split(" was detected", 1)[0]
    raise SaliencyUsageError(
        f"{method.name} cannot explain this model: the module {module} is called more than once in one "
        "forward pass (a shared activation module, say), and captum's DeepLIFT keeps one input and "
        "output per module. Give each call its own module (e.g. one nn.ReLU per activation), or use "
        "another method (saliency, integrated_gradients, guided_backprop)."
    ) from exc


def _raise_non_finite_surrogate_error(method: MethodSpec, exc: ValueError) -> None:
    """LIME and KernelSHAP fit a surrogate to the model's outputs on perturbed inputs; scikit-learn
    refuses NaN among them. Say where the NaN comes from instead of scikit-learn's traceback."""
    if method.name not in ("lime", "kernel_shap") or "NaN" not in str(exc):
        return
    raise SaliencyUsageError(
        f"{method.name}: the model's output is NaN for some of the perturbed inputs the surrogate is fitted to "
        "(inputs with many features replaced by the baseline; for text, all tokens replaced by the baseline "
        "token, which a model that masks padding may turn into an empty, NaN-pooled sequence). Pick a baseline "
        "the model can read (for text: modality=Text(baseline_token=<an unknown or mask token>)), or make the "
        "model's forward finite on such inputs."
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
    model: torch.nn.Module, inputs: torch.Tensor, method: MethodSpec | Explainer, target: torch.Tensor, seed: int,
    batch_size: int | None, eval_mode: bool, options: dict[str, Any], *, prepared: bool = False,
    what: str = "", index: int | Sequence[int] | torch.Tensor = 0,
) -> torch.Tensor:
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
                except ValueError as exc:
                    _raise_non_finite_surrogate_error(method, exc)
                    raise
            else:
                call = current_call()
                explained = model if call.default else ScoresModule(model, call, rows=chunk_ids)
                out = method(explained, chunk.detach(), chunk_target)
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
