"""Bad input gets a SaliencyUsageError that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import SaliencyUsageError, explain, layer_randomization


@pytest.mark.parametrize(
    "model, inputs, message",
    [
        (lambda x: x, tiny_images(), "must be a torch.nn.Module"),
        (nn.ReLU(), tiny_images(), "has no parameters"),
        (nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), tiny_images(),
         r"uninitialized lazy parameters \['1.weight', '1.bias'\].*Run the model once"),
        (make_tiny_cnn(), tiny_images().numpy(), "must be a torch.Tensor"),
        (make_tiny_cnn(), (tiny_images() * 255).long(), "floating-point"),
        (make_tiny_cnn(), tiny_images()[:, 0], r"\(N, C, H, W\).*unsqueeze"),
        (make_tiny_cnn(), tiny_images()[:0], "empty batch"),
        (make_tiny_cnn(), torch.full((2, 1, 16, 16), float("nan")), "NaN or infinite"),
        (make_tiny_cnn(), tiny_images().to("meta"), "inputs are on the meta device: they have a shape but no values"),
        (make_tiny_cnn().to("meta"), tiny_images(), r"model TinyCNN is on the meta device.*to_empty"),
        (make_tiny_cnn().to("meta"), tiny_images().to("meta"), r"model TinyCNN is on the meta device"),
        (make_tiny_cnn(), tiny_images().double(),
         r"inputs are torch.float64 but the model's parameters are torch.float32.*inputs.to\(torch.float32\)"),
    ],
)
def test_bad_models_and_inputs(model, inputs, message):
    for call in (explain, layer_randomization):
        with pytest.raises(SaliencyUsageError, match=message):
            call(model, inputs)


def test_maps_smaller_than_the_ssim_window():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(SaliencyUsageError,
                       match=r"4x4, smaller than the SSIM window \(5x5\).*upsample the inputs.*win_size=3\)"):
        layer_randomization(model, torch.rand(3, 1, 4, 4))


@pytest.mark.parametrize("side", [1, 2])
def test_maps_too_small_for_any_ssim_window_get_advice_that_can_be_followed(side):
    """No odd window >= 3 fits maps under 3 pixels: the advice is to resize, never a win_size."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2 * side * side, 3))
    with pytest.raises(SaliencyUsageError, match=rf"No SSIM window fits {side}x{side} maps") as info:
        layer_randomization(model, torch.rand(3, 1, side, side))
    assert "win_size" not in str(info.value)


def test_nan_maps_from_a_custom_explainer():
    with pytest.raises(SaliencyUsageError, match="attribution maps from 'nan_maps' contain"):
        def nan_maps(model, inputs, target):
            return torch.full_like(inputs, float("nan"))

        layer_randomization(make_tiny_cnn(), tiny_images(), nan_maps)


def test_custom_explainer_with_the_wrong_batch_size():
    with pytest.raises(SaliencyUsageError, match="one map per input"):
        layer_randomization(make_tiny_cnn(), tiny_images(), lambda m, x, t: x[:1])


def test_constant_maps_error_or_skip():
    def half_constant(model, inputs, target):
        maps = inputs.clone()
        maps[:2] = 0.5
        return maps * (1 + model.fc.weight.abs().sum())

    with pytest.raises(SaliencyUsageError, match=r"constant for 2 of 6 image\(s\) \(indices \[0, 1\]\).*constant_maps='skip'"):
        layer_randomization(make_tiny_cnn(), tiny_images(), half_constant)
    from pytest_saliency import SaliencyWarning

    with pytest.warns(SaliencyWarning, match="left out"):
        result = layer_randomization(make_tiny_cnn(), tiny_images(), half_constant, constant_maps="skip")
    assert result.n_images == 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "random"}, "unknown mode 'random'"),
        ({"order": "topdown"}, "Did you mean 'top_down'"),
        ({"preset": "adebayo"}, "unknown preset"),
        ({"method": "gradients"}, "unknown method 'gradients'"),
        ({"layers": []}, "empty"),
        ({"confidence": 1.5}, "confidence"),
        ({"constant_maps": "drop"}, "constant_maps"),
        ({"sensitivity_threshold": float("nan")}, r"sensitivity_threshold must be a finite number"),
        ({"sensitivity_threshold": -0.5}, r"sensitivity_threshold .*got -0.5.*would pass every method"),
        ({"ssim_threshold": "0.99"}, r"ssim_threshold .*got '0.99'"),
        ({"adaptive_confidence": 1.0}, r"adaptive_confidence .*got 1.0"),
        ({"n_bootstrap": 0}, r"n_bootstrap must be an int >= 1, got 0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1 or None, got 0"),
        ({"batch_size": -1}, r"batch_size must be an int >= 1 or None, got -1"),
        ({"keep_maps": -1}, r"keep_maps must be an int >= 0, got -1"),
        ({"images": 0}, r"images must be an int >= 1, got 0"),
        ({"images": "some"}, r"unknown images 'some'"),
        ({"image_batch": 2.5}, r"image_batch must be an int >= 1, got 2.5"),
        ({"depth": 0, "layers": "block"}, r"depth must be an int >= 1, got 0"),
        ({"require_every_layer": "no"}, r"require_every_layer must be True or False, got 'no'"),
        ({"early_exit": None}, r"early_exit must be True or False"),
        ({"progress": "bar"}, r"progress must be None or a callable"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(SaliencyUsageError, match=message):
        layer_randomization(make_tiny_cnn(), tiny_images(), **options)


def test_usage_errors_are_value_errors():
    assert issubclass(SaliencyUsageError, ValueError)


def test_model_output_must_be_scores_for_a_predicted_target():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x).sum(1)

    with pytest.raises(SaliencyUsageError, match=r"\(N, num_classes\)"):
        explain(Scalar(), torch.rand(3, 4))


