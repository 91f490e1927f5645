"""Models as people write them: outputs that are tuples, dicts or Hugging Face ``ModelOutput``s
(``output=``), and forward passes that take extra arguments (``forward_kwargs=``), through every
check, with the same numbers as the plain model that returns a tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyCNN, make_tiny_cnn, tiny_images
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyUsageError
from pytest_saliency.checks.ensembles import consistency_vs_ensemble_size
from pytest_saliency.core.forward import model_call_options, select_scores
from pytest_saliency.maps.explainers import attribute, prepare_method
from pytest_saliency.maps.methods import draws_random, resolve_method

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402


class Shaped(TinyCNN):
    """TinyCNN (the same layer names and weights) returning its logits inside ``kind`` of output,
    plus an optional per-input additive ``bias`` (N, 3) and a static ``scale``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> Any:
        logits = super().forward(x) * scale
        if bias is not None:
            if bias.shape[0] != x.shape[0]:
                raise RuntimeError(f"bias has {bias.shape[0]} rows for {x.shape[0]} inputs")
            logits = logits + bias
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"aux": x.mean(), "scores": logits}
        if self.kind == "model_output":
            return SequenceClassifierOutput(logits=logits)
        return logits


def shaped(kind: str) -> Shaped:
    model = Shaped(kind)
    model.load_state_dict(make_tiny_cnn().state_dict())
    return model.eval()


OUTPUTS = {"tensor": None, "tuple": 0, "dict": "scores", "model_output": None}


# -- select_scores ------------------------------------------------------------------------------

def test_select_scores_rules() -> None:
    t = torch.randn(2, 3)
    assert select_scores(t) is t
    assert select_scores(SequenceClassifierOutput(logits=t)) is t
    assert select_scores({"logits": t, "x": 1}) is t
    assert select_scores((t, 1), 0) is t
    assert select_scores({"s": t}, "s") is t
    assert select_scores((1, t), lambda out: out[1]) is t
    assert select_scores(t, "logits") is t  # a tensor output is already the scores
    with pytest.raises(SaliencyUsageError, match=r"returns a tuple of 2 \(tensor \(2, 3\), int\).*output="):
        select_scores((t, 1))
    with pytest.raises(SaliencyUsageError, match=r"dict with keys \{'a': tensor \(2, 3\)\}.*output='logits'"):
        select_scores({"a": t})
    with pytest.raises(SaliencyUsageError, match=r"output='b' cannot select the scores.*KeyError"):
        select_scores({"a": t}, "b")
    with pytest.raises(SaliencyUsageError, match=r"output=5 cannot select.*IndexError"):
        select_scores((t,), 5)
    with pytest.raises(SaliencyUsageError, match=r"output=1 selected a int"):
        select_scores((t, 1), 1)


def test_bad_options_are_usage_errors() -> None:
    model, x = shaped("tuple"), tiny_images(2)
    with pytest.raises(SaliencyUsageError, match=r"output=2.5 \(float\) is not a way to select the scores"):
        ps.explain(model, x, output=2.5)
    with pytest.raises(SaliencyUsageError, match=r"forward_kwargs must be a dict.*got list"):
        ps.explain(model, x, output=0, forward_kwargs=[1, 2])


@pytest.mark.parametrize("check", ["explain", "layer_randomization", "agreement_matrix", "hyperparameter_sweep"])
def test_tuple_without_output_option_names_the_type_and_the_option(check: str) -> None:
    model, x = shaped("tuple"), tiny_images(3)
    run = {
        "explain": lambda: ps.explain(model, x),
        "layer_randomization": lambda: ps.layer_randomization(model, x, "saliency"),
        "agreement_matrix": lambda: ps.agreement_matrix(model, x, ["saliency", "input_x_gradient"]),
        "hyperparameter_sweep": lambda: ps.hyperparameter_sweep(model, x, "smoothgrad", {"nt_samples": [2, 3]}),
    }[check]
    with pytest.raises(SaliencyUsageError, match=r"returns a tuple of 2 .* no \.logits\. Pass output="):
        run()


# -- the same numbers as the plain model, in every check ---------------------------------------------

