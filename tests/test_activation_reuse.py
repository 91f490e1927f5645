"""Reusing the unchanged forward prefix: same numbers as full captum passes, model untouched.

Every check here compares the replay path with ``reuse_activations=False`` (a full captum call per
state) on models built to break a careless implementation: skip connections, in-place ReLUs that
overwrite a module's output, a module called twice, tuple outputs, functional code between
modules, tied weights and a module that keeps state between calls.
"""

from __future__ import annotations

import random
from typing import Any

import captum.attr as ca
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, layer_randomization
from pytest_saliency.engine import CannotReplay
from pytest_saliency.engine.replay import GradientReplay, reusable
from pytest_saliency.maps.explainers import prepare_method
from pytest_saliency.model.layers import trace_forward


class Block(nn.Module):
    """A residual block with an in-place ReLU on its own BatchNorm output and a shared ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)  # called twice: never replayed itself
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Split(nn.Module):
    """Returns a tuple of tensors."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :2], x[:, 2:]


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)  # overwrites stem_bn's output in place
        self.layer1 = nn.Sequential(Block(4), Block(4))
        self.split = Split()
        self.head_a = nn.Conv2d(2, 2, 1)
        self.head_b = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        x = self.layer1(x)
        a, b = self.split(x)
        x = torch.cat([self.head_a(a), torch.tanh(self.head_b(b))], dim=1)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


def make_residual(seed: int = 0) -> ResidualNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResidualNet()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0, 0.1)
    return model.eval()


class Tied(nn.Module):
    """The first and the last layer share one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(12, 12, bias=False)
        self.mid = nn.Linear(12, 12)
        self.decode = nn.Linear(12, 12)
        self.decode.weight = self.encode.weight
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)[:, :12]
        return self.out(torch.relu(self.decode(torch.relu(self.mid(torch.relu(self.encode(x)))))))


class Remembers(nn.Module):
    """Not a pure function: a hook on the first module counts calls, and the output reads the count."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 2, 3, padding=1)
        self.second = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16 * 16, 3)
        self.first.register_forward_hook(self._remember)
        self.seen = None

    def _remember(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.seen = output.mean() * 0 + float(self.calls)
        self.calls += 1

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(torch.relu(self.first(x)))
        return self.fc(y.flatten(1)) + self.seen


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "patched": [name for name, m in model.named_modules() if "forward" in m.__dict__],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"] and after["requires_grad"] == before["requires_grad"]
    assert after["patched"] == before["patched"] and after["hooks"] == before["hooks"]
    for key, value in before["state"].items():
        now = after["state"][key]
        if value.is_sparse:
            now, value = now.to_dense(), value.to_dense()
        assert torch.equal(now, value), key


def both_ways(model: nn.Module, x: torch.Tensor, method: str, **kwargs):
    fast = layer_randomization(model, x, method, **kwargs)
    slow = layer_randomization(model, x, method, reuse_activations=False, **kwargs)
    return fast, slow


MODELS = {"tiny_cnn": (make_tiny_cnn, lambda: tiny_images(6)),
          "residual": (make_residual, lambda: tiny_images(5, seed=3))}


METHOD_OPTIONS = {"saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 6},
                  "smoothgrad": {"nt_samples": 5}}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("mode,order", [("independent", "top_down"), ("cascading", "top_down"),
                                        ("cascading", "bottom_up")])
def test_reuse_gives_the_same_ssim_as_full_captum_passes(model_name: str, method: str, mode: str, order: str) -> None:
    make, images = MODELS[model_name]
    model, x = make(), images()
    for randomization in ("reinit", "permute"):
        before = snapshot(model)
        fast, slow = both_ways(model, x, method, mode=mode, order=order, randomization=randomization,
                               **METHOD_OPTIONS[method])
        assert fast.reused_activations and not slow.reused_activations
        assert fast.layers == slow.layers
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
        torch.testing.assert_close(fast.original_maps, slow.original_maps, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
        assert fast.passed == slow.passed
        assert_unchanged(model, before)


def test_reuse_covers_blocks_and_named_layers() -> None:
    model, x = make_residual(), tiny_images(4, seed=1)
    for layers in ("block", ["layer1.1.conv2", "stem", "fc"]):
        fast, slow = both_ways(model, x, "saliency", layers=layers)
        assert fast.reused_activations
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)


def test_the_replayed_original_maps_equal_captum() -> None:
    model, x = make_residual(), tiny_images(5, seed=2)
    trace = trace_forward(model, x)
    target = trace.output.argmax(1)
    xr = x.clone().requires_grad_(True)
    cases = [("saliency", {}, ca.Saliency(model).attribute(xr, target=target, abs=False)),
             ("saliency", {"abs": True}, ca.Saliency(model).attribute(xr, target=target, abs=True)),
             ("input_x_gradient", {}, ca.InputXGradient(model).attribute(xr, target=target))]
    for method, extra, expected in cases:
        spec, _, options = prepare_method(method, model, x, extra)
        assert reusable(model, trace, spec, options, None, x.shape[0])
        replay = GradientReplay(model, x, target, method, options)
        torch.testing.assert_close(replay.original(), expected, rtol=0, atol=1e-7)
        replay.close()


@pytest.mark.parametrize("method, options", [
    ("integrated_gradients", {"n_steps": 7}),
    ("integrated_gradients", {"n_steps": 5, "integration_method": "riemann_trapezoid"}),
    ("integrated_gradients", {"n_steps": 4, "baselines": "uniform"}),
    ("integrated_gradients", {"n_steps": 4, "baselines": "blurred"}),
    ("integrated_gradients", {"n_steps": 3, "baselines": 0.25, "integration_method": "riemann_left"}),
    ("smoothgrad", {"nt_samples": 6}),
    ("smoothgrad", {"nt_samples": 3, "stdevs": 0.3}),
    ("smoothgrad", {"nt_samples": 4, "noise_level": 0.5, "nt_samples_batch_size": 4}),
])
def test_the_replayed_steps_and_samples_equal_captums(method: str, options: dict) -> None:
    """Same interpolation / same seeded noise, same arithmetic: captum's maps, for a batch and one image."""
    from pytest_saliency.maps.explainers import attribute

    model, x = make_residual(), tiny_images(4, seed=5)
    trace = trace_forward(model, x)
    target = trace.output.argmax(1)
    spec, _, prepared = prepare_method(method, model, x, dict(options))
    assert reusable(model, trace, spec, prepared, None, x.shape[0])
    for images in (x, x[:1]):
        expected = attribute(model, images, spec, target[: len(images)], 7, None, True, prepared)  # captum, seed 7
        replay = GradientReplay(model, images, target[: len(images)], method, prepared, seed=7)
        torch.testing.assert_close(replay.original(), expected, rtol=1e-5, atol=1e-6)
        replay.close()


def test_integrated_gradients_reuse_only_within_one_internal_batch() -> None:
    model, x = make_residual(), tiny_images(4)
    trace = trace_forward(model, x[:1])
    spec, _, prepared = prepare_method("integrated_gradients", model, x, {"n_steps": 10, "internal_batch_size": 39})
    assert not reusable(model, trace, spec, prepared, None, 4)  # 4 images x 10 steps do not fit in 39 rows
    spec, _, prepared = prepare_method("integrated_gradients", model, x, {"n_steps": 10, "internal_batch_size": 40})
    assert reusable(model, trace, spec, prepared, None, 4)
    result = layer_randomization(model, x, "integrated_gradients", n_steps=10, internal_batch_size=39)
    assert not result.reused_activations


def test_replay_drops_recorded_outputs_as_the_cut_moves_towards_the_input() -> None:
    model, x = make_residual(), tiny_images(3)
    trace = trace_forward(model, x)
    spec, _, options = prepare_method("saliency", model, x, {})
    replay = GradientReplay(model, x, trace.output.argmax(1), "saliency", options)
    replay.original()
    assert {"stem", "layer1", "layer1.0", "layer1.1.conv2", "split"} <= set(replay.recorded)
    # Outputs the graph does not save are not kept: a BatchNorm feeding an addition, a conv feeding
    # torch.cat. Those modules run again when needed. A module that reduces its input (the Linear
    # head: a few logits from many features) is kept although nothing saves its output.
    assert not {"layer1.0.bn2", "head_a"} & set(replay.recorded)
    assert "fc" in replay.recorded
    assert replay.verify(trace.start["fc"])
    replay.maps(trace.start["layer1.1"])
    assert "layer1" not in replay.recorded and "layer1.0" in replay.recorded and "stem" in replay.recorded
    replay.maps(trace.start["stem"])
    assert replay.recorded == {}
    replay.close()


def test_tied_weights_turn_reuse_off() -> None:
    model = Tied().eval()
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(0)).reshape(6, 1, 3, 4)
    trace = trace_forward(model, x)
    spec, _, options = prepare_method("saliency", model, x, {})
    assert not reusable(model, trace, spec, options, None, 6)


