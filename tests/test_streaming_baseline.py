"""Regression baselines over a DataLoader: written and compared a batch at a time, never whole in memory."""

from __future__ import annotations

import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency import SaliencyUsageError
from pytest_saliency.checks.regression import check_baseline, read_baseline, sidecar_path, write_baseline


@pytest.fixture
def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return make_tiny_cnn(), tiny_images(10), torch.arange(10) % 3


def loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=batch_size)


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_a_loader_writes_the_baseline_then_compares_with_it(tmp_path, data):
    model, x, y = data
    path = tmp_path / "b.npz"
    written = check_baseline(model, loader(x, y), path)
    assert written.status == "written" and not written.passed and written.n_images == 10
    assert "Saliency baseline not found" in written.failure_message() and "(10 images)" in written.failure_message()
    assert [name for name, _ in written.figures()] == ["baseline_written"]
    compared = check_baseline(model, loader(x, y), path)
    assert compared.status == "compared" and compared.passed and compared.values == [1.0] * 10
    assert compared.n_images == 10 and compared.to_dict()["n_images"] == 10 and "N = 10" in compared.summary()
    # Only the first batch's maps are kept, for the figure.
    assert compared.current_maps.shape == compared.baseline_maps.shape == (4, 16, 16)
    assert [name for name, _ in compared.figures()] == ["baseline_comparison"]
    assert compared.figures()[0][1]()[:4] == b"\x89PNG"
    assert leftovers(tmp_path) == []


def test_a_loader_and_a_tensor_of_the_same_examples_are_interchangeable(tmp_path, data):
    model, x, y = data
    by_tensor, by_loader = tmp_path / "tensor.npz", tmp_path / "loader.npz"
    check_baseline(model, x, by_tensor)
    check_baseline(model, loader(x, y, batch_size=3), by_loader)
    tensor_maps, tensor_meta = read_baseline(by_tensor)
    loader_maps, loader_meta = read_baseline(by_loader)  # the whole-file reader reads a streamed baseline
    assert np.allclose(tensor_maps, loader_maps, atol=1e-6)
    assert loader_meta["input_shape"] == tensor_meta["input_shape"] == [10, 1, 16, 16]
    assert loader_meta["targets"] == tensor_meta["targets"]
    assert "input_fingerprint" not in loader_meta and len(loader_meta["example_fingerprint"]) == 64
    assert json.loads(sidecar_path(by_loader).read_text()) == loader_meta
    with zipfile.ZipFile(by_loader) as archive:
        assert sorted(archive.namelist()) == ["maps.npy", "metadata.npy"]
    drifted = make_tiny_cnn(seed=5)
    expected = check_baseline(drifted, x, by_tensor).values
    # A loader of other batch sizes, and a plain list of tensors, compare with the tensor's baseline ...
    for stream in (loader(x, y, batch_size=4), [x[:6], x[6:]]):
        assert check_baseline(drifted, stream, by_tensor).values == pytest.approx(expected, abs=1e-5)
    # ... and the tensor with the loader's.
    assert check_baseline(drifted, x, by_loader).values == pytest.approx(expected, abs=1e-5)


def test_other_examples_or_another_order_are_refused(tmp_path, data):
    model, x, y = data
    path = tmp_path / "b.npz"
    check_baseline(model, loader(x, y), path)
    with pytest.raises(SaliencyUsageError, match="example_fingerprint.*another order.*shuffle=False"):
        check_baseline(model, loader(x.flip(0)), path)
    with pytest.raises(SaliencyUsageError, match="example_fingerprint"):
        check_baseline(model, loader(x + 0.01), path)
    with pytest.raises(SaliencyUsageError, match=r"input_shape: baseline \[10, 1, 16, 16\] vs now \[7, 1, 16, 16\]"):
        check_baseline(model, loader(x[:7]), path)
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 .*holds the maps of 10 examples, but the inputs have more"):
        check_baseline(model, loader(tiny_images(12)), path)
    # A baseline written from a tensor is compared by its input_fingerprint, computed batch by batch.
    check_baseline(model, x, tmp_path / "t.npz")
    with pytest.raises(SaliencyUsageError, match="input_fingerprint.*another order"):
        check_baseline(model, loader(x.flip(0)), tmp_path / "t.npz")
    # The tensor of other examples is refused by a streamed baseline too.
    with pytest.raises(SaliencyUsageError, match="example_fingerprint"):
        check_baseline(model, x.flip(0), path)


