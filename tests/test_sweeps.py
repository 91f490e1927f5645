"""Hyperparameter sweeps and input-noise invariance (SAM; validation targets V4, V5, V7).

The proofs run on the example repo's CNN trained on digits (the session ``digits`` fixture) with
small, cheap versions of SAM's sweeps; the smaller checks run on the tiny untrained CNN.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images

from pytest_saliency.exceptions import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.reporting.numbers import format_score
from pytest_saliency.strategies import _ig_rule_option
from pytest_saliency.checks.input_noise import add_input_noise, assert_stable_under_input_noise, input_noise_stability
from pytest_saliency.checks.sam_grids import GRIDS, SweepGrid, sam_grid
from pytest_saliency.checks.sweeps import (
    STABILITY_NOTE,
    assert_stable_under_hyperparameters,
    blurred_baseline,
    hyperparameter_sweep,
    slic_feature_masks,
    uniform_baseline,
)


@pytest.fixture(scope="module")
def trained(digits):
    model, x, _ = digits
    return model, x[:16]


def _train_with_input_noise(seed: int = 0, epochs: int = 3, variance: float = 0.1):
    """The example CNN trained on inputs with SAM's Gaussian noise (var 0.1, clipped): a smoother model.

    The example's own ``train`` loop runs, on a ``SmallCNN`` whose forward pass adds the noise while
    training (drawn at the same point of the loop, so the training is the same draw for draw).
    """
    import digits_model

    class NoisyInputCNN(digits_model.SmallCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                x = (x + math.sqrt(variance) * torch.randn_like(x)).clamp(0, 1)
            return super().forward(x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits_model, "SmallCNN", NoisyInputCNN)
        trained = digits_model.train(seed, epochs)
    model = digits_model.SmallCNN()
    model.load_state_dict(trained.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def noise_trained(request, tmp_path_factory):
    from digits_model import SmallCNN

    cache_plugin = getattr(request.config, "cache", None)
    cache = Path(cache_plugin.mkdir("pytest_saliency_digits")) if cache_plugin else tmp_path_factory.mktemp("noisy")
    path = cache / "small_cnn_input_noise_seed0.pt"
    if path.exists():
        model = SmallCNN()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = _train_with_input_noise()
    torch.save(model.state_dict(), path)
    return model


# ------------------------------------------------------------------------------------------------
# proofs on the trained digits CNN
# ------------------------------------------------------------------------------------------------


def test_smoothgrad_same_seed_is_exactly_one_and_similarity_rises_with_samples(trained):
    """V5: SSIM(reference, N) < 1 and rising with N; the same seed and N reproduce the map exactly."""
    model, x = trained
    result = hyperparameter_sweep(
        model, x, "smoothgrad", sweep={"nt_samples": [10, 20, 40, 80], "seed": [1]}, reference={"nt_samples": 10},
    )
    samples, seeds = result.tables
    same = samples.rows[0]
    assert same.value == 10
    assert same.scores["ssim"] == [1.0] * len(x)
    for metric in ("spearman", "hog_pearson"):
        assert min(same.scores[metric]) > 1 - 1e-9
    for metric in result.metrics:
        means = [row.mean(metric) for row in samples.rows[1:]]
        assert means == sorted(means) and means[0] < means[-1] < 1.0, (metric, means)
    assert seeds.rows[0].mean("ssim") < 0.99  # another seed draws other noise
    assert result.targets == [int(t) for t in model(x).argmax(1)]
    json.dumps(result.to_dict())


def test_occlusion_large_patch_sweep_is_far_less_stable_than_one_pixel_changes(trained):
    """V7: SAM's SP-L grid {5, 17, 29, 41, 53} and SP-S 53 +- 1 px, scaled from 224 px to 32 px."""
    model, x = trained
    x = x[:8]
    large, small = sam_grid("occlusion", x.shape), sam_grid("occlusion_small", x.shape)
    assert (large.reference["window"], large.sweep["window"]) == (4, [1, 2, 6, 8])
    assert (small.reference["window"], small.sweep["window"]) == (8, [7, 9])
    # stride 2 instead of the scaled 1 px keeps the test cheap (the same for every setting); captum needs
    # stride <= window, so the 1 px window is left out of SP-L.
    sp_l = hyperparameter_sweep(model, x, "occlusion", sweep={"window": large.sweep["window"][1:]},
                                reference={"window": 4, "stride": 2}, metrics=("ssim", "spearman"))
    sp_s = hyperparameter_sweep(model, x, "occlusion", sweep=small.sweep, reference={"window": 8, "stride": 2},
                                metrics=("ssim", "spearman"))
    large_ssim, small_ssim = sp_l.tables[0].dataset_mean("ssim"), sp_s.tables[0].dataset_mean("ssim")
    assert small_ssim < 1.0  # SAM: "SSIM scores for SP-S are < 1.0"
    assert large_ssim < small_ssim - 0.1, (large_ssim, small_ssim)  # measured: 0.59 vs 0.80
    large_rho, small_rho = sp_l.tables[0].dataset_mean("spearman"), sp_s.tables[0].dataset_mean("spearman")
    assert 1 - large_rho > 3 * (1 - small_rho), (large_rho, small_rho)  # measured: 0.87 vs 0.98
    assert min(row.mean("ssim") for row in sp_s.tables[0].rows) > max(row.mean("ssim") for row in sp_l.tables[0].rows)