def test_a_model_with_state_between_calls_falls_back_to_full_passes() -> None:
    model = Remembers().eval()
    x = tiny_images(4)
    # The logits recomputed from the recorded outputs differ from the original ones: verify() notices.
    result = layer_randomization(model, x, "saliency", preset="thesis2023")
    assert not result.reused_activations


def test_methods_models_and_options_that_do_not_reuse() -> None:
    model, x = make_tiny_cnn(), tiny_images(6)
    assert not layer_randomization(model, x, "guided_backprop").reused_activations
    assert not layer_randomization(model, x, "smoothgrad", nt_samples=4, nt_samples_batch_size=2).reused_activations
    assert not layer_randomization(model, x, "saliency", reuse_activations=False).reused_activations
    # adaptive mode with a chunk smaller than image_batch: captum's chunked path
    assert not layer_randomization(model, x, "saliency", images="auto", image_batch=4,
                                   batch_size=2).reused_activations


@pytest.mark.parametrize("chunking", [{"batch_size": 2}, {"memory_budget": 1}])
def test_reuse_explains_chunks_of_images_when_the_batch_is_bounded(chunking: dict) -> None:
    """batch_size, or a memory budget too small for the batch: the replay runs chunk by chunk."""
    model, x = make_residual(), tiny_images(5, seed=8)
    fast, slow = both_ways(model, x, "saliency", **chunking)
    assert fast.reused_activations and fast.n_images == 5
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    unbounded = layer_randomization(model, x, "saliency")
    np.testing.assert_allclose(fast.ssim, unbounded.ssim, rtol=0, atol=2e-6)


def test_an_error_in_the_middle_leaves_the_model_and_rngs_untouched() -> None:
    model, x = make_residual(), tiny_images(4)
    before = snapshot(model)
    rng = torch.random.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()
    calls = []

    def progress(done: int, total: int, label: str) -> None:
        calls.append(label)
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layer_randomization(model, x, "saliency", progress=progress)
    assert len(calls) == 4
    assert_unchanged(model, before)
    assert torch.equal(torch.random.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]


