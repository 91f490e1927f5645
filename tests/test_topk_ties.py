"""Top-k metrics on maps with ties, constant maps in agreement, and the measured chance level.

The tie rule (module docstring of :mod:`pytest_saliency.compare.metrics`): each block of equal ``|x|`` is
ordered uniformly at random, independently in the two maps, and a metric reports its expected
value over those orders. Checked three ways:

* brute force: on tiny maps, the metric equals the average of the plain (strict-order) metric
  over *every* admissible pair of orders, in exact rational arithmetic;
* Monte Carlo: for independent maps full of ties (sparse maps with fewer non-zeros than k,
  quantized maps, plateaus), the mean over many seeded pairs is the metric's chance level;
* agreement: constant maps are left out and counted, and the default gate of
  ``assert_agreement_above`` uses the chance level measured on maps of different inputs.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_saliency.compare import metrics as M
from pytest_saliency.checks.agreement import agreement_matrix, compare_maps
from pytest_saliency.checks.assertions import assert_agreement_above
from pytest_saliency.exceptions import SaliencyCheckFailed, SaliencyUsageError

TOPK = ("feature_agreement", "sign_agreement", "rank_agreement", "signed_rank_agreement",
        "signed_set_agreement", "consistent_direction")
ALL = (*TOPK, "pairwise_rank_agreement")
SIGN = {"sign_agreement", "signed_rank_agreement", "signed_set_agreement", "consistent_direction"}


def metric(name: str, a: torch.Tensor, b: torch.Tensor, k) -> torch.Tensor:
    if name == "pairwise_rank_agreement":
        return M.pairwise_rank_agreement(a, b)
    options = {"warn_unsigned": False} if name in SIGN else {}
    return M.compute_metric(name, a, b, k=k, **options)


# --------------------------------------------------------------------------------------------
# Brute force: the average over every admissible order of both maps
# --------------------------------------------------------------------------------------------


def orders(row: list[float]) -> list[tuple[int, ...]]:
    """Every order of the features by |x| descending, each tie block in every possible order."""
    levels = sorted({abs(v) for v in row}, reverse=True)
    blocks = [[f for f in range(len(row)) if abs(row[f]) == level] for level in levels]
    return [tuple(itertools.chain(*choice)) for choice in itertools.product(*map(itertools.permutations, blocks))]


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def strict(name: str, a: list[float], b: list[float], oa: tuple[int, ...], ob: tuple[int, ...], k: int) -> int:
    """The metric for two fixed orders, as k times its value (an integer; PRA: agreeing pairs)."""
    ta, tb = set(oa[:k]), set(ob[:k])
    if name == "feature_agreement":
        return len(ta & tb)
    if name == "sign_agreement":
        return sum(1 for f in ta & tb if sgn(a[f]) * sgn(b[f]) > 0)
    if name == "rank_agreement":
        return sum(1 for i in range(k) if oa[i] == ob[i])
    if name == "signed_rank_agreement":
        return sum(1 for i in range(k) if oa[i] == ob[i] and sgn(a[oa[i]]) * sgn(b[oa[i]]) > 0)
    if name == "signed_set_agreement":
        return k * int(ta == tb and all(sgn(a[f]) * sgn(b[f]) > 0 for f in ta))
    if name == "consistent_direction":
        return k * int(all(sgn(a[f]) == sgn(b[f]) for f in ta & tb))
    if name == "pairwise_rank_agreement":
        pa = {f: i for i, f in enumerate(oa)}
        pb = {f: i for i, f in enumerate(ob)}
        return sum(1 for f, g in itertools.combinations(range(len(a)), 2) if (pa[f] < pa[g]) == (pb[f] < pb[g]))
    raise AssertionError(name)


def brute_force(name: str, a: list[float], b: list[float], k: int) -> Fraction:
    all_a, all_b = orders(a), orders(b)
    total = sum(strict(name, a, b, oa, ob, k) for oa in all_a for ob in all_b)
    scale = math.comb(len(a), 2) if name == "pairwise_rank_agreement" else k
    return Fraction(total, len(all_a) * len(all_b) * scale)


TINY_VALUES = st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5, -0.5])


@st.composite
def tiny_pairs(draw):
    d = draw(st.integers(2, 5))
    row = st.lists(TINY_VALUES, min_size=d, max_size=d)
    a = draw(row)
    b = draw(st.one_of(row, st.just(list(a)), st.just([-v for v in a])))
    return a, b, draw(st.integers(1, d))


@given(data=tiny_pairs())
@settings(deadline=None, max_examples=40)
def test_every_topk_metric_is_the_average_over_all_tie_orders(data):
    """The batched metric equals the exact average of the strict metric over every tie order."""
    a, b, k = data
    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    for name in ALL:
        expected = brute_force(name, a, b, k)
        got = metric(name, ta, tb, k).item()
        assert got == pytest.approx(float(expected), rel=1e-12, abs=1e-15), (name, a, b, k)


def test_tie_examples_by_hand():
    a = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # a is one block of 4: each feature is in its top-2 with probability 1/2; b's top-2 is {2, 3}.
    assert M.feature_agreement(a, b, 2).item() == pytest.approx(0.5)
    # b's top-3 is {2, 3} and one of {0, 1}; a's top-3 holds each feature with probability 3/4.
    assert M.feature_agreement(a, b, 3).item() == pytest.approx((0.75 + 0.75 + 0.75 * 0.5 * 2) / 3)
    # Every feature of a is at every rank with probability 1/4: RA = 1/D whatever b is.
    assert M.rank_agreement(a, b, 4).item() == pytest.approx(0.25)
    # Two zero maps carry no ranking: chance-level FA (k/D), RA (1/D) and PRA (1/2), not 1.
    z = torch.zeros(1, 10)
    assert M.feature_agreement(z, z, 3).item() == pytest.approx(0.3)
    assert M.rank_agreement(z, z, 3).item() == pytest.approx(0.1)
    assert M.pairwise_rank_agreement(z, z).item() == 0.5
    # Signed-set agreement of two zero maps: zeros disagree in sign; of two constant maps with
    # the same sign: the probability that both draw the same 3 of 10 features, 1 / C(10, 3).
    assert M.signed_set_agreement(z, z, 3, warn_unsigned=False).item() == 0.0
    ones = torch.ones(1, 10, dtype=torch.float64)
    assert M.signed_set_agreement(ones, ones, 3, warn_unsigned=False).item() == pytest.approx(1 / 120)
    # CDC: a feature flipping sign spoils it only when both draws take it: 1 - (3/10)^2.
    flip = ones.clone()
    flip[0, 0] = -1.0
    assert M.consistent_direction(ones, flip, 3, warn_unsigned=False).item() == pytest.approx(1 - 0.09)


# --------------------------------------------------------------------------------------------
# Monte Carlo: independent maps full of ties score their chance level
# --------------------------------------------------------------------------------------------


def _shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Put each row's values at random positions: the features of every map are exchangeable."""
    return x.gather(1, torch.rand(x.shape, generator=g).argsort(dim=1))


