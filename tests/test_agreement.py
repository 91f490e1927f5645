"""Agreement between methods on the digits CNN (validation targets V9, V10) and assert_agreement_above."""

from __future__ import annotations

import json

import pytest
import torch

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError, SaliencyWarning, explain
from pytest_saliency.checks.agreement import agreement_matrix, compare_maps
from pytest_saliency.checks.assertions import assert_agreement_above
from pytest_saliency.compare.metrics import METRICS, feature_agreement, sign_agreement


@pytest.fixture(scope="module")
def trained(digits):
    model, x, _ = digits
    return model, x[:32]


def test_guided_gradcam_has_the_signs_of_guided_backprop(trained):
    """SA(GBP, GGC) == FA(GBP, GGC): GGC is GBP times a non-negative CAM (thesis Table 5.2)."""
    model, x = trained
    gbp = explain(model, x, "guided_backprop")[:, 0]
    ggc = explain(model, x, "guided_gradcam")[:, 0]
    k = 0.1
    enough = (ggc.flatten(1) != 0).sum(1) >= 103  # top-k must not reach into GGC's zeros (CAM = 0)
    assert enough.sum() >= 20
    fa = feature_agreement(gbp[enough], ggc[enough], k)
    sa = sign_agreement(gbp[enough], ggc[enough], k)
    assert torch.equal(sa, fa)
    assert fa.mean() > 0.3


def test_sign_agreement_with_an_unsigned_map_is_half_the_feature_agreement(trained):
    """The thesis's "SA ~ FA/2" for captum Saliency (abs=True) is an artefact of unsigned maps."""
    model, x = trained
    unsigned = explain(model, x, "saliency", abs=True)
    signed = explain(model, x, "integrated_gradients", n_steps=16)
    with pytest.warns(SaliencyWarning, match="cannot be negative|no negative"):
        result = compare_maps({"saliency_abs": unsigned, "ig": signed}, ["feature_agreement", "sign_agreement"])
    fa = result.pair("saliency_abs", "ig", "feature_agreement").mean
    sa = result.pair("saliency_abs", "ig", "sign_agreement").mean
    assert 0.35 * fa < sa < 0.65 * fa


def test_independent_random_maps_agree_at_chance_level():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 1, 20, 20, generator=g), torch.randn(400, 1, 20, 20, generator=g)
    result = compare_maps({"a": a, "b": b}, ["feature_agreement", "sign_agreement"], k=40)
    fa = result.pair("a", "b", "feature_agreement")
    sa = result.pair("a", "b", "sign_agreement")
    assert fa.chance_theory == 0.1 and sa.chance_theory == 0.05
    se = (0.1 * 0.9 / 40) ** 0.5 / 400 ** 0.5  # binomial-ish standard error of the mean over 400 maps
    # the chance measured on maps of different inputs agrees with the theory for unrelated maps,
    # and the pair's chance is the stricter (higher) of the two
    assert abs(fa.chance_measured - 0.1) < 4 * se and abs(sa.chance_measured - 0.05) < 4 * se
    assert fa.chance == max(0.1, fa.chance_measured) and sa.chance == max(0.05, sa.chance_measured)
    assert abs(fa.mean - 0.1) < 4 * se
    assert abs(sa.mean - 0.05) < 4 * se
    assert fa.ci_low < 0.1 < fa.ci_high


def test_feature_agreement_reaches_one_as_k_reaches_n(trained):
    model, x = trained
    previous = 0.0
    for k in (0.05, 0.25, 0.5, 0.9, 1.0):
        value = agreement_matrix(model, x, ["saliency", "integrated_gradients"], ["feature_agreement"], k=k,
                                 method_options={"integrated_gradients": {"n_steps": 8}}).pairs[0].mean
        assert value >= previous - 0.05
        previous = value
    assert previous == 1.0


def test_every_metric_of_a_map_with_itself_is_at_its_maximum(trained):
    model, x = trained
    maps = explain(model, x[:8], "saliency")
    metrics = [m for m in METRICS if m not in ("hog_pearson", "jensen_shannon_divergence")]
    result = compare_maps({"a": maps, "b": maps.clone()}, metrics)
    best = {"l1_distance": 0.0, "angular_difference": 0.0}
    for p in result.pairs:
        assert p.mean == pytest.approx(best.get(p.metric, 1.0), abs=1e-6), p.metric
    big = torch.rand(2, 1, 48, 48)
    extra = compare_maps({"a": big, "b": big.clone()}, ["hog_pearson", "jensen_shannon_divergence"])
    assert extra.pair("a", "b", "hog_pearson").mean == pytest.approx(1.0)
    assert extra.pair("a", "b", "jensen_shannon_divergence").mean == pytest.approx(0.0, abs=1e-12)


