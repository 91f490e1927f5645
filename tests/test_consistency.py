"""Seed consistency: Watson et al.'s C on retrained models, the model cache, explainer-seed stability.

The proofs run on scikit-learn's 8x8 digits as 64 standardized features, with small MLPs
trained full-batch in well under a second each. The trained models are memoized per process
(``trained_mlp``), so this file and ``test_ensembles.py`` share them. Maps of 64 features are
viewed as 8x8 images (``map_shape=(8, 8)``) for SSIM with the default preset (5x5 window).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_cnn, tiny_images
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError, SaliencyWarning
from pytest_saliency.checks.consistency import (
    ConsistencyResult,
    SeedStabilityResult,
    assert_explainer_seed_stable,
    assert_seed_consistency_above,
    default_consistency_threshold,
    explainer_seed_stability,
    explanation_consistency,
    fold_assignment,
    lr_separability,
    seed_consistency,
)
from pytest_saliency.checks.ensembles import ensemble
from pytest_saliency.model.cache import ModelCache, factory_name

N_TEST = 200  # explained inputs: 40 per held-out fold


# ------------------------------------------------------------------------------------------
# Shared data and models (memoized per process; test_ensembles.py imports these)
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits64() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 64 standardized features: (x_train, y_train, x_test, y_test), a fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1000], order[1000:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class MLP(nn.Module):
    def __init__(self, hidden: int = 16, classes: int = 10, features: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def train_mlp_uncached(seed: int, steps: int = 100) -> MLP:
    """Full-batch Adam from a seeded initialization; the seed is the only difference between models."""
    x, y, _, _ = digits64()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a busy CI box
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = MLP()
            optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_mlp(seed: int) -> MLP:
    return train_mlp_uncached(seed)


def train_convex(seed: int) -> nn.Linear:
    """Multinomial logistic regression, trained to convergence from a seed-dependent start.

    The L2-regularized softmax loss is strictly convex in the weights, so every start reaches the
    same optimum. scipy's full-batch L-BFGS (via scikit-learn, warm-started from the seeded random
    weights) is deterministic and converges in a fraction of a second. The weights go into a torch
    ``nn.Linear``. The bias is unregularized, and so only identified up to a common shift; that
    shift changes no gradient.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y, _, _ = digits64()
    g = torch.Generator().manual_seed(seed)
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000, warm_start=True)
    clf.coef_ = (torch.randn(10, 64, generator=g, dtype=torch.float64) * 0.5).numpy()
    clf.intercept_ = (torch.randn(10, generator=g, dtype=torch.float64) * 0.5).numpy()
    with threadpool_limits(1):
        clf.fit(x.double().numpy(), y.numpy())
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(clf.coef_))
        model.bias.copy_(torch.from_numpy(clf.intercept_))
    return model.eval()


def test_inputs(n: int = N_TEST) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = digits64()
    return x[:n], y[:n]


test_inputs.__test__ = False  # a helper, not a test


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]


def rng_states() -> tuple:
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before: tuple) -> None:
    torch_state, np_state, py_state = rng_states()
    assert torch.equal(before[0], torch_state)
    assert np.array_equal(before[1], np_state)
    assert before[2] == py_state


# ------------------------------------------------------------------------------------------
# The proofs (Watson et al.): seeds separate NN maps; a model vs itself and convex models do not
# ------------------------------------------------------------------------------------------


def test_mlps_differing_only_in_seed_give_low_consistency_despite_equal_accuracy():
    x, y = test_inputs()
    models = [trained_mlp(s) for s in range(4)]
    result = explanation_consistency(models, x, "saliency", labels=y, map_shape=(8, 8))
    assert result.consistency < 0.35, result.report()  # measured 0.11; Watson et al.: MLP 0.067
    assert result.mean_lr_accuracy > 0.8
    assert len(result.pairs) == 6
    # Accuracy parity: all four models within a few points of each other ...
    accuracies = list(result.accuracies.values())
    assert min(accuracies) > 0.9 and max(accuracies) - min(accuracies) < 0.05
    # ... and the held-out evaluation is what keeps C meaningful: the training folds fit better.
    assert all(p.train_accuracy >= p.lr_accuracy - 0.02 for p in result.pairs)
    assert "accuracy parity does not imply explanation parity" in result.report()
    json.dumps(result.to_dict(), allow_nan=False)


def test_a_model_compared_with_its_own_copy_is_perfectly_consistent():
    x, _ = test_inputs()
    model = trained_mlp(0)
    result = explanation_consistency([model, copy.deepcopy(model)], x, "saliency", map_shape=(8, 8))
    # Both maps of an input are identical and sit in the same fold, so the classifier gives them
    # the same label: exactly one of the two is right, M = 0.5 and C = 1.
    assert result.consistency == 1.0
    assert result.pairs[0].lr_accuracy == 0.5
    assert result.value("ssim") == pytest.approx(1.0)
    assert result.value("sign_agreement") == 1.0
    assert result.pairs[0].relative_difference == 0.0


def test_a_convex_model_is_consistent_across_seeds():
    x, _ = test_inputs()
    models = [train_convex(s) for s in range(3)]
    assert (models[0].weight - models[1].weight).abs().max() < 1e-4  # one optimum from every start
    # Gradient x input of a linear model is its exact SHAP value against a zero baseline.
    result = explanation_consistency(models, x, "input_x_gradient", map_shape=(8, 8))
    assert result.consistency > 0.9, result.report()  # measured 1.0; Watson et al.: SVM 0.94
    assert result.value("sign_agreement") > 0.99
    gate = assert_seed_consistency_above(models, x, map_shape=(8, 8), method="input_x_gradient")
    assert gate.passed and gate.threshold == 0.5


def test_saliency_of_a_linear_model_is_separable_by_float_noise_and_the_report_says_so():
    """The documented caveat: input-independent maps make M detect 1e-6 weight differences."""
    x, _ = test_inputs()
    models = [train_convex(s) for s in range(3)]
    result = explanation_consistency(models, x, "saliency", map_shape=(8, 8))
    assert result.value("ssim") == pytest.approx(1.0, abs=1e-4)
    assert result.value("sign_agreement") == 1.0
    assert all(p.relative_difference < 1e-3 for p in result.pairs)
    if result.consistency < 0.9:  # measured 0.47: the classifier finds the tiny systematic difference
        assert "tiny systematic difference" in result.report()


