"""Time to verdict: does ``images="auto"`` reach the full-N verdict, and with how many images?

For every setting (model x method x layer set x threshold) the IPR check runs twice on the same
N inputs: once on all of them, once adaptively (``image_batch`` images at a time, stopping when the
99% interval of S^I, and with ``require_every_layer`` each layer's mean SSIM, lies on one side of
its threshold), and once with ``early_exit=True`` (stop at the first decisive failure). The table
shows both verdicts, whether they agree, and how many images each mode used.

Settings are chosen to include easy passes, controls that must fail, and borderline cases
(a single BatchNorm layer whose maps barely move; thresholds set near the full-N S^I), because
adaptive stopping is only interesting where the answer is close.

    python benchmarks/bench_adaptive.py [--images 128] [--batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "digits_repo"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pytest_saliency import layer_randomization  # noqa: E402


def absolute_input(model: Any, inputs: Any, target: Any) -> Any:
    """A control that ignores the model: must fail, with S^I = 0."""
    return inputs.abs()


def settings(models: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model_name, (model, _) in models.items():
        for method, options in (("saliency", {}), ("input_x_gradient", {}), ("guided_backprop", {}),
                                ("integrated_gradients", {"n_steps": 8}), ("control", {})):
            rows.append({"model": model_name, "method": method, "options": options, "layers": "leaf",
                         "extra": {}})
        rows.append({"model": model_name, "method": "saliency", "options": {}, "layers": "leaf",
                     "extra": {"require_every_layer": True}})
    # Borderline: the digits CNN's bn2 alone (mean SSIM close to 0.99), and thresholds near S^I.
    rows.append({"model": "digits_cnn", "method": "saliency", "options": {}, "layers": ["bn2"], "extra": {}})
    rows.append({"model": "digits_cnn", "method": "input_x_gradient", "options": {}, "layers": ["bn2"], "extra": {}})
    rows.append({"model": "digits_cnn", "method": "saliency", "options": {}, "layers": ["bn1", "bn2"],
                 "extra": {"require_every_layer": True}})
    for factor in (0.9, 0.97, 1.03, 1.1):
        rows.append({"model": "digits_cnn", "method": "saliency", "options": {}, "layers": "leaf",
                     "extra": {"near": factor}})
    return rows


def build_models(n: int) -> dict[str, tuple[Any, Any]]:
    from digits_model import load_digits_32, load_or_train
    from models import build

    x_digits, _ = load_digits_32("test")
    g = torch.Generator().manual_seed(0)
    return {
        "digits_cnn": (load_or_train(0), x_digits[:n]),
        "small_cnn_random": (build("small_cnn3", seed=1, calibrate_shape=(16, 3, 32, 32)), torch.rand(n, 3, 32, 32, generator=g)),
    }


def run(n: int, batch: int) -> list[dict[str, Any]]:
    models = build_models(n)
    results = []
    for setting in settings(models):
        model, x = models[setting["model"]]
        method = absolute_input if setting["method"] == "control" else setting["method"]
        extra = dict(setting["extra"])
        near = extra.pop("near", None)
        common = dict(layers=setting["layers"], **setting["options"], **extra)
        start = time.perf_counter()
        full = layer_randomization(model, x, method, **common)
        full_seconds = time.perf_counter() - start
        if near is not None:  # put the threshold just below / above the full-N S^I
            common["sensitivity_threshold"] = full.stats.dataset_score * near
            full = layer_randomization(model, x, method, **common)
        start = time.perf_counter()
        auto = layer_randomization(model, x, method, images="auto", image_batch=batch, **common)
        auto_seconds = time.perf_counter() - start
        gate = layer_randomization(model, x, method, early_exit=True, image_batch=batch, **common)
        results.append({
            "model": setting["model"], "method": setting["method"],
            "layers": setting["layers"] if isinstance(setting["layers"], str) else ",".join(setting["layers"]),
            "options": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in {**setting["options"], **extra,
                        **({"sensitivity_threshold": common["sensitivity_threshold"]} if near else {})}.items()},
            "S_I_full": full.stats.dataset_score, "full_passed": full.passed, "auto_passed": auto.passed,
            "gate_passed": gate.passed, "agree": full.passed == auto.passed == gate.passed,
            "images_full": full.n_images, "images_auto": auto.n_images, "images_gate": gate.n_images,
            "seconds_full": full_seconds, "seconds_auto": auto_seconds,
        })
        row = results[-1]
        print(f"{row['model']:<17} {row['method']:<21} {row['layers']:<10} {str(row['options']):<42} "
              f"S^I={row['S_I_full']:.4f} full={'PASS' if row['full_passed'] else 'FAIL'} "
              f"auto={'PASS' if row['auto_passed'] else 'FAIL'}({row['images_auto']}) "
              f"gate={'PASS' if row['gate_passed'] else 'FAIL'}({row['images_gate']})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = run(args.images, args.batch)
    agree = sum(r["agree"] for r in results)
    used = sum(r["images_auto"] for r in results) / sum(r["images_full"] for r in results)
    print(f"\n{agree} of {len(results)} settings: adaptive and early-exit verdicts equal the full-N verdict")
    print(f"adaptive mode used {used:.0%} of the images on average "
          f"({sum(r['seconds_auto'] for r in results):.1f} s vs {sum(r['seconds_full'] for r in results):.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if agree == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
