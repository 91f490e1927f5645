"""Report entries, the xdist-style merge, the JSON schema and the self-contained HTML page."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency.reporting import report
from pytest_saliency.checks.agreement import agreement_matrix
from pytest_saliency.checks.randomization import layer_randomization
from pytest_saliency.reporting.report import (
    ReportSchemaError, collect_entries, html_link, make_entry, parse_formats, prepare_results_dir, read_entry,
    report_errors, validate_report, write_entry, write_reports,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Result:
    """The CheckResult protocol with nothing to say: subclasses fill in what they test."""

    check = "result"
    passed = True

    def numbers(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        return {"check": self.check, "passed": self.passed}

    def summary(self) -> str:
        return f"PASS {self.check}"

    def report(self) -> str:
        return ""

    def failure_message(self) -> str:
        return self.summary()

    def figures(self) -> list:
        return []


class Custom(Result):
    """A result kind the report knows nothing about: its numbers and a table, no figures."""

    check = "insertion_deletion"

    def numbers(self) -> dict:
        return {"deletion_auc": 0.21, "random_auc": math.nan, "n_images": 3}

    def summary(self) -> str:
        return "PASS insertion_deletion: deletion AUC 0.21 < random 0.45"

    def to_dict(self) -> dict:
        return {"check": self.check, "passed": True, "deletion_auc": 0.21, "random_auc": math.nan,
                "curve": [1.0, 0.5, 0.2], "per_class": [{"class": 0, "auc": 0.2}, {"class": 1, "auc": 0.22}],
                "note": "<b>escaped</b>"}


class NoVerdict(Result):
    check = "hyperparameter_stability"

    def summary(self) -> str:
        return "REPORT hyperparameter_stability [smoothgrad]: least stable: nt_samples=4"

    def to_dict(self) -> dict:
        return {"check": self.check, "passed": True, "threshold": None}


class WrittenBaseline(Result):
    check = "baseline"
    passed = False
    current_maps = np.random.default_rng(0).random((3, 16, 16))

    def summary(self) -> str:
        return "FAIL baseline [saliency]: written tests/baselines/x.npz"

    def to_dict(self) -> dict:
        return {"check": "baseline", "passed": False, "status": "written", "path": "tests/baselines/x.npz"}

    def figures(self) -> list:
        from pytest_saliency.reporting.figures import baseline_figures

        return baseline_figures(current_maps=self.current_maps, status="written", path="tests/baselines/x.npz")


@pytest.fixture(scope="module")
def results():
    model, x = make_tiny_cnn(), tiny_images(6)
    return {
        "tests/test_a.py::test_ipr": layer_randomization(model, x, "saliency", n_bootstrap=100),
        "tests/test_a.py::test_edge[abs]": layer_randomization(model, x, lambda m, i, t: i.abs(), n_bootstrap=100),
        "tests/test_b.py::test_agree": agreement_matrix(
            model, x, ["saliency", "guided_backprop"], ["feature_agreement", "ssim"], n_bootstrap=100, threshold=0.99,
        ),
        "tests/test_c.py::test_custom[<b>&amp;]": Custom(),
        "tests/test_d.py::test_new_baseline": WrittenBaseline(),
    }


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    """Every result written as entries, then merged into JSON and HTML."""
    root = tmp_path_factory.mktemp("report")
    prepare_results_dir(root)
    for nodeid, result in results.items():
        write_entry(result, nodeid, root, worker_id="gw0")
    entries = collect_entries(root)
    paths = write_reports(entries, root, config={"device": "cpu", "seed": None, "preset": "adebayo2018"},
                          environment={"device": "cpu", "gpus": []})
    return root, paths


def test_write_entry_renders_figures_and_an_entry_file(tmp_path, results):
    path = write_entry(results["tests/test_a.py::test_ipr"], "tests/test_a.py::test_ipr", tmp_path, worker_id="gw3")
    assert path.parent == tmp_path / ".entries" and path.name.startswith("gw3-") and path.suffix == ".json"
    entry = json.loads(path.read_text())
    assert {"nodeid", "check", "passed", "summary", "result", "figures"} <= entry.keys()
    assert entry["check"] == "independent_layer_randomization" and entry["passed"] is True
    assert entry["result"]["layers"][0]["name"] == "conv1"  # the full to_dict()
    assert entry["anchor"].endswith("__independent_layer_randomization__0") and entry["index"] == 0
    assert set(entry["figures"]) == {"randomization_strip", "ssim_curve"}
    for relative in entry["figures"].values():
        assert relative.startswith(entry["anchor"] + "/")
        assert (tmp_path / relative).read_bytes().startswith(PNG_MAGIC)
    assert "S^I" in entry["text"]  # result.report(), for the HTML's text section
    again = read_entry(write_entry(results["tests/test_a.py::test_ipr"], "tests/test_a.py::test_ipr", tmp_path))
    assert again["index"] == 1 and again["anchor"] != entry["anchor"]


def test_write_entry_without_figures(tmp_path, results):
    entry = json.loads(write_entry(results["tests/test_b.py::test_agree"], "t::a", tmp_path, figures=False).read_text())
    assert entry["figures"] == {} and not (tmp_path / entry["anchor"]).exists()
    assert any(p["failing"] for p in entry["result"]["pairs"]), "the failing agreement pairs are marked for the HTML"


def test_entries_of_unknown_and_verdict_less_results(tmp_path):
    custom = make_entry(Custom(), "t::custom")
    assert custom["result"]["random_auc"] is None  # strict JSON: NaN -> null
    assert custom["numbers"] == {"deletion_auc": 0.21, "random_auc": None, "n_images": 3}
    json.dumps(custom, allow_nan=False)
    entry = json.loads(write_entry(Custom(), "t::custom", tmp_path).read_text())
    assert entry["figures"] == {} and not (tmp_path / entry["anchor"]).exists()
    report_only = make_entry(NoVerdict(), "t::sweep")
    assert report_only["passed"] is True and report_only["status"] == "report"
    baseline = json.loads(write_entry(WrittenBaseline(), "t::base", tmp_path).read_text())
    assert baseline["status"] == "written" and set(baseline["figures"]) == {"baseline_written"}


def test_collect_sorts_and_skips_broken_files(tmp_path, results):
    order = ["tests/test_b.py::test_agree", "tests/test_a.py::test_ipr", "tests/test_a.py::test_edge[abs]"]
    for nodeid in order:
        write_entry(results[nodeid], nodeid, tmp_path, figures=False)
    (tmp_path / ".entries" / "gw9-1-2-deadbeef.json").write_text("{ truncated")
    (tmp_path / ".entries" / ".gw9-1-3.json.tmp").write_text("{}")
    errors: list[str] = []
    entries = collect_entries(tmp_path, errors)
    assert [e["nodeid"] for e in entries] == sorted(order)
    assert len(errors) == 1 and "gw9-1-2-deadbeef.json" in errors[0]
    assert collect_entries(tmp_path / "nowhere") == []


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from pytest_saliency.reporting.figures import randomization_figures
    from pytest_saliency.reporting.report import write_entry

    class Result:
        check = "independent_layer_randomization"
        def __init__(self, seed):
            rng = np.random.default_rng(seed)
            self.layers = ["conv1", "conv2", "fc"]
            self.ssim = rng.random((3, 5)).tolist()
            self.original_maps = rng.random((2, 16, 16))
            self.randomized_maps = rng.random((3, 2, 16, 16))
            self.passed = seed % 2 == 0
        def numbers(self):
            return {"n_images": 5}
        def summary(self):
            return ("PASS" if self.passed else "FAIL") + " independent_layer_randomization"
        def report(self):
            return ""
        def failure_message(self):
            return self.summary()
        def to_dict(self):
            return {"check": self.check, "passed": self.passed, "ssim": self.ssim}
        def figures(self):
            return randomization_figures(layers=self.layers, ssim=self.ssim, ssim_threshold=0.99,
                                         original_maps=self.original_maps, randomized_maps=self.randomized_maps)

    root, worker = sys.argv[1], sys.argv[2]
    for i in range(4):
        write_entry(Result(i), f"tests/test_{worker}.py::test_{i}", root)
""")


