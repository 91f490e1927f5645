"""Peak memory of a check over a stream of batches, against the same check over one tensor.

Each configuration runs in a fresh process (its peak resident set size is the process's own):
IPR with plain gradients on a small CNN over N generated 3x32x32 images, either streamed from a
generator in batches of 500 (never more than one batch of inputs in memory) or passed as one
tensor. If the stream keeps only per-example numbers, its peak stays flat as N grows tenfold,
while the tensor run's grows with the inputs and maps it holds.

    python benchmarks/bench_stream_memory.py            # 5,000 and 50,000 images, both ways
    python benchmarks/bench_stream_memory.py --quick    # 2,000 and 20,000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BATCH = 500


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()


def _batches(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for start in range(0, n, BATCH):
        yield torch.rand(min(BATCH, n - start), 3, 32, 32, generator=g)


def _one(n: int, how: str) -> dict:
    import torch

    import pytest_saliency as ps

    torch.set_num_threads(2)
    model = _model()
    inputs = _batches(n) if how == "stream" else torch.cat(list(_batches(n)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = ps.layer_randomization(model, inputs, "saliency")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "how": how, "peak_rss_mb": round(peak, 1), "rss_before_check_mb": round(before, 1),
            "seconds": round(seconds, 1), "n_images": result.n_images, "dataset_score": result.stats.dataset_score,
            "passed": result.passed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("N", "HOW"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1])))
        return
    sizes = (2_000, 20_000) if args.quick else (5_000, 50_000)
    rows = []
    for n in sizes:
        for how in ("stream", "tensor"):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), how], capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| images | input | peak RSS (MB) | RSS before the check (MB) | seconds | S^I |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['how']} | {r['peak_rss_mb']:.0f} | {r['rss_before_check_mb']:.0f} | "
              f"{r['seconds']:.1f} | {r['dataset_score']:.4f} |")


if __name__ == "__main__":
    main()
