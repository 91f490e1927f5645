"""Tests for pytest_saliency.compare.metrics.

Every top-k metric is compared with a plain-Python reference that loops over pixels and applies
the documented tie rule (each block of equal ``|x|`` in a uniformly random order, independently
in the two maps; the metric is the expectation, in exact fractions), on hypothesis-generated maps
full of ties and zeros; for maps without ties it must equal the plain sorted-order value exactly
(``tests/test_topk_ties.py`` checks the rule itself by brute force over every tie order). Correlations, HOG and the JSD are compared with scipy / scikit-image / numpy. Chance
levels are checked by simulation with a seeded generator (deterministic, so not flaky).
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance
from skimage.feature import hog
from skimage.metrics import structural_similarity as sk_ssim

from pytest_saliency.compare import metrics as M
from pytest_saliency.exceptions import SaliencyUsageError, SaliencyWarning

HYP = settings(deadline=None, max_examples=60)

TOPK_FUNCS = {
    "feature_agreement": M.feature_agreement,
    "sign_agreement": M.sign_agreement,
    "rank_agreement": M.rank_agreement,
    "signed_rank_agreement": M.signed_rank_agreement,
    "signed_set_agreement": M.signed_set_agreement,
    "consistent_direction": M.consistent_direction,
}
SIGN_METRICS = {"sign_agreement", "signed_rank_agreement", "signed_set_agreement", "consistent_direction"}


def _call(name: str, a: torch.Tensor, b: torch.Tensor, **kwargs):
    if name in SIGN_METRICS:
        kwargs["warn_unsigned"] = False
    return TOPK_FUNCS[name](a, b, **kwargs)


# --------------------------------------------------------------------------------------------
# Plain-loop references
# --------------------------------------------------------------------------------------------


def ref_k(k, d: int) -> int:
    if isinstance(k, int):
        return k
    return min(d, max(1, math.floor(round(k * d, 9) + 0.5)))


def ref_order(row: list[float]) -> list[int]:
    """Features by |value| descending (a plain sort; the order within a tie block is arbitrary)."""
    return sorted(range(len(row)), key=lambda f: (-abs(row[f]), f))


def has_ties(row: list[float]) -> bool:
    return len({abs(v) for v in row}) < len(row)


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_blocks(row: list[float]) -> tuple[list[int], list[int]]:
    """Per feature: how many features have a larger |x| (its block's first position), block size."""
    start = [sum(1 for v in row if abs(v) > abs(x)) for x in row]
    size = [sum(1 for v in row if abs(v) == abs(x)) for x in row]
    return start, size


def ref_comb(n: int, r: int) -> int:
    return math.comb(n, r) if 0 <= r <= n else 0


def ref_topk(name: str, a: list[float], b: list[float], k) -> Fraction:
    """The tie rule as a plain loop: expectations over random orders of the tie blocks."""
    d = len(a)
    kk = d if (k is None and name == "consistent_direction") else ref_k(k, d)
    sa, na = ref_blocks(a)
    sb, nb = ref_blocks(b)
    in_a = [Fraction(min(max(kk - sa[f], 0), na[f]), na[f]) for f in range(d)]  # P(f in top-k of a)
    in_b = [Fraction(min(max(kk - sb[f], 0), nb[f]), nb[f]) for f in range(d)]
    agree = [sgn(a[f]) * sgn(b[f]) > 0 for f in range(d)]
    if name in ("feature_agreement", "sign_agreement"):
        signed = name == "sign_agreement"
        return sum((in_a[f] * in_b[f] for f in range(d) if agree[f] or not signed), Fraction(0)) / kk
    if name in ("rank_agreement", "signed_rank_agreement"):
        signed = name == "signed_rank_agreement"
        total = Fraction(0)
        for f in range(d):
            if signed and not agree[f]:
                continue
            for i in range(kk):  # P(f at rank i in a) * P(f at rank i in b)
                if sa[f] <= i < sa[f] + na[f] and sb[f] <= i < sb[f] + nb[f]:
                    total += Fraction(1, na[f] * nb[f])
        return total / kk
    certain_a = {f for f in range(d) if in_a[f] == 1}
    certain_b = {f for f in range(d) if in_b[f] == 1}
    block_a = {f for f in range(d) if 0 < in_a[f] < 1}  # the block straddling rank k
    block_b = {f for f in range(d) if 0 < in_b[f] < 1}
    pick_a, pick_b = kk - len(certain_a), kk - len(certain_b)
    draws = ref_comb(len(block_a), pick_a) * ref_comb(len(block_b), pick_b)
    if name == "signed_set_agreement":
        union = certain_a | certain_b
        if not (certain_a <= certain_b | block_b and certain_b <= certain_a | block_a):
            return Fraction(0)
        if not all(agree[f] for f in union):
            return Fraction(0)
        pool = sum(1 for f in block_a & block_b if agree[f])
        return Fraction(ref_comb(pool, kk - len(union)), draws)
    if name == "consistent_direction":
        flips = {f for f in range(d) if sgn(a[f]) != sgn(b[f])}
        if flips & certain_a & certain_b:
            return Fraction(0)
        avoid_b = len(flips & certain_a & block_b)
        avoid_a = len(flips & block_a & certain_b)
        both = len(flips & block_a & block_b)
        ways = sum(
            ref_comb(both, j) * ref_comb(len(block_a) - avoid_a - both, pick_a - j)
            * ref_comb(len(block_b) - avoid_b - j, pick_b)
            for j in range(both + 1)
        )
        return Fraction(ways, draws)
    raise AssertionError(name)


def plain_topk(name: str, a: list[float], b: list[float], k) -> float:
    """The metric for one fixed order of each map (a plain sort): the value for tie-free maps."""
    d = len(a)
    kk = d if (k is None and name == "consistent_direction") else ref_k(k, d)
    oa, ob = ref_order(a)[:kk], ref_order(b)[:kk]
    shared = set(oa) & set(ob)
    count = {
        "feature_agreement": len(shared),
        "sign_agreement": sum(1 for f in shared if sgn(a[f]) * sgn(b[f]) > 0),
        "rank_agreement": sum(1 for i in range(kk) if oa[i] == ob[i]),
        "signed_rank_agreement": sum(1 for i in range(kk) if oa[i] == ob[i] and sgn(a[oa[i]]) * sgn(b[oa[i]]) > 0),
    }
    if name in count:
        return (torch.tensor(float(count[name]), dtype=torch.float32) / kk).item()
    if name == "signed_set_agreement":
        return float(set(oa) == set(ob) and all(sgn(a[f]) * sgn(b[f]) > 0 for f in oa))
    return float(all(sgn(a[f]) == sgn(b[f]) for f in shared))


def ref_pra(a: list[float], b: list[float], features: list[int]) -> float:
    """Pairs ordered the same way count 1, pairs tied in either map 1/2 (a random order)."""
    pairs = list(itertools.combinations(features, 2))
    total = Fraction(0)
    for f, g in pairs:
        if abs(a[f]) == abs(a[g]) or abs(b[f]) == abs(b[g]):
            total += Fraction(1, 2)
        elif (abs(a[f]) > abs(a[g])) == (abs(b[f]) > abs(b[g])):
            total += 1
    return float(total / len(pairs))


# --------------------------------------------------------------------------------------------
# Strategies: small maps with many ties and zeros
# --------------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0]),
    st.floats(-3, 3, width=32, allow_subnormal=False),
)
NONZERO = st.one_of(
    st.sampled_from([-2.0, -1.0, 1.0, 2.0]),
    st.floats(0.25, 3, width=32).flatmap(lambda v: st.sampled_from([v, -v])),
)


