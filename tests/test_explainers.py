"""explain(): every method by name, targets, seeds, options, and leaving the model alone."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import METHODS, SaliencyUsageError, SaliencyWarning, explain, layer_randomization
from pytest_saliency.maps.targets import last_conv_layer, resolve_target

FAST = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"nt_samples": 4}, "lime": {"n_samples": 30, "alpha": 1e-3},
        "kernel_shap": {"n_samples": 30}, "gradient_shap": {"n_samples": 4}, "meaningful_perturbation": {"n_iter": 5}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_finite_maps_of_the_input_shape(method, tiny_model, tiny_inputs):
    raw = explain(tiny_model, tiny_inputs, method, **FAST.get(method, {}))
    expected = (6, 1, 16, 16)
    assert tuple(raw.shape) == expected
    assert torch.isfinite(raw).all()
    maps = explain(tiny_model, tiny_inputs, method, preset="adebayo2018", **FAST.get(method, {}))
    assert tuple(maps.shape) == (6, 16, 16)
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if spec.stochastic))
def test_stochastic_methods_are_bit_reproducible_and_leave_global_rngs_alone(method, tiny_model, tiny_inputs):
    torch_state, np_state, py_state = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    a = explain(tiny_model, tiny_inputs, method, seed=3, **FAST.get(method, {}))
    b = explain(tiny_model, tiny_inputs, method, seed=3, **FAST.get(method, {}))
    c = explain(tiny_model, tiny_inputs, method, seed=4, **FAST.get(method, {}))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


def test_saliency_is_the_signed_gradient_of_the_predicted_logit(tiny_model, tiny_inputs):
    x = tiny_inputs.clone().requires_grad_()
    logits = tiny_model(x)
    target = logits.argmax(1)
    expected = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)[0]
    got = explain(tiny_model, tiny_inputs, "saliency")
    torch.testing.assert_close(got, expected)
    assert (got < 0).any(), "saliency keeps the sign; abs is the preset's job"


def test_targets_int_tensor_and_predicted(tiny_model, tiny_inputs):
    predicted = tiny_model(tiny_inputs).argmax(1)
    assert torch.equal(resolve_target(tiny_model, tiny_inputs, None), predicted)
    assert resolve_target(tiny_model, tiny_inputs, 2).tolist() == [2] * 6
    explicit = torch.tensor([0, 1, 2, 0, 1, 2])
    by_tensor = explain(tiny_model, tiny_inputs, "saliency", target=explicit)
    by_loop = torch.cat([explain(tiny_model, tiny_inputs[i:i + 1], "saliency", target=int(t)) for i, t in enumerate(explicit)])
    torch.testing.assert_close(by_tensor, by_loop)
    for bad in (1.5, torch.zeros(6), torch.zeros(4, dtype=torch.long), "cat"):
        with pytest.raises(SaliencyUsageError, match="target must be"):
            explain(tiny_model, tiny_inputs, "saliency", target=bad)


def test_batch_size_splits_work_without_changing_deterministic_maps(tiny_model, tiny_inputs):
    whole = explain(tiny_model, tiny_inputs, "integrated_gradients", n_steps=8)
    split = explain(tiny_model, tiny_inputs, "integrated_gradients", n_steps=8, batch_size=4)
    torch.testing.assert_close(whole, split)


def test_a_user_callable_is_a_method(tiny_model, tiny_inputs):
    seen = {}

    def mine(model, inputs, target):
        seen["target"] = target
        return inputs * 2

    out = explain(tiny_model, tiny_inputs, mine)
    assert torch.equal(out, tiny_inputs * 2)
    assert torch.equal(seen["target"], tiny_model(tiny_inputs).argmax(1))
    with pytest.raises(SaliencyUsageError, match="functools.partial"):
        explain(tiny_model, tiny_inputs, mine, n_steps=3)


def test_layer_methods_use_the_last_conv_or_a_named_layer(tiny_model, tiny_inputs):
    assert last_conv_layer(tiny_model)[0] == "conv2"
    default = explain(tiny_model, tiny_inputs, "gradcam")
    named = explain(tiny_model, tiny_inputs, "gradcam", layer="conv2")
    other = explain(tiny_model, tiny_inputs, "gradcam", layer="conv1")
    assert torch.equal(default, named) and not torch.equal(default, other)
    with pytest.raises(SaliencyUsageError, match="conv1"):
        explain(tiny_model, tiny_inputs, "gradcam", layer="conv9")
    mlp = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(SaliencyUsageError, match="no nn.Conv2d"):
        explain(mlp, torch.rand(2, 4), "gradcam")


def test_unknown_method_and_option_name_the_valid_ones(tiny_model, tiny_inputs):
    with pytest.raises(SaliencyUsageError, match="Did you mean 'integrated_gradients'"):
        explain(tiny_model, tiny_inputs, "integrated_gradient")
    with pytest.raises(SaliencyUsageError, match="valid options: .*n_steps"):
        explain(tiny_model, tiny_inputs, "integrated_gradients", steps=10)
    with pytest.raises(SaliencyUsageError, match="valid options: abs"):
        explain(tiny_model, tiny_inputs, "saliency", n_steps=10)


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_relu_rule_methods_warn_when_the_model_has_no_relu_modules(tiny_inputs):
    with pytest.warns(SaliencyWarning, match="no nn.ReLU module"):
        explain(FunctionalReLU(), tiny_inputs, "guided_backprop")


def test_explaining_restores_modes_and_gradient_flags(tiny_inputs):
    model = make_tiny_cnn().train()
    model.fc.weight.requires_grad_(False)
    explain(model, tiny_inputs, "saliency")
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [n != "fc.weight" for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_used_unless_disabled():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.9), nn.Linear(8, 2)).train()
    x = torch.rand(3, 4)
    assert torch.equal(explain(model, x, "saliency", target=0), explain(model, x, "saliency", target=0))
    with torch.random.fork_rng():
        noisy = explain(model, x, "saliency", target=0, eval_mode=False, seed=1)
    assert not torch.equal(noisy, explain(model, x, "saliency", target=0))


def test_feature_vectors_are_supported():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    x = tiny_images(4).flatten(1)[:, :10]
    for method in ("saliency", "integrated_gradients", "occlusion", "feature_ablation", "lime"):
        out = explain(model, x, method, **FAST.get(method, {}))
        assert tuple(out.shape) == (4, 10)


def test_expensive_methods_are_batched_to_the_memory_budget(tiny_model, tiny_inputs):
    from pytest_saliency.maps.batching import activation_bytes_per_input
    from pytest_saliency.maps.explainers import resolved_options
    from pytest_saliency.maps.methods import METHODS

    row = 3 * activation_bytes_per_input(tiny_model, tiny_inputs[:1])
    options = resolved_options(METHODS["integrated_gradients"], tiny_model, tiny_inputs, {"memory_budget": 4 * row})
    assert options["_image_batch"] == 4 and options["internal_batch_size"] == 4
    # SmoothGrad explains one image at a time: the budget sizes its samples per pass, whatever the
    # number of images, and the image chunk says how many images' samples fit in one pass (the replay)
    options = resolved_options(METHODS["smoothgrad"], tiny_model, tiny_inputs, {"memory_budget": 12 * row})
    assert options["nt_samples_batch_size"] == 12 and options["_image_batch"] == 1
    options = resolved_options(METHODS["smoothgrad"], tiny_model, tiny_inputs[:2], {"memory_budget": 12 * row})
    assert options["nt_samples_batch_size"] == 12
    options = resolved_options(METHODS["smoothgrad"], tiny_model, tiny_inputs, {"memory_budget": 12 * row,
                                                                             "nt_samples": 4})
    assert options["nt_samples_batch_size"] == 4 and options["_image_batch"] == 3
    options = resolved_options(METHODS["occlusion"], tiny_model, tiny_inputs, {"perturbations_per_eval": 3})
    assert options["perturbations_per_eval"] == 3, "what the user sets is kept"
    small = explain(tiny_model, tiny_inputs, "integrated_gradients", n_steps=8, memory_budget=2 * row)
    torch.testing.assert_close(small, explain(tiny_model, tiny_inputs, "integrated_gradients", n_steps=8))
    with pytest.raises(SaliencyUsageError, match="memory_budget must be"):
        explain(tiny_model, tiny_inputs, "occlusion", memory_budget=-1)


def test_the_memory_probe_runs_once_per_model_and_input_shape(monkeypatch, tiny_inputs):
    """The one-image probe that sizes batches is remembered per model object, input shape, dtype
    and device, and the module objects the model is made of; a model that changed any of these is
    probed again, and a model's entries go with the model."""
    import gc
    import weakref

    from pytest_saliency.maps import batching

    probes = []
    real = batching._probe_activation_bytes
    monkeypatch.setattr(batching, "_probe_activation_bytes", lambda m, x: probes.append(1) or real(m, x))
    model = make_tiny_cnn()
    first = batching.activation_bytes_per_input(model, tiny_inputs[:1])
    assert batching.activation_bytes_per_input(model, tiny_inputs[:2]) == first and len(probes) == 1
    explain(model, tiny_inputs, "integrated_gradients", n_steps=4)
    layer_randomization(model, tiny_inputs, "saliency")
    assert len(probes) == 1
    model.fc = nn.Linear(4 * 16 * 16, 30)  # another module object: probed again
    assert batching.activation_bytes_per_input(model, tiny_inputs[:1]) > first and len(probes) == 2
    convolution = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())  # takes any input size
    small = batching.activation_bytes_per_input(convolution, torch.rand(1, 1, 8, 8))
    assert batching.activation_bytes_per_input(convolution, torch.rand(1, 1, 8, 16)) > small
    convolution.double()  # the same module objects, another dtype
    assert batching.activation_bytes_per_input(convolution, torch.rand(1, 1, 8, 8).double()) == 2 * small
    assert len(probes) == 5
    upsampling = nn.Sequential(nn.Upsample(scale_factor=1), nn.Conv2d(1, 2, 3))
    one = batching.activation_bytes_per_input(upsampling, torch.rand(1, 1, 8, 8))
    upsampling[0].scale_factor = 4.0  # a setting that changes every output size after it
    assert batching.activation_bytes_per_input(upsampling, torch.rand(1, 1, 8, 8)) > 10 * one
    upsampling[1].weight = nn.Parameter(torch.randn(2, 1, 5, 5))  # a parameter of another shape
    batching.activation_bytes_per_input(upsampling, torch.rand(1, 1, 8, 8))
    assert len(probes) == 8
    assert model in batching._PROBED
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the remembered probe must not keep a model alive"


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift"])
def test_a_uniform_baseline_is_seeded_and_leaves_the_global_rngs_alone(tiny_model, tiny_inputs, method):
    state = torch.random.get_rng_state().clone()
    first = explain(tiny_model, tiny_inputs, method, baselines="uniform", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(12345)  # whatever the global generator holds, the seed decides the baseline
    try:
        again = explain(tiny_model, tiny_inputs, method, baselines="uniform", seed=3)
        other = explain(tiny_model, tiny_inputs, method, baselines="uniform", seed=4)
    finally:
        torch.random.set_rng_state(state)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("method", ["saliency", "guided_backprop", "gradient_shap"])
def test_every_method_explains_in_chunks_when_the_memory_budget_is_small(tiny_model, tiny_inputs, method):
    from pytest_saliency.maps.explainers import prepare_method

    _, _, options = prepare_method(method, tiny_model, tiny_inputs, {"memory_budget": 1})
    assert options["_image_batch"] == 1  # one image at a time: a byte of budget fits nothing more
    _, _, roomy = prepare_method(method, tiny_model, tiny_inputs, {})
    assert "_image_batch" not in roomy
    chunked = explain(tiny_model, tiny_inputs, method, memory_budget=1)
    torch.testing.assert_close(chunked, explain(tiny_model, tiny_inputs, method), rtol=1e-5, atol=1e-6)


def test_deeplift_on_a_module_called_twice_is_a_usage_error_that_names_it():
    from test_activation_reuse import make_residual

    with pytest.raises(SaliencyUsageError, match=r"deeplift cannot explain this model: the module ReLU\(inplace=True\) "
                                                 r"is called more than once .* one nn.ReLU per activation"):
        explain(make_residual(), tiny_images(2), "deeplift")


def test_a_target_out_of_the_models_classes_is_a_usage_error(tiny_model, tiny_inputs):
    """captum would index the logits with it: an IndexError for 5 of 3 classes, and a silent pick
    of the last class for -1."""
    for bad in (5, 3, -1, torch.tensor([0, 1, 2, 0, 1, 3]), torch.tensor([0, 1, -1, 0, 1, 2])):
        with pytest.raises(SaliencyUsageError, match=r"out of range: the model has 3 output classes.*0 to 2"):
            explain(tiny_model, tiny_inputs, "saliency", target=bad)
    with pytest.raises(SaliencyUsageError, match="out of range"):
        layer_randomization(tiny_model, tiny_inputs, "saliency", target=5)
    for bad in (torch.zeros(5, dtype=torch.long), torch.zeros(6), torch.ones(6, dtype=torch.bool), 2.0):
        with pytest.raises(SaliencyUsageError, match=r"target must be .* integer tensor of shape \(6,\)"):
            explain(tiny_model, tiny_inputs, "saliency", target=bad)
    assert explain(tiny_model, tiny_inputs, "saliency", target=torch.tensor([2])).shape == tiny_inputs.shape


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, "2", True])
def test_a_batch_size_that_is_not_a_positive_int_is_a_usage_error(tiny_model, tiny_inputs, batch_size):
    with pytest.raises(SaliencyUsageError, match=r"batch_size must be an int >= 1 or None"):
        explain(tiny_model, tiny_inputs, "saliency", batch_size=batch_size)
    with pytest.raises(SaliencyUsageError, match=r"batch_size must be an int >= 1 or None"):
        explain(tiny_model, tiny_inputs, "smoothgrad", nt_samples=2, batch_size=batch_size)