def sparse(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Fewer non-zero features than k (LIME's Lasso, ReLU'd GradCAM): the rest are zeros."""
    nonzero = max(1, k // 2)
    x = torch.cat([torch.randn(n, nonzero, generator=g, dtype=torch.float64),
                   torch.zeros(n, d - nonzero, dtype=torch.float64)], dim=1)
    return _shuffle(x, g)


def quantized(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Four levels, symmetric signs and no zeros."""
    levels = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    return levels[torch.randint(0, 4, (n, d), generator=g)]


def quantized_with_zero(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    return levels[torch.randint(0, 3, (n, d), generator=g)]


def plateau(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Continuous values, and a plateau of half the features at one random (non-zero) level."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, : d // 2] = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return _shuffle(x, g)


def constant(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Constant magnitude with random signs: no ranking at all, only directions."""
    return torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)


GENERATORS = {"sparse": sparse, "quantized": quantized, "quantized_with_zero": quantized_with_zero,
              "plateau": plateau, "constant": constant}
ZEROS = {"sparse", "quantized_with_zero"}
# (features, k, pairs): a large map where the top-k reaches into the ties, and a tiny one where
# the chance levels of the set metrics (SSA, CDC) are large enough to be measured.
SHAPES = [(64, 16, 1500), (6, 2, 10000)]


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize(("d", "k", "n"), SHAPES)
def test_independent_maps_with_ties_score_the_chance_level(kind, d, k, n):
    """Mean over n independent pairs = chance level, within 4 standard errors of the mean.

    Zeros disagree in sign for SA, SRA and SSA, so with zeros in the top-k those score *below*
    their chance level (which assumes no zeros); CDC counts zero against zero as agreeing, so
    it is compared only for maps without zeros. The generator is seeded: not flaky.
    """
    g = torch.Generator().manual_seed(d * 1000 + sorted(GENERATORS).index(kind))
    a = GENERATORS[kind](n, d, k, g)
    b = GENERATORS[kind](n, d, k, g)
    for name in ALL:
        if kind in ZEROS and name == "consistent_direction":
            continue
        values = metric(name, a, b, k)
        mean = values.mean().item()
        tolerance = 4 * values.std().item() / math.sqrt(n) + 1e-12
        chance = M.chance_level(name, k=k if name != "pairwise_rank_agreement" else None, num_features=d)
        if kind in ZEROS and name in SIGN:
            assert mean <= chance + tolerance, (name, mean, chance)
        else:
            assert abs(mean - chance) <= tolerance, (name, mean, chance, tolerance)


def test_the_issue_example_sparse_maps_agree_at_chance():
    """10 of 256 pixels non-zero, top 10%: FA 0.10 (chance), not 0.64."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 256
    x = torch.zeros(2 * n, d)
    x.scatter_(1, torch.rand(2 * n, d, generator=g).argsort(dim=1)[:, :10], torch.randn(2 * n, 10, generator=g))
    a, b = x[:n], x[n:]
    fa = M.feature_agreement(a, b, 0.1)
    assert M.chance_level("feature_agreement", 0.1, d) == pytest.approx(26 / 256)
    assert abs(fa.mean().item() - 26 / 256) < 4 * fa.std().item() / math.sqrt(n)
    ra = M.rank_agreement(a, b, 0.1)
    assert abs(ra.mean().item() - 1 / d) < 4 * ra.std().item() / math.sqrt(n)
    # Tie-free maps are untouched: the maps' own top-k agreement with themselves is still 1.
    dense = torch.randn(3, d, generator=g)
    assert torch.equal(M.feature_agreement(dense, dense, 0.1), torch.ones(3))


# --------------------------------------------------------------------------------------------
# Agreement: constant maps are left out and counted; chance measured on different inputs
# --------------------------------------------------------------------------------------------


def test_two_batches_of_zero_maps_are_refused_not_perfect_agreement():
    zeros = torch.zeros(8, 1, 6, 6)
    with pytest.raises(SaliencyCheckFailed, match=r"all 8 maps of method 'a' are constant.*ignores the input") as info:
        compare_maps({"a": zeros, "b": zeros.clone()}, ["feature_agreement", "rank_agreement"])
    result = info.value.result
    assert result.constant_maps == {"a": 8, "b": 8}
    assert all(p.undefined == 8 for p in result.pairs)


def test_a_model_that_ignores_its_input_fails_assert_agreement_above():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    with torch.no_grad():
        model[1].weight.zero_()  # the output does not depend on the input: every gradient is zero
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyCheckFailed, match="all 6 maps of method 'saliency' are constant"):
        assert_agreement_above(model, x, ["saliency", "input_x_gradient"], "feature_agreement", k=0.2)


@pytest.mark.parametrize("metric", ["ssim", "l1_distance", "pearson", "cosine_similarity"])
def test_zero_maps_agree_under_no_metric(metric):
    zeros = torch.zeros(6, 1, 8, 8)
    with pytest.raises(SaliencyCheckFailed, match=r"all 6 maps of method 'a' are constant"):
        compare_maps({"a": zeros, "b": zeros.clone()}, [metric])


def test_a_model_that_ignores_its_input_fails_agreement_under_ssim_and_l1():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    with torch.no_grad():
        model[1].weight.zero_()
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyCheckFailed, match="no image left to compare"):
        assert_agreement_above(model, x, ["saliency", "integrated_gradients"], "ssim", threshold=0.5)
    with pytest.raises(SaliencyCheckFailed, match="no image left to compare"):
        assert_agreement_above(model, x, ["saliency", "integrated_gradients"], "l1_distance", threshold=0.5)


def test_images_with_a_constant_map_are_left_out_and_counted():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10, 1, 8, 8, generator=g)
    b = a + 0.5 * torch.randn(10, 1, 8, 8, generator=g)
    b[[0, 3]] = 0.0  # e.g. a ReLU'd GradCAM that found nothing on two images
    result = compare_maps({"a": a, "b": b}, ["feature_agreement", "pairwise_rank_agreement", "spearman_abs", "ssim"],
                          k=0.25)
    fa = result.pair("a", "b", "feature_agreement")
    keep = [i for i in range(10) if i not in (0, 3)]
    assert fa.undefined == 2 and math.isnan(fa.values[0]) and math.isnan(fa.values[3])
    assert fa.mean == pytest.approx(M.feature_agreement(a[keep], b[keep], 0.25).double().mean().item())
    assert result.pair("a", "b", "pairwise_rank_agreement").undefined == 2
    assert result.constant_maps == {"a": 0, "b": 2}
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["constant_maps"] == {"a": 0, "b": 2}
    assert data["pairs"][0]["values"][0] is None and data["pairs"][0]["undefined"] == 2
    assert "2 image(s) left out" in result.table()
    assert "constant maps (no ranking; left out of the ranking metrics): b 2 of 10" in result.report()
    assert "2 of 10 b maps constant" in result.summary()


def _centred(n: int, g: torch.Generator) -> torch.Tensor:
    """Maps that are bright in the centre for every input, with independent noise on top."""
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    bump = torch.exp(-((ys - 5.5) ** 2 + (xs - 5.5) ** 2) / 8.0)
    return bump + 0.15 * torch.randn(n, 1, 12, 12, generator=g)


def test_default_gate_beats_the_chance_measured_on_different_inputs():
    """Unrelated maps that share only the data set's layout beat k/D, but not the measured chance."""
    g = torch.Generator().manual_seed(4)
    a, b = _centred(40, g), _centred(40, g)
    with pytest.raises(SaliencyCheckFailed) as info:
        assert_agreement_above(a, b, metric="feature_agreement", k=0.1, names=("mine", "theirs"))
    message = str(info.value)
    pair = info.value.result.pair("mine", "theirs", "feature_agreement")
    assert pair.chance_theory == pytest.approx(14 / 144)
    assert pair.ci_low > pair.chance_theory  # the old gate (theory only) would pass these maps
    assert pair.chance_measured > pair.ci_low and pair.chance == pair.chance_measured
    assert info.value.result.required(pair) == pytest.approx(pair.chance_measured)
    assert f"required > {pair.chance_measured:.4g}" in message
    assert f"theory {14 / 144:.3f}, different inputs {pair.chance_measured:.3f}" in message
    data = info.value.result.to_dict()
    assert data["beat_chance"] is True and data["pairs"][0]["chance_measured"] == pair.chance_measured
    assert data["pairs"][0]["chance_theory"] == pytest.approx(14 / 144)
    assert data["pairs"][0]["required"] == pytest.approx(pair.chance_measured)
    # Related maps (the same map plus noise) beat the measured chance as well.
    related = assert_agreement_above(a, a + 0.02 * torch.randn(a.shape, generator=g), metric="feature_agreement")
    assert related.pairs[0].ci_low > related.pairs[0].chance > related.pairs[0].chance_theory


def test_one_image_has_no_measured_chance():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1, 1, 8, 8, generator=g)
    result = compare_maps({"a": a, "b": a + 0.1 * torch.randn(a.shape, generator=g)}, ["feature_agreement"], k=8)
    pair = result.pairs[0]
    assert pair.chance_measured is None and pair.chance == pair.chance_theory == 8 / 64
    assert "not measured (N = 1)" in result.table()


