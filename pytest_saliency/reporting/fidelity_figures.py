"""Watson et al.'s second panel: explanation consistency against infidelity and sensitivity.

:func:`consistency_fidelity_figures` draws, for a set of points (the models of one seed-consistency
result, or the architectures of several), scatter panels side by side: the consistency C on the x
axis, and on the y axis the mean infidelity (log scale: it is in squared output units), the
relative infidelity (over the mean squared output change, comparable across models) and the mean
sensitivity, each point with its bootstrap interval as a vertical bar and its label. Like :mod:`.figures`, it takes plain
numbers, returns lazy ``(name, render)`` pairs, draws on a pyplot-free Agg figure and imports
matplotlib only when a figure is rendered.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .figures import ACCENT, DPI, INK, MUTED
from .protocol import Figure

#: Points labelled in a panel; past this, the labels would overlap more than they tell.
MAX_LABELS = 12


@dataclass(frozen=True)
class FidelityPoint:
    """One model (or architecture): its consistency C and mean infidelity and sensitivity, with intervals."""

    label: str
    consistency: float
    infidelity: float
    infidelity_interval: tuple[float, float]
    sensitivity: float
    sensitivity_interval: tuple[float, float]
    relative_infidelity: float = math.nan  # the infidelity over the mean squared output change
    relative_infidelity_interval: tuple[float, float] = (math.nan, math.nan)


def _finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def consistency_fidelity_figures(points: Sequence[FidelityPoint], *, method: str, n_inputs: int,
                                 check: str = "seed_consistency") -> list[Figure]:
    """The figure ``consistency_vs_fidelity``: two panels of ``points`` (see the module
    docstring); none when no point has a finite C and a finite infidelity or sensitivity."""
    kept = [p for p in points if _finite(p.consistency) and (_finite(p.infidelity) or _finite(p.sensitivity))]
    if not kept:
        return []
    title = (f"{check}: consistency C against infidelity and sensitivity of {method} maps "
             f"(Yeh et al.; means over {n_inputs} inputs, bootstrap intervals; lower is better)")
    return [("consistency_vs_fidelity", lambda: _draw(kept, title))]


def _draw(points: list[FidelityPoint], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    panels = [("infidelity", "infidelity"), ("relative infidelity", "relative_infidelity"),
              ("sensitivity (max)", "sensitivity")]
    panels = [(name, attr) for name, attr in panels if any(_finite(getattr(p, attr)) for p in points)]
    fig = MplFigure(figsize=(11.0, 4.0), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=9, color=INK, wrap=True)
    width = 0.9 / len(panels)
    for index, (name, attr) in enumerate(panels):
        ax = fig.add_axes((0.07 + width * index, 0.14, width - 0.07, 0.66))
        _panel(ax, points, name, attr)
        if attr == "infidelity" and all(getattr(p, attr) > 0 for p in points if _finite(getattr(p, attr))):
            ax.set_yscale("log")  # squared output units: models whose outputs differ in scale span decades
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, facecolor="white")
    return buffer.getvalue()


def _panel(ax: Any, points: list[FidelityPoint], name: str, attr: str) -> None:
    shown = [p for p in points if _finite(getattr(p, attr))]
    for i, p in enumerate(shown):
        value = getattr(p, attr)
        low, high = getattr(p, f"{attr}_interval")
        if _finite(low, high):
            ax.errorbar([p.consistency], [value], yerr=[[max(value - low, 0.0)], [max(high - value, 0.0)]],
                        fmt="o", color=ACCENT, ecolor=MUTED, capsize=3, markersize=5)
        else:
            ax.plot([p.consistency], [value], "o", color=ACCENT, markersize=5)
        if i < MAX_LABELS:
            ax.annotate(p.label, (p.consistency, value), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=INK)
    ax.set_xlabel("consistency C (over the model's pairs)", fontsize=8, color=INK)
    ax.set_ylabel(f"mean {name}", fontsize=8, color=INK)
    ax.tick_params(labelsize=7, colors=MUTED)
    ax.set_xlim(-0.05, 1.05)
    ax.grid(True, color="#e5e7eb", linewidth=0.6)


__all__ = ["MAX_LABELS", "FidelityPoint", "consistency_fidelity_figures"]
