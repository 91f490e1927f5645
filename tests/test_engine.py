"""Time to verdict (adaptive image count, early exit), shared work (the session map cache), and the
engine's interface: one place that chooses it, one exception that makes it fall back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, SaliencyWarning, layer_randomization
from pytest_saliency.engine import CannotReplay, EngineError, Explanation, States, engine_for
from pytest_saliency.engine import replay as replay_module
from pytest_saliency.engine import stacks as stacks_module
from pytest_saliency.engine.replay import ForwardReplay, GradientReplay, ReplayEngine
from pytest_saliency.engine.stacks import StackEngine, StateStack
from pytest_saliency.core.fingerprint import model_fingerprint
from pytest_saliency.maps.cache import MapCache
from pytest_saliency.maps.explainers import prepare_method
from pytest_saliency.model.layers import select_layers


def ignore_model(model, inputs, target):
    return inputs.abs()


@pytest.fixture(scope="module")
def trained(digits):
    model, x, _ = digits
    return model, x[:96]


def test_adaptive_mode_stops_early_with_the_full_verdict(trained):
    model, x = trained
    full = layer_randomization(model, x, "saliency")
    auto = layer_randomization(model, x, "saliency", images="auto", image_batch=16)
    assert auto.passed == full.passed is True
    assert auto.n_images == 16 < full.n_images == 96  # S^I ~ 0.58 against 0.01: the first look decides
    assert "decisive pass after 16 of 96 images" in auto.stopped_early
    torch.testing.assert_close(torch.tensor(auto.ssim), torch.tensor(full.ssim)[:, :16])  # same images, same numbers


def test_adaptive_mode_fails_a_control_after_one_batch(trained):
    model, x = trained
    result = layer_randomization(model, x, ignore_model, images="auto", image_batch=16)
    assert not result.passed and result.n_images == 16
    assert "decisive fail" in result.report()


def test_early_exit_fails_fast_but_passes_only_on_all_images(trained):
    model, x = trained
    failing = layer_randomization(model, x, ignore_model, early_exit=True, image_batch=16)
    assert failing.n_images == 16 and not failing.passed
    passing = layer_randomization(model, x, "saliency", early_exit=True, image_batch=32)
    assert passing.n_images == 96 and passing.passed and passing.stopped_early == ""


def test_require_every_layer_decides_on_layers_too(trained):
    model, x = trained
    # bn2 sits near SSIM 0.99 on this model; with a strict SSIM threshold some layer is decisively insensitive.
    result = layer_randomization(model, x, "saliency", images="auto", image_batch=16, require_every_layer=True,
                                 ssim_threshold=0.5)
    assert not result.passed and result.n_images < 96


def test_an_int_caps_the_images(trained):
    model, x = trained
    assert layer_randomization(model, x, "saliency", images=10).n_images == 10
    with pytest.raises(SaliencyUsageError, match="images must be"):
        layer_randomization(model, x, "saliency", images="most")


def test_the_cache_shares_the_original_maps_between_checks():
    model, x = make_tiny_cnn(), tiny_images()
    cache = MapCache()
    ipr = layer_randomization(model, x, "integrated_gradients", n_steps=8, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    cpr = layer_randomization(model, x, "integrated_gradients", n_steps=8, mode="cascading", cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    uncached = layer_randomization(model, x, "integrated_gradients", n_steps=8, mode="cascading")
    assert cpr.ssim == uncached.ssim and ipr.passed
    layer_randomization(model, x, "integrated_gradients", n_steps=9, cache=cache)  # other options: a miss
    assert cache.misses == 2
    layer_randomization(model, x, lambda m, i, t: torch.autograd.grad(m(i.requires_grad_()).sum(), i)[0], cache=cache)
    assert cache.misses == 2 and len(cache) == 2, "user callables are never cached"


def test_the_fingerprint_sees_changed_and_permuted_weights():
    model = make_tiny_cnn()
    before = model_fingerprint(model)
    assert model_fingerprint(make_tiny_cnn()) == before
    with torch.no_grad():
        w = model.fc.weight
        flat = w.flatten().clone()
        w.copy_(flat.flip(0).reshape(w.shape))
    assert model_fingerprint(model) != before
    with torch.no_grad():
        model.fc.weight.copy_(flat.reshape(w.shape))
        model.bn.running_mean.add_(1e-3)
    assert model_fingerprint(model) != before


def test_the_fingerprint_sees_the_architecture_not_only_the_weights():
    """A variant with equal weights but another activation, or a flag that changes its forward
    pass, must not get the original's cached maps; a copy (or the model in train mode) shares them."""
    import copy

    model = make_tiny_cnn()
    before = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).train()) == before
    other = copy.deepcopy(model)
    other.relu1 = torch.nn.Tanh()
    assert model_fingerprint(other) != before
    flagged = copy.deepcopy(model)
    flagged.mc_dropout = True
    assert model_fingerprint(flagged) != before
    x, cache = tiny_images(4), MapCache()
    layer_randomization(model, x, "saliency", cache=cache)
    shared = layer_randomization(other, x, "saliency", cache=cache)
    assert shared.ssim == layer_randomization(other, x, "saliency").ssim and cache.hits == 0


