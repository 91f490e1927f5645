"""pytest-saliency: saliency-map sanity checks for PyTorch models, as pytest gates.

The public API is exported lazily (PEP 562) so that ``import pytest_saliency`` -- which pytest does
for every run in an environment where the plugin is installed -- never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import SaliencyCheckFailed, SaliencyUsageError, SaliencyWarning

__version__ = "0.1.0"

_LAZY = {
    "explain": "explainers",
    "METHODS": "explainers",
    "MapPipeline": "postprocess",
    "SSIMParams": "postprocess",
    "PRESETS": "postprocess",
    "apply_pipeline": "postprocess",
    "structural_similarity": "similarity",
    "pearson": "similarity",
    "spearman": "similarity",
    "layer_randomization": "parameter_randomization",
    "RandomizationResult": "parameter_randomization",
    "sensitivity_statistics": "statistics",
    "select_layers": "layers",
    "assert_sensitive_to_layer_randomization": "assertions",
    "assert_sensitive_to_cascading_randomization": "assertions",
    "assert_agreement_above": "assertions",
    "agreement_matrix": "agreement",
    "compare_maps": "agreement",
    "AgreementResult": "agreement",
    "METRICS": "metrics",
    "compute_metric": "metrics",
    "chance_level": "metrics",
    "MapCache": "cache",
    "explanation_consistency": "consistency",
    "seed_consistency": "consistency",
    "assert_seed_consistency_above": "consistency",
    "explainer_seed_stability": "consistency",
    "assert_explainer_seed_stable": "consistency",
    "ConsistencyResult": "consistency",
    "SeedStabilityResult": "consistency",
    "lr_separability": "consistency",
    "ensemble": "ensembles",
    "Ensemble": "ensembles",
    "perturbed_ensemble": "ensembles",
    "consistency_vs_ensemble_size": "ensembles",
    "EnsembleSizeResult": "ensembles",
    "ModelCache": "model_cache",
    "check_baseline": "baseline",
    "hyperparameter_sweep": "sweeps",
    "assert_stable_under_hyperparameters": "sweeps",
    "input_noise_stability": "sweeps",
    "assert_stable_under_input_noise": "sweeps",
    "add_input_noise": "sweeps",
    "sam_grid": "sweeps",
    "GRIDS": "sweeps",
    "SweepGrid": "sweeps",
    "SweepResult": "sweeps",
    "causal_curves": "faithfulness",
    "deletion": "faithfulness",
    "insertion": "faithfulness",
    "CausalCurves": "faithfulness",
    "accuracy_spread": "faithfulness",
    "AccuracySpread": "faithfulness",
}

__all__ = ["SaliencyCheckFailed", "SaliencyUsageError", "SaliencyWarning", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_saliency' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
