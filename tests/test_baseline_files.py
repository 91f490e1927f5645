"""Baseline files on disk: one file per test id, atomic writes that clean up after a killed writer,
file modes, and clear errors for paths and files that are not usable baselines."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError
from pytest_saliency.checks.regression import baseline_path, check_baseline, legacy_baseline_path, read_baseline, write_baseline

# -- one file per test id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second",
    [
        (("m.py::test_x[cnn/v1]", None), ("m.py::test_x[cnn_v1]", None)),
        (("m.py::test_x[x y]", None), ("m.py::test_x[x_y]", None)),
        (("m.py::test_y[a::b]", None), ("m.py::test_y[a.b]", None)),
        (("m.py::test_a__b", None), ("m.py::test_a", "b")),
        (("m.py::test_a_", "b"), ("m.py::test_a", "_b")),
        (("m.py::test_x", "ig maps"), ("m.py::test_x", "ig_maps")),
    ],
    ids=["slash", "space", "colons", "name-separator", "trailing-underscore", "name"],
)
def test_test_ids_that_sanitize_alike_get_distinct_files(tmp_path, first, second):
    assert baseline_path(tmp_path, *first) != baseline_path(tmp_path, *second)


def test_names_stay_readable_and_ids_without_special_characters_keep_their_file(tmp_path):
    assert baseline_path(tmp_path, "tests/test_model.py::TestX::test_y[cpu-1.5]", "ig") == (
        tmp_path / "test_model" / "TestX.test_y[cpu-1.5]__ig.npz")
    changed = baseline_path(tmp_path, "tests/test_model.py::test_x[cnn/v1]")
    assert changed.parent == tmp_path / "test_model"
    assert changed.name.startswith("test_x[cnn_v1]~") and changed.suffix == ".npz"
    assert len(changed.stem) == len("test_x[cnn_v1]~") + 12
    assert legacy_baseline_path(tmp_path, "tests/unit/test_m.py::test_x[cnn/v1]", "ig maps") == (
        tmp_path / "test_m" / "test_x[cnn_v1]__ig_maps.npz"), "the name earlier versions gave it"


def test_a_shared_baseline_dir_keeps_the_package_path(tmp_path):
    unit = baseline_path(tmp_path, "tests/unit/test_model.py::test_x", module_dirs=True)
    integration = baseline_path(tmp_path, "tests/integration/test_model.py::test_x", module_dirs=True)
    assert unit == tmp_path / "tests" / "unit" / "test_model" / "test_x.npz"
    assert integration == tmp_path / "tests" / "integration" / "test_model" / "test_x.npz"
    path = baseline_path(tmp_path, "../../elsewhere/test_m.py::test_x", module_dirs=True)
    assert tmp_path in path.parents and ".." not in path.relative_to(tmp_path).parts


@given(st.text(alphabet="ab_/ .:[]-\u00e9~", max_size=8), st.sampled_from([None, "n", "n m"]))
def test_distinct_ids_never_share_a_file(text, name):
    """An id and its sanitized twins (what earlier versions turned it into) all get files of their own."""
    twins = {text, re.sub(r"[^\w.\-\[\]:]", "_", text), text.replace("::", "."), re.sub(r"[^\w.\-\[\]]", "_", text)}
    ids = sorted(twins)
    directory = Path("/baselines")
    paths = {baseline_path(directory, f"t.py::test[{i}]", name) for i in ids}
    assert len(paths) == len(ids)
    nodes = {baseline_path(directory, f"t.py::test_{i}", name, module_dirs=True) for i in ids}
    assert len(nodes) == len(ids)


def test_each_baseline_has_a_sidecar_of_its_own(tmp_path, model_and_inputs):
    """The sidecar is the file name less a final .npz, plus .json: dotted names keep their versions apart."""
    model, x = model_and_inputs
    for version in (1, 2):
        check_baseline(model, x, tmp_path / f"model.v{version}", update=True, target=version)
    for version in (1, 2):
        sidecar = json.loads((tmp_path / f"model.v{version}.json").read_text())
        assert sidecar == read_baseline(tmp_path / f"model.v{version}")[1] and sidecar["target"] == version
    assert not (tmp_path / "model.json").exists()
    from pytest_saliency.checks.regression import sidecar_path

    assert sidecar_path(tmp_path / "model.v1.npz") == tmp_path / "model.v1.json"
    assert sidecar_path("d/B.NPZ") == Path("d/B.json") and sidecar_path("d/b") == Path("d/b.json")
    standard = baseline_path(tmp_path, "tests/test_m.py::TestX::test_y[cpu-1.5]", "ig")
    assert sidecar_path(standard) == standard.with_suffix(".json"), "generated names keep their sidecars"


@pytest.mark.parametrize("first, second", [("model", "model.npz"), ("model.npz", "model")])
def test_a_baseline_and_its_npz_twin_would_share_a_sidecar_and_are_refused(tmp_path, model_and_inputs, first, second):
    check_baseline(*model_and_inputs, tmp_path / first, update=True)
    with pytest.raises(SaliencyUsageError, match=rf"{second} and the baseline {tmp_path / first} would share the "
                       r"JSON sidecar model\.json.*Rename one"):
        check_baseline(*model_and_inputs, tmp_path / second, update=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, "model.json"])


def test_test_ids_too_long_for_the_file_system_are_shortened_and_stay_distinct(tmp_path):
    maps = np.zeros((1, 2, 2), np.float32)
    paths = []
    for last in "ab":
        nodeid = "t.py::test_x[" + "\u00e9" * 400 + last + "]"
        path = baseline_path(tmp_path, nodeid, "n" * 300)
        assert all(len(os.fsencode(part)) <= 230 for part in path.relative_to(tmp_path).parts)
        write_baseline(path, maps, {"format_version": 1})
        paths.append(path)
    assert paths[0] != paths[1] and all(p.exists() and p.with_suffix(".json").exists() for p in paths)


# -- atomic writes: temp files and modes -----------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.skipif(os.name == "nt", reason="writer pids are checked on POSIX only")
def test_a_write_removes_temp_files_that_killed_writers_left(tmp_path):
    path = tmp_path / "b.npz"
    dead = _dead_pid()
    stale = [tmp_path / f".b.npz.{dead}.0123abcd.tmp", tmp_path / f".b.json.{dead}.89abcdef.tmp",
             tmp_path / ".b.npz.k2j4_x9q.tmp"]  # the last: named by tempfile.mkstemp, as earlier versions did
    live = tmp_path / f".b.npz.{os.getpid()}.fedcba98.tmp"  # a writer that is still running
    fresh = tmp_path / f".b.npz.{dead}.76543210.tmp"  # too new to judge: possibly another machine's writer
    other = tmp_path / f".c.npz.{dead}.0123abcd.tmp"  # another baseline's
    for file in [*stale, live, fresh, other]:
        file.write_bytes(b"partial")
    for file in [*stale, other]:
        _age(file, 120)
    _age(stale[2], 2 * 3600)
    write_baseline(path, np.zeros((1, 2, 2), np.float32), {"format_version": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b.npz", "b.json", live.name, fresh.name, other.name])
    _age(live, 2 * 3600)
    write_baseline(path, np.zeros((1, 2, 2), np.float32), {"format_version": 1})
    assert not live.exists(), "a temp file older than any write is stale, whoever wrote it"


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_baseline_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_baseline(tmp_path / "b.npz", np.zeros((1, 2, 2), np.float32), {"format_version": 1})
    finally:
        os.umask(old)
    for name in ("b.npz", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


# -- paths that are not usable ----------------------------------------------------------------------


@pytest.fixture
def model_and_inputs():
    return make_tiny_cnn(), tiny_images()


@pytest.mark.parametrize("path, message", [
    (None, r"path must be a file path \(a str or os.PathLike\), got None"),
    (123, r"path must be a file path \(a str or os.PathLike\), got 123"),
    (b"b.npz", r"path must be a file path \(a str or os.PathLike\), got b'b.npz'"),
    ("", r"path is empty"),
    ("a\0b.npz", r"contains a NUL byte"),
])
def test_paths_that_are_not_paths(model_and_inputs, path, message):
    with pytest.raises(SaliencyUsageError, match=message):
        check_baseline(*model_and_inputs, path)
    with pytest.raises(SaliencyUsageError, match=message):
        read_baseline(path)


def test_a_file_name_too_long_for_the_file_system(tmp_path, model_and_inputs):
    with pytest.raises(SaliencyUsageError, match=r"file name of .* is 304 bytes long.*shorter name"):
        check_baseline(*model_and_inputs, tmp_path / ("x" * 300 + ".npz"))


def test_a_folder_is_not_a_baseline(tmp_path, model_and_inputs):
    (tmp_path / "b.npz").mkdir()
    with pytest.raises(SaliencyUsageError, match=r"b\.npz is a folder, not a baseline file"):
        check_baseline(*model_and_inputs, tmp_path / "b.npz")


def test_an_unwritable_place_is_a_usage_error(tmp_path, model_and_inputs):
    (tmp_path / "file").write_text("")
    with pytest.raises(SaliencyUsageError, match=r"could not be written \(.*Error.*folder"):
        check_baseline(*model_and_inputs, tmp_path / "file" / "b.npz")


# -- files that are not usable baselines ------------------------------------------------------------


def _rewrite(path: Path, maps=None, **changes) -> None:
    stored_maps, metadata = read_baseline(path)
    metadata.update(changes)
    write_baseline(path, stored_maps if maps is None else maps, metadata)


def test_random_bytes_are_not_a_valid_npz_baseline(tmp_path):
    path = tmp_path / "b.npz"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(SaliencyUsageError, match=r"b\.npz is not a valid \.npz baseline") as info:
        read_baseline(path)
    assert "pickled" not in str(info.value)


@pytest.mark.parametrize("metadata, message", [
    ("[1, 2]", r"metadata is not a JSON object \(it is a list\)"),
    ("{not json", r"metadata is not valid JSON"),
])
def test_metadata_that_is_not_a_json_object(tmp_path, metadata, message):
    path = tmp_path / "b.npz"
    np.savez(path, maps=np.zeros((1, 2, 2), np.float32), metadata=np.array(metadata))
    with pytest.raises(SaliencyUsageError, match=rf"b\.npz.*{message}.*--saliency-update-baselines"):
        read_baseline(path)


@pytest.mark.parametrize("change, message", [
    ({"threshold": float("-inf")}, r"threshold must be a finite number with -1 <= threshold <= 1, got -inf"),
    ({"threshold": "0.9"}, r"threshold must be a finite number .* got '0.9'"),
    ({"threshold": 1.5}, r"threshold must be a finite number .* got 1.5"),
    ({"envelope": [0.5]}, r"envelope must be a JSON object"),
    ({"envelope": {"metric": "ssim", "reference_models": 3}}, r"envelope.min_mean_similarity must be a finite number"),
    ({"envelope": {"metric": "ssim", "min_mean_similarity": float("-inf"), "reference_models": 3}},
     r"envelope.min_mean_similarity must be a finite number .* got -inf"),
    ({"envelope": {"metric": "ssim", "min_mean_similarity": 0.5, "reference_models": 1}},
     r"envelope.reference_models must be an int >= 2"),
])
def test_stored_thresholds_are_validated(tmp_path, model_and_inputs, change, message):
    path = tmp_path / "b.npz"
    check_baseline(*model_and_inputs, path)
    _rewrite(path, **change)
    with pytest.raises(SaliencyUsageError, match=rf"saliency baseline {path}: {message}.*--saliency-update-baselines"):
        check_baseline(*model_and_inputs, path)


def test_stored_targets_are_validated(tmp_path, model_and_inputs):
    """Recorded classes are checked against the maps and the model; a field every version writes is required."""
    path = tmp_path / "b.npz"
    check_baseline(*model_and_inputs, path)
    maps, metadata = read_baseline(path)
    write_baseline(path, maps, {**metadata, "targets": [0, -1, 2, 0, 0, 0]})
    with pytest.raises(SaliencyUsageError, match=rf"{path} records targets \[0, -1, .*expected a list of 6 class "
                       r"indices.*--saliency-update-baselines"):
        check_baseline(*model_and_inputs, path)
    write_baseline(path, maps, {**metadata, "targets": [9] * 6})
    with pytest.raises(SaliencyUsageError, match=r"written with target=None and explains the classes .* target 9 is "
                       r"out of range.*--saliency-update-baselines"):
        check_baseline(*model_and_inputs, path)
    del metadata["target"]
    write_baseline(path, maps, metadata)
    with pytest.raises(SaliencyUsageError, match=r"different target \(target: baseline \(not recorded\) vs now None\)"):
        check_baseline(*model_and_inputs, path)


@pytest.mark.parametrize("maps, message", [
    (np.zeros((6, 8, 8), np.float32), r"maps of shape \(6, 8, 8\), but this check's maps have shape \(6, 16, 16\)"),
    (np.full((6, 16, 16), np.nan, np.float32), r"maps with 1536 NaN or infinite value"),
])
def test_stored_maps_of_the_wrong_shape_or_dtype(tmp_path, model_and_inputs, maps, message):
    path = tmp_path / "b.npz"
    check_baseline(*model_and_inputs, path)
    _rewrite(path, maps=maps)
    with pytest.raises(SaliencyUsageError, match=rf"saliency baseline {path} .*{message}.*--saliency-update-baselines"):
        check_baseline(*model_and_inputs, path)


def test_float64_maps_are_compared_as_float32(tmp_path, model_and_inputs):
    path = tmp_path / "b.npz"
    check_baseline(*model_and_inputs, path)
    maps, _ = read_baseline(path)
    _rewrite(path, maps=maps.astype(np.float64))
    assert check_baseline(*model_and_inputs, path).values == [1.0] * 6


# -- through pytest ------------------------------------------------------------------------------------

PARAMETRIZED = """
import pytest
import torch
from torch import nn


