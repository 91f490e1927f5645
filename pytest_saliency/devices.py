"""Resolving the configured device name to a ``torch.device``."""

from __future__ import annotations

from typing import Any

from ._torch import require_torch
from .exceptions import SaliencyUsageError


def resolve_device(name: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    torch = require_torch()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SaliencyUsageError(
                f"--saliency-device={name} but CUDA is not available on this machine. Use "
                "--saliency-device=auto (CUDA when present, else CPU) or --saliency-device=cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SaliencyUsageError(
                f"--saliency-device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                "(CUDA_VISIBLE_DEVICES applies). Pick an index below that, or use auto."
            )
    return device
