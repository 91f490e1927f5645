"""Seed consistency over an iterable of batches (a DataLoader): the models trained once, every
example's numbers equal to the tensor run's, the classifier fit on all examples, the maps for the
figure from the first batch only, the batches' labels used, and errors naming the batch."""

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
from pytest_saliency.checks.consistency import consistency_settings, explained_pairs

N = 12


def _loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=batch_size)


def _models(count: int = 3) -> list[nn.Module]:
    return [make_tiny_cnn(seed) for seed in range(count)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_images(N), torch.arange(N) % 3


def _assert_same_pairs(streamed: ps.ConsistencyResult, whole: ps.ConsistencyResult) -> None:
    """Every per-pair number of the tensor run, except the different-input baselines (measured
    within each batch)."""
    assert [(p.a, p.b) for p in streamed.pairs] == [(p.a, p.b) for p in whole.pairs]
    for s, w in zip(streamed.pairs, whole.pairs):
        assert s.lr_accuracy == w.lr_accuracy and s.fold_accuracies == w.fold_accuracies
        assert s.train_accuracy == w.train_accuracy and s.prediction_agreement == w.prediction_agreement
        assert s.similarities == pytest.approx(w.similarities, abs=1e-6)
        assert s.relative_difference == pytest.approx(w.relative_difference, rel=1e-6)
        assert all(np.isfinite(v) for v in s.baselines.values())
    assert streamed.consistency == whole.consistency and streamed.n_inputs == whole.n_inputs


def test_a_loader_gives_the_tensor_runs_numbers_and_accuracies_from_its_labels() -> None:
    x, y = _data()
    whole = ps.explanation_consistency(_models(2), x, labels=y, n_splits=2)
    streamed = ps.explanation_consistency(_models(2), _loader(x, y), n_splits=2)
    _assert_same_pairs(streamed, whole)
    assert streamed.accuracies == whole.accuracies and streamed.metrics == whole.metrics == ["ssim", "sign_agreement"]
    data = json.loads(json.dumps(streamed.to_dict()))
    assert data["n_inputs"] == N and data["accuracies"] == whole.accuracies
    assert streamed.summary().endswith(f"2 models, 1 pairs, N = {N}") and f"inputs: {N}" in streamed.report()
    assert streamed.failure_message().startswith(streamed.summary())
    # a labels tensor for the whole stream is sliced batch by batch
    listed = ps.explanation_consistency(_models(2), [x[:7], x[7:]], labels=y, n_splits=2)
    _assert_same_pairs(listed, whole)
    assert listed.accuracies == whole.accuracies


def test_the_figure_keeps_the_first_batchs_maps_only() -> None:
    x, y = _data()
    whole = ps.explanation_consistency(_models(2), x, n_splits=2, metrics=("sign_agreement",))
    streamed = ps.explanation_consistency(_models(2), _loader(x, batch_size=2), n_splits=2,
                                          metrics=("sign_agreement",))
    _assert_same_pairs(streamed, whole)
    assert streamed.accuracies is None  # batches without labels
    assert streamed.shown_inputs.shape[0] == 2 and torch.equal(streamed.shown_inputs, x[:2])
    for label, maps in streamed.shown_maps.items():
        assert maps.shape[0] == 2 and torch.allclose(maps, whole.shown_maps[label][:2], atol=1e-6)
    assert [name for name, _ in streamed.figures()] == [name for name, _ in whole.figures()]
    # per batch, only the first batch's part keeps its maps; all examples' classifier features are kept
    settings = consistency_settings(metrics=("sign_agreement",), n_splits=2)
    part = explained_pairs(dict(zip(["a", "b"], _models(2))), _loader(x, batch_size=3), settings)
    assert part.n == N and part.features["a"].shape == (N, 256) and part.shown["shown_inputs"].shape[0] == 3
    assert all(values.shape == (N,) for pair in part.similarities.values() for values in pair.values())


def test_target_labels_explains_each_batchs_labels() -> None:
    x, y = _data()
    whole = ps.explanation_consistency(_models(), x, target=y, n_splits=2, metrics=("sign_agreement",))
    streamed = ps.explanation_consistency(_models(), _loader(x, y), target="labels", n_splits=2,
                                          metrics=("sign_agreement",))
    _assert_same_pairs(streamed, whole)
    assert streamed.target_mode == whole.target_mode == "given"
    with pytest.raises(SaliencyUsageError, match="target='labels'.*carry none"):
        ps.explanation_consistency(_models(), [x[:6], x[6:]], target="labels", n_splits=2)


def test_a_factory_trains_once_and_an_inconsistent_set_still_fails_through_a_loader() -> None:
    """Untrained CNNs of different seeds explain unalike: the gate fails for the loader as for the
    tensor, with the same score, and the factory runs once per seed whatever the batches."""
    x, y = _data()
    calls: list[int] = []

    def train(seed: int) -> nn.Module:
        calls.append(seed)
        return make_tiny_cnn(seed)

    options = dict(seeds=[0, 1, 2], metric="sign_agreement", n_splits=2)
    with pytest.raises(SaliencyCheckFailed) as failed:
        ps.assert_seed_consistency_above(train, _loader(x, y, batch_size=3), **options)
    assert calls == [0, 1, 2]
    streamed = failed.value.result
    whole = ps.seed_consistency(train, x, labels=y, **options)
    _assert_same_pairs(streamed, whole)
    assert not streamed.passed and streamed.score == pytest.approx(whole.score)
    assert streamed.threshold == whole.threshold
    assert streamed.accuracies == whole.accuracies and streamed.factors == whole.factors
    assert "not similar enough" in streamed.failure_message() and f"N = {N}" in streamed.summary()
    with pytest.raises(SaliencyCheckFailed, match=r"not consistent across the models \(C = 0"):
        ps.assert_seed_consistency_above(_models(2), iter([x[:6], x[6:]]), n_splits=2)


def test_the_default_metrics_follow_the_batches() -> None:
    """A gate on a metric outside the defaults adds it to the defaults of the batches' inputs:
    feature vectors get no SSIM."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).eval() for _ in range(2)]
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(3))
    whole = ps.seed_consistency(models, x, metric="cosine_similarity", threshold=-1.0, n_splits=2)
    streamed = ps.seed_consistency(models, [x[:4], x[4:8], x[8:]], metric="cosine_similarity", threshold=-1.0,
                                   n_splits=2)
    assert streamed.metrics == whole.metrics == ["sign_agreement", "cosine_similarity"]
    _assert_same_pairs(streamed, whole)


def test_a_usage_error_in_a_later_batch_names_it() -> None:
    x, _ = _data()
    bad = x.clone()
    bad[8, 0, 0, 0] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"in batch 1 of the inputs \(examples 6 to 11\):.*(NaN|finite)"):
        ps.explanation_consistency(_models(2), [bad[:6], bad[6:]], n_splits=2)
    with pytest.raises(SaliencyUsageError, match=r"in batch 4 of the inputs \(examples 8 to 9\)"):
        ps.consistency_vs_ensemble_size(_models(2), _loader(bad, batch_size=2), sizes=(1,), n_splits=2)
    with pytest.raises(SaliencyUsageError, match="in batch 1 of the inputs"):
        ps.explainer_seed_stability(_models(1)[0], [x[:6], bad[6:]], "saliency")
    with pytest.raises(SaliencyUsageError, match="6 input.*too few for 5-fold"):
        ps.explanation_consistency(_models(2), [x[:3], x[3:6]])
    scores = torch.rand(N, 3)  # batches whose labels are not classes: the message says how to leave them out
    with pytest.raises(SaliencyUsageError,
                       match=r"batch 0 .*integer tensor.*batches' labels.*Batches\(loader, labels=None\)"):
        ps.explanation_consistency(_models(2), _loader(x, scores), n_splits=2)
    assert ps.explanation_consistency(_models(2), ps.Batches(_loader(x, scores), labels=None),
                                      n_splits=2, metrics=("sign_agreement",)).accuracies is None


class _MaskedText(nn.Module):
    """Token ids and an attention mask: the mean of the attended tokens' embeddings."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(12, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embedding(ids) * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(torch.tanh(self.hidden(pooled)))


def test_dict_batches_of_text_carry_their_attention_mask_and_labels() -> None:
    with torch.random.fork_rng():
        models = [_MaskedText(seed).eval() for seed in range(2)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 12, (N, 6), generator=g)
    ids[::2, 4:] = 0
    mask, y = (ids != 0).long(), torch.arange(N) % 2
    options = dict(modality=ps.Text(pad_token_id=0), n_splits=2, metrics=("feature_agreement",), k=2)
    whole = ps.explanation_consistency(models, ids, forward_kwargs={"attention_mask": mask}, labels=y, **options)
    batches = [{"input_ids": ids[i:i + 5], "attention_mask": mask[i:i + 5], "labels": y[i:i + 5]}
               for i in range(0, N, 5)]
    streamed = ps.explanation_consistency(models, batches, **options)
    _assert_same_pairs(streamed, whole)
    assert streamed.accuracies == whole.accuracies and streamed.num_features == 6
    short = [{"input_ids": ids[:6], "attention_mask": mask[:6]},
             {"input_ids": ids[6:, :5], "attention_mask": mask[6:, :5]}]
    with pytest.raises(SaliencyUsageError, match="batch 1 .* 5 features, batch 0 of 6.*pad every batch"):
        ps.explanation_consistency(models, short, **options)


def test_ensemble_sizes_stream_once_over_the_batches() -> None:
    """A one-shot generator suffices: every size is explained batch by batch in one pass."""
    x, y = _data()
    calls: list[int] = []

    def train(seed: int) -> nn.Module:
        calls.append(seed)
        return make_tiny_cnn(seed)

    options = dict(seeds=[0, 1, 2, 3], sizes=(1, 2), n_splits=2)
    whole = ps.consistency_vs_ensemble_size(train, x, **options)
    calls.clear()
    streamed = ps.consistency_vs_ensemble_size(train, (batch for batch in [x[:5], x[5:10], x[10:]]), **options)
    assert calls == [0, 1, 2, 3] and streamed.n_inputs == N and streamed.target_mode == "ensemble"
    for size in (1, 2):
        _assert_same_pairs(streamed.results[size], whole.results[size])
        assert streamed.results[size].shown_maps["seed=0" if size == 1 else "seed=0+seed=1"].shape[0] == 4
    assert [row.to_dict() for row in streamed.rows] == pytest.approx([row.to_dict() for row in whole.rows])
    options = dict(seeds=[0, 1], sizes=(1,), n_splits=2)
    labelled = ps.consistency_vs_ensemble_size(train, _loader(x, y), target="labels", **options)
    given = ps.consistency_vs_ensemble_size(train, x, target=y, labels=y, **options)
    _assert_same_pairs(labelled.results[1], given.results[1])
    assert labelled.results[1].accuracies == given.results[1].accuracies
    json.dumps(labelled.to_dict())


def test_explainer_seed_stability_over_a_loader() -> None:
    x, y = _data()
    model = make_tiny_cnn(0)
    for method in ("saliency", "input_x_gradient"):
        whole = ps.explainer_seed_stability(model, x, method, target=y)
        streamed = ps.assert_explainer_seed_stable(model, _loader(x, y), method, target="labels")
        assert streamed.pair_scores == pytest.approx(whole.pair_scores) and streamed.n_inputs == N
        assert streamed.deterministic and streamed.max_abs_difference == whole.max_abs_difference
        assert {**streamed.to_dict(), "seconds": 0} == {**whole.to_dict(), "seconds": 0}
    generator = torch.Generator().manual_seed(0)

    def unseeded(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
        """A control: draws from its own generator, so neither the seed nor the model matter."""
        return torch.rand(inputs.shape, generator=generator)

    with pytest.raises(SaliencyCheckFailed, match="not deterministic") as failed:
        ps.assert_explainer_seed_stable(model, [x[:4], x[4:8], x[8:]], unseeded)
    assert failed.value.result.n_inputs == N and not failed.value.result.passed
    assert len(failed.value.result.pair_values[0]) == N


def test_the_classifier_is_fit_on_the_first_classifier_inputs_only() -> None:
    """What bounds the check's memory over a loader of any size: the flattened maps of the first
    ``classifier_inputs`` examples are kept for the classifier; the similarities cover all."""
    x, y = _data()
    whole = ps.explanation_consistency(_models(2), x, n_splits=2, classifier_inputs=7)
    first = ps.explanation_consistency(_models(2), x[:7], n_splits=2)
    streamed = ps.explanation_consistency(_models(2), _loader(x, batch_size=5), n_splits=2, classifier_inputs=7)
    assert whole.lr_inputs == streamed.lr_inputs == 7 and whole.n_inputs == N
    assert whole.pairs[0].lr_accuracy == first.pairs[0].lr_accuracy == streamed.pairs[0].lr_accuracy
    assert whole.pairs[0].similarities != first.pairs[0].similarities  # the similarities cover all inputs
    assert "on attributions of the first 7 inputs" in whole.report() and whole.to_dict()["lr_inputs"] == 7
    settings = consistency_settings(n_splits=2, classifier_inputs=7)
    kept = explained_pairs({"a": make_tiny_cnn(0), "b": make_tiny_cnn(1)}, _loader(x, batch_size=5), settings)
    assert kept.n == N and all(f.shape[0] == 7 for f in kept.features.values())
    with pytest.raises(SaliencyUsageError, match=r"classifier_inputs"):
        ps.explanation_consistency(_models(2), x, classifier_inputs=1)