def test_adaptive_images_and_skipped_constant_maps_work_with_reuse() -> None:
    model, x = make_tiny_cnn(), tiny_images(12)
    fast, slow = both_ways(model, x, "saliency", images="auto", image_batch=4)
    assert fast.reused_activations and fast.n_images == slow.n_images
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    x_zero = x.clone()
    x_zero[1] = 0.0
    # input_x_gradient of an all-zero image is a constant (zero) map
    with pytest.warns(UserWarning, match="constant"):
        fast, slow = both_ways(model, x_zero, "input_x_gradient", constant_maps="skip")
    assert fast.reused_activations and fast.n_images == slow.n_images == 11
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_grouping_states_for_similarity_does_not_change_the_numbers(monkeypatch, mode: str) -> None:
    import pytest_saliency.checks.randomization as engine

    model, x = make_residual(), tiny_images(5, seed=4)
    results = []
    for budget in (1, 3 * 5 * 16 * 16 * 4, 2**40):  # every state alone, groups of three, all at once
        monkeypatch.setattr(engine, "SIMILARITY_BATCH_BYTES", budget)
        for reuse in (True, False):
            results.append(layer_randomization(model, x, "saliency", mode=mode, reuse_activations=reuse))
    for other in results[1:]:
        np.testing.assert_allclose(other.ssim, results[0].ssim, rtol=0, atol=2e-6)
        torch.testing.assert_close(other.randomized_maps, results[0].randomized_maps, rtol=0, atol=1e-5)


def test_adaptive_mode_reuses_when_the_steps_fit_the_images_actually_explained() -> None:
    """image_batch larger than N: each call sees N images, and N x n_steps fits the internal batch."""
    model, x = make_residual(), tiny_images(4)
    result = layer_randomization(model, x, "integrated_gradients", n_steps=5, internal_batch_size=20,
                                 images="auto", image_batch=32)
    assert result.reused_activations and result.n_images == 4


# ------------------------------------------------------------------------------------------
# Models built to break a replay: routing on values, children called first, per-image loops...
# ------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """The root reads fc2's weight before fc2 runs: randomizing fc2 changes fc1's consumer early."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1 = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(1024, 8)
        self.act, self.fc2, self.out = nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(torch.relu(self.conv(x)).flatten(1)) * self.fc2.weight.sum(0))
        return self.out(torch.relu(self.fc2(h)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 3, padding=1)  # called by the root, before the encoder runs
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4).reshape(4, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale


class ChildCalledFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.fc = Encoder(), nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.gelu(self.enc(nn.functional.gelu(self.enc.embed(x)))).flatten(1))


class PerImage(nn.Module):
    """``m`` runs once per image: a one-image trace would call it 'called once'."""

    def __init__(self) -> None:
        super().__init__()
        self.m, self.k = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k(torch.cat([nn.functional.gelu(self.m(xi[None])) for xi in x]))


class DirectForward(nn.Module):
    """``a`` runs twice, the second time through ``a.forward(...)``, which no hook sees."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.a, self.l = (nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(nn.functional.gelu(self.c(x)))
        return self.fc(nn.functional.gelu(self.a.forward(nn.functional.gelu(self.l(h)))).flatten(1))


class Experts(nn.Module):
    """Which expert runs depends on the image: layer selection must see the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(1024, 3)
        self.experts = nn.ModuleList(nn.Linear(1024, 8) for _ in range(3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv(x)).flatten(1)
        pick = self.gate(h).argmax(1)
        out = h.new_zeros(len(h), 8)
        for i, expert in enumerate(self.experts):
            if bool((pick == i).any()):
                out = out.index_put((torch.nonzero(pick == i)[:, 0],), expert(h[pick == i]))
        return self.fc(out)


class BackwardHooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), nn.GELU()
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(1024, 3)
        self.act1.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0].clamp(min=0),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.gelu(self.conv2(self.act1(self.conv1(x)))).flatten(1))


class SparsePool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(256, 3)
        index = torch.stack([torch.arange(64), torch.arange(64) * 4])
        with torch.sparse.check_sparse_tensor_invariants():
            pool = torch.sparse_coo_tensor(index, torch.ones(64), (64, 256)).coalesce()
        self.register_buffer("pool", pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv(x)).flatten(2).reshape(-1, 256)
        return self.fc(torch.sparse.mm(self.pool, h.T).T.reshape(len(x), -1))


class Vmapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.lin, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(16, 16), nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.func.vmap(lambda row: torch.tanh(self.lin(row)))(nn.functional.gelu(self.c(x)))
        return self.fc(nn.functional.gelu(h).flatten(1))


def seeded_model(cls: type) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls().eval()


@pytest.mark.parametrize("cls", [Gate, ChildCalledFirst, PerImage, DirectForward, Experts, BackwardHooked,
                                 SparsePool, Vmapped])
@pytest.mark.parametrize("layers", ["leaf", "block"])
def test_reviewed_models_give_the_same_numbers_with_and_without_reuse(cls: type, layers: str) -> None:
    model = seeded_model(cls)
    if cls is PerImage:
        model = nn.Sequential(model, nn.GELU(), nn.Flatten(), nn.Linear(1024, 3)).eval()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    fast, slow = both_ways(model, x, "saliency", preset="thesis2023", layers=layers)
    assert fast.layers == slow.layers
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
    assert_unchanged(model, before)


def test_the_trace_sees_a_parameter_used_before_its_layer_and_a_child_called_before_its_parent() -> None:
    gate = trace_forward(seeded_model(Gate), torch.rand(2, 1, 16, 16))
    assert gate.first_use["fc2"] < gate.start["fc2"] and gate.first_use["fc1"] == gate.start["fc1"]
    child = trace_forward(seeded_model(ChildCalledFirst), torch.rand(2, 1, 16, 16))
    assert child.first_use["enc"] == child.start["enc.embed"] < child.start["enc"]


def test_module_call_counts_include_direct_forward_calls_and_every_image() -> None:
    direct = trace_forward(seeded_model(DirectForward), torch.rand(3, 1, 16, 16))
    assert direct.calls["a"] == 2 and "a" not in direct.replayable and "c" in direct.replayable
    per_image = trace_forward(seeded_model(PerImage), torch.rand(3, 1, 16, 16))
    assert per_image.calls["m"] == 3 and "m" not in per_image.replayable


