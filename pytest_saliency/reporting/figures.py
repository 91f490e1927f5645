"""Figures for saliency reports: PNG bytes drawn from explicit data, headless.

Each check kind has one entry point that takes the numbers and maps to draw, as plain typed
arguments, and returns the figures as lazy ``(name, render)`` pairs
(:data:`~pytest_saliency.reporting.protocol.Figure`): :func:`randomization_figures`,
:func:`agreement_figures`, :func:`sweep_figures`, :func:`ensemble_figures`,
:func:`pair_figures`, :func:`model_maps_figures` and :func:`baseline_figures`. A result's
``figures()`` method (the :class:`~pytest_saliency.reporting.protocol.CheckResult` protocol)
passes its own fields to one of them; this module never sees a result object, so reporting does
not depend on the checks. A user's own result provides pictures the same way: its ``figures()``
returns ``(name, render)`` pairs, drawn with these functions or with anything that returns PNG bytes.
:func:`figures_for` renders what a result lists, leaving out (and explaining) a figure that
cannot be drawn.

Headless and process/thread safe: figures are built from :class:`matplotlib.figure.Figure` with an
explicit :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`; ``pyplot`` is never imported,
so the global backend, pyplot's figure registry and a user's open figures are left alone.
matplotlib is imported only when a figure is drawn, torch never.

Conventions in every map figure: maps with no negative value use ``inferno`` on ``[0, max]``
(``[0, 1]`` for the presets' normalized maps); signed maps use ``coolwarm`` with symmetric limits,
so white is zero. Values at or past a check's threshold (an insensitive layer, a failing image)
are drawn in red.

Maps that are not images (see :data:`MODALITIES`) are drawn as plots, chosen by the ``modality``
argument of the functions that show maps (the shape of a map cannot tell a 1 x D feature map from
a 1 x T series): ``tabular`` maps as bar charts (red above zero, blue below; one y scale per
figure), ``sequence`` maps as a line under the input's signal, ``text`` maps as the input's tokens
in boxes coloured by their score (``Oranges`` on [0, max], ``coolwarm`` when signed). Their grids
have the inputs as columns and the states, models or methods as rows.
"""

from __future__ import annotations

import importlib.util
import io
import math
import numbers
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeGuard

from .protocol import CheckResult, Figure

DPI = 90
MAX_STRIP_IMAGES = 4
MAX_STRIP_LAYERS = 8
MAX_WIDTH = 11.8  # inches: ~1060 px at 90 dpi, shown 1:1 in the HTML report's column
MAX_AGREEMENT_IMAGES = 3
MAX_BASELINE_IMAGES = 4
MAX_PAIR_MATRICES = 6
MAX_MAP_ROWS = 8  # labels (models, methods) in one strip of maps
MAX_MODEL_IMAGES = 4

BAD = "#c62828"
INK = "#222222"
MUTED = "#6b7280"
ACCENT = "#1f5fa8"

MISSING_MATPLOTLIB = (
    "figures need matplotlib, which is not installed: pip install matplotlib (the report shows the tables only)"
)


# --------------------------------------------------------------------------------------------
# helpers


