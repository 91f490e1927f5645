"""Yeh et al.'s infidelity and sensitivity next to seed consistency (Watson et al.'s second panel).

The wrappers of :mod:`pytest_saliency.compare.fidelity` must give what captum.metrics gives with the
same perturbations, for any batching; each value is checked against a small reference loop; a
loader gives the tensor's per-example numbers; no global RNG state and no model changes; and on
the digits CNN the trained model and a model with random weights are both reported.
"""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from captum.metrics import infidelity, sensitivity_max
from conftest import make_tiny_cnn, tiny_images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency import SaliencyUsageError
from pytest_saliency.compare.fidelity import (
    infidelity_values,
    perturbation_noise,
    sensitivity_values,
)
from pytest_saliency.reporting.figures import figures_for

N = 8
SAMPLES = 5
RADIUS = 0.1


def _states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _saliency(model: nn.Module):
    """captum's signed Saliency, quiet about inputs that do not require gradients (captum sets it)."""
    def attribute(z, target):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return Saliency(model).attribute(z, target=target, abs=False)  # signed, as the library's saliency
    return attribute


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model, x = make_tiny_cnn(seed), tiny_images(N)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target, _saliency(model)(x, target)


def _forward(model: nn.Module, target: torch.Tensor):
    return lambda z, rows: model(z)[torch.arange(z.shape[0]), target[rows]]


def _explain(model: nn.Module, target: torch.Tensor):
    return lambda z, rows: _saliency(model)(z, target[rows])


def _flat(noise: torch.Tensor) -> torch.Tensor:
    return noise.reshape(-1, *noise.shape[2:])


def test_the_wrappers_give_captums_numbers_for_any_batching_and_leave_the_global_rngs_alone() -> None:
    model, x, target, attr = _setup()
    before = _states()
    noise = _flat(perturbation_noise(x, SAMPLES, RADIUS, 3, "infidelity"))
    for normalize in (True, False):
        direct = infidelity(model, lambda z: (noise, z - noise), x, attr, target=target, n_perturb_samples=SAMPLES,
                            normalize=normalize).double()
        for max_rows in (None, 3, 7, 40):
            ours = infidelity_values(_forward(model, target), x, attr, n_perturb_samples=SAMPLES, radius=RADIUS,
                                     seed=3, normalize=normalize, max_rows=max_rows)
            assert ours.dtype == torch.float64 and ours.shape == (N,)
            # float32 forwards of other batch sizes round differently: to 1e-4 (bit for bit unbatched)
            assert torch.allclose(ours, direct, rtol=1e-4 if max_rows else 1e-6, atol=0), (normalize, max_rows)
    shift = _flat(perturbation_noise(x, SAMPLES, RADIUS, 3, "sensitivity"))
    direct = sensitivity_max(_saliency(model), x, perturb_func=lambda z, r: z + shift,
                             n_perturb_samples=SAMPLES, target=target).double()
    for max_rows, known in ((None, None), (3, attr), (7, None), (40, attr)):
        ours = sensitivity_values(_explain(model, target), x, attributions=known, n_perturb_samples=SAMPLES,
                                  radius=RADIUS, seed=3, max_rows=max_rows)
        assert torch.allclose(ours, direct, rtol=1e-4 if max_rows else 1e-6, atol=0), max_rows
    assert _same_states(before, _states())


