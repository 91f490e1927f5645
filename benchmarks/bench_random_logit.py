"""Benchmark: ``random_logit`` against Quantus 0.6.0's ``RandomLogit`` on the digits CNN.

    pip install quantus==0.6.0            # after torch (the ``bench`` extra)
    python benchmarks/bench_random_logit.py [--images N] [--json out.json]

What it shows, on the example repo's digits CNN (``examples/digits_repo``), the first N test
digits (default 128), explained for the predicted class with the plain signed gradient (captum
``Saliency(abs=False)``, our ``"saliency"``):

1. **Equality.** Quantus's scores are reproduced from our check's own maps. Quantus draws the
   off-class with ``np.random.seed(42)`` once *per batch* (``batch_size=64``) and
   ``randint(0, C - 1)`` over the classes without the target; we pin ``classes=`` to those
   draws. Its maps are divided by ``max |a|`` over the whole batch (``normalise_by_max``; the
   target maps and the off-class maps each by their own batch maximum), flattened to 1-D rows and
   compared by scikit-image's SSIM of 1-D arrays (window 7, ``data_range`` = the pair's joint
   max - min). Doing the same to the raw maps our check returns (``keep_maps=N``, a preset that
   only sums channels), with our own SSIM (``compare.similarity.structural_similarity`` on
   (1, 1, H*W) maps, the 1-D window) gives Quantus's numbers to float32 precision.
2. **Why ours differs.** Our check compares 2-D maps (SSIM's window slides over neighbouring
   pixels, which is what the image's structure is), each map scaled on its own by the preset
   (``adebayo2018``: |a|, 99th-percentile clip, [0, 1], ``data_range=1``), so an input's score
   does not depend on which other inputs share its batch. Quantus's batch-max normalisation does:
   the benchmark renormalises the same maps over batches of 16 instead of 64 and reports how much
   the scores move. Quantus's per-batch reseeding also gives input i and input i + 64 the same
   off-class index; ours draws per example (seed, index in the whole stream).
3. **Verdict and controls.** Our check's S^I, mean SSIM and chance level, and the |x| control
   (class-independent: SSIM 1 in both, our check fails).

Runtime: well under a minute on a laptop CPU (the digits CNN is trained once and cached by the
example repo, a few seconds the first time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits_repo"))

QUANTUS_SEED = 42
QUANTUS_BATCH = 64


def quantus_draws(targets: np.ndarray, num_classes: int, batch_size: int = QUANTUS_BATCH,
                  seed: int = QUANTUS_SEED) -> np.ndarray:
    """Quantus 0.6.0's off-classes (``RandomLogit.evaluate_batch``): per batch, ``np.random.seed(seed)``
    and ``randint(0, C - 1, B)`` indexing the classes without the target, in ascending order."""
    out = []
    for start in range(0, len(targets), batch_size):
        y = targets[start:start + batch_size]
        index = np.random.RandomState(seed).randint(0, num_classes - 1, len(y))
        out.append(index + (index >= y))  # the index-th class of the list without y
    return np.concatenate(out)


def batch_max(maps: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Quantus's ``normalise_by_max`` applied per batch: each batch divided by its max |a|."""
    parts = [chunk / chunk.abs().max() for chunk in maps.split(batch_size)]
    return torch.cat(parts)