def test_an_inplace_change_to_a_saved_tensor_is_an_error_with_reuse_as_without() -> None:
    class Overwrites(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 1.0
            y = nn.functional.gelu(h)
            h.mul_(3)  # gelu saved h for its backward
            return y + h

    model = nn.Sequential(Overwrites(), nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(1024, 3)).eval()
    x = tiny_images(4)
    for reuse in (True, False):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            layer_randomization(model, x, "saliency", reuse_activations=reuse)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_a_scripted_submodule_is_not_replayed_and_no_hook_is_left_behind() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(),
                          torch.jit.script(nn.Conv2d(4, 4, 3, padding=1)), nn.Flatten(), nn.Linear(1024, 3)).eval()
    x = tiny_images(4)
    before = snapshot(model)
    fast, slow = both_ways(model, x, "saliency")
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    assert "2" not in trace_forward(model, x).replayable
    assert_unchanged(model, before)


# Parameters read through keyword lists and storage aliases, control flow on the batch.


class KwargsList(nn.Module):
    """fc2's bias is read through a list passed as a keyword argument, before fc2 runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mid = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc1, self.fc2, self.out = nn.Linear(1024, 8), nn.Linear(8, 8), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.cat(tensors=[self.fc2.bias, self.fc2.bias])
        h = nn.functional.gelu(self.mid(nn.functional.gelu(self.conv(x)) * g[:4, None, None]))
        h = nn.functional.gelu(self.fc1(h.flatten(1)))
        return self.out(torch.cat([h, nn.functional.gelu(self.fc2(h))], 1))


class StorageAlias(nn.Module):
    """A detached view of fc2's bias, kept as a plain attribute, is used before fc2 runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mid = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc2, self.fc = nn.Linear(4, 4), nn.Linear(1024, 3)
        self.gate = self.fc2.bias.detach()[:, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(nn.functional.gelu(self.conv(x)) + self.gate)
        h = self.fc2(nn.functional.gelu(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(h.flatten(1))


class BatchDependentOrder(nn.Module):
    """Which block runs first depends on the whole batch's mean brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(1024, 3)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.stem(x))
        for block in (self.a, self.b) if bool(x.mean() > 0.5) else (self.b, self.a):
            h = nn.functional.gelu(block(h))
        return self.fc(h.flatten(1))


class PropertyForward(nn.Module):
    @property
    def forward(self):  # type: ignore[override]
        return nn.functional.gelu


def test_parameters_read_through_keyword_lists_and_storage_aliases_are_seen() -> None:
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    for cls in (KwargsList, StorageAlias):
        model = seeded_model(cls)
        fast, slow = both_ways(model, x, "saliency", preset="thesis2023")
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
        trace = trace_forward(model, x)
        assert trace.first_use["fc2"] < trace.start["fc2"]


def test_each_chunk_is_traced_when_control_flow_depends_on_the_batch() -> None:
    model = seeded_model(BatchDependentOrder)
    dark = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.4
    x = torch.cat([dark + 0.55, dark])
    for layers in (["stem", "b"], "leaf"):
        fast, slow = both_ways(model, x, "saliency", preset="thesis2023", batch_size=2, layers=layers)
        assert fast.reused_activations
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method, options", [("smoothgrad", {"nt_samples": 4}),
                                             ("integrated_gradients", {"n_steps": 4, "baselines": "uniform"})])
def test_random_draws_over_chunks_match_captums_single_stream(method: str, options: dict) -> None:
    model, x = make_residual(), tiny_images(5)
    fast, slow = both_ways(model, x, method, batch_size=3, **options)
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.original_maps, slow.original_maps, rtol=0, atol=1e-6)


def test_a_chunk_of_only_constant_maps_is_skipped_not_fatal() -> None:
    class DarkIsZero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(1024, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = (x.flatten(1).mean(1) > 0.5).float()[:, None]
            return self.fc(nn.functional.gelu(self.conv(x)).flatten(1)) * bright

    model = seeded_model(DarkIsZero)
    dim = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.4
    x = torch.cat([dim[:3], dim[3:] + 0.5])  # three images whose maps are all zero, first
    with pytest.warns(UserWarning, match="constant"):
        fast, slow = both_ways(model, x, "saliency", constant_maps="skip", batch_size=3)
    assert fast.n_images == slow.n_images == 5
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    with pytest.raises(SaliencyUsageError, match="constant"), pytest.warns(UserWarning):
        layer_randomization(model, x[:3], "saliency", constant_maps="skip", batch_size=2)


def test_smoothgrad_noise_std_is_checked_once_for_both_paths() -> None:
    model, x = make_tiny_cnn(), tiny_images(4)
    fast, slow = both_ways(model, x, "smoothgrad", nt_samples=3, stdevs=(0.2,))
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    with pytest.raises(SaliencyUsageError, match="stdevs"):
        layer_randomization(model, x, "smoothgrad", stdevs=torch.tensor(0.2))


def test_a_module_whose_forward_is_a_property_is_timed_by_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), PropertyForward(), nn.Flatten(), nn.Linear(1024, 3)).eval()
    x = tiny_images(4)
    trace = trace_forward(model, x)
    assert "1" in trace.start and "1" not in trace.replayable
    fast, slow = both_ways(model, x, "saliency")
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)


# Parameters that gate the output, writes through .data, attributes and hooks on outputs.


class GatedByParameter(nn.Module):
    """When 'gate' is randomized the output stops depending on x: captum raises, so must reuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(1, 1), nn.Linear(1024, 3)
        with torch.no_grad():
            self.gate.weight.fill_(1.0)
            self.gate.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv(x)).flatten(1)
        return self.fc(h if float(self.gate(torch.ones(1, 1))) == 1.0 else h.detach())


class DataWrite(nn.Module):
    """Halves its child's output through .data (no version bump) after the child returned."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.l = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        h.data.mul_(0.5)
        return self.l(nn.functional.gelu(h))


class Tagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        y.scale = 2.0  # a Python attribute the parent reads
        return y


class ReadsTag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t, self.c2, self.fc = Tagged(), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t(x)
        return self.fc((nn.functional.gelu(self.c2(h)) * h.scale).flatten(1))


class GradientHookOutside(nn.Module):
    """The parent registers a gradient hook on a child's output: it must fire once per backward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(1024 + 256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * 0.1)
        return self.fc(torch.cat([nn.functional.gelu(self.conv2(nn.functional.gelu(h))).flatten(1),
                                  x.flatten(1)], 1))


def test_an_output_that_stops_depending_on_the_inputs_is_an_error_with_reuse_as_without() -> None:
    model, x = seeded_model(GatedByParameter), tiny_images(4)
    for reuse in (True, False):
        with pytest.raises(SaliencyUsageError, match="does not depend on the input through autograd"):
            layer_randomization(model, x, "saliency", reuse_activations=reuse)


@pytest.mark.parametrize("cls", [ReadsTag, GradientHookOutside])
def test_tensor_attributes_and_gradient_hooks_on_recorded_outputs(cls: type) -> None:
    model = seeded_model(cls)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fast, slow = both_ways(model, x, "saliency", preset="thesis2023")
    assert fast.reused_activations
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)


def test_a_write_through_data_after_the_module_returned_is_not_replayed() -> None:
    model = nn.Sequential(DataWrite(), nn.GELU(), nn.Flatten(), nn.Linear(1024, 3)).eval()
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fast, slow = both_ways(model, x, "saliency", preset="thesis2023")
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_the_traced_pass_is_the_recording_pass(method: str) -> None:
    """One forward pass traces the model and records its activations (no separate trace).

    The model's top-level forward runs once for the trace and the original maps, once to verify
    the replay, and once per randomized layer; the maps equal full captum passes.
    """
    model, x = make_residual(), torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        fast = layer_randomization(model, x, method, seed=2)
    finally:
        handle.remove()
    full = layer_randomization(model, x, method, seed=2, reuse_activations=False)
    assert fast.reused_activations
    # the memory probe (one image), then the traced pass, the verification and one pass per layer
    assert calls == [1] + [4] * (len(fast.layers) + 2)
    np.testing.assert_allclose(fast.ssim, full.ssim, atol=1e-5)


def test_traced_recording_is_dropped_when_reuse_cannot_run() -> None:
    """Tied weights turn reuse off after the speculative recording pass, which still gave the trace."""
    model, x = seeded_model(Tied), torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = layer_randomization(model, x, "saliency", seed=1)
    finally:
        handle.remove()
    full = layer_randomization(model, x, "saliency", seed=1, reuse_activations=False)
    assert not result.reused_activations
    # the memory probe, the traced pass, captum's original maps, one captum call per layer
    assert calls == [1] + [3] * (len(result.layers) + 2)
    np.testing.assert_allclose(result.ssim, full.ssim, atol=1e-6)


class PooledInForward(nn.Module):
    """The digits CNN's layout: pooling as F.max_pool2d in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(self.relu2(self.bn2(self.conv2(x))), 2)
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class FunctionalTricks(nn.Module):
    """Calls between modules that an op-level replay must not get wrong.

    An op result changed in place afterwards, one changed through .data, a parameter of a later
    layer read in the parent's code before that layer runs, and a branch on the values that
    changes which calls run after the randomized layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2)  # 8x8
        a.mul_(1.5)  # in place on a recorded call's output: it must run again
        b = torch.sigmoid(self.conv2(a))
        b.data.add_(0.25)  # no version bump: the checksum catches it
        scale = self.fc.weight.abs().mean()  # fc's weight, read before fc runs
        c = nn.functional.avg_pool2d(torch.tanh(self.conv3(b)) * scale, 2)  # 4x4
        if bool(c.detach().mean() > 0):  # a branch on the values after conv3
            c = torch.cos(c) * c
        return self.fc(c.flatten(1))


