"""Regression baselines: storage, refusals, calibration, and the pytest workflow."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError
from pytest_saliency.checks.regression import baseline_path, check_baseline, read_baseline, write_baseline


@pytest.fixture
def model_and_inputs():
    return make_tiny_cnn(), tiny_images()


def test_missing_written_then_compared_then_drift(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    first = check_baseline(model, x, path)
    assert first.status == "written" and not first.passed and path.exists() and path.with_suffix(".json").exists()
    assert "Saliency baseline not found" in first.failure_message()
    second = check_baseline(model, x, path)
    assert second.status == "compared" and second.passed and second.values == [1.0] * 6
    drifted = make_tiny_cnn(seed=5)
    third = check_baseline(drifted, x, path, target=None)
    assert not third.passed
    message = third.failure_message()
    assert "drifted from the stored baseline" in message and "worst images: #" in message
    worst = third.worst(1)[0]
    assert worst[1] == min(third.values)


def test_update_overwrites_and_passes(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path)
    other = make_tiny_cnn(seed=3)
    result = check_baseline(other, x, path, update=True)
    assert result.status == "updated" and result.passed
    assert check_baseline(other, x, path).values == [1.0] * 6


def test_sidecar_records_what_the_baseline_was_made_from(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path, "integrated_gradients", n_steps=8, preset="sam2020")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["method"] == "integrated_gradients" and meta["method_options"]["n_steps"] == 8
    assert meta["preset"]["name"] == "sam2020" and len(meta["input_fingerprint"]) == 64
    assert {"torch", "captum", "pytest_saliency"} <= set(meta["versions"]) and meta["created"]
    maps, stored = read_baseline(path)
    assert maps.dtype == np.float32 and maps.shape == (6, 16, 16) and stored == meta


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m, x: (m, x + 0.01, {}), "input_fingerprint"),
        (lambda m, x: (m, x, {"method": "input_x_gradient"}), "method"),
        (lambda m, x: (m, x, {"preset": "thesis2023"}), "preset"),
    ],
)
def test_unlike_calls_are_an_error_not_a_comparison(tmp_path, model_and_inputs, change, field):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path)
    m, x2, options = change(model, x)
    with pytest.raises(SaliencyUsageError, match=f"made from different {field}.*--saliency-update-baselines"):
        check_baseline(m, x2, path, **options)


@pytest.mark.parametrize(
    "written, now, field",
    [
        ({"target": 0}, {"target": 2}, "target"),
        ({"target": 0}, {"target": None}, "target"),
        ({"target": None}, {"target": 1}, "target"),
        ({"method": "smoothgrad", "nt_samples": 2, "seed": 0}, {"method": "smoothgrad", "nt_samples": 2, "seed": 1},
         "seed"),
        ({"metric": "pearson", "threshold": 0.5}, {"metric": "ssim"}, "metric"),
    ],
    ids=["other-class", "class-then-predicted", "predicted-then-class", "stochastic-seed", "stored-threshold-metric"],
)
def test_targets_seeds_and_threshold_metrics_must_match(tmp_path, model_and_inputs, written, now, field):
    path = tmp_path / "b.npz"
    check_baseline(*model_and_inputs, path, **written)
    with pytest.raises(SaliencyUsageError, match=f"{path} was made from different {field}.*--saliency-update-baselines"
                       ) as info:
        check_baseline(*model_and_inputs, path, **now)
    assert str(info.value).count("made from different") == 1


def test_only_what_changes_the_comparison_is_matched(tmp_path, model_and_inputs):
    """An envelope gates only the metric it was calibrated for; a given threshold may gate any metric;
    the seed of a method that draws no random numbers and the spelling of a target do not matter."""
    import torch

    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path, metric="pearson", reference_models=[make_tiny_cnn(seed=1)])
    with pytest.raises(SaliencyUsageError, match=r"different metric \(metric: baseline 'pearson' vs now 'ssim'\)"
                       r".*threshold=.*--saliency-update-baselines"):
        check_baseline(model, x, path, metric="ssim")
    assert check_baseline(model, x, path, metric="pearson").threshold_source == "calibrated from 2 reference models"
    given = check_baseline(model, x, path, metric="ssim", threshold=0.95)
    assert given.status == "compared" and given.threshold_source == "given" and given.values == [1.0] * 6
    assert check_baseline(model, x, path, metric="pearson", seed=7).passed, "saliency draws no random numbers"
    check_baseline(model, x, tmp_path / "c.npz", target=2)
    assert check_baseline(model, x, tmp_path / "c.npz", target=torch.full((6,), 2)).values == [1.0] * 6


def test_predicted_classes_are_pinned_by_the_baseline(tmp_path, model_and_inputs):
    """target=None: a later model is explained for the classes the baseline explained, as the
    reference models of an envelope are, so a changed prediction compares the same class's maps."""
    import torch

    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path)
    first = model(x).argmax(1)
    assert json.loads(path.with_suffix(".json").read_text())["targets"] == first.tolist()
    retrained = make_tiny_cnn(seed=5)
    assert (retrained(x).argmax(1) != first).any(), "the retrained model predicts another class for some image"
    compared = check_baseline(retrained, x, path)
    expected = check_baseline(retrained, x, tmp_path / "pinned.npz", target=first, update=True)
    assert torch.equal(compared.current_maps, expected.current_maps)
    # Files of earlier versions record only target=None: the current predictions are explained.
    maps, metadata = read_baseline(path)
    del metadata["targets"]
    write_baseline(path, maps, metadata)
    own = check_baseline(retrained, x, tmp_path / "own.npz", target=retrained(x).argmax(1), update=True)
    assert torch.equal(check_baseline(retrained, x, path).current_maps, own.current_maps)


