"""The object behind the ``saliency`` fixture: the assertions with the session's configuration.

Each method fills in the configured preset, thresholds and seed (an explicit keyword argument
wins, except that ``--saliency-seed`` forces the seed for every check so that a failure can be
reproduced from the command line), adds the command that reproduces the test, and records the
result for the terminal summary and the JUnit XML.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any

from .config import SaliencyConfig

RESULT_PROPERTY = "saliency_result"


class SaliencyChecker:
    """Bound to one test: ``saliency.assert_sensitive_to_layer_randomization(model, inputs)``."""

    def __init__(
        self,
        config: SaliencyConfig,
        nodeid: str = "",
        record: Callable[[str, str], None] | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        cache: Any = None,
    ) -> None:
        self.config = config
        self.nodeid = nodeid
        self._record = record
        self._progress = progress
        self.cache = cache
        self.results: list[Any] = []

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.config.check_defaults(), **options}
        if self.config.seed is not None:
            merged["seed"] = self.config.seed
        seed = merged.setdefault("seed", 0)
        if self.nodeid:
            merged.setdefault("reproduce", self.reproduce_command(seed))
        if self._progress is not None:
            merged.setdefault("progress", self._progress)
        if self.cache is not None:
            merged.setdefault("cache", self.cache)
        return merged

    def reproduce_command(self, seed: int) -> str:
        """The command line that reruns this test with the same seed, preset and device."""
        from .config import DEFAULT_PRESET

        parts = ["pytest --saliency", f"--saliency-seed={seed}"]
        if self.config.preset != DEFAULT_PRESET:
            parts.append(f"--saliency-preset={self.config.preset}")
        if self.config.device != "auto":
            parts.append(f"--saliency-device={self.config.device}")
        return " ".join(parts + [shlex.quote(self.nodeid)])

    def _store(self, result: Any) -> None:
        """Keep the result and record its one-line summary for the terminal summary and JUnit."""
        self.results.append(result)
        if self._record is not None:
            data = result.to_dict()
            summary = {
                "nodeid": self.nodeid,
                "check": result.check,
                "passed": result.passed,
                "summary": result.summary(),
                **{key: data[key] for key in ("method", "seed", "n_images", "dataset_score", "threshold") if key in data},
            }
            self._record(RESULT_PROPERTY, json.dumps(summary, sort_keys=True, default=str))

    def _run(self, mode: str, model: Any, inputs: Any, method: Any, options: dict[str, Any]) -> Any:
        __tracebackhide__ = True
        from .exceptions import SaliencyCheckFailed
        from .parameter_randomization import layer_randomization

        result = layer_randomization(model, inputs, method, mode=mode, **self._options(options))
        self._store(result)
        if not result.passed:
            raise SaliencyCheckFailed(result.failure_message(), result)
        return result

    def layer_randomization(self, model: Any, inputs: Any, method: Any = "saliency", **options: Any) -> Any:
        """Run the check and return the result without asserting (it is still recorded)."""
        from .parameter_randomization import layer_randomization

        result = layer_randomization(model, inputs, method, **self._options(options))
        self._store(result)
        return result

    def assert_sensitive_to_layer_randomization(
        self, model: Any, inputs: Any, method: Any = "saliency", **options: Any
    ) -> Any:
        """IPR with the session's preset, thresholds and seed; see the free function of the same name."""
        __tracebackhide__ = True
        return self._run("independent", model, inputs, method, options)

    def assert_sensitive_to_cascading_randomization(
        self, model: Any, inputs: Any, method: Any = "saliency", **options: Any
    ) -> Any:
        """CPR with the session's preset, thresholds and seed; see the free function of the same name."""
        __tracebackhide__ = True
        return self._run("cascading", model, inputs, method, options)

    def explain(self, model: Any, inputs: Any, method: Any = "saliency", **options: Any) -> Any:
        """:func:`pytest_saliency.explain` with the session's seed (raw attributions unless preset=)."""
        from .explainers import explain

        if self.config.seed is not None:
            options["seed"] = self.config.seed
        return explain(model, inputs, method, **options)

    def agreement_matrix(self, model: Any, inputs: Any, methods: Any = ("saliency", "integrated_gradients"),
                         metrics: Any = ("feature_agreement", "sign_agreement", "rank_correlation", "ssim"),
                         **options: Any) -> Any:
        """:func:`pytest_saliency.agreement_matrix` with the session's preset and seed (recorded, not asserted)."""
        from .agreement import agreement_matrix

        result = agreement_matrix(model, inputs, methods, metrics, **self._common(options))
        self._store(result)
        return result

    def assert_agreement_above(self, model: Any, inputs: Any, methods: Any = ("saliency", "integrated_gradients"),
                               metric: str = "feature_agreement", k: Any = 0.1, threshold: Any = None,
                               **options: Any) -> Any:
        """:func:`pytest_saliency.assert_agreement_above` with the session's preset and seed."""
        __tracebackhide__ = True
        from .assertions import assert_agreement_above
        from .exceptions import SaliencyCheckFailed

        try:
            result = assert_agreement_above(model, inputs, methods, metric, k, threshold, **self._common(options))
        except SaliencyCheckFailed as failure:
            self._store(failure.result)
            raise
        self._store(result)
        return result

    def _common(self, options: dict[str, Any]) -> dict[str, Any]:
        """Preset, seed and reproduce line for checks other than the randomization tests."""
        merged = {"preset": self.config.preset, **options}
        if self.config.seed is not None:
            merged["seed"] = self.config.seed
        if self.nodeid:
            merged.setdefault("reproduce", self.reproduce_command(merged.get("seed", 0)))
        return merged


class BaselineChecker:
    """Behind the ``saliency_baseline`` fixture: one stored baseline per test and name."""

    def __init__(self, checker: SaliencyChecker, directory: Any, update: bool,
                 written: Callable[[str], None] | None = None) -> None:
        self._checker = checker
        self.directory = directory
        self.update = update
        self._written = written

    def path(self, name: str | None = None) -> Any:
        from .baseline import baseline_path

        return baseline_path(self.directory, self._checker.nodeid, name)

    def check(self, model: Any, inputs: Any, method: Any = "saliency", name: str | None = None,
              metric: str = "ssim", threshold: float | None = None, **options: Any) -> Any:
        """Compare with the stored baseline (written, and failing, when it is missing)."""
        __tracebackhide__ = True
        from .baseline import check_baseline
        from .exceptions import SaliencyCheckFailed

        path = self.path(name)
        result = check_baseline(
            model, inputs, path, method, metric=metric, threshold=threshold, update=self.update,
            name=name or "", **self._checker._common(options),
        )
        if result.status in ("written", "updated") and self._written is not None:
            self._written(str(path))
        self._checker._store(result)
        if not result.passed:
            raise SaliencyCheckFailed(result.failure_message(), result)
        return result
