"""pytest hooks and fixtures for saliency checks: a thin layer over the pure library.

Importing this module (pytest does so in every run where the plugin is installed) imports
neither torch nor captum; they load when a saliency fixture or check first runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..core.distributed import is_main, launched
from ..exceptions import SaliencyUsageError
from ..reporting.protocol import CheckResult
from .checker import RESULT_PROPERTY, BaselineChecker, SaliencyChecker
from .config import (
    DEFAULT_PRESET,
    SaliencyConfig,
    parse_count,
    parse_device,
    parse_devices,
    parse_positive,
    parse_preset,
    parse_seed,
    parse_sensitivity,
    parse_unit_interval,
)
from .progress import progress_reporter

CONFIG_KEY = pytest.StashKey[SaliencyConfig]()
FIXTURES = ("saliency", "saliency_device", "saliency_config", "saliency_baseline", "saliency_model_cache")
WRITTEN_PROPERTY = "saliency_baseline_written"
# A report entry a check could not write: travels to the controller like the results do.
REPORT_ERROR_PROPERTY = "saliency_report_error"
SKIP_REASON = "saliency checks are off: run pytest with --saliency to enable them"
# pytest's outcomes as its terminal summary counts them; mirrors reporting.report.TEST_OUTCOMES
# (this module does not import the report module at import time).
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
CONTROL_CAUGHT_LABEL = "FAILED AS EXPECTED (control caught)"


def outcome_message(report: pytest.TestReport) -> str:
    """One line saying why a test did not pass: the exception's message, the skip reason or the
    xfail reason; empty for a pass."""
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return str(wasxfail)
    longrepr = report.longrepr
    if longrepr is None or report.passed:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):  # "module.Error: first line of the message"
        return str(crash.message).strip().splitlines()[0]
    lines = [line for line in str(longrepr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saliency", "saliency map sanity checks")
    group.addoption(
        "--saliency", action="store_true", dest="saliency_enabled", default=False,
        help="run saliency checks (tests marked 'saliency' or using saliency fixtures); "
        "without it they are skipped.",
    )
    group.addoption(
        "--saliency-device", dest="saliency_device", metavar="DEVICE", type=parse_device, default=None,
        help="device for saliency checks: auto (CUDA when available), cpu, cuda or cuda:N. Default: auto.",
    )
    group.addoption(
        "--saliency-seed", dest="saliency_seed", metavar="INT", type=parse_seed, default=None,
        help="force this seed for every saliency check (printed in failures to reproduce them).",
    )
    group.addoption(
        "--saliency-preset", dest="saliency_preset", metavar="NAME", type=parse_preset, default=None,
        help=f"map pipeline preset: adebayo2018, sam2020 or thesis2023. Default: {DEFAULT_PRESET}.",
    )
    group.addoption(
        "--saliency-baseline-dir", dest="saliency_baseline_dir", metavar="PATH", default=None,
        help="root folder of stored saliency baselines (relative to the root dir). "
        "Default: saliency_baselines/ next to each test module.",
    )
    group.addoption(
        "--saliency-update-baselines", action="store_true", dest="saliency_update_baselines", default=False,
        help="write or overwrite the baselines of the tests that run; they pass and the summary lists the files.",
    )
    group.addoption(
        "--saliency-report", dest="saliency_report", metavar="FORMATS", default=None,
        help="write a report of every saliency check: json, html or json,html. Default: none.",
    )
    group.addoption(
        "--saliency-results-dir", dest="saliency_results_dir", metavar="PATH", default=None,
        help="folder for reports and figures, relative to the root dir. Default: .saliency",
    )
    group.addoption(
        "--saliency-devices", dest="saliency_devices", metavar="LIST", type=parse_devices, default=None,
        help="split every saliency check across these devices, one pytest process each (as torchrun would "
        "start them): cuda:0,cuda:1, all (every visible GPU) or cpu,cpu. Under torchrun, rank N takes the N-th.",
    )
    group.addoption(
        "--saliency-timeout", dest="saliency_timeout", metavar="SECONDS", type=parse_positive, default=None,
        help="under torchrun or --saliency-devices: how long a rank waits for the others to reach a check "
        "before every rank fails it. Default: 1800.",
    )
    group.addoption(
        "--saliency-shard-size", dest="saliency_shard_size", metavar="N", type=parse_count, default=None,
        help="under torchrun or --saliency-devices: examples per shard when a check's inputs are one tensor "
        "(the same for any number of ranks, so the numbers do not depend on it). Default: 32.",
    )
    parser.addini("saliency_report", "report formats to write (json, html or json,html)", default="")
    parser.addini("saliency_results_dir", "folder for saliency reports (relative to the root dir)", default=".saliency")
    parser.addini("saliency_baseline_dir", "root folder of stored saliency baselines (relative to the ini file)",
                  default="")
    parser.addini("saliency_device", "default device for saliency checks (auto, cpu, cuda, cuda:N)", default="auto")
    parser.addini("saliency_seed", "seed forced for every saliency check (empty: per-check seed)", default="")
    parser.addini("saliency_preset", f"default map pipeline preset ({DEFAULT_PRESET})", default=DEFAULT_PRESET)
    parser.addini("saliency_ssim_threshold", "similarity (SSIM; Spearman for tabular and text maps) below which a "
                  "layer counts as sensitive (0.99)", default="0.99")
    parser.addini(
        "saliency_sensitivity_threshold", "S^I at or above which a method counts as sensitive (0.01)", default="0.01"
    )


def _ini(config: pytest.Config, name: str, parse: Any) -> Any:
    raw = config.getini(name)
    try:
        return parse(raw)
    except Exception as exc:  # argparse.ArgumentTypeError and friends
        raise pytest.UsageError(f"invalid ini value {name} = {raw!r}: {exc}") from None


def _report_formats(config: pytest.Config) -> tuple[str, ...]:
    from ..reporting.report import parse_formats

    raw = getattr(config.option, "saliency_report", None) or config.getini("saliency_report")
    try:
        return parse_formats(raw or "")
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def resolve_config(config: pytest.Config) -> SaliencyConfig:
    """Command line over ini file over defaults."""
    option = config.option
    ini_seed = config.getini("saliency_seed")
    results_dir = getattr(option, "saliency_results_dir", None) or config.getini("saliency_results_dir")
    return SaliencyConfig(
        enabled=bool(getattr(option, "saliency_enabled", False)),
        device=getattr(option, "saliency_device", None) or _ini(config, "saliency_device", parse_device),
        seed=getattr(option, "saliency_seed", None)
        if getattr(option, "saliency_seed", None) is not None
        else (_ini(config, "saliency_seed", parse_seed) if str(ini_seed).strip() else None),
        preset=getattr(option, "saliency_preset", None) or _ini(config, "saliency_preset", parse_preset),
        ssim_threshold=_ini(config, "saliency_ssim_threshold", parse_unit_interval),
        sensitivity_threshold=_ini(config, "saliency_sensitivity_threshold", parse_sensitivity),
        report=_report_formats(config),
        results_dir=str((config.rootpath / results_dir).resolve()),
        devices=getattr(option, "saliency_devices", None) or (),
        timeout=getattr(option, "saliency_timeout", None) or 1800.0,
        shard_size=getattr(option, "saliency_shard_size", None),
    )


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--saliency-devices`` with several devices, outside torchrun: run the session once per
    device (:mod:`pytest_saliency.plugin.launch`) and return its exit status."""
    devices = getattr(config.option, "saliency_devices", None) or ()
    if launched() or not getattr(config.option, "saliency_enabled", False) or devices == ():
        return None
    if devices == ("all",):
        devices = _all_gpus()
    if len(devices) < 2:
        return None  # one device: this process runs on it (--saliency-device does the same)
    if getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--saliency-devices starts one pytest process per device; it cannot be combined "
                                "with pytest-xdist's -n. Drop -n (or use -n with --saliency-device=auto instead).")
    _check_devices(devices)
    from .launch import launch

    results = Path(getattr(config.option, "saliency_results_dir", None) or config.getini("saliency_results_dir"))
    logs = (config.rootpath / results / "ranks").resolve()
    return launch(list(config.invocation_params.args), list(devices), config.invocation_params.dir, logs)


