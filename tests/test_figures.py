"""Report figures: real results from the library, and the drawing functions fed explicit data, rendered
to PNG, headless and without pyplot."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from matplotlib.image import imread

from pytest_saliency.checks.agreement import agreement_matrix
from pytest_saliency.checks.randomization import layer_randomization
from pytest_saliency.reporting import figures as figures_module
from pytest_saliency.reporting.figures import (
    BAD,
    MAX_STRIP_LAYERS,
    SweepSeries,
    _layer_columns,
    _worst_images,
    agreement_figures,
    baseline_figures,
    ensemble_figures,
    figures_for,
    model_maps_figures,
    pair_figures,
    randomization_figures,
    render,
    sweep_figures,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes) -> np.ndarray:
    """Check the PNG signature and decode it; returns an (H, W, 3|4) float image."""
    assert data.startswith(PNG_MAGIC)
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100
    assert image[..., :3].std() > 0.05, "the figure is blank"
    return image


def near(image: np.ndarray, hex_color: str, tol: float = 0.06) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).sum())


def blue_pixels(image: np.ndarray) -> int:
    r, b = image[..., 0], image[..., 2]
    return int(((b > 0.6) & (r < 0.45)).sum())


@pytest.fixture(scope="module")
def model_and_inputs():
    return make_tiny_cnn(), tiny_images(6)


@pytest.fixture(scope="module")
def ipr(model_and_inputs):
    model, x = model_and_inputs
    return layer_randomization(model, x, "saliency", n_bootstrap=100)


@pytest.fixture(scope="module")
def cpr(model_and_inputs):
    model, x = model_and_inputs
    return layer_randomization(model, x, "saliency", mode="cascading", n_bootstrap=100)


@pytest.fixture(scope="module")
def insensitive(model_and_inputs):
    """An 'explainer' that ignores the model: every layer is insensitive (SSIM = 1)."""
    model, x = model_and_inputs
    return layer_randomization(model, x, lambda m, inputs, t: inputs.abs(), n_bootstrap=100)


@pytest.fixture(scope="module")
def agreement(model_and_inputs):
    model, x = model_and_inputs
    return agreement_matrix(
        model, x, ["saliency", "integrated_gradients", "guided_backprop"], n_bootstrap=100,
        method_options={"integrated_gradients": {"n_steps": 4}}, threshold=0.9, statistic="mean",
    )


def test_randomization_figures_are_png_and_small(ipr, cpr):
    for result in (ipr, cpr):
        figures = figures_for(result, strict=True)
        assert set(figures) == {"randomization_strip", "ssim_curve"}
        for data in figures.values():
            decode(data)
            assert len(data) < 400_000


def test_strip_has_one_column_per_layer_in_result_order(ipr):
    strip = decode(figures_for(ipr, strict=True)["randomization_strip"])
    # 1 + 4 layers columns of ~1.05 in, 4 image rows: wider than tall, taller than 4 panels
    assert strip.shape[1] > strip.shape[0] * 0.9
    assert ipr.randomized_maps.shape[:2] == (len(ipr.layers), 4)


def test_insensitive_layers_are_drawn_in_red(insensitive):
    """Same maps, different SSIM: only the red frames and captions differ between the two."""
    assert not insensitive.passed and all(not layer.sensitive for layer in insensitive.stats.layers)
    failing = decode(figures_for(insensitive, strict=True)["randomization_strip"])
    relabelled = randomization_figures(
        original_maps=insensitive.original_maps, randomized_maps=insensitive.randomized_maps,
        layers=insensitive.layers, ssim=[[0.1] * len(row) for row in insensitive.ssim], ssim_threshold=0.99,
        method="abs", mode="independent",
    )
    passing = decode(render(relabelled, strict=True)["randomization_strip"])
    assert near(failing, BAD) > near(passing, BAD) + 500
    curve = decode(figures_for(insensitive, strict=True)["ssim_curve"])
    assert near(curve, BAD) > 200  # threshold line, circled layers, red tick labels


def test_signed_maps_use_a_diverging_colormap(model_and_inputs, ipr):
    model, x = model_and_inputs
    signed = layer_randomization(model, x, "input_x_gradient", preset="sam2020", n_bootstrap=50)
    assert float(signed.original_maps.min()) < 0
    assert blue_pixels(decode(figures_for(signed, strict=True)["randomization_strip"])) > 200
    assert blue_pixels(decode(figures_for(ipr, strict=True)["randomization_strip"])) < 50  # inferno: no blue


def test_agreement_figures(agreement):
    figures = figures_for(agreement, strict=True)
    assert set(figures) == {"agreement_matrices", "agreement_maps"}
    matrices = decode(figures["agreement_matrices"])
    decode(figures["agreement_maps"])
    assert agreement.failing_pairs(), "threshold 0.9 should fail some pair"
    assert near(matrices, BAD) > 100  # failing cells are framed in red


def test_many_layers_are_subsampled_and_insensitive_ones_kept():
    names = [f"block{i}.conv" for i in range(30)]
    maps = np.random.default_rng(0).random((30, 2, 12, 12))
    ssim = np.full((30, 2), 0.3)
    ssim[17] = 1.0
    columns = _layer_columns(names, {names[17]}, MAX_STRIP_LAYERS)
    assert len(columns) == MAX_STRIP_LAYERS and 17 in columns and columns == sorted(columns)
    assert columns[0] == 0 and columns[-1] == 29
    figures = render(randomization_figures(
        layers=names, ssim=ssim.tolist(), ssim_threshold=0.99, insensitive_layers=[names[17]], original_maps=maps[0],
        randomized_maps=maps, mode="cascading", order="top_down", method="m", check="cascading_layer_randomization",
    ), strict=True)
    assert decode(figures["randomization_strip"]).shape[1] <= 11.8 * 90 + 2  # fits the report column


def test_without_their_data_the_drawing_functions_list_no_figure():
    assert randomization_figures(layers=[], ssim=None, ssim_threshold=0.99) == []
    assert agreement_figures(methods=[], metrics=["ssim"], matrices={}, n_images=3) == []
    assert sweep_figures(series=[], metric="ssim") == []
    assert sweep_figures(series=[SweepSeries("n_steps", [], {}, {})], metric="ssim") == []
    assert ensemble_figures(sizes=[], consistency=[]) == []
    assert pair_figures(pairs=[("a", "b")], values={"ssim": [None]}, n_inputs=3) == []
    assert baseline_figures(current_maps=None) == []
    assert render([]) == {}


def test_a_broken_figure_is_left_out_and_explained(ipr):
    broken = randomization_figures(
        original_maps=torch.zeros(3), randomized_maps=torch.zeros(2), layers=ipr.layers, ssim=ipr.ssim,
        ssim_threshold=ipr.stats.ssim_threshold, mode="independent",
    )
    errors: list[str] = []
    figures = render(broken, errors=errors)
    assert set(figures) == {"ssim_curve"}
    assert len(errors) == 1 and errors[0].startswith("randomization_strip: ValueError")
    with pytest.raises(ValueError):
        render(broken, strict=True)


def test_baseline_figure_shows_the_worst_images():
    g = torch.Generator().manual_seed(0)
    baseline = torch.rand(6, 16, 16, generator=g)
    current = baseline.clone()
    current[4] = torch.rand(16, 16, generator=g)
    values = [0.99, 0.98, float("nan"), 0.97, 0.2, 0.95]
    figures = render(baseline_figures(baseline_maps=baseline, current_maps=current, values=values, metric="ssim",
                                      threshold=0.9), strict=True)
    image = decode(figures["baseline_comparison"])
    assert near(image, BAD) > 20  # the title of the failing image
    assert _worst_images(values, 6, True, 4) == [2, 4, 5, 3]
    assert _worst_images([0.1, 0.5, 0.3], 3, False, 2) == [1, 2]  # distances: highest is worst
    assert _worst_images(None, 5, True, 3) == [0, 1, 2]


def test_sweep_figure_with_numeric_and_categorical_values():
    """Two hyperparameters (one numeric, one categorical), two metrics; the failing value circled in red."""
    series = [
        SweepSeries("nt_samples", [100, 200, 800], {"ssim": [0.8, 0.85, 0.95], "spearman": [0.8, 0.85, 0.95]},
                    {"ssim": [0.05] * 3, "spearman": [0.05] * 3}, failing=[False, False, False], reference=50),
        SweepSeries("baseline", ["zero", "uniform", "blurred"], {"ssim": [0.7, 0.7, 0.3]}, {"ssim": [0.1] * 3},
                    failing=[False, False, True], reference="zero"),
    ]
    assert series[0].curves()["ssim"][0] == (100, 0.8, 0.05, False)
    plain = sweep_figures(series=series, metric="ssim", method="smoothgrad")
    gated = sweep_figures(series=series, metric="ssim", threshold=0.5, method="smoothgrad")
    assert [name for name, _ in gated] == ["sweep_curves"]
    plain_image = decode(render(plain, strict=True)["sweep_curves"])
    gated_image = decode(render(gated, strict=True)["sweep_curves"])
    assert near(gated_image, BAD) > near(plain_image, BAD) + 100  # threshold lines and the circled value


def test_pair_matrices_from_explicit_pairs(monkeypatch):
    drawn = {}

    def heatmaps(grids, labels, title):
        drawn.update(grids=grids, labels=labels, title=title)
        return b""

    monkeypatch.setattr(figures_module, "_heatmaps", heatmaps)
    pairs = [("seed 0", "seed 1"), ("seed 0", "seed 2"), ("seed 1", "seed 2")]
    planned = pair_figures(pairs=pairs, values={"lr_accuracy": [0.9] * 3, "separability": [0.8] * 3,
                                                "ssim": [0.4, 0.5, 0.6], "sign": [None] * 3},
                           n_inputs=3, check="explanation_consistency", what="seed")
    assert [name for name, _ in planned] == ["pair_matrices"]
    planned[0][1]()
    assert drawn["labels"] == ["seed 0", "seed 1", "seed 2"]
    assert [title.split()[0] for title, *_ in drawn["grids"]] == ["held-out", "separability", "ssim"]  # "sign": no numbers
    grid = drawn["grids"][2][1]
    assert grid[0, 1] == grid[1, 0] == 0.4 and np.isnan(grid[0, 0])
    assert drawn["title"] == "explanation_consistency: seed \u00d7 seed values (mean over 3 inputs)"
    monkeypatch.undo()
    decode(render(planned, strict=True)["pair_matrices"])


def test_model_maps_grid_has_the_inputs_on_top_and_a_row_per_model(monkeypatch):
    drawn = {}

    def map_grid(rows, **kwargs):
        drawn.update(rows=rows, **kwargs)
        return b""

    rng = np.random.default_rng(0)
    inputs = rng.random((5, 3, 12, 12))
    maps = {f"seed={s}": rng.random((5, 12, 12)) for s in range(10)}
    planned = model_maps_figures(maps=maps, inputs=inputs, n_inputs=50, method="saliency", preset="adebayo2018",
                                 what="seeds")
    assert [name for name, _ in planned] == ["model_maps"]
    monkeypatch.setattr(figures_module, "_map_grid", map_grid)
    planned[0][1]()
    rows = drawn["rows"]
    assert len(rows) == 1 + figures_module.MAX_MAP_ROWS and all(len(row) == 4 for row in rows)  # 4 of 5 inputs
    assert drawn["row_labels"] == ["input", *list(maps)[:8]]
    assert drawn["title"].startswith("saliency maps (adebayo2018) of the first 8 of 10 seeds for the first 4 of 50")
    first = rows[0][0]
    assert first.scale == "input" and first.image.shape == (12, 12, 3)  # RGB, channels last, scaled to [0, 1]
    assert first.image.min() == 0.0 and first.image.max() == 1.0
    np.testing.assert_array_equal(rows[3][1].image, maps["seed=2"][1])
    assert drawn["scales"]["input"][3] == ""  # the inputs get no colorbar
    monkeypatch.undo()
    assert model_maps_figures(maps={}) == []
    without_inputs = model_maps_figures(maps={"a": maps["seed=0"][:2], "b": maps["seed=1"][:2]})
    monkeypatch.setattr(figures_module, "_map_grid", map_grid)
    without_inputs[0][1]()
    assert drawn["row_labels"] == ["a", "b"] and len(drawn["rows"][0]) == 2
    monkeypatch.undo()
    red = np.zeros((2, 3, 8, 8))
    red[:, 0] = 1.0  # a pure red input is drawn red, not as a colormapped channel
    image = decode(render(model_maps_figures(maps={"m": rng.random((2, 8, 8))}, inputs=red), strict=True)["model_maps"])
    assert near(image, "#ff0000") > 500


def test_ensemble_curve_from_explicit_sizes():
    planned = ensemble_figures(sizes=[1, 2, 4], consistency=[0.3, 0.5, 0.7],
                               similarities={"sign_agreement": [0.2, float("nan"), 0.6]}, method="saliency")
    decode(render(planned, strict=True)["ensemble_curve"])


def test_figures_are_deterministic_and_thread_safe(ipr, agreement):
    serial = [figures_for(r, strict=True) for r in (ipr, agreement)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(lambda r: figures_for(r, strict=True), (ipr, agreement)))
    assert parallel == serial


def test_digits_sized_figures_stay_small():
    """The PNGs of one result stay well under a megabyte (their rendering time is a benchmark's
    business, not a unit test's)."""
    rng = np.random.default_rng(0)
    names = ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]
    planned = randomization_figures(
        check="independent_layer_randomization", layers=names, ssim=rng.random((6, 64)).tolist(), ssim_threshold=0.99,
        original_maps=rng.random((4, 32, 32)), randomized_maps=rng.random((6, 4, 32, 32)), method="saliency",
        mode="independent", dataset_score=0.5, ci=(0.4, 0.6),
    )
    figures = render(planned, strict=True)
    assert sum(len(v) for v in figures.values()) < 600_000