def test_the_cache_is_bounded_in_bytes():
    cache = MapCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(str(i), torch.zeros(100))  # 400 bytes each
    assert len(cache) == 3 and cache.bytes == 1200
    assert cache.get("0") is None and cache.get("4") is not None
    cache.put("huge", torch.zeros(1000))
    assert cache.get("huge") is None


SMOOTHGRAD = {"nt_samples": 3}


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=2e-6)


@pytest.mark.parametrize("reuse", [True, False])
def test_image_batches_draw_each_images_noise_at_its_index(reuse, monkeypatch):
    """The adaptive modes explain image_batch images at a time and batch_size chunks them: image i
    keeps the SmoothGrad noise of its index in the inputs, so its maps and SSIMs are those of one
    pass over all images."""
    import pytest_saliency.checks.randomization as engine

    monkeypatch.setattr(engine, "_decision", lambda *args, **kwargs: None)  # never decisive: every batch runs
    model, x = make_tiny_cnn(), tiny_images(6, seed=3)
    full = layer_randomization(model, x, "smoothgrad", reuse_activations=reuse, keep_maps=6, **SMOOTHGRAD)
    chunked = layer_randomization(model, x, "smoothgrad", reuse_activations=reuse, keep_maps=6, batch_size=2,
                                  **SMOOTHGRAD)
    assert chunked.reused_activations == full.reused_activations == reuse  # per-chunk replays draw the same noise
    runs = [chunked] + [layer_randomization(model, x, "smoothgrad", image_batch=2, reuse_activations=reuse,
                                            keep_maps=6, **adaptive, **SMOOTHGRAD)
                        for adaptive in ({"images": "auto"}, {"images": 5, "early_exit": True})]
    for run in runs:
        n = run.n_images
        assert n >= 5
        close(run.original_maps, full.original_maps[:n])
        close(run.randomized_maps, full.randomized_maps[:, :n])
        close(run.ssim, torch.tensor(full.ssim)[:, :n])


class Gated(torch.nn.Module):
    """The tiny CNN with its output zeroed for a dark image: a blank image's maps are constant."""

    def __init__(self):
        super().__init__()
        self.net = make_tiny_cnn()

    def forward(self, x):
        return self.net(x) * (x.mean(dim=(1, 2, 3)) > 0.2).float()[:, None]


