"""In-place randomization and its guarantees: the model and the global RNGs come back bit-identical."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from torch import nn

from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError, layer_randomization
from pytest_saliency.model.randomize import randomized


def snapshot(model: nn.Module):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


def assert_identical(before, model: nn.Module) -> None:
    after = snapshot(model)
    for kind in ("params", "buffers"):
        for name, value in before[kind].items():
            assert torch.equal(value, after[kind][name]), f"{kind} {name} changed"
            assert value.dtype == after[kind][name].dtype
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["ids"] == after["ids"], "parameters were replaced, not restored in place"


def rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before) -> None:
    torch_state, np_state, py_state = rng_states()
    assert torch.equal(before[0], torch_state)
    assert np.array_equal(before[1], np_state)
    assert before[2] == py_state


def mixed_state_model():
    """Flags a check must not disturb: train mode in one part, a frozen layer, eval elsewhere."""
    model = make_tiny_cnn()
    model.train()
    model.conv2.eval()
    model.conv1.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("mode", ["independent", "cascading"])
@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "gradient_shap"])
def test_model_and_rng_untouched_after_a_passing_check(mode, method):
    model, x = mixed_state_model(), tiny_images()
    before, rng = snapshot(model), rng_states()
    result = layer_randomization(model, x, method, mode=mode, nt_samples=4) if method == "smoothgrad" else (
        layer_randomization(model, x, method, mode=mode)
    )
    assert result.passed
    assert_identical(before, model)
    assert_same_rng(rng)


def test_model_untouched_after_a_failing_check():
    model, x = mixed_state_model(), tiny_images()
    before, rng = snapshot(model), rng_states()
    from pytest_saliency import assert_sensitive_to_layer_randomization

    with pytest.raises(SaliencyCheckFailed):
        assert_sensitive_to_layer_randomization(model, x, method=lambda m, inputs, t: inputs.abs())
    assert_identical(before, model)
    assert_same_rng(rng)


@pytest.mark.parametrize("mode", ["independent", "cascading"])
@pytest.mark.parametrize("fail_at", [2, 4])
def test_model_untouched_when_the_explainer_raises_midway(mode, fail_at):
    """The explainer dies while layers are randomized (for CPR: several at once)."""
    model, x = mixed_state_model(), tiny_images()
    before, rng = snapshot(model), rng_states()
    calls = []

    def flaky(m, inputs, target):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("explainer crashed")
        return torch.autograd.grad(m(inputs.requires_grad_()).sum(), inputs)[0]

    with pytest.raises(RuntimeError, match="explainer crashed"):
        layer_randomization(model, x, flaky, mode=mode)
    assert_identical(before, model)
    assert_same_rng(rng)


@pytest.mark.parametrize("strategy", ["reinit", "gaussian", "permute"])
def test_strategies_change_parameters_keep_buffers_and_restore(strategy):
    model = make_tiny_cnn()
    before = snapshot(model)
    layers = [("conv1", model.conv1), ("bn", model.bn), ("fc", model.fc)]
    with randomized(layers, strategy, seed=3):
        for name, module in layers:
            for pname, p in module.named_parameters():
                assert not torch.equal(p, before["params"][f"{name}.{pname}"]), f"{name}.{pname} unchanged"
        for name, b in model.named_buffers():
            assert torch.equal(b, before["buffers"][name]), "running statistics must be kept"
        assert torch.equal(model.conv2.weight, before["params"]["conv2.weight"])
    assert_identical(before, model)


def test_permute_keeps_the_weight_distribution():
    model = make_tiny_cnn()
    original = model.fc.weight.detach().clone()
    with randomized([("fc", model.fc)], "permute", seed=0):
        assert torch.equal(model.fc.weight.flatten().sort().values, original.flatten().sort().values)


def test_reinit_draws_from_the_layers_initializer_and_randomizes_batchnorm():
    model = make_tiny_cnn()
    bound = 1 / (9 ** 0.5)  # Conv2d(1, 4, 3) kaiming-uniform(a=sqrt 5) bound = 1/sqrt(fan_in)
    with randomized([("conv1", model.conv1), ("bn", model.bn)], "reinit", seed=0):
        assert model.conv1.weight.abs().max() <= bound + 1e-6
        # BatchNorm's initializer is the constant (1, 0): the identity affine map. We draw instead.
        assert not torch.all(model.bn.weight == 1)
        assert model.bn.weight.std() > 0


def test_same_seed_same_randomization_different_seed_different():
    model = make_tiny_cnn()
    draws = []
    for seed in (5, 5, 6):
        with randomized([("fc", model.fc)], "reinit", seed=seed):
            draws.append(model.fc.weight.detach().clone())
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_cascading_and_independent_randomize_a_layer_identically():
    """The draw depends on (seed, layer name) only, so the first CPR stage equals that layer's IPR."""
    model, x = make_tiny_cnn(), tiny_images()
    ipr = layer_randomization(model, x, "saliency", mode="independent")
    cpr = layer_randomization(model, x, "saliency", mode="cascading", order="top_down")
    assert cpr.layers[0] == ipr.layers[-1] == "fc"
    assert cpr.ssim[0] == ipr.ssim[-1]
    bottom_up = layer_randomization(model, x, "saliency", mode="cascading", order="bottom_up")
    assert bottom_up.layers[0] == ipr.layers[0] == "conv1"
    assert bottom_up.ssim[0] == ipr.ssim[0]


