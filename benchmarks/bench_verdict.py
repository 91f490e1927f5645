"""Time to verdict in Sriram & Conati's setting: ResNet-50, 224x224, 900 images, 7 methods, every block.

    python benchmarks/bench_verdict.py --device cuda --json benchmarks/results_verdict_cuda.json
    python benchmarks/bench_verdict.py --images-mode all --device cuda      # every image, no early stop
    python benchmarks/bench_verdict.py --smoke                              # CPU check that it all runs

Sriram & Conati ran independent parameter randomization of every block of each architecture
(ResNet-50: its 16 Bottleneck blocks) for 7 methods on 900 ImageNet images, about a week per
architecture on one consumer GPU. This script runs the same work through
``pytest_saliency.layer_randomization`` and records how long each method takes to reach its
verdict:

* model: the ResNet-50 layout of ``benchmarks/models.py`` (written here, no torchvision), seeded
  random initialization with BatchNorm statistics calibrated on random data. No pretrained weights
  can be downloaded here, so the verdicts are those of a random network; the cost does not depend
  on the weights.
* inputs: 900 seeded uniform-noise images of 3x224x224 (no dataset can be downloaded either).
* methods and settings as in the paper: gradients (``saliency``), ``input_x_gradient``,
  ``guided_backprop``, ``guided_gradcam`` (last conv layer), ``deeplift`` and
  ``integrated_gradients`` with an all-zero baseline (IG: 50 steps), and ``lime`` (Lasso
  surrogate; this package's default of 200 samples over an 8x8 superpixel grid, with alpha
  1e-4: the default 0.01 zeroes every superpixel of a random network).
* layers: the 16 Bottleneck blocks, each randomized on its own (IPR, ``reinit``), preset
  ``adebayo2018``, seed 0.
* ``--images-mode auto`` (default): ``images="auto"``, 32 images at a time, stopping when the 99%
  bootstrap interval of S^I lies on one side of 0.01 (at most 900 images). ``all``: every image.
  The engine sizes its batches to the device's memory budget (``memory_budget="auto"``).

Per method it prints the seconds, the images used, S^I with its interval, the verdict and whether
activation reuse ran, then the total. The goal of issue 7 is a total under 10 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402

from pytest_saliency import layer_randomization  # noqa: E402

#: The seven methods of Sriram & Conati, with their settings (IG and DeepLIFT: zero baseline).
METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "input_x_gradient": {},
    "guided_backprop": {},
    "guided_gradcam": {},
    "deeplift": {"baselines": "zero"},
    "integrated_gradients": {"n_steps": 50, "baselines": "zero"},
    # The Lasso surrogate's default alpha (0.01) zeroes every superpixel of this random network,
    # whose logits barely move between perturbations: every map would be constant (a usage error).
    "lime": {"alpha": 1e-4},
}
#: --smoke: small enough for a CPU (the same code paths, far less work).
SMOKE_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 4, "baselines": "zero"},
    "lime": {"n_samples": 32, "grid": 4, "alpha": 1e-4},
}


def bottleneck_blocks(model: torch.nn.Module) -> list[str]:
    """The names of every Bottleneck block, in registration order (16 for ResNet-50)."""
    return [name for name, module in model.named_modules() if isinstance(module, models.Bottleneck)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    side = 64 if args.smoke else args.size
    n = args.images if args.images is not None else (4 if args.smoke else 900)
    model = models.build("resnet50", seed=0, calibrate_shape=(8, 3, side, side)).to(device)
    x = torch.rand((n, 3, side, side), generator=torch.Generator().manual_seed(1234)).to(device)
    blocks = bottleneck_blocks(model)
    images: str | int = "auto" if args.images_mode == "auto" else "all"
    rows = []
    total_start = time.perf_counter()
    for method in args.methods:
        options = dict(SMOKE_OPTIONS.get(method, METHODS[method]) if args.smoke else METHODS[method])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = layer_randomization(
            model, x, method, mode="independent", layers=blocks, preset="adebayo2018", seed=0,
            images=images, image_batch=args.image_batch, **options,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        s = result.stats
        row = {
            "method": method, "options": {k: repr(v) for k, v in options.items()}, "seconds": seconds,
            "images_used": result.n_images, "images_available": result.images_available,
            "blocks": len(result.layers), "S_I": s.dataset_score, "ci": [s.ci_low, s.ci_high],
            "passed": result.passed, "stopped_early": result.stopped_early,
            "reused_activations": result.reused_activations,
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
        rows.append(row)
        print(f"{method:22s} {seconds:8.1f} s  images {result.n_images:4d}/{result.images_available}  "
              f"S^I {s.dataset_score:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}]  {'PASS' if result.passed else 'FAIL'}"
              f"  reuse={result.reused_activations}", flush=True)
    total = time.perf_counter() - total_start
    print(f"total {total:.1f} s ({total / 60:.1f} min) for {len(rows)} methods x {len(blocks)} blocks")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "input": [3, side, side], "images": n, "images_mode": args.images_mode,
        "image_batch": args.image_batch, "smoke": args.smoke, "methods": rows, "total_seconds": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 900; 4 with --smoke)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--images-mode", choices=["auto", "all"], default="auto")
    parser.add_argument("--image-batch", type=int, default=32, help="images per adaptive step (default 32)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="64x64 inputs, 4 images, small IG/LIME settings")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
