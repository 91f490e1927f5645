"""Saliency reports: one entry file per check (any process), merged into JSON and HTML at the end.

The flow, and who calls what:

* **Where the check runs** (the test's process: a pytest-xdist worker or the only process):
  :func:`write_entry` reads the result through the
  :class:`~pytest_saliency.reporting.protocol.CheckResult` protocol, renders its ``figures()``
  (PNG files in ``<results_dir>/<sanitized nodeid>__<check>__<n>/``) and writes the entry as
  ``<results_dir>/.entries/<worker>-<pid>-<counter>-<uuid>.json``, atomically (temporary file +
  :func:`os.replace`), so workers never collide and an interrupted write leaves no half file.
  Only figures need the result object (they draw its maps); the rest of the flow reads entries.
* **At the end of the session** (the controller, or the only process):
  :func:`collect_entries` reads the entry files and :func:`write_reports` writes
  ``saliency-report.json`` (schema: ``report_schema.json``, checked by :func:`validate_report`) and
  ``saliency-report.html`` (one self-contained page, images embedded), then removes ``.entries``.
* **At the start** (the controller, before workers start): :func:`prepare_results_dir` removes
  the entry files and figure folders a previous session left behind.

Torch-free: this module imports only the standard library, Jinja2 (the HTML page's layout is in
``templates/*.j2``) and the package's torch-free ``core.jsonable`` and ``reporting`` modules (matplotlib is imported by
:mod:`pytest_saliency.reporting.figures` when a figure is drawn).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from ..core.jsonable import jsonable
from .numbers import format_score, format_threshold, layer_label
from .protocol import CheckResult, missing_members

SCHEMA_VERSION = 2
REPORT_FORMATS = ("json", "html")
JSON_NAME = "saliency-report.json"
HTML_NAME = "saliency-report.html"
ENTRIES_DIR = ".entries"
SCHEMA_FILE = Path(__file__).with_name("report_schema.json")

# {"nodeid", "check", "passed", "summary", "numbers", "result", "figures", ...}; see report_schema.json
ReportEntry = dict[str, Any]

_LOCK = threading.Lock()
_COUNTER = itertools.count()
_INDEX: dict[tuple[str, str, str], int] = {}
_FOLDER = re.compile(r".+__[A-Za-z0-9_.-]+__\d+$")


class ReportSchemaError(ValueError):
    """A report document does not match ``report_schema.json``; the message lists every problem."""


# --------------------------------------------------------------------------------------------
# worker side: one entry per check


def sanitize(text: str, width: int = 80) -> str:
    """A file-name-safe, collision-resistant stem for a node id: ``tests_test_x.py_test_a-1a2b3c4d``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")[:width] or "node"
    return f"{stem}-{hashlib.sha1(str(text).encode('utf-8')).hexdigest()[:8]}"


def _check_name(check: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", check).strip("._-") or "check"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a hidden temporary file next to ``path``, then rename it over ``path`` (atomic on POSIX
    and Windows): a reader sees the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _checked_result(result: object) -> CheckResult:
    """``result`` itself when it implements :class:`CheckResult`, else a ``TypeError`` naming what it lacks."""
    if isinstance(result, CheckResult):
        return result
    raise TypeError(
        f"a saliency report entry needs a CheckResult (pytest_saliency.reporting.protocol); "
        f"{type(result).__name__} lacks {', '.join(missing_members(result))}"
    )


def make_entry(result: CheckResult, nodeid: str, *, worker_id: str | None = None) -> ReportEntry:
    """The entry for ``result`` without figures (``figures`` is filled in by :func:`write_entry`).

    Everything comes from the :class:`CheckResult` protocol: ``check``, ``passed``,
    ``summary()``, ``numbers()``, ``to_dict()`` (the entry's ``result``; its ``status``, if any,
    becomes the entry's) and ``report()`` (its ``text``). A summary that begins with ``REPORT``
    marks a measurement with no gate: status ``report``.
    """
    result = _checked_result(result)
    data = result.to_dict()
    summary = result.summary()
    status = data.get("status")
    if not isinstance(status, str) or not status:
        status = "report" if summary.startswith("REPORT") else None
    entry: ReportEntry = {
        "nodeid": str(nodeid),
        "check": result.check or type(result).__name__,
        "passed": bool(result.passed),
        "summary": summary,
        "numbers": jsonable(result.numbers(), tensors="values"),
        "result": jsonable(data, tensors="values"),
        "figures": {},
        "worker": worker_id,
        "created": _now(),
    }
    if status is not None:
        entry["status"] = status
    text = result.report()
    if text:
        entry["text"] = text
    return entry


def write_entry(
    result: CheckResult,
    nodeid: str,
    results_dir: str | os.PathLike[str],
    worker_id: str | None = None,
    *,
    figures: bool = True,
    raised: bool = False,
) -> Path:
    """Render ``result``'s figures and write its entry; returns the entry file's path.

    Call it in the process that ran the check, right after the check (the result object, with
    its maps, is needed for the figures). ``worker_id`` defaults to ``$PYTEST_XDIST_WORKER``.
    ``figures=False`` skips rendering (e.g. when only the JSON report is wanted). The entry's
    ``anchor`` is the figure folder's name and the check's ``#fragment`` in the HTML report.
    A figure that cannot be drawn is left out and its reason stored in ``figure_errors``.
    ``raised=True`` marks a failed check that raised ``SaliencyCheckFailed`` (entry key
    ``raised``): when its test passes anyway, the test caught it, and the report shows it as a
    control caught (see :func:`apply_outcomes`).
    """
    root = Path(results_dir)
    worker_id = worker_id if worker_id is not None else os.environ.get("PYTEST_XDIST_WORKER")
    entry = make_entry(result, nodeid, worker_id=worker_id)
    key = (str(root.resolve()), entry["nodeid"], entry["check"])
    with _LOCK:
        index = _INDEX.get(key, 0)
        _INDEX[key] = index + 1
        serial = next(_COUNTER)
    anchor = f"{sanitize(entry['nodeid'])}__{_check_name(entry['check'])}__{index}"
    entry["anchor"] = anchor
    entry["index"] = index
    if raised:
        entry["raised"] = True
    if figures:
        from .figures import figures_for

        errors: list[str] = []
        rendered = figures_for(result, errors=errors)
        if errors:
            entry["figure_errors"] = errors
        if rendered:
            folder = root / anchor
            if folder.exists():  # a previous session's folder (prepare_results_dir was not called)
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            for name, png in rendered.items():
                stem = _check_name(name)
                _atomic_write(folder / f"{stem}.png", png)
                entry["figures"][name] = f"{anchor}/{stem}.png"
    entries = root / ENTRIES_DIR
    entries.mkdir(parents=True, exist_ok=True)
    path = entries / f"{_check_name(worker_id or 'main')}-{os.getpid()}-{serial}-{uuid.uuid4().hex[:8]}.json"
    _atomic_write(path, json.dumps(entry, allow_nan=False).encode("utf-8"))
    return path


