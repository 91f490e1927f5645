"""Manual check: a saliency check called inside Ray Train workers is split across them, as under
torchrun, and gives the numbers of one plain process (Ray is not a dependency of the package:
``pip install "ray[train]"`` first; this script is not part of the test suite).

Ray Train's ``TorchTrainer`` starts a torch.distributed process group in its workers (gloo here,
``use_gpu=False``), so ``pytest_saliency.core.distributed.ranks()`` sees it and every check shards
its examples. The script runs IPR of a small CNN on 40 images in shards of 8 on 2 workers, then in
this process without any group, and prints whether every image's SSIM per layer is the same.

    OMP_NUM_THREADS=1 python benchmarks/check_ray.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

SHARD_SIZE = "8"


def build(device: Any) -> tuple[Any, Any]:
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval().to(device)
    images = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    return model, images


def audit(config: dict[str, Any]) -> None:
    """One Ray Train worker: the check, split across the workers; each writes what it got."""
    import ray.train
    from ray.train.torch import get_device

    import pytest_saliency as ps
    from pytest_saliency.core import distributed

    os.environ[distributed.SHARD_SIZE_VARIABLE] = SHARD_SIZE
    model, images = build(get_device())
    world = distributed.ranks()
    result = ps.layer_randomization(model, images, "saliency", n_bootstrap=200)
    rank = -1 if world is None else world.rank
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "size": 0 if world is None else world.size, "ssim": result.ssim}))
    ray.train.report({"passed": result.passed, "S_I": result.stats.dataset_score})


def main() -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    import pytest_saliency as ps
    from pytest_saliency.core import distributed

    out = tempfile.mkdtemp()
    ray.init(num_cpus=2, include_dashboard=False)
    TorchTrainer(audit, train_loop_config={"out": out},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp())).fit()
    workers = [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank*.json"))]
    os.environ[distributed.SHARD_SIZE_VARIABLE] = SHARD_SIZE
    plain = ps.layer_randomization(*build("cpu"), "saliency", n_bootstrap=200)
    same = bool(workers) and all(worker["ssim"] == plain.ssim for worker in workers)
    print(f"ray {ray.__version__}: workers {[(w['rank'], w['size']) for w in workers]} (rank, world size); "
          f"every image's SSIM equal to one plain process's: {'yes' if same else 'no'}")
    return 0 if same and all(w["size"] == 2 for w in workers) else 1


if __name__ == "__main__":
    sys.exit(main())
