"""A usage error shows the user's line and the message; the error it wraps (the model or the factory
failed inside torch) shows the user's frames only; any other exception keeps its whole traceback.

The projects run in pytester, with the traceback styles a user reaches for when something fails
(``--tb=long``, ``--showlocals``, the default, ``--tb=short``). The locations pytest prints for the
frames it shows (``file.py:12: in forward``, ``file.py:12: RuntimeError``) must all be in the test
project, never in pytest-saliency, torch or captum.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.core.integrity import short_usage_errors, user_frames_only
from pytest_saliency.exceptions import SaliencyUsageError

PROJECT = '''
import torch
from torch import nn
import pytest_saliency as ps


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        hidden = x * 1.0
        return self.fc(hidden)  # the user's failing line


class Buggy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * {}["no_such_key"]  # a bug: not a usage error


def factory_without_build(seed):
    return nn.Linear(64, 10)


def crashing_factory(seed):
    layer = nn.Linear(64, 10)
    return layer(torch.rand(2, 3))  # the factory's failing line


def test_model_fails_on_the_inputs():
    ps.assert_sensitive_to_layer_randomization(UserModel().eval(), torch.rand(4, 1, 8, 8))  # test line


def test_fixture_method(saliency):
    saliency.layer_randomization(UserModel().eval(), torch.rand(4, 1, 8, 8))  # fixture line


def test_cache_without_build(tmp_path):
    ps.ModelCache(tmp_path).get_or_train(factory_without_build, 0)  # cache line


def test_cache_factory_crashes(tmp_path):
    ps.ModelCache(tmp_path).get_or_train(crashing_factory, 0, build=UserModel)  # factory line


def test_cache_bad_directory():
    ps.ModelCache(3)  # directory line


def test_a_bug_in_the_model():
    ps.assert_sensitive_to_layer_randomization(Buggy().eval(), torch.rand(4, 64))  # bug line
'''

USAGE_TESTS = ["test_model_fails_on_the_inputs", "test_fixture_method", "test_cache_without_build",
               "test_cache_factory_crashes", "test_cache_bad_directory"]
STYLES = [("--tb=long",), ("--tb=long", "--showlocals"), ("--showlocals",), ("--tb=short",)]
# "path.py:12: in forward" (--tb=short), "path.py:12: " (a middle frame, long) or "path.py:12: RuntimeError"
# (the last frame).
LOCATION = re.compile(r"^(\S+\.py):(\d+):(?: in \S+| \w+)?\s*$")


def _run(pytester: pytest.Pytester, *options: str) -> tuple[list[str], list[str]]:
    """The project's output lines with ``options``, and its source lines."""
    path = pytester.makepyfile(test_project=PROJECT)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--saliency", *options)
    result.assert_outcomes(failed=len(USAGE_TESTS) + 1)
    return result.outlines, path.read_text().splitlines()


def _section(lines: list[str], name: str) -> list[str]:
    """One test's failure report: from its ``____ name ____`` header to the next header."""
    start = next(i for i, line in enumerate(lines) if line.startswith("__") and f" {name} " in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("__", "=="))), len(lines))
    return lines[start:end]


def _locations(section: list[str]) -> list[tuple[str, int]]:
    return [(match[1], int(match[2])) for match in map(LOCATION.match, section) if match]


def _line_of(source: list[str], text: str) -> int:
    return next(number for number, line in enumerate(source, 1) if text in line)


@pytest.mark.parametrize("options", STYLES, ids=" ".join)
def test_usage_errors_show_the_users_frames_only(pytester: pytest.Pytester, options: tuple[str, ...]) -> None:
    lines, source = _run(pytester, *options)
    for name in USAGE_TESTS:
        section = _section(lines, name)
        text = "\n".join(section)
        assert "SaliencyUsageError: " in text, text
        locations = _locations(section)
        assert locations, text
        assert all(path == "test_project.py" for path, _ in locations), text
        for library in ("pytest_saliency/", "site-packages", "torch/nn/modules", "captum"):
            assert library not in text, (library, text)
        assert len(section) < (60 if "--showlocals" in options else 40), text

    model = "\n".join(_section(lines, "test_model_fails_on_the_inputs"))
    assert _locations(_section(lines, "test_model_fails_on_the_inputs")) == [
        ("test_project.py", _line_of(source, "the user's failing line")),
        ("test_project.py", _line_of(source, "# test line")),
    ], model
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in model
    assert "The above exception was the direct cause of the following exception" in model
    assert "SaliencyUsageError: the model (UserModel) raised RuntimeError" in model
    assert "return self.fc(hidden)" in model and "ps.assert_sensitive_to_layer_randomization(UserModel()" in model

    fixture = _section(lines, "test_fixture_method")
    assert _locations(fixture)[-1] == ("test_project.py", _line_of(source, "# fixture line")), fixture
    assert ("test_project.py", _line_of(source, "the user's failing line")) in _locations(fixture)

    cache = _section(lines, "test_cache_without_build")
    assert _locations(cache) == [("test_project.py", _line_of(source, "# cache line"))], cache
    assert "SaliencyUsageError: ModelCache cannot rebuild the model of test_project.factory_without_build" in (
        "\n".join(cache))

    crash = _section(lines, "test_cache_factory_crashes")
    assert _locations(crash) == [("test_project.py", _line_of(source, "the factory's failing line")),
                                 ("test_project.py", _line_of(source, "# factory line"))], crash
    assert "raised RuntimeError: mat1 and mat2 shapes cannot be multiplied" in "\n".join(crash)

    directory = _section(lines, "test_cache_bad_directory")
    assert _locations(directory) == [("test_project.py", _line_of(source, "# directory line"))], directory
    assert "ModelCache needs a directory path (str or pathlib.Path), got int" in "\n".join(directory)


