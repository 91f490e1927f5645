"""Beyond images: tabular (N, D) and sequence (N, C, T) inputs through the checks, with the
modality's comparison (Spearman for tabular maps, SSIM along the series for sequences) and
never a silent resize."""

from __future__ import annotations

from pathlib import Path

import pytest
import scipy.stats
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.core.forward import infer_modality, model_call_options
from pytest_saliency.maps.modality import current_modality
from pytest_saliency.maps.postprocess import apply_pipeline


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def conv1d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 3)).eval()


def tabular(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 30, generator=torch.Generator().manual_seed(1))


def series(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 2, 64, generator=torch.Generator().manual_seed(2))


def model_independent(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A control that ignores the model: the inputs' magnitude."""
    return inputs.abs()


def test_the_modality_is_inferred_from_the_inputs_and_can_be_named() -> None:
    assert infer_modality(torch.zeros(2, 3, 8, 8)) == "image"
    assert infer_modality(torch.zeros(2, 2, 64)) == "sequence"
    assert infer_modality(torch.zeros(2, 30)) == "tabular"
    assert infer_modality(torch.zeros(2, 30, dtype=torch.long)) == "text"
    with model_call_options(inputs=torch.zeros(2, 30)):
        assert current_modality().similarity == "spearman"
    with model_call_options(inputs=torch.zeros(2, 2, 64)):
        assert current_modality().similarity == "ssim"
    with pytest.raises(SaliencyUsageError, match=r"unknown modality 'audio'. Valid modalities: image, tabular, "):
        ps.explain(mlp(), tabular(2), modality="audio")


def test_series_maps_are_one_row_of_time_steps_with_channels_reduced() -> None:
    a = torch.randn(3, 2, 64)
    with model_call_options(inputs=a):
        maps = apply_pipeline(a, "thesis2023")
    assert maps.shape == (3, 1, 64)
    expected = apply_pipeline(a.abs().sum(dim=1)[:, None, None, :], "thesis2023")  # the same as a 1 x T image
    torch.testing.assert_close(maps, expected)


def test_tabular_randomization_compares_rankings_and_states_the_chance_level() -> None:
    model, x = mlp(), tabular()
    result = ps.layer_randomization(model, x, "saliency", mode="cascading")
    assert result.passed and result.similarity == "spearman" and result.modality == "tabular"
    data = result.to_dict()
    assert data["similarity"] == "spearman" and data["modality"] == "tabular"
    # The chance level: Spearman of each original map with the previous input's, a straightforward loop.
    maps = apply_pipeline(ps.explain(model, x, "saliency"), "adebayo2018").reshape(len(x), -1).numpy()
    loop = [scipy.stats.spearmanr(maps[i], maps[i - 1]).statistic for i in range(1, len(x))]
    assert result.chance == pytest.approx(sum(loop) / len(loop), abs=1e-5)
    assert "compared:    tabular maps by Spearman; chance (original maps of different inputs)" in result.report()
    assert "mean Spearman" in result.report()


def test_tabular_control_fails_and_ssim_is_refused() -> None:
    model, x = mlp(), tabular()
    with pytest.raises(SaliencyCheckFailed, match=r"NOT sensitive to independent layer randomization"):
        ps.assert_sensitive_to_layer_randomization(model, x, model_independent)
    with pytest.raises(SaliencyUsageError, match=r"'ssim' slides a window .* tabular maps are D features in no "
                                                 r"spatial order.*'spearman'"):
        ps.layer_randomization(model, x, "saliency", similarity="ssim")
    with pytest.raises(SaliencyUsageError, match=r"unknown similarity 'l1_distance'"):
        ps.layer_randomization(model, x, "saliency", similarity="l1_distance")


def test_sequence_randomization_runs_ssim_along_the_series_and_catches_the_control() -> None:
    model, x = conv1d(), series()
    result = ps.layer_randomization(model, x, "saliency")
    assert result.passed and result.similarity == "ssim" and result.modality == "sequence"
    control = ps.layer_randomization(model, x, model_independent)
    assert not control.passed and control.stats.dataset_score < 1e-6


@pytest.mark.parametrize("kind", ["tabular", "sequence"])
def test_the_other_checks_use_the_modalitys_comparison(kind: str, tmp_path: Path) -> None:
    model, x = (mlp(), tabular()) if kind == "tabular" else (conv1d(), series())
    expected = "spearman" if kind == "tabular" else "ssim"
    sweep = ps.hyperparameter_sweep(model, x, "smoothgrad", {"nt_samples": [2, 4]})
    assert sweep.metric == expected
    assert sweep.metrics == (("spearman", "feature_agreement") if kind == "tabular" else ("ssim", "spearman"))
    noise = ps.input_noise_stability(model, x, "saliency", variance=[0.01])
    assert noise.noise["clip"] is None  # no [0, 1] clipping outside images
    written = ps.check_baseline(model, x, tmp_path / "b.npz", "saliency")
    compared = ps.check_baseline(model, x, tmp_path / "b.npz", "saliency")
    assert written.status == "written" and compared.status == "compared" and compared.passed
    assert compared.metric == expected and compared.mean == pytest.approx(1.0)
    agreement = ps.agreement_matrix(model, x, ["saliency", "integrated_gradients"])
    assert ("ssim" in agreement.metrics) == (kind == "sequence")
    stability = ps.explainer_seed_stability(model, x, "smoothgrad", nt_samples=4)
    assert stability.metric == ("sign_agreement" if kind == "tabular" else "ssim")
    assert ps.deletion(model, x, "saliency").auc.shape == (len(x),)


def test_a_tabular_baseline_that_could_never_be_compared_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(SaliencyUsageError, match=r"metric 'ssim' slides a window"):
        ps.check_baseline(mlp(), tabular(), tmp_path / "b.npz", "saliency", metric="ssim")
    assert not (tmp_path / "b.npz").exists()


def test_a_series_too_short_for_the_window_is_refused_never_resized(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4, 2)).eval()
    with pytest.raises(SaliencyUsageError, match=r"win_size"):
        ps.layer_randomization(model, torch.randn(6, 2, 4), "saliency", modality="sequence")
    with pytest.raises(SaliencyUsageError, match=r"win_size"):
        ps.check_baseline(model, torch.randn(6, 2, 4), tmp_path / "b.npz", "saliency", modality="sequence")
    assert not (tmp_path / "b.npz").exists()


