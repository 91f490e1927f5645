"""Occlusion maps of the original model and of every randomized state from one captum call.

Occlusion runs forward passes only: for each batch of perturbed images, the model's target logit.
In a randomization check the perturbed images are the same in every state, and so is the part
of the forward pass before the randomized layer. A loop over the states runs the whole forward
pass (L + 1) times per batch of perturbations; :class:`StateStack` runs it once, recorded
(:class:`pytest_saliency.engine.replay.ForwardReplay`), and then, per state, only what comes
after the state's cut (the same cuts and safety nets as the gradient replay: see
:mod:`pytest_saliency.engine.replay`).

captum never sees the states. :class:`StateStack` is the forward function handed to captum's
``Occlusion``: it returns one column per state (the target logit), which captum treats as
outputs of their own (its multi-output mode), so one ``attribute`` call returns one map per
image and state. They equal the maps of separate calls bit for bit (the tests compare), with the
same ``perturbations_per_eval``.

Each layer's randomized values are drawn once per image step by
:func:`pytest_saliency.model.randomize.randomized` (the same draws as the loop over states) and
kept (one copy of the selected layers' parameters in memory); a state writes them in place,
after copying the values it overwrites, and writes those back afterwards, as the loop does, so
tensors that share a parameter's storage see the change too. Independent states hold one
layer's copy at a time, cascading ones the copies of the layers randomized so far. Cascading
over stages that share parameters or storage keeps the loop (:func:`stackable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..core.forward import call_model
from ..core.integrity import Undo
from ..core.rng import generator_states, same_generator_states
from ..core.torchtools import require_torch
from ..core.validation import check_finite
from ..model.randomize import drawn_values
from .base import CannotReplay, Explanation, PlainEngine, States
from .replay import DRAWS_ERROR, ForwardReplay, state_cuts

if TYPE_CHECKING:
    import torch
    from torch.nn import Module

FORWARD_METHODS = ("occlusion",)


class StateStack:
    """A forward function: per input row, the target logit of the original model (column 0)
    and of each randomized state (column ``i + 1`` for ``stages[i]``).

    ``mode="independent"``: state ``i`` randomizes ``stages[i]`` alone; ``"cascading"``:
    ``stages[0]`` to ``stages[i]``. ``target`` holds one class per image; captum calls the
    function on whole multiples of the images (one copy per perturbation), in order.
    ``progress(done, total, label)`` hears of every call when ``calls`` (the number captum will
    make) is given, counted in states (all of them advance together: ``done`` is the share of
    the calls made, times the number of states) as the loop over states counts. :attr:`reused`
    says whether any state's logits came from a replay. A model that changes its input in
    place cannot be stacked (the same batch goes through every state): :class:`CannotReplay`,
    and the engine keeps the loop.
    """

    def __init__(self, model: torch.nn.Module, stages: Sequence[tuple[str, torch.nn.Module]], mode: str,
                 strategy: str, seed: int, target: torch.Tensor, *,
                 progress: Callable[[int, int, str], None] | None = None, calls: int = 0, label: str = "",
                 done: int = 0, drawn: list[list[tuple[Any, Any]]] | None = None) -> None:
        self.model, self.mode, self.target = model, mode, target.reshape(-1)
        self.names = [name for name, _ in stages]
        # per stage: (parameter, randomized values); a check's stacks share them
        self.drawn = drawn if drawn is not None else randomized_values(stages, strategy, seed)
        self.progress, self.calls, self.label = progress, calls, label
        self.done = done  # forward calls so far (of ``calls``: several stacks may share the count)
        self.live = True  # False after a replay failed: full passes from then on
        self.reused = False

    @property
    def size(self) -> int:
        """Columns: the original model and one per state."""
        return len(self.names) + 1

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        torch = require_torch()
        rows = batch.shape[0]
        if rows % self.target.numel():
            raise CannotReplay(f"{rows} rows are not whole copies of the {self.target.numel()} images")
        target = self.target.repeat(rows // self.target.numel())[:, None]
        generators = generator_states(batch.device)
        replay = ForwardReplay(self.model, batch) if self.live else None
        swap = _Swap()
        try:
            columns = self._columns(batch, target, replay, swap)
        finally:
            swap.restore()
            if replay is not None:
                replay.close()
        if not same_generator_states(generators, generator_states(batch.device)):
            # The states' passes interleave here; one captum call per state draws in another order.
            raise CannotReplay(DRAWS_ERROR)
        self._count_call()
        return torch.stack(columns, dim=1)

    def _columns(self, batch: torch.Tensor, target: torch.Tensor, replay: ForwardReplay | None,
                 swap: _Swap) -> list[torch.Tensor]:
        """The target logits of the original model, then of each state (written in by ``swap``).

        While the replay works its logits serve; once it stops, full passes of the model do (an
        error of the model's own then comes from those, and propagates).
        """
        version = batch._version

        def column(logits: torch.Tensor) -> torch.Tensor:
            if batch._version != version:
                raise CannotReplay("the model changed its input in place")
            return logits.gather(1, target)[:, 0]

        logits, cuts = self._recorded(replay) if replay is not None else (None, [])
        columns = [column(logits if logits is not None and self.live else call_model(self.model, batch))]
        for index in range(len(self.names)):
            if self.mode == "independent":
                swap.restore()
            swap.apply(self.drawn[index])
            logits = self._replayed(replay, cuts[index]) if self.live and replay is not None else None
            columns.append(column(logits if logits is not None else call_model(self.model, batch)))
        return columns

    def _recorded(self, replay: ForwardReplay) -> tuple[torch.Tensor | None, list[int]]:
        """The original model's logits from the recorded pass, and the states' cuts; the stack
        stays live if the replay verifies."""
        try:
            logits = replay.record()
            cuts = state_cuts(replay.trace, self.names, self.mode)
            self.live = bool(cuts) and replay.verify(max(cuts))
        except CannotReplay:
            self.live = False
            return None, []
        return logits, cuts

    def _replayed(self, replay: ForwardReplay, cut: int) -> torch.Tensor | None:
        """A state's logits from the replay, or None once it stops (full passes from here on)."""
        try:
            logits = replay.replayed_logits(cut)
        except CannotReplay:
            self.live = False
            return None
        self.reused = True
        return logits

    def _count_call(self) -> None:
        """Count one of captum's forward calls, and report progress in states."""
        self.done += 1
        if self.progress is not None and self.calls:
            states = len(self.names)
            if self.done < self.calls:
                self.progress(states * self.done // self.calls, states,
                              f"forward pass {self.done + 1} of {self.calls}, all {states} states at once ({self.label})")
            else:
                self.progress(states, states, "")


def stackable(stages: Sequence[tuple[str, Any]], mode: str) -> bool:
    """Whether each state is the stages' separate draws put together.

    In cascading mode a stage that shares parameters or their storage with an earlier one (a
    layer that owns parameters and has parameterized children, weights tied through ``.data``)
    is randomized on top of the earlier stage's values, which separate draws from the original
    values would not reproduce: such checks keep the loop.
    """
    if mode == "independent":
        return True
    seen: set[int] = set()
    for _, module in stages:
        storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        if storages & seen:
            return False
        seen |= storages
    return True


def randomized_values(stages: Sequence[tuple[str, torch.nn.Module]], strategy: str,
                      seed: int) -> list[list[tuple[Any, Any]]]:
    """Per stage: each parameter with the values
    :func:`pytest_saliency.model.randomize.randomized` gives it
    (:func:`pytest_saliency.model.randomize.drawn_values`)."""
    drawn = []
    for name, module in stages:
        pairs = drawn_values(name, module, strategy, seed)
        if pairs is None:
            raise CannotReplay(f"randomizing {name!r} changed which parameters it has")
        drawn.append(pairs)
    return drawn


class _Swap:
    """Randomized values written into the parameters in place (as
    :func:`pytest_saliency.model.randomize.randomized` does, so tensors sharing their storage see
    them too); :meth:`restore` writes back the values they overwrote, copied just before. Each
    write's restore is registered (an :class:`~pytest_saliency.core.integrity.Undo`) before the
    write, so an interrupt between the write and :meth:`restore` cannot leave it in place."""

    def __init__(self) -> None:
        self.undos: list[Undo] = []

    def apply(self, pairs: list[tuple[Any, Any]]) -> None:
        torch = require_torch()
        saved = [(parameter, parameter.detach().clone()) for parameter, _ in pairs]
        self.undos.append(Undo(functools.partial(_write_back, saved), [parameter for parameter, _ in saved]))
        with torch.no_grad():
            for parameter, value in pairs:
                parameter.copy_(value)

    def restore(self) -> None:
        while self.undos:
            self.undos.pop().run()


def _write_back(saved: list[tuple[Any, Any]]) -> None:
    torch = require_torch()
    with torch.no_grad():
        for parameter, original in reversed(saved):
            parameter.copy_(original)


def occlusion_states(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                     stages: Sequence[tuple[str, torch.nn.Module]], mode: str, strategy: str, seed: int,
                     options: dict[str, Any], *, chunk: int | None = None,
                     progress: Callable[[int, int, str], None] | None = None, label: str = "",
                     index: Any = 0) -> tuple[torch.Tensor, bool]:
    """Occlusion maps of ``inputs`` for the original model and every state, as (states + 1, N, ...).

    ``chunk`` images go to captum at a time (``batch_size`` or the memory budget's image chunk);
    with a ``"uniform"`` baseline one image at a time, drawn from its seed (``seed`` and its place
    ``index`` in the user's inputs, as for :func:`pytest_saliency.maps.explainers.attribute`).
    Returns the maps and whether any state reused the original pass. The model must be in eval
    mode with parameter gradients off (the randomization check sets both). Raises
    :class:`CannotReplay` when the states cannot be stacked.
    """
    torch = require_torch()
    from ..maps.batching import chunks
    from ..maps.explainers import quiet_captum, run_captum
    from ..maps.methods import METHODS, draws_random, image_ids, occlusion_positions

    per_call = options.get("perturbations_per_eval") or 1
    if draws_random(METHODS["occlusion"], options):
        chunk = 1  # run_captum explains such a method image by image; the stack holds one image's target
    ids = image_ids(index, inputs.shape[0])
    pieces = list(zip(chunks(inputs, chunk), chunks(target, chunk)))
    calls = len(pieces) * (1 + -(-occlusion_positions(inputs, options) // per_call))
    drawn = randomized_values(stages, strategy, seed)  # once for all chunks
    maps, reused, done, first = [], False, 0, 0
    for x, t in pieces:
        stack = StateStack(model, stages, mode, strategy, seed, t, progress=progress, calls=calls, label=label,
                           done=done, drawn=drawn)
        with quiet_captum():  # (captum takes any forward function, the stack as well as a module)
            raw = run_captum(METHODS["occlusion"], cast("Module", stack), x.detach(), None, options,
                             seed=seed, index=ids[first:first + x.shape[0]])
        first += x.shape[0]
        maps.append(raw.reshape((x.shape[0], stack.size) + tuple(x.shape[1:])).transpose(0, 1))
        reused, done = reused or stack.reused, stack.done
    return (torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]), reused


class StackEngine(PlainEngine):
    """Occlusion maps of one batch of images for the original model and every state, from one
    captum call per chunk of images (:func:`occlusion_states`), computed with the original maps.

    If the states cannot be stacked (:class:`CannotReplay`), the batch takes the plain path and
    :attr:`fell_back` says so (later batches need not try again).
    """

    def __init__(self, explanation: Explanation, states: States, x: torch.Tensor, target: torch.Tensor,
                 ids: list[int], **batch: Any) -> None:
        super().__init__(explanation, states, x, target, ids, **batch)
        self.stack: torch.Tensor | None = None  # (states + 1, images, ...): column 0 the original model's
        self.fell_back = False

    def original(self) -> torch.Tensor:
        e, states = self.explanation, self.states
        try:
            self.stack, self.reused = occlusion_states(
                e.model, self.x, self.target, states.stages, states.mode, states.strategy, states.seed, e.options,
                chunk=e.chunk, progress=self.progress, label=self.label, index=self.ids)
        except CannotReplay:
            self.fell_back = True
            return super().original()
        check_finite(self.stack[0], e.describe())  # (the states' maps are checked by the caller)
        return e.shared(self.stack[0], self.x, self.target, self.ids)

    def keep_images(self, keep: torch.Tensor) -> None:
        super().keep_images(keep)
        if self.stack is not None:  # occlusion explains each image on its own: its maps stay valid
            self.stack = self.stack[:, keep]

    def _each_state(self) -> Generator[tuple[int, torch.Tensor], None, None]:
        if self.stack is None:
            return super()._each_state()
        return ((index, maps) for index, maps in enumerate(self.stack[1:]))

    def close(self) -> None:
        super().close()
        self.stack = None


__all__ = ["FORWARD_METHODS", "StackEngine", "StateStack", "occlusion_states", "randomized_values", "stackable"]
