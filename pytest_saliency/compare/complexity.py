"""Explanation complexity: the discrete entropy of each map's histogram (efficient MPRT's measure).

Hedström et al.'s efficient MPRT ("Sanity Checks Revisited") scores how much more complex an
explanation becomes when the model is randomized. Complexity is the Shannon entropy of the
histogram of a map's values, as Quantus's ``discrete_entropy`` computes it
(``np.histogram(a, bins=n_bins)`` then ``scipy.stats.entropy``). :func:`discrete_entropy` computes
it for a whole batch of maps at once, on their device:

* **Bins.** Each map is binned over its own range ``[min, max]`` into ``n_bins`` equal-width bins,
  numpy's rule exactly: bin ``i`` holds ``edges[i] <= v < edges[i + 1]`` and the last bin is
  closed (it holds the maximum). The edges are computed as ``np.linspace`` computes them, in the
  maps' floating-point type (float32 maps get float32 edges, as numpy gives them), and numpy's
  one-ulp corrections of the bin index are applied, so the counts equal ``np.histogram``'s.
  Half-precision maps are binned in float32.
* **Entropy.** ``-sum(p * ln p)`` over the non-empty bins, ``p`` = count / number of values: in
  nats (natural log, as ``scipy.stats.entropy``), at most ``ln(min(n_bins, values))``.
* **Constant maps** have a single occupied bin, so entropy 0 (numpy widens a zero range to
  ``[v - 0.5, v + 0.5]``: the same single bin). Checks that divide by an entropy refuse or skip
  such maps themselves.
* **Padding.** ``valid`` (a boolean mask shaped like the maps) keeps only the positions that count
  (text padding left out): the range, the counts and the number of values are those of the valid
  positions. A map with no valid position has entropy 0.
* **Bin-count rules.** ``bins`` is a number of bins, or a rule that gives one from the number of
  values ``n`` of each map (its valid positions): ``"sturges"`` ``ceil(log2 n + 1)``, ``"rice"``
  ``ceil(2 n^(1/3))``, ``"sqrt"`` ``ceil(sqrt n)``. Rules that read the values' spread
  (Freedman-Diaconis, Scott) are not offered: they would give a map and its randomized
  counterpart different numbers of bins, and entropy grows with the number of bins, so the
  change in entropy would partly measure the change in bin count. (Quantus 0.6.0's rules use
  ``n = a_batch[0].ndim``, the number of axes, instead of the number of values, and one bin
  count for the whole data set; with no rule it uses 100 bins, the default here.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..core.torchtools import require_torch
from ..core.validation import check_count, unknown_choice
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch

#: The default number of bins (Quantus's ``discrete_entropy``).
N_BINS = 100
#: Bin-count rules by the number of values of a map.
BIN_RULES = ("sturges", "rice", "sqrt")


def _rule_bins(rule: str, n: int) -> int:
    """The number of bins ``rule`` gives for ``n`` values (at least 1), in exact arithmetic where
    it matters: a perfect square or cube gets its root, not one more."""
    n = max(int(n), 1)
    if rule == "sturges":
        # ceil(log2 n + 1) = bit length of n - 1, plus 1 (exact for powers of two)
        return (n - 1).bit_length() + 1
    if rule == "sqrt":
        return math.isqrt(n - 1) + 1  # ceil(sqrt n)
    # rice: ceil(2 n^(1/3)) = the smallest k with k^3 >= 8 n
    k = max(1, math.ceil(2 * n ** (1.0 / 3.0)) - 1)
    while k**3 < 8 * n:
        k += 1
    while k > 1 and (k - 1) ** 3 >= 8 * n:
        k -= 1
    return k


def bin_counts(bins: int | str, n_values: Any) -> Any:
    """The number of bins of each map: ``bins`` itself, or the rule's count for each map's number
    of values (a sequence or tensor of counts; returns a long tensor of the same length)."""
    torch = require_torch()
    counts = torch.as_tensor(n_values).reshape(-1).long().cpu()
    if isinstance(bins, str):
        if bins not in BIN_RULES:
            raise unknown_choice("bins", bins, BIN_RULES, "Or pass a number of bins, e.g. bins=100.")
        table = {n: _rule_bins(bins, n) for n in set(counts.tolist())}
        return torch.tensor([table[n] for n in counts.tolist()], dtype=torch.long)
    n_bins = check_count(bins, "bins", hint="It is the number of equal-width bins of each map's histogram, "
                                           f"e.g. {N_BINS}, or a rule: {', '.join(BIN_RULES)}.")
    return torch.full((counts.numel(),), n_bins, dtype=torch.long)


def _flat(maps: Any, valid: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    torch = require_torch()
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() < 1 or maps.shape[0] < 1:
        raise SaliencyUsageError(f"maps must have shape (N, ...) with N >= 1, got {tuple(maps.shape)}.")
    if not maps.is_floating_point():
        maps = maps.double()
    elif maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()  # half precision: binned in float32
    flat = maps.reshape(maps.shape[0], -1)
    if flat.shape[1] == 0:
        raise SaliencyUsageError(f"maps must have at least one value each, got shape {tuple(maps.shape)}.")
    if not bool(torch.isfinite(flat).all()):
        raise SaliencyUsageError("maps contain NaN or inf; the histogram of a map needs finite values.")
    if valid is None:
        return flat, None
    mask = torch.as_tensor(valid, device=flat.device)
    if mask.numel() != flat.numel():
        raise SaliencyUsageError(
            f"valid must have one entry per map position, shape {tuple(maps.shape)}; got {tuple(mask.shape)}.")
    return flat, mask.reshape(flat.shape).bool()


def _edges(low: torch.Tensor, high: torch.Tensor, n: torch.Tensor, width: int) -> torch.Tensor:
    """``np.linspace(low, high, n + 1)`` per row (positions past ``n`` are unused), in the rows' dtype."""
    torch = require_torch()
    delta = high - low
    n_f = n.to(delta.dtype)[:, None]
    step = delta / n_f
    j = torch.arange(width + 1, dtype=delta.dtype, device=delta.device)[None, :]
    # numpy multiplies by the step, or, when the step underflows to 0, divides first
    y = torch.where(step == 0, (j / n_f) * delta, j * step) + low
    last = torch.arange(width + 1, device=delta.device)[None, :] == n.to(delta.device)[:, None]
    return torch.where(last, high.expand_as(y), y)


