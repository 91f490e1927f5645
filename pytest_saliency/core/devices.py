"""Resolving the configured device name to a ``torch.device``, one GPU per pytest-xdist worker.

With ``pytest -n <gpus> --saliency`` each worker process ``gwN`` takes the N-th visible CUDA device
(modulo the count), so N workers spread over N GPUs with no configuration. Indices are torch's,
which count only the devices in ``CUDA_VISIBLE_DEVICES``: ``CUDA_VISIBLE_DEVICES=2,3 pytest -n 2``
puts gw0 on physical GPU 2 and gw1 on GPU 3. Nothing here initializes CUDA beyond
``torch.cuda.is_available()`` and ``device_count()``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exceptions import SaliencyUsageError
from .torchtools import require_torch

if TYPE_CHECKING:
    import torch


def worker_index(worker_id: str | None = None) -> int | None:
    """``gw3`` -> 3; ``None`` outside pytest-xdist (or in its controller, ``master``)."""
    if worker_id is None:
        worker_id = os.environ.get("PYTEST_XDIST_WORKER")
    match = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(match.group(1)) if match else None


def process_index(worker_id: str | None = None) -> int:
    """Which GPU share this process takes: its local rank under torchrun (``LOCAL_RANK``), else
    its pytest-xdist worker number, else 0."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return worker_index(worker_id) or 0


def rank_device_name(name: str, devices: Sequence[str]) -> str:
    """The device name for this process: under torchrun with ``--saliency-devices`` (or the
    launcher's ``PYTEST_SALIENCY_DEVICES``), the entry at its local rank; else ``name``."""
    listed = [d for d in os.environ.get("PYTEST_SALIENCY_DEVICES", "").split(",") if d] or list(devices)
    if listed == ["all"]:
        return "cuda"
    if "WORLD_SIZE" not in os.environ:  # one process: a single listed device is its device
        return listed[0] if len(listed) == 1 else name
    if not listed:
        return name
    rank = process_index()
    if rank >= len(listed):
        raise SaliencyUsageError(
            f"--saliency-devices lists {len(listed)} device(s) ({','.join(listed)}), but this process has local rank "
            f"{rank}: list one device per process that torchrun starts on this host (--nproc-per-node).")
    return listed[rank]


def resolve_device(name: str, worker_id: str | None = None, devices: Sequence[str] = ()) -> torch.device:
    """``auto`` -> this process's CUDA device when CUDA is available, else the CPU.

    ``cuda`` without an index is spread over pytest-xdist workers or torchrun's local ranks the
    same way; ``cuda:N`` is taken literally and must exist. Under torchrun, ``devices`` (from
    ``--saliency-devices``) gives each local rank its own.
    """
    torch = require_torch()
    name = rank_device_name(name, devices)
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise _cuda_unavailable(name)
        index = process_index(worker_id) % max(torch.cuda.device_count(), 1)
        return torch.device("cuda", index)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _cuda_unavailable(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SaliencyUsageError(
                f"--saliency-device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                "(CUDA_VISIBLE_DEVICES applies). Pick an index below that, or use auto."
            )
    return device


def _cuda_unavailable(name: str) -> SaliencyUsageError:
    return SaliencyUsageError(
        f"--saliency-device={name} but CUDA is not available on this machine. Use "
        "--saliency-device=auto (CUDA when present, else CPU) or --saliency-device=cpu."
    )
