"""LR separability (Watson et al.): how well a logistic-regression classifier tells two batches of
maps apart on held-out folds. ``S = 2|M - 0.5|``: 0 when the maps of two models cannot be told
apart, 1 when they always can. scikit-learn does the fitting; the folds are a seeded permutation.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

from ..core.integrity import short_usage_errors
from ..core.torchtools import require_torch
from ..core.validation import check_count, check_seed
from ..exceptions import SaliencyUsageError


@dataclass
class Separability:
    """Held-out accuracy of a classifier telling maps ``a`` (class 0) from maps ``b`` (class 1)."""

    accuracy: float  # M: held-out accuracy over all 2N maps (each predicted exactly once)
    train_accuracy: float  # mean training-fold accuracy: what an in-sample evaluation would report
    fold_accuracies: list[float]
    n_splits: int
    converged: bool = True

    @property
    def separability(self) -> float:
        """S = 2|M - 0.5|: 0 when the maps cannot be told apart, 1 when they always can."""
        return 2.0 * abs(self.accuracy - 0.5)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy, "train_accuracy": self.train_accuracy, "separability": self.separability,
            "fold_accuracies": self.fold_accuracies, "n_splits": self.n_splits, "converged": self.converged,
        }


def _default_classifier(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # scikit-learn's random_state must lie in [0, 2**32): other seeds are taken modulo 2**32.
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=10_000, random_state=seed % 2**32))


def require_sklearn() -> None:
    try:
        importlib.import_module("sklearn")
    except ModuleNotFoundError as exc:  # pragma: no cover - installed in the test environment
        raise ModuleNotFoundError(
            "explanation consistency trains a logistic-regression classifier with scikit-learn: "
            "pip install scikit-learn"
        ) from exc


def _to_numpy_rows(x: Any, name: str) -> Any:
    import numpy as np

    torch = require_torch()
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SaliencyUsageError(
            f"{name} must be a tensor or array of maps of shape (N, ...), got {type(x).__name__} ({error})."
        ) from None
    if x.ndim < 2:
        raise SaliencyUsageError(f"{name} must be a batch of maps of shape (N, ...), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise SaliencyUsageError(f"{name} contain NaN or infinite values; the classifier needs finite maps.")
    return x.reshape(x.shape[0], -1)


def _numpy_seed(seed: int) -> int:
    """numpy's generators take non-negative seeds: a negative one is taken modulo 2**64 (every other
    seed is used as it is)."""
    seed = check_seed(seed)
    return seed if seed >= 0 else seed % 2**64


def fold_assignment(n: int, n_splits: int, seed: int) -> Any:
    """Fold index of each of ``n`` inputs: a seeded permutation dealt round-robin into ``n_splits`` folds."""
    import numpy as np

    order = np.random.default_rng(_numpy_seed(seed)).permutation(n)
    folds = np.empty(n, dtype=np.int64)
    folds[order] = np.arange(n) % n_splits
    return folds


@short_usage_errors
def lr_separability(
    a: Any, b: Any, *, n_splits: int = 5, seed: int = 0, classifier: Any = None
) -> Separability:
    """How well a classifier tells maps ``a[i]`` from ``b[i]``, on held-out inputs.

    ``a`` and ``b`` hold the two models' maps of the **same** N inputs (tensors or arrays of
    shape (N, ...)). Input i's two maps are always in the same fold, so the classifier is never
    tested on a map whose twin it was trained on (see the module docstring). Returns
    :class:`Separability`; ``.accuracy`` is M and ``.separability`` is S = 2|M - 0.5|.
    """
    import numpy as np

    require_sklearn()
    seed = check_seed(seed)
    n_splits = check_count(n_splits, "n_splits", minimum=2, hint="It is the number of cross-validation folds.")
    xa, xb = _to_numpy_rows(a, "maps a"), _to_numpy_rows(b, "maps b")
    if xa.shape != xb.shape:
        raise SaliencyUsageError(
            f"maps a and b must have the same shape (the two models' maps of the same inputs), got "
            f"{xa.shape} and {xb.shape}."
        )
    n = xa.shape[0]
    if n < 2 * n_splits:
        raise SaliencyUsageError(
            f"{n} input(s) are too few for {n_splits}-fold cross-validation: held-out accuracy needs at least "
            f"2 * n_splits = {2 * n_splits} inputs (two per test fold). Pass more inputs, or a smaller n_splits "
            "(n_splits >= 2)."
        )
    template = classifier if classifier is not None else _default_classifier(seed)
    folds = fold_assignment(n, n_splits, seed)
    correct = 0
    fold_acc: list[float] = []
    train_acc: list[float] = []
    converged = True
    with _single_threaded_blas():
        for fold in range(n_splits):
            hits, train_hits, fold_converged = _fit_fold(template, xa, xb, folds, fold)
            converged &= fold_converged
            correct += int(hits.sum())
            fold_acc.append(float(hits.mean()))
            train_acc.append(float(train_hits.mean()))
    return Separability(
        accuracy=correct / (2 * n), train_accuracy=float(np.mean(train_acc)), fold_accuracies=fold_acc,
        n_splits=n_splits, converged=converged,
    )


def _single_threaded_blas() -> Any:
    """One BLAS thread while the classifier fits (restored afterwards).

    The problems are tiny (a few hundred rows), so BLAS threads bring no speed, only
    synchronization, which under CPU contention (pytest-xdist workers, other jobs) dominates a fit.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:  # pragma: no cover - a scikit-learn dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fit_fold(template: Any, xa: Any, xb: Any, folds: Any, fold: int) -> tuple[Any, Any, bool]:
    """Fit a fresh clone on the other folds; return (test hits, training hits, converged)."""
    import numpy as np
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning

    test, train = folds == fold, folds != fold
    x_train = np.concatenate([xa[train], xb[train]])
    y_train = np.concatenate([np.zeros(int(train.sum())), np.ones(int(train.sum()))])
    x_test = np.concatenate([xa[test], xb[test]])
    y_test = np.concatenate([np.zeros(int(test.sum())), np.ones(int(test.sum()))])
    model = clone(template)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.predict(x_test) == y_test, model.predict(x_train) == y_train, converged

