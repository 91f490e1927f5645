"""Figures for saliency reports: PNG bytes from check results, rendered headless.

:func:`figures_for` takes a result object (``RandomizationResult``, ``AgreementResult``, a sweep,
consistency or baseline result, or anything with a ``check`` string) and returns
``{name: png_bytes}``. The figures are looked up by ``result.check``; a check with no figure
renderer gets none (the report still shows its table), and every attribute a renderer reads is
read with ``getattr``, so a result that lacks one loses that figure, not the report.

Headless and process/thread safe: figures are built from :class:`matplotlib.figure.Figure` with an
explicit :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`; ``pyplot`` is never imported,
so the global backend, pyplot's figure registry and a user's open figures are left alone.
matplotlib is imported only when a figure is drawn.

Conventions in every map figure: maps with no negative value use ``inferno`` on ``[0, max]``
(``[0, 1]`` for the presets' normalized maps); signed maps use ``coolwarm`` with symmetric limits,
so white is zero. Values at or past a check's threshold (an insensitive layer, a failing image)
are drawn in red.
"""

from __future__ import annotations

import importlib.util
import io
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

DPI = 90
MAX_STRIP_IMAGES = 4
MAX_STRIP_LAYERS = 8
MAX_WIDTH = 11.8  # inches: ~1060 px at 90 dpi, shown 1:1 in the HTML report's column
MAX_AGREEMENT_IMAGES = 3
MAX_BASELINE_IMAGES = 4

BAD = "#c62828"
INK = "#222222"
MUTED = "#6b7280"
ACCENT = "#1f5fa8"

MISSING_MATPLOTLIB = (
    "figures need matplotlib, which is not installed: pip install matplotlib (the report shows the tables only)"
)

Renderer = Callable[[Any], list[tuple[str, Callable[[], bytes]]]]


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
    text = str(name)
    return text if len(text) <= width else "\u2026" + text[-(width - 1):]


def _to_dict(result: Any) -> dict[str, Any]:
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        try:
            data = to_dict()
        except Exception:  # a broken to_dict must not cost the other figures
            return {}
        return data if isinstance(data, dict) else {}
    return result if isinstance(result, dict) else {}


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


def _map_scale(arrays: Iterable[Any]) -> tuple[str, float, float]:
    """Colormap and limits shared by all panels of a figure: inferno for [0, x], coolwarm when signed."""
    import numpy as np

    finite = [a[np.isfinite(a)] for a in arrays if a is not None and a.size]
    finite = [a for a in finite if a.size]
    if not finite:
        return "inferno", 0.0, 1.0
    low = min(float(a.min()) for a in finite)
    high = max(float(a.max()) for a in finite)
    if low < 0:
        lim = max(abs(low), abs(high)) or 1.0
        return "coolwarm", -lim, lim
    if high <= 1.0:
        return "inferno", 0.0, 1.0
    return "inferno", 0.0, high


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


def _map_grid(
    rows: list[list[_Cell | None]],
    *,
    scales: dict[str, tuple[str, float, float, str]],
    title: str,
    col_titles: list[tuple[str, str]] | None = None,
    row_labels: list[str] | None = None,
    panel: float = 1.05,
) -> bytes:
    """A grid of maps drawn into one full-figure axes with inch coordinates (fast, exact layout).

    ``scales`` maps a cell's ``scale`` key to ``(cmap, vmin, vmax, colorbar label)``; each scale
    gets one colorbar on the right.
    """
    from matplotlib.patches import Rectangle

    cells = [cell for row in rows for cell in row if cell is not None]
    first = _as_image(cells[0].image)
    aspect = min(1.6, max(0.25, first.shape[0] / max(first.shape[1], 1)))
    pw, ph, gap = panel, panel * aspect, 0.12
    ncols = max(len(row) for row in rows)
    caption_h = 0.21 if any(c.caption for c in cells) else 0.03
    title_h = 0.2 if any(c.title for c in cells) else 0.0
    row_h = title_h + ph + caption_h + 0.1
    left = 0.34 if row_labels else 0.12
    used = {c.scale for c in cells}
    bars = [key for key in scales if key in used]
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
            ax.text(left - 0.17, y + ph / 2, row_labels[r], rotation=90, ha="center", va="center", fontsize=8,
                    color=INK)
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


