"""Random logit (Sixt et al. 2020): the map of the target class against the map of a random other class."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity as skimage_ssim
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError, explain
from pytest_saliency.checks.random_logit import (
    assert_sensitive_to_random_logit,
    random_logit,
    random_other_classes,
)
from pytest_saliency.reporting.figures import figures_for
from pytest_saliency.reporting.protocol import CheckResult


def absolute_input(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A control that ignores the model and the class: |x|."""
    return inputs.abs()


def sobel_edges(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A control that ignores the model and the class: the Sobel edge magnitude of the image."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])[None, None]
    gray = inputs.sum(dim=1, keepdim=True)
    gx = torch.nn.functional.conv2d(gray, kx, padding=1)
    gy = torch.nn.functional.conv2d(gray, kx.transpose(-1, -2), padding=1)
    return (gx**2 + gy**2).sqrt()


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": {n: m.training for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


# ---------------------------------------------------------------------------------------- the proof


def test_gradient_maps_of_the_digits_cnn_differ_between_classes_and_the_controls_fail(digits):
    model, x, _ = digits
    x = x[:24]
    result = random_logit(model, x, "saliency")
    assert result.passed, result.failure_message()
    assert all(v < 0.99 for v in result.values)
    # the maps of two classes of one input share its structure: above chance, far below 1
    assert result.chance is not None and result.chance < result.mean_similarity < 0.6
    assert result.stats.dataset_score > 0.3
    for control in (absolute_input, sobel_edges):
        failed = random_logit(model, x, control)
        assert not failed.passed
        assert failed.values == pytest.approx([1.0] * 24, abs=1e-6)  # class-independent maps are identical
        assert failed.stats.dataset_score == pytest.approx(0.0, abs=1e-6)
        with pytest.raises(SaliencyCheckFailed, match="maps of the target class and the random other class do NOT"):
            assert_sensitive_to_random_logit(model, x, control)


# ---------------------------------------------------------------------------------------- the draws


def test_other_classes_are_uniform_never_the_target_and_seeded_per_example():
    targets = torch.tensor([0, 3, 4, 1] * 1000)
    drawn = random_other_classes(targets, 5, seed=7)
    assert not bool((drawn == targets).any())
    assert int(drawn.min()) >= 0 and int(drawn.max()) <= 4
    counts = torch.bincount(drawn[targets == 0], minlength=5)[1:].double()  # 1000 draws over classes 1..4
    expected = 250.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square with 3 degrees of freedom, p = 0.001
    assert torch.equal(drawn, random_other_classes(targets, 5, seed=7))
    assert not torch.equal(drawn, random_other_classes(targets, 5, seed=8))
    # an example draws by its index in the whole stream, whichever batch it comes in
    assert torch.equal(drawn[10:20], random_other_classes(targets[10:20], 5, seed=7, first_example=10))
    with pytest.raises(SaliencyUsageError, match="num_classes"):
        random_other_classes(targets, 1)


def test_pinned_classes_are_explained_and_checked():
    model, x = make_tiny_cnn(), tiny_images(6)
    predicted = model(x).argmax(1)
    pinned = (predicted + 1) % 3
    result = random_logit(model, x, "saliency", classes=pinned)
    assert result.other_targets == pinned.tolist() and result.classes_given
    a = explain(model, x, "saliency", target=predicted, preset="adebayo2018")
    b = explain(model, x, "saliency", target=pinned, preset="adebayo2018")
    expected = [skimage_ssim(a[i].numpy(), b[i].numpy(), win_size=5, data_range=1.0) for i in range(6)]
    assert result.values == pytest.approx(expected, abs=1e-5)
    chance = np.mean([skimage_ssim(a[i].numpy(), a[i - 1].numpy(), win_size=5, data_range=1.0) for i in range(1, 6)])
    assert result.chance == pytest.approx(chance, abs=1e-5)
    with pytest.raises(SaliencyUsageError, match="equals the target class"):
        random_logit(model, x, "saliency", classes=predicted)
    with pytest.raises(SaliencyUsageError, match="lie in 0 .. 2"):
        random_logit(model, x, "saliency", classes=pinned + 3)
    with pytest.raises(SaliencyUsageError, match="one integer class per input"):
        random_logit(model, x, "saliency", classes=pinned[:4])


def test_a_loader_gives_the_tensor_runs_numbers_and_classes():
    model, x = make_tiny_cnn(), tiny_images(7)
    whole = random_logit(model, x, "smoothgrad", nt_samples=2)  # a method with per-example draws
    streamed = random_logit(model, DataLoader(TensorDataset(x), batch_size=3), "smoothgrad", nt_samples=2)
    assert streamed.other_targets == whole.other_targets and streamed.targets == whole.targets
    assert streamed.values == pytest.approx(whole.values, abs=1e-6)
    assert streamed.stats.dataset_score == pytest.approx(whole.stats.dataset_score, abs=1e-9)
    assert streamed.n_images == 7
    assert streamed.chance == pytest.approx(whole.chance, abs=1e-6) and streamed.chance_pairs == whole.chance_pairs == 6
    pinned = (torch.tensor(whole.targets) + 2) % 3
    a = random_logit(model, x, "saliency", classes=pinned)
    b = random_logit(model, [x[:3], x[3:]], "saliency", classes=pinned)
    assert b.other_targets == a.other_targets == pinned.tolist()
    assert b.values == pytest.approx(a.values, abs=1e-6)
    with pytest.raises(SaliencyUsageError, match="classes has 8 entries but the loader yielded 7"):
        random_logit(model, [x[:3], x[3:]], "saliency", classes=torch.cat([pinned, pinned[:1]]))
    with pytest.raises(SaliencyUsageError, match="classes has 6 entries, but the loader has more examples"):
        random_logit(model, [x[:3], x[3:]], "saliency", classes=pinned[:6])


# ---------------------------------------------------------------------------------------- guarantees


def test_model_bit_identical_and_global_rng_unchanged():
    model = make_tiny_cnn()
    model.train()
    model.conv1.weight.requires_grad_(False)
    before, rng = snapshot(model), rng_states()
    random_logit(model, tiny_images(), "smoothgrad", nt_samples=3)
    after = snapshot(model)
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert before["training"] == after["training"] and before["requires_grad"] == after["requires_grad"]
    torch_state, np_state, py_state = rng_states()
    assert torch.equal(rng[0], torch_state) and np.array_equal(rng[1], np_state) and rng[2] == py_state


def test_tabular_maps_are_compared_by_spearman_with_ties_and_constant_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(10, 6)

    def tied(model, inputs, target):  # ties and zeros; constant (all zero) for class 3
        base = torch.round((inputs + target[:, None] - 1.0) ** 2 * 2) / 2
        return torch.where((target == 3)[:, None], torch.zeros_like(base), base)

    predicted = model(x).argmax(1)
    first = torch.where(predicted == 0, torch.ones_like(predicted), torch.zeros_like(predicted))
    target = torch.full_like(predicted, 2)
    classes = torch.where(torch.arange(10) % 2 == 0, torch.full_like(predicted, 3), first)
    classes = torch.where(classes == target, torch.ones_like(classes), classes)
    result = random_logit(model, x, tied, target=target, classes=classes)
    assert result.similarity == "spearman"
    a, b = tied(model, x, target).abs(), tied(model, x, classes).abs()
    expected = []
    for i in range(10):
        rho = spearmanr(a[i].numpy(), b[i].numpy()).statistic if float(b[i].std()) > 0 else 0.0
        expected.append(0.0 if np.isnan(rho) else rho)  # a constant other map has no ranking: 0
    assert result.values == pytest.approx(expected, abs=1e-6)
    assert len(set(np.round(expected, 6))) > 3  # ties, zeros and real rankings, not one repeated value


def test_a_constant_target_map_is_refused_or_skipped():
    model, x = make_tiny_cnn(), tiny_images(6)

    def dead_for_first(model, inputs, target):  # the first input's map is constant
        maps = inputs.clone() * (target + 1)[:, None, None, None]
        maps[0] = 0.0
        return maps

    with pytest.raises(SaliencyUsageError, match="constant for 1 of 6"):
        random_logit(model, x, dead_for_first)
    with pytest.warns(UserWarning, match="left out"):
        result = random_logit(model, x, dead_for_first, constant_maps="skip")
    assert result.n_images == 5 and result.images_available == 6


def test_max_similarity_is_a_stricter_gate(digits):
    model, x, _ = digits
    loose = random_logit(model, x[:12], "saliency", max_similarity=0.9)
    strict = random_logit(model, x[:12], "saliency", max_similarity=0.05)
    assert loose.passed and not strict.passed
    assert strict.stats.dataset_sensitive  # only the calibrated gate fails
    assert "too alike" in strict.failure_message()


def test_bad_arguments_are_usage_errors():
    model, x = make_tiny_cnn(), tiny_images(4)
    with pytest.raises(SaliencyUsageError, match="max_similarity"):
        random_logit(model, x, max_similarity=1.5)
    with pytest.raises(SaliencyUsageError, match="constant_maps"):
        random_logit(model, x, constant_maps="drop")
    with pytest.raises(SaliencyUsageError, match="two or more classes"):
        random_logit(nn.Sequential(nn.Flatten(), nn.Linear(256, 1)), x)
    with pytest.raises(SaliencyUsageError, match="ssim_threshold"):
        random_logit(model, x, ssim_threshold=2.0)


def test_the_result_implements_the_protocol_and_draws_its_figure():
    result = random_logit(make_tiny_cnn(), tiny_images(5), "saliency")
    assert isinstance(result, CheckResult)
    assert result.check == "random_logit"
    json.dumps(result.to_dict())
    assert result.summary().startswith("PASS random_logit [saliency, adebayo2018]")
    assert "chance (target class's maps of different images)" in result.report()
    assert set(result.numbers()) >= {"dataset_score", "mean_similarity", "chance", "ssim_threshold"}
    pictures = figures_for(result, strict=True)
    assert list(pictures) == ["random_logit_maps"] and pictures["random_logit_maps"].startswith(b"\x89PNG")


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != 0).unsqueeze(-1).float()
        hidden = torch.tanh(self.embedding(ids)) * keep * torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.head(hidden.sum(1) / keep.sum(1))


