"""Method agreement and input-noise stability over an iterable of batches (a DataLoader): the
tensor run's per-example numbers, statistics on every example, chance levels measured per batch
and averaged, the first batch's maps only, controls that still fail, errors naming the batch."""

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

METHODS = ["saliency", "input_x_gradient", "integrated_gradients"]
METRICS = ["feature_agreement", "sign_agreement", "rank_correlation", "ssim"]
IG = {"integrated_gradients": {"n_steps": 8}}


def _loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=batch_size)


def _agreement(model: nn.Module, inputs: object, **kwargs: object) -> ps.AgreementResult:
    return ps.agreement_matrix(model, inputs, METHODS, METRICS, method_options=IG, n_bootstrap=200, **kwargs)


def _wild(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
    """A control that ignores the model and whose map changes with any change of the input."""
    return torch.sin(inputs * 1e4)


# ------------------------------------------------------------------------------------------------
# agreement
# ------------------------------------------------------------------------------------------------


def test_agreement_over_a_loader_gives_the_tensor_runs_per_image_values_and_statistics() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    y = torch.arange(10) % 3
    whole = _agreement(model, x)
    streamed = _agreement(model, _loader(x, y))
    as_list = _agreement(model, [x[:6], x[6:]])
    singles = _agreement(model, _loader(x, y, batch_size=1))
    assert streamed.n_images == as_list.n_images == 10 and streamed.passed == whole.passed
    for index, (p, q, r) in enumerate(zip(whole.pairs, streamed.pairs, as_list.pairs)):
        assert (p.metric, p.method_a, p.method_b) == (q.metric, q.method_a, q.method_b)
        np.testing.assert_allclose(q.values, p.values, atol=1e-6)
        np.testing.assert_allclose(r.values, p.values, atol=1e-6)
        np.testing.assert_allclose([q.mean, q.std, q.ci_low, q.ci_high], [p.mean, p.std, p.ci_low, p.ci_high],
                                   atol=1e-6)
        # The chance on maps of different inputs pairs each input with the one before it, across
        # batches too: the tensor run's, for any batching (batches of one image included).
        for other in (q, r, singles.pairs[index]):
            assert other.chance_measured == pytest.approx(p.chance_measured, abs=1e-6)
            assert other.chance_pairs == p.chance_pairs == 9 and other.chance_theory == p.chance_theory
        assert singles.passed == whole.passed


def test_target_labels_explains_each_batchs_labels() -> None:
    model, x = make_tiny_cnn(), tiny_images(9)
    y = torch.tensor([2, 0, 1, 1, 2, 0, 0, 1, 2])
    by_labels = _agreement(model, _loader(x, y, 3), target="labels")
    by_tensor = _agreement(model, _loader(x, y, 3), target=y)
    reference = _agreement(model, x, target=y)
    for p, q, r in zip(by_labels.pairs, by_tensor.pairs, reference.pairs):
        assert p.values == q.values
        np.testing.assert_allclose(p.values, r.values, atol=1e-6)


def test_agreement_keeps_the_first_batchs_maps_and_counts_every_image() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    result = _agreement(model, _loader(x, batch_size=3))
    first = _agreement(model, x[:3])
    assert set(result.maps) == set(METHODS)
    for name, maps in result.maps.items():
        assert maps.shape == (3, 16, 16)
        torch.testing.assert_close(maps, first.maps[name])
    assert all(len(p.values) == 12 for p in result.pairs) and result.figures()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["n_images"] == 12 and "N = 12" in result.summary()


def test_constant_maps_are_counted_over_the_stream_and_refused_only_on_all_of_it() -> None:
    """Every map of batch 0 is zero: that batch alone has no image to rank, the stream has four."""
    model, x = make_tiny_cnn(), tiny_images(8)
    x[:4, :, 0, 0], x[4:, :, 0, 0] = 0.2, 0.9

    def gated(model: nn.Module, inputs: torch.Tensor, target: object) -> torch.Tensor:
        return inputs * (inputs[:, :, :1, :1] > 0.5)

    methods = ["saliency", gated]
    whole = ps.agreement_matrix(model, x, methods, ["feature_agreement"])
    streamed = ps.agreement_matrix(model, _loader(x), methods, ["feature_agreement"])
    (p,), (q,) = whole.pairs, streamed.pairs
    assert q.undefined == p.undefined == 4 and streamed.constant_maps == whole.constant_maps == {
        "saliency": 0, "gated": 4}
    np.testing.assert_allclose(q.values, p.values, atol=1e-6)  # NaN where left out, in both
    assert q.mean == pytest.approx(p.mean) and "4 of 8 gated maps constant" in streamed.summary()
    with pytest.raises(SaliencyCheckFailed, match=r"no image left to compare \(N = 4\)"):
        ps.agreement_matrix(model, _loader(x[:4], batch_size=2), methods, ["feature_agreement"])


def test_the_agreement_gate_through_a_loader() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    y = torch.arange(12) % 3
    passed = ps.assert_agreement_above(model, _loader(x, y), ["saliency", "input_x_gradient"])
    assert passed.beat_chance and passed.n_images == 12 and passed.statistic == "bound"
    assert passed.threshold == passed.pairs[0].chance_theory
    with pytest.raises(SaliencyCheckFailed, match=r"explanation methods disagree"):
        ps.assert_agreement_above(model, _loader(x, y), ["saliency", _wild], metric="rank_correlation",
                                  threshold=0.5)
    with pytest.raises(SaliencyUsageError, match=r"precomputed maps are compared as two tensors.*DataLoader"):
        ps.assert_agreement_above(x, _loader(x), metric="ssim", threshold=0.5)


def test_agreement_errors_name_the_batch_and_its_examples() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    bad = x.clone()
    bad[9, 0, 0, 0] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 of the inputs \(examples 8 to 9\): .*NaN"):
        _agreement(model, _loader(bad))
    with pytest.raises(SaliencyUsageError, match=r"in batch 0 of the inputs .*method_options names \['nope'\]"):
        ps.agreement_matrix(model, _loader(x), METHODS, METRICS, method_options={"nope": {}})
    with pytest.raises(SaliencyUsageError, match=r"target has 6 entries.*at least 8"):
        _agreement(model, _loader(x), target=torch.zeros(6, dtype=torch.long))


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


def _text() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 12, (9, 6), generator=g)
    ids[::2, 4:] = 0
    mask = (ids != 0).long()
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, 9, 4)]
    return _MaskedText().eval(), ids, mask, batches