def test_images_without_their_channel_dimension_are_not_taken_for_series() -> None:
    """A flatten-first MLP says nothing about what (N, A, B) inputs are: the check asks, rather
    than summing an image's rows as a series' channels; with the channel dimension, or with the
    modality named, it runs."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    images = torch.rand(6, 8, 8)
    with pytest.raises(SaliencyUsageError, match=r"series \(N, C, T\) or images without their channel dimension.*"
                                                 r"modality='sequence'.*unsqueeze\(1\)"):
        ps.layer_randomization(model, images, "saliency")
    assert ps.layer_randomization(model, images.unsqueeze(1), "saliency").modality == "image"
    assert ps.explain(model, images, "saliency", modality="sequence").shape == (6, 8, 8)
    recurrent = nn.GRU(8, 4, batch_first=True)
    assert ps.explain(_LastStep(recurrent), images, "saliency").shape == (6, 8, 8)  # a GRU says: series


class _LastStep(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("method, shape", [
    ("occlusion", (2, 2, 64)), ("feature_ablation", (2, 2, 64)), ("gradcam", (2, 1, 64)),
    ("guided_gradcam", (2, 2, 64)), ("lime", (2, 2, 64)), ("integrated_gradients", (2, 2, 64)),
])
def test_every_method_explains_a_series(method: str, shape: tuple[int, ...]) -> None:
    maps = ps.explain(conv1d(), series(2), method)
    assert maps.shape == shape and torch.isfinite(maps).all()


def test_gradcam_on_a_series_uses_the_last_conv1d_upsampled_along_time() -> None:
    model, x = conv1d(), series(2)
    cam = ps.explain(model, x, "gradcam", relu_attributions=False)
    import captum.attr as ca

    target = model(x).argmax(1)
    raw = ca.LayerGradCam(model, model[2]).attribute(x, target=target)
    expected = ca.LayerAttribution.interpolate(raw, (64,), "linear")
    torch.testing.assert_close(cam, expected)


def test_sams_grids_scale_to_a_series_length() -> None:
    """SAM's grids scale pixel sizes to the input's side; a series' side is its length T."""
    grid = ps.sam_grid("occlusion", (8, 2, 64))
    assert grid.sweep["window"] == ps.sam_grid("occlusion", (8, 1, 64, 64)).sweep["window"]
    result = ps.hyperparameter_sweep(conv1d(), series(4), ps.sam_grid("occlusion", (4, 2, 64)))
    assert [row.value for row in result.tables[0].rows] == grid.sweep["window"]


