"""Inputs as an iterable of batches (a DataLoader): what a batch may be, and the randomization
check over a stream giving the tensor run's per-example numbers, its cap, its adaptive stop, its
figures from the first batch only, and its errors naming the batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.core.stream import chunks, is_stream


def _loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=batch_size)


def _edges(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    """A control that ignores the model: horizontal differences of the inputs."""
    return torch.nn.functional.pad(inputs[..., 1:] - inputs[..., :-1], (0, 1)).abs()


def test_what_counts_as_a_stream() -> None:
    x = tiny_images(4)
    assert not is_stream(x) and not is_stream(x.numpy()) and not is_stream({"input_ids": x}) and not is_stream("ab")
    assert is_stream([x[:2], x[2:]]) and is_stream(_loader(x)) and is_stream(iter([x])) and is_stream(ps.Batches([x]))


def test_the_parts_of_each_kind_of_batch() -> None:
    x, y = tiny_images(5), torch.arange(5)
    plain = list(chunks([x[:3], x[3:]], "cpu"))
    assert [c.start for c in plain] == [0, 3] and plain[1].labels is None and plain[1].forward_kwargs == {}
    pairs = list(chunks(_loader(x, y, 2), "cpu"))
    assert [c.start for c in pairs] == [0, 2, 4] and torch.equal(pairs[1].labels, y[2:4])
    mask = torch.ones(5, 7, dtype=torch.long)
    ids = torch.randint(0, 9, (5, 7))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y, "lengths": torch.tensor(7)}
    (chunk,) = chunks([batch], "cpu")
    assert chunk.inputs is ids and torch.equal(chunk.labels, y) and list(chunk.forward_kwargs) == ["attention_mask"]
    named = ps.Batches([{"img": x, "cls": y, "aux": mask}], inputs="img", labels="cls", forward_kwargs=["aux"])
    (chunk,) = chunks(named, "cpu")
    assert chunk.inputs is x and chunk.labels is y and list(chunk.forward_kwargs) == ["aux"]
    (chunk,) = chunks(ps.Batches([(y, x)], inputs=lambda b: b[1], labels=None), "cpu")
    assert chunk.inputs is x and chunk.labels is None


@pytest.mark.parametrize(("batches", "message"), [
    ([{"image": tiny_images(2)}], r"batch 0 .*dict with keys \['image'\].*no tensor of inputs.*Batches\("),
    ([["a", "b"]], r"batch 0 .*list of 2.*Batches\("),
    (ps.Batches([{"x": tiny_images(2)}], inputs="pixels"), r"no part 'pixels'"),
    (ps.Batches([(tiny_images(2), torch.arange(3))], labels=1), r"labels 1 .*shape \(3,\).*one row per input \(2\)"),
    (ps.Batches([tiny_images(2)], forward_kwargs=["mask"]), r"names keys of the batches, but they are tensor"),
])
def test_batches_the_check_cannot_read_are_usage_errors(batches: object, message: str) -> None:
    with pytest.raises(SaliencyUsageError, match=message):
        list(chunks(batches, "cpu"))


def test_a_loader_gives_the_tensor_runs_per_example_numbers() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    y = torch.arange(10) % 3
    whole = ps.layer_randomization(model, x, "saliency")
    streamed = ps.layer_randomization(model, _loader(x, y), "saliency")
    assert streamed.ssim == whole.ssim and streamed.n_images == 10 and streamed.images_available == 10
    # the chance level pairs each input with the one before it, across batches too: any batching gives it
    for batch_size in (1, 3, 4):
        assert ps.layer_randomization(model, _loader(x, y, batch_size), "saliency").chance == pytest.approx(
            whole.chance, abs=1e-6)
    assert whole.chance_pairs == 9
    assert streamed.stats.dataset_score == whole.stats.dataset_score
    assert (streamed.stats.ci_low, streamed.stats.ci_high) == (whole.stats.ci_low, whole.stats.ci_high)
    assert streamed.passed == whole.passed
    cascading = dict(mode="cascading", n_steps=8)
    by_labels = ps.layer_randomization(model, _loader(x, y, 3), "integrated_gradients", target="labels", **cascading)
    by_tensor = ps.layer_randomization(model, _loader(x, y, 3), "integrated_gradients", target=y, **cascading)
    reference = ps.layer_randomization(model, x, "integrated_gradients", target=y, **cascading)
    np.testing.assert_allclose(by_labels.ssim, reference.ssim, atol=1e-6)
    assert by_labels.ssim == by_tensor.ssim
    as_list = ps.layer_randomization(model, [x[:6], x[6:]], "saliency")
    assert as_list.ssim == whole.ssim


def test_the_report_keeps_the_first_batchs_maps_only() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    result = ps.layer_randomization(model, _loader(x, batch_size=3), "saliency", keep_maps=4)
    layers = len(result.layers)
    assert result.original_maps.shape == (3, 16, 16) and result.randomized_maps.shape == (layers, 3, 16, 16)
    torch.testing.assert_close(result.original_maps, ps.layer_randomization(model, x[:3], "saliency").original_maps)
    assert json.loads(json.dumps(result.to_dict()))["n_images"] == 12


def test_a_cap_and_the_adaptive_stop_count_over_the_stream() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    capped = ps.layer_randomization(model, _loader(x), "saliency", images=6)
    assert capped.n_images == 6 and capped.ssim == ps.layer_randomization(model, x[:6], "saliency").ssim

    seen: list[int] = []

    def counted():
        for batch in x.split(2):
            seen.append(batch.shape[0])
            yield batch

    auto = ps.layer_randomization(model, counted(), "saliency", images="auto", image_batch=4)
    assert auto.passed and auto.stopped_early.startswith("decisive pass after") and auto.n_images < 12
    assert sum(seen) == auto.n_images and auto.n_images % 4 == 0  # decided every 4 images; read no further
    with pytest.raises(SaliencyCheckFailed, match=r"NOT sensitive"):
        ps.assert_sensitive_to_layer_randomization(model, _loader(x, batch_size=2), _edges, early_exit=True,
                                                   image_batch=4)
    failed = ps.layer_randomization(model, _loader(x, batch_size=2), _edges, early_exit=True, image_batch=4)
    assert not failed.passed and failed.stopped_early == "decisive fail after 4 images"
    # batches of one image: no verdict on fewer than image_batch images
    single = ps.layer_randomization(model, _loader(x, batch_size=1), "saliency", images="auto", image_batch=8)
    assert single.n_images in (8, 12) and single.stats.ci_low < single.stats.ci_high
    capped = []

    def watched():
        for batch in x.split(2):
            capped.append(batch.shape[0])
            yield batch

    assert ps.layer_randomization(model, watched(), "saliency", images=4).n_images == 4
    assert sum(capped) == 4  # the batch after the cap is not read


def test_a_control_that_ignores_the_model_fails_through_a_loader() -> None:
    model, x = make_tiny_cnn(), tiny_images(8)
    with pytest.raises(SaliencyCheckFailed, match=r"NOT sensitive"):
        ps.assert_sensitive_to_cascading_randomization(model, _loader(x), _edges)
    assert ps.assert_sensitive_to_layer_randomization(model, _loader(x), "saliency").n_images == 8


def test_errors_name_the_batch_and_its_examples() -> None:
    model, x = make_tiny_cnn(), tiny_images(8)
    bad = x.clone()
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"in batch 1 of the inputs \(examples 4 to 7\): .*NaN"):
        ps.layer_randomization(model, _loader(bad), "saliency")
    with pytest.raises(SaliencyUsageError, match=r"yielded no batch"):
        ps.layer_randomization(model, [], "saliency")
    with pytest.raises(SaliencyUsageError, match=r"target has 6 entries.*at least 8.*target='labels'"):
        ps.layer_randomization(model, _loader(x), "saliency", target=torch.zeros(6, dtype=torch.long))
    with pytest.raises(SaliencyUsageError, match=r"target has 12 entries, but the inputs' batches had 8 examples"):
        ps.layer_randomization(model, _loader(x), "saliency", target=torch.zeros(12, dtype=torch.long))
    with pytest.raises(SaliencyUsageError, match=r"target='labels'.*carry none"):
        ps.layer_randomization(model, _loader(x), "saliency", target="labels")
    with pytest.raises(SaliencyUsageError, match=r"in batch 1 .*\(1, 1, 8, 8\).*Check that the inputs have the shape"):
        ps.layer_randomization(model, [x[:4], x[4:, :, :8, :8]], "saliency")

    class Branchy(nn.Module):  # runs another layer for large inputs
        def __init__(self) -> None:
            super().__init__()
            self.small, self.large = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.large(v) if v.abs().mean() > 10 else self.small(v)

    v = torch.randn(8, 4)
    with pytest.raises(SaliencyUsageError, match=r"batch 1 of the inputs gives other layers .*'large'.*'small'"):
        ps.layer_randomization(Branchy(), [v[:4], 100 * v[4:]], "saliency")


class _MaskedText(nn.Module):
    """Token ids and an attention mask: the mean of the attended tokens' embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(12, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embedding(ids) * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(torch.tanh(self.hidden(pooled)))


