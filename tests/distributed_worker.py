"""Runs every streamed saliency check on tiny deterministic models and data, and writes each
result's ``to_dict()`` to a JSON file (rank 0 only): once as one plain process, once under
``torchrun`` (``python -m torch.distributed.run --nproc-per-node=K``), so that
``tests/test_distributed.py`` can compare the sharded numbers with the plain ones.

Not a test module (pytest collects ``test_*.py`` only); run as::

    OMP_NUM_THREADS=1 PYTEST_SALIENCY_SHARD_SIZE=8 python tests/distributed_worker.py out.json

Under torchrun the worker joins the process group itself (``distributed.join``), as the plugin
does at the start of a session. ``DISTRIBUTED_WORKER_ONLY=ipr,cpr`` runs only the checks named (to
debug one). The working directory is the output file's folder (the baseline
file is written there, under a relative path, so its path is the same in every run).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from conftest import TinyCNN  # tests/ is on the path: this script's folder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytest_saliency as ps
from pytest_saliency.core import distributed

N_IMAGES = 28  # shards of 8: 8, 8, 8, 4 -> two per rank
N_ROWS = 24  # tabular rows: shards of 8, 8, 8
FEATURES = 6


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def make_cnn(seed: int = 0) -> TinyCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCNN()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        model.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return model.eval()


def tabular() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y): two classes split by the sign of a feature sum."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64 + N_ROWS, FEATURES, generator=g)
    y = (x[:, 0] + x[:, 1] - x[:, 2] > 0).long()
    return x[:64], y[:64], x[64:], y[64:]


X_TRAIN, Y_TRAIN, X_TAB, Y_TAB = tabular()


def train_mlp(seed: int, *, permute: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TinyMLP:
    """A few full-batch Adam steps from a seeded start (``permute``: data randomization's labels)."""
    labels = Y_TRAIN if permute is None else permute(Y_TRAIN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyMLP()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(30):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X_TRAIN), labels).backward()
            optimizer.step()
    return model.eval()


train_mlp.build = TinyMLP  # type: ignore[attr-defined]


