"""Sweeps, SAM grids and the insertion/deletion games over an iterable of batches (a DataLoader):
the per-image numbers of a loader are those of the tensor of the same inputs, the statistics and
verdicts are recomputed on all of them, and only the first batch's maps are kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.checks.sweeps import combine_sweep_results, slim_sweep_result

IG = dict(method="integrated_gradients", sweep={"n_steps": [2, 4]}, reference={"n_steps": 8}, metrics=("ssim", "spearman"))
PAD, VOCAB, LENGTH = 0, 16, 8
TEXT = ps.Text(pad_token_id=PAD)


@pytest.fixture(scope="module")
def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return make_tiny_cnn(), tiny_images(10), torch.arange(10) % 3


def _scores(result: ps.SweepResult) -> list[dict[str, list[float]]]:
    return [row.scores for table in result.tables for row in table.rows]


def _assert_same_sweep(streamed: ps.SweepResult, whole: ps.SweepResult) -> None:
    for ours, theirs in zip(_scores(streamed), _scores(whole), strict=True):
        assert ours.keys() == theirs.keys()
        for metric in ours:
            assert ours[metric] == pytest.approx(theirs[metric], abs=1e-5)
    assert streamed.n_images == whole.n_images and streamed.targets == whole.targets
    assert streamed.passed == whole.passed and streamed.summary() == whole.summary()


def test_a_sweep_over_a_loader_or_a_list_of_batches_equals_the_tensor_sweep(data):
    model, x, y = data
    whole = ps.hyperparameter_sweep(model, x, **IG)
    loader = ps.hyperparameter_sweep(model, DataLoader(TensorDataset(x, y), batch_size=4), **IG)
    listed = ps.hyperparameter_sweep(model, [x[:3], x[3:7], x[7:]], **IG)
    _assert_same_sweep(loader, whole)
    _assert_same_sweep(listed, whole)
    # the maps kept are the first batch's (3 of the keep_maps=4): the later batches keep none
    assert listed.reference_maps is not None and listed.reference_maps.shape[0] == 3
    torch.testing.assert_close(listed.reference_maps, whole.reference_maps[:3])
    assert all(row.attributions is None for table in listed.tables for row in table.rows)
    assert listed.table_text() == whole.table_text()
    json.dumps(listed.to_dict())
    assert listed.to_dict()["n_images"] == 10


def test_the_assertion_streams_and_a_seed_dependent_control_still_fails(data):
    model, x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    result = ps.assert_stable_under_hyperparameters(model, loader, threshold=0.5, target="labels", **IG)
    assert result.passed and result.targets == y.tolist()
    noise = lambda model, inputs, target: torch.rand_like(inputs)  # noqa: E731 - a map of nothing but the seed
    with pytest.raises(SaliencyCheckFailed, match=r"NOT stable under hyperparameter changes: seed=1") as failed:
        ps.assert_stable_under_hyperparameters(model, loader, noise, sweep={"seed": [1, 2]}, threshold=0.5)
    assert "images: 10" in str(failed.value)


def test_a_sam_grid_is_scaled_to_the_batches(data):
    model, x, y = data
    x, y = x[:6], y[:6]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    expected = ps.sam_grid("occlusion_small", x.shape)
    assert ps.sam_grid("occlusion_small", loader) == expected == ps.sam_grid("occlusion_small", x)
    assert ps.sam_grid("occlusion_small", [x[:4], x[4:]]) == expected
    with pytest.raises(SaliencyUsageError, match=r"a generator can be read only once.*input_shape=batch.shape"):
        ps.sam_grid("occlusion_small", (batch for batch in [x]))
    streamed = ps.hyperparameter_sweep(model, loader, "occlusion_small", metrics=("ssim",))
    _assert_same_sweep(streamed, ps.hyperparameter_sweep(model, x, "occlusion_small", metrics=("ssim",)))


def test_what_a_stream_cannot_keep_or_combine_is_refused(data):
    model, x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(SaliencyUsageError, match=r"keep_attributions=True keeps the raw attributions.*accuracy_spread"):
        ps.hyperparameter_sweep(model, loader, keep_attributions=True, **IG)
    bad = x[8:].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 of the inputs \(examples 8 to 9\)"):
        ps.hyperparameter_sweep(model, [x[:4], x[4:8], bad], **IG)
    one, other = ps.hyperparameter_sweep(model, x[:2], **IG), ps.hyperparameter_sweep(model, x[2:4], "saliency",
                                                                                       sweep={"abs": [False]})
    with pytest.raises(SaliencyUsageError, match=r"batch 1 of the inputs was swept over other values"):
        combine_sweep_results([one, other])
    slim = slim_sweep_result(one)
    assert slim.reference_maps is None and _scores(slim) == _scores(one)
    assert _scores(combine_sweep_results([one, slim])) == [
        {m: v + v for m, v in scores.items()} for scores in _scores(one)]


def test_deletion_and_insertion_over_a_loader_equal_the_tensor_games(data):
    model, x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    whole = ps.deletion(model, x, "saliency")
    streamed = ps.deletion(model, loader, "saliency")
    torch.testing.assert_close(streamed.curves, whole.curves)
    torch.testing.assert_close(streamed.auc, whole.auc)
    assert streamed.targets == whole.targets and torch.equal(streamed.fractions, whole.fractions)
    maps = ps.explain(model, x, "saliency")
    given = ps.insertion(model, [x[:3], x[3:]], maps, target=y)
    torch.testing.assert_close(given.auc, ps.insertion(model, x, maps, target=y).auc)
    labels = ps.causal_curves(model, loader, maps, "insertion", target="labels")
    assert labels.targets == y.tolist() and "N = 10" in labels.summary()
    json.dumps(labels.to_dict())
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 of the inputs.*attributions hold 9 maps"):
        ps.deletion(model, loader, maps[:9])
    with pytest.raises(SaliencyUsageError, match=r"attributions hold 11 maps, but the inputs' batches have 10"):
        ps.deletion(model, loader, torch.cat([maps, maps[:1]]))


def test_the_accuracy_spread_over_a_loader_equals_the_tensor_spread(data):
    model, x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    options = dict(sweep={"n_steps": [4, 8]}, scores=("deletion",))
    whole = ps.accuracy_spread(model, x, "integrated_gradients", **options)
    streamed = ps.accuracy_spread(model, loader, "integrated_gradients", **options)
    assert streamed.n_images == 10 and len(streamed.rows) == len(whole.rows)
    for ours, theirs in zip(streamed.rows, whole.rows):
        assert ours.values == theirs.values
        torch.testing.assert_close(torch.tensor(ours.per_image), torch.tensor(theirs.per_image))
        assert ours.std_of_means == pytest.approx(theirs.std_of_means, abs=1e-6)
        assert ours.mean_image_std == pytest.approx(theirs.mean_image_std, abs=1e-6)
    json.dumps(streamed.to_dict())
    kept = ps.hyperparameter_sweep(model, x, "integrated_gradients", sweep={"n_steps": [4]}, metrics=(),
                                   keep_attributions=True)
    with pytest.raises(SaliencyUsageError, match=r"a SweepResult and a loader"):
        ps.accuracy_spread(model, loader, kept)


class MaskedText(nn.Module):
    """An embedding and a linear head over the attended tokens' mean."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.embedding = nn.Embedding(VOCAB, 8, padding_idx=PAD)
            self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.unsqueeze(-1).float()
        return self.head((torch.tanh(self.embedding(ids)) * keep).sum(1) / keep.sum(1).clamp(min=1))