def test_log_probability_maps_are_far_more_consistent_than_logit_maps():
    """Logits are identified only up to a common shift that training never constrains."""
    x, _ = test_inputs()
    models = [trained_mlp(s) for s in range(4)]
    logits = explanation_consistency(models, x, "saliency", map_shape=(8, 8), metrics=("sign_agreement",))
    log_probs = explanation_consistency(
        [ensemble([m]) for m in models], x, "saliency", map_shape=(8, 8), metrics=("sign_agreement",)
    )
    assert log_probs.consistency > logits.consistency + 0.3  # measured 0.98 vs 0.11
    assert abs(log_probs.value("sign_agreement") - logits.value("sign_agreement")) < 0.1


# ------------------------------------------------------------------------------------------
# Held-out accuracy with grouped folds
# ------------------------------------------------------------------------------------------


def test_in_sample_accuracy_is_about_one_while_grouped_held_out_accuracy_is_chance():
    """Maps from one distribution (twins of a shared map plus independent noise) with more features
    than training rows: any labelling is separable in-sample, but nothing generalizes."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 400))
    a = base + 0.1 * rng.normal(size=base.shape)
    b = base + 0.1 * rng.normal(size=base.shape)
    sep = lr_separability(a, b, n_splits=5, seed=0)
    assert sep.train_accuracy > 0.95
    assert abs(sep.accuracy - 0.5) <= 0.15
    assert sep.separability <= 0.3
    assert len(sep.fold_accuracies) == 5 and sep.converged


def test_ungrouped_folds_would_leak_the_twin_map_and_push_accuracy_below_chance():
    """Why the grouping matters: with plain K-fold, the twin of a test map sits in the training set
    with the opposite label, so near-identical maps are predicted wrong (M << 0.5, S large)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 400))
    a = base + 0.01 * rng.normal(size=base.shape)
    b = base + 0.01 * rng.normal(size=base.shape)
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(40), np.ones(40)]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000))
    ungrouped = cross_val_score(classifier, x, y, cv=KFold(5, shuffle=True, random_state=0)).mean()
    grouped = lr_separability(a, b).accuracy
    assert ungrouped < 0.3  # measured 0.05: "perfectly separable" the wrong way round
    assert abs(grouped - 0.5) <= 0.15


def test_a_model_vs_a_slightly_perturbed_copy_is_consistent():
    """Two copies of one model, one with tiny weight noise: maps from the same distribution."""
    x, _ = test_inputs()
    model = trained_mlp(0)
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-4)
    result = explanation_consistency([model, noisy], x, "saliency", map_shape=(8, 8))
    assert result.consistency > 0.7, result.report()
    assert result.value("sign_agreement") > 0.95


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 300), n_splits=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_fold_assignment_is_balanced_and_covers_every_input_once(n, n_splits, seed):
    folds = fold_assignment(n, n_splits, seed)
    assert folds.shape == (n,)
    counts = np.bincount(folds, minlength=n_splits)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(folds, fold_assignment(n, n_splits, seed))


@settings(deadline=None, max_examples=10)
@given(n=st.integers(10, 40), d=st.integers(1, 30), seed=st.integers(0, 1000))
def test_identical_maps_give_exactly_chance_accuracy(n, d, seed):
    maps = np.random.default_rng(seed).normal(size=(n, d))
    sep = lr_separability(maps, maps.copy(), n_splits=5, seed=seed)
    assert sep.accuracy == 0.5 and sep.separability == 0.0


# ------------------------------------------------------------------------------------------
# Factors, targets, pairs, results
# ------------------------------------------------------------------------------------------


def test_per_factor_consistency_counts_pairs_that_differ_in_one_factor_only():
    x, _ = test_inputs()
    ref = trained_mlp(0)
    models = {"ref": ref, "seed1": trained_mlp(1), "seed2": trained_mlp(2), "copy": copy.deepcopy(ref)}
    factors = {"seed1": "seed", "seed2": "seed", "copy": "replica"}
    result = explanation_consistency(models, x, factors=factors, map_shape=(8, 8), metrics=("sign_agreement",))
    by_pair = {(p.a, p.b): p.factor for p in result.pairs}
    assert by_pair[("ref", "seed1")] == "seed" and by_pair[("seed1", "seed2")] == "seed"
    assert by_pair[("ref", "copy")] == "replica"
    assert by_pair[("seed1", "copy")] is None  # seed and replica: mixed, overall C only
    assert result.per_factor["replica"] == 1.0
    assert result.per_factor["seed"] < 0.4
    assert result.consistency == pytest.approx(1 - np.mean([p.separability for p in result.pairs]))
    assert "per factor:" in result.report()

    reference_only = explanation_consistency(models, x, pairs="reference", map_shape=(8, 8), metrics=("sign_agreement",))
    assert [(p.a, p.b) for p in reference_only.pairs] == [("ref", "seed1"), ("ref", "seed2"), ("ref", "copy")]


def test_targets_default_to_the_reference_prediction_held_fixed():
    x, y = test_inputs(60)
    models = [trained_mlp(0), trained_mlp(1)]
    reference = explanation_consistency(models, x, map_shape=(8, 8), metrics=("sign_agreement",))
    each = explanation_consistency(models, x, target="each", map_shape=(8, 8), metrics=("sign_agreement",))
    given_ = explanation_consistency(models, x, target=y, map_shape=(8, 8), metrics=("sign_agreement",))
    assert reference.target_mode == "reference" and "reference model's (model0) prediction" in reference.report()
    assert each.target_mode == "each" and given_.target_mode == "given"
    assert 0.9 <= reference.pairs[0].prediction_agreement < 1.0  # the models disagree on a few inputs
    assert each.value("sign_agreement") != reference.value("sign_agreement")