@st.composite
def map_pairs(draw, values=VALUES, max_d: int = 20, modes=("independent", "same", "flip_some")):
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, max_d))
    rows = st.lists(values, min_size=d, max_size=d)
    a = torch.tensor(draw(st.lists(rows, min_size=n, max_size=n)), dtype=torch.float32)
    mode = draw(st.sampled_from(modes))
    if mode == "independent":
        b = torch.tensor(draw(st.lists(rows, min_size=n, max_size=n)), dtype=torch.float32)
    elif mode == "same":
        b = a.clone()
    else:
        flip_rows = st.lists(st.booleans(), min_size=d, max_size=d)
        flips = torch.tensor(draw(st.lists(flip_rows, min_size=n, max_size=n)))
        b = torch.where(flips, -a, a)
    if draw(st.booleans()):  # also exercise flattening of (N, 1, D) maps
        a, b = a.reshape(n, 1, d), b.reshape(n, 1, d)
    k = draw(st.one_of(st.integers(1, d), st.floats(0, 1, exclude_min=True)))
    return a, b, k


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


# --------------------------------------------------------------------------------------------
# resolve_k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "d", "expected"),
    [
        (0.05, 16384, 819),  # thesis reports 820 (819.2 rounded up); nearest is 819
        (0.1, 16384, 1638),  # thesis: 1638 (1638.4)
        (0.5, 3, 2),  # 1.5 -> half up
        (0.25, 2, 1),  # 0.5 -> half up
        (0.05, 50, 3),  # 2.5 (float 2.5000000000000004)
        (0.7, 5, 4),  # 3.4999999999999996 in float is still a half
        (0.15, 20, 3),
        (0.001, 10, 1),  # at least one feature
        (1.0, 7, 7),
        (1, 7, 1),
        (7, 7, 7),
        (np.int64(3), 7, 3),
    ],
)
def test_resolve_k_examples(k, d, expected):
    assert M.resolve_k(k, d) == expected


@given(st.floats(0, 1, exclude_min=True), st.integers(1, 100_000))
@HYP
def test_resolve_k_is_nearest_count(frac, d):
    k = M.resolve_k(frac, d)
    assert 1 <= k <= d
    assert k == 1 or abs(k - frac * d) <= 0.5 + 1e-6


@pytest.mark.parametrize(
    ("k", "match"),
    [
        (0, r"k=0 is out of range.*1 <= k <= 10"),
        (11, r"k=11 is out of range.*1 <= k <= 10"),
        (1.5, r"k=1.5 is out of range.*0 < k <= 1"),
        (-0.1, r"k=-0.1 is out of range.*0 < k <= 1"),
        (0.0, r"0 < k <= 1"),
        (float("nan"), r"0 < k <= 1"),
        (40.0, r"fraction"),
        (True, r"bool"),
        ("10", r"int count .* or a float fraction"),
    ],
)
def test_resolve_k_errors(k, match):
    with pytest.raises(SaliencyUsageError, match=match):
        M.resolve_k(k, 10)


