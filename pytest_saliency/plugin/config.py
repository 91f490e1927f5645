"""The session's saliency configuration, resolved from command line > ini file > defaults.

Torch-free: the plugin builds this at configure time for every pytest run.
"""

from __future__ import annotations

import argparse
import dataclasses
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