def read_entry(path: str | os.PathLike[str]) -> ReportEntry:
    """The entry :func:`write_entry` wrote (e.g. to put its report link in a failure message)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def html_link(entry_path: str | os.PathLike[str]) -> str:
    """``<results_dir>/saliency-report.html#<anchor>``: where the HTML report will show this entry."""
    path = Path(entry_path)
    return f"{path.parent.parent / HTML_NAME}#{read_entry(path)['anchor']}"


def prepare_results_dir(results_dir: str | os.PathLike[str]) -> Path:
    """Create ``results_dir`` and remove what an earlier session left: ``.entries`` and figure folders.

    Only folders named like ours (``<name>__<check>__<n>``) holding nothing but PNG files are
    removed; call it once, in the controller, before any worker starts (``pytest_configure``).
    """
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / ENTRIES_DIR, ignore_errors=True)
    for child in root.iterdir():
        if child.is_dir() and _FOLDER.match(child.name):
            files = list(child.iterdir())
            if all(f.is_file() and f.suffix == ".png" for f in files):
                shutil.rmtree(child, ignore_errors=True)
    with _LOCK:
        for key in [k for k in _INDEX if k[0] == str(root.resolve())]:
            del _INDEX[key]
    return root


def results_dir_problem(results_dir: str | os.PathLike[str], exc: BaseException) -> str:
    """What is wrong with ``results_dir``, given the error ``exc`` that using it raised, and what to do."""
    root = Path(results_dir)
    fix = "choose another --saliency-results-dir (or saliency_results_dir ini key)"

    def is_file_like(path: Path) -> bool:  # exists and is not a folder; False when it cannot be told
        try:
            return path.exists() and not path.is_dir()
        except OSError:
            return False

    blocker = next((p for p in (root, *root.parents) if is_file_like(p)), None)
    if blocker == root:
        return f"{root} is a file, not a folder; remove the file or {fix}"
    if blocker is not None:
        return f"{root} cannot be created: {blocker} is a file, not a folder; remove that file or {fix}"
    if isinstance(exc, PermissionError):
        return f"{root} cannot be created or written ({exc.strerror or exc}); make it writable or {fix}"
    return f"{root} could not be used ({type(exc).__name__}: {exc}); check that folder or {fix}"


# --------------------------------------------------------------------------------------------
# controller side: merge and write


def _sort_key(entry: dict[str, Any]) -> tuple[str, str, int, str]:
    index = entry.get("index")
    return (str(entry.get("nodeid", "")), str(entry.get("check", "")), index if isinstance(index, int) else 0,
            str(entry.get("created", "")))


def collect_entries(results_dir: str | os.PathLike[str], errors: list[str] | None = None) -> list[ReportEntry]:
    """Every entry written under ``results_dir`` (by any process), sorted by nodeid, check, order.

    Unreadable or malformed entry files are skipped; their names and reasons go to ``errors``.
    """
    folder = Path(results_dir) / ENTRIES_DIR
    entries: list[ReportEntry] = []
    if not folder.is_dir():
        return entries
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or not {"nodeid", "check", "passed"} <= entry.keys():
                raise ValueError("not a report entry")
        except (OSError, ValueError) as exc:
            if errors is not None:
                errors.append(f"{path}: {exc}")
            continue
        entries.append(entry)
    entries.sort(key=_sort_key)
    return entries


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Python, platform and library versions (read from package metadata: nothing is imported)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "pytest_saliency": _version("pytest-saliency"),
        "pytest": _version("pytest"),
        "torch": _version("torch"),
        "captum": _version("captum"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "scikit-image": _version("scikit-image"),
    }
    info.update(jsonable(extra or {}, tensors="values"))
    return info


#: pytest's outcomes of a test, as its terminal summary counts them (one per test phase that
#: pytest counts: a test whose call failed and whose teardown errored counts once in each).
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
#: A check's ``outcome`` when it failed inside a test that pytest passed: the test expected the
#: failure (``pytest.raises(SaliencyCheckFailed)`` around a control that proves the gate works).
CONTROL_CAUGHT = "control_caught"