class Counting(torch.overrides.TorchFunctionMode):
    """Counts the torch calls whose name contains ``word`` (outside the engine's own modes)."""

    def __init__(self, word: str) -> None:
        super().__init__()
        self.word, self.count = word, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.word in getattr(func, "__name__", ""):
            self.count += 1
        return func(*args, **(kwargs or {}))


class PooledInModules(nn.Module):
    """The small CNN's layout: pooling modules, the second one feeding a Linear layer, which (its
    weight frozen) does not save its input: only the pooling's size makes it worth keeping."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("cls", [PooledInForward, PooledInModules])
def test_pooling_before_the_cut_is_replayed_not_recomputed(cls: type) -> None:
    """Calls between modules (the digits CNN's F.max_pool2d), and modules that reduce their input
    although the graph does not save their output (the small CNN's second nn.MaxPool2d, feeding
    a frozen Linear layer)."""
    model, x = seeded_model(cls), torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with Counting("max_pool2d") as fast_count:
        fast = layer_randomization(model, x, "saliency", seed=3)
    with Counting("max_pool2d") as slow_count:
        slow = layer_randomization(model, x, "saliency", seed=3, reuse_activations=False)
    assert fast.reused_activations
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
    # Full passes: 2 pools x (trace + original + 6 layers); the memory probe ran in the first
    # check and is remembered for this model and input shape. With reuse: 2 each for the probe
    # and the traced recording pass, none for the verification at fc2 nor for the fc2 and fc1
    # states, the second pool only for the bn2 and conv2 states, both for bn1 and conv1.
    assert slow_count.count == 2 * 8
    assert fast_count.count == 2 + 2 + 0 + (0 + 0 + 1 + 1 + 2 + 2)


class NestedArguments(nn.Module):
    """Two poolings of one activation whose arguments flatten to the same values: kernel (2, 4)
    with stride 4, and kernel 2 with stride (4, 4); both give 2x2 maps from 8x8 ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Linear(3 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))  # recorded (tanh saves its output): the poolings' input has a name
        wide = nn.functional.avg_pool2d(a, (2, 4), 4)
        square = nn.functional.avg_pool2d(a, 2, (4, 4))
        return self.fc(wide.flatten(1) + square.flatten(1))


