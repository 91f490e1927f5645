"""The CheckResult protocol: every result class of the library implements it, with the right types,
and the reports and the plugin read results through it alone."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency.core.jsonable import jsonable
from pytest_saliency.reporting.figures import figures_for, render
from pytest_saliency.reporting.protocol import MEMBERS, CheckResult, missing_members
from pytest_saliency.reporting.report import make_entry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALARS = (float, int, str, bool, type(None))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One real instance of every result class, from the checks themselves (tiny models and inputs)."""
    from pytest_saliency.checks.agreement import agreement_matrix
    from pytest_saliency.checks.faithfulness import accuracy_spread
    from pytest_saliency.checks.randomization import layer_randomization
    from pytest_saliency.checks.regression import check_baseline
    from pytest_saliency.checks.input_noise import input_noise_stability
    from pytest_saliency.checks.sweeps import hyperparameter_sweep

    model, other, x = make_tiny_cnn(), make_tiny_cnn(seed=1), tiny_images(6)
    path = tmp_path_factory.mktemp("baseline") / "b.npz"
    sweep = hyperparameter_sweep(model, x, "integrated_gradients", sweep={"n_steps": [2, 4]}, reference={"n_steps": 8},
                                 metrics=("ssim",), threshold=0.999, keep_attributions=True)
    found = {
        "RandomizationResult": layer_randomization(model, x, "saliency", n_bootstrap=50),
        "AgreementResult": agreement_matrix(model, x, ["saliency", "input_x_gradient"], n_bootstrap=50, threshold=0.5),
        "SweepResult": sweep,
        "SweepResult (input noise)": input_noise_stability(model, x, "saliency", variance=[0.01], metrics=("ssim",)),
        "AccuracySpread": accuracy_spread(model, x, sweep),
        "BaselineResult (written)": check_baseline(model, x, path, update=False),
        "BaselineResult (compared)": check_baseline(other, x, path, threshold=0.9),
    }
    pytest.importorskip("sklearn")
    from pytest_saliency.checks.consistency import explainer_seed_stability, explanation_consistency
    from pytest_saliency.checks.ensembles import consistency_vs_ensemble_size

    found["ConsistencyResult"] = explanation_consistency([model, other], tiny_images(12), "saliency", n_splits=2)
    found["SeedStabilityResult"] = explainer_seed_stability(model, x, "smoothgrad", seeds=(0, 1), nt_samples=2)
    found["EnsembleSizeResult"] = consistency_vs_ensemble_size(
        [make_tiny_cnn(seed=s) for s in range(4)], tiny_images(8), sizes=(1, 2), n_splits=2)
    return found


CLASSES = ["RandomizationResult", "AgreementResult", "SweepResult", "SweepResult (input noise)", "AccuracySpread",
           "BaselineResult (written)", "BaselineResult (compared)", "ConsistencyResult", "SeedStabilityResult",
           "EnsembleSizeResult"]
FIGURES = {
    "RandomizationResult": {"randomization_strip", "ssim_curve"},
    "AgreementResult": {"agreement_matrices", "agreement_maps"},
    "SweepResult": {"sweep_curves"},
    "SweepResult (input noise)": {"sweep_curves"},
    "AccuracySpread": set(),
    "BaselineResult (written)": {"baseline_written"},
    "BaselineResult (compared)": {"baseline_comparison"},
    "ConsistencyResult": {"pair_matrices", "model_maps"},
    "SeedStabilityResult": {"pair_matrices"},
    "EnsembleSizeResult": {"ensemble_curve", "model_maps_size1", "model_maps_size2"},
}


@pytest.mark.parametrize("name", CLASSES)
def test_every_result_class_implements_the_protocol(results, name):
    if name not in results:
        pytest.skip("needs scikit-learn")
    result = results[name]
    assert type(result).__name__ == name.split()[0]
    assert isinstance(result, CheckResult) and missing_members(result) == []
    assert isinstance(result.check, str) and result.check
    assert isinstance(result.passed, bool)
    numbers = result.numbers()
    assert isinstance(numbers, dict) and numbers
    assert all(isinstance(k, str) and isinstance(v, SCALARS) for k, v in numbers.items()), numbers
    assert "passed" not in numbers  # the verdict is result.passed
    data = result.to_dict()
    assert isinstance(data, dict)
    json.dumps(jsonable(data, tensors="values"), allow_nan=False)
    summary = result.summary()
    assert isinstance(summary, str) and summary and "\n" not in summary
    assert summary.split()[0] in ("PASS", "FAIL", "REPORT") or result.check == "explanation_consistency"
    assert isinstance(result.report(), str) and result.report()
    assert isinstance(result.failure_message(), str)
    figures = result.figures()
    assert isinstance(figures, list)
    assert all(isinstance(n, str) and callable(draw) for n, draw in figures)
    assert {n for n, _ in figures} == FIGURES[name]
    for png in render(figures, strict=True).values():
        assert png.startswith(PNG_MAGIC)
        assert imread(io.BytesIO(png), format="png").shape[0] >= 100