@pytest.mark.parametrize("reuse", [True, False])
def test_skipping_a_constant_map_leaves_the_other_images_numbers_alone(reuse):
    """constant_maps="skip" drops image 4 (blank); every other image keeps the maps and SSIMs it
    has when image 4 is an ordinary image: its draws come from its own index, not from its place
    among the images left."""
    model, x = Gated().eval(), tiny_images(6, seed=3)
    full = layer_randomization(model, x, "smoothgrad", reuse_activations=reuse, keep_maps=6, **SMOOTHGRAD)
    blank = x.clone()
    blank[4] = 0.0
    kept = [0, 1, 2, 3, 5]
    for batching in ({}, {"early_exit": True, "image_batch": 3}):  # image 4 in the only batch, or the second
        with pytest.warns(SaliencyWarning, match="left out"):
            skipped = layer_randomization(model, blank, "smoothgrad", constant_maps="skip", reuse_activations=reuse,
                                          keep_maps=6, **batching, **SMOOTHGRAD)
        assert skipped.n_images == 5
        close(skipped.original_maps, full.original_maps[kept])
        close(skipped.randomized_maps, full.randomized_maps[:, kept])
        close(skipped.ssim, torch.tensor(full.ssim)[:, kept])


# ---------------------------------------------------------------------------------------------
# The engine's interface: chosen in one place; CannotReplay, and nothing else, means "plain path".
# ---------------------------------------------------------------------------------------------

OPTIONS = {"saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 4},
           "occlusion": {"window": 4, "stride": 4}, "gradient_shap": {"n_samples": 3}}


def _stop(*args, **kwargs):
    raise CannotReplay("stopped by the test")


class EngineBug(Exception):
    """Stands for a bug in the engine's code."""


def _bug(*args, **kwargs):
    raise EngineBug("a bug in the engine")


def _forbidden(*args, **kwargs):
    raise AssertionError("reuse_activations=False must not construct this")


def _state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _same_state(model, before):
    return all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("method, where", [
    ("saliency", (GradientReplay, "record")),  # the recording, which is also the traced pass
    ("integrated_gradients", (GradientReplay, "original")),
    ("saliency", (GradientReplay, "replayed_logits")),  # the verification
    ("input_x_gradient", (GradientReplay, "maps")),  # every state
    ("occlusion", (stacks_module, "occlusion_states")),  # the stack: the loop over states runs
    ("occlusion", (ForwardReplay, "replayed_logits")),  # inside the stack: its full passes serve
], ids=["record", "original", "verify", "maps", "stack", "stack-replay"])
def test_cannot_replay_falls_back_to_the_plain_path_with_its_numbers(monkeypatch, method, where):
    model, x = make_tiny_cnn(), tiny_images(4)
    plain = layer_randomization(model, x, method, reuse_activations=False, **OPTIONS[method])
    monkeypatch.setattr(*where, _stop)
    result = layer_randomization(model, x, method, **OPTIONS[method])
    assert not result.reused_activations
    np.testing.assert_allclose(result.ssim, plain.ssim, rtol=0, atol=2e-6)
    torch.testing.assert_close(result.randomized_maps, plain.randomized_maps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, where", [
    ("saliency", (GradientReplay, "maps")),
    ("integrated_gradients", (GradientReplay, "original")),
    ("saliency", (replay_module, "state_cuts")),
    ("saliency", (replay_module, "weighted_checksum")),  # runs inside the model's forward pass (a callback)
    ("integrated_gradients", (replay_module, "weighted_checksum")),
    ("occlusion", (stacks_module, "occlusion_states")),
    ("occlusion", (StateStack, "_columns")),  # runs inside captum's call
], ids=["maps", "original", "cuts", "callback-traced", "callback", "stack", "stack-columns"])
def test_an_unexpected_error_in_the_engine_propagates_instead_of_falling_back(monkeypatch, method, where):
    model, x = make_tiny_cnn(), tiny_images(4)
    before = _state(model)
    monkeypatch.setattr(*where, _bug)
    with pytest.raises((EngineBug, EngineError)) as info:
        layer_randomization(model, x, method, **OPTIONS[method])
    cause = info.value if isinstance(info.value, EngineBug) else info.value.__cause__
    assert isinstance(cause, EngineBug)
    assert _same_state(model, before) and not any("forward" in m.__dict__ for m in model.modules())