def test_calls_are_told_apart_by_the_structure_of_their_arguments() -> None:
    model, x = seeded_model(NestedArguments), torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    replay = GradientReplay(model, x, None, "saliency", {})
    replay.record()
    assert len(replay.ops) == 2  # both poolings recorded, each under its own key
    replay.close()
    fast, slow = both_ways(model, x, "saliency", preset="thesis2023")
    assert fast.reused_activations  # one key for both would serve the first to the second: verify() fails
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad"])
def test_functional_tricks_give_the_same_numbers_with_and_without_reuse(method: str) -> None:
    model = seeded_model(FunctionalTricks)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    options = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"nt_samples": 3}}.get(method, {})
    for mode in ("independent", "cascading"):
        fast, slow = both_ways(model, x, method, preset="thesis2023", mode=mode, **options)
        assert fast.reused_activations
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
        torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
    assert_unchanged(model, before)


def test_recorded_calls_exclude_outputs_changed_afterwards_and_views() -> None:
    model, x = seeded_model(FunctionalTricks), tiny_images(3)
    replay = GradientReplay(model, x, None, "saliency", {})
    replay.record()
    names = sorted(getattr(key[0], "__name__", str(key[0])) for _, key, _ in replay.ops.values())
    # max_pool2d's output was scaled in place and sigmoid's through .data; flatten is a view of
    # avg_pool2d's output; the rest are the calls the graph keeps anyway.
    assert "max_pool2d" not in " ".join(names) and "sigmoid" not in names and "flatten" not in names
    assert "avg_pool2d" in names
    replay.close()


class CachedOnFirstCall(nn.Module):
    """A pure function that makes extra torch calls on its first call (a cache filled once).

    Numbering calls by position would hand the smoothing pool the downsampling pool's output in
    replayed passes; recognising calls by what they compute does not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.offset = None
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 1).view(1, 1, 1, 1))
        self.conv1, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset is None or self.offset.shape[0] != x.shape[0]:
            self.offset = torch.zeros(x.shape[0], 3)
        h = nn.functional.avg_pool2d(x, 2)
        h = nn.functional.avg_pool2d(h, 3, 1, 1)
        h = self.conv1(h * self.gain)
        return self.fc(torch.tanh(h).flatten(1)) + self.offset


class Square(torch.autograd.Function):
    """Saves a tensor outside any torch call a TorchFunctionMode sees."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class ReviewedCalls(nn.Module):
    """A custom Function, a call scaled twice (mul, mul) before the first layer, a
    .data flip that keeps the sum, and a call done in place only when gradients are off (so the
    verification pass would write into the recorded output)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("two", torch.full((1, 1, 1, 1), 2.0))
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = Square.apply(x * 0.5) * self.two
        p = nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2)
        p.data.copy_(p.data.flip(-1))
        h = p * 1.5 if torch.is_grad_enabled() else p.mul_(1.5)
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


@pytest.mark.parametrize("cls", [CachedOnFirstCall, ReviewedCalls])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_fourth_review_models_give_the_same_numbers_with_and_without_reuse(cls: type, method: str) -> None:
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    options = {"n_steps": 4} if method == "integrated_gradients" else {}
    for mode in ("independent", "cascading"):
        model = seeded_model(cls)
        before = snapshot(model)
        fast, slow = both_ways(model, x, method, preset="thesis2023", mode=mode, **options)
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
        torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
        assert_unchanged(model, before)


def test_reused_activations_means_a_state_actually_came_from_the_replay(monkeypatch) -> None:
    model, x = make_residual(), tiny_images(4)

    def stopped(self, cut):
        raise CannotReplay("the replay stops in every state")

    monkeypatch.setattr(GradientReplay, "maps", stopped)
    result = layer_randomization(model, x, "saliency")
    assert not result.reused_activations



class GatedExploding(nn.Module):
    """Finite maps as given; infinite logits once ``gate``'s weight (all zeros) is randomized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x) + self.gate(x)).flatten(1)
        if bool(self.gate.weight.abs().max() > 0.5):  # (torch.where would give NaN gradients even unselected)
            h = h * float("inf")
        return self.fc(h)


@pytest.mark.parametrize("reuse", [True, False])
def test_non_finite_maps_of_a_state_name_the_randomized_layer(reuse: bool) -> None:
    model = seeded_model(GatedExploding)
    with torch.no_grad():
        model.gate.weight.zero_()
    before = snapshot(model)
    # a Gaussian draw for a weight of zero spread has scale 1 (randomization._scale): some entry exceeds 0.5
    with pytest.raises(SaliencyUsageError, match=r"from 'saliency' with 'gate' randomized contain \d+ NaN or inf"):
        layer_randomization(model, tiny_images(3), "saliency", randomization="gaussian", reuse_activations=reuse)
    assert_unchanged(model, before)