def test_the_headline_numbers(results):
    ipr = results["RandomizationResult"].numbers()
    assert ipr["dataset_score"] == results["RandomizationResult"].stats.dataset_score
    assert ipr["sensitivity_threshold"] == 0.01 and ipr["n_images"] == 6 and ipr["method"] == "saliency"
    assert ipr["seed"] == 0 and ipr["preset"] == "adebayo2018"
    baseline = results["BaselineResult (compared)"]
    assert baseline.numbers()["mean"] == pytest.approx(baseline.mean) and baseline.numbers()["threshold"] == 0.9
    assert results["BaselineResult (written)"].numbers()["mean"] is None
    agreement = results["AgreementResult"]
    assert agreement.numbers()["failing_pairs"] == len(agreement.failing_pairs())
    sweep = results["SweepResult"]
    assert not sweep.passed and sweep.numbers()["failing_values"] == len(sweep.failures) > 0
    assert math.isfinite(sweep.numbers()["least_stable_mean"])


def test_failure_messages_of_failing_results(results):
    for name in ("SweepResult", "BaselineResult (written)"):
        result = results[name]
        assert not result.passed
        assert result.failure_message().startswith("Saliency")
    assert "pairs" in results["AgreementResult"].to_dict() and all(
        isinstance(p["failing"], bool) for p in results["AgreementResult"].to_dict()["pairs"])


def test_measurements_pass_and_say_report(results):
    for name in ("AccuracySpread", "EnsembleSizeResult"):
        if name not in results:
            continue
        result = results[name]
        assert result.passed is True and result.summary().startswith("REPORT ")
        assert make_entry(result, "t::x")["status"] == "report"
        assert result.summary() in result.failure_message() and result.report() in result.failure_message()


def test_entries_are_built_from_the_protocol(results):
    result = results["RandomizationResult"]
    entry = make_entry(result, "t::ipr")
    assert entry["check"] == result.check and entry["passed"] is result.passed
    assert entry["summary"] == result.summary() and entry["text"] == result.report()
    assert entry["numbers"] == jsonable(result.numbers(), tensors="values")
    assert entry["result"] == jsonable(result.to_dict(), tensors="values")
    written = make_entry(results["BaselineResult (written)"], "t::base")
    assert written["status"] == "written" and written["passed"] is False


class OwnResult:
    """A user's own result: implements the protocol, draws its own picture."""

    check = "my_check"
    passed = False

    def numbers(self) -> dict:
        return {"score": 0.2, "threshold": 0.5, "n_images": 3}

    def to_dict(self) -> dict:
        return {"check": self.check, "passed": self.passed, "score": 0.2}

    def summary(self) -> str:
        return "FAIL my_check: score 0.2 vs >= 0.5"

    def report(self) -> str:
        return "  score: 0.2"

    def failure_message(self) -> str:
        return "Saliency check failed: my_check\n" + self.report()

    def figures(self) -> list:
        from pytest_saliency.reporting.figures import baseline_figures

        maps = np.random.default_rng(0).random((2, 12, 12))
        return baseline_figures(current_maps=maps, status="written", path="mine.npz")


def test_a_users_own_result_gets_into_the_report_with_its_figures(tmp_path):
    from pytest_saliency.reporting.report import read_entry, write_entry

    assert isinstance(OwnResult(), CheckResult)
    entry = read_entry(write_entry(OwnResult(), "t::own", tmp_path))
    assert entry["numbers"] == {"score": 0.2, "threshold": 0.5, "n_images": 3}
    assert set(entry["figures"]) == {"baseline_written"} and entry["passed"] is False
    assert (tmp_path / entry["figures"]["baseline_written"]).read_bytes().startswith(PNG_MAGIC)


def test_an_object_that_is_not_a_result_is_refused_with_what_it_lacks():
    class Half:
        check = "half"
        passed = True

        def to_dict(self) -> dict:
            return {}

    assert not isinstance(Half(), CheckResult)
    with pytest.raises(TypeError, match="Half lacks numbers, summary, report, failure_message, figures"):
        make_entry(Half(), "t::half")
    assert MEMBERS == ("check", "passed", "numbers", "to_dict", "summary", "report", "failure_message", "figures")


def test_figures_that_cannot_be_listed_cost_only_the_figures():
    class Broken(OwnResult):
        def figures(self) -> list:
            raise RuntimeError("no maps kept")

    errors: list[str] = []
    assert figures_for(Broken(), errors=errors) == {}
    assert errors == ["my_check: RuntimeError: no maps kept"]
    with pytest.raises(RuntimeError):
        figures_for(Broken(), strict=True)

