"""Lazy access to torch with a helpful error when it is missing, and small helpers for a model's
``training`` flags and plain attributes."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def require_torch() -> ModuleType:
    """Import torch on first use; the plugin itself never imports it at load time.

    Called in every library function, so the already-imported module is looked up directly,
    without the import machinery.
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


def training_flags(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every module of ``model`` with its ``training`` flag, for :func:`restore_training_flags`."""
    return [(module, module.training) for module in model.modules()]


def restore_training_flags(flags: list[tuple[torch.nn.Module, bool]]) -> None:
    """Put the ``training`` flags back, writing only those that changed."""
    for module, training in flags:
        if module.training is not training:
            set_plain_attribute(module, "training", training)


def set_plain_attribute(module: torch.nn.Module, name: str, value: Any) -> None:
    """``setattr(module, name, value)`` for a value that is neither a parameter, a buffer nor a module.

    For an ``nn.Module`` subclass that does not override ``__setattr__`` this is
    ``object.__setattr__``, which is where ``nn.Module.__setattr__`` ends for such values, at a
    fraction of the cost (checks write flags and patch forwards many times). A class with its own
    ``__setattr__`` (a TorchScript module keeps ``training`` in its C++ object) gets it called.
    """
    torch = require_torch()
    if type(module).__setattr__ is torch.nn.Module.__setattr__:
        object.__setattr__(module, name, value)
    else:
        setattr(module, name, value)


def ensure_eval_mode(model: torch.nn.Module, flags: list[tuple[torch.nn.Module, bool]]) -> None:
    """``model.eval()``, skipped when ``flags`` (taken just before) say every module is in eval mode already."""
    if any(training for _, training in flags):
        model.eval()


@contextlib.contextmanager
def model_in_eval_mode(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (when ``enabled``); every module's ``training``
    flag is put back afterwards, whatever ends the block."""
    flags = training_flags(model)
    if enabled:
        ensure_eval_mode(model, flags)
    try:
        yield
    finally:
        restore_training_flags(flags)


_SETTINGS = (bool, int, float, str, type(None))


def module_settings(module: torch.nn.Module) -> tuple[tuple[str, Any], ...]:
    """A module's plain settings: its public attributes that are numbers, strings, flags or tuples
    of them (``kernel_size``, ``scale_factor``, ``inplace``, a user's ``mc_dropout = True``). With
    the module's type they tell two models apart whose parameters are equal."""
    return tuple((key, value) for key, value in vars(module).items() if not key.startswith("_") and (
        isinstance(value, _SETTINGS) or (type(value) is tuple and all(isinstance(v, _SETTINGS) for v in value))))
