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
from collections.abc import Callable, Sequence
from typing import Any

from ..core.rng import generator_states, same_generator_states
from ..core.torchtools import require_torch
from .replay import DRAWS_ERROR, ForwardReplay, state_cuts
from ..core.integrity import Undo
from ..model.randomize import drawn_values

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
    place is an error here (the same batch goes through every state); the engine then keeps
    the loop.
    """

    def __init__(self, model: Any, stages: Sequence[tuple[str, Any]], mode: str, strategy: str, seed: int,
                 target: Any, *, progress: Callable[[int, int, str], None] | None = None, calls: int = 0,
                 label: str = "", done: int = 0, drawn: list[list[tuple[Any, Any]]] | None = None) -> None:
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

    def __call__(self, batch: Any) -> Any:
        torch = require_torch()
        rows = batch.shape[0]
        if rows % self.target.numel():
            raise RuntimeError(f"{rows} rows are not whole copies of the {self.target.numel()} images")
        target = self.target.repeat(rows // self.target.numel())[:, None]
        version = batch._version
        generators = generator_states(batch.device)
        replay = ForwardReplay(self.model, batch) if self.live else None
        cuts: list[int] = []
        swap = _Swap()
        try:
            if replay is not None:
                try:
                    logits = replay.record()
                    cuts = state_cuts(replay.trace, self.names, self.mode)
                    self.live = bool(cuts) and replay.verify(max(cuts))
                except Exception:  # noqa: BLE001 - the plain pass below reports a real model error
                    self.live = False
            if not self.live:
                logits = self.model(batch)
            if batch._version != version:
                raise RuntimeError("the model changed its input in place")
            columns = [logits.gather(1, target)[:, 0]]
            for index in range(len(self.names)):
                if self.mode == "independent":
                    swap.restore()
                swap.apply(self.drawn[index])
                logits = None
                if self.live:
                    try:
                        logits = replay.replayed_logits(cuts[index])
                        self.reused = True
                    except Exception:  # noqa: BLE001 - a stale recording: full passes from here on
                        self.live = False
                if logits is None:
                    logits = self.model(batch)
                if batch._version != version:
                    raise RuntimeError("the model changed its input in place")
                columns.append(logits.gather(1, target)[:, 0])
        finally:
            swap.restore()
            if replay is not None:
                replay.close()
        if not same_generator_states(generators, generator_states(batch.device)):
            # The states' passes interleave here; one captum call per state draws in another order.
            raise RuntimeError(DRAWS_ERROR)
        self.done += 1
        if self.progress is not None and self.calls:
            states = len(self.names)
            if self.done < self.calls:
                self.progress(states * self.done // self.calls, states,
                              f"forward pass {self.done + 1} of {self.calls}, all {states} states at once ({self.label})")
            else:
                self.progress(states, states, "")
        return torch.stack(columns, dim=1)


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


def randomized_values(stages: Sequence[tuple[str, Any]], strategy: str, seed: int) -> list[list[tuple[Any, Any]]]:
    """Per stage: each parameter with the values :func:`randomized` gives it (:func:`drawn_values`)."""
    drawn = []
    for name, module in stages:
        pairs = drawn_values(name, module, strategy, seed)
        if pairs is None:
            raise RuntimeError(f"randomizing {name!r} changed which parameters it has")
        drawn.append(pairs)
    return drawn


class _Swap:
    """Randomized values written into the parameters in place (as :func:`randomized` does, so
    tensors sharing their storage see them too); :meth:`restore` writes back the values they
    overwrote, copied just before. Each write's restore is registered (an :class:`Undo`) before
    the write, so an interrupt between the write and :meth:`restore` cannot leave it in place."""

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


def occlusion_states(model: Any, inputs: Any, target: Any, stages: Sequence[tuple[str, Any]], mode: str,
                     strategy: str, seed: int, options: dict[str, Any], *, chunk: int | None = None,
                     progress: Callable[[int, int, str], None] | None = None, label: str = "",
                     index: Any = 0) -> tuple[Any, bool]:
    """Occlusion maps of ``inputs`` for the original model and every state, as (states + 1, N, ...).

    ``chunk`` images go to captum at a time (``batch_size`` or the memory budget's image chunk);
    with a ``"uniform"`` baseline one image at a time, drawn from its seed (``seed`` and its place
    ``index`` in the user's inputs, as for :func:`pytest_saliency.maps.explainers.attribute`).
    Returns the maps and whether any state reused the original pass. The model must be in eval
    mode with parameter gradients off (the randomization engine sets both for a check).
    """
    torch = require_torch()
    from ..maps.explainers import METHODS, chunks, image_ids, quiet_captum, run_captum, draws_random, occlusion_positions

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
        with quiet_captum():
            raw = run_captum(METHODS["occlusion"], stack, x.detach(), None, options, seed=seed,
                              index=ids[first:first + x.shape[0]])
        first += x.shape[0]
        maps.append(raw.reshape((x.shape[0], stack.size) + tuple(x.shape[1:])).transpose(0, 1))
        reused, done = reused or stack.reused, stack.done
    return (torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]), reused


__all__ = ["FORWARD_METHODS", "StateStack", "occlusion_states", "randomized_values", "stackable"]
