"""The sequence modality on a TRAINED model: a 1-D conv net that learned a series task whose
informative window is known, so the maps can be checked against ground truth, and the
randomization checks, occlusion, GradCAM and a sweep are seen to work on real (N, C, T) series.

The task: 2-channel Gaussian-noise series of length 64; class 1 carries a short pulse (a Gaussian
bump of height 4, width 1.5 steps) on channel 0, centred at a random step inside the fixed window
[24, 40); class 0 is noise only. Channel 1 is noise in both classes (a distractor).

Measured (torch CPU, seed 0; the thresholds below leave a clear margin under these):
  training about 2 s on two busy cores, test accuracy 0.992; mean (min) share of |map| mass
  inside the window for the 16 class-1 inputs (the window is 16/64 = 0.25 of the length):
  saliency 0.625 (0.49), integrated gradients 0.76 (0.67), occlusion 0.90 (0.79), GradCAM 0.985
  (0.89); IG's raw attribution inside the window is 10x larger on channel 0 than on channel 1;
  IPR S^I 0.585 and CPR 0.611 (SSIM along the series, chance level 0.28); the model-independent
  control scores 0.0; sweep of IG's n_steps against the reference (captum's 50): SSIM 0.9974 (8)
  and 0.9996 (32), Spearman 0.977 (8) and 0.985 (32).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed

LENGTH, LO, HI = 64, 24, 40
WINDOW_SHARE = (HI - LO) / LENGTH  # 0.25: what a map spread evenly along the series puts in the window


def make_series(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced labels; class 1 gets a pulse on channel 0 centred inside [LO + 3, HI - 3)."""
    x = torch.randn(n, 2, LENGTH, generator=generator)
    y = torch.arange(n) % 2
    centre = torch.randint(LO + 3, HI - 3, (n,), generator=generator)
    steps = torch.arange(LENGTH)
    pulse = 4.0 * torch.exp(-0.5 * ((steps[None] - centre[:, None]) / 1.5) ** 2)
    x[:, 0] += pulse * y[:, None]
    return x, y


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 5, padding=2), nn.ReLU(),
        nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(8, 2),
    )


@pytest.fixture(scope="module")
def task():
    """Train in about a second: 80 Adam steps of 64 series. Global RNG state is left untouched,
    and training runs on one thread (restored after): on two busy cores, intra-op threads of such
    tiny convolutions wait on each other (measured 0.25 s per step against 2 ms on one thread)."""
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(0)
            x_train, y_train = make_series(512, g)
            x_test, y_test = make_series(256, g)
            model = conv1d_net()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(80):
                batch = torch.randint(0, len(x_train), (64,))
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    pulses = x_test[y_test == 1][:16]
    mixed = torch.cat([pulses[:8], x_test[y_test == 0][:8]])
    return {"model": model, "accuracy": accuracy, "pulses": pulses, "mixed": mixed,
            "seconds": time.perf_counter() - start}


def window_share(maps: torch.Tensor) -> torch.Tensor:
    """Per input: the share of the map's absolute mass that lies inside [LO, HI)."""
    mass = maps.abs().reshape(len(maps), -1)
    return mass[:, LO:HI].sum(1) / mass.sum(1).clamp_min(1e-12)


def model_independent(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A control that ignores the model: the inputs' magnitude."""
    return inputs.abs()


def test_the_model_is_trained_quickly_and_well(task) -> None:
    assert task["accuracy"] > 0.9  # measured 0.99
    assert task["seconds"] < 10
    with torch.no_grad():
        assert (task["model"](task["pulses"]).argmax(1) == 1).float().mean() > 0.9


@pytest.mark.parametrize("method, options, floor", [
    # measured mean shares: 0.625 (saliency), 0.76 (IG); floors 0.5 (2x the window's share) and 0.6
    ("saliency", {}, 2 * WINDOW_SHARE),
    ("integrated_gradients", {"n_steps": 16}, 2.4 * WINDOW_SHARE),
])
def test_gradient_maps_find_the_informative_window(task, method, options, floor) -> None:
    maps = ps.explain(task["model"], task["pulses"], method, preset="adebayo2018", **options)
    assert maps.shape == (16, 1, LENGTH)
    share = window_share(maps)
    assert share.mean() > floor
    assert (share > WINDOW_SHARE).all()  # every single class-1 map beats an even spread (measured min 0.49)


def test_integrated_gradients_credit_the_pulse_channel(task) -> None:
    """Raw IG keeps the channels: the pulse's channel 0 carries most of the window's attribution."""
    raw = ps.explain(task["model"], task["pulses"], "integrated_gradients", n_steps=16)
    assert raw.shape == (16, 2, LENGTH)
    inside = raw[:, :, LO:HI].abs().sum(dim=(0, 2))
    assert inside[0] > 4 * inside[1]  # measured 229 against 23


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_ig_passes_randomization_and_the_control_fails(task, mode) -> None:
    model, x = task["model"], task["mixed"]
    result = ps.layer_randomization(model, x, "integrated_gradients", mode=mode, n_steps=16)
    assert result.passed
    assert result.similarity == "ssim" and result.modality == "sequence"
    assert result.stats.dataset_score > 0.2  # measured 0.585 (IPR), 0.611 (CPR)
    assert sorted(result.layers) == ["0", "2", "6"]
    check = (ps.assert_sensitive_to_layer_randomization if mode == "independent"
             else ps.assert_sensitive_to_cascading_randomization)
    with pytest.raises(SaliencyCheckFailed, match="NOT sensitive") as failure:
        check(model, x, model_independent)
    control = failure.value.result
    assert control.similarity == "ssim" and control.modality == "sequence"
    assert control.stats.dataset_score == 0.0


@pytest.mark.parametrize("method, floor", [
    ("occlusion", 2.8 * WINDOW_SHARE),  # measured 0.90; default window 8 steps (64 / 8), stride 4
    ("gradcam", 3.2 * WINDOW_SHARE),  # measured 0.985; last Conv1d upsampled along time
])
def test_occlusion_and_gradcam_find_the_informative_window(task, method, floor) -> None:
    maps = ps.explain(task["model"], task["pulses"], method, preset="adebayo2018")
    assert maps.shape == (16, 1, LENGTH)
    share = window_share(maps)
    assert share.mean() > floor
    assert (share > WINDOW_SHARE).all()


def test_an_ig_step_sweep_is_highly_similar_along_the_series(task) -> None:
    result = ps.hyperparameter_sweep(task["model"], task["mixed"], "integrated_gradients", {"n_steps": [8, 32]})
    assert result.metrics == ("ssim", "spearman") and result.metric == "ssim"
    (table,) = result.tables
    rows = {row.value: row for row in table.rows}
    assert table.reference_value == 50 and set(rows) == {8, 32}
    # measured: SSIM 0.9974 / 0.9996, Spearman 0.977 / 0.985 (n_steps 8 / 32 against the reference, 50)
    assert rows[8].mean("ssim") > 0.97 and rows[8].mean("spearman") > 0.9
    assert rows[32].mean("ssim") > 0.99 and rows[32].mean("spearman") > 0.95
    assert rows[32].mean("ssim") >= rows[8].mean("ssim")  # more steps, closer to the reference
