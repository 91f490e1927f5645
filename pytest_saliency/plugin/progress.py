"""Progress of long saliency checks, shown past pytest's output capture (torch-free at import).

The checks call ``progress(done, total, label)``: ``done`` steps of ``total`` are finished and
``label`` names the next one (empty when all are done). :func:`progress_reporter` picks, in one
place, how the plugin shows it:

* **a tqdm bar** (with rate and ETA) when the terminal is interactive (the terminal reporter
  writes to a TTY), in the main pytest process;
* **the one-line fallback** otherwise (CI logs, output piped to a file): at most one line per
  second, ``    saliency: 3/6 randomized states done, next conv2 (12 s, ETA 12 s)``;
* **under pytest-xdist**, each worker writes the one-line fallback, prefixed with its id
  (``[gw1] saliency: ...``), to its stderr, which pytest-xdist's workers inherit from the
  controller: the lines reach the terminal (interleaved between workers, never as bars), with
  output capture on or with ``-s``. pytest-xdist offers no other channel for output during a test;
* **nothing** under ``-q`` (``verbose < 0``), for checks that finish within ``delay`` seconds,
  and without a terminal reporter (``-p no:terminal``).

The fixture gives each check its own reporter (:meth:`Progress.named`), so the clock, the ETA and
the bar start with the check, and the unit names what is counted (``randomized states``,
``settings``, ``methods``, ``seeds trained or loaded``, ``models``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

DEFAULT_UNIT = "randomized states"


def terminal_is_interactive(config: pytest.Config) -> bool:
    """Whether the terminal reporter writes to a TTY (tqdm bars), else one line per update."""
    terminal = config.pluginmanager.getplugin("terminalreporter")
    if terminal is None:
        return False
    isatty = getattr(terminal, "isatty", None)
    if isatty is None:  # pytest < 7.4: the writer's file
        return bool(getattr(getattr(terminal, "_tw", None), "isatty", lambda: False)())
    return bool(isatty() if callable(isatty) else isatty)


class Progress:
    """Shows ``progress(done, total, label)`` calls; see the module docstring for what and where.

    ``kind`` is ``"bar"``, ``"line"`` or ``"off"``; :func:`progress_reporter` chooses it. A call
    of a reporter is cheap when nothing is shown.
    """

    def __init__(self, config: pytest.Config, kind: str, unit: str = DEFAULT_UNIT, delay: float = 2.0,
                 interval: float = 1.0) -> None:
        self.config = config
        self.kind = kind
        self.unit = unit
        self.delay, self.interval = delay, interval
        self.terminal = config.pluginmanager.getplugin("terminalreporter")
        self.capture = config.pluginmanager.getplugin("capturemanager")
        worker = getattr(config, "workerinput", None)
        self.worker = str(worker.get("workerid", "")) if isinstance(worker, dict) else ""
        self.start = self.last = time.monotonic()
        self.bar: Any = None

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def named(self, unit: str) -> Progress:
        """A fresh reporter of the same kind for one check counting ``unit`` (its clock starts now)."""
        return type(self)(self.config, self.kind, unit, self.delay, self.interval)

    def _uncaptured(self) -> Any:
        if self.capture is not None:
            return self.capture.global_and_fixture_disabled()
        import contextlib

        return contextlib.nullcontext()

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.kind == "off":
            return
        now = time.monotonic()
        if self.kind == "bar":
            self._bar(done, total, label)
            return
        if now - self.start < self.delay or (now - self.last < self.interval and done < total):
            return
        self.last = now
        elapsed = now - self.start
        text = f"saliency: {done}/{total} {self.unit} done" + (f", next {label}" if label else "")
        timing = f"{elapsed:.0f} s"
        if 0 < done < total:
            timing += f", ETA {elapsed * (total - done) / done:.0f} s"
        line = f"{text} ({timing})"
        with self._uncaptured():
            if self.worker:
                sys.stderr.write(f"[{self.worker}] {line}\n")
                sys.stderr.flush()
            elif self.terminal is not None:
                self.terminal.write_line(f"    {line}")

    def _bar(self, done: int, total: int, label: str) -> None:
        if self.bar is None and done >= total:  # nothing open: a repeated "all done" opens no bar
            return
        with self._uncaptured():
            if self.bar is not None and (self.bar.total != total or done < self.bar.n):
                self.bar.close()
                self.bar = None
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"saliency {self.unit}", unit="step", file=sys.stderr,
                                delay=self.delay, mininterval=min(self.interval, 0.1), leave=False,
                                dynamic_ncols=True)
            if label:
                self.bar.set_postfix_str(f"next {label}", refresh=False)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
                self.bar = None


def progress_kind(config: pytest.Config) -> str:
    """How the plugin shows progress: ``"off"``, ``"bar"`` (tqdm) or ``"line"``; the one place it is chosen."""
    if int(config.getoption("verbose", 0) or 0) < 0:
        return "off"
    if hasattr(config, "workerinput"):
        return "line"  # pytest-xdist worker: lines on the inherited stderr
    if config.pluginmanager.getplugin("terminalreporter") is None:
        return "off"
    return "bar" if terminal_is_interactive(config) else "line"


def progress_reporter(config: pytest.Config, unit: str = DEFAULT_UNIT) -> Progress:
    """The reporter the ``saliency`` fixture passes to the checks (see the module docstring)."""
    return Progress(config, progress_kind(config), unit)


__all__ = ["DEFAULT_UNIT", "Progress", "progress_kind", "progress_reporter", "terminal_is_interactive"]
