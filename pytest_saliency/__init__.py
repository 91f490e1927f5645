"""pytest-saliency: saliency-map sanity checks for PyTorch models, as pytest gates.

The public API is exported lazily (PEP 562) so that ``import pytest_saliency`` -- which pytest does
for every run in an environment where the plugin is installed -- never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import SaliencyCheckFailed, SaliencyRankFailed, SaliencyUsageError, SaliencyWarning

__version__ = "0.1.0"

_LAZY = {
    "explain": "maps.explainers",
    "Text": "core.forward",
    "Tabular": "core.forward",
    "Batches": "core.stream",
    "unsharded": "core.distributed",
    "static": "core.forward",
    "METHODS": "maps.methods",
    "MapPipeline": "maps.postprocess",
    "SSIMParams": "maps.postprocess",
    "PRESETS": "maps.postprocess",
    "apply_pipeline": "maps.postprocess",
    "structural_similarity": "compare.similarity",
    "pearson": "compare.similarity",
    "spearman": "compare.similarity",
    "layer_randomization": "checks.randomization",
    "input_shift_invariance": "checks.input_shift",
    "smooth_randomization": "checks.smooth_randomization",
    "efficient_randomization": "checks.efficient_randomization",
    "assert_efficient_randomization": "checks.efficient_randomization",
    "EfficientRandomizationResult": "checks.efficient_randomization",
    "discrete_entropy": "compare.complexity",
    "random_logit": "checks.random_logit",
    "assert_sensitive_to_random_logit": "checks.random_logit",
    "RandomLogitResult": "checks.random_logit",
    "data_randomization": "checks.data_randomization",
    "assert_sensitive_to_data_randomization": "checks.data_randomization",
    "DataRandomizationResult": "checks.data_randomization",
    "LabelPermutation": "checks.data_randomization",
    "assert_sensitive_to_smooth_randomization": "checks.smooth_randomization",
    "smoothed_explainer": "checks.smooth_randomization",
    "SmoothRandomizationResult": "checks.smooth_randomization",
    "assert_input_shift_invariant": "checks.input_shift",
    "InputShiftResult": "checks.input_shift",
    "RandomizationResult": "checks.randomization",
    "sensitivity_statistics": "compare.statistics",
    "select_layers": "model.layers",
    "assert_sensitive_to_layer_randomization": "checks.assertions",
    "assert_sensitive_to_cascading_randomization": "checks.assertions",
    "assert_agreement_above": "checks.assertions",
    "agreement_matrix": "checks.agreement",
    "compare_maps": "checks.agreement",
    "AgreementResult": "checks.agreement",
    "METRICS": "compare.metrics",
    "compute_metric": "compare.metrics",
    "chance_level": "compare.metrics",
    "MapCache": "maps.cache",
    "explanation_consistency": "checks.consistency",
    "seed_consistency": "checks.consistency",
    "assert_seed_consistency_above": "checks.consistency",
    "explainer_seed_stability": "checks.consistency",
    "assert_explainer_seed_stable": "checks.consistency",
    "ConsistencyResult": "checks.consistency",
    "ModelFidelity": "checks.consistency",
    "SeedStabilityResult": "checks.consistency",
    "lr_separability": "checks.consistency",
    "ensemble": "checks.ensembles",
    "Ensemble": "checks.ensembles",
    "perturbed_ensemble": "checks.ensembles",
    "connected_ensemble": "checks.ensembles",
    "strategy_ensembles": "checks.ensembles",
    "BezierCurve": "model.curves",
    "fit_curve": "model.curves",
    "consistency_vs_ensemble_size": "checks.ensembles",
    "EnsembleSizeResult": "checks.ensembles",
    "ModelCache": "model.cache",
    "check_baseline": "checks.regression",
    "hyperparameter_sweep": "checks.sweeps",
    "assert_stable_under_hyperparameters": "checks.sweeps",
    "input_noise_stability": "checks.input_noise",
    "assert_stable_under_input_noise": "checks.input_noise",
    "add_input_noise": "checks.input_noise",
    "sam_grid": "checks.sam_grids",
    "GRIDS": "checks.sam_grids",
    "SweepGrid": "checks.sam_grids",
    "SweepResult": "checks.sweeps",
    "causal_curves": "checks.faithfulness",
    "deletion": "checks.faithfulness",
    "insertion": "checks.faithfulness",
    "CausalCurves": "checks.faithfulness",
    "accuracy_spread": "checks.faithfulness",
    "AccuracySpread": "checks.faithfulness",
}

__all__ = ["SaliencyCheckFailed", "SaliencyRankFailed", "SaliencyUsageError", "SaliencyWarning", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_saliency' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
