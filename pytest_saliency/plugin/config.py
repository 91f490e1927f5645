"""The session's saliency configuration, resolved from command line > ini file > defaults.

Torch-free: the plugin builds this at configure time for every pytest run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_PRESET = "adebayo2018"  # keep in step with postprocess.DEFAULT_PRESET (tested)
PRESET_NAMES = ("adebayo2018", "sam2020", "thesis2023", "sam2020_mp")  # keep in step with postprocess.PRESETS (tested)


@dataclass(frozen=True)
class SaliencyConfig:
    """What ``--saliency*`` options and ``saliency_*`` ini keys resolved to for this session."""

    enabled: bool = False
    device: str = "auto"
    seed: int | None = None
    preset: str = DEFAULT_PRESET
    ssim_threshold: float = 0.99
    sensitivity_threshold: float = 0.01
    report: tuple[str, ...] = ()  # "json", "html": written under results_dir at the end of the session
    results_dir: str = ".saliency"
    devices: tuple[str, ...] = ()  # --saliency-devices: one process per device (plugin/launch.py)
    timeout: float = 1800.0  # seconds a rank waits for the others at an exchange (torchrun runs)
    shard_size: int | None = None  # examples per shard of a tensor of inputs across ranks (None: the default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_defaults(self) -> dict[str, Any]:
        """Keyword defaults the ``saliency`` fixture applies to every randomization check."""
        return {
            "preset": self.preset,
            "ssim_threshold": self.ssim_threshold,
            "sensitivity_threshold": self.sensitivity_threshold,
        }


def parse_device(value: str) -> str:
    """argparse ``type=``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    text = str(value).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise argparse.ArgumentTypeError(
        f"invalid saliency device {value!r}: use auto (CUDA when available), cpu, cuda or cuda:N"
    )


def parse_devices(value: str) -> tuple[str, ...]:
    """argparse ``type=`` of ``--saliency-devices``: ``all`` (every visible CUDA device) or a
    comma-separated list of ``cpu``, ``cuda`` or ``cuda:N`` (``cpu,cpu``: two processes on the CPU)."""
    text = str(value).strip().lower()
    if text == "all":
        return ("all",)
    devices = tuple(part.strip() for part in text.split(",") if part.strip())
    if not devices or any(device == "auto" for device in devices):
        raise argparse.ArgumentTypeError(
            f"invalid --saliency-devices {value!r}: use all, or a comma-separated list such as cuda:0,cuda:1 or cpu,cpu")
    return tuple(parse_device(device) for device in devices)


def parse_positive(value: str) -> float:
    """argparse ``type=``: a finite number of seconds above zero."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return number


def parse_count(value: str) -> int:
    """argparse ``type=``: a whole number above zero (a number of examples)."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number of examples, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value!r}")
    return number


def parse_preset(value: str) -> str:
    if value not in PRESET_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown saliency preset {value!r}; choose one of {', '.join(PRESET_NAMES)}"
        )
    return value


def parse_unit_interval(value: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not -1.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [-1, 1], got {number}")
    return number


def parse_sensitivity(value: str) -> float:
    """S^I is never negative, so a threshold <= 0 would pass every method: refuse it."""
    number = parse_unit_interval(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(
            f"the sensitivity threshold must be in (0, 1], got {number}: S^I >= {number} holds for every method"
        )
    return number


def parse_seed(value: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"the seed must be >= 0, got {number}")
    return number