def test_numpy_counts_and_any_integer_seed_are_accepted():
    import numpy as np

    model, x = make_tiny_cnn(), tiny_images(4)
    a = layer_randomization(model, x, layers=["conv2", "fc"], seed=np.int64(-5), n_bootstrap=np.int64(20),
                            images=np.int64(3), batch_size=np.int64(2), keep_maps=np.int64(0))
    b = layer_randomization(model, x, layers=["conv2", "fc"], seed=-5, n_bootstrap=20, images=3, batch_size=2,
                            keep_maps=0)
    assert a.ssim == b.ssim and a.n_images == 3 and type(a.seed) is int
    assert layer_randomization(model, x, layers=["fc"], seed=2**70, n_bootstrap=20).seed == 2**70


def test_predicates_answer_and_checkers_return_the_canonical_value():
    """``is_*`` say yes or no and never raise; ``check_*`` return an int, float or bool, or raise."""
    import numpy as np

    from pytest_saliency.core.validation import check_count, check_flag, check_number, is_count, is_int, is_real

    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_real(0.5) and is_real(np.float32(2)) and not is_real(float("inf")) and not is_real(False)
    assert is_count(1) and not is_count(0) and is_count(0, minimum=0) and not is_count(2, minimum=3)
    assert not is_count("3") and not is_count(None)
    count = check_count(np.int64(4), "n")
    assert count == 4 and type(count) is int
    assert check_count(None, "n", allow_none=True) is None
    assert check_number(np.float32(0.5), "x", low=0, high=1) == 0.5
    assert check_flag(np.True_, "flag") is True
    with pytest.raises(SaliencyUsageError, match=r"rank_correlation: absolute must be True or False, got 'no'\. "
                                                 r"Pass absolute=True or absolute=False\."):
        check_flag("no", "absolute", where="rank_correlation: ")


def test_check_finite_is_the_one_finiteness_check_and_its_options():
    """Plural and singular names, meta tensors refused or passed, bad maps named, the caller's hint."""
    from pytest_saliency.core.validation import check_finite

    maps = torch.zeros(12, 2, 2)
    check_finite(maps, "maps")
    check_finite(torch.arange(4), "ints")  # integers cannot hold NaN or inf
    maps[[1, 11], 0, 1] = float("nan")
    maps[1, 1, 1] = float("inf")
    with pytest.raises(SaliencyUsageError, match=r"^maps contain 3 NaN or infinite value\(s\) out of 48\. Check the data"):
        check_finite(maps, "maps")
    with pytest.raises(SaliencyUsageError,
                       match=r"^argument a contains 3 NaN or infinite value\(s\) out of 48 \(in map\(s\) \[1, 11\]\)\. "
                             r"Drop them\.$"):
        check_finite(maps, "argument a", plural=False, per_map=True, hint="Drop them.")
    maps[:] = float("nan")
    with pytest.raises(SaliencyUsageError, match=r"\(in map\(s\) \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]\.\.\.\)"):
        check_finite(maps, "maps", per_map=True)
    meta = torch.empty(2, 3, device="meta")
    check_finite(meta, "a", plural=False, allow_meta=True)
    with pytest.raises(SaliencyUsageError, match=r"^a is on the meta device, which holds shapes but no values"):
        check_finite(meta, "a", plural=False)
    with pytest.raises(SaliencyUsageError, match=r"^inputs are on the meta device"):
        check_finite(meta, "inputs")
