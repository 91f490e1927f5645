"""Seeded randomness that leaves every global RNG exactly as it was.

captum draws its noise from the global torch generator (NoiseTunnel, Lime, KernelShap),
from numpy's global state (GradientShap) and ``reset_parameters`` draws from the global torch
generator too. A check that seeded those globals would silently change the randomness of the
user's other tests, so every draw happens inside :func:`seeded`, which forks the torch CPU and
CUDA generators and saves/restores numpy's and Python's global states.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

from ._torch import require_torch


@contextlib.contextmanager
def seeded(seed: int, device: Any = None, *, torch_only: bool = False) -> Iterator[None]:
    """Run the block with all global RNGs seeded from ``seed``, then restore them bit for bit.

    ``torch_only=True`` leaves numpy's and Python's generators alone, for blocks that only draw
    from torch (``reset_parameters``); saving and restoring those costs more than the draws.
    """
    torch = require_torch()
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [index if index is not None else torch.cuda.current_device()]
    with contextlib.ExitStack() as stack:
        if not torch_only:
            stack.enter_context(_seeded_numpy_and_python(seed))
        stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
        # Seed exactly the generators the fork restores. torch.random.manual_seed would also
        # (lazily) reseed every other CUDA device, a global change nothing here undoes, and it
        # records a stack trace per call even on CPU-only builds.
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def _seeded_numpy_and_python(seed: int) -> Iterator[None]:
    """Install seeded numpy and Python global states for the block; the saved ones come back after."""
    import numpy as np

    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        np.random.set_state(np.random.RandomState(seed % (2**32)).get_state())
        random.setstate(random.Random(seed).getstate())
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A stable sub-seed for one part of a check (one layer, one draw), independent of order.

    Python's ``hash`` varies between processes; a blake2b digest does not, so IPR and CPR
    randomize a given layer identically and pytest-xdist workers agree.
    """
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)
