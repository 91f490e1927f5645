"""Benchmark: Smooth MPRT (sMPRT) against Quantus 0.6.0's ``SmoothMPRT`` on the digits CNN.

    python benchmarks/bench_smprt.py [--images N] [--samples K] [--json out.json]

Needs the ``bench`` extra (``pip install quantus==0.6.0`` after torch). Runs on the CPU in well
under 5 minutes (digits CNN, 16 images, 50 samples).

What is compared, per (layer, image): Spearman's rho between the original model's smoothed map
and the smoothed map after cascading, bottom-up randomization up to that layer.

``ours``     ``pytest_saliency.checks.smooth_randomization.smooth_randomization(model, x, "saliency",
             n_samples=K, noise_level=0.1, include_clean=True, mode="cascading", order="bottom_up",
             similarity="spearman", preset=<|a| summed over channels, no normalization>)``.
``quantus``  ``quantus.SmoothMPRT(nr_samples=K, noise_magnitude=0.1, layer_order="bottom_up",
             abs=True, normalise=True)`` with ``explain_func_kwargs={"method": "Gradient"}``.

Made equal for the comparison (and why the defaults differ):

- **Method.** Quantus calls ``quantus.explain`` whatever ``explain_func`` is given (it only
  asserts that it is callable), so the method is chosen by ``explain_func_kwargs["method"]``.
  ``"Gradient"`` is captum's ``Saliency(abs=False)`` summed over channels: our ``saliency``
  (signed). Quantus's ``"Saliency"`` is captum's default ``abs=True``, i.e. ``|grad|`` of every
  noisy copy *before* averaging; ours averages the signed gradients and the preset takes the
  absolute value of the mean (as Quantus does with ``"Gradient"``). Reported as a second row.
- **Noise.** Quantus draws ``np.random.randn`` from the unseeded global numpy RNG, afresh for
  every model state (and for its own re-drawn "original" maps). Here ``np.random.randn`` is
  patched for the call to return our draws (``SmoothedExplainer.noise``: the same standard
  normals for every state, copy k of an input in call k of each sweep), so both sides average
  the same noisy copies. Quantus's std is ``0.1 x (max - min)`` in float32; ours in float64
  (differences of ~1e-8 in the noisy inputs). Ours keeps the noise of every state the same on
  purpose (common random numbers): with fresh noise per state a model-independent map changes
  between states by the noise alone. Quantus's own draws are run too and reported.
- **Randomized states.** Quantus deep-copies the model and, per layer, reseeds the *global* torch
  RNG with ``seed + 1`` and calls ``reset_parameters()`` (BatchNorm: weight 1, bias 0, running
  statistics reset: the identity). Ours randomizes in place with per-layer seeds, draws
  BatchNorm's constants from a Gaussian and keeps running statistics. For the comparison every
  layer gets an instance ``reset_parameters`` that writes fixed draws (a local generator keyed
  by the layer's name, buffers untouched); both tools call it (ours runs a user-defined
  ``reset_parameters`` as written), so the states are identical. The layer order is the same
  (conv1, bn1, conv2, bn2, fc1, fc2: registration order = execution order here).
- **Maps and comparison.** Quantus normalises by the batch's second moment (one scalar per
  batch) and takes ``abs`` after the mean; ours takes ``|mean|`` summed over channels, no
  normalization. Both are monotone per map, so Spearman is unchanged. Quantus's Spearman is
  ``scipy.stats.spearmanr`` (ties get average ranks); ours too (the maps have exact zeros).
  The digits images have one channel, so summing channels before or after ``abs`` is the same.

Tolerance: |rho_ours - rho_quantus| <= 1e-4 per (layer, image), with the patched noise. The exit
status is 1 if it is exceeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "digits_repo"))

from pytest_saliency.checks.smooth_randomization import (
    smooth_randomization,
    smoothed_explainer,
)
from pytest_saliency.core.rng import derive_seed
from pytest_saliency.maps.postprocess import MapPipeline

TOLERANCE = 1e-4
SEED = 0
#: |a| summed over channels, no normalization: a monotone map of Quantus's normalise + abs.
RAW_ABS = MapPipeline(name="abs_sum", absolute=True, reduce="sum", normalize="none")


def fixed_resets(model: nn.Module) -> None:
    """Give every layer with ``reset_parameters`` one that writes fixed draws (keyed by the layer's
    name, from a local generator) into its parameters and leaves its buffers alone; a bound method,
    so that Quantus's ``deepcopy`` rebinds it to the copy."""

    def reset(self: nn.Module) -> None:
        generator = torch.Generator().manual_seed(derive_seed(SEED, "bench_smprt", self._bench_name))
        with torch.no_grad():
            for parameter in self.parameters(recurse=False):
                scale = float(parameter.std()) if parameter.numel() > 1 and float(parameter.std()) > 0 else 0.1
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)

    for name, module in model.named_modules():
        if callable(getattr(module, "reset_parameters", None)):
            module._bench_name = name
            module.reset_parameters = types.MethodType(reset, module)


