"""Mode connectivity (Ley et al. Sec. 3.2, Garipov et al.): the Bezier curve, its training, the
connected ensembles and the four strategies of ``consistency_vs_ensemble_size``.

The models are small MLPs on a synthetic XOR problem (4 features, label = sign(x0 * x1)), trained
from different seeds: a nonlinear problem whose independently trained solutions are separated by
a loss barrier on the straight line.
"""

from __future__ import annotations

import copy
import itertools
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_saliency import SaliencyUsageError, explain
from pytest_saliency.checks.ensembles import (
    connected_ensemble,
    consistency_vs_ensemble_size,
    curve_points,
    perturbed_ensemble,
    strategy_ensembles,
)
from pytest_saliency.compare.metrics import sign_agreement
from pytest_saliency.core.rng import derive_seed
from pytest_saliency.model.curves import BezierCurve, fit_curve, refresh_batchnorm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only adds contention on a busy machine
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self, hidden: int = 32, norm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.norm = nn.BatchNorm1d(hidden) if norm else nn.Identity()
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.norm(self.fc1(x))))


@cache
def data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def loader(batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data()
    return list(zip(x.split(batch), y.split(batch)))


@cache
def _trained(seed: int, hidden: int, norm: bool) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Net(hidden, norm)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            for xb, yb in loader():
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
    return model.eval()


def trained(seed: int, hidden: int = 32, norm: bool = False) -> Net:
    return copy.deepcopy(_trained(seed, hidden, norm))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def mean_loss(model: nn.Module) -> float:
    with torch.no_grad():
        x, y = data()
        return float(F.cross_entropy(model(x), y))


# ------------------------------------------------------------------------------------------
# The curve
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [False, True])
def test_the_endpoints_of_the_curve_are_the_two_models_exactly(norm):
    a, b = trained(0, norm=norm), trained(1, norm=norm)
    curve = fit_curve(a, b, loader(), epochs=3, seed=0)
    assert_same_state(state(curve.model_at(0.0)), state(a))
    assert_same_state(state(curve.model_at(1.0)), state(b))
    assert not curve.model_at(0.0).training


def test_the_model_at_t_is_the_bezier_formula_entry_by_entry():
    a, b = trained(0), trained(1)
    curve = fit_curve(a, b, loader(), epochs=3, seed=0)
    t = 0.3
    got = dict(curve.model_at(t).named_parameters())
    for name, w0 in a.named_parameters():
        w1, theta = dict(b.named_parameters())[name], curve.theta[name].detach()
        expected = torch.empty_like(w0)
        for index in itertools.product(*map(range, w0.shape)):  # a reference loop over the entries
            expected[index] = ((1 - t) ** 2 * w0[index].double() + 2 * t * (1 - t) * theta[index].double()
                               + t * t * w1[index].double()).float()
        assert torch.allclose(got[name], expected, atol=1e-6), name
    assert not torch.equal(curve.theta["fc1.weight"], (a.fc1.weight + b.fc1.weight) / 2)  # it was trained


def test_the_untrained_curve_is_the_straight_line():
    a, b = trained(0), trained(1)
    curve = BezierCurve(a, b)
    for t in (0.25, 0.5, 0.9):
        for name, p in curve.model_at(t).named_parameters():
            line = (1 - t) * dict(a.named_parameters())[name] + t * dict(b.named_parameters())[name]
            assert torch.allclose(p, line, atol=1e-6)


def test_training_the_control_point_lowers_the_loss_at_the_midpoint():
    a, b = trained(0), trained(1)
    line_mid = mean_loss(BezierCurve(a, b).model_at(0.5))
    curve = fit_curve(a, b, loader(), epochs=30, lr=1e-2, seed=0)
    curve_mid = mean_loss(curve.model_at(0.5))
    ends = max(mean_loss(a), mean_loss(b))
    assert line_mid > 2 * ends  # there is a barrier on the straight line ...
    assert curve_mid < 0.5 * line_mid  # ... and the curve goes around it
    assert curve.loss_at(0.5, loader()) == pytest.approx(
        sum(float(F.cross_entropy(curve.model_at(0.5)(x), y).detach()) for x, y in loader()) / len(loader()), rel=1e-5)


