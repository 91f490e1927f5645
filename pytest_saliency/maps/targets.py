"""The class a map explains (the target) and the layer a layer method reads.


``target=None`` means the class the model predicts for each input. The randomization checks
resolve it once on the *original* model and hold it fixed for every randomized variant (Sriram &
Conati: explanations are computed "for the original prediction").
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.forward import call_model, current_call
from ..core.rng import pass_seeded
from ..core.torchtools import model_in_eval_mode, require_torch
from ..core.validation import unknown_choice
from ..exceptions import SaliencyUsageError
from .batching import chunks, output_classes

if TYPE_CHECKING:
    import torch


def last_conv_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The last ``Conv2d`` in registration order, the usual GradCAM layer (``Conv1d`` for series)."""
    torch = require_torch()
    series = current_call().modality == "sequence"
    kind = torch.nn.Conv1d if series else torch.nn.Conv2d
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    if not convs:
        raise SaliencyUsageError(
            f"{type(model).__name__} has no nn.{kind.__name__} layer for GradCAM. Pass layer='<module name>' "
            "naming the layer whose activations GradCAM should use, or choose a non-layer method."
        )
    return convs[-1]


def find_layer(model: torch.nn.Module, layer: str | torch.nn.Module | None) -> torch.nn.Module:
    """The module ``layer`` names (a name from ``named_modules``, or the module itself); None: the last
    ``Conv2d`` (:func:`last_conv_layer`)."""
    if layer is None:
        return last_conv_layer(model)[1]
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise unknown_choice("layer", layer, [n for n in modules if n])
        return modules[layer]
    return layer


def predicted_targets(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int | None = None,
                      seed: int = 0) -> torch.Tensor:
    """The class each input is predicted as: the default, fixed target of every check.

    Seeded like an explanation pass (a model that draws random numbers predicts reproducibly).
    """
    torch = require_torch()
    with torch.no_grad(), model_in_eval_mode(model, True), pass_seeded(seed, inputs.device):
        outputs, first = [], 0
        for chunk in chunks(inputs, batch_size):
            outputs.append(call_model(model, chunk, rows=range(first, first + chunk.shape[0])))
            first += chunk.shape[0]
    return targets_from_outputs(torch.cat(outputs))


def targets_from_outputs(out: Any) -> torch.Tensor:
    """The predicted class of each row of (N, num_classes) scores (an error for other shapes)."""
    torch = require_torch()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SaliencyUsageError(
            f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; target=None needs (N, num_classes) "
            "scores to take the predicted class. Pass target= explicitly or return logits of shape (N, K)."
        )
    return out.argmax(dim=1)


def resolve_target(
    model: torch.nn.Module, inputs: torch.Tensor, target: Any, batch_size: int | None = None,
    outputs: torch.Tensor | None = None, seed: int = 0,
) -> torch.Tensor:
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
    if isinstance(target, str) and target == "labels":
        raise SaliencyUsageError(
            "target='labels' explains each example's label as the batches of a loader carry it; these inputs are "
            f"one tensor. Pass the labels themselves, target=labels (an integer tensor of shape ({n},)), or the "
            "inputs as a DataLoader of (inputs, labels) batches.")
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