def test_the_matrix_is_symmetric_and_serializable(trained):
    model, x = trained
    result = agreement_matrix(model, x[:8], ["saliency", "input_x_gradient", "gradcam"], ["feature_agreement", "spearman"])
    grid = result.matrix("feature_agreement")
    assert grid[0][1] == grid[1][0] and grid[0][0] is None
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # strict JSON: undefined values are null
    assert data["matrices"]["spearman"][0][1] == pytest.approx(result.pair("saliency", "input_x_gradient", "spearman").mean)
    assert "chance" in result.table() and "0.100" in result.table()


def test_assert_agreement_above_passes_and_fails_with_an_actionable_message(trained):
    model, x = trained
    result = assert_agreement_above(model, x, ["saliency", "guided_backprop"], "feature_agreement", k=0.1)
    assert result.threshold == pytest.approx(102 / 1024)  # default: beat chance with the lower bound
    with pytest.raises(SaliencyCheckFailed) as failure:
        assert_agreement_above(model, x, ["saliency", "gradcam"], metric="ssim", threshold=0.9)
    message = str(failure.value)
    for expected in ("ssim(saliency, gradcam) mean =", "required > 0.9", "theory n/a, different inputs", "adebayo2018",
                     "images: 32", "BELOW THRESHOLD"):
        assert expected in message
    with pytest.raises(SaliencyCheckFailed, match="90% confidence bound"):
        assert_agreement_above(model, x, ["saliency", "integrated_gradients"], "rank_correlation", threshold=0.99,
                               statistic="bound", method_options={"integrated_gradients": {"n_steps": 8}})


def test_assert_agreement_above_on_precomputed_maps():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 1, 12, 12, generator=g)
    assert assert_agreement_above(a, a + 0.01 * torch.randn(a.shape, generator=g), metric="spearman", threshold=0.9)
    with pytest.raises(SaliencyCheckFailed, match=r"spearman\(mine, theirs\)"):
        assert_agreement_above(a, torch.randn(a.shape, generator=g), metric="spearman", threshold=0.5,
                               names=("mine", "theirs"))
    with pytest.raises(SaliencyUsageError, match="no chance level"):
        assert_agreement_above(a, a, metric="ssim")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 9, 8)}), "different shapes"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}, ["feature_agreement"], k=65), "k"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}, ["feature_agreement"], k=0.0), "k"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}, ["rank_correlation"],
                              metric_options={"rank_correlation": {"mask": torch.zeros(8, 8, dtype=torch.bool)}}), "mask"),
        (lambda: compare_maps({"a": torch.full((2, 1, 8, 8), float("nan")), "b": torch.rand(2, 1, 8, 8)}), "NaN"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}, ["feature_agreemnt"]),
         "Did you mean 'feature_agreement'"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8)}), "at least two"),
        (lambda: compare_maps({"a": torch.rand(2, 1, 8, 8), "b": torch.rand(2, 1, 8, 8)}, []), "metrics is empty"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(SaliencyUsageError, match=message):
        call()


def test_bad_methods(trained):
    model, x = trained
    with pytest.raises(SaliencyUsageError, match="at least two methods"):
        agreement_matrix(model, x, ["saliency"])
    with pytest.raises(SaliencyUsageError, match="listed twice"):
        agreement_matrix(model, x, ["saliency", "saliency"])
    with pytest.raises(SaliencyUsageError, match="not among the methods"):
        agreement_matrix(model, x, ["saliency", "input_x_gradient"], method_options={"lime": {"n_samples": 5}})


def test_progress_has_one_step_per_method(trained):
    model, x = trained
    calls: list[tuple[int, int, str]] = []
    agreement_matrix(model, x[:4], ["saliency", "input_x_gradient", "guided_backprop"], ["feature_agreement"],
                     n_bootstrap=10, progress=lambda *step: calls.append(step))
    assert calls == [(0, 3, "saliency"), (1, 3, "input_x_gradient"), (2, 3, "guided_backprop"), (3, 3, "")]
    with pytest.raises(SaliencyUsageError, match="progress must be None or a callable"):
        agreement_matrix(model, x[:4], ["saliency", "input_x_gradient"], progress=3)