def absolute_input(model, inputs, target, scale: float = 1.0):
    """A control 'explainer' that ignores the model."""
    return inputs.abs() * scale


def test_a_model_independent_control_is_perfectly_stable_and_the_report_says_it_is_not_quality(trained):
    model, x = trained
    result = assert_stable_under_hyperparameters(
        model, x, absolute_input, sweep={"seed": [1, 2], "scale": [0.5, 3.0]}, threshold=0.999,
        metrics=("ssim", "spearman", "hog_pearson"),
    )
    assert result.passed
    for table in result.tables:
        for row in table.rows:
            assert row.scores["ssim"] == [1.0] * len(x)
    report = result.report()
    assert "stability alone is not quality" in report
    assert "verdict:     stable" in report
    assert report.index("verdict:") < report.index("stability alone is not quality")
    assert result.to_dict()["note"] == STABILITY_NOTE
    assert "PASS" in result.summary()


def test_input_noise_check_ranks_a_noise_trained_model_above_the_plain_one(trained, noise_trained):
    """V4: gradients of a model trained with input noise are more invariant to input noise (all 3 metrics)."""
    plain, x = trained
    results = {
        name: input_noise_stability(model, x, "saliency", n_draws=2)
        for name, model in (("plain", plain), ("smooth", noise_trained))
    }
    for metric in ("ssim", "spearman", "hog_pearson"):
        assert results["smooth"].tables[0].dataset_mean(metric) > results["plain"].tables[0].dataset_mean(metric), metric
    floor = (results["plain"].tables[0].dataset_mean("ssim") + results["smooth"].tables[0].dataset_mean("ssim")) / 2
    assert_stable_under_input_noise(noise_trained, x, "saliency", n_draws=2, threshold=floor)
    with pytest.raises(SaliencyCheckFailed) as failure:
        assert_stable_under_input_noise(plain, x, "saliency", n_draws=2, threshold=floor)
    message = str(failure.value)
    for expected in ("NOT stable under input noise", "variance=0.1", f"threshold {floor:g}", "the clean inputs",
                     "clip=[0.0, 1.0]", "2 draw(s)", "stability alone is not quality", "UNSTABLE"):
        assert expected in message, expected
    assert failure.value.result.noise["std"] == [math.sqrt(0.1)]


def test_the_failure_names_the_hyperparameter_the_value_the_similarity_and_the_threshold(trained):
    model, x = trained
    with pytest.raises(SaliencyCheckFailed) as failure:
        assert_stable_under_hyperparameters(
            model, x[:8], "integrated_gradients", sweep={"n_steps": [2, 64]}, reference={"n_steps": 32}, threshold=0.95,
        )
    result = failure.value.result
    worst = result.tables[0].rows[0]
    message = str(failure.value)
    assert message.startswith("Saliency check failed: integrated_gradients maps are NOT stable under hyperparameter")
    assert f"n_steps=2 gives mean ssim {format_score(worst.mean('ssim'))} to the reference (n_steps=32), below the threshold 0.95" in message
    assert "UNSTABLE" in message and "stability alone is not quality" in message and "reproduce:" in message
    assert [t.hyperparameter for t, _ in result.failures] == ["n_steps"]
    assert result.tables[0].rows[1].mean("ssim") >= 0.95
    record = result.record()
    assert record["passed"] is False and record["least_stable"] == "n_steps=2"
    json.dumps(result.to_dict())