def test_text_dict_batches_carry_their_attention_mask() -> None:
    model, ids, mask, batches = _text()
    text = ps.Text(pad_token_id=0)
    methods, metrics = ["input_x_gradient", "integrated_gradients"], ["feature_agreement", "spearman"]
    whole = ps.agreement_matrix(model, ids, methods, metrics, k=2, modality=text, method_options=IG,
                                forward_kwargs={"attention_mask": mask})
    streamed = ps.agreement_matrix(model, batches, methods, metrics, k=2, modality=text, method_options=IG)
    assert streamed.n_images == 9
    for p, q in zip(whole.pairs, streamed.pairs):
        np.testing.assert_allclose(q.values, p.values, atol=1e-6)
    with pytest.raises(SaliencyUsageError, match=r"in batch 0 of the inputs .*token ids are integers"):
        ps.input_noise_stability(model, batches, "saliency", modality=text)


# ------------------------------------------------------------------------------------------------
# input noise
# ------------------------------------------------------------------------------------------------


def _noise(model: nn.Module, inputs: object, **kwargs: object) -> ps.SweepResult:
    options = {"variance": [0.01, 0.1], "n_draws": 2, "metrics": ("ssim", "spearman"), **kwargs}
    return ps.input_noise_stability(model, inputs, "saliency", **options)


def _scores(result: ps.SweepResult) -> list[dict[str, list[float]]]:
    return [row.scores for row in result.tables[0].rows]


def test_an_examples_noise_depends_on_the_seed_the_draw_and_its_index_only() -> None:
    x = tiny_images(10)
    whole = ps.add_input_noise(x, 0.1, seed=3, draw=1)
    assert torch.equal(ps.add_input_noise(x[4:], 0.1, seed=3, draw=1, first_example=4), whole[4:])
    assert not torch.equal(ps.add_input_noise(x[4:], 0.1, seed=3, draw=1), whole[4:])
    assert not torch.equal(ps.add_input_noise(x, 0.1, seed=3, draw=0), whole)


def test_input_noise_over_a_loader_gives_the_tensor_runs_per_image_scores() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    y = torch.arange(10) % 3
    whole = _noise(model, x)
    streamed = _noise(model, _loader(x, y))
    assert _scores(streamed) == _scores(whole) and _scores(_noise(model, [x[:7], x[7:]])) == _scores(whole)
    assert streamed.n_images == 10 and streamed.targets == whole.targets
    assert torch.equal(streamed.target_tensor, whole.target_tensor)
    by_labels = _noise(model, _loader(x, y, 3), target="labels")
    for row, reference in zip(_scores(by_labels), _scores(_noise(model, x, target=y))):
        for metric, values in row.items():
            np.testing.assert_allclose(values, reference[metric], atol=1e-6)  # batches of 3: float sums differ
    assert _scores(_noise(model, _loader(x, y, 3), target="labels")) == _scores(by_labels)  # deterministic

    def shifted(inputs: torch.Tensor, seed: int, draw: int) -> torch.Tensor:
        return inputs + 0.05 * torch.sin(inputs * 100 + draw)

    assert _scores(_noise(model, _loader(x), noise=shifted)) == _scores(_noise(model, x, noise=shifted))


def test_input_noise_keeps_the_first_batchs_maps_and_reports_every_image() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    result = _noise(model, _loader(x, batch_size=3), threshold=0.0, metric="ssim")
    assert result.reference_maps.shape == (3, 16, 16)
    torch.testing.assert_close(result.reference_maps, _noise(model, x[:3]).reference_maps)
    assert all(len(s) == 12 for scores in _scores(result) for s in scores.values()) and result.figures()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["n_images"] == 12 and len(data["targets"]) == 12 and "N = 12" in result.summary()
    assert result.passed and "verdict:     stable" in result.report()


def test_the_input_noise_gate_fails_an_unstable_control_through_a_loader() -> None:
    model, x = make_tiny_cnn(), tiny_images(8)
    with pytest.raises(SaliencyCheckFailed, match=r"NOT stable under input noise"):
        ps.assert_stable_under_input_noise(model, _loader(x), _wild, threshold=0.5, metric="ssim")
    stable = ps.assert_stable_under_input_noise(model, _loader(x), "saliency", variance=0.0001, threshold=0.5,
                                                metric="ssim")
    assert stable.n_images == 8


def test_input_noise_errors_name_the_batch_and_its_examples() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    bad = x.clone()
    bad[9, 0, 0, 0] = 1.5
    with pytest.raises(SaliencyUsageError, match=r"in batch 2 of the inputs \(examples 8 to 9\): .*outside clip"):
        _noise(model, _loader(bad))
