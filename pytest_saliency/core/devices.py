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


def resolve_device(name: str, worker_id: str | None = None) -> torch.device:
    """``auto`` -> this worker's CUDA device when CUDA is available, else the CPU.

    ``cuda`` without an index is spread over workers the same way; ``cuda:N`` is taken
    literally and must exist.
    """
    torch = require_torch()
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise _cuda_unavailable(name)
        index = (worker_index(worker_id) or 0) % max(torch.cuda.device_count(), 1)
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
