"""``--saliency-devices=cuda:0,cuda:1``: one pytest process per device, as ``torchrun`` would start
them, for a machine with several GPUs and no launcher.

The command is run again once per device, each process with torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and ``PYTEST_SALIENCY_DEVICES``:
each joins the process group at the start of its session and takes its device, and every saliency
check splits its examples between them (:mod:`pytest_saliency.core.distributed`). Processes, not
threads: captum and the checks draw random numbers from process-wide generators, which threads
would share. Rank 0 prints to this terminal and writes the reports; the other ranks' output goes
to ``<results dir>/ranks/rank-N.log``. The exit status is rank 0's, or the first failing rank's.

Torch-free: the launcher only starts processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEVICES_VARIABLE = "PYTEST_SALIENCY_DEVICES"
#: Seconds the other ranks get to finish after one failed (rank 0 writes the reports meanwhile).
GRACE = 60.0


def free_port() -> int:
    """A TCP port free on this host now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_environment(rank: int, devices: list[str], port: int) -> dict[str, str]:
    """The environment of rank ``rank``'s process: torchrun's variables, the devices, and (on the
    CPU, unless set) an even share of the cores for each process's threads."""
    env = dict(os.environ)
    size = len(devices)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env[DEVICES_VARIABLE] = ",".join(devices)
    if "OMP_NUM_THREADS" not in env and all(device == "cpu" for device in devices):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // size))
    return env


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the ranks still running (they get 10 seconds to clean up), then kill them."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


#: pytest's exit statuses of a session that ran to its end: passed, tests failed, interrupted (the
#: ranks lost step), no tests collected. Anything else (an internal or usage error, a signal, a
#: status set by os._exit) means the rank stopped where it was.
NORMAL_EXITS = frozenset({0, 1, 2, 5})


def _abnormal(code: int | None) -> bool:
    return code is not None and code not in NORMAL_EXITS


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def launch(args: list[str], devices: list[str], directory: Path, logs: Path) -> int:
    """Run ``python -m pytest args`` in ``directory`` once per device; rank 0 on this terminal,
    the others into ``logs``. Returns rank 0's exit status, or the first other failing rank's
    (``128 + N`` for a rank killed by signal N; pytest's 2 when this launcher is interrupted)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "pytest", *args]
    processes = []
    handles = []
    for rank in range(len(devices)):
        output = None
        if rank:
            output = open(logs / f"rank-{rank}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            handles.append(output)
        processes.append(subprocess.Popen(command, cwd=directory, env=rank_environment(rank, devices, port),
                                          stdout=output, stderr=subprocess.STDOUT if output else None))
    previous = signal.signal(signal.SIGTERM, _interrupted)  # a CI timeout's SIGTERM: stop the ranks too
    try:
        codes = _watch(processes, logs)
    except KeyboardInterrupt:
        print("saliency: interrupted; stopping the ranks", file=sys.stderr)
        return 2  # pytest's ExitCode.INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(processes)
        for handle in handles:
            handle.close()
    failed = [(rank, code) for rank, code in enumerate(codes) if code and rank]
    for rank, code in failed:
        print(f"saliency: rank {rank} exited with status {code}; its output: {logs / f'rank-{rank}.log'}",
              file=sys.stderr)
    return codes[0] or (failed[0][1] if failed else 0)


def _watch(processes: list[subprocess.Popen[bytes]], logs: Path) -> list[int]:
    """Wait for every rank. One that ends abnormally while others run (it died, or never joined)
    gets them :data:`GRACE` seconds to finish, and then they are stopped: they would wait for it
    until the timeout. A rank whose tests failed ended normally: the others run to their end (an
    exchange with it would fail at once). Signal deaths are reported as ``128 + N``."""
    failed_at: float | None = None
    while True:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes):
            return [128 - code if code is not None and code < 0 else int(code or 0) for code in codes]
        if failed_at is None and any(_abnormal(code) for code in codes):
            failed_at = time.monotonic()
        elif failed_at is not None and time.monotonic() - failed_at > GRACE:
            rank = next(rank for rank, code in enumerate(codes) if _abnormal(code))
            print(f"saliency: rank {rank} failed {GRACE:g} s ago and the others have not finished; stopping them "
                  f"(its output: {logs / f'rank-{rank}.log'} or above)", file=sys.stderr)
            _stop(processes)
        time.sleep(0.2)


__all__ = ["DEVICES_VARIABLE", "free_port", "launch", "rank_environment"]