@pytest.mark.parametrize("name", sorted(TOPK_FUNCS))
@pytest.mark.parametrize("k", [0, 17, 1.5, -0.1])
def test_topk_metrics_reject_bad_k(name, k):
    a = torch.randn(2, 4, 4)
    with pytest.raises(SaliencyUsageError, match="out of range"):
        _call(name, a, a.clone(), k=k)


def test_resolve_k_bad_num_features():
    with pytest.raises(SaliencyUsageError, match="num_features"):
        M.resolve_k(1, 0)


# --------------------------------------------------------------------------------------------
# Top-k metrics against the loop references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOPK_FUNCS))
@given(data=map_pairs())
@HYP
def test_topk_metric_matches_loop_reference(name, data):
    a, b, k = data
    got = _call(name, a, b, k=k)
    assert got.shape == (a.shape[0],)
    assert got.dtype == torch.float32
    expected = [float(ref_topk(name, ra, rb, k)) for ra, rb in zip(_rows(a), _rows(b))]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    for value, ra, rb in zip(got.tolist(), _rows(a), _rows(b)):
        if not (has_ties(ra) or has_ties(rb)):  # no ties: exactly the plain sorted-order value
            assert value == plain_topk(name, ra, rb, k)


@given(data=map_pairs())
@HYP
def test_consistent_direction_default_is_top_d(data):
    a, b, _ = data
    got = M.consistent_direction(a, b, warn_unsigned=False)
    expected = [float(ref_topk("consistent_direction", ra, rb, None)) for ra, rb in zip(_rows(a), _rows(b))]
    assert got.tolist() == expected
    d = a[0].numel()
    assert torch.equal(got, M.consistent_direction(a, b, k=d, warn_unsigned=False))
    assert torch.equal(got, M.consistent_direction(a, b, k=1.0, warn_unsigned=False))


@given(data=map_pairs(), choice=st.sampled_from(["all", "indices", "mask"]), seed=st.integers(0, 2**16))
@HYP
def test_pairwise_rank_agreement_matches_loop_reference(data, choice, seed):
    a, b, _ = data
    d = a[0].numel()
    if d < 2:
        with pytest.raises(SaliencyUsageError, match="at least 2 features"):
            M.pairwise_rank_agreement(a, b)
        return
    rng = np.random.default_rng(seed)
    if choice == "all":
        features, feats = None, list(range(d))
    else:
        size = int(rng.integers(2, d + 1))
        feats = sorted(rng.choice(d, size=size, replace=False).tolist())
        if choice == "indices":
            features = torch.tensor(rng.permutation(feats).tolist())
        else:
            features = torch.zeros(d, dtype=torch.bool)
            features[feats] = True
            features = features.reshape(a.shape[1:])
    got = M.pairwise_rank_agreement(a, b, features)
    expected = [ref_pra(ra, rb, feats) for ra, rb in zip(_rows(a), _rows(b))]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_pairwise_rank_agreement_chunking_gives_same_result(monkeypatch):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-2, 3, (3, 23), generator=g).float()
    b = torch.randint(-2, 3, (3, 23), generator=g).float()
    full = M.pairwise_rank_agreement(a, b)
    monkeypatch.setattr(M, "_PAIRWISE_CHUNK_ELEMENTS", 5)
    chunked = M.pairwise_rank_agreement(a, b)
    assert torch.equal(full, chunked)
    expected = [ref_pra(ra, rb, list(range(23))) for ra, rb in zip(a.tolist(), b.tolist())]
    assert full.tolist() == pytest.approx(expected, abs=1e-6)


def test_pairwise_rank_agreement_feature_errors():
    a = torch.randn(2, 3, 3)
    with pytest.raises(SaliencyUsageError, match="at least 2 features"):
        M.pairwise_rank_agreement(a, a, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(SaliencyUsageError, match="duplicates"):
        M.pairwise_rank_agreement(a, a, [1, 1, 2])
    with pytest.raises(SaliencyUsageError, match=r"lie in \[0, 8\]"):
        M.pairwise_rank_agreement(a, a, [0, 9])
    with pytest.raises(SaliencyUsageError, match="mask must have the shape"):
        M.pairwise_rank_agreement(a, a, torch.ones(4, dtype=torch.bool))
    with pytest.raises(SaliencyUsageError, match="boolean mask or integer indices"):
        M.pairwise_rank_agreement(a, a, torch.ones(3))


def test_tie_rule_gives_tied_features_no_position_advantage():
    a = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # a is one tie block: each feature is in its top-2 with probability 1/2; b's top-2 is {2, 3}.
    assert M.feature_agreement(a, b, 2).item() == pytest.approx(0.5)
    # The same maps mirrored: the tied features' indices make no difference.
    assert torch.equal(M.feature_agreement(a.flip(1), b.flip(1), 2), M.feature_agreement(a, b, 2))
    assert M.rank_agreement(a, b, 4).item() == pytest.approx(0.25)  # 1/D: a carries no ranking
    # zero against zero is a sign disagreement for SA but not a direction flip for CDC
    z = torch.zeros(1, 4)
    assert M.sign_agreement(z, z, 4, warn_unsigned=False).item() == 0.0
    assert M.consistent_direction(z, z, warn_unsigned=False).item() == 1.0


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@st.composite
def tie_free_maps(draw):
    """Maps whose |values| are all distinct: every metric has a single, plain order to work with."""
    n, d = draw(st.integers(1, 4)), draw(st.integers(1, 20))
    rows = []
    for _ in range(n):
        magnitudes = draw(st.permutations(range(1, d + 1)))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=d, max_size=d))
        rows.append([s * m for s, m in zip(signs, magnitudes)])
    return torch.tensor(rows), draw(st.one_of(st.integers(1, d), st.floats(0, 1, exclude_min=True)))


