"""How many inputs, steps, samples or perturbations one forward pass sees: the memory budget.


One row of a batch (an input, an interpolation step, a noisy sample, a perturbation) costs about
three times its forward activations (kept for backward, plus gradients); a one-image probe pass
measures those activations (:func:`activation_bytes_per_input`), and :func:`auto_batching` sizes
captum's internal batches and the image chunks of a pass (:func:`chunks`) to the budget.
"""


from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from ..core.forward import call_model
from ..core.torchtools import model_in_eval_mode, module_settings, require_torch
from ..core.validation import check_count, is_real
from ..exceptions import SaliencyUsageError
from .methods import MethodSpec

if TYPE_CHECKING:
    import torch
    from torch.nn import Module  # for functions whose local ``torch`` is require_torch()'s

#: How a ``batch_size`` error explains the argument.
BATCH_SIZE_HINT = "It is how many inputs one explainer call sees; None explains all at once."


def chunks(tensor: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """``tensor`` split along its first dimension into pieces of ``size`` rows (None: one piece)."""
    size = check_count(size, "batch_size", minimum=1, allow_none=True, hint=BATCH_SIZE_HINT)
    if size is None or size >= tensor.shape[0]:
        return [tensor]
    return list(tensor.split(size))


#: Methods whose cost multiplies the batch (steps, samples, perturbations) and the captum option
#: that bounds how many rows one forward pass sees.
ROW_OPTIONS = {
    "integrated_gradients": "internal_batch_size",
    "smoothgrad": "nt_samples_batch_size",
    "occlusion": "perturbations_per_eval",
    "feature_ablation": "perturbations_per_eval",
    "lime": "perturbations_per_eval",
    "kernel_shap": "perturbations_per_eval",
}
#: The memory budget on the CPU (``memory_budget="auto"``).
CPU_MEMORY_BUDGET = 1 * 2**30


def memory_budget_bytes(budget: Any, device: torch.device | str) -> int:
    """``"auto"``: half the free memory of a CUDA device, 1 GiB on the CPU; or an explicit byte count."""
    torch = require_torch()
    if budget == "auto":
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.5)
        return CPU_MEMORY_BUDGET
    if is_real(budget) and budget > 0:
        return int(budget)
    raise SaliencyUsageError(f"memory_budget must be 'auto' or a positive number of bytes, got {budget!r}.")


#: Per model, the probed :func:`activation_bytes_per_input` by what the probe depends on (see
#: :func:`_probe_key`), with the number of classes the model scores (:func:`output_classes`).
#: Weak keys: a model's entries go when the model does. Memory sizing and the target's range
#: check read it, never a result.
_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, tuple[int, int | None]]] = weakref.WeakKeyDictionary()


def activation_bytes_per_input(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Bytes of all module outputs for one input: what one row of a batch costs to keep for backward.

    Probed with a one-image forward pass the first time a model meets an input, and remembered
    while nothing the output sizes could depend on changes (:func:`_probe_key`): a test session
    runs several checks on the same model, which then pay for one probe.
    """
    return _probe(model, example)[0]


def output_classes(model: torch.nn.Module, example: torch.Tensor) -> int | None:
    """How many classes the model scores: the width of its (1, K) output for one input, or None
    for another output shape or a model the probe cannot run (the real pass reports why).
    Read from the memory probe's remembered pass (:func:`activation_bytes_per_input`)."""
    try:
        return _probe(model, example)[1]
    except Exception:  # noqa: BLE001 - only a check's convenience; the explanation pass reports errors
        return None


def _probe(model: torch.nn.Module, example: torch.Tensor) -> tuple[int, int | None]:
    try:
        key = _probe_key(model, example)
        cached = _PROBED.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: probe every time
        return _probe_activation_bytes(model, example)
    if key not in cached:
        cached[key] = _probe_activation_bytes(model, example)
    return cached[key]


def _probe_key(model: torch.nn.Module, example: torch.Tensor) -> tuple[Any, ...]:
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


def _probe_activation_bytes(model: torch.nn.Module, example: torch.Tensor) -> tuple[int, int | None]:
    """The bytes of one input's module outputs, and the width of a (1, K) model output (else None)."""
    torch = require_torch()
    total = 0

    def hook(module: Module, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if next(m.children(), None) is None
              and not isinstance(m, torch.jit.ScriptModule)]  # scripted modules take no hooks
    handles: list[Any] = []
    try:
        handles.extend(m.register_forward_hook(hook) for m in leaves)
        with torch.no_grad(), model_in_eval_mode(model, True):
            out = call_model(model, example, rows=[0])
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


def auto_batching(spec: MethodSpec, model: torch.nn.Module, inputs: torch.Tensor, options: dict[str, Any]) -> None:
    """Size internal batches (IG steps, SmoothGrad samples, perturbations) and image chunks to the memory budget.

    One row (an input, an interpolation step, a noisy sample, a perturbation) costs about three
    times its forward activations (kept for backward, plus gradients). Options the user set are
    left alone. Images are explained one chunk at a time (``_image_batch``) when all of them at
    once would exceed the budget: for gradient methods when one row per image does not fit (many
    large images), for the others when even one image's rows do not fit.
    """
    option = ROW_OPTIONS.get(spec.name)
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
