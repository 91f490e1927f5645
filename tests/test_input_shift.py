"""Input-shift invariance (Kindermans et al.): the shifted model computes the model's function, the
gradient's maps do not move, input x gradient's and zero-baseline integrated gradients' do."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.checks.input_shift import (
    assert_input_shift_invariant,
    input_shift_invariance,
    relative_differences,
)
from pytest_saliency.core.forward import model_call_options
from pytest_saliency.model.shift import build_shifted, check_shift, shifted
from pytest_saliency.reporting.protocol import CheckResult


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "dtype": {n: p.dtype for n, p in model.named_parameters()},
    }


def assert_identical(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    for kind in ("params", "buffers"):
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), f"{kind} {name} changed"
    assert before["training"] == after["training"] and before["ids"] == after["ids"]
    assert before["dtype"] == after["dtype"]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"a hook was left on {module}"


def rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def kindermans_mlp(d_in: int = 64, seed: int = 0) -> nn.Module:
    """Kindermans et al.'s network: a 3-layer ReLU MLP (here on 8x8 digits as 64 features)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def small_digits(n: int = 24) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:n] / 16.0, dtype=torch.float32)


class Conv(nn.Module):
    """One conv layer (any padding, with or without bias) and a head, optionally with preprocessing."""

    def __init__(self, padding_mode: str = "zeros", bias: bool = True, pre=None, skip: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode=padding_mode, bias=bias)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.pre, self.skip = pre, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x) if self.pre is not None else x
        out = self.fc(self.relu(self.conv(h)).flatten(1))
        return out + x.mean(dim=(1, 2, 3))[:, None] if self.skip else out


def conv_model(seed: int = 0, **kwargs) -> Conv:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Conv(**kwargs).eval()


def gap(model: nn.Module, x: torch.Tensor, shift) -> float:
    """max |f2(x + m) - f(x)|, with the shifted model of :func:`shifted`."""
    with model_call_options(inputs=x), torch.no_grad():
        plain = model(x)
        with shifted(model, x, shift) as info:
            moved = model(x + info.shift)
    return float((moved - plain).abs().max())


# --------------------------------------------------------------------------------------------
# the metric, against a loop


def test_relative_differences_match_a_numpy_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 2, 5, 5, generator=g)
    b = a + 1e-3 * torch.randn(8, 2, 5, 5, generator=g)
    a[1] = 0.0  # a zero map, and its shifted map zero too
    b[1] = 0.0
    a[2] = 0.0  # a zero map whose shifted map is not
    a[3] = 0.25  # a constant map (ties everywhere)
    b[3] = -0.25
    b[4] = a[4]  # identical maps
    got = relative_differences(a, b).numpy()
    for i in range(8):
        x, y = a[i].double().numpy().ravel(), b[i].double().numpy().ravel()
        scale, diff = np.abs(x).max(), np.abs(y - x).max()
        want = diff / scale if scale > 0 else (np.inf if diff > 0 else 0.0)
        assert got[i] == pytest.approx(want, rel=1e-12), i
    assert got[1] == 0.0 and got[2] == np.inf and got[3] == pytest.approx(2.0) and got[4] == 0.0


def test_the_shift_is_a_number_or_a_tensor_that_broadcasts_to_one_input():
    x = torch.zeros(3, 2, 4, 4)
    assert torch.equal(check_shift(-1, x), torch.full((1, 2, 4, 4), -1.0))
    per_channel = torch.tensor([1.0, -2.0])[:, None, None]
    assert torch.equal(check_shift(per_channel, x)[0, 1], torch.full((4, 4), -2.0))
    assert check_shift(torch.ones(1, 2, 4, 4), x).shape == (1, 2, 4, 4)
    for bad, words in [(torch.ones(3, 2, 4, 4), "broadcast"), (torch.ones(5), "broadcast"), (float("nan"), "not a finite number"),
                       (0.0, "0 everywhere"), ("up", "not a shift"), (torch.tensor([True]), "bool")]:
        with pytest.raises(SaliencyUsageError, match=words):
            check_shift(bad, x)


# --------------------------------------------------------------------------------------------
# the shifted model


@pytest.mark.parametrize("padding_mode, bias", [("zeros", True), ("zeros", False), ("reflect", True),
                                                ("circular", False)])