def histogram_counts(maps: Any, bins: int | str = N_BINS, *, valid: Any = None) -> torch.Tensor:
    """``(N, max bins)`` float64 counts of each map's histogram (numpy's bins; module docstring).

    Columns past a map's own number of bins (with a rule) are 0.
    """
    torch = require_torch()
    flat, mask = _flat(maps, valid)
    inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
    if mask is None:
        low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        n_values = torch.full((flat.shape[0],), flat.shape[1], dtype=torch.long)
    else:
        low = torch.where(mask, flat, inf).amin(dim=1, keepdim=True)
        high = torch.where(mask, flat, -inf).amax(dim=1, keepdim=True)
        n_values = mask.sum(dim=1).cpu()
    n = bin_counts(bins, n_values).to(flat.device)
    width = int(n.max())
    # A constant map (or one with a single valid position) is binned as numpy bins it, over
    # [v - 0.5, v + 0.5]; a map with no valid position over [-0.5, 0.5], with no counts.
    constant = ~(high > low)
    centre = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    low = torch.where(constant, centre - 0.5, low)
    high = torch.where(constant, centre + 0.5, high)
    spread = high > low  # False only where v +- 0.5 rounds to v (huge values): one bin
    high = torch.where(spread, high, low + 1)
    clean = flat if mask is None else torch.where(mask, flat, low)  # padding stands at the low end
    n_col = n[:, None]
    index = (((clean - low) / (high - low)) * n_col.to(flat.dtype)).long()
    index = torch.where(index == n_col, index - 1, index).clamp(0, width - 1)
    edges = _edges(low, high, n, width)
    index = torch.where(clean < edges.gather(1, index), index - 1, index)  # numpy's one-ulp corrections
    index = torch.where((clean >= edges.gather(1, index + 1)) & (index != n_col - 1), index + 1, index)
    index = torch.where(spread, index, torch.zeros_like(index))
    weights = torch.ones_like(clean, dtype=torch.float64) if mask is None else mask.to(torch.float64)
    counts = torch.zeros(flat.shape[0], width, dtype=torch.float64, device=flat.device)
    return counts.scatter_add_(1, index, weights)


def entropy_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of histogram counts (``scipy.stats.entropy(pk=row)``);
    0 for a row with no counts."""
    torch = require_torch()
    counts = counts.double()
    total = counts.sum(dim=1, keepdim=True)
    p = counts / torch.where(total > 0, total, torch.ones_like(total))
    return -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))).sum(dim=1)


def discrete_entropy(maps: Any, bins: int | str = N_BINS, *, valid: Any = None) -> torch.Tensor:
    """The entropy (nats) of each map's histogram, a float64 tensor of shape (N,): see the module
    docstring. ``maps`` (N, ...) are binned each over its own range; ``bins`` is a number of bins
    (default 100) or a rule (``"sturges"``, ``"rice"``, ``"sqrt"``); ``valid`` masks padding."""
    return entropy_of_counts(histogram_counts(maps, bins, valid=valid))


def max_entropy(bins: int | str, n_values: int) -> float:
    """The largest entropy a map of ``n_values`` values can have with ``bins``: every occupied bin
    equally full, ``ln(min(bins, n_values))``."""
    n_bins = int(bin_counts(bins, [n_values])[0])
    return math.log(max(1, min(n_bins, int(n_values))))


__all__ = ["BIN_RULES", "N_BINS", "bin_counts", "discrete_entropy", "entropy_of_counts", "histogram_counts",
           "max_entropy"]
