"""Ensembles (Ley et al.): the averaging module, weight-perturbation ensembles, consistency vs size.

Models are the digits MLPs of ``test_consistency.py`` (memoized per process, so the two files
train them once).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, explain
from pytest_saliency.checks.consistency import explanation_consistency
from pytest_saliency.checks.ensembles import (
    Ensemble,
    EnsembleSizeResult,
    consistency_vs_ensemble_size,
    ensemble,
    first_parameterized_layer,
    perturbed_ensemble,
)
from test_consistency import (
    MLP,
    TupleOutput,
    assert_same_rng,
    assert_unchanged,
    rng_states,
    snapshot,
    test_inputs,
    trained_mlp,
)

# ------------------------------------------------------------------------------------------
# The ensemble module
# ------------------------------------------------------------------------------------------


def test_ensemble_returns_the_log_of_the_averaged_probabilities():
    x, _ = test_inputs(30)
    members = [trained_mlp(s) for s in range(3)]
    out = ensemble(members)(x)
    mean_probs = torch.stack([m(x).softmax(dim=1) for m in members]).mean(dim=0)
    assert torch.allclose(out.exp(), mean_probs, atol=1e-6)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(30), atol=1e-5)
    assert torch.equal(out.argmax(dim=1), mean_probs.argmax(dim=1))
    logits = ensemble(members, how="logits")(x)
    assert torch.allclose(logits, torch.stack([m(x) for m in members]).mean(dim=0), atol=1e-6)
    assert "how='average', n=3" in repr(ensemble(members))


def test_ensemble_maps_are_the_probability_average_maps_up_to_a_positive_scale():
    """d log(p_bar) / dx = (d p_bar / dx) / p_bar and d p_bar / dx is the mean of the member gradients."""
    x, _ = test_inputs(20)
    members = [trained_mlp(s) for s in range(3)]
    target = ensemble(members)(x).argmax(dim=1)
    maps = explain(ensemble(members), x, "saliency", target=target)

    xg = x.clone().requires_grad_(True)
    p_bar = torch.stack([m(xg).softmax(dim=1) for m in members]).mean(dim=0)
    picked = p_bar.gather(1, target[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(picked.sum(), xg)
    expected = grad / picked.detach()[:, None]
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-7)


def test_ensemble_holds_members_by_reference_and_changes_nothing():
    members = [trained_mlp(0), trained_mlp(1)]
    before = [snapshot(m) for m in members]
    rng = rng_states()
    ens = ensemble({"a": members[0], "b": members[1]})
    assert ens.members[0] is members[0] and ens.members[1] is members[1]
    x, _ = test_inputs(12)
    ens(x)
    explain(ens, x, "smoothgrad", nt_samples=3)
    explain(ens, x, "integrated_gradients")
    for snap, member in zip(before, members):
        assert_unchanged(snap, member)
    assert_same_rng(rng)
    assert ens.training  # explain() restored the wrapper's own mode too


def test_ensemble_works_on_image_models_and_through_every_check():
    from pytest_saliency import layer_randomization

    ens = ensemble([make_tiny_cnn(0), make_tiny_cnn(1)])
    result = layer_randomization(ens, tiny_images(4), "saliency", mode="cascading")
    assert len(result.layers) >= 6  # the layers of both members are randomized


def test_ensemble_bad_input():
    with pytest.raises(SaliencyUsageError, match="at least one member"):
        ensemble([])
    with pytest.raises(SaliencyUsageError, match="ensemble member 1: model must be a torch.nn.Module"):
        ensemble([trained_mlp(0), "weights.pt"])
    with pytest.raises(SaliencyUsageError, match="unknown ensemble method 'majority'.*gradients are zero"):
        ensemble([trained_mlp(0)], how="majority")
    with pytest.raises(SaliencyUsageError, match="list of nn.Modules"):
        ensemble("model")
    mixed = ensemble([trained_mlp(0), MLP(classes=5)])
    x, _ = test_inputs(4)
    with pytest.raises(SaliencyUsageError, match=r"ensemble member 1 returned shape \(4, 5\) but member 0 returned \(4, 10\)"):
        mixed(x)
    assert isinstance(ensemble(trained_mlp(0)), Ensemble)  # a single model is a one-member ensemble


# ------------------------------------------------------------------------------------------
# Weight-perturbation ensembles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameter", ["weight", "bias", "both"])
def test_perturbed_ensemble_perturbs_one_layer_of_copies_and_never_the_original(parameter):
    model = trained_mlp(0)
    before = snapshot(model)
    rng = rng_states()
    ens = perturbed_ensemble(model, sigma=0.2, n=6, parameter=parameter, seed=3)
    assert_same_rng(rng)
    assert_unchanged(before, model)
    assert len(ens.members) == 6
    changed = {"weight": {"fc1.weight"}, "bias": {"fc1.bias"}, "both": {"fc1.weight", "fc1.bias"}}[parameter]
    deltas = []
    for member in ens.members:
        assert member is not model
        for name, value in member.state_dict().items():
            differs = not torch.equal(value, before["state"][name])
            assert differs == (name in changed), name
            if name in changed:
                deltas.append(value - before["state"][name])
    noise = torch.cat([d.flatten() for d in deltas])
    assert noise.std().item() == pytest.approx(0.2, rel=0.15)
    again = perturbed_ensemble(model, sigma=0.2, n=6, parameter=parameter, seed=3)
    other = perturbed_ensemble(model, sigma=0.2, n=6, parameter=parameter, seed=4)
    name = sorted(changed)[0]
    assert torch.equal(again.members[2].state_dict()[name], ens.members[2].state_dict()[name])
    assert not torch.equal(other.members[2].state_dict()[name], ens.members[2].state_dict()[name])
    assert not torch.equal(ens.members[0].state_dict()[name], ens.members[1].state_dict()[name])


def test_perturbed_ensemble_of_several_models_and_the_original():
    models = [trained_mlp(0), trained_mlp(1)]
    ens = perturbed_ensemble(models, layer="fc2", sigma=0.01, n=3, include_original=True)
    assert len(ens.members) == 8
    assert ens.members[0] is models[0] and ens.members[4] is models[1]
    assert torch.equal(ens.members[1].fc1.weight, models[0].fc1.weight)
    assert not torch.equal(ens.members[1].fc2.weight, models[0].fc2.weight)
    assert first_parameterized_layer(models[0]) == "fc1"
    assert first_parameterized_layer(make_tiny_cnn()) == "conv1"


def test_first_layer_bias_perturbation_raises_agreement_at_equal_accuracy():
    """Ley et al. 4.1: perturbing the first layer's biases raises sign agreement between models of
    different seeds while test accuracy stays within 1%."""
    x, y = test_inputs()
    models = [trained_mlp(s) for s in range(4)]
    single = explanation_consistency([ensemble([m]) for m in models], x, map_shape=(8, 8))
    perturbed = [perturbed_ensemble(m, sigma=1.0, n=20, parameter="bias", seed=i) for i, m in enumerate(models)]
    result = explanation_consistency(perturbed, x, map_shape=(8, 8))
    assert result.value("sign_agreement") > single.value("sign_agreement") + 0.02  # measured 0.29 -> 0.34
    for model, pert in zip(models, perturbed):
        with torch.no_grad():
            before = (model(x).argmax(1) == y).double().mean()
            after = (pert(x).argmax(1) == y).double().mean()
        assert after >= before - 0.01


def test_perturbed_ensemble_bad_input():
    model = trained_mlp(0)
    with pytest.raises(SaliencyUsageError, match="unknown layer 'fc9'"):
        perturbed_ensemble(model, layer="fc9")
    no_bias = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(SaliencyUsageError, match="layer '0' \\(Linear\\) has no bias to perturb"):
        perturbed_ensemble(no_bias, parameter="bias")
    with pytest.raises(SaliencyUsageError, match="n must be a positive int"):
        perturbed_ensemble(model, n=0)
    with pytest.raises(SaliencyUsageError, match="sigma must be a finite number with 0 <= sigma, got -0.1"):
        perturbed_ensemble(model, sigma=-0.1)
    with pytest.raises(SaliencyUsageError, match="sigma must be a finite number with 0 <= sigma, got nan"):
        perturbed_ensemble(model, sigma=math.nan)
    with pytest.raises(SaliencyUsageError, match="unknown parameter 'weights'"):
        perturbed_ensemble(model, parameter="weights")
    with pytest.raises(SaliencyUsageError, match="non-empty list"):
        perturbed_ensemble([])


# ------------------------------------------------------------------------------------------
# Consistency against ensemble size
# ------------------------------------------------------------------------------------------


def test_ensembles_of_several_seeds_are_more_consistent_than_single_models():
    x, _ = test_inputs()
    models = [trained_mlp(s) for s in range(8)]
    result = consistency_vs_ensemble_size(models, x, sizes=(1, 2, 4), metrics=("sign_agreement", "ssim"), map_shape=(8, 8))
    assert isinstance(result, EnsembleSizeResult)
    assert [(r.size, r.n_ensembles, r.n_pairs) for r in result.rows] == [(1, 8, 28), (2, 4, 6), (4, 2, 1)]
    agreement = result.series("sign_agreement")
    assert agreement[0] < agreement[1] < agreement[2], result.report()
    assert result.gain("sign_agreement") > 0.1
    assert result.series("ssim")[2] > result.series("ssim")[0]
    assert result.target_mode == "ensemble"
    assert result.results[4].pairs[0].a == "model0+model1+model2+model3"
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert [row["size"] for row in data["rows"]] == [1, 2, 4]
    assert "size 4: C" in result.summary() and "disjoint ensembles" in result.report()


def test_consistency_vs_ensemble_size_from_a_factory(tmp_path):
    calls = []

    def train(seed: int) -> MLP:
        calls.append(seed)
        return trained_mlp(seed)

    x, y = test_inputs(60)
    result = consistency_vs_ensemble_size(train, x, sizes=(2, 1), seeds=[0, 1, 2, 3], cache=tmp_path, build=MLP, target=y)
    assert calls == [0, 1, 2, 3] and result.target_mode == "given"
    assert [r.size for r in result.rows] == [1, 2]
    assert result.results[2].models == ["seed=0+seed=1", "seed=2+seed=3"]


def test_consistency_vs_ensemble_size_bad_input():
    x, _ = test_inputs(20)
    models = [trained_mlp(s) for s in range(6)]
    with pytest.raises(SaliencyUsageError, match=r"ensemble size\(s\) \[4\] need at least 8 models .* but 6 were given"):
        consistency_vs_ensemble_size(models, x, sizes=(1, 4))
    with pytest.raises(SaliencyUsageError, match="sizes must be a non-empty list of positive ints"):
        consistency_vs_ensemble_size(models, x, sizes=(0,))
    with pytest.raises(SaliencyUsageError, match="sizes must be distinct"):
        consistency_vs_ensemble_size(models, x, sizes=(1, 1))
    with pytest.raises(SaliencyUsageError, match="unknown target mode"):
        consistency_vs_ensemble_size(models, x, sizes=(1,), target="mine")
    with pytest.raises(SaliencyUsageError, match="needs seeds="):
        consistency_vs_ensemble_size(trained_mlp, x)


def test_perturbed_copies_do_not_share_storage_with_the_original():
    model = copy.deepcopy(trained_mlp(0))
    ens = perturbed_ensemble(model, sigma=0.1, n=2)
    with torch.no_grad():
        ens.members[0].fc2.weight.zero_()
    assert model.fc2.weight.abs().sum() > 0


def test_consistency_vs_ensemble_size_checks_inputs_and_options_before_running_a_model():
    models, x = [make_tiny_cnn(0), make_tiny_cnn(1)], tiny_images(4)
    nan_inputs = x.clone()
    nan_inputs[0, 0, 0, 0] = math.nan
    with torch.device("meta"):
        meta = type(models[0])()
    for inputs, ensemble_models, options, message in [
        (nan_inputs, models, {}, r"model 'model0': inputs contain 1 NaN"),
        (x.double(), models, {}, r"model 'model0': inputs are torch.float64 but the model's parameters are torch.float32"),
        (x[:, 0], models, {}, r"model 'model0': .* taken as series \(N, C, T\), but TinyCNN has Conv2d layers"),
        (x, [models[0], meta], {}, r"model 'model1': model TinyCNN is on the meta device"),
        (x, models, {"sizes": (1.5,)}, r"sizes\[0\] must be an int >= 1, got 1.5"),
        (x, models, {"batch_size": 0}, r"batch_size must be an int >= 1 or None, got 0"),
        (x, models, {"seed": "0"}, r"seed must be an integer"),
        (x, models, {"how": "majority"}, r"unknown ensemble method 'majority'"),
    ]:
        with pytest.raises(SaliencyUsageError, match=message):
            consistency_vs_ensemble_size(ensemble_models, inputs, **{"sizes": (1,), "n_splits": 2, **options})


def test_perturbed_ensemble_takes_any_integer_seed_and_checks_its_options():
    import numpy as np

    model = make_tiny_cnn()
    for seed in (-5, 2**70, np.int64(3)):
        a, b = perturbed_ensemble(model, n=2, seed=seed), perturbed_ensemble(model, n=2, seed=int(seed))
        assert torch.equal(a.members[0].conv1.weight, b.members[0].conv1.weight)
    for options, message in [
        ({"n": 2.0}, r"n must be an int >= 1, got 2.0"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"include_original": "yes"}, r"include_original must be True or False"),
        ({"how": "vote"}, r"unknown ensemble method 'vote'"),
        ({"sigma": "0.1"}, r"sigma must be a finite number with 0 <= sigma, got '0.1'"),
    ]:
        with pytest.raises(SaliencyUsageError, match=message):
            perturbed_ensemble(model, **options)


def test_ensemble_size_checks_the_first_model_before_training_the_others():
    calls: list[int] = []

    def train(seed: int) -> nn.Module:
        calls.append(seed)
        return TupleOutput()

    x, _ = test_inputs(60)
    with pytest.raises(SaliencyUsageError, match=r"model 'seed=0': the model returns a tuple of 2 .*Pass output="):
        consistency_vs_ensemble_size(train, x, [1, 2], "saliency", seeds=[0, 1, 2, 3])
    assert calls == [0], "only the first seed is trained before the usage error"