def test_each_value_matches_a_reference_loop() -> None:
    model, x, target, attr = _setup(1)
    noise = perturbation_noise(x, SAMPLES, RADIUS, 5, "infidelity")
    plain = infidelity_values(_forward(model, target), x, attr, n_perturb_samples=SAMPLES, radius=RADIUS, seed=5,
                              normalize=False)
    scaled = infidelity_values(_forward(model, target), x, attr, n_perturb_samples=SAMPLES, radius=RADIUS, seed=5)
    shift = perturbation_noise(x, SAMPLES, RADIUS, 5, "sensitivity")
    sensitivity = sensitivity_values(_explain(model, target), x, n_perturb_samples=SAMPLES, radius=RADIUS, seed=5)
    with torch.no_grad():
        for i in range(N):
            c = int(target[i])
            f0 = float(model(x[i:i + 1])[0, c])
            a = torch.tensor([float((attr[i] * noise[i, j]).sum()) for j in range(SAMPLES)], dtype=torch.float64)
            b = torch.tensor([f0 - float(model(x[i:i + 1] - noise[i, j:j + 1])[0, c]) for j in range(SAMPLES)],
                             dtype=torch.float64)
            assert float(plain[i]) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-4)
            beta = float((a * b).sum() / (a * a).sum())
            assert float(scaled[i]) == pytest.approx(float(((beta * a - b) ** 2).mean()), rel=1e-4)
            base = attr[i]
            changes = [float((_saliency(model)(x[i:i + 1] + shift[i, j:j + 1], c)[0] - base).norm()
                             / base.norm()) for j in range(SAMPLES)]
            assert float(sensitivity[i]) == pytest.approx(max(changes), rel=1e-5)


def test_a_linear_models_gradient_is_perfectly_faithful_and_a_random_map_is_not() -> None:
    torch.manual_seed(0)  # the test's own data; the library never draws from the global generator
    model = nn.Linear(6, 3).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1])
    gradient = model.weight.detach()[target]
    forward = _forward(model, target)
    exact = infidelity_values(forward, x, gradient, n_perturb_samples=SAMPLES, radius=RADIUS, normalize=False)
    random_map = infidelity_values(forward, x, torch.randn(5, 6, dtype=torch.float64), n_perturb_samples=SAMPLES,
                                   radius=RADIUS, normalize=False)
    assert float(exact.max()) < 1e-20 and float(random_map.min()) > 1e-6
    # the gradient of a linear model does not change with the input: sensitivity 0
    stable = sensitivity_values(lambda z, rows: model.weight.detach()[target[rows]].clone(), x,
                                n_perturb_samples=SAMPLES, radius=RADIUS)
    assert float(stable.max()) == 0.0


def test_perturbations_are_keyed_by_example_and_drawn_as_documented() -> None:
    x = tiny_images(N)
    whole = perturbation_noise(x, 50, 0.2, 7, "sensitivity")
    assert torch.equal(perturbation_noise(x[3:], 50, 0.2, 7, "sensitivity", first_example=3), whole[3:])
    assert whole.shape == (N, 50, 1, 16, 16) and float(whole.abs().max()) <= 0.2
    assert float(whole.abs().max()) > 0.19  # uniform over the whole ball
    gaussian = perturbation_noise(x, 50, 0.2, 7, "infidelity")
    assert float(gaussian.std()) == pytest.approx(0.2, rel=0.02) and abs(float(gaussian.mean())) < 0.005
    assert not torch.equal(perturbation_noise(x, 50, 0.2, 8, "sensitivity"), whole)  # the seed matters