def test_token_maps_are_compared_over_their_tokens_that_are_not_padding():
    import pytest_saliency as ps

    torch.manual_seed(0)
    model = _TokenModel().eval()
    ids = torch.randint(1, 20, (6, 9))
    ids[:, 6:] = 0  # padding
    ids[1, 4:] = 0
    text = ps.Text(pad_token_id=0)
    result = random_logit(model, ids, "saliency", modality=text)
    assert result.similarity == "spearman" and result.modality == "text"
    predicted = model(ids).argmax(1)
    others = torch.tensor(result.other_targets)
    a = explain(model, ids, "saliency", target=predicted, preset="adebayo2018", modality=text)[:, 0]
    b = explain(model, ids, "saliency", target=others, preset="adebayo2018", modality=text)[:, 0]
    valid = ids != 0
    expected = [spearmanr(a[i][valid[i]].numpy(), b[i][valid[i]].numpy()).statistic for i in range(6)]
    assert result.values == pytest.approx(expected, abs=1e-6)
    chance = [spearmanr(a[i][valid[i] & valid[i - 1]].numpy(), a[i - 1][valid[i] & valid[i - 1]].numpy()).statistic
              for i in range(1, 6)]
    assert result.chance == pytest.approx(float(np.mean(chance)), abs=1e-6)
