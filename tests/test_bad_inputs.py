"""The bad-input battery: every public entry point against every class of bad input.

Each case either ends in a :class:`SaliencyUsageError` whose message names the offending argument
(never a traceback from inside torch, captum or numpy), or is documented as accepted and runs
(a failed gate, :class:`SaliencyCheckFailed`, counts as running). The model is a tiny two-layer
CNN on 4 images of 8x8 pixels with 3 classes, and every accepted case runs in its smallest
configuration, so the whole battery takes seconds.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.checks.consistency import seed_consistency

ACCEPT = "accepted"


class BatteryCNN(nn.Module):
    """Two convolutions and a linear head: 1x8x8 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def _model(seed: int) -> BatteryCNN:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BatteryCNN().eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        meta_model = BatteryCNN()
    return SimpleNamespace(
        model=_model(0), other=_model(1), meta_model=meta_model, x=x, tmp=tmp_path_factory.mktemp("baselines"),
        counter=itertools.count(),
    )


# --------------------------------------------------------------------------------------------
# entry points, each in its smallest configuration; overrides replace any argument
# --------------------------------------------------------------------------------------------

FAST_LR = {"n_bootstrap": 20, "keep_maps": 1}
FAST_AGREEMENT = {"methods": ["saliency", "input_x_gradient"], "metrics": ["feature_agreement"], "n_bootstrap": 20}
FAST_SWEEP = {"method": "smoothgrad", "sweep": {"nt_samples": [2]}, "reference": {"nt_samples": 1},
              "metrics": ("ssim",)}


def _model_and_inputs(e: SimpleNamespace, kw: dict[str, Any]) -> tuple[Any, Any]:
    return kw.pop("model", e.model), kw.pop("inputs", e.x)


def _models_and_inputs(e: SimpleNamespace, kw: dict[str, Any]) -> tuple[list[Any], Any]:
    model, inputs = _model_and_inputs(e, kw)
    return [model, e.other], inputs


def _call(entry: str, e: SimpleNamespace, kw: dict[str, Any]) -> Any:
    kw = dict(kw)
    if entry == "explain":
        model, inputs = _model_and_inputs(e, kw)
        return ps.explain(model, inputs, **kw)
    if entry == "layer_randomization":
        model, inputs = _model_and_inputs(e, kw)
        return ps.layer_randomization(model, inputs, **{**FAST_LR, **kw})
    if entry == "assert_sensitive_to_layer_randomization":
        model, inputs = _model_and_inputs(e, kw)
        return ps.assert_sensitive_to_layer_randomization(model, inputs, **{**FAST_LR, **kw})
    if entry == "agreement_matrix":
        model, inputs = _model_and_inputs(e, kw)
        return ps.agreement_matrix(model, inputs, **{**FAST_AGREEMENT, **kw})
    if entry == "assert_agreement_above":
        model, inputs = _model_and_inputs(e, kw)
        options = {"methods": ("saliency", "input_x_gradient"), "metric": "feature_agreement", "n_bootstrap": 20}
        return ps.assert_agreement_above(model, inputs, **{**options, **kw})
    if entry == "compare_maps":
        maps = kw.pop("inputs", e.x)
        options = {"metrics": ["feature_agreement"], "n_bootstrap": 20}
        return ps.compare_maps({"a": maps, "b": maps.flip(0)}, **{**options, **kw})
    if entry == "check_baseline":
        model, inputs = _model_and_inputs(e, kw)
        path = e.tmp / f"baseline{next(e.counter)}.npz"
        return ps.check_baseline(model, inputs, path, **{"update": True, **kw})
    if entry == "hyperparameter_sweep":
        model, inputs = _model_and_inputs(e, kw)
        return ps.hyperparameter_sweep(model, inputs, **{**FAST_SWEEP, **kw})
    if entry == "input_noise_stability":
        model, inputs = _model_and_inputs(e, kw)
        return ps.input_noise_stability(model, inputs, **{"metrics": ("ssim",), **kw})
    if entry == "explanation_consistency":
        models, inputs = _models_and_inputs(e, kw)
        return ps.explanation_consistency(models, inputs, **{"n_splits": 2, **kw})
    if entry == "seed_consistency":
        models, inputs = _models_and_inputs(e, kw)
        return seed_consistency(models, inputs, **{"n_splits": 2, **kw})
    if entry == "explainer_seed_stability":
        model, inputs = _model_and_inputs(e, kw)
        return ps.explainer_seed_stability(model, inputs, **{"method": "saliency", "seeds": (0, 1), **kw})
    if entry == "consistency_vs_ensemble_size":
        models, inputs = _models_and_inputs(e, kw)
        return ps.consistency_vs_ensemble_size(models, inputs, **{"sizes": (1,), "n_splits": 2, **kw})
    if entry == "causal_curves":
        model, inputs = _model_and_inputs(e, kw)
        return ps.causal_curves(model, inputs, kw.pop("attributions", "saliency"), **kw)
    raise AssertionError(entry)