def test_the_consistency_result_reports_each_models_fidelity() -> None:
    x, y = tiny_images(12), torch.arange(12) % 3
    models = {f"m{s}": make_tiny_cnn(s) for s in range(3)}
    saved = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in models.items()}
    before = _states()
    result = ps.explanation_consistency(models, x, labels=y, n_splits=2, fidelity=True, n_perturb_samples=4,
                                        perturb_radius=0.05, metrics=("sign_agreement",))
    assert _same_states(before, _states())
    for label, model in models.items():
        assert all(torch.equal(v, saved[label][n]) for n, v in model.state_dict().items())
    with torch.no_grad():
        target = models["m0"](x).argmax(1)  # the reference model's prediction, for every model
    for label, model in models.items():
        f = result.fidelity[label]
        attr = _saliency(model)(x, target)
        common = {"n_perturb_samples": 4, "radius": 0.05, "seed": 0}
        expected = infidelity_values(_forward(model, target), x, attr, **common)
        assert torch.allclose(f.infidelity_values, expected, rtol=1e-5, atol=0)
        change = infidelity_values(_forward(model, target), x, torch.zeros_like(x), normalize=False, **common)
        assert torch.allclose(f.output_change_values, change, rtol=1e-5, atol=0)
        sens = sensitivity_values(_explain(model, target), x, **common)
        assert torch.allclose(f.sensitivity_values, sens, rtol=1e-5, atol=0)
        assert f.infidelity == pytest.approx(float(expected.mean()), rel=1e-5)
        assert f.infidelity_interval[0] <= f.infidelity <= f.infidelity_interval[1]
        assert f.sensitivity_interval[0] <= f.sensitivity <= f.sensitivity_interval[1]
        relative = f.infidelity_values / f.output_change_values  # the best rescaling never beats "explain nothing"
        assert float(relative.max()) <= 1.0 + 1e-6 and f.relative_infidelity == pytest.approx(float(relative.mean()))
        assert f.n_inputs == 12
    per_model = result.model_consistency()
    assert per_model["m0"] == pytest.approx(1 - np.mean([p.separability for p in result.pairs if "m0" in (p.a, p.b)]))
    data = json.loads(json.dumps(result.to_dict()))["fidelity"]
    assert data["settings"]["n_perturb_samples"] == 4 and data["settings"]["perturb_radius"] == 0.05
    assert data["models"]["m1"]["accuracy"] == result.accuracies["m1"]
    assert data["models"]["m1"]["infidelity"] == pytest.approx(result.fidelity["m1"].infidelity)
    report = result.report()
    assert "fidelity:" in report and all(f"    {label} " in report.split("  fidelity:    ")[1] for label in models)
    figures = figures_for(result, strict=True)
    assert figures["consistency_vs_fidelity"].startswith(b"\x89PNG")
    plain = ps.explanation_consistency(models, x, n_splits=2, metrics=("sign_agreement",))
    assert plain.fidelity == {} and plain.to_dict()["fidelity"] is None and "fidelity:" not in plain.report()
    assert "consistency_vs_fidelity" not in [name for name, _ in plain.figures()]


def test_a_loader_gives_the_tensors_per_example_numbers() -> None:
    x, y = tiny_images(12), torch.arange(12) % 3
    models = [make_tiny_cnn(s) for s in range(2)]
    options = {"n_splits": 2, "fidelity": True, "n_perturb_samples": 2, "perturb_radius": 0.05,
               "metrics": ("sign_agreement",)}
    whole = ps.explanation_consistency(models, x, labels=y, **options)
    for loader, batch_size in ((DataLoader(TensorDataset(x, y), batch_size=5), None), ([x[:7], x[7:]], 4)):
        streamed = ps.explanation_consistency(models, loader, labels=y, batch_size=batch_size, **options)
        for label, f in whole.fidelity.items():
            s = streamed.fidelity[label]
            assert s.infidelity_values.shape == (12,)
            # the same perturbations; float32 forwards of other batch sizes round differently, and the
            # infidelity takes differences of nearby outputs: equal to 1e-3 of the output's change
            scale = float(f.output_change_values.max())
            assert torch.allclose(s.infidelity_values, f.infidelity_values, rtol=1e-3, atol=1e-3 * scale)
            assert torch.allclose(s.output_change_values, f.output_change_values, rtol=1e-3, atol=1e-3 * scale)
            assert not torch.equal(s.infidelity_values, torch.zeros(12, dtype=torch.float64))
            assert torch.allclose(s.sensitivity_values, f.sensitivity_values, rtol=1e-5, atol=1e-7)
    gated = ps.seed_consistency(models, x, metric="sign_agreement", **options)  # the options pass through
    assert set(gated.fidelity) == {"model0", "model1"} and "fidelity:" in gated.failure_message()