def test_result_serializes_and_reports():
    x, y = test_inputs(100)
    result = explanation_consistency([trained_mlp(0), trained_mlp(1)], x, labels=y, map_shape=(8, 8))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["check"] == "explanation_consistency" and data["passed"] is True and data["threshold"] is None
    assert set(data["similarities"]) == {"ssim", "sign_agreement"} and set(data["baselines"]) == {"ssim", "sign_agreement"}
    assert data["pairs"][0]["fold_accuracies"] and data["num_features"] == 64
    assert data["preset"]["name"] == "adebayo2018"
    assert result.summary().startswith("explanation_consistency [saliency, adebayo2018]: C = ")
    report = result.report()
    for text in ("M held-out", "M train", "different inputs", "5-fold CV grouped by input", "reproduce:"):
        assert text in report
    # The maps of two seeds agree clearly more than maps of different inputs.
    assert result.value("sign_agreement") > result.baseline("sign_agreement") + 0.1


def test_the_report_shows_each_seeds_actual_maps_of_the_first_inputs(monkeypatch):
    """seed_consistency's figures: the seed x seed matrices, and a grid with the first four inputs
    on top and one row per seed, holding the maps explain() gives each model for the reference
    model's class. The result keeps only those maps (on the CPU), and to_dict() none of them."""
    from pytest_saliency import explain
    from pytest_saliency.reporting import figures as figures_module
    from pytest_saliency.reporting.figures import render

    x = tiny_images(12)
    result = seed_consistency(lambda seed: make_tiny_cnn(seed=seed), x, seeds=[0, 1, 2], metric="sign_agreement",
                              n_splits=2)
    labels = ["seed=0", "seed=1", "seed=2"]
    assert torch.equal(result.shown_inputs, x[:4]) and list(result.shown_maps) == labels
    target = make_tiny_cnn(seed=0)(x).argmax(dim=1)
    expected = {label: explain(make_tiny_cnn(seed=s), x, "saliency", target=target, preset=result.pipeline)[:4]
                for s, label in enumerate(labels)}
    for label in labels:
        assert result.shown_maps[label].device.type == "cpu" and result.shown_maps[label].shape == (4, 16, 16)
        torch.testing.assert_close(result.shown_maps[label], expected[label])
    assert not torch.allclose(expected["seed=0"], expected["seed=1"])  # the seeds' maps do differ
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert "shown" not in text and len(text) < 10_000

    drawn = {}

    def map_grid(rows, **kwargs):
        drawn.update(rows=rows, **kwargs)
        return b""

    monkeypatch.setattr(figures_module, "_map_grid", map_grid)
    planned = dict(result.figures())
    assert list(planned) == ["pair_matrices", "model_maps"]
    planned["model_maps"]()
    assert len(drawn["rows"]) == len(labels) + 1 and all(len(row) == 4 for row in drawn["rows"])
    assert drawn["row_labels"] == ["input", *labels]
    assert [text for text, _ in drawn["col_titles"]] == ["image 0", "image 1", "image 2", "image 3"]
    assert "of 3 models for the first 4 of 12 inputs (the inputs on top)" in drawn["title"]
    for column, cell in enumerate(drawn["rows"][0]):
        image = x[column, 0].double()
        np.testing.assert_allclose(cell.image, ((image - image.min()) / (image.max() - image.min())).numpy())
    for label, row in zip(labels, drawn["rows"][1:]):
        for column, cell in enumerate(row):
            np.testing.assert_allclose(cell.image, expected[label][column].double().numpy(), rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    assert set(render(result.figures(), strict=True)) == {"pair_matrices", "model_maps"}


def test_consistency_vs_ensemble_size_shows_the_maps_of_the_smallest_and_largest_ensembles():
    from pytest_saliency.checks.ensembles import consistency_vs_ensemble_size
    from pytest_saliency.reporting.figures import render

    result = consistency_vs_ensemble_size([make_tiny_cnn(seed=s) for s in range(4)], tiny_images(8), sizes=(1, 2),
                                          n_splits=2)
    assert list(result.results[2].shown_maps) == ["model0+model1", "model2+model3"]
    assert all(m.shape == (4, 16, 16) for r in result.results.values() for m in r.shown_maps.values())
    assert [name for name, _ in result.figures()] == ["ensemble_curve", "model_maps_size1", "model_maps_size2"]
    assert set(render(result.figures(), strict=True)) == {"ensemble_curve", "model_maps_size1", "model_maps_size2"}


def test_no_model_state_or_global_rng_changes():
    x, _ = test_inputs(40)
    models = [trained_mlp(0), trained_mlp(1)]
    models[1].train()  # a model in training mode must come back in training mode
    try:
        before = [snapshot(m) for m in models]
        rng = rng_states()
        explanation_consistency(models, x, "smoothgrad", map_shape=(8, 8), nt_samples=4)
        explainer_seed_stability(models[0], x, "smoothgrad", seeds=(0, 1), map_shape=(8, 8), nt_samples=4)
        assert_same_rng(rng)
        for snap, model in zip(before, models):
            assert_unchanged(snap, model)
    finally:
        models[1].eval()


# ------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------


def test_the_default_c_gate_fails_seed_mlps_and_the_similarity_gate_passes_them():
    x, _ = test_inputs()
    models = [trained_mlp(s) for s in range(3)]
    with pytest.raises(SaliencyCheckFailed) as info:
        assert_seed_consistency_above(models, x, map_shape=(8, 8))
    message = str(info.value)
    assert "not consistent across the models (C = " in message and "< 0.5" in message
    assert "what next:" in message and "sign_agreement" in message
    assert isinstance(info.value.result, ConsistencyResult) and not info.value.result.passed

    result = assert_seed_consistency_above(models, x, metric="sign_agreement", map_shape=(8, 8))
    assert result.threshold == pytest.approx(default_consistency_threshold("sign_agreement", 0.1, 64))
    assert result.threshold == pytest.approx(6 / 64)  # 2 x chance: top 6 of 64 features, chance 6/128
    assert result.summary().startswith("PASS seed_consistency [saliency, adebayo2018]: sign_agreement@0.1 = ")
    assert result.to_dict()["check"] == "seed_consistency"
    with pytest.raises(SaliencyCheckFailed, match="not similar enough"):
        assert_seed_consistency_above(models, x, threshold=0.9, metric="ssim", map_shape=(8, 8))


class TupleOutput(nn.Module):
    """A classifier whose forward returns (logits, features): unusable as it is for the explanation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


@pytest.mark.parametrize("make, inputs, message", [
    (TupleOutput, lambda x: x, r"model 'seed=0': the model returns a tuple of 2 .*Pass output="),
    (lambda: MLP(hidden=4), lambda x: x[:, :32], r"model 'seed=0' \(MLP\) cannot run on inputs of shape \(60, 32\)"),
    (lambda: MLP(hidden=4).to(torch.float16), lambda x: x, r"model 'seed=0': inputs are torch.float32 but the model's parameters are torch.float16"),
])
@pytest.mark.parametrize("cached", [False, True])
def test_seed_consistency_checks_the_first_model_before_training_the_others(tmp_path, make, inputs, message, cached):
    calls: list[int] = []

    def train(seed: int) -> nn.Module:
        calls.append(seed)
        return make()

    train.build = make
    x, _ = test_inputs(60)
    with pytest.raises(SaliencyUsageError, match=message):
        seed_consistency(train, inputs(x), seeds=[0, 1, 2, 3], cache=tmp_path if cached else None,
                         metric="sign_agreement", map_shape=(8, 8))
    assert calls == [0], "only the first seed is trained before the usage error"


def test_seed_consistency_checks_the_inputs_before_training(tmp_path):
    calls: list[int] = []

    def train(seed: int) -> nn.Module:
        calls.append(seed)
        return MLP(hidden=4)

    with pytest.raises(SaliencyUsageError, match=r"inputs are integers of shape \(N, L\), taken as token ids, but MLP "
                                                 r"has no nn.Embedding.*inputs.float\(\)"):
        seed_consistency(train, torch.zeros(4, 64, dtype=torch.long), seeds=[0, 1], metric="sign_agreement")
    assert calls == [0], "integer inputs are checked against the first model (its embedding), before the others"
    calls.clear()
    with pytest.raises(SaliencyUsageError, match=r"inputs must be a floating-point tensor"):
        seed_consistency(train, torch.zeros(4, 2, 64, dtype=torch.long), seeds=[0, 1], metric="sign_agreement")
    assert calls == []


def test_factory_models_are_trained_once_and_then_come_from_the_cache(tmp_path):
    calls: list[int] = []

    def train(seed: int) -> MLP:
        calls.append(seed)
        return trained_mlp(seed)

    x, _ = test_inputs(60)
    cache = ModelCache(tmp_path)
    first = seed_consistency(train, x, seeds=[0, 1], cache=cache, build=MLP, metric="sign_agreement", map_shape=(8, 8))
    assert calls == [0, 1] and cache.misses == 2
    second = seed_consistency(
        train, x, seeds=[0, 1], cache=ModelCache(tmp_path), build=MLP, metric="sign_agreement", map_shape=(8, 8)
    )
    assert calls == [0, 1], "the second run must not train"
    assert second.consistency == first.consistency and second.models == ["seed=0", "seed=1"]
    assert second.per_factor == {"seed": second.consistency}
    # A directory path works as the cache too.
    seed_consistency(train, x, seeds=[0, 1], cache=str(tmp_path), build=MLP, metric="sign_agreement", map_shape=(8, 8))
    assert calls == [0, 1]


def test_factory_that_raises_names_the_seed():
    def train(seed: int) -> MLP:
        if seed == 3:
            raise RuntimeError("CUDA out of memory")
        return trained_mlp(seed)

    x, _ = test_inputs(20)
    with pytest.raises(SaliencyUsageError, match=r"train\(seed=3\) raised RuntimeError: CUDA out of memory") as info:
        assert_seed_consistency_above(train, x, seeds=[0, 3], metric="sign_agreement", map_shape=(8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(SaliencyUsageError, match="must return the trained nn.Module"):
        assert_seed_consistency_above(lambda seed: "not a model", x, seeds=[0, 1])


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_fewer_than_two_models():
    x, _ = test_inputs(20)
    with pytest.raises(SaliencyUsageError, match="at least two models to compare, got 1"):
        explanation_consistency([trained_mlp(0)], x)
    with pytest.raises(SaliencyUsageError, match="got a single nn.Module"):
        explanation_consistency(trained_mlp(0), x)
    with pytest.raises(SaliencyUsageError, match="list of nn.Modules or a dict"):
        explanation_consistency("model.pt", x)
    with pytest.raises(SaliencyUsageError, match=r"model 'b': model must be a torch.nn.Module"):
        explanation_consistency({"a": trained_mlp(0), "b": "weights.pt"}, x)


def test_models_with_different_output_or_input_shapes_are_named():
    x, _ = test_inputs(20)
    five_classes = MLP(classes=5)
    with pytest.raises(SaliencyUsageError, match=r"model 'small' has 5 outputs but the reference model 'ref' has 10"):
        explanation_consistency({"ref": trained_mlp(0), "small": five_classes}, x)
    other_input = MLP(features=32)
    with pytest.raises(SaliencyUsageError, match=r"model 'model1' \(MLP\) cannot run on inputs of shape \(20, 64\)"):
        explanation_consistency([trained_mlp(0), other_input], x)


def test_too_few_inputs_for_cross_validation():
    x, _ = test_inputs(9)
    with pytest.raises(SaliencyUsageError, match=r"9 input\(s\) are too few for 5-fold cross-validation.*at least"):
        explanation_consistency([trained_mlp(0), trained_mlp(1)], x)
    explanation_consistency([trained_mlp(0), trained_mlp(1)], x[:4], n_splits=2)  # 2 * 2 inputs suffice
    with pytest.raises(SaliencyUsageError, match="n_splits must be an int >= 2"):
        explanation_consistency([trained_mlp(0), trained_mlp(1)], x, n_splits=1)
    with pytest.raises(SaliencyUsageError, match="too few"):
        lr_separability(np.zeros((3, 4)), np.zeros((3, 4)), n_splits=2)
    with pytest.raises(SaliencyUsageError, match=r"maps a must be a tensor or array of maps .* got str"):
        lr_separability("x", "y")


def test_other_bad_options_say_how_to_fix_them():
    x, y = test_inputs(20)
    models = [trained_mlp(0), trained_mlp(1)]
    with pytest.raises(SaliencyUsageError, match="unknown model label in factors 'seed9'"):
        explanation_consistency(models, x, factors={"seed9": "seed"})
    with pytest.raises(SaliencyUsageError, match="labels must be an integer tensor of shape"):
        explanation_consistency(models, x, labels=y[:5])
    with pytest.raises(SaliencyUsageError, match="unknown metric 'sign_agrement'. Did you mean 'sign_agreement'"):
        explanation_consistency(models, x, metrics=("sign_agrement",))
    with pytest.raises(SaliencyUsageError, match="needs 2-D maps.*map_shape"):
        explanation_consistency(models, x, metrics=("ssim",))
    with pytest.raises(SaliencyUsageError, match="H \\* W must equal D = 64"):
        explanation_consistency(models, x, map_shape=(4, 4))
    with pytest.raises(SaliencyUsageError, match="unknown target mode 'own'"):
        explanation_consistency(models, x, target="own")
    with pytest.raises(SaliencyUsageError, match="unknown pairs option"):
        explanation_consistency(models, x, pairs="some")
    with pytest.raises(SaliencyUsageError, match="k=0 is out of range"):
        explanation_consistency(models, x, k=0)
    # Feature vectors get sign agreement only, unless map_shape makes them images.
    assert explanation_consistency(models, x).metrics == ["sign_agreement"]
    with pytest.raises(SaliencyUsageError, match="seeds= is for a model factory"):
        assert_seed_consistency_above(models, x, seeds=[0, 1])
    with pytest.raises(SaliencyUsageError, match="needs seeds="):
        assert_seed_consistency_above(trained_mlp, x)
    with pytest.raises(SaliencyUsageError, match="at least two distinct ints"):
        assert_seed_consistency_above(trained_mlp, x, seeds=[1, 1])
    with pytest.raises(SaliencyUsageError, match="has no default threshold"):
        assert_seed_consistency_above(models, x, metric="ssim", map_shape=(8, 8))
    with pytest.raises(SaliencyUsageError, match="is a distance"):
        assert_seed_consistency_above(models, x, metric="l1_distance", threshold=0.1)
    with pytest.raises(SaliencyUsageError, match="threshold must be a finite number .*got 'high'"):
        assert_seed_consistency_above(models, x, threshold="high")


# ------------------------------------------------------------------------------------------
# The model cache
# ------------------------------------------------------------------------------------------


class CountingFactory:
    """``train(seed)`` that counts its calls and knows how to build its architecture."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, seed: int) -> MLP:
        self.calls.append(seed)
        model = MLP(hidden=4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape))  # global RNG: seeded by the cache
        return model.eval()

    @staticmethod
    def build() -> MLP:
        return MLP(hidden=4)