def test_the_shifted_model_computes_the_same_function_for_any_padding_and_without_bias(padding_mode, bias):
    model = conv_model(padding_mode=padding_mode, bias=bias)
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    cat = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) * 3 - 1  # Kindermans' "cat" shift
    for shift in (-1.0, 0.37, cat):
        assert gap(model, x, shift) <= 1e-5
    # The per-channel bias compensation (Quantus' add_mean_shift_to_first_layer, the response at one
    # position) is wrong at zero-padded borders; the hook's is not.
    if padding_mode == "zeros" and bias:
        naive = copy.deepcopy(model)
        with torch.no_grad():
            response = naive.conv(torch.full((1, 2, 8, 8), -1.0)) - naive.conv(torch.zeros(1, 2, 8, 8))
            naive.conv.bias -= response[0, :, 4, 4]
            assert float((naive(x - 1) - model(x)).abs().max()) > 1e-2


def test_the_layer_is_found_after_a_reshape_and_an_affine_normalisation():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with model_call_options(inputs=x):
        assert build_shifted(mlp, x, -1.0).layer == "1"
    normalised = conv_model(pre=lambda v: (v - 0.5) / 0.25)  # a fixed affine map inside forward
    assert gap(normalised, x, -1.0) <= 1e-5


@pytest.mark.parametrize("kind, pre, skip", [("a clamp", lambda v: v.clamp(-0.5, 0.5), False),
                                             ("tanh", torch.tanh, False), ("a skip from the input", None, True)])
def test_a_model_that_transforms_the_input_before_its_first_layer_is_refused(kind, pre, skip):
    model = conv_model(pre=pre, skip=skip)
    before = snapshot(model)
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyUsageError, match=r"does not compute the function.*'conv' \(Conv2d\)"):
        input_shift_invariance(model, x, "saliency")
    assert_identical(before, model)


def test_a_model_that_ignores_the_shift_needs_no_compensation():
    model = conv_model(pre=lambda v: v - v.mean(dim=(1, 2, 3), keepdim=True))  # per-input centring
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    result = input_shift_invariance(model, x, "saliency", shift=2.0)
    assert result.layer is None and result.passed
    assert not input_shift_invariance(model, x, "input_x_gradient", shift=2.0).passed


def test_the_hook_is_removed_and_the_model_identical_even_when_the_block_raises():
    model = conv_model()
    before = snapshot(model)
    x = torch.randn(4, 2, 8, 8)
    with model_call_options(inputs=x), pytest.raises(KeyError), shifted(model, x, -1.0):
        assert model.conv._forward_pre_hooks  # the shifted model is the model with a hook
        raise KeyError("boom")
    assert_identical(before, model)


# --------------------------------------------------------------------------------------------
# the paper's results: Kindermans' MLP and the digits CNN


def test_kindermans_mlp_gradient_passes_input_x_gradient_and_zero_baseline_ig_fail():
    model, x = kindermans_mlp(), small_digits()
    before, rng = snapshot(model), rng_states()
    saliency = assert_input_shift_invariant(model, x, "saliency")  # shift -1: [0, 1] to [-1, 0]
    assert saliency.max_relative_difference <= 1e-6 and saliency.layer == "0"
    with pytest.raises(SaliencyCheckFailed, match="input_x_gradient maps change") as failure:
        assert_input_shift_invariant(model, x, "input_x_gradient")
    assert failure.value.result.max_relative_difference > 0.1
    assert not input_shift_invariance(model, x, "integrated_gradients", n_steps=16).passed
    shifted_ig = input_shift_invariance(model, x, "integrated_gradients", n_steps=16, shift_baselines=True)
    assert shifted_ig.passed and "shifted with the inputs" in shifted_ig.shift_baselines
    assert_identical(before, model)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else (torch.equal(a, b) if
               isinstance(a, torch.Tensor) else a == b) for a, b in zip(rng, rng_states()))


def test_digits_cnn_gradient_unchanged_input_x_gradient_changed(digits):
    model, x, _ = digits
    x = x[:12]
    before, rng = snapshot(model), rng_states()
    saliency = input_shift_invariance(model, x, "saliency")
    assert saliency.passed and saliency.layer == "conv1"
    assert saliency.max_relative_difference <= 1e-6 and saliency.max_function_difference <= 1e-5
    ixg = input_shift_invariance(model, x, "input_x_gradient")
    assert not ixg.passed and min(ixg.relative_difference) > 0.1 and ixg.mean_similarity() < 0.5
    cat = digits[1][100]  # another digit, (1, 32, 32), as the shift (Kindermans' cat picture)
    assert input_shift_invariance(model, x, "saliency", shift=cat).passed
    assert not input_shift_invariance(model, x, "input_x_gradient", shift=cat).passed
    assert_identical(before, model)
    assert torch.equal(rng[0], rng_states()[0]) and np.array_equal(rng[1], rng_states()[1])


