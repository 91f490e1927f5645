"""Metrics for comparing two batches of attribution maps, pair by pair.

Every public metric takes two tensors ``a`` and ``b`` of the same shape ``(N, ...)``: ``N`` maps
each, where map ``a[i]`` is compared with map ``b[i]``. Each map is flattened to ``D`` features
internally and the result is a tensor of shape ``(N,)`` on the inputs' device. Everything is
batched torch (no Python loop over maps), except HOG, which is scikit-image's job and runs per
map on the CPU, and masked rank correlation when the mask differs from row to row.

Conventions shared by all top-k metrics (why they are fixed here, once):

Top-k by magnitude
    ``top_k(x)`` is the ``k`` features with the largest ``|x|`` (Krishna et al. 2022; the
    disagreement thesis, eq. 4.6; Ley et al. 2023: "the k largest features according to
    absolute value").
Ties
    Features are ordered by ``|x|`` descending. Features with equal ``|x|`` form a **tie block**:
    a map does not say which of them matters more, so the block's order is taken to be
    uniformly random, independently in ``a`` and in ``b``, and every top-k metric reports its
    **expected value over those random orders** (computed exactly, with no sampling). A block of
    ``s`` features whose first position is ``p`` (``p`` features have a larger ``|x|``) puts each
    of them at each position ``p .. p+s-1`` with probability ``1/s``, so a block that straddles
    position ``k`` contributes each of its features to the top-k with probability
    ``(k - p) / s``. FA, SA, RA and SRA sum these per-feature probabilities, PRA counts a pair tied
    in either map as half an agreement, and SSA and CDC are the exact probabilities of their
    events (a hypergeometric count over the straddling blocks). :func:`_tie_blocks` is the one
    place that finds the blocks; every top-k metric derives its counts from it.

    Why: maps with plateaus, zero regions or fewer non-zero features than ``k`` (LIME's Lasso,
    ReLU'd GradCAM, thresholded or quantized maps) would otherwise fill their leftover top-k
    slots by position, and two *unrelated* maps that both do so share those slots: with a
    lower-index rule, independent maps with 10 of 256 non-zero pixels score FA = 0.64 at the
    top 10%, against a chance level of 0.10. Under the expected-value rule every top-k metric
    of two independent maps with exchangeable features equals its chance level
    (:func:`chance_level`) whatever the ties, and a map whose ``|x|`` is constant (e.g. all zero)
    scores exactly ``k/D`` (FA), ``1/D`` (RA) and ``1/2`` (PRA) against any map. Maps without
    ties get the same values as a plain sort; the numbers are deterministic (no random
    generator is involved). A consequence: a map compared with *itself* scores below the
    maximum when it has ties that a metric depends on (e.g. FA of a map with 10 non-zero pixels
    with itself at k = 26), because the tied features carry no ranking to agree on.
``k``
    An ``int`` is a count (``1 <= k <= D``); a ``float`` is a fraction of ``D`` (``0 < k <= 1``),
    turned into a count by :func:`resolve_k` (round half up, at least 1).
Signs
    For SA, SRA and SSA two features "agree in sign" iff ``sign(a_f) * sign(b_f) > 0``, as in the
    thesis's eq. 4.7 (``e1 * e2 > 0``). A zero in either map - including zero against zero - is a
    **disagreement**: a zero attribution has no direction to agree on. Signs are compared, not
    the product of the values, so tiny values cannot underflow to a spurious zero. CDC is the
    one exception, see :func:`consistent_direction`.

Sign metrics (SA, SRA, SSA, CDC) are degenerate when one batch cannot be negative (captum
``Saliency`` with its default ``abs=True``, occlusion, ReLU'd GradCAM): they then emit a
:class:`SaliencyWarning`. The thesis's finding "SA ~ FA/2" for Saliency pairs is exactly this
artefact.

Registry: :data:`METRICS` maps a metric name to :class:`MetricInfo` (callable, whether it takes
``k``, whether higher is better, whether it is a sign metric, its chance level), and
:func:`compute_metric` dispatches by name. :func:`chance_level` gives the expected value for
independent random maps, the baseline against which an "agreement" should be judged.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..core.integrity import short_usage_errors
from ..core.validation import check_choice, check_count, check_finite, check_flag, is_count, unknown_choice
from ..exceptions import SaliencyUsageError, warn_user

KValue = Union[int, float]

__all__ = [
    "KValue",
    "METRICS",
    "MetricInfo",
    "angular_difference",
    "chance_level",
    "compute_metric",
    "compute_on_valid",
    "consistent_direction",
    "cosine_similarity",
    "feature_agreement",
    "hog_pearson",
    "jensen_shannon_divergence",
    "l1_distance",
    "pairwise_rank_agreement",
    "pearson",
    "rank_agreement",
    "rank_correlation",
    "resolve_k",
    "sign_agreement",
    "signed_rank_agreement",
    "signed_set_agreement",
    "spearman",
    "spearman_abs",
    "ssim",
]

# Largest number of elements in one temporary of the pairwise comparison (PRA); about 4 M
# booleans, i.e. a few tens of MiB across the temporaries of one chunk.
_PAIRWISE_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _work_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision is promoted to float32 (sorting/summing halves loses ties)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def _validate_map_batches(a: Any, b: Any, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the shared contract and return ``(N, D)`` detached views in the working dtype.

    The contract of the registry's metrics, stricter than the one of the scipy/scikit-image
    counterparts in :mod:`.similarity` (its ``_validate_array_pair``): batches of ``N >= 1``
    floating-point maps with the batch dimension first, never a single 1-D pair, integer data or
    meta tensors, and every message starts with the metric's name, as checks call metrics by name.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise SaliencyUsageError(
                f"{metric}: argument {name} must be a torch.Tensor of shape (N, ...) holding N "
                f"attribution maps, got {type(x).__name__}. Convert it with "
                f"torch.as_tensor({name}, dtype=torch.float32)."
            )
        if not x.is_floating_point():
            raise SaliencyUsageError(
                f"{metric}: argument {name} must be a real floating-point tensor, got dtype "
                f"{x.dtype}. Convert it with {name}.float()."
            )
    if a.shape != b.shape:
        raise SaliencyUsageError(
            f"{metric}: a and b must have the same shape (N maps each, compared pair by pair), got "
            f"a {tuple(a.shape)} and b {tuple(b.shape)}. Post-process both batches with the same "
            "pipeline (same channel reduction and resizing) and pair them up map by map."
        )
    if a.dim() < 2:
        raise SaliencyUsageError(
            f"{metric}: maps must be batched with the batch dimension first, shape (N, ...), got a "
            f"{a.dim()}-D tensor of shape {tuple(a.shape)}. For a single map add the batch "
            "dimension with a.unsqueeze(0) and b.unsqueeze(0)."
        )
    if a.shape[0] == 0 or a.numel() == 0:
        raise SaliencyUsageError(
            f"{metric}: a and b are empty (shape {tuple(a.shape)}); pass at least one map with at "
            "least one feature."
        )
    if a.device != b.device:
        raise SaliencyUsageError(
            f"{metric}: a is on {a.device} but b is on {b.device}. Move both to one device, e.g. "
            f"b = b.to({str(a.device)!r})."
        )
    for name, x in (("a", a), ("b", b)):
        check_finite(
            x, f"{metric}: argument {name}", plural=False, per_map=True,
            hint="Metrics need finite maps: check the explainer's numerics (e.g. a division by a zero norm) or "
                 "drop those maps.",
        )
    dtype = _work_dtype(a, b)
    n = a.shape[0]
    return a.detach().reshape(n, -1).to(dtype), b.detach().reshape(n, -1).to(dtype)


def _validate_images(a: Any, b: Any, metric: str) -> None:
    """Metrics with a spatial window (SSIM, HOG) need single-channel maps (N, H, W)."""
    _validate_map_batches(a, b, metric)
    if a.dim() != 3:
        raise SaliencyUsageError(
            f"{metric}: needs single-channel 2-D maps of shape (N, H, W), got shape "
            f"{tuple(a.shape)}. Reduce channels first (e.g. a postprocess pipeline, or "
            "a.sum(dim=1) for (N, C, H, W) attributions), and add a batch dimension with "
            "unsqueeze(0) for a single map."
        )


def resolve_k(k: KValue, num_features: int) -> int:
    """Turn ``k`` (a count or a fraction) into a feature count in ``[1, num_features]``.

    Rule:

    * ``int`` (also numpy integers): a count; it must satisfy ``1 <= k <= num_features``.
    * ``float``: a fraction; it must satisfy ``0 < k <= 1`` and gives
      ``k_count = max(1, floor(k * D + 1/2))`` - **round half up**, at least one feature. The
      product is first rounded to 9 decimals so float noise (``0.7 * 5 = 3.4999999999999996``)
      cannot flip a half. A float is always a fraction: ``40.0`` is an error, ``1.0`` means all
      features.
    * ``bool`` is rejected (``True`` is an ``int`` in Python but certainly not a count).

    Why round-half-up: it is the nearest count to the requested fraction. The disagreement thesis
    reports 5% of a 128x128 map as k = 820 and 10% as k = 1638, i.e. 819.2 rounded *up* and
    1638.4 rounded *down* - no single rule reproduces both. Rounding to nearest gives 819 and 1638
    (matching the 10% figure, the one used in its Table 5.2); pass ``k=820`` as a count to match
    the 5% figure exactly.

    Raises :class:`SaliencyUsageError` for anything out of range.
    """
    if not is_count(num_features):
        raise SaliencyUsageError(
            f"num_features must be a positive int (the number of features D of one map), got "
            f"{num_features!r}."
        )
    d = int(num_features)
    if isinstance(k, bool):
        raise SaliencyUsageError(
            f"k must be an int count (1 <= k <= {d}) or a float fraction (0 < k <= 1), got the "
            f"bool {k!r}. Pass e.g. k=10 or k=0.1."
        )
    if isinstance(k, numbers.Integral):
        if not 1 <= int(k) <= d:
            raise SaliencyUsageError(
                f"k={int(k)} is out of range: as an int it is a feature count and must satisfy "
                f"1 <= k <= {d} (the number of features per map). Pass a count in that range, or "
                "a float fraction such as k=0.1 for the top 10%."
            )
        return int(k)
    if isinstance(k, numbers.Real):
        frac = float(k)
        if not (0.0 < frac <= 1.0):  # also rejects NaN
            hint = (
                f" If you meant a count, pass the int k={int(frac)} rather than the float {frac!r}."
                if math.isfinite(frac) and frac > 1 and frac == int(frac)
                else ""
            )
            raise SaliencyUsageError(
                f"k={k!r} is out of range: as a float it is a fraction of the {d} features and "
                "must satisfy 0 < k <= 1. Pass e.g. k=0.05 for the top 5%, or an int count "
                f"(1 <= k <= {d}).{hint}"
            )
        count = math.floor(round(frac * d, 9) + 0.5)
        return min(d, max(1, count))
    raise SaliencyUsageError(
        f"k must be an int count (1 <= k <= {d}) or a float fraction (0 < k <= 1), got "
        f"{type(k).__name__} {k!r}."
    )


# --------------------------------------------------------------------------------------------
# Top-k machinery
# --------------------------------------------------------------------------------------------


def _tie_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie rule, in one place: each feature's tie block in the order by ``|x|`` descending.

    Returns ``(start, size)``, both ``(N, D)`` int64: ``start`` is how many features of the row
    have a strictly larger ``|x|`` (the block's first position) and ``size`` how many share the
    feature's ``|x|``, itself included. The block's features occupy positions
    ``start .. start + size - 1`` in a uniformly random order (see "Ties" in the module
    docstring); without ties ``start`` is the feature's position and ``size`` is 1.
    """
    magnitude = x.abs().contiguous()
    ascending = torch.sort(magnitude, dim=1).values
    at_most = torch.searchsorted(ascending, magnitude, right=True)
    below = torch.searchsorted(ascending, magnitude, right=False)
    return magnitude.shape[1] - at_most, at_most - below