class FailsOnceChanged(nn.Module):
    """The tiny CNN, with a bug of its own: it raises once conv2 differs from its trained weights
    (``always``: in every pass over more than one image, which the check's input validation,
    with one image, does not see)."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.net, self.always = make_tiny_cnn(), always
        self.register_buffer("trained", self.net.conv2.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.always and x.shape[0] > 1) or not torch.equal(self.net.conv2.weight, self.trained):
            raise ValueError("conv2 is not the trained layer")
        return self.net(x)


@pytest.mark.parametrize("always", [False, True], ids=["in-a-state", "every-pass"])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "occlusion"])
@pytest.mark.parametrize("reuse", [True, False])
def test_a_model_error_is_reported_as_the_models_own_with_reuse_as_without(method, reuse, always):
    """Under a replay the model's error stops the replay; the plain path meets it again and the
    user gets the model's own exception, not the engine's."""
    model = FailsOnceChanged(always).eval()
    with pytest.raises(ValueError, match="conv2 is not the trained layer") as info:
        layer_randomization(model, tiny_images(3), method, reuse_activations=reuse, **OPTIONS[method])
    assert type(info.value) is ValueError


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "occlusion"])
def test_reuse_activations_false_never_constructs_a_replay_or_a_stack(monkeypatch, method):
    for cls in (GradientReplay, ForwardReplay, ReplayEngine, StackEngine, StateStack):
        monkeypatch.setattr(cls, "__init__", _forbidden)
    result = layer_randomization(make_tiny_cnn(), tiny_images(3), method, reuse_activations=False, **OPTIONS[method])
    assert not result.reused_activations


def _explanation(model, x, method):
    resolved, name, options = prepare_method(method, model, x, dict(OPTIONS[method]))
    return Explanation(model, resolved, name, options, seed=0)


@pytest.mark.parametrize("method, kind", [("saliency", "replay"), ("integrated_gradients", "replay"),
                                          ("occlusion", "stack"), ("gradient_shap", "plain")])
def test_engine_for_is_the_one_place_that_chooses(method, kind):
    model, x = make_tiny_cnn(), tiny_images(3)
    for reuse in (True, False):
        engines = engine_for(model, x, _explanation(model, x, method), reuse_activations=reuse, step=3, batched=False)
        assert engines.kind == (kind if reuse else "plain")
        assert engines.trace.output.shape == (3, 3)
        engines.close()
        assert engines.recording is None


def test_a_check_refused_before_its_first_batch_releases_the_traced_recording(monkeypatch):
    # saliency over one batch: the traced pass is the replay's recording, which keeps its autograd
    # graph until a batch engine takes it; an unknown layer stops the check before any batch.
    from pytest_saliency.checks import randomization

    made = []

    def spy(*args, **kwargs):
        engines = engine_for(*args, **kwargs)
        made.append((engines, engines.recording))
        return engines

    monkeypatch.setattr(randomization, "engine_for", spy)
    with pytest.raises(SaliencyUsageError, match="unknown layer 'nope'"):
        layer_randomization(make_tiny_cnn(), tiny_images(3), "saliency", layers=["nope"])
    [(engines, recording)] = made
    assert isinstance(recording, GradientReplay)
    assert engines.recording is None
    assert recording._out is None and not recording.recorded  # the graph and the outputs are dropped


@pytest.mark.parametrize("reuse", [True, False])
def test_a_batch_left_in_a_cascading_state_puts_the_model_back_when_it_closes(reuse):
    model, x = make_tiny_cnn(), tiny_images(3)
    before = _state(model)
    engines = engine_for(model, x, _explanation(model, x, "saliency"), reuse_activations=reuse, step=3, batched=False)
    states = States(select_layers(model, x, trace=engines.trace), "cascading", "reinit", 0)
    for batch in engines.batches(states, engines.trace.output.argmax(1)):
        with batch:
            assert batch.original().shape == x.shape
            for index, raw in batch.state_maps():
                assert raw.shape == x.shape
                if index == 1:
                    break  # two layers randomized, and still entered
            assert not _same_state(model, before)
        assert _same_state(model, before)