# ------------------------------------------------------------------------------------------------
# grids, materialized hyperparameters, joint settings
# ------------------------------------------------------------------------------------------------


def test_sam_grids_are_named_after_the_paper_and_scaled_to_the_input():
    at_224 = sam_grid("occlusion")
    assert at_224.reference == {"window": 29, "stride": 3}
    assert at_224.sweep["window"] == [5, 17, 41, 53]
    assert sam_grid("occlusion_small", (1, 3, 224, 224)).sweep == {"window": [52, 54]}
    assert sam_grid("occlusion", (5, 1, 32, 32)).reference == {"window": 4, "stride": 1}
    assert sam_grid("occlusion", (5, 1, 32, 32)).sweep["stride"] == [2, 3]
    sg = sam_grid("smoothgrad", (1, 1, 32, 32))
    assert sg.reference == {"nt_samples": 50, "noise_level": 0.15}
    assert sg.sweep["nt_samples"] == [100, 200, 500, 800]
    assert sam_grid("integrated_gradients").sweep["baselines"] == ["uniform", "blurred"]
    lime = sam_grid("lime", (1, 1, 32, 32))
    assert lime.reference == {"seed": 0, "n_samples": 1000, "grid": 7}
    assert sam_grid("lime_slic").reference["n_segments"] == 50
    assert set(GRIDS) == {"smoothgrad", "integrated_gradients", "occlusion", "occlusion_small", "lime", "lime_slic",
                          "kernel_shap", "meaningful_perturbation", "meaningful_perturbation_circular"}
    for name in GRIDS:
        for shape in (None, (2, 3, 64, 48), (2, 1, 16, 16)):
            grid = sam_grid(name, shape)
            assert isinstance(grid, SweepGrid) and grid.note
            json.dumps(grid.to_dict())
            for values in grid.sweep.values():
                assert values and all(v != grid.reference.get(k) for k, vs in grid.sweep.items() for v in vs)
    with pytest.raises(SaliencyUsageError, match="unknown grid 'occlusoin'. Did you mean 'occlusion'"):
        sam_grid("occlusoin")
    with pytest.raises(SaliencyUsageError, match=r"input_shape must end in \(H, W\)"):
        sam_grid("occlusion", (32,))


def test_a_grid_name_or_grid_is_a_complete_sweep():
    model, x = make_tiny_cnn(), tiny_images(4)
    by_name = hyperparameter_sweep(model, x, "occlusion_small", metrics="ssim")
    by_grid = hyperparameter_sweep(model, x, sam_grid("occlusion_small", x.shape), metrics="ssim")
    assert by_name.method == by_grid.method == "occlusion"
    assert by_name.reference == {"window": 4, "stride": 1}
    assert [r.value for r in by_name.tables[0].rows] == [3, 5]
    assert by_name.tables[0].rows[0].scores == by_grid.tables[0].rows[0].scores


def test_integrated_gradients_baseline_kinds_and_lime_slic_superpixels():
    model, x = make_tiny_cnn(), tiny_images(4)
    result = hyperparameter_sweep(
        model, x, "integrated_gradients", sweep={"baselines": ["uniform", "blurred"]}, reference={"n_steps": 8},
        metrics=("ssim", "spearman"), keep_attributions=True,
    )
    assert result.tables[0].reference_value == "zero"
    uniform, blurred = (row.attributions for row in result.tables[0].rows)
    assert not torch.equal(uniform, blurred) and not torch.equal(uniform, result.reference_attributions)
    # the uniform baseline is seeded: the same seed gives the same draw, another seed another
    assert torch.equal(uniform_baseline(x, 3), uniform_baseline(x, 3))
    assert not torch.equal(uniform_baseline(x, 3), uniform_baseline(x, 4))
    assert uniform_baseline(x, 0).min() >= x.min() and uniform_baseline(x, 0).max() <= x.max()
    chunked = hyperparameter_sweep(  # per-image baselines follow the explainer's image chunks
        model, x, "integrated_gradients", sweep={"baselines": ["blurred"]}, reference={"n_steps": 8},
        metrics="pearson", batch_size=3, keep_attributions=True,
    )
    assert torch.allclose(chunked.tables[0].rows[0].attributions, blurred, atol=1e-6)
    assert "least stable: baselines='blurred' with mean pearson" in chunked.summary()
    assert blurred_baseline(x).shape == x.shape and blurred_baseline(x).std() < x.std()

    masks = slic_feature_masks(x, 12)
    assert masks.shape == (4, 1, 16, 16) and masks.dtype == torch.long
    for mask in masks:
        labels = mask.unique()
        assert torch.equal(labels, torch.arange(labels.numel())) and 3 <= labels.numel() <= 24
    lime = hyperparameter_sweep(
        model, x, "lime", sweep={"n_segments": [6]}, reference={"n_segments": 12, "n_samples": 60, "alpha": 1e-4},
        metrics="spearman", keep_attributions=True,
    )
    maps, masks = lime.reference_attributions[:, 0], slic_feature_masks(x, 12)[:, 0]
    for image, mask in zip(maps, masks):  # one attribution per SLIC superpixel
        for label in mask.unique():
            values = image[mask == label]
            assert torch.all(values == values[0])