@dataclass(frozen=True)
class _TopK:
    """Top-k membership of each feature of each row under the tie rule.

    ``share``: probability that the feature is in the top-k (float64, in [0, 1]); ``certain``:
    it always is (its whole block lies before position k); ``partial``: it is in the block that
    straddles position k, of which ``pick`` of the ``pool`` features (per row) make the top-k.
    Rows where no block straddles k have ``pool == pick == 0``.
    """

    start: torch.Tensor
    size: torch.Tensor
    share: torch.Tensor
    certain: torch.Tensor
    partial: torch.Tensor
    pick: torch.Tensor
    pool: torch.Tensor


def _top_k(x: torch.Tensor, k: int) -> _TopK:
    start, size = _tie_blocks(x)
    certain = start + size <= k
    partial = (start < k) & ~certain
    share = (k - start).clamp(min=0).minimum(size).double() / size.double()
    return _TopK(
        start=start, size=size, share=share, certain=certain, partial=partial,
        pick=k - certain.sum(dim=1), pool=partial.sum(dim=1),
    )


def _same_rank_share(ta: _TopK, tb: _TopK, k: int) -> torch.Tensor:
    """Expected number of the first k positions at which each feature stands in both maps.

    Feature f is at each position of its block with probability ``1/size`` in each map,
    independently, so the expectation is ``|block_a ∩ block_b ∩ [0, k)| / (size_a · size_b)``.
    """
    low = torch.maximum(ta.start, tb.start)
    high = torch.minimum(ta.start + ta.size, tb.start + tb.size).clamp(max=k)
    overlap = (high - low).clamp(min=0)
    return overlap.double() / (ta.size * tb.size).double()