@pytest.mark.parametrize("method, option, value", [
    ("integrated_gradients", "n_steps", 0),
    ("integrated_gradients", "n_steps", -3),
    ("integrated_gradients", "internal_batch_size", 0),
    ("integrated_gradients", "integration_method", "simpson"),
    ("smoothgrad", "nt_samples", 0),
    ("smoothgrad", "nt_samples_batch_size", -1),
    ("smoothgrad", "noise_level", -0.1),
    ("smoothgrad", "noise_level", float("nan")),
    ("smoothgrad", "input_range", 0.0),
    ("gradient_shap", "n_samples", 0),
    ("gradient_shap", "n_baselines", 0),
    ("lime", "n_samples", 0),
    ("lime", "alpha", 0.0),
    ("kernel_shap", "grid", 0),
    ("occlusion", "window", 0),
    ("occlusion", "perturbations_per_eval", 0),
    ("feature_ablation", "baselines", "noise"),
    ("gradcam", "relu_attributions", "yes"),
])
def test_method_options_are_checked_before_captum_runs(tiny_model, tiny_inputs, method, option, value):
    """The rules the sweeps use (pytest_saliency.maps.options), for every entry point."""
    with pytest.raises(SaliencyUsageError, match=rf"options for {method}: hyperparameter '{option}' must be"):
        explain(tiny_model, tiny_inputs, method, **{option: value})
    with pytest.raises(SaliencyUsageError, match=rf"hyperparameter '{option}' must be"):
        layer_randomization(tiny_model, tiny_inputs, method, **{option: value})