def test_other_exceptions_keep_their_whole_traceback(pytester: pytest.Pytester) -> None:
    lines, source = _run(pytester, "--tb=long")
    section = _section(lines, "test_a_bug_in_the_model")
    end = next(i for i, line in enumerate(section) if line.endswith(": KeyError") and LOCATION.match(line))
    section = section[: end + 1]  # the plugin's summary follows the last failure
    text = "\n".join(section)
    locations = _locations(section)
    assert "exceptions.SaliencyUsageError:" not in text and not text.endswith("SaliencyUsageError"), text
    assert locations[-1] == ("test_project.py", _line_of(source, "a bug: not a usage error")), text
    assert text.count("KeyError: 'no_such_key'") >= 1
    # The library's and torch's frames between the test and the model are all shown.
    assert any("pytest_saliency" in path for path, _ in locations), text
    assert any("torch/nn/modules" in path for path, _ in locations), text


# -- the helpers themselves ------------------------------------------------------------------------


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _files(tb: Any) -> list[str]:
    return [Path(frame.filename).name for frame in traceback.extract_tb(tb)]


def test_the_cause_stays_chained_with_the_users_frames() -> None:
    with pytest.raises(SaliencyUsageError, match=r"the model \(_Model\) raised RuntimeError") as info:
        ps.explain(_Model(), torch.rand(2, 1, 8, 8))
    error = info.value
    assert _files(error.__traceback__)[0] == Path(__file__).name
    assert all(name in (Path(__file__).name, "integrity.py") for name in _files(error.__traceback__))
    cause = error.__cause__
    assert isinstance(cause, RuntimeError) and "mat1 and mat2" in str(cause)
    frames = traceback.extract_tb(cause.__traceback__)
    assert [(Path(f.filename).name, f.line) for f in frames] == [(Path(__file__).name, "return self.fc(x)")]


def test_a_traceback_of_library_frames_only_keeps_its_last_frame() -> None:
    try:
        json.loads("{")
    except ValueError as exc:
        cause = exc
    assert cause.__traceback__ is not None
    cause.__traceback__ = cause.__traceback__.tb_next  # only json's frames left
    library = _files(cause.__traceback__)
    assert len(library) > 1 and Path(__file__).name not in library
    error = SaliencyUsageError("bad")
    error.__cause__ = cause
    user_frames_only(error)
    assert error.__cause__ is cause
    assert _files(cause.__traceback__) == library[-1:]


def test_implicit_context_is_pruned_and_other_errors_pass_untouched() -> None:
    @short_usage_errors
    def entry(kind: str) -> None:
        try:
            json.loads("{")
        except ValueError:
            if kind == "usage":
                raise SaliencyUsageError("bad json")  # chained implicitly: __context__
            raise

    with pytest.raises(SaliencyUsageError, match="bad json") as info:
        entry("usage")
    context = info.value.__context__
    assert isinstance(context, ValueError) and not info.value.__suppress_context__
    # The frame of ``entry`` (this file) is kept; json's are dropped.
    assert _files(context.__traceback__) == [Path(__file__).name]
    with pytest.raises(ValueError) as plain:
        entry("other")
    assert not isinstance(plain.value, SaliencyUsageError)
    assert "decoder.py" in _files(plain.value.__traceback__)


def test_the_wrapped_signature_is_kept() -> None:
    import inspect

    assert list(inspect.signature(ps.ModelCache.get_or_train).parameters) == ["self", "train", "seed", "build",
                                                                               "version"]
    assert "seed" in inspect.signature(ps.explain).parameters