def _check_devices(devices: tuple[str, ...]) -> None:
    """Refuse, before starting any process, a listed device this machine does not have."""
    from ..core.devices import resolve_device

    for device in devices:
        try:
            resolve_device(device)
        except SaliencyUsageError as error:
            raise pytest.UsageError(f"--saliency-devices={','.join(devices)}: {device}: {error}") from None


def _all_gpus() -> tuple[str, ...]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise pytest.UsageError("--saliency-devices=all splits the checks across the visible GPUs, but CUDA sees "
                                "none here. List devices instead (cpu,cpu for two processes on the CPU).")
    return tuple(f"cuda:{index}" for index in range(count))


def _join_ranks(config: SaliencyConfig) -> None:
    """Under torchrun: join the process group (the rank's device and timeout) so that every
    saliency check is split across the ranks (:mod:`pytest_saliency.core.distributed`)."""
    from ..core.devices import resolve_device
    from ..core.distributed import SHARD_SIZE_VARIABLE, join

    if config.shard_size is not None:
        os.environ[SHARD_SIZE_VARIABLE] = str(config.shard_size)
    try:
        device = resolve_device(config.device, devices=config.devices)
    except SaliencyUsageError as error:
        raise pytest.UsageError(str(error)) from None
    join(device, config.timeout)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "saliency: a saliency sanity-check test; skipped unless pytest runs with --saliency"
    )
    resolved = config.stash[CONFIG_KEY] = resolve_config(config)
    if resolved.enabled and launched():
        if hasattr(config, "workerinput") or getattr(config.option, "numprocesses", None):
            raise pytest.UsageError(
                "under torchrun (or --saliency-devices) every rank splits each saliency check with the others; "
                "pytest-xdist's -n would start more processes that all claim the same rank. Drop -n (check addopts).")
        _join_ranks(resolved)
        if not is_main():  # one JUnit XML, written by rank 0 (its plugin reads the option after this hook)
            config.option.xmlpath = None
    controller = not hasattr(config, "workerinput") and is_main()
    reporter = SaliencyReporter(resolved, controller, config)
    config.pluginmanager.register(reporter, "saliency-reporter")
    if resolved.enabled and resolved.report and controller:
        from ..reporting.report import prepare_results_dir, results_dir_problem

        try:
            prepare_results_dir(resolved.results_dir)
        except OSError as exc:  # the checks still run; the summary says why there is no report
            reporter.problems.append(f"saliency report not written: {results_dir_problem(resolved.results_dir, exc)}")


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Under torchrun: once the ranks have lost step (a rank ran other checks, died or timed out),
    no later saliency check can run; stop the session with the cause instead of failing each."""
    if not launched():
        return
    from ..core.distributed import broken

    cause = broken()
    if cause:
        item.session.shouldstop = f"saliency: the ranks lost step, so the session stops: {cause}"


def pytest_unconfigure(config: pytest.Config) -> None:
    cfg = config.stash.get(CONFIG_KEY, None)
    if cfg is not None and cfg.enabled and launched():
        from ..core.distributed import leave

        leave()


def pytest_report_header(config: pytest.Config) -> str | None:
    cfg = config.stash.get(CONFIG_KEY, None)
    if cfg is None or not cfg.enabled:
        return None
    seed = cfg.seed if cfg.seed is not None else "per check"
    ranks = ""
    if launched():
        ranks = (f", rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} (every check split across the ranks; "
                 "rank 0 writes the reports)")
    return (
        f"saliency: device={cfg.device}, preset={cfg.preset}, seed={seed}, "
        f"thresholds SSIM<{cfg.ssim_threshold:g} / S^I>={cfg.sensitivity_threshold:g}{ranks}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    enabled = config.stash[CONFIG_KEY].enabled
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if any(name in FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.saliency)
        if not enabled and item.get_closest_marker("saliency") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def saliency_config(pytestconfig: pytest.Config) -> SaliencyConfig:
    """The resolved saliency configuration (options > ini > defaults) for this session."""
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def saliency_device(saliency_config: SaliencyConfig) -> Any:
    """The ``torch.device`` saliency checks run on: move your model and inputs there.

    ``auto`` picks CUDA when it is available (under pytest-xdist, worker gwN gets the N-th
    visible GPU), else the CPU.
    """
    from ..core.devices import resolve_device

    # pytest-xdist worker gwN, or torchrun's local rank N -> the N-th visible GPU (or --saliency-devices' N-th)
    return resolve_device(saliency_config.device, devices=saliency_config.devices)


@pytest.fixture(scope="session")
def _saliency_map_cache() -> Any:
    """The session's cache of original-model attributions, shared by all checks of this process."""
    from ..maps.cache import MapCache

    return MapCache()