def test_joint_settings_and_custom_explainer_keywords():
    model, x = make_tiny_cnn(), tiny_images(4)
    rule = _ig_rule_option()  # "method" (captum's name) unless explainers renamed it
    calls = []
    result = hyperparameter_sweep(
        model, x, "integrated_gradients", sweep=[{"n_steps": 4, rule: "riemann_left"}, {"n_steps": 50}],
        metrics=("ssim",), progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert calls[0] == (0, 3, "reference") and calls[-1] == (3, 3, "")
    table = result.tables[0]
    assert table.hyperparameter == "setting"
    assert table.reference_value == {"n_steps": 50, rule: "gausslegendre"}
    assert table.rows[1].scores["ssim"] == [1.0] * 4  # the default setting against the default
    assert f"setting {{n_steps=4, {rule}='riemann_left'}}" in result.summary()
    json.dumps(result.to_dict())


def test_checks_change_no_global_rng_state_and_leave_the_model_as_it_was():
    model, x = make_tiny_cnn(), tiny_images(4)
    model.train()
    model.conv2.weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    hyperparameter_sweep(model, x, "smoothgrad", sweep={"nt_samples": [4], "seed": [2]}, reference={"nt_samples": 2})
    input_noise_stability(model, x, "smoothgrad", nt_samples=2, metrics="ssim")
    hyperparameter_sweep(model, x, "integrated_gradients", sweep={"baselines": ["uniform"]}, metrics="ssim")
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]


