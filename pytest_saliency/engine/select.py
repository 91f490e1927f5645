"""Which engine computes a check's maps: chosen here, once per check, and nowhere else.

:func:`engine_for` runs the check's traced forward pass and picks the engine; :meth:`Engines.batches`
then hands out one :class:`pytest_saliency.engine.base.MapEngine` per batch of images:

* ``reuse_activations=False``: the plain path (:class:`~pytest_saliency.engine.base.PlainEngine`)
  and nothing else;
* the gradient methods of :data:`pytest_saliency.engine.replay.GRADIENT_METHODS`: activation replay
  (:class:`~pytest_saliency.engine.replay.ReplayEngine`) where :func:`~pytest_saliency.engine.replay.reusable`
  allows it;
* occlusion: state stacks (:class:`~pytest_saliency.engine.stacks.StackEngine`) where the model can
  be replayed, the states can be stacked and their maps fit the memory budget;
* the plain path for every other method, and for a model that draws random numbers itself (its
  full passes draw the same numbers in every state; a replay would skip the draws of the part it
  reuses and shift the rest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..core.forward import current_call
from ..core.rng import generator_states, pass_seeded, same_generator_states
from ..core.stream import remembered
from ..maps.batching import memory_budget_bytes
from ..model.layers import ForwardTrace, trace_forward
from ..model.randomize import LayerDraws
from .base import CannotReplay, Explanation, MapEngine, PlainEngine, Progress, States
from .replay import GRADIENT_METHODS, GradientReplay, ReplayEngine, replayable_model, reusable
from .stacks import FORWARD_METHODS, StackEngine, stackable

if TYPE_CHECKING:
    import torch

#: Up to this fraction (1 / DRAW_SHARE) of the memory budget holds drawn layer values and their
#: originals (:class:`pytest_saliency.model.randomize.LayerDraws`).
DRAW_SHARE = 256
#: Methods whose replay feeds the images themselves: their recording pass can be the traced pass.
TRACED_RECORDING = ("saliency", "input_x_gradient")


def engine_for(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation, *, reuse_activations: bool,
               step: int, batched: bool, memory_budget: object = "auto") -> Engines:
    """The engine of one check, and the check's traced forward pass (:attr:`Engines.trace`).

    ``step``: images per batch (all of them, or ``image_batch`` when ``batched``: the adaptive
    modes decide after each batch); the engine may make it smaller. ``memory_budget``: the
    method's option, which bounds the state stacks and the layer draws kept.
    """
    name = explanation.name
    # Per-input forward arguments follow the inputs through captum's batches, not through the
    # engines' recorded passes: those checks explain with the plain engine.
    # Token ids are explained at the embedding by captum's layer methods, which the engines do not replay.
    reuse_activations = reuse_activations and not current_call().per_example and current_call().modality != "text"
    gradients = reuse_activations and explanation.named and name in GRADIENT_METHODS
    recording = None
    if gradients and name in TRACED_RECORDING and _one_batch(inputs, explanation, batched):
        recording = _recorded(model, inputs, explanation)
    trace, model_draws = (recording.trace, False) if recording is not None else _traced(model, inputs, explanation)
    kind = "plain"
    if gradients and not model_draws:
        # The replay explains one chunk of images at a time (batch_size, or the memory budget's
        # chunk); in the adaptive modes only if a chunk holds a whole image_batch.
        chunk = explanation.chunk
        replay_step = min(step, chunk) if chunk and not batched else step
        if reusable(model, trace, explanation.method, explanation.options, explanation.batch_size,
                    min(replay_step, inputs.shape[0])):
            kind, step = "replay", replay_step
    elif (reuse_activations and explanation.named and name in FORWARD_METHODS and not model_draws
          and replayable_model(model, trace)):
        kind = "stack"  # if the states can be stacked and fit: see Engines.batches
    if recording is not None and kind != "replay":
        recording.close()
        recording = None
    return Engines(inputs, explanation, trace, kind=kind, step=step, batched=batched, memory_budget=memory_budget,
                   model_draws=model_draws, recording=recording)


def _one_batch(inputs: torch.Tensor, explanation: Explanation, batched: bool) -> bool:
    """Whether the check explains all its images in one explainer call."""
    batch_size = explanation.batch_size
    return not batched and not explanation.options.get("_image_batch") and (
        not batch_size or batch_size >= inputs.shape[0])


def _recorded(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation) -> GradientReplay | None:
    """The replay's recording pass over all the images, which is also the check's traced pass; None
    if it cannot record (then the plain traced pass runs, and reports an error of the model's)."""
    recording = GradientReplay(model, inputs, None, explanation.name, explanation.options, explanation.seed)
    try:
        recording.record()
    except CannotReplay:
        recording.close()
        return None
    return recording


def _traced(model: torch.nn.Module, inputs: torch.Tensor, explanation: Explanation) -> tuple[ForwardTrace, bool]:
    """The check's traced forward pass, and whether the model drew random numbers in it.

    In chunks of the memory budget's size at most: the traced chunk keeps every module's output.
    Seeded like every explanation pass (the recording too), so the predicted targets of a model
    that draws random numbers (dropout left on) do not depend on the engine.
    """
    with pass_seeded(explanation.seed, inputs.device):
        generators = generator_states(inputs.device)
        trace = trace_forward(model, inputs, explanation.chunk)
        return trace, not same_generator_states(generators, generator_states(inputs.device))


class Engines:
    """The engine :func:`engine_for` chose for a check (``kind``: ``"plain"``, ``"replay"`` or
    ``"stack"``), and the check's traced forward pass (``trace``: the execution order and the
    predicted targets).

    When the traced pass was the replay's recording, it is held (with its autograd graph) until
    the first batch's engine takes it; :meth:`close`, or leaving a ``with`` block, drops it if no
    engine did (a check that stops before its first batch, e.g. on an unknown layer name).
    """

    def __init__(self, inputs: torch.Tensor, explanation: Explanation, trace: ForwardTrace, *, kind: str, step: int,
                 batched: bool, memory_budget: object, model_draws: bool,
                 recording: GradientReplay | None = None) -> None:
        self.inputs, self.explanation, self.trace = inputs, explanation, trace
        self.kind, self.step, self.batched = kind, step, batched
        self.memory_budget, self.model_draws = memory_budget, model_draws
        self.recording = recording  # the first batch's replay, recorded by the traced pass
        self._reused = False
        self._current: MapEngine | None = None

    def close(self) -> None:
        """Drop the recording no batch engine took (the engines that took it close it themselves)."""
        if self.recording is not None:
            self.recording.close()
            self.recording = None

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def reused(self) -> bool:
        """Whether any batch's maps came from reusing the original model's work."""
        return self._reused or (self._current is not None and self._current.reused)

    def batches(self, states: States, target: torch.Tensor, progress: Progress | None = None) -> Iterator[MapEngine]:
        """One engine per batch of images, in order (``target``: one class per image)."""
        kind, step = self._fitted(states)
        if kind != "stack":  # each layer's randomized values, drawn once up front (see LayerDraws)
            limit = memory_budget_bytes(self.memory_budget, self.inputs.device) // DRAW_SHARE
            # the same for every batch of a stream: drawn for the first, kept for the others
            key = ("layer_draws", tuple((name, id(module)) for name, module in states.stages), states.strategy,
                   states.seed, limit)
            draws = remembered(key, lambda: LayerDraws(states.stages, states.strategy, states.seed, limit_bytes=limit))
            states = dataclasses.replace(states, draws=draws)
        explained, n = 0, self.inputs.shape[0]
        for first in range(0, n, step):
            if self._current is not None:
                explained += self._current.explained
                self._reused = self.reused
                if isinstance(self._current, StackEngine) and self._current.fell_back:
                    kind = "plain"  # (what stopped the stack stops it for every batch)
            x, t = self.inputs[first:first + step], target[first:first + step]
            # Each image's index in the inputs seeds its random draws (noise, a uniform baseline),
            # so its maps depend neither on the batch nor on the images left out.
            ids = list(range(first, first + x.shape[0]))
            self._current = self._engine(kind, states, x, t, ids, offset=explained, last=first + step >= n,
                                         progress=progress)
            yield self._current

    def _engine(self, kind: str, states: States, x: torch.Tensor, target: torch.Tensor, ids: list[int],
                **batch: object) -> MapEngine:
        if kind == "stack":
            return StackEngine(self.explanation, states, x, target, ids, **batch)
        if kind == "replay":
            recording, self.recording = self.recording, None
            return ReplayEngine(self.explanation, states, x, target, ids, recording=recording, **batch)
        return PlainEngine(self.explanation, states, x, target, ids, model_draws=self.model_draws, **batch)

    def _fitted(self, states: States) -> tuple[str, int]:
        """The engine's kind and step for these states. State stacks hold every state's maps of a
        step at once, and captum's totals and differences with them (about three times the maps):
        a step shrinks to what the memory budget holds, or in the adaptive modes (which decide
        after each image batch) the check keeps the loop over states if one batch does not fit."""
        if self.kind != "stack":
            return self.kind, self.step
        if not stackable(states.stages, states.mode):
            return "plain", self.step
        held = 3 * (len(states) + 1) * self.inputs[0].numel() * self.inputs.element_size()
        fits = memory_budget_bytes(self.memory_budget, self.inputs.device) // held
        if self.batched:
            return ("stack" if fits >= self.step else "plain"), self.step
        return "stack", max(1, min(self.step, fits))


__all__ = ["DRAW_SHARE", "Engines", "TRACED_RECORDING", "engine_for"]