def test_model_cache_round_trip_trains_once(tmp_path):
    train = CountingFactory()
    cache = ModelCache(tmp_path)
    first = cache.get_or_train(train, 7)
    again = ModelCache(tmp_path).get_or_train(train, 7)  # a fresh process would look the same
    assert train.calls == [7]
    assert cache.misses == 1
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    assert not again.training  # the stored mode comes back
    cache.get_or_train(train, 8)
    assert train.calls == [7, 8]
    assert (train, 7) in cache and (train, 9) not in cache
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt", ".pt"]
    assert cache.clear() == 2 and not list(tmp_path.iterdir())


def test_model_cache_trains_reproducibly_and_leaves_global_rngs_alone(tmp_path):
    train = CountingFactory()
    rng = rng_states()
    a = ModelCache(tmp_path / "a").get_or_train(train, 3)
    b = ModelCache(tmp_path / "b").get_or_train(train, 3)
    assert_same_rng(rng)
    assert torch.equal(a.fc1.weight, b.fc1.weight)  # the factory never seeded, the cache did


def test_model_cache_loads_with_weights_only(tmp_path, monkeypatch):
    train = CountingFactory()
    cache = ModelCache(tmp_path)
    cache.get_or_train(train, 0)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cache.get_or_train(train, 0)
    assert seen == [True] and train.calls == [0]


