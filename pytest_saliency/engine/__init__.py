"""The speed engine: the maps of many model states, computed fast, behind one interface.

:class:`MapEngine` (:mod:`.base`) is the interface: the maps of one batch of images for the
original model and for each randomized state. Behind it run the plain captum path
(:class:`PlainEngine`), activation replay (:mod:`.replay`) and occlusion state stacks
(:mod:`.stacks`); :func:`engine_for` (:mod:`.select`) chooses among them, once per check. A fast
engine that cannot do its work raises :class:`CannotReplay`, the one exception that sends it
down the plain path.
"""

from .base import CannotReplay, EngineError, Explanation, MapEngine, PlainEngine, States
from .select import Engines, engine_for

__all__ = ["CannotReplay", "EngineError", "Engines", "Explanation", "MapEngine", "PlainEngine", "States",
           "engine_for"]