def test_two_workers_write_concurrently_and_the_controller_merges(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "results"
    prepare_results_dir(root)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), worker], env={**os.environ,
                         "PYTEST_XDIST_WORKER": worker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for worker in ("gw0", "gw1")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert not [p for p in (root / ".entries").iterdir() if p.name.startswith(".")], "temporary files left"
    entries = collect_entries(root)
    assert len(entries) == 8 and {e["worker"] for e in entries} == {"gw0", "gw1"}
    assert [e["nodeid"] for e in entries] == sorted(f"tests/test_{w}.py::test_{i}" for w in ("gw0", "gw1")
                                                    for i in range(4))
    paths = write_reports(entries, root, config={"workers": 2})
    assert not (root / ".entries").exists()
    data = json.loads(paths["json"].read_text())
    validate_report(data)
    assert data["summary"] == {"checks": 8, "passed": 4, "failed": 4, "controls_caught": 0, "by_check": {
        "independent_layer_randomization": {"checks": 8, "passed": 4, "failed": 4, "controls_caught": 0}}}
    page = paths["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 16


def test_threads_never_collide(tmp_path, results):
    result = results["tests/test_a.py::test_ipr"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: write_entry(result, "t::same", tmp_path, figures=False), range(20)))
    assert len(set(paths)) == 20
    assert sorted(e["index"] for e in collect_entries(tmp_path)) == list(range(20))


def test_json_report(written, results):
    root, paths = written
    data = json.loads(paths["json"].read_text())
    validate_report(data)
    assert report_errors(data, use_jsonschema=False) == []
    assert data["schema_version"] == report.SCHEMA_VERSION == 2 and data["created"].endswith("Z")
    assert data["config"] == {"device": "cpu", "seed": None, "preset": "adebayo2018"}
    env = data["environment"]
    assert env["device"] == "cpu" and env["python"] and env["torch"] and "numpy" in env and "captum" in env
    assert data["summary"]["checks"] == len(results) == len(data["results"])
    assert data["summary"]["failed"] == 3  # the edge detector, the agreement at 0.99, the written baseline
    assert [r["nodeid"] for r in data["results"]] == sorted(results)
    for entry in data["results"]:
        for relative in entry["figures"].values():
            assert (root / relative).is_file()
    assert not (root / ".entries").exists()


def test_the_schema_itself_is_valid_draft_2020_12():
    jsonschema = pytest.importorskip("jsonschema")
    schema = report.load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


BREAKAGES = {
    "no results": lambda d: d.pop("results"),
    "schema version 1": lambda d: d.update(schema_version=1),
    "schema version 3": lambda d: d.update(schema_version=3),
    "passed is a string": lambda d: d["results"][0].update(passed="yes"),
    "entry without nodeid": lambda d: d["results"][0].pop("nodeid"),
    "figure path is a number": lambda d: d["results"][0]["figures"].update(x=3),
    "negative count": lambda d: d["summary"].update(failed=-1),
    "environment without python": lambda d: d["environment"].pop("python"),
    "results is an object": lambda d: d.update(results={}),
}


@pytest.mark.parametrize("use_jsonschema", [False, True], ids=["builtin", "jsonschema"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_documents_do_not_validate(written, breakage, use_jsonschema):
    if use_jsonschema:
        pytest.importorskip("jsonschema")
    data = json.loads(written[1]["json"].read_text())
    BREAKAGES[breakage](data)
    assert report_errors(data, use_jsonschema=use_jsonschema)
    with pytest.raises(ReportSchemaError, match="does not match report_schema.json"):
        validate_report(data, use_jsonschema=use_jsonschema)


def test_html_is_self_contained(written, results):
    root, paths = written
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    for nodeid in results:
        assert nodeid.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page
    assert "<b>&amp;" not in page and "<b>escaped" not in page  # every text is escaped
    data = json.loads(paths["json"].read_text())
    n_figures = sum(len(e["figures"]) for e in data["results"])
    assert n_figures >= 6
    assert page.count('<img src="data:image/png;base64,') == n_figures
    sources = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)
    assert len(sources) == n_figures and all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r'\bhref\s*=\s*"([^"]*)"', page)
    assert links and all(link.startswith("#") for link in links)
    ids = set(re.findall(r'\bid="([^"]*)"', page))
    assert all(link[1:] in ids for link in links), "a table-of-contents link points nowhere"
    assert not re.search(r"https?://|url\(|@import|<script|<link", page, re.IGNORECASE)
    assert page.count('class="badge fail"') == 2 * 3  # table of contents + section, for each failed check
    assert ">WRITTEN<" in page and ">INSENSITIVE<" in page and ">BELOW THRESHOLD<" in page
    # failed checks first within a group: the edge detector before the passing IPR
    assert page.index('id="' + sanitize_anchor(data, "tests/test_a.py::test_edge[abs]")) < page.index(
        'id="' + sanitize_anchor(data, "tests/test_a.py::test_ipr"))


def sanitize_anchor(data: dict, nodeid: str) -> str:
    return next(e["anchor"] for e in data["results"] if e["nodeid"] == nodeid)


def test_formats_and_an_empty_session(tmp_path):
    assert parse_formats("json, HTML,json") == ("json", "html")
    assert parse_formats(["html"]) == ("html",)
    with pytest.raises(ValueError, match="unknown saliency report format.*pdf"):
        parse_formats("json,pdf")
    paths = write_reports([], tmp_path, formats="html")
    assert set(paths) == {"html"} and not (tmp_path / report.JSON_NAME).exists()
    assert "No saliency checks were recorded" in paths["html"].read_text()
    data = json.loads(write_reports([], tmp_path, formats=("json",))["json"].read_text())
    validate_report(data)
    assert data["summary"]["checks"] == 0


def test_prepare_results_dir_removes_only_what_a_session_left(tmp_path, results):
    write_entry(results["tests/test_a.py::test_ipr"], "t::old", tmp_path)
    stale = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    (tmp_path / "notes.txt").write_text("mine")
    own = tmp_path / "keep__this__0"
    own.mkdir()
    (own / "data.csv").write_text("1,2")
    prepare_results_dir(tmp_path)
    assert not (tmp_path / ".entries").exists() and not stale.exists()
    assert (tmp_path / "notes.txt").exists() and (own / "data.csv").exists()
    entry = json.loads(write_entry(results["tests/test_a.py::test_ipr"], "t::old", tmp_path).read_text())
    assert entry["index"] == 0  # counters restart with the session


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_html_report_renders_in_a_headless_browser(written, tmp_path):
    _, paths = written
    shot = tmp_path / "screenshot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2600",
        paths["html"].resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    if os.environ.get("SALIENCY_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["SALIENCY_SCREENSHOT"])
    image = imread(io.BytesIO(shot.read_bytes()), format="png")[..., :3]
    assert image.shape[:2] == (2600, 1200)
    assert image.std() > 0.1, "the screenshot is blank"
    saturation = image.max(axis=-1) - image.min(axis=-1)
    assert (saturation > 0.35).mean() > 0.01, "no colour figures visible in the first screen"


def test_entries_are_plain_json_copies(results):
    entry = make_entry(results["tests/test_b.py::test_agree"], "t::a")
    assert copy.deepcopy(entry) == json.loads(json.dumps(entry, allow_nan=False))


def test_the_html_link_of_an_entry(tmp_path, results):
    path = write_entry(results["tests/test_a.py::test_ipr"], "tests/test_a.py::test_ipr", tmp_path, figures=False)
    link = html_link(path)
    assert link == f"{tmp_path / report.HTML_NAME}#{read_entry(path)['anchor']}"
    page = write_reports(collect_entries(tmp_path), tmp_path, formats="html")["html"].read_text()
    assert f'id="{link.split("#")[1]}"' in page


def test_without_matplotlib_the_report_has_tables_and_says_why(tmp_path, results, monkeypatch):
    import importlib.util

    from pytest_saliency.reporting.figures import MISSING_MATPLOTLIB

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    entry = read_entry(write_entry(results["tests/test_a.py::test_ipr"], "t::ipr", tmp_path))
    assert entry["figures"] == {} and entry["figure_errors"] == [MISSING_MATPLOTLIB]
    monkeypatch.undo()
    page = write_reports(collect_entries(tmp_path), tmp_path, formats="html")["html"].read_text()
    assert "figures need matplotlib" in page and "INSENSITIVE" not in page and "mean SSIM" in page


def test_results_dir_problems_say_what_is_in_the_way_and_what_to_do(tmp_path):
    from pytest_saliency.reporting.report import results_dir_problem

    blocker = tmp_path / "file"
    blocker.write_text("")
    for root in (blocker, blocker / "out" / "deeper"):
        with pytest.raises(OSError) as info:
            prepare_results_dir(root)
        message = results_dir_problem(root, info.value)
        assert f"{blocker} is a file, not a folder" in message
        assert "choose another --saliency-results-dir" in message


def test_a_check_that_raised_in_a_passed_test_is_a_control_caught_not_a_failure(tmp_path):
    from pytest_saliency.reporting.report import apply_outcomes, render_html, summarize

    def entry(nodeid, passed, raised=False):
        return {"nodeid": nodeid, "check": "brightness_gate", "passed": passed, "summary": "x", "result": {},
                "figures": {}, **({"raised": True} if raised else {})}

    entries = [entry("t::ok", True), entry("t::control", False, raised=True), entry("t::recorded", False),
               entry("t::fails", False, raised=True), entry("t::xfail", False, raised=True)]
    tests = [{"nodeid": "t::ok", "outcome": "passed", "message": ""},
             {"nodeid": "t::control", "outcome": "passed", "message": ""},
             {"nodeid": "t::recorded", "outcome": "passed", "message": ""},
             {"nodeid": "t::fails", "outcome": "failed", "message": "SaliencyCheckFailed: dim"},
             {"nodeid": "t::xfail", "outcome": "xfailed", "message": "known"},
             {"nodeid": "t::skip", "outcome": "skipped", "message": "no GPU"}]
    apply_outcomes(entries, tests)
    assert [e["outcome"] for e in entries] == ["passed", "control_caught", "failed", "failed", "xfailed"]
    summary = summarize(entries, tests)
    assert (summary["passed"], summary["failed"], summary["controls_caught"]) == (1, 3, 1)
    assert summary["tests"] == {"passed": 3, "failed": 1, "error": 0, "skipped": 1, "xfailed": 1, "xpassed": 0}
    page = render_html({"summary": summary, "results": entries, "tests": tests}, tmp_path)
    assert page.count("FAILED AS EXPECTED (control caught)") == 2  # its badge in the contents and its card
    assert 'data-outcome="skipped"><b>1</b>' in page and "no GPU" in page


# One number format for people: the terminal summary and the HTML card write the same digits.

_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]\d+)?(?![\w.])")