def _numbers(value: Any) -> Any:
    """A result's to_dict without timings, for comparison."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if "seconds" not in k and k not in ("timings", "elapsed", "path")}
    if isinstance(value, (list, tuple)):
        return [_numbers(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _run_checks(model: nn.Module, x: torch.Tensor, tmp_path: Any, **call: Any) -> dict[str, Any]:
    """Every check on ``model``; ``call`` holds output=/forward_kwargs= and any target=."""
    results: dict[str, Any] = {}
    results["explain"] = ps.explain(model, x, "integrated_gradients", n_steps=4, **call)
    results["ipr"] = ps.layer_randomization(model, x, "saliency", mode="independent", **call)
    results["cpr_occlusion"] = ps.layer_randomization(
        model, x, "occlusion", mode="cascading", window=4, stride=4, **call)
    results["agreement"] = ps.agreement_matrix(model, x, ["saliency", "gradcam"], ["ssim", "spearman"], **call)
    results["sweep"] = ps.hyperparameter_sweep(model, x, "smoothgrad", {"nt_samples": [2, 4]}, **call)
    results["noise"] = ps.input_noise_stability(model, x, "saliency", variance=[0.01], n_draws=2, **call)
    results["explainer_seeds"] = ps.explainer_seed_stability(model, x, "smoothgrad", seeds=[0, 1], nt_samples=3,
                                                             **call)
    results["baseline"] = ps.check_baseline(model, x, tmp_path / "b.npz", "saliency", **call)
    results["layers"] = [name for name, _ in ps.select_layers(model, x, **{k: v for k, v in call.items()
                                                                           if k != "target"})]
    return {k: v if isinstance(v, (list, torch.Tensor)) else _numbers(v.to_dict()) for k, v in results.items()}


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
        else:
            assert got[key] == expected[key], key


@pytest.fixture(scope="module")
def plain_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_checks(shaped("tensor"), tiny_images(4), tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
def test_every_check_gives_the_plain_models_numbers(kind: str, plain_results: dict[str, Any], tmp_path: Any) -> None:
    got = _run_checks(shaped(kind), tiny_images(4), tmp_path, output=OUTPUTS[kind])
    _assert_same(got, plain_results)


def test_per_input_forward_arguments_follow_their_inputs(tmp_path: Any) -> None:
    """A per-input bias (N, 3) makes input i predict class targets[i]: every check must give the
    numbers of the unbiased model explained for those targets, which needs each forward pass
    (captum's expanded batches included) to get its own inputs' rows."""
    x = tiny_images(4)
    targets = torch.tensor([2, 0, 1, 2])
    bias = torch.nn.functional.one_hot(targets, 3).float() * 10.0
    expected = _run_checks(shaped("tensor"), x, tmp_path / "plain", target=targets)
    got = _run_checks(shaped("model_output"), x, tmp_path / "biased", forward_kwargs={"bias": bias, "scale": 1.0})
    for key in ("ipr", "cpr_occlusion", "agreement", "sweep", "noise", "explainer_seeds", "baseline"):
        # the plain engine explains them (the replay's recorded passes take no per-input arguments)
        for field in ("target", "targets", "target_description", "target_policy", "reused_activations"):
            expected[key].pop(field, None)
            got[key].pop(field, None)
    _assert_close(got, expected)


def _assert_close(got: Any, expected: Any, where: str = "") -> None:
    """Equal up to float32 rounding: the bias shifts logits, so occlusion's differences round differently."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            _assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=where)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-4), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("method, options", [
    ("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 5, "internal_batch_size": 3}),
    ("smoothgrad", {"nt_samples": 3}), ("guided_backprop", {}), ("deconvolution", {}), ("gradcam", {}),
    ("guided_gradcam", {}), ("deeplift", {}), ("gradient_shap", {"n_samples": 3}),
    ("occlusion", {"window": 4, "stride": 4, "perturbations_per_eval": 3}),
    ("feature_ablation", {"grid": 2, "perturbations_per_eval": 2}), ("lime", {"n_samples": 24, "grid": 2, "alpha": 1e-4}),
    ("kernel_shap", {"n_samples": 8, "grid": 2}),
])
def test_a_per_input_mask_reaches_every_method_batched_as_one_at_a_time(method: str, options: dict) -> None:
    """A per-input mask multiplies the first layer's activations: explaining all inputs at once
    equals explaining each alone (captum expands ``additional_forward_args`` with its batches)."""

    class Masked(TinyCNN):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            h = self.relu1(self.bn(self.conv1(x))) * mask[:, None]
            return self.fc(self.relu2(self.conv2(h)).flatten(1))

    model = Masked()
    model.load_state_dict(make_tiny_cnn().state_dict())
    model.eval()
    x = tiny_images(3)
    mask = (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    with torch.no_grad():
        target = model(x, mask).argmax(1)
    together = ps.explain(model, x, method, target=target, seed=3, forward_kwargs={"mask": mask}, **options)
    if draws_random(resolve_method(method), options):
        # Their draws are seeded by the input's index in the check's inputs: explain each input
        # alone at its index, its mask row chosen by that index.
        spec, _, resolved = prepare_method(method, model, x, options)
        alone = []
        for i in range(3):
            with model_call_options(None, {"mask": mask}, x):
                alone.append(attribute(model, x[i:i + 1], spec, target[i:i + 1], 3, None, True, resolved, index=i))
        alone = torch.cat(alone)
    else:
        alone = torch.cat([ps.explain(model, x[i:i + 1], method, target=target[i:i + 1], seed=3,
                                      forward_kwargs={"mask": mask[i:i + 1]}, **options) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    unmasked = ps.explain(model, x, method, target=target, seed=3, forward_kwargs={"mask": torch.ones_like(mask)},
                          **options)
    assert not torch.allclose(together, unmasked), "the mask must change the maps"


def test_seed_consistency_and_ensembles_with_model_outputs(tmp_path: Any) -> None:
    x = tiny_images(10)

    def factory(seed: int, kind: str = "model_output") -> nn.Module:
        model = Shaped(kind)
        model.load_state_dict(make_tiny_cnn(seed).state_dict())
        return model.eval()

    plain = ps.seed_consistency(lambda s: factory(s, "tensor"), x, seeds=[0, 1, 2], cache=None, k=10)
    wrapped = ps.seed_consistency(factory, x, seeds=[0, 1, 2], cache=None, k=10, output="logits")
    assert _numbers(wrapped.to_dict()) == _numbers(plain.to_dict())
    sizes_plain = consistency_vs_ensemble_size(lambda s: factory(s, "tensor"), x, sizes=[1, 2], seeds=range(4),
                                               cache=None)
    sizes = consistency_vs_ensemble_size(lambda s: factory(s, "tuple"), x, sizes=[1, 2], seeds=range(4),
                                         cache=None, output=0)
    assert _numbers(sizes.to_dict()) == _numbers(sizes_plain.to_dict())


def test_faithfulness_with_model_outputs_and_the_probability_option() -> None:
    x = tiny_images(3)
    plain = ps.deletion(shaped("tensor"), x, "saliency", step=32)
    wrapped = ps.deletion(shaped("dict"), x, "saliency", step=32, output="scores")
    torch.testing.assert_close(wrapped.auc, plain.auc, rtol=0, atol=0)
    with pytest.raises(SaliencyUsageError, match=r"the probability the games score is probability='raw'"):
        ps.deletion(shaped("tensor"), x, "saliency", output="raw")


def test_a_hugging_face_vit_built_from_a_config() -> None:
    """The README's ViTForImageClassification (random weights, nothing downloaded) returns an
    ``ImageClassifierOutput``: the checks take its ``.logits`` with no option at all."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = ps.explain(model, x[:4], "integrated_gradients", n_steps=4)
    assert maps.shape == (4, 3, 32, 32) and torch.isfinite(maps).all()
    result = ps.assert_sensitive_to_cascading_randomization(model, x, "saliency", layers="block", depth=3)
    assert "vit.layers.3" in result.layers and result.reused_activations, result.layers
    agreement = ps.agreement_matrix(model, x[:4], ["saliency", "integrated_gradients"], ["spearman", "ssim"])
    assert len(agreement.pairs) == 2 and all(math.isfinite(v) for p in agreement.pairs for v in p.values)


def test_the_fixture_takes_the_options_and_a_default_for_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import pytest


        @pytest.fixture
        def saliency(saliency):
            return saliency.set_model_call(output="scores")
    """)
    pytester.makepyfile(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from test_model_outputs import shaped, tiny_images


        def test_default_from_conftest(saliency):
            saliency.assert_sensitive_to_layer_randomization(shaped("dict"), tiny_images(4), "saliency")
            assert saliency.explain(shaped("dict"), tiny_images(2)).shape == (2, 1, 16, 16)


        def test_own_option_wins(saliency):
            saliency.assert_sensitive_to_layer_randomization(shaped("tuple"), tiny_images(4), "saliency", output=0)


        def test_the_modality_default(saliency):
            import pytest_saliency as ps
            saliency.set_model_call(modality=ps.Text(pad_token_id=0))
            model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2))
            maps = saliency.explain(model, torch.randint(1, 10, (2, 3)), "integrated_gradients", n_steps=4)
            assert maps.shape == (2, 3, 4)


        def test_a_tuple_without_the_option_is_a_usage_error(saliency):
            saliency.explanation_consistency([shaped("tuple"), shaped("tuple")], tiny_images(10), "saliency",
                                             output=None)
    """)
    result = pytester.runpytest("--saliency", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*SaliencyUsageError*returns a tuple of 2*output=*"])


# -- per-input arguments at the check level, and the review's cases ---------------------------------

class Masked(TinyCNN):
    """TinyCNN whose first activations are multiplied by a per-input mask (N, 16, 16)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if mask.shape[0] != x.shape[0]:
            raise RuntimeError(f"mask has {mask.shape[0]} rows for {x.shape[0]} inputs")
        h = self.relu1(self.bn(self.conv1(x))) * mask[:, None]
        return self.fc(self.relu2(self.conv2(h)).flatten(1))


def masked_model() -> Masked:
    model = Masked()
    model.load_state_dict(make_tiny_cnn().state_dict())
    return model.eval()


def _per_input_numbers(x: torch.Tensor, mask: torch.Tensor, tmp_path: Path) -> dict[str, Any]:
    """Per-input numbers of several checks, for inputs and masks in this order."""
    model, call = masked_model(), {"forward_kwargs": {"mask": mask}}
    ipr = ps.layer_randomization(model, x, "integrated_gradients", n_steps=4, **call)
    sweep = ps.hyperparameter_sweep(model, x, "integrated_gradients", {"n_steps": [3, 6]}, metrics=("spearman",),
                                    **call)  # deterministic: a sampling method draws by the input's index
    curve = ps.deletion(model, x, "saliency", step=32, **call)
    base = ps.check_baseline(model, x, tmp_path / f"b{len(list(tmp_path.iterdir()))}.npz", "saliency", **call)
    return {"ipr": torch.tensor(ipr.ssim), "sweep": torch.tensor(sweep.tables[0].rows[0].scores["spearman"]),
            "deletion": curve.auc, "baseline": base.current_maps}


def test_per_input_arguments_follow_their_inputs_in_every_check(tmp_path: Path) -> None:
    """Permuting the inputs together with their masks permutes every per-input number: a mask row
    that reached another input's forward pass (in captum's expanded batches too) would change them."""
    x = tiny_images(5)
    mask = (torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(7)) > 0.4).float()
    perm = torch.tensor([3, 0, 4, 1, 2])
    straight = _per_input_numbers(x, mask, tmp_path)
    permuted = _per_input_numbers(x[perm], mask[perm], tmp_path)
    torch.testing.assert_close(permuted["ipr"], straight["ipr"][:, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(permuted["sweep"], straight["sweep"][perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(permuted["deletion"], straight["deletion"][perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted["baseline"], straight["baseline"][perm], rtol=1e-5, atol=1e-6)
    # and the masks matter: with every mask row the same, the numbers differ
    same = _per_input_numbers(x, mask[:1].expand(5, -1, -1).contiguous(), tmp_path)
    assert not torch.allclose(same["deletion"], straight["deletion"])


def test_a_static_tensor_that_happens_to_have_n_rows_is_passed_whole() -> None:
    class Prior(TinyCNN):
        def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            assert prior.shape == (3,), prior.shape
            return super().forward(x) + prior

    model = Prior()
    model.load_state_dict(make_tiny_cnn().state_dict())
    model.eval()
    x, prior = tiny_images(3), torch.tensor([0.0, 0.0, 50.0])
    maps = ps.explain(model, x, "integrated_gradients", batch_size=1, forward_kwargs={"prior": ps.static(prior)})
    assert torch.isfinite(maps).all()
    assert (ps.explain(model, x, batch_size=1, forward_kwargs={"prior": ps.static(prior)}) != 0).any()


def test_the_map_cache_tells_model_calls_apart() -> None:
    from pytest_saliency.maps.cache import MapCache

    cache, x = MapCache(), tiny_images(4)
    ones, half = torch.ones(4, 16, 16), torch.ones(4, 16, 16) * (torch.arange(16) < 8).float()
    first = ps.hyperparameter_sweep(masked_model(), x, "smoothgrad", {"nt_samples": [2]}, cache=cache,
                                    forward_kwargs={"mask": ones})
    second = ps.hyperparameter_sweep(masked_model(), x, "smoothgrad", {"nt_samples": [2]}, cache=cache,
                                     forward_kwargs={"mask": half})
    fresh = ps.hyperparameter_sweep(masked_model(), x, "smoothgrad", {"nt_samples": [2]},
                                    forward_kwargs={"mask": half})
    assert _numbers(second.to_dict())["tables"] == _numbers(fresh.to_dict())["tables"]
    assert _numbers(second.to_dict())["tables"] != _numbers(first.to_dict())["tables"]


def test_sweeps_over_per_image_settings_with_forward_arguments() -> None:
    """A per-image setting (uniform baselines) runs through an internal explainer of its own,
    which must not wrap the model a second time."""
    x = tiny_images(3)
    mask = torch.ones(3, 16, 16)
    result = ps.hyperparameter_sweep(shaped("dict"), x, "integrated_gradients", {"baselines": ["uniform"]},
                                     output="scores", n_steps=4)
    assert result.tables[0].rows
    masked = ps.hyperparameter_sweep(masked_model(), x, "integrated_gradients", {"baselines": ["uniform"]},
                                     forward_kwargs={"mask": mask}, n_steps=4)
    assert masked.tables[0].rows


def test_a_custom_explainer_passes_the_per_input_arguments_to_captum() -> None:
    import captum.attr as ca

    def ig(model: Any, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ca.IntegratedGradients(model).attribute(inputs, target=target, n_steps=5, method="riemann_trapezoid",
                                                       additional_forward_args=model.additional_forward_args)

    x = tiny_images(4)
    mask = (torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    ours = ps.explain(masked_model(), x, ig, forward_kwargs={"mask": mask}, batch_size=3)
    named = ps.explain(masked_model(), x, "integrated_gradients", forward_kwargs={"mask": mask}, n_steps=5,
                       integration_method="riemann_trapezoid")
    torch.testing.assert_close(ours, named, rtol=1e-5, atol=1e-6)

    def expanding(model: Any, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ca.IntegratedGradients(model).attribute(inputs, target=target, n_steps=5)

    with pytest.raises(SaliencyUsageError, match=r"pass model.additional_forward_args to captum"):
        ps.explain(masked_model(), x, expanding, forward_kwargs={"mask": mask})


def test_half_precision_sampling_methods_take_per_input_arguments() -> None:
    model = masked_model().to(torch.bfloat16)
    x = tiny_images(2).to(torch.bfloat16)
    mask = torch.ones(2, 16, 16, dtype=torch.bfloat16)
    maps = ps.explain(model, x, "smoothgrad", nt_samples=2, forward_kwargs={"mask": mask})
    assert torch.isfinite(maps.float()).all()


def test_an_ensemble_selects_its_members_scores_once() -> None:
    from pytest_saliency.checks.ensembles import Ensemble

    x = tiny_images(3)
    ensemble = Ensemble([shaped("tuple"), shaped("tuple")], how="logits")
    ours = ps.explain(ensemble, x, output=lambda out: out[0])
    plain = ps.explain(Ensemble([shaped("tensor"), shaped("tensor")], how="logits"), x)
    torch.testing.assert_close(ours, plain)


def test_a_tuple_output_with_other_dtype_inputs_names_the_output_option() -> None:
    class Casting(Shaped):  # converts its inputs itself, so float64 inputs are fine
        def forward(self, x: torch.Tensor, bias: Any = None, scale: float = 1.0) -> Any:
            return super().forward(x.float(), bias, scale)

    model = Casting("tuple")
    model.load_state_dict(make_tiny_cnn().state_dict())
    with pytest.raises(SaliencyUsageError, match=r"returns a tuple of 2 .* Pass output="):
        ps.explain(model.eval(), tiny_images(2).double())