def test_documented_none_defaults_may_be_passed_explicitly(tiny_model, tiny_inputs):
    explain(tiny_model, tiny_inputs[:2], "occlusion", window=None, stride=None, perturbations_per_eval=None)
    explain(tiny_model, tiny_inputs[:2], "integrated_gradients", n_steps=4, internal_batch_size=None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_inputs_of_another_dtype_than_the_model_are_a_usage_error(tiny_model, tiny_inputs, dtype):
    with pytest.raises(SaliencyUsageError, match=rf"inputs are {dtype} but the model's parameters are torch.float32"):
        explain(tiny_model, tiny_inputs.to(dtype), "saliency")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap"])
def test_half_precision_models_work_with_noise_methods(dtype, method):
    """captum adds float32 noise; the model still sees its own dtype, and the maps are finite."""
    model, x = make_tiny_cnn().to(dtype), tiny_images(3).to(dtype)
    maps = explain(model, x, method, seed=2, **FAST[method])
    assert maps.shape == x.shape and torch.isfinite(maps).all() and (maps != 0).any()
    reference = explain(make_tiny_cnn(), tiny_images(3), method, seed=2, **FAST[method])
    assert torch.nn.functional.cosine_similarity(maps.float().flatten(1), reference.flatten(1)).min() > 0.9
    assert all(p.dtype == dtype for p in model.parameters())


def test_a_model_or_inputs_on_the_meta_device_are_a_usage_error(tiny_inputs):
    meta_model = make_tiny_cnn().to("meta")
    for model, inputs in ((meta_model, tiny_inputs.to("meta")), (meta_model, tiny_inputs),
                          (make_tiny_cnn(), tiny_inputs.to("meta"))):
        with pytest.raises(SaliencyUsageError, match="meta device"):
            explain(model, inputs, "saliency")


class _IgnoresItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ones(x.shape[0], 4))