def _card(page: str, data: dict, nodeid: str) -> str:
    """The HTML card of one entry, less what repeats the result's own text (its summary line, the
    text report and the JSON), so that only what the HTML writes itself is left."""
    start = page.index(f'id="{sanitize_anchor(data, nodeid)}"')
    card = page[start:page.index("</article>", start)]
    card = re.sub(r'<p class="summary[^"]*">.*?</p>', "", card, flags=re.S)
    return re.sub(r"<details>.*?</details>", "", card, flags=re.S)


def test_the_number_format():
    from pytest_saliency.reporting.numbers import format_score, format_threshold, layer_label

    assert format_score(0.1015625) == "0.1016" and format_score(1.0) == "1.0000" and format_score(-0.042) == "-0.0420"
    assert format_score(2.3456e-5) == "2.35e-05" and format_score(0.0) == "0.0000"  # tiny is not zero
    assert format_score(123456.7) == "1.235e+05" and format_score(12) == "12"
    assert format_score(None) == format_score(math.nan) == format_score(float("nan")) == "n/a"
    assert format_score(0.0776, 3) == "0.078"
    assert [format_threshold(t) for t in (0.5, 0.85, 0.025, 1e-6, 0.99, 2)] == ["0.5", "0.85", "0.025", "1e-06",
                                                                                "0.99", "2"]
    assert layer_label("") == "(model)" and layer_label(".weight") == "(model).weight"
    assert layer_label("features.0") == "features.0"


