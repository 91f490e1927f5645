"""Saliency checks for the tabular network: run with `pytest --saliency`.

Ley et al. ("Consistent Explanations in the Face of Model Indeterminacy via Ensembling") find that
networks differing only in their initialization seed reach the same accuracy but explain
differently, and that averaging models into ensembles makes explanations agree. These tests
check both on the breast cancer data: retrained models must agree on their top-5 features far more
than chance, and disjoint ensembles must agree more as they grow.

The randomization checks run on the same feature vectors: integrated gradients must depend on
every layer's weights (IPR and CPR, maps compared by Spearman rank correlation, the tabular
default), and an "explanation" that ignores the model must be caught.
"""

import pytest
from tabular_model import POSITIVE_CLASS, ensemble_accuracy, feature_names, train

from pytest_saliency import SaliencyCheckFailed, Tabular, consistency_vs_ensemble_size, perturbed_ensemble

TOP_K = 5  # Ley et al.'s top-5 features
SIZES = (1, 2, 4, 8)  # ensemble sizes; size s needs 2 s models (two disjoint ensembles)
ENSEMBLE_SEEDS = tuple(range(16))
# Ley et al.'s local perturbation: N(0, sigma^2) noise on the first layer's biases, n copies per
# trained model. sigma 0.3 keeps test accuracy within 1% (their constraint); see README.md.
PERTURB = {"layer": "fc1", "parameter": "bias", "sigma": 0.3, "n": 20}
# Two cross-validation folds for the LR classifier behind C (155 model pairs per curve); the
# top-k metrics asserted below do not depend on it.
N_SPLITS = 2


def assert_grows_with_size(sa):
    """Top-5 SA for sizes 1, 2, 4, 8 rises with the ensemble size. Only what held on four disjoint
    sets of 16 seeds (0-15, 16-31, 32-47, 48-63; `benchmarks/ley_tabular.py --seed-offset`), vanilla
    and perturbed, is asserted: 1 < 2 < 4 (smallest step +0.016), size 4 at least 0.04 above single
    models (measured +0.055 to +0.14) and size 8 at least 0.03 above (+0.045 to +0.21). Size 8 is
    NOT always above size 4 (seeds 16-31: 0.665 < 0.679): it has a single pair of ensembles."""
    single, two, four, eight = sa
    assert single < two < four, sa
    assert four - single >= 0.04, sa
    assert eight - single >= 0.03, sa


def test_integrated_gradients_agree_across_seeds(saliency, inputs):
    """Five models differing only in their seed: the top-5 features of their integrated-gradients
    maps must overlap clearly more than chance (default gate: 2 x the chance level k/D = 5/30)."""
    result = saliency.assert_seed_consistency_above(
        train, inputs, metric="feature_agreement", seeds=(0, 1, 2, 3, 4),
        method="integrated_gradients", k=TOP_K, target=POSITIVE_CLASS,
    )
    assert result.threshold == pytest.approx(2 * TOP_K / inputs.shape[1])


@pytest.fixture(scope="module")
def trained(saliency_model_cache):
    """The 16 seeds, trained once (or loaded from the plugin's model cache)."""
    return [saliency_model_cache.get_or_train(train, seed) for seed in ENSEMBLE_SEEDS]


def test_models_are_accurate(trained, inputs, labels):
    """Every seed, and every ensemble, classifies the held-out inputs well (Ley et al.: seeds reach
    the same accuracy; ensembling does not hurt it)."""
    for size in SIZES:
        assert ensemble_accuracy(trained, size, inputs, labels) > 0.9


def test_vanilla_ensembles_agree_more_as_they_grow(saliency, saliency_model_cache, trained, inputs, labels):
    """Ley et al.'s vanilla ensembles: top-5 sign agreement (SA) of input gradients between disjoint
    ensembles rises with the number of members (sizes 1, 2, 4, 8 from 16 seeds)."""
    # `trained` filled the model cache: the factory's 16 seeds are loaded from it here.
    result = saliency.record(consistency_vs_ensemble_size(
        train, inputs, sizes=SIZES, seeds=ENSEMBLE_SEEDS, cache=saliency_model_cache, method="saliency",
        target=POSITIVE_CLASS, metrics=("sign_agreement", "feature_agreement", "signed_set_agreement"),
        k=TOP_K, n_splits=N_SPLITS, labels=labels,
    ))
    sa = result.series("sign_agreement")
    print("vanilla top-5 SA by size", dict(zip(SIZES, sa)))
    assert sa[0] > 2 * TOP_K / (2 * inputs.shape[1]), sa  # single models: above 2 x chance (k / 2D)
    assert_grows_with_size(sa)


def test_perturbed_ensembles_grow_and_keep_accuracy(saliency, trained, inputs, labels):
    """Ley et al.'s local (weight-perturbation) ensembles: each trained model becomes 20 copies with
    noise on the first layer's biases. Their agreement also rises with the ensemble size, and the
    noise costs at most 1 point of accuracy. (That they agree *more* than vanilla ensembles of the
    same size, as Ley et al. found on their data, did not hold here: see README.md.)"""
    perturbed = {f"seed={seed}~perturbed": perturbed_ensemble(model, seed=seed, **PERTURB)
                 for seed, model in zip(ENSEMBLE_SEEDS, trained)}
    result = saliency.record(consistency_vs_ensemble_size(
        perturbed, inputs, sizes=SIZES, method="saliency", target=POSITIVE_CLASS,
        metrics=("sign_agreement", "feature_agreement", "signed_set_agreement"), k=TOP_K, n_splits=N_SPLITS,
        labels=labels,
    ))
    sa = result.series("sign_agreement")
    print("perturbed top-5 SA by size", dict(zip(SIZES, sa)))
    assert_grows_with_size(sa)
    members = list(perturbed.values())
    for size in SIZES:
        drop = ensemble_accuracy(trained, size, inputs, labels) - ensemble_accuracy(members, size, inputs, labels)
        assert drop <= 0.01, (size, drop)


@pytest.fixture(scope="module")
def model(saliency_model_cache):
    """One trained network (seed 0)."""
    return saliency_model_cache.get_or_train(train, 0)


@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_integrated_gradients_depend_on_every_layer(saliency, model, inputs, mode):
    """Adebayo et al.'s parameter randomization on feature vectors: randomizing any layer (IPR) or
    the layers from the output down (CPR) changes the feature ranking of the maps."""
    check = (saliency.assert_sensitive_to_layer_randomization if mode == "independent"
             else saliency.assert_sensitive_to_cascading_randomization)
    result = check(model, inputs, "integrated_gradients", n_steps=16,
                   modality=Tabular(feature_names=feature_names()), require_every_layer=True)
    assert result.similarity == "spearman"


def test_a_model_independent_explanation_is_caught(saliency, model, inputs):
    """The control: the features' magnitudes are no explanation of the model, and the check says so."""
    def magnitude(model, x, target):
        return x.abs()

    with pytest.raises(SaliencyCheckFailed, match="NOT sensitive"):
        saliency.assert_sensitive_to_layer_randomization(model, inputs, magnitude)