class NotWeights:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_model_cache_refuses_foreign_pickles_and_retrains(tmp_path):
    train = CountingFactory()
    cache = ModelCache(tmp_path)
    path = cache.path(train, 0)
    torch.save({"format": 1, "state_dict": NotWeights()}, path)
    with pytest.warns(SaliencyWarning, match="could not be read"):
        model = cache.get_or_train(train, 0)
    assert train.calls == [0] and isinstance(model, MLP)
    assert torch.load(path, weights_only=True)["key"] == cache.key(train, 0)  # replaced by a good entry


def test_model_cache_ignores_an_entry_of_another_architecture_and_refuses_a_mismatched_build(tmp_path):
    train = CountingFactory()
    ModelCache(tmp_path).get_or_train(train, 0)
    wider = MLP(hidden=5)
    with (pytest.raises(SaliencyUsageError, match=r"different models: 'fc1.weight' in the trained model is torch.float32 "
                        r"of shape \[4, 64\] but build\(\)'s is torch.float32 of shape \[5, 64\]"),
          pytest.warns(SaliencyWarning, match="do not fit build")):
        ModelCache(tmp_path).get_or_train(train, 0, build=lambda: wider)
    assert train.calls == [0, 0]
    assert ModelCache(tmp_path).get_or_train(train, 0) is not None and train.calls == [0, 0]  # the entry survived


