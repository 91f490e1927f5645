"""Smooth model parameter randomization (sMPRT; Hedström et al., "Sanity Checks Revisited", 2023).

Plain gradients are noisy: a small change of the input changes them a lot (shattered
gradients), and that noise makes MPRT's similarity scores vary with the draw of the randomized
weights. sMPRT denoises every explanation before comparing: the map of an input is the mean of
the method's raw attributions for ``n_samples`` copies of the input with Gaussian noise added
(noise std = ``noise_level`` x (max - min) of that input, Quantus's ``noise_magnitude``; with
``include_clean=True``, as in Quantus, the last copy is the clean input). The preset's
post-processing (absolute value, channel reduction, normalization) runs on the mean, then the
check is :func:`~pytest_saliency.checks.randomization.layer_randomization` on the smoothed maps,
cascading from the input upwards by default (Hedström et al.'s and Quantus's ``bottom_up``).

How the noise is drawn:

- **The same noise in every model state** (common random numbers): the original model and every
  randomized state explain the same noisy copies, so a difference between their maps is the
  model's doing, not a fresh draw's. Quantus draws new noise for every state; a map that ignores
  the model (an edge detector) then still "changes" between states, by noise alone.
- **Keyed by the input's content**: the draws of an input are seeded from the check's ``seed``,
  the number of draws and a digest of the input's values. The explainer
  (:class:`SmoothedExplainer`) is an ordinary ``(model, inputs, target)`` callable and is never
  told where its inputs sit among the check's; keyed by content, an input draws the same noise in
  every state, whatever batch of a loader it comes in, whatever ``batch_size`` or memory budget
  chunks it, and in any entry point the explainer is passed to.
- Drawn with a local generator on the inputs' device; no global RNG state changes.

Cost: each model state explains all noisy copies of a batch in as few captum calls as the memory
budget allows (``batch_size`` caps the copies per call). The randomized states are the ones
``layer_randomization`` makes (each layer randomized in place once per state); activation reuse
does not apply (the method is a callable).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..compare.statistics import (
    CONFIDENCE,
    N_BOOTSTRAP,
    SENSITIVITY_THRESHOLD,
    SSIM_THRESHOLD,
)
from ..core.forward import OutputSelector, ScoresModule, current_call, passes_model_call
from ..core.integrity import rng_isolated
from ..core.jsonable import jsonable
from ..core.rng import derive_seed
from ..core.torchtools import require_torch
from ..core.validation import (
    check_count,
    check_flag,
    check_model,
    check_number,
    check_seed,
    checked_inputs,
)
from ..exceptions import SaliencyUsageError, raise_if_failed
from ..maps.batching import ROW_OPTIONS, auto_batching
from ..maps.explainers import attribute, prepare_method
from ..maps.methods import Explainer, MethodSpec, draws_random
from ..maps.postprocess import MapPipeline
from ..reporting.protocol import Number
from .randomization import RandomizationResult, combine_randomization, layer_randomization
from .streaming import StreamSpec, capped_images, streams

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..core.stream import Inputs
    from ..engine.base import Progress

#: Quantus's SmoothMPRT defaults (``nr_samples``, ``noise_magnitude``), from Hedström et al.'s ImageNet runs.
N_SAMPLES = 50
NOISE_LEVEL = 0.1
CHECK = "smooth_layer_randomization"


@dataclass(frozen=True)
class SmoothedExplainer:
    """A method's raw attributions averaged over noisy copies of each input: sMPRT's denoised
    explanation, as a callable ``(model, inputs, target) -> attributions`` that any entry point
    takes as its ``method``. Build it with :func:`smoothed_explainer`, which validates the method's
    options and sizes the captum calls; the module docstring says how the noise is drawn.
    """

    method: MethodSpec | Explainer
    name: str
    options: dict[str, Any]
    n_samples: int = N_SAMPLES
    noise_level: float = NOISE_LEVEL
    include_clean: bool = True
    seed: int = 0
    copies_per_call: int | None = None  # None: every copy of a call's inputs in one captum call
    calls: list[int] = field(default_factory=list, compare=False, repr=False)  # copies of each captum call

    @property
    def __name__(self) -> str:  # the name a check's result and messages show
        return f"smoothed_{self.name}"

    @property
    def drawn(self) -> int:
        """Noisy copies per input (the clean copy, if included, draws nothing)."""
        return self.n_samples - int(self.include_clean)

    def describe(self) -> str:
        clean = " + the clean input" if self.include_clean else ""
        return (f"mean of {self.n_samples} raw maps per input ({self.drawn} noisy{clean}); noise std = "
                f"{self.noise_level:g} x (max - min) of the input, the same draws in every model state")

    def noise(self, inputs: torch.Tensor) -> torch.Tensor:
        """The standard normal draws of each input, ``(N, drawn, *input shape)`` float32 on the inputs'
        device; an input's draws depend only on its values, ``seed`` and ``drawn``."""
        torch = require_torch()
        if inputs.shape[0] == 0:
            return torch.empty((0, self.drawn, *inputs.shape[1:]), device=inputs.device)
        return torch.stack([self._draws(inputs[row], key) for row, key in enumerate(_digests(inputs))])

    def _draws(self, x: torch.Tensor, key: str) -> torch.Tensor:
        torch = require_torch()
        generator = torch.Generator(device=x.device)
        generator.manual_seed(derive_seed(self.seed, "smooth_mprt", self.drawn, key))
        return torch.randn((self.drawn, *x.shape), generator=generator, dtype=torch.float32, device=x.device)

    def scales(self, inputs: torch.Tensor) -> list[float]:
        """Each input's noise std: ``noise_level`` x its range (x 1 for a constant input, as SmoothGrad)."""
        flat = inputs.detach().reshape(inputs.shape[0], -1).double()
        ranges = (flat.max(dim=1).values - flat.min(dim=1).values).tolist()
        return [self.noise_level * (r if r > 0 else 1.0) for r in ranges]

    def copies(self, x: torch.Tensor, key: str, scale: float) -> torch.Tensor:
        """The ``n_samples`` copies of one input ``x``: its noisy copies, then (``include_clean``) ``x``."""
        torch = require_torch()
        x = x.detach()
        noisy = (x.to(torch.float32) + scale * self._draws(x, key)).to(x.dtype)
        return torch.cat([noisy, x[None]]) if self.include_clean else noisy

    def __call__(self, model: Any, inputs: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        torch = require_torch()
        # A check that calls its model with options hands in a ScoresModule that knows the inputs'
        # rows (their per-input forward arguments); the copies then run on the rows they copy.
        base, rows = (model.model, model.rows) if isinstance(model, ScoresModule) else (model, None)
        rows = list(range(inputs.shape[0])) if rows is None else [int(r) for r in rows]
        k, n = self.n_samples, inputs.shape[0]
        if target is None:
            raise SaliencyUsageError(
                f"{self.__name__} explains each input's copies for the input's class; it was called with target=None. "
                "Pass it to a check or to pytest_saliency.explain, which resolve the targets, or pass target=.")
        targets = torch.as_tensor(target, device=inputs.device).reshape(-1).expand(n)
        keys, scales = _digests(inputs), self.scales(inputs)
        per_call = self.copies_per_call or k * n
        done: list[Tensor] = []  # the finished means, one per input
        pending: list[Tensor] = []  # maps of the copies of inputs not finished yet, in order
        for start in range(0, k * n, per_call):
            stop = min(start + per_call, k * n)
            first, last = start // k, (stop - 1) // k
            batch = torch.cat([self.copies(inputs[r], keys[r], scales[r]) for r in range(first, last + 1)])
            batch = batch[start - first * k:stop - first * k]
            owners = [j // k for j in range(start, stop)]
            self.calls.append(stop - start)
            pending.extend(attribute(
                base, batch, self.method, targets[owners], self.seed, None, True,
                self.options, prepared=isinstance(self.method, MethodSpec), what=f"maps from {self.__name__!r}",
                index=[rows[i] for i in owners]).unbind(0))
            while len(pending) >= k:
                # Each input's mean is taken alone, over its copies in order: the same numbers
                # whichever captum call its copies were in.
                done.append(torch.stack(pending[:k]).mean(dim=0))
                del pending[:k]
        return torch.stack(done)


def _digests(inputs: torch.Tensor) -> list[str]:
    """A digest of each input's values (and its shape and dtype): the key of its noise draws."""
    torch = require_torch()
    flat = inputs.detach().contiguous().reshape(inputs.shape[0], -1)
    as_bytes = flat.view(torch.uint8).cpu().numpy() if flat.numel() else flat.cpu().numpy()
    tag = f"{tuple(inputs.shape[1:])}{inputs.dtype}".encode()
    return [hashlib.blake2b(tag + row.tobytes(), digest_size=16).hexdigest() for row in as_bytes]


def _copies_per_call(spec: MethodSpec, model: torch.nn.Module, inputs: torch.Tensor, options: dict[str, Any],
                     copies: int, budget: Any, given: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The method's options resized for ``copies`` inputs (captum's internal batches, the copies
    per call) by :func:`~pytest_saliency.maps.batching.auto_batching`; options the user set stay."""
    row_option = ROW_OPTIONS.get(spec.name)
    sized = {k: v for k, v in options.items() if k != "_image_batch" and (k != row_option or k in given)}
    sized["memory_budget"] = budget
    auto_batching(spec, model, inputs[:1].expand(copies, *inputs.shape[1:]), sized)
    return sized, sized.get("_image_batch")


def smoothed_explainer(model: torch.nn.Module, inputs: torch.Tensor, method: str | Explainer = "saliency", *,
                       n_samples: int = N_SAMPLES, noise_level: float = NOISE_LEVEL, include_clean: bool = True,
                       seed: int = 0, batch_size: int | None = None, **method_kwargs: Any) -> SmoothedExplainer:
    """The denoised explainer of sMPRT for ``method`` on inputs like ``inputs`` (see :class:`SmoothedExplainer`).

    ``method``: a method name or a callable ``(model, inputs, target)``; named methods that draw
    random numbers of their own (SmoothGrad, GradientSHAP, LIME, KernelSHAP, a uniform baseline)
    and per-input baseline tensors are refused (the noisy copies of an input are not the inputs
    those are drawn or given for). ``batch_size``: at most this many noisy copies per captum call;
    None sizes the calls from the method's ``memory_budget`` option (default ``"auto"``).
    """
    n_samples = check_count(n_samples, "n_samples", hint="It is how many copies of each input are averaged (Quantus: 50).")
    noise_level = check_number(noise_level, "noise_level", low=0.0,
                               hint="The noise std is noise_level x (max - min) of each input (Quantus: 0.1).")
    check_flag(include_clean, "include_clean")
    if include_clean and n_samples < 2:
        raise SaliencyUsageError(
            "n_samples=1 with include_clean=True averages the clean input alone, no noisy copy: plain MPRT under "
            "sMPRT's name. Pass n_samples >= 2 (Quantus: 50), or include_clean=False for one noisy copy.")
    batch_size = check_count(batch_size, "batch_size", allow_none=True,
                             hint="It bounds the noisy copies one captum call explains; None sizes them from memory.")
    if current_call().modality == "text":
        raise SaliencyUsageError(
            "smooth randomization adds Gaussian noise to the inputs, and token ids cannot take noise. For text "
            "models use layer_randomization (MPRT), or explain the embeddings with a model that takes them.")
    budget = method_kwargs.get("memory_budget", "auto")
    resolved, name, options = prepare_method(method, model, inputs, dict(method_kwargs))
    if isinstance(resolved, MethodSpec):
        _refuse_own_randomness(resolved, options, inputs)
        options, sized = _copies_per_call(resolved, model, inputs, options, n_samples * inputs.shape[0], budget,
                                          method_kwargs)
        batch_size = batch_size or sized
    return SmoothedExplainer(resolved, name, options, n_samples, noise_level, include_clean, check_seed(seed),
                             batch_size)


def _refuse_own_randomness(spec: MethodSpec, options: dict[str, Any], inputs: torch.Tensor) -> None:
    torch = require_torch()
    if draws_random(spec, options):
        raise SaliencyUsageError(
            f"smooth randomization averages {spec.name!r} over noisy copies of each input, but {spec.name!r} draws "
            "random numbers of its own (noise, samples or a uniform baseline), drawn per input, not per copy. Use "
            "a deterministic method (saliency, input_x_gradient, integrated_gradients, guided_backprop, gradcam, "
            "deeplift, occlusion); the average over noisy copies is already SmoothGrad's.")
    baselines = options.get("baselines")
    if isinstance(baselines, torch.Tensor) and baselines.dim() == inputs.dim() and baselines.shape[0] > 1:
        raise SaliencyUsageError(
            f"baselines for {spec.name} has one baseline per input ({tuple(baselines.shape)}), but smooth "
            "randomization explains noisy copies of the inputs, in calls that mix inputs. Pass one baseline for "
            "all inputs (shape (1, ...) or the input's shape), or 'zero'.")


@dataclass
class SmoothRandomizationResult(RandomizationResult):
    """sMPRT's outcome: :class:`~pytest_saliency.checks.randomization.RandomizationResult`'s numbers
    and verdict on the smoothed maps, with the smoothing (``n_samples``, ``noise_level``,
    ``include_clean``); its check kind is ``smooth_layer_randomization`` whatever the mode."""

    n_samples: int = N_SAMPLES
    noise_level: float = NOISE_LEVEL
    include_clean: bool = True
    smoothing: str = ""

    @property
    def check(self) -> str:
        return CHECK

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "n_samples": self.n_samples, "noise_level": self.noise_level,
                "include_clean": self.include_clean, "smoothing": self.smoothing}

    def numbers(self) -> dict[str, Number]:
        return {**super().numbers(), "n_samples": self.n_samples, "noise_level": self.noise_level}

    def summary(self) -> str:
        return f"{super().summary()}; {self.n_samples} samples, noise {self.noise_level:g}"

    def report(self) -> str:
        lines = super().report().split("\n")
        lines.insert(2, f"  smoothing:   {self.smoothing}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        return super().failure_message().replace(
            f"{self.method} maps", f"smoothed {self.method} maps (sMPRT, {self.n_samples} samples)", 1)


def _slim(part: SmoothRandomizationResult) -> SmoothRandomizationResult:
    return replace(part, original_maps=None, randomized_maps=None, figure_context={"modality": part.modality})


def _prepare_batch(arguments: dict[str, Any], seen: int) -> dict[str, Any] | None:
    """A cap on the inputs counts over the stream: a batch gets what is left of it (None: stop)."""
    images = arguments["images"]
    if isinstance(images, int) and not isinstance(images, bool):
        left = images - seen
        return None if left <= 0 else {"images": left}
    return {}


def _check_images(images: Any) -> str | int:
    if isinstance(images, str) and images == "all":
        return images
    return check_count(images, "images", hint="Pass 'all' or how many inputs to use (smooth randomization has no "
                                              "adaptive mode: each input costs n_samples explanations per state).")


@rng_isolated
@streams(StreamSpec(combine_randomization, _slim, _prepare_batch, carries=True, caps=capped_images))
@passes_model_call
def smooth_randomization(
    model: torch.nn.Module,
    inputs: Inputs,
    method: str | Explainer = "saliency",
    *,
    n_samples: int = N_SAMPLES,
    noise_level: float = NOISE_LEVEL,
    include_clean: bool = True,
    mode: str = "cascading",
    order: str = "bottom_up",
    layers: str | Sequence[str] = "leaf",
    depth: int = 1,
    randomization: str = "reinit",
    preset: str | MapPipeline | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    similarity: str | None = None,
    ssim_threshold: float = SSIM_THRESHOLD,
    sensitivity_threshold: float = SENSITIVITY_THRESHOLD,
    require_every_layer: bool = False,
    clip_negative_ssim: bool = True,
    confidence: float = CONFIDENCE,
    n_bootstrap: int = N_BOOTSTRAP,
    batch_size: int | None = None,
    images: str | int = "all",
    keep_maps: int = 4,
    constant_maps: str = "error",
    progress: Progress | None = None,
    reproduce: str = "",
    require_above_controls: bool = False,
    output: OutputSelector = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    modality: str | None = None,
    **method_kwargs: Any,
) -> SmoothRandomizationResult:
    """Smooth MPRT: :func:`~pytest_saliency.checks.randomization.layer_randomization` on maps
    averaged over ``n_samples`` noisy copies of each input (the module docstring has the details).

    Defaults as Quantus's ``SmoothMPRT``: 50 samples, noise std 0.1 x each input's range, the clean
    input as the last sample (``include_clean``), cascading randomization from the input upwards
    (``mode="cascading"``, ``order="bottom_up"``; any of ``layer_randomization``'s modes and
    orders may be chosen). The comparison is the modality's (SSIM for images, Spearman for
    tabular maps; ``similarity=`` picks another) after the preset's post-processing of the mean.

    Verdict (``result.passed``): as ``layer_randomization``'s, Sriram & Conati's Definition 3 on
    the (layers x inputs) similarities: S^I >= ``sensitivity_threshold``, and with
    ``require_every_layer`` every layer's mean similarity < ``ssim_threshold``; with
    ``require_above_controls`` clearly above the uninformative controls too
    (:mod:`pytest_saliency.checks.controls`).

    ``batch_size``: at most this many noisy copies per captum call (None: the method's
    ``memory_budget``, default ``"auto"``, decides). ``images``: ``"all"`` or how many inputs to
    use (over a whole loader). Text inputs are refused (token ids take no noise). The model is
    bit-identical afterwards and no global RNG state changes.
    """
    check_model(model)
    inputs = checked_inputs(inputs, model)
    images = _check_images(images)
    start = time.perf_counter()
    count = inputs.shape[0] if images == "all" else min(int(images), inputs.shape[0])
    explainer = smoothed_explainer(model, inputs[:count], method, n_samples=n_samples, noise_level=noise_level,
                                   include_clean=include_clean, seed=seed, batch_size=batch_size, **method_kwargs)
    name = explainer.name
    reproduce = reproduce or (
        f"pytest_saliency.smooth_randomization(model, inputs, method={name!r}, n_samples={explainer.n_samples}, "
        f"noise_level={explainer.noise_level:g}, include_clean={explainer.include_clean}, mode={mode!r}, "
        f"order={order!r}, preset={getattr(preset, 'name', preset)!r}, seed={seed}, images={images!r})")
    base = layer_randomization(
        model, inputs, explainer, mode=mode, order=order, layers=layers, depth=depth, randomization=randomization,
        preset=preset, target=target, seed=seed, similarity=similarity, ssim_threshold=ssim_threshold,
        sensitivity_threshold=sensitivity_threshold, require_every_layer=require_every_layer,
        clip_negative_ssim=clip_negative_ssim, confidence=confidence, n_bootstrap=n_bootstrap, images=images,
        keep_maps=keep_maps, constant_maps=constant_maps, progress=progress, reproduce=reproduce, output=output,
        forward_kwargs=forward_kwargs, modality=modality, require_above_controls=require_above_controls)
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    values.update(method=name, method_options={k: jsonable(v) for k, v in explainer.options.items()
                                               if not k.startswith("_") and k != "memory_budget"},
                  seconds=time.perf_counter() - start)
    return SmoothRandomizationResult(**values, n_samples=explainer.n_samples, noise_level=explainer.noise_level,
                                     include_clean=explainer.include_clean, smoothing=explainer.describe())


@rng_isolated
@passes_model_call
def assert_sensitive_to_smooth_randomization(
    model: torch.nn.Module, inputs: Inputs, method: str | Explainer = "saliency", **options: Any
) -> SmoothRandomizationResult:
    """Smooth MPRT as a gate: the smoothed maps must change as the layers are randomized
    (cascading, bottom-up by default). Options are :func:`smooth_randomization`'s. Returns the
    result when it passes; raises :class:`~pytest_saliency.exceptions.SaliencyCheckFailed` with
    the per-layer table otherwise."""
    __tracebackhide__ = True
    result = smooth_randomization(model, inputs, method, **options)
    return raise_if_failed(result)


__all__ = [
    "CHECK",
    "NOISE_LEVEL",
    "N_SAMPLES",
    "SmoothRandomizationResult",
    "SmoothedExplainer",
    "assert_sensitive_to_smooth_randomization",
    "smooth_randomization",
    "smoothed_explainer",
]