def _maps():
    g = torch.Generator().manual_seed(6)
    return {"a": torch.rand(4, 1, 8, 8, generator=g), "b": torch.rand(4, 1, 8, 8, generator=g)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": float("nan")}, r"threshold must be a finite number with 0 <= threshold < 1, got nan"),
        ({"threshold": -0.1}, "passes or fails whatever the maps"),
        ({"threshold": 1.0}, "feature_agreement takes values in"),
        ({"threshold": float("inf")}, "threshold must be a finite number"),
        ({"threshold": "0.5"}, "threshold must be a finite number"),
        ({"metrics": ["l1_distance"], "threshold": -1.0}, r"0 < threshold, got -1"),
        ({"metrics": ["angular_difference"], "threshold": 3.5}, r"threshold <= 3.14159"),
        ({"confidence": 1.5}, r"confidence must be a finite number with 0 < confidence < 1"),
        ({"confidence": float("nan")}, "confidence must be a finite number"),
        ({"n_bootstrap": 0}, r"n_bootstrap must be an int >= 1, got 0"),
        ({"n_bootstrap": 2.5}, r"n_bootstrap must be an int >= 1"),
        ({"statistic": "median"}, r"unknown statistic 'median'.*statistic must be one of: 'mean', 'bound'"),
        ({"metrics": "feature_agreement"}, "metrics must be a list of metric names"),
        ({"metrics": ["ssim", "ssim"]}, "lists a metric twice"),
        ({"metric_options": {"ssim": {"win_size": 3}}}, r"metric_options names \['ssim'\], which are not among"),
        ({"metric_options": {"feature_agreement": {"kk": 3}}}, r"metric_options\['feature_agreement'\].*does not fit"),
        ({"metric_options": {"feature_agreement": 3}}, r"must be a dict of keyword arguments"),
        ({"metric_options": {"feature_agreement": {"k": 3}}},
         r"metric_options\['feature_agreement'\] sets k, which this check passes .* pass k=\.\.\. to the check"),
        ({"metric_options": [("feature_agreement", {})]}, r"metric_options must be a dict .*got list"),
        ({"metrics": ["sign_agreement"], "metric_options": {"sign_agreement": {"warn_unsigned": "no"}}},
         "warn_unsigned must be True or False"),
        ({"metrics": ["rank_correlation"], "metric_options": {"rank_correlation": {"absolute": 1}}},
         "absolute must be True or False"),
    ],
)
def test_compare_maps_checks_every_option(options, message):
    options = {"metrics": ["feature_agreement"], **options}
    with pytest.raises(SaliencyUsageError, match=message):
        compare_maps(_maps(), **options)