@pytest.mark.parametrize("nodeid", ["tests/test_a.py::test_ipr", "tests/test_a.py::test_edge[abs]",
                                    "tests/test_b.py::test_agree"])
def test_summary_numbers_read_the_same_in_the_html(written, results, nodeid):
    root, paths = written
    page, data = paths["html"].read_text(), json.loads(paths["json"].read_text())
    summary = results[nodeid].summary()
    numbers = _DECIMAL.findall(summary)
    assert len(numbers) >= 3, summary
    shown = set(_DECIMAL.findall(_card(page, data, nodeid)))
    assert set(numbers) <= shown, f"{sorted(set(numbers) - shown)} of {summary!r} are not in the HTML card"
    assert not re.search(r"\d\.\d{5,}", summary)  # no 0.101562: four decimals at most


def _randomization_entry(layers: list[dict]) -> dict:
    result = {"check": "independent_layer_randomization", "mode": "independent", "dataset_score": 0.5,
              "sensitivity_threshold": 0.01, "ssim_threshold": 0.99, "dataset_score_ci": [0.4, 0.6],
              "layers": [dict(mean_ssim=0.3, std_ssim=0.1, min_ssim=0.1, max_ssim=0.5, fraction_sensitive=1.0,
                              sensitive=True, **layer) for layer in layers]}
    return {"nodeid": "t::ipr", "check": result["check"], "passed": True, "summary": "PASS", "result": result,
            "figures": {}}