def test_a_retrained_model_fails_on_the_classes_the_baseline_explained(tmp_path, data):
    model, x, y = data
    path = tmp_path / "b.npz"
    check_baseline(model, loader(x, y), path)
    retrained = make_tiny_cnn(seed=5)
    with torch.no_grad():
        assert (retrained(x).argmax(1) != model(x).argmax(1)).any()  # it predicts other classes for some images
    result = check_baseline(retrained, loader(x, y), path)
    assert result.status == "compared" and not result.passed and len(result.values) == 10
    # target=None explains each batch for the classes stored at its offset, as the tensor path does.
    tensor_path = tmp_path / "t.npz"
    check_baseline(model, x, tensor_path)
    assert result.values == pytest.approx(check_baseline(retrained, x, tensor_path).values, abs=1e-5)
    message = result.failure_message()
    assert "drifted from the stored baseline" in message and "over 10 images" in message
    with torch.no_grad():
        perturbed = make_tiny_cnn()
        perturbed.conv1.weight.add_(torch.randn(perturbed.conv1.weight.shape,
                                                generator=torch.Generator().manual_seed(3)))
    assert not check_baseline(perturbed, loader(x, y), path).passed


def test_targets_per_batch(tmp_path, data):
    model, x, y = data
    path = tmp_path / "labels.npz"
    assert check_baseline(model, loader(x, y), path, target="labels").status == "written"
    assert json.loads(sidecar_path(path).read_text())["target"] == y.tolist()
    assert check_baseline(model, loader(x, y, batch_size=3), path, target="labels").values == [1.0] * 10
    assert check_baseline(model, x, path, target=y).passed  # the same classes given as one tensor
    assert check_baseline(model, loader(x, y), path, target=y.tolist()).passed  # ... or as a list
    with pytest.raises(SaliencyUsageError, match="made from different target"):
        check_baseline(model, loader(x, (y + 1) % 3), path, target="labels")
    with pytest.raises(SaliencyUsageError, match="in batch 1 .*target has 6 entries.*whole loader"):
        check_baseline(model, loader(x, y), tmp_path / "short.npz", target=y[:6])
    with pytest.raises(SaliencyUsageError, match="target has 12 entries, but the inputs yielded 10"):
        check_baseline(model, loader(x, y), tmp_path / "long.npz", target=torch.arange(12) % 3)
    with pytest.raises(SaliencyUsageError, match="in batch 0 .*target='labels'.*carry none"):
        check_baseline(model, loader(x), tmp_path / "none.npz", target="labels")
    assert leftovers(tmp_path) == [] and not (tmp_path / "short.npz").exists()


def test_reference_models_calibrate_the_envelope_batch_by_batch(tmp_path, data):
    model, x, y = data
    references = [make_tiny_cnn(seed=1), make_tiny_cnn(seed=2)]
    heard = []
    streamed = check_baseline(model, loader(x, y), tmp_path / "s.npz", reference_models=references, metric="pearson",
                              progress=lambda done, total, label: heard.append((done, total, label)))
    whole = check_baseline(model, x, tmp_path / "t.npz", reference_models=references, metric="pearson")
    assert streamed.threshold == pytest.approx(whole.threshold, abs=1e-6)
    assert streamed.threshold_source == "calibrated from 3 reference models"
    assert heard[:4] == [(0, 3, "batch 1/3 model"), (1, 3, "batch 1/3 reference model 1/2"),
                         (2, 3, "batch 1/3 reference model 2/2"), (3, 3, "batch 1/3")]
    assert heard[-1] == (3, 3, "batch 3/3") and len(heard) == 12
    assert check_baseline(model, loader(x, y), tmp_path / "s.npz", metric="pearson").threshold == streamed.threshold


def failing_loader(x: torch.Tensor):
    yield x[:4]
    yield x[4:8]
    raise RuntimeError("the data loader worker died")


def test_the_file_is_written_atomically(tmp_path, data):
    model, x, _ = data
    path = tmp_path / "b.npz"
    with pytest.raises(RuntimeError, match="worker died"):
        check_baseline(model, failing_loader(x), path)
    assert os.listdir(tmp_path) == []  # no baseline, no sidecar, no temporary file
    check_baseline(model, x, path)
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    with pytest.raises(RuntimeError, match="worker died"):
        check_baseline(make_tiny_cnn(seed=3), failing_loader(x), path, update=True)
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before and leftovers(tmp_path) == []
    with pytest.raises(SaliencyUsageError, match="yielded no batch"):
        check_baseline(model, [], tmp_path / "empty.npz")
    assert not (tmp_path / "empty.npz").exists() and leftovers(tmp_path) == []


def test_a_usage_error_in_batch_2_names_the_batch(tmp_path, data):
    model, x, _ = data
    odd = [x[:4], x[4:8], tiny_images(2, seed=1)[:, :, :12, :12]]
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 of the inputs \(examples 8 to 9\): .*shape"):
        check_baseline(model, odd, tmp_path / "b.npz")
    assert os.listdir(tmp_path) == []


