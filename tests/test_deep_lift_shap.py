"""deep_lift_shap: captum's DeepLiftShap over a background set (Watson et al.'s SHAP variant), checked
against captum itself, against DeepLIFT averaged over the references, against its completeness
property, and inside the seed-consistency check."""

from __future__ import annotations

import captum.attr as ca
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images

import pytest_saliency as ps
from pytest_saliency.exceptions import SaliencyUsageError
from pytest_saliency.maps.baselines import gaussian_blur

DLS = "deep_lift_shap"
# captum's own notices when it is called directly here (the package silences them in its calls)
pytestmark = [pytest.mark.filterwarnings("ignore:Setting forward, backward hooks:UserWarning"),
              pytest.mark.filterwarnings("ignore:Input Tensor:UserWarning")]


def _background(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(11))


def test_a_background_tensor_gives_captums_deep_lift_shap_exactly():
    model, x, bg = make_tiny_cnn(), tiny_images(4), _background()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    maps = ps.explain(model, x, DLS, background=bg)
    target = model(x).argmax(1)
    expected = ca.DeepLiftShap(make_tiny_cnn()).attribute(x, baselines=bg, target=target)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
    # DeepLiftShap is DeepLIFT averaged over the references: an independent reference loop
    per_reference = [ca.DeepLift(make_tiny_cnn()).attribute(x, baselines=b.expand_as(x), target=target) for b in bg]
    torch.testing.assert_close(maps, torch.stack(per_reference).mean(0), rtol=1e-5, atol=1e-6)
    # completeness: the attributions sum to f(x) minus the mean of f over the background
    with torch.no_grad():
        gap = model(x).gather(1, target[:, None])[:, 0] - model(bg)[:, target].mean(0)
    torch.testing.assert_close(maps.flatten(1).sum(1), gap, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    # the background matters (a control that must fail): another set gives other maps
    assert not torch.allclose(ps.explain(model, x, DLS, background=_background(3) * 0.5), maps)


def test_default_background_is_a_zero_image_and_the_images_blur():
    model, x = make_tiny_cnn(), tiny_images(3)
    maps = ps.explain(model, x, DLS)
    target = model(x).argmax(1)
    for i in range(3):
        image = x[i:i + 1]
        refs = torch.cat([torch.zeros_like(image), gaussian_blur(image, sigma=1.0)])  # 16 px / 16 = 1 px
        expected = ca.DeepLiftShap(make_tiny_cnn()).attribute(image, baselines=refs, target=target[i:i + 1])
        torch.testing.assert_close(maps[i:i + 1], expected, rtol=0, atol=1e-6)
    # per image: an image's map does not depend on the others in its batch
    torch.testing.assert_close(ps.explain(model, x[1:2], DLS), maps[1:2], rtol=0, atol=1e-6)


def test_bad_backgrounds_are_refused():
    model, x = make_tiny_cnn(), tiny_images(2)
    for bad in (_background(1), torch.rand(4, 1, 8, 8), _background().double(), "zero", torch.rand(1, 16, 16)):
        with pytest.raises(SaliencyUsageError, match="background"):
            ps.explain(model, x, DLS, background=bad)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.raises(SaliencyUsageError, match="background="):
        ps.explain(mlp, torch.rand(6, 5), DLS)
    flat = ps.explain(mlp, torch.rand(6, 5), DLS, background=torch.rand(8, 5))  # feature vectors with a background
    assert flat.shape == (6, 5)


def test_seed_consistency_runs_with_deep_lift_shap():
    x = tiny_images(12)
    bg = _background(4)
    result = ps.seed_consistency(make_tiny_cnn, x, seeds=[0, 1], method=DLS, background=bg, n_splits=2)
    assert result.method == DLS and 0.0 <= result.consistency <= 1.0
    assert result.method_options.get("background") is not None
    same = ps.explanation_consistency([make_tiny_cnn(0), make_tiny_cnn(0)], x, method=DLS, background=bg, n_splits=2)
    assert same.consistency == pytest.approx(1.0)  # a model against itself: the maps cannot be told apart