def test_outcome_of(tests: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``{nodeid: outcome}``: the first outcome pytest gave each test (its setup's or call's)."""
    outcomes: dict[str, str] = {}
    for test in tests:
        outcomes.setdefault(str(test.get("nodeid")), str(test.get("outcome")))
    return outcomes


def apply_outcomes(entries: Sequence[dict[str, Any]], tests: Sequence[dict[str, Any]]) -> None:
    """Set each entry's ``outcome`` from its test's pytest outcome (in place).

    A passed check is ``passed``. A failed check that raised (entry key ``raised``) in a test
    pytest passed is :data:`CONTROL_CAUGHT`: the test caught the failure. A failed check that was
    only recorded (not asserted) in a passed test stays ``failed``; any other failed check takes
    its test's outcome (``failed``, ``error``, ``xfailed``...). Entries of tests without a known
    outcome are left as they are.
    """
    outcomes = test_outcome_of(tests)
    for entry in entries:
        test = outcomes.get(str(entry.get("nodeid")))
        if test is None:
            continue
        if entry.get("passed"):
            entry["outcome"] = "passed"
        else:
            caught = test == "passed" and bool(entry.get("raised"))
            entry["outcome"] = CONTROL_CAUGHT if caught else ("failed" if test == "passed" else test)


def summarize(entries: Sequence[dict[str, Any]], tests: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Counts of checks (a caught control is counted in ``controls_caught``, not in ``failed``)
    and, when ``tests`` is given, of the saliency tests by pytest's outcome."""
    by_check: dict[str, dict[str, int]] = {}
    for entry in entries:
        counts = by_check.setdefault(str(entry.get("check")),
                                     {"checks": 0, "passed": 0, "failed": 0, "controls_caught": 0})
        counts["checks"] += 1
        if entry.get("passed"):
            counts["passed"] += 1
        else:
            counts["controls_caught" if entry.get("outcome") == CONTROL_CAUGHT else "failed"] += 1
    summary: dict[str, Any] = {
        "checks": len(entries),
        "passed": sum(c["passed"] for c in by_check.values()),
        "failed": sum(c["failed"] for c in by_check.values()),
        "controls_caught": sum(c["controls_caught"] for c in by_check.values()),
        "by_check": by_check,
    }
    if tests is not None:
        summary["tests"] = {name: sum(1 for t in tests if t.get("outcome") == name) for name in TEST_OUTCOMES}
    return summary


def build_report(entries: Sequence[dict[str, Any]], *, config: dict[str, Any] | None = None,
                 environment: dict[str, Any] | None = None,
                 tests: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON report document (see ``report_schema.json``). ``tests`` are the saliency tests
    with pytest's outcomes (``{"nodeid", "outcome", "message"}``); they set each entry's
    ``outcome`` and are listed under ``tests``."""
    entries = sorted(entries, key=_sort_key)
    if tests is not None:
        apply_outcomes(entries, tests)
    document = {
        "schema_version": SCHEMA_VERSION,
        "created": _now(),
        "environment": environment_info(environment),
        "config": jsonable(config or {}, tensors="values"),
        "summary": summarize(entries, tests),
        "results": [jsonable(e, tensors="values") for e in entries],
    }
    if tests is not None:
        document["tests"] = [jsonable(dict(t), tensors="values") for t in tests]
    return document


def parse_formats(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"json,html"`` (or a list) -> ``("json", "html")``; unknown names raise ``ValueError``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    formats = tuple(dict.fromkeys(item.strip().lower() for item in items if item and item.strip()))
    unknown = [f for f in formats if f not in REPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown saliency report format(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(REPORT_FORMATS)} (comma-separated, e.g. json,html)")
    return formats


def write_reports(
    entries: Sequence[dict[str, Any]],
    results_dir: str | os.PathLike[str],
    formats: Iterable[str] = REPORT_FORMATS,
    *,
    config: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    remove_entries: bool = True,
    tests: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``saliency-report.json`` / ``saliency-report.html`` and remove ``.entries``.

    Returns ``{format: path}``. ``config`` is the resolved configuration, ``environment`` extra
    machine facts (device, CUDA, GPU names, seeds) merged over :func:`environment_info`,
    ``tests`` the saliency tests with pytest's outcomes (see :func:`build_report`).
    """
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    formats = parse_formats(formats)
    document = build_report(entries, config=config, environment=environment, tests=tests)
    written: dict[str, Path] = {}
    if "json" in formats:
        path = root / JSON_NAME
        _atomic_write(path, json.dumps(document, indent=1, allow_nan=False).encode("utf-8"))
        written["json"] = path
    if "html" in formats:
        path = root / HTML_NAME
        _atomic_write(path, render_html(document, root, with_json="json" in formats).encode("utf-8"))
        written["html"] = path
    if remove_entries:
        shutil.rmtree(root / ENTRIES_DIR, ignore_errors=True)
    return written


# --------------------------------------------------------------------------------------------
# schema validation


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _builtin_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    """The subset of JSON Schema that report_schema.json uses: $ref, type, const, enum, required,
    properties, additionalProperties, items, minimum."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _builtin_errors(value, target, root, where)
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: {value!r:.60} is not of type {' or '.join(types)}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r:.60} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r:.60} is not one of {schema['enum']!r}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} is less than the minimum of {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: {key!r} is a required property")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += _builtin_errors(item, properties[key], root, f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: additional property {key!r} is not allowed")
            elif isinstance(extra, dict):
                errors += _builtin_errors(item, extra, root, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += _builtin_errors(item, schema["items"], root, f"{where}[{i}]")
    return errors


def report_errors(data: Any, *, use_jsonschema: bool | None = None) -> list[str]:
    """Every way ``data`` violates ``report_schema.json`` (empty when it is valid).

    Uses the ``jsonschema`` package when it is installed (``use_jsonschema=None``), else a
    built-in checker of the keywords the schema uses; ``True``/``False`` force one or the other.
    """
    schema = load_schema()
    if use_jsonschema is not False:
        try:
            import jsonschema
        except ModuleNotFoundError:
            if use_jsonschema:
                raise
        else:
            validator = jsonschema.Draft202012Validator(schema)
            return [
                f"$.{'.'.join(str(p) for p in error.absolute_path)}: {error.message}".replace("$.:", "$:")
                for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
            ]
    return _builtin_errors(data, schema, schema, "$")


def validate_report(data: Any, *, use_jsonschema: bool | None = None) -> None:
    """Raise :class:`ReportSchemaError` listing every problem when ``data`` is not a valid report."""
    errors = report_errors(data, use_jsonschema=use_jsonschema)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ReportSchemaError(f"the saliency report does not match report_schema.json:\n  {shown}{more}")


# --------------------------------------------------------------------------------------------
# HTML

FIGURE_CAPTIONS = {
    "consistency_vs_fidelity": "Each model's consistency C (over its pairs) against its explanations' infidelity, "
                               "relative infidelity and sensitivity (Watson et al.'s second panel); bars: 95% intervals.",
    "input_shift_maps": "Raw maps (channels summed, each input divided by its max |a1|) of the model on x, of the "
                        "input-shifted model on x + m, and their difference, on one colour scale.",
    "randomization_strip": "The original model's map, then the map after each layer's randomization, with the "
                           "similarity (SSIM, or Spearman for tabular and text maps) to the original under each panel.",
    "ssim_curve": "Mean similarity per layer with its spread over images, against its threshold.",
    "agreement_matrices": "Method \u00d7 method agreement, one matrix per metric.",
    "agreement_maps": "Each method's map for the first images.",
    "sweep_curves": "Mean similarity (\u00b11 std over images) per swept value, against the threshold.",
    "ensemble_curve": "Consistency between disjoint ensembles, per ensemble size.",
    "pair_matrices": "Pairwise values, one matrix per quantity.",
    "baseline_comparison": "Baseline, current map and their difference for the worst images.",
    "baseline_written": "The maps stored as the new baseline.",
    "model_maps": "Each model's map for the first inputs (the inputs on top), on one colour scale.",
}


def _caption(name: str) -> str:
    """A figure's caption; ``model_maps_size2`` (one per ensemble size) reads as ``model_maps`` for that size."""
    if name in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[name]
    match = re.fullmatch(r"model_maps_size(\d+)", name)
    if match and match.group(1) == "1":
        return FIGURE_CAPTIONS["model_maps"]
    if match:
        return (f"Each ensemble's map (ensembles of {match.group(1)} models) for the first inputs "
                "(the inputs on top), on one colour scale.")
    return name.replace("_", " ")

KIND_TITLES = {  # also the order of the groups on the page
    "independent_layer_randomization": "Independent layer randomization",
    "cascading_layer_randomization": "Cascading layer randomization",
    "efficient_randomization": "Efficient randomization (eMPRT, fast gate)",
    "smooth_layer_randomization": "Smooth layer randomization (sMPRT)",
    "random_logit": "Random logit",
    "data_randomization": "Data randomization",
    "method_agreement": "Method agreement",
    "hyperparameter_stability": "Hyperparameter stability",
    "input_noise_stability": "Input-noise stability",
    "explanation_consistency": "Explanation consistency",
    "seed_consistency": "Seed consistency",
    "explainer_seed_stability": "Explainer seed stability",
    "consistency_vs_ensemble_size": "Consistency vs ensemble size",
    "accuracy_spread": "Explanation accuracy spread",
    "baseline": "Baselines",
    "input_shift_invariance": "Input-shift invariance",
}

#: The page's template; it includes header.html.j2, card.html.j2 (one per check), macros.html.j2 and
#: style.css.j2, all in ``pytest_saliency/reporting/templates``.
PAGE_TEMPLATE = "report.html.j2"


@functools.lru_cache(maxsize=1)
def template_environment() -> Environment:
    """The Jinja2 environment of the report's templates; autoescaping is on, so every text passed to a
    template (test names, layer names, messages) is escaped, and a template may not mark it safe."""
    return Environment(loader=PackageLoader("pytest_saliency.reporting", "templates"), autoescape=True,
                       trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return format_score(value, digits)
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return "[" + ", ".join(_fmt(v, digits) for v in value[:6]) + f", \u2026 ({len(value)} values)]"
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, digits)}" for k, v in value.items())
    return str(value)


_PLAIN_STATUSES = {"", "passed", "failed", "pass", "fail", "compared", "ok"}


def _verdict(entry: dict[str, Any]) -> tuple[str, str]:
    """(badge text, css class): PASS / FAIL, REPORT for a check with no verdict, or FAILED AS
    EXPECTED for a control its test caught."""
    if entry.get("outcome") == CONTROL_CAUGHT:
        return "FAILED AS EXPECTED (control caught)", "expected"
    if str(entry.get("status") or "").lower() == "report":
        return "REPORT", "other"
    return ("PASS", "pass") if entry.get("passed") else ("FAIL", "fail")


#: A failed check's test outcome that the page names next to its FAIL badge (the check still counts as failed).
_TEST_BADGES = {"xfailed": "TEST XFAILED", "error": "TEST ERROR"}


def _badge(entry: dict[str, Any]) -> dict[str, Any]:
    """The badge of an entry (see the ``badge`` macro): its verdict, then extra badges for its status
    when that says more (e.g. a baseline ``written`` or ``updated``) and for the outcome of a failed
    check's test when the test did not simply fail (``xfailed``: the failure was expected)."""
    text, css = _verdict(entry)
    status = str(entry.get("status") or "")
    extras = [status.upper()] if status.lower() not in _PLAIN_STATUSES | {"report"} else []
    if not entry.get("passed") and str(entry.get("outcome")) in _TEST_BADGES:
        extras.append(_TEST_BADGES[str(entry.get("outcome"))])
    return {"text": text, "css": css, "extras": extras}


def _kv_rows(items: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Rows of a key/value table (the ``kv_table`` macro), values formatted."""
    return [(str(k), _fmt(v)) for k, v in items]


Cell = dict[str, Any]  # {"text", "css", "name"}: a table cell (the ``table`` macro)
Block = dict[str, Any]  # {"type": "table" | "kv" | "note", ...}: what a card shows under its figures


def _name_cell(name: Any) -> Cell:
    """A layer or parameter name in a table: the whole name, wrapped where the cell is narrow, and in
    a ``title`` tooltip; the root module's ``""`` reads ``(model)``."""
    return {"text": layer_label(name), "css": "name", "name": True}


def _table(headers: Sequence[str], rows: Iterable[tuple[Sequence[Any], bool]], numeric: set[int] | None = None,
           *, heading: str | None = None, note: str | None = None, more: str | None = None) -> Block:
    """A table block: ``numeric`` columns are right-aligned, a last ``verdict`` column is marked, a
    row's ``bad`` flag highlights it; ``heading`` (with ``note`` in brackets) and ``more`` frame it."""
    numeric = numeric or set()
    verdict = bool(headers) and headers[-1] == "verdict"
    body = []
    for cells, bad in rows:
        tds = []
        for i, cell in enumerate(cells):
            css = ["num"] if i in numeric else []
            if verdict and i == len(cells) - 1:
                css.append("verdict")
            if isinstance(cell, dict):
                tds.append({**cell, "css": " ".join([*css, cell.get("css", "")]).strip()})
            else:
                tds.append({"text": str(cell), "css": " ".join(css), "name": False})
        body.append({"bad": bool(bad), "cells": tds})
    return {"type": "table", "heading": heading, "heading_note": note, "more": more, "rows": body,
            "headers": [{"text": str(h), "num": i in numeric} for i, h in enumerate(headers)]}


def _note(text: str, label: str | None = None) -> Block:
    return {"type": "note", "text": text, "label": label}


def _preset_name(data: dict[str, Any]) -> Any:
    preset = data.get("preset")
    return preset.get("name") if isinstance(preset, dict) else preset


# per-kind: key numbers and tables from to_dict() data only


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


def _dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _floor_numbers(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """The noise floor's panel entry (checks.controls): the controls' S^I and the method's own
    repeat level; bad when the check required being above them and is not."""
    controls = data.get("controls")
    if not isinstance(controls, dict):
        return []
    text = (f"edge {_fmt(controls.get('edge'))} · noise {_fmt(controls.get('random'))} · "
            f"own repeat {_fmt(controls.get('repeat'))}")
    return [("controls (S^I)", text, bool(controls.get("require_above_controls")) and not controls.get("above_controls"))]


def _randomization_numbers(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    layers = _list(data, "layers")
    insensitive = [layer for layer in layers if isinstance(layer, dict) and not layer.get("sensitive", True)]
    score, threshold = data.get("dataset_score"), data.get("sensitivity_threshold")
    ci = data.get("dataset_score_ci") or [None, None]
    below = isinstance(score, (int, float)) and isinstance(threshold, (int, float)) and score < threshold
    mode = str(data.get("mode", ""))
    if data.get("order") not in (None, "n/a"):
        mode += f", {str(data.get('order')).replace('_', '-')}"
    confidence = data.get("confidence")
    conf = f"{confidence:.0%} " if isinstance(confidence, (int, float)) else ""
    return [
        ("S^I (dataset sensitivity)", f"{_fmt(score)}  (\u2265 {format_threshold(threshold)} needed)", below),
        (f"{conf}CI of S^I", f"{_fmt(ci[0])} \u2013 {_fmt(ci[1])}" if len(ci) == 2 else _fmt(ci), False),
        ("insensitive layers",
         f"{len(insensitive)} of {len(layers)} (mean {_similarity_label(data)} \u2265 "
         f"{format_threshold(data.get('ssim_threshold'))})",
         bool(insensitive)),
        ("images sensitive to every layer", _pct(data.get("fraction_images_sensitive_to_all_layers")), False),
        ("compared by", f"{_similarity_label(data)} ({data.get('modality', 'image')} maps); chance "
                        f"{_fmt(data.get('chance'))}", False),
        *_floor_numbers(data),
        ("method", data.get("method", "n/a"), False),
        *([("smoothing", data["smoothing"], False)] if data.get("smoothing") else []),
        ("preset", _preset_name(data) or "n/a", False),
        ("mode", mode or "n/a", False),
        ("randomization", data.get("randomization", "n/a"), False),
        ("images", _fmt(data.get("n_images")), False),
        ("seed \u00b7 device", f"{_fmt(data.get('seed'))} \u00b7 {_fmt(data.get('device'))}", False),
        ("time", _seconds(data.get("seconds")), False),
    ]


def _similarity_label(data: dict[str, Any]) -> str:
    """The randomization check's comparison as people write it (results before it was recorded: SSIM)."""
    return {"spearman": "Spearman", "pearson": "Pearson"}.get(str(data.get("similarity", "ssim")), "SSIM")


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _seconds(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _randomization_table(data: dict[str, Any]) -> list[Block]:
    layers = [layer for layer in _list(data, "layers") if isinstance(layer, dict)]
    if not layers:
        return []
    rows = []
    for layer in layers:
        sensitive = bool(layer.get("sensitive", True))
        cells = [_name_cell(layer.get("name", "?")), _fmt(layer.get("mean_ssim")), _fmt(layer.get("std_ssim"), 3),
                 _fmt(layer.get("min_ssim"), 3), _fmt(layer.get("max_ssim"), 3),
                 _pct(layer.get("fraction_sensitive")), "sensitive" if sensitive else "INSENSITIVE"]
        rows.append((cells, not sensitive))
    order = "in randomization order" if data.get("mode") == "cascading" else "in the model's order"
    return [_table(["layer", f"mean {_similarity_label(data)}", "std", "min", "max", "images sensitive", "verdict"], rows,
                   numeric={1, 2, 3, 4, 5}, heading=f"Per layer ({order})")]


def _agreement_numbers(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    pairs = [p for p in _list(data, "pairs") if isinstance(p, dict)]
    failing = [p for p in pairs if p.get("failing")]
    defined = [p for p in pairs if isinstance(p.get("mean"), (int, float))]
    lowest = min(defined, key=lambda p: p["mean"], default=None)
    return [
        ("failing pairs", f"{len(failing)} of {len(pairs)}" if data.get("threshold") is not None else "no threshold",
         bool(failing)),
        ("threshold", f"{format_threshold(data.get('threshold'))} on the {data.get('statistic', 'mean')}", False),
        ("lowest mean", "n/a" if lowest is None else
         f"{lowest.get('metric')}({lowest.get('method_a')}, {lowest.get('method_b')}) = {_fmt(lowest['mean'])}",
         False),
        ("methods", ", ".join(map(str, data.get("methods") or [])) or "n/a", False),
        ("metrics", ", ".join(map(str, data.get("metrics") or [])) or "n/a", False),
        ("k (top-k)", _fmt(data.get("k")), False),
        ("preset", _preset_name(data) or "n/a", False),
        ("images", _fmt(data.get("n_images")), False),
        ("seed \u00b7 device", f"{_fmt(data.get('seed'))} \u00b7 {_fmt(data.get('device'))}", False),
        ("time", _seconds(data.get("seconds")), False),
    ]


def _chance(pair: dict[str, Any]) -> str:
    """A pair's chance level and where it comes from, as the result's summary writes it."""
    measured = pair.get("chance_measured")
    where = f"theory {_fmt(pair.get('chance_theory'), 3)}"
    if measured is not None:
        where += f", different inputs {_fmt(measured, 3)}"
    return f"{_fmt(pair.get('chance'), 3)} ({where})"


def _agreement_table(data: dict[str, Any]) -> list[Block]:
    pairs = [p for p in _list(data, "pairs") if isinstance(p, dict)]
    if not pairs:
        return []
    confidence = data.get("confidence")
    conf = f"{confidence:.0%} CI" if isinstance(confidence, (int, float)) else "CI"
    has_threshold = data.get("threshold") is not None

    def bad(p: dict[str, Any]) -> bool:
        return p.get("failing") is True

    rows = []
    for p in sorted(pairs, key=lambda p: not bad(p)):
        verdict = ("BELOW THRESHOLD" if bad(p) else "ok") if has_threshold else "\u2013"
        rows.append(([f"{p.get('method_a')} vs {p.get('method_b')}", p.get("metric", "?"), _fmt(p.get("mean"), 4),
                      _fmt(p.get("std"), 3), f"{_fmt(p.get('ci_low'), 3)} .. {_fmt(p.get('ci_high'), 3)}",
                      _chance(p), str(p.get("undefined", 0)), verdict], bad(p)))
    return [_table(["pair", "metric", "mean", "std", conf, "chance", "undefined", "verdict"], rows,
                   numeric={2, 3, 4, 5, 6}, heading="Pairs (failing first)")]


def _sweep_numbers(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    least = _dict(data, "least_stable") or None
    failures = _list(data, "failures")
    threshold = data.get("threshold")
    op = ">=" if data.get("higher_is_better", True) else "<="
    reference = data.get("reference")
    return [
        ("failing values", f"{len(failures)}" if threshold is not None else "no threshold (report only)",
         bool(failures)),
        ("threshold", "n/a" if threshold is None else f"mean {data.get('metric')} {op} {format_threshold(threshold)}", False),
        ("least stable", "n/a" if least is None else
         f"{least.get('hyperparameter')}={_fmt(least.get('value'))}: {_fmt(least.get('mean'), 4)}", bool(failures)),
        ("method", data.get("method", "n/a"), False),
        ("reference", _sweep_reference(data, reference), False),
        ("metrics", ", ".join(map(str, data.get("metrics") or [])) or "n/a", False),
        ("preset", _preset_name(data) or "n/a", False),
        ("images", _fmt(data.get("n_images")), False),
        ("seed \u00b7 device", f"{_fmt(data.get('seed'))} \u00b7 {_fmt(data.get('device'))}", False),
        ("time", _seconds(data.get("seconds")), False),
    ]


def _sweep_reference(data: dict[str, Any], reference: Any) -> str:
    """The setting every map is compared with: the hyperparameters given as the reference, and for
    each swept one left at the method's default, that default (each table's ``reference_value``)."""
    if data.get("check") == "input_noise_stability":
        return "the clean inputs"
    shown: dict[str, Any] = {str(k): v for k, v in reference.items()} if isinstance(reference, dict) else {}
    for table in _list(data, "tables"):
        if isinstance(table, dict) and "reference_value" in table:
            name = str(table.get("hyperparameter", "?"))
            if name == "setting" and isinstance(table["reference_value"], dict):
                for key, value in table["reference_value"].items():
                    shown.setdefault(str(key), value)
            else:
                shown.setdefault(name, table["reference_value"])
    if not shown:
        return _fmt(reference) if reference not in (None, {}) else "the method's defaults"
    return ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())


def _sweep_tables(data: dict[str, Any]) -> list[Block]:
    """One table per swept hyperparameter: value, mean +- std per metric, verdict."""
    tables = [t for t in _list(data, "tables") if isinstance(t, dict) and isinstance(t.get("rows"), list)]
    metrics = [str(m) for m in _list(data, "metrics")]
    failing = {(str(f.get("hyperparameter")), repr(f.get("value"))) for f in _list(data, "failures")
               if isinstance(f, dict)}
    has_threshold = data.get("threshold") is not None
    parts: list[Block] = []
    for table in tables:
        name = str(table.get("hyperparameter", "?"))
        rows = []
        for row in table["rows"]:
            if not isinstance(row, dict):
                continue
            means, stds = _dict(row, "mean"), _dict(row, "std")
            bad = (name, repr(row.get("value"))) in failing
            cells = [_fmt(row.get("value"))]
            cells += [f"{_fmt(means.get(m), 4)} \u00b1 {_fmt(stds.get(m), 4)}" for m in metrics]
            cells.append(("UNSTABLE" if bad else "ok") if has_threshold else "\u2013")
            rows.append((cells, bad))
        means = _dict(table, "dataset_mean")
        dataset = ", ".join(f"{m} {_fmt(means.get(m), 4)}" for m in metrics)
        parts.append(_table(["value"] + [f"{m} mean \u00b1 std" for m in metrics] + ["verdict"], rows,
                            numeric=set(range(1, len(metrics) + 1)), heading=name,
                            note=f"reference {_fmt(table.get('reference_value'))}; "
                                 f"dataset mean over values: {dataset}"))
    note = data.get("note")
    if isinstance(note, str) and note:
        parts.append(_note(note))
    return parts


def _consistency_numbers(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """Explanation (seed) consistency of several models, with readable labels."""
    metric = str(data.get("metric", "lr_separability"))
    score, threshold = data.get("score"), data.get("threshold")
    below = isinstance(score, (int, float)) and isinstance(threshold, (int, float)) and score < threshold
    label = "C (explanation consistency)" if metric == "lr_separability" else f"mean {metric} over model pairs"
    needed = "no threshold (report only)" if threshold is None else f"\u2265 {format_threshold(threshold)} needed"
    similarities, baselines = _dict(data, "similarities"), _dict(data, "baselines")
    per_factor = _dict(data, "per_factor")
    items: list[tuple[str, Any, bool]] = [(label, f"{_fmt(score)}  ({needed})", below)]
    if metric != "lr_separability":
        items.append(("C (explanation consistency)", _fmt(data.get("consistency")), False))
    items.append(("mean held-out LR accuracy", f"{_fmt(data.get('mean_lr_accuracy'))} (0.5 = maps alike)", False))
    for name, value in similarities.items():
        items.append((f"mean {name} (chance: different inputs)", f"{_fmt(value)} ({_fmt(baselines.get(name))})",
                      False))
    if per_factor:
        items.append(("C per training factor", ", ".join(f"{k}: {_fmt(v)}" for k, v in per_factor.items()), False))
    items += [
        ("models", ", ".join(map(str, data.get("models") or [])) or "n/a", False),
        ("method", data.get("method", "n/a"), False),
        ("preset", _preset_name(data) or "n/a", False),
        ("inputs", _fmt(data.get("n_inputs")), False),
        ("seed \u00b7 device", f"{_fmt(data.get('seed'))} \u00b7 {_fmt(data.get('device'))}", False),
        ("time", _seconds(data.get("seconds")), False),
    ]
    return items


def _consistency_table(data: dict[str, Any]) -> list[Block]:
    """One row per model pair, the most separable first."""
    pairs = [p for p in _list(data, "pairs") if isinstance(p, dict)]
    if not pairs:
        return []
    metrics = [str(m) for m in _list(data, "metrics")]
    rows = []
    for p in sorted(pairs, key=lambda p: -(p.get("separability") or 0.0)):
        sims = _dict(p, "similarities")
        rows.append(([f"{p.get('a')} vs {p.get('b')}", p.get("factor") or "\u2013", _fmt(p.get("lr_accuracy")),
                      _fmt(p.get("train_accuracy")), _fmt(p.get("separability")), _pct(p.get("prediction_agreement"))]
                     + [_fmt(sims.get(m)) for m in metrics], False))
    headers = ["model pair", "training factor", "held-out LR accuracy", "train accuracy", "separability S",
               "same prediction"] + [f"mean {m}" for m in metrics]
    return [_table(headers, rows, numeric=set(range(2, len(headers))),
                   heading="Model pairs (most separable first)")]


_SKIP_KEYS = {"check", "passed", "reproduce", "preset"}
_NAME_KEYS = {"layer", "name", "parameter", "module"}  # columns of layer or parameter names


def _is_number_column(values: Sequence[Any]) -> bool:
    """Numbers (or missing values), at least one: the column is right-aligned."""
    numbers = [v for v in values if v is not None]
    return bool(numbers) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _entry_numbers(entry: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """The result's headline numbers (``CheckResult.numbers()``), for kinds with no panel of their own;
    without any, the result's top-level single values (so that such a card is not empty)."""
    numbers = _dict(entry, "numbers") or {key: value for key, value in _dict(entry, "result").items()
                                          if key not in _SKIP_KEYS and _is_scalar(value)}
    return [(str(key).replace("_", " "), _fmt(value), False) for key, value in numbers.items()]


def _generic_tables(data: dict[str, Any], depth: int = 0, prefix: str = "") -> list[Block]:
    """Lists of records as tables, nested dicts as key/value tables; long number lists abridged."""
    parts: list[Block] = []
    for key, value in data.items():
        title = f"{prefix}{key}"
        if key in _SKIP_KEYS and not prefix:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            headers = list(dict.fromkeys(k for v in value[:200] for k in v))
            rows = [([_name_cell(v.get(h)) if h in _NAME_KEYS and isinstance(v.get(h), str) else _fmt(v.get(h), 4)
                      for h in headers], v.get("passed") is False or v.get("sensitive") is False)
                    for v in value[:200]]
            more = f"{len(value) - 200} more rows in the JSON report." if len(value) > 200 else None
            numeric = {i for i, h in enumerate(headers) if _is_number_column([v.get(h) for v in value[:200]])}
            parts.append(_table(headers, rows, numeric, heading=title, more=more))
        elif isinstance(value, dict) and value:
            scalars = [(k, v) for k, v in value.items() if _is_scalar(v) or (isinstance(v, list) and all(
                _is_scalar(x) for x in v))]
            if scalars:
                parts.append({"type": "kv", "heading": title, "rows": _kv_rows(scalars)})
            nested = {k: v for k, v in value.items() if (k, v) not in scalars}
            if nested and depth < 2:
                parts += _generic_tables(nested, depth + 1, f"{title}.")
        elif isinstance(value, list) and value and all(_is_scalar(v) for v in value) and not prefix:
            parts.append(_note(_fmt(value), label=title))
    return parts


def _image(root: Path, relative: str) -> str | None:
    path = (root / relative)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


Panel = tuple[Callable[[dict[str, Any]], list[tuple[str, Any, bool]]], Callable[[dict[str, Any]], list[Block]]]

# Check kinds with a numbers panel and tables of their own, read from the entry's ``result``
# (the result's to_dict()). Other kinds show their numbers() and their to_dict() as tables.
PANELS: dict[str, Panel] = {
    "independent_layer_randomization": (_randomization_numbers, _randomization_table),
    "cascading_layer_randomization": (_randomization_numbers, _randomization_table),
    "smooth_layer_randomization": (_randomization_numbers, _randomization_table),
    "method_agreement": (_agreement_numbers, _agreement_table),
    "hyperparameter_stability": (_sweep_numbers, _sweep_tables),
    "input_noise_stability": (_sweep_numbers, _sweep_tables),
    "explanation_consistency": (_consistency_numbers, _consistency_table),
    "seed_consistency": (_consistency_numbers, _consistency_table),
}


def _figures(entry: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The entry's figures, each ``{name, caption, relative, uri}`` (``uri`` None when its PNG is missing)."""
    figures = []
    for name, relative in (entry.get("figures") or {}).items():
        figures.append({"name": str(name), "caption": _caption(str(name)),
                        "relative": str(relative), "uri": _image(root, str(relative))})
    return figures


def _number_cell(label: Any, value: Any, bad: bool) -> dict[str, Any]:
    """One headline number (the ``numbers`` macro); a long value (a path, a list of methods) gets a
    ``span`` of two or three grid columns instead of breaking inside its words in a narrow box."""
    text = str(value)
    return {"label": str(label), "value": text, "bad": bool(bad), "span": 1 if len(text) <= 24 else
            2 if len(text) <= 60 else 3}


_STATE_CSS = {"pass": "", "fail": "failed", "other": "other", "expected": "expected"}


def _card(entry: dict[str, Any], root: Path) -> dict[str, Any]:
    """The context of one check's card (``card.html.j2``)."""
    data = _dict(entry, "result")
    check = str(entry.get("check", ""))
    if check in PANELS:
        numbers_of, table_of = PANELS[check]
        numbers, blocks = numbers_of(data), table_of(data)
    else:
        numbers, blocks = _entry_numbers(entry), _generic_tables(data)
    raw = json.dumps(data, indent=1)
    return {
        "anchor": str(entry.get("anchor") or sanitize(f"{entry.get('nodeid')}{check}")),
        "state": _STATE_CSS[_verdict(entry)[1]],
        "badge": _badge(entry),
        "nodeid": str(entry.get("nodeid", "")),
        "kind": check,
        "worker": str(entry["worker"]) if entry.get("worker") else None,
        "summary": str(entry.get("summary", "")),
        "numbers": [_number_cell(label, value, bad) for label, value, bad in numbers],
        "figures": _figures(entry, root),
        "figure_errors": [str(error) for error in entry.get("figure_errors") or []],
        "blocks": blocks,
        "reproduce": str(data["reproduce"]) if data.get("reproduce") else None,
        "text": str(entry["text"]) if entry.get("text") else None,
        "raw_json": raw if len(raw) <= 60_000 else None,
    }


_OUTCOME_CSS = {"passed": "pass", "failed": "fail", "error": "fail", "xpassed": "other"}


def _tests_context(tests: Sequence[dict[str, Any]], counts: dict[str, Any]) -> dict[str, Any] | None:
    """The saliency tests' counts by pytest's outcome, and the tests that did not pass with
    their outcome and message (an error, a skip reason...); None without test outcomes."""
    if not counts:
        return None
    return {
        "counts": [{"name": name, "count": counts.get(name, 0), "fail": name in ("failed", "error")
                    and bool(counts.get(name))} for name in TEST_OUTCOMES],
        "others": [{"outcome": str(t.get("outcome", "")).upper(),
                    "css": _OUTCOME_CSS.get(str(t.get("outcome")), "other"),
                    "nodeid": str(t.get("nodeid", "")), "message": str(t.get("message") or "")}
                   for t in tests if t.get("outcome") != "passed"],
    }


def _kind_title(kind: str) -> str:
    return KIND_TITLES.get(kind, kind.replace("_", " ").capitalize())


def _rank(entry: dict[str, Any]) -> int:
    """A card's place in its group: failed checks first, then controls caught, then the others."""
    if entry.get("passed"):
        return 2
    return 1 if entry.get("outcome") == CONTROL_CAUGHT else 0


def _groups(entries: Sequence[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """The cards grouped by check kind (in ``KIND_TITLES``' order), failed first within a group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(str(entry.get("check", "")), []).append(entry)
    known = list(KIND_TITLES)
    kinds = sorted(groups, key=lambda k: (known.index(k) if k in known else len(known), k))
    shown = []
    for kind in kinds:
        members = sorted(groups[kind], key=lambda e: (_rank(e), _sort_key(e)))
        bad = sum(1 for e in members if not e.get("passed") and e.get("outcome") != CONTROL_CAUGHT)
        count = f"{len(members)} check{'s' if len(members) != 1 else ''}" + (f", {bad} failed" if bad else "")
        shown.append({"id": "kind-" + re.sub(r"[^A-Za-z0-9_-]+", "-", kind), "title": _kind_title(kind),
                      "count": count, "cards": [_card(entry, root) for entry in members]})
    return shown


def _page_context(document: dict[str, Any], root: Path, with_json: bool) -> dict[str, Any]:
    """The context of ``report.html.j2``: plain data, every text unescaped (the templates escape)."""
    entries = [e for e in document.get("results", []) if isinstance(e, dict)]
    summary = document.get("summary") or summarize(entries)
    groups = _groups(entries, root)
    failed, passed = summary.get("failed", 0), summary.get("passed", 0)
    tests = [t for t in document.get("tests", []) if isinstance(t, dict)]
    return {
        "title": f"Saliency checks: {failed} failed, {passed} passed",
        "created": str(document.get("created", "")),
        "schema_version": str(document.get("schema_version", "")),
        "counts": {"checks": summary.get("checks", len(entries)), "passed": passed, "failed": failed,
                   "caught": summary.get("controls_caught", 0), "kinds": len(groups)},
        "tests": _tests_context(tests, summary.get("tests") or {}),
        "config": _kv_rows((document.get("config") or {}).items()),
        "environment": _kv_rows((document.get("environment") or {}).items()),
        "groups": groups,
        "json_name": JSON_NAME if with_json else None,
    }


def render_html(document: dict[str, Any], results_dir: str | os.PathLike[str], *, with_json: bool = True) -> str:
    """The self-contained HTML page for a report document; figures are read from ``results_dir``.

    Everything is inline (CSS, PNGs as ``data:`` URIs); the page makes no request and needs no
    JavaScript. ``with_json`` says whether the footer may point to ``saliency-report.json``.
    Python computes each card's data; the layout is in ``templates/`` (see :data:`PAGE_TEMPLATE`).
    """
    context = _page_context(document, Path(results_dir), with_json)
    return template_environment().get_template(PAGE_TEMPLATE).render(context)


__all__ = [
    "HTML_NAME", "JSON_NAME", "REPORT_FORMATS", "ReportEntry", "ReportSchemaError", "SCHEMA_VERSION",
    "CONTROL_CAUGHT", "TEST_OUTCOMES", "apply_outcomes", "build_report", "collect_entries", "environment_info", "html_link", "load_schema", "make_entry", "parse_formats",
    "prepare_results_dir", "read_entry", "render_html", "template_environment", "report_errors", "results_dir_problem", "sanitize",
    "summarize", "validate_report",
    "write_entry", "write_reports",
]