class _DetachesItsInput(nn.Module):
    def __init__(self, no_grad: bool = False) -> None:
        super().__init__()
        self.no_grad = no_grad
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 14 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.no_grad:
            with torch.no_grad():
                return self.fc(self.conv(x).flatten(1))
        return self.fc(self.conv(x.detach()).flatten(1))


@pytest.mark.parametrize("model", [_IgnoresItsInput(), _DetachesItsInput(), _DetachesItsInput(no_grad=True)],
                         ids=["unused", "detach", "no_grad"])
def test_a_model_whose_output_has_no_autograd_path_to_the_input_is_a_usage_error(model, tiny_inputs):
    from pytest_saliency import agreement_matrix

    message = r"the model's output does not depend on the input through autograd .*detach.*no_grad.*cannot explain it"
    for method, options in (("saliency", {}), ("integrated_gradients", {"n_steps": 4}), ("smoothgrad", {"nt_samples": 2})):
        with pytest.raises(SaliencyUsageError, match=message):
            explain(model, tiny_inputs, method, **options)
    with pytest.raises(SaliencyUsageError, match=message):
        layer_randomization(model, tiny_inputs, "saliency")
    with pytest.raises(SaliencyUsageError, match=message):
        agreement_matrix(model, tiny_inputs, ["saliency", "input_x_gradient"])