def _metric_higher_is_better(metric: Any) -> bool:
    try:
        from ..compare.metrics import METRICS

        return bool(METRICS[str(metric)].higher_is_better)
    except Exception:
        return not any(word in str(metric) for word in ("distance", "divergence", "angle", "error"))


# --------------------------------------------------------------------------------------------
# parameter randomization


def _randomization(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    figures: list[tuple[str, Callable[[], bytes]]] = []
    if getattr(result, "original_maps", None) is not None and getattr(result, "randomized_maps", None) is not None:
        figures.append(("randomization_strip", lambda: _randomization_strip(result)))
    if getattr(result, "ssim", None) is not None and getattr(result, "layers", None):
        figures.append(("ssim_curve", lambda: _ssim_curve(result)))
    return figures


def _threshold(result: Any) -> float:
    return _float(getattr(getattr(result, "stats", None), "ssim_threshold", None), 0.99)


def _insensitive_layers(result: Any) -> set[str]:
    layers = getattr(getattr(result, "stats", None), "layers", None) or []
    return {str(getattr(layer, "name", "")) for layer in layers if not getattr(layer, "sensitive", True)}


def _layer_columns(names: list[str], insensitive: set[str], limit: int) -> list[int]:
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


def _randomization_strip(result: Any) -> bytes:
    original = _np(result.original_maps)
    randomized = _np(result.randomized_maps)
    if original is None or randomized is None or randomized.ndim < 3 or original.ndim < 2:
        raise ValueError("original_maps must be (k, H, W) and randomized_maps (layers, k, H, W)")
    names = [str(n) for n in (getattr(result, "layers", None) or [])]
    if len(names) != randomized.shape[0]:
        names = [f"layer {i}" for i in range(randomized.shape[0])]
    rows = min(MAX_STRIP_IMAGES, original.shape[0], randomized.shape[1])
    if rows == 0 or randomized.shape[0] == 0:
        raise ValueError("no kept maps to draw")
    ssim = _np(getattr(result, "ssim", None))
    threshold = _threshold(result)
    insensitive = _insensitive_layers(result)
    columns = _layer_columns(names, insensitive, MAX_STRIP_LAYERS)
    cmap, vmin, vmax = _map_scale([original[:rows], randomized[columns, :rows]])
    grid: list[list[_Cell | None]] = []
    for r in range(rows):
        row: list[_Cell | None] = [_Cell(original[r], caption="reference", caption_color=MUTED)]
        for layer in columns:
            value = math.nan
            if ssim is not None and ssim.ndim == 2 and layer < ssim.shape[0] and r < ssim.shape[1]:
                value = float(ssim[layer, r])
            bad = not value < threshold
            row.append(_Cell(randomized[layer, r], caption=f"SSIM {value:.3f}", caption_color=BAD if bad else INK,
                             bold=bad, frame=BAD if bad else None))
        grid.append(row)
    mode = str(getattr(result, "mode", ""))
    order = str(getattr(result, "order", "")).replace("_", "-")
    what = f"cumulatively randomized ({order}) down to" if mode == "cascading" else "after randomizing"
    shown = "" if len(columns) == len(names) else f" ({len(columns)} of {len(names)} layers shown)"
    preset = getattr(getattr(result, "pipeline", None), "name", "")
    title = (f"{getattr(result, 'method', '')} maps{' (' + preset + ')' if preset else ''}: the original model's, "
             f"then {what} each layer{shown}. Red frame: SSIM \u2265 {threshold:g}, the map did not change.")
    col_titles = [("original", INK)] + [
        (_short(names[i], 15), BAD if names[i] in insensitive else INK) for i in columns
    ]
    return _map_grid(grid, scales={"map": (cmap, vmin, vmax, _scale_label(cmap))}, title=title,
                     col_titles=col_titles, row_labels=[f"image {r}" for r in range(rows)])


def _ssim_curve(result: Any) -> bytes:
    import numpy as np

    names = [str(n) for n in result.layers]
    ssim = _np(result.ssim)
    if ssim is None or ssim.ndim != 2 or ssim.shape[0] != len(names) or ssim.shape[1] == 0:
        raise ValueError("ssim is not a (layers, images) matrix")
    threshold = _threshold(result)
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
    ax.plot(x, mean, color=ACCENT, marker="o", markersize=4, linewidth=1.8, label="mean SSIM", zorder=4)
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
    mode = getattr(result, "mode", "")
    order = str(getattr(result, "order", "")).replace("_", "-")
    ax.set_xlabel(f"layers, cumulatively randomized ({order})" if mode == "cascading" else "randomized layer",
                  fontsize=8)
    ax.set_ylabel("SSIM(original, randomized)", fontsize=8)
    ax.tick_params(axis="both", labelsize=7.5)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0)
    stats = getattr(result, "stats", None)
    score = _float(getattr(stats, "dataset_score", None))
    title = f"{getattr(result, 'check', 'layer randomization')}: mean SSIM per layer over N = {ssim.shape[1]} images"
    if not math.isnan(score):
        ci_low, ci_high = _float(getattr(stats, "ci_low", None)), _float(getattr(stats, "ci_high", None))
        title += (f"\n$S^I$ = {score:.4f} (CI {ci_low:.4f}\u2013{ci_high:.4f}); "
                  f"{int(insensitive.sum())} of {len(names)} layers with mean SSIM \u2265 {threshold:g}")
    ax.set_title(title, fontsize=8.5, color=INK, loc="left", linespacing=1.3)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# method agreement