def _log_comb_tensor(n: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log C(n, r)`` as float64 and whether ``0 <= r <= n`` (elsewhere ``C(n, r) = 0``)."""
    valid = (r >= 0) & (r <= n)
    n_ = torch.where(valid, n, torch.zeros_like(n)).double()
    r_ = torch.where(valid, r, torch.zeros_like(r)).double()
    return torch.lgamma(n_ + 1) - torch.lgamma(r_ + 1) - torch.lgamma(n_ - r_ + 1), valid


def _comb_ratio(n: torch.Tensor, r: torch.Tensor, n0: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """``C(n, r) / C(n0, r0)`` in float64 (``C(n0, r0) >= 1`` is assumed), 0 where ``C(n, r) = 0``."""
    top, valid = _log_comb_tensor(n, r)
    bottom, _ = _log_comb_tensor(n0, r0)
    return torch.where(valid, torch.exp(top - bottom), torch.zeros_like(top))


def _signs_agree(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sign(a) * sign(b) > 0: both non-zero with the same sign (zero is a disagreement)."""
    return (torch.sign(a) * torch.sign(b)) > 0


def _warn_if_unsigned(a: torch.Tensor, b: torch.Tensor, metric: str) -> None:
    """Warn when a batch has a single sign: sign metrics then measure the other map's sign balance."""
    problems = []
    for name, x in (("a", a), ("b", b)):
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0:
            problems.append(f"{name} has no negative values (min = {lo:g})")
        elif hi <= 0:
            problems.append(f"{name} has no positive values (max = {hi:g})")
    if not problems:
        return
    warn_user(
        f"{metric} is a sign metric, but {' and '.join(problems)}. Such maps cannot carry a "
        "direction (e.g. captum Saliency with its default abs=True, occlusion, ReLU'd GradCAM, "
        "or maps post-processed with abs): if both batches are single-signed, sign agreement "
        "collapses to feature agreement (SA == FA apart from zeros); if only one is, SA measures "
        "the other map's share of positive values, so SA ~ FA/2 for a sign-symmetric partner - "
        "the 'SA ~ FA/2' finding of the disagreement thesis is this artefact, not disagreement. "
        "Compare signed attributions (e.g. Saliency(abs=False), a signed preset such as "
        "'sam2020') or use feature_agreement / rank_agreement instead."
    )


def _as_fraction(count: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return count.to(dtype) / k


# --------------------------------------------------------------------------------------------
# Top-k agreement metrics (Krishna et al. 2022; disagreement thesis; Ley et al. 2023)
# --------------------------------------------------------------------------------------------


def feature_agreement(a: torch.Tensor, b: torch.Tensor, k: KValue) -> torch.Tensor:
    """Feature agreement: the share of top-k features the two maps have in common.

    ``FA_k(a, b) = |top_k(a) ∩ top_k(b)| / k`` with top-k by ``|value|`` (thesis eq. 4.6). It is
    the coarsest "do the maps highlight the same pixels" question: order and sign are ignored.
    Range [0, 1], 1 = same top-k set. Chance level for independent maps: ``k / D``.

    Ties: the overlap is its expectation over random orders of the tie blocks,
    ``Σ_f P(f ∈ top_k(a)) · P(f ∈ top_k(b))``, where a feature in the block that straddles
    position k is in the top-k with probability ``(k - start) / size`` (see "Ties" in the module
    docstring). So leftover top-k slots of sparse or constant maps are shared only as often as
    chance would share them: a constant map scores exactly ``k / D``.
    """
    xa, xb = _validate_map_batches(a, b, "feature_agreement")
    kk = resolve_k(k, xa.shape[1])
    shared = (_top_k(xa, kk).share * _top_k(xb, kk).share).sum(dim=1)
    return _as_fraction(shared, kk, xa.dtype)


def sign_agreement(
    a: torch.Tensor, b: torch.Tensor, k: KValue, *, warn_unsigned: bool = True
) -> torch.Tensor:
    """Sign agreement: shared top-k features that also point the same way.

    ``SA_k(a, b) = |{f ∈ top_k(a) ∩ top_k(b) : sign(a_f) · sign(b_f) > 0}| / k`` (thesis eq. 4.7,
    Krishna et al.). A zero in either map is a disagreement. ``SA_k <= FA_k``; equality means every
    shared feature has the same non-zero sign. Chance level ``k / (2D)`` for independent maps with
    symmetric signs. Warns (:class:`SaliencyWarning`) when a batch is single-signed; pass
    ``warn_unsigned=False`` when that is known and intended.

    Ties: as in :func:`feature_agreement`, each sign-agreeing feature counts with the probability
    that both maps' top-k hold it, ``P(f ∈ top_k(a)) · P(f ∈ top_k(b))``.
    """
    xa, xb = _validate_map_batches(a, b, "sign_agreement")
    check_flag(warn_unsigned, "warn_unsigned", where="sign_agreement: ")
    if warn_unsigned:
        _warn_if_unsigned(xa, xb, "sign_agreement")
    kk = resolve_k(k, xa.shape[1])
    both = _top_k(xa, kk).share * _top_k(xb, kk).share
    shared = torch.where(_signs_agree(xa, xb), both, torch.zeros_like(both)).sum(dim=1)
    return _as_fraction(shared, kk, xa.dtype)


def rank_agreement(a: torch.Tensor, b: torch.Tensor, k: KValue) -> torch.Tensor:
    """Rank agreement: the share of the first k ranks held by the same feature in both maps.

    ``RA_k(a, b) = |{i < k : order_a[i] = order_b[i]}| / k`` where ``order_x`` lists features by
    ``|x|`` descending. Equivalent to Krishna et al.'s
    ``|{f ∈ top_k(a) ∩ top_k(b) : rank_a(f) = rank_b(f)}| / k``. Much stricter than FA: a swap of
    two neighbours costs two ranks. Chance level ``1 / D``.

    Ties: the count is its expectation over random orders of the tie blocks; a feature whose
    blocks cover positions ``[s_a, s_a + n_a)`` and ``[s_b, s_b + n_b)`` stands at the same rank
    below k in both maps for ``|[s_a, s_a+n_a) ∩ [s_b, s_b+n_b) ∩ [0, k)| / (n_a n_b)`` ranks on
    average. So tied features, even inside the top-k of a map compared with itself, agree on
    their rank only as often as chance: RA of a map with itself is 1 only if its top-k has no
    ties, and a constant map scores exactly ``1 / D``.
    """
    xa, xb = _validate_map_batches(a, b, "rank_agreement")
    kk = resolve_k(k, xa.shape[1])
    same = _same_rank_share(_top_k(xa, kk), _top_k(xb, kk), kk)
    return _as_fraction(same.sum(dim=1), kk, xa.dtype)


def signed_rank_agreement(
    a: torch.Tensor, b: torch.Tensor, k: KValue, *, warn_unsigned: bool = True
) -> torch.Tensor:
    """Signed rank agreement: same feature at the same rank *and* the same non-zero sign.

    ``SRA_k(a, b) = |{i < k : order_a[i] = order_b[i] = f, sign(a_f) · sign(b_f) > 0}| / k``
    (Krishna et al.; zeros disagree as in SA). ``SRA_k <= min(RA_k, SA_k)``. Chance level
    ``1 / (2D)``. Warns when a batch is single-signed.

    Ties: the expected count over random orders of the tie blocks, as in
    :func:`rank_agreement`, restricted to sign-agreeing features.
    """
    xa, xb = _validate_map_batches(a, b, "signed_rank_agreement")
    check_flag(warn_unsigned, "warn_unsigned", where="signed_rank_agreement: ")
    if warn_unsigned:
        _warn_if_unsigned(xa, xb, "signed_rank_agreement")
    kk = resolve_k(k, xa.shape[1])
    same = _same_rank_share(_top_k(xa, kk), _top_k(xb, kk), kk)
    same = torch.where(_signs_agree(xa, xb), same, torch.zeros_like(same))
    return _as_fraction(same.sum(dim=1), kk, xa.dtype)


def signed_set_agreement(
    a: torch.Tensor, b: torch.Tensor, k: KValue, *, warn_unsigned: bool = True
) -> torch.Tensor:
    """Signed-set agreement (Ley et al. 2023, after Brunet et al.): 0/1 per pair (ties: a probability).

    ``SSA_k(a, b) = 1`` iff the two top-k sets are the same features with the same signs (order
    ignored), i.e. iff ``SA_k(a, b) = 1``; otherwise 0. Averaged over pairs it is the fraction of
    explanations whose top-k "story" (which features, which direction) is identical. Zeros
    disagree as in SA. Chance level ``1 / (C(D, k) · 2^k)``. Warns when a batch is single-signed.

    Ties: when a tie block straddles position k in either map, the value is the probability
    (over random orders of the tie blocks) that the two top-k sets are equal with agreeing
    signs, so it lies in [0, 1] rather than being 0 or 1: with ``C_x`` the features certainly
    in ``top_k(x)``, ``T_x`` the straddling block of which ``r_x`` make the top-k, and
    ``U = C_a ∪ C_b``, it is ``C(|P|, k - |U|) / (C(|T_a|, r_a) · C(|T_b|, r_b))`` when ``U``
    fits both maps' top-k and agrees in sign (else 0), where ``P`` is the sign-agreeing
    features in both ``T_a`` and ``T_b``. Without such a block it is the plain 0/1 indicator.
    ``SSA_k <= SA_k``, and ``SSA_k = 1`` exactly when ``SA_k = 1``.
    """
    xa, xb = _validate_map_batches(a, b, "signed_set_agreement")
    check_flag(warn_unsigned, "warn_unsigned", where="signed_set_agreement: ")
    if warn_unsigned:
        _warn_if_unsigned(xa, xb, "signed_set_agreement")
    kk = resolve_k(k, xa.shape[1])
    ta, tb = _top_k(xa, kk), _top_k(xb, kk)
    agree = _signs_agree(xa, xb)
    union = ta.certain | tb.certain
    possible_a, possible_b = ta.certain | ta.partial, tb.certain | tb.partial
    blocked = (ta.certain & ~possible_b) | (tb.certain & ~possible_a) | (union & ~agree)
    feasible = ~blocked.any(dim=1)
    need = kk - union.sum(dim=1)
    pool = (ta.partial & tb.partial & agree).sum(dim=1)
    ways, possible = _log_comb_tensor(pool, need)
    ways_a, _ = _log_comb_tensor(ta.pool, ta.pick)
    ways_b, _ = _log_comb_tensor(tb.pool, tb.pick)
    probability = torch.exp(ways - ways_a - ways_b).clamp(0.0, 1.0)
    probability = torch.where(feasible & possible, probability, torch.zeros_like(probability))
    exact = feasible & (need == 0)  # the 0/1 value for rows without a straddling block
    no_ties = (ta.pool == 0) & (tb.pool == 0)
    return torch.where(no_ties, exact.double(), probability).to(xa.dtype)


def consistent_direction(
    a: torch.Tensor, b: torch.Tensor, k: KValue | None = None, *, warn_unsigned: bool = True
) -> torch.Tensor:
    """Consistent direction of contribution (Ley et al. 2023, after Brunet et al.): 0/1 per pair (ties: a probability).

    ``CDC_k(a, b) = 1`` iff ``sign(a_f) = sign(b_f)`` for every ``f ∈ top_k(a) ∩ top_k(b)``
    (vacuously 1 when the top-k sets do not overlap). This is the paper's "any feature that appears
    in the top-k of one model has the same signed value if it appears in the other"; it is the
    least strict of SA/SSA/CDC, which is why the paper reports **top-d CDC**: ``k=None`` (the
    default) means ``k = D``, all features, so CDC = 1 only if no feature flips sign.

    Signs here are compared with ``sign(a_f) == sign(b_f)``, so zero against zero agrees and zero
    against non-zero does not. Unlike SA (a product that must be positive), CDC asks whether a
    feature *reverses* direction; with the SA convention, top-d CDC of a map with itself would be 0
    as soon as the map had one zero pixel. ``SSA_k = 1`` still implies ``CDC_k = 1``.

    Chance level ``E[2^-|top_k(a) ∩ top_k(b)|]`` (hypergeometric overlap), ``2^-D`` for top-d,
    for maps without zeros; zero against zero agrees here, so maps whose top-k sets reach into
    zero regions can score above it (measure the chance on maps of different inputs, as
    :func:`pytest_saliency.agreement_matrix` does). Warns when a batch is single-signed.

    Ties: when a tie block straddles position k in either map, the value is the probability
    (over random orders of the tie blocks) that no feature in both top-k sets flips sign, so it
    lies in [0, 1]. A flipping feature certain in both top-k sets makes it 0; the flipping
    features in a straddling block must be left out of that block's draw: with ``j`` of them
    drawn by ``a`` from the features straddling in both maps, ``b`` must avoid those ``j`` and
    the flips certain in ``a``, a hypergeometric sum over ``j``. Top-d CDC has no straddling
    block, so ties never matter there.
    """
    xa, xb = _validate_map_batches(a, b, "consistent_direction")
    check_flag(warn_unsigned, "warn_unsigned", where="consistent_direction: ")
    if warn_unsigned:
        _warn_if_unsigned(xa, xb, "consistent_direction")
    d = xa.shape[1]
    kk = d if k is None else resolve_k(k, d)
    flips = torch.sign(xa) != torch.sign(xb)
    if kk == d:
        return (~flips.any(dim=1)).to(xa.dtype)
    ta, tb = _top_k(xa, kk), _top_k(xb, kk)
    exact = ~(flips & ta.share.gt(0) & tb.share.gt(0)).any(dim=1)  # the 0/1 value without ties at k
    dead = (flips & ta.certain & tb.certain).any(dim=1)
    avoid_b = (flips & ta.certain & tb.partial).sum(dim=1, keepdim=True)  # b's draw must skip these
    avoid_a = (flips & ta.partial & tb.certain).sum(dim=1, keepdim=True)  # a's draw must skip these
    both = (flips & ta.partial & tb.partial).sum(dim=1, keepdim=True)  # no feature drawn by a and b
    pool_a, pick_a = ta.pool[:, None], ta.pick[:, None]
    pool_b, pick_b = tb.pool[:, None], tb.pick[:, None]
    top_j = int(torch.minimum(both, pick_a).max()) if both.numel() else 0
    j = torch.arange(top_j + 1, device=xa.device)[None, :]  # how many of `both` a draws
    draw_a = _comb_ratio(both, j, torch.zeros_like(both), torch.zeros_like(both)) * _comb_ratio(
        pool_a - avoid_a - both, pick_a - j, pool_a, pick_a
    )
    draw_b = _comb_ratio(pool_b - avoid_b - j, pick_b, pool_b, pick_b)
    probability = (draw_a * draw_b).sum(dim=1).clamp(0.0, 1.0)
    probability = torch.where(dead, torch.zeros_like(probability), probability)
    no_ties = (ta.pool == 0) & (tb.pool == 0)
    return torch.where(no_ties, exact.double(), probability).to(xa.dtype)


def _feature_index(features: Any, a: torch.Tensor, d: int, metric: str) -> torch.Tensor:
    """Resolve ``features`` (None, bool mask over the map or D, or integer indices) to a 1-D index."""
    if features is None:
        index = torch.arange(d, device=a.device)
    else:
        index = _explicit_feature_index(features, a, d, metric)
    if index.numel() < 2:
        raise SaliencyUsageError(
            f"{metric}: needs at least 2 features to form a pair, got {index.numel()}. Select "
            "more features (an empty or one-pixel mask has no pairs to compare)."
        )
    return index


def _explicit_feature_index(features: Any, a: torch.Tensor, d: int, metric: str) -> torch.Tensor:
    map_shape = tuple(a.shape[1:])
    if not isinstance(features, torch.Tensor):
        try:
            features = torch.as_tensor(features)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SaliencyUsageError(
                f"{metric}: features must be a boolean mask over the map or a 1-D sequence of "
                f"feature indices, got {type(features).__name__}."
            ) from exc
    features = features.to(a.device)
    if features.dtype == torch.bool:
        if tuple(features.shape) not in (map_shape, (d,)):
            raise SaliencyUsageError(
                f"{metric}: a boolean features mask must have the shape of one map {map_shape} or "
                f"({d},), got {tuple(features.shape)}. One mask is shared by all N maps; for "
                "per-map feature sets call the metric once per map."
            )
        index = torch.nonzero(features.reshape(-1)).flatten()
    elif not features.is_floating_point() and not features.is_complex():
        if features.dim() != 1:
            raise SaliencyUsageError(
                f"{metric}: feature indices must be a 1-D integer tensor (indices into the "
                f"flattened map of {d} features), got shape {tuple(features.shape)}."
            )
        index = features.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= d):
            raise SaliencyUsageError(
                f"{metric}: feature indices must lie in [0, {d - 1}] (flattened map of {d} "
                f"features), got min {int(index.min())} and max {int(index.max())}."
            )
        if torch.unique(index).numel() != index.numel():
            raise SaliencyUsageError(
                f"{metric}: feature indices contain duplicates; pairs need distinct features. "
                "Pass unique indices (e.g. torch.unique(indices))."
            )
    else:
        raise SaliencyUsageError(
            f"{metric}: features must be a boolean mask or integer indices, got dtype "
            f"{features.dtype}."
        )
    return index


def pairwise_rank_agreement(a: torch.Tensor, b: torch.Tensor, features: Any = None) -> torch.Tensor:
    """Pairwise rank agreement (Krishna et al. 2022) over a feature set F.

    ``PRA(a, b, F) = Σ_{f<g ∈ F} 1[(f ≺_a g) = (f ≺_b g)] / C(|F|, 2)`` where ``f ≺_x g`` means f
    is ranked before g in x: ``|x_f| > |x_g|``. It asks whether the maps agree on *which of two
    features matters more*, for every pair in F - e.g. the features inside an annotated region.
    Ties: a pair with equal magnitudes in either map is ordered at random by the module's tie
    rule, so it agrees with probability 1/2 and counts as half an agreement; a constant map
    scores exactly 0.5 against any map, and a map with ties scores below 1 against itself.

    ``features``: ``None`` (all D features), a boolean mask of one map's shape (or ``(D,)``), or a
    1-D tensor/sequence of distinct flattened indices; shared by all N maps. Needs ``|F| >= 2``.
    Cost is ``O(N · |F|²)`` comparisons, done in chunks of at most ~4 M elements, so keep F to a
    few thousand features (a region, or a union of top-k sets). Chance level 0.5.
    """
    xa, xb = _validate_map_batches(a, b, "pairwise_rank_agreement")
    n, d = xa.shape
    index = _feature_index(features, a, d, "pairwise_rank_agreement")
    m = index.numel()
    ra = _tie_blocks(xa)[0][:, index]  # the first position of each feature's tie block
    rb = _tie_blocks(xb)[0][:, index]
    rows = max(1, _PAIRWISE_CHUNK_ELEMENTS // max(1, n * m))
    cols = torch.arange(m, device=xa.device)
    halves = torch.zeros(n, dtype=torch.long, device=xa.device)  # agreements count 2, ties 1
    for start in range(0, m - 1, rows):
        stop = min(m - 1, start + rows)
        fa, ga = ra[:, start:stop, None], ra[:, None, :]
        fb, gb = rb[:, start:stop, None], rb[:, None, :]
        upper = cols[None, :] > torch.arange(start, stop, device=xa.device)[:, None]
        same = ((fa < ga) & (fb < gb)) | ((fa > ga) & (fb > gb))
        tied = (fa == ga) | (fb == gb)
        halves += 2 * (same & upper).sum(dim=(1, 2)) + (tied & upper).sum(dim=(1, 2))
    return (halves.double() / 2).to(xa.dtype) / (m * (m - 1) // 2)


# --------------------------------------------------------------------------------------------
# Correlations and map similarity
# --------------------------------------------------------------------------------------------


def _resolve_mask(mask: Any, a: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Boolean mask as (D,) (shared) or (N, D) (per map)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SaliencyUsageError(
            "rank_correlation: mask must be a boolean torch.Tensor (True = pixel included), got "
            f"{got}. Build it with e.g. segmentation > 0."
        )
    shape = tuple(mask.shape)
    map_shape = tuple(a.shape[1:])
    mask = mask.to(a.device)
    if shape in (map_shape, (d,)):
        return mask.reshape(d)
    if shape in (tuple(a.shape), (n, d)):
        return mask.reshape(n, d)
    raise SaliencyUsageError(
        f"rank_correlation: mask shape {shape} fits neither one map {map_shape} (or ({d},)), nor "
        f"the batch {tuple(a.shape)} (or ({n}, {d})). Pass one mask for all maps or one per map."
    )


def rank_correlation(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, *, absolute: bool = True
) -> torch.Tensor:
    """Rank correlation within a region (thesis eq. 4.8-4.9; Krishna et al.'s RC).

    ``RC(a, b, m) = r_s(m(rank(a)), m(rank(b)))``: Spearman's correlation of the ranks of the
    pixels selected by the boolean mask ``m`` (e.g. a ground-truth segmentation). Ranking the
    whole map and then masking gives the same value as ranking the masked values (Spearman
    re-ranks), so this is Spearman of the masked values, with average ranks for ties.

    ``absolute=True`` (default) ranks ``|value|``, as Krishna et al. do for importance; the thesis
    does not say, so ``absolute=False`` ranks signed values. ``mask``: ``None`` (all pixels), one
    mask of a map's shape or ``(D,)`` shared by all maps (batched), or one per map, shape
    ``(N, ...)`` (a loop over maps when they differ). Each mask must select at least 2 pixels.
    NaN for a pair whose selected values are constant in either map.
    """
    from .similarity import spearman as _spearman

    xa, xb = _validate_map_batches(a, b, "rank_correlation")
    check_flag(absolute, "absolute", where="rank_correlation: ")
    n, d = xa.shape
    if absolute:
        xa, xb = xa.abs(), xb.abs()
    if mask is None:
        return _spearman(xa, xb)
    m = _resolve_mask(mask, a, n, d)
    counts = m.reshape(-1, d).sum(dim=1)
    if bool((counts < 2).any()):
        rows = torch.nonzero(counts < 2).flatten().tolist()
        where = "the mask" if m.dim() == 1 else f"the mask of map(s) {rows[:10]}"
        raise SaliencyUsageError(
            f"rank_correlation: {where} selects {int(counts.min())} pixel(s); a rank correlation "
            "needs at least 2 (an empty mask usually means a negative case without a "
            "segmentation). Skip those maps or pass mask=None."
        )
    if m.dim() == 2 and bool((m == m[:1]).all()):
        m = m[0]
    if m.dim() == 1:
        return _spearman(xa[:, m], xb[:, m])
    out = torch.empty(n, dtype=xa.dtype, device=xa.device)
    for i in range(n):  # per-map masks select different numbers of pixels
        out[i] = _spearman(xa[i, m[i]][None], xb[i, m[i]][None])[0]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of the flattened **signed** maps (SAM's ``spearmanr(h1, h2, axis=None)``).

    Average ranks for ties; NaN for a constant map. Chance level 0.
    """
    from .similarity import spearman as _spearman

    xa, xb = _validate_map_batches(a, b, "spearman")
    return _spearman(xa, xb)


def spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of ``|a|`` and ``|b|``: agreement on importance, ignoring direction.

    Use it when sign conventions differ between methods (e.g. Saliency with abs=True vs IG).
    Average ranks for ties; NaN for a constant map. Chance level 0.
    """
    from .similarity import spearman as _spearman

    xa, xb = _validate_map_batches(a, b, "spearman_abs")
    return _spearman(xa.abs(), xb.abs())


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the flattened maps; NaN for a constant map. Chance level 0."""
    from .similarity import pearson as _pearson

    xa, xb = _validate_map_batches(a, b, "pearson")
    return _pearson(xa, xb)


def ssim(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean structural similarity of (N, H, W) maps (scikit-image's definition and parameters).

    Keyword arguments go to :func:`pytest_saliency.compare.similarity.structural_similarity`
    (``win_size``, ``gaussian_weights``, ``sigma``, ``data_range``, ``K1``, ``K2``,
    ``use_sample_covariance``). Its value depends on the map pipeline (abs or signed,
    normalisation, ``data_range``), so it has no universal chance level.
    """
    from .similarity import structural_similarity

    _validate_images(a, b, "ssim")
    dtype = _work_dtype(a, b)
    return structural_similarity(a.detach().to(dtype), b.detach().to(dtype), **kwargs)


def hog_pearson(
    a: torch.Tensor,
    b: torch.Tensor,
    pixels_per_cell: tuple[int, int] = (16, 16),
    cells_per_block: tuple[int, int] = (3, 3),
    orientations: int = 9,
    block_norm: str = "L2-Hys",
) -> torch.Tensor:
    """Pearson correlation of the HOG descriptors of two maps (Adebayo et al.; SAM).

    The SAM code calls ``skimage.feature.hog(h, pixels_per_cell=(16, 16))`` with every other
    argument at scikit-image's default (9 orientations, 3x3 cells per block, L2-Hys), then
    ``pearsonr`` of the two feature vectors; those are the defaults here. HOG compares the
    *edge structure* of the maps, so it tolerates small shifts that pixel-wise metrics punish.
    Maps are (N, H, W) and need ``H >= pixels_per_cell[0] * cells_per_block[0]`` (likewise W):
    at least one block. Runs scikit-image per map on the CPU. NaN when a descriptor is constant
    (e.g. a constant map). No universal chance level (HOG features are non-negative and
    correlated even for unrelated maps; SAM estimated its baseline from random maps).
    """
    from skimage.feature import hog

    from .similarity import pearson as _pearson

    _validate_images(a, b, "hog_pearson")
    try:
        ppc = tuple(int(v) for v in pixels_per_cell)
        cpb = tuple(int(v) for v in cells_per_block)
    except (TypeError, ValueError):
        ppc = cpb = ()
    if len(ppc) != 2 or len(cpb) != 2 or min(ppc + cpb) < 1:
        raise SaliencyUsageError(
            f"hog_pearson: pixels_per_cell and cells_per_block must be pairs of positive ints, got "
            f"{pixels_per_cell!r} and {cells_per_block!r}."
        )
    check_count(orientations, "hog_pearson: orientations", minimum=1, hint="SAM uses 9 orientation bins.")
    check_choice(block_norm, "block_norm", ("L1", "L1-sqrt", "L2", "L2-Hys"),
                 "(hog_pearson: scikit-image's block normalisations; its default, and SAM's, is 'L2-Hys'.)")
    h, w = a.shape[1], a.shape[2]
    need_h, need_w = ppc[0] * cpb[0], ppc[1] * cpb[1]
    if h < need_h or w < need_w:
        raise SaliencyUsageError(
            f"hog_pearson: maps of {h}x{w} pixels are smaller than one HOG block of "
            f"{need_h}x{need_w} (pixels_per_cell={ppc} x cells_per_block={cpb}). Use smaller cells, "
            f"e.g. pixels_per_cell=({max(1, h // cpb[0])}, {max(1, w // cpb[1])}), or fewer cells per "
            "block, or upsample the maps."
        )
    na = a.detach().to("cpu", torch.float64).numpy()
    nb = b.detach().to("cpu", torch.float64).numpy()

    def features(maps: Any) -> torch.Tensor:
        return torch.stack(
            [
                torch.from_numpy(
                    hog(
                        m,
                        orientations=orientations,
                        pixels_per_cell=ppc,
                        cells_per_block=cpb,
                        block_norm=block_norm,
                        feature_vector=True,
                    )
                )
                for m in maps
            ]
        )

    r = _pearson(features(na), features(nb))
    return r.to(device=a.device, dtype=_work_dtype(a, b))


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per pixel: ``L1(a, b) = (1/D) Σ_f |a_f - b_f|``.

    The **mean**, not the sum, so the value does not grow with map size and maps of different
    resolutions are comparable. SAM reports its "L1 pixel difference" only as a ratio between
    models (">5x larger"), which is the same under either convention. Lower is better; 0 for
    identical maps. Scale-dependent: compare maps from the same normalisation.
    """
    xa, xb = _validate_map_batches(a, b, "l1_distance")
    return (xa - xb).abs().mean(dim=1)


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit norm, and which rows are all zero.

    Each row is first divided by its max |value| so that squaring cannot underflow (a float32 row
    of 1e-30s has a perfectly good direction) or overflow.
    """
    vmax = x.abs().amax(dim=1, keepdim=True)
    zero = vmax == 0
    scaled = x / torch.where(zero, torch.ones_like(vmax), vmax)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled / torch.where(zero, torch.ones_like(norm), norm), zero.squeeze(1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle between the flattened maps: ``<a, b> / (‖a‖ ‖b‖)``, clamped to [-1, 1].

    Scale-free and sign-aware, unlike a correlation it is not centred (a constant offset
    matters). NaN when either map is all zeros (no direction). Chance level 0 for independent
    maps with symmetric (zero-mean) values.
    """
    xa, xb = _validate_map_batches(a, b, "cosine_similarity")
    ua, za = _unit_rows(xa)
    ub, zb = _unit_rows(xb)
    cos = (ua * ub).sum(dim=1).clamp(-1.0, 1.0)
    return torch.where(za | zb, torch.full_like(cos, float("nan")), cos)


def angular_difference(a: torch.Tensor, b: torch.Tensor, *, degrees: bool = False) -> torch.Tensor:
    """Angle between the flattened maps, ``θ = arccos(cos(a, b))``, in radians (``degrees=True``: degrees).

    Ley et al. 2023 measure disagreement between input gradients as their "angular difference"
    (the unit is not stated; radians are the default here). Computed as
    ``2 · atan2(‖â − b̂‖, ‖â + b̂‖)`` with ``x̂ = x / ‖x‖``, which equals ``arccos`` of the
    clamped cosine but stays accurate near 0 and π (an identical pair gives exactly 0, where
    ``arccos(0.99999994)`` in float32 would give 3e-4). Range [0, π]; lower is better. NaN when
    either map is all zeros. Chance level π/2 for independent maps with symmetric values.
    """
    xa, xb = _validate_map_batches(a, b, "angular_difference")
    check_flag(degrees, "degrees", where="angular_difference: ")
    ua, za = _unit_rows(xa)
    ub, zb = _unit_rows(xb)
    theta = 2.0 * torch.atan2(
        torch.linalg.vector_norm(ua - ub, dim=1), torch.linalg.vector_norm(ua + ub, dim=1)
    )
    if degrees:
        theta = torch.rad2deg(theta)
    return torch.where(za | zb, torch.full_like(theta, float("nan")), theta)


def jensen_shannon_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between maps read as distributions over pixels, base 2.

    Each map is divided by its sum, ``p = a / Σa``, ``q = b / Σb``, ``m = (p + q) / 2``, and
    ``JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``KL(p ‖ m) = Σ_f p_f log2(p_f / m_f)`` and
    ``0 · log 0 = 0``. Base 2 puts it in [0, 1]: 0 for proportional maps, 1 for disjoint support.
    This is the *divergence*; ``scipy.spatial.distance.jensenshannon`` returns its square root.
    Lower is better. Maps must be non-negative (take ``|a|`` first for signed attributions) and not
    all zero.
    """
    xa, xb = _validate_map_batches(a, b, "jensen_shannon_divergence")
    for name, x in (("a", xa), ("b", xb)):
        if bool((x < 0).any()):
            rows = torch.nonzero((x < 0).any(dim=1)).flatten().tolist()
            raise SaliencyUsageError(
                f"jensen_shannon_divergence: argument {name} has negative values (map(s) "
                f"{rows[:10]}), but the JSD treats each map as a distribution over pixels. Pass "
                f"non-negative maps, e.g. {name}.abs() or a magnitude preset."
            )
        if bool((x.sum(dim=1) == 0).any()):
            rows = torch.nonzero(x.sum(dim=1) == 0).flatten().tolist()
            raise SaliencyUsageError(
                f"jensen_shannon_divergence: argument {name} has all-zero map(s) {rows[:10]}, which "
                "cannot be normalised to a distribution. Drop those maps or use l1_distance."
            )
    p = xa / xa.sum(dim=1, keepdim=True)
    q = xb / xb.sum(dim=1, keepdim=True)
    m = 0.5 * (p + q)
    safe_m = torch.where(m > 0, m, torch.ones_like(m))

    def kl(x: torch.Tensor) -> torch.Tensor:
        safe_x = torch.where(x > 0, x, torch.ones_like(x))
        terms = x * (torch.log2(safe_x) - torch.log2(safe_m))
        return torch.where(x > 0, terms, torch.zeros_like(x)).sum(dim=1)

    return (0.5 * (kl(p) + kl(q))).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Chance levels
# --------------------------------------------------------------------------------------------


def _log_comb(n: int, r: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def _need(k: int | None, d: int | None) -> tuple[int, int]:
    """Top-k chance levels need both k and D (chance_level checks this before calling)."""
    if k is None or d is None:
        raise SaliencyUsageError("a top-k chance level needs both k and num_features.")
    return k, d


def _chance_ssa(k: int | None, d: int | None) -> float:
    # P(top-k sets equal) = 1 / C(D, k); then all k signs must agree, each with prob 1/2.
    k, d = _need(k, d)
    return math.exp(-_log_comb(d, k) - k * math.log(2.0))


def _chance_cdc(k: int | None, d: int | None) -> float:
    # The overlap I = |top_k(a) ∩ top_k(b)| is hypergeometric(D, k, k); every shared feature must
    # agree in sign (prob 1/2 each): E[2^-I] = Σ_i P(I = i) 2^-i.
    k, d = _need(k, d)
    total = 0.0
    log_all = _log_comb(d, k)
    for i in range(max(0, 2 * k - d), k + 1):
        total += math.exp(_log_comb(k, i) + _log_comb(d - k, k - i) - log_all - i * math.log(2.0))
    return min(1.0, total)


@dataclass(frozen=True)
class MetricInfo:
    """What a caller (or a report) needs to know about one metric.

    ``chance(k, D)`` returns the expected value for two independent random maps (see
    :func:`chance_level`), or ``None`` when no distribution-free value exists; ``chance_note``
    states the assumption or the reason. ``bounds`` is the range the metric's values can take
    (``(0, π)`` for angular_difference in radians); a threshold outside it would make a gate
    that always passes or always fails.
    """

    name: str
    function: Callable[..., torch.Tensor]
    takes_k: bool
    higher_is_better: bool
    sign_metric: bool
    chance: Callable[[int | None, int | None], float | None]
    chance_note: str
    summary: str
    bounds: tuple[float, float] = (0.0, 1.0)


_SYMMETRIC = (
    "independent maps whose values have symmetric signs (P(+) = P(-) = 1/2, no zeros; zeros disagree, "
    "so they can only lower SA, SRA and SSA)"
)
_UNIFORM = (
    "independent maps with exchangeable features, e.g. i.i.d. values; ties of any kind, zeros and "
    "constant maps included, count by their expectation over random orders of the tie blocks"
)

METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            "feature_agreement", feature_agreement, True, True, False,
            lambda k, d: _need(k, d)[0] / _need(k, d)[1],
            f"k / D: the expected overlap of two uniformly random k-subsets is k^2 / D ({_UNIFORM}).",
            "|top_k(a) ∩ top_k(b)| / k",
        ),
        MetricInfo(
            "sign_agreement", sign_agreement, True, True, True,
            lambda k, d: _need(k, d)[0] / (2 * _need(k, d)[1]),
            f"k / (2D): FA's k / D times P(same sign) = 1/2 ({_SYMMETRIC}).",
            "shared top-k features with the same non-zero sign, / k",
        ),
        MetricInfo(
            "rank_agreement", rank_agreement, True, True, False,
            lambda k, d: 1.0 / _need(k, d)[1],
            f"1 / D: each rank holds the same feature in both maps with probability 1/D ({_UNIFORM}).",
            "ranks i < k holding the same feature, / k",
        ),
        MetricInfo(
            "signed_rank_agreement", signed_rank_agreement, True, True, True,
            lambda k, d: 1.0 / (2 * _need(k, d)[1]),
            f"1 / (2D): RA's 1/D times P(same sign) = 1/2 ({_SYMMETRIC}).",
            "ranks i < k holding the same feature with the same non-zero sign, / k",
        ),
        MetricInfo(
            "pairwise_rank_agreement", pairwise_rank_agreement, False, True, False,
            lambda k, d: 0.5,
            "0.5: for independent maps each pair is ordered the same way with probability 1/2 (a pair "
            "tied in either map counts 1/2).",
            "pairs in F ordered the same way, / C(|F|, 2)",
        ),
        MetricInfo(
            "signed_set_agreement", signed_set_agreement, True, True, True,
            _chance_ssa,
            f"1 / (C(D, k) 2^k): equal top-k sets times k sign matches ({_UNIFORM}; {_SYMMETRIC}).",
            "1 iff the top-k sets and their signs are identical (SA == 1)",
        ),
        MetricInfo(
            "consistent_direction", consistent_direction, True, True, True,
            _chance_cdc,
            "E[2^-I], I = |top_k(a) ∩ top_k(b)| hypergeometric(D, k, k); 2^-D for top-d "
            f"({_UNIFORM}; {_SYMMETRIC}).",
            "1 iff no shared top-k feature flips sign (k=None: all features)",
        ),
        MetricInfo(
            "rank_correlation", rank_correlation, False, True, False,
            lambda k, d: 0.0,
            "0: Spearman's rho of independent maps has expectation 0.",
            "Spearman of |values| (or signed) within a mask",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "ssim", ssim, False, True, False,
            lambda k, d: None,
            "None: SSIM of random maps depends on the value distribution, data_range and window, "
            "i.e. on the map pipeline; estimate it with random maps through the same pipeline.",
            "mean structural similarity of (N, H, W) maps",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "spearman", spearman, False, True, False,
            lambda k, d: 0.0, "0: Spearman's rho of independent maps has expectation 0.",
            "Spearman of signed values",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "spearman_abs", spearman_abs, False, True, False,
            lambda k, d: 0.0, "0: Spearman's rho of independent maps has expectation 0.",
            "Spearman of |values|",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "pearson", pearson, False, True, False,
            lambda k, d: 0.0,
            "0: Pearson's r of independent maps with i.i.d. values has expectation 0.",
            "Pearson of signed values",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "hog_pearson", hog_pearson, False, True, False,
            lambda k, d: None,
            "None: HOG descriptors are non-negative and block-normalised, so unrelated maps "
            "correlate positively by an amount that depends on map size and texture; estimate it "
            "with random maps (as SAM did).",
            "Pearson of HOG descriptors",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "l1_distance", l1_distance, False, False, False,
            lambda k, d: None,
            "None: the mean |a - b| of random maps depends on their value distribution and scale.",
            "mean |a - b| per pixel",
            (0.0, math.inf),
        ),
        MetricInfo(
            "cosine_similarity", cosine_similarity, False, True, False,
            lambda k, d: 0.0,
            "0: for independent maps with symmetric (zero-mean) values the cosine is symmetric "
            "about 0.",
            "<a, b> / (|a| |b|)",
            (-1.0, 1.0),
        ),
        MetricInfo(
            "angular_difference", angular_difference, False, False, False,
            lambda k, d: math.pi / 2,
            "pi/2 radians: for independent maps with symmetric values the cosine is symmetric about "
            "0 and arccos(-c) = pi - arccos(c).",
            "arccos of the cosine similarity (radians)",
            (0.0, math.pi),
        ),
        MetricInfo(
            "jensen_shannon_divergence", jensen_shannon_divergence, False, False, False,
            lambda k, d: None,
            "None: the JSD of random distributions depends on their concentration and on D.",
            "Jensen-Shannon divergence (base 2) of maps normalised to sum 1",
        ),
    )
}


def metric_info(name: Any) -> MetricInfo:
    if not isinstance(name, str) or name not in METRICS:
        raise unknown_choice("metric", name, METRICS)
    return METRICS[name]


@short_usage_errors
def chance_level(metric_name: str, k: KValue | None = None, num_features: int | None = None) -> float | None:
    """Expected value of a metric for two independent random maps, or ``None`` if there is none.

    An agreement is only informative relative to this baseline: FA of 0.10 at the top 10% is
    exactly what two unrelated maps give. Values (D = ``num_features``, k resolved by
    :func:`resolve_k`):

    * feature_agreement ``k/D``; sign_agreement ``k/(2D)``; rank_agreement ``1/D``;
      signed_rank_agreement ``1/(2D)``; pairwise_rank_agreement ``0.5``;
    * signed_set_agreement ``1/(C(D,k) 2^k)``; consistent_direction ``E[2^-I]`` with the overlap
      ``I`` hypergeometric (``2^-D`` for top-d, ``k=None``);
    * rank_correlation, spearman, spearman_abs, pearson, cosine_similarity ``0``;
      angular_difference ``π/2``;
    * ssim, hog_pearson, l1_distance, jensen_shannon_divergence ``None``: they depend on the map
      distribution and pipeline, so estimate them with random maps through the same pipeline.

    Assumptions: maps independent with exchangeable features (every feature equally likely to
    be important, e.g. i.i.d. values), signs symmetric (P(+) = P(-) = 1/2, no zeros) for the sign
    metrics; ``METRICS[name].chance_note`` states each one. Ties do not change these values: the
    top-k metrics count tie blocks by their expectation over random orders (see "Ties" in the
    module docstring), so sparse, quantized and constant maps score these levels too. Maps with
    spatial structure shared by every input (e.g. all maps bright in the centre) agree above them
    even when unrelated: :func:`pytest_saliency.agreement_matrix` therefore also *measures* the
    chance level on maps of different inputs and gates against the stricter of the two. Top-k metrics need
    ``num_features`` and ``k`` (consistent_direction: ``k=None`` means all features).
    """
    info = metric_info(metric_name)
    if not info.takes_k:
        return info.chance(None, num_features)
    if num_features is None:
        raise SaliencyUsageError(
            f"chance_level({metric_name!r}) needs num_features (D, the number of features per map) "
            "because top-k chance levels depend on k / D. Pass e.g. num_features=a[0].numel()."
        )
    if k is None:
        if metric_name != "consistent_direction":
            raise SaliencyUsageError(
                f"chance_level({metric_name!r}) needs k (an int count or a float fraction), the "
                "same k the metric is computed with."
            )
        kk = resolve_k(num_features, num_features)
    else:
        kk = resolve_k(k, num_features)
    return info.chance(kk, int(num_features))


@short_usage_errors
def compute_metric(name: str, a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Compute metric ``name`` (a key of :data:`METRICS`) for each pair ``(a[i], b[i])``.

    Keyword arguments go to the metric (e.g. ``k=0.1`` for top-k metrics, ``mask=`` for
    rank_correlation, ``data_range=`` for ssim). Unknown names and arguments that the metric does
    not take raise :class:`SaliencyUsageError`.
    """
    info = metric_info(name)
    signature = inspect.signature(info.function)
    try:
        signature.bind(a, b, **kwargs)
    except TypeError as exc:
        raise SaliencyUsageError(
            f"metric {name!r} cannot be called with arguments {sorted(kwargs)}: {exc}. Its "
            f"signature is {name}{signature}."
        ) from None
    return info.function(a, b, **kwargs)


def compute_on_valid(name: str, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None,
                     **kwargs: Any) -> torch.Tensor:
    """:func:`compute_metric` of each pair over its row's ``valid`` positions only (token maps
    without their padding). ``valid`` is a boolean tensor with one row per map (None: every
    position); rows with the same number of valid positions are compared in one batch, their
    valid entries taken in order; rows with fewer than two are NaN."""
    if valid is None:
        return compute_metric(name, a, b, **kwargs)
    n = a.shape[0]
    flat_a, flat_b, valid = a.reshape(n, -1), b.reshape(n, -1), valid.reshape(n, -1).to(a.device)
    counts = valid.sum(dim=1)
    out = torch.empty(n, dtype=_work_dtype(a, b), device=a.device)
    out.fill_(float("nan"))  # rows with fewer than two valid positions have no ranking to compare
    for count in counts.unique().tolist():
        if count < 2:
            continue
        rows = torch.nonzero(counts == count).flatten()
        # valid positions first, in their order (a stable sort of the flags)
        index = torch.sort(valid[rows].to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]
        out[rows] = compute_metric(name, flat_a[rows].gather(1, index)[:, None], flat_b[rows].gather(1, index)[:, None],
                                   **kwargs).to(out.dtype)
    return out


def check_metric_options(
    metric_options: Any, metrics: Sequence[str], *, caller_sets_k: bool = False
) -> dict[str, dict[str, Any]]:
    """Per-metric keyword arguments (``{"ssim": {"win_size": 7}}``) checked against ``metrics``,
    the metrics a check computes, before any work is done; returned as a dict of dicts.

    ``None`` is no options. Every name must be among ``metrics`` (options of a metric that is
    not computed would be ignored without a word), every entry a mapping of keyword arguments
    the metric takes (:data:`METRICS`' functions; their values are checked when the metric runs),
    and every metric in ``metrics`` must get its required arguments. ``caller_sets_k``: the check
    passes ``k`` to the top-k metrics itself (from its own ``k`` argument), so the options may not
    set it; otherwise a top-k metric that requires ``k`` must get it from its options.
    """
    if metric_options is None:
        metric_options = {}
    if not isinstance(metric_options, Mapping):
        raise SaliencyUsageError(
            f"metric_options must be a dict mapping a metric name to its options, e.g. "
            f"{{'ssim': {{'win_size': 7}}}}, got {type(metric_options).__name__}."
        )
    metrics = list(metrics)
    unknown = sorted(map(str, set(metric_options) - set(metrics)))
    if unknown:
        raise SaliencyUsageError(
            f"metric_options names {unknown}, which are not among the metrics {metrics}; options of a "
            "metric that is not computed would be silently ignored. Add the metric or remove its options."
        )
    checked = {}
    for name in metrics:  # every metric, so that one missing a required argument (k) is named too
        options = metric_options.get(name, {})
        if not isinstance(options, Mapping):
            raise SaliencyUsageError(
                f"metric_options[{name!r}] must be a dict of keyword arguments for {name}, e.g. "
                f"{{{name!r}: {{...}}}}, got {type(options).__name__} {options!r:.80}."
            )
        info = metric_info(name)
        if caller_sets_k and info.takes_k and "k" in options:
            raise SaliencyUsageError(
                f"metric_options[{name!r}] sets k, which this check passes to every top-k metric from its own "
                "k argument; pass k=... to the check instead."
            )
        signature = inspect.signature(info.function)
        try:
            signature.bind(None, None, **({"k": None} if caller_sets_k and info.takes_k else {}), **options)
        except TypeError as exc:
            given = (f"metric_options[{name!r}] = {dict(options)!r:.120}" if name in metric_options
                     else f"metric {name!r} without metric_options")
            raise SaliencyUsageError(
                f"{given} does not fit the metric: {exc}. Its signature is {name}{signature}."
                + (f" Pass e.g. metric_options={{{name!r}: {{'k': 0.1}}}}." if info.takes_k and not caller_sets_k
                   and "k" not in options else "")
            ) from None
        if name in metric_options:
            checked[name] = dict(options)
    return checked