def test_fit_matches_a_reference_adam_loop_on_a_linear_model():
    """Theta after training, against an explicit loop: the same t draws, the Bezier weights written
    out by hand, torch's Adam on theta."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    curve = fit_curve(a, b, loader(), epochs=2, lr=0.05, seed=7)
    draws = torch.Generator().manual_seed(derive_seed(7, "curve t"))
    theta = {"weight": ((a.weight + b.weight) / 2).detach().requires_grad_(True),
             "bias": ((a.bias + b.bias) / 2).detach().requires_grad_(True)}
    opt = torch.optim.Adam(list(theta.values()), lr=0.05)
    for _ in range(2):
        for xb, yb in loader():
            t = float(torch.rand((), generator=draws))
            w = (1 - t) ** 2 * a.weight.detach() + 2 * t * (1 - t) * theta["weight"] + t * t * b.weight.detach()
            c = (1 - t) ** 2 * a.bias.detach() + 2 * t * (1 - t) * theta["bias"] + t * t * b.bias.detach()
            opt.zero_grad()
            F.cross_entropy(xb @ w.T + c, yb).backward()
            opt.step()
    assert torch.allclose(curve.theta["weight"], theta["weight"], atol=1e-6)
    assert torch.allclose(curve.theta["bias"], theta["bias"], atol=1e-6)
    assert len(curve.losses) == 2 * len(loader())


def test_a_loss_function_trains_the_same_curve_as_a_loader_of_that_batch():
    x, y = data()
    a, b = trained(0), trained(1)
    by_loader = fit_curve(a, b, [(x, y)], epochs=5, seed=2)
    by_function = fit_curve(a, b, lambda forward: F.cross_entropy(forward(x), y), steps=5, seed=2)
    for name in by_loader.theta:
        assert torch.equal(by_loader.theta[name], by_function.theta[name])


def test_same_seed_same_curve_other_seed_other_curve():
    a, b = trained(0), trained(1)
    one, two = fit_curve(a, b, loader(), epochs=3, seed=5), fit_curve(a, b, loader(), epochs=3, seed=5)
    other = fit_curve(a, b, loader(), epochs=3, seed=6)
    for name in one.theta:
        assert torch.equal(one.theta[name], two.theta[name])
    assert not torch.equal(one.theta["fc1.weight"], other.theta["fc1.weight"])


def test_training_leaves_the_endpoints_and_the_global_rng_untouched():
    a, b = trained(0, norm=True), trained(1, norm=True)
    a.train()  # a mode flag that must survive as well
    before_a, before_b = state(a), state(b)
    grads = [p.requires_grad for p in a.parameters()]
    rng = torch.get_rng_state()
    ens = connected_ensemble(a, b, loader(), n=3, epochs=2, seed=0)
    ens(data()[0][:8])
    assert_same_state(state(a), before_a)
    assert_same_state(state(b), before_b)
    assert a.training and not b.training
    assert [p.requires_grad for p in a.parameters()] == grads
    assert all(p.grad is None for p in [*a.parameters(), *b.parameters()])
    assert torch.equal(torch.get_rng_state(), rng)
    member_params = {p.data_ptr() for m in ens.members for p in m.parameters()}
    assert not member_params & {p.data_ptr() for p in [*a.parameters(), *b.parameters()]}


def test_batchnorm_statistics_are_recomputed_from_the_loader():
    a, b = trained(0, norm=True), trained(1, norm=True)
    ens = connected_ensemble(a, b, loader(), n=2, epochs=2, seed=0)
    x = data()[0]
    for member in ens.members:
        with torch.no_grad():
            h = member.fc1(x)  # the statistics of the member's own pre-norm activations over the pass
        bn = member.norm
        assert torch.allclose(bn.running_mean, h.mean(dim=0), atol=1e-5)
        batch_vars = torch.stack([hb.var(dim=0, unbiased=True) for hb in h.split(64)])
        assert torch.allclose(bn.running_var, batch_vars.mean(dim=0), atol=1e-5)
        assert not member.training
    assert refresh_batchnorm(trained(0), loader()) is False  # no BatchNorm: nothing to do


# ------------------------------------------------------------------------------------------
# Connected ensembles
# ------------------------------------------------------------------------------------------


def test_connected_ensemble_holds_the_models_at_uniform_points_of_the_trained_curve():
    a, b = trained(0), trained(1)
    assert curve_points(4) == [0.125, 0.375, 0.625, 0.875]
    ens = connected_ensemble(a, b, loader(), n=4, epochs=3, seed=1)
    curve = fit_curve(a, b, loader(), epochs=3, seed=1)
    assert len(ens.members) == 4
    for member, t in zip(ens.members, curve_points(4)):
        assert_same_state(state(member), state(curve.model_at(t)))
    explicit = connected_ensemble(a, b, loader(), ts=[0.0, 1.0], epochs=3, seed=1)
    assert_same_state(state(explicit.members[0]), state(a))
    x = data()[0][:10]
    probs = torch.stack([m(x).softmax(1) for m in ens.members]).mean(0)
    assert torch.allclose(ens(x).exp(), probs, atol=1e-6)


def test_clear_errors():
    a, b = trained(0), trained(1)
    with pytest.raises(SaliencyUsageError, match="different architectures.*fc1.weight"):
        connected_ensemble(a, trained(1, hidden=16), loader())
    with pytest.raises(SaliencyUsageError, match="different architectures: Net and Linear"):
        connected_ensemble(a, nn.Linear(4, 2), loader())
    with pytest.raises(SaliencyUsageError, match="different architectures: their parameter names"):
        connected_ensemble(trained(0, norm=True), a, loader())  # same class, different layers
    with pytest.raises(SaliencyUsageError, match="same model object"):
        connected_ensemble(a, a, loader())
    with pytest.raises(SaliencyUsageError, match="training loader .* or a loss function"):
        connected_ensemble(a, b, None)
    with pytest.raises(SaliencyUsageError, match="training loader .* or a loss function"):
        connected_ensemble(a, b, 3)
    with pytest.raises(SaliencyUsageError, match="one-pass iterator"):
        connected_ensemble(a, b, iter(loader()))
    with pytest.raises(SaliencyUsageError, match="no batches"):
        connected_ensemble(a, b, [])
    with pytest.raises(SaliencyUsageError, match=r"tuple \(x, y"):
        connected_ensemble(a, b, [data()[0]])
    with pytest.raises(SaliencyUsageError, match="scalar tensor"):
        connected_ensemble(a, b, lambda forward: forward(data()[0]))
    with pytest.raises(SaliencyUsageError, match="ts"):
        connected_ensemble(a, b, loader(), ts=[0.5, 1.5])
    with pytest.raises(SaliencyUsageError):
        BezierCurve(a, b).model_at(-0.1)


# ------------------------------------------------------------------------------------------
# The four strategies in consistency_vs_ensemble_size
# ------------------------------------------------------------------------------------------

STRATEGY_OPTIONS = {
    "perturb": {"layer": "fc1", "parameter": "bias", "sigma": 0.2, "perturbations": 3},
    "connect": {"train": loader(), "n": 3, "epochs": 3},
    "combine": {"train": loader(), "n": 3, "epochs": 3, "layer": "fc1", "parameter": "bias", "sigma": 0.2,
                "perturbations": 2},
}


def test_strategy_ensembles_are_built_from_disjoint_pairs_and_perturbed_curve_models():
    models = {f"m{i}": trained(i) for i in range(8)}
    connect = strategy_ensembles(models, (2, 4), "connect", STRATEGY_OPTIONS["connect"])
    assert list(connect[2]) == ["m0~m1", "m2~m3", "m4~m5", "m6~m7"]
    assert list(connect[4]) == ["m0~m1+m2~m3", "m4~m5+m6~m7"]
    reference = connected_ensemble(models["m0"], models["m1"], loader(), n=3, epochs=3, seed=derive_seed(0, "m0~m1"))
    for got, want in zip(connect[2]["m0~m1"].members, reference.members):
        assert_same_state(state(got), state(want))
    assert connect[4]["m0~m1+m2~m3"].members[0] is connect[2]["m0~m1"].members[0]  # one curve for all sizes
    assert len(connect[4]["m0~m1+m2~m3"].members) == 6
    combine = strategy_ensembles(models, (2,), "combine", STRATEGY_OPTIONS["combine"])
    want = perturbed_ensemble(list(reference.members), layer="fc1", parameter="bias", sigma=0.2, n=2,
                              seed=derive_seed(0, "m0~m1"))
    assert len(combine[2]["m0~m1"].members) == 6
    for got, member in zip(combine[2]["m0~m1"].members, want.members):
        assert_same_state(state(got), state(member))
    perturb = strategy_ensembles(models, (1, 2), "perturb", STRATEGY_OPTIONS["perturb"])
    assert len(perturb[2]["m0+m1"].members) == 6
    vanilla = strategy_ensembles(models, (2,), "vanilla")
    assert list(vanilla[2]["m2+m3"].members) == [models["m2"], models["m3"]]


@pytest.mark.parametrize("strategy", ["connect", "combine"])
def test_consistency_of_connected_strategies_against_a_reference_and_with_a_loader(strategy):
    models = [trained(i) for i in range(4)]
    x = data(40, seed=9)[0]
    kwargs = {"sizes": (2,), "target": 1, "metrics": ("sign_agreement", "signed_set_agreement", "consistent_direction"),
              "k": 2, "n_splits": 2, "strategy": strategy, "strategy_options": STRATEGY_OPTIONS[strategy]}
    before = [state(m) for m in models]
    rng = torch.get_rng_state()
    result = consistency_vs_ensemble_size(models, x, **kwargs)
    assert result.strategy == strategy and f"[saliency, {strategy}, 4 models]" in result.summary()
    assert torch.equal(torch.get_rng_state(), rng)
    for model, saved in zip(models, before):
        assert_same_state(state(model), saved)
    ensembles = list(strategy_ensembles(models, (2,), strategy, STRATEGY_OPTIONS[strategy])[2].values())
    maps = [explain(e, x, "saliency", target=1) for e in ensembles]
    sa = float(sign_agreement(maps[0], maps[1], 2, warn_unsigned=False).mean())
    assert result.series("sign_agreement")[0] == pytest.approx(sa, abs=1e-6)
    streamed = consistency_vs_ensemble_size(models, [x[:25], x[25:]], **kwargs)
    for metric in ("sign_agreement", "signed_set_agreement", "consistent_direction"):
        assert streamed.series(metric) == pytest.approx(result.series(metric), abs=1e-6)


def test_strategy_errors_come_before_training():
    calls = []

    def factory(seed):
        calls.append(seed)
        return trained(seed)

    with pytest.raises(SaliencyUsageError, match="needs strategy_options=.*train"):
        consistency_vs_ensemble_size(factory, data()[0][:8], seeds=[0, 1], sizes=(2,), strategy="connect")
    with pytest.raises(SaliencyUsageError, match="do not apply to strategy 'perturb'"):
        consistency_vs_ensemble_size(factory, data()[0][:8], seeds=[0, 1], sizes=(1,), strategy="perturb",
                                     strategy_options={"train": loader()})
    with pytest.raises(SaliencyUsageError, match="ensemble strategy"):
        consistency_vs_ensemble_size(factory, data()[0][:8], seeds=[0, 1], sizes=(1,), strategy="average")
    assert calls == []
    with pytest.raises(SaliencyUsageError, match="must be even"):
        strategy_ensembles([trained(i) for i in range(4)], (1, 2), "connect", STRATEGY_OPTIONS["connect"])


def test_endpoints_whose_layers_differ_are_refused_even_with_equal_parameters() -> None:
    from torch import nn

    import pytest_saliency as ps

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(ps.SaliencyUsageError, match=r"module .1. is ReLU in one and Tanh in the other"):
        ps.connected_ensemble(a, b, lambda forward: forward(torch.zeros(1, 4)).sum(), n=2, steps=1)