def test_text_batches_with_an_attention_mask_equal_the_tensor_with_forward_kwargs():
    """Dict batches (input_ids, attention_mask, labels) of texts whose lengths differ from batch to
    batch: the games' curves of the shorter texts end early and are carried at their last value."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (6, LENGTH), generator=g)
    for row, length in enumerate([8, 6, 3, 4, 5, 2]):
        ids[row, length:] = PAD
    mask, labels = (ids != PAD).long(), torch.tensor([0, 1, 1, 0, 1, 0])
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2], "labels": labels[i:i + 2]}
               for i in range(0, 6, 2)]
    model = MaskedText().eval()
    whole = ps.deletion(model, ids, "saliency", modality=TEXT, forward_kwargs={"attention_mask": mask}, target=labels)
    streamed = ps.deletion(model, batches, "saliency", modality=TEXT, target="labels")
    assert whole.fractions.shape == streamed.fractions.shape == (6, LENGTH + 1)
    torch.testing.assert_close(streamed.fractions, whole.fractions)
    torch.testing.assert_close(streamed.curves, whole.curves)
    torch.testing.assert_close(streamed.auc, whole.auc)
    sweep = dict(method="integrated_gradients", sweep={"n_steps": [4]}, reference={"n_steps": 8}, modality=TEXT)
    _assert_same_sweep(ps.hyperparameter_sweep(model, batches, **sweep),
                       ps.hyperparameter_sweep(model, ids, forward_kwargs={"attention_mask": mask}, **sweep))
