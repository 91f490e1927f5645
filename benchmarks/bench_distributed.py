"""Benchmark: strong scaling of one check across torch.distributed ranks.

One fixed job, IPR of the ResNet-18 layout (``models.resnet18``, random init, BatchNorm calibrated,
as in ``bench_ipr.py``) with plain gradients (``method="saliency"``) on N generated images, run as

``plain``    one ordinary process: no process group, the check runs whole;
``K rank(s)`` ``python -m torch.distributed.run --standalone --nproc-per-node=K bench_distributed.py
             --worker ...``: every rank joins the group (``pytest_saliency.core.distributed.join``, as the
             plugin does under torchrun), the inputs are cut into shards of ``--shard-size`` images and
             each rank runs a contiguous share of them, then the ranks exchange their per-image numbers.

On the CPU every process runs with ``OMP_NUM_THREADS=1`` (one core per rank, and the plain process
single-threaded too), so the ranks do not fight over cores and K ranks can use K cores. The
configurations run in turn, their order rotated per repeat; each repeat starts fresh processes.

Measured per run: the wall time of the check call itself (``perf_counter`` around
``layer_randomization``, after a barrier and one untimed warm-up call on 2 images; the slowest
rank's), and the end-to-end time of the whole command (process start, imports, model, warm-up,
rendezvous). Reported: medians over the repeats, speedup = plain / K-rank (per repeat, then the
median, with the min..max spread), efficiency = speedup / K, and whether the per-image SSIM
(every layer) and the whole result (``to_dict()`` less ``seconds``) of each K-rank run equal the
plain run's exactly ("numbers identical").

    python benchmarks/bench_distributed.py                      # CPU: plain, 1 and 2 ranks, 128 images 3x32x32 in shards of 32, 3 repeats
    python benchmarks/bench_distributed.py --ranks 1,2,4 --images 128 --repeats 5 --json out.json

GPU (K GPUs on one host, NCCL for the collectives plus gloo for the CPU side; rank k takes cuda:k;
the timed region ends with ``torch.cuda.synchronize()``; the plain run uses cuda:0):

    python benchmarks/bench_distributed.py --device cuda --ranks 1,2,4,8 --images 1024 --size 64 \\
        --shard-size 64 --json benchmarks/results_distributed_cuda.json

Every shard is one check call with its own re-initialization of every layer and its own (smaller)
backward batches, so the "1 rank" row (the sharded path on one process) shows the cost of the shard
size; compare K ranks with it as well as with "plain" (RESULTS.md has the figures).

A cap of ``--images`` on the stream is not used: the inputs are exactly N images (``images="all"``).
Exit status 1 if any K-rank run's numbers differ from the plain run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results_distributed_cpu.json"
SEED = 0
DATA_SEED = 1234
WARMUP_IMAGES = 2


# --- the worker: one process (plain) or one rank ------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """Build the model and images, join the group when launched, time the check, write this rank's JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    import models

    import pytest_saliency as ps
    from pytest_saliency.core import distributed

    os.environ[distributed.SHARD_SIZE_VARIABLE] = str(args.shard_size)
    launched = distributed.launched()
    local = distributed.local_rank()
    if args.device == "cuda":
        device = torch.device("cuda", local if launched else 0)
    else:
        device = torch.device("cpu")
    joined = distributed.join(device, timeout=args.timeout) if launched else False
    rank = torch.distributed.get_rank() if joined else 0
    size = torch.distributed.get_world_size() if joined else 1

    shape = (3, args.size, args.size)
    model = models.build("resnet18", seed=SEED, calibrate_shape=(32, *shape)).to(device).eval()
    x = torch.rand((args.images, *shape), generator=torch.Generator().manual_seed(DATA_SEED)).to(device)
    options = {"mode": "independent", "layers": "leaf", "preset": "adebayo2018", "seed": SEED, "images": "all",
                   "n_bootstrap": args.bootstrap}

    with distributed.unsharded():  # untimed: lazy imports, first kernels, allocator
        ps.layer_randomization(model, x[:WARMUP_IMAGES], "saliency", **options)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if joined:
            torch.distributed.barrier()

    synchronize()
    start = time.perf_counter()
    result = ps.layer_randomization(model, x, "saliency", **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start  # this rank's: its share, then waiting for the others at the exchange

    record: dict[str, Any] = {"rank": rank, "size": size, "check_seconds": seconds, "threads": torch.get_num_threads(),
                              "device": str(device), "n_images": result.n_images, "n_layers": len(result.layers)}
    if rank == 0:
        numbers = result.to_dict()
        numbers.pop("seconds", None)
        record.update(ssim=result.ssim, numbers=numbers)
    Path(args.out_dir, f"rank-{rank}.json").write_text(json.dumps(record, default=str))
    if joined:
        distributed.leave()
    return 0


# --- the driver ---------------------------------------------------------------------------------------------------


def _command(args: argparse.Namespace, ranks: int | None, out_dir: str) -> list[str]:
    worker_args = [str(Path(__file__).resolve()), "--worker", "--out-dir", out_dir, "--device", args.device,
                   "--images", str(args.images), "--size", str(args.size), "--shard-size", str(args.shard_size),
                   "--bootstrap", str(args.bootstrap), "--timeout", str(args.timeout)]
    if ranks is None:
        return [sys.executable, *worker_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            *worker_args]


def run_once(args: argparse.Namespace, ranks: int | None) -> dict[str, Any]:
    """One configuration (None: the plain process), fresh processes; its timings and rank 0's numbers."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as out_dir:
        start = time.perf_counter()
        done = subprocess.run(_command(args, ranks, out_dir), env=env, capture_output=True, text=True, check=False,
                              timeout=args.timeout)
        end_to_end = time.perf_counter() - start
        if done.returncode:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"{'plain' if ranks is None else f'{ranks} ranks'}: exit status {done.returncode}")
        records = [json.loads(path.read_text()) for path in sorted(Path(out_dir).glob("rank-*.json"))]
    expected = ranks or 1
    if len(records) != expected:
        raise SystemExit(f"expected {expected} rank records, got {len(records)}")
    main = next(record for record in records if record["rank"] == 0)
    return {"check_seconds": max(record["check_seconds"] for record in records),
            "rank_seconds": [record["check_seconds"] for record in sorted(records, key=lambda r: r["rank"])],
            "end_to_end_seconds": end_to_end, "threads": sorted({record["threads"] for record in records}),
            "n_images": main["n_images"], "n_layers": main["n_layers"], "ssim": main["ssim"],
            "numbers": main["numbers"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def driver(args: argparse.Namespace) -> int:
    configs: list[int | None] = [None, *args.ranks]
    names = {None: "plain", **{k: f"{k} rank{'s' if k > 1 else ''}" for k in args.ranks}}
    runs: dict[int | None, list[dict[str, Any]]] = {config: [] for config in configs}
    load_before = os.getloadavg()
    print(f"IPR of resnet18 ({args.images} images 3x{args.size}x{args.size}, method=saliency, shard size "
          f"{args.shard_size}) on {args.device}; plain and {', '.join(names[k] for k in args.ranks)}; "
          f"{args.repeats} repeats; OMP_NUM_THREADS=1 per process; load average {load_before[0]:.2f}", flush=True)
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            run = run_once(args, config)
            runs[config].append(run)
            print(f"  repeat {repeat + 1}: {names[config]:>8}: check {run['check_seconds']:7.2f} s "
                  f"(ranks {', '.join(f'{s:.2f}' for s in run['rank_seconds'])}), end to end "
                  f"{run['end_to_end_seconds']:6.2f} s", flush=True)
    load_after = os.getloadavg()

    plain = runs[None]
    rows = []
    identical_all = True
    for config in configs:
        k = config or 1
        check = [run["check_seconds"] for run in runs[config]]
        total = [run["end_to_end_seconds"] for run in runs[config]]
        speedups = [p["check_seconds"] / r["check_seconds"] for p, r in zip(plain, runs[config])]
        speedups_e2e = [p["end_to_end_seconds"] / r["end_to_end_seconds"] for p, r in zip(plain, runs[config])]
        ssim_same = all(run["ssim"] == plain[0]["ssim"] for run in runs[config])
        numbers_same = all(run["numbers"] == plain[0]["numbers"] for run in runs[config])
        if config is not None:
            identical_all &= ssim_same and numbers_same
        rows.append({"config": names[config], "processes": k, "check_seconds": _spread(check),
                     "end_to_end_seconds": _spread(total), "speedup": _spread(speedups),
                     "efficiency": _spread([s / k for s in speedups]), "speedup_end_to_end": _spread(speedups_e2e),
                     "ssim_identical_to_plain": ssim_same, "numbers_identical_to_plain": numbers_same,
                     "threads": sorted({t for run in runs[config] for t in run["threads"]}),
                     "runs": [{key: run[key] for key in ("check_seconds", "rank_seconds", "end_to_end_seconds")}
                              for run in runs[config]]})

    lines = [
        ("| run | processes | check s (median, min..max) | speedup (min..max) | efficiency | end-to-end s | "
        "speedup end-to-end | numbers identical |"),
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        c, s, e, t, se = (row[key] for key in ("check_seconds", "speedup", "efficiency", "end_to_end_seconds",
                                                "speedup_end_to_end"))
        same = "(reference)" if row["config"] == "plain" else \
            ("yes" if row["ssim_identical_to_plain"] and row["numbers_identical_to_plain"] else "NO")
        lines.append(f"| {row['config']} | {row['processes']} | {c['median']:.2f} ({c['min']:.2f}..{c['max']:.2f}) | "
                     f"{s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f}) | {e['median']:.2f} | "
                     f"{t['median']:.2f} | {se['median']:.2f} | {same} |")
    table = "\n".join(lines)
    biggest = max(args.ranks)
    biggest_row = next(row for row in rows if row["processes"] == biggest and row["config"] != "plain")
    identical = biggest_row["ssim_identical_to_plain"] and biggest_row["numbers_identical_to_plain"]
    print()
    print(table)
    print(f"\nnumbers identical: {'yes' if identical else 'no'} (per-image SSIM of every layer, and to_dict() less "
          f"seconds, of the {biggest}-rank run vs the plain process; every K: {'yes' if identical_all else 'no'})")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} cores")

    results = {
        "benchmark": "bench_distributed", "check": "layer_randomization", "model": "resnet18", "method": "saliency",
        "images": args.images, "shape": [3, args.size, args.size], "shard_size": args.shard_size,
        "n_layers": plain[0]["n_layers"], "repeats": args.repeats, "device": args.device,
        "omp_num_threads_per_process": 1, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": _torch_version(),
        "load_average_before": load_before, "load_average_after": load_after,
        "numbers_identical": identical, "numbers_identical_every_k": identical_all, "rows": rows, "table": table,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if identical_all else 1


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", type=lambda v: sorted({int(k) for k in v.split(",")}), default=[1, 2],
                        help="rank counts to run under torchrun, e.g. 1,2 (default) or 1,2,4,8 on GPUs")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side (3xSxS); 32 on the CPU, 64 or more on GPUs")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=2000, help="n_bootstrap of the check (its default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run, and the ranks' join timeout")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the results (default on the CPU: {DEFAULT_JSON.relative_to(HERE.parent)})")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.json is None and not args.no_json and args.device == "cpu":
        args.json = DEFAULT_JSON
    if args.no_json:
        args.json = None
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