EXPLAIN = "explain"
LR = "layer_randomization"
ASSERT_LR = "assert_sensitive_to_layer_randomization"
AGREEMENT = "agreement_matrix"
ASSERT_AGREEMENT = "assert_agreement_above"
COMPARE = "compare_maps"
BASELINE = "check_baseline"
SWEEP = "hyperparameter_sweep"
NOISE = "input_noise_stability"
CONSISTENCY = "explanation_consistency"
SEED_CONSISTENCY = "seed_consistency"
SEED_STABILITY = "explainer_seed_stability"
ENSEMBLE_SIZE = "consistency_vs_ensemble_size"
CURVES = "causal_curves"
MODEL_ENTRIES = (EXPLAIN, LR, ASSERT_LR, AGREEMENT, ASSERT_AGREEMENT, BASELINE, SWEEP, NOISE, CONSISTENCY,
                 SEED_CONSISTENCY, SEED_STABILITY, ENSEMBLE_SIZE, CURVES)


def _nan_inputs(e: SimpleNamespace) -> dict[str, Any]:
    x = e.x.clone()
    x[1, 0, 2, 3] = math.nan
    return {"inputs": x}


# --------------------------------------------------------------------------------------------
# the cases: (entry, case, overrides or a function of the environment, ACCEPT or a message regex)
# --------------------------------------------------------------------------------------------

CASES: list[tuple[str, str, Any, str]] = []


def _add(entries: Any, case: str, overrides: Any, expect: str) -> None:
    for entry in (entries,) if isinstance(entries, str) else entries:
        CASES.append((entry, case, overrides, expect))


# inputs and models
_add(MODEL_ENTRIES, "inputs_int", lambda e: {"inputs": (e.x * 255).long()}, r"inputs.*floating-point")
_add(MODEL_ENTRIES, "inputs_float64_for_float32_model", lambda e: {"inputs": e.x.double()}, r"inputs.*float64")
_add(MODEL_ENTRIES, "inputs_meta", lambda e: {"inputs": e.x.to("meta")}, r"inputs.*meta")
_add(MODEL_ENTRIES, "model_meta", lambda e: {"model": e.meta_model}, r"model.*meta")
_add(MODEL_ENTRIES, "inputs_rank3", lambda e: {"inputs": e.x[:, 0]}, r"inputs.*\(N, C, H, W\)")
_add(MODEL_ENTRIES, "inputs_empty", lambda e: {"inputs": e.x[:0]}, r"inputs.*empty batch")
_add(MODEL_ENTRIES, "inputs_nan", _nan_inputs, r"inputs.*NaN")
_add(COMPARE, "maps_int", lambda e: {"inputs": (e.x * 255).long()}, r"floating|dtype")
_add(COMPARE, "maps_meta", lambda e: {"inputs": e.x.to("meta")}, r"meta")
_add(COMPARE, "maps_empty", lambda e: {"inputs": e.x[:0]}, r"empty|N >= 1")
_add(COMPARE, "maps_nan", _nan_inputs, r"NaN")

# targets
TARGET_ENTRIES = tuple(e for e in MODEL_ENTRIES if e != SEED_CONSISTENCY)
_add(TARGET_ENTRIES, "target_out_of_range", {"target": 7}, r"target")
_add(TARGET_ENTRIES, "target_negative", {"target": -1}, r"target")
_add(TARGET_ENTRIES, "target_wrong_length", {"target": torch.tensor([0, 1, 2])}, r"target")
_add(TARGET_ENTRIES, "target_float", {"target": 1.5}, r"target")
_add(TARGET_ENTRIES, "target_float_tensor", {"target": torch.tensor([0.0, 1.0, 2.0, 0.0])}, r"target")

# seeds: any integer is accepted (negative, huge, numpy); anything else is refused
SEED_ENTRIES = tuple(e for e in MODEL_ENTRIES if e != SEED_STABILITY) + (COMPARE,)
for _value, _label in ((-5, "negative"), (2**70, "huge"), (np.int64(1), "numpy")):
    _add(SEED_ENTRIES, f"seed_{_label}", {"seed": _value}, ACCEPT)
    _add(SEED_STABILITY, f"seeds_{_label}", {"seeds": (_value, 7)}, ACCEPT)