@contextlib.contextmanager
def patched_randn(draws: np.ndarray) -> Any:
    """``np.random.randn`` returns ``draws[:, k]`` on its k-th call of each sweep (K - 1 calls per sweep)."""
    original = np.random.randn
    calls = [0]

    def randn(*shape: int) -> np.ndarray:
        k = calls[0] % draws.shape[1]
        calls[0] += 1
        if tuple(shape) != draws[:, k].shape:
            raise RuntimeError(f"quantus asked for noise of shape {shape}, expected {draws[:, k].shape}")
        return draws[:, k].copy()

    np.random.randn = randn
    try:
        yield calls
    finally:
        np.random.randn = original


def run_quantus(model: nn.Module, x: torch.Tensor, y: np.ndarray, samples: int, method: str,
                draws: np.ndarray | None) -> dict[str, list[float]]:
    import quantus

    metric = quantus.SmoothMPRT(nr_samples=samples, noise_magnitude=0.1, layer_order="bottom_up", seed=SEED,
                                abs=True, normalise=True, disable_warnings=True, display_progressbar=False)
    patch = patched_randn(draws) if draws is not None else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), patch:
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=quantus.explain,
                        explain_func_kwargs={"method": method}, channel_first=True, device="cpu",
                        batch_size=int(x.shape[0]))
    return {k: [float(v) for v in values] for k, values in scores.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from digits_model import load_digits_32, load_or_train

    model = load_or_train(seed=0)
    fixed_resets(model)
    x = load_digits_32("test")[0][:args.images]
    with torch.no_grad():
        y = model(x).argmax(1).numpy()

    start = time.perf_counter()
    ours = smooth_randomization(model, x, "saliency", n_samples=args.samples, noise_level=0.1, include_clean=True,
                                mode="cascading", order="bottom_up", similarity="spearman", preset=RAW_ABS,
                                seed=SEED)
    ours_seconds = time.perf_counter() - start
    draws = smoothed_explainer(model, x, "saliency", n_samples=args.samples, seed=SEED).noise(x).double().numpy()

    start = time.perf_counter()
    patched = run_quantus(model, x, y, args.samples, "Gradient", draws)
    quantus_seconds = time.perf_counter() - start
    fresh = run_quantus(model, x, y, args.samples, "Gradient", None)
    abs_first = run_quantus(model, x, y, args.samples, "Saliency", draws)

    layers = [k for k in patched if k != "original"]
    ours_rho = np.array(ours.ssim)
    rows = {name: np.array([values[k] for k in layers]) for name, values in
            (("quantus_patched", patched), ("quantus_fresh_noise", fresh), ("quantus_saliency_abs_first", abs_first))}
    diff = np.abs(ours_rho - rows["quantus_patched"])
    result = {
        "images": args.images, "samples": args.samples, "layers": layers, "ours_layers": ours.layers,
        "tolerance": TOLERANCE, "max_abs_diff_patched": float(diff.max()),
        "mean_rho": {"ours": ours_rho.mean(1).tolist(), **{k: v.mean(1).tolist() for k, v in rows.items()}},
        "max_abs_diff": {k: float(np.abs(ours_rho - v).max()) for k, v in rows.items()},
        "quantus_original": {"patched": float(np.mean(patched["original"])),
                             "fresh_noise": float(np.mean(fresh["original"]))},
        "seconds": {"ours": ours_seconds, "quantus_patched": quantus_seconds},
        "ours_S_I": ours.stats.dataset_score, "ours_passed": ours.passed,
    }
    print(f"sMPRT vs Quantus 0.6.0 SmoothMPRT: digits CNN, {args.images} images, {args.samples} samples, "
          "cascading bottom-up, Spearman")
    print(f"  layers (ours / quantus): {ours.layers} / {layers}")
    print(f"  {'layer':<8}{'ours':>10}{'q patched':>12}{'q fresh':>10}{'q |g| first':>13}")
    for i, layer in enumerate(layers):
        print(f"  {layer:<8}{ours_rho[i].mean():>10.5f}{rows['quantus_patched'][i].mean():>12.5f}"
              f"{rows['quantus_fresh_noise'][i].mean():>10.5f}{rows['quantus_saliency_abs_first'][i].mean():>13.5f}")
    print(f"  max |ours - quantus| per (layer, image): patched noise {diff.max():.2e} (tolerance {TOLERANCE:g}); "
          f"Quantus's own noise {result['max_abs_diff']['quantus_fresh_noise']:.3f}; "
          f"|grad| before averaging {result['max_abs_diff']['quantus_saliency_abs_first']:.3f}")
    print(f"  Quantus 'original' (its a_batch vs a re-drawn original): patched {result['quantus_original']['patched']:.5f}, "
          f"own noise {result['quantus_original']['fresh_noise']:.5f}")
    print(f"  time: ours {ours_seconds:.1f} s, quantus {quantus_seconds:.1f} s; ours S^I = {ours.stats.dataset_score:.4f}"
          f" ({'PASS' if ours.passed else 'FAIL'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = ours.layers == layers and diff.max() <= TOLERANCE
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