def test_a_target_on_the_meta_device_is_a_usage_error(tiny_model, tiny_inputs):
    target = torch.zeros(tiny_inputs.shape[0], dtype=torch.long, device="meta")
    with pytest.raises(SaliencyUsageError, match=r"target is on the meta device.*target=.*on the inputs' device"):
        explain(tiny_model, tiny_inputs, "saliency", target=target)
    with pytest.raises(SaliencyUsageError, match="target is on the meta device"):
        layer_randomization(tiny_model, tiny_inputs, "saliency", target=target)


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "occlusion", "feature_ablation"])
def test_baselines_that_do_not_broadcast_to_the_inputs_are_a_usage_error(tiny_model, tiny_inputs, method):
    options = FAST.get(method, {})
    n = tiny_inputs.shape[0]
    for bad in (torch.zeros(n - 1, 1, 16, 16), torch.zeros(1, 16), torch.zeros(2, 5), torch.zeros(1, 1, 8, 8)):
        with pytest.raises(SaliencyUsageError, match=rf"baselines for {method} has shape {re.escape(str(tuple(bad.shape)))}.*"
                                                     r"\(6, 1, 16, 16\).*\(1, 16, 16\).*scalar"):
            explain(tiny_model, tiny_inputs, method, baselines=bad, **options)
    with pytest.raises(SaliencyUsageError, match=r"baselines for .* are torch.float64 .* inputs are torch.float32"):
        explain(tiny_model, tiny_inputs, method, baselines=torch.zeros(1, 16, 16, dtype=torch.float64), **options)
    with pytest.raises(SaliencyUsageError, match=r"baselines for .* on the meta device"):
        explain(tiny_model, tiny_inputs, method, baselines=torch.zeros(1, 16, 16, device="meta"), **options)
    with pytest.raises(SaliencyUsageError, match="baselines"):
        layer_randomization(tiny_model, tiny_inputs, method, baselines=torch.zeros(2, 5), **options)
    # every shape that broadcasts gives the maps of the zero baseline, in chunks too
    reference = explain(tiny_model, tiny_inputs, method, baselines="zero", **options)
    for good in (torch.zeros(1, 16, 16), torch.zeros(1, 1, 16, 16), torch.zeros(n, 1, 16, 16), torch.tensor(0.0)):
        for batch_size in (None, 4):
            got = explain(tiny_model, tiny_inputs, method, baselines=good, batch_size=batch_size, **options)
            torch.testing.assert_close(got, reference)
    # a baseline per input is used for its own input, whatever the chunking
    per_input = tiny_inputs.flip(0)
    whole = explain(tiny_model, tiny_inputs, method, baselines=per_input, **options)
    torch.testing.assert_close(explain(tiny_model, tiny_inputs, method, baselines=per_input, batch_size=4, **options),
                               whole)
    torch.testing.assert_close(explain(tiny_model, tiny_inputs[4:], method, baselines=per_input[4:], **options),
                               whole[4:])