def test_a_stochastic_method_explains_perturbed_copies_with_their_inputs_draws() -> None:
    x = tiny_images(4)
    models = [make_tiny_cnn(s) for s in range(2)]
    tiny = ps.explanation_consistency(models, torch.cat([x, x]), "smoothgrad", n_splits=2, fidelity=True,
                                      n_perturb_samples=2, perturb_radius=1e-6, nt_samples=4,
                                      metrics=("sign_agreement",))
    # other draws would change the maps by SmoothGrad's sampling noise (compare two seeds' maps)
    a = ps.explain(models[0], x, "smoothgrad", seed=0, nt_samples=4)
    b = ps.explain(models[0], x, "smoothgrad", seed=1, nt_samples=4)
    sampling = float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).min())
    assert sampling > 0.1
    assert max(f.sensitivity for f in tiny.fidelity.values()) < sampling / 10


def test_bad_fidelity_options_are_usage_errors() -> None:
    x = tiny_images(10)
    models = [make_tiny_cnn(s) for s in range(2)]
    for options, word in (({"fidelity": "yes"}, "fidelity"), ({"fidelity": True, "n_perturb_samples": 0},
                          "n_perturb_samples"), ({"fidelity": True, "perturb_radius": 0.0}, "perturb_radius")):
        with pytest.raises(SaliencyUsageError, match=word):
            ps.explanation_consistency(models, x, n_splits=2, **options)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 4), nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(1))

    ids = torch.arange(40).reshape(10, 4) % 20
    with pytest.raises(SaliencyUsageError, match="fidelity=True perturbs the inputs"):
        ps.explanation_consistency([Tokens(), Tokens()], ids, "integrated_gradients", n_splits=2, fidelity=True)


def test_digits_cnn_trained_and_random_weights_are_both_reported(digits) -> None:
    from digits_model import SmallCNN

    model, x, y = digits
    with torch.random.fork_rng():
        torch.manual_seed(100)
        untrained = SmallCNN().eval()
    x, y = x[:48], y[:48]
    result = ps.explanation_consistency({"trained": model, "random": untrained}, x, labels=y, target="each",
                                        n_splits=2, fidelity=True, n_perturb_samples=6, perturb_radius=0.05,
                                        metrics=("sign_agreement",))
    print("\n" + result.fidelity_table())
    trained, random_weights = result.fidelity["trained"], result.fidelity["random"]
    assert result.accuracies["trained"] > 0.9 and result.accuracies["random"] < 0.3
    # infidelity is in squared output units: the random model's outputs barely move
    assert random_weights.infidelity < trained.infidelity / 1000
    for f in (trained, random_weights):
        assert 0.0 < f.relative_infidelity < 1.0 and f.sensitivity > 0.0
    with torch.no_grad():
        target = model(x).argmax(1)
    attr = _saliency(model)(x, target)
    forward = _forward(model, target)
    common = {"n_perturb_samples": 6, "radius": 0.05}
    change = infidelity_values(forward, x, torch.zeros_like(x), normalize=False, **common)
    real = infidelity_values(forward, x, attr, **common) / change
    assert float(real.mean()) == pytest.approx(trained.relative_infidelity, rel=1e-4)
    # A control: with perturbations small enough for the gradient to describe the output's change,
    # and enough of them that fitting the scale alone explains little (6 samples: about 1/6), the
    # saliency map explains the change far better than the same map shuffled. (At radius 0.05 the
    # CNN is far from linear: the map leaves most of the change unexplained.)
    shuffled = attr.flatten(1)[:, torch.randperm(attr[0].numel(), generator=torch.Generator().manual_seed(0))]
    small = {"n_perturb_samples": 32, "radius": 0.002}
    change = infidelity_values(forward, x, torch.zeros_like(x), normalize=False, **small)
    real = infidelity_values(forward, x, attr, **small) / change
    control = infidelity_values(forward, x, shuffled.reshape(attr.shape), **small) / change
    assert float(real.mean()) < 0.8 * float(control.mean())


def test_one_channel_maps_of_colour_images_are_shared_by_the_channels() -> None:
    from torch import nn

    import pytest_saliency as ps

    def cnn(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()

    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = ps.explanation_consistency([cnn(0), cnn(1)], x, "gradcam", layer="0", fidelity=True, n_splits=2,
                                        metrics=["ssim"], n_perturb_samples=2)
    assert all(f.infidelity == f.infidelity for f in result.fidelity.values())  # finite numbers, not a crash