def test_threshold_range_follows_the_metric_and_its_options():
    maps = _maps()
    with pytest.raises(SaliencyUsageError, match=r"angular_difference takes values in \[0, 3.14159\]"):
        compare_maps(maps, ["angular_difference"], threshold=100.0)
    in_degrees = {"angular_difference": {"degrees": True}}
    assert compare_maps(maps, ["angular_difference"], threshold=100.0, metric_options=in_degrees).threshold == 100.0
    with pytest.raises(SaliencyUsageError, match=r"angular_difference takes values in \[0, 180\]"):
        compare_maps(maps, ["angular_difference"], threshold=181.0, metric_options=in_degrees)
    assert compare_maps(maps, ["feature_agreement"], threshold=0).threshold == 0.0  # > 0 can fail


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"threshold": -0.5}, "passes or fails whatever the maps"),
        ({"names": ("x", "x")}, "names must be two different strings"),
        ({"statistic": "median"}, "unknown statistic 'median'"),
    ],
)
def test_assert_agreement_above_checks_its_options(options, message):
    maps = _maps()
    with pytest.raises(SaliencyUsageError, match=message):
        assert_agreement_above(maps["a"], maps["b"], metric="feature_agreement", **options)


def test_agreement_matrix_checks_options_before_explaining():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.rand(3, 1, 4, 4)
    with pytest.raises(SaliencyUsageError, match="batch_size must be an int >= 1 or None"):
        agreement_matrix(model, x, ["saliency", "input_x_gradient"], batch_size=0)
    with pytest.raises(SaliencyUsageError, match="methods must be a list of methods"):
        agreement_matrix(model, x, "saliency")
    with pytest.raises(SaliencyUsageError, match=r"k=17 is out of range.*1 <= k <= 16"):
        agreement_matrix(model, x, ["saliency", "input_x_gradient"], ["feature_agreement"], k=17)
    with pytest.raises(SaliencyUsageError, match="threshold must be a finite number"):
        agreement_matrix(model, x, ["saliency", "input_x_gradient"], threshold=float("nan"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: M.rank_correlation(a, a, absolute="yes"), "absolute must be True or False"),
        (lambda a: M.angular_difference(a, a, degrees=1), "degrees must be True or False"),
        (lambda a: M.sign_agreement(a, a, 2, warn_unsigned=None), "warn_unsigned must be True or False"),
        (lambda a: M.hog_pearson(a, a, pixels_per_cell=(4, 4), orientations=0), "orientations must be an int >= 1"),
        (lambda a: M.hog_pearson(a, a, pixels_per_cell=(4, 4), block_norm="L3"), "unknown block_norm 'L3'"),
    ],
)
def test_metric_options_are_checked(call, message):
    a = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(7))
    with pytest.raises(SaliencyUsageError, match=message):
        call(a)