def test_calibrated_threshold_from_reference_models(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    refs = [make_tiny_cnn(seed=s) for s in (1, 2)]
    written = check_baseline(model, x, path, reference_models=refs)
    assert written.threshold_source == "calibrated from 3 reference models"
    compared = check_baseline(make_tiny_cnn(seed=1), x, path)
    assert compared.threshold == written.threshold < 1.0
    assert compared.passed, "a reference seed is within the recipe's own envelope"


def test_corrupted_truncated_and_foreign_files(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    check_baseline(model, x, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaliencyUsageError, match=f"{path}.*corrupted or truncated"):
        check_baseline(model, x, path)
    np.savez(path, other=np.zeros(3))
    with pytest.raises(SaliencyUsageError, match="not a pytest-saliency baseline"):
        read_baseline(path)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_FILE",))


def test_a_pickle_payload_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("maps.npy", pickle.dumps(np.array([Boom()], dtype=object)))
        array = np.array([Boom()], dtype=object)
        with archive.open("metadata.npy", "w") as handle:
            np.lib.format.write_array(handle, array, allow_pickle=True)
    with pytest.raises(SaliencyUsageError, match="pickled Python objects; it was refused"):
        read_baseline(path)
    assert not (tmp_path / "PWNED_FILE").exists()


def test_an_interrupted_write_leaves_the_old_baseline(tmp_path, monkeypatch):
    path = tmp_path / "b.npz"
    write_baseline(path, np.ones((2, 8, 8), np.float32), {"format_version": 1, "v": "old"})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", lambda handle, **kw: (handle.write(b"partial"), crash()))
    with pytest.raises(KeyboardInterrupt):
        write_baseline(path, np.zeros((2, 8, 8), np.float32), {"format_version": 1, "v": "new"})
    monkeypatch.undo()
    maps, meta = read_baseline(path)
    assert meta["v"] == "old" and maps.sum() == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.npz"], "no temp files left behind"


def test_paths_are_per_test_and_name(tmp_path):
    p = baseline_path(tmp_path, "tests/test_model.py::TestX::test_y[cpu-1]", "ig_maps")
    assert p == tmp_path / "test_model" / "TestX.test_y[cpu-1]__ig_maps.npz"
    spaced = baseline_path(tmp_path, "tests/test_model.py::TestX::test_y[cpu-1]", "ig maps")
    assert spaced.parent == p.parent and spaced.name.startswith("TestX.test_y[cpu-1]__ig_maps~")


def test_a_json_path_is_refused_before_its_sidecar_could_overwrite_the_maps(tmp_path, model_and_inputs):
    """'b.json' is the sidecar of the baselines 'b.npz' and 'b': maps and metadata would overwrite each other."""
    for name in ("b.json", "b.JSON"):
        with pytest.raises(SaliencyUsageError, match=r"ends in \.json, the name of a baseline's metadata sidecar .*b\.npz"
                           ):
            check_baseline(*model_and_inputs, tmp_path / name, update=True)
        with pytest.raises(SaliencyUsageError, match=r"ends in \.json"):
            write_baseline(tmp_path / name, np.zeros((1, 2, 2)), {})
    with pytest.raises(SaliencyUsageError, match=r"ends in \.json"):  # the sidecar of the baseline '.npz'
        check_baseline(*model_and_inputs, tmp_path / ".json", update=True)
    assert list(tmp_path.iterdir()) == []
    written = check_baseline(*model_and_inputs, tmp_path / "b", update=True)  # no suffix: b and b.json
    assert written.passed and check_baseline(*model_and_inputs, tmp_path / "b").passed


def test_unknown_metric(tmp_path, model_and_inputs):
    with pytest.raises(SaliencyUsageError, match="unknown baseline metric"):
        check_baseline(*model_and_inputs, tmp_path / "b.npz", metric="hog")


WORKFLOW_TEST = """
import torch
from torch import nn

SCALE = {scale}

def make():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model[0].weight.mul_(SCALE)
        if SCALE != 1.0:
            model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=torch.Generator().manual_seed(9)))
    return model

def test_maps(saliency_baseline):
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    saliency_baseline.check(make(), x, method="saliency")
"""


def test_the_pytest_workflow(pytester):
    pytester.makepyfile(test_flow=WORKFLOW_TEST.format(scale=1.0))
    missing = pytester.runpytest("--saliency")
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*Saliency baseline not found*test_maps.npz*", "*saliency baselines written*"])
    target = pytester.path / "saliency_baselines" / "test_flow" / "test_maps.npz"
    assert target.exists()
    pytester.runpytest("--saliency").assert_outcomes(passed=1)
    pytester.makepyfile(test_flow=WORKFLOW_TEST.format(scale=2.0))
    drift = pytester.runpytest("--saliency")
    drift.assert_outcomes(failed=1)
    drift.stdout.fnmatch_lines(["*drifted from the stored baseline*", "*worst images: #*"])
    update = pytester.runpytest("--saliency", "--saliency-update-baselines")
    update.assert_outcomes(passed=1)
    update.stdout.fnmatch_lines(["*saliency baselines written*", "*test_maps.npz"])
    pytester.runpytest("--saliency").assert_outcomes(passed=1)
    target.write_bytes(target.read_bytes()[:100])
    broken = pytester.runpytest("--saliency")
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["*test_maps.npz is corrupted or truncated*"])


def test_baseline_dir_option(pytester):
    pytester.makepyfile(test_flow=WORKFLOW_TEST.format(scale=1.0))
    pytester.runpytest("--saliency", "--saliency-baseline-dir=stored", "--saliency-update-baselines").assert_outcomes(passed=1)
    assert (pytester.path / "stored" / "test_flow" / "test_maps.npz").exists()


@pytest.mark.parametrize("seed", [np.int64(1), np.uint8(1), np.int64(-3)])
def test_numpy_integer_seeds_negative_ones_included(tmp_path, model_and_inputs, seed):
    written = check_baseline(*model_and_inputs, tmp_path / "b.npz", "smoothgrad", seed=seed, nt_samples=2)
    assert written.seed == int(seed) and type(written.seed) is int
    assert check_baseline(*model_and_inputs, tmp_path / "b.npz", "smoothgrad", seed=seed, nt_samples=2).passed


@pytest.mark.parametrize("threshold", [float("nan"), float("-inf"), 1.5, -2, "0.9", True])
def test_thresholds_are_validated(tmp_path, model_and_inputs, threshold):
    with pytest.raises(SaliencyUsageError, match=r"threshold must be a finite number with -1 <= threshold <= 1"):
        check_baseline(*model_and_inputs, tmp_path / "b.npz", threshold=threshold)
    assert not (tmp_path / "b.npz").exists()


def test_the_fixture_validates_threshold_name_and_counts(tmp_path, model_and_inputs):
    from pytest_saliency.plugin.checker import BaselineChecker, SaliencyChecker
    from pytest_saliency.plugin.config import SaliencyConfig

    fixture = BaselineChecker(SaliencyChecker(SaliencyConfig(), nodeid="t.py::test_x"), tmp_path, update=False)
    with pytest.raises(SaliencyUsageError, match=r"threshold must be a finite number .* got inf"):
        fixture.check(*model_and_inputs, threshold=float("inf"))
    with pytest.raises(SaliencyUsageError, match=r"name must be a str or None, got 3"):
        fixture.check(*model_and_inputs, name=3)
    with pytest.raises(SaliencyUsageError, match=r"batch_size must be an int >= 1 or None, got 0"):
        fixture.check(*model_and_inputs, batch_size=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("refs, message", [
    ([], r"reference_models is empty"),
    ("models", r"reference_models must be a list of models"),
    (lambda: make_tiny_cnn(1), r"reference_models must be a list of models"),
    (lambda: [make_tiny_cnn(1), "m"], r"reference_models\[1\] must be a torch.nn.Module, got str"),
    (lambda: [make_tiny_cnn(1).to("meta")],
     r"reference_models\[0\] is on meta but the model and inputs are on cpu.*reference_models\[0\].to\('cpu'\)"),
])
def test_reference_models_are_validated(tmp_path, model_and_inputs, refs, message):
    refs = refs() if callable(refs) else refs
    with pytest.raises(SaliencyUsageError, match=message):
        check_baseline(*model_and_inputs, tmp_path / "b.npz", reference_models=refs)


def test_a_model_on_the_meta_device_is_refused(tmp_path):
    import torch

    with pytest.raises(SaliencyUsageError, match=r"model and inputs are on the meta device.*hold no values.*to_empty"):
        check_baseline(make_tiny_cnn().to("meta"), torch.empty(2, 1, 16, 16, device="meta"), tmp_path / "b.npz")


def test_an_envelope_that_cannot_be_calibrated_is_not_stored(tmp_path):
    import torch

    from pytest_saliency import SaliencyCheckFailed

    def blind():  # its output ignores the input: constant (all-zero) maps, whose Pearson r is undefined
        model = make_tiny_cnn()
        with torch.no_grad():
            model.fc.weight.zero_()
        return model

    path = tmp_path / "b.npz"
    with pytest.raises(SaliencyCheckFailed, match=r"b\.npz not written: the mean pearson .* is nan.*ignore its input"):
        check_baseline(blind(), tiny_images(), path, metric="pearson", reference_models=[blind()])
    assert not path.exists()


def _previous_jsonable(value):
    """How earlier versions wrote ``method_options``: JSON values as they are, anything else as its repr."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_previous_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _previous_jsonable(v) for k, v in value.items()}
    return repr(value)


def test_a_baseline_with_a_tensor_option_in_the_previous_encoding_is_compared(tmp_path, model_and_inputs):
    """Earlier versions stored a tensor option as its repr: such a file is compared (the same tensor)
    or refused (another tensor), never refused because the encoding changed."""
    import torch

    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    baseline = torch.full((1, 1, 16, 16), 0.25)
    check_baseline(model, x, path, "integrated_gradients", n_steps=8, baselines=baseline)
    maps, meta = read_baseline(path)
    assert meta["method_options"]["baselines"].startswith("tensor(1, 1, 16, 16) float32 sha256:")
    options = {**meta["method_options"], "baselines": baseline}
    meta["method_options"] = json.loads(json.dumps(_previous_jsonable(options)))
    assert meta["method_options"]["baselines"].startswith("tensor([[[[0.2500")
    write_baseline(path, maps, meta)
    result = check_baseline(model, x, path, "integrated_gradients", n_steps=8, baselines=baseline.clone())
    assert result.status == "compared" and result.passed and result.values == [1.0] * 6
    with pytest.raises(SaliencyUsageError, match=r"different method_options \(method_options: baseline .*tensor\(\[\[\[\["):
        check_baseline(model, x, path, "integrated_gradients", n_steps=8, baselines=torch.full((1, 1, 16, 16), 0.5))
    with pytest.raises(SaliencyUsageError, match="different method_options"):
        check_baseline(model, x, path, "integrated_gradients", n_steps=9, baselines=baseline)


def test_tensor_options_are_told_apart_by_dtype_and_values_whatever_their_layout(tmp_path):
    """A bfloat16 model's tensor baseline is recorded (numpy has no bfloat16), a strided view of the
    same values matches it, and other values or dtypes are refused."""
    import torch

    model, x = make_tiny_cnn().to(torch.bfloat16), tiny_images().to(torch.bfloat16)
    path = tmp_path / "b.npz"
    baseline = torch.full((1, 1, 16, 16), 0.25, dtype=torch.bfloat16)
    check_baseline(model, x, path, "integrated_gradients", n_steps=4, baselines=baseline, threshold=0.5)
    assert read_baseline(path)[1]["method_options"]["baselines"].startswith("tensor(1, 1, 16, 16) bfloat16 sha256:")
    strided = torch.full((1, 1, 1, 1), 0.25, dtype=torch.bfloat16).expand(1, 1, 16, 16)
    same = check_baseline(model, x, path, "integrated_gradients", n_steps=4, baselines=strided, threshold=0.5)
    assert same.status == "compared" and same.passed
    with pytest.raises(SaliencyUsageError, match="different method_options"):
        check_baseline(model, x, path, "integrated_gradients", n_steps=4, baselines=baseline + 0.25, threshold=0.5)
    model32, x32 = make_tiny_cnn(), tiny_images()
    check_baseline(model32, x32, tmp_path / "f.npz", "integrated_gradients", n_steps=4,
                   baselines=torch.zeros(1, 1, 16, 16))
    # The inputs' fingerprint is of their float32 values, the same in float64: the option's dtype tells.
    with pytest.raises(SaliencyUsageError, match=r"different method_options \(.*float32 sha256:.*float64 sha256:"):
        check_baseline(model32.double(), x32.double(), tmp_path / "f.npz", "integrated_gradients", n_steps=4,
                       baselines=torch.zeros(1, 1, 16, 16, dtype=torch.float64))


def test_progress_has_one_step_per_model_explained(tmp_path, model_and_inputs):
    model, x = model_and_inputs
    path = tmp_path / "b.npz"
    calls: list[tuple[int, int, str]] = []
    check_baseline(model, x, path, reference_models=[make_tiny_cnn(seed=s) for s in (1, 2)],
                   progress=lambda *step: calls.append(step))
    assert calls == [(0, 3, "model"), (1, 3, "reference model 1/2"), (2, 3, "reference model 2/2"), (3, 3, "")]
    calls.clear()
    check_baseline(model, x, path, progress=lambda *step: calls.append(step))  # compared: the model only
    assert calls == [(0, 1, "model"), (1, 1, "")]
    with pytest.raises(SaliencyUsageError, match="progress must be None or a callable"):
        check_baseline(model, x, path, progress="bar")