def test_results_are_reproducible_for_a_seed():
    model, x = make_tiny_cnn(), tiny_images()
    a = layer_randomization(model, x, "smoothgrad", nt_samples=4, seed=11)
    b = layer_randomization(model, x, "smoothgrad", nt_samples=4, seed=11)
    assert a.ssim == b.ssim and a.stats.ci_low == b.stats.ci_low


def test_unknown_strategy_lists_valid_ones():
    model, x = make_tiny_cnn(), tiny_images()
    with pytest.raises(SaliencyUsageError, match="reinit, gaussian, permute"):
        layer_randomization(model, x, randomization="shuffle")


def test_a_custom_reset_parameters_may_use_numpy_and_python_random_without_changing_them() -> None:
    class NumpyInit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(5))

        def reset_parameters(self) -> None:
            values = np.random.standard_normal(5) + random.random()
            self.weight.copy_(torch.as_tensor(values, dtype=torch.float32))

    module = NumpyInit()
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    drawn = []
    for _ in range(2):
        with randomized([("m", module)], "reinit", seed=3):
            drawn.append(module.weight.detach().clone())
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], torch.ones(5))  # seeded draws
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert torch.equal(module.weight, torch.ones(5))


class _NewParameters(nn.Linear):
    """A reset_parameters that assigns new nn.Parameter (and buffer) objects instead of writing in place."""

    def reset_parameters(self) -> None:
        self.weight = nn.Parameter(torch.randn_like(self.weight))
        self.bias = nn.Parameter(torch.zeros_like(self.bias))
        self.register_buffer("extra", torch.ones(1))


def test_a_reset_parameters_that_assigns_new_parameter_objects_is_undone() -> None:
    layer = _NewParameters(4, 3)
    weight, bias, extra = layer.weight, layer.bias, layer.extra
    values = weight.detach().clone()
    with randomized([("layer", layer)], "reinit", seed=0):
        assert layer.weight is not weight and not torch.equal(layer.weight, values)
    assert layer.weight is weight and layer.bias is bias and torch.equal(layer.weight, values)
    assert layer.extra is extra