def test_add_input_noise_follows_the_sam_code_convention():
    flat = torch.full((2, 1, 64, 64), 0.5)
    noisy = add_input_noise(flat, 0.1, clip=None, seed=0)
    assert abs(float((noisy - flat).std()) - math.sqrt(0.1)) < 0.01  # variance 0.1, not std 0.1
    clipped = add_input_noise(flat, 0.1)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0 and (clipped == 0).any() and (clipped == 1).any()
    assert torch.equal(add_input_noise(flat, 0.1, seed=1), add_input_noise(flat, 0.1, seed=1))
    assert not torch.equal(add_input_noise(flat, 0.1, seed=1), add_input_noise(flat, 0.1, seed=1, draw=1))
    # common random numbers: the variance only scales the same draw
    small, large = add_input_noise(flat, 0.01, clip=None), add_input_noise(flat, 0.04, clip=None)
    assert torch.allclose((large - flat), 2 * (small - flat), atol=1e-6)
    result = input_noise_stability(make_tiny_cnn(), tiny_images(3), "saliency", variance=[0.0, 0.05], metrics="ssim")
    assert result.tables[0].rows[0].scores["ssim"] == [1.0] * 3  # zero noise reproduces the clean maps


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _sweep(**kwargs):
    kwargs.setdefault("reference", None)
    model, x = make_tiny_cnn(), tiny_images(2)
    method = kwargs.pop("method", "smoothgrad")
    return hyperparameter_sweep(model, x, method, kwargs.pop("sweep"), kwargs.pop("reference"), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sweep={"n_sample": [1]}),
         r"unknown hyperparameter 'n_sample' for method 'smoothgrad'; valid hyperparameters: .*noise_level, nt_samples, .*seed"),
        (dict(sweep={"n_steps": [4]}, method="occlusion"), r"valid hyperparameters: baselines, .*stride, window"),
        (dict(sweep={"window": [3]}, method="saliency"), r"valid hyperparameters: abs, seed"),
        (dict(sweep={}), r"the sweep for 'smoothgrad' is empty"),
        (dict(sweep=[]), r"is an empty list"),
        (dict(sweep={"nt_samples": []}), r"sweep\['nt_samples'\] is empty"),
        (dict(sweep={"nt_samples": 100}), r"must be a list of values, got 100. Wrap a single value"),
        (dict(sweep={"nt_samples": ["many"]}), r"'nt_samples' must be a positive int .*got 'many' \(str\)"),
        (dict(sweep={"nt_samples": [2.5]}), r"'nt_samples' must be a positive int .*got 2.5 \(float\)"),
        (dict(sweep={"nt_samples": [True]}), r"'nt_samples' must be a positive int"),
        (dict(sweep={"noise_level": [-0.1]}), r"'noise_level' must be a finite float >= 0 .*got -0.1"),
        (dict(sweep={"noise_level": [float("nan")]}), r"'noise_level' must be a finite float >= 0"),
        (dict(sweep={"n_steps": [0]}, method="integrated_gradients"), r"'n_steps' must be a positive int"),
        (dict(sweep={_ig_rule_option(): ["simpson"]}, method="integrated_gradients"), r"' must be one of gausslegendre"),
        (dict(sweep={"baselines": ["gray"]}, method="integrated_gradients"), r"'baselines' must be one of 'zero', 'uniform'"),
        (dict(sweep={"window": [0]}, method="occlusion"), r"'window' must be a positive int"),
        (dict(sweep={"window": [40]}, method="occlusion"), r"occlusion window 40 is larger than the 16x16 inputs"),
        (dict(sweep={"window": [1]}, method="occlusion", reference={"stride": 2}), r"stride 2 is larger than the window 1"),
        (dict(sweep={"seed": [-1]}), r"'seed' must be an int >= 0"),
        (dict(sweep={"nt_samples": [4]}, reference={"nt_samples": "x"}), r"reference for smoothgrad: hyperparameter 'nt_samples' must be a positive int"),
        (dict(sweep={"nt_samples": [4]}, nt_samples_batch_size=2, reference={"nt_samples_batch_size": 4}),
         r"given both in reference and as fixed options"),
        (dict(sweep={"nt_samples": [4]}, nt_samples=2), r"swept but also given as fixed options"),
        (dict(sweep=None, method="saliency"), r"no sweep given for method 'saliency' .*Built-in SAM grids: smoothgrad"),
        (dict(sweep="nt_samples"), r"sweep must be a dict"),
        (dict(sweep={"nt_samples": [4]}, metrics=("ssim", "sim")), r"unknown metric 'sim'"),
        (dict(sweep={"nt_samples": [4]}, metric_options={"ssim": 3}),
         r"^metric_options\['ssim'\] must be a dict of keyword arguments for ssim, .*got int 3\.$"),
        (dict(sweep={"nt_samples": [4]}, metric_options=[("ssim", {})]), r"metric_options must be a dict .*got list"),
        (dict(sweep={"nt_samples": [4]}, metrics=("ssim",), metric_options={"pearson": {}}),
         r"metric_options names \['pearson'\], which are not among the metrics \['ssim'\]"),
        (dict(sweep={"nt_samples": [4]}, metric_options={"hog_pearson": {"cells": 2}}),
         r"metric_options\['hog_pearson'\] = \{'cells': 2\} does not fit the metric: .*'cells'"),
        (dict(sweep={"nt_samples": [4]}, metrics=("ssim", "feature_agreement"), metric_options={"feature_agreement": {}}),
         r"metric_options\['feature_agreement'\] = \{\} does not fit the metric: missing a required argument: 'k'"),
        (dict(sweep={"nt_samples": [4]}, threshold="high"), r"threshold must be a finite number"),
        (dict(sweep={"scales": [2]}, method=absolute_input), r"valid hyperparameters: scale, seed\. A custom explainer"),
    ],
)
def test_bad_sweeps_raise_usage_errors_that_say_how_to_fix_them(kwargs, message):
    with pytest.raises(SaliencyUsageError, match=message):
        _sweep(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variance=-0.1), r"noise variance must be >= 0, got -0.1"),
        (dict(variance=[0.1, -1.0]), r"noise variance must be >= 0, got -1.0"),
        (dict(variance=float("nan")), r"noise variance must be a finite float >= 0"),
        (dict(variance="0.1"), r"noise variance must be a finite float >= 0, got '0.1'"),
        (dict(variance=[]), r"variance is an empty list"),
        (dict(noise="poisson"), r"unknown noise 'poisson'"),
        (dict(n_draws=0), r"n_draws must be a positive int"),
        (dict(clip=(1.0, 0.0)), r"clip must be \(low, high\) with low < high"),
        (dict(clip=(0.0, 0.5)), r"outside clip=\(0.0, 0.5\)"),
        (dict(nt_samples=4), r"unknown hyperparameter 'nt_samples' for method 'saliency'"),
        (dict(metric_options={"ssim": 3}), r"metric_options\['ssim'\] must be a dict of keyword arguments for ssim"),
        (dict(metrics=("ssim",), metric_options={"pearson": {}}), r"metric_options names \['pearson'\]"),
    ],
)
def test_bad_noise_arguments_raise_usage_errors(kwargs, message):
    with pytest.raises(SaliencyUsageError, match=message):
        input_noise_stability(make_tiny_cnn(), tiny_images(2), "saliency", **kwargs)