def test_dict_batches_carry_the_attention_mask_of_their_rows() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 12, (9, 6), generator=g)
    ids[::2, 4:] = 0
    mask = (ids != 0).long()
    model = _MaskedText().eval()
    text = ps.Text(pad_token_id=0)
    options = dict(modality=text, n_steps=8)
    whole = ps.layer_randomization(model, ids, "integrated_gradients", forward_kwargs={"attention_mask": mask},
                                   **options)
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, 9, 4)]
    streamed = ps.layer_randomization(model, batches, "integrated_gradients", **options)
    np.testing.assert_allclose(streamed.ssim, whole.ssim, atol=1e-6)
    assert streamed.n_images == 9 and streamed.modality == "text"
    with pytest.raises(SaliencyUsageError, match=r"forward_kwargs names \['attention_mask'\], which the batches"):
        ps.layer_randomization(model, batches, "integrated_gradients", forward_kwargs={"attention_mask": mask},
                               **options)


def test_fifty_thousand_examples_stream_with_per_example_numbers_only() -> None:
    """A generated tabular stream of 50,000 examples: every example counted, one number per layer
    and example kept, the maps of one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2)).eval()

    def generated():
        g = torch.Generator().manual_seed(0)
        for _ in range(25):
            yield torch.randn(2000, 10, generator=g)

    result = ps.layer_randomization(model, generated(), "saliency", keep_maps=2)
    assert result.n_images == 50_000 and len(result.ssim) == 2 and len(result.ssim[0]) == 50_000
    assert result.original_maps.shape[0] == 2 and result.passed


LOADER_TESTS = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()


def _loader():
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.arange(10) % 3), batch_size=4)


def test_gradients(saliency):
    saliency.assert_sensitive_to_layer_randomization(_model(), _loader(), "saliency", target="labels")


def test_control(saliency):
    saliency.assert_sensitive_to_layer_randomization(_model(), _loader(), lambda m, x, target: x.abs())
'''


def test_the_fixture_takes_a_loader_and_reports_every_example(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_loader=LOADER_TESTS)
    result = pytester.runpytest_subprocess("--saliency", "--saliency-report=json", "--saliency-results-dir=out",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*NOT sensitive*", "*images: 10 *"])
    data = json.loads((pytester.path / "out" / "saliency-report.json").read_text())
    assert sorted((r["nodeid"].split("::")[1], r["result"]["n_images"]) for r in data["results"]) == [
        ("test_control", 10), ("test_gradients", 10)]


def test_target_labels_with_a_tensor_says_what_it_needs() -> None:
    with pytest.raises(SaliencyUsageError, match=r"target='labels' explains each example's label as the batches"):
        ps.layer_randomization(make_tiny_cnn(), tiny_images(4), "saliency", target="labels")


@pytest.mark.parametrize(("method", "options"), [
    ("smoothgrad", {"nt_samples": 4}), ("gradient_shap", {"n_samples": 3}),
    ("smoothgrad", {"nt_samples": 4, "reuse_activations": False}),
])
def test_a_stochastic_methods_draws_follow_the_example_not_the_batch(method: str, options: dict) -> None:
    """Each example's random draws are keyed by its index in the whole stream, so a loader gives
    the tensor run's numbers for SmoothGrad and GradientSHAP too."""
    model, x = make_tiny_cnn(), tiny_images(10)
    whole = ps.layer_randomization(model, x, method, **options)
    assert ps.layer_randomization(model, _loader(x), method, **options).ssim == whole.ssim


