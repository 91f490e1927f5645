"""The pytest plugin end to end, through pytester: options, skipping, failures, summary, JUnit, xdist.

Every scenario writes a tiny model repo (a 2-conv CNN on a few random 1x16x16 images, see
``TINY_REPO_CONFTEST``) and runs pytest over it, in process where possible (fast) and in a
subprocess where the behaviour is about a fresh interpreter (``--help``, lazy torch, xdist).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

# Load captum and the check machinery in the outer process: pytester drops the modules that an
# in-process run imports first, so every run would import them again (seconds, for captum).
import captum.attr  # noqa: F401
import numpy.random  # noqa: F401
import pytest_saliency.maps.cache  # noqa: F401
import pytest_saliency.core.devices  # noqa: F401
import pytest_saliency.checks.randomization  # noqa: F401
import pytest_saliency.compare.similarity  # noqa: F401

SKIP_REASON = "saliency checks are off: run pytest with --saliency to enable them"
HEADER = "saliency: device={device}, preset={preset}, seed={seed}, thresholds SSIM<0.99 / S^I>={threshold}"

TINY_REPO_CONFTEST = '''
import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
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
    return torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def absolute_input(model, inputs, target):
    """A "saliency map" that never looks at the model."""
    return inputs.abs()


@pytest.fixture
def control():
    """The negative control for the randomization checks, which must catch it."""
    return absolute_input
'''

GRADIENTS_PASS_IPR = """
def test_gradients(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="saliency")
"""

CONTROL_FAILS_IPR = """
def test_control(saliency, model, images, control):
    saliency.assert_sensitive_to_layer_randomization(model, images, method=control)
"""


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """Inner runs start from a plain environment, with one torch thread.

    When this suite itself runs under pytest-xdist, the worker's ``PYTEST_XDIST_*`` variables
    would make the inner runs believe they are xdist workers too (the plugin maps ``gwN`` to a
    GPU; pytest-benchmark warns). Tiny models run fastest on one thread, in process and in
    subprocesses alike: with several, each tiny convolution pays for thread synchronization,
    which costs 10x more than the convolution itself on a busy 2-core machine.
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_repo(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory whose conftest provides the ``model``, ``images`` and ``control`` fixtures."""
    pytester.makeconftest(TINY_REPO_CONFTEST)
    return pytester


def summary_lines(result: pytest.RunResult) -> list[str]:
    """The lines of the "saliency checks" terminal summary section, without the separator."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+ saliency checks -+", line))
    end = next(i for i in range(start + 1, len(lines))
               if lines[i].startswith("=") or re.fullmatch(r"-+ saliency tests -+", lines[i]))
    return lines[start + 1:end]


# 1. Without --saliency ------------------------------------------------------------------------

DISABLED_TESTS = """
import pytest


def test_uses_the_fixture(saliency):
    raise AssertionError("must not run without --saliency")


@pytest.mark.saliency
def test_is_marked():
    raise AssertionError("must not run without --saliency")


def test_plain():
    pass
"""


def test_without_the_flag_saliency_tests_are_skipped_and_plain_tests_run(pytester):
    pytester.makepyfile(DISABLED_TESTS)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, skipped=2)


def test_without_the_flag_the_skip_reason_says_how_to_enable_the_checks(pytester):
    pytester.makepyfile(test_disabled=DISABLED_TESTS)
    result = pytester.runpytest("-rs")
    result.stdout.fnmatch_lines([
        f"SKIPPED [[]1[]] test_disabled.py*: {SKIP_REASON}",
        f"SKIPPED [[]1[]] test_disabled.py*: {SKIP_REASON}",
    ])