def test_pyplot_and_the_global_backend_are_left_alone():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import matplotlib
        backend = matplotlib.rcParams._get_backend_or_none()
        from pytest_saliency.reporting.figures import randomization_figures, render
        planned = randomization_figures(layers=["a", "b"], ssim=[[0.5, 0.4], [0.3, 0.2]], ssim_threshold=0.99,
                                        original_maps=np.random.rand(2, 8, 8),
                                        randomized_maps=np.random.rand(2, 2, 8, 8), mode="independent")
        assert set(render(planned, strict=True)) == {"randomization_strip", "ssim_curve"}
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert "torch" not in sys.modules, "torch was imported"
        assert matplotlib.rcParams._get_backend_or_none() == backend
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_figures_for_the_other_result_classes(model_and_inputs, tmp_path):
    """SweepResult, ConsistencyResult, SeedStabilityResult and BaselineResult, run for real: each passes
    its own fields to the drawing functions."""
    from pytest_saliency.checks.input_noise import input_noise_stability
    from pytest_saliency.checks.regression import check_baseline
    from pytest_saliency.checks.sweeps import hyperparameter_sweep

    model, x = model_and_inputs
    other = make_tiny_cnn(seed=1)
    sweep = hyperparameter_sweep(model, x, "integrated_gradients", sweep={"n_steps": [2, 4]},
                                 reference={"n_steps": 8}, metrics=("ssim", "spearman"), threshold=0.999)
    noise = input_noise_stability(model, x, "saliency", variance=[0.01, 0.1], metrics=("ssim",))
    written = check_baseline(model, x, tmp_path / "b.npz", update=True)
    compared = check_baseline(other, x, tmp_path / "b.npz", threshold=0.9)
    expected = {
        "hyperparameter_stability": (sweep, {"sweep_curves"}),
        "input_noise_stability": (noise, {"sweep_curves"}),
        "baseline (updated)": (written, {"baseline_written"}),
        "baseline (compared)": (compared, {"baseline_comparison"}),
    }
    if importlib.util.find_spec("sklearn") is not None:
        from pytest_saliency.checks.consistency import explainer_seed_stability, explanation_consistency

        consistency = explanation_consistency([model, other], tiny_images(12), "saliency", n_splits=2)
        seeds = explainer_seed_stability(model, x, "smoothgrad", seeds=(0, 1), nt_samples=2)
        expected["explanation_consistency"] = (consistency, {"pair_matrices", "model_maps"})
        expected["explainer_seed_stability"] = (seeds, {"pair_matrices"})
    for name, (result, figures) in expected.items():
        rendered = figures_for(result, strict=True)
        assert set(rendered) == figures, name
        for data in rendered.values():
            decode(data)
    assert not sweep.passed
    curves = decode(figures_for(sweep, strict=True)["sweep_curves"])
    assert near(curves, BAD) > 100  # threshold line and the circled failing values