def test_a_per_example_substrate_is_sliced_batch_by_batch() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    substrate = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    whole = ps.deletion(model, x, "saliency", substrate=substrate)
    torch.testing.assert_close(ps.deletion(model, _loader(x), "saliency", substrate=substrate).auc, whole.auc)
    with pytest.raises(SaliencyUsageError, match=r"substrate has 3 rows, one per example, .*at least 4"):
        ps.deletion(model, _loader(x), "saliency", substrate=substrate[:3])


def test_iterables_that_are_not_batches_are_refused_with_what_to_pass() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    y = torch.arange(6) % 3
    with pytest.raises(SaliencyUsageError, match=r"TensorDataset, whose items are single examples.*DataLoader"):
        ps.layer_randomization(model, TensorDataset(x, y), "saliency")
    with pytest.raises(SaliencyUsageError, match=r"one \(inputs, labels\) pair.*target=labels"):
        ps.layer_randomization(model, (x, y), "saliency")
    assert ps.layer_randomization(model, (x[:3], x[3:]), "saliency").n_images == 6  # a tuple of batches


def test_dict_columns_the_forward_does_not_take_are_not_passed_to_it() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 12, (8, 6), generator=g)
    mask = torch.ones(8, 6, dtype=torch.long)
    model, text = _MaskedText().eval(), ps.Text(pad_token_id=0)
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4], "idx": torch.arange(i, i + 4)}
               for i in (0, 4)]
    result = ps.layer_randomization(model, batches, "integrated_gradients", modality=text, n_steps=4)
    plain = ps.layer_randomization(model, [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches],
                                   "integrated_gradients", modality=text, n_steps=4)
    assert result.ssim == plain.ssim
    named = ps.Batches(batches, forward_kwargs=["attention_mask", "idx"])  # named: passed as asked
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'idx'"):  # the model's own error
        ps.layer_randomization(model, named, "integrated_gradients", modality=text, n_steps=4)