def test_the_marker_is_registered_so_strict_markers_accepts_it(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.saliency
        def test_is_marked():
            pass
    """)
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.OK


def test_the_marker_is_listed_by_markers(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.saliency: a saliency sanity-check test; skipped unless *--saliency"])


def test_fixture_users_get_the_marker_so_m_deselects_them(pytester):
    pytester.makepyfile(DISABLED_TESTS)
    result = pytester.runpytest("-m", "not saliency")
    result.assert_outcomes(passed=1, deselected=2)


def test_without_the_flag_there_is_no_header_and_no_summary(pytester):
    pytester.makepyfile(DISABLED_TESTS)
    result = pytester.runpytest()
    result.stdout.no_fnmatch_line("saliency: device=*")
    result.stdout.no_fnmatch_line("*- saliency checks -*")


# 2. With --saliency: passing checks and controls that must fail ---------------------------------


def test_a_gradient_method_passes_independent_randomization(tiny_repo):
    tiny_repo.makepyfile(GRADIENTS_PASS_IPR)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(passed=1)


def test_a_control_that_ignores_the_model_fails_independent_randomization(tiny_repo):
    tiny_repo.makepyfile(test_control=CONTROL_FAILS_IPR)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E *Saliency check failed: absolute_input maps are NOT sensitive to independent layer randomization*",
        "E *preset:      adebayo2018*",
        "E *S^I:*0.0000*NOT sensitive",
        "E *layer*mean SSIM*std*min*max*sensitive images*verdict",
        "E *conv1*1.0000*INSENSITIVE",
        "E *reproduce:   pytest --saliency --saliency-seed=0 *test_control.py::test_control",
    ])


def test_the_failure_is_a_test_failure_not_an_error(tiny_repo):
    tiny_repo.makepyfile(test_control=CONTROL_FAILS_IPR)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(failed=1, errors=0)
    result.stdout.fnmatch_lines(["test_control.py:*: SaliencyCheckFailed"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_gradient_method_passes_cascading_randomization(tiny_repo):
    tiny_repo.makepyfile("""
        def test_gradients(saliency, model, images):
            result = saliency.assert_sensitive_to_cascading_randomization(model, images, method="saliency")
            assert result.mode == "cascading"
    """)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(passed=1)


def test_a_control_that_ignores_the_model_fails_cascading_randomization(tiny_repo):
    tiny_repo.makepyfile(test_cascading_control="""
        def test_control(saliency, model, images, control):
            saliency.assert_sensitive_to_cascading_randomization(model, images, method=control)
    """)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E *Saliency check failed: absolute_input maps are NOT sensitive to cascading layer randomization*",
        "E *check:*cascading_layer_randomization (cascading, top-down*",
        "E *preset:*adebayo2018*",
        "E *S^I:*NOT sensitive",
        "E *layer*mean SSIM*verdict",
        "E *reproduce:   pytest --saliency --saliency-seed=0 *test_cascading_control.py::test_control",
    ])


def test_the_reproduce_line_quotes_a_parametrized_nodeid(tiny_repo):
    tiny_repo.makepyfile(test_param="""
        import pytest
        @pytest.mark.parametrize("n", [2])
        def test_control(saliency, model, images, control, n):
            saliency.assert_sensitive_to_layer_randomization(model, images[:n], method=control)
    """)
    result = tiny_repo.runpytest("--saliency")
    result.stdout.fnmatch_lines(["E *reproduce:   pytest --saliency --saliency-seed=0 *'test_param.py::test_control[[]2[]]'"])


def test_the_reproduce_line_keeps_a_preset_given_on_the_command_line(tiny_repo):
    tiny_repo.makepyfile(test_control=CONTROL_FAILS_IPR)
    result = tiny_repo.runpytest("--saliency", "--saliency-preset=sam2020")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *preset:      sam2020:*"])
    result.stdout.fnmatch_lines(["E *reproduce:   pytest --saliency *--saliency-preset=sam2020 *test_control.py::test_control"])


# 3. The terminal summary ----------------------------------------------------------------------


def test_the_summary_lists_every_check_with_its_verdict_and_nodeid(tiny_repo):
    tiny_repo.makepyfile(test_summary=GRADIENTS_PASS_IPR + CONTROL_FAILS_IPR)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*- saliency checks -*",
        "*PASS independent_layer_randomization [[]saliency, adebayo2018[]]: S^I = * (test_summary.py::test_gradients)",
        "*FAIL independent_layer_randomization [[]absolute_input, adebayo2018[]]: S^I = 0.0000 *"
        " (test_summary.py::test_control)",
        "1 saliency check(s) passed, 1 failed",
    ])


def test_the_summary_counts_several_checks_in_one_test(tiny_repo):
    tiny_repo.makepyfile(test_two="""
        def test_both_modes(saliency, model, images):
            saliency.assert_sensitive_to_layer_randomization(model, images)
            saliency.assert_sensitive_to_cascading_randomization(model, images)
    """)
    result = tiny_repo.runpytest("--saliency")
    result.stdout.fnmatch_lines([
        "*- saliency checks -*",
        "*PASS independent_layer_randomization * (test_two.py::test_both_modes)",
        "*PASS cascading_layer_randomization * (test_two.py::test_both_modes)",
        "2 saliency check(s) passed, 0 failed",
    ])


def test_a_check_that_fails_in_a_fixture_is_listed_in_the_summary(tiny_repo):
    tiny_repo.makepyfile(test_fixture_check="""
        import pytest
        @pytest.fixture
        def checked_model(saliency, model, images, control):
            saliency.assert_sensitive_to_layer_randomization(model, images, method=control)
            return model

        def test_uses_a_checked_model(checked_model):
            pass
    """)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*- saliency checks -*",
        "*FAIL independent_layer_randomization * (test_fixture_check.py::test_uses_a_checked_model)",
        "0 saliency check(s) passed, 1 failed",
    ])


def test_no_summary_section_when_no_check_ran(pytester):
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--saliency")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*- saliency checks -*")


# 4. Options and ini keys ----------------------------------------------------------------------


def test_the_header_shows_the_resolved_configuration(pytester):
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--saliency")
    result.stdout.fnmatch_lines([HEADER.format(device="auto", preset="adebayo2018", seed="per check", threshold="0.01")])


def test_saliency_seed_appears_in_the_header_the_result_and_the_reproduce_line(tiny_repo):
    tiny_repo.makepyfile(test_seed="""
        def test_gradients(saliency, saliency_config, model, images):
            assert saliency_config.seed == 7
            # --saliency-seed forces the seed, even over an explicit keyword
            result = saliency.assert_sensitive_to_layer_randomization(model, images, seed=3)
            assert result.seed == 7

        def test_control(saliency, model, images, control):
            saliency.assert_sensitive_to_layer_randomization(model, images, method=control)
    """)
    result = tiny_repo.runpytest("--saliency", "--saliency-seed=7")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        HEADER.format(device="auto", preset="adebayo2018", seed="7", threshold="0.01"),
        "E *images: 4 *seed: 7 *",
        "E *reproduce:   pytest --saliency --saliency-seed=7 *test_seed.py::test_control",
    ])


def test_without_saliency_seed_an_explicit_seed_is_used_and_reproduced(tiny_repo):
    tiny_repo.makepyfile(test_seed="""
        def test_control(saliency, model, images, control):
            saliency.assert_sensitive_to_layer_randomization(model, images, method=control, seed=3)
    """)
    result = tiny_repo.runpytest("--saliency")
    result.stdout.fnmatch_lines(["E *reproduce:   pytest --saliency --saliency-seed=3 *test_seed.py::test_control"])


@pytest.mark.parametrize(
    "ini, cli, keyword, expected",
    [
        (None, None, None, "adebayo2018"),
        ("thesis2023", None, None, "thesis2023"),
        (None, "sam2020", None, "sam2020"),
        ("thesis2023", "sam2020", None, "sam2020"),  # the command line wins over the ini file
        ("thesis2023", "sam2020", "adebayo2018", "adebayo2018"),  # an explicit keyword wins over both
    ],
)
def test_preset_precedence(tiny_repo, ini, cli, keyword, expected):
    if ini is not None:
        tiny_repo.makeini(f"[pytest]\nsaliency_preset = {ini}\n")
    preset_keyword = "" if keyword is None else f", preset={keyword!r}"
    tiny_repo.makepyfile(test_preset=f"""
        def test_gradients(saliency, model, images):
            result = saliency.assert_sensitive_to_layer_randomization(model, images{preset_keyword})
            assert result.pipeline.name == {expected!r}
    """)
    args = ["--saliency"] + ([f"--saliency-preset={cli}"] if cli else [])
    result = tiny_repo.runpytest(*args)
    result.assert_outcomes(passed=1)
    session_preset = cli or ini or "adebayo2018"
    result.stdout.fnmatch_lines([
        HEADER.format(device="auto", preset=session_preset, seed="per check", threshold="0.01"),
        f"*PASS independent_layer_randomization [[]saliency, {expected}[]]: *",
    ])


def test_ini_sensitivity_threshold_makes_a_normal_method_fail(tiny_repo):
    tiny_repo.makeini("[pytest]\nsaliency_sensitivity_threshold = 0.99\n")
    tiny_repo.makepyfile(GRADIENTS_PASS_IPR)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        HEADER.format(device="auto", preset="adebayo2018", seed="per check", threshold="0.99"),
        "E *Saliency check failed: saliency maps are NOT sensitive to independent layer randomization (S^I = * < 0.99)",
        "E *S^I:*vs >= 0.99  -> NOT sensitive",
    ])


def test_saliency_device_cpu_gives_a_cpu_torch_device(pytester):
    pytester.makepyfile("""
        import torch

        def test_device(saliency_device, saliency_config):
            assert saliency_config.device == "cpu"
            assert saliency_device == torch.device("cpu")
    """)
    result = pytester.runpytest("--saliency", "--saliency-device=cpu")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([HEADER.format(device="cpu", preset="adebayo2018", seed="per check", threshold="0.01")])


def test_saliency_device_auto_gives_a_torch_device(pytester):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    pytester.makepyfile(f"""
        import torch

        def test_device(saliency_device):
            assert isinstance(saliency_device, torch.device)
            assert saliency_device.type == {expected!r}
    """)
    result = pytester.runpytest("--saliency")
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so this device is valid")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_cuda_device_without_cuda_errors_the_test(pytester, device):
    pytester.makepyfile("""
        def test_device(saliency_device):
            pass
    """)
    result = pytester.runpytest("--saliency", f"--saliency-device={device}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"E *SaliencyUsageError: --saliency-device={device} but CUDA is not available*"])


@pytest.mark.parametrize(
    "option, message",
    [
        ("--saliency-device=tpu", "invalid saliency device 'tpu': use auto (CUDA when available), cpu, cuda or cuda:N"),
        ("--saliency-preset=nope", "unknown saliency preset 'nope'; choose one of adebayo2018, sam2020, thesis2023, sam2020_mp"),
        ("--saliency-seed=-1", "the seed must be >= 0, got -1"),
        ("--saliency-seed=abc", "expected an integer seed, got 'abc'"),
    ],
    ids=["device", "preset", "negative-seed", "non-integer-seed"],
)
def test_an_invalid_option_is_a_usage_error(pytester, option, message):
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--saliency", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    flag = option.split("=")[0]
    result.stderr.fnmatch_lines([f"*error: argument {flag}: {message}"])


@pytest.mark.parametrize(
    "ini, message",
    [
        ("saliency_sensitivity_threshold = 2", "invalid ini value saliency_sensitivity_threshold = '2': "
         "expected a value in [[]-1, 1[]], got 2.0"),
        ("saliency_ssim_threshold = high", "invalid ini value saliency_ssim_threshold = 'high': "
         "expected a number, got 'high'"),
        ("saliency_preset = nope", "invalid ini value saliency_preset = 'nope': "
         "unknown saliency preset 'nope'; choose one of adebayo2018, sam2020, thesis2023, sam2020_mp"),
        ("saliency_device = tpu", "invalid ini value saliency_device = 'tpu': "
         "invalid saliency device 'tpu': use auto (CUDA when available), cpu, cuda or cuda:N"),
        ("saliency_seed = -3", "invalid ini value saliency_seed = '-3': the seed must be >= 0, got -3"),
    ],
    ids=["sensitivity-threshold", "ssim-threshold", "preset", "device", "seed"],
)
def test_an_invalid_ini_value_is_a_usage_error(pytester, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--saliency")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--saliency"],
            dict(enabled=True, device="cpu", seed=11, preset="thesis2023", ssim_threshold=0.95,
                 sensitivity_threshold=0.05),
        ),
        (
            ["--saliency", "--saliency-device=auto", "--saliency-seed=5", "--saliency-preset=sam2020"],
            dict(enabled=True, device="auto", seed=5, preset="sam2020", ssim_threshold=0.95,
                 sensitivity_threshold=0.05),
        ),
    ],
    ids=["ini", "command-line-over-ini"],
)
def test_saliency_config_returns_the_resolved_values(pytester, args, expected):
    pytester.makeini("""
        [pytest]
        saliency_device = CPU
        saliency_seed = 11
        saliency_preset = thesis2023
        saliency_ssim_threshold = 0.95
        saliency_sensitivity_threshold = 0.05
    """)
    pytester.makepyfile(f"""
        def test_config(saliency_config):
            resolved = saliency_config.to_dict()
            assert {{key: resolved[key] for key in {expected!r}}} == {expected!r}
    """)
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)


# 5. --help ------------------------------------------------------------------------------------


def test_help_lists_every_option_in_the_saliency_group(pytester):
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == pytest.ExitCode.OK
    lines = result.outlines
    start = lines.index("saliency map sanity checks:")
    end = lines.index("", start)
    in_group = [line.split()[0] for line in lines[start + 1:end] if line.startswith("  --")]
    assert {"--saliency", "--saliency-device=DEVICE", "--saliency-seed=INT", "--saliency-preset=NAME"} <= set(in_group)
    assert all(option.startswith("--saliency") for option in in_group)
    elsewhere = [line for line in lines[:start] + lines[end:] if line.lstrip().startswith("--saliency")]
    assert elsewhere == []  # every --saliency* option is in the group
    for key in ("saliency_device", "saliency_seed", "saliency_preset", "saliency_ssim_threshold",
                "saliency_sensitivity_threshold"):
        result.stdout.fnmatch_lines([f"  {key} (string):*"])


# 6. Importing the plugin does not import torch --------------------------------------------------


def test_importing_the_plugin_does_not_import_torch():
    code = (
        "import sys, pytest_saliency.plugin; "
        "print(sorted(name for name in ('torch', 'captum') if name in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_pytest_run_without_the_flag_does_not_import_torch(pytester):
    pytester.makeconftest("""
        import json
        import sys

        def pytest_sessionfinish(session):
            with open("modules.json", "w") as f:
                json.dump({
                    "saliency_plugin_loaded": session.config.pluginmanager.hasplugin("saliency"),
                    "torch": "torch" in sys.modules,
                    "captum": "captum" in sys.modules,
                }, f)
    """)
    pytester.makepyfile(DISABLED_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, skipped=2)
    recorded = json.loads((pytester.path / "modules.json").read_text())
    assert recorded == {"saliency_plugin_loaded": True, "torch": False, "captum": False}


# 7. JUnit XML ---------------------------------------------------------------------------------


def test_junit_xml_records_each_check_as_a_property(tiny_repo):
    tiny_repo.makepyfile(test_junit=GRADIENTS_PASS_IPR + CONTROL_FAILS_IPR + "\n\ndef test_plain():\n    pass\n")
    tiny_repo.runpytest("--saliency", "--junitxml=report.xml").assert_outcomes(passed=2, failed=1)
    testcases = {case.get("name"): case for case in ET.parse(tiny_repo.path / "report.xml").iter("testcase")}

    def saliency_results(name):
        return [json.loads(p.get("value")) for p in testcases[name].iter("property") if p.get("name") == "saliency_result"]

    [passed] = saliency_results("test_gradients")
    assert passed["nodeid"] == "test_junit.py::test_gradients"
    assert (passed["check"], passed["method"], passed["seed"], passed["passed"]) == (
        "independent_layer_randomization", "saliency", 0, True
    )
    assert passed["summary"].startswith("PASS independent_layer_randomization [saliency, adebayo2018]")
    [failed] = saliency_results("test_control")
    assert failed["nodeid"] == "test_junit.py::test_control"
    assert (failed["method"], failed["passed"]) == ("absolute_input", False)
    assert failed["summary"].startswith("FAIL ")
    assert saliency_results("test_plain") == []


# 8. pytest-xdist ------------------------------------------------------------------------------


def test_under_xdist_the_controller_summary_lists_the_checks_of_every_worker(pytester):
    # The model lives in the test module, not a conftest, so that only the workers import torch.
    pytester.makepyfile(test_xdist=TINY_REPO_CONFTEST + """

def test_independent(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)


def test_cascading(saliency, model, images):
    saliency.assert_sensitive_to_cascading_randomization(model, images)
""")
    result = pytester.runpytest_subprocess("--saliency", "-n", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["created: 2/2 workers"])
    # Workers report in any order: compare the summary lines sorted.
    lines = summary_lines(result)
    pytest.LineMatcher(sorted(lines)).fnmatch_lines([
        "  PASS cascading_layer_randomization [[]saliency, adebayo2018[]]: *  (test_xdist.py::test_cascading)",
        "  PASS independent_layer_randomization [[]saliency, adebayo2018[]]: *  (test_xdist.py::test_independent)",
        "2 saliency check(s) passed, 0 failed",
        "cascading_layer_randomization: 1 of 1 passed",
        "independent_layer_randomization: 1 of 1 passed",
    ])
    assert len(lines) == 5


def test_without_xdist_the_plugin_still_works(tiny_repo):
    tiny_repo.makepyfile(GRADIENTS_PASS_IPR)
    result = tiny_repo.runpytest("--saliency", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["1 saliency check(s) passed, 0 failed"])
    result.stdout.no_fnmatch_line("*PluginValidationError*")


# 9. Usage errors inside a check -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            "saliency.assert_sensitive_to_layer_randomization(model, images[:, 0])",
            "the inputs have shape (4, 16, 16), which is taken as series (N, C, T), but TinyCNN has Conv2d layers and "
            "no Conv1d: images need the shape (N, C, H, W). Add the channel dimension with inputs.unsqueeze(1)*",
        ),
        (
            "saliency.assert_sensitive_to_layer_randomization(torch.nn.Identity(), images)",
            "model Identity has no parameters, so there is nothing to randomize or compare.*",
        ),
        (
            "saliency.assert_sensitive_to_cascading_randomization(model, images, layers=['fc9'])",
            "unknown layer 'fc9'.* Valid layers: conv1, conv2, fc.*",
        ),
        (
            "saliency.assert_sensitive_to_layer_randomization(model, images, method='gradeint')",
            "unknown method 'gradeint'. Did you mean *Valid methods: saliency, *",
        ),
    ],
    ids=["NHW-inputs", "no-parameters", "unknown-layer", "unknown-method"],
)
def test_a_usage_error_inside_a_check_fails_the_test_with_its_message(tiny_repo, call, message):
    tiny_repo.makepyfile(test_usage=f"""
        import torch

        def test_misuse(saliency, model, images):
            {call}
    """)
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"E *SaliencyUsageError: {message}"])
    result.stdout.no_fnmatch_line("*- saliency checks -*")  # nothing ran, so nothing is recorded


def test_junit_has_the_key_numbers_as_properties_of_their_own(tiny_repo):
    tiny_repo.makepyfile(test_numbers=GRADIENTS_PASS_IPR)
    tiny_repo.runpytest("--saliency", "--junitxml=report.xml").assert_outcomes(passed=1)
    [case] = [c for c in ET.parse(tiny_repo.path / "report.xml").iter("testcase") if c.get("name") == "test_gradients"]
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["saliency.independent_layer_randomization.passed"] == "True"
    assert float(properties["saliency.independent_layer_randomization.dataset_score"]) > 0.01
    assert properties["saliency.independent_layer_randomization.sensitivity_threshold"] == "0.01"
    # one property per number of the result's numbers() (the CheckResult protocol)
    assert properties["saliency.independent_layer_randomization.method"] == "saliency"
    assert properties["saliency.independent_layer_randomization.preset"] == "adebayo2018"
    assert properties["saliency.independent_layer_randomization.insensitive_layers"] == "0"
    assert int(properties["saliency.independent_layer_randomization.n_images"]) > 0


def test_reports_json_and_html_with_a_link_in_the_failure(tiny_repo):
    tiny_repo.makepyfile(test_gate=GRADIENTS_PASS_IPR + CONTROL_FAILS_IPR)
    result = tiny_repo.runpytest("--saliency", "--saliency-report=json,html", "--saliency-results-dir=out")
    result.assert_outcomes(passed=1, failed=1)
    out = tiny_repo.path / "out"
    result.stdout.fnmatch_lines([
        "E *pictures:    *saliency-report.html#*",
        f"saliency json report: {out / 'saliency-report.json'}",
        f"saliency html report: {out / 'saliency-report.html'}",
    ])
    data = json.loads((out / "saliency-report.json").read_text())
    assert [r["nodeid"] for r in data["results"]] == ["test_gate.py::test_control", "test_gate.py::test_gradients"]
    assert data["summary"]["failed"] == 1
    html = (out / "saliency-report.html").read_text()
    assert "test_gate.py::test_control" in html and "data:image/png;base64," in html
    assert not (out / ".entries").exists()


def test_an_unknown_report_format_is_a_usage_error(tiny_repo):
    result = tiny_repo.runpytest("--saliency", "--saliency-report=pdf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown saliency report format(s) pdf*json, html*"])


# A user's own check: a hand-written class implementing the CheckResult protocol, no base class.
RECORDED_RESULTS = """
import pytest
from pytest_saliency.exceptions import SaliencyUsageError

class Brightness:
    check = "brightness_gate"

    def __init__(self, value, threshold=0.5):
        self.value, self.threshold = value, threshold

    @property
    def passed(self):
        return self.value >= self.threshold

    def numbers(self):
        return {"value": self.value, "threshold": self.threshold}

    def to_dict(self):
        return {"value": self.value, "threshold": self.threshold}

    def summary(self):
        return f"{'PASS' if self.passed else 'FAIL'} brightness_gate: value = {self.value} (>= {self.threshold})"

    def report(self):
        return self.summary()

    def failure_message(self):
        return f"the maps are too dim: brightness {self.value} < {self.threshold}"

    def figures(self):
        return []

def test_bright(saliency):
    assert saliency.record(Brightness(0.9)).passed

def test_dim_asserted(saliency):
    result = saliency.record(Brightness(0.1))
    assert result.passed, result.failure_message()

def test_dim_recorded_only(saliency):
    saliency.record(Brightness(0.2))

def test_not_a_result(saliency):
    with pytest.raises(SaliencyUsageError, match="lacks check, passed, numbers"):
        saliency.record(object())
"""


def test_record_sends_a_users_own_result_to_the_summary_junit_and_reports(pytester):
    pytester.makepyfile(test_record=RECORDED_RESULTS)
    result = pytester.runpytest("--saliency", "--junitxml=report.xml", "--saliency-report=json,html",
                                "--saliency-results-dir=out")
    # Recording does not assert (as the fixture's measuring methods): only the test that asserts fails.
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "E *the maps are too dim: brightness 0.1 < 0.5",
        "*- saliency checks -*",
        "brightness_gate: 1 of 3 passed",
        "  PASS brightness_gate: value = 0.9 (>= 0.5)  (test_record.py::test_bright)",
        "  FAIL brightness_gate: value = 0.1 (>= 0.5)  (test_record.py::test_dim_asserted)",
        "  FAIL brightness_gate: value = 0.2 (>= 0.5)  (test_record.py::test_dim_recorded_only)",
        "1 saliency check(s) passed, 2 failed",
    ])
    [case] = [c for c in ET.parse(pytester.path / "report.xml").iter("testcase") if c.get("name") == "test_bright"]
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["saliency.brightness_gate.passed"] == "True"
    assert properties["saliency.brightness_gate.value"] == "0.9"
    data = json.loads((pytester.path / "out" / "saliency-report.json").read_text())
    recorded = {r["nodeid"]: r for r in data["results"]}
    assert set(recorded) == {f"test_record.py::test_{name}" for name in ("bright", "dim_asserted", "dim_recorded_only")}
    assert recorded["test_record.py::test_bright"]["check"] == "brightness_gate"
    html = (pytester.path / "out" / "saliency-report.html").read_text()
    assert "brightness_gate" in html and "test_record.py::test_dim_recorded_only" in html


def test_reports_from_xdist_workers_are_merged(pytester):
    pytester.makepyfile(test_xdist=TINY_REPO_CONFTEST + """

def test_independent(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)


def test_cascading(saliency, model, images):
    saliency.assert_sensitive_to_cascading_randomization(model, images)
""")
    result = pytester.runpytest_subprocess("--saliency", "-n", "2", "--saliency-report=json")
    result.assert_outcomes(passed=2)
    data = json.loads((pytester.path / ".saliency" / "saliency-report.json").read_text())
    assert sorted(r["check"] for r in data["results"]) == ["cascading_layer_randomization", "independent_layer_randomization"]


def test_seed_consistency_through_the_fixture_trains_once_and_caches(tiny_repo):
    tiny_repo.makepyfile(test_seeds="""
        import torch
        from torch import nn

        CALLS = []

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(16, 3)

            def forward(self, x):
                return self.fc(x)

        def train(seed):
            CALLS.append(seed)
            return Net()

        def test_seeds(saliency, saliency_model_cache):
            x = torch.rand(20, 16, generator=torch.Generator().manual_seed(0))
            result = saliency.assert_seed_consistency_above(
                train, x, seeds=[0, 1], build=Net, metric="sign_agreement", threshold=0.0)
            assert result.passed
            print("trained", CALLS, "hits", saliency_model_cache.hits)
    """)
    first = tiny_repo.runpytest("--saliency", "-s")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*trained [[]0, 1[]] hits 0*", "*seed_consistency*"])
    second = tiny_repo.runpytest("--saliency", "-s")
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*trained [[][]] hits 2*"])


PROGRESS_CHECK = """
import os

import pytest
import pytest_saliency.plugin.progress as progress


@pytest.fixture(autouse=True)
def immediate_progress(monkeypatch):
    # Report every state at once (the defaults wait 2 s), and put the defaults back afterwards;
    # SALIENCY_TEST_TTY says whether the terminal counts as interactive.
    monkeypatch.setattr(progress.Progress.__init__, "__defaults__", (progress.DEFAULT_UNIT, 0.0, 0.0))
    tty = os.environ.get("SALIENCY_TEST_TTY")
    if tty is not None:
        monkeypatch.setattr(progress, "terminal_is_interactive", lambda config: tty == "1")


def test_long(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)
"""


def test_long_checks_show_progress_past_capture_but_not_under_quiet(tiny_repo, monkeypatch):
    tiny_repo.makepyfile(test_long=PROGRESS_CHECK)
    monkeypatch.setenv("SALIENCY_TEST_TTY", "0")
    shown = tiny_repo.runpytest("--saliency")
    shown.assert_outcomes(passed=1)
    shown.stdout.fnmatch_lines(["    saliency: 1/3 randomized states done, next conv2 (images 1-4) (0 s, ETA * s)",
                                "    saliency: 3/3 randomized states done (0 s)"])
    assert "saliency randomized states" not in shown.stderr.str(), "no bar without a terminal"
    quiet = tiny_repo.runpytest("--saliency", "-q")
    quiet.assert_outcomes(passed=1)
    assert "randomized states" not in quiet.stdout.str() + quiet.stderr.str()


def test_an_interactive_terminal_gets_a_tqdm_bar_instead_of_lines(tiny_repo, monkeypatch):
    tiny_repo.makepyfile(test_long=PROGRESS_CHECK)
    monkeypatch.setenv("SALIENCY_TEST_TTY", "1")
    result = tiny_repo.runpytest("--saliency")
    result.assert_outcomes(passed=1)
    bar = result.stderr.str()
    assert "saliency randomized states:" in bar and "1/3" in bar and "<" in bar, bar  # tqdm: elapsed<remaining
    assert "randomized states done" not in result.stdout.str()


@pytest.mark.parametrize(("interactive", "args", "kind"), [
    (True, (), "bar"), (False, (), "line"), (True, ("-q",), "off"), (False, ("-q",), "off"),
    (True, ("-p", "no:terminal"), "off"),
])
def test_the_progress_kind_is_chosen_in_one_place(pytester, monkeypatch, interactive, args, kind):
    import pytest_saliency.plugin.progress as progress

    monkeypatch.setattr(progress, "terminal_is_interactive", lambda config: interactive)
    config = pytester.parseconfigure(*args)
    assert progress.progress_kind(config) == kind
    reporter = progress.progress_reporter(config)
    assert reporter.kind == kind and reporter.named("seeds trained or loaded").kind == kind
    assert reporter.named("seeds trained or loaded").unit == "seeds trained or loaded"


def test_progress_that_is_off_prints_nothing(pytester, monkeypatch, capsys):
    import pytest_saliency.plugin.progress as progress

    reporter = progress.Progress(pytester.parseconfigure(), "off", delay=0.0, interval=0.0)
    for done in range(4):
        reporter(done, 3, f"step {done}")
    assert capsys.readouterr() == ("", "")


def test_xdist_workers_show_progress_lines_on_their_stderr(tiny_repo):
    tiny_repo.makepyfile(test_long=PROGRESS_CHECK)
    result = tiny_repo.runpytest_subprocess("--saliency", "-n", "2")
    result.assert_outcomes(passed=1)
    result.stderr.fnmatch_lines(["[[]gw?[]] saliency: 3/3 randomized states done (* s)"])


# 10. An unusable results folder -------------------------------------------------------------------


def test_a_results_dir_that_is_a_file_is_reported_and_the_checks_still_run(tiny_repo):
    tiny_repo.makepyfile(test_gate=GRADIENTS_PASS_IPR)
    (tiny_repo.path / "out").write_text("not a folder")
    result = tiny_repo.runpytest("--saliency", "--saliency-report=json", "--saliency-results-dir=out",
                                 "-W", "error::UserWarning")
    result.assert_outcomes(passed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([
        "*- saliency checks -*",
        "1 saliency check(s) passed, 0 failed",
        f"saliency report not written: {tiny_repo.path / 'out'} is a file, not a folder*"
        "remove the file or choose another --saliency-results-dir*",
    ])


REMOVES_THE_RESULTS_DIR = """
import shutil


def test_a(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)


def test_b(saliency_config):
    shutil.rmtree(saliency_config.results_dir)


def test_c(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)
"""


def test_a_results_dir_removed_during_the_session_is_reported_and_the_report_keeps_the_rest(tiny_repo):
    tiny_repo.makepyfile(test_removes=REMOVES_THE_RESULTS_DIR)
    result = tiny_repo.runpytest("--saliency", "--saliency-report=json", "--saliency-results-dir=out")
    result.assert_outcomes(passed=3)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([
        "2 saliency check(s) passed, 0 failed",
        "saliency report: 1 of 2 check result(s) missing: their entry files under *out* were removed during the "
        "session*",
        f"saliency json report: {tiny_repo.path / 'out' / 'saliency-report.json'}",
    ])
    data = json.loads((tiny_repo.path / "out" / "saliency-report.json").read_text())
    assert [r["nodeid"] for r in data["results"]] == ["test_removes.py::test_c"]


def test_a_results_dir_replaced_by_a_file_during_the_session_is_reported(tiny_repo):
    tiny_repo.makepyfile(test_replaces=REMOVES_THE_RESULTS_DIR.replace(
        "shutil.rmtree(saliency_config.results_dir)",
        "shutil.rmtree(saliency_config.results_dir)\n    open(saliency_config.results_dir, 'w').close()"))
    result = tiny_repo.runpytest("--saliency", "--saliency-report=json,html", "--saliency-results-dir=out",
                                 "-W", "error::UserWarning")
    result.assert_outcomes(passed=3)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([
        "2 saliency check(s) passed, 0 failed",
        f"saliency report not written: {tiny_repo.path / 'out'} is a file, not a folder*",
    ])


# 10. Every saliency test with pytest's own outcome ---------------------------------------------

# One saliency test per outcome pytest knows, plus a caught control. The model lives in the test
# module (not a conftest) so that under -n 2 only the workers import torch.
EVERY_OUTCOME = TINY_REPO_CONFTEST + '''
from pytest_saliency.exceptions import SaliencyCheckFailed


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        raise RuntimeError("the model broke")


@pytest.fixture
def checked_in_setup(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="no_such_method")


def test_pass(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)


def test_fail(saliency, model, images, control):
    saliency.assert_sensitive_to_layer_randomization(model, images, method=control)


def test_usage_error(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images, method="no_such_method")


def test_crash(saliency, images):
    saliency.assert_sensitive_to_layer_randomization(Broken(), images)


def test_setup_error(checked_in_setup):
    pass


@pytest.mark.saliency
def test_skip():
    pytest.skip("no GPU here")


@pytest.mark.xfail(reason="the control is known to fail")
def test_xfail(saliency, model, images, control):
    saliency.assert_sensitive_to_layer_randomization(model, images, method=control)


@pytest.mark.xfail(reason="maybe")
def test_xpass(saliency, model, images):
    saliency.assert_sensitive_to_layer_randomization(model, images)


def test_control_caught(saliency, model, images, control):
    with pytest.raises(SaliencyCheckFailed):
        saliency.assert_sensitive_to_layer_randomization(model, images, method=control)
'''

EXPECTED_OUTCOMES = {"passed": 2, "failed": 3, "error": 1, "skipped": 1, "xfailed": 1, "xpassed": 1}


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_every_output_counts_the_saliency_tests_as_pytest_does(pytester, xdist):
    pytester.makepyfile(test_outcomes=EVERY_OUTCOME)
    args = ["--saliency", "--saliency-report=json,html", "--saliency-results-dir=out", "--junitxml=junit.xml", "-rA"]
    result = (pytester.runpytest_subprocess(*args, "-n", "2") if xdist
              else pytester.runpytest(*args, "-p", "no:xdist"))
    parsed = result.parseoutcomes()
    pytest_counts = {name: parsed.get("errors" if name == "error" else name, 0) for name in EXPECTED_OUTCOMES}
    assert pytest_counts == EXPECTED_OUTCOMES, result.stdout.str()

    # Terminal: the saliency tests' counts, the tests that did not pass with their message, the caught control.
    counts = ", ".join(f"{n} {name}" for name, n in pytest_counts.items())
    result.stdout.fnmatch_lines([f"saliency tests: {counts}"])
    result.stdout.fnmatch_lines_random([
        "FAILED test_outcomes.py::test_usage_error: *SaliencyUsageError*no_such_method*",
        "FAILED test_outcomes.py::test_crash: *RuntimeError*the model broke*",
        "ERROR test_outcomes.py::test_setup_error: *SaliencyUsageError*no_such_method*",
        "SKIPPED test_outcomes.py::test_skip: no GPU here",
        "XFAILED test_outcomes.py::test_xfail: the control is known to fail",
        "XPASSED test_outcomes.py::test_xpass: maybe",
        "  FAILED AS EXPECTED (control caught): FAIL independent_layer_randomization *(test_outcomes.py::test_control_caught)",
        "2 saliency check(s) passed, 2 failed, 1 failed as expected (control caught)",
    ])

    # JSON: the tests with pytest's outcomes, and each check's outcome.
    data = json.loads((pytester.path / "out" / "saliency-report.json").read_text())
    from pytest_saliency.reporting.report import validate_report

    validate_report(data)
    assert data["summary"]["tests"] == pytest_counts
    assert {t["nodeid"].split("::")[1]: t["outcome"] for t in data["tests"]} == {
        "test_pass": "passed", "test_fail": "failed", "test_usage_error": "failed", "test_crash": "failed",
        "test_setup_error": "error", "test_skip": "skipped", "test_xfail": "xfailed", "test_xpass": "xpassed",
        "test_control_caught": "passed"}
    messages = {t["nodeid"].split("::")[1]: t["message"] for t in data["tests"]}
    assert "SaliencyUsageError" in messages["test_usage_error"] and "no_such_method" in messages["test_usage_error"]
    assert "RuntimeError" in messages["test_crash"] and "the model broke" in messages["test_crash"]
    checks = {r["nodeid"].split("::")[1]: r["outcome"] for r in data["results"]}
    assert checks == {"test_pass": "passed", "test_fail": "failed", "test_xfail": "xfailed",
                      "test_xpass": "passed", "test_control_caught": "control_caught"}
    assert (data["summary"]["checks"], data["summary"]["passed"], data["summary"]["failed"],
            data["summary"]["controls_caught"]) == (5, 2, 2, 1)  # the xfailed check counts as failed

    # HTML: the same test counts, the caught control's own badge.
    html = (pytester.path / "out" / "saliency-report.html").read_text()
    shown = dict((name, int(n)) for name, n in re.findall(r'data-outcome="(\w+)"><b>(\d+)</b>', html))
    assert shown == pytest_counts
    assert 'class="badge expected">FAILED AS EXPECTED (control caught)' in html
    assert "the model broke" in html and "no GPU here" in html

    # JUnit: pytest's counts (it counts xfailed as skipped, xpassed as passed).
    suite = ET.parse(pytester.path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("failures", -1)) == pytest_counts["failed"]
    assert int(suite.get("errors", -1)) == pytest_counts["error"]
    assert int(suite.get("skipped", -1)) == pytest_counts["skipped"] + pytest_counts["xfailed"]
    assert int(suite.get("tests", -1)) == 9


def test_the_fixture_passes_each_check_a_reporter_named_for_what_it_counts(tmp_path):
    from conftest import make_tiny_cnn, tiny_images
    from pytest_saliency.plugin.checker import BaselineChecker, SaliencyChecker
    from pytest_saliency.plugin.config import SaliencyConfig

    steps: list[tuple[str, int, int, str]] = []

    class Reporter:
        def __init__(self, unit: str = "randomized states") -> None:
            self.unit = unit

        def named(self, unit: str) -> Reporter:
            return Reporter(unit)

        def __call__(self, done: int, total: int, label: str) -> None:
            steps.append((self.unit, done, total, label))

    checker = SaliencyChecker(SaliencyConfig(enabled=True), progress=Reporter())
    model, x = make_tiny_cnn(), tiny_images(4)
    checker.agreement_matrix(model, x, ["saliency", "input_x_gradient"], ["feature_agreement"], n_bootstrap=10)
    assert steps == [("methods", 0, 2, "saliency"), ("methods", 1, 2, "input_x_gradient"), ("methods", 2, 2, "")]
    steps.clear()
    checker.hyperparameter_sweep(model, x, "smoothgrad", sweep={"nt_samples": [2]}, reference={"nt_samples": 2},
                                 metrics=("ssim",))
    assert [(unit, done, total) for unit, done, total, _ in steps] == [("settings", 0, 2), ("settings", 1, 2),
                                                                      ("settings", 2, 2)]
    steps.clear()
    checker.input_noise_stability(model, x, "saliency", variance=[0.01, 0.1], n_draws=2, metrics=("ssim",))
    assert [(unit, done, total) for unit, done, total, _ in steps] == [("noise draws", i, 5) for i in range(6)]
    assert [label for *_, label in steps[:3]] == ["clean inputs", "variance=0.01 draw 1/2", "variance=0.01 draw 2/2"]
    steps.clear()
    BaselineChecker(checker, tmp_path, update=True).check(model, x)
    assert steps == [("models", 0, 1, "model"), ("models", 1, 1, "")]
    steps.clear()
    checker.assert_seed_consistency_above(lambda seed: make_tiny_cnn(seed=seed), x, seeds=[0, 1],
                                          metric="sign_agreement", threshold=0.0, n_splits=2)
    assert steps == [("seeds trained or loaded", 0, 2, "seed=0"), ("seeds trained or loaded", 1, 2, "seed=1"),
                     ("seeds trained or loaded", 2, 2, "")]
