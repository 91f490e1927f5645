"""Plain-gradient maps for many randomized states without recomputing the unchanged prefix.

When a randomization check randomizes layer ``k`` (alone, or with the layers after it), every
module that finished running before ``k`` started computes exactly what it computed for the
original model: its inputs and parameters are the same. The original model's forward pass is
therefore run once with its autograd graph kept; in each randomized state those modules return
their recorded outputs instead of running again, and the gradient flows through the recorded
graph back to the inputs. Only the part of the forward pass from ``k`` on is recomputed, so an
IPR check over L layers costs less than (L + 1) full forward and backward passes: below the
"floor" of the straightforward loop.

Memory stays at about one graph. Only outputs that the graph saves anyway are kept (a module
whose output nothing saves, such as a BatchNorm feeding a ReLU, runs again instead), and the states run from the last layer to the first, and before
each state the recorded outputs of modules that end after the new cut are dropped, which frees
the part of the original graph that only they kept alive. At every moment the kept prefix and the
recomputed suffix together cover one forward pass.

Where it applies (:func:`reusable`): the named methods ``saliency`` and ``input_x_gradient``
(whose maps are the input gradient, computed here exactly as captum computes them: the gradient
of the selected logits with respect to the inputs), a model output of shape (N, num_classes), no
parameter shared between modules, and a model whose modules do not keep state between calls. A
module is reused only if it ran exactly once and returned a tensor or a tuple of tensors that no
later in-place operation changes (the BatchNorm before an ``nn.ReLU(inplace=True)`` runs again;
its inputs are reused). Before trusting the recorded outputs, :meth:`GradientReplay.verify` recomputes the logits
with the largest cut and compares them with the original ones; any difference switches the check
back to full passes. ``layer_randomization(..., reuse_activations=False)`` turns it off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ._torch import require_torch
from .layers import ForwardTrace

GRADIENT_METHODS = ("saliency", "input_x_gradient")


def reusable(model: Any, trace: ForwardTrace, method: Any, options: dict[str, Any], batch_size: int | None,
             images_per_call: int) -> bool:
    """Whether :class:`GradientReplay` can compute ``method``'s maps for this model and batch."""
    torch = require_torch()
    from .explainers import MethodSpec

    if not isinstance(method, MethodSpec) or method.name not in GRADIENT_METHODS:
        return False
    if not isinstance(trace.output, torch.Tensor) or trace.output.dim() != 2 or not trace.replayable:
        return False
    chunk = batch_size or options.get("_image_batch")
    if chunk and chunk < images_per_call:  # the caller bounds the batch: keep captum's chunked path
        return False
    if isinstance(model, torch.jit.ScriptModule):
        return False
    # A parameter shared by two modules would change inside the reused prefix too.
    return len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters()))


class _Replay:
    """Stands in for a module's ``forward``: returns the recorded output."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


class GradientReplay:
    """Input-gradient maps of one batch, for the original model and then for each randomized state.

    ``target``: one class per input, or None for the original model's predicted classes (taken
    from the original pass's logits, which saves the separate forward pass that finds them).

    Use :meth:`original` first, then :meth:`verify`, then :meth:`maps` once per state with the
    state's cut (the trace's start event of the earliest randomized module). Cuts should not
    increase from one call to the next; if they do, the result stays correct but less is reused.
    """

    def __init__(self, model: Any, trace: ForwardTrace, inputs: Any, target: Any, method: str,
                 options: dict[str, Any]) -> None:
        self.model = model
        self.trace = trace
        self.x = inputs.detach().requires_grad_(True)
        self.target = None if target is None else target.reshape(-1)
        self.times_input = method == "input_x_gradient"
        self.absolute = method == "saliency" and bool(options.get("abs", False))
        self.modules = dict(model.named_modules())
        self.recorded: dict[str, Any] = {}
        self.logits: Any = None

    def original(self) -> Any:
        """The original model's maps; records every reusable module's output and keeps the graph."""
        torch = require_torch()
        handles = []

        def record(name: str) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                self.recorded[name] = output

            return hook

        saved: set[int] = set()

        def pack(tensor: Any) -> Any:
            saved.add(tensor.untyped_storage().data_ptr())
            # detached, as autograd itself stores saved outputs: the tensor would otherwise hold
            # its own grad_fn and the graph would live until the garbage collector finds the cycle
            return tensor.detach()

        try:
            for name in self.trace.replayable:
                handles.append(self.modules[name].register_forward_hook(record(name)))
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = self.model(self.x)
        finally:
            for handle in handles:
                handle.remove()
        # Keep only outputs the graph holds anyway: a module whose output nothing saves (a
        # BatchNorm feeding a ReLU, which saves its own output) is cheaper to run again than to keep.
        for name, output in list(self.recorded.items()):
            tensors = output if isinstance(output, tuple) else (output,)
            if not all(t.untyped_storage().data_ptr() in saved for t in tensors):
                del self.recorded[name]
        self.logits = out.detach()
        if self.target is None:
            from .explainers import targets_from_outputs

            self.target = targets_from_outputs(self.logits)
        return self._gradient(out)

    def verify(self, cut: int) -> bool:
        """Recompute the logits from the recorded outputs before ``cut``; True if they are the same."""
        torch = require_torch()
        with torch.no_grad(), self._replaying(cut):
            logits = self.model(self.x)
        if not isinstance(logits, torch.Tensor) or logits.shape != self.logits.shape:
            return False
        scale = float(self.logits.abs().max()) if self.logits.numel() else 0.0
        return bool(torch.allclose(logits, self.logits, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))

    def maps(self, cut: int) -> Any:
        """Maps of the model as it is now, whose modules that ended before ``cut`` are unchanged."""
        torch = require_torch()
        for name in [n for n in self.recorded if self.trace.end[n] >= cut]:
            del self.recorded[name]  # frees the part of the original graph only it kept alive
        with self._replaying(cut), torch.enable_grad():
            out = self.model(self.x)
        return self._gradient(out)

    def close(self) -> None:
        """Drop the recorded outputs and with them the original graph."""
        self.recorded.clear()
        self.logits = None

    @contextlib.contextmanager
    def _replaying(self, cut: int) -> Iterator[None]:
        """Make the outermost recorded modules that ended before ``cut`` return their outputs."""
        done = {n for n in self.recorded if self.trace.end[n] < cut}
        outermost = [n for n in done if not any(a in done for a in _ancestors(n))]
        patched = []
        try:
            for name in outermost:
                module = self.modules[name]
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _Replay(self.recorded[name])
            yield
        finally:
            for module, previous in patched:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _gradient(self, out: Any) -> Any:
        """captum's Saliency / InputXGradient: d(selected logits)/d(inputs) (times the inputs)."""
        torch = require_torch()
        selected = out.gather(1, self.target[:, None]).sum()
        grad = None
        if selected.requires_grad:
            (grad,) = torch.autograd.grad(selected, self.x, retain_graph=True, allow_unused=True)
        if grad is None:  # the output does not depend on the inputs at all
            grad = torch.zeros_like(self.x)
        if self.times_input:
            grad = grad * self.x.detach()
        if self.absolute:
            grad = grad.abs()
        return grad.detach()


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


__all__ = ["GRADIENT_METHODS", "GradientReplay", "reusable"]
