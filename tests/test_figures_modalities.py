"""Map figures of the modalities that are not images: tabular maps as bar charts, sequence maps as lines
under their signal, text maps as highlighted tokens; image figures as they were.

The drawing functions are read back before rendering: ``_png`` is swapped for one that keeps the
matplotlib figure, whose panels carry the gid ``map r c`` (and ``signal r c`` above a sequence map)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import Normalize, to_hex
from matplotlib.image import imread

from pytest_saliency.reporting import figures as figures_module
from pytest_saliency.reporting.figures import (
    BAD,
    MAX_FEATURES,
    MODALITIES,
    agreement_figures,
    baseline_figures,
    model_maps_figures,
    randomization_figures,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["age", "income", "children", "credit_score", "years_employed", "debt_ratio"]


def decode(data: bytes) -> np.ndarray:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100
    assert image[..., :3].std() > 0.05, "the figure is blank"
    return image


def drawn(planned, monkeypatch, name: str | None = None):
    """The matplotlib figure a planned figure draws (the first one, or the one called ``name``)."""
    kept = []
    monkeypatch.setattr(figures_module, "_png", lambda fig: kept.append(fig) or b"")
    draw = dict(planned)[name] if name else planned[0][1]
    draw()
    monkeypatch.undo()
    return kept[0]


def panels(fig, kind: str = "map") -> dict[tuple[int, int], object]:
    found = {}
    for ax in fig.axes:
        gid = ax.get_gid() or ""
        if gid.startswith(f"{kind} "):
            _, r, c = gid.split()
            found[int(r), int(c)] = ax
    return found


def shape(found: dict) -> tuple[int, int]:
    return max(r for r, _ in found) + 1, max(c for _, c in found) + 1


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# every modality renders


def test_every_modality_renders_a_png(rng):
    tokens = [["[CLS]", "a", "fine", "film", "[SEP]", "[PAD]"]] * 3
    series = rng.normal(size=(3, 2, 40))
    for modality, length in [("tabular", 6), ("sequence", 40), ("text", 6)]:
        maps = {"a": rng.normal(size=(3, 1, length)), "b": rng.random((3, 1, length))}
        inputs = series if modality == "sequence" else rng.normal(size=(3, length))
        maps = {label: m[:2] if modality == "sequence" else m for label, m in maps.items()}  # fewer axes, faster
        planned = [
            *model_maps_figures(maps=maps, inputs=inputs, modality=modality, tokens=tokens),
            *agreement_figures(methods=[], metrics=[], matrices={}, n_images=3, maps=maps, inputs=inputs,
                               modality=modality, tokens=tokens),
            *randomization_figures(layers=["l1", "l2"], ssim=[[0.2] * 3, [0.9] * 3], ssim_threshold=0.5,
                                   original_maps=maps["a"], randomized_maps=np.stack([maps["b"], maps["a"]]),
                                   insensitive_layers=["l2"], inputs=inputs, modality=modality, tokens=tokens),
            *baseline_figures(current_maps=maps["a"], baseline_maps=maps["b"], values=[0.9, 0.1, 0.5],
                              threshold=0.5, inputs=inputs, modality=modality, tokens=tokens),
        ]
        figures = render(planned, strict=True)
        assert set(figures) == {"model_maps", "agreement_maps", "randomization_strip", "ssim_curve",
                                "baseline_comparison"}, modality
        for data in figures.values():
            decode(data)
            assert len(data) < 400_000


def test_an_unknown_modality_is_refused_when_the_figures_are_listed():
    with pytest.raises(ValueError, match="modality must be one of"):
        model_maps_figures(maps={"a": np.zeros((2, 1, 3))}, modality="audio")
    with pytest.raises(ValueError, match="modality must be one of"):
        baseline_figures(current_maps=np.zeros((2, 1, 3)), modality="Tabular")
    assert MODALITIES == ("image", "tabular", "sequence", "text")


def test_a_map_that_is_not_one_score_a_position_is_left_out_and_explained(rng):
    planned = model_maps_figures(maps={"a": rng.random((2, 5, 5))}, modality="tabular")
    errors: list[str] = []
    assert render(planned, errors=errors) == {}
    assert "tabular maps must be (N, 1, L) or (N, L)" in errors[0]
    wrong_names = model_maps_figures(maps={"a": rng.random((2, 1, 5))}, modality="tabular", feature_names=["x"])
    with pytest.raises(ValueError, match="1 feature_names for maps of 5 features"):
        render(wrong_names, strict=True)


# --------------------------------------------------------------------------------------------
# tabular: bar charts


def test_tabular_bars_are_the_map_values_in_the_grid(rng, monkeypatch):
    maps = {f"seed={s}": rng.normal(size=(5, 1, 6)) for s in range(3)}
    inputs = rng.normal(size=(5, 6))
    fig = drawn(model_maps_figures(maps=maps, inputs=inputs, modality="tabular", feature_names=NAMES, what="seeds"),
                monkeypatch)
    grid = panels(fig)
    assert shape(grid) == (4, 4) and len(grid) == 16  # the inputs' row, then a row per seed; 4 of 5 inputs
    for r, label in enumerate(maps, start=1):
        for c in range(4):
            heights = [bar.get_height() for bar in grid[r, c].patches]
            np.testing.assert_allclose(heights, maps[label][c, 0])
            signed = {to_hex(bar.get_facecolor()) for bar, v in zip(grid[r, c].patches, maps[label][c, 0]) if v < 0}
            assert signed == {figures_module._NEGATIVE}
    np.testing.assert_allclose([bar.get_height() for bar in grid[0, 2].patches], inputs[2])  # the inputs on top
    limits = {grid[r, c].get_ylim() for r in range(1, 4) for c in range(4)}
    assert len(limits) == 1  # one y scale for every map
    low, high = limits.pop()
    peak = max(np.abs(m[:4]).max() for m in maps.values())
    assert low == -high and high >= peak
    assert [t.get_text() for t in grid[3, 0].get_xticklabels()] == NAMES  # names under the last row
    assert all(t.get_text() == "" for t in grid[1, 0].get_xticklabels())
    assert {"input", "seed=0", "seed=2", "input 0", "input 3"} <= set(texts(fig))


def test_many_features_show_the_largest_ones_by_name(rng, monkeypatch):
    d = 80
    maps = rng.normal(size=(2, 1, d)) * 0.01
    strong = [3, 41, 77]
    maps[:, 0, strong] = [5.0, -6.0, 4.0]
    names = [f"feature_{i}" for i in range(d)]
    planned = baseline_figures(current_maps=maps, modality="tabular", feature_names=names)
    fig = drawn(planned, monkeypatch)
    ax = panels(fig)[0, 0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 3 <= len(labels) <= MAX_FEATURES and len(ax.patches) == len(labels)
    assert {names[i] for i in strong} <= set(labels)
    shown = [names.index(label) for label in labels]
    assert shown == sorted(shown)  # in the features' order
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], maps[0, 0, shown])
    assert any(f"of {d} features with the largest mean |value|" in t for t in texts(fig))
    decode(render(planned, strict=True)["baseline_written"])


def test_tabular_features_without_names_are_numbered(rng, monkeypatch):
    fig = drawn(model_maps_figures(maps={"m": rng.random((2, 4))}, modality="tabular"), monkeypatch)
    grid = panels(fig)
    assert shape(grid) == (1, 2)
    assert [t.get_text() for t in grid[0, 1].get_xticklabels()] == ["f0", "f1", "f2", "f3"]
    unsigned = {to_hex(bar.get_facecolor()) for bar in grid[0, 0].patches}
    assert unsigned == {figures_module._UNSIGNED} and grid[0, 0].get_ylim()[0] == 0.0


def test_randomization_of_tabular_maps_has_the_states_as_rows(rng, monkeypatch):
    layers = ["fc1", "fc2", "fc3"]
    original, randomized = rng.random((4, 1, 6)), rng.random((3, 4, 1, 6))
    ssim = [[0.1] * 4, [0.99] * 4, [0.2] * 4]
    planned = randomization_figures(layers=layers, ssim=ssim, ssim_threshold=0.9, insensitive_layers=["fc2"],
                                    original_maps=original, randomized_maps=randomized, modality="tabular",
                                    feature_names=NAMES)
    fig = drawn(planned, monkeypatch, "randomization_strip")
    grid = panels(fig)
    assert shape(grid) == (4, 4)  # the original, then a row per layer; a column per input
    np.testing.assert_allclose([b.get_height() for b in grid[0, 1].patches], original[1, 0])
    np.testing.assert_allclose([b.get_height() for b in grid[2, 3].patches], randomized[1, 3, 0])
    assert to_hex(grid[2, 0].spines["top"].get_edgecolor()) == BAD  # insensitive: framed in red
    assert not grid[1, 0].spines["top"].get_visible()
    fc2 = [t for t in fig.axes[0].texts if t.get_text() == "fc2"]
    assert fc2 and to_hex(fc2[0].get_color()) == BAD


# --------------------------------------------------------------------------------------------
# sequence: the signal and the attribution on one T axis


def test_sequence_maps_are_lines_under_their_signal(rng, monkeypatch):
    t = np.linspace(0, 6, 50)
    signals = np.stack([np.stack([np.sin(t + i), np.cos(2 * t)]) for i in range(3)])  # (3, 2 channels, 50)
    maps = {"saliency": rng.random((3, 1, 50)), "gradient": rng.normal(size=(3, 1, 50))}
    planned = agreement_figures(methods=[], metrics=[], matrices={}, n_images=3, maps=maps, inputs=signals,
                                modality="sequence")
    fig = drawn(planned, monkeypatch)
    grid, above = panels(fig), panels(fig, "signal")
    assert shape(grid) == (2, 3) and set(above) == set(grid)  # a row per method, a column per input
    for (r, c), ax in grid.items():
        signal = above[r, c]
        assert len(signal.lines) == 2
        for line, channel in zip(signal.lines, signals[c]):
            np.testing.assert_allclose(line.get_ydata(), channel)
        attribution = ax.lines[-1]
        np.testing.assert_allclose(attribution.get_ydata(), maps[list(maps)[r]][c, 0])
        np.testing.assert_allclose(attribution.get_xdata(), np.arange(50))
        assert signal.get_xlim() == ax.get_xlim()  # one T axis
        assert signal.get_position().y0 > ax.get_position().y1  # the signal above its map
    assert len({ax.get_ylim() for ax in grid.values()}) == 1


def test_sequence_maps_without_inputs_and_model_maps_have_no_input_row(rng, monkeypatch):
    maps = {"a": rng.random((2, 1, 30)), "b": rng.random((2, 1, 30))}
    fig = drawn(model_maps_figures(maps=maps, modality="sequence"), monkeypatch)
    assert shape(panels(fig)) == (2, 2) and panels(fig, "signal") == {}
    fig = drawn(model_maps_figures(maps=maps, inputs=rng.normal(size=(2, 30)), modality="sequence"), monkeypatch)
    assert shape(panels(fig)) == (2, 2) and len(panels(fig, "signal")) == 4  # the signal above each map instead
    assert any("each input's signal above its map" in t for t in texts(fig))


# --------------------------------------------------------------------------------------------
# text: highlighted tokens


def token_boxes(ax) -> dict[int, tuple[float, ...]]:
    return {int(p.get_gid().split()[1]): p.get_facecolor() for p in ax.patches if (p.get_gid() or "").startswith("token")}


def test_text_tokens_are_coloured_by_their_score_and_padding_is_skipped(monkeypatch):
    tokens = [["[CLS]", "good", "film", "[SEP]", "[PAD]", "[PAD]"], ["[CLS]", "bad", "$", "5", "$"]]
    scores = np.array([[[0.0, 0.9, 0.4, 0.1, 0.7, 0.7]], [[0.2, 1.0, 0.3, 0.6, 0.5, 0.8]]])
    fig = drawn(model_maps_figures(maps={"m": scores}, modality="text", tokens=tokens), monkeypatch)
    grid = panels(fig)
    assert shape(grid) == (1, 2)
    first, second = token_boxes(grid[0, 0]), token_boxes(grid[0, 1])
    assert sorted(first) == [0, 1, 2, 3]  # [PAD] is not drawn
    assert sorted(second) == [0, 1, 2, 3, 4]  # past the token list: padding
    oranges = matplotlib.colormaps["Oranges"]
    for boxes, row in ((first, scores[0, 0]), (second, scores[1, 0])):
        for i, color in boxes.items():
            np.testing.assert_allclose(color, oranges(Normalize(0.0, 1.0)(row[i])))
    darkness = [sum(first[i][:3]) for i in (1, 2, 3, 0)]
    assert darkness == sorted(darkness)  # higher score, darker box
    words = [t.get_text() for t in grid[0, 1].texts]
    assert words == ["[CLS]", "bad", "$", "5", "$"]  # drawn as written, not as math
    assert "[PAD]" not in texts(fig)


def test_signed_text_maps_use_a_diverging_scale(monkeypatch):
    scores = np.array([[[-2.0, 0.0, 1.0]]])
    fig = drawn(baseline_figures(current_maps=scores, modality="text", tokens=[["not", "so", "good"]]), monkeypatch)
    boxes = token_boxes(panels(fig)[0, 0])
    coolwarm = matplotlib.colormaps["coolwarm"]
    for i, score in enumerate(scores[0, 0]):
        np.testing.assert_allclose(boxes[i], coolwarm(Normalize(-2.0, 2.0)(score)))
    assert len(fig.axes) == 3  # the figure's texts, the panel, the colour bar


def test_long_texts_are_cut_and_tokens_keep_their_positions(monkeypatch):
    tokens = [[f"token{i}" for i in range(400)]]
    fig = drawn(model_maps_figures(maps={"m": np.linspace(0, 1, 400)[None, None]}, modality="text", tokens=tokens),
                monkeypatch)
    ax = panels(fig)[0, 0]
    boxes = token_boxes(ax)
    assert 10 < len(boxes) < 400 and sorted(boxes) == list(range(len(boxes)))
    assert "\u2026" in [t.get_text() for t in ax.texts]
    assert fig.get_size_inches()[0] <= figures_module.MAX_WIDTH + 0.01
    fig = drawn(model_maps_figures(maps={"m": np.zeros((1, 1, 3))}, modality="text"), monkeypatch)
    assert [t.get_text() for t in panels(fig)[0, 0].texts] == ["0", "1", "2"]  # no tokens: the positions


# --------------------------------------------------------------------------------------------
# images: unchanged


def figures_at_head(folder: Path):
    """pytest_saliency/reporting/figures.py as committed at HEAD, loaded beside the working tree's."""
    try:
        source = subprocess.run(["git", "show", "HEAD:pytest_saliency/reporting/figures.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git checkout to read HEAD from")
    path = folder / "figures_at_head.py"
    path.write_text(source)
    name = "pytest_saliency.reporting.figures_at_head"  # its relative imports resolve to the package's modules
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def image_figures(module):
    rng = np.random.default_rng(3)
    maps = rng.random((3, 10, 10))
    signed = rng.normal(size=(3, 10, 10))
    return [
        *module.randomization_figures(layers=["a", "b"], ssim=[[0.5, 0.99, 0.2]] * 2, ssim_threshold=0.9,
                                      insensitive_layers=["b"], original_maps=maps, randomized_maps=np.stack([maps, signed]),
                                      method="saliency", mode="independent"),
        *module.agreement_figures(methods=["x", "y"], metrics=["ssim"], matrices={"ssim": [[None, 0.4], [0.4, None]]},
                                  n_images=3, maps={"x": maps, "y": signed}),
        *module.model_maps_figures(maps={"m1": maps, "m2": signed}, inputs=rng.random((3, 3, 10, 10))),
        *module.model_maps_figures(maps={"m1": rng.random((3, 7))}, inputs=rng.random((3, 7)), name="vectors"),
        *module.baseline_figures(current_maps=maps, baseline_maps=signed, values=[0.2, 0.9, 0.5], threshold=0.5),
        *module.baseline_figures(current_maps=maps),
    ]


def test_image_figures_are_bit_identical_to_head(tmp_path):
    head = render(image_figures(figures_at_head(tmp_path)), strict=True)
    now = render(image_figures(figures_module), strict=True)
    assert set(now) == set(head) and len(now) == 8
    for name in now:
        assert now[name] == head[name], name
    explicit = render(model_maps_figures(maps={"m1": np.random.default_rng(3).random((3, 10, 10))}, modality="image"),
                      strict=True)
    default = render(model_maps_figures(maps={"m1": np.random.default_rng(3).random((3, 10, 10))}), strict=True)
    assert explicit == default


def test_image_maps_never_reach_the_plot_grid(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image figure was drawn as plots")

    monkeypatch.setattr(figures_module, "_plot_grid", refuse)
    render(image_figures(figures_module), strict=True)