@pytest.fixture(scope="session")
def saliency_model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Trained models on disk (``.pytest_cache/d/saliency_models``), keyed by the training function's
    qualified name and the seed, so reruns in CI load instead of retraining; ``pytest --cache-clear``
    empties it. Safe under pytest-xdist (atomic writes and a lock per model)."""
    from ..model.cache import ModelCache

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    directory = cache.mkdir("saliency_models") if cache is not None else tmp_path_factory.mktemp("saliency_models")
    return ModelCache(directory)


@pytest.fixture
def saliency(
    request: pytest.FixtureRequest, saliency_config: SaliencyConfig, _saliency_map_cache: Any,
    saliency_model_cache: Any,
) -> SaliencyChecker:
    """The saliency assertions with this session's preset, thresholds and seed applied.

    Example::

        def test_gradients_depend_on_the_model(saliency, model, images):
            saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency")
    """
    node = request.node
    return SaliencyChecker(
        saliency_config,
        nodeid=node.nodeid,
        record=lambda name, value: node.user_properties.append((name, value)),
        cache=_saliency_map_cache,
        progress=progress_reporter(request.config),
        report=_entry_writer(saliency_config, node.nodeid, node.user_properties.append)
        if saliency_config.report and is_main() else None,
        model_cache=saliency_model_cache,
    )


def _entry_writer(config: SaliencyConfig, nodeid: str,
                  record: Callable[[tuple[str, object]], None]) -> Callable[..., str | None]:
    """Write one check's report entry (with figures for HTML); return the link to its section.

    A report problem never fails the user's test, not even as a warning (suites that turn
    warnings into errors would fail): it is recorded and listed in the terminal summary.
    """

    def write(result: CheckResult, raised: bool = False) -> str | None:
        from ..reporting.report import html_link, results_dir_problem, write_entry

        try:
            path = write_entry(result, nodeid, config.results_dir, figures="html" in config.report, raised=raised)
            return html_link(path) if "html" in config.report else str(Path(config.results_dir) / "saliency-report.json")
        except OSError as exc:
            record((REPORT_ERROR_PROPERTY, results_dir_problem(config.results_dir, exc)))
        except Exception as exc:
            record((REPORT_ERROR_PROPERTY, f"{type(exc).__name__}: {exc}"))
        return None

    return write


class SaliencyReporter:
    """Collects every check's summary from test reports and prints them at the end.

    Results travel in ``report.user_properties``, so checks run in pytest-xdist workers reach
    the controller's summary (and the JUnit XML) without any shared file. Report entries (full
    results and figures) are files each process writes under the results folder with unique
    names; the controller merges them into one report when the session ends.

    It also keeps pytest's own outcome of every saliency test: a test with the ``saliency``
    marker (set by hand, or added at collection to every test using a saliency fixture) or one
    that recorded a check result. Outcomes are categorized by pytest's
    ``pytest_report_teststatus`` hook, so the summary, the reports and pytest count alike.
    """

    def __init__(self, config: SaliencyConfig, controller: bool, pytest_config: pytest.Config | None = None) -> None:
        self.config = config
        self.controller = controller
        self.pytest_config = pytest_config
        self.results: list[dict[str, Any]] = []
        # The saliency tests with pytest's outcome, one row per outcome pytest counts:
        # {"nodeid", "outcome", "message", "when"}.
        self.tests: list[dict[str, str]] = []
        self.written: list[str] = []
        self.reports: dict[str, Path] = {}
        self.entry_errors: list[str] = []  # report entries checks could not write (any process)
        self.problems: list[str] = []  # why the report is missing or incomplete, for the summary

    def _record_outcome(self, report: pytest.TestReport) -> None:
        """Keep pytest's own outcome of a saliency test's phase, categorized by pytest's
        ``pytest_report_teststatus`` hook (as its terminal summary counts it)."""
        is_saliency = "saliency" in report.keywords or any(name == RESULT_PROPERTY for name, _ in report.user_properties)
        if self.pytest_config is None or not is_saliency:
            return
        status = self.pytest_config.hook.pytest_report_teststatus(report=report, config=self.pytest_config)
        category = status[0] if isinstance(status, tuple) else ""
        if category not in TEST_OUTCOMES:
            return  # a setup or teardown that passed
        self.tests.append({"nodeid": report.nodeid, "outcome": category, "message": outcome_message(report),
                           "when": report.when})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record_outcome(report)
        # The teardown report carries every property recorded during setup, call and teardown,
        # so checks run inside fixtures are counted too (and each check exactly once).
        if report.when != "teardown":
            return
        for name, value in report.user_properties:  # the values this plugin recorded are strings
            if name == RESULT_PROPERTY:
                self.results.append(json.loads(str(value)))
            elif name == WRITTEN_PROPERTY:
                self.written.append(str(value))
            elif name == REPORT_ERROR_PROPERTY:
                self.entry_errors.append(str(value))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Merge the entries into the report. Nothing here may raise (pytest would print an
        INTERNALERROR instead of the summary): problems go to the summary."""
        if not (self.controller and self.config.enabled and self.config.report):
            return
        from ..reporting.report import ENTRIES_DIR, collect_entries, results_dir_problem, write_reports

        root = self.config.results_dir
        incomplete = [f"saliency report: {self.entry_errors.count(problem)} check result(s) left out, their entries "
                      f"not written: {problem}" for problem in dict.fromkeys(self.entry_errors)]
        errors: list[str] = []
        try:
            entries = collect_entries(root, errors)
        except OSError as exc:  # e.g. the folder's permissions were changed during the session
            entries = []
            errors.append(f"{Path(root) / ENTRIES_DIR}: {exc}")
        incomplete.extend(f"saliency report: skipped an unreadable entry file {error}" for error in errors)
        missing = len(self.results) - len(entries) - len(errors) - len(self.entry_errors)
        if missing > 0:
            incomplete.append(
                f"saliency report: {missing} of {len(self.results)} check result(s) missing: their entry files under "
                f"{Path(root) / ENTRIES_DIR} were removed during the session (by a test or another program); rerun "
                "to get a complete report, and keep the results folder out of what tests delete."
            )
        try:
            self.reports = write_reports(
                entries, root, self.config.report, config=self.config.to_dict(),
                environment={"device": self.config.device, "seed": self.config.seed}, tests=self.tests,
            )
        except OSError as exc:
            self.problems.append(f"saliency report not written: {results_dir_problem(root, exc)}")
        except Exception as exc:
            self.problems.append(f"saliency report not written: {type(exc).__name__}: {exc}")
        else:
            self.problems.extend(incomplete)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written:
            terminalreporter.write_sep("-", "saliency baselines written")
            for path in self.written:
                terminalreporter.write_line(path)
        outcomes: dict[str, str] = {}
        for test in self.tests:
            outcomes.setdefault(test["nodeid"], test["outcome"])

        def caught(entry: dict[str, Any]) -> bool:  # a check that raised, in a test pytest passed
            return bool(entry.get("raised")) and not entry["passed"] and outcomes.get(entry["nodeid"]) == "passed"

        if self.results:
            terminalreporter.write_sep("-", "saliency checks")
            kinds: dict[str, list[dict[str, Any]]] = {}
            for entry in self.results:
                kinds.setdefault(entry["check"], []).append(entry)
            for kind, entries in kinds.items():
                passed = sum(entry["passed"] for entry in entries)
                controls = sum(caught(entry) for entry in entries)
                terminalreporter.write_line(f"{kind}: {passed} of {len(entries)} passed"
                                            + (f", {controls} failed as expected (control caught)" if controls else ""))
                for entry in entries:
                    prefix = f"{CONTROL_CAUGHT_LABEL}: " if caught(entry) else ""
                    terminalreporter.write_line(f"  {prefix}{entry['summary']}  ({entry['nodeid']})")
            controls = sum(caught(entry) for entry in self.results)
            failed = sum(not entry["passed"] for entry in self.results) - controls
            terminalreporter.write_line(f"{len(self.results) - failed - controls} saliency check(s) passed, {failed} failed"
                                        + (f", {controls} failed as expected (control caught)" if controls else ""))
        if self.config.enabled and self.tests:
            terminalreporter.write_sep("-", "saliency tests")
            for test in self.tests:
                if test["outcome"] != "passed":
                    message = f": {test['message']}" if test["message"] else ""
                    terminalreporter.write_line(f"{test['outcome'].upper()} {test['nodeid']}{message}")
            counts = ", ".join(f"{sum(t['outcome'] == name for t in self.tests)} {name}" for name in TEST_OUTCOMES)
            terminalreporter.write_line(f"saliency tests: {counts}")
        for problem in dict.fromkeys(self.problems):
            terminalreporter.write_line(problem, red=True)
        for kind, report_path in self.reports.items():
            terminalreporter.write_line(f"saliency {kind} report: {report_path}")


@pytest.fixture
def saliency_baseline(request: pytest.FixtureRequest, saliency: SaliencyChecker) -> BaselineChecker:
    """Stored-baseline regression checks for this test.

    Example::

        def test_explanations_did_not_drift(saliency_baseline, model, images):
            saliency_baseline.check(model, images, method="integrated_gradients")

    The first run writes ``saliency_baselines/<module>/<test>.npz`` and fails (commit the file);
    later runs compare with it. ``pytest --saliency --saliency-update-baselines`` rewrites them.
    Under ``--saliency-baseline-dir`` (or the ini key) the module's folders are kept:
    ``<dir>/tests/unit/test_model/<test>.npz``.
    """
    config = request.config
    option = config.option.saliency_baseline_dir
    ini = config.getini("saliency_baseline_dir")
    if option:
        directory = config.rootpath / option
    elif ini:
        directory = (config.inipath.parent if config.inipath else config.rootpath) / ini
    else:
        directory = request.path.parent / "saliency_baselines"
    node = request.node
    return BaselineChecker(
        saliency, directory, bool(config.option.saliency_update_baselines),
        written=lambda path: node.user_properties.append((WRITTEN_PROPERTY, path)),
        module_dirs=bool(option or ini),
    )