def test_digits_cnn_integrated_gradients_fails_with_a_zero_baseline_passes_with_a_shifted_one(digits):
    model, x, _ = digits
    x = x[:6]
    zero = input_shift_invariance(model, x, "integrated_gradients", n_steps=16)
    assert not zero.passed and zero.max_relative_difference > 1.0
    moved = input_shift_invariance(model, x, "integrated_gradients", n_steps=16, shift_baselines=True)
    assert moved.passed and moved.precision == "float64" and moved.max_relative_difference <= 1e-6
    assert next(model.parameters()).dtype == torch.float32  # a float64 copy ran, not the model
    # With precision="model" (float32) the shifted path alpha * x + m rounds, and near the baseline the
    # rounding crosses max-pooling ties: small differences over the tolerance, far below the zero baseline's.
    float32 = input_shift_invariance(model, x, "integrated_gradients", n_steps=16, shift_baselines=True,
                                     precision="model")
    assert 1e-4 < float32.max_relative_difference < 0.05 and float32.precision == "model"


def test_a_model_that_cannot_run_in_float64_is_refused_with_the_remedy():
    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float())  # a float64 copy's weights meet float32 inputs

    x = torch.randn(3, 4)
    with pytest.raises(SaliencyUsageError, match="precision='model'"):
        input_shift_invariance(Float32Only(), x, "saliency")
    assert input_shift_invariance(Float32Only(), x, "saliency", precision="model").passed


# --------------------------------------------------------------------------------------------
# refusals, loaders, the result


def test_token_inputs_are_refused():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.fc = nn.Embedding(20, 4), nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embedding(ids).mean(dim=1))

    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SaliencyUsageError, match="token ids: a token id is a category"):
        input_shift_invariance(Tokens(), ids, "saliency")


@pytest.mark.parametrize("options, words", [
    ({"tolerance": -1.0}, "tolerance"), ({"precision": "half"}, "precision"),
    ({"first_layer": "nope"}, "not the name of a submodule"), ({"shift": torch.ones(3)}, "does not broadcast"),
    ({"function_tol": 0.0}, "function_tol"), ({"shift_baselines": "yes"}, "shift_baselines"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(SaliencyUsageError, match=words):
        input_shift_invariance(conv_model(), torch.randn(2, 2, 8, 8), "saliency", **options)


def test_a_loader_gives_the_tensor_runs_numbers():
    model, x = conv_model(), torch.randn(10, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    for method in ("input_x_gradient", "smoothgrad"):
        whole = input_shift_invariance(model, x, method, shift=0.7, nt_samples=4) if method == "smoothgrad" else \
            input_shift_invariance(model, x, method, shift=0.7)
        loader = DataLoader(TensorDataset(x), batch_size=4)
        kwargs = {"nt_samples": 4} if method == "smoothgrad" else {}
        streamed = input_shift_invariance(model, loader, method, shift=0.7, **kwargs)
        assert streamed.n_inputs == 10 and streamed.passed == whole.passed
        assert streamed.relative_difference == whole.relative_difference
        assert streamed.similarity_values == pytest.approx(whole.similarity_values, nan_ok=True)


def test_the_result_reports_and_draws():
    from pytest_saliency.reporting.figures import figures_for

    model, x = kindermans_mlp(), small_digits(6)
    result = input_shift_invariance(model, x, "input_x_gradient")
    assert isinstance(result, CheckResult) and result.check == "input_shift_invariance"
    json.dumps(result.to_dict())
    assert result.summary().startswith("FAIL input_shift_invariance [input_x_gradient, shift -1]")
    message = result.failure_message()
    for words in ("layer '0' (Linear)", "max |f_shifted(x + m) - f(x)|", "<= 0.0001", "reproduce:", "MOVED"):
        assert words in message
    assert result.numbers()["inputs_over_tolerance"] == 6
    assert set(figures_for(result, strict=True)) == {"input_shift_maps"}