def ssim_1d_joint_range(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Quantus's ``similarity_func.ssim`` with our SSIM: 1-D rows, window 7, data_range of the pair."""
    from pytest_saliency.compare.similarity import structural_similarity

    values = []
    for aa, bb in zip(a.flatten(1).double(), b.flatten(1).double()):
        both = torch.cat([aa, bb])
        span = float(both.max() - both.min())
        values.append(float(structural_similarity(aa[None, None], bb[None, None], win_size=7, data_range=span)[0]))
    return values


def run_quantus(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray, explain: Any) -> list[float]:
    import quantus

    def explain_func(model: Any, inputs: Any, targets: Any, **kwargs: Any) -> Any:
        return explain(torch.as_tensor(inputs), torch.as_tensor(targets).long()).numpy()

    metric = quantus.RandomLogit(num_classes=10, seed=QUANTUS_SEED, abs=False, normalise=True,
                                 disable_warnings=True, display_progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = np.random.get_state()  # Quantus reseeds numpy's global generator
        try:
            scores = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=explain_func,
                            channel_first=True, device="cpu", batch_size=QUANTUS_BATCH)
        finally:
            np.random.set_state(state)
    return [float(s) for s in scores]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from digits_model import load_digits_32, load_or_train

    import pytest_saliency as ps
    from pytest_saliency.checks.random_logit import random_logit
    from pytest_saliency.maps.postprocess import MapPipeline, SSIMParams

    model = load_or_train(0)
    x = load_digits_32("test")[0][: args.images]
    with torch.no_grad():
        y = model(x).argmax(1).numpy()

    def saliency(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # what Quantus gets
        return ps.explain(model, inputs, "saliency", target=targets)

    def absolute_input(model: Any, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        return inputs.abs()

    out: dict[str, Any] = {"images": int(x.shape[0]), "model": "digits SmallCNN (examples/digits_repo)"}
    start = time.perf_counter()
    q_scores = run_quantus(model, x, y, saliency)
    out["quantus_seconds"] = time.perf_counter() - start

    # 1. our check with Quantus's draws, maps kept raw (signed, channels summed), then Quantus's conventions
    draws = quantus_draws(y, 10)
    raw = MapPipeline(name="raw", absolute=False, reduce="sum", normalize="none", ssim=SSIMParams(win_size=7))
    start = time.perf_counter()
    pinned = random_logit(model, x, "saliency", classes=torch.as_tensor(draws), preset=raw, keep_maps=x.shape[0])
    out["ours_pinned_seconds"] = time.perf_counter() - start
    assert pinned.other_targets == draws.tolist()
    mimic = ssim_1d_joint_range(batch_max(pinned.reference_maps, QUANTUS_BATCH),
                                batch_max(pinned.other_maps, QUANTUS_BATCH))
    difference = np.abs(np.array(mimic) - np.array(q_scores))
    out["equality"] = {"quantus_mean": float(np.mean(q_scores)), "mimic_mean": float(np.mean(mimic)),
                       "max_abs_difference": float(difference.max())}

    # 2. what the conventions do: batch-max over batches of 16; our check's 2-D SSIM on the same classes
    small = ssim_1d_joint_range(batch_max(pinned.reference_maps, 16), batch_max(pinned.other_maps, 16))
    moved = np.abs(np.array(small) - np.array(mimic))
    ours_same_classes = random_logit(model, x, "saliency", classes=torch.as_tensor(draws))
    out["conventions"] = {
        "quantus_batch16_vs_64_mean_abs_change": float(moved.mean()),
        "quantus_batch16_vs_64_max_abs_change": float(moved.max()),
        "ours_2d_ssim_mean_same_classes": ours_same_classes.mean_similarity,
        "quantus_draws_repeat_every_batch": bool(len(draws) > QUANTUS_BATCH and np.array_equal(
            (draws - (draws > y))[:QUANTUS_BATCH], (draws - (draws > y))[QUANTUS_BATCH:2 * QUANTUS_BATCH])),
    }

    # 3. our check as a user runs it, and the control in both
    start = time.perf_counter()
    ours = random_logit(model, x, "saliency")
    out["ours_seconds"] = time.perf_counter() - start
    control = random_logit(model, x, absolute_input)
    q_control = run_quantus(model, x, y, lambda inputs, targets: inputs.abs())
    out["ours"] = {"passed": ours.passed, "dataset_score": ours.stats.dataset_score,
                   "mean_ssim": ours.mean_similarity, "ci": list(ours.similarity_ci), "chance": ours.chance,
                   "fraction_different": ours.fraction_different}
    out["control_abs_x"] = {"ours_passed": control.passed, "ours_mean_ssim": control.mean_similarity,
                            "quantus_mean": float(np.mean(q_control))}

    print(json.dumps(out, indent=2))
    print(ours.summary())
    print(control.summary())
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    ok = difference.max() < 1e-4 and ours.passed and not control.passed
    print("equality with Quantus:", "OK" if difference.max() < 1e-4 else "MISMATCH", f"(max |diff| {difference.max():.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