def test_the_assertions_need_a_threshold():
    model, x = make_tiny_cnn(), tiny_images(2)
    with pytest.raises(SaliencyUsageError, match="needs threshold=... .*SAM reports no pass/fail level"):
        assert_stable_under_hyperparameters(model, x, "smoothgrad", sweep={"nt_samples": [4]})
    with pytest.raises(SaliencyUsageError, match="assert_stable_under_input_noise needs threshold"):
        assert_stable_under_input_noise(model, x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=math.nan), r"threshold must be a finite number with -1 <= threshold <= 1, got nan"),
        (dict(threshold=-1.5), r"got -1.5. ssim lies in \[-1, 1\]"),
        (dict(batch_size=0), r"batch_size must be an int >= 1 or None, got 0"),
        (dict(batch_size=-1), r"batch_size must be an int >= 1 or None, got -1"),
    ],
)
def test_sweep_thresholds_and_counts_are_checked(kwargs, message):
    with pytest.raises(SaliencyUsageError, match=message):
        _sweep(sweep={"nt_samples": [2]}, **kwargs)
    with pytest.raises(SaliencyUsageError, match=message):
        input_noise_stability(make_tiny_cnn(), tiny_images(2), "saliency", **kwargs)


def test_any_integer_seed_is_accepted_like_everywhere_else():
    for seed in (-5, 2**70, np.int64(3)):
        _check_seed_accepted(seed)


def _check_seed_accepted(seed):
    result = _sweep(sweep={"nt_samples": [2]}, reference={"nt_samples": 1}, metrics=("ssim",), seed=seed)
    assert result.seed == int(seed) and type(result.seed) is int
    json.dumps(result.to_dict())
    noisy = input_noise_stability(make_tiny_cnn(), tiny_images(2), "saliency", metrics=("ssim",), seed=seed)
    assert noisy.seed == int(seed)
    x = tiny_images(2)
    assert torch.equal(add_input_noise(x, 0.1, seed=seed), add_input_noise(x, 0.1, seed=int(seed)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variance=-0.1), r"variance must be a finite number with 0 <= variance, got -0.1"),
        (dict(variance=math.nan), r"variance .*got nan"),
        (dict(clip=(1.0, 0.0)), r"clip must be \(low, high\) with low < high"),
        (dict(seed=None), r"seed must be an integer"),
        (dict(draw=-1), r"draw must be an int >= 0, got -1"),
        (dict(inputs=(tiny_images(2) * 255).long()), r"inputs must be a floating-point torch.Tensor"),
    ],
)
def test_add_input_noise_checks_its_arguments(kwargs, message):
    inputs = kwargs.pop("inputs", tiny_images(2))
    with pytest.raises(SaliencyUsageError, match=message):
        add_input_noise(inputs, **kwargs)


def test_the_public_api_serves_the_input_noise_and_grid_names():
    import pytest_saliency
    from pytest_saliency.checks import input_noise, sam_grids, sweeps

    assert all(getattr(sweeps, name) is not None for name in sweeps.__all__)
    assert all(getattr(input_noise, name) is not None for name in input_noise.__all__)
    assert pytest_saliency.input_noise_stability is input_noise.input_noise_stability
    assert pytest_saliency.add_input_noise is input_noise.add_input_noise
    assert sweeps.sam_grid is sam_grids.sam_grid is pytest_saliency.sam_grid