def test_occlusion_windows_and_strides_larger_than_the_inputs_are_a_usage_error(tiny_model, tiny_inputs):
    with pytest.raises(SaliencyUsageError, match=r"occlusion's window=100 .* 16x16 inputs.* largest allowed is 16"):
        explain(tiny_model, tiny_inputs, "occlusion", window=100)
    with pytest.raises(SaliencyUsageError, match=r"occlusion's stride=100 .* window .* largest allowed is 2"):
        explain(tiny_model, tiny_inputs, "occlusion", stride=100)
    with pytest.raises(SaliencyUsageError, match=r"occlusion's window=\(1, 100, 100\) .* \(1, 16, 16\)"):
        explain(tiny_model, tiny_inputs, "occlusion", window=(1, 100, 100), stride=(1, 2, 2))
    with pytest.raises(SaliencyUsageError, match=r"occlusion's window=\(1, 4\) .* 3 entries"):
        explain(tiny_model, tiny_inputs, "occlusion", window=(1, 4))
    with pytest.raises(SaliencyUsageError, match="occlusion's window=100"):
        layer_randomization(tiny_model, tiny_inputs, "occlusion", window=100)
    assert explain(tiny_model, tiny_inputs[:2], "occlusion", window=16, stride=16).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_gradcam_on_a_layer_without_spatial_output_is_a_usage_error(tiny_model, tiny_inputs, method):
    message = rf"{method}: the layer 'fc' .*output of shape \(6, 3\).*conv layer whose output is \(N, C, H, W\)"
    with pytest.raises(SaliencyUsageError, match=message):
        explain(tiny_model, tiny_inputs, method, layer="fc")
    with pytest.raises(SaliencyUsageError, match=r"the layer Linear\(.*\) .*output of shape"):
        explain(tiny_model, tiny_inputs, method, layer=tiny_model.fc)
    with pytest.raises(SaliencyUsageError, match=r"the layer 'fc'"):
        layer_randomization(tiny_model, tiny_inputs, method, layer="fc")
    assert not tiny_model.fc._forward_hooks


def test_gradcam_on_a_layer_the_output_does_not_use_is_a_usage_error(tiny_inputs):
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.unused, self.fc = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3), nn.Linear(2 * 14 * 14, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(SaliencyUsageError, match=r"gradcam cannot explain this model: the model's output does not "
                                                 r"depend on the input or the chosen layer's activations.*layer="):
        explain(SideBranch(), tiny_inputs, "gradcam", layer="unused")


def test_inputs_the_model_cannot_take_are_a_usage_error_naming_the_shape():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(SaliencyUsageError, match=r"raised RuntimeError on one input of shape \(1, 1, 8, 8\)") as info:
        explain(model, torch.rand(4, 1, 8, 8), "saliency")
    assert isinstance(info.value.__cause__, RuntimeError)
