"""The object behind the ``saliency`` fixture: the library's checks with the session's configuration.

Each method fills in the configured preset, thresholds and seed (an explicit keyword argument
wins, except that ``--saliency-seed`` forces the seed for every check so that a failure can be
reproduced from the command line), adds the command that reproduces the test, records the result
for the terminal summary and the JUnit XML, writes the report entry (figures included) when a
report was asked for, and points the failure message at it. :meth:`SaliencyChecker.record`
does the recording for a result computed elsewhere (a user's own check). Results are read
through the :class:`~pytest_saliency.reporting.protocol.CheckResult` protocol only.

Torch-free at import: the checks are imported when a method runs.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.integrity import short_usage_errors
from ..reporting.protocol import CheckResult
from .config import SaliencyConfig

if TYPE_CHECKING:
    import torch

    from ..checks.agreement import AgreementResult
    from ..checks.consistency import ConsistencyResult, SeedStabilityResult
    from ..checks.data_randomization import DataRandomizationResult
    from ..checks.efficient_randomization import EfficientRandomizationResult
    from ..checks.faithfulness import AccuracySpread
    from ..checks.input_shift import InputShiftResult
    from ..checks.random_logit import RandomLogitResult
    from ..checks.randomization import RandomizationResult
    from ..checks.regression import BaselineResult
    from ..checks.smooth_randomization import SmoothRandomizationResult
    from ..checks.sweeps import SweepResult
    from ..core.stream import Inputs

RESULT_PROPERTY = "saliency_result"
#: What the input-noise checks' progress counts: one explanation of the clean inputs, then one
#: of each noisy copy (each noise level times its draws); the step's label says which.
NOISE_STEPS = "noise draws"
R = TypeVar("R", bound=CheckResult)


class SaliencyChecker:
    """Bound to one test: ``saliency.assert_sensitive_to_layer_randomization(model, inputs)``."""

    def __init__(
        self,
        config: SaliencyConfig,
        nodeid: str = "",
        record: Callable[[str, str], None] | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        cache: Any = None,
        report: Callable[..., str | None] | None = None,
        model_cache: Any = None,
    ) -> None:
        self.config = config
        self.nodeid = nodeid
        self._record = record
        self._progress = progress
        self._report = report
        self.cache = cache
        self.model_cache = model_cache
        self.results: list[CheckResult] = []
        self.model_call: dict[str, Any] = {}

    # -- configuration -----------------------------------------------------------------------

    def reproduce_command(self, seed: int) -> str:
        """The command line that reruns this test with the same seed, preset and device."""
        from .config import DEFAULT_PRESET

        parts = ["pytest --saliency", f"--saliency-seed={seed}"]
        if self.config.preset != DEFAULT_PRESET:
            parts.append(f"--saliency-preset={self.config.preset}")
        if self.config.device != "auto":
            parts.append(f"--saliency-device={self.config.device}")
        return " ".join(parts + [shlex.quote(self.nodeid)])

    def set_model_call(self, output: Any = None, forward_kwargs: Any = None, modality: Any = None) -> SaliencyChecker:
        """Make ``output=``, ``forward_kwargs=`` and ``modality=`` (how the model is called and what
        its inputs are, see :mod:`pytest_saliency.core.forward`) the default of every check this
        test runs; a check's own options win. Returns the checker, for a ``saliency`` fixture
        override in conftest.py."""
        self.model_call = {"output": output, "forward_kwargs": forward_kwargs, "modality": modality}
        return self

    def _common(self, options: dict[str, Any]) -> dict[str, Any]:
        """Preset, seed and reproduce line: what every check takes from the session."""
        merged = {"preset": self.config.preset, **self.model_call, **options}
        if self.config.seed is not None:
            merged["seed"] = self.config.seed
        if self.nodeid:
            merged.setdefault("reproduce", self.reproduce_command(merged.get("seed", 0)))
        return merged

    def _randomization(self, options: dict[str, Any]) -> dict[str, Any]:
        """The randomization checks also take the thresholds, the progress line and the map cache."""
        merged = self._common({"ssim_threshold": self.config.ssim_threshold,
                               "sensitivity_threshold": self.config.sensitivity_threshold, **options})
        merged.setdefault("seed", 0)
        self._with_progress(merged, "randomized states")
        if self.cache is not None:
            merged.setdefault("cache", self.cache)
        return merged

    def _with_progress(self, options: dict[str, Any], unit: str) -> dict[str, Any]:
        """Add this session's progress reporter to ``options`` (an explicit ``progress=`` wins).

        The plugin's reporter gets a fresh one per check counting ``unit`` (its clock and ETA
        start with the check); a plain callable is passed as is.
        """
        if self._progress is not None and "progress" not in options:
            named = getattr(self._progress, "named", None)
            options["progress"] = named(unit) if callable(named) else self._progress
        return options

    # -- recording -----------------------------------------------------------------------------

    def _store(self, result: CheckResult, raised: bool = False) -> str | None:
        """Keep the result, record it for the summary and JUnit, write its report entry.

        The terminal summary gets the check, its verdict and ``summary()`` line (with the method
        and seed of ``numbers()``); the JUnit XML gets ``saliency.<check>.passed`` and one
        property per defined number of ``numbers()``. ``raised`` says that the check raises
        ``SaliencyCheckFailed`` (a test that passes anyway caught it: a control). Returns the
        report link for a failure message, when a report is being written.
        """
        self.results.append(result)
        if self._record is not None:
            numbers = result.numbers()
            summary: dict[str, Any] = {"nodeid": self.nodeid, "check": result.check, "passed": result.passed,
                       "summary": result.summary(), **{k: numbers[k] for k in ("method", "seed") if k in numbers}}
            if raised:
                summary["raised"] = True
            self._record(RESULT_PROPERTY, json.dumps(summary, sort_keys=True, default=str))
            self._record(f"saliency.{result.check}.passed", str(bool(result.passed)))
            for key, value in numbers.items():
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    self._record(f"saliency.{result.check}.{key}", str(value))
        if self._report is None:
            return None
        return self._report(result, raised=True) if raised else self._report(result)

    def _checked(self, run: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run an asserting library call; record its result whether it passes or fails."""
        __tracebackhide__ = True
        from ..exceptions import SaliencyCheckFailed

        try:
            result = run(*args, **kwargs)
        except SaliencyCheckFailed as failure:
            link = self._store(failure.result, raised=True) if failure.result is not None else None
            if link:
                raise SaliencyCheckFailed(f"{failure}\n  pictures:    {link}", failure.result) from None
            raise
        link = self._store(result, raised=not result.passed)
        if not result.passed:  # results whose library call does not raise (e.g. a written baseline)
            message = result.failure_message() + (f"\n  pictures:    {link}" if link else "")
            raise SaliencyCheckFailed(message, result)
        return result

    def _measured(self, result: R) -> R:
        self._store(result)
        return result

    @short_usage_errors
    def record(self, result: R) -> R:
        """Record a result computed outside this fixture, as its own methods record theirs.

        ``result`` is any object implementing
        :class:`~pytest_saliency.reporting.protocol.CheckResult` (no base class needed): a result
        of your own check, or of a library function this fixture has no method for. It reaches
        the terminal summary, the JUnit XML properties and, when a report is asked for, the JSON
        and HTML report (figures included). Recording is not asserting: a failing result is
        reported as failed, and the test fails only if it asserts, e.g.
        ``assert result.passed, result.failure_message()``. Returns ``result``.

        Raises :class:`~pytest_saliency.exceptions.SaliencyUsageError` when ``result`` lacks a
        member of the protocol.
        """
        from ..reporting.protocol import missing_members

        missing = missing_members(result)
        if missing:
            from ..exceptions import SaliencyUsageError

            raise SaliencyUsageError(
                f"saliency.record() takes a result implementing pytest_saliency.reporting.protocol.CheckResult; "
                f"{type(result).__name__} lacks {', '.join(missing)}."
            )
        return self._measured(result)

    # -- the checks ------------------------------------------------------------------------------

    def _efficient(self, options: dict[str, Any]) -> dict[str, Any]:
        """eMPRT takes the session's preset, seed, progress and map cache (not the SSIM thresholds)."""
        merged = self._common(options)
        merged.setdefault("seed", 0)
        self._with_progress(merged, "model states")
        if self.cache is not None:
            merged.setdefault("cache", self.cache)
        return merged

    @short_usage_errors
    def efficient_randomization(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency",
                                **options: Any) -> EfficientRandomizationResult:
        """Efficient MPRT (eMPRT, the fast gate), recorded, not asserted."""
        from ..checks.efficient_randomization import efficient_randomization

        return self._measured(efficient_randomization(model, inputs, method, **self._efficient(options)))

    def assert_efficient_randomization(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency",
                                       **options: Any) -> EfficientRandomizationResult:
        """eMPRT with the session's preset and seed; see the free function of the same name."""
        __tracebackhide__ = True
        from ..checks.efficient_randomization import assert_efficient_randomization as check

        return self._checked(check, model, inputs, method, **self._efficient(options))

    def _smooth(self, options: dict[str, Any]) -> dict[str, Any]:
        """The randomization checks' session options, less the map cache (smoothed maps are not cached)."""
        merged = self._randomization(options)
        if "cache" not in options:
            merged.pop("cache", None)
        return merged

    @short_usage_errors
    def smooth_randomization(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency",
                             **options: Any) -> SmoothRandomizationResult:
        """Run Smooth MPRT and return the result without asserting (it is still recorded)."""
        from ..checks.smooth_randomization import smooth_randomization

        return self._measured(smooth_randomization(model, inputs, method, **self._smooth(options)))

    def assert_sensitive_to_smooth_randomization(self, model: torch.nn.Module, inputs: Inputs,
                                                 method: Any = "saliency", **options: Any) -> SmoothRandomizationResult:
        """Smooth MPRT with the session's preset, thresholds and seed; see the free function of the same name."""
        __tracebackhide__ = True
        from ..checks.smooth_randomization import assert_sensitive_to_smooth_randomization as check

        return self._checked(check, model, inputs, method, **self._smooth(options))

    def _paired(self, options: dict[str, Any]) -> dict[str, Any]:
        """Random logit and data randomization: the session's preset, seed, reproduce line and the
        randomization thresholds (their verdict reads them as IPR's does); no progress line."""
        merged = self._common({"ssim_threshold": self.config.ssim_threshold,
                               "sensitivity_threshold": self.config.sensitivity_threshold, **options})
        merged.setdefault("seed", 0)
        return merged

    def _random_logit(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = self._paired(options)
        if self.cache is not None:
            merged.setdefault("cache", self.cache)
        return merged

    def _data_randomization(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = self._paired(options)
        if self.model_cache is not None:
            merged.setdefault("cache", self.model_cache)
        if self.cache is not None:
            merged.setdefault("map_cache", self.cache)
        return merged

    @short_usage_errors
    def random_logit(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency",
                     **options: Any) -> RandomLogitResult:
        """Random logit (Sixt et al.) without asserting (it is still recorded)."""
        from ..checks.random_logit import random_logit

        return self._measured(random_logit(model, inputs, method, **self._random_logit(options)))

    def assert_sensitive_to_random_logit(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency",
                                         **options: Any) -> RandomLogitResult:
        """The target class's maps must differ from a random other class's."""
        __tracebackhide__ = True
        from ..checks.random_logit import assert_sensitive_to_random_logit as check

        return self._checked(check, model, inputs, method, **self._random_logit(options))

    @short_usage_errors
    def data_randomization(self, train: Any, inputs: Inputs, method: Any = "saliency",
                           **options: Any) -> DataRandomizationResult:
        """Data randomization (Adebayo et al.) without asserting; models from the session's model cache."""
        from ..checks.data_randomization import data_randomization

        return self._measured(data_randomization(train, inputs, method, **self._data_randomization(options)))

    def assert_sensitive_to_data_randomization(self, train: Any, inputs: Inputs, method: Any = "saliency",
                                               **options: Any) -> DataRandomizationResult:
        """The permuted-label model's maps must differ from the real model's; models trained once and cached."""
        __tracebackhide__ = True
        from ..checks.data_randomization import assert_sensitive_to_data_randomization as check

        return self._checked(check, train, inputs, method, **self._data_randomization(options))

    @short_usage_errors
    def input_shift_invariance(self, model: torch.nn.Module, inputs: Inputs,
                               method: Any = "saliency", **options: Any) -> InputShiftResult:
        """Run the input-shift invariance check and return the result without asserting (it is still recorded)."""
        from ..checks.input_shift import input_shift_invariance

        return self._measured(input_shift_invariance(model, inputs, method, **self._common(options)))

    def assert_input_shift_invariant(
        self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency", **options: Any
    ) -> InputShiftResult:
        """Input-shift invariance (Kindermans et al.) with the session's preset and seed; see the free function."""
        __tracebackhide__ = True
        from ..checks.input_shift import assert_input_shift_invariant as check

        return self._checked(check, model, inputs, method, **self._common(options))

    @short_usage_errors
    def layer_randomization(self, model: torch.nn.Module, inputs: Inputs,
                            method: Any = "saliency", **options: Any) -> RandomizationResult:
        """Run a randomization check and return the result without asserting (it is still recorded)."""
        from ..checks.randomization import layer_randomization

        return self._measured(layer_randomization(model, inputs, method, **self._randomization(options)))

    def assert_sensitive_to_layer_randomization(
        self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency", **options: Any
    ) -> RandomizationResult:
        """IPR with the session's preset, thresholds and seed; see the free function of the same name."""
        __tracebackhide__ = True
        from ..checks.assertions import assert_sensitive_to_layer_randomization as check

        return self._checked(check, model, inputs, method, **self._randomization(options))

    def assert_sensitive_to_cascading_randomization(
        self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency", **options: Any
    ) -> RandomizationResult:
        """CPR with the session's preset, thresholds and seed; see the free function of the same name."""
        __tracebackhide__ = True
        from ..checks.assertions import assert_sensitive_to_cascading_randomization as check

        return self._checked(check, model, inputs, method, **self._randomization(options))

    @short_usage_errors
    def explain(self, model: torch.nn.Module, inputs: torch.Tensor,
                method: Any = "saliency", **options: Any) -> torch.Tensor:
        """:func:`pytest_saliency.explain` with the session's seed (raw attributions unless preset=)."""
        from ..maps.explainers import explain

        options = {**self.model_call, **options}
        if self.config.seed is not None:
            options["seed"] = self.config.seed
        return explain(model, inputs, method, **options)

    @short_usage_errors
    def agreement_matrix(self, model: torch.nn.Module, inputs: Inputs,
                         methods: Any = ("saliency", "integrated_gradients"),
                         metrics: Any = ("feature_agreement", "sign_agreement", "rank_correlation", "ssim"),
                         **options: Any) -> AgreementResult:
        """:func:`pytest_saliency.agreement_matrix` with the session's preset and seed (recorded, not asserted)."""
        from ..checks.agreement import agreement_matrix

        return self._measured(agreement_matrix(model, inputs, methods, metrics,
                                               **self._with_progress(self._common(options), "methods")))

    def assert_agreement_above(self, model: torch.nn.Module, inputs: Inputs,
                               methods: Any = ("saliency", "integrated_gradients"),
                               metric: str = "feature_agreement", k: Any = 0.1, threshold: Any = None,
                               **options: Any) -> AgreementResult:
        """:func:`pytest_saliency.assert_agreement_above` with the session's preset and seed."""
        __tracebackhide__ = True
        from ..checks.assertions import assert_agreement_above as check

        return self._checked(check, model, inputs, methods, metric, k, threshold,
                             **self._with_progress(self._common(options), "methods"))


    @short_usage_errors
    def explanation_consistency(self, models: Any, inputs: Inputs,
                                method: Any = "saliency", **options: Any) -> ConsistencyResult:
        """:func:`pytest_saliency.explanation_consistency` with the session's preset and seed (recorded)."""
        from ..checks.consistency import explanation_consistency

        return self._measured(explanation_consistency(models, inputs, method, **self._common(options)))

    def assert_seed_consistency_above(self, models_or_factory: Any, inputs: Inputs, threshold: Any = None,
                                      metric: str = "lr_separability", **options: Any) -> ConsistencyResult:
        """Retrained models must explain alike; models a factory trains come from ``saliency_model_cache``."""
        __tracebackhide__ = True
        from ..checks.consistency import assert_seed_consistency_above as check

        options = self._common(options)
        if self.model_cache is not None:
            options.setdefault("cache", self.model_cache)
        self._with_progress(options, "seeds trained or loaded")
        return self._checked(check, models_or_factory, inputs, threshold, metric, **options)

    def assert_explainer_seed_stable(self, model: torch.nn.Module, inputs: Inputs,
                                     method: Any, seeds: Any = (0, 1, 2),
                                     metric: str = "ssim", threshold: Any = None,
                                     **options: Any) -> SeedStabilityResult:
        """The method's own randomness: same seed, same maps; other seeds, similar maps."""
        __tracebackhide__ = True
        from ..checks.consistency import assert_explainer_seed_stable as check

        # No session seed here: the seeds under test are the point of the check.
        options = {"preset": self.config.preset, **self.model_call, **options}
        if self.nodeid:
            options.setdefault("reproduce", self.reproduce_command(0))
        return self._checked(check, model, inputs, method, seeds, metric, threshold, **options)


    def _sweeps(self, options: dict[str, Any], unit: str = "settings") -> dict[str, Any]:
        """The sweep checks' options; ``unit`` is what their progress counts (the sweep's settings)."""
        merged = self._with_progress(self._common(options), unit)
        if self.cache is not None:
            merged.setdefault("cache", self.cache)
        return merged

    @short_usage_errors
    def hyperparameter_sweep(self, model: torch.nn.Module, inputs: Inputs,
                             method: Any = "smoothgrad", sweep: Any = None,
                             reference: Any = None, **options: Any) -> SweepResult:
        """SAM's sweep protocol with the session's preset and seed (recorded, not asserted)."""
        from ..checks.sweeps import hyperparameter_sweep

        return self._measured(hyperparameter_sweep(model, inputs, method, sweep, reference, **self._sweeps(options)))

    def assert_stable_under_hyperparameters(self, model: torch.nn.Module, inputs: Inputs,
                                            method: Any = "smoothgrad",
                                            sweep: Any = None, reference: Any = None,
                                            **options: Any) -> SweepResult:
        """Every swept value's mean similarity to the reference must reach ``threshold``."""
        __tracebackhide__ = True
        from ..checks.sweeps import assert_stable_under_hyperparameters as check

        return self._checked(check, model, inputs, method, sweep, reference, **self._sweeps(options))

    @short_usage_errors
    def input_noise_stability(self, model: torch.nn.Module, inputs: Inputs,
                              method: Any = "saliency", **options: Any) -> SweepResult:
        """Maps of x against maps of x + noise (SAM 4.1), recorded, not asserted."""
        from ..checks.input_noise import input_noise_stability

        return self._measured(input_noise_stability(model, inputs, method, **self._sweeps(options, NOISE_STEPS)))

    def assert_stable_under_input_noise(self, model: torch.nn.Module, inputs: Inputs,
                                        method: Any = "saliency", **options: Any) -> SweepResult:
        """Maps of x and of noisy x must be similar (SAM's variance-0.1 convention by default)."""
        __tracebackhide__ = True
        from ..checks.input_noise import assert_stable_under_input_noise as check

        return self._checked(check, model, inputs, method, **self._sweeps(options, NOISE_STEPS))

    @short_usage_errors
    def accuracy_spread(self, model: torch.nn.Module, inputs: Inputs,
                        method: Any = "smoothgrad", sweep: Any = None,
                        reference: Any = None, **options: Any) -> AccuracySpread:
        """How much insertion/deletion AUC moves across a sweep (SAM 4.5-4.6), recorded."""
        from ..checks.faithfulness import accuracy_spread

        merged = {k: v for k, v in self._common(options).items() if k not in ("preset", "reproduce")}
        return self._measured(accuracy_spread(model, inputs, method, sweep, reference, **merged))


class BaselineChecker:
    """Behind the ``saliency_baseline`` fixture: one stored baseline per test and name.

    ``module_dirs=True`` when the folder is shared by the whole suite (``--saliency-baseline-dir``):
    the module's folders are then part of the path (see :func:`pytest_saliency.checks.regression.baseline_path`).
    """

    def __init__(self, checker: SaliencyChecker, directory: Any, update: bool,
                 written: Callable[[str], None] | None = None, *, module_dirs: bool = False) -> None:
        self._checker = checker
        self.directory = directory
        self.update = update
        self.module_dirs = module_dirs
        self._written = written

    @short_usage_errors
    def path(self, name: str | None = None) -> Any:
        from ..checks.regression import baseline_path

        return baseline_path(self.directory, self._checker.nodeid, _checked_name(name), module_dirs=self.module_dirs)

    def _refuse_legacy_file(self, path: Any, name: str | None) -> None:
        """A baseline missing under its name but present under the name earlier versions gave it.

        That file is not read: an earlier version may have given one file to several tests (ids
        that differ only in characters replaced in file names, same-named modules in different
        folders of a shared baseline folder), so it may hold another test's maps, and a comparison
        with it could pass or fail for the wrong reason. Whether it belongs to this test is for a
        person to decide, once: the error names both files.
        """
        __tracebackhide__ = True
        from ..checks.regression import legacy_baseline_path, sidecar_path
        from ..exceptions import SaliencyUsageError

        legacy = legacy_baseline_path(self.directory, self._checker.nodeid, name)
        if self.update or legacy == path or path.exists() or not legacy.exists():
            return
        label = f"{self._checker.nodeid}" + (f" (name {name!r})" if name else "")
        raise SaliencyUsageError(
            f"the saliency baseline of {label} belongs at {path}, which does not exist;\n"
            f"  earlier versions stored it at {legacy}, a name that other tests could share, so that file is not "
            "read (it may hold another test's maps).\n"
            "  If it is this test's baseline, move it and its .json sidecar to the new name:\n"
            f"    mkdir -p {shlex.quote(str(path.parent))} && mv {shlex.quote(str(legacy))} {shlex.quote(str(path))} "
            f"&& mv {shlex.quote(str(sidecar_path(legacy)))} {shlex.quote(str(sidecar_path(path)))}\n"
            "  otherwise write a fresh one with pytest --saliency --saliency-update-baselines, review it and commit it."
        )

    def check(self, model: torch.nn.Module, inputs: Inputs, method: Any = "saliency", name: str | None = None,
              metric: str = "ssim", threshold: float | None = None, **options: Any) -> BaselineResult:
        """Compare with the stored baseline (written, and failing, when it is missing)."""
        __tracebackhide__ = True
        from ..checks.regression import check_baseline

        path = self.path(name)
        self._refuse_legacy_file(path, name)

        def run() -> BaselineResult:
            __tracebackhide__ = True
            result = check_baseline(model, inputs, path, method, metric=metric, threshold=threshold,
                                    update=self.update, name=name or "",
                                    **self._checker._with_progress(self._checker._common(options), "models"))
            if result.status in ("written", "updated") and self._written is not None:
                self._written(str(path))
            return result

        return self._checker._checked(run)


def _checked_name(name: Any) -> str | None:
    if name is None or isinstance(name, str):
        return name
    from ..exceptions import SaliencyUsageError

    raise SaliencyUsageError(
        f"baseline name must be a str or None, got {name!r:.80}. It tells apart several baselines of one test, "
        "e.g. name='integrated_gradients'."
    )
