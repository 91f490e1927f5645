"""What the trust fixes cost: the map cache's key, an IPR check and SmoothGrad's ``explain``.

Run it once per source tree to compare two versions of the package, e.g. the previous main in a
worktree and this checkout, alternating runs (the machine is shared and noisy)::

    git worktree add ../old <commit>
    python benchmarks/bench_trust_costs.py ../old && python benchmarks/bench_trust_costs.py .

Prints the best of five timings for each workload (CPU).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from models import SmallCNN, resnet18  # noqa: E402
from pytest_saliency import explain, layer_randomization  # noqa: E402
from pytest_saliency.core.fingerprint import model_fingerprint


def best_of(work: Callable[[], Any], rounds: int = 5) -> float:
    work()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    small, x = SmallCNN().eval(), torch.rand(32, 3, 32, 32)
    large = resnet18(classes=10).eval()
    rows = [
        ("model_fingerprint SmallCNN", lambda: model_fingerprint(small)),
        ("model_fingerprint ResNet-18", lambda: model_fingerprint(large)),
        ("IPR saliency, SmallCNN, 32 images", lambda: layer_randomization(small, x, "saliency")),
        ("IPR smoothgrad nt_samples=10", lambda: layer_randomization(small, x, "smoothgrad", nt_samples=10)),
        ("explain smoothgrad nt_samples=50", lambda: explain(small, x, "smoothgrad", nt_samples=50)),
    ]
    import pytest_saliency

    print(f"package: {Path(pytest_saliency.__file__).parent}")
    for label, work in rows:
        print(f"{label:40s} {best_of(work) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