@given(data=tie_free_maps())
@HYP
def test_self_agreement_is_maximal(data):
    a, k = data
    for name in TOPK_FUNCS:
        assert torch.all(_call(name, a, a.clone(), k=k) == 1.0), name
    if a[0].numel() >= 2:
        assert torch.all(M.pairwise_rank_agreement(a, a.clone()) == 1.0)


@given(data=map_pairs())
@HYP
def test_self_agreement_with_ties_and_zeros(data):
    """A map against itself: CDC stays 1; tied features carry no ranking, so FA/RA/PRA are 1 only
    without ties at the top-k boundary (FA) or inside the top-k (RA) or anywhere (PRA); SA also
    counts zeros in the top-k as disagreements."""
    a, _, k = data
    assert torch.all(_call("consistent_direction", a, a, k=k) == 1.0)
    kk = M.resolve_k(k, a[0].numel())
    rows = _rows(a)
    for name in ("feature_agreement", "sign_agreement", "rank_agreement"):
        expected = [float(ref_topk(name, r, r, k)) for r in rows]
        assert _call(name, a, a, k=k).tolist() == pytest.approx(expected, abs=1e-6), name
    # no tie block straddles rank k: the k-th and (k+1)-th largest |values| differ
    boundary_free = [kk == len(r) or abs(r[ref_order(r)[kk - 1]]) != abs(r[ref_order(r)[kk]]) for r in rows]
    fa = M.feature_agreement(a, a, k).tolist()
    assert [v == 1.0 for v in fa] == boundary_free
    nonzero_fa = [sum(1 for f in ref_order(r)[:kk] if r[f] != 0) / kk for r in rows]
    sa = M.sign_agreement(a, a, k, warn_unsigned=False).tolist()
    assert all(s <= n + 1e-6 for s, n in zip(sa, nonzero_fa))


@given(data=map_pairs())
@HYP
def test_metric_inequalities(data):
    a, b, k = data
    fa = M.feature_agreement(a, b, k)
    sa = M.sign_agreement(a, b, k, warn_unsigned=False)
    ra = M.rank_agreement(a, b, k)
    sra = M.signed_rank_agreement(a, b, k, warn_unsigned=False)
    ssa = M.signed_set_agreement(a, b, k, warn_unsigned=False)
    cdc = M.consistent_direction(a, b, k, warn_unsigned=False)
    eps = 1e-6  # SSA and CDC are probabilities computed by different formulas
    assert torch.all(sa <= fa + eps) and torch.all(ra <= fa + eps)
    assert torch.all(sra <= torch.minimum(sa, ra) + eps)
    assert torch.all(ssa <= sa + eps) and torch.all(ssa[sa == 1] == 1)
    assert torch.all(ssa <= cdc + eps)


@given(data=map_pairs())
@HYP
def test_full_k_gives_full_feature_agreement(data):
    a, b, _ = data
    d = a[0].numel()
    assert torch.all(M.feature_agreement(a, b, d) == 1.0)
    assert torch.all(M.feature_agreement(a, b, 1.0) == 1.0)


def test_sign_agreement_equals_feature_agreement_for_same_signs():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 10, 10, generator=g)
    b = a.sign() * torch.rand(50, 10, 10, generator=g).add(0.01)  # same signs, different magnitudes
    for k in (1, 10, 0.3):
        assert torch.equal(M.sign_agreement(a, b, k), M.feature_agreement(a, b, k))
        assert torch.equal(M.signed_rank_agreement(a, b, k), M.rank_agreement(a, b, k))


def test_batch_equals_single_maps():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, 6, generator=g)
    b = torch.randn(4, 6, 6, generator=g)
    for name in TOPK_FUNCS:
        batched = _call(name, a, b, k=0.2)
        singles = torch.cat([_call(name, a[i : i + 1], b[i : i + 1], k=0.2) for i in range(4)])
        assert torch.equal(batched, singles), name


def test_float64_and_half_inputs():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 30, generator=g, dtype=torch.float64)
    b = torch.randn(3, 30, generator=g, dtype=torch.float64)
    assert M.feature_agreement(a, b, 5).dtype == torch.float64
    assert M.feature_agreement(a.half(), b.half(), 5).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Chance levels, by simulation (V10)
# --------------------------------------------------------------------------------------------