class _DataInit(nn.Module):
    """Old-style initialization through ``.data``, reading the current values: a user's reset,
    which cannot be replayed on stand-ins and so runs as written."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 4))

    def reset_parameters(self) -> None:
        self.weight.data.mul_(0.5)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.emb.weight  # tied, as in language models


def _transposed_linear() -> nn.Linear:
    layer = nn.Linear(5, 3)
    layer.weight = nn.Parameter(torch.randn(5, 3).t())  # a non-contiguous weight
    return layer


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 4, 3), lambda: nn.Linear(5, 3), lambda: nn.BatchNorm2d(4),
    lambda: nn.Embedding(7, 3, padding_idx=2), lambda: nn.LSTM(3, 4, proj_size=2), _transposed_linear, _Tied,
], ids=["conv", "linear", "batchnorm", "embedding", "lstm", "non_contiguous", "tied"])
def test_torch_resets_on_cpu_stand_ins_draw_what_the_plain_resets_draw(make) -> None:
    """On a GPU, torch's reset_parameters runs on CPU stand-ins so that the draws come from the CPU
    generator (a seed randomizes a layer alike on every device). Here, on the CPU, the stand-in path
    must give exactly the plain resets' values, in the model's own parameter objects."""
    from pytest_saliency.core.rng import seeded
    from pytest_saliency.model.randomize import _reset_on_cpu, _torch_reset

    plain, stand_in = make(), make()
    stand_in.load_state_dict(plain.state_dict())
    objects = dict(stand_in.named_parameters())
    resettable = [m for m in stand_in.modules() if callable(getattr(m, "reset_parameters", None))]
    assert resettable and all(_torch_reset(m) for m in resettable)
    with seeded(11), torch.no_grad():
        for module in plain.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    with seeded(11), torch.no_grad():
        for module in resettable:
            _reset_on_cpu(module)
    assert all(p is objects[name] for name, p in stand_in.named_parameters())
    for (name, expected), actual in zip(plain.named_parameters(), stand_in.parameters()):
        assert torch.equal(actual, expected) and actual.stride() == expected.stride(), name


def test_user_defined_resets_run_as_written_on_the_device() -> None:
    from pytest_saliency.model.randomize import _torch_reset

    assert not _torch_reset(_DataInit()) and not _torch_reset(_NewParameters(4, 3))
    overridden = nn.Linear(3, 2)
    overridden.reset_parameters = lambda: None  # an instance-level override
    assert not _torch_reset(overridden)

    class Subclass(nn.Linear):  # inherits torch's reset
        pass

    assert _torch_reset(Subclass(3, 2))


def _conv_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))


LAYER_MAKERS = [
    lambda: nn.Conv2d(3, 4, 3), lambda: nn.Linear(5, 3), lambda: nn.BatchNorm2d(4),
    lambda: nn.Embedding(7, 3, padding_idx=2), lambda: nn.LSTM(3, 4, proj_size=2), _transposed_linear, _Tied,
    _conv_bn, lambda: nn.LayerNorm(6),
]
LAYER_IDS = ["conv", "linear", "batchnorm", "embedding", "lstm", "non_contiguous", "tied", "conv_bn", "layernorm"]


@pytest.mark.parametrize("strategy", ["reinit", "gaussian", "permute"])
@pytest.mark.parametrize("make", LAYER_MAKERS, ids=LAYER_IDS)
def test_layer_draws_are_the_in_place_draws_and_never_touch_the_model(make, strategy) -> None:
    """LayerDraws draws on stand-ins: the values it keeps are exactly what randomized() draws in
    place, and the layer's tensors are not written at all (not even their version counters move,
    which a recorded forward graph checks when its backward runs)."""
    from pytest_saliency.model.randomize import LayerDraws, drawn_values

    layer = make()
    tensors = [*layer.parameters(), *layer.buffers()]
    versions = [t._version for t in tensors]
    before = snapshot(layer)
    draws = LayerDraws([("layer", layer)], strategy, seed=5)
    assert [t._version for t in tensors] == versions
    assert_identical(before, layer)
    expected = drawn_values("layer", layer, strategy, 5)
    kept = draws.values_for("layer")
    assert [p for p, _ in kept] == [p for p, _ in expected]
    for (_, value), (_, drawn) in zip(kept, expected):
        assert torch.equal(value, drawn)  # (kept in one block; the draw itself ran in the layer's layout)
    with randomized([("layer", layer)], strategy, 5, draws):
        for parameter, drawn in expected:
            assert torch.equal(parameter, drawn)
    assert_identical(before, layer)


def test_layer_draws_keep_only_draws_that_a_later_state_would_repeat() -> None:
    """A user's reset_parameters may hold references to its parameters (stand-ins would miss its
    writes): not kept for "reinit". Parameters sharing storage within a layer (a draw on one
    changes the other), non-dense views (another draw path) and plain tensor attributes (pruning's
    computed weight, which the reset writes) are not kept either. A kept draw is used only while
    the layer holds the values it was drawn from. And the byte limit."""
    from torch.nn.utils import prune

    from pytest_saliency.model.randomize import LayerDraws

    def kept(layer: nn.Module, strategy: str = "reinit", **kwargs) -> bool:
        return LayerDraws([("layer", layer)], strategy, 0, **kwargs).values_for("layer") is not None

    assert not kept(_DataInit()) and kept(_DataInit(), "gaussian")
    shared = nn.Module()
    storage = torch.randn(8)
    shared.a, shared.b = nn.Parameter(storage[:4]), nn.Parameter(storage[4:])
    assert not kept(shared, "permute")
    gaps = nn.Embedding(6, 3)
    gaps.weight = nn.Parameter(torch.randn(6, 8)[:, :3])
    assert not kept(gaps) and kept(nn.Embedding(6, 3))
    assert not kept(prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5))
    assert kept(nn.Linear(2, 2), limit_bytes=1024) and not kept(nn.Linear(64, 64), limit_bytes=1024)
    layers = [("a", nn.Conv2d(2, 3, 3)), ("b", nn.BatchNorm2d(3)), ("c", nn.Linear(4, 2))]
    draws = LayerDraws(layers, "reinit", 0)
    storages = {value.untyped_storage().data_ptr() for name, _ in layers for _, value in draws.values_for(name)}
    assert len(storages) == 1, "kept in one block (small long-lived tensors would fragment the heap)"
    layer = nn.Linear(3, 3)
    draws = LayerDraws([("layer", layer)], "gaussian", 0)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(0.5)  # say a forward pass that renormalizes its own weights
    assert draws.values_for("layer") is None
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert draws.values_for("layer") is not None


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
def test_pruned_and_hook_reparametrized_weights_are_randomized_by_reinit() -> None:
    """torch.nn.utils.prune and hook-based weight_norm keep the real weights in weight_orig /
    weight_g and weight_v and compute ``weight`` before each forward pass; the layer's
    reset_parameters writes into that computed tensor, not into them. They are drawn from a
    Gaussian like parameters no initializer covers, so the layer is really randomized."""
    from torch.nn.utils import prune, weight_norm

    pruned = prune.l1_unstructured(nn.Linear(6, 4), "weight", amount=0.5)
    normed = weight_norm(nn.Linear(6, 4))
    for layer, names in [(pruned, ["weight_orig", "bias"]), (normed, ["weight_g", "weight_v", "bias"])]:
        layer(torch.rand(2, 6))
        before = {name: getattr(layer, name).detach().clone() for name in names}
        with randomized([("layer", layer)], "reinit", seed=1):
            for name in names:
                assert not torch.equal(getattr(layer, name), before[name]), name
        for name in names:
            assert torch.equal(getattr(layer, name), before[name]), name


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_checks_with_kept_draws_equal_checks_that_draw_in_every_state(monkeypatch, mode) -> None:
    """The engine keeps each layer's draw for every state and image batch (within 1/DRAW_SHARE of
    the memory budget): the results are those of drawing again each time, and with several image
    batches each layer is drawn once instead of once per batch."""
    from pytest_saliency.engine import select
    from pytest_saliency.model import randomize as randomization

    model, x = make_tiny_cnn(), tiny_images(12)
    draws = []
    real = randomization._randomize_module
    monkeypatch.setattr(randomization, "_randomize_module", lambda module, *a: draws.append(a[2]) or real(module, *a))
    kwargs = dict(mode=mode, early_exit=True, image_batch=4, seed=4)  # batches of 4 images, all used if it passes
    kept = layer_randomization(model, x, "saliency", **kwargs)
    assert kept.n_images == 12 and sorted(draws) == sorted(kept.layers)  # each layer once, for 3 batches
    draws.clear()
    monkeypatch.setattr(select, "DRAW_SHARE", 2**62)  # a limit of 0 bytes: nothing kept
    fresh = layer_randomization(model, x, "saliency", **kwargs)
    assert len(draws) == 3 * len(fresh.layers)
    assert kept.ssim == fresh.ssim and kept.reused_activations == fresh.reused_activations
    torch.testing.assert_close(kept.randomized_maps, fresh.randomized_maps, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_a_pruned_model_is_randomized_and_restored_with_its_computed_weights(mode) -> None:
    """The weight prune computes before each forward pass is a plain tensor attribute: forward
    passes in randomized states replace it and a reset writes into it. After the check it holds
    the original values again (any forward pass makes a new object, as the user's own would), and
    the pruned layer's randomized state was really randomized."""
    from torch.nn.utils import prune

    model = make_tiny_cnn()
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    x = tiny_images()
    model(x)
    values = model.conv2.weight.detach().clone()
    before = snapshot(model)
    result = layer_randomization(model, x, "saliency", mode=mode)
    assert torch.equal(model.conv2.weight, values)
    assert_identical(before, model)
    assert min(result.ssim[result.layers.index("conv2")]) < 0.99


class _Counter(nn.Module):
    """A layer with an integer parameter (a lookup table of counts), and a float one."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = nn.Parameter(torch.arange(6), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(6))


class _BrokenReset(nn.Linear):
    def reset_parameters(self) -> None:
        if hasattr(self, "weight") and getattr(self, "built", False):
            raise KeyError("no initializer for this layer")
        super().reset_parameters()


@pytest.mark.parametrize("strategy", ["reinit", "gaussian"])
def test_a_layer_that_cannot_be_randomized_is_a_usage_error_naming_it(strategy) -> None:
    """Integer parameters cannot take floating-point draws, and a user's reset_parameters may raise:
    a SaliencyUsageError names the layer and the strategy and says what to do, the cause chained;
    the layer is restored. 'permute' randomizes integer parameters."""
    layer = _Counter()
    before = snapshot(layer)
    with pytest.raises(SaliencyUsageError, match=r"randomizing layer 'counter' \(_Counter\).*'counts'.*permute") as info:
        with randomized([("counter", layer)], strategy, seed=0):
            pass
    assert isinstance(info.value.__cause__, (RuntimeError, NotImplementedError))
    assert_identical(before, layer)
    with randomized([("counter", layer)], "permute", seed=0):
        assert sorted(layer.counts.tolist()) == list(range(6)) and layer.counts.tolist() != list(range(6))
    broken = _BrokenReset(3, 2)
    broken.built = True
    with pytest.raises(SaliencyUsageError, match="'broken' .*reset_parameters.*traceback") as info:
        with randomized([("broken", broken)], "reinit", seed=0):
            pass
    assert isinstance(info.value.__cause__, KeyError)


def test_a_tensor_option_shows_as_its_shape_in_the_report() -> None:
    """Option values are written for people by maps.options: an IG baseline tensor is its shape,
    not its values, in the report (as in the sweeps' tables and the faithfulness rankings)."""
    from pytest_saliency.maps.options import format_options, format_value

    model, x = make_tiny_cnn(), tiny_images(2)
    baseline = torch.full((1, 1, 16, 16), 0.25)
    result = layer_randomization(model, x, "integrated_gradients", n_steps=4, baselines=baseline)
    method_line = next(line for line in result.report().splitlines() if line.strip().startswith("method:"))
    assert "baselines=tensor(1, 1, 16, 16)" in method_line and "n_steps=4" in method_line
    assert "0.2500" not in result.report()
    assert format_options({"baselines": baseline, "method": "riemann_left", "window": (3,)}) == (
        " (baselines=tensor(1, 1, 16, 16), method='riemann_left', window=(3,))")
    assert format_value({"stdevs": 0.15, "mask": np.zeros((2, 3))}) == "{stdevs=0.15, mask=tensor(2, 3)}"
    assert format_value(torch.tensor(0.5)) == "0.5" and format_value("x" * 40, width=24) == "'" + "x" * 20 + "..."
    assert format_value(nn.Sequential(nn.Linear(2, 2))) == "Sequential(...)"


def test_an_undefined_chance_level_says_why() -> None:
    import dataclasses

    result = layer_randomization(make_tiny_cnn(), tiny_images(4), "saliency")
    assert "n/a" not in result.report()
    assert "n/a (undefined for every pair: one of the two maps is constant" in dataclasses.replace(
        result, chance=None).report()
    single = layer_randomization(make_tiny_cnn(), tiny_images(1), "saliency")
    assert single.chance is None and "chance (original maps of different images): n/a (a single input)" in single.report()