for _value, _label in ((None, "none"), (1.5, "float"), ("1", "str")):
    _add(SEED_ENTRIES, f"seed_{_label}", {"seed": _value}, r"seed")
    _add(SEED_STABILITY, f"seeds_{_label}", {"seeds": (_value, 7)}, r"seeds")

# thresholds
NOT_NUMBERS = ((math.nan, "nan"), (math.inf, "inf"), (True, "bool"), ("0.5", "str"))
for _value, _label in NOT_NUMBERS:
    _add((LR, ASSERT_LR), f"sensitivity_threshold_{_label}", {"sensitivity_threshold": _value},
         r"sensitivity_threshold")
    _add((LR, ASSERT_LR), f"ssim_threshold_{_label}", {"ssim_threshold": _value}, r"ssim_threshold")
    _add((AGREEMENT, COMPARE, ASSERT_AGREEMENT, BASELINE, SWEEP, NOISE, SEED_CONSISTENCY, SEED_STABILITY),
         f"threshold_{_label}", {"threshold": _value}, r"threshold")
_add((LR, ASSERT_LR), "sensitivity_threshold_negative", {"sensitivity_threshold": -0.5}, r"sensitivity_threshold")
_add((LR, ASSERT_LR), "sensitivity_threshold_zero", {"sensitivity_threshold": 0.0}, r"sensitivity_threshold")
_add((LR, ASSERT_LR), "ssim_threshold_above_1", {"ssim_threshold": 1.5}, r"ssim_threshold")
# feature agreement and C lie in [0, 1]: a negative threshold passes everything
_add((AGREEMENT, COMPARE, ASSERT_AGREEMENT, SEED_CONSISTENCY), "threshold_negative", {"threshold": -0.5},
     r"threshold")
# SSIM lies in [-1, 1]: -0.5 is a valid threshold, -1.5 passes everything
_add((BASELINE, SWEEP, NOISE, SEED_STABILITY), "threshold_below_ssim_range", {"threshold": -1.5}, r"threshold")
_add((SWEEP, NOISE, SEED_STABILITY), "threshold_negative_ssim", {"threshold": -0.5}, ACCEPT)
for _value, _label in ((0.0, "zero"), (1.5, "above_1"), (math.nan, "nan"), ("0.9", "str")):
    _add((LR, ASSERT_LR, AGREEMENT, COMPARE), f"confidence_{_label}", {"confidence": _value}, r"confidence")
_add(LR, "adaptive_confidence_1", {"adaptive_confidence": 1.0, "images": "auto"}, r"adaptive_confidence")

# counts
BATCH_ENTRIES = (EXPLAIN, LR, ASSERT_LR, AGREEMENT, BASELINE, SWEEP, NOISE, CONSISTENCY, SEED_CONSISTENCY,
                 SEED_STABILITY, ENSEMBLE_SIZE, CURVES)
for _value, _label in ((0, "zero"), (-1, "negative"), (2.5, "float"), ("2", "str")):
    _add(BATCH_ENTRIES, f"batch_size_{_label}", {"batch_size": _value}, r"batch_size")
    _add((LR, ASSERT_LR, AGREEMENT, COMPARE, ASSERT_AGREEMENT), f"n_bootstrap_{_label}", {"n_bootstrap": _value},
         r"n_bootstrap")
_add((LR, SWEEP), "keep_maps_negative", {"keep_maps": -1}, r"keep_maps")
_add((LR, SWEEP), "keep_maps_float", {"keep_maps": 1.5}, r"keep_maps")
_add(LR, "keep_maps_zero", {"keep_maps": 0}, ACCEPT)
_add((EXPLAIN, LR, CONSISTENCY), "batch_size_numpy", {"batch_size": np.int64(2)}, ACCEPT)
_add(LR, "image_batch_zero", {"image_batch": 0, "images": "auto"}, r"image_batch")
_add(LR, "images_zero", {"images": 0}, r"images")
_add(LR, "depth_zero", {"depth": 0, "layers": "block"}, r"depth")
_add(CONSISTENCY, "n_splits_one", {"n_splits": 1}, r"n_splits")
_add(ENSEMBLE_SIZE, "sizes_zero", {"sizes": (0,)}, r"sizes")
_add(CURVES, "step_zero", {"step": 0}, r"step")
_add(CURVES, "step_float", {"step": 1.5}, r"step")
_add(NOISE, "n_draws_zero", {"n_draws": 0}, r"n_draws")
_add(NOISE, "variance_nan", {"variance": math.nan}, r"variance")
for _option, _method in (("n_steps", "integrated_gradients"), ("nt_samples", "smoothgrad")):
    for _value, _label in ((0, "zero"), (-1, "negative"), (2.5, "float")):
        case = f"{_option}_{_label}"
        _add((EXPLAIN, LR, ASSERT_LR, BASELINE, CONSISTENCY, SEED_STABILITY, NOISE), case,
             {"method": _method, _option: _value}, _option)
        _add(CURVES, case, {"attributions": _method, _option: _value}, _option)
        _add(AGREEMENT, case, {"methods": ["saliency", _method], "method_options": {_method: {_option: _value}}},
             _option)
        _add(SWEEP, case, {"method": _method, "sweep": {_option: [_value]}, "reference": {}}, _option)