def _np(value: Any) -> Any:
    """A CPU float numpy array from a tensor, array or nested list (None stays None)."""
    import numpy as np

    if value is None:
        return None
    if hasattr(value, "detach"):  # torch.Tensor (bfloat16/float16 go through float32)
        value = value.detach().cpu().float().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _float(value: Any, default: float = math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _short(name: Any, width: int = 16) -> str:
    """Keep the tail of long dotted names (``layer4.1.conv2`` says more than ``features.``)."""
    from .numbers import layer_label

    text = layer_label(name)
    return text if len(text) <= width else "\u2026" + text[-(width - 1):]


def _new_figure(width: float, height: float, dpi: int = DPI) -> Any:
    """A pyplot-free figure with its own Agg canvas (no global backend state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    """PNG bytes of ``fig``, quantized to a 256-colour palette: 2-3x smaller than RGBA, with no
    visible loss for colormapped maps and text (the HTML report embeds every figure)."""
    import numpy as np

    buffer = io.BytesIO()
    try:
        from PIL import Image  # a matplotlib dependency; Image.Quantize needs Pillow >= 9.1

        method, dither = Image.Quantize.MAXCOVERAGE, Image.Dither.NONE
    except (ImportError, AttributeError):  # pragma: no cover - old Pillow: plain RGBA PNG
        fig.savefig(buffer, format="png", metadata={"Software": None}, facecolor="white")
        return buffer.getvalue()
    fig.canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    # maximum coverage keeps every pixel within a few levels of the original (median cut bands gradients)
    Image.fromarray(rgb).quantize(256, method=method, dither=dither).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def _axes_at(fig: Any, x: float, y: float, width: float, height: float) -> Any:
    """Axes placed in inches from the figure's top-left corner (layout engines are slow)."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((x / fw, 1.0 - (y + height) / fh, width / fw, height / fh))


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def _colorbar_at(fig: Any, x: float, y: float, height: float, cmap: str, vmin: float, vmax: float,
                 label: str = "") -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = _axes_at(fig, x, y, 0.13, height)
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin, vmax), cmap=_cmap(cmap)), cax=cax)
    bar.ax.tick_params(labelsize=7, length=2, pad=1)
    bar.outline.set_linewidth(0.5)
    if label:
        bar.set_label(label, fontsize=7, labelpad=2)
    return bar


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    import textwrap

    chars = max(20, int(width_in * 72 / (fontsize * 0.56)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def _finite_range(arrays: Iterable[Any]) -> tuple[float, float] | None:
    """The lowest and highest finite value of ``arrays`` (None when there is none)."""
    import numpy as np

    finite = [a[np.isfinite(a)] for a in arrays if a is not None and a.size]
    finite = [a for a in finite if a.size]
    if not finite:
        return None
    return min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)


def _map_scale(arrays: Iterable[Any]) -> tuple[str, float, float]:
    """Colormap and limits shared by all panels of a figure: inferno for [0, x], coolwarm when signed."""
    span = _finite_range(arrays)
    if span is None:
        return "inferno", 0.0, 1.0
    low, high = span
    if low < 0:
        lim = max(abs(low), abs(high)) or 1.0
        return "coolwarm", -lim, lim
    if high <= 1.0:
        return "inferno", 0.0, 1.0
    return "inferno", 0.0, high


def _input_image(image: Any) -> Any:
    """One input as a picture in [0, 1], scaled to its own range: 3 channels first -> RGB (H, W, 3),
    other channel counts -> their mean (H, W), a feature vector -> one row (a constant input is grey)."""
    import numpy as np

    if image.ndim == 3 and image.shape[0] == 3:
        image = np.moveaxis(image, 0, -1)
    else:
        while image.ndim > 2:
            image = image.mean(axis=0)
        image = _as_image(image)
    finite = image[np.isfinite(image)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return (image - low) / (high - low) if high > low else np.where(np.isfinite(image), 0.5, np.nan)


def _as_image(image: Any) -> Any:
    """A 2-D array for imshow: (1, H, W) -> (H, W); a 1-D feature map -> one row."""
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 1:
        image = image[None, :]
    return image


@dataclass
class _Cell:
    """One panel of a map grid."""

    image: Any
    scale: str = "map"
    caption: str = ""
    caption_color: str = INK
    bold: bool = False
    frame: str | None = None
    title: str = ""
    title_color: str = INK
    index: int | None = None  # the input the map explains: its signal or tokens in a non-image figure


def _map_grid(
    rows: list[list[_Cell | None]],
    *,
    scales: dict[str, tuple[str, float, float, str]],
    title: str,
    col_titles: list[tuple[str, str]] | None = None,
    row_labels: list[str] | None = None,
    panel: float = 1.05,
    view: _View | None = None,
    inputs_in_rows: bool = False,
) -> bytes:
    """A grid of maps drawn into one full-figure axes with inch coordinates (fast, exact layout).

    ``scales`` maps a cell's ``scale`` key to ``(cmap, vmin, vmax, colorbar label)``; each scale
    with a label gets one colorbar on the right (an empty label: none, e.g. for the inputs).
    A ``view`` of another modality than ``image`` draws the grid with :func:`_plot_grid` instead
    (``inputs_in_rows``: the rows are inputs, and turn into its columns).
    """
    from matplotlib.patches import Rectangle

    if view is not None and view.modality != "image":
        return _png(_plot_grid(rows, scales=scales, title=title, col_titles=col_titles, row_labels=row_labels,
                               view=view, inputs_in_rows=inputs_in_rows))

    cells = [cell for row in rows for cell in row if cell is not None]
    first = _as_image(cells[0].image)
    aspect = min(1.6, max(0.25, first.shape[0] / max(first.shape[1], 1)))
    pw, ph, gap = panel, panel * aspect, 0.12
    ncols = max(len(row) for row in rows)
    caption_h = 0.21 if any(c.caption for c in cells) else 0.03
    title_h = 0.2 if any(c.title for c in cells) else 0.0
    row_h = title_h + ph + caption_h + 0.1
    # a row label runs up the row's side, or, for rows too short for it (feature vectors), left of the row
    flat = bool(row_labels) and ph < 0.06 * max(len(t) for t in row_labels or [""])
    left = (0.2 + 0.062 * max(len(t) for t in row_labels or [""]) if flat else 0.34) if row_labels else 0.12
    used = {c.scale for c in cells}
    bars = [key for key in scales if key in used and scales[key][3]]
    grid_w = ncols * pw + (ncols - 1) * gap
    width = left + grid_w + 0.2 + 0.72 * len(bars)
    title = _wrap(title, width - 0.2, 9)
    top = 0.14 + 0.17 * (title.count("\n") + 1) + (0.24 if col_titles else 0.06)
    height = top + len(rows) * row_h + 0.04
    fig = _new_figure(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.text(width / 2, 0.1, title, ha="center", va="top", fontsize=9, color=INK, linespacing=1.25)
    for r, row in enumerate(rows):
        y = top + r * row_h + title_h
        if row_labels and r < len(row_labels):
            ax.text(left - (0.08 if flat else 0.17), y + ph / 2, row_labels[r], rotation=0 if flat else 90,
                    ha="right" if flat else "center", va="center", fontsize=8, color=INK)
        for c, cell in enumerate(row):
            if cell is None:
                continue
            x = left + c * (pw + gap)
            cmap, vmin, vmax, _ = scales[cell.scale]
            image = _as_image(cell.image)
            # pixels stay crisp when a map is smaller than its panel; large maps are downsampled smoothly
            interpolation = "nearest" if max(image.shape) <= pw * DPI else "antialiased"
            ax.imshow(image, cmap=_cmap(cmap), vmin=vmin, vmax=vmax, interpolation=interpolation,
                      extent=(x, x + pw, y + ph, y), aspect="auto")
            ax.add_patch(Rectangle((x, y), pw, ph, fill=False, edgecolor=cell.frame or "#c8c8c8",
                                   linewidth=2.0 if cell.frame else 0.5))
            if cell.caption:
                ax.text(x + pw / 2, y + ph + 0.04, cell.caption, ha="center", va="top", fontsize=7.5,
                        color=cell.caption_color, fontweight="bold" if cell.bold else "normal")
            if cell.title:
                ax.text(x + pw / 2, y - 0.04, cell.title, ha="center", va="bottom", fontsize=7.5,
                        color=cell.title_color, fontweight="bold" if cell.title_color == BAD else "normal")
    if col_titles:
        for c, (text, color) in enumerate(col_titles):
            x = left + c * (pw + gap)
            ax.text(x + pw / 2, top - 0.05, text, ha="center", va="bottom", fontsize=7.5, color=color,
                    fontweight="bold" if color == BAD else "normal")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    bar_h = min(2.6, len(rows) * row_h - 0.2)
    bar_y = top + (len(rows) * row_h - bar_h) / 2 - 0.05
    for i, key in enumerate(bars):
        cmap, vmin, vmax, label = scales[key]
        _colorbar_at(fig, left + grid_w + 0.22 + 0.72 * i, bar_y, bar_h, cmap, vmin, vmax, label)
    return _png(fig)


def _scale_label(cmap: str) -> str:
    return "signed value" if cmap == "coolwarm" else "map value"


# --------------------------------------------------------------------------------------------
# maps that are not images: feature vectors, series and token sequences

#: What the maps of a figure explain, and so how they are drawn: ``image`` maps (H, W) as heatmaps;
#: ``tabular`` maps (1, D), one score per feature, as bar charts; ``sequence`` maps (1, T) as a line
#: under the input's signal; ``text`` maps (1, L), one score per token, as the input's tokens
#: highlighted by their score. A map's shape alone cannot tell a 1 x D feature map from a 1 x T
#: series, so the drawing functions take the modality as an argument.
MODALITIES = ("image", "tabular", "sequence", "text")
MAX_FEATURES = 30  # bars, each labelled, in a tabular panel: the top mean |value| features when there are more
MAX_TEXT_LINES = 8  # lines of tokens in a text panel; the rest is cut with an ellipsis
#: Token strings that are padding and are not drawn, besides None and the positions past an input's tokens.
PAD_TOKENS = frozenset({"[PAD]", "<pad>", "<PAD>", "<|pad|>"})

_POSITIVE, _NEGATIVE, _UNSIGNED, _SIGNAL = "#c0392b", "#2f5fb3", "#d95f02", "#8a8f98"
_TEXT_CMAPS = {"inferno": "Oranges", "magma": "Purples", "gray": "Greys"}  # light at 0: tokens stay readable
_TOKEN_FONT = 7.0
_LINE_H = 0.21  # inches a line of tokens takes


@dataclass(frozen=True)
class _View:
    """How a figure draws its maps: the modality, the features' names, each input's tokens and the inputs."""

    modality: str = "image"
    feature_names: tuple[str, ...] | None = None
    tokens: tuple[tuple[str | None, ...], ...] | None = None
    inputs: Any = None

    @cached_property
    def signals(self) -> Any:
        """The inputs as a float array (None when not given or not numbers)."""
        return _np(self.inputs)

    def signal(self, index: int | None) -> Any:
        """Input ``index`` as (channels, T), drawn above its sequence map (None when not given)."""
        inputs = self.signals
        if inputs is None or inputs.ndim < 2 or index is None or index >= len(inputs):
            return None
        return inputs[index].reshape(-1, inputs.shape[-1])

    def words(self, index: int | None, length: int) -> list[str | None]:
        """The ``length`` tokens of input ``index``, None for padding; their positions when no tokens are given."""
        if self.tokens is None or index is None or index >= len(self.tokens):
            return [str(i) for i in range(length)]
        given = self.tokens[index]
        return [None if i >= len(given) or given[i] is None or given[i] in PAD_TOKENS else given[i]
                for i in range(length)]

    def feature_labels(self, n: int) -> list[str]:
        if self.feature_names is None:
            return [f"f{i}" for i in range(n)]
        if len(self.feature_names) != n:
            raise ValueError(f"{len(self.feature_names)} feature_names for maps of {n} features")
        return list(self.feature_names)


def _view(modality: str = "image", feature_names: Sequence[str] | None = None,
          tokens: Sequence[Sequence[str | None]] | None = None, inputs: Any = None) -> _View:
    """The :class:`_View` of a public ``*_figures`` function's arguments; an unknown modality raises at once."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(map(repr, MODALITIES))}, not {modality!r}")
    return _View(
        modality=modality,
        feature_names=None if feature_names is None else tuple(str(name) for name in feature_names),
        tokens=None if tokens is None else tuple(tuple(None if t is None else str(t) for t in row) for row in tokens),
        inputs=inputs,
    )


def _vector(values: Any, modality: str) -> Any:
    """One input's map as a 1-D array of scores: (1, D), (1, 1, D) or (D,)."""
    import numpy as np

    flat = np.asarray(values, dtype=np.float64)
    while flat.ndim > 1 and flat.shape[0] == 1:
        flat = flat[0]
    if flat.ndim != 1:
        raise ValueError(f"{modality} maps must be (N, 1, L) or (N, L), one score a position; "
                         f"got a map of shape {tuple(np.shape(values))}")
    return flat


def _noun(view: _View | None) -> str:
    """What one map explains, in titles and labels: an image, or an input of another modality."""
    return "image" if view is None or view.modality == "image" else "input"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _value_limits(arrays: Iterable[Any]) -> tuple[float, float]:
    """y limits shared by bars or lines: symmetric around 0 when signed, else from 0, with a margin."""
    span = _finite_range(arrays)
    low, high = span if span is not None else (0.0, 1.0)
    if low < 0:
        lim = max(-low, high) or 1.0
        return -1.08 * lim, 1.08 * lim
    return 0.0, 1.08 * (high or 1.0)


def _ticks(low: float, high: float, n: int) -> list[float]:
    """At most ``n`` + 1 round tick positions within [low, high], set once: automatic locators
    make every panel of a big grid build and discard many ticks."""
    from matplotlib.ticker import MaxNLocator

    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return []
    return [float(t) for t in MaxNLocator(n).tick_values(low, high) if low - 1e-12 <= t <= high + 1e-12]


def _top_features(vectors: list[Any], limit: int) -> list[int]:
    """The features a tabular figure shows: all when few, else the ``limit`` with the largest mean |value|."""
    import numpy as np

    n = len(vectors[0])
    if n <= limit:
        return list(range(n))
    with np.errstate(all="ignore"):
        weight = np.nan_to_num(np.nanmean(np.abs(np.stack(vectors)), axis=0), nan=-1.0)
    return sorted(int(i) for i in np.argsort(-weight, kind="stable")[:limit])


def _token_layout(words: list[str | None], width: float) -> tuple[list[tuple[int, str, float, int, float]], bool]:
    """Where each token's box goes in a panel ``width`` inches wide, as (position, text, x, line, box
    width), and whether tokens were cut at :data:`MAX_TEXT_LINES`; padding (None) takes no place."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure, prop = TextToPath(), FontProperties(size=_TOKEN_FONT)
    boxes: list[tuple[int, str, float, int, float]] = []
    x, line = 0.0, 0
    for i, word in enumerate(words):
        if word is None:
            continue
        text = _clip(word.replace("\n", "\u21b5").replace("\t", "\u21e5"), 18)
        box = min(width, measure.get_text_width_height_descent(text, prop, ismath=False)[0] / 72 + 0.09)
        if x > 0 and x + box > width:
            x, line = 0.0, line + 1
        if line >= MAX_TEXT_LINES:
            return boxes, True
        boxes.append((i, text, x, line, box))
        x += box + 0.035
    return boxes, False


def _orient(rows: list[list[_Cell | None]], col_titles: list[tuple[str, str]] | None, row_labels: list[str] | None,
            inputs_in_rows: bool) -> tuple[list[list[_Cell | None]], list[tuple[str, str]], list[tuple[str, str]]]:
    """The grid, its column titles and its row labels with the inputs as columns (``inputs_in_rows``: transposed)."""
    columns, labels = list(col_titles or []), [(text, INK) for text in row_labels or []]
    if not inputs_in_rows:
        return rows, columns, labels
    ncols = max(len(row) for row in rows)
    grid = [[row[c] if c < len(row) else None for row in rows] for c in range(ncols)]
    return grid, labels, columns


class _PlotGrid:
    """The layout, in inches, of a map grid whose panels are plots (bars, lines, tokens): one axes each."""

    def __init__(self, rows: list[list[_Cell | None]], scales: dict[str, tuple[str, float, float, str]],
                 view: _View, labels: list[tuple[str, str]]) -> None:
        self.rows, self.scales, self.view, self.mode = rows, scales, view, view.modality
        self.cells = {(r, c): cell for r, row in enumerate(rows) for c, cell in enumerate(row) if cell is not None}
        self.values = {at: _vector(cell.image, self.mode) for at, cell in self.cells.items()}
        cells = list(self.cells.values())
        self.ncols = max(len(row) for row in rows)
        self.left = 0.25 + 0.062 * max(len(text) for text, _ in labels) if labels else 0.15
        self.axis_w = 0.0 if self.mode == "text" else 0.5  # the y tick labels left of the first column
        used = list(dict.fromkeys(cell.scale for cell in cells))
        self.bars = [key for key in used if self.mode == "text" and scales[key][3]]
        self.gap = 0.2
        room = MAX_WIDTH - self.left - self.axis_w - 0.2 - 0.72 * len(self.bars)
        lengths = {len(v) for v in self.values.values()}
        if self.mode == "tabular" and len(lengths) > 1:
            raise ValueError(f"tabular maps of different lengths {sorted(lengths)} in one figure")
        n = max(lengths)
        preferred = {"tabular": min(4.2, max(1.6, 0.13 * min(n, MAX_FEATURES) + 0.4)), "sequence": 2.6}
        self.pw = max(0.9, min(preferred.get(self.mode, 3.2), (room + self.gap) / self.ncols - self.gap))
        self.tick_h, self.features, self.names, self.signal_h = 0.0, list(range(n)), [""] * n, 0.0
        if self.mode == "tabular":
            self.features = _top_features(list(self.values.values()), min(MAX_FEATURES, max(3, int(self.pw / 0.105))))
            self.names = [_clip(view.feature_labels(n)[i], 14) for i in self.features]
            self.tick_h, self.ph = 0.12 + 0.048 * max(len(t) for t in self.names), 1.0
        shown = {at: v[self.features] if self.mode == "tabular" else v for at, v in self.values.items()}
        self.limits = {key: _value_limits(v for at, v in shown.items() if self.cells[at].scale == key) for key in used}
        if self.mode == "sequence":
            self.tick_h, self.ph = 0.24, 1.3 if view.signals is not None else 0.8
            self.signal_h = 0.42 * self.ph
        self.layouts: dict[tuple[int, int], Any] = {}
        if self.mode == "text":
            layouts: dict[tuple[int | None, int], Any] = {}  # one layout an input: its tokens and their width
            for at, v in self.values.items():
                key = (self.cells[at].index, len(v))
                if key not in layouts:
                    layouts[key] = _token_layout(view.words(key[0], key[1]), self.pw)
                self.layouts[at] = layouts[key]
            lines = max(max((box[3] for box in boxes), default=0) + 1 for boxes, _ in self.layouts.values())
            self.ph = lines * _LINE_H + 0.06
        self.title_h = 0.2 if any(cell.title for cell in cells) else 0.0
        self.caption_h = 0.21 if any(cell.caption for cell in cells) else 0.02
        self.row_h = self.title_h + self.ph + self.caption_h + (0.3 if self.mode == "sequence" else 0.16)
        self.grid_w = self.ncols * self.pw + (self.ncols - 1) * self.gap
        self.width = self.left + self.axis_w + self.grid_w + 0.2 + 0.72 * len(self.bars)

    def x(self, c: int) -> float:
        return self.left + self.axis_w + c * (self.pw + self.gap)

    def y(self, top: float, r: int) -> float:
        """The top of row ``r``'s panels; the last row's tick labels push its captions down."""
        return top + r * self.row_h + self.title_h

    def caption_y(self, top: float, r: int) -> float:
        return self.y(top, r) + self.ph + (self.tick_h if r == len(self.rows) - 1 else 0.03) + 0.03


def _plot_grid(
    rows: list[list[_Cell | None]],
    *,
    scales: dict[str, tuple[str, float, float, str]],
    title: str,
    col_titles: list[tuple[str, str]] | None,
    row_labels: list[str] | None,
    view: _View,
    inputs_in_rows: bool = False,
) -> Any:
    """The matplotlib figure of a map grid whose maps are not images (see :data:`MODALITIES`): one axes
    per panel, the inputs as columns, each panel's title above it and caption below, one y scale (or,
    for text, one colour scale) per scale key, shared by the whole figure. The panels' axes carry the
    gid ``map r c`` (a sequence panel's signal above it: ``signal r c``), so that tests can read them."""
    grid, columns, labels = _orient(rows, col_titles, row_labels, inputs_in_rows)
    plot = _PlotGrid(grid, scales, view, labels)
    n = len(next(iter(plot.values.values())))
    if plot.mode == "tabular" and len(plot.features) < n:
        title += f" Bars: the {len(plot.features)} of {n} features with the largest mean |value|."
    title = _wrap(title, plot.width - 0.2, 9)
    top = 0.14 + 0.17 * (title.count("\n") + 1) + (0.24 if columns else 0.06)
    height = plot.caption_y(top, len(grid) - 1) + plot.caption_h + 0.06
    fig = _new_figure(plot.width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, plot.width)
    ax.set_ylim(height, 0)
    ax.text(plot.width / 2, 0.1, title, ha="center", va="top", fontsize=9, color=INK, linespacing=1.25)
    for c, (text, color) in enumerate(columns[: plot.ncols]):
        ax.text(plot.x(c) + plot.pw / 2, top - 0.05, text, ha="center", va="bottom", fontsize=7.5, color=color,
                fontweight="bold" if color == BAD else "normal")
    for r, row in enumerate(grid):
        y = plot.y(top, r)
        if r < len(labels):
            ax.text(plot.left - 0.1, y + plot.ph / 2, labels[r][0], ha="right", va="center", fontsize=8,
                    color=labels[r][1], fontweight="bold" if labels[r][1] == BAD else "normal")
        for c, cell in enumerate(row):
            if cell is not None:
                _plot_cell(fig, plot, r, c, y)
                _cell_texts(ax, cell, plot.x(c) + plot.pw / 2, y - 0.04, plot.caption_y(top, r))
    bar_h = min(2.6, len(grid) * plot.row_h - 0.2)
    for i, key in enumerate(plot.bars):
        cmap, vmin, vmax, label = scales[key]
        _colorbar_at(fig, plot.x(0) + plot.grid_w + 0.22 + 0.72 * i, top + (len(grid) * plot.row_h - bar_h) / 2 - 0.05,
                     bar_h, _TEXT_CMAPS.get(cmap, cmap), vmin, vmax, label)
    return fig


def _cell_texts(ax: Any, cell: _Cell, x: float, title_y: float, caption_y: float) -> None:
    """A panel's title above it and caption below it, on the figure-wide axes ``ax`` (inches)."""
    if cell.title:
        ax.text(x, title_y, cell.title, ha="center", va="bottom", fontsize=7.5, color=cell.title_color,
                fontweight="bold" if cell.title_color == BAD else "normal")
    if cell.caption:
        ax.text(x, caption_y, cell.caption, ha="center", va="top", fontsize=7.5, color=cell.caption_color,
                fontweight="bold" if cell.bold else "normal")


def _plot_cell(fig: Any, plot: _PlotGrid, r: int, c: int, y: float) -> None:
    """Draw panel (r, c) of ``plot`` at the height ``y`` (inches from the top). Ticks are set, not
    located: y ticks on the first column only, x ticks (feature names, the T axis) on the last row."""
    cell = plot.rows[r][c]
    if cell is None:  # the caller draws only the panels that hold a map
        raise ValueError(f"panel ({r}, {c}) of the grid holds no map")
    values, x, first, last = plot.values[r, c], plot.x(c), c == 0, r == len(plot.rows) - 1
    signal = plot.view.signal(cell.index) if plot.mode == "sequence" and cell.scale != "input" else None
    split = plot.signal_h if signal is not None else 0.0
    ax = _axes_at(fig, x, y + split, plot.pw, plot.ph - split)
    ax.set_gid(f"map {r} {c}")
    if plot.mode == "text":
        cmap, vmin, vmax, _ = plot.scales[cell.scale]
        _style_panel(ax, cell.frame or "#c8c8c8", [], [], box=True)
        boxes, cut = plot.layouts[r, c]
        _draw_tokens(ax, values, boxes, cut, _TEXT_CMAPS.get(cmap, cmap), vmin, vmax, plot.pw, plot.ph)
        return
    limits = plot.limits[cell.scale]
    yticks = _ticks(*limits, 3) if first else []
    if plot.mode == "tabular":
        _style_panel(ax, cell.frame, list(range(len(plot.features))) if last else [], yticks)
        _draw_bars(ax, values[plot.features], limits, plot.names if last else None,
                   _SIGNAL if cell.scale == "input" else None)
        return
    length = len(values) if signal is None else signal.shape[-1]
    _style_panel(ax, cell.frame, _ticks(0, max(length - 1, 1), 5) if last else [], yticks)
    _draw_attribution(ax, values, limits, length)
    if signal is not None:
        above = _axes_at(fig, x, y, plot.pw, split - 0.1)
        above.set_gid(f"signal {r} {c}")
        span = _finite_range([signal])
        _style_panel(above, cell.frame, [], _ticks(*span, 2) if first and span else [])
        _draw_signal(above, signal, span or (0.0, 1.0))


def _style_panel(ax: Any, frame: str | None, xticks: list[float], yticks: list[float], box: bool = False) -> None:
    """Thin grey left and bottom axes (a box: all four; a coloured frame around a flagged map)."""
    ax.set_xticks(xticks)
    ax.set_yticks(yticks)
    ax.tick_params(labelsize=6.5, length=2, pad=1.5)
    for name, spine in ax.spines.items():
        spine.set_visible(bool(frame) or box or name in ("left", "bottom"))
        spine.set_color(frame or "#b0b0b0")
        spine.set_linewidth(2.0 if frame and frame != "#c8c8c8" else 0.6)


def _draw_bars(ax: Any, heights: Any, limits: tuple[float, float], names: list[str] | None, color: str | None) -> None:
    """One bar per feature (red above 0, blue below for signed maps); the features' names under the bars."""
    from matplotlib.patches import Rectangle

    signed = limits[0] < 0
    for i, height in enumerate(heights):  # add_artist: Axes.bar's limit updates cost more than the drawing
        face = color or ((_NEGATIVE if height < 0 else _POSITIVE) if signed else _UNSIGNED)
        ax.add_artist(Rectangle((i - 0.39, 0.0), 0.78, height, facecolor=face, linewidth=0))
    if signed:
        ax.axhline(0.0, color=MUTED, linewidth=0.6)
    ax.set_xlim(-0.6, len(heights) - 0.4)
    ax.set_ylim(*limits)
    if names is not None:
        ax.set_xticklabels(names, rotation=90, fontsize=6.5)


def _draw_signal(ax: Any, signal: Any, span: tuple[float, float]) -> None:
    """The input series above its map: each channel a thin grey line."""
    for channel in signal:
        ax.plot(range(len(channel)), channel, color=_SIGNAL, linewidth=0.7, alpha=0.9)
    ax.set_xlim(0, max(signal.shape[-1] - 1, 1))
    pad = 0.08 * (span[1] - span[0]) or 1.0
    ax.set_ylim(span[0] - pad, span[1] + pad)


def _draw_attribution(ax: Any, values: Any, limits: tuple[float, float], length: int) -> None:
    """The map as a line over the series' T axis, filled to 0 (red above, blue below when signed)."""
    import numpy as np

    xs = np.linspace(0, length - 1, len(values)) if len(values) != length else np.arange(len(values))
    if limits[0] < 0:
        ax.fill_between(xs, values, 0, where=values >= 0, color=_POSITIVE, alpha=0.35, linewidth=0, interpolate=True)
        ax.fill_between(xs, values, 0, where=values < 0, color=_NEGATIVE, alpha=0.35, linewidth=0, interpolate=True)
        ax.axhline(0.0, color=MUTED, linewidth=0.6)
    else:
        ax.fill_between(xs, values, 0, color=_UNSIGNED, alpha=0.3, linewidth=0)
    ax.plot(xs, values, color=INK, linewidth=0.9)
    ax.set_xlim(0, max(length - 1, 1))
    ax.set_ylim(*limits)


def _draw_tokens(ax: Any, values: Any, boxes: list[tuple[int, str, float, int, float]], cut: bool, cmap: str,
                 vmin: float, vmax: float, width: float, height: float) -> None:
    """The tokens in reading order, each in a box coloured by its score (text in white on dark boxes)."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    colors, norm = _cmap(cmap), Normalize(vmin, vmax)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    for i, text, x, line, box in boxes:
        face = colors(norm(values[i]))
        y = 0.03 + line * _LINE_H
        ax.add_artist(Rectangle((x, y), box, _LINE_H - 0.035, facecolor=face, edgecolor="none", gid=f"token {i}"))
        light = 0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2] > 0.5
        ax.text(x + box / 2, y + (_LINE_H - 0.035) / 2, text, ha="center", va="center", fontsize=_TOKEN_FONT,
                color=INK if light else "white", parse_math=False, clip_on=True)
    if cut:
        ax.text(width - 0.02, height - 0.01, "\u2026", ha="right", va="bottom", fontsize=8, color=MUTED)



# --------------------------------------------------------------------------------------------
# parameter randomization


@dataclass(frozen=True)
class _Randomization:
    """What the strip and the curve of a randomization check draw (see :func:`randomization_figures`)."""

    layers: list[str]
    ssim: Any
    threshold: float
    insensitive: frozenset[str]
    original_maps: Any
    randomized_maps: Any
    method: str
    preset: str
    mode: str
    order: str
    check: str
    dataset_score: float | None
    ci: tuple[float, float] | None
    view: _View
    similarity: str = "SSIM"

    def randomized_what(self) -> str:
        order = self.order.replace("_", "-")
        return f"cumulatively randomized ({order}) down to" if self.mode == "cascading" else "after randomizing"


def randomization_figures(
    *,
    layers: Sequence[str],
    ssim: Any,
    ssim_threshold: float,
    insensitive_layers: Collection[str] = (),
    original_maps: Any = None,
    randomized_maps: Any = None,
    method: str = "",
    preset: str = "",
    mode: str = "independent",
    order: str = "",
    check: str = "layer randomization",
    dataset_score: float | None = None,
    ci: tuple[float, float] | None = None,
    inputs: Any = None,
    modality: str = "image",
    feature_names: Sequence[str] | None = None,
    tokens: Sequence[Sequence[str | None]] | None = None,
    similarity: str = "SSIM",
) -> list[Figure]:
    """The figures of a parameter-randomization check: ``randomization_strip`` and ``ssim_curve``.

    ``layers`` names the randomized layers in the order of ``ssim``, the (layers, images) matrix
    of SSIM(original map, randomized map), compared with ``ssim_threshold``. The strip shows
    ``original_maps`` (k, H, W) and ``randomized_maps`` (layers, k, H, W) of the first k images,
    with the ``insensitive_layers`` framed in red; it is left out without maps. ``mode`` and
    ``order`` word the axis and the titles (cascading randomization is cumulative); ``method``,
    ``preset`` and ``check`` name what was checked; ``dataset_score`` (S^I) and ``ci``, its
    confidence interval, go into the curve's title when given. ``modality`` (one of
    :data:`MODALITIES`), ``feature_names``, ``tokens`` and ``inputs`` (the first k inputs) say how
    maps that are not images are drawn (see :func:`model_maps_figures`). ``similarity`` names the
    comparison in ``ssim`` (SSIM, or Spearman for tabular and text maps) in labels and titles.
    """
    data = _Randomization(
        layers=[str(name) for name in layers], ssim=_np(ssim), threshold=float(ssim_threshold),
        insensitive=frozenset(str(name) for name in insensitive_layers), original_maps=original_maps,
        randomized_maps=randomized_maps, method=method, preset=preset, mode=mode, order=order, check=check,
        dataset_score=dataset_score, ci=ci, view=_view(modality, feature_names, tokens, inputs), similarity=similarity,
    )
    figures: list[Figure] = []
    if original_maps is not None and randomized_maps is not None:
        figures.append(("randomization_strip", lambda: _randomization_strip(data)))
    if data.ssim is not None and data.layers:
        figures.append(("ssim_curve", lambda: _ssim_curve(data)))
    return figures


def _layer_columns(names: list[str], insensitive: Collection[str], limit: int) -> list[int]:
    """Which layers get a column: all when few, else the insensitive ones and an even spread."""
    n = len(names)
    if n <= limit:
        return list(range(n))
    chosen = [i for i, name in enumerate(names) if name in insensitive][: limit // 2]
    rest = limit - len(chosen)
    for j in range(rest):
        i = round(j * (n - 1) / max(rest - 1, 1))
        if i not in chosen:
            chosen.append(i)
    for i in range(n):  # fill up when the spread landed on chosen columns
        if len(chosen) >= limit:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _randomization_strip(data: _Randomization) -> bytes:
    original = _np(data.original_maps)
    randomized = _np(data.randomized_maps)
    if original is None or randomized is None or randomized.ndim < 3 or original.ndim < 2:
        raise ValueError("original_maps must be (k, H, W) and randomized_maps (layers, k, H, W)")
    names = data.layers
    if len(names) != randomized.shape[0]:
        names = [f"layer {i}" for i in range(randomized.shape[0])]
    rows = min(MAX_STRIP_IMAGES, original.shape[0], randomized.shape[1])
    if rows == 0 or randomized.shape[0] == 0:
        raise ValueError("no kept maps to draw")
    ssim, threshold = data.ssim, data.threshold
    columns = _layer_columns(names, data.insensitive, MAX_STRIP_LAYERS)
    cmap, vmin, vmax = _map_scale([original[:rows], randomized[columns, :rows]])
    grid: list[list[_Cell | None]] = []
    for r in range(rows):
        row: list[_Cell | None] = [_Cell(original[r], caption="reference", caption_color=MUTED, index=r)]
        for layer in columns:
            value = math.nan
            if ssim is not None and ssim.ndim == 2 and layer < ssim.shape[0] and r < ssim.shape[1]:
                value = float(ssim[layer, r])
            bad = not value < threshold
            row.append(_Cell(randomized[layer, r], caption=f"{data.similarity} {value:.3f}", caption_color=BAD if bad else INK,
                             bold=bad, frame=BAD if bad else None, index=r))
        grid.append(row)
    shown = "" if len(columns) == len(names) else f" ({len(columns)} of {len(names)} layers shown)"
    preset = f" ({data.preset})" if data.preset else ""
    title = (f"{data.method} maps{preset}: the original model's, then {data.randomized_what()} each layer"
             f"{shown}. Red frame: {data.similarity} \u2265 {threshold:g}, the map did not change.")
    col_titles = [("original", INK)] + [
        (_short(names[i], 15), BAD if names[i] in data.insensitive else INK) for i in columns
    ]
    return _map_grid(grid, scales={"map": (cmap, vmin, vmax, _scale_label(cmap))}, title=title,
                     col_titles=col_titles, row_labels=[f"{_noun(data.view)} {r}" for r in range(rows)], view=data.view,
                     inputs_in_rows=True)


def _ssim_curve(data: _Randomization) -> bytes:
    import numpy as np

    names, ssim, threshold = data.layers, data.ssim, data.threshold
    if ssim is None or ssim.ndim != 2 or ssim.shape[0] != len(names) or ssim.shape[1] == 0:
        raise ValueError("ssim is not a (layers, images) matrix")
    x = np.arange(len(names))
    with np.errstate(all="ignore"):
        mean = np.nanmean(ssim, axis=1)
        std = np.nanstd(ssim, axis=1)
        low, high = np.nanmin(ssim, axis=1), np.nanmax(ssim, axis=1)
    insensitive = ~(mean < threshold)
    labels = [_short(n, 18) for n in names]
    rotate = len(names) > 5 or max(len(t) for t in labels) * len(names) > 60
    bottom = 0.55 + (max(len(t) for t in labels) * 0.055 * 0.7 if rotate else 0.15)
    plot_w = min(MAX_WIDTH - 2.4, max(4.2, 0.42 * len(names) + 1.0))
    left, right, top = 0.62, 1.75, 0.55
    fig = _new_figure(left + plot_w + right, top + 2.6 + bottom)
    ax = _axes_at(fig, left, top, plot_w, 2.6)
    if ssim.shape[1] <= 64:
        for column in ssim.T:
            ax.plot(x, column, color="#9aa5b1", linewidth=0.6, alpha=0.35, zorder=1)
    ax.fill_between(x, low, high, color="#c9daf0", alpha=0.8, linewidth=0, label="min\u2013max over images", zorder=2)
    ax.fill_between(x, mean - std, mean + std, color="#8fb3e0", alpha=0.75, linewidth=0, label="\u00b11 std",
                    zorder=3)
    ax.plot(x, mean, color=ACCENT, marker="o", markersize=4, linewidth=1.8, label=f"mean {data.similarity}", zorder=4)
    ax.axhline(threshold, color=BAD, linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}", zorder=4)
    if insensitive.any():
        ax.scatter(x[insensitive], mean[insensitive], s=70, facecolors="none", edgecolors=BAD, linewidths=1.6,
                   zorder=5, label="insensitive layer")
        for i in np.flatnonzero(insensitive):
            ax.axvspan(i - 0.45, i + 0.45, color=BAD, alpha=0.08, linewidth=0, zorder=0)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=40 if rotate else 0, ha="right" if rotate else "center", fontsize=7.5,
                       rotation_mode="anchor" if rotate else "default")
    for label, bad in zip(ax.get_xticklabels(), insensitive):
        if bad:
            label.set_color(BAD)
            label.set_fontweight("bold")
    finite_low = low[np.isfinite(low)]
    ax.set_ylim(min(0.0, float(finite_low.min()) - 0.05) if finite_low.size else 0.0, 1.05)
    ax.set_xlim(-0.6, len(names) - 0.4)
    order = data.order.replace("_", "-")
    ax.set_xlabel(f"layers, cumulatively randomized ({order})" if data.mode == "cascading" else "randomized layer",
                  fontsize=8)
    ax.set_ylabel(f"{data.similarity}(original, randomized)", fontsize=8)
    ax.tick_params(axis="both", labelsize=7.5)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0)
    ax.set_title(_ssim_curve_title(data, ssim.shape[1], int(insensitive.sum())), fontsize=8.5, color=INK, loc="left",
                 linespacing=1.3)
    return _png(fig)


def _ssim_curve_title(data: _Randomization, n_images: int, n_insensitive: int) -> str:
    title = f"{data.check}: mean {data.similarity} per layer over N = {n_images} images"
    score = _float(data.dataset_score)
    if not math.isnan(score):
        ci_low, ci_high = (_float(v) for v in (data.ci or (math.nan, math.nan)))
        title += (f"\n$S^I$ = {score:.4f} (CI {ci_low:.4f}\u2013{ci_high:.4f}); "
                  f"{n_insensitive} of {len(data.layers)} layers with mean {data.similarity} \u2265 {data.threshold:g}")
    return title


# --------------------------------------------------------------------------------------------
# method agreement


def agreement_figures(
    *,
    methods: Sequence[str],
    metrics: Sequence[str],
    matrices: Mapping[str, Sequence[Sequence[float | None]]],
    n_images: int,
    chance: Mapping[str, float | None] | None = None,
    failing: Collection[tuple[str, str, str]] = (),
    threshold: float | None = None,
    statistic: str = "mean",
    higher_is_better: Mapping[str, bool] | None = None,
    maps: Mapping[str, Any] | None = None,
    preset: str = "",
    inputs: Any = None,
    modality: str = "image",
    feature_names: Sequence[str] | None = None,
    tokens: Sequence[Sequence[str | None]] | None = None,
) -> list[Figure]:
    """The figures of a method-agreement check: ``agreement_matrices`` and ``agreement_maps``.

    ``matrices[metric]`` is the method x method matrix of mean values over ``n_images`` images
    (rows and columns in the order of ``methods``; ``None`` where not computed, e.g. the
    diagonal). ``chance[metric]`` is printed in the metric's title; the ``failing``
    ``(method_a, method_b, metric)`` pairs are framed in red; ``threshold`` and ``statistic``
    (``"mean"`` or a confidence bound) word the title. ``higher_is_better[metric]`` (default
    True) picks the colour scale: a reversed one for distances. ``maps`` (method -> (N, H, W)
    maps, as compared under ``preset``) gives the strip of each method's maps; ``modality``,
    ``feature_names``, ``tokens`` and ``inputs`` (the first images) say how maps that are not
    images are drawn (see :func:`model_maps_figures`).
    """
    figures: list[Figure] = []
    view = _view(modality, feature_names, tokens, inputs)
    if methods and metrics:
        figures.append(("agreement_matrices", lambda: _agreement_matrices(
            [str(m) for m in methods], [str(m) for m in metrics], matrices, chance or {}, failing, threshold,
            statistic, higher_is_better or {}, n_images)))
    if maps:
        title = (f"Maps of each method for the first images (preset {preset or '?'}, as compared by SSIM)"
                 if modality == "image" else f"Maps of each method for the first inputs (preset {preset or '?'})")
        figures.append(("agreement_maps", lambda: _maps_strip(maps, title, MAX_AGREEMENT_IMAGES, view=view)))
    return figures


def _square(rows: Sequence[Sequence[float | None]] | None, n: int) -> Any:
    """An (n, n) float matrix from nested lists, NaN where a value is missing or None."""
    import numpy as np

    out = np.full((n, n), np.nan)
    for i, row in enumerate(rows or []):
        for j, value in enumerate(row or []):
            if i < n and j < n and value is not None:
                out[i, j] = _float(value)
    return out


def _failing_cells(failing: Collection[tuple[str, str, str]], labels: list[str], metric: str) -> set[tuple[int, int]]:
    index = {m: i for i, m in enumerate(labels)}
    cells: set[tuple[int, int]] = set()
    for a, b, name in failing:
        if name == metric and a in index and b in index:
            cells.update({(index[a], index[b]), (index[b], index[a])})
    return cells


def _metric_scale(metric: str, grid: Any, higher_is_better: bool = True) -> tuple[str, float, float]:
    """Colour scale of a metric: fixed ranges where the metric has one, so matrices compare."""
    import numpy as np

    finite = grid[np.isfinite(grid)]
    peak = float(np.abs(finite).max()) if finite.size else 1.0
    name = metric.lower()
    if not higher_is_better:  # distances, divergences, angles: low is good
        return "viridis_r", 0.0, max(peak, 1e-12)
    if any(word in name for word in ("correlation", "spearman", "pearson", "cosine", "ssim")) or (
        finite.size and finite.min() < 0
    ):
        lim = max(1.0, peak)
        return "coolwarm", -lim, lim
    return "viridis", 0.0, max(1.0, peak)


def _heatmaps(titled_grids: list[tuple[str, Any, tuple[str, float, float], set[tuple[int, int]]]],
              labels: list[str], title: str) -> bytes:
    """Square annotated matrices side by side (up to 4 a row), each with its own colorbar."""
    import numpy as np

    n = len(labels)
    short = [_short(m, 22) for m in labels]
    cell = 0.5 if n <= 6 else max(0.28, 3.2 / n)
    side = max(1.5, cell * n)
    label_w = 0.12 + 0.056 * max(len(t) for t in short)
    block_w = label_w + side + 0.75
    ncols = max(1, min(4, len(titled_grids), int((MAX_WIDTH - 0.15) // block_w)))
    nrows = math.ceil(len(titled_grids) / ncols)
    ncols = math.ceil(len(titled_grids) / nrows)  # balanced rows: 2 + 2 rather than 3 + 1
    label_h = 0.1 + 0.056 * 0.6 * max(len(t) for t in short)
    block_h = 0.35 + side + label_h + 0.2
    width = 0.15 + ncols * block_w
    title = _wrap(title, width - 0.2, 9)
    top = 0.2 + 0.17 * (title.count("\n") + 1)
    fig = _new_figure(width, top + nrows * block_h)
    fig.text(0.5, 1 - 0.1 / (top + nrows * block_h), title, ha="center", va="top", fontsize=9, color=INK)
    fontsize = 8 if n <= 5 else 6.5
    for index, (metric_title, grid, (cmap, low, high), failing) in enumerate(titled_grids):
        x0 = 0.15 + (index % ncols) * block_w + label_w
        y0 = top + (index // ncols) * block_h + 0.35
        ax = _axes_at(fig, x0, y0, side, side)
        handle = ax.imshow(np.ma.masked_invalid(grid), cmap=_cmap(cmap), vmin=low, vmax=high, aspect="auto",
                           interpolation="nearest")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(short, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_yticklabels(short, fontsize=7)
        ax.tick_params(length=0, pad=3)
        for spine in ax.spines.values():
            spine.set_linewidth(0.5)
        for i in range(n):
            for j in range(n):
                value = grid[i, j]
                if not np.isfinite(value):
                    ax.text(j, i, "\u2014", ha="center", va="center", fontsize=fontsize, color=MUTED)
                    continue
                r, g, b, _ = handle.cmap(handle.norm(value))
                light = (0.299 * r + 0.587 * g + 0.114 * b) > 0.5
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="black" if light else "white", fontweight="bold" if (i, j) in failing else "normal")
        from matplotlib.patches import Rectangle

        for i, j in failing:
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor=BAD, linewidth=2))
        ax.set_title(metric_title, fontsize=8, color=INK, pad=4)
        _colorbar_at(fig, x0 + side + 0.1, y0, side, cmap, low, high)
    return _png(fig)


def _agreement_matrices(labels: list[str], metrics: list[str], matrices: Mapping[str, Sequence[Sequence[float | None]]],
                        chance: Mapping[str, float | None], failing: Collection[tuple[str, str, str]],
                        threshold: float | None, statistic: str, higher_is_better: Mapping[str, bool],
                        n_images: int) -> bytes:
    grids = []
    for metric in metrics:
        grid = _square(matrices.get(metric), len(labels))
        level = chance.get(metric)
        title = metric + ("" if level is None else f" (chance {_float(level):.2f})")
        scale = _metric_scale(metric, grid, higher_is_better.get(metric, True))
        grids.append((title, grid, scale, _failing_cells(failing, labels, metric)))
    extra = "" if threshold is None else (
        f"; threshold {_float(threshold):.3g} on the {'mean' if statistic == 'mean' else 'confidence bound'}, "
        "red frame: failing pair"
    )
    return _heatmaps(grids, labels, f"Method agreement: mean over {n_images} images{extra}")


def _maps_strip(maps: Mapping[str, Any], title: str, max_images: int, transpose: bool = False,
                inputs: Any = None, view: _View | None = None) -> bytes:
    """Rows: images; columns: the labels of ``maps`` (``transpose``: one row per label, images as
    columns, under a first row of the ``inputs`` when given). Maps that are not images (``view``)
    always have the images as columns; their inputs' row is drawn for tabular maps only (a
    sequence's signal is drawn above each of its maps, a text's tokens are the map)."""
    arrays = {str(label): _np(value) for label, value in maps.items()}
    arrays = {k: v for k, v in arrays.items() if v is not None and v.ndim >= 2 and v.shape[0] > 0}
    if not arrays:
        raise ValueError("no maps to draw")
    labels = list(arrays)[:MAX_MAP_ROWS]
    shown = _np(inputs)
    rows = min([max_images, *(arrays[k].shape[0] for k in labels), *([] if shown is None else [len(shown)])])
    cmap, vmin, vmax = _map_scale([arrays[k][:rows] for k in labels])
    scales = {"map": (cmap, vmin, vmax, _scale_label(cmap)), "input": ("gray", 0.0, 1.0, "")}
    grid: list[list[_Cell | None]]
    modality = "image" if view is None else view.modality
    if transpose:
        grid = [[_Cell(arrays[k][r], index=r) for r in range(rows)] for k in labels]
        row_labels = [_short(k, 18) for k in labels]
        if shown is not None and modality in ("image", "tabular"):
            grid.insert(0, [_Cell(_input_image(shown[r]) if modality == "image" else shown[r].ravel(), scale="input",
                                  index=r) for r in range(rows)])
            row_labels.insert(0, "input")
        return _map_grid(grid, scales=scales, title=title, col_titles=[(f"{_noun(view)} {r}", INK) for r in range(rows)],
                         row_labels=row_labels, view=view)
    grid = [[_Cell(arrays[k][r], index=r) for k in labels] for r in range(rows)]
    return _map_grid(grid, scales=scales, title=title, col_titles=[(_short(k, 18), INK) for k in labels],
                     row_labels=[f"{_noun(view)} {r}" for r in range(rows)], view=view, inputs_in_rows=True)


# --------------------------------------------------------------------------------------------
# hyperparameter sweeps and input noise, ensemble-size curves

_COLORS = ["#1f5fa8", "#e07b00", "#2e7d32", "#7b1fa2", "#00838f", "#6d4c41"]
MAX_SWEEP_PLOTS = 9

Point = tuple[Any, float, float, bool]  # (swept value, mean, std, fails the threshold)


@dataclass(frozen=True)
class SweepSeries:
    """One swept hyperparameter, as :func:`sweep_figures` draws it (one plot, a curve per metric).

    ``values`` are the swept values in the order they ran; ``means[metric]`` and
    ``stds[metric]`` hold, for each value, the mean and the std over images of the similarity of
    its maps to the reference maps; ``failing`` flags the values whose mean fails the threshold
    (circled in red on the verdict metric's curve); ``reference`` is the reference value (a
    dotted line when it is a number, else named in the plot's title).
    """

    name: str
    values: Sequence[Any]
    means: Mapping[str, Sequence[float]]
    stds: Mapping[str, Sequence[float]]
    failing: Sequence[bool] = ()
    reference: Any = None

    def curves(self) -> dict[str, list[Point]]:
        flags = list(self.failing) + [False] * (len(self.values) - len(self.failing))
        return {
            metric: [(x, float(mean), _float(std, 0.0), bad)
                     for x, mean, std, bad in zip(self.values, means, self.stds.get(metric, [0.0] * len(means)), flags)]
            for metric, means in self.means.items()
        }


def sweep_figures(
    *,
    series: Sequence[SweepSeries],
    metric: str,
    threshold: float | None = None,
    method: str = "",
    noise: bool = False,
) -> list[Figure]:
    """The figure of a sweep or input-noise check: ``sweep_curves``, one plot per swept hyperparameter.

    Each plot shows the mean (error bars: std over images) similarity to the reference per
    swept value, one curve per metric, against ``threshold`` on the verdict ``metric``. ``noise``
    words it as similarity to the maps of the clean inputs (the input-noise check). Up to
    :data:`MAX_SWEEP_PLOTS` plots; no figure when no series has a value.
    """
    drawn = [s for s in series if s.values and s.means][:MAX_SWEEP_PLOTS]
    if not drawn:
        return []
    return [("sweep_curves", lambda: _sweep_curves(drawn, metric, threshold, method, noise))]


def _is_number(x: Any) -> TypeGuard[float]:
    """A real number (bool excluded): what can be plotted."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _sweep_curves(series: list[SweepSeries], metric: str, threshold: float | None, method: str,
                  noise: bool) -> bytes:
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    plot_w, plot_h, left, gap_x, gap_y = 3.1, 2.2, 0.62, 0.75, 1.45
    if noise:
        what = "similarity of the maps of noisy inputs to those of the clean inputs"
    else:
        what = "similarity to the reference setting, one hyperparameter at a time"
    limit = "" if threshold is None else f"; dashed: threshold {threshold:g} on mean {metric}, red: failing value"
    width = left + ncols * plot_w + (ncols - 1) * gap_x + 0.25
    title = _wrap(f"{method or 'explanation'}: {what} (mean \u00b1 std over images){limit}", width - 0.2, 9)
    top = 0.35 + 0.17 * (title.count("\n") + 1)
    height = top + nrows * (plot_h + gap_y)
    fig = _new_figure(width, height)
    fig.text(0.5, 1 - 0.1 / height, title, ha="center", va="top", fontsize=9, color=INK)
    for index, s in enumerate(series):
        ax = _axes_at(fig, left + (index % ncols) * (plot_w + gap_x), top + (index // ncols) * (plot_h + gap_y),
                      plot_w, plot_h)
        _sweep_plot(ax, s, metric, threshold)
        ax.set_ylabel("similarity to clean" if noise else "similarity to reference", fontsize=8)
    return _png(fig)


def _sweep_plot(ax: Any, s: SweepSeries, metric: str, threshold: float | None) -> None:
    """One hyperparameter's curves on ``ax``: numeric values on a (log when wide) axis, others as categories."""
    curves = s.curves()
    xs_all = [p[0] for points in curves.values() for p in points]
    numeric = all(_is_number(x) for x in xs_all)
    categories = list(dict.fromkeys(_short(x, 14) for x in xs_all))
    for color, (name, points) in zip(_COLORS * 4, curves.items()):
        points = sorted(points, key=lambda p: p[0]) if numeric else points
        xs = [p[0] for p in points] if numeric else [categories.index(_short(p[0], 14)) for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", markersize=4,
                    capsize=3, linewidth=1.5, color=color, label=name, zorder=3)
        if name == metric or len(curves) == 1:
            bad = [(x, p[1]) for x, p in zip(xs, points) if p[3]]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], s=80, facecolors="none", edgecolors=BAD,
                           linewidths=1.8, zorder=4, label="below threshold")
    if numeric:
        positive = [x for x in xs_all if x > 0]
        if positive and len(positive) == len(xs_all) and max(positive) / min(positive) >= 20:
            ax.set_xscale("log")
        if _is_number(s.reference):
            ax.axvline(float(s.reference), color=MUTED, linestyle=":", linewidth=1.1,
                       label=f"reference {s.reference:g}")
    else:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=7.5, rotation_mode="anchor")
    if threshold is not None:
        ax.axhline(threshold, color=BAD, linestyle="--", linewidth=1.1, label=f"threshold {threshold:g}")
    ref = "" if s.reference is None or _is_number(s.reference) else f" (reference {_short(s.reference, 20)})"
    ax.set_title(f"{s.name}{ref}", fontsize=8.5, color=INK, loc="left")
    ax.set_xlabel(s.name.replace("_", " "), fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.grid(color="#e5e7eb", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3,
              columnspacing=1.0, handlelength=1.6)


def ensemble_figures(
    *, sizes: Sequence[int], consistency: Sequence[float], similarities: Mapping[str, Sequence[float]] | None = None,
    method: str = "",
) -> list[Figure]:
    """The figure of a consistency-vs-ensemble-size measurement: ``ensemble_curve``.

    ``consistency`` is C between disjoint ensembles of each of ``sizes`` members;
    ``similarities[metric]`` the mean similarity between them, per size. Points that are not
    finite are left out. No figure without sizes.
    """
    if not sizes:
        return []
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, values in [("consistency C", consistency), *(similarities or {}).items()]:
        points = [(float(size), float(v)) for size, v in zip(sizes, values) if _is_number(v) and math.isfinite(v)]
        if points:
            curves[str(name)] = sorted(points)
    return [("ensemble_curve", lambda: _ensemble_curve(sorted(set(sizes)), curves, method))]


def _ensemble_curve(sizes: list[int], curves: dict[str, list[tuple[float, float]]], method: str) -> bytes:
    """Consistency C and the pairwise similarities against the number of ensemble members."""
    fig = _new_figure(6.6, 3.5)
    ax = _axes_at(fig, 0.72, 0.5, 4.0, 2.5)
    for color, (name, points) in zip(_COLORS * 4, curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, linewidth=1.6,
                color=color, label=name)
    ax.set_xticks(sizes)
    ax.set_xlabel("ensemble size (members)", fontsize=8)
    ax.set_ylabel("between disjoint ensembles", fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.grid(color="#e5e7eb", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title(f"{method}: explanation consistency against ensemble size", fontsize=8.5, color=INK, loc="left")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# pairwise checks between models or seeds

# Quantities of the LR separability test: fixed titles and a fixed [0, 1] scale (low is better).
_PAIR_TITLES = {
    "lr_accuracy": "held-out LR accuracy M (0.5: indistinguishable)",
    "separability": "separability S = 2|M \u2212 0.5|",
}


def pair_figures(
    *,
    pairs: Sequence[tuple[str, str]],
    values: Mapping[str, Sequence[float | None]],
    n_inputs: int,
    check: str = "pairwise",
    what: str = "model",
    higher_is_better: Mapping[str, bool] | None = None,
) -> list[Figure]:
    """The figure of a pairwise check (models or seeds): ``pair_matrices``, one symmetric matrix per quantity.

    ``pairs`` are the compared ``(a, b)`` labels; ``values[name]`` holds one mean over
    ``n_inputs`` inputs per pair (``None`` or NaN: undefined). ``lr_accuracy`` and
    ``separability`` are the LR test's quantities (scale [0, 1]); any other name is a similarity
    metric, on a scale reversed when ``higher_is_better[name]`` is False (default True).
    ``what`` names the compared things in the title (``model``, ``seed``). Quantities with no
    finite value are left out; at most :data:`MAX_PAIR_MATRICES`.
    """
    named = [(str(a), str(b)) for a, b in pairs]
    labels = list(dict.fromkeys(label for pair in named for label in pair))
    kept = {str(name): list(column) for name, column in values.items()
            if any(_is_number(v) and math.isfinite(v) for v in column)}
    if not labels or not kept:
        return []
    names = list(kept)[:MAX_PAIR_MATRICES]
    title = f"{check}: {what} \u00d7 {what} values (mean over {n_inputs} inputs)"
    higher = higher_is_better or {}
    return [("pair_matrices", lambda: _pair_matrices(named, labels, {n: kept[n] for n in names}, higher,
                                                     title))]


def _pair_matrices(pairs: list[tuple[str, str]], labels: list[str], values: dict[str, list[float | None]],
                   higher_is_better: Mapping[str, bool], title: str) -> bytes:
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    grids: list[tuple[str, Any, tuple[str, float, float], set[tuple[int, int]]]] = []
    for name, column in values.items():
        grid = np.full((len(labels), len(labels)), np.nan)
        for (a, b), value in zip(pairs, column):
            if _is_number(value):
                grid[index[a], index[b]] = grid[index[b], index[a]] = float(value)
        if name in _PAIR_TITLES:
            grids.append((_PAIR_TITLES[name], grid, ("viridis_r", 0.0, 1.0), set()))
        else:
            grids.append((name, grid, _metric_scale(name, grid, higher_is_better.get(name, True)), set()))
    return _heatmaps(grids, labels, title)


def model_maps_figures(
    *,
    maps: Mapping[str, Any],
    inputs: Any = None,
    n_inputs: int | None = None,
    method: str = "",
    preset: str = "",
    what: str = "models",
    name: str = "model_maps",
    modality: str = "image",
    feature_names: Sequence[str] | None = None,
    tokens: Sequence[Sequence[str | None]] | None = None,
) -> list[Figure]:
    """The figure of a check across models or seeds: ``model_maps``, their maps of the same inputs.

    ``maps[label]`` holds one model's (k, H, W) maps of the first k inputs, ``inputs`` those
    inputs ((k, C, H, W), (k, H, W) or (k, D); 3 channels are drawn as RGB, others in grey, each
    scaled to its own range). The grid has the inputs in its first row, then one row per model
    (at most :data:`MAX_MAP_ROWS`), and one column per input (at most :data:`MAX_MODEL_IMAGES`),
    every map on one colour scale, so that how the models' explanations differ shows at a glance.
    ``n_inputs`` (how many inputs the check used), ``method``, ``preset`` and ``what`` (the rows,
    plural: ``models``, ``seeds``, ``ensembles of 2 models``) word the title; ``name`` names the
    figure. No figure without maps.

    ``modality`` (one of :data:`MODALITIES`) says what the maps explain. ``image``: heatmaps.
    ``tabular``: maps (k, 1, D) or (k, D) as bar charts on one y scale, the features named by
    ``feature_names`` (else ``f0``...), at most :data:`MAX_FEATURES` of them (the largest mean
    |value|); the inputs (k, D) as grey bars on top. ``sequence``: maps (k, 1, T) as a line under
    each input's signal (``inputs`` (k, C, T) or (k, T), every channel a grey line). ``text``: maps
    (k, 1, L), one score per token, as ``tokens[i]`` (input i's token strings) in boxes coloured
    by their score; padding (None, :data:`PAD_TOKENS`, the positions past the list) is not drawn.
    The maps of every modality but ``image`` go in rows (models, layers, methods) with the inputs
    as columns.
    """
    if not maps:
        return []
    view = _view(modality, feature_names, tokens, inputs)
    k = min([MAX_MODEL_IMAGES, *(len(m) for m in maps.values())])
    rows = f"{len(maps)} {what}" if len(maps) <= MAX_MAP_ROWS else f"the first {MAX_MAP_ROWS} of {len(maps)} {what}"
    of = "" if n_inputs is None else f" of {n_inputs}"
    on_top = "" if inputs is None or modality == "text" else (
        " (each input's signal above its map)" if modality == "sequence" else " (the inputs on top)")
    title = (f"{method or 'explanation'} maps{f' ({preset})' if preset else ''} of {rows} for the first {k}{of} "
             f"inputs{on_top}, on one {'y' if modality in ('tabular', 'sequence') else 'colour'} scale")
    return [(name, lambda: _maps_strip(maps, title, MAX_MODEL_IMAGES, transpose=True, inputs=inputs, view=view))]


# --------------------------------------------------------------------------------------------
# baselines


def baseline_figures(
    *,
    current_maps: Any,
    baseline_maps: Any = None,
    values: Sequence[float] | None = None,
    metric: str = "similarity",
    threshold: float | None = None,
    higher_is_better: bool = True,
    status: str = "written",
    path: str = "the baseline file",
    inputs: Any = None,
    modality: str = "image",
    feature_names: Sequence[str] | None = None,
    tokens: Sequence[Sequence[str | None]] | None = None,
) -> list[Figure]:
    """The figure of a baseline check: ``baseline_comparison``, or ``baseline_written``.

    With ``baseline_maps`` (N, H, W): the stored map, the current map and their difference for
    the worst images by the per-image ``values`` of ``metric`` (titles in red where a value fails
    ``threshold``). Without (a baseline was just written, ``status`` ``written`` or ``updated``,
    to ``path``): the first of the ``current_maps`` that were stored. No figure without current maps.
    ``modality``, ``feature_names``, ``tokens`` and ``inputs`` (the N inputs of the maps) say how
    maps that are not images are drawn (see :func:`model_maps_figures`).
    """
    if current_maps is None:
        return []
    view = _view(modality, feature_names, tokens, inputs)
    if baseline_maps is None:
        title = f"Baseline {status}: the first maps now stored in {path}"
        return [("baseline_written", lambda: _maps_strip({"current (stored)": current_maps}, title,
                                                         MAX_BASELINE_IMAGES, transpose=True, view=view))]
    return [("baseline_comparison", lambda: _baseline_comparison(
        baseline_maps, current_maps, values, metric, threshold, higher_is_better, view))]


def _worst_images(values: Any, n: int, higher_is_better: bool, limit: int) -> list[int]:
    """Indices of the ``limit`` worst images: undefined (NaN) first, then the lowest values
    (the highest for distances); the first images when there are no per-image values."""
    import numpy as np

    if values is None:
        return list(range(min(n, limit)))
    key = np.asarray(values, dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf, key if higher_is_better else -key)
    return [int(i) for i in np.argsort(key, kind="stable")[:limit]]


def _baseline_comparison(baseline_maps: Any, current_maps: Any, per_image: Sequence[float] | None, metric: str,
                         threshold: float | None, higher: bool, view: _View | None = None) -> bytes:
    import numpy as np

    baseline = _np(baseline_maps)
    current = _np(current_maps)
    if baseline is None or current is None or baseline.shape != current.shape or baseline.ndim < 2:
        raise ValueError("baseline_maps and current_maps must be arrays of one shape (N, H, W)")
    n = baseline.shape[0]
    values = _np(per_image) if per_image is not None else None
    if values is None or values.ndim != 1 or values.shape[0] != n:
        values = None
    rows = _worst_images(values, n, higher, MAX_BASELINE_IMAGES)
    cmap, vmin, vmax = _map_scale([baseline[rows], current[rows]])
    diff = np.abs(current[rows] - baseline[rows])
    finite = diff[np.isfinite(diff)]
    dmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    grid: list[list[_Cell | None]] = []
    for r, i in enumerate(rows):
        label, color = f"{_noun(view)} {i}", INK
        if values is not None:
            value = float(values[i])
            label += f": {metric} = {value:.3f}"
            if threshold is not None:
                ok = value >= threshold if higher else value <= threshold
                color = INK if ok else BAD
        grid.append([
            _Cell(baseline[i], caption="baseline", caption_color=MUTED, index=i),
            _Cell(current[i], caption="current", caption_color=MUTED, title=label, title_color=color,
                  frame=BAD if color == BAD else None, index=i),
            _Cell(diff[r], scale="diff", caption="|current \u2212 baseline|", caption_color=MUTED, index=i),
        ])
    limit = "" if threshold is None else f"; threshold {threshold:g}"
    worst = f"the {len(rows)} worst of {n} images by {metric}" if values is not None else f"{len(rows)} of {n} images"
    return _map_grid(
        grid,
        scales={"map": (cmap, vmin, vmax, _scale_label(cmap)), "diff": ("magma", 0.0, dmax, "|difference|")},
        title=f"Baseline vs current maps: {worst}{limit}",
        panel=1.15,
        view=view,
        inputs_in_rows=True,
    )


# --------------------------------------------------------------------------------------------
# rendering


def render(figures: Iterable[Figure], *, strict: bool = False, errors: list[str] | None = None) -> dict[str, bytes]:
    """Draw ``figures`` (``(name, render)`` pairs) as ``{name: PNG bytes}``.

    A figure that cannot be drawn is left out and its error appended to ``errors`` (when
    given); ``strict=True`` raises instead (for tests). matplotlib warnings are silenced unless
    ``strict``. Without matplotlib installed: ``{}`` and one error saying so.
    """
    planned = list(figures)
    out: dict[str, bytes] = {}
    if not planned:
        return out
    if importlib.util.find_spec("matplotlib") is None:
        if strict:
            raise ModuleNotFoundError(MISSING_MATPLOTLIB)
        if errors is not None:
            errors.append(MISSING_MATPLOTLIB)
        return out
    with warnings.catch_warnings():
        if not strict:
            warnings.simplefilter("ignore")
        for name, draw in planned:
            try:
                out[name] = draw()
            except Exception as exc:
                if strict:
                    raise
                if errors is not None:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return out


def figures_for(result: CheckResult, *, strict: bool = False, errors: list[str] | None = None) -> dict[str, bytes]:
    """Render every figure ``result.figures()`` lists as ``{name: PNG bytes}`` (see :func:`render`).

    The names are file-name-safe stems: ``randomization_strip``, ``ssim_curve``,
    ``agreement_matrices``, ``agreement_maps``, ``sweep_curves``, ``ensemble_curve``,
    ``pair_matrices``, ``model_maps``, ``baseline_comparison``, ``baseline_written`` for the library's checks,
    whatever a user's own result names its figures. A ``figures()`` that raises costs the
    result its figures, not the report: the error goes to ``errors`` (``strict`` raises it).
    """
    try:
        planned = result.figures()
    except Exception as exc:
        if strict:
            raise
        if errors is not None:
            errors.append(f"{result.check}: {type(exc).__name__}: {exc}")
        return {}
    return render(planned, strict=strict, errors=errors)


__all__ = [
    "DPI", "MAX_FEATURES", "MAX_TEXT_LINES", "MISSING_MATPLOTLIB", "MODALITIES", "PAD_TOKENS", "SweepSeries", "agreement_figures", "baseline_figures", "ensemble_figures",
    "figures_for", "model_maps_figures", "pair_figures", "randomization_figures", "render", "sweep_figures",
]