def test_layer_names_are_whole_and_the_root_module_has_a_name(tmp_path):
    long = "backbone.encoder_module.stage4.residual_block.conv1"
    page = report.render_html({"results": [_randomization_entry([{"name": ""}, {"name": long}])]}, tmp_path)
    assert f'title="{long}">{long}</span>' in page  # the whole name, with a tooltip; never "...le.block.conv1"
    assert "\u2026" + long[-12:] not in page and "..." + long[-12:] not in page
    assert 'title="(model)">(model)</span>' in page and "<td></td>" not in page
    assert re.search(r"td\.name \{[^}]*(word-break|overflow-wrap)", page)  # long names wrap in the cell


def test_a_real_root_owned_parameter_is_named_in_text_html_and_figures(tmp_path):
    import torch
    from collections import OrderedDict

    class Rooted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            block = torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv2d(1, 3, 3, padding=1)))
            self.encoder_module = torch.nn.Sequential(OrderedDict(block=block))
            self.scale = torch.nn.Parameter(torch.ones(3, 1, 1))  # owned by the root module: its layer is ""
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.relu(self.encoder_module(x) * self.scale).mean((2, 3)))

    torch.manual_seed(0)
    result = layer_randomization(Rooted().eval(), torch.rand(3, 1, 12, 12), "saliency", n_bootstrap=20)
    assert "" in [layer.name for layer in result.stats.layers]
    assert "(model)" in result.report()
    write_entry(result, "t::rooted", tmp_path)
    paths = write_reports(collect_entries(tmp_path), tmp_path, formats=("html",))
    page = paths["html"].read_text()
    assert 'title="(model)">(model)</span>' in page
    assert 'title="encoder_module.block.conv1">encoder_module.block.conv1</span>' in page