def _rewrite_entry(path: Path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("tamper, why", [
    (lambda p: p.update(state_dict={k: v.double() for k, v in p["state_dict"].items()}),
     r"'fc1.weight' in the entry is torch.float64 of shape \[4, 64\] but build\(\)'s is torch.float32"),
    (lambda p: p.update(state_dict={k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.startswith("fc2")
                                    else v for k, v in p["state_dict"].items()}),
     r"'fc2.weight' in the entry is torch.float32 of shape \[11, 4\]"),
    (lambda p: p.update(architecture="somewhere.OtherNet"), r"holds a somewhere.OtherNet and build\(\) makes a test_consistency.MLP"),
    (lambda p: p["state_dict"].pop("fc2.bias"), r"missing: \['fc2.bias'\]"),
    (lambda p: p.update(key="someone.else#seed=0"), "entry belongs to 'someone.else#seed=0'"),
])
def test_model_cache_never_loads_a_mismatched_entry(tmp_path, tamper, why):
    train = CountingFactory()
    ModelCache(tmp_path).get_or_train(train, 0)
    cache = ModelCache(tmp_path)
    _rewrite_entry(cache.path(train, 0), tamper)
    with pytest.warns(SaliencyWarning, match=why):
        model = cache.get_or_train(train, 0)
    assert train.calls == [0, 0] and cache.misses == 1  # retrained, not loaded
    assert all(v.dtype == torch.float32 for v in model.state_dict().values()) and model.fc2.weight.shape == (10, 4)
    assert ModelCache(tmp_path).get_or_train(train, 0) is not None and train.calls == [0, 0]  # the entry was replaced


def _closure_factory(dtype: torch.dtype, hidden: int = 4):
    """A factory made inside a function, as fixtures make them: every one is `_closure_factory.<locals>.factory`."""
    calls: list[int] = []

    def factory(seed: int) -> MLP:
        calls.append(seed)
        return MLP(hidden=hidden).to(dtype)

    factory.build = lambda: MLP(hidden=hidden).to(dtype)
    factory.calls = calls
    return factory


def test_model_cache_keeps_closures_over_different_settings_apart(tmp_path):
    cl, f64, wide = _closure_factory(torch.float32), _closure_factory(torch.float64), _closure_factory(torch.float32, 6)
    assert factory_name(cl) == factory_name(f64)  # one qualified name ...
    cache = ModelCache(tmp_path)
    assert len({cache.key(f, 0) for f in (cl, f64, wide)}) == 3  # ... three keys
    assert cache.get_or_train(cl, 0).fc1.weight.dtype == torch.float32
    assert cache.get_or_train(f64, 0).fc1.weight.dtype == torch.float64  # not rescnn_cl's models
    assert cache.get_or_train(wide, 0).fc1.weight.shape == (6, 64)
    assert (cl.calls, f64.calls, wide.calls) == ([0], [0], [0]) and cache.misses == 3
    assert len(list(tmp_path.glob("*.pt"))) == 3
    # The same settings again (a fresh closure, as the next test session makes) reuse the entry,
    # and so does the same factory object after its closure recorded the call.
    again = _closure_factory(torch.float64)
    assert cache.key(again, 0) == cache.key(f64, 0)
    fresh = ModelCache(tmp_path)
    assert fresh.get_or_train(again, 0).fc1.weight.dtype == torch.float64
    assert fresh.get_or_train(f64, 0) is not None
    assert again.calls == [] and f64.calls == [0] and fresh.hits == 2 and fresh.misses == 0
    # An explicit version keeps otherwise equal factories apart.
    assert cache.key(cl, 0, version="v2") != cache.key(cl, 0)
    with pytest.raises(SaliencyUsageError, match="version must be a str"):
        cache.key(cl, 0, version=2)


def test_model_cache_asks_for_a_version_when_it_cannot_identify_the_factory(tmp_path):
    lock = threading.Lock()  # a C object: the fingerprint cannot prove what it is

    def factory(seed: int) -> MLP:
        with lock:
            return MLP(hidden=4)

    cache = ModelCache(tmp_path)
    assert cache.key(factory, 0).endswith(".factory#seed=0")  # the name and the seed only
    with pytest.warns(SaliencyWarning, match=r"cannot tell the model factory .*pass version='...'"):
        cache.get_or_train(factory, 0, build=lambda: MLP(hidden=4))
    cache.get_or_train(factory, 0, build=lambda: MLP(hidden=4), version="mlp4")  # no warning with a version
    assert cache.key(factory, 0, version="mlp4").endswith(".factory@mlp4#seed=0")


def test_model_cache_refuses_a_build_that_does_not_match_the_factory(tmp_path):
    train = _closure_factory(torch.float64)
    cache = ModelCache(tmp_path)
    with pytest.raises(SaliencyUsageError, match=r"and build\(\) make different models: 'fc1.weight' in the trained "
                       r"model is torch.float64 .* but build\(\)'s is torch.float32"):
        cache.get_or_train(train, 0, build=lambda: MLP(hidden=4))
    assert not list(tmp_path.glob("*.pt"))  # nothing stored that could never load


def test_model_cache_writes_atomically(tmp_path, monkeypatch):
    train = CountingFactory()
    cache = ModelCache(tmp_path)
    cache.get_or_train(train, 0)
    path = cache.path(train, 0)
    good = path.read_bytes()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    cache.get_or_train(train, 1)
    (src, dst), = replaced
    assert src.parent == dst.parent == tmp_path and src.name.startswith(".tmp-") and not src.exists()

    def broken_save(obj, stream, *args, **kwargs):
        stream.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    path.unlink()
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_train(train, 0)
    assert not path.exists(), "a failed write must not leave a partial entry"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-") or p.suffix == ".lock"]
    monkeypatch.undo()
    path.write_bytes(good)
    assert cache.get_or_train(train, 0) is not None


def test_model_cache_lets_one_of_two_concurrent_workers_train(tmp_path):
    calls = []
    lock = threading.Lock()

    def slow_train(seed: int) -> MLP:
        with lock:
            calls.append(seed)
        time.sleep(0.3)
        return MLP(hidden=4)

    slow_train.build = lambda: MLP(hidden=4)
    results = []  # (slow_train closes over a lock, which the cache cannot identify: it needs a version)
    workers = [
        threading.Thread(target=lambda: results.append(ModelCache(tmp_path).get_or_train(slow_train, 0, version="v1")))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert calls == [0] and len(results) == 2
    assert torch.equal(results[0].fc1.weight, results[1].fc1.weight)


def test_model_cache_keys_and_errors(tmp_path):
    cache = ModelCache(tmp_path)
    assert factory_name(train_mlp_uncached) == "test_consistency.train_mlp_uncached"
    assert factory_name(functools.partial(train_mlp_uncached, steps=5)) == "test_consistency.train_mlp_uncached(steps=5)"
    assert factory_name(CountingFactory()) == "test_consistency.CountingFactory"
    digest = cache.key(train_mlp_uncached, 3).split("~")[1].split("#")[0]
    assert cache.key(train_mlp_uncached, 3) == f"test_consistency.train_mlp_uncached~{digest}#seed=3"
    assert cache.key(train_mlp_uncached, 3, version="v2") == f"test_consistency.train_mlp_uncached@v2~{digest}#seed=3"
    assert cache.path(train_mlp_uncached, 3) != cache.path(train_mlp_uncached, 3, version="v2")
    assert cache.path(train_mlp_uncached, 3).name.startswith("test_consistency.train_mlp_uncached-seed3-")
    with pytest.raises(SaliencyUsageError, match="Pass build=<zero-argument callable"):
        cache.get_or_train(train_mlp_uncached, 0)
    with pytest.raises(SaliencyUsageError, match="seed must be an int"):
        cache.get_or_train(CountingFactory(), "0")
    with pytest.raises(SaliencyUsageError, match=r"test_consistency.RaisingFactory\(seed=1\) raised ValueError: boom"):
        cache.get_or_train(RaisingFactory(), 1)
    with pytest.raises(SaliencyUsageError, match="needs a directory path"):
        ModelCache(42)


class RaisingFactory(CountingFactory):
    def __call__(self, seed: int) -> MLP:
        raise ValueError("boom")


# ------------------------------------------------------------------------------------------
# The explainer's own randomness
# ------------------------------------------------------------------------------------------


def test_smoothgrad_with_few_samples_is_seed_unstable_and_many_samples_are_stable():
    model, x = make_tiny_cnn(), tiny_images(6)
    few = explainer_seed_stability(model, x, "smoothgrad", seeds=(0, 1, 2), nt_samples=2)
    many = explainer_seed_stability(model, x, "smoothgrad", seeds=(0, 1, 2), nt_samples=64)
    assert few.deterministic and many.deterministic
    assert many.score > few.score + 0.1, (few.summary(), many.summary())
    assert len(many.pair_scores) == 3
    assert isinstance(few, SeedStabilityResult) and few.stochastic is True
    json.dumps(many.to_dict(), allow_nan=False)
    with pytest.raises(SaliencyCheckFailed, match="maps change with the explainer's seed") as info:
        assert_explainer_seed_stable(model, x, "smoothgrad", threshold=0.99, nt_samples=2)
    assert "nt_samples" in str(info.value)


def test_deterministic_methods_are_perfectly_seed_stable():
    model, x = make_tiny_cnn(), tiny_images(4)
    result = assert_explainer_seed_stable(model, x, "saliency")
    assert result.score == pytest.approx(1.0) and result.passed and result.threshold == 0.5
    assert "deterministic (seeds cannot change its maps)" in result.report()
    sa = assert_explainer_seed_stable(model, x, "integrated_gradients", metric="sign_agreement")
    assert sa.score == 1.0


def test_a_non_deterministic_explainer_fails_the_determinism_check():
    counter = iter(range(10**6))

    def jittery(model, inputs, target):
        # Draws from its own generator, seeded by a call counter: the method seed cannot fix it.
        g = torch.Generator().manual_seed(next(counter))
        return inputs * 0 + torch.rand(inputs.shape, generator=g)

    model, x = make_tiny_cnn(), tiny_images(4)
    result = explainer_seed_stability(model, x, jittery, seeds=(0, 1), threshold=-1.0)
    assert not result.deterministic and not result.passed and result.max_abs_difference > 0
    with pytest.raises(SaliencyCheckFailed, match="jittery is not deterministic: explaining twice with seed 0"):
        assert_explainer_seed_stable(model, x, jittery, seeds=(0, 1), threshold=-1.0)


@pytest.mark.parametrize("jitter, reproducible", [(0.0, True), (1e-6, True), (1e-3, False)])
def test_a_seed_must_reproduce_maps_up_to_rounding_not_bit_for_bit(jitter: float, reproducible: bool):
    """GPU kernels that sum in a varying order change the last bits between runs with one seed:
    that is still a reproducible explainer. Changes in the leading digits are not."""
    counter = iter(range(10**6))

    def rounding(model, inputs, target):
        g = torch.Generator().manual_seed(next(counter))  # unseeded by the method seed
        return inputs * (1 + jitter * torch.rand(inputs.shape, generator=g))

    model, x = make_tiny_cnn(), tiny_images(4)
    result = explainer_seed_stability(model, x, rounding, seeds=(0, 1), threshold=-1.0)
    assert result.deterministic is reproducible and result.passed is reproducible
    assert (result.max_abs_difference > 0) is (jitter > 0)
    expected = {0.0: "bit-identical maps", 1e-6: "the same maps up to rounding", 1e-3: "DIFFERENT maps"}[jitter]
    assert expected in result.report()


def test_explainer_seed_stability_bad_input():
    model, x = make_tiny_cnn(), tiny_images(4)
    with pytest.raises(SaliencyUsageError, match="at least two distinct ints"):
        explainer_seed_stability(model, x, "smoothgrad", seeds=(0,))
    with pytest.raises(SaliencyUsageError, match="at least two distinct ints"):
        explainer_seed_stability(model, x, "smoothgrad", seeds=(1, 1))
    with pytest.raises(SaliencyUsageError, match="is a distance"):
        explainer_seed_stability(model, x, "smoothgrad", metric="l1_distance")
    with pytest.raises(SaliencyUsageError, match="no default seed-stability threshold"):
        explainer_seed_stability(model, x, "smoothgrad", metric="spearman")
    with pytest.raises(SaliencyUsageError, match="unknown option"):
        explainer_seed_stability(model, x, "smoothgrad", n_samples=3)
    mlp, (x64, _) = trained_mlp(0), test_inputs(4)
    with pytest.raises(SaliencyUsageError, match="needs 2-D maps"):
        explainer_seed_stability(mlp, x64, "smoothgrad", metric="ssim")
    assert explainer_seed_stability(mlp, x64, "smoothgrad", nt_samples=2).metric == "sign_agreement"  # tabular default
    assert explainer_seed_stability(mlp, x64, "smoothgrad", map_shape=(8, 8), nt_samples=2).n_inputs == 4


@pytest.mark.parametrize("seed", [-5, 2**70, np.int64(3)])
def test_any_integer_seed_is_accepted(seed):
    models, (x, _) = [make_tiny_cnn(0), make_tiny_cnn(1)], (tiny_images(4), None)
    result = explanation_consistency(models, x, n_splits=2, seed=seed)
    assert result.seed == int(seed) and type(result.seed) is int
    json.dumps(result.to_dict())
    a, b = np.arange(24.0).reshape(6, 4), -np.arange(24.0).reshape(6, 4)
    assert lr_separability(a, b, n_splits=2, seed=seed).n_splits == 2
    assert fold_assignment(6, 2, seed).tolist() == fold_assignment(6, 2, int(seed)).tolist()
    stability = explainer_seed_stability(make_tiny_cnn(), x, "saliency", seeds=(seed, 7))
    assert stability.seeds == [int(seed), 7]


def test_consistency_thresholds_seeds_and_counts_are_checked():
    models, x = [make_tiny_cnn(0), make_tiny_cnn(1)], tiny_images(4)
    for threshold, message in [
        (math.nan, r"threshold must be a finite number with 0 <= threshold <= 1, got nan"),
        (-0.5, r"got -0.5. lr_separability lies in \[0, 1\]"),
        (math.inf, r"got inf"),
        (True, r"got True"),
        ("0.5", r"got '0.5'"),
    ]:
        with pytest.raises(SaliencyUsageError, match=message):
            seed_consistency(models, x, threshold=threshold, n_splits=2)
    with pytest.raises(SaliencyUsageError, match=r"got -1.5. ssim lies in \[-1, 1\]"):
        explainer_seed_stability(models[0], x, "saliency", seeds=(0, 1), threshold=-1.5)
    with pytest.raises(SaliencyUsageError, match=r"seeds\[1\] must be an integer .*got '1'"):
        explainer_seed_stability(models[0], x, "saliency", seeds=(0, "1"))
    with pytest.raises(SaliencyUsageError, match=r"seeds\[1\] must be an integer .*got 1.5"):
        assert_seed_consistency_above(make_tiny_cnn, x, seeds=[0, 1.5])
    for options, message in [
        ({"batch_size": 0}, r"batch_size must be an int >= 1 or None, got 0"),
        ({"n_splits": 2.0}, r"n_splits must be an int >= 2, got 2.0"),
        ({"seed": "1"}, r"seed must be an integer"),
    ]:
        with pytest.raises(SaliencyUsageError, match=message):
            explanation_consistency(models, x, **{"n_splits": 2, **options})


def test_a_model_on_the_meta_device_is_refused_before_anything_runs():
    with torch.device("meta"):
        meta = type(make_tiny_cnn())()
    with pytest.raises(SaliencyUsageError, match=r"model 'model1': model TinyCNN is on the meta device"):
        explanation_consistency([make_tiny_cnn(), meta], tiny_images(4), n_splits=2)


def test_feature_maps_too_small_for_an_ssim_window_get_advice_that_can_be_followed():
    models = [nn.Linear(4, 3), nn.Linear(4, 3)]
    with pytest.raises(SaliencyUsageError, match=r"maps are 2x2.*No SSIM window fits 2x2 maps") as info:
        explanation_consistency(models, torch.rand(4, 4), n_splits=2, metrics=("ssim",), map_shape=(2, 2))
    assert "win_size" not in str(info.value)


def test_model_cache_options_and_seeds(tmp_path):
    with pytest.raises(SaliencyUsageError, match=r"lock_timeout must be a finite number with 0 < lock_timeout, got '5'"):
        ModelCache(tmp_path, lock_timeout="5")
    with pytest.raises(SaliencyUsageError, match=r"lock_timeout .*got nan"):
        ModelCache(tmp_path, lock_timeout=math.nan)
    with pytest.raises(SaliencyUsageError, match=r"lock must be True or False, got 'no'"):
        ModelCache(tmp_path, lock="no")
    cache = ModelCache(tmp_path)
    assert cache.key(train_mlp_uncached, np.int64(3)) == cache.key(train_mlp_uncached, 3)
    assert cache.key(train_mlp_uncached, -5).endswith("#seed=-5")
    assert cache.path(train_mlp_uncached, 2**70).name.startswith(f"test_consistency.train_mlp_uncached-seed{2**70}-")
    with pytest.raises(SaliencyUsageError, match=r"seed must be an integer .*got 1.5"):
        cache.key(train_mlp_uncached, 1.5)


def test_progress_has_one_step_per_seed_trained_or_loaded(tmp_path):
    x, _ = test_inputs(60)
    for cached in (False, True):  # trained, then loaded from the cache: the same steps
        calls: list[tuple[int, int, str]] = []
        seed_consistency(trained_mlp, x, seeds=[0, 1, 2], cache=ModelCache(tmp_path), build=MLP,
                         metric="sign_agreement", map_shape=(8, 8), progress=lambda *step: calls.append(step))
        assert calls == [(0, 3, "seed=0"), (1, 3, "seed=1"), (2, 3, "seed=2"), (3, 3, "")], cached
    with pytest.raises(SaliencyUsageError, match="progress must be None or a callable"):
        seed_consistency(trained_mlp, x, seeds=[0, 1], metric="sign_agreement", progress="bar")