def test_a_damaged_baseline_is_reported_by_name(tmp_path, data):
    model, x, y = data
    path = tmp_path / "b.npz"
    check_baseline(model, x, path)
    maps, metadata = read_baseline(path)
    maps[9, 3, 3] = np.nan  # in the last batch's rows: found when that batch is read
    write_baseline(path, maps, metadata)
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 .*b.npz holds maps with 1 NaN or infinite value\(s\) in "
                                                 r"rows 8 to 9"):
        check_baseline(model, loader(x, y), path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(SaliencyUsageError, match="b.npz is corrupted or truncated"):
        check_baseline(model, loader(x, y), path)
    write_baseline(path, maps[:, :, :8], metadata)
    with pytest.raises(SaliencyUsageError, match=r"holds maps of shape \(4, 16, 8\), but this check's maps have shape "
                                                 r"\(4, 16, 16\)"):
        check_baseline(model, loader(x, y), path)


def test_a_streamed_check_never_holds_all_maps(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 32, 3)).eval()
    x = torch.rand(768, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    all_maps = 768 * 32 * 32 * 4  # bytes of float32 maps
    warm = [x[:4]]
    check_baseline(model, warm, tmp_path / "warm.npz", metric="pearson")  # imports and caches outside the measure
    check_baseline(model, warm, tmp_path / "warm.npz", metric="pearson")
    peaks = {}
    for step in ("written", "compared"):
        tracemalloc.start()
        try:
            result = check_baseline(model, loader(x, batch_size=32), tmp_path / "b.npz", metric="pearson")
            peaks[step] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.status == step and result.current_maps.shape == (32, 32, 32) and result.n_images == 768
    assert result.passed and len(result.values) == 768
    assert peaks["written"] < all_maps / 2 and peaks["compared"] < all_maps / 2, peaks
    tracemalloc.start()  # the control: the tensor path holds them all (the measure can fail)
    try:
        check_baseline(model, x, tmp_path / "b.npz", metric="pearson")
        assert tracemalloc.get_traced_memory()[1] > all_maps
    finally:
        tracemalloc.stop()


def test_a_custom_explainer_through_a_loader(tmp_path, data):
    model, x, y = data

    def scaled_inputs(m: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            score = m(inputs).gather(1, target[:, None])
        return inputs * score[:, :, None, None].tanh().abs() * torch.linspace(0.5, 1.5, 16)

    path = tmp_path / "b.npz"
    check_baseline(model, loader(x, y), path, scaled_inputs, metric="pearson")
    assert check_baseline(model, loader(x, y), path, scaled_inputs, metric="pearson").passed
    assert check_baseline(model, x, path, scaled_inputs, metric="pearson").passed
    with pytest.raises(SaliencyUsageError, match="made from different method"):
        check_baseline(model, loader(x, y), path, "saliency", metric="pearson")


class MaskedText(nn.Module):
    """Token ids and an attention mask, as Hugging Face models take them."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embedding, self.mix, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.unsqueeze(-1).float()
        hidden = torch.tanh(self.mix(self.embedding(input_ids))) * keep
        return self.head(hidden.sum(1) / keep.sum(1).clamp(min=1))


def test_dict_batches_of_token_ids_with_an_attention_mask(tmp_path):
    ids = torch.randint(2, 20, (8, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[:, 4:], mask[:, 4:] = 0, 0
    labels = torch.arange(8) % 2
    batches = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": labels[i:i + 3]}
               for i in range(0, 8, 3)]
    text, path = ps.Text(pad_token_id=0), tmp_path / "text.npz"
    written = check_baseline(MaskedText(), batches, path, modality=text, target="labels")
    assert written.metric == "spearman" and written.n_images == 8
    compared = check_baseline(MaskedText(), batches, path, modality=text, target="labels")
    assert compared.passed and compared.values == pytest.approx([1.0] * 8, abs=1e-6)
    assert len(compared.figure_context["tokens"]) == 3  # the first batch's tokens, for its figure
    whole = check_baseline(MaskedText(), ids, path, modality=text, target=labels, forward_kwargs={"attention_mask": mask})
    assert whole.values == pytest.approx(compared.values, abs=1e-6)
    assert not check_baseline(MaskedText(seed=3), batches, path, modality=text, target="labels").passed


FIXTURE_TEST = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = {seed}

def test_maps(saliency_baseline):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12 * 12, 3))
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.rand(10, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10) % 3
    saliency_baseline.check(model, DataLoader(TensorDataset(x, y), batch_size=4), target="labels")
"""


def test_the_baseline_fixture_takes_a_loader(pytester):
    pytester.makepyfile(test_flow=FIXTURE_TEST.format(seed=0))
    pytester.runpytest("--saliency").assert_outcomes(failed=1)  # written
    pytester.runpytest("--saliency").assert_outcomes(passed=1)
    pytester.makepyfile(test_flow=FIXTURE_TEST.format(seed=7))
    drift = pytester.runpytest("--saliency", "--saliency-report=json", "--saliency-results-dir=out")
    drift.assert_outcomes(failed=1)
    drift.stdout.fnmatch_lines(["*drifted from the stored baseline*", "*over 10 images*"])
    report = json.loads((pytester.path / "out" / "saliency-report.json").read_text())
    (entry,) = report["results"]
    assert entry["check"] == "baseline" and entry["numbers"]["n_images"] == 10 and len(entry["result"]["values"]) == 10