def test_sam_grid_checks_its_arguments():
    with pytest.raises(SaliencyUsageError, match=r"unknown grid \['smoothgrad'\]"):
        sam_grid(["smoothgrad"])
    with pytest.raises(SaliencyUsageError, match=r"input_shape must end in \(H, W\)"):
        sam_grid("occlusion", ("a", "b"))
    assert sam_grid("occlusion", (np.int64(1), 1, np.int64(16), 16)) == sam_grid("occlusion", (1, 1, 16, 16))


def test_an_images_sweep_values_depend_on_its_index_not_on_the_batch():
    """Images 0 to 2 keep their attributions and scores when the sweep runs on them alone, in
    chunks of two, or next to images of another range: a uniform baseline is drawn over each
    image's own range, from its index."""
    model, x = make_tiny_cnn(), tiny_images(5, seed=9)

    def run(inputs, **kwargs):
        return hyperparameter_sweep(model, inputs, "integrated_gradients", sweep={"baselines": ["uniform"]},
                                    reference={"n_steps": 4}, metrics="ssim", keep_attributions=True, **kwargs)

    brighter = x.clone()
    brighter[3:] *= 10
    whole = run(x)
    for other in (run(x[:3]), run(x, batch_size=2), run(brighter)):
        for mine, theirs in ((other.reference_attributions, whole.reference_attributions),
                             (other.tables[0].rows[0].attributions, whole.tables[0].rows[0].attributions)):
            torch.testing.assert_close(mine[:3], theirs[:3], rtol=0, atol=1e-6)
        mine, theirs = other.tables[0].rows[0].scores["ssim"], whole.tables[0].rows[0].scores["ssim"]
        torch.testing.assert_close(mine[:3], theirs[:3], rtol=0, atol=1e-6)


def test_a_swept_uniform_baseline_is_the_one_explain_draws():
    """baselines="uniform" means the same draws in a sweep as in explain (and so in the randomization checks)."""
    from pytest_saliency import explain

    model, x = make_tiny_cnn(), tiny_images(4, seed=2)
    swept = hyperparameter_sweep(model, x, "integrated_gradients", sweep={"baselines": ["uniform"]},
                                 reference={"n_steps": 4}, metrics="ssim", seed=7, keep_attributions=True)
    direct = explain(model, x, "integrated_gradients", n_steps=4, baselines="uniform", seed=7)
    torch.testing.assert_close(swept.tables[0].rows[0].attributions, direct, rtol=0, atol=1e-6)


def test_lime_on_superpixels_draws_each_images_samples_from_its_index():
    """A swept n_segments explains image by image with per-image SLIC masks; image i's LIME samples
    are those the shared attribution entry draws for index i, whatever the chunks."""
    from pytest_saliency.maps.explainers import attribute, prepare_method

    model, x = make_tiny_cnn(), tiny_images(4, seed=9)
    options = {"n_samples": 24, "alpha": 1e-3}
    masks = slic_feature_masks(x, 6)
    for batch_size in (None, 3):
        result = hyperparameter_sweep(model, x, "lime", sweep={"n_segments": [6]}, reference=options, metrics="ssim",
                                      seed=5, batch_size=batch_size, keep_attributions=True)
        swept = result.tables[0].rows[0].attributions
        for i in range(4):
            spec, _, prepared = prepare_method("lime", model, x[i:i + 1], {**options, "feature_mask": masks[i:i + 1]})
            alone = attribute(model, x[i:i + 1], spec, result.target_tensor[i:i + 1], 5, None, True, prepared, index=i)
            torch.testing.assert_close(swept[i:i + 1], alone, rtol=0, atol=1e-6)


def test_progress_has_one_step_per_setting():
    model, x = make_tiny_cnn(), tiny_images(4)
    calls: list[tuple[int, int, str]] = []
    hyperparameter_sweep(model, x, "smoothgrad", sweep={"nt_samples": [2, 4], "stdevs": [0.1]},
                         reference={"nt_samples": 4, "stdevs": 0.1}, metrics=("ssim",),
                         progress=lambda *step: calls.append(step))
    assert calls == [(0, 4, "reference"), (1, 4, "nt_samples=2"), (2, 4, "nt_samples=4"), (3, 4, "stdevs=0.1"),
                     (4, 4, "")]