def checks() -> list[tuple[str, Callable[[], Any]]]:
    """Every streamed check, as (name, call). Each call builds its own inputs, so a generator is fresh."""
    cnn = make_cnn()
    x = torch.rand(N_IMAGES, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(N_IMAGES) % 3
    mlps = [train_mlp(seed) for seed in range(4)]
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # known length: 6 batches, the last of 3

    def batches() -> Iterator[torch.Tensor]:  # unknown length: 5 batches, the last of 4
        for start in range(0, N_IMAGES, 6):
            yield x[start:start + 6]

    ig = {"n_steps": 4}
    blank = torch.zeros(4, 1, 16, 16)
    with_blank = torch.cat([x[:4], blank, x[4:12]])
    return [
        ("ipr", lambda: ps.layer_randomization(cnn, x, "saliency", n_bootstrap=200)),
        ("cpr", lambda: ps.layer_randomization(cnn, x, "integrated_gradients", mode="cascading", n_bootstrap=200,
                                               **ig)),
        # decided every 8 images (one shard): two rounds of one shard per rank at most
        ("ipr_auto", lambda: ps.layer_randomization(cnn, x, "saliency", images="auto", image_batch=8,
                                                    n_bootstrap=200)),
        # decided every 4 images: a shard of 8 brings in two decisions at once
        ("ipr_auto_small_batch", lambda: ps.layer_randomization(cnn, x, "saliency", images="auto", image_batch=4,
                                                                n_bootstrap=200)),
        ("ipr_early_exit", lambda: ps.layer_randomization(cnn, x, "saliency", early_exit=True, image_batch=8,
                                                          n_bootstrap=200)),
        ("ipr_cap", lambda: ps.layer_randomization(cnn, x, "saliency", images=12, n_bootstrap=200)),  # cuts shard 1
        # one process stops after the first 4 images; the maps of images 4 to 7 are constant (an error if
        # reached): the shard that holds them runs in the same round on rank 1, and must not fail the check
        ("ipr_auto_later_error", lambda: ps.layer_randomization(cnn, with_blank, "input_x_gradient", images="auto",
                                                                image_batch=4, n_bootstrap=200)),
        ("ipr_loader_cap", lambda: ps.layer_randomization(cnn, loader, "saliency", images=12, n_bootstrap=200)),
        ("ipr_loader", lambda: ps.layer_randomization(cnn, loader, "saliency", target="labels", n_bootstrap=200)),
        ("ipr_loader_auto", lambda: ps.layer_randomization(cnn, loader, "saliency", images="auto", image_batch=5,
                                                           n_bootstrap=200)),
        ("smooth_randomization", lambda: ps.smooth_randomization(cnn, x, "saliency", n_samples=2, n_bootstrap=200)),
        ("efficient_randomization", lambda: ps.efficient_randomization(cnn, x, "saliency", n_bootstrap=200)),
        ("efficient_randomization_cap", lambda: ps.efficient_randomization(cnn, x, "saliency", images=12,
                                                                           n_bootstrap=200)),
        ("random_logit", lambda: ps.random_logit(cnn, x, "saliency", n_bootstrap=200)),
        ("random_logit_loader", lambda: ps.random_logit(cnn, loader, "saliency", n_bootstrap=200)),
        ("agreement_matrix", lambda: ps.agreement_matrix(cnn, x, ["saliency", "input_x_gradient"],
                                                         ["sign_agreement", "ssim"], n_bootstrap=200)),
        ("agreement_generator", lambda: ps.agreement_matrix(cnn, batches(), ["saliency", "input_x_gradient"],
                                                            ["sign_agreement", "rank_correlation"], n_bootstrap=200)),
        ("seed_consistency", lambda: ps.seed_consistency(mlps[:3], X_TAB, metric="sign_agreement", labels=Y_TAB,
                                                         n_splits=2)),
        ("explanation_consistency", lambda: ps.explanation_consistency(mlps[:2], X_TAB, n_splits=2)),
        ("explainer_seed_stability", lambda: ps.explainer_seed_stability(cnn, x, "smoothgrad", seeds=(0, 1),
                                                                         nt_samples=2)),
        ("consistency_vs_ensemble_size", lambda: ps.consistency_vs_ensemble_size(mlps, X_TAB, sizes=(1, 2),
                                                                                 n_splits=2)),
        ("hyperparameter_sweep", lambda: ps.hyperparameter_sweep(cnn, x, "integrated_gradients",
                                                                 sweep={"n_steps": [2, 4]}, reference={"n_steps": 8},
                                                                 metrics=("ssim", "spearman"))),
        ("input_noise", lambda: ps.input_noise_stability(cnn, x, "saliency", metrics=("ssim",), n_draws=2)),
        ("input_shift", lambda: ps.input_shift_invariance(cnn, x, "saliency")),
        ("deletion", lambda: ps.deletion(cnn, x, "saliency")),
        ("insertion_loader", lambda: ps.insertion(cnn, loader, "saliency", target="labels")),
        ("accuracy_spread", lambda: ps.accuracy_spread(cnn, x, "integrated_gradients", sweep={"n_steps": [2, 4]},
                                                       scores=("deletion",))),
        ("data_randomization", lambda: ps.data_randomization(train_mlp, X_TAB, "saliency", fit=(X_TRAIN, Y_TRAIN),
                                                             n_bootstrap=200)),
        ("baseline_write", lambda: ps.check_baseline(cnn, x, "baseline.npz")),
        ("baseline_compare", lambda: ps.check_baseline(cnn, x, "baseline.npz")),
        ("baseline_compare_drifted", lambda: ps.check_baseline(make_cnn(seed=3), x, "baseline.npz")),
    ]


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities as strings, so that equal results compare equal after loading."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main(output: str) -> int:
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(out.parent)
    torch.set_num_threads(1)
    joined = distributed.join(torch.device("cpu"), timeout=60)
    world = distributed.ranks()
    only = set(os.environ.get("DISTRIBUTED_WORKER_ONLY", "").split(",")) - {""}
    results: dict[str, Any] = {}
    try:
        for name, call in checks():
            if only and name not in only:
                continue
            started = time.perf_counter()
            try:
                results[name] = _plain(json.loads(json.dumps(call().to_dict(), default=str)))
            except Exception as error:  # noqa: BLE001 - raised alike on every rank: recorded, the ranks go on
                results[name] = {"__error__": f"{type(error).__name__}: {error}",
                                 "__traceback__": traceback.format_exc()[-3000:]}
            results[name]["__wall__"] = round(time.perf_counter() - started, 3)
    finally:
        if joined:
            distributed.leave()
    if distributed.is_main():
        meta = {"world": None if world is None else [world.rank, world.size], "shard_size": distributed.shard_size()}
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