# options with a fixed set of values
_add((AGREEMENT, COMPARE, ASSERT_AGREEMENT), "statistic_misspelled", {"statistic": "median!"}, r"statistic")
_add((AGREEMENT, COMPARE, ASSERT_AGREEMENT), "statistic_with_space", {"statistic": "mean "}, r"statistic")
_add((LR, CURVES), "mode_misspelled", {"mode": "random"}, r"mode")
_add(LR, "order_misspelled", {"order": "topdown"}, r"order")
_add(CURVES, "order_misspelled", {"order": "sgned"}, r"order")
_add(LR, "randomization_misspelled", {"randomization": "reinit!"}, r"randomization")
_add(LR, "constant_maps_misspelled", {"constant_maps": "drop"}, r"constant_maps")
_add(LR, "require_every_layer_str", {"require_every_layer": "no"}, r"require_every_layer")
_add(LR, "clip_negative_ssim_str", {"clip_negative_ssim": "yes"}, r"clip_negative_ssim")
_add((EXPLAIN, LR, ASSERT_LR, BASELINE, NOISE, CONSISTENCY, SEED_CONSISTENCY, SEED_STABILITY, ENSEMBLE_SIZE),
     "method_misspelled", {"method": "gradients"}, r"method")
_add(SWEEP, "method_misspelled", {"method": "gradients", "sweep": {"nt_samples": [2]}}, r"method")
_add((AGREEMENT, ASSERT_AGREEMENT), "method_misspelled", {"methods": ["saliency", "gradients"]}, r"method")
_add(CURVES, "method_misspelled", {"attributions": "gradients"}, r"method")
_add((AGREEMENT, COMPARE, CONSISTENCY, ENSEMBLE_SIZE), "metric_misspelled", {"metrics": ["ssimm"]}, r"metric")
_add((ASSERT_AGREEMENT, BASELINE, SEED_CONSISTENCY, SEED_STABILITY), "metric_misspelled", {"metric": "ssimm"},
     r"metric")
_add((SWEEP, NOISE), "metric_misspelled", {"metric": "ssimm", "threshold": 0.5}, r"metric")
_add((LR, AGREEMENT, COMPARE, BASELINE, SWEEP, NOISE, CONSISTENCY, SEED_STABILITY), "preset_misspelled",
     {"preset": "adebayo"}, r"preset")
_add((CONSISTENCY, ENSEMBLE_SIZE), "pairs_misspelled", {"pairs": "every"}, r"pairs")
_add(CURVES, "probability_misspelled", {"probability": "probabilities"}, r"probability")
_add(CURVES, "output_not_a_selector", {"output": 2.5}, r"output=2.5 \(float\) is not a way to select the scores")


def _overrides(spec: Any, e: SimpleNamespace) -> dict[str, Any]:
    return spec(e) if callable(spec) else dict(spec)


@pytest.mark.parametrize(
    "entry, overrides, expect",
    [pytest.param(entry, overrides, expect, id=f"{entry}-{case}") for entry, case, overrides, expect in CASES],
)
def test_bad_input(env: SimpleNamespace, entry: str, overrides: Any, expect: str) -> None:
    kw = _overrides(overrides, env)
    if expect == ACCEPT:
        try:
            _call(entry, env, kw)
        except SaliencyCheckFailed:
            pass  # a failed gate is a verdict: the call ran
        return
    with pytest.raises(SaliencyUsageError, match=expect):
        _call(entry, env, kw)


def test_the_battery_covers_every_entry_point_and_class() -> None:
    entries = {entry for entry, *_ in CASES}
    assert entries == {*MODEL_ENTRIES, COMPARE}
    assert len(CASES) > 300
