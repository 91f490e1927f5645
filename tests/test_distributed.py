"""A check split across torch.distributed ranks (gloo, on the CPU, real processes) gives the
numbers of one plain process: every streamed check through ``tests/distributed_worker.py`` (one
plain process, torchrun with 2 ranks, torchrun with 1 rank); the plugin's ``--saliency-devices``
end to end (reports, baselines, rank logs, outcomes); and faults (a rank that raises, dies, or runs
a check the others do not) that fail the test on every rank within the timeout, never hang.

Each process is started once, by the module fixture ``launched`` (three at a time, every group at
the first need outside pytest-xdist: each process start costs seconds of importing torch), and the
tests read what they wrote. Skipped only where torch.distributed is not built in.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock  # a dependency of torch

if not torch.distributed.is_available():  # pragma: no cover - gloo is built into torch on Linux and macOS
    pytest.skip("torch.distributed is not available in this build of torch", allow_module_level=True)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
SHARD_SIZE = 8
TIMEOUT = 240  # seconds, per process launch: a hang fails the test instead of blocking CI

#: Every check the worker runs (tests/distributed_worker.py ``checks()``).
CHECKS = (
    "ipr", "cpr", "ipr_auto", "ipr_auto_small_batch", "ipr_early_exit", "ipr_cap", "ipr_auto_later_error",
    "ipr_loader_cap", "ipr_loader", "ipr_loader_auto",
    "smooth_randomization", "efficient_randomization", "efficient_randomization_cap", "random_logit",
    "random_logit_loader",
    "agreement_matrix", "agreement_generator", "seed_consistency", "explanation_consistency",
    "explainer_seed_stability", "consistency_vs_ensemble_size", "hyperparameter_sweep", "input_noise", "input_shift",
    "deletion", "insertion_loader", "accuracy_spread", "data_randomization", "baseline_write", "baseline_compare",
    "baseline_compare_drifted",
)

#: Keys that measure time, not results: left out of every comparison.
TIMING_KEYS = frozenset({"seconds", "__wall__"})

#: Keys compared to a tight relative tolerance instead of bitwise, and why. The relative difference
#: of two models' raw attributions is sqrt of sums of squares over all inputs (in float64): the
#: plain run sums the whole tensor at once, a sharded run sums each shard and then the shards'
#: sums, so the last bit may differ (seen: 0.3967315772149863 vs 0.39673157721498625). Sharded
#: runs of 1 and 2 ranks agree bitwise (``test_one_rank_and_two_ranks_agree_bitwise``).
FLOAT_KEYS = {"relative_difference": 1e-12}




def _environment(**extra: str) -> dict[str, str]:
    """The outer environment without anything that would make a child think it is a rank, an
    xdist worker or inside this test; one thread per process, no GPU."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_XDIST_", "TORCHELASTIC_")) and k not in {
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "PYTEST_SALIENCY_DEVICES", "PYTEST_SALIENCY_SHARD_SIZE", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"}}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    return env


@dataclass
class Launch:
    """One finished process: its exit status, output and wall time."""

    returncode: int
    output: str
    seconds: float
    directory: Path


def _run(command: list[str], directory: Path, **env: str) -> Launch:
    """Run ``command`` in its own process group, which is killed whole if it outlives TIMEOUT (the
    ranks that a launcher started included: killing the launcher alone would leave them running)."""
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=directory, env=_environment(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return Launch(-1, f"TIMED OUT after {TIMEOUT} s\n{output}", time.perf_counter() - start, directory)
    return Launch(process.returncode, output, time.perf_counter() - start, directory)


def _worker(directory: Path, ranks: int | None) -> Launch:
    """The worker as one plain process (``ranks=None``) or under torchrun with ``ranks`` ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [*(torchrun if ranks else [sys.executable]), str(WORKER), str(directory / "out.json")]
    return _run(command, directory, PYTEST_SALIENCY_SHARD_SIZE=str(SHARD_SIZE))


# ---------------------------------------------------------------------------------- the inner pytest runs

CONFTEST = '''
import json
import os

import pytest
import torch
from torch import nn

import pytest_saliency.checks.regression as regression

_write_files = regression._write_files


def _logged(path, *args, **kwargs):
    """Every baseline file written, with the rank that wrote it."""
    with open(os.path.join(os.path.dirname(__file__), "writes.log"), "a", encoding="utf-8") as log:
        log.write(f"{os.environ.get('RANK', 'plain')} {os.path.basename(str(path))}\\n")
    return _write_files(path, *args, **kwargs)


regression._write_files = _logged


def pytest_runtest_logreport(report):
    """Each test's outcome as it happens, per rank (a rank that dies writes no summary)."""
    if report.when == "call" or report.outcome != "passed":
        message = str(report.longrepr)[-3000:] if report.failed or report.skipped else ""
        with open(os.path.join(os.path.dirname(__file__), f"outcomes-{os.environ.get('RANK', 'plain')}.log"), "a",
                  encoding="utf-8") as log:
            log.write(json.dumps([report.nodeid.split("::")[-1], report.outcome, message, report.duration]) + "\\n")


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


@pytest.fixture
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyCNN().eval()


@pytest.fixture
def images():
    return torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
'''

CHECKS_FILE = '''
import pytest

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed


def test_ipr(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency", n_bootstrap=200)


def test_agreement(saliency, model, images):
    result = saliency.record(ps.agreement_matrix(model, images, ["saliency", "input_x_gradient"],
                                                 ["sign_agreement", "ssim"], n_bootstrap=200))
    assert result.passed, result.failure_message()


def test_baseline(saliency_baseline, model, images):
    with pytest.raises(SaliencyCheckFailed, match="baseline not found"):  # written
        saliency_baseline.check(model, images, method="saliency")
    assert saliency_baseline.check(model, images, method="saliency").passed  # compared with it
'''

FAULTS_FILE = '''
import os

import torch

import pytest_saliency as ps

RANK = os.environ.get("RANK", "0")


class Broken(torch.nn.Module):
    """The model, but on rank 1 it raises (``exit=None``) or its process exits (``exit=3``)."""

    def __init__(self, model, exit=None):
        super().__init__()
        self.inner, self.exit = model, exit

    def forward(self, x):
        if RANK == "1" and self.exit is not None:
            os._exit(self.exit)
        if RANK == "1":
            raise RuntimeError("the model broke on rank 1")
        return self.inner(x)


def test_a_rank_that_raises(saliency, model, images):
    saliency.layer_randomization(Broken(model), images, method="saliency", n_bootstrap=100)


def test_unsharded_on_rank_0_only(saliency, model, images):
    if RANK == "0":
        with ps.unsharded():
            assert ps.layer_randomization(model, images, "saliency", n_bootstrap=100).n_images == 20


def test_baseline_on_rank_0_only(saliency, model, images):
    path = f"rank{RANK}/baseline.npz"  # the same name on both ranks; only rank 0 has the file
    if RANK == "0":
        with ps.unsharded():
            ps.check_baseline(model, images, path, update=True)
    ps.check_baseline(model, images, path)


class Skipping(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        if RANK == "1":
            import pytest

            pytest.skip("rank 1 skips inside the model")
        return self.inner(x)


def test_a_rank_that_skips(saliency, model, images):
    saliency.layer_randomization(Skipping(model), images, method="saliency", n_bootstrap=100)


def test_inputs_differ_between_ranks(saliency, model, images):
    saliency.layer_randomization(model, images + int(RANK) * 1e-3, method="saliency", n_bootstrap=100)


class Counting(torch.utils.data.Dataset):
    """The images, remembering which were loaded."""

    def __init__(self, images):
        self.images, self.loaded = images, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.loaded.append(index)
        return self.images[index]


def test_each_rank_loads_its_share(saliency, model, images):
    data = Counting(images)  # 20 images in 5 batches: rank 0 runs 0-2, rank 1 runs 3-4 after batch 2's carry
    saliency.layer_randomization(model, torch.utils.data.DataLoader(data, batch_size=4), method="saliency",
                                 n_bootstrap=100)
    assert data.loaded == (list(range(12)) if RANK == "0" else list(range(8, 20)))


def test_still_in_step(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency", n_bootstrap=100)


def test_a_rank_that_dies(saliency, model, images):
    saliency.layer_randomization(Broken(model, exit=3), images, method="saliency", n_bootstrap=100)


def test_after_the_loss(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency", n_bootstrap=100)
'''

STEP_FILE = '''
import os

import pytest_saliency as ps

RANK = os.environ.get("RANK", "0")


def test_in_step(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency", n_bootstrap=100)


def test_rank_0_only(saliency, model, images):
    if RANK == "0":
        ps.layer_randomization(model, images, "saliency", n_bootstrap=100)


def test_rank_1_only(saliency, model, images):
    if RANK == "1":
        ps.layer_randomization(model, images, "saliency", n_bootstrap=100)


def test_after_the_loss(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency", n_bootstrap=100)
'''

FAULT_TIMEOUT = 20  # --saliency-timeout of the fault run


def _project(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (directory / f"{name}.py").write_text(text)
    return directory


RANKED = ("--saliency-devices=cpu,cpu", f"--saliency-shard-size={SHARD_SIZE}")


def _pytest(directory: Path, *args: str) -> Launch:
    # -p no:cacheprovider: the inner run writes nothing outside its folder; -p no:randomly: every
    # rank must run the tests in the same order
    return _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "-rA",
                 "--saliency", *args], directory)


class Launches:
    """The module's processes, in three groups, each run once on first need (its launches at once,
    at most three launches at a time). Outside pytest-xdist the first need starts every group, so
    that they overlap. Under pytest-xdist the workers share the groups: the first worker to need one
    runs it (under a file lock) and the others read what it recorded."""

    def __init__(self, root: Path) -> None:
        checks = {"test_checks": CHECKS_FILE}
        timeout = f"--saliency-timeout={FAULT_TIMEOUT}"
        self.root = root
        self.groups: dict[str, dict[str, Callable[[], Launch]]] = {
            "workers": {"two": lambda: _worker(root / "two", 2), "plain": lambda: _worker(root / "plain", None),
                        "one": lambda: _worker(root / "one", 1)},
            "pytest": {"pytest_ranked": lambda: _pytest(_project(root / "ranked", **checks), *RANKED,
                                                        "--saliency-timeout=60", "--saliency-report=json"),
                       "pytest_plain": lambda: _pytest(_project(root / "plain_pytest", **checks),
                                                       "--saliency-report=json")},
            "faults": {"faults": lambda: _pytest(_project(root / "faults", test_faults=FAULTS_FILE), *RANKED,
                                                 timeout),
                       "step": lambda: _pytest(_project(root / "step", test_step=STEP_FILE), *RANKED, timeout)},
        }
        self.launch_pool, self.group_pool = ThreadPoolExecutor(max_workers=3), ThreadPoolExecutor(max_workers=3)
        self.started: dict[str, Future[dict[str, Launch]]] = {}

    def result(self, name: str) -> Launch:
        group = next(group for group, jobs in self.groups.items() if name in jobs)
        for started in [group] + ([] if os.environ.get("PYTEST_XDIST_WORKER") else list(self.groups)):
            if started not in self.started:
                self.started[started] = self.group_pool.submit(self._run_group, started)
        return self.started[group].result()[name]

    def _run_group(self, group: str) -> dict[str, Launch]:
        record = self.root / f"{group}.json"
        with FileLock(str(self.root / f"{group}.lock")):
            if record.exists():
                return {name: Launch(**{**data, "directory": Path(data["directory"])})
                        for name, data in json.loads(record.read_text()).items()}
            futures = {name: self.launch_pool.submit(job) for name, job in self.groups[group].items()}
            launches = {name: future.result() for name, future in futures.items()}
            record.write_text(json.dumps({name: {**vars(launch), "directory": str(launch.directory)}
                                          for name, launch in launches.items()}))
            return launches

    def close(self) -> None:
        self.group_pool.shutdown(wait=True)
        self.launch_pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launches]:
    """The module's processes (:class:`Launches`), in a folder that pytest-xdist's workers share."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    root = shared / "test_distributed"
    root.mkdir(exist_ok=True)
    launches = Launches(root)
    yield launches
    launches.close()
    # with -s: what each launch took
    print({name: round(launch.seconds, 1) for future in launches.started.values() if future.exception() is None
           for name, launch in future.result().items()})


def _outcomes(launch: Launch, rank: str, durations: bool = False) -> dict[str, Any]:
    """{test name: (outcome, failure message)} of one rank (``plain``: a run without ranks), or
    with ``durations`` {test name: seconds of its call}."""
    path = launch.directory / f"outcomes-{rank}.log"
    lines = path.read_text().splitlines() if path.exists() else []
    if durations:
        return {name: seconds for name, _, _, seconds in map(json.loads, lines)}
    return {name: (outcome, message) for name, outcome, message, _ in map(json.loads, lines)}


def _results(launch: Launch) -> dict[str, Any]:
    assert launch.returncode == 0, launch.output[-6000:]
    return json.loads((launch.directory / "out.json").read_text())


@pytest.fixture(scope="module")
def worker_runs(launched: Launches) -> dict[str, dict[str, Any]]:
    """The worker's results: ``plain`` (no process group), ``two`` and ``one`` (torchrun ranks)."""
    return {name: _results(launched.result(name)) for name in ("plain", "two", "one")}


def _differences(path: str, ours: Any, theirs: Any, tolerant: bool) -> list[str]:
    """Where two JSON values differ: bitwise, but for TIMING_KEYS (skipped) and, when
    ``tolerant``, FLOAT_KEYS (to their relative tolerance)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = [f"{path}/{key}: only in one" for key in set(ours) ^ set(theirs) if key not in TIMING_KEYS]
        for key in sorted(set(ours) & set(theirs) - TIMING_KEYS):
            if tolerant and key in FLOAT_KEYS and _close(ours[key], theirs[key], FLOAT_KEYS[key]):
                continue
            found += _differences(f"{path}/{key}", ours[key], theirs[key], tolerant)
        return found
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in _differences(f"{path}[{i}]", a, b, tolerant)]
    if type(ours) is not type(theirs) or ours != theirs:
        return [f"{path}: {str(ours)[:200]} != {str(theirs)[:200]}"]
    return []


def _close(ours: Any, theirs: Any, rel: float) -> bool:
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(_close(a, b, rel) for a, b in zip(ours, theirs))
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=rel, abs_tol=0.0)
    return ours == theirs


# ---------------------------------------------------------------------------------- 1. the worker's checks


def test_every_check_ran_in_every_run(worker_runs: dict[str, dict[str, Any]]) -> None:
    """The three runs ran every check without error, as what they claim (no group, 2 ranks, 1 rank)."""
    assert worker_runs["plain"]["meta"] == {"world": None, "shard_size": SHARD_SIZE}
    assert worker_runs["two"]["meta"] == {"world": [0, 2], "shard_size": SHARD_SIZE}
    assert worker_runs["one"]["meta"] == {"world": [0, 1], "shard_size": SHARD_SIZE}
    for name, run in worker_runs.items():
        assert tuple(run["results"]) == tuple(sorted(CHECKS)), name
        errors = {check: r["__error__"] for check, r in run["results"].items() if "__error__" in r}
        assert not errors, f"{name}: {errors}"
    plain = worker_runs["plain"]["results"]
    # the scenarios are what their names say
    assert plain["ipr_auto"]["n_images"] < 28 and plain["ipr_auto"]["stopped_early"].startswith("decisive")
    assert plain["ipr_loader_auto"]["n_images"] < 28 and plain["ipr_cap"]["n_images"] == 12
    assert plain["efficient_randomization_cap"]["n_images"] == 12
    assert plain["baseline_write"]["status"] == "written" and plain["baseline_compare"]["passed"]
    assert not plain["baseline_compare_drifted"]["passed"]


def test_two_ranks_give_the_plain_runs_results(worker_runs: dict[str, dict[str, Any]]) -> None:
    """Every check's to_dict() under 2 ranks equals the plain process's in every key but the
    timings: bitwise, FLOAT_KEYS to their tolerance."""
    plain, two = worker_runs["plain"]["results"], worker_runs["two"]["results"]
    found = {check: _differences(check, two[check], plain[check], tolerant=True) for check in CHECKS}
    assert {check: diffs for check, diffs in found.items() if diffs} == {}


def test_one_rank_and_two_ranks_agree_bitwise(worker_runs: dict[str, dict[str, Any]]) -> None:
    """Sharded runs do not depend on the number of ranks: 1 and 2 ranks agree bitwise on every key
    of every check (FLOAT_KEYS included), timings aside."""
    one, two = worker_runs["one"]["results"], worker_runs["two"]["results"]
    assert [d for check in CHECKS for d in _differences(check, two[check], one[check], tolerant=False)] == []


# ---------------------------------------------------------------------------------- 2. through pytest


def _report(path: Path, root: Path) -> dict[str, Any]:
    """A JSON report's results, tests and summary, with its run's folder and times taken out."""
    report = json.loads(path.read_text().replace(str(root), "<root>"))
    for entry in report["results"]:
        entry.pop("created")
        entry["result"].pop("seconds")
        entry["text"] = re.sub(r"time: [0-9.]+ s", "time: <t> s", entry["text"])
    return {key: report[key] for key in ("results", "tests", "summary")}


def test_saliency_devices_report_the_plain_runs_results(launched: Launches) -> None:
    """--saliency-devices=cpu,cpu: the same exit status, outcomes and JSON report (results, tests,
    summary; timings aside) as one plain process, baseline written then compared included."""
    ranked, plain = launched.result("pytest_ranked"), launched.result("pytest_plain")
    outcomes = {name: outcome for name, (outcome, _) in _outcomes(plain, "plain").items()}
    assert outcomes == {"test_ipr": "passed", "test_agreement": "passed", "test_baseline": "passed"}, plain.output
    assert plain.returncode == 0, plain.output[-4000:]
    for rank in ("0", "1"):
        assert _outcomes(ranked, rank) == _outcomes(plain, "plain"), (rank, ranked.output[-4000:])
    assert ranked.returncode == plain.returncode
    report = Path(".saliency", "saliency-report.json")
    ours, theirs = _report(ranked.directory / report, ranked.directory), _report(plain.directory / report,
                                                                                 plain.directory)
    assert [entry["check"] for entry in ours["results"]] == [
        "method_agreement", "baseline", "baseline", "independent_layer_randomization"]
    assert ours == theirs
    config = json.loads((ranked.directory / report).read_text())["config"]
    assert config["devices"] == ["cpu", "cpu"] and config["shard_size"] == SHARD_SIZE


def test_rank_0_alone_writes_the_baseline_and_rank_1_logs(launched: Launches) -> None:
    """The baseline is written once, by rank 0, and then compared with on both ranks; rank 1's
    output is in .saliency/ranks/rank-1.log; rank 0 alone writes the report."""
    run = launched.result("pytest_ranked")
    assert (run.directory / "writes.log").read_text().splitlines() == ["0 test_baseline.npz"]
    assert (launched.result("pytest_plain").directory / "writes.log").read_text().splitlines() == [
        "plain test_baseline.npz"]
    log = (run.directory / ".saliency" / "ranks" / "rank-1.log").read_text()
    assert "3 passed" in log and "saliency json report" not in log
    assert "saliency json report" in run.output


# ---------------------------------------------------------------------------------- 3. faults

F = "test_faults.py::"


def test_faults_fail_the_check_on_every_rank_within_the_timeout(launched: Launches) -> None:
    """A model that raises on rank 1 only fails the test on both ranks with rank 1's error; a check
    that only rank 0 runs inside unsharded() passes; a baseline file present on rank 0 only is
    refused on both; a rank that skips inside the model skips the test on every rank; inputs that
    differ between the ranks are refused as such on both; a DataLoader over a map-style dataset is
    loaded by each rank for its own batches only (and the one before them); the ranks
    are still in step after all of these; a rank whose
    process exits fails rank 0's check with SaliencyRankFailed, without hanging, and the session
    stops there (the ranks can exchange nothing more)."""
    run = launched.result("faults")
    rank0, rank1 = _outcomes(run, "0"), _outcomes(run, "1")
    assert {name: outcome for name, (outcome, _) in rank0.items()} == {
        "test_a_rank_that_raises": "failed", "test_unsharded_on_rank_0_only": "passed",
        "test_baseline_on_rank_0_only": "failed", "test_a_rank_that_skips": "skipped",
        "test_inputs_differ_between_ranks": "failed", "test_each_rank_loads_its_share": "passed",
        "test_still_in_step": "passed", "test_a_rank_that_dies": "failed"}, run.output[-6000:]
    assert {name: outcome for name, (outcome, _) in rank1.items()} == {  # it died in the last test
        "test_a_rank_that_raises": "failed", "test_unsharded_on_rank_0_only": "passed",
        "test_baseline_on_rank_0_only": "failed", "test_a_rank_that_skips": "skipped",
        "test_inputs_differ_between_ranks": "failed", "test_each_rank_loads_its_share": "passed",
        "test_still_in_step": "passed"}, run.output[-6000:]
    # a baseline file on one rank only: both refuse it, saying so (and stay in step)
    for outcomes in (rank0, rank1):
        assert re.search(r"SaliencyUsageError: saliency baseline .*baseline.npz exists on rank\(s\) \[0\] but not",
                         outcomes["test_baseline_on_rank_0_only"][1]), outcomes["test_baseline_on_rank_0_only"][1]
    # a pytest outcome raised on one rank reaches the others as that rank's failure
    assert "on rank 1 of 2: rank 1 skips inside the model" in rank0["test_a_rank_that_skips"][1], rank0
    # other inputs on each rank: a usage error saying so on both (not "out of step"), and still in step
    for outcomes in (rank0, rank1):
        assert "SaliencyUsageError: rank 1 read another batch 0" in outcomes["test_inputs_differ_between_ranks"][1]
    # rank 0 fails with rank 1's error, rank 1 with its own
    assert re.search(r"SaliencyUsageError: on rank 1 of 2: .*the model broke on rank 1",
                     rank0["test_a_rank_that_raises"][1]), rank0["test_a_rank_that_raises"][1]
    assert "RuntimeError on one input" in rank1["test_a_rank_that_raises"][1]
    assert "the model broke on rank 1" in rank1["test_a_rank_that_raises"][1]
    # the dead rank: rank 0 fails at once (the connection closed), well within the timeout
    assert re.search(r"SaliencyRankFailed: rank 0 of 2 got no answer from every rank .*test_a_rank_that_dies",
                     rank0["test_a_rank_that_dies"][1]), rank0["test_a_rank_that_dies"][1]
    assert "the ranks lost step, so the session stops" in run.output
    assert "saliency: rank 1 exited with status 3" in run.output and run.returncode != 0
    # no test waited for the timeout (a dead rank is noticed at once); the whole run (the start of
    # three processes on a busy machine included) is bounded too
    durations = _outcomes(run, "0", durations=True)
    assert max(durations.values()) < FAULT_TIMEOUT, durations
    assert run.seconds < 4 * FAULT_TIMEOUT, run.seconds


def test_ranks_out_of_step_fail_and_stop_the_session(launched: Launches) -> None:
    """A check that only one rank runs puts the ranks out of step: each fails that test, told which
    check each rank was running, and the session stops instead of pairing later checks wrongly."""
    run = launched.result("step")
    rank0, rank1 = _outcomes(run, "0"), _outcomes(run, "1")
    assert {name: outcome for name, (outcome, _) in rank0.items()} == {
        "test_in_step": "passed", "test_rank_0_only": "failed"}, run.output[-6000:]
    assert {name: outcome for name, (outcome, _) in rank1.items()} == {
        "test_in_step": "passed", "test_rank_0_only": "passed", "test_rank_1_only": "failed"}, run.output[-6000:]
    out_of_step = (r"SaliencyRankFailed: the ranks are out of step: .*rank 0: test_step.py::test_rank_0_only"
                   r".*rank 1: test_step.py::test_rank_1_only")
    assert re.search(out_of_step, rank0["test_rank_0_only"][1]), rank0["test_rank_0_only"][1]
    assert re.search(out_of_step, rank1["test_rank_1_only"][1]), rank1["test_rank_1_only"][1]
    assert "the ranks lost step, so the session stops" in run.output and run.returncode != 0
    durations = _outcomes(run, "0", durations=True)
    assert max(durations.values()) < FAULT_TIMEOUT, durations
