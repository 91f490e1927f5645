"""CUDA: a check on a GPU gives the CPU's numbers (same seed, same randomized weights), its replays
give the full captum passes' numbers, and it leaves the model and every generator (the CPU's and
each GPU's) exactly as they were.

The whole module skips where CUDA is not available (CI has no GPU). On a GPU machine:
``pytest tests/test_cuda.py``. The comparisons with the CPU turn TF32 off for the duration of the
test (cuDNN convolutions default to TF32 on Ampere and later, which differs from float32 in the
fourth digit); the comparisons within CUDA (replay against full captum passes) keep the defaults.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import (
    SaliencyUsageError, agreement_matrix, check_baseline, explainer_seed_stability, layer_randomization,
)
from pytest_saliency.core.fingerprint import weighted_checksum
from test_activation_reuse import FunctionalTricks, assert_unchanged, make_residual, snapshot

#: ``SALIENCY_TEST_DEVICE=cpu`` runs this module on the CPU: a dry run of the tests themselves
#: (their comparisons then hold trivially) before GPU time is spent on them.
CUDA = torch.device(os.environ.get("SALIENCY_TEST_DEVICE", "cuda:0"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

#: Every replay path: gradient replay (plain, x input, IG steps, SmoothGrad samples), the methods that
#: run full captum passes (guided backprop, DeepLIFT, guided Grad-CAM), and the occlusion state stack.
METHOD_OPTIONS = {
    "saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 6},
    "smoothgrad": {"nt_samples": 5}, "guided_backprop": {}, "deeplift": {}, "guided_gradcam": {},
    "occlusion": {"window": 4, "stride": 2}, "lime": {"n_samples": 32, "grid": 4, "alpha": 1e-4},
}


@pytest.fixture
def exact_float32():
    """float32 matrix products and convolutions without TF32, restored afterwards."""
    if CUDA.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rng_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return (torch.random.get_rng_state(), cuda, np.random.get_state()[1].copy(),
            random.getstate())


def assert_rngs_unchanged(before: tuple) -> None:
    after = rng_states()
    assert torch.equal(after[0], before[0])
    assert len(after[1]) == len(before[1]) and all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    assert np.array_equal(after[2], before[2]) and after[3] == before[3]


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("mode", ["independent", "cascading"])
def test_reuse_equals_full_passes_on_cuda(method: str, mode: str) -> None:
    # captum's DeepLIFT refuses a module called twice, as the residual net's shared ReLU is.
    model = make_tiny_cnn() if method == "deeplift" else make_residual()
    model, x = model.to(CUDA), tiny_images(5, seed=3).to(CUDA)
    before, rngs = snapshot(model), rng_states()
    kwargs = {"mode": mode, "seed": 4, **METHOD_OPTIONS[method]}
    fast = layer_randomization(model, x, method, **kwargs)
    slow = layer_randomization(model, x, method, reuse_activations=False, **kwargs)
    assert fast.device == slow.device == str(CUDA)  # (the kept maps are moved to the CPU for reports)
    assert fast.layers == slow.layers
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.original_maps, slow.original_maps, rtol=1e-4, atol=1e-5)
    assert fast.passed == slow.passed
    assert_unchanged(model, before)
    assert_rngs_unchanged(rngs)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad", "occlusion", "deeplift"])
def test_cuda_gives_the_cpus_numbers(method: str, exact_float32) -> None:
    """Same model, inputs and seed: the same randomized weights (every draw comes from the CPU
    generator, whatever the model's device), so the same SSIM up to rounding."""
    model, x = make_tiny_cnn(), tiny_images(6, seed=1)
    kwargs = {"mode": "independent", "seed": 2, **METHOD_OPTIONS[method]}
    if method == "smoothgrad":
        # SmoothGrad's noise is drawn on the device of the inputs: the CUDA stream differs from the
        # CPU's, so compare without noise (the sample loop and averaging are still exercised).
        kwargs["noise_level"] = 0.0
    cpu = layer_randomization(model, x, method, **kwargs)
    gpu = layer_randomization(model.to(CUDA), x.to(CUDA), method, **kwargs)
    model.cpu()
    assert gpu.layers == cpu.layers
    np.testing.assert_allclose(gpu.ssim, cpu.ssim, rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu.original_maps.cpu(), cpu.original_maps, rtol=1e-4, atol=1e-5)
    assert gpu.stats.dataset_score == pytest.approx(cpu.stats.dataset_score, abs=1e-4)
    assert gpu.passed == cpu.passed


@pytest.mark.parametrize("randomization", ["gaussian", "permute"])
def test_every_strategy_draws_the_same_weights_on_cuda_as_on_the_cpu(randomization: str, exact_float32) -> None:
    model, x = make_residual(), tiny_images(4, seed=6)
    cpu = layer_randomization(model, x, "saliency", randomization=randomization, seed=3)
    gpu = layer_randomization(model.to(CUDA), x.to(CUDA), "saliency", randomization=randomization, seed=3)
    model.cpu()
    np.testing.assert_allclose(gpu.ssim, cpu.ssim, rtol=0, atol=1e-4)


def test_seeded_noise_on_cuda_is_reproducible_and_leaves_every_generator_alone() -> None:
    model, x = make_residual().to(CUDA), tiny_images(4, seed=5).to(CUDA)
    saved = rng_states()[1]
    try:
        if CUDA.type == "cuda":
            torch.cuda.manual_seed(123)  # a user's own seeding must survive the check
        after_seeding = rng_states()
        first = layer_randomization(model, x, "smoothgrad", nt_samples=4, seed=9)
        second = layer_randomization(model, x, "smoothgrad", nt_samples=4, seed=9)
        other = layer_randomization(model, x, "smoothgrad", nt_samples=4, seed=10)
        # The same draws; cuDNN's backward kernels may sum in another order, so equal up to rounding.
        torch.testing.assert_close(first.original_maps, second.original_maps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(first.ssim, second.ssim, rtol=0, atol=1e-5)
        assert (first.original_maps - other.original_maps).abs().max() > 1e-2
        assert_rngs_unchanged(after_seeding)
    finally:  # the test's own seeding is undone
        if saved:
            torch.cuda.set_rng_state_all(saved)


@pytest.mark.parametrize("source", ["torch", "dropout"])
def test_a_model_drawing_on_the_gpu_reproduces_and_leaves_the_gpus_generator_alone(source: str) -> None:
    from test_model_randomness import LAYERS, images, noisy_model

    model, x = noisy_model(source).to(CUDA), images().to(CUDA)
    saved = rng_states()[1]
    try:
        if CUDA.type == "cuda":
            torch.cuda.manual_seed(321)
        before = rng_states()
        reused = layer_randomization(model, x, "saliency", layers=LAYERS, seed=2)
        assert_rngs_unchanged(before)
        full = layer_randomization(model, x, "saliency", layers=LAYERS, seed=2, reuse_activations=False)
        assert not reused.reused_activations
        np.testing.assert_allclose(reused.ssim, full.ssim, rtol=0, atol=1e-5)
        dead = layer_randomization(model, x, "saliency", layers=["dead"], seed=2)
        assert np.min(dead.ssim) > 1 - 1e-5  # every pass drew the same noise on the GPU
        assert_rngs_unchanged(before)
    finally:
        if saved:
            torch.cuda.set_rng_state_all(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_checksum_sees_a_swap_of_unequal_values_on_cuda(dtype: torch.dtype) -> None:
    values = torch.randn(3, 4099 * 2 + 5, generator=torch.Generator().manual_seed(0)).to(dtype).to(CUDA)
    base = weighted_checksum(values)
    assert base.device == CUDA
    swapped = values.clone()
    swapped[1, 10], swapped[1, 11] = values[1, 11], values[1, 10]
    assert not torch.equal(weighted_checksum(swapped), base)
    assert torch.equal(weighted_checksum(values.clone()), base)


def test_chunks_sized_by_a_tiny_memory_budget_give_the_same_numbers() -> None:
    model, x = make_residual().to(CUDA), tiny_images(6, seed=7).to(CUDA)
    whole = layer_randomization(model, x, "integrated_gradients", n_steps=6, seed=1)
    chunked = layer_randomization(model, x, "integrated_gradients", n_steps=6, seed=1, memory_budget=1)
    np.testing.assert_allclose(chunked.ssim, whole.ssim, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad"])
def test_functional_code_gives_the_same_numbers_with_and_without_reuse_on_cuda(method: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FunctionalTricks().eval().to(CUDA)
    x = tiny_images(4, seed=2).to(CUDA)
    options = METHOD_OPTIONS[method]
    fast = layer_randomization(model, x, method, layers=["conv1", "conv2", "fc"], **options)
    slow = layer_randomization(model, x, method, layers=["conv1", "conv2", "fc"], reuse_activations=False, **options)
    np.testing.assert_allclose(fast.ssim, slow.ssim, rtol=0, atol=2e-5)


def test_an_error_in_the_middle_leaves_the_model_and_generators_untouched_on_cuda() -> None:
    model, x = make_residual().to(CUDA), tiny_images(4).to(CUDA)
    before, rngs = snapshot(model), rng_states()

    def progress(done: int, total: int, label: str) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layer_randomization(model, x, "smoothgrad", nt_samples=3, progress=progress)
    assert_unchanged(model, before)
    assert_rngs_unchanged(rngs)


@pytest.mark.skipif(CUDA.type != "cuda", reason="needs two devices")
def test_inputs_on_another_device_are_a_usage_error() -> None:
    model = make_tiny_cnn().to(CUDA)
    with pytest.raises(SaliencyUsageError, match=rf"model is on {CUDA} but inputs are on cpu"):
        layer_randomization(model, tiny_images(3), "saliency")
    with pytest.raises(SaliencyUsageError, match=rf"model is on cpu but inputs are on {CUDA}"):
        layer_randomization(make_tiny_cnn(), tiny_images(3).to(CUDA), "saliency")


def test_other_checks_run_on_cuda_and_match_the_cpu(tmp_path, exact_float32) -> None:
    model, x = make_tiny_cnn(), tiny_images(6, seed=4)
    cpu_agreement = agreement_matrix(model, x, ["saliency", "input_x_gradient"])
    cpu_stability = explainer_seed_stability(model, x, "smoothgrad", nt_samples=4, noise_level=0.0)
    model.to(CUDA)
    gpu_agreement = agreement_matrix(model, x.to(CUDA), ["saliency", "input_x_gradient"])
    gpu_stability = explainer_seed_stability(model, x.to(CUDA), "smoothgrad", nt_samples=4, noise_level=0.0)
    assert len(gpu_agreement.pairs) == len(cpu_agreement.pairs) > 0
    for gpu_pair, cpu_pair in zip(gpu_agreement.pairs, cpu_agreement.pairs):
        assert (gpu_pair.method_a, gpu_pair.method_b, gpu_pair.metric) == (cpu_pair.method_a, cpu_pair.method_b,
                                                                           cpu_pair.metric)
        # Top-k metrics can flip one near-tied pixel between devices: a tolerance of 1/200 of a map.
        assert gpu_pair.mean == pytest.approx(cpu_pair.mean, abs=5e-3), gpu_pair.metric
    assert gpu_stability.passed == cpu_stability.passed
    # A baseline written from the CPU's maps is met by the GPU's, and one written on the GPU too.
    model.cpu()
    path = tmp_path / "baseline.npz"
    written = check_baseline(model, x, path, "saliency", update=True)
    model.to(CUDA)
    on_gpu = check_baseline(model, x.to(CUDA), path, "saliency")
    assert written.passed and on_gpu.passed, on_gpu.summary() if hasattr(on_gpu, "summary") else on_gpu


def test_the_plugin_runs_a_check_on_cuda(pytester) -> None:
    pytester.makeconftest("import torch  # loaded before pytester snapshots sys.modules")
    pytester.makepyfile(
        """
        import torch
        from torch import nn

        def test_model(saliency, saliency_device):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
            model = model.to(saliency_device)
            assert saliency_device == torch.device({device!r})
            x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(saliency_device)
            saliency.assert_sensitive_to_layer_randomization(model, x, "saliency")
        """.replace("{device!r}", repr(str(CUDA)))
    )
    result = pytester.runpytest("--saliency", f"--saliency-device={CUDA}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_two_ranks_on_the_gpu_give_one_process_numbers(pytester) -> None:
    """--saliency-devices with two ranks on the GPU (sharing it: the ranks exchange results over
    gloo, NCCL is never started) gives one process's per-image SSIM within float tolerance and its
    verdict: the rank's device, the CUDA tensors of the exchanged first shard and the process group
    on CUDA (``SALIENCY_TEST_DEVICE=cpu``: two CPU ranks)."""
    import json

    pytester.makepyfile(
        """
        import torch
        from torch import nn

        def test_model(saliency, saliency_device):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
            model = model.to(saliency_device)
            assert saliency_device.type == {kind!r}
            x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(saliency_device)
            saliency.assert_sensitive_to_layer_randomization(model, x, "saliency")
        """.replace("{kind!r}", repr(CUDA.type))
    )
    common = ("--saliency", "--saliency-report=json", "--saliency-shard-size=8", "-p", "no:cacheprovider")
    one = pytester.runpytest_subprocess(*common, f"--saliency-device={CUDA}", timeout=300)
    one.assert_outcomes(passed=1)
    plain = json.loads((pytester.path / ".saliency" / "saliency-report.json").read_text())["results"][0]
    two = pytester.runpytest_subprocess(*common, f"--saliency-devices={CUDA},{CUDA}", "--saliency-timeout=120",
                                        timeout=300)
    two.assert_outcomes(passed=1)
    split = json.loads((pytester.path / ".saliency" / "saliency-report.json").read_text())["results"][0]
    assert split["passed"] == plain["passed"]
    assert np.allclose(split["result"]["ssim"], plain["result"]["ssim"], rtol=1e-5, atol=1e-6)
    assert (pytester.path / ".saliency" / "ranks" / "rank-1.log").exists()
