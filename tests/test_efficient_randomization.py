"""Efficient MPRT: plain gradients of the trained digits CNN pass, model-independent and random
maps fail, the numbers equal a straightforward reference, and the model and RNGs are untouched."""

from __future__ import annotations

import contextlib
import json
import random
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency.checks.efficient_randomization import (
    RISE_THRESHOLD,
    EfficientRandomizationResult,
    assert_efficient_randomization,
    efficient_randomization,
)
from pytest_saliency.exceptions import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.maps.postprocess import apply_pipeline
from pytest_saliency.model.layers import select_layers
from pytest_saliency.model.randomize import randomized
from pytest_saliency.reporting.protocol import CheckResult

N = 32


def edge_map(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A model-independent explainer: the Sobel gradient magnitude of the input (Adebayo's edge detector)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gray = inputs.sum(1, keepdim=True)
    gx = nn.functional.conv2d(gray, k[None, None], padding=1)
    gy = nn.functional.conv2d(gray, k.T[None, None], padding=1)
    return (gx**2 + gy**2).sqrt().expand_as(inputs)


def random_maps(seed: int):
    """An explainer of i.i.d. noise, drawn afresh at every call (its own generator, which advances)."""
    generator = torch.Generator().manual_seed(seed)

    def explain(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.randn(inputs.shape, generator=generator)

    return explain


def _rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _reference_entropy(maps: torch.Tensor, bins: int = 100) -> list[float]:
    return [float(scipy.stats.entropy(np.histogram(m.numpy().ravel(), bins=bins)[0])) for m in maps]


def test_plain_gradients_of_the_trained_digits_cnn_pass(digits) -> None:
    model, x, _ = digits
    result = assert_efficient_randomization(model, x[:N], "saliency")
    assert result.passed and result.n_images == N and len(result.layers) == 6
    assert result.ci_low > RISE_THRESHOLD and result.mean_rise > 0.05
    assert result.mean_entropy_randomized > result.mean_entropy_original
    # the original maps are more structured (lower entropy) than noise maps after the same pipeline
    assert result.noise_entropy is not None and result.mean_entropy_original < result.noise_entropy - 0.3


def test_a_model_independent_map_rises_exactly_zero_and_fails(digits) -> None:
    model, x, _ = digits
    result = efficient_randomization(model, x[:N], edge_map)
    assert result.rise == [0.0] * N and result.ci_low == 0.0 and not result.passed
    with pytest.raises(SaliencyCheckFailed, match="do NOT become more complex") as failure:
        assert_efficient_randomization(model, x[:N], edge_map)
    message = str(failure.value)
    assert f"images: {N}" in message and "rises exactly 0" in message and "noise maps" in message
    assert failure.value.result.rise == result.rise


def test_a_random_map_explainer_rises_about_zero_and_fails(digits) -> None:
    """Binder et al.'s uninformative maps: noise is already near the largest entropy the bins
    allow, so a map of fresh noise per state is no more complex after randomization."""
    model, x, _ = digits
    result = efficient_randomization(model, x[:N], random_maps(7))
    assert abs(result.mean_rise) < 0.01 and not result.passed
    assert result.mean_entropy_original == pytest.approx(result.noise_entropy, abs=0.05)
    # a seeded noise explainer that draws the same noise in both states rises exactly 0
    same = efficient_randomization(model, x[:N], lambda m, i, t: torch.randn(i.shape))
    assert same.rise == [0.0] * N and not same.passed


def test_the_numbers_equal_a_straightforward_reference(digits) -> None:
    """H per map equals numpy's histogram and scipy's entropy on the maps of the original model
    and of the model with every layer randomized, and the rise is their relative difference."""
    model, x, _ = digits
    x = x[:8]
    result = efficient_randomization(model, x, "saliency", preset="sam2020", keep_maps=8)
    original = ps.explain(model, x, "saliency", preset="sam2020")
    target = model(x).argmax(1)  # the original model's predictions
    with randomized(select_layers(model, x), "reinit", 0):
        random_state = ps.explain(model, x, "saliency", preset="sam2020", target=target)
    h_original, h_random = _reference_entropy(original), _reference_entropy(random_state)
    np.testing.assert_allclose(result.entropy_original, h_original, atol=1e-12)
    np.testing.assert_allclose(result.entropy_randomized, h_random, atol=1e-12)
    rise = (np.array(h_random) - np.array(h_original)) / np.array(h_original)
    np.testing.assert_allclose(result.rise, rise, atol=1e-12)
    assert result.mean_rise == pytest.approx(rise.mean())
    assert torch.equal(result.original_maps, original) and torch.equal(result.randomized_maps, random_state)


def test_the_randomized_state_is_the_last_cascading_state() -> None:
    """Randomizing every layer at once gives the model that cascading randomization ends with."""
    model, x = make_tiny_cnn(), tiny_images(4)
    result = efficient_randomization(model, x, "saliency", keep_maps=4)
    layers, target = select_layers(model, x), model(x).argmax(1)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(randomized([layer], "reinit", 0))
        cascaded = ps.explain(model, x, "saliency", preset="adebayo2018", target=target)
    assert torch.equal(result.randomized_maps, cascaded)


def test_the_model_is_bit_identical_and_no_global_rng_changes() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    rng = _rng_states()
    for strategy in ("reinit", "gaussian", "permute"):
        efficient_randomization(model, x, "saliency", randomization=strategy)
    after = _rng_states()
    assert torch.equal(rng[0], after[0]) and np.array_equal(rng[1], after[1]) and rng[2] == after[2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_strategies_and_seeds_change_the_randomized_state_only() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    runs = {(s, seed): efficient_randomization(model, x, "saliency", randomization=s, seed=seed)
            for s in ("reinit", "gaussian") for seed in (0, 1)}
    originals = {tuple(r.entropy_original) for r in runs.values()}
    randomized_states = {tuple(r.entropy_randomized) for r in runs.values()}
    assert len(originals) == 1 and len(randomized_states) == 4


def test_a_loader_gives_the_tensor_runs_numbers() -> None:
    model, x = make_tiny_cnn(), tiny_images(10)
    whole = efficient_randomization(model, x, "saliency")
    streamed = efficient_randomization(model, DataLoader(TensorDataset(x), batch_size=4), "saliency")
    np.testing.assert_allclose(streamed.entropy_original, whole.entropy_original, atol=1e-9)
    np.testing.assert_allclose(streamed.rise, whole.rise, atol=1e-6)
    assert streamed.n_images == 10 and streamed.passed == whole.passed
    assert (streamed.ci_low, streamed.ci_high) == pytest.approx((whole.ci_low, whole.ci_high), abs=1e-6)
    capped = efficient_randomization(model, DataLoader(TensorDataset(x), batch_size=4), "saliency", images=6)
    assert capped.n_images == 6 and capped.rise == pytest.approx(whole.rise[:6], abs=1e-6)


def _zero_for_first_two(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    maps = inputs.clone()
    maps[:2] = 0.0
    return maps


def test_constant_original_maps_are_refused_or_skipped() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    with pytest.raises(SaliencyUsageError, match=r"constant \(histogram entropy 0\) for 2 of 6 input\(s\) \(indices \[0, 1\]"):
        efficient_randomization(model, x, _zero_for_first_two)
    with pytest.warns(UserWarning, match="left out"):
        result = efficient_randomization(model, x, _zero_for_first_two, constant_maps="skip")
    assert result.n_images == 4 and result.skipped == [0, 1] and all(np.isfinite(result.rise))
    assert "2 left out" in result.report()
    with pytest.raises(SaliencyUsageError, match="left none"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        efficient_randomization(model, x, lambda m, i, t: torch.zeros_like(i), constant_maps="skip")


@pytest.mark.parametrize("options, match", [
    ({"bins": 1}, "bins must be an int >= 2"),
    ({"bins": "freedman_diaconis"}, "unknown bins"),
    ({"rise_threshold": float("nan")}, "rise_threshold must be a finite number"),
    ({"rise_threshold": -2}, "at least -1"),
    ({"constant_maps": "ignore"}, "unknown constant_maps"),
    ({"randomization": "shuffle"}, "unknown randomization"),
    ({"images": 0}, "images must be"),
    ({"confidence": 1.0}, "confidence must be"),
])
def test_bad_options_are_usage_errors(options: dict, match: str) -> None:
    with pytest.raises(SaliencyUsageError, match=match):
        efficient_randomization(make_tiny_cnn(), tiny_images(4), "saliency", **options)


def test_bin_rules_and_presets_are_recorded() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    result = efficient_randomization(model, x, "saliency", bins="sturges", preset="thesis2023")
    assert result.bins == "sturges" and result.to_dict()["bins"] == "sturges"
    assert result.max_entropy == pytest.approx(np.log(9))  # 256 values: ceil(log2 256 + 1) = 9 bins
    assert "'sturges' rule" in result.report() and "thesis2023" in result.summary()


class Tabular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_tabular_maps_are_one_row_maps() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tabular().eval()
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    result = efficient_randomization(model, x, "saliency", keep_maps=10)
    assert result.modality == "tabular" and result.max_entropy == pytest.approx(np.log(12))
    maps = apply_pipeline(ps.explain(model, x, "saliency"), "adebayo2018", modality="tabular")
    np.testing.assert_allclose(result.entropy_original, _reference_entropy(maps), atol=1e-12)


PAD = 0


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8, padding_idx=PAD)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD).unsqueeze(-1).float()
        return self.head((torch.tanh(self.embedding(ids)) * keep).sum(1) / keep.sum(1).clamp(min=1))


def test_text_maps_leave_padding_out() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tokens().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 20, (6, 10), generator=g)
    lengths = [10, 9, 7, 6, 8, 5]
    for i, n in enumerate(lengths):
        ids[i, n:] = PAD
    text = ps.Text(pad_token_id=PAD)
    result = efficient_randomization(model, ids, "saliency", modality=text, keep_maps=6)
    assert result.modality == "text" and len(result.rise) == 6
    maps = result.original_maps  # (6, 1, 10)
    reference = [float(scipy.stats.entropy(np.histogram(maps[i, 0, :n].numpy(), bins=100)[0]))
                 for i, n in enumerate(lengths)]
    np.testing.assert_allclose(result.entropy_original, reference, atol=1e-12)
    assert result.max_entropy == pytest.approx(np.log(10))


def test_the_result_implements_the_protocol(digits) -> None:
    model, x, _ = digits
    result = efficient_randomization(model, x[:8], "saliency")
    assert isinstance(result, CheckResult) and isinstance(result, EfficientRandomizationResult)
    assert result.check == "efficient_randomization"
    document = json.loads(json.dumps(result.to_dict()))
    assert document["passed"] == result.passed and len(document["rise"]) == 8
    numbers = result.numbers()
    assert numbers["n_images"] == 8 and numbers["rise_threshold"] == RISE_THRESHOLD
    assert "N = 8" in result.summary() and result.summary().startswith("PASS")
    assert "reproduce:" in result.report() and "IPR needs 7" in result.report()
    figures = result.figures()
    assert [name for name, _ in figures] == ["efficient_randomization_maps"]
    assert figures[0][1]().startswith(b"\x89PNG")


def test_the_original_maps_are_shared_with_layer_randomization_through_the_cache() -> None:
    from pytest_saliency.maps.cache import MapCache

    model, x = make_tiny_cnn(), tiny_images(6)
    cache = MapCache()
    ps.layer_randomization(model, x, "saliency", cache=cache)
    assert len(cache) == 1
    cached = efficient_randomization(model, x, "saliency", cache=cache)
    assert len(cache) == 1 and cache.hits >= 1  # a hit: no second entry
    assert cached.entropy_original == efficient_randomization(model, x, "saliency").entropy_original