class PoolDataSwap(nn.Module):
    """A pooling output nothing saves (it feeds a frozen Linear) is kept because it is small; the
    parent then swaps two of its values through ``.data`` (no version bump, same sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2)
        self.fc1, self.fc = nn.Linear(256, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool(nn.functional.gelu(self.conv1(x)))
        flat = p.data.view(-1)
        flat[[1, 2]] = flat[[2, 1]].clone()
        return self.fc(torch.tanh(self.fc1(p.flatten(1))))


def test_a_swap_through_data_keeps_the_output_out_of_the_replay() -> None:
    model, x = seeded_model(PoolDataSwap), tiny_images(4)
    replay = GradientReplay(model, x, None, "saliency", {})
    replay.record()
    assert "pool" not in replay.recorded  # the checksum saw the swap (a sum and every 7th value did not)
    replay.close()
    for method in ("saliency", "input_x_gradient"):
        fast, slow = both_ways(model, x, method, preset="thesis2023")
        np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_checksum_sees_any_swap_of_unequal_values(dtype: torch.dtype) -> None:
    from pytest_saliency.core.fingerprint import CHECKSUM_PERIOD, weighted_checksum

    generator = torch.Generator().manual_seed(0)
    for n in (2, 7, 256, CHECKSUM_PERIOD, 3 * CHECKSUM_PERIOD + 5):
        values = torch.rand(n, generator=generator).to(dtype)
        before = weighted_checksum(values)
        for i, j in [(0, 1), (0, n - 1), (n // 2, n - 1), (0, min(CHECKSUM_PERIOD, n - 1))]:
            if i == j:
                continue
            if values[i] == values[j]:
                continue
            swapped = values.clone()
            swapped[[i, j]] = values[[j, i]]
            assert not torch.equal(weighted_checksum(swapped), before), (n, i, j)
        raised = values.clone()
        raised[n // 2] += 0.25
        assert not torch.equal(weighted_checksum(raised), before), n
        assert torch.equal(weighted_checksum(values.clone()), before)


class TwoNan(nn.Module):
    """Two gates whose randomization both make the maps NaN (a square root of negative values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gate1, self.gate2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 16 * 16, 3)
        with torch.no_grad():
            for gate in (self.gate1, self.gate2):
                gate.weight.abs_()
                gate.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sqrt(self.gate1(torch.sigmoid(self.conv1(x))))
        return self.fc(torch.sqrt(self.gate2(h)).flatten(1))


def test_with_several_non_finite_states_both_paths_name_the_first_layer() -> None:
    model = seeded_model(TwoNan)
    for reuse in (True, False):
        with pytest.raises(SaliencyUsageError, match=r"with 'gate1' randomized contain"):
            layer_randomization(model, tiny_images(4), "saliency", reuse_activations=reuse)


class ScriptedBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(1, 4, 3, padding=1), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.conv(x)))


class WithScriptedBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = torch.jit.script(ScriptedBody()), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_a_scripted_submodule_gets_its_training_flag_back() -> None:
    from pytest_saliency import explain

    x = tiny_images(4)
    for check in (lambda m: layer_randomization(m, x, "saliency"), lambda m: explain(m, x, "saliency")):
        model = seeded_model(WithScriptedBody).train()
        check(model)
        # The flag the compiled forward reads lives in the C++ module, not in the instance dict.
        assert model.body._c.getattr("training") is True and "training" not in model.body.__dict__
        model.eval()
        assert model.body.training is False and model.body._c.getattr("training") is False


class SettableForward(nn.Module):
    """``forward`` is a property with a setter that stores into another attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self._impl = self._run

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))

    @property
    def forward(self):  # type: ignore[override]
        return self._impl

    @forward.setter
    def forward(self, value) -> None:
        self._impl = value


class WithSettableForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = SettableForward(), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def test_a_forward_property_with_a_setter_is_left_as_it_was() -> None:
    model, x = seeded_model(WithSettableForward), tiny_images(4)
    implementation = model.body._impl
    fast, slow = both_ways(model, x, "saliency", preset="thesis2023")
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    assert model.body._impl == implementation  # the trace timed it with hooks instead of patching it


def test_the_traced_pass_runs_in_memory_sized_chunks(monkeypatch) -> None:
    """The traced chunk keeps every module's output: with no batch_size it must still be bounded by
    the memory budget (900 ResNet-50 images at 224x224 in one traced chunk ran a GPU out of memory)."""
    from pytest_saliency.engine import select

    sizes = []
    real = select.trace_forward

    def spy(model, inputs, batch_size=None, **kwargs):
        sizes.append(batch_size)
        return real(model, inputs, batch_size, **kwargs)

    monkeypatch.setattr(select, "trace_forward", spy)
    model, x = make_residual(), tiny_images(6, seed=4)
    bounded = layer_randomization(model, x, "saliency", memory_budget=200_000)
    assert sizes and all(size is not None and size < 6 for size in sizes)
    sizes.clear()
    whole = layer_randomization(model, x, "saliency", reuse_activations=False)
    np.testing.assert_allclose(bounded.ssim, whole.ssim, rtol=0, atol=2e-6)


class Branchy(nn.Module):
    """Images whose first pixel is positive also run ``rare``: the first chunk never does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.rare = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        flag = x[:, 0, 0, 0] > 0.5
        if bool(flag.any()):
            h = torch.where(flag[:, None, None, None], torch.relu(self.rare(h)), h)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_a_layer_that_runs_only_for_later_chunks_keeps_its_place(mode: str) -> None:
    """Chunked traced passes (a memory budget, a batch_size) select and order the layers as one
    pass over all images does, so CPR randomizes in the same order and gives the same numbers."""
    model, x = seeded_model(Branchy), tiny_images(6, seed=1)
    x[:3, 0, 0, 0], x[3:, 0, 0, 0] = 0.0, 1.0
    whole = layer_randomization(model, x, "saliency", mode=mode)
    assert whole.layers == (["conv", "rare", "head"] if mode == "independent" else ["head", "rare", "conv"])
    for chunking in ({"memory_budget": 20_000}, {"batch_size": 2}):  # one image / two images per chunk
        chunked = layer_randomization(model, x, "saliency", mode=mode, **chunking)
        assert chunked.layers == whole.layers and chunked.reused_activations
        np.testing.assert_allclose(chunked.ssim, whole.ssim, rtol=0, atol=2e-6)
    assert layer_randomization(model, x, "saliency", layers=["rare"], batch_size=2).layers == ["rare"]


class ReadTwice(nn.Module):
    """bn1's output feeds a ReLU module and a residual sum in the parent's forward: the sum runs
    again after the ReLU is replayed, so bn1 must run. bn2's output feeds only relu2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        z = self.relu1(y) + y
        return self.fc(self.relu2(self.bn2(self.conv2(z))).flatten(1))


class InplaceAfterNorm(nn.Module):
    """ReLU(inplace=True) returns the BatchNorm's own tensor: the BatchNorm's output is the ReLU's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv2(self.relu(self.bn(self.conv(x))))).flatten(1))