def test_tables_scroll_inside_the_card(written):
    root, paths = written
    page = paths["html"].read_text()
    assert re.search(r"\.scroll \{[^}]*overflow-x: auto", page)
    assert page.count("<table><thead>") == page.count('<div class="scroll"><table><thead>') > 0


def test_sweep_cards_show_the_reference_value(tmp_path):
    result = {"check": "hyperparameter_stability", "method": "integrated_gradients", "metric": "ssim",
              "metrics": ["ssim"], "threshold": 0.5, "reference": {},
              "tables": [{"hyperparameter": "n_steps", "reference_value": 50, "dataset_mean": {"ssim": 0.9},
                          "rows": [{"value": 10, "mean": {"ssim": 0.9}, "std": {"ssim": 0.01}}]}]}
    entry = {"nodeid": "t::sweep", "check": "hyperparameter_stability", "passed": True, "summary": "PASS",
             "result": result, "figures": {}}
    page = report.render_html({"results": [entry]}, tmp_path)
    assert "<dt>reference</dt><dd>n_steps=50</dd>" in page
    result["reference"] = {"baselines": "black"}
    page = report.render_html({"results": [entry]}, tmp_path)
    assert "<dt>reference</dt><dd>baselines=black, n_steps=50</dd>" in page
    entry["check"] = result["check"] = "input_noise_stability"
    page = report.render_html({"results": [entry]}, tmp_path)
    assert "<dt>reference</dt><dd>the clean inputs</dd>" in page