def make(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))


@pytest.mark.parametrize("seed", [0, 1], ids=["cnn/v1", "cnn_v1"])
def test_x(saliency_baseline, seed):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    saliency_baseline.check(make(seed), x)
"""


def _baselines(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.npz"))


def _glob(text: object) -> str:
    """``text`` as a literal in an fnmatch pattern (brackets in test ids are character classes there)."""
    return re.sub(r"[\[\]]", lambda match: f"[{match.group()}]", str(text))


def test_parametrized_ids_that_sanitize_alike_keep_their_own_baselines(pytester):
    pytester.makepyfile(test_ids=PARAMETRIZED)
    pytester.runpytest("--saliency", "--saliency-update-baselines").assert_outcomes(passed=2)
    folder = pytester.path / "saliency_baselines" / "test_ids"
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert len(names) == 2 and "test_x[cnn_v1].npz" in names
    pytester.runpytest("--saliency").assert_outcomes(passed=2)


def test_same_named_modules_under_a_shared_baseline_dir(pytester):
    pytester.mkpydir("tests")
    for package in ("unit", "integration"):
        pytester.mkpydir(f"tests/{package}")
        (pytester.path / "tests" / package / "test_model.py").write_text(PARAMETRIZED.replace(
            ".check(make(seed)", f".check(make(seed + {len(package)})"))
    args = ("--saliency", "--saliency-baseline-dir=stored", "-p", "no:cacheprovider")
    pytester.runpytest(*args, "--saliency-update-baselines").assert_outcomes(passed=4)
    found = _baselines(pytester.path / "stored")
    assert len(found) == 4
    assert sum(name.startswith("tests/unit/test_model/") for name in found) == 2
    pytester.runpytest(*args).assert_outcomes(passed=4)


def test_a_baseline_under_its_earlier_name_is_not_read_but_named_for_renaming(pytester):
    pytester.makepyfile(test_ids=PARAMETRIZED)
    pytester.runpytest("--saliency", "--saliency-update-baselines").assert_outcomes(passed=2)
    folder = pytester.path / "saliency_baselines" / "test_ids"
    [new] = [p for p in folder.glob("*.npz") if "~" in p.name]
    old = folder / "test_x[cnn_v1].npz"
    old.unlink()
    new.rename(old)  # what an earlier version wrote: both ids in one file
    new.with_suffix(".json").rename(old.with_suffix(".json"))
    result = pytester.runpytest("--saliency", "test_ids.py::test_x[cnn/v1]")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"E * saliency baseline of test_ids.py::test_x[[]cnn/v1[]] belongs at {_glob(new)}, which does not exist*",
        f"E * earlier versions stored it at {_glob(old)}*",
    ])
    assert not new.exists(), "nothing was written in place of the old file"
    old.rename(new)
    old.with_suffix(".json").rename(new.with_suffix(".json"))
    pytester.runpytest("--saliency", "test_ids.py::test_x[cnn/v1]").assert_outcomes(passed=1)


def test_a_shared_baseline_dir_names_the_earlier_flat_file(pytester):
    pytester.makepyfile(test_flat=PARAMETRIZED.replace('["cnn/v1", "cnn_v1"]', '["a", "b"]'))
    args = ("--saliency", "--saliency-baseline-dir=stored")
    pytester.runpytest(*args, "--saliency-update-baselines").assert_outcomes(passed=2)
    stored = pytester.path / "stored"
    assert _baselines(stored) == ["test_flat/test_x[a].npz", "test_flat/test_x[b].npz"]
    pytester.path.joinpath("sub").mkdir()
    pytester.path.joinpath("test_flat.py").rename(pytester.path / "sub" / "test_flat.py")
    result = pytester.runpytest(*args, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([f"E * earlier versions stored it at {_glob(stored / 'test_flat' / 'test_x[a].npz')}*"])
    assert "Saliency baseline not found" not in result.stdout.str()