class TupleNorm(nn.Module):
    """A module returning a tuple, both parts read only by a replayed module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        return 2 * y, -y


class Joins(nn.Module):
    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pair[0]) * torch.sigmoid(pair[1])


class TupleThenJoin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split, self.join = TupleNorm(), Joins()
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv2(self.join(self.split(x)))).flatten(1))


def _norm_calls(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> tuple[Any, Any, list[str]]:
    """Both ways of a check, and the BatchNorm modules that ran in the check with reuse, in order."""
    ran: list[str] = []
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, m in norms.items():  # counted in forward itself: a hook would make the module run anyway
        m.forward = lambda *args, name=name, inner=m.forward: ran.append(name) or inner(*args)
    try:
        fast = layer_randomization(model, x, "saliency", seed=3, **kwargs)
    finally:
        for m in norms.values():
            del m.forward
    slow = layer_randomization(model, x, "saliency", seed=3, reuse_activations=False, **kwargs)
    assert fast.reused_activations and fast.layers == slow.layers
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)
    return fast, slow, ran


@pytest.mark.parametrize("cls", [PooledInForward, PooledInModules])
def test_a_module_read_only_by_replayed_modules_does_not_run(cls: type) -> None:
    """A BatchNorm feeding a ReLU is not recorded (the graph does not save its output), but once the
    ReLU is replayed nothing reads it: it returns a stand-in instead of running. In the states of
    the layers after it, and in the verification pass at fc2, neither BatchNorm runs."""
    model, x = seeded_model(cls), torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _, _, ran = _norm_calls(model, x)
    # the memory probe and the recording pass: both; verification: none; states fc2, fc1: none;
    # bn2: bn2 (randomized) only; conv2: bn2; bn1: both; conv1: both.
    assert ran == ["bn1", "bn2"] * 2 + ["bn2", "bn2", "bn1", "bn2", "bn1", "bn2"]


def test_a_module_whose_output_is_read_elsewhere_or_aliased_still_runs() -> None:
    """bn1's output is also read by the parent's sum, so it runs in every state after it; bn2's
    only by relu2. A BatchNorm whose tensor an in-place ReLU returns is not replaced either."""
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _, _, ran = _norm_calls(seeded_model(ReadTwice), x)
    # the probe and the recording pass: both; the verification and the fc state: bn1 only; the
    # states bn2, conv2, bn1 and conv1: both.
    assert ran == ["bn1", "bn2"] * 2 + ["bn1"] * 2 + ["bn1", "bn2"] * 4
    _, _, ran = _norm_calls(seeded_model(InplaceAfterNorm), x)
    assert ran == ["bn"] * (2 + 1 + 4), "the probe, the recording, the verification and every state run it"


def test_a_module_returning_a_tuple_read_only_by_a_replayed_module_does_not_run() -> None:
    model, x = seeded_model(TupleThenJoin), torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _, _, ran = _norm_calls(model, x)
    # The probe, the recording pass, and the states of split.bn and split.conv: the whole of
    # "split" returns stand-ins once "join" is replayed.
    assert ran == ["split.bn"] * 4


def test_a_module_with_forward_hooks_runs_for_its_hooks() -> None:
    """A forward hook may keep the output (feature extraction): such a module always runs."""
    model, x = seeded_model(PooledInModules), torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    handle = model.bn1.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        _, _, ran = _norm_calls(model, x)
    finally:
        handle.remove()
    # the probe, the recording, the verification and the six states
    assert ran.count("bn1") == 9 and all(t.stride()[0] != 0 for t in seen)


class LateBranch(nn.Module):
    """bn1's output feeds relu1 only, as far as the recording pass sees; once conv2 is randomized a
    branch after it reads bn1's output again. Its stand-in (NaN) must not be what that reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 3)
        self.register_buffer("reference", self.conv2.weight.detach().clone())

    masked = False  # read bn1's output through a comparison, which hides a NaN (a reviewer's case)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        h = self.conv2(self.relu1(y))
        if not torch.equal(self.conv2.weight, self.reference):  # taken only in randomized states
            h = torch.where(y > 0, h, -h) if self.masked else h + y
        return self.fc(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_a_read_the_recording_pass_did_not_see_falls_back_to_a_full_pass(method: str, masked: bool) -> None:
    model, x = seeded_model(LateBranch), torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    model.masked = masked
    options = {"n_steps": 4} if method == "integrated_gradients" else {}
    fast = layer_randomization(model, x, method, seed=3, **options)
    slow = layer_randomization(model, x, method, seed=3, reuse_activations=False, **options)
    assert fast.reused_activations and fast.layers == slow.layers
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(fast.randomized_maps, slow.randomized_maps, rtol=0, atol=1e-5)


class Thresholds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act, self.gate = nn.ReLU(), GateOf()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.act(a)


class GateOf(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return (a > 0).to(a.dtype)  # a comparison: a NaN stand-in would not show


class GrandchildCalledDirectly(nn.Module):
    """bn's output is read by ``r`` (replayed once the cut passes it) and by ``r.gate``, which the
    parent calls itself, outside ``r``: it runs in every state, so bn must run too. A reviewer's
    case: consumers were judged by name (``r.gate`` is under the replayed ``r``), not by when the
    read happened."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn, self.r = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Thresholds()
        self.conv1, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv0(x))
        h = self.conv1(self.r(a)) * self.r.gate(a)
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_a_submodule_of_a_replayed_module_called_from_outside_it_still_reads_real_values(mode: str) -> None:
    model = seeded_model(GrandchildCalledDirectly)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _, _, ran = _norm_calls(model, x, mode=mode)
    assert len(ran) == 2 + 1 + 4, "the probe, the recording, the verification and all four states run bn"