def test_seed_consistency_cards_have_readable_labels(tmp_path):
    pair = {"a": "seed0", "b": "seed1", "factor": "seed", "lr_accuracy": 0.62, "separability": 0.24,
            "train_accuracy": 0.9, "similarities": {"ssim": 0.41}, "prediction_agreement": 0.95,
            "baselines": {"ssim": 0.1}}
    result = {"check": "seed_consistency", "metric": "lr_separability", "threshold": 0.5, "score": 0.76,
              "consistency": 0.76, "per_factor": {"seed": 0.76}, "mean_lr_accuracy": 0.62,
              "similarities": {"ssim": 0.41}, "baselines": {"ssim": 0.1}, "models": ["seed0", "seed1"],
              "metrics": ["ssim"], "pairs": [pair], "method": "saliency", "n_inputs": 8, "seed": 0, "device": "cpu",
              "seconds": 1.5}
    entry = {"nodeid": "t::seeds", "check": "seed_consistency", "passed": True, "summary": "PASS", "result": result,
             "figures": {}}
    page = report.render_html({"results": [entry]}, tmp_path)
    for label in ("C (explanation consistency)", "mean held-out LR accuracy", "mean ssim (chance: different inputs)",
                  "C per training factor", "held-out LR accuracy", "separability S", "model pair"):
        assert label in page, label
    assert "<dd>0.7600  (\u2265 0.5 needed)</dd>" in page and "<dd>0.4100 (0.1000)</dd>" in page
    assert "<dt>mean lr accuracy</dt>" not in page  # not the raw field name


# The page's layout lives in Jinja2 templates (reporting/templates/*.j2); Python computes the data.


def test_the_page_is_rendered_from_autoescaping_package_templates(tmp_path):
    env = report.template_environment()
    assert env.autoescape is True
    names = set(env.list_templates())
    assert {"report.html.j2", "card.html.j2", "header.html.j2", "macros.html.j2", "style.css.j2"} <= names
    assert all(name.endswith(".j2") for name in names)
    hostile = "<script>alert(1)</script>&\"'"
    entry = {"nodeid": f"t::x[{hostile}]", "check": f"kind{hostile}", "passed": False, "summary": hostile,
             "text": hostile, "worker": hostile, "figures": {hostile: "missing.png"}, "figure_errors": [hostile],
             "result": {"reproduce": hostile, "rows": [{"name": hostile, "value": hostile}], "note": [hostile]},
             "status": hostile, "anchor": "a"}
    tests = [{"nodeid": hostile, "outcome": "error", "message": hostile}]
    page = report.render_html({"results": [entry], "tests": tests, "summary": report.summarize([entry], tests),
                               "config": {hostile: hostile}, "environment": {hostile: hostile},
                               "created": hostile}, tmp_path)
    assert "<script" not in page and "&\"'" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 15


def test_failed_checks_come_first_then_caught_controls_and_an_xfailed_test_is_named(tmp_path):
    def entry(nodeid, passed, outcome):
        return {"nodeid": nodeid, "check": "brightness_gate", "passed": passed, "summary": "x", "result": {},
                "figures": {}, "outcome": outcome}

    entries = [entry("t::a_control", False, report.CONTROL_CAUGHT), entry("t::b_pass", True, "passed"),
               entry("t::c_xfail", False, "xfailed"), entry("t::d_fail", False, "failed")]
    page = report.render_html({"results": entries}, tmp_path)
    body = page[page.index("<section"):]
    order = [body.index(f">t::{name}<") for name in ("c_xfail", "d_fail", "a_control", "b_pass")]
    assert order == sorted(order)
    assert '<span class="badge fail">FAIL</span> <span class="badge other">TEST XFAILED</span>' in page


def test_generic_cards_align_numbers_name_figures_and_are_never_empty(tmp_path):
    png = tmp_path / "x" / "model_maps_size2.png"
    png.parent.mkdir()
    png.write_bytes(PNG_MAGIC + b"0")
    entry = {"nodeid": "t::ens", "check": "consistency_vs_ensemble_size", "passed": True, "summary": "REPORT",
             "result": {"method": "saliency", "path": "/a/" * 30, "rows": [{"size": 1, "consistency": 0.18},
                                                                          {"size": 2, "consistency": None}]},
             "figures": {"model_maps_size2": "x/model_maps_size2.png"}}
    page = report.render_html({"results": [entry]}, tmp_path)
    assert '<th class="num">size</th><th class="num">consistency</th>' in page
    assert '<td class="num">0.1800</td>' in page
    assert "ensembles of 2 models" in page  # a caption, not the figure's file name
    assert "<dt>method</dt><dd>saliency</dd>" in page  # no numbers(): the result's single values
    assert re.search(r'<div class="span3"><dt>path</dt>', page)  # a long value spans grid columns