def _agreement(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    figures: list[tuple[str, Callable[[], bytes]]] = []
    if getattr(result, "methods", None) and getattr(result, "metrics", None):
        figures.append(("agreement_matrices", lambda: _agreement_matrices(result)))
    maps = getattr(result, "maps", None)
    if isinstance(maps, dict) and maps:
        figures.append(("agreement_maps", lambda: _maps_strip(
            maps, f"Maps of each method for the first images (preset "
                  f"{getattr(getattr(result, 'pipeline', None), 'name', '?')}, as compared by SSIM)",
            MAX_AGREEMENT_IMAGES)))
    return figures


def _matrix_of(result: Any, metric: str, labels: list[str]) -> Any:
    import numpy as np

    grid = None
    matrix = getattr(result, "matrix", None)
    if callable(matrix):
        try:
            grid = matrix(metric)
        except Exception:
            grid = None
    if grid is None:
        grid = (_to_dict(result).get("matrices") or {}).get(metric)
    out = np.full((len(labels), len(labels)), np.nan)
    for i, row in enumerate(grid or []):
        for j, value in enumerate(row or []):
            if i < len(labels) and j < len(labels) and value is not None:
                out[i, j] = _float(value)
    return out


def _failing_cells(result: Any, labels: list[str], metric: str) -> set[tuple[int, int]]:
    failing = getattr(result, "failing_pairs", None)
    if not callable(failing):
        return set()
    try:
        pairs = failing()
    except Exception:
        return set()
    index = {m: i for i, m in enumerate(labels)}
    cells: set[tuple[int, int]] = set()
    for p in pairs:
        a, b = str(getattr(p, "method_a", "")), str(getattr(p, "method_b", ""))
        if getattr(p, "metric", None) == metric and a in index and b in index:
            cells.update({(index[a], index[b]), (index[b], index[a])})
    return cells


def _metric_scale(metric: str, grid: Any) -> tuple[str, float, float]:
    """Colour scale of a metric: fixed ranges where the metric has one, so matrices compare."""
    import numpy as np

    finite = grid[np.isfinite(grid)]
    peak = float(np.abs(finite).max()) if finite.size else 1.0
    name = metric.lower()
    if not _metric_higher_is_better(metric):  # distances, divergences, angles: low is good
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


def _agreement_matrices(result: Any) -> bytes:
    labels = [str(m) for m in result.methods]
    metrics = [str(m) for m in result.metrics]
    pairs = list(getattr(result, "pairs", None) or [])
    grids = []
    for metric in metrics:
        grid = _matrix_of(result, metric, labels)
        chance = next((getattr(p, "chance", None) for p in pairs if getattr(p, "metric", None) == metric), None)
        title = metric + ("" if chance is None else f" (chance {_float(chance):.2f})")
        grids.append((title, grid, _metric_scale(metric, grid), _failing_cells(result, labels, metric)))
    threshold = getattr(result, "threshold", None)
    statistic = getattr(result, "statistic", "mean")
    extra = "" if threshold is None else (
        f"; threshold {_float(threshold):.3g} on the {'mean' if statistic == 'mean' else 'confidence bound'}, "
        "red frame: failing pair"
    )
    return _heatmaps(grids, labels, f"Method agreement: mean over {getattr(result, 'n_images', '?')} images{extra}")


def _maps_strip(maps: dict[str, Any], title: str, max_images: int, transpose: bool = False) -> bytes:
    """Rows: images; columns: the labels of ``maps`` (``transpose``: one row, images as columns)."""
    arrays = {str(label): _np(value) for label, value in maps.items()}
    arrays = {k: v for k, v in arrays.items() if v is not None and v.ndim >= 2 and v.shape[0] > 0}
    if not arrays:
        raise ValueError("no maps to draw")
    labels = list(arrays)[:8]
    rows = min(max_images, min(arrays[k].shape[0] for k in labels))
    cmap, vmin, vmax = _map_scale([arrays[k][:rows] for k in labels])
    scales = {"map": (cmap, vmin, vmax, _scale_label(cmap))}
    if transpose:
        grid = [[_Cell(arrays[k][r]) for r in range(rows)] for k in labels]
        return _map_grid(grid, scales=scales, title=title, col_titles=[(f"image {r}", INK) for r in range(rows)],
                         row_labels=[_short(k, 18) for k in labels])
    grid: list[list[_Cell | None]] = [[_Cell(arrays[k][r]) for k in labels] for r in range(rows)]
    return _map_grid(grid, scales=scales, title=title, col_titles=[(_short(k, 18), INK) for k in labels],
                     row_labels=[f"image {r}" for r in range(rows)])


# --------------------------------------------------------------------------------------------
# hyperparameter sweeps and input noise (SweepResult), ensemble-size curves

_MEAN_KEYS = ("mean", "mean_similarity", "similarity", "dataset_mean", "value_mean", "score")
_STD_KEYS = ("std", "std_similarity", "sd")
_X_KEYS = ("value", "setting", "x")
_NAME_KEYS = ("hyperparameter", "parameter", "param", "name")
_GENERIC_KEYS = {"rows", "values", "results", "table", "tables", "points", "sweep", "sweeps", "curves", "series",
                 "data", "entries", "items"}
_SUMMARY_KEYS = {"least_stable", "failures", "failing", "worst", "best"}

Point = tuple[Any, float, float]  # (swept value, mean, std)


@dataclass
class _Series:
    """One hyperparameter: a curve per metric, the reference value and the failing values."""

    name: str
    curves: dict[str, list[Point]]
    reference: Any = None
    failing: set[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.failing = set(self.failing or ())


def _first(record: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def _known_metric(name: str) -> bool:
    try:
        from ..compare.metrics import METRICS

        if name in METRICS:
            return True
    except Exception:
        pass
    return name in {"ssim", "spearman", "pearson", "hog_pearson", "similarity", "rank_correlation"}


def _sweep_series(data: Any, default_metric: str = "similarity") -> dict[str, dict[str, list[Point]]]:
    """``{hyperparameter: {metric: [(value, mean, std), ...]}}`` found anywhere in a ``to_dict()``.

    Reads row records (``{"hyperparameter", "value", "metric", "mean", "std"}``; the hyperparameter
    and the metric may instead be enclosing keys or an enclosing record's ``hyperparameter``),
    records whose ``mean``/``std`` are ``{metric: number}`` dicts (``SweepResult.to_dict()``), and
    column records (``{"values": [...], "<metric>": {"mean": [...], "std": [...]}}``). Summary
    records (``least_stable``, ``failures``) are skipped.
    """
    series: dict[str, dict[str, list[Point]]] = {}

    def add(name: Any, metric: Any, x: Any, mean: Any, std: Any) -> None:
        if isinstance(mean, numbers.Real) and not isinstance(mean, bool):
            series.setdefault(str(name), {}).setdefault(str(metric), []).append((x, float(mean), _float(std, 0.0)))

    def names_from(obj: dict[str, Any], context: list[str], inherited: Any) -> tuple[Any, Any]:
        named = [c for c in context if c not in _GENERIC_KEYS and not c.isdigit()]
        name, metric = _first(obj, _NAME_KEYS), obj.get("metric")
        if metric is None and named and _known_metric(named[-1]):
            metric = named.pop()
        if name is None:
            name = inherited if inherited is not None else (named[-1] if named else "hyperparameter")
        return name, metric if metric is not None else default_metric

    def walk(obj: Any, context: list[str], inherited: Any) -> None:
        if isinstance(obj, list):
            for i, value in enumerate(obj):
                if isinstance(value, (dict, list)):
                    walk(value, context + [str(i)], inherited)
            return
        if not isinstance(obj, dict):
            return
        x, mean = _first(obj, _X_KEYS), _first(obj, _MEAN_KEYS)
        if x is not None and not isinstance(x, (list, dict)) and mean is not None:
            name, metric = names_from(obj, context, inherited)
            if isinstance(mean, dict):
                std = obj.get("std") if isinstance(obj.get("std"), dict) else {}
                for m, value in mean.items():
                    add(name, m, x, value, std.get(m))
            else:
                add(name, metric, x, mean, _first(obj, _STD_KEYS))
            return
        own = _first(obj, _NAME_KEYS)
        inherited = own if isinstance(own, str) else inherited
        values = obj.get("values")
        if isinstance(values, list) and values and not isinstance(values[0], (dict, list)):
            name, metric = names_from(obj, context, inherited)
            columns = {k: v for k, v in obj.items() if isinstance(v, dict) and isinstance(v.get("mean"), list)}
            if isinstance(obj.get("mean"), list):
                columns[metric] = obj
            for m, column in columns.items():
                stds = column.get("std") if isinstance(column.get("std"), list) else [0.0] * len(values)
                for x, value, s in zip(values, column["mean"], stds):
                    add(name, m, x, value, s)
            if columns:
                return
        for key, value in obj.items():
            if isinstance(value, (dict, list)) and key not in _SUMMARY_KEYS:
                walk(value, context + [str(key)], inherited)

    walk(data, [], None)
    return series


def _sweep_data(result: Any) -> list[_Series]:
    """The curves of a sweep: from ``result.tables`` (SweepResult) if present, else from ``to_dict()``."""
    metrics = [str(m) for m in (getattr(result, "metrics", None) or [])]
    tables = getattr(result, "tables", None)
    out: list[_Series] = []
    if isinstance(tables, (list, tuple)) and tables and all(hasattr(t, "rows") for t in tables):
        failing: set[tuple[str, str]] = set()
        try:
            failing = {(str(t.hyperparameter), repr(r.value)) for t, r in (getattr(result, "failures", None) or [])}
        except Exception:
            failing = set()
        for table in tables:
            name = str(getattr(table, "hyperparameter", "hyperparameter"))
            curves: dict[str, list[Point]] = {}
            for row in table.rows:
                for metric in metrics or list(getattr(row, "scores", {}) or {}):
                    try:
                        curves.setdefault(metric, []).append((row.value, float(row.mean(metric)),
                                                              _float(row.std(metric), 0.0)))
                    except Exception:
                        continue
            if curves:
                out.append(_Series(name, curves, getattr(table, "reference_value", None),
                                   {v for n, v in failing if n == name}))
        if out:
            return out
    data = _to_dict(result)
    failing_rows = data.get("failures") if isinstance(data.get("failures"), list) else []
    references = {}
    for table in data.get("tables") or []:
        if isinstance(table, dict) and "hyperparameter" in table:
            references[str(table["hyperparameter"])] = table.get("reference_value")
    for name, curves in _sweep_series(data, str(getattr(result, "metric", None) or "similarity")).items():
        bad = {repr(f.get("value")) for f in failing_rows
               if isinstance(f, dict) and str(f.get("hyperparameter")) == name}
        out.append(_Series(name, curves, references.get(name), bad))
    return out


def _sweep(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    series = _sweep_data(result)
    if not series:
        return []
    return [("sweep_curves", lambda: _sweep_curves(result, series))]


_COLORS = ["#1f5fa8", "#e07b00", "#2e7d32", "#7b1fa2", "#00838f", "#6d4c41"]


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _sweep_curves(result: Any, series: list[_Series]) -> bytes:
    series = series[:9]
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    plot_w, plot_h, left, gap_x, gap_y = 3.1, 2.2, 0.62, 0.75, 1.45
    check = str(getattr(result, "check", ""))
    metric = str(getattr(result, "metric", "") or "")
    threshold = getattr(result, "threshold", None)
    threshold = _float(threshold) if _is_number(threshold) else None
    if check == "input_noise_stability":
        what = "similarity of the maps of noisy inputs to those of the clean inputs"
    else:
        what = "similarity to the reference setting, one hyperparameter at a time"
    limit = "" if threshold is None else f"; dashed: threshold {threshold:g} on mean {metric}, red: failing value"
    width = left + ncols * plot_w + (ncols - 1) * gap_x + 0.25
    title = _wrap(f"{getattr(result, 'method', '') or 'explanation'}: {what} (mean \u00b1 std over images){limit}",
                  width - 0.2, 9)
    top = 0.35 + 0.17 * (title.count("\n") + 1)
    height = top + nrows * (plot_h + gap_y)
    fig = _new_figure(width, height)
    fig.text(0.5, 1 - 0.1 / height, title, ha="center", va="top", fontsize=9, color=INK)
    for index, s in enumerate(series):
        ax = _axes_at(fig, left + (index % ncols) * (plot_w + gap_x), top + (index // ncols) * (plot_h + gap_y),
                      plot_w, plot_h)
        xs_all = [x for points in s.curves.values() for x, _, _ in points]
        numeric = all(_is_number(x) for x in xs_all)
        categories = list(dict.fromkeys(_short(x, 14) for x in xs_all))
        for color, (name, points) in zip(_COLORS * 4, s.curves.items()):
            points = sorted(points, key=lambda p: p[0]) if numeric else points
            xs = [p[0] for p in points] if numeric else [categories.index(_short(p[0], 14)) for p in points]
            ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", markersize=4,
                        capsize=3, linewidth=1.5, color=color, label=name, zorder=3)
            if name == metric or len(s.curves) == 1:
                bad = [(x, p[1]) for x, p in zip(xs, points) if repr(p[0]) in s.failing]
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
        ax.set_ylabel("similarity to reference" if check != "input_noise_stability" else "similarity to clean",
                      fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(color="#e5e7eb", linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3,
                  columnspacing=1.0, handlelength=1.6)
    return _png(fig)


def _ensemble(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    rows = [r for r in _to_dict(result).get("rows") or [] if isinstance(r, dict) and _is_number(r.get("size"))]
    if not rows:
        return []
    return [("ensemble_curve", lambda: _ensemble_curve(result, rows))]


def _ensemble_curve(result: Any, rows: list[dict[str, Any]]) -> bytes:
    """Consistency C and the pairwise similarities against the number of ensemble members."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in sorted(rows, key=lambda r: r["size"]):
        if _is_number(row.get("consistency")):
            curves.setdefault("consistency C", []).append((row["size"], float(row["consistency"])))
        for metric, value in (row.get("similarities") or {}).items():
            if _is_number(value):
                curves.setdefault(str(metric), []).append((row["size"], float(value)))
    fig = _new_figure(6.6, 3.5)
    ax = _axes_at(fig, 0.72, 0.5, 4.0, 2.5)
    for color, (name, points) in zip(_COLORS * 4, curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, linewidth=1.6,
                color=color, label=name)
    ax.set_xticks(sorted({r["size"] for r in rows}))
    ax.set_xlabel("ensemble size (members)", fontsize=8)
    ax.set_ylabel("between disjoint ensembles", fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.grid(color="#e5e7eb", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title(f"{getattr(result, 'method', '')}: explanation consistency against ensemble size", fontsize=8.5,
                 color=INK, loc="left")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# pairwise checks between models or seeds (ConsistencyResult, SeedStabilityResult)

_PAIR_LABELS = (("method_a", "method_b"), ("model_a", "model_b"), ("a", "b"), ("seed_a", "seed_b"),
                ("left", "right"), ("first", "second"))
_PAIR_FIELDS = ("lr_accuracy", "separability", "similarity", "similarities", "mean", "consistency", "accuracy")
_PAIR_TITLES = {
    "lr_accuracy": ("held-out LR accuracy M (0.5: indistinguishable)", False),
    "separability": ("separability S = 2|M \u2212 0.5|", False),
}


def _pair_grids(data: dict[str, Any]) -> tuple[list[str], list[tuple[str, Any, tuple[str, float, float]]]]:
    """Labels and (title, matrix, colour scale) for the numeric fields of ``to_dict()["pairs"]``.

    Nested ``{metric: value}`` fields (``similarities``) give one matrix per metric.
    """
    import numpy as np

    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, dict) for p in pairs):
        return [], []
    keys = next((k for k in _PAIR_LABELS if all(k[0] in p and k[1] in p for p in pairs)), None)
    if keys is None:
        return [], []
    prefix = "seed " if keys == ("seed_a", "seed_b") else ""
    labels: list[str] = []
    for p in pairs:
        for key in keys:
            if prefix + str(p[key]) not in labels:
                labels.append(prefix + str(p[key]))
    index = {label: i for i, label in enumerate(labels)}
    fields: list[tuple[str, Callable[[dict[str, Any]], Any]]] = []
    for field in _PAIR_FIELDS:
        sample = pairs[0].get(field)
        if isinstance(sample, dict):
            for sub in sample:
                fields.append((str(sub), lambda p, f=field, s=sub: (p.get(f) or {}).get(s)))
        elif field in pairs[0]:
            fields.append((field, lambda p, f=field: p.get(f)))
    grids = []
    for name, get in fields:
        values = [get(p) for p in pairs]
        if not any(_is_number(v) for v in values):
            continue
        grid = np.full((len(labels), len(labels)), np.nan)
        for p, value in zip(pairs, values):
            if _is_number(value):
                i, j = index[prefix + str(p[keys[0]])], index[prefix + str(p[keys[1]])]
                grid[i, j] = grid[j, i] = float(value)
        if name in _PAIR_TITLES:
            title, _ = _PAIR_TITLES[name]
            grids.append((title, grid, ("viridis_r", 0.0, 1.0)))
        else:
            metric = str(data.get("metric") or name) if name in ("similarity", "mean") else name
            grids.append((metric, grid, _metric_scale(metric, grid)))
    return labels, grids[:6]


def _consistency(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    figures: list[tuple[str, Callable[[], bytes]]] = []
    data = _to_dict(result)
    labels, grids = _pair_grids(data)
    if grids:
        check = str(getattr(result, "check", "pairwise"))
        what = "seed \u00d7 seed" if labels and labels[0].startswith("seed ") else "model \u00d7 model"
        figures.append(("pair_matrices", lambda: _heatmaps(
            [(title, grid, scale, set()) for title, grid, scale in grids], labels,
            f"{check}: {what} values (mean over {data.get('n_inputs', data.get('n_images', '?'))} inputs)")))
    maps = getattr(result, "maps", None)
    if isinstance(maps, dict) and maps:
        figures.append(("pair_maps", lambda: _maps_strip(maps, "Maps of each model for the first images",
                                                         MAX_AGREEMENT_IMAGES)))
    return figures


# --------------------------------------------------------------------------------------------
# baselines


def _baseline(result: Any) -> list[tuple[str, Callable[[], bytes]]]:
    current = getattr(result, "current_maps", None)
    if current is None:
        return []
    if getattr(result, "baseline_maps", None) is None:  # a baseline was written: show what was stored
        status = str(getattr(result, "status", "") or "written")
        return [("baseline_written", lambda: _maps_strip(
            {"current (stored)": current}, f"Baseline {status}: the first maps now stored in "
            f"{getattr(result, 'path', 'the baseline file')}", MAX_BASELINE_IMAGES, transpose=True))]
    return [("baseline_comparison", lambda: _baseline_comparison(result))]


def _worst_images(values: Any, n: int, higher_is_better: bool, limit: int) -> list[int]:
    """Indices of the ``limit`` worst images: undefined (NaN) first, then the lowest values
    (the highest for distances); the first images when there are no per-image values."""
    import numpy as np

    if values is None:
        return list(range(min(n, limit)))
    key = np.asarray(values, dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf, key if higher_is_better else -key)
    return [int(i) for i in np.argsort(key, kind="stable")[:limit]]


def _baseline_comparison(result: Any) -> bytes:
    import numpy as np

    baseline = _np(result.baseline_maps)
    current = _np(result.current_maps)
    if baseline is None or current is None or baseline.shape != current.shape or baseline.ndim < 2:
        raise ValueError("baseline_maps and current_maps must be arrays of one shape (N, H, W)")
    n = baseline.shape[0]
    values = _np(getattr(result, "values", None))
    metric = str(getattr(result, "metric", None) or "similarity")
    threshold = getattr(result, "threshold", None)
    threshold = None if isinstance(threshold, (dict, list)) else threshold
    higher = getattr(result, "higher_is_better", None)
    higher = _metric_higher_is_better(metric) if higher is None else bool(higher)
    if values is None or values.ndim != 1 or values.shape[0] != n:
        values = None
    rows = _worst_images(values, n, higher, MAX_BASELINE_IMAGES)
    cmap, vmin, vmax = _map_scale([baseline[rows], current[rows]])
    diff = np.abs(current[rows] - baseline[rows])
    finite = diff[np.isfinite(diff)]
    dmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    grid: list[list[_Cell | None]] = []
    for r, i in enumerate(rows):
        label, color = f"image {i}", INK
        if values is not None:
            value = float(values[i])
            label += f": {metric} = {value:.3f}"
            if threshold is not None:
                ok = value >= _float(threshold) if higher else value <= _float(threshold)
                color = INK if ok else BAD
        grid.append([
            _Cell(baseline[i], caption="baseline", caption_color=MUTED),
            _Cell(current[i], caption="current", caption_color=MUTED, title=label, title_color=color,
                  frame=BAD if color == BAD else None),
            _Cell(diff[r], scale="diff", caption="|current \u2212 baseline|", caption_color=MUTED),
        ])
    limit = "" if threshold is None else f"; threshold {_float(threshold):g}"
    worst = f"the {len(rows)} worst of {n} images by {metric}" if values is not None else f"{len(rows)} of {n} images"
    return _map_grid(
        grid,
        scales={"map": (cmap, vmin, vmax, _scale_label(cmap)), "diff": ("magma", 0.0, dmax, "|difference|")},
        title=f"Baseline vs current maps: {worst}{limit}",
        panel=1.15,
    )


# --------------------------------------------------------------------------------------------
# dispatch

RENDERERS: dict[str, Renderer] = {
    "independent_layer_randomization": _randomization,
    "cascading_layer_randomization": _randomization,
    "method_agreement": _agreement,
    "hyperparameter_sweep": _sweep,
    "hyperparameter_stability": _sweep,
    "input_noise_stability": _sweep,
    "explanation_consistency": _consistency,
    "explainer_seed_stability": _consistency,
    "consistency_vs_ensemble_size": _ensemble,
    "baseline": _baseline,
}


def renderer_for(check: str) -> Renderer | None:
    """The figure renderer of a check kind (exact name first, then its family), or None."""
    if check in RENDERERS:
        return RENDERERS[check]
    if check.endswith("_layer_randomization"):
        return _randomization
    if check.startswith("baseline"):
        return _baseline
    if "sweep" in check:
        return _sweep
    if "agreement" in check:
        return _agreement
    return None


def register_figures(check: str, renderer: Renderer) -> None:
    """Add figures for a check kind: ``renderer(result) -> [(name, () -> png_bytes), ...]``."""
    RENDERERS[check] = renderer


def figures_for(result: Any, *, strict: bool = False, errors: list[str] | None = None) -> dict[str, bytes]:
    """Render every figure a reviewer wants for ``result`` as ``{name: PNG bytes}``.

    ``name`` is a file-name-safe stem (``randomization_strip``, ``ssim_curve``,
    ``agreement_matrices``, ``agreement_maps``, ``sweep_curves``, ``ensemble_curve``,
    ``pair_matrices``, ``pair_maps``, ``baseline_comparison``, ``baseline_written``). A check
    kind with no renderer gives ``{}``. A figure that cannot be drawn is left out and its error
    appended to ``errors`` (when given); ``strict=True`` raises instead (for tests). matplotlib
    warnings are silenced unless ``strict``. Without matplotlib installed: ``{}`` and an error.
    """
    check = getattr(result, "check", None)
    renderer = renderer_for(check) if isinstance(check, str) else None
    if renderer is None:
        return {}
    out: dict[str, bytes] = {}
    if importlib.util.find_spec("matplotlib") is None:
        if strict:
            raise ModuleNotFoundError(MISSING_MATPLOTLIB)
        if errors is not None:
            errors.append(MISSING_MATPLOTLIB)
        return out
    with warnings.catch_warnings():
        if not strict:
            warnings.simplefilter("ignore")
        try:
            planned = renderer(result)
        except Exception as exc:
            if strict:
                raise
            if errors is not None:
                errors.append(f"{check}: {type(exc).__name__}: {exc}")
            return out
        for name, draw in planned:
            try:
                out[name] = draw()
            except Exception as exc:
                if strict:
                    raise
                if errors is not None:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return out


__all__ = ["DPI", "MISSING_MATPLOTLIB", "RENDERERS", "figures_for", "register_figures", "renderer_for"]