def test_a_randomized_state_with_a_constant_map_counts_as_changed() -> None:
    """Spearman of a constant map is undefined: a layer whose randomization kills every gradient
    (a dead ReLU) changed the maps completely and must count as sensitive, not poison S^I."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1), nn.ReLU(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(10.0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    for seed in range(6):
        result = ps.layer_randomization(model, x, "saliency", seed=seed)
        assert all(layer.mean_ssim == layer.mean_ssim for layer in result.stats.layers)  # no NaN
        assert result.stats.dataset_score == result.stats.dataset_score


def test_sams_image_grids_are_refused_for_other_modalities() -> None:
    with pytest.raises(SaliencyUsageError, match=r"SAM's grid for 'integrated_gradients' is for images.*tabular"):
        ps.hyperparameter_sweep(mlp(), tabular(8), "integrated_gradients")


def test_images_without_a_channel_dimension_are_not_taken_for_series_by_a_conv2d_model() -> None:
    from conftest import make_tiny_cnn, tiny_images

    with pytest.raises(SaliencyUsageError, match=r"taken as series \(N, C, T\), but TinyCNN has Conv2d layers.*"
                                                 r"unsqueeze\(1\), or pass modality='sequence'"):
        ps.layer_randomization(make_tiny_cnn(), tiny_images(4)[:, 0], "saliency")


def test_apply_pipeline_reads_3d_attributions_by_the_modality_given() -> None:
    a = torch.randn(2, 3, 64)
    assert ps.apply_pipeline(a).shape == (2, 3, 64)  # (N, H, W) image maps
    series_maps = ps.apply_pipeline(a, modality="sequence")
    torch.testing.assert_close(series_maps, ps.apply_pipeline(a.abs().sum(1)[:, None, None, :]))
    tokens = torch.randn(2, 12, 16)
    torch.testing.assert_close(ps.apply_pipeline(tokens, modality="text"),
                               ps.apply_pipeline(tokens.abs().sum(-1)[:, None, None, :]))


def test_agreement_compares_a_one_channel_gradcam_with_multi_channel_maps() -> None:
    """GradCAM gives one channel, saliency one per input channel: with channels reduced they cover
    the same positions (a series' time steps, an image's pixels)."""
    series_result = ps.agreement_matrix(conv1d(), series(6), ["saliency", "gradcam"], ["rank_correlation"])
    assert len(series_result.pairs) == 1 and len(series_result.pairs[0].values) == 6
    torch.manual_seed(0)
    image_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    image_result = ps.agreement_matrix(image_model, images, ["saliency", "gradcam"], ["rank_correlation"])
    assert len(image_result.pairs[0].values) == 4


def test_hog_on_a_series_is_refused_with_what_to_use() -> None:
    model, x = conv1d(), series(4)
    with pytest.raises(SaliencyUsageError, match=r"'hog_pearson' compares .* one row.*'ssim' \(along the series\)"):
        ps.agreement_matrix(model, x, ["saliency", "input_x_gradient"], ["hog_pearson"])
    with pytest.raises(SaliencyUsageError, match=r"metric 'hog_pearson' .* one row"):
        ps.hyperparameter_sweep(model, x, "smoothgrad", {"nt_samples": [2]}, {"nt_samples": 4},
                                metrics=["ssim"], metric="hog_pearson", threshold=0.5)


def _one_hot_data() -> tuple[nn.Module, torch.Tensor, ps.Tabular]:
    torch.manual_seed(0)
    x = torch.randn(24, 6)
    x[:, 2:5] = nn.functional.one_hot(torch.arange(24) % 3, 3).float()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    return model, x, ps.Tabular(feature_names=["age", "income", "red", "green", "blue", "height"],
                                groups={"colour": [2, 3, 4]})


def test_one_hot_groups_are_one_position_of_the_maps() -> None:
    """A categorical feature's map value is the pipeline applied to the sum of its columns' signed
    attributions (checked against summing by hand), at the place of its first column."""
    model, x, tab = _one_hot_data()
    raw = ps.explain(model, x, "input_x_gradient", modality=tab)
    assert raw.shape == (24, 6)  # attributions stay per column; the maps group them
    by_hand = torch.cat([raw[:, :2], raw[:, 2:5].sum(1, keepdim=True), raw[:, 5:]], dim=1)
    maps = ps.explain(model, x, "input_x_gradient", modality=tab, preset="adebayo2018")
    torch.testing.assert_close(maps, ps.apply_pipeline(by_hand, "adebayo2018", modality="tabular"))
    result = ps.layer_randomization(model, x, "input_x_gradient", modality=tab)
    assert result.original_maps.shape == (4, 1, 4)
    assert result.figure_context["feature_names"] == ["age", "income", "colour", "height"]
    from pytest_saliency.core.forward import model_call_options
    from pytest_saliency.maps.modality import per_position

    with model_call_options(inputs=x, modality=tab):  # what the top-k and sign metrics rank
        torch.testing.assert_close(per_position(raw), by_hand)
        assert per_position(by_hand) is by_hand  # grouped values are not grouped again


@pytest.mark.parametrize(("groups", "message"), [
    ({"colour": [2, 3], "shade": [3, 4]}, r"column 3 is in both 'colour' and 'shade'"),
    ({"colour": []}, r"must map a name to the column indices"),
    ({"colour": "234"}, r"must map a name to the column indices"),
])
def test_bad_one_hot_groups_are_refused(groups: dict, message: str) -> None:
    with pytest.raises(SaliencyUsageError, match=message):
        ps.Tabular(groups=groups)


def test_a_group_past_the_last_column_is_refused() -> None:
    model, x, _ = _one_hot_data()
    with pytest.raises(SaliencyUsageError, match=r"names column 9, but the inputs have 6 columns"):
        ps.explain(model, x, "saliency", modality=ps.Tabular(groups={"colour": [2, 9]}))


def test_a_tabular_report_names_the_features_the_maps_weigh_most() -> None:
    model, x, tab = _one_hot_data()
    result = ps.layer_randomization(model, x, "input_x_gradient", modality=tab)
    line = next(line for line in result.report().splitlines() if "top features" in line)
    maps = result.original_maps[:, 0].double().mean(0)
    names = ["age", "income", "colour", "height"]
    expected = [names[j] for j in maps.argsort(descending=True).tolist()]
    assert line.split(": ", 1)[1].split(", ")[0].startswith(expected[0] + " ")
    assert [part.rsplit(" ", 1)[0] for part in line.split(": ", 1)[1].split(", ")] == expected
    unnamed = ps.layer_randomization(model, x, "input_x_gradient")
    assert "top features (original maps of the first 4 inputs): x" in unnamed.report()
