"""Lazy access to torch with a helpful error when it is missing."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def require_torch() -> ModuleType:
    """Import torch on first use; the plugin itself never imports it at load time.

    Called in every library function, so the already-imported module is looked up directly
    (``importlib.import_module`` costs about 3 microseconds a call, a millisecond per small check).
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch
    try:
        return importlib.import_module("torch")
    except ModuleNotFoundError as exc:  # pragma: no cover - torch is a hard dependency
        raise ModuleNotFoundError(
            "pytest-saliency needs PyTorch for saliency checks. Install it first, e.g. "
            "`pip install torch` (CPU build: `pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu`)."
        ) from exc