def _within_4se(values: torch.Tensor, target: float) -> bool:
    se = values.double().std().item() / math.sqrt(values.numel())
    return abs(values.double().mean().item() - target) <= 4 * se


def test_feature_and_sign_agreement_of_random_maps_are_at_chance():
    g = torch.Generator().manual_seed(1234)
    n, d, k = 2000, 400, 40
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g)
    fa = M.feature_agreement(a, b, k)
    sa = M.sign_agreement(a, b, k)
    ra = M.rank_agreement(a, b, k)
    sra = M.signed_rank_agreement(a, b, k)
    assert M.chance_level("feature_agreement", k, d) == pytest.approx(k / d)
    assert _within_4se(fa, k / d)
    assert _within_4se(sa, M.chance_level("sign_agreement", k, d))
    assert _within_4se(sa - fa / 2, 0.0)  # SA ~ FA/2 for random symmetric signs
    assert _within_4se(ra, M.chance_level("rank_agreement", k, d))
    assert _within_4se(sra, M.chance_level("signed_rank_agreement", k, d))
    assert M.chance_level("feature_agreement", 0.1, d) == pytest.approx(0.1)


def test_pra_ssa_cdc_of_random_maps_are_at_chance():
    g = torch.Generator().manual_seed(99)
    a = torch.randn(3000, 40, generator=g)
    b = torch.randn(3000, 40, generator=g)
    pra = M.pairwise_rank_agreement(a, b, torch.arange(0, 40, 3))
    assert M.chance_level("pairwise_rank_agreement") == 0.5
    assert _within_4se(pra, 0.5)
    a = torch.randn(20000, 5, generator=g)
    b = torch.randn(20000, 5, generator=g)
    ssa = M.signed_set_agreement(a, b, 2)
    assert M.chance_level("signed_set_agreement", 2, 5) == pytest.approx(1 / (10 * 4))
    assert _within_4se(ssa, 1 / 40)
    cdc = M.consistent_direction(a, b, 3)
    # overlap I of two 3-subsets of 5: P(I=1)=0.3, P(I=2)=0.6, P(I=3)=0.1
    expected = 0.3 / 2 + 0.6 / 4 + 0.1 / 8
    assert M.chance_level("consistent_direction", 3, 5) == pytest.approx(expected)
    assert _within_4se(cdc, expected)
    top_d = M.consistent_direction(a, b)
    assert M.chance_level("consistent_direction", num_features=5) == pytest.approx(2**-5)
    assert _within_4se(top_d, 2**-5)


