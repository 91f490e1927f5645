"""Memory of a long session that shares one MapCache: RSS over many occlusion checks.

Each check is an IPR occlusion check of a SmallCNN (3x32x32 inputs, 6 leaf layers; a 16x16
window with stride 16, to keep the forward passes cheap) on images it has not seen before, with
the session's cache (a default ``MapCache()``, as the plugin's ``_saliency_map_cache`` fixture
builds it), so every check adds one entry: the original model's maps. Occlusion computes every
state's maps in one stack (``forward_reuse``); the cache gets the original model's column of it. The process's resident set size (``VmRSS``) is printed every
``--every`` checks, with what the cache counts (``cache.bytes``) and what its entries really hold
(the storages behind them, each counted once).

``--put old`` replaces ``MapCache.put`` by the earlier one, which stored the tensor it was handed
(a view of the whole stack) and counted only the view's bytes. Without ``--put``, both run, each
in a fresh process, one after the other.

    python benchmarks/bench_cache_memory.py --checks 200 --images 16
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import SmallCNN  # noqa: E402
from pytest_saliency import layer_randomization  # noqa: E402
from pytest_saliency.maps.cache import MapCache  # noqa: E402


def old_put(self: MapCache, key: str | None, value: torch.Tensor) -> None:
    """The earlier ``put``: keeps ``value`` itself and counts only its own elements."""
    if key is None:
        return
    size = value.numel() * value.element_size()
    if size > self.max_bytes:
        return
    if key in self._entries:
        self.bytes -= self._entries.pop(key)[1]
    self._entries[key] = (value, size)
    self.bytes += size
    while self.bytes > self.max_bytes:
        _, (_, dropped) = self._entries.popitem(last=False)
        self.bytes -= dropped


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def held_mb(cache: MapCache) -> float:
    """The bytes of the storages the cache's entries keep alive, each storage once."""
    storages = {}
    for value, _ in cache._entries.values():
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def session(put: str, checks: int, images: int, every: int) -> None:
    torch.set_num_threads(1)
    if put == "old":
        MapCache.put = old_put
    torch.manual_seed(0)
    model = SmallCNN(channels=3).eval()
    warm = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layer_randomization(model, warm, "occlusion", window=16, stride=16)  # (imports and allocator warm-up)
    cache = MapCache()
    gc.collect()
    start_rss, start = rss_mb(), time.perf_counter()
    print(f"put={put}: before: RSS {start_rss:.0f} MB", flush=True)
    for check in range(1, checks + 1):
        x = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(check))
        layer_randomization(model, x, "occlusion", window=16, stride=16, cache=cache)
        if check % every == 0 or check == checks:
            gc.collect()
            print(f"put={put}: after {check:4d} checks: RSS {rss_mb():6.0f} MB, cache counts "
                  f"{cache.bytes / 2**20:6.1f} MB in {len(cache)} entries, holds {held_mb(cache):6.1f} MB "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"put={put}: RSS {start_rss:.0f} MB -> {rss_mb():.0f} MB over {checks} checks", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--put", choices=("old", "new"), help="one session only (default: both, in fresh processes)")
    args = parser.parse_args()
    if args.put:
        session(args.put, args.checks, args.images, args.every)
        return
    for put in ("old", "new"):
        subprocess.run([sys.executable, __file__, "--put", put, "--checks", str(args.checks), "--images",
                        str(args.images), "--every", str(args.every)], check=True)


if __name__ == "__main__":
    main()
