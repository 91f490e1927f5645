"""The engine's interface: the maps of one batch of images, for the original model and for each
randomized state of a check.

A randomization check asks every model state the same question: what are the maps of these
images? How they are computed is the engine's business, behind :class:`MapEngine`:

* :class:`PlainEngine`: one captum call (:func:`pytest_saliency.maps.explainers.attribute`) per
  state, with the state's layers randomized in place (:func:`pytest_saliency.model.randomize.randomized`);
* :class:`pytest_saliency.engine.replay.ReplayEngine`: gradient methods recompute only the part of
  the forward pass that the randomized layer can change (activation replay);
* :class:`pytest_saliency.engine.stacks.StackEngine`: occlusion explains every state in one captum
  call whose forward passes share the original model's prefix.

:func:`pytest_saliency.engine.select.engine_for` chooses among them, once per check. A fast engine
that cannot do its work raises :class:`CannotReplay`, and only that exception makes it fall back
to the plain path; any other exception is an error and propagates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.stream import example_offset
from ..maps.explainers import attribute
from ..maps.methods import Explainer, MethodSpec, draws_random
from ..model.randomize import LayerDraws, randomized

if TYPE_CHECKING:
    import torch

    from ..maps.cache import MapCache

Progress = Callable[[int, int, str], None]
Stage = tuple[str, "torch.nn.Module"]
F = TypeVar("F", bound=Callable[..., Any])


class CannotReplay(Exception):
    """A fast engine cannot compute these maps: the model or the batch is outside what it handles,
    or one of its safety nets saw a difference. The plain path computes them instead (and meets,
    and reports, any error of the model's own)."""


class EngineError(RuntimeError):
    """A fault in the engine's own code while it ran inside the model's forward or backward pass
    (see :func:`engine_callback`): an error to report, never a reason to fall back."""


@contextlib.contextmanager
def model_code(what: str) -> Iterator[None]:
    """Run the model's own code (its forward pass, or a backward pass through it) under the
    engine's machinery: saved-tensor hooks, patched ``forward`` methods, torch-function modes.

    An exception from there is either the model's own error, which the plain path meets again
    and reports as the model raises it, or a clash between the model and that machinery (for
    one, ``torch.func`` transforms refuse saved-tensor hooks), which the plain path does not
    have. Either way the plain path is the one to run, so the exception becomes
    :class:`CannotReplay`, with the original as its cause. This is the only place where an
    arbitrary exception leads to the plain path: the engine's own callbacks that run inside the
    model's code raise :class:`EngineError` (see :func:`engine_callback`), which passes through,
    as does every exception raised outside such a block.
    """
    try:
        yield
    except (CannotReplay, EngineError):
        raise
    except Exception as error:
        raise CannotReplay(f"{what} raised {type(error).__name__}: {error}") from error


def engine_callback(function: F) -> F:
    """``function``, for running inside the model's code (a hook, a torch-function mode): an
    exception from it is the engine's fault, raised as :class:`EngineError` so that
    :func:`model_code` does not take it for the model's; :class:`CannotReplay` passes as it is."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CannotReplay:
            raise
        except Exception as error:
            raise EngineError(f"the engine's {function.__qualname__} failed: {type(error).__name__}: {error}") \
                from error

    return guarded  # type: ignore[return-value]


@dataclass
class Explanation:
    """How a check explains images, the same in every model state: the method with its validated
    options, the seed, the batch size, and the session's map cache for the original maps."""

    model: torch.nn.Module
    method: MethodSpec | Explainer
    name: str
    options: dict[str, Any]
    seed: int
    batch_size: int | None = None
    cache: MapCache | None = None

    @property
    def named(self) -> bool:
        """A method of the package (by name), not a user's callable."""
        return isinstance(self.method, MethodSpec)

    @property
    def chunk(self) -> int | None:
        """Images per explainer call: ``batch_size``, or the memory budget's chunk (None: all at once)."""
        return self.batch_size or self.options.get("_image_batch")

    def describe(self, layer: str | None = None) -> str:
        """What errors call the maps: the original model's, or those with ``layer`` randomized."""
        if layer is None:
            return f"attribution maps from {self.name!r}"
        return f"attribution maps from {self.name!r} with {layer!r} randomized"

    def maps(self, x: torch.Tensor, target: torch.Tensor, ids: list[int], layer: str | None = None) -> torch.Tensor:
        """Maps of ``x`` (the images at ``ids`` in the inputs) through captum, the model as it is now;
        ``layer``: the randomized layer, for error messages."""
        return attribute(self.model, x, self.method, target, self.seed, self.batch_size, True, self.options,
                         prepared=True, what="" if layer is None else self.describe(layer), index=ids)

    def original(self, x: torch.Tensor, target: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """The original model's maps of ``x`` through captum, or from the cache when an earlier check
        computed them (named methods only)."""
        cache = self.cache if self.named else None
        key = None
        if cache is not None:
            key = self.cache_key(cache, x, target, ids)
            raw = cache.get(key)
            if raw is not None:
                return raw
        raw = self.maps(x, target, ids)
        if cache is not None and key is not None:
            cache.put(key, raw)
        return raw

    def shared(self, raw: torch.Tensor, x: torch.Tensor, target: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """The original maps from a pass a fast engine runs anyway; an earlier check's maps from the
        cache take precedence, so checks in a session compare against identical originals."""
        if self.cache is None:
            return raw
        key = self.cache_key(self.cache, x, target, ids)
        cached = self.cache.get(key)
        if cached is None:
            self.cache.put(key, raw)
            return raw
        return cached

    def cache_key(self, cache: MapCache, x: torch.Tensor, target: torch.Tensor, ids: list[int]) -> str | None:
        """The cache's key for the original maps of ``x``. The images' indices seed a method's random
        draws: part of the key unless they are 0, 1, ... (the images of a check over all its
        inputs, or of any other entry point)."""
        offset = example_offset()  # a stream's batch: its examples' draws are keyed from here
        drawn = isinstance(self.method, MethodSpec) and draws_random(self.method, self.options) \
            and (ids != list(range(len(ids))) or offset != 0)
        options = {**self.options, "image_ids": tuple(offset + i for i in ids)} if drawn else self.options
        return cache.key(self.model, x, target, self.name, options, self.seed, self.batch_size)


@dataclass
class States:
    """The randomized model states of a check.

    ``stages``: the layers as ``(name, module)``, in the order they are randomized. State ``i``
    randomizes ``stages[i]`` alone (``mode="independent"``) or ``stages[0]`` to ``stages[i]``
    (``"cascading"``), with ``strategy`` and ``seed``; ``draws`` holds values drawn up front
    (see :class:`pytest_saliency.model.randomize.LayerDraws`).
    """

    stages: list[Stage]
    mode: str
    strategy: str
    seed: int
    draws: LayerDraws | None = None

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.stages]

    def __len__(self) -> int:
        return len(self.stages)

    def enter(self, index: int, cascade: contextlib.ExitStack) -> contextlib.AbstractContextManager[None]:
        """Put the model into state ``index``: an independent state is the returned context; a
        cascading one stays entered in ``cascade``, on top of the states before it."""
        state = randomized([self.stages[index]], self.strategy, self.seed, self.draws)
        if self.mode == "independent":
            return state
        cascade.enter_context(state)
        return contextlib.nullcontext()


class MapEngine:
    """Raw maps of one batch of images: the original model's, then each randomized state's.

    Use it as a context manager (``with engine:``), which closes it whatever happens, and in this
    order: :meth:`original`, :meth:`keep_images` if some images are left out, then
    :meth:`state_maps`. ``x``, ``target`` and ``ids`` (the images' places in the check's inputs,
    which seed their random draws) always describe the images still in the batch; ``offset`` is
    the number of images the check explained before this batch (for progress labels), ``last``
    whether no batch follows. :attr:`reused` says whether any maps came from reusing the original
    model's work; :attr:`explained` is the number of images whose states were computed.
    """

    #: The model draws random numbers itself: its maps depend on which images share a batch.
    model_draws = False

    def __init__(self, explanation: Explanation, states: States, x: torch.Tensor, target: torch.Tensor,
                 ids: list[int], *, offset: int = 0, last: bool = True, progress: Progress | None = None) -> None:
        self.explanation, self.states = explanation, states
        self.x, self.target, self.ids = x, target, ids
        self.offset, self.last, self.progress = offset, last, progress
        self.reused = False
        self.explained = 0
        self._running: Generator[tuple[int, torch.Tensor], None, None] | None = None

    @property
    def label(self) -> str:
        return f"images {self.offset + 1}-{self.offset + self.x.shape[0]}"

    def original(self) -> torch.Tensor:
        """The original model's raw maps of the batch."""
        raise NotImplementedError

    def keep_images(self, keep: torch.Tensor) -> None:
        """Narrow the batch to the images at positions ``keep`` (the others' original maps are constant)."""
        self.x, self.target = self.x[keep], self.target[keep]
        self.ids = [self.ids[i] for i in keep.tolist()]

    def state_maps(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(state index, raw maps)`` for every state, in the engine's order; the model is in the
        state while its maps are computed (cascading states stay entered until the iteration ends)."""
        self.explained = self.x.shape[0]
        self._running = self._each_state()
        return self._running

    def _each_state(self) -> Generator[tuple[int, torch.Tensor], None, None]:
        raise NotImplementedError

    def close(self) -> None:
        """Leave any state still entered and drop what the engine holds."""
        if self._running is not None:
            self._running.close()
            self._running = None

    def __enter__(self) -> MapEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PlainEngine(MapEngine):
    """The plain path: the original maps through captum (or the map cache), then one captum call per
    state, with the state's layers randomized in place and restored."""

    def __init__(self, explanation: Explanation, states: States, x: torch.Tensor, target: torch.Tensor,
                 ids: list[int], *, model_draws: bool = False, **batch: Any) -> None:
        super().__init__(explanation, states, x, target, ids, **batch)
        self.model_draws = model_draws

    def original(self) -> torch.Tensor:
        return self.explanation.original(self.x, self.target, self.ids)

    def order(self) -> list[int]:
        """The order in which the states run."""
        return list(range(len(self.states)))

    def _each_state(self) -> Generator[tuple[int, torch.Tensor], None, None]:
        states = self.states
        with contextlib.ExitStack() as cascade:
            for done, index in enumerate(self.order()):
                if self.progress is not None:
                    self.progress(done, len(states), f"{states.names[index]} ({self.label})")
                with states.enter(index, cascade):
                    raw = self.state_raw(index)
                yield index, raw

    def state_raw(self, index: int) -> torch.Tensor:
        """The raw maps of state ``index``, the model in that state."""
        return self.explanation.maps(self.x, self.target, self.ids, self.states.names[index])


__all__ = ["CannotReplay", "EngineError", "Explanation", "MapEngine", "PlainEngine", "Progress", "States",
           "engine_callback", "model_code"]