def test_saliency_like_nonnegative_map_gives_half_feature_agreement():
    """V9: |grad| (captum Saliency default) against a sign-symmetric map: SA ~ FA/2, with a warning."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(500, 16, 16, generator=g)
    saliency = base.abs()
    other = base + 0.3 * torch.randn(500, 16, 16, generator=g)  # correlated, signed
    with pytest.warns(SaliencyWarning, match="a has no negative values"):
        sa = M.sign_agreement(saliency, other, 0.1)
    fa = M.feature_agreement(saliency, other, 0.1)
    assert fa.mean() > 0.5
    assert _within_4se(sa - fa / 2, 0.0) or abs((sa.mean() / fa.mean()).item() - 0.5) < 0.05


def test_chance_levels_of_other_metrics():
    for name in ("rank_correlation", "spearman", "spearman_abs", "pearson", "cosine_similarity"):
        assert M.chance_level(name) == 0.0
    assert M.chance_level("angular_difference") == pytest.approx(math.pi / 2)
    for name in ("ssim", "hog_pearson", "l1_distance", "jensen_shannon_divergence"):
        assert M.chance_level(name) is None
        assert M.METRICS[name].chance_note.startswith("None")
    assert M.chance_level("signed_rank_agreement", k=5, num_features=100) == pytest.approx(0.005)


def test_chance_level_errors():
    with pytest.raises(SaliencyUsageError, match="needs num_features"):
        M.chance_level("feature_agreement", k=5)
    with pytest.raises(SaliencyUsageError, match="needs k"):
        M.chance_level("feature_agreement", num_features=100)
    with pytest.raises(SaliencyUsageError, match="out of range"):
        M.chance_level("feature_agreement", k=101, num_features=100)
    with pytest.raises(SaliencyUsageError, match="unknown metric 'fa'"):
        M.chance_level("fa", k=5, num_features=100)


# --------------------------------------------------------------------------------------------
# Sign-metric warning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIGN_METRICS))
def test_sign_metric_warns_on_nonnegative_maps(name):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 8, 8, generator=g)
    with pytest.warns(SaliencyWarning, match=r"b has no negative values.*abs=True"):
        TOPK_FUNCS[name](a, a.abs(), k=0.1)
    with pytest.warns(SaliencyWarning, match=r"a has no negative values .* and b has no negative values"):
        M.compute_metric(name, a.abs(), a.abs(), k=0.1)
    with pytest.warns(SaliencyWarning, match=r"a has no positive values"):
        TOPK_FUNCS[name](-a.abs(), a, k=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TOPK_FUNCS[name](a, a.flip(0), k=0.1)  # signed maps: silent
        TOPK_FUNCS[name](a.abs(), a.abs(), k=0.1, warn_unsigned=False)


def test_non_sign_metrics_do_not_warn_on_nonnegative_maps():
    a = torch.rand(2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.feature_agreement(a, a, 3)
        M.rank_agreement(a, a, 3)
        M.pairwise_rank_agreement(a, a)


# --------------------------------------------------------------------------------------------
# Correlations and map similarity vs scipy / scikit-image / numpy
# --------------------------------------------------------------------------------------------


def _spearmanr(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y).statistic)


@pytest.mark.parametrize("absolute", [True, False])
def test_rank_correlation_masked_matches_scipy(absolute):
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4, 9, 9, generator=g, dtype=torch.float64)
    b = a + torch.randn(4, 9, 9, generator=g, dtype=torch.float64)
    b[:, :3, :3] = 0.0  # ties
    tf = np.abs if absolute else (lambda v: v)
    shared = torch.rand(9, 9, generator=g) > 0.5
    got = M.rank_correlation(a, b, shared, absolute=absolute)
    m = shared.numpy()
    expected = [_spearmanr(tf(a[i].numpy()[m]), tf(b[i].numpy()[m])) for i in range(4)]
    assert got.tolist() == pytest.approx(expected, abs=1e-10)
    per_map = torch.rand(4, 9, 9, generator=g) > 0.4
    got = M.rank_correlation(a, b, per_map, absolute=absolute)
    pm = per_map.numpy()
    expected = [_spearmanr(tf(a[i].numpy()[pm[i]]), tf(b[i].numpy()[pm[i]])) for i in range(4)]
    assert got.tolist() == pytest.approx(expected, abs=1e-10)
    same_per_map = shared.expand(4, 9, 9)
    reference = M.rank_correlation(a, b, shared, absolute=absolute)
    assert torch.allclose(M.rank_correlation(a, b, same_per_map, absolute=absolute), reference)
    flat = M.rank_correlation(a, b, shared.reshape(-1), absolute=absolute)
    assert torch.allclose(flat, M.rank_correlation(a, b, shared, absolute=absolute))
    unmasked = M.rank_correlation(a, b, absolute=absolute)
    expected = [_spearmanr(tf(a[i].numpy().ravel()), tf(b[i].numpy().ravel())) for i in range(4)]
    assert unmasked.tolist() == pytest.approx(expected, abs=1e-10)


def test_rank_correlation_mask_errors():
    a = torch.randn(2, 4, 4)
    with pytest.raises(SaliencyUsageError, match="selects 0 pixel"):
        M.rank_correlation(a, a, torch.zeros(4, 4, dtype=torch.bool))
    one = torch.zeros(2, 4, 4, dtype=torch.bool)
    one[0, 0, 0] = True
    one[1] = True
    with pytest.raises(SaliencyUsageError, match=r"mask of map\(s\) \[0\] selects 1 pixel"):
        M.rank_correlation(a, a, one)
    with pytest.raises(SaliencyUsageError, match="mask shape"):
        M.rank_correlation(a, a, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(SaliencyUsageError, match="boolean"):
        M.rank_correlation(a, a, torch.ones(4, 4))


def test_spearman_pearson_match_scipy():
    g = torch.Generator().manual_seed(12)
    a = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    for i in range(3):
        x, y = a[i].numpy().ravel(), b[i].numpy().ravel()
        assert M.spearman(a, b)[i].item() == pytest.approx(_spearmanr(x, y), abs=1e-10)
        assert M.spearman_abs(a, b)[i].item() == pytest.approx(_spearmanr(np.abs(x), np.abs(y)), abs=1e-10)
        assert M.pearson(a, b)[i].item() == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-10)


def _hog(m: np.ndarray, **kw) -> np.ndarray:
    return hog(m, **kw)


@pytest.mark.parametrize(
    ("size", "kwargs"),
    [
        ((48, 48), {}),
        ((64, 56), {}),
        ((20, 24), {"pixels_per_cell": (8, 8), "cells_per_block": (2, 2), "orientations": 6}),
    ],
)
def test_hog_pearson_matches_skimage(size, kwargs):
    g = torch.Generator().manual_seed(13)
    a = torch.randn(2, *size, generator=g, dtype=torch.float64)
    b = a + torch.randn(2, *size, generator=g, dtype=torch.float64)
    got = M.hog_pearson(a, b, **kwargs)
    sk_kwargs = {"pixels_per_cell": (16, 16), **kwargs}
    for i in range(2):
        ha, hb = _hog(a[i].numpy(), **sk_kwargs), _hog(b[i].numpy(), **sk_kwargs)
        assert got[i].item() == pytest.approx(np.corrcoef(ha, hb)[0, 1], abs=1e-10)
    assert torch.allclose(M.hog_pearson(a, a, **kwargs), torch.ones(2, dtype=torch.float64))


def test_hog_pearson_errors():
    with pytest.raises(SaliencyUsageError, match=r"32x32 pixels are smaller than one HOG block of 48x48"):
        M.hog_pearson(torch.randn(2, 32, 32), torch.randn(2, 32, 32))
    with pytest.raises(SaliencyUsageError, match=r"\(N, H, W\)"):
        M.hog_pearson(torch.randn(2, 1, 48, 48), torch.randn(2, 1, 48, 48))


def test_ssim_wrapper():
    g = torch.Generator().manual_seed(14)
    a = torch.rand(2, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.2 * torch.randn(2, 16, 16, generator=g, dtype=torch.float64)).clamp(-1, 1)
    got = M.ssim(a, b, data_range=2.0, win_size=5)
    for i in range(2):
        expected = sk_ssim(a[i].numpy(), b[i].numpy(), data_range=2.0, win_size=5)
        assert got[i].item() == pytest.approx(expected, abs=1e-8)
    assert torch.allclose(M.compute_metric("ssim", a, a, data_range=2.0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(SaliencyUsageError, match=r"\(N, H, W\)"):
        M.ssim(a.reshape(2, 1, 16, 16), b.reshape(2, 1, 16, 16), data_range=2.0)


@given(data=map_pairs(values=st.floats(-3, 3, width=32)))
@HYP
def test_l1_cosine_angle_match_numpy(data):
    a, b, _ = data
    for i, (ra, rb) in enumerate(zip(_rows(a), _rows(b))):
        x, y = np.array(ra, dtype=np.float64), np.array(rb, dtype=np.float64)
        assert M.l1_distance(a, b)[i].item() == pytest.approx(np.mean(np.abs(x - y)), rel=1e-5, abs=1e-5)
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        cos_t, ang_t = M.cosine_similarity(a, b)[i].item(), M.angular_difference(a, b)[i].item()
        if nx == 0 or ny == 0:
            assert math.isnan(cos_t) and math.isnan(ang_t)
            continue
        cos = float(np.clip(x @ y / (nx * ny), -1, 1))
        assert cos_t == pytest.approx(cos, abs=1e-5)
        assert ang_t == pytest.approx(math.acos(cos), abs=2e-3)  # acos is ill-conditioned near +-1
        deg_t = M.angular_difference(a, b, degrees=True)[i].item()
        assert deg_t == pytest.approx(math.degrees(ang_t), rel=1e-5, abs=1e-4)


def test_angle_accuracy_and_self_values():
    g = torch.Generator().manual_seed(15)
    a = torch.randn(3, 10, 10, generator=g, dtype=torch.float64)
    b = torch.randn(3, 10, 10, generator=g, dtype=torch.float64)
    expected = [
        math.acos(float(np.clip(x.ravel() @ y.ravel() / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1)))
        for x, y in zip(a.numpy(), b.numpy())
    ]
    assert M.angular_difference(a, b).tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.all(M.angular_difference(a.float(), a.float()) == 0)
    assert torch.allclose(M.angular_difference(a, -a), torch.full((3,), math.pi, dtype=torch.float64))
    assert torch.allclose(M.cosine_similarity(a, 2 * a), torch.ones(3, dtype=torch.float64))
    assert torch.all(M.l1_distance(a, a) == 0)


def _scipy_jsd(p: np.ndarray, q: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(distance.jensenshannon(p, q, base=2)) ** 2


NON_NEGATIVE = st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 3, width=32)


@given(data=map_pairs(values=NON_NEGATIVE, modes=("independent", "same")))
@HYP
def test_jensen_shannon_matches_scipy(data):
    a, b, _ = data
    ra, rb = _rows(a), _rows(b)
    if any(sum(r) == 0 for r in ra + rb):
        with pytest.raises(SaliencyUsageError, match="all-zero map"):
            M.jensen_shannon_divergence(a, b)
        return
    got = M.jensen_shannon_divergence(a.double(), b.double())
    expected = [_scipy_jsd(np.array(x), np.array(y)) for x, y in zip(ra, rb)]
    assert got.tolist() == pytest.approx(expected, abs=1e-9)
    assert torch.all((got >= 0) & (got <= 1))
    assert torch.all(M.jensen_shannon_divergence(a, a) == 0)


def test_jensen_shannon_extremes_and_errors():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    assert M.jensen_shannon_divergence(p, q).item() == pytest.approx(1.0)
    assert M.jensen_shannon_divergence(p, 5 * p).item() == 0.0
    with pytest.raises(SaliencyUsageError, match=r"argument b has negative values.*abs\(\)"):
        M.jensen_shannon_divergence(p, -q)
    with pytest.raises(SaliencyUsageError, match=r"argument a has all-zero map\(s\) \[0\]"):
        M.jensen_shannon_divergence(torch.zeros(1, 4), q)


def test_self_similarity_of_map_metrics():
    g = torch.Generator().manual_seed(16)
    a = torch.randn(2, 48, 48, generator=g)
    assert torch.allclose(M.spearman(a, a), torch.ones(2))
    assert torch.allclose(M.rank_correlation(a, a), torch.ones(2))
    assert torch.allclose(M.hog_pearson(a, a), torch.ones(2))
    assert torch.allclose(M.ssim(a, a, data_range=2.0), torch.ones(2))
    assert torch.all(M.l1_distance(a, a) == 0)
    assert torch.all(M.angular_difference(a, a) == 0)
    assert torch.all(M.jensen_shannon_divergence(a.abs(), a.abs()) == 0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

ALL_PAIR_METRICS = [
    (name, {"k": 0.5} if info.takes_k else ({"data_range": 2.0} if name == "ssim" else {}))
    for name, info in M.METRICS.items()
]


@pytest.mark.parametrize(("name", "kwargs"), ALL_PAIR_METRICS)
def test_shared_input_validation(name, kwargs):
    a = torch.rand(2, 48, 48)
    with pytest.raises(SaliencyUsageError, match=r"same shape.*\(2, 48, 48\) and b \(2, 48, 47\)"):
        M.compute_metric(name, a, torch.rand(2, 48, 47), **kwargs)
    bad = a.clone()
    bad[1, 3, 4] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"argument b contains 1 NaN or infinite.*map\(s\) \[1\]"):
        M.compute_metric(name, a, bad, **kwargs)
    bad[1, 3, 4] = float("inf")
    with pytest.raises(SaliencyUsageError, match=r"argument a contains 1 NaN or infinite"):
        M.compute_metric(name, bad, a, **kwargs)
    with pytest.raises(SaliencyUsageError, match=r"batch dimension first.*unsqueeze\(0\)"):
        M.compute_metric(name, a[0, 0], a[1, 0], **kwargs)
    with pytest.raises(SaliencyUsageError, match="must be a torch.Tensor"):
        M.compute_metric(name, a.numpy(), a, **kwargs)
    with pytest.raises(SaliencyUsageError, match="floating-point"):
        M.compute_metric(name, a, (a * 10).long(), **kwargs)
    with pytest.raises(SaliencyUsageError, match="is on cpu but b is on meta"):
        M.compute_metric(name, a, torch.empty(2, 48, 48, device="meta"), **kwargs)
    meta = torch.empty(2, 48, 48, device="meta")
    with pytest.raises(SaliencyUsageError, match=rf"^{name}: argument a is on the meta device, which holds shapes but no"):
        M.compute_metric(name, meta, meta, **kwargs)
    with pytest.raises(SaliencyUsageError, match="empty"):
        M.compute_metric(name, a[:0], a[:0], **kwargs)


def test_unknown_metric_name_suggests_close_match():
    a = torch.rand(2, 4)
    expected = r"unknown metric 'sign_agrement'.*Did you mean 'sign_agreement'.*Valid metrics: feature_agreement"
    with pytest.raises(SaliencyUsageError, match=expected):
        M.compute_metric("sign_agrement", a, a, k=2)
    with pytest.raises(SaliencyUsageError, match=r"unknown metric 'SSIM'.*Valid metrics:"):
        M.compute_metric("SSIM", a, a)


def test_compute_metric_bad_kwargs():
    a = torch.rand(2, 4)
    with pytest.raises(SaliencyUsageError, match=r"'feature_agreement' cannot be called.*missing.*'k'"):
        M.compute_metric("feature_agreement", a, a)
    with pytest.raises(SaliencyUsageError, match=r"cannot be called with arguments \['mask'\]"):
        M.compute_metric("l1_distance", a, a, mask=None)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_contents():
    expected = {
        "feature_agreement", "sign_agreement", "rank_agreement", "signed_rank_agreement",
        "pairwise_rank_agreement", "signed_set_agreement", "consistent_direction", "rank_correlation",
        "ssim", "spearman", "spearman_abs", "pearson", "hog_pearson", "l1_distance",
        "cosine_similarity", "angular_difference", "jensen_shannon_divergence",
    }  # fmt: skip
    assert set(M.METRICS) == expected
    assert {n for n, i in M.METRICS.items() if i.sign_metric} == SIGN_METRICS
    assert {n for n, i in M.METRICS.items() if not i.higher_is_better} == {
        "l1_distance", "angular_difference", "jensen_shannon_divergence"
    }  # fmt: skip
    assert {n for n, i in M.METRICS.items() if i.takes_k} == set(TOPK_FUNCS)
    for name, info in M.METRICS.items():
        assert info.name == name and callable(info.function) and info.chance_note and info.summary


def test_compute_metric_dispatches():
    g = torch.Generator().manual_seed(17)
    a = torch.randn(3, 5, 5, generator=g)
    b = torch.randn(3, 5, 5, generator=g)
    assert torch.equal(M.compute_metric("feature_agreement", a, b, k=0.2), M.feature_agreement(a, b, 0.2))
    assert torch.equal(M.compute_metric("pairwise_rank_agreement", a, b), M.pairwise_rank_agreement(a, b))
    degrees = M.compute_metric("angular_difference", a, b, degrees=True)
    assert torch.equal(degrees, M.angular_difference(a, b, degrees=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "kwargs"), ALL_PAIR_METRICS)
def test_cuda_matches_cpu(name, kwargs):
    g = torch.Generator().manual_seed(18)
    a = torch.randn(3, 48, 48, generator=g, dtype=torch.float64)
    b = a + torch.randn(3, 48, 48, generator=g, dtype=torch.float64)
    if name == "jensen_shannon_divergence":
        a, b = a.abs(), b.abs()
    if name in SIGN_METRICS:
        kwargs = {**kwargs, "warn_unsigned": False}
    cpu = M.compute_metric(name, a, b, **kwargs)
    gpu = M.compute_metric(name, a.cuda(), b.cuda(), **kwargs)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
